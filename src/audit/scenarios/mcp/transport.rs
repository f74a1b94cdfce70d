//! The HTTP side of /mcp (contract 3.11 "HTTP", "Batches", section 2): batches, the body bound,
//! malformed JSON, methods, CORS and `X-Request-Id`.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use super::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("mcp.duplicate_jsonrpc_ids", "POST /mcp with a batch of three tools/call sharing one JSON-RPC id (prepaid key) → a JSON-RPC error, nothing charged", |c, _| duplicate_ids(c)),
        scenario!("mcp.batch_distinct_ids", "a batch of two tools/call with distinct ids → refused whole with nothing charged, or (Workers SDK) each call charged once under its own call id", |c, _| distinct_ids(c)),
        scenario!("mcp.body_too_large", "a 2 MiB tools/call → HTTP 413 body_too_large in the error shape of section 2 (max_body_bytes), nothing charged", |c, _| {
            if let Some(na) = unserved(c) {
                return Ok(na);
            }
            let (ep, key, bal) = setup(c)?;
            let mut args = ep.sample();
            args["pad"] = json!("a".repeat(2 * 1024 * 1024));
            let r = call_tool(c, Some(&key), &ep.name, args, None);
            expect(&r, 413, "body_too_large")?;
            let v = r.json();
            ensure!(v["ok"] == false && v["request_id"].as_str() == r.header("x-request-id").as_deref(), "413 not in the error shape of section 2: {}", r.body);
            ensure!(v["max_body_bytes"].is_u64(), "413 without an integer max_body_bytes: {}", r.body);
            ensure!(c.balance(&key)? == bal, "balance moved on a 413");
            pass(format!("413 body_too_large, max_body_bytes {}, balance still {bal}", v["max_body_bytes"]))
        }),
        scenario!("mcp.malformed_json", "a body that is not JSON → HTTP 400 with the JSON-RPC error -32700", |c, _| {
            if let Some(na) = unserved(c) {
                return Ok(na);
            }
            let r = post_raw(c, &[("MCP-Protocol-Version", PROTOCOL)], br#"{"jsonrpc": "2.0", "id": 1, "method": "tools/list""#);
            ensure!(r.status == 400, "expected 400, got {}", r.brief());
            let msgs = messages(&r);
            ensure!(msgs.iter().any(|m| m["error"]["code"] == -32700), "no JSON-RPC -32700 in {}", r.brief());
            pass(format!("400, {}", msgs[0]["error"]))
        }),
        scenario!("mcp.json_answers", "answers to initialize, tools/list and a paid tools/call are Content-Type application/json with Cache-Control: no-store and X-Content-Type-Options: nosniff", |c, _| json_answers(c)),
        scenario!("mcp.accept_optional", "a POST /mcp without an Accept header is still answered (contract 3.11: the gateway takes it)", |c, _| {
            if let Some(na) = unserved(c) {
                return Ok(na);
            }
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).to_string();
            let r = c.request("POST", PATH, &[("Content-Type", "application/json"), ("MCP-Protocol-Version", PROTOCOL)], Some(body.as_bytes()));
            let res = result(&r).map_err(|e| e.context("tools/list without Accept"))?;
            ensure!(res["tools"].as_array().is_some_and(|t| t.len() >= c.endpoints.len() + 2), "tools/list without Accept: {res}");
            pass(format!("tools/list without Accept: {} tools", res["tools"].as_array().map_or(0, Vec::len)))
        }),
        scenario!("mcp.get_delete_405", "GET and DELETE /mcp → 405 method_not_allowed with Allow: POST (no stream, no sessions)", |c, _| {
            if let Some(na) = unserved(c) {
                return Ok(na);
            }
            for method in ["GET", "DELETE"] {
                let r = c.request(method, PATH, &[("Accept", "text/event-stream")], None);
                expect(&r, 405, "method_not_allowed").map_err(|e| e.context(format!("{method} {PATH}")))?;
                let allow = r.header("allow").unwrap_or_default();
                ensure!(allow.split(',').map(str::trim).any(|m| m == "POST") && !allow.contains("GET"), "{method} {PATH}: Allow {allow:?} (expected POST)");
            }
            pass("GET and DELETE: 405, Allow: POST")
        }),
        scenario!("mcp.cors", "OPTIONS /mcp → 204 allowing POST, Authorization, Mcp-Protocol-Version, Mcp-Session-Id, Last-Event-ID; answers (401s included) carry Allow-Origin and expose Mcp-Session-Id, X-Request-Id, WWW-Authenticate", |c, _| cors(c)),
        scenario!("mcp.request_id", "every /mcp answer (200, 202, 400, 401, 405, 204) has its own X-Request-Id uuid", |c, _| {
            if let Some(na) = unserved(c) {
                return Ok(na);
            }
            let rs = [
                rpc(c, None, json!(1), "tools/list", json!({})),
                mcp(c, &[("MCP-Protocol-Version", PROTOCOL)], &json!({"jsonrpc": "2.0", "method": "notifications/initialized"})),
                post_raw(c, &[], b"{"),
                call_tool(c, None, "balance", json!({}), None),
                c.get(PATH, &[("Accept", "text/event-stream")]),
                c.request("OPTIONS", PATH, &[("Origin", "https://agent.example"), ("Access-Control-Request-Method", "POST")], None),
            ];
            let ids: Vec<String> = rs.iter().filter_map(|r| r.header("x-request-id")).collect();
            let statuses: Vec<u16> = rs.iter().map(|r| r.status).collect();
            ensure!(ids.len() == rs.len(), "{} of {} answers ({statuses:?}) had X-Request-Id", ids.len(), rs.len());
            ensure!(ids.iter().all(|i| is_uuid(i)), "not uuids: {ids:?}");
            let mut uniq = ids.clone();
            uniq.sort();
            uniq.dedup();
            ensure!(uniq.len() == ids.len(), "repeated ids {ids:?}");
            pass(format!("statuses {statuses:?}, {} distinct ids", ids.len()))
        }),
    ]
}

