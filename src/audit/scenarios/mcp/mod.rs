//! `/mcp`, the MCP face of a gateway (contract 3.11): free discovery, Bearer keys on the HTTP
//! request, one billing core with `POST /v1/<endpoint>` (same prices, scopes, holds and ledger), the
//! JSON-RPC error table, result `_meta`, and the transport's HTTP rules. Requests follow the MCP
//! Streamable HTTP rules (POST, `Accept: application/json, text/event-stream`, JSON or SSE answers,
//! `MCP-Protocol-Version` after `initialize`); the servers are stateless, so no session is kept.
//! Every scenario is n/a, with the reason, on a gateway whose `POST /mcp` answers 404.

mod auth;
mod billing;
mod discovery;
mod failure;
mod transport;

use anyhow::{Result, anyhow, bail, ensure};
use serde_json::{Value, json};

use super::prelude::*;
use crate::audit::client::random_idempotency_key;

const PATH: &str = "/mcp";
/// The protocol revision the audit speaks: one every SDK the targets use serves (rmcp and the TS v1
/// SDK both negotiate it).
pub(super) const PROTOCOL: &str = "2025-06-18";
/// `_meta` keys of contract 3.10 / 3.11.
pub(super) const PRICE: &str = "io.mcpay/price_mcents";
pub(super) const SCOPE: &str = "io.mcpay/scope";
pub(super) const CHARGED: &str = "io.mcpay/charged_mcents";
pub(super) const BALANCE: &str = "io.mcpay/balance_mcents";
pub(super) const REQUEST_ID: &str = "io.mcpay/request_id";
pub(super) const REFUNDED: &str = "io.mcpay/refunded";
const IDEMPOTENCY_KEY: &str = "io.mcpay/idempotency_key";
const REPLAYED: &str = "io.mcpay/idempotent_replayed";
/// The MPP transport's "payment required" JSON-RPC error: the mpp target's answer to a paid tool
/// called without `Authorization` (contract 3.11: it is then paid with MPP instead).
const MPP_PAYMENT_REQUIRED: i64 = -32042;

pub fn scenarios() -> Vec<Scenario> {
    let mut all = Vec::new();
    all.extend(discovery::scenarios());
    all.extend(auth::scenarios());
    all.extend(billing::scenarios());
    all.extend(failure::scenarios());
    all.extend(transport::scenarios());
    all
}

/// The JSON-RPC messages of an MCP answer: a JSON body (one message or a batch), or an SSE stream's
/// `data:` lines.
pub(super) fn messages(r: &Reply) -> Vec<Value> {
    let one_or_many = |v: Value| match v {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        v => vec![v],
    };
    if let Ok(v) = serde_json::from_str::<Value>(&r.body) {
        return one_or_many(v);
    }
    r.body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .flat_map(one_or_many)
        .collect()
}

/// POST /mcp with the transport's headers (plus `headers`) and `body` as given.
fn post_raw(c: &Client, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    post_to(c, PATH, headers, body)
}

/// POST to an MCP endpoint (`/mcp`, `/mcp/<upstream>`) with the transport's headers (plus `headers`).
pub(super) fn post_to(c: &Client, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")];
    h.extend_from_slice(headers);
    c.request("POST", path, &h, Some(body))
}

fn mcp(c: &Client, headers: &[(&str, &str)], body: &Value) -> Reply {
    post_raw(c, headers, body.to_string().as_bytes())
}

