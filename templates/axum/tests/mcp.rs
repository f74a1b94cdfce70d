//! `/mcp` (contract 3.11) with the official MCP client (rmcp, streamable HTTP) against a real
//! server: tools from mcpay.toml, paid tools through the same billing core as POST /v1/<endpoint>
//! (holds, captures, releases counted in the ledger), JSON-RPC errors before the hold, HTTP 401
//! before the MCP server, batches refused. On SQLite and (with TEST_DATABASE_URL) PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use gateway::generated::{Endpoint, GATEWAY};
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::{RoleClient, RunningService, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ErrorData, ServiceExt};
use serde_json::{Value, json};

backend_tests!(
    tools_list_and_pricing_need_no_key,
    paid_tool_holds_then_captures,
    refusals_before_the_hold_are_rpc_errors_and_charge_nothing,
    failing_handler_is_an_error_result_and_released,
    timeout_is_an_error_result_and_released,
    balance_and_paid_tools_need_a_bearer_key,
    idempotent_retry_is_held_once,
    batches_are_refused_before_anything_runs,
    http_rules_of_the_endpoint,
    any_host_unless_mcp_allowed_hosts_is_set,
);

type Client = RunningService<RoleClient, ()>;

/// The official client on /mcp, with `Authorization: Bearer <key>` when given.
async fn client(s: &TestServer, key: Option<&str>) -> Client {
    let mut config = StreamableHttpClientTransportConfig::with_uri(s.url("/mcp"));
    if let Some(k) = key {
        config = config.auth_header(k);
    }
    ().serve(StreamableHttpClientTransport::from_config(config)).await.expect("MCP client connects")
}

fn params(value: Value) -> CallToolRequestParams {
    serde_json::from_value(value).unwrap()
}

async fn call(c: &Client, tool: &str, arguments: Value) -> Result<CallToolResult, ServiceError> {
    c.call_tool(params(json!({ "name": tool, "arguments": arguments }))).await
}

fn rpc_error(r: Result<CallToolResult, ServiceError>) -> ErrorData {
    match r {
        Err(ServiceError::McpError(e)) => e,
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    }
}

fn value_of<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap()
}

/// One raw JSON-RPC POST to /mcp (what a client without the SDK sends).
async fn post(s: &TestServer, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = s
        .client
        .post(s.url("/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    req.send().await.unwrap()
}

fn tools_call(id: i64, tool: &str, arguments: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "method": "tools/call", "params": { "name": tool, "arguments": arguments } })
}

/// A call id: `<X-Request-Id>/mcp/<uuid v4>`.
fn assert_call_id(id: &str) {
    let (rid, call) = id.split_once("/mcp/").unwrap_or_else(|| panic!("not a call id: {id}"));
    for part in [rid, call] {
        let u = uuid::Uuid::parse_str(part).unwrap_or_else(|_| panic!("not a uuid: {part}"));
        assert_eq!(u.get_version_num(), 4, "{id}");
    }
}

fn ledger_holds(ledger: &[Value]) -> usize {
    count_kind(ledger, "hold")
}

async fn tools_list_and_pricing_need_no_key(db: &TestDb) {
    let s = db.server().await;
    let c = client(&s, None).await;
    let tools = c.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    let mut expected: Vec<&str> = Endpoint::ALL.iter().map(|e| e.name()).collect();
    expected.extend(["pricing", "balance"]);
    assert_eq!(names, expected);
    let pricing: Value = s.get("/v1/pricing").await.json().await.unwrap();
    for (tool, entry) in tools.iter().zip(pricing["endpoints"].as_array().unwrap()) {
        let ep = Endpoint::from_name(&tool.name).unwrap();
        assert_eq!(tool.description.as_deref(), Some(ep.description()));
        // The schema: the shape's types, required fields in order, nothing else.
        let schema = value_of(tool.input_schema.as_ref());
        assert_eq!(schema["type"], "object");
        assert_eq!(schema["additionalProperties"], false);
        let props = schema["properties"].as_object().unwrap();
        let input = entry["input"].as_object().unwrap();
        assert_eq!(props.keys().collect::<Vec<_>>(), input.keys().collect::<Vec<_>>());
        for (name, field) in input {
            assert_eq!(props[name]["type"], field["type"]);
        }
        let required: Vec<&str> = input.iter().filter(|(_, f)| f["required"] == true).map(|(n, _)| n.as_str()).collect();
        assert_eq!(schema["required"], json!(required));
        // The terms equal /v1/pricing.
        let meta = value_of(tool.meta.as_ref().unwrap());
        assert_eq!(meta["io.mcpay/price_mcents"], entry["price_mcents"]);
        assert_eq!(meta["io.mcpay/scope"], entry["scope"]);
    }
    let r = call(&c, "pricing", json!({})).await.unwrap();
    assert_eq!(r.structured_content.as_ref(), Some(&pricing));
    assert_eq!(r.is_error, None);
    let text = value_of(&r.content[0]);
    assert_eq!(serde_json::from_str::<Value>(text["text"].as_str().unwrap()).unwrap(), pricing);
    let unknown = rpc_error(call(&c, "no_such_tool", json!({})).await);
    assert_eq!(unknown.code.0, -32602);
    assert_eq!(unknown.data.unwrap()["code"], "invalid_input");
    c.cancel().await.unwrap();
}

