//! After the hold (contract 3.11): a handler failure or timeout is a result with `isError: true`
//! whose body is what HTTP would answer and whose `_meta` says it was refunded (hold + release);
//! `params._meta["io.mcpay/idempotency_key"]` replays a captured call instead of charging again.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::*;
use super::super::idempotency::changed_value;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("mcp.refund_on_failure", "a tools/call whose handler fails (--failing-call) → result isError, structuredContent handler_failed, refunded true, charged 0; _meta io.mcpay/refunded true; balance restored, ledger hold + release under the call id", |c, o| {
            failed(c, o.failing_call.clone(), "--failing-call", "a call the handler fails on", "handler_failed")
        }),
        scenario!("mcp.timeout", "a tools/call whose handler outlives its timeout_ms (--slow-call) → result isError, handler_timeout, refunded true; balance restored, ledger hold + release", |c, o| {
            failed(c, o.slow_call.clone(), "--slow-call", "a call the handler takes longer than the endpoint's timeout_ms on", "handler_timeout")
        }),
        scenario!("mcp.refund_cap", "tools/call failures (--failing-call) past the hourly refund cap → isError with refunded false, charged the price, io.mcpay/refunded false; ledger: releases within the cap, captures past it", |c, o| refund_cap(c, o)),
        scenario!("mcp.idempotency_replay", "the same _meta io.mcpay/idempotency_key and arguments twice → one hold + capture; the retry is the stored result with _meta io.mcpay/idempotent_replayed true", |c, _| replay(c)),
        scenario!("mcp.idempotency_concurrent", "10 identical tools/call with one io.mcpay/idempotency_key at once → exactly one runs; the others replay it or get -32005 idempotency_in_progress with retry_after_seconds; one hold", |c, _| concurrent(c)),
        scenario!("mcp.idempotency_mismatch", "the same _meta io.mcpay/idempotency_key with other arguments (or another tool) → JSON-RPC -32005, data idempotency_mismatch + no-charge note, nothing charged", |c, _| mismatch(c)),
        scenario!("mcp.idempotency_syntax", "a malformed _meta io.mcpay/idempotency_key (31 chars, a '.', a number) → JSON-RPC -32602 invalid_input + no-charge note, nothing charged", |c, _| syntax(c)),
    ]
}

fn failed(c: &mut Client, call: Option<(String, String)>, flag: &str, what: &str, code: &str) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let Some((name, body)) = call else {
        return Ok(Outcome::NotApplicable(format!("needs {flag} ENDPOINT=JSON ({what})")));
    };
    let ep = endpoint(c, flag, &name)?;
    let args: Value = serde_json::from_str(&body).map_err(|e| anyhow::anyhow!("{flag} {name}={body}: the arguments are not JSON ({e})"))?;
    let minted = ep.price * 2;
    let key = c.key_for(&ep, 2)?;
    let jid = fresh_id();
    let r = call_tool_id(c, Some(&key), json!(jid), &ep.name, args, None);
    let res = result(&r).map_err(|e| e.context("after the hold the answer is a result, never a JSON-RPC error"))?;
    ensure!(res["isError"] == true, "the failed call's result is not isError: {res}");
    let sc = &res["structuredContent"];
    let meta = &res["_meta"];
    ensure!(sc["ok"] == false && sc["error"]["code"] == code, "structuredContent {sc} (expected ok false, error.code {code})");
    ensure!(sc["refunded"] == true && sc["charged_mcents"] == 0 && sc["balance_mcents"] == minted, "structuredContent {sc} (expected refunded true, charged_mcents 0, balance_mcents {minted})");
    ensure!(meta[REFUNDED] == true && meta[CHARGED] == 0 && meta[BALANCE] == minted, "_meta {meta} (expected {REFUNDED} true, {CHARGED} 0, {BALANCE} {minted})");
    let id = call_id(meta)?;
    check_call_id(&id, &r, &jid)?;
    ensure!(sc["request_id"] == id.as_str(), "structuredContent.request_id {} ≠ the call id {id}", sc["request_id"]);
    // The body HTTP would answer after the hold: no "no charge applied" note (contract 2).
    ensure!(sc.get("note").is_none(), "structuredContent carries a note after the hold: {sc}");
    text_is(&res, sc)?;
    ensure!(c.balance(&key)? == minted, "balance {} after a refunded call (minted {minted})", c.balance(&key)?);
    let me = c.me(&key);
    ensure!(me["refunded_mcents"] == ep.price && me["calls"] == 0, "/v1/me after the release: refunded_mcents {}, calls {} (expected {}, 0)", me["refunded_mcents"], me["calls"], ep.price);
    settled_as(c, &key, &id, ep.price, "release")?;
    pass(format!("isError {code}, refunded, ledger hold + release under {id}"))
}