/// One JSON-RPC request (with the key's Bearer header when given): what a client sends after
/// `initialize` on a stateless server.
fn rpc(c: &Client, key: Option<&Key>, id: Value, method: &str, params: Value) -> Reply {
    let bearer = key.map(Key::bearer);
    let mut h: Vec<(&str, &str)> = vec![("MCP-Protocol-Version", PROTOCOL)];
    if let Some(b) = &bearer {
        h.push(("Authorization", b.as_str()));
    }
    mcp(c, &h, &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
}

/// `tools/call` of `name` with `args` (and `params._meta` when given), under a fresh JSON-RPC id.
fn call_tool(c: &Client, key: Option<&Key>, name: &str, args: Value, meta: Option<Value>) -> Reply {
    call_tool_id(c, key, json!(fresh_id()), name, args, meta)
}

fn call_tool_id(c: &Client, key: Option<&Key>, id: Value, name: &str, args: Value, meta: Option<Value>) -> Reply {
    let mut params = json!({"name": name, "arguments": args});
    if let Some(m) = meta {
        params["_meta"] = m;
    }
    rpc(c, key, id, "tools/call", params)
}

/// A JSON-RPC id no gateway could take for its own: a string that is not a uuid.
pub(super) fn fresh_id() -> String {
    format!("audit-{}", &random_idempotency_key()[..12])
}

/// n/a (with the reason) when the gateway serves no `POST /mcp`.
fn unserved(c: &Client) -> Option<Outcome> {
    let probe = rpc(c, None, json!("probe"), "tools/list", json!({}));
    (probe.status == 404).then(|| Outcome::NotApplicable(format!("this gateway serves no MCP endpoint (POST {PATH}: {})", probe.brief())))
}

/// The one JSON-RPC answer of a request's reply (HTTP 200, one message with a `result` or an `error`).
pub(super) fn answer(r: &Reply) -> Result<Value> {
    ensure!(r.status == 200, "expected HTTP 200 with a JSON-RPC answer, got {}", r.brief());
    let msgs = messages(r);
    ensure!(msgs.len() == 1, "expected one JSON-RPC message, got {}: {}", msgs.len(), r.brief());
    let m = msgs.into_iter().next().unwrap_or_default();
    ensure!(m["jsonrpc"] == "2.0", "not a JSON-RPC 2.0 message: {m}");
    ensure!(m.get("result").is_some() != m.get("error").is_some(), "a JSON-RPC answer has exactly one of result and error: {m}");
    Ok(m)
}

/// The `result` of a successful request.
pub(super) fn result(r: &Reply) -> Result<Value> {
    let m = answer(r)?;
    match m.get("result") {
        Some(res) => Ok(res.clone()),
        None => bail!("expected a result, got the JSON-RPC error {}", m["error"]),
    }
}

/// The `error` of a refused request, whose code must be `code`.
pub(super) fn rpc_error(r: &Reply, code: i64) -> Result<Value> {
    let m = answer(r)?;
    let Some(e) = m.get("error") else { bail!("expected the JSON-RPC error {code}, got a result: {}", m["result"]) };
    ensure!(e["code"] == code, "expected the JSON-RPC error {code}, got {e}");
    ensure!(e["message"].is_string(), "a JSON-RPC error without a message: {e}");
    Ok(e.clone())
}

/// A tool result that is not an error: its `structuredContent`, and its `_meta`.
fn tool_ok(r: &Reply) -> Result<(Value, Value)> {
    let res = result(r)?;
    ensure!(res["isError"] != true, "the tool answered isError: {res}");
    Ok((res["structuredContent"].clone(), res["_meta"].clone()))
}

/// The result's `content` has a text item carrying `value` as JSON.
fn text_is(res: &Value, value: &Value) -> Result<()> {
    let texts: Vec<&str> = res["content"].as_array().into_iter().flatten().filter(|i| i["type"] == "text").filter_map(|i| i["text"].as_str()).collect();
    ensure!(
        texts.iter().any(|t| serde_json::from_str::<Value>(t).is_ok_and(|v| &v == value)),
        "no text content item carries the same JSON ({} text items: {:?})",
        texts.len(),
        texts.iter().map(|t| t.chars().take(80).collect::<String>()).collect::<Vec<_>>()
    );
    Ok(())
}

/// A refusal before the hold (contract 3.11's table): the JSON-RPC `code`, `data.code`, the
/// no-charge note, and neither the balance nor the ledger moved. Returns `error.data`.
pub(super) fn refused(c: &Client, r: &Reply, code: i64, data_code: &str, key: &Key, balance: u64, ledger: (i64, usize)) -> Result<Value> {
    let e = rpc_error(r, code)?;
    let data = &e["data"];
    ensure!(data["code"] == data_code, "error.data.code {} (expected {data_code}): {e}", data["code"]);
    ensure!(data["note"] == NO_CHARGE, "error.data without \"note\": \"{NO_CHARGE}\": {e}");
    let now = c.balance(key)?;
    ensure!(now == balance, "balance moved from {balance} to {now} on a refused tools/call");
    ensure!(ledger_sum(c, key)? == ledger, "a refused tools/call wrote ledger rows");
    Ok(data.clone())
}

/// A 401 of section 2 (decided before the MCP server runs): `code`, `WWW-Authenticate: Bearer realm=…`.
pub(super) fn unauthorized(r: &Reply, code: &str) -> Result<()> {
    expect(r, 401, code)?;
    let www = r.header("www-authenticate").unwrap_or_default();
    ensure!(www.starts_with("Bearer realm=\""), "401 {code} with WWW-Authenticate {www:?} (expected Bearer realm=\"…\")");
    let v = r.json();
    ensure!(v["ok"] == false && v["error"]["message"].is_string(), "401 not in the error shape of section 2: {}", r.body);
    ensure!(v["request_id"].as_str() == r.header("x-request-id").as_deref(), "401: request_id {} ≠ X-Request-Id {:?}", v["request_id"], r.header("x-request-id"));
    Ok(())
}

/// A paid tool called without `Authorization` on a gateway that sells it with MPP instead (the mpp
/// target): the JSON-RPC "payment required" error.
fn mpp_offer(r: &Reply) -> bool {
    answer(r).is_ok_and(|m| m["error"]["code"] == MPP_PAYMENT_REQUIRED)
}

/// `8-4-4-4-12` lowercase hex.
pub(super) fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, ch)| if matches!(i, 8 | 13 | 18 | 23) { ch == '-' } else { ch.is_ascii_digit() || ('a'..='f').contains(&ch) })
}

