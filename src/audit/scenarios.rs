//! The attack scenarios. Each one states what a gateway that follows docs/contract.md must do, runs
//! it against the live gateway and returns the evidence. A scenario that cannot apply to the gateway
//! under audit says so (NotApplicable) instead of passing.

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};

use super::client::{Client, Endpoint, Key, Reply, random_hex64};

pub enum Outcome {
    Pass(String),
    NotApplicable(String),
}

pub struct Options {
    /// `ENDPOINT=JSON`: a call whose handler fails on our side, for the refund scenarios.
    pub failing_call: Option<(String, String)>,
    /// A second deployment of the same gateway with no ADMIN_KEY configured.
    pub unconfigured_url: Option<String>,
    /// The control URL of a tests/chain x402 harness (chain.mjs) whose facilitator the gateway uses.
    pub x402_harness: Option<String>,
}

pub type Run = fn(&mut Client, &Options) -> Result<Outcome>;

pub struct Scenario {
    pub name: &'static str,
    pub expect: &'static str,
    pub run: Run,
}

const NO_CHARGE: &str = "no charge applied";

fn pass(s: impl Into<String>) -> Result<Outcome> {
    Ok(Outcome::Pass(s.into()))
}

fn expect(r: &Reply, status: u16, code: &str) -> Result<()> {
    ensure!(r.status == status, "expected {status} {code}, got {}", r.brief());
    if !code.is_empty() {
        ensure!(r.code() == code, "expected error code {code}, got {}", r.brief());
    }
    Ok(())
}

/// `r` is a refusal before any charge: the status, the note, and the key's balance unchanged.
fn refused_uncharged(c: &Client, r: &Reply, status: u16, code: &str, key: &Key, balance: u64) -> Result<Outcome> {
    expect(r, status, code)?;
    ensure!(r.body.contains(NO_CHARGE), "{} without \"note\": \"{NO_CHARGE}\": {}", r.status, r.body);
    let now = c.balance(key)?;
    ensure!(now == balance, "balance moved from {balance} to {now} on a refused call");
    pass(format!("{} {}, balance still {balance}", r.status, r.code()))
}

/// The first endpoint, its shared key and that key's balance now.
fn setup(c: &mut Client) -> Result<(Endpoint, Key, u64)> {
    let ep = c.first();
    let (key, bal) = c.shared_key(&ep)?;
    Ok((ep, key, bal))
}

fn auth_case(c: &mut Client, header: Option<String>) -> Result<Outcome> {
    let ep = c.first();
    let h: Vec<(&str, &str)> = header.iter().map(|v| ("Authorization", v.as_str())).collect();
    let r = c.post(&ep.path(), &h, &ep.sample().to_string());
    ensure!(r.status == 401, "expected 401, got {}", r.brief());
    ensure!(r.header("www-authenticate").is_some_and(|v| v.to_ascii_lowercase().starts_with("bearer")),
        "401 without WWW-Authenticate: Bearer");
    pass(r.brief())
}

fn mint_refused(c: &mut Client, body: Value) -> Result<Outcome> {
    let r = c.mint_raw(&body.to_string());
    expect(&r, 400, "invalid_input")?;
    ensure!(r.json()["key"].is_null(), "a refused mint returned a key");
    pass(format!("{} for {body}", r.brief()))
}

fn scopes_of(c: &Client) -> String {
    c.first().scope
}

fn no_key_material(text: &str, keys: &[&Key], prefix: &str) -> Result<()> {
    for k in keys {
        ensure!(!text.contains(&k.key), "the raw key appears");
        ensure!(!text.contains(&k.key[prefix.len().min(k.key.len())..]), "the key's hex appears");
    }
    // Any 64-hex run would be a key or a key hash.
    let bytes = text.as_bytes();
    let mut run = 0;
    for b in bytes {
        run = if b.is_ascii_hexdigit() { run + 1 } else { 0 };
        ensure!(run < 64, "a 64-character hex string (a key or its hash) appears");
    }
    Ok(())
}

fn concurrent(c: &Client, ep: &Endpoint, key: &Key, n: usize) -> Vec<Reply> {
    let body = ep.sample().to_string();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|_| s.spawn(|| c.call(ep, key, &body))).collect();
        handles.into_iter().map(|h| h.join().expect("request thread")).collect()
    })
}

pub(super) fn ledger_sum(c: &Client, key: &Key) -> Result<(i64, usize)> {
    let l = c.ledger(key);
    let entries = l["entries"].as_array().ok_or_else(|| anyhow::anyhow!("/v1/me/ledger has no entries: {l}"))?;
    let sum = entries
        .iter()
        .filter(|e| e["kind"] != "mint")
        .map(|e| e["amount_mcents"].as_i64().unwrap_or(0))
        .sum();
    Ok((sum, entries.len()))
}

fn failing(opts: &Options) -> Option<(String, String)> {
    opts.failing_call.clone()
}

macro_rules! scenario {
    ($name:expr, $expect:expr, $body:expr) => {
        Scenario { name: $name, expect: $expect, run: $body }
    };
}