/// The refund cap of 3.8 holds over MCP: failing calls are released until the key's hourly cap,
/// then captured (the charge stands), each answered as a result.
fn refund_cap(c: &mut Client, o: &Options) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let Some((name, body)) = o.failing_call.clone() else {
        return Ok(Outcome::NotApplicable("needs --failing-call ENDPOINT=JSON (a call the handler fails on)".into()));
    };
    let ep = endpoint(c, "--failing-call", &name)?;
    let args: Value = serde_json::from_str(&body).map_err(|e| anyhow::anyhow!("--failing-call {name}={body}: the arguments are not JSON ({e})"))?;
    let calls = ep.rate_limit.min(50);
    let minted = ep.price * calls;
    let key = c.key_for(&ep, calls)?;
    let (mut refunded, mut kept) = (0u64, 0u64);
    for i in 0..calls {
        let r = call_tool(c, Some(&key), &ep.name, args.clone(), None);
        let res = result(&r).map_err(|e| e.context(format!("failing call {}", i + 1)))?;
        ensure!(res["isError"] == true, "failing call {}: not isError: {res}", i + 1);
        let (sc, meta) = (&res["structuredContent"], &res["_meta"]);
        match meta[REFUNDED].as_bool() {
            Some(true) => {
                ensure!(kept == 0, "a refund after the cap was reached (call {})", i + 1);
                ensure!(meta[CHARGED] == 0 && sc["refunded"] == true, "call {}: refunded but {meta} / {sc}", i + 1);
                refunded += 1;
            }
            Some(false) => {
                ensure!(meta[CHARGED] == ep.price && sc["refunded"] == false && sc["charged_mcents"] == ep.price, "call {} past the cap: {meta} / {sc} (expected charged {})", i + 1, ep.price);
                kept += 1;
                break;
            }
            None => anyhow::bail!("call {}: _meta without a boolean {REFUNDED}: {meta}", i + 1),
        }
    }
    ensure!(kept == 1, "{refunded} failures, all refunded: no cap within {calls} calls");
    let bal = c.balance(&key)?;
    ensure!(bal == minted - ep.price, "balance {bal} after {refunded} refunds and one kept charge (minted {minted}, price {})", ep.price);
    let (captured, released) = settled_holds(&ledger_rows(c, &key)?)?;
    ensure!(released as u64 == refunded && captured == 1, "ledger: {released} released and {captured} captured for {refunded} refunded and 1 kept");
    pass(format!("{refunded} refunded, then charged: isError, refunded false; ledger {released} releases + 1 capture"))
}

fn idem(k: &str) -> Option<Value> {
    Some(json!({IDEMPOTENCY_KEY: k}))
}

fn replay(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let (ep, key, bal) = setup(c)?;
    let holds = count_kind(&ledger_rows(c, &key)?, "hold");
    let ik = random_idempotency_key();
    let first = result(&call_tool(c, Some(&key), &ep.name, ep.sample(), idem(&ik)))?;
    ensure!(first["isError"] != true, "the first call failed: {first}");
    ensure!(first["_meta"][REPLAYED] != true, "the first call says {REPLAYED}: {}", first["_meta"]);
    let id = call_id(&first["_meta"])?;
    let second = result(&call_tool(c, Some(&key), &ep.name, ep.sample(), idem(&ik)))?;
    ensure!(second["_meta"][REPLAYED] == true, "the retry's _meta has no {REPLAYED}: true: {}", second["_meta"]);
    ensure!(second["structuredContent"] == first["structuredContent"], "the replay's structuredContent {} ≠ the call's {}", second["structuredContent"], first["structuredContent"]);
    ensure!(second["content"] == first["content"], "the replay's content differs from the call's");
    ensure!(second["_meta"][REQUEST_ID] == id.as_str(), "the replay's call id {} ≠ the stored call's {id}", second["_meta"][REQUEST_ID]);
    ensure!(c.balance(&key)? == bal - ep.price, "balance {} after a call and its replay (expected {}: charged once)", c.balance(&key)?, bal - ep.price);
    let rows = ledger_rows(c, &key)?;
    ensure!(count_kind(&rows, "hold") == holds + 1, "{} new holds for a call and its replay", count_kind(&rows, "hold") - holds);
    settled_as(c, &key, &id, ep.price, "capture")?;
    pass(format!("charged once; the retry replays {id}"))
}