fn duplicate_ids(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let (ep, key, balance) = setup(c)?;
    let (sum0, rows0) = ledger_sum(c, &key)?;
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": ep.name, "arguments": ep.sample()}});
    let r = mcp(c, &[("Authorization", &key.bearer())], &json!([call, call, call]));
    ensure!(r.status != 0 && r.status < 500, "the batch: {}", r.brief());
    let msgs = messages(&r);
    ensure!(!msgs.is_empty(), "the batch got no JSON-RPC answer: {}", r.brief());
    ensure!(
        msgs.iter().all(|m| m.get("error").is_some_and(Value::is_object) && m.get("result").is_none()),
        "a batch with one id three times was run (a result came back): {}",
        r.brief()
    );
    let now = c.balance(&key)?;
    let (sum1, rows1) = ledger_sum(c, &key)?;
    ensure!(now == balance, "the refused batch moved the balance {balance} → {now}");
    ensure!(rows1 == rows0 && sum1 == sum0, "the refused batch wrote ledger rows ({rows0} → {rows1} entries)");
    let codes: Vec<String> = msgs.iter().map(|m| m["error"]["code"].to_string()).collect();
    pass(format!("HTTP {}, JSON-RPC error(s) {codes:?}, balance still {balance}", r.status))
}

fn distinct_ids(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let (ep, key, bal) = setup(c)?;
    let ledger = ledger_sum(c, &key)?;
    let call = |id: &str| json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": ep.name, "arguments": ep.sample()}});
    let r = mcp(c, &[("Authorization", &key.bearer()), ("MCP-Protocol-Version", PROTOCOL)], &json!([call("b1"), call("b2")]));
    ensure!(r.status != 0 && r.status < 500, "the batch: {}", r.brief());
    let msgs = messages(&r);
    let results: Vec<&Value> = msgs.iter().filter(|m| m.get("result").is_some()).collect();
    if results.is_empty() {
        ensure!(c.balance(&key)? == bal && ledger_sum(c, &key)? == ledger, "a refused batch moved money ({})", r.brief());
        return pass(format!("refused whole ({}), nothing charged", r.brief()));
    }
    ensure!(results.len() == 2 && msgs.len() == 2, "a batch of two calls answered {} messages, {} results: {}", msgs.len(), results.len(), r.brief());
    let mut ids = Vec::new();
    for (m, jid) in results.iter().zip(["b1", "b2"]) {
        let res = &m["result"];
        ensure!(res["isError"] != true && res["_meta"][CHARGED] == ep.price, "batch call {}: {res}", m["id"]);
        let id = call_id(&res["_meta"])?;
        check_call_id(&id, &r, jid)?;
        settled_as(c, &key, &id, ep.price, "capture")?;
        ids.push(id);
    }
    ensure!(ids[0] != ids[1], "both calls of the batch share the call id {}", ids[0]);
    ensure!(c.balance(&key)? == bal - 2 * ep.price, "balance {} after a batch of two calls from {bal}", c.balance(&key)?);
    pass(format!("each call charged once: {} and {}", ids[0], ids[1]))
}