/// Every scenario, in run order: the signup ones (which never pay) before the last, which spends
/// the hourly mint allowance.
pub fn all() -> Vec<Scenario> {
    let mut all = core();
    let last = all.pop().expect("the hourly-limit scenario");
    all.extend(super::signup::scenarios());
    all.extend(super::mcp::scenarios());
    all.push(last);
    all
}

fn core() -> Vec<Scenario> {
    vec![
        // ---- routes
        scenario!("route.health", "GET /v1/health → 200 {ok:true}", |c, _| {
            let r = c.get("/v1/health", &[]);
            expect(&r, 200, "")?;
            ensure!(r.json()["ok"] == true, "body: {}", r.body);
            pass(r.brief())
        }),
        scenario!("route.pricing", "GET /v1/pricing → 200, every endpoint with an integer price, scope and path", |c, _| {
            let r = c.get("/v1/pricing", &[]);
            expect(&r, 200, "")?;
            for e in r.json()["endpoints"].as_array().cloned().unwrap_or_default() {
                ensure!(e["price_mcents"].is_u64() && e["scope"].is_string() && e["path"].is_string(), "bad entry {e}");
            }
            pass(format!("{} endpoints", c.endpoints.len()))
        }),
        scenario!("route.unknown", "an unknown path → 404 not_found in the error shape", |c, _| {
            let r = c.get("/nope/at/all", &[]);
            expect(&r, 404, "not_found")?;
            pass(r.brief())
        }),
        scenario!("route.unknown_v1", "POST /v1/<unknown> → 404 not_found, nothing charged", |c, _| {
            let (_, key, bal) = setup(c)?;
            let r = c.post("/v1/no_such_endpoint_x", &[("Authorization", &key.bearer())], "{}");
            expect(&r, 404, "not_found")?;
            ensure!(c.balance(&key)? == bal, "balance moved");
            pass(r.brief())
        }),
        scenario!("route.trailing_slash", "POST /v1/<endpoint>/ is not the endpoint → 404, nothing charged", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.post(&format!("{}/", ep.path()), &[("Authorization", &key.bearer())], &ep.sample().to_string());
            expect(&r, 404, "")?;
            ensure!(c.balance(&key)? == bal, "balance moved");
            pass(r.brief())
        }),
        scenario!("route.wrong_method", "GET on a paid endpoint → 405 with Allow: POST", |c, _| {
            let ep = c.first();
            let r = c.get(&ep.path(), &[]);
            expect(&r, 405, "method_not_allowed")?;
            ensure!(r.header("allow").is_some_and(|a| a.contains("POST")), "no Allow header");
            pass(r.brief())
        }),
        scenario!("route.admin_get", "GET /v1/admin/mint → 405 (or 404), never a key", |c, _| {
            let admin = c.admin_key.clone().unwrap_or_default();
            let r = c.get("/v1/admin/mint", &[("X-Admin-Key", &admin)]);
            ensure!(r.status == 405 || r.status == 404, "got {}", r.brief());
            ensure!(r.json()["key"].is_null(), "returned a key");
            pass(r.brief())
        }),
        // ---- authentication
        scenario!("auth.missing", "no Authorization → 401 missing_key with WWW-Authenticate", |c, _| {
            let ep = c.first();
            let r = c.post(&ep.path(), &[], &ep.sample().to_string());
            expect(&r, 401, "missing_key")?;
            auth_case(c, None)
        }),
        scenario!("auth.empty_bearer", "\"Bearer \" with no key → 401", |c, _| auth_case(c, Some("Bearer ".into()))),
        scenario!("auth.basic_scheme", "Basic credentials → 401", |c, _| auth_case(c, Some("Basic YWRtaW46YWRtaW4=".into()))),
        scenario!("auth.wrong_prefix", "a well-formed key with another prefix → 401 invalid_key", |c, _| {
            auth_case(c, Some(format!("Bearer zzz_{}", random_hex64())))
        }),
        scenario!("auth.short_key", "a key one hex digit short → 401", |c, _| {
            let p = c.prefix();
            auth_case(c, Some(format!("Bearer {p}{}", &random_hex64()[..63])))
        }),
        scenario!("auth.long_key", "a key one hex digit long → 401", |c, _| {
            let p = c.prefix();
            auth_case(c, Some(format!("Bearer {p}{}0", random_hex64())))
        }),
        scenario!("auth.non_hex", "a key of the right length that is not hex → 401", |c, _| {
            let p = c.prefix();
            auth_case(c, Some(format!("Bearer {p}{}", "z".repeat(64))))
        }),
        scenario!("auth.oversized", "a 32 KiB Authorization header → refused (4xx), never 2xx or 5xx", |c, _| {
            let ep = c.first();
            let huge = format!("Bearer {}{}", c.prefix(), "a".repeat(32 * 1024));
            let r = c.post(&ep.path(), &[("Authorization", &huge)], &ep.sample().to_string());
            ensure!((400..500).contains(&r.status), "got {}", r.brief());
            pass(r.brief())
        }),
        scenario!("auth.unknown_key", "a well-formed key nobody minted → 401 invalid_key", |c, _| {
            let ep = c.first();
            let key = format!("Bearer {}{}", c.prefix(), random_hex64());
            let r = c.post(&ep.path(), &[("Authorization", &key)], &ep.sample().to_string());
            expect(&r, 401, "invalid_key")?;
            pass(r.brief())
        }),
        scenario!("auth.lowercase_scheme", "\"bearer KEY\" (scheme is case-insensitive) → accepted", |c, _| {
            let (ep, key, _) = setup(c)?;
            let r = c.post(&ep.path(), &[("Authorization", &format!("bearer {}", key.key))], &ep.sample().to_string());
            expect(&r, 200, "")?;
            pass(r.brief())
        }),
        scenario!("auth.uppercase_key", "the key's hex upper-cased is a different key → 401", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let p = c.prefix();
            let upper = format!("Bearer {p}{}", key.key[p.len()..].to_ascii_uppercase());
            let r = c.post(&ep.path(), &[("Authorization", &upper)], &ep.sample().to_string());
            expect(&r, 401, "")?;
            ensure!(c.balance(&key)? == bal, "balance moved");
            pass(r.brief())
        }),
        scenario!("auth.trailing_garbage", "\"Bearer KEY extra\" → 401", |c, _| {
            let (ep, key, _) = setup(c)?;
            let r = c.post(&ep.path(), &[("Authorization", &format!("Bearer {} extra", key.key))], &ep.sample().to_string());
            expect(&r, 401, "")?;
            pass(r.brief())
        }),
        scenario!("auth.query_string", "a key in the query string (no header) → 401, nothing charged", |c, _| {
            let (ep, key, bal) = setup(c)?;
            for q in ["key", "api_key", "token", "access_token"] {
                let r = c.post(&format!("{}?{q}={}", ep.path(), key.key), &[], &ep.sample().to_string());
                ensure!(r.status == 401, "?{q}= got {}", r.brief());
            }
            ensure!(c.balance(&key)? == bal, "balance moved");
            pass("401 for ?key=, ?api_key=, ?token=, ?access_token=")
        }),
        scenario!("auth.me_requires_key", "GET /v1/me and /v1/me/ledger without a key → 401", |c, _| {
            expect(&c.get("/v1/me", &[]), 401, "")?;
            expect(&c.get("/v1/me/ledger", &[]), 401, "")?;
            pass("401, 401")
        }),
        // ---- admin mint
        scenario!("admin.missing_key", "mint without X-Admin-Key → 401 invalid_admin_key", |c, _| {
            let r = c.post("/v1/admin/mint", &[], &json!({"balance_mcents": 100, "scopes": [scopes_of(c)]}).to_string());
            expect(&r, 401, "invalid_admin_key")?;
            pass(r.brief())
        }),
        scenario!("admin.wrong_key", "mint with a wrong admin key of the same length → 401, no key", |c, _| {
            let Some(real) = c.admin_key.clone() else { return Ok(Outcome::NotApplicable("needs --admin-key".into())) };
            let wrong: String = real.chars().map(|ch| if ch == 'x' { 'y' } else { 'x' }).collect();
            let r = c.post("/v1/admin/mint", &[("X-Admin-Key", &wrong)], &json!({"balance_mcents": 100, "scopes": [scopes_of(c)]}).to_string());
            expect(&r, 401, "invalid_admin_key")?;
            ensure!(r.json()["key"].is_null(), "returned a key");
            pass(r.brief())
        }),
        scenario!("admin.key_prefix_of_real", "a prefix of the real admin key → 401", |c, _| {
            let Some(real) = c.admin_key.clone() else { return Ok(Outcome::NotApplicable("needs --admin-key".into())) };
            let r = c.post("/v1/admin/mint", &[("X-Admin-Key", &real[..real.len() / 2])], &json!({"balance_mcents": 100, "scopes": [scopes_of(c)]}).to_string());
            expect(&r, 401, "invalid_admin_key")?;
            pass(r.brief())
        }),
        scenario!("admin.unset", "with no ADMIN_KEY configured, mint → 503 admin_disabled", |c, o| {
            let Some(url) = o.unconfigured_url.clone() else {
                return Ok(Outcome::NotApplicable("needs --unconfigured-url (a deployment with no ADMIN_KEY)".into()));
            };
            let other = Client::connect(&url, None)?;
            let r = other.post("/v1/admin/mint", &[("X-Admin-Key", "anything")], &json!({"balance_mcents": 100, "scopes": [scopes_of(c)]}).to_string());
            expect(&r, 503, "admin_disabled")?;
            let r2 = other.post("/v1/admin/mint", &[("X-Admin-Key", "")], "{}");
            expect(&r2, 503, "admin_disabled")?;
            pass(r.brief())
        }),
        scenario!("admin.balance_string", "balance_mcents \"1000\" (a string) → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": "1000", "scopes": [s]})) }),
        scenario!("admin.balance_float", "balance_mcents 10.5 → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": 10.5, "scopes": [s]})) }),
        scenario!("admin.balance_float_integral", "balance_mcents 100.0 → 400 or minted as 100, never another amount", |c, _| {
            let s = scopes_of(c);
            let r = c.mint_raw(&format!("{{\"balance_mcents\": 100.0, \"scopes\": [\"{s}\"]}}"));
            if r.status == 201 {
                ensure!(r.json()["balance_mcents"] == 100, "minted {}", r.body);
            } else {
                expect(&r, 400, "invalid_input")?;
            }
            pass(r.brief())
        }),
        scenario!("admin.balance_negative", "balance_mcents -5 → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": -5, "scopes": [s]})) }),
        scenario!("admin.balance_zero", "balance_mcents 0 → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": 0, "scopes": [s]})) }),
        scenario!("admin.balance_huge", "balance_mcents 1e30 → 400", |c, _| {
            let s = scopes_of(c);
            let r = c.mint_raw(&format!("{{\"balance_mcents\": 1e30, \"scopes\": [\"{s}\"]}}"));
            expect(&r, 400, "invalid_input")?;
            pass(r.brief())
        }),
        scenario!("admin.balance_unsafe_integer", "balance_mcents 2^53 + 1 → 400 (not rounded)", |c, _| {
            let s = scopes_of(c);
            let r = c.mint_raw(&format!("{{\"balance_mcents\": 9007199254740993, \"scopes\": [\"{s}\"]}}"));
            expect(&r, 400, "invalid_input")?;
            pass(r.brief())
        }),
        scenario!("admin.ceiling", "balance_mcents 2^53 − 1 (above any sane ceiling) → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": 9007199254740991u64, "scopes": [s]})) }),
        scenario!("admin.balance_null", "balance_mcents null → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": null, "scopes": [s]})) }),
        scenario!("admin.balance_bool", "balance_mcents true → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": true, "scopes": [s]})) }),
        scenario!("admin.balance_missing", "no balance_mcents → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"scopes": [s]})) }),
        scenario!("admin.scopes_missing", "no scopes (default deny needs them) → 400", |c, _| mint_refused(c, json!({"balance_mcents": 100}))),
        scenario!("admin.scopes_empty", "scopes [] → 400", |c, _| mint_refused(c, json!({"balance_mcents": 100, "scopes": []}))),
        scenario!("admin.scopes_unknown", "an unknown scope → 400", |c, _| mint_refused(c, json!({"balance_mcents": 100, "scopes": ["root:everything"]}))),
        scenario!("admin.scopes_wildcard", "scope \"*\" → 400 (no wildcard grants)", |c, _| mint_refused(c, json!({"balance_mcents": 100, "scopes": ["*"]}))),
        scenario!("admin.scopes_not_array", "scopes as a string → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": 100, "scopes": s})) }),
        scenario!("admin.invalid_json", "a mint body that is not JSON → 400", |c, _| {
            let r = c.mint_raw("{\"balance_mcents\": 100,");
            ensure!(r.status == 400, "got {}", r.brief());
            pass(r.brief())
        }),
        scenario!("admin.mint_ok", "a valid mint → 201 with a prefixed 64-hex key and a public key_id", |c, _| {
            let ep = c.first();
            let k = c.key_for(&ep, 1)?;
            let p = c.prefix();
            ensure!(k.key.len() == p.len() + 64 && k.key[p.len()..].chars().all(|ch| ch.is_ascii_hexdigit() && !ch.is_ascii_uppercase()), "key {}…", &k.key[..p.len()]);
            ensure!(!k.key_id.is_empty() && !k.key.contains(&k.key_id), "key_id {:?}", k.key_id);
            pass(format!("key {p}<64 hex>, key_id {}", k.key_id))
        }),
        scenario!("admin.no_cors_preflight", "OPTIONS /v1/admin/mint from a browser origin → no Access-Control-Allow-Origin, not 2xx", |c, _| {
            let r = c.request("OPTIONS", "/v1/admin/mint", &[("Origin", "https://evil.example"), ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "x-admin-key,content-type")], None);
            ensure!(r.header("access-control-allow-origin").is_none(), "ACAO: {:?}", r.header("access-control-allow-origin"));
            ensure!(!(200..300).contains(&r.status), "preflight answered {}", r.status);
            pass(r.brief())
        }),
        scenario!("admin.no_cors_response", "POST /v1/admin/mint with an Origin → no Access-Control-* headers", |c, _| {
            let admin = c.admin_key.clone().unwrap_or_default();
            let r = c.post("/v1/admin/mint", &[("X-Admin-Key", &admin), ("Origin", "https://evil.example")], "{}");
            ensure!(!r.headers.keys().any(|k| k.as_str().starts_with("access-control-")), "CORS headers on an admin response");
            pass(r.brief())
        }),
        // ---- scopes
        scenario!("scope.allowed", "a key with the endpoint's scope → 200", |c, _| {
            let (ep, key, _) = setup(c)?;
            expect(&c.call_sample(&ep, &key), 200, "")?;
            pass("200")
        }),
        scenario!("scope.default_deny", "a key without the endpoint's scope → 403 scope_denied, nothing charged", |c, _| {
            let ep = c.first();
            let Some(other) = c.other_scope(&ep) else {
                return Ok(Outcome::NotApplicable("every endpoint needs the same scope; no second scope to test with".into()));
            };
            let key = c.key_for(&other, 3)?;
            let bal = other.price * 3;
            let r = c.call_sample(&ep, &key);
            expect(&r, 403, "scope_denied")?;
            ensure!(c.balance(&key)? == bal, "balance moved on a 403");
            pass(format!("{} calling {} with scope {}", r.brief(), ep.name, other.scope))
        }),
        scenario!("scope.no_escalation_in_body", "scopes smuggled in the call body grant nothing", |c, _| {
            let ep = c.first();
            let Some(other) = c.other_scope(&ep) else {
                return Ok(Outcome::NotApplicable("no second scope to escalate to".into()));
            };
            let key = c.key_for(&other, 3)?;
            let mut body = ep.sample();
            body["scopes"] = json!([ep.scope]);
            let r = c.call(&ep, &key, &body.to_string());
            ensure!(r.status == 403 || r.status == 400, "got {}", r.brief());
            ensure!(c.balance(&key)? == other.price * 3, "balance moved");
            pass(r.brief())
        }),
        // ---- validate before charge
        scenario!("validate.invalid_json", "a body that is not JSON → 400 invalid_json, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.call(&ep, &key, "{\"oops\":");
            refused_uncharged(c, &r, 400, "invalid_json", &key, bal)
        }),
        scenario!("validate.empty_body", "an empty body → 400, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.call(&ep, &key, "");
            refused_uncharged(c, &r, 400, "", &key, bal)
        }),
        scenario!("validate.not_object", "a JSON array body → 400 invalid_input, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.call(&ep, &key, "[1,2,3]");
            refused_uncharged(c, &r, 400, "invalid_input", &key, bal)
        }),
        scenario!("validate.wrong_type", "a required field of the wrong type → 400 invalid_input, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let Some((field, ty, _)) = ep.input.iter().find(|f| f.2).cloned() else {
                return Ok(Outcome::NotApplicable(format!("{} has no required field", ep.name)));
            };
            let mut body = ep.sample();
            body[&field] = if ty == "string" { json!(42) } else { json!("not a value of this type") };
            let r = c.call(&ep, &key, &body.to_string());
            refused_uncharged(c, &r, 400, "invalid_input", &key, bal)
        }),
        scenario!("validate.missing_field", "a required field missing → 400 invalid_input, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            if !ep.input.iter().any(|f| f.2) {
                return Ok(Outcome::NotApplicable(format!("{} has no required field", ep.name)));
            }
            let r = c.call(&ep, &key, "{}");
            refused_uncharged(c, &r, 400, "invalid_input", &key, bal)
        }),
        scenario!("validate.unknown_field", "an unknown field → 400 invalid_input, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let mut body = ep.sample();
            body["__audit_unknown"] = json!(1);
            let r = c.call(&ep, &key, &body.to_string());
            refused_uncharged(c, &r, 400, "invalid_input", &key, bal)
        }),
        scenario!("validate.proto_pollution", "a __proto__ field → 400, no charge, no crash", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let body = ep.sample().to_string();
            let polluted = format!("{{\"__proto__\":{{\"admin\":true}},{}", &body[1..]);
            let r = c.call(&ep, &key, &polluted);
            refused_uncharged(c, &r, 400, "invalid_input", &key, bal)
        }),
        scenario!("validate.deep_nesting", "1000 nested arrays → 400, no charge, no 5xx", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
            let r = c.call(&ep, &key, &format!("{{\"x\":{deep}}}"));
            refused_uncharged(c, &r, 400, "", &key, bal)
        }),
        scenario!("validate.wrong_content_type", "Content-Type text/plain → 415, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.request("POST", &ep.path(), &[("Authorization", &key.bearer()), ("Content-Type", "text/plain")], Some(ep.sample().to_string().as_bytes()));
            refused_uncharged(c, &r, 415, "unsupported_media_type", &key, bal)
        }),
        scenario!("validate.no_content_type", "no Content-Type → 415, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.request("POST", &ep.path(), &[("Authorization", &key.bearer())], Some(ep.sample().to_string().as_bytes()));
            refused_uncharged(c, &r, 415, "unsupported_media_type", &key, bal)
        }),
        // ---- bodies
        scenario!("body.oversized", "a 2 MiB body with Content-Length → 413 body_too_large, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let big = format!("{{\"pad\":\"{}\"}}", "a".repeat(2 * 1024 * 1024));
            let r = c.call(&ep, &key, &big);
            refused_uncharged(c, &r, 413, "body_too_large", &key, bal)
        }),
        scenario!("body.oversized_chunked", "a 2 MiB chunked body (no Content-Length) → 413 (or the upload cut short), no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let big = format!("{{\"pad\":\"{}\"}}", "a".repeat(2 * 1024 * 1024)).into_bytes();
            let r = c.post_chunked(&ep.path(), &[("Authorization", &key.bearer())], big);
            if r.status == 0 {
                // The gateway answered early and closed the connection while the body was still
                // being sent: it refused to read it. Then only the balance can tell.
                ensure!(c.balance(&key)? == bal, "balance moved");
                return pass(format!("connection closed mid-upload ({}), balance still {bal}", r.body));
            }
            refused_uncharged(c, &r, 413, "body_too_large", &key, bal)
        }),
        scenario!("body.chunked_small", "a small valid chunked body → served and charged normally", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.post_chunked(&ep.path(), &[("Authorization", &key.bearer())], ep.sample().to_string().into_bytes());
            expect(&r, 200, "")?;
            ensure!(c.balance(&key)? == bal - ep.price, "charged wrong");
            pass(r.brief())
        }),
        // ---- charging
        scenario!("charge.exact_price", "a paid call is charged exactly the listed price, shown in headers and body", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.call_sample(&ep, &key);
            expect(&r, 200, "")?;
            ensure!(r.header("x-charged-mcents") == Some(ep.price.to_string()), "X-Charged-Mcents {:?}", r.header("x-charged-mcents"));
            ensure!(r.header("x-balance-mcents") == Some((bal - ep.price).to_string()), "X-Balance-Mcents {:?}", r.header("x-balance-mcents"));
            let v = r.json();
            ensure!(v["charged_mcents"] == ep.price && v["balance_mcents"] == bal - ep.price, "body {}", r.body);
            ensure!(c.balance(&key)? == bal - ep.price, "/v1/me disagrees");
            pass(format!("charged {} of {bal}", ep.price))
        }),
        scenario!("charge.every_endpoint", "every listed endpoint charges its own listed price", |c, _| {
            let eps = c.endpoints.clone();
            for ep in &eps {
                let key = c.key_for(ep, 2)?;
                let r = c.call_sample(ep, &key);
                expect(&r, 200, "")?;
                ensure!(c.balance(&key)? == ep.price, "{} charged wrong", ep.name);
            }
            pass(format!("{} endpoints", eps.len()))
        }),
        scenario!("charge.insufficient", "balance below the price → 402 insufficient_balance, nothing charged", |c, _| {
            let ep = c.first();
            if ep.price < 2 {
                return Ok(Outcome::NotApplicable("the price is 1 mcent: no balance is below it".into()));
            }
            let key = c.mint(ep.price - 1, &[ep.scope.as_str()])?;
            let r = c.call_sample(&ep, &key);
            expect(&r, 402, "insufficient_balance")?;
            ensure!(c.balance(&key)? == ep.price - 1, "balance moved");
            pass(r.brief())
        }),
        scenario!("charge.exact_balance", "a balance of exactly one price → one 200, then 402, final balance 0", |c, _| {
            let ep = c.first();
            let key = c.key_for(&ep, 1)?;
            expect(&c.call_sample(&ep, &key), 200, "")?;
            expect(&c.call_sample(&ep, &key), 402, "insufficient_balance")?;
            ensure!(c.balance(&key)? == 0, "balance not 0");
            pass("200 then 402, balance 0")
        }),
        scenario!("charge.concurrent_burst", "60 concurrent calls on a key with room for 20 → exactly 20 served, balance 0, never negative", |c, _| {
            let ep = c.first();
            let n = 20u64;
            if ep.rate_limit < 3 * n {
                // Rate limiting would refuse some calls for another reason; keep the burst within it.
                return burst(c, &ep, ep.rate_limit.max(2) / 2, ep.rate_limit as usize);
            }
            burst(c, &ep, n, 3 * n as usize)
        }),
        scenario!("charge.ledger_matches", "the ledger's entries sum to the balance change", |c, _| {
            let ep = c.first();
            let minted = ep.price * 5;
            let key = c.key_for(&ep, 5)?;
            for _ in 0..3 {
                expect(&c.call_sample(&ep, &key), 200, "")?;
            }
            let _ = c.call(&ep, &key, "not json");
            let now = c.balance(&key)?;
            let (sum, _) = ledger_sum(c, &key)?;
            ensure!(minted as i64 + sum == now as i64, "minted {minted}, ledger sums to {sum}, balance {now}");
            ensure!(now == minted - 3 * ep.price, "balance {now}");
            pass(format!("{minted} {sum:+} = {now}"))
        }),
        scenario!("charge.keys_independent", "charges on one key never touch another", |c, _| {
            let (ep, a, _) = setup(c)?;
            let b = c.key_for(&ep, 3)?;
            let bal = ep.price * 3;
            expect(&c.call_sample(&ep, &a), 200, "")?;
            ensure!(c.balance(&b)? == bal, "the other key moved");
            pass("unchanged")
        }),
        scenario!("charge.xp_awarded", "a paid call awards the listed XP and counts one call", |c, _| {
            let (ep, key, _) = setup(c)?;
            let before = c.me(&key);
            expect(&c.call_sample(&ep, &key), 200, "")?;
            let after = c.me(&key);
            ensure!(after["xp"].as_u64() == before["xp"].as_u64().map(|x| x + ep.xp), "xp {} → {}", before["xp"], after["xp"]);
            ensure!(after["calls"].as_u64() == before["calls"].as_u64().map(|x| x + 1), "calls {} → {}", before["calls"], after["calls"]);
            pass(format!("+{} xp", ep.xp))
        }),
        scenario!("charge.refund_on_failure", "a call whose handler fails → 502 handler_failed, refunded", |c, o| {
            let Some((name, body)) = failing(o) else {
                return Ok(Outcome::NotApplicable("needs --failing-call ENDPOINT=JSON (a call the handler fails on)".into()));
            };
            let ep = c.endpoints.iter().find(|e| e.name == name).cloned().ok_or_else(|| anyhow::anyhow!("no endpoint {name}"))?;
            let key = c.key_for(&ep, 2)?;
            let r = c.call(&ep, &key, &body);
            expect(&r, 502, "handler_failed")?;
            ensure!(r.json()["refunded"] == true, "not refunded: {}", r.body);
            ensure!(c.balance(&key)? == ep.price * 2, "balance not restored");
            pass(r.brief())
        }),
        scenario!("charge.refund_cap", "refunds stop at the hourly cap per key; the ledger records each", |c, o| {
            let Some((name, body)) = failing(o) else {
                return Ok(Outcome::NotApplicable("needs --failing-call ENDPOINT=JSON (a call the handler fails on)".into()));
            };
            let ep = c.endpoints.iter().find(|e| e.name == name).cloned().ok_or_else(|| anyhow::anyhow!("no endpoint {name}"))?;
            let calls = ep.rate_limit.min(50);
            let key = c.key_for(&ep, calls)?;
            let mut refunded = 0;
            let mut kept = 0;
            for _ in 0..calls {
                let r = c.call(&ep, &key, &body);
                match (r.status, r.json()["refunded"].as_bool()) {
                    (502, Some(true)) => refunded += 1,
                    (502, Some(false)) => kept += 1,
                    _ => bail!("unexpected {}", r.brief()),
                }
            }
            ensure!(kept > 0, "all {calls} failures refunded: no cap within {calls} calls");
            let bal = c.balance(&key)?;
            ensure!(bal == ep.price * calls - kept * ep.price, "balance {bal} after {refunded} refunds and {kept} kept");
            let (sum, _) = ledger_sum(c, &key)?;
            ensure!((ep.price * calls) as i64 + sum == bal as i64, "ledger sums to {sum}");
            pass(format!("{refunded} refunded, then {kept} not"))
        }),
        // ---- rate limits
        scenario!("rate.limit", "more calls than the per-minute limit → 429 rate_limited with Retry-After, not charged", |c, _| {
            let ep = c.endpoints.iter().min_by_key(|e| e.rate_limit).cloned().expect("endpoints");
            if ep.rate_limit > 500 {
                return Ok(Outcome::NotApplicable(format!("the lowest limit is {}/min; too many calls to audit", ep.rate_limit)));
            }
            let key = c.key_for(&ep, ep.rate_limit + 5)?;
            let mut served = 0;
            let mut limited = None;
            for _ in 0..ep.rate_limit + 5 {
                let r = c.call_sample(&ep, &key);
                match r.status {
                    200 => served += 1,
                    429 => { limited = Some(r); break; }
                    _ => bail!("unexpected {}", r.brief()),
                }
            }
            let r = limited.ok_or_else(|| anyhow::anyhow!("{served} calls served, no 429 (limit {}/min)", ep.rate_limit))?;
            expect(&r, 429, "rate_limited")?;
            let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("429 without integer Retry-After"))?;
            ensure!((1..=60).contains(&retry), "Retry-After {retry}");
            ensure!(served <= ep.rate_limit, "{served} served with a limit of {}", ep.rate_limit);
            ensure!(c.balance(&key)? == (ep.rate_limit + 5 - served) * ep.price, "the 429 was charged");
            pass(format!("{served} served, then 429 Retry-After {retry}"))
        }),
        // ---- leaks
        scenario!("leak.me", "/v1/me shows no key material", |c, _| leak_check(c, "/v1/me", true)),
        scenario!("leak.ledger", "/v1/me/ledger shows no key material", |c, _| leak_check(c, "/v1/me/ledger", true)),
        scenario!("leak.leaderboard", "/v1/leaderboard shows no key material", |c, _| leak_check(c, "/v1/leaderboard", false)),
        scenario!("leak.errors", "error bodies never echo the presented key", |c, _| {
            let ep = c.first();
            let fake = format!("{}{}", c.prefix(), random_hex64());
            let r = c.post(&ep.path(), &[("Authorization", &format!("Bearer {fake}"))], &ep.sample().to_string());
            ensure!(!r.body.contains(&fake[c.prefix().len()..]), "the key is echoed: {}", r.body);
            pass(r.brief())
        }),
        // ---- headers and shape
        scenario!("headers.request_id", "every response, errors included, has a unique X-Request-Id", |c, _| {
            let ep = c.first();
            let rs = [c.get("/v1/health", &[]), c.get("/nope", &[]), c.post(&ep.path(), &[], "{}"), c.get("/v1/pricing", &[])];
            let ids: Vec<String> = rs.iter().filter_map(|r| r.header("x-request-id")).collect();
            ensure!(ids.len() == rs.len(), "{} of {} responses had X-Request-Id", ids.len(), rs.len());
            let mut uniq = ids.clone();
            uniq.sort();
            uniq.dedup();
            ensure!(uniq.len() == ids.len(), "repeated ids {ids:?}");
            pass(format!("{} distinct ids", ids.len()))
        }),
        scenario!("headers.error_shape", "errors are {ok:false, error:{code,message}, request_id} matching X-Request-Id", |c, _| {
            let ep = c.first();
            for r in [c.get("/nope", &[]), c.post(&ep.path(), &[], "{}")] {
                let v = r.json();
                ensure!(v["ok"] == false && v["error"]["code"].is_string() && v["error"]["message"].is_string(), "shape: {}", r.body);
                ensure!(v["request_id"].as_str() == r.header("x-request-id").as_deref(), "request_id differs from X-Request-Id");
            }
            pass("shape ok")
        }),
        scenario!("headers.cors_public", "OPTIONS on a paid endpoint → 204 with CORS allowing Authorization and exposing the billing headers", |c, _| {
            let ep = c.first();
            let r = c.request("OPTIONS", &ep.path(), &[("Origin", "https://agent.example"), ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "authorization,content-type")], None);
            ensure!(r.status == 204 || r.status == 200, "preflight {}", r.brief());
            ensure!(r.header("access-control-allow-origin").is_some(), "no ACAO");
            let allow = r.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
            for h in ["authorization", "content-type", "idempotency-key", "payment-signature", "x-payment"] {
                ensure!(allow.contains(h), "Allow-Headers {allow:?} lacks {h}");
            }
            let call = c.post("/v1/health", &[("Origin", "https://agent.example")], "");
            let _ = call;
            let paid = c.post(&ep.path(), &[("Origin", "https://agent.example")], "{}");
            let expose = paid.header("access-control-expose-headers").unwrap_or_default().to_ascii_lowercase();
            for h in ["x-request-id", "x-charged-mcents", "x-balance-mcents", "retry-after", "www-authenticate", "payment-required", "payment-response", "x-payment-response", "payment-receipt"] {
                ensure!(expose.contains(h), "Expose-Headers {expose:?} lacks {h}");
            }
            pass(r.brief())
        }),
        scenario!("headers.no_store_on_me", "/v1/me answers are not cacheable by shared caches", |c, _| {
            let (_, key, _) = setup(c)?;
            let r = c.get("/v1/me", &[("Authorization", &key.bearer())]);
            let cc = r.header("cache-control").unwrap_or_default().to_ascii_lowercase();
            ensure!(cc.contains("no-store") || cc.contains("private"), "Cache-Control {cc:?}");
            pass(format!("Cache-Control: {cc}"))
        }),
        // Last: it spends the hourly mint allowance.
        scenario!("admin.hourly_limit", "minting past the hourly limit → 429 with Retry-After", |c, _| {
            if c.admin_key.is_none() {
                return Ok(Outcome::NotApplicable("needs --admin-key".into()));
            }
            let s = scopes_of(c);
            for i in 0..5000 {
                let r = c.mint_raw(&json!({"balance_mcents": 1, "scopes": [s]}).to_string());
                match r.status {
                    201 => continue,
                    429 => {
                        let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("429 without integer Retry-After"))?;
                        ensure!((1..=3600).contains(&retry), "Retry-After {retry}");
                        return pass(format!("429 after {i} more mints ({} this run), Retry-After {retry}", c.mints));
                    }
                    _ => bail!("unexpected {}", r.brief()),
                }
            }
            bail!("5000 mints within the hour were all accepted")
        }),
    ]
}