fn concurrent(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let (ep, key, bal) = setup(c)?;
    let holds = count_kind(&ledger_rows(c, &key)?, "hold");
    let ik = random_idempotency_key();
    let shared: &Client = c;
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10).map(|_| s.spawn(|| call_tool(shared, Some(&key), &ep.name, ep.sample(), idem(&ik)))).collect();
        handles.into_iter().map(|h| h.join().expect("request thread")).collect()
    });
    let (mut originals, mut replays, mut busy) = (Vec::new(), 0, 0);
    for r in &replies {
        let m = answer(r)?;
        if let Some(res) = m.get("result") {
            ensure!(res["isError"] != true, "a call failed: {res}");
            if res["_meta"][REPLAYED] == true { replays += 1 } else { originals.push(res.clone()) }
            continue;
        }
        let e = rpc_error(r, -32005)?;
        ensure!(e["data"]["code"] == "idempotency_in_progress" && e["data"]["note"] == NO_CHARGE, "error.data {} (expected idempotency_in_progress + the note)", e["data"]);
        let retry = e["data"]["retry_after_seconds"].as_u64().unwrap_or(0);
        ensure!((1..=5).contains(&retry), "retry_after_seconds {} (contract 3.8: 1-5)", e["data"]["retry_after_seconds"]);
        busy += 1;
    }
    ensure!(originals.len() == 1, "{} of 10 identical calls ran as new calls (expected exactly one)", originals.len());
    ensure!(c.balance(&key)? == bal - ep.price, "balance {} (expected {}: charged once)", c.balance(&key)?, bal - ep.price);
    ensure!(count_kind(&ledger_rows(c, &key)?, "hold") == holds + 1, "more than one hold for one idempotency key");
    pass(format!("10 at once: 1 call, {replays} replays, {busy} × -32005 in progress; one hold"))
}

fn mismatch(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let ep = c.first();
    let other = c.endpoints.iter().find(|e| e.name != ep.name).cloned();
    let changed = changed_value(&ep).and_then(|s| serde_json::from_str::<Value>(&s).ok());
    if changed.is_none() && other.is_none() {
        return Ok(Outcome::NotApplicable("the only tool has no argument to change and there is no other tool".into()));
    }
    let scopes: Vec<&str> = [Some(ep.scope.as_str()), other.as_ref().map(|o| o.scope.as_str())].into_iter().flatten().collect();
    let key = c.mint(ep.price * 2 + other.as_ref().map_or(0, |o| o.price), &scopes)?;
    let ik = random_idempotency_key();
    tool_ok(&call_tool(c, Some(&key), &ep.name, ep.sample(), idem(&ik)))?;
    let bal = c.balance(&key)?;
    let ledger = ledger_sum(c, &key)?;
    let mut cases = Vec::new();
    if let Some(args) = changed {
        let r = call_tool(c, Some(&key), &ep.name, args.clone(), idem(&ik));
        refused(c, &r, -32005, "idempotency_mismatch", &key, bal, ledger).map_err(|e| e.context(format!("{} with {args} after {}", ep.name, ep.sample())))?;
        cases.push("other arguments");
    }
    if let Some(o) = &other {
        let r = call_tool(c, Some(&key), &o.name, o.sample(), idem(&ik));
        refused(c, &r, -32005, "idempotency_mismatch", &key, bal, ledger).map_err(|e| e.context(format!("tool {} with the idempotency key of a {} call", o.name, ep.name)))?;
        cases.push("another tool");
    }
    pass(format!("-32005 idempotency_mismatch for {}, balance still {bal}", cases.join(" and ")))
}

fn syntax(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let (ep, key, bal) = setup(c)?;
    let ledger = ledger_sum(c, &key)?;
    let good = random_idempotency_key();
    let cases = [json!("a".repeat(31)), json!(format!("{}.{}", &good[..20], &good[20..])), json!(12345678901234567890u64)];
    for k in &cases {
        let r = call_tool(c, Some(&key), &ep.name, ep.sample(), Some(json!({IDEMPOTENCY_KEY: k})));
        refused(c, &r, -32602, "invalid_input", &key, bal, ledger).map_err(|e| e.context(format!("{IDEMPOTENCY_KEY} {k}")))?;
    }
    pass(format!("{} malformed idempotency keys: -32602 invalid_input, balance still {bal}", cases.len()))
}
