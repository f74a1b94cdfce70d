//! `Idempotency-Key` on paid calls (contract 3.8): a retry replays the first answer instead of
//! charging again; a reused key with another body or endpoint, or a malformed one, is refused
//! before any charge; records are per API key.

use anyhow::{Result, bail, ensure};

use super::prelude::*;
use crate::audit::client::random_idempotency_key;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("idempotency.replay", "the same Idempotency-Key and body twice → one hold + capture, the second answer is the first byte for byte with Idempotent-Replayed: true and a fresh X-Request-Id; 10 at once → still one hold", |c, _| replay(c)),
        scenario!("idempotency.mismatch", "the same Idempotency-Key with a body that is not byte-identical → 422 idempotency_mismatch, no charge, no ledger row", |c, _| mismatch(c)),
        scenario!("idempotency.other_endpoint", "the same Idempotency-Key on another endpoint → 422 idempotency_mismatch, no charge, no ledger row", |c, _| other_endpoint(c)),
        scenario!("idempotency.scoped_to_key", "one Idempotency-Key on two API keys → two independent calls, each charged once", |c, _| scoped_to_key(c)),
        scenario!("idempotency.syntax", "a malformed Idempotency-Key (31 or 129 chars, a bad character, two headers) → 400 invalid_input, no charge", |c, _| syntax(c)),
    ]
}

fn idem(k: &str) -> [(&str, &str); 1] {
    [("Idempotency-Key", k)]
}

fn replayed(r: &Reply) -> bool {
    r.header("idempotent-replayed").is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn replay(c: &mut Client) -> Result<Outcome> {
    let ep = c.first();
    let minted = ep.price * 10;
    let key = c.key_for(&ep, 10)?;
    let body = ep.sample().to_string();

    // One call, then its retry.
    let ik = random_idempotency_key();
    let first = c.call_with(&ep, &key, &idem(&ik), &body);
    expect(&first, 200, "")?;
    ensure!(!replayed(&first), "the first call answered Idempotent-Replayed: {:?}", first.header("idempotent-replayed"));
    let first_id = first.header("x-request-id").unwrap_or_default();
    let second = c.call_with(&ep, &key, &idem(&ik), &body);
    ensure!(second.status == first.status, "the retry answered {} (the first call {})", second.brief(), first.status);
    ensure!(replayed(&second), "the retry has no Idempotent-Replayed: true (headers {:?})", second.headers);
    ensure!(second.body == first.body, "the replayed body differs from the first:\n  first  {}\n  replay {}", first.body, second.body);
    let second_id = second.header("x-request-id").unwrap_or_default();
    ensure!(!second_id.is_empty() && second_id != first_id, "the replay's X-Request-Id {second_id:?} is not fresh (first call {first_id:?})");
    ensure!(second.header("x-charged-mcents") == first.header("x-charged-mcents"), "X-Charged-Mcents {:?} on the replay, {:?} on the call", second.header("x-charged-mcents"), first.header("x-charged-mcents"));
    let bal = c.balance(&key)?;
    ensure!(bal == minted - ep.price, "balance {bal} after a call and its replay: expected {} (charged once)", minted - ep.price);
    let rows = ledger_rows(c, &key)?;
    ensure!(count_kind(&rows, "hold") == 1, "{} holds in the ledger after a call and its replay", count_kind(&rows, "hold"));
    ensure!(kinds_for(&rows, &first_id) == ["hold", "capture"], "ledger rows of {first_id}: {:?}, expected hold then capture", kinds_for(&rows, &first_id));

    // Ten identical calls at once with a new key: one runs, the others wait their turn or replay.
    let ik2 = random_idempotency_key();
    let shared: &Client = c;
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10).map(|_| s.spawn(|| shared.call_with(&ep, &key, &idem(&ik2), &body))).collect();
        handles.into_iter().map(|h| h.join().expect("request thread")).collect()
    });
    let (mut originals, mut replays, mut busy) = (Vec::new(), 0, 0);
    for r in &replies {
        match r.status {
            200 if replayed(r) => replays += 1,
            200 => originals.push(r),
            409 => {
                expect(r, 409, "idempotency_in_progress")?;
                let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("409 idempotency_in_progress without an integer Retry-After"))?;
                ensure!((1..=5).contains(&retry), "409 idempotency_in_progress with Retry-After {retry} (contract: 1-5 s)");
                ensure!(r.json()["retry_after_seconds"] == retry, "retry_after_seconds {} ≠ Retry-After {retry}", r.json()["retry_after_seconds"]);
                ensure!(r.body.contains(NO_CHARGE), "409 without the no-charge note: {}", r.body);
                busy += 1;
            }
            _ => bail!("10 identical calls at once: unexpected {}", r.brief()),
        }
    }
    ensure!(originals.len() == 1, "{} of 10 identical calls ran as new calls (expected exactly one)", originals.len());
    let original = originals[0];
    for r in replies.iter().filter(|r| r.status == 200 && replayed(r)) {
        ensure!(r.body == original.body, "a concurrent replay differs from the call it replays:\n  call   {}\n  replay {}", original.body, r.body);
    }
    let bal = c.balance(&key)?;
    ensure!(bal == minted - 2 * ep.price, "balance {bal} after two idempotent calls: expected {}", minted - 2 * ep.price);
    let rows = ledger_rows(c, &key)?;
    ensure!(count_kind(&rows, "hold") == 2, "{} holds in the ledger after two idempotent calls (one of them sent 10 times at once)", count_kind(&rows, "hold"));
    let (captured, released) = settled_holds(&rows)?;
    ensure!(captured == 2 && released == 0, "{captured} captured and {released} released, expected 2 captured");
    pass(format!("charged once per Idempotency-Key; 10 at once: 1 call, {replays} replays, {busy} × 409 in progress"))
}