/// Contract 3.11: a tool call's call id is `<X-Request-Id>/mcp/<uuid>`, made by the gateway.
fn check_call_id(call_id: &str, r: &Reply, jsonrpc_id: &str) -> Result<()> {
    let rid = r.header("x-request-id").unwrap_or_default();
    ensure!(is_uuid(&rid), "X-Request-Id {rid:?} is not a uuid");
    let Some(rest) = call_id.strip_prefix(&format!("{rid}/mcp/")) else { bail!("call id {call_id:?} is not <X-Request-Id>/mcp/<uuid> (X-Request-Id {rid})") };
    ensure!(is_uuid(rest), "call id {call_id:?}: {rest:?} after /mcp/ is not a uuid");
    // The uuid shape already rules out a client id; a plain equality catches a gateway that echoes it.
    ensure!(call_id != jsonrpc_id && rest != jsonrpc_id, "call id {call_id:?} is the JSON-RPC id {jsonrpc_id:?}");
    Ok(())
}

/// The call id of a tool result (`_meta["io.mcpay/request_id"]`).
fn call_id(meta: &Value) -> Result<String> {
    meta[REQUEST_ID].as_str().map(str::to_string).ok_or_else(|| anyhow!("result _meta has no \"{REQUEST_ID}\": {meta}"))
}

/// `tools/list` without a key: the tools.
fn tools(c: &Client) -> Result<Vec<Value>> {
    let res = result(&rpc(c, None, json!(fresh_id()), "tools/list", json!({})))?;
    res["tools"].as_array().cloned().ok_or_else(|| anyhow!("tools/list result has no tools array: {res}"))
}

/// `GET /v1/pricing` as JSON.
pub(super) fn pricing(c: &Client) -> Result<Value> {
    let r = c.get("/v1/pricing", &[]);
    expect(&r, 200, "")?;
    Ok(r.json())
}

/// The ledger rows carrying `id`, oldest first, as (kind, amount).
fn rows_of(rows: &[Value], id: &str) -> Vec<(String, i64)> {
    let mut v: Vec<(u64, String, i64)> = rows
        .iter()
        .filter(|e| e["request_id"] == id)
        .map(|e| (e["seq"].as_u64().unwrap_or(0), e["kind"].as_str().unwrap_or("?").to_string(), e["amount_mcents"].as_i64().unwrap_or(0)))
        .collect();
    v.sort();
    v.into_iter().map(|(_, k, a)| (k, a)).collect()
}