async fn paid_tool_holds_then_captures(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(3, ep);
    let h = TestHandlers::echo();
    let s = db.server_running(&h).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let c = client(&s, Some(&k.key)).await;
    let r = call(&c, ep.name(), sample(ep)).await.unwrap();
    assert_eq!(r.is_error, None, "{r:?}");
    let structured = r.structured_content.clone().unwrap();
    assert_eq!(structured["echoed"], sample(ep));
    assert_eq!(structured["run"], 1);
    let text = value_of(&r.content[0]);
    assert_eq!(serde_json::from_str::<Value>(text["text"].as_str().unwrap()).unwrap(), structured);
    let meta = value_of(r.meta.as_ref().unwrap());
    assert_eq!(meta["io.mcpay/charged_mcents"], price);
    assert_eq!(meta["io.mcpay/balance_mcents"], start - price);
    let call_id = meta["io.mcpay/request_id"].as_str().unwrap().to_string();
    assert_call_id(&call_id);

    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger), ["capture", "hold", "mint"]);
    assert_eq!(ledger[1]["amount_mcents"], -price);
    assert_eq!(ledger[1]["request_id"], call_id.as_str());
    assert_eq!(ledger[0]["request_id"], call_id.as_str());
    assert_eq!(ledger[0]["amount_mcents"], 0);
    assert_eq!(amount_sum(&ledger), start - price);
    assert_eq!(db.hold_state(&call_id).await.as_deref(), Some("captured"));

    // `balance` is the body of GET /v1/me.
    let b = call(&c, "balance", json!({})).await.unwrap();
    let me = s.me(&k.key).await;
    assert_eq!(b.structured_content.as_ref(), Some(&me));
    assert_eq!(me["balance_mcents"], start - price);
    assert_eq!(me["calls"], 1);

    // A second call gets its own call id.
    let r2 = call(&c, ep.name(), sample(ep)).await.unwrap();
    let id2 = value_of(r2.meta.as_ref().unwrap())["io.mcpay/request_id"].as_str().unwrap().to_string();
    assert_ne!(id2, call_id);
    assert_eq!(s.balance(&k.key).await, start - 2 * price);
    assert_eq!(h.run_count(), 2);
    c.cancel().await.unwrap();
}

async fn refusals_before_the_hold_are_rpc_errors_and_charge_nothing(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let h = TestHandlers::echo();
    let s = db.server_running(&h).await;

    // Insufficient balance.
    let poor = db.seed_key(price - 1, &[ep.scope()], None).await;
    let c = client(&s, Some(&poor.key)).await;
    let e = rpc_error(call(&c, ep.name(), sample(ep)).await);
    assert_eq!(e.code.0, -32002);
    let data = e.data.unwrap();
    assert_eq!(data["code"], "insufficient_balance");
    assert_eq!(data["note"], "no charge applied");
    assert_eq!(data["price_mcents"], price);
    assert_eq!(data["balance_mcents"], price - 1);
    assert_eq!(ledger_holds(&s.ledger(&poor.key).await), 0);
    assert_eq!(s.balance(&poor.key).await, price - 1);
    c.cancel().await.unwrap();

    // Scope denied.
    let start = balance_for(2, ep);
    let unscoped = db.seed_key(start, &[], None).await;
    let c = client(&s, Some(&unscoped.key)).await;
    let e = rpc_error(call(&c, ep.name(), sample(ep)).await);
    assert_eq!(e.code.0, -32003);
    let data = e.data.unwrap();
    assert_eq!(data["code"], "scope_denied");
    assert_eq!(data["required_scope"], ep.scope());
    assert_eq!(data["note"], "no charge applied");
    assert_eq!(ledger_holds(&s.ledger(&unscoped.key).await), 0);
    c.cancel().await.unwrap();

    // Invalid arguments: an unknown field, and arguments that are not an object.
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let c = client(&s, Some(&k.key)).await;
    let mut bad = sample(ep);
    bad["no_such_field"] = json!(1);
    let e = rpc_error(call(&c, ep.name(), bad).await);
    assert_eq!(e.code.0, -32602);
    let data = e.data.unwrap();
    assert_eq!(data["code"], "invalid_input");
    assert_eq!(data["note"], "no charge applied");
    let raw = post(&s, Some(&k.key), &tools_call(7, ep.name(), json!([1, 2]))).await;
    assert_eq!(raw.status(), 200);
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["id"], 7);
    assert_eq!(body["error"]["code"], -32602);
    assert_eq!(body["error"]["data"]["code"], "invalid_input");
    // A malformed Idempotency-Key in _meta.
    let e = rpc_error(
        c.call_tool(params(json!({ "name": ep.name(), "arguments": sample(ep), "_meta": { "io.mcpay/idempotency_key": "short" } })))
            .await,
    );
    assert_eq!(e.code.0, -32602);
    assert_eq!(ledger_holds(&s.ledger(&k.key).await), 0);
    assert_eq!(s.balance(&k.key).await, start);
    assert_eq!(h.run_count(), 0);
    c.cancel().await.unwrap();
}