fn mismatch(c: &mut Client) -> Result<Outcome> {
    let ep = c.first();
    let key = c.key_for(&ep, 3)?;
    let body = ep.sample().to_string();
    let ik = random_idempotency_key();
    let first = c.call_with(&ep, &key, &idem(&ik), &body);
    expect(&first, 200, "")?;
    let bal = c.balance(&key)?;
    let (sum, rows) = ledger_sum(c, &key)?;
    // The same JSON with one more space is another body: records compare the bytes.
    let mut others = vec![format!("{body} ")];
    if let Some(changed) = changed_value(&ep) {
        others.push(changed);
    }
    for other in &others {
        let r = c.call_with(&ep, &key, &idem(&ik), other);
        refused_uncharged(c, &r, 422, "idempotency_mismatch", &key, bal).map_err(|e| e.context(format!("body {other:?} after {body:?}")))?;
    }
    ensure!(ledger_sum(c, &key)? == (sum, rows), "a refused mismatch wrote ledger rows");
    // The record is untouched: the original body still replays.
    let again = c.call_with(&ep, &key, &idem(&ik), &body);
    ensure!(again.status == 200 && replayed(&again) && again.body == first.body, "the original body after a mismatch: {} (expected its replay)", again.brief());
    ensure!(c.balance(&key)? == bal, "balance moved");
    pass(format!("422 idempotency_mismatch for {} other bodies, balance still {bal}, original still replays", others.len()))
}

/// The sample body with its first string, integer or boolean field changed (still a valid input).
pub(super) fn changed_value(ep: &Endpoint) -> Option<String> {
    let mut v = ep.sample();
    let obj = v.as_object_mut()?;
    let (_, value) = obj.iter_mut().find(|(_, v)| v.is_string() || v.is_i64() || v.is_boolean())?;
    let changed = match &*value {
        serde_json::Value::String(s) => serde_json::Value::String(format!("{s}-other")),
        serde_json::Value::Bool(b) => serde_json::Value::Bool(!*b),
        other => serde_json::json!(other.as_i64().unwrap_or(0) + 1),
    };
    *value = changed;
    Some(v.to_string())
}