fn cors(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let origin = ("Origin", "https://agent.example");
    let pre = c.request("OPTIONS", PATH, &[origin, ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "authorization,content-type,mcp-protocol-version")], None);
    ensure!(pre.status == 204, "preflight {} (expected 204)", pre.brief());
    ensure!(pre.body.is_empty(), "a 204 with a body: {}", pre.body);
    ensure!(pre.header("access-control-allow-origin").as_deref() == Some("*"), "Access-Control-Allow-Origin {:?}", pre.header("access-control-allow-origin"));
    let methods = pre.header("access-control-allow-methods").unwrap_or_default().to_ascii_uppercase();
    ensure!(methods.contains("POST") && methods.contains("OPTIONS"), "Access-Control-Allow-Methods {methods:?} (expected POST, OPTIONS)");
    let allow = pre.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
    for h in ["authorization", "content-type", "idempotency-key", "mcp-protocol-version", "mcp-session-id", "last-event-id"] {
        ensure!(allow.split(',').any(|a| a.trim() == h), "Access-Control-Allow-Headers {allow:?} lacks {h}");
    }
    ensure!(pre.header("access-control-max-age").as_deref() == Some("86400"), "Access-Control-Max-Age {:?}", pre.header("access-control-max-age"));
    let ok = mcp(c, &[origin, ("MCP-Protocol-Version", PROTOCOL)], &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}));
    let denied = mcp(c, &[origin, ("MCP-Protocol-Version", PROTOCOL)], &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "balance", "arguments": {}}}));
    for (what, r) in [("tools/list", &ok), ("a 401", &denied)] {
        ensure!(r.header("access-control-allow-origin").as_deref() == Some("*"), "{what} ({}): Access-Control-Allow-Origin {:?}", r.brief(), r.header("access-control-allow-origin"));
        let expose = r.header("access-control-expose-headers").unwrap_or_default().to_ascii_lowercase();
        for h in ["mcp-session-id", "x-request-id", "www-authenticate"] {
            ensure!(expose.split(',').any(|a| a.trim() == h), "{what}: Access-Control-Expose-Headers {expose:?} lacks {h}");
        }
    }
    pass(format!("preflight 204 ({methods}); answers expose Mcp-Session-Id; 401 has CORS ({})", denied.status))
}

/// Contract 3.11 "answers are `application/json`", and section 2's headers on every JSON answer (a
/// `balance` or paid result is per key: no shared cache may keep it).
fn json_answers(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let (ep, key, _) = setup(c)?;
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "audit", "version": "1"}}});
    let answers = [
        ("initialize", mcp(c, &[], &init)),
        ("tools/list", rpc(c, None, json!(1), "tools/list", json!({}))),
        ("balance", call_tool(c, Some(&key), "balance", json!({}), None)),
        ("a paid tools/call", call_tool(c, Some(&key), &ep.name, ep.sample(), None)),
    ];
    for (what, r) in &answers {
        result(r).map_err(|e| e.context(what.to_string()))?;
        let ct = r.header("content-type").unwrap_or_default().to_ascii_lowercase();
        ensure!(ct.split(';').next().is_some_and(|m| m.trim() == "application/json"), "{what}: Content-Type {ct:?} (contract 3.11: answers are application/json)");
        let cc = r.header("cache-control").unwrap_or_default().to_ascii_lowercase();
        ensure!(cc.contains("no-store"), "{what}: Cache-Control {cc:?} (expected no-store)");
        ensure!(r.header("x-content-type-options").is_some_and(|v| v.eq_ignore_ascii_case("nosniff")), "{what}: X-Content-Type-Options {:?}", r.header("x-content-type-options"));
    }
    pass(format!("{} answers: application/json, no-store, nosniff", answers.len()))
}