async fn failing_handler_is_an_error_result_and_released(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(2, ep);
    let h = TestHandlers::failing();
    let s = db.server_running(&h).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let c = client(&s, Some(&k.key)).await;
    let r = call(&c, ep.name(), sample(ep)).await.unwrap();
    assert_eq!(r.is_error, Some(true));
    let body = r.structured_content.clone().unwrap();
    assert_eq!(body["ok"], false);
    assert_eq!(body["error"]["code"], "handler_failed");
    assert_eq!(body["refunded"], true);
    assert_eq!(body["charged_mcents"], 0);
    assert_eq!(body["balance_mcents"], start);
    assert!(body.get("note").is_none(), "{body}");
    let meta = value_of(r.meta.as_ref().unwrap());
    assert_eq!(meta["io.mcpay/refunded"], true);
    assert_eq!(meta["io.mcpay/charged_mcents"], 0);
    assert_eq!(meta["io.mcpay/balance_mcents"], start);
    let call_id = meta["io.mcpay/request_id"].as_str().unwrap();
    assert_call_id(call_id);
    assert_eq!(body["request_id"], call_id);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger), ["release", "hold", "mint"]);
    assert_eq!(ledger[0]["amount_mcents"], price);
    assert_eq!(ledger[0]["request_id"], call_id);
    assert_eq!(ledger[1]["request_id"], call_id);
    assert_eq!(s.balance(&k.key).await, start);
    assert_eq!(s.me(&k.key).await["refunded_mcents"], price);
    c.cancel().await.unwrap();
}

async fn timeout_is_an_error_result_and_released(db: &TestDb) {
    let ep = ep();
    let start = balance_for(2, ep);
    let h = TestHandlers::hanging().with_timeout(Duration::from_millis(300));
    let s = db.server_running(&h).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let c = client(&s, Some(&k.key)).await;
    let r = call(&c, ep.name(), sample(ep)).await.unwrap();
    assert_eq!(r.is_error, Some(true));
    let body = r.structured_content.clone().unwrap();
    assert_eq!(body["error"]["code"], "handler_timeout");
    assert_eq!(body["refunded"], true);
    assert_eq!(body["charged_mcents"], 0);
    assert_eq!(value_of(r.meta.as_ref().unwrap())["io.mcpay/refunded"], true);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger), ["release", "hold", "mint"]);
    assert_eq!(s.balance(&k.key).await, start);
    // A timeout is never counted against the refund cap.
    assert_eq!(s.me(&k.key).await["calls"], 0);
    c.cancel().await.unwrap();
}