/// After a paid call, `path` (read with the key when `with_key`) shows neither the key nor its hash.
fn leak_check(c: &mut Client, path: &str, with_key: bool) -> Result<Outcome> {
    let (ep, key, _) = setup(c)?;
    expect(&c.call_sample(&ep, &key), 200, "")?;
    let bearer = key.bearer();
    let headers: Vec<(&str, &str)> = if with_key { vec![("Authorization", bearer.as_str())] } else { vec![] };
    let r = c.get(path, &headers);
    expect(&r, 200, "")?;
    ensure!(r.json()["ok"] == true, "not an ok body: {}", r.body);
    no_key_material(&r.body, &[&key], &c.prefix())?;
    pass(format!("{} bytes, no key, no hash", r.body.len()))
}

fn burst(c: &mut Client, ep: &Endpoint, room: u64, n: usize) -> Result<Outcome> {
    let key = c.key_for(ep, room)?;
    let replies = concurrent(c, ep, &key, n);
    let ok = replies.iter().filter(|r| r.status == 200).count() as u64;
    let poor = replies.iter().filter(|r| r.status == 402).count();
    let other: Vec<String> = replies.iter().filter(|r| r.status != 200 && r.status != 402).map(Reply::brief).take(3).collect();
    ensure!(other.is_empty(), "unexpected answers: {other:?}");
    let bal = c.balance(&key)?;
    ensure!(ok == room, "{ok} served with room for {room}");
    ensure!(bal == 0, "balance {bal} after the burst");
    let (sum, _) = ledger_sum(c, &key)?;
    ensure!(sum == -((room * ep.price) as i64), "ledger sums to {sum}");
    pass(format!("{n} at once: {ok} served, {poor} × 402, balance 0"))
}