/// The ledger of `key` has, for `id`, exactly a hold of `price` then `settle` (`capture` / `release`).
pub(super) fn settled_as(c: &Client, key: &Key, id: &str, price: u64, settle: &str) -> Result<()> {
    let rows = ledger_rows(c, key)?;
    let got = rows_of(&rows, id);
    let amount = if settle == "release" { price as i64 } else { 0 };
    let want = vec![("hold".to_string(), -(price as i64)), (settle.to_string(), amount)];
    ensure!(got == want, "ledger rows of {id}: {got:?}, expected {want:?}");
    Ok(())
}

/// The paid endpoint named `name`, as /v1/pricing lists it.
fn endpoint(c: &Client, flag: &str, name: &str) -> Result<Endpoint> {
    c.endpoints.iter().find(|e| e.name == name).cloned().ok_or_else(|| anyhow!("{flag} names {name:?}, which /v1/pricing does not list"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checks::tests::serve;
    use crate::audit::scenario::Options;

    fn reply(body: &str) -> Reply {
        Reply { status: 200, headers: Default::default(), body: body.into() }
    }

    #[test]
    fn messages_from_json_batches_and_sse() {
        assert_eq!(messages(&reply(r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600}}"#)).len(), 1);
        assert_eq!(messages(&reply(r#"[{"id":1,"error":{}},{"id":1,"result":{}}]"#)).len(), 2);
        let sse = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{}}\n\nevent: message\ndata: {\"id\":7,\"error\":{}}\n\n";
        let m = messages(&reply(sse));
        assert_eq!(m.len(), 2);
        assert!(m[0].get("result").is_some());
        assert!(messages(&reply("")).is_empty());
    }

    #[test]
    fn answers_results_and_errors() {
        let ok = reply(r#"{"jsonrpc":"2.0","id":"a","result":{"tools":[]}}"#);
        assert_eq!(result(&ok).unwrap(), json!({"tools": []}));
        assert!(rpc_error(&ok, -32602).unwrap_err().to_string().contains("got a result"));
        let err = reply("event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":\"a\",\"error\":{\"code\":-32602,\"message\":\"m\",\"data\":{\"code\":\"invalid_input\"}}}\n\n");
        assert_eq!(rpc_error(&err, -32602).unwrap()["data"]["code"], "invalid_input");
        assert!(rpc_error(&err, -32002).is_err());
        assert!(result(&err).unwrap_err().to_string().contains("-32602"));
        assert!(mpp_offer(&reply(r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32042,"message":"Payment Required"}}"#)));
        assert!(!mpp_offer(&err));
        // Neither, both, two messages, another status: not one answer.
        for bad in [r#"{"jsonrpc":"2.0","id":1}"#, r#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#, r#"[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"result":{}}]"#, r#"{"id":1,"result":{}}"#] {
            assert!(answer(&reply(bad)).is_err(), "{bad}");
        }
        let mut e401 = reply(r#"{"ok":false}"#);
        e401.status = 401;
        assert!(answer(&e401).unwrap_err().to_string().contains("401"));
    }

    #[test]
    fn call_ids_are_the_request_id_then_mcp_then_a_uuid() {
        assert!(is_uuid("0f8fad5b-d9cb-469f-a165-70867728950e"));
        for bad in ["0f8fad5b-d9cb-469f-a165-70867728950", "0F8FAD5B-D9CB-469F-A165-70867728950E", "0f8fad5bxd9cb-469f-a165-70867728950e", ""] {
            assert!(!is_uuid(bad), "{bad}");
        }
        let rid = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let mut r = reply("{}");
        r.headers.insert("x-request-id", rid.parse().unwrap());
        let good = format!("{rid}/mcp/7c9e6679-7425-40de-944b-e07fc1f90ae7");
        check_call_id(&good, &r, "audit-1").unwrap();
        check_call_id(&good, &r, "1").unwrap();
        for bad in [rid.to_string(), format!("{rid}/mcp/audit-1"), format!("x{good}"), "7c9e6679-7425-40de-944b-e07fc1f90ae7/mcp/7c9e6679-7425-40de-944b-e07fc1f90ae7".into()] {
            assert!(check_call_id(&bad, &r, "audit-1").is_err(), "{bad}");
        }
    }

    #[test]
    fn ledger_rows_of_one_call_in_seq_order() {
        let rows = vec![
            json!({"seq": 5, "kind": "capture", "amount_mcents": 0, "request_id": "a/mcp/1"}),
            json!({"seq": 4, "kind": "hold", "amount_mcents": -100, "request_id": "a/mcp/1"}),
            json!({"seq": 3, "kind": "hold", "amount_mcents": -100, "request_id": "b"}),
        ];
        assert_eq!(rows_of(&rows, "a/mcp/1"), vec![("hold".to_string(), -100), ("capture".to_string(), 0)]);
        assert!(rows_of(&rows, "c").is_empty());
    }

    /// On a gateway whose POST /mcp answers 404, every mcp.* scenario is n/a and says why, and none
    /// mints a key or sends anything but the probe and GET /v1/pricing.
    #[test]
    fn every_scenario_is_not_applicable_without_mcp() {
        let url = serve(|_, path| match path {
            "/v1/pricing" => (200, r#"{"ok":true,"endpoints":[{"name":"example","price_mcents":100,"scope":"example","path":"/v1/example","input":{"message":{"type":"string","required":true}}}],"signup":null}"#.into()),
            _ => (404, r#"{"ok":false,"error":{"code":"not_found","message":"Not found"}}"#.into()),
        });
        let mut c = Client::connect(&url, Some("admin".into())).unwrap();
        let opts = Options { failing_call: Some(("example".into(), "{}".into())), slow_call: Some(("example".into(), "{}".into())), unconfigured_url: None, x402_harness: None, ..Options::default() };
        let all = scenarios();
        assert!(all.len() >= 20, "{}", all.len());
        for s in &all {
            assert!(s.name.starts_with("mcp."), "{}", s.name);
            match (s.run)(&mut c, &opts) {
                Ok(Outcome::NotApplicable(why)) => assert!(why.contains("serves no MCP endpoint") && why.contains("404"), "{}: {why}", s.name),
                Ok(Outcome::Pass(e)) => panic!("{} passed without /mcp: {e}", s.name),
                Err(e) => panic!("{} failed without /mcp: {e:#}", s.name),
            }
        }
        assert_eq!(c.mints, 0);
    }

    /// A gateway whose /mcp answers every POST with the same tool result (no refusals, no terms, no
    /// 401, no 405, no CORS, no request ids, a 64-hex string) passes no mcp.* scenario: each one
    /// checks something.
    #[test]
    fn a_gateway_that_answers_everything_with_a_result_passes_nothing() {
        let url = serve(|method, path| match (method, path) {
            (_, "/v1/pricing") => (200, r#"{"ok":true,"endpoints":[{"name":"example","price_mcents":100,"scope":"example","path":"/v1/example","rate_limit_per_minute":3,"description":"d","input":{"message":{"type":"string","required":true}}}],"signup":null}"#.into()),
            ("POST", "/v1/admin/mint") => (201, r#"{"ok":true,"key":"mcp_0000000000000000000000000000000000000000000000000000000000000001","key_id":"k_1"}"#.into()),
            ("GET", "/v1/me") => (200, r#"{"ok":true,"balance_mcents":1000}"#.into()),
            ("GET", p) if p.starts_with("/v1/me/ledger") => (200, r#"{"ok":true,"entries":[],"next_before":null}"#.into()),
            // ... and leaks a 64-hex string (a key hash, as far as anyone can tell).
            ("POST", "/mcp") => (200, r#"{"jsonrpc":"2.0","id":"x","result":{"content":[],"_meta":{"h":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}}}"#.into()),
            _ => (404, r#"{"ok":false,"error":{"code":"not_found","message":"Not found"}}"#.into()),
        });
        let mut c = Client::connect(&url, Some("admin".into())).unwrap();
        let opts = Options { failing_call: Some(("example".into(), r#"{"message":"fail"}"#.into())), slow_call: Some(("example".into(), r#"{"message":"slow"}"#.into())), unconfigured_url: None, x402_harness: None, ..Options::default() };
        for s in scenarios() {
            match (s.run)(&mut c, &opts) {
                Err(_) => {}
                // One endpoint, one scope: nothing to deny; one tool with a string field still
                // gets a changed argument, so only scope_default_deny may be n/a.
                Ok(Outcome::NotApplicable(why)) => assert_eq!(s.name, "mcp.scope_default_deny", "{why}"),
                Ok(Outcome::Pass(e)) => panic!("{} passed against a gateway that refuses nothing: {e}", s.name),
            }
        }
    }
}