async fn balance_and_paid_tools_need_a_bearer_key(db: &TestDb) {
    let ep = ep();
    let start = balance_for(2, ep);
    let h = TestHandlers::echo();
    let s = db.server_running(&h).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let realm = format!("Bearer realm=\"{}\"", gateway::generated::PROJECT_NAME);
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing_key"),
        (Some("Basic abc".into()), "invalid_key"),
        (Some(format!("Bearer {}", &k.key[..k.key.len() - 1])), "invalid_key"),
        // Well-formed, never minted.
        (Some(format!("Bearer {}{}", GATEWAY.key_prefix, "0".repeat(64))), "invalid_key"),
    ];
    for tool in [ep.name(), "balance"] {
        for (auth, code) in &cases {
            let mut req = s
                .client
                .post(s.url("/mcp"))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .body(tools_call(1, tool, if tool == "balance" { json!({}) } else { sample(ep) }).to_string());
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.headers().get("www-authenticate").unwrap().to_str().unwrap(), realm);
            assert_eq!(res.headers().get("access-control-allow-origin").unwrap(), "*");
            expect_error(res, 401, code, false).await;
        }
    }
    // A key in _meta or in the arguments is never read.
    let mut args = sample(ep);
    args["authorization"] = json!(format!("Bearer {}", k.key));
    let body = json!({ "jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": { "name": ep.name(), "arguments": args, "_meta": { "authorization": format!("Bearer {}", k.key), "io.mcpay/key": k.key } } });
    expect_error(post(&s, None, &body).await, 401, "missing_key", false).await;
    // Discovery and pricing need no key; a bad key on them is not read.
    for (auth, method, p) in [
        (None, "initialize", json!({ "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": { "name": "t", "version": "0" } })),
        (Some("not-a-key"), "tools/list", json!({})),
        (None, "ping", json!({})),
        (Some("not-a-key"), "tools/call", json!({ "name": "pricing", "arguments": {} })),
    ] {
        let res = post(&s, auth, &json!({ "jsonrpc": "2.0", "id": 9, "method": method, "params": p })).await;
        assert_eq!(res.status(), 200, "{method}");
        assert!(res.headers().get("x-request-id").is_some());
        let body: Value = res.json().await.unwrap();
        assert!(body.get("result").is_some(), "{method}: {body}");
    }
    assert_eq!(ledger_holds(&s.ledger(&k.key).await), 0);
    assert_eq!(s.balance(&k.key).await, start);
    assert_eq!(h.run_count(), 0);
}

async fn idempotent_retry_is_held_once(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(3, ep);
    let h = TestHandlers::echo();
    let s = db.server_running(&h).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let c = client(&s, Some(&k.key)).await;
    let idem = "mcp-idem-0123456789abcdef0123456789abcdef";
    let with_key = |args: Value| params(json!({ "name": ep.name(), "arguments": args, "_meta": { "io.mcpay/idempotency_key": idem } }));
    let first = c.call_tool(with_key(sample(ep))).await.unwrap();
    assert_eq!(first.is_error, None);
    let again = c.call_tool(with_key(sample(ep))).await.unwrap();
    assert_eq!(again.structured_content, first.structured_content);
    assert_eq!(value_of(&again.content), value_of(&first.content));
    let m1 = value_of(first.meta.as_ref().unwrap());
    let m2 = value_of(again.meta.as_ref().unwrap());
    assert_eq!(m2["io.mcpay/idempotent_replayed"], true);
    assert!(m1.get("io.mcpay/idempotent_replayed").is_none());
    assert_eq!(m2["io.mcpay/request_id"], m1["io.mcpay/request_id"]);
    assert_eq!(m2["io.mcpay/charged_mcents"], price);
    // Other arguments with the same key: a mismatch, no charge.
    let mut other = sample(ep);
    if let Some(obj) = other.as_object_mut()
        && let Some((_, v)) = obj.iter_mut().find(|(_, v)| v.is_string())
    {
        *v = json!("something else");
    }
    if other != sample(ep) {
        let e = rpc_error(c.call_tool(with_key(other)).await);
        assert_eq!(e.code.0, -32005);
        assert_eq!(e.data.unwrap()["code"], "idempotency_mismatch");
    }
    let ledger = s.ledger(&k.key).await;
    assert_eq!(ledger_holds(&ledger), 1);
    assert_eq!(count_kind(&ledger, "capture"), 1);
    assert_eq!(s.balance(&k.key).await, start - price);
    assert_eq!(h.run_count(), 1);
    // The same Idempotency-Key on POST /v1/<endpoint> is another "body": a mismatch, not a replay.
    let res = s.call_with(ep.name(), Some(&k.key), &sample(ep), &[("idempotency-key", idem)]).await;
    expect_error(res, 422, "idempotency_mismatch", true).await;
    c.cancel().await.unwrap();
}