fn other_endpoint(c: &mut Client) -> Result<Outcome> {
    let ep = c.first();
    let Some(other) = c.endpoints.iter().find(|e| e.name != ep.name).cloned() else {
        return Ok(Outcome::NotApplicable("the gateway sells one endpoint: no other endpoint to reuse the Idempotency-Key on".into()));
    };
    let key = c.mint(ep.price + other.price, &[ep.scope.as_str(), other.scope.as_str()])?;
    let ik = random_idempotency_key();
    expect(&c.call_with(&ep, &key, &idem(&ik), &ep.sample().to_string()), 200, "")?;
    let bal = c.balance(&key)?;
    let (sum, rows) = ledger_sum(c, &key)?;
    let r = c.call_with(&other, &key, &idem(&ik), &other.sample().to_string());
    refused_uncharged(c, &r, 422, "idempotency_mismatch", &key, bal).map_err(|e| e.context(format!("/v1/{} with the Idempotency-Key of a /v1/{} call", other.name, ep.name)))?;
    ensure!(ledger_sum(c, &key)? == (sum, rows), "a refused mismatch wrote ledger rows");
    pass(format!("/v1/{} then /v1/{}: 422 idempotency_mismatch, balance still {bal}", ep.name, other.name))
}

fn scoped_to_key(c: &mut Client) -> Result<Outcome> {
    let (ep, a, bal_a) = setup(c)?;
    let b = c.key_for(&ep, 2)?;
    let body = ep.sample().to_string();
    let ik = random_idempotency_key();
    let ra = c.call_with(&ep, &a, &idem(&ik), &body);
    let rb = c.call_with(&ep, &b, &idem(&ik), &body);
    expect(&ra, 200, "")?;
    expect(&rb, 200, "")?;
    ensure!(!replayed(&rb), "the second key's call was answered with the first key's replay: {}", rb.body);
    ensure!(ra.json()["request_id"] != rb.json()["request_id"], "both keys got the answer of one call: {}", rb.body);
    ensure!(c.balance(&a)? == bal_a - ep.price, "the first key was not charged once");
    ensure!(c.balance(&b)? == ep.price, "the second key was not charged once");
    let rows = ledger_rows(c, &b)?;
    ensure!(count_kind(&rows, "hold") == 1 && count_kind(&rows, "capture") == 1, "the second key's ledger: {} holds, {} captures", count_kind(&rows, "hold"), count_kind(&rows, "capture"));
    pass("two keys, one Idempotency-Key: two calls, each charged once")
}

fn syntax(c: &mut Client) -> Result<Outcome> {
    let (ep, key, bal) = setup(c)?;
    let body = ep.sample().to_string();
    let (sum, rows) = ledger_sum(c, &key)?;
    let good = random_idempotency_key();
    let too_short = "a".repeat(31);
    let too_long = "a".repeat(129);
    let bad_char = format!("{}.{}", &good[..20], &good[20..]);
    let other = random_idempotency_key();
    let cases: [(&str, Vec<(&str, &str)>); 4] = [
        ("31 characters", vec![("Idempotency-Key", too_short.as_str())]),
        ("129 characters", vec![("Idempotency-Key", too_long.as_str())]),
        ("a '.'", vec![("Idempotency-Key", bad_char.as_str())]),
        ("two headers", vec![("Idempotency-Key", good.as_str()), ("Idempotency-Key", other.as_str())]),
    ];
    for (what, headers) in &cases {
        let r = c.call_with(&ep, &key, headers, &body);
        refused_uncharged(c, &r, 400, "invalid_input", &key, bal).map_err(|e| e.context(format!("Idempotency-Key with {what}")))?;
    }
    ensure!(ledger_sum(c, &key)? == (sum, rows), "a refused Idempotency-Key wrote ledger rows");
    pass(format!("400 invalid_input for 31 and 129 characters, a '.', two headers; balance still {bal}"))
}