async fn batches_are_refused_before_anything_runs(db: &TestDb) {
    let ep = ep();
    let start = balance_for(3, ep);
    let h = TestHandlers::echo();
    let s = db.server_running(&h).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let batch = json!([tools_call(1, ep.name(), sample(ep)), tools_call(2, ep.name(), sample(ep))]);
    let res = post(&s, Some(&k.key), &batch).await;
    assert_eq!(res.status(), 415);
    assert!(res.headers().get("x-request-id").is_some());
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], -32600, "{body}");
    assert!(s.ledger(&k.key).await.iter().all(|e| e["kind"] == "mint"));
    assert_eq!(s.balance(&k.key).await, start);
    assert_eq!(h.run_count(), 0);
}

async fn http_rules_of_the_endpoint(db: &TestDb) {
    let s = db.server().await;
    for method in [reqwest::Method::GET, reqwest::Method::DELETE, reqwest::Method::PUT] {
        let res = s.client.request(method.clone(), s.url("/mcp")).send().await.unwrap();
        assert_eq!(res.headers().get("allow").unwrap(), "POST", "{method}");
        assert_eq!(res.headers().get("access-control-allow-origin").unwrap(), "*");
        expect_error(res, 405, "method_not_allowed", false).await;
    }
    let res = s.client.request(reqwest::Method::OPTIONS, s.url("/mcp")).send().await.unwrap();
    assert_eq!(res.status(), 204);
    let h = res.headers();
    assert_eq!(h.get("access-control-allow-methods").unwrap(), "POST, OPTIONS");
    assert!(h.get("access-control-allow-headers").unwrap().to_str().unwrap().ends_with("Mcp-Protocol-Version, Mcp-Session-Id, Last-Event-ID"));
    assert!(h.get("access-control-expose-headers").unwrap().to_str().unwrap().ends_with(", Mcp-Session-Id"));
    assert!(h.get("x-request-id").is_some());
    // The body bound.
    let big = json!({ "jsonrpc": "2.0", "id": 1, "method": "ping", "params": { "pad": "x".repeat(GATEWAY.max_body_bytes as usize) } });
    let body = expect_error(post(&s, None, &big).await, 413, "body_too_large", false).await;
    assert_eq!(body["max_body_bytes"], GATEWAY.max_body_bytes);
    // Not JSON: -32700.
    let res = s.client.post(s.url("/mcp")).header("content-type", "application/json").body("{nope").send().await.unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], -32700);
    // JSON that is not a JSON-RPC message: 400 -32600 (rmcp's own answer would be 415).
    for bad in [json!({}), json!({ "jsonrpc": "2.0", "id": null, "method": "ping" }), json!({ "jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": { "_meta": "x" } })] {
        let res = post(&s, None, &bad).await;
        assert_eq!(res.status(), 400, "{bad}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], -32600, "{bad}");
    }
    // A notification: 202, no body. No session id, ever.
    let res = post(&s, None, &json!({ "jsonrpc": "2.0", "method": "notifications/initialized" })).await;
    assert_eq!(res.status(), 202);
    assert!(res.headers().get("mcp-session-id").is_none());
    assert!(res.headers().get("x-request-id").is_some());
    // Without an Accept header (curl): still JSON.
    let res = s
        .client
        .post(s.url("/mcp"))
        .header("content-type", "application/json")
        .body(json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/list" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers().get("content-type").unwrap(), "application/json; charset=utf-8");
    assert!(res.headers().get("mcp-session-id").is_none());
    assert_eq!(res.headers().get("cache-control").unwrap(), "no-store");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["result"]["tools"].as_array().unwrap().len(), Endpoint::ALL.len() + 2);
}

async fn any_host_unless_mcp_allowed_hosts_is_set(db: &TestDb) {
    let list = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list" });
    let send = |s: &TestServer, host: &'static str| {
        s.client
            .post(s.url("/mcp"))
            .header("host", host)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(list.to_string())
            .send()
    };
    // Default: a deployment's public name is accepted (rmcp alone accepts loopback only).
    let s = db.server().await;
    assert_eq!(send(&s, "api.example.com").await.unwrap().status(), 200);
    // MCP_ALLOWED_HOSTS pins the names.
    let state = gateway::AppState::new(db.new_store().await, db.new_limiter().await, None, Arc::new(gateway::GeneratedHandlers));
    state.set_mcp_allowed_hosts(vec!["api.example.com".to_string()]);
    let pinned = TestServer::start(state).await;
    assert_eq!(send(&pinned, "api.example.com").await.unwrap().status(), 200);
    let res = send(&pinned, "evil.example").await.unwrap();
    assert_eq!(res.status(), 403);
    assert!(res.headers().get("x-request-id").is_some());
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["jsonrpc"], "2.0");
    assert!(body["error"]["code"].is_i64(), "{body}");
}
