//! `/mcp/<name>` (contract 3.12) against real upstream MCP servers started by the test: a
//! Streamable HTTP server built with the official SDK (rmcp) on axum, in-process on a free port,
//! once with sessions and SSE answers and once stateless with JSON answers; and the same rmcp
//! server behind a legacy HTTP+SSE front (`transport = "sse"`). Every case counts the money
//! (ledger rows, balances) and what reached the upstream (its own call counts).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use common::*;
use gateway::AppState;
use gateway::generated::{UpstreamConfig, UpstreamTransport};
use gateway::proxy::Upstreams;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ErrorData, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RoleClient, RunningService};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler, ServiceExt};
use serde_json::{Value, json};

backend_tests!(
    priced_free_and_default_prices_are_charged_exactly,
    tools_list_carries_the_terms,
    upstream_failures_are_released_uncapped,
    tool_errors_are_charged_unless_refunded,
    progress_events_arrive_before_the_upstream_finishes,
    caller_key_never_reaches_the_upstream,
    refusals_happen_before_forwarding,
    pricing_lists_the_upstreams,
    a_caller_that_goes_away_is_still_settled,
    a_stdio_upstream_is_metered_and_restarted,
    paid_calls_are_forwarded_under_the_gateways_id,
    look_alike_keys_are_refused_before_forwarding,
    resumption_and_caller_headers_are_not_forwarded,
    redirects_are_not_followed,
    only_the_response_to_the_gateways_id_settles,
    a_legacy_sse_upstream_is_metered_through_a_session_per_call,
    legacy_sse_failures_are_released,
    legacy_sse_progress_is_relayed_before_the_answer,
);

// ------------------------------------------------------------------------- the upstream server

const MODE_OK: u8 = 0;
const MODE_500: u8 = 1;
const MODE_RESET: u8 = 2;

/// A real MCP server (rmcp) with the tools of the contract's test upstream, and its counters.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<Mutex<HashMap<String, usize>>>,
    mode: Arc<AtomicU8>,
}

impl Upstream {
    fn calls(&self, tool: &str) -> usize {
        self.calls.lock().unwrap().get(tool).copied().unwrap_or(0)
    }

    fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }

    fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

fn tool(name: &str, meta: Option<Value>) -> Tool {
    let mut t = json!({ "name": name, "description": format!("test tool {name}"), "inputSchema": { "type": "object" } });
    if let Some(meta) = meta {
        t["_meta"] = meta;
    }
    serde_json::from_value(t).unwrap()
}

fn text_result(text: String, is_error: bool) -> Result<CallToolResponse, ErrorData> {
    let mut r = json!({ "content": [{ "type": "text", "text": text }] });
    if is_error {
        r["isError"] = json!(true);
    }
    Ok(serde_json::from_value::<CallToolResult>(r).unwrap().into())
}

impl ServerHandler for Upstream {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(&self, _: Option<PaginatedRequestParams>, _: RequestContext<RoleServer>) -> Result<ListToolsResult, ErrorData> {
        let mut tools = vec![tool("forecast", Some(json!({ "x.upstream/own": "kept" })))];
        tools.extend(["alerts", "echo", "fail", "tool_error", "slow", "progress", "whoami"].map(|n| tool(n, None)));
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(&self, params: CallToolRequestParams, cx: RequestContext<RoleServer>) -> Result<CallToolResponse, ErrorData> {
        let name = params.name.to_string();
        *self.calls.lock().unwrap().entry(name.clone()).or_default() += 1;
        let args = Value::Object(params.arguments.clone().unwrap_or_default());
        match name.as_str() {
            "forecast" => text_result("sunny".into(), false),
            "alerts" => text_result("no alerts".into(), false),
            "echo" => text_result(args.to_string(), false),
            "fail" => Err(ErrorData::internal_error("the upstream failed on purpose", None)),
            "tool_error" => text_result("the tool could not do it".into(), true),
            "slow" => {
                let ms = args["ms"].as_u64().unwrap_or(2000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text_result(format!("slept {ms} ms"), false)
            }
            "progress" => {
                let n = args["n"].as_u64().unwrap_or(3);
                if let Some(token) = cx.meta.get_progress_token() {
                    for i in 0..n {
                        let p = ProgressNotificationParam::new(token.clone(), i as f64).with_total(n as f64);
                        cx.peer.notify_progress(p).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                text_result("done".into(), false)
            }
            "whoami" => {
                let parts = cx.extensions.get::<axum::http::request::Parts>().unwrap();
                let header = |n: &str| parts.headers.get(n).map(|v| v.to_str().unwrap().to_string());
                let seen = json!({
                    "authorization": header("authorization"),
                    "x-upstream-token": header("x-upstream-token"),
                    "cookie": header("cookie"),
                    "last-event-id": header("last-event-id"),
                    "content-type": header("content-type"),
                });
                text_result(seen.to_string(), false)
            }
            // The JSON-RPC id the upstream received, and the params it parsed.
            "rpcid" => text_result(json!({ "id": cx.id, "params": params }).to_string(), false),
            _ => Err(ErrorData::invalid_params("unknown tool", None)),
        }
    }
}

/// Starts the upstream on 127.0.0.1:0: `sse` = sessions and event-stream answers (rmcp's
/// default), else stateless with JSON answers. Returns its /mcp URL.
async fn start_upstream(up: &Upstream, sse: bool) -> String {
    let handler = up.clone();
    let config = if sse {
        StreamableHttpServerConfig::default().with_sse_keep_alive(None)
    } else {
        StreamableHttpServerConfig::default().with_legacy_session_mode(false).with_json_response(true).with_sse_keep_alive(None)
    };
    let router = if sse {
        let service = StreamableHttpService::new(move || Ok(handler.clone()), Arc::new(LocalSessionManager::default()), config);
        axum::Router::new().nest_service("/mcp", service)
    } else {
        let service = StreamableHttpService::new(move || Ok(handler.clone()), Arc::new(NeverSessionManager::default()), config);
        axum::Router::new().nest_service("/mcp", service)
    };
    let mode = up.mode.clone();
    // The failure switch: 500, or an answer whose connection breaks after its headers.
    let router = router.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
        let mode = mode.load(Ordering::SeqCst);
        async move {
            match mode {
                MODE_500 => axum::response::Response::builder().status(500).body(Body::from("upstream broke")).unwrap(),
                MODE_RESET => {
                    let broken = futures_util::stream::once(async { Err::<Bytes, std::io::Error>(std::io::Error::other("reset")) });
                    axum::response::Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(Body::from_stream(broken))
                        .unwrap()
                }
                _ => next.run(req).await,
            }
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/mcp")
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The upstream table of these tests: `weather` at `url`, forecast 250, alerts free, others 100.
fn weather(name: &str, url: &str) -> UpstreamConfig {
    UpstreamConfig {
        name: leak(name.to_string()),
        transport: UpstreamTransport::Url(leak(url.to_string())),
        url_env: leak(format!("UPSTREAM_{}_URL", name.to_uppercase())),
        price_mcents: 100,
        tools: &[("forecast", 250), ("alerts", 0)],
        scope: "weather",
        timeout_ms: 1_000,
        rate_limit_per_minute: 1_000,
        headers: &[("X-Upstream-Token", "WEATHER_TOKEN")],
        enabled: true,
        refund_tool_errors: false,
        description: "Test weather",
    }
}

const TOKEN: &str = "upstream-secret-token";

async fn gateway(db: &TestDb, upstreams: Vec<UpstreamConfig>) -> TestServer {
    let state = AppState::new(db.new_store().await, db.new_limiter().await, Some(ADMIN_KEY.to_string()), Arc::new(gateway::GeneratedHandlers));
    state.set_upstreams(Upstreams::new(upstreams).with_vars([("WEATHER_TOKEN", TOKEN)]));
    TestServer::start(state).await
}

type Client = RunningService<RoleClient, ()>;

async fn client(s: &TestServer, path: &str, key: &str) -> Client {
    let config = StreamableHttpClientTransportConfig::with_uri(s.url(path)).auth_header(key);
    ().serve(StreamableHttpClientTransport::from_config(config)).await.expect("MCP client connects through the gateway")
}

async fn call(c: &Client, tool: &str, arguments: Value) -> CallToolResult {
    let params: CallToolRequestParams = serde_json::from_value(json!({ "name": tool, "arguments": arguments })).unwrap();
    c.call_tool(params).await.expect("a result")
}

fn meta(r: &CallToolResult) -> Value {
    serde_json::to_value(&r.meta).unwrap()
}

/// One raw JSON-RPC POST (what a client without the SDK sends).
async fn post(s: &TestServer, path: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = s
        .client
        .post(s.url(path))
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

/// The ledger rows of one `<NAME>/<tool>` endpoint, oldest first, as kinds.
fn rows_of(ledger: &[Value], endpoint: &str) -> Vec<String> {
    let mut rows: Vec<String> =
        ledger.iter().filter(|e| e["endpoint"] == endpoint).map(|e| e["kind"].as_str().unwrap().to_string()).collect();
    rows.reverse();
    rows
}

/// The SSE data messages of a body, parsed.
fn sse_messages(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
            if data.is_empty() { None } else { serde_json::from_str(&data.join("\n")).ok() }
        })
        .collect()
}

/// The JSON-RPC response of an answer, JSON or SSE.
async fn response_of(res: reqwest::Response) -> Value {
    let sse = res.headers().get("content-type").is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
    let text = res.text().await.unwrap();
    if sse {
        sse_messages(&text).into_iter().find(|m| m.get("id").is_some() && m.get("method").is_none()).expect("a response event")
    } else {
        serde_json::from_str(&text).unwrap()
    }
}

// ------------------------------------------------------------------------------------- cases

async fn priced_free_and_default_prices_are_charged_exactly(db: &TestDb) {
    let up = Upstream::default();
    let url = start_upstream(&up, true).await;
    let s = gateway(db, vec![weather("weather", &url)]).await;
    let k = db.seed_key(10_000, &["weather"], None).await;
    let c = client(&s, "/mcp/weather", &k.key).await;

    // forecast: its own price.
    let r = call(&c, "forecast", json!({})).await;
    assert_ne!(r.is_error, Some(true));
    let m = meta(&r);
    assert_eq!(m["io.mcpay/charged_mcents"], 250, "{m}");
    assert_eq!(m["io.mcpay/balance_mcents"], 9_750, "{m}");
    assert!(m.get("io.mcpay/refunded").is_none(), "{m}");
    assert_eq!(s.balance(&k.key).await, 9_750);
    // alerts: free, no ledger row.
    let r = call(&c, "alerts", json!({})).await;
    assert!(meta(&r).get("io.mcpay/charged_mcents").is_none());
    // echo: not listed, the default price.
    let r = call(&c, "echo", json!({ "say": "hi" })).await;
    assert_eq!(meta(&r)["io.mcpay/charged_mcents"], 100);
    assert_eq!(s.balance(&k.key).await, 9_650);

    let ledger = s.ledger(&k.key).await;
    assert_eq!(rows_of(&ledger, "weather/forecast"), ["hold", "capture"]);
    assert_eq!(rows_of(&ledger, "weather/echo"), ["hold", "capture"]);
    assert!(rows_of(&ledger, "weather/alerts").is_empty());
    assert_eq!(ledger.len(), 5, "mint + 2 × (hold, capture): {ledger:?}");
    assert_eq!(amount_sum(&ledger), 9_650);
    assert_eq!((up.calls("forecast"), up.calls("alerts"), up.calls("echo")), (1, 1, 1));
    // The call id of the ledger is the one in _meta.
    let hold = ledger.iter().find(|e| e["endpoint"] == "weather/echo" && e["kind"] == "hold").unwrap();
    assert_eq!(hold["request_id"], meta(&r)["io.mcpay/request_id"]);

    // The JSON face (stateless upstream): final terms in the headers, read after the capture.
    let up2 = Upstream::default();
    let url2 = start_upstream(&up2, false).await;
    let s2 = gateway(db, vec![weather("weather", &url2)]).await;
    let res = post(&s2, "/mcp/weather", Some(&k.key), &tools_call(1, "forecast", json!({}))).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    assert_eq!(res.headers()["x-charged-mcents"], "250");
    assert_eq!(res.headers()["x-balance-mcents"], "9400");
    assert!(res.headers().contains_key("x-upstream-duration-ms"));
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["id"], 1);
    assert_eq!(body["result"]["_meta"]["io.mcpay/request_id"], rid);
    assert_eq!(db.hold_state(&rid).await.as_deref(), Some("captured"));
    assert_eq!(s2.balance(&k.key).await, 9_400);
}

async fn tools_list_carries_the_terms(db: &TestDb) {
    let up = Upstream::default();
    let url = start_upstream(&up, true).await;
    let s = gateway(db, vec![weather("weather", &url)]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;
    let c = client(&s, "/mcp/weather", &k.key).await;
    let tools = c.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), 8);
    for t in &tools {
        let m = serde_json::to_value(t.meta.as_ref().unwrap()).unwrap();
        let price = match t.name.as_ref() {
            "forecast" => 250,
            "alerts" => 0,
            _ => 100,
        };
        assert_eq!(m["io.mcpay/price_mcents"], price, "{}", t.name);
        assert_eq!(m["io.mcpay/scope"], "weather");
        if t.name == "forecast" {
            assert_eq!(m["x.upstream/own"], "kept");
        }
    }
    // Discovery is free.
    assert_eq!(s.balance(&k.key).await, 1_000);
    assert_eq!(s.ledger(&k.key).await.len(), 1);
}

async fn upstream_failures_are_released_uncapped(db: &TestDb) {
    let up = Upstream::default();
    let url = start_upstream(&up, false).await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/mcp", l.local_addr().unwrap())
    };
    let s = gateway(db, vec![weather("weather", &url), weather("gone", &closed)]).await;
    let k = db.seed_key(10_000, &["weather"], None).await;
    let id = |n| n;
    // JSON-RPC error → the upstream's answer, released.
    let res = post(&s, "/mcp/weather", Some(&k.key), &tools_call(id(1), "fail", json!({}))).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-charged-mcents"], "0");
    let body: Value = res.json().await.unwrap();
    assert!(body["error"].is_object(), "{body}");
    // Slow past the timeout (1 s) → 504, released.
    let started = Instant::now();
    let res = post(&s, "/mcp/weather", Some(&k.key), &tools_call(2, "slow", json!({ "ms": 3000 }))).await;
    assert!(started.elapsed() < Duration::from_millis(2_500));
    let body = expect_error(res, 504, "upstream_timeout", false).await;
    assert_eq!((body["refunded"].clone(), body["charged_mcents"].clone(), body["balance_mcents"].clone()), (json!(true), json!(0), json!(10_000)));
    // 500 → 502, released.
    up.set_mode(MODE_500);
    let body = expect_error(post(&s, "/mcp/weather", Some(&k.key), &tools_call(3, "forecast", json!({}))).await, 502, "upstream_failed", false).await;
    assert_eq!(body["refunded"], true);
    // A connection broken mid-answer → 502, released.
    up.set_mode(MODE_RESET);
    let body = expect_error(post(&s, "/mcp/weather", Some(&k.key), &tools_call(4, "forecast", json!({}))).await, 502, "upstream_failed", false).await;
    assert_eq!(body["refunded"], true);
    up.set_mode(MODE_OK);
    // Connection refused → 502, released.
    let k2 = db.seed_key(10_000, &["weather"], None).await;
    for i in 0..3 {
        expect_error(post(&s, "/mcp/gone", Some(&k2.key), &tools_call(10 + i, "forecast", json!({}))).await, 502, "upstream_failed", false).await;
    }
    // Six releases for k, more than refunds_per_key_per_hour (5): never capped.
    for i in 0..3 {
        post(&s, "/mcp/weather", Some(&k.key), &tools_call(20 + i, "fail", json!({}))).await;
    }
    assert_eq!(s.balance(&k.key).await, 10_000);
    assert_eq!(s.balance(&k2.key).await, 10_000);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(count_kind(&ledger, "hold"), 7);
    assert_eq!(count_kind(&ledger, "release"), 7);
    assert_eq!(count_kind(&ledger, "capture"), 0);
    assert_eq!(amount_sum(&ledger), 10_000);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM holds WHERE reason = 'upstream'").await, 10);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM holds WHERE state = 'held'").await, 0);
    let me = s.me(&k.key).await;
    assert_eq!(me["refunded_mcents"], 5 * 100 + 2 * 250);
}

async fn tool_errors_are_charged_unless_refunded(db: &TestDb) {
    let up = Upstream::default();
    let url = start_upstream(&up, true).await;
    let mut refunding = weather("refunding", &url);
    refunding.refund_tool_errors = true;
    let s = gateway(db, vec![weather("weather", &url), refunding]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;
    let c = client(&s, "/mcp/weather", &k.key).await;
    let r = call(&c, "tool_error", json!({})).await;
    assert_eq!(r.is_error, Some(true));
    assert_eq!(meta(&r)["io.mcpay/charged_mcents"], 100);
    assert_eq!(s.balance(&k.key).await, 900);
    let c2 = client(&s, "/mcp/refunding", &k.key).await;
    let r = call(&c2, "tool_error", json!({})).await;
    assert_eq!(r.is_error, Some(true));
    let m = meta(&r);
    assert_eq!((m["io.mcpay/charged_mcents"].clone(), m["io.mcpay/refunded"].clone()), (json!(0), json!(true)), "{m}");
    assert_eq!(s.balance(&k.key).await, 900);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(rows_of(&ledger, "weather/tool_error"), ["hold", "capture"]);
    assert_eq!(rows_of(&ledger, "refunding/tool_error"), ["hold", "release"]);
    assert_eq!(amount_sum(&ledger), 900);
}

fn progress_body() -> Value {
    json!({ "jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": { "name": "progress", "arguments": { "n": 4 }, "_meta": { "progressToken": "p-1" } } })
}

/// A paid `progress` call (4 notifications 200 ms apart, progressToken "p-1") at /mcp/weather:
/// an event stream whose headers carry the hold's terms (100 of 1000). Returns its text and when
/// the first progress and the response reached the caller.
async fn progress_call(s: &TestServer, key: &str) -> (String, Duration, Duration) {
    let body = progress_body();
    let started = Instant::now();
    let mut res = post(s, "/mcp/weather", Some(key), &body).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    assert_eq!(res.headers()["x-charged-mcents"], "100");
    assert_eq!(res.headers()["x-balance-mcents"], "900");
    let mut text = String::new();
    let mut first_progress = None;
    let mut response_at = None;
    while let Some(chunk) = res.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        if first_progress.is_none() && text.contains("notifications/progress") {
            first_progress = Some(started.elapsed());
        }
        if response_at.is_none() && text.contains("\"result\"") {
            response_at = Some(started.elapsed());
        }
    }
    (text, first_progress.expect("progress events"), response_at.expect("the response"))
}

async fn progress_events_arrive_before_the_upstream_finishes(db: &TestDb) {
    let up = Upstream::default();
    let url = start_upstream(&up, false).await;
    let mut u = weather("weather", &url);
    u.timeout_ms = 5_000;
    let s = gateway(db, vec![u]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;
    let (text, first, last) = progress_call(&s, &k.key).await;
    // 4 notifications 200 ms apart: the first reached the caller well before the answer.
    assert!(last >= first + Duration::from_millis(500), "first progress {first:?}, response {last:?}");
    let messages = sse_messages(&text);
    assert_eq!(messages.iter().filter(|m| m["method"] == "notifications/progress").count(), 4);
    let response = messages.iter().find(|m| m["id"] == 9).unwrap();
    assert_eq!(response["result"]["_meta"]["io.mcpay/charged_mcents"], 100);
    assert_eq!(s.balance(&k.key).await, 900);
    assert_eq!(rows_of(&s.ledger(&k.key).await, "weather/progress"), ["hold", "capture"]);
}

async fn caller_key_never_reaches_the_upstream(db: &TestDb) {
    let up = Upstream::default();
    let url = start_upstream(&up, false).await;
    let s = gateway(db, vec![weather("weather", &url)]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;
    let res = s
        .client
        .post(s.url("/mcp/weather"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", k.key))
        .header("cookie", "session=caller-cookie")
        .body(tools_call(1, "whoami", json!({})).to_string())
        .send()
        .await
        .unwrap();
    let body = response_of(res).await;
    let seen: Value = serde_json::from_str(body["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(seen["authorization"], Value::Null, "{seen}");
    assert_eq!(seen["cookie"], Value::Null, "{seen}");
    assert_eq!(seen["x-upstream-token"], TOKEN);
    assert!(!seen.to_string().contains(&k.key));
}

async fn refusals_happen_before_forwarding(db: &TestDb) {
    let up = Upstream::default();
    let url = start_upstream(&up, false).await;
    let mut paused = weather("paused", &url);
    paused.enabled = false;
    let mut no_secret = weather("nosecret", &url);
    no_secret.headers = &[("X-Upstream-Token", "MISSING_TOKEN")];
    let s = gateway(db, vec![weather("weather", &url), paused, no_secret]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;
    let other = db.seed_key(1_000, &["other"], None).await;
    let poor = db.seed_key(50, &["weather"], None).await;
    let forecast = tools_call(1, "forecast", json!({}));
    expect_error(post(&s, "/mcp/weather", None, &forecast).await, 401, "missing_key", false).await;
    let unknown = format!("{}{}", key_prefix(), "0".repeat(64));
    expect_error(post(&s, "/mcp/weather", Some(&unknown), &forecast).await, 401, "invalid_key", false).await;
    let body = expect_error(post(&s, "/mcp/weather", Some(&other.key), &forecast).await, 403, "scope_denied", false).await;
    assert_eq!(body["required_scope"], "weather");
    expect_error(post(&s, "/mcp/nowhere", Some(&k.key), &forecast).await, 404, "not_found", false).await;
    expect_error(post(&s, "/mcp/paused", Some(&k.key), &forecast).await, 503, "upstream_disabled", false).await;
    expect_error(post(&s, "/mcp/nosecret", Some(&k.key), &forecast).await, 503, "upstream_unavailable", false).await;
    // A batch: 400 -32600, nothing forwarded.
    let res = post(&s, "/mcp/weather", Some(&k.key), &json!([forecast, tools_call(2, "echo", json!({}))])).await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], -32600);
    // Not JSON: -32700.
    let res = s.client.post(s.url("/mcp/weather")).header("authorization", format!("Bearer {}", k.key)).body("{").send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], -32700);
    // Balance too low: a JSON-RPC error in a 200, nothing forwarded.
    let res = post(&s, "/mcp/weather", Some(&poor.key), &forecast).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["id"], 1);
    assert_eq!(body["error"]["code"], -32002);
    assert_eq!(body["error"]["data"]["code"], "insufficient_balance");
    // Other methods, and OPTIONS.
    let res = s.client.put(s.url("/mcp/weather")).send().await.unwrap();
    assert_eq!(res.status(), 405);
    let res = s.client.request(reqwest::Method::OPTIONS, s.url("/mcp/weather")).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(res.headers()["access-control-allow-methods"], "GET, POST, DELETE, OPTIONS");
    assert_eq!(up.total_calls(), 0, "nothing reached the upstream");
    for key in [&k, &other] {
        assert_eq!(s.balance(&key.key).await, 1_000);
        assert_eq!(s.ledger(&key.key).await.len(), 1);
    }
    assert_eq!(s.balance(&poor.key).await, 50);
}

async fn pricing_lists_the_upstreams(db: &TestDb) {
    let s = gateway(db, vec![weather("weather", "http://127.0.0.1:9/mcp")]).await;
    let body: Value = s.get("/v1/pricing").await.json().await.unwrap();
    assert_eq!(
        body["upstreams"],
        json!([{ "name": "weather", "path": "/mcp/weather", "price_mcents": 100, "scope": "weather", "description": "Test weather",
            "rate_limit_per_minute": 1000, "enabled": true, "refund_tool_errors": false, "transport": "http",
            "tools": { "forecast": 250, "alerts": 0 } }])
    );
    // Without upstreams: mcpay.toml's (none in a new project).
    let plain: Value = db.server().await.get("/v1/pricing").await.json().await.unwrap();
    assert_eq!(plain["upstreams"].as_array().unwrap().len(), gateway::generated::UPSTREAMS.len());
}

async fn a_caller_that_goes_away_is_still_settled(db: &TestDb) {
    let up = Upstream::default();
    let url = start_upstream(&up, false).await;
    let mut u = weather("weather", &url);
    u.timeout_ms = 5_000;
    let s = gateway(db, vec![u, weather("short", &url)]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(150)).build().unwrap();
    for (path, ms) in [("/mcp/weather", 600), ("/mcp/short", 3_000)] {
        let r = impatient
            .post(s.url(path))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", k.key))
            .body(tools_call(1, "slow", json!({ "ms": ms })).to_string())
            .send()
            .await;
        assert!(r.is_err(), "the caller gave up");
    }
    // The answers are still read and settled: the first captured, the second (past its 1 s
    // timeout) released.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ledger = s.ledger(&k.key).await;
        let done = rows_of(&ledger, "weather/slow").len() == 2 && rows_of(&ledger, "short/slow").len() == 2;
        if done || Instant::now() > deadline {
            assert_eq!(rows_of(&ledger, "weather/slow"), ["hold", "capture"]);
            assert_eq!(rows_of(&ledger, "short/slow"), ["hold", "release"]);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.balance(&k.key).await, 900);
    assert_eq!(up.calls("slow"), 2);
}

/// The stdio MCP server of examples/stdio_upstream.rs, built by `cargo test` beside this test.
fn stdio_upstream_path() -> String {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(format!("stdio_upstream{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "{} is built by `cargo test` (examples/stdio_upstream.rs)", path.display());
    path.to_string_lossy().into_owned()
}

fn local(name: &str) -> UpstreamConfig {
    let argv: &'static [&'static str] = Box::leak(vec![leak(stdio_upstream_path())].into_boxed_slice());
    UpstreamConfig {
        transport: UpstreamTransport::Command(argv),
        url_env: leak(format!("UPSTREAM_{}_URL", name.to_uppercase())),
        headers: &[],
        ..weather(name, "")
    }
}

async fn a_stdio_upstream_is_metered_and_restarted(db: &TestDb) {
    let s = gateway(db, vec![local("local")]).await;
    let k = db.seed_key(10_000, &["weather"], None).await;
    let c = client(&s, "/mcp/local", &k.key).await;
    let tools = c.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), 8);
    for t in &tools {
        let m = serde_json::to_value(t.meta.as_ref().unwrap()).unwrap();
        assert_eq!(m["io.mcpay/price_mcents"], if t.name == "forecast" { 250 } else { 100 }, "{}", t.name);
        assert_eq!(m["io.mcpay/scope"], "weather");
    }
    let r = call(&c, "forecast", json!({})).await;
    assert_eq!(meta(&r)["io.mcpay/charged_mcents"], 250);
    let r = call(&c, "echo", json!({ "a": 1 })).await;
    assert_eq!(meta(&r)["io.mcpay/charged_mcents"], 100);
    let pid_of = |r: &CallToolResult| serde_json::to_value(&r.content).unwrap()[0]["text"].as_str().unwrap().to_string();
    let first_pid = pid_of(&call(&c, "pid", json!({})).await);
    // The process dies mid-call: released, and the next call runs on a restarted process.
    let r = call(&c, "crash", json!({})).await;
    assert_eq!(r.is_error, Some(true));
    let m = meta(&r);
    assert_eq!((m["io.mcpay/refunded"].clone(), m["io.mcpay/charged_mcents"].clone()), (json!(true), json!(0)), "{m}");
    let second_pid = pid_of(&call(&c, "pid", json!({})).await);
    assert_ne!(first_pid, second_pid, "restarted");
    // Past the timeout (1 s): released.
    let started = Instant::now();
    let r = call(&c, "slow", json!({ "ms": 3000 })).await;
    assert!(started.elapsed() < Duration::from_millis(2_500));
    assert_eq!(r.is_error, Some(true));
    assert_eq!(meta(&r)["io.mcpay/refunded"], true);
    // A JSON-RPC error: released, passed on.
    let params: CallToolRequestParams = serde_json::from_value(json!({ "name": "fail", "arguments": {} })).unwrap();
    assert!(c.call_tool(params).await.is_err());
    // Progress notifications reach the caller (its own token), then the charged result.
    let body = json!({ "jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": { "name": "progress", "arguments": { "n": 3 }, "_meta": { "progressToken": "mine" } } });
    let res = post(&s, "/mcp/local", Some(&k.key), &body).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let messages = sse_messages(&text);
    let progress: Vec<&Value> = messages.iter().filter(|m| m["method"] == "notifications/progress").collect();
    assert_eq!(progress.len(), 3, "{text}");
    assert!(progress.iter().all(|p| p["params"]["progressToken"] == "mine"));
    let response = messages.iter().find(|m| m["id"] == 4).unwrap();
    assert_eq!(response["result"]["_meta"]["io.mcpay/charged_mcents"], 100);

    assert_eq!(s.balance(&k.key).await, 10_000 - 250 - 100 - 100 - 100 - 100);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(rows_of(&ledger, "local/crash"), ["hold", "release"]);
    assert_eq!(rows_of(&ledger, "local/slow"), ["hold", "release"]);
    assert_eq!(rows_of(&ledger, "local/fail"), ["hold", "release"]);
    assert_eq!(rows_of(&ledger, "local/pid"), ["hold", "capture", "hold", "capture"]);
    assert_eq!(amount_sum(&ledger), 9_350);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM holds WHERE state = 'held'").await, 0);
}

/// A paid call reaches the upstream re-serialized under `mcpay-<request id>`; the caller gets its
/// own id back. An id that is not a string or an integer (`1.0`, null, none) is refused unforwarded.
async fn paid_calls_are_forwarded_under_the_gateways_id(db: &TestDb) {
    for sse in [false, true] {
        let up = Upstream::default();
        let url = start_upstream(&up, sse).await;
        let s = gateway(db, vec![weather("weather", &url)]).await;
        let k = db.seed_key(1_000, &["weather"], None).await;
        if sse {
            // A session first (the upstream keeps sessions): initialize through the gateway.
            let c = client(&s, "/mcp/weather", &k.key).await;
            let r = call(&c, "rpcid", json!({})).await;
            let seen: Value = serde_json::from_str(serde_json::to_value(&r.content).unwrap()[0]["text"].as_str().unwrap()).unwrap();
            assert_eq!(seen["id"], format!("mcpay-{}", meta(&r)["io.mcpay/request_id"].as_str().unwrap()));
            assert_eq!(meta(&r)["io.mcpay/charged_mcents"], 100);
        } else {
            for caller_id in [json!("abc"), json!(7)] {
                let body = json!({ "jsonrpc": "2.0", "id": caller_id, "method": "tools/call",
                    "params": { "name": "rpcid", "arguments": { "x": 1 }, "task": "dropped" }, "extra": true });
                let res = post(&s, "/mcp/weather", Some(&k.key), &body).await;
                assert_eq!(res.status(), 200);
                let rid = res.headers()["x-request-id"].to_str().unwrap().to_string();
                let answer = response_of(res).await;
                assert_eq!(answer["id"], caller_id, "{answer}");
                let seen: Value = serde_json::from_str(answer["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
                assert_eq!(seen["id"], format!("mcpay-{rid}"), "{seen}");
                assert!(seen["params"].get("task").is_none(), "{seen}");
                assert_eq!(seen["params"]["arguments"], json!({ "x": 1 }));
                assert_eq!(answer["result"]["_meta"]["io.mcpay/charged_mcents"], 100);
            }
        }
        let charged = if sse { 100 } else { 200 };
        // Ids that a lenient compare could confuse, or none: 400 -32600, nothing forwarded.
        let before = up.total_calls();
        for id in [json!(1.0), json!(2.5), Value::Null, json!({ "a": 1 }), json!([1])] {
            let body = json!({ "jsonrpc": "2.0", "id": id, "method": "tools/call", "params": { "name": "forecast", "arguments": {} } });
            let res = post(&s, "/mcp/weather", Some(&k.key), &body).await;
            assert_eq!(res.status(), 400, "{id}");
            assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], -32600, "{id}");
        }
        let res = post(&s, "/mcp/weather", Some(&k.key), &json!({ "jsonrpc": "2.0", "method": "tools/call", "params": { "name": "forecast" } })).await;
        assert_eq!(res.status(), 400);
        assert_eq!(up.total_calls(), before, "nothing forwarded");
        assert_eq!(s.balance(&k.key).await, 1_000 - charged);
        let ledger = s.ledger(&k.key).await;
        assert_eq!(rows_of(&ledger, "weather/rpcid").len(), charged as usize / 50);
        assert!(rows_of(&ledger, "weather/forecast").is_empty());
        assert_eq!(amount_sum(&ledger), 1_000 - charged);
    }
}

/// Keys a case-insensitive upstream decoder would take for JSON-RPC/MCP names: refused.
async fn look_alike_keys_are_refused_before_forwarding(db: &TestDb) {
    let up = Upstream::default();
    let url = start_upstream(&up, false).await;
    let s = gateway(db, vec![weather("weather", &url), local("local")]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;
    let bodies = [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"alerts"},"ID":2}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"alerts","Name":"forecast"}}"#,
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"alerts\",\"name\u{17f}\":1,\"argument\u{17f}\":{}}}",
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\",\"Method\":\"tools/call\",\"params\":{\"name\":\"echo\"}}",
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"param\u{17f}\":{\"name\":\"echo\"}}",
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"alerts\",\"_meta\":{},\"_META\":{}}}",
    ];
    for path in ["/mcp/weather", "/mcp/local"] {
        for body in bodies {
            let res = s
                .client
                .post(s.url(path))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("authorization", format!("Bearer {}", k.key))
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 400, "{path} {body}");
            assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], -32600, "{path} {body}");
        }
    }
    assert_eq!(up.total_calls(), 0, "nothing reached the upstream");
    assert_eq!(s.balance(&k.key).await, 1_000);
    assert_eq!(s.ledger(&k.key).await.len(), 1);
}

/// Last-Event-ID and the caller's Content-Type never reach the upstream.
async fn resumption_and_caller_headers_are_not_forwarded(db: &TestDb) {
    let up = Upstream::default();
    let url = start_upstream(&up, false).await;
    let s = gateway(db, vec![weather("weather", &url)]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;
    let res = s
        .client
        .post(s.url("/mcp/weather"))
        .header("content-type", "application/json; charset=utf-8")
        .header("accept", "application/json, text/event-stream")
        .header("last-event-id", "0")
        .header("authorization", format!("Bearer {}", k.key))
        .body(tools_call(3, "whoami", json!({})).to_string())
        .send()
        .await
        .unwrap();
    let body = response_of(res).await;
    assert_eq!(body["id"], 3);
    let seen: Value = serde_json::from_str(body["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(seen["last-event-id"], Value::Null, "{seen}");
    assert_eq!(seen["content-type"], "application/json", "{seen}");
    assert_eq!(s.balance(&k.key).await, 900);
    assert_eq!(rows_of(&s.ledger(&k.key).await, "weather/whoami"), ["hold", "capture"]);
}

/// An upstream that answers 307 elsewhere: not followed (the body and the secret header would
/// go there), the paid call released.
async fn redirects_are_not_followed(db: &TestDb) {
    let hits = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
    let seen = hits.clone();
    let elsewhere = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let seen = seen.clone();
        async move {
            let token = req.headers().get("x-upstream-token").map(|v| v.to_str().unwrap().to_string());
            seen.lock().unwrap().push(token);
            "{}"
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}/mcp", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, elsewhere).await.unwrap() });
    let redirecting = axum::Router::new().fallback(move || {
        let target = target.clone();
        async move { axum::response::Response::builder().status(307).header("location", target).body(Body::empty()).unwrap() }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, redirecting).await.unwrap() });
    let s = gateway(db, vec![weather("weather", &url)]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;
    let res = post(&s, "/mcp/weather", Some(&k.key), &tools_call(1, "forecast", json!({}))).await;
    assert_eq!(res.status(), 502);
    // A free message: the 307 is passed back, not followed.
    let res = post(&s, "/mcp/weather", Some(&k.key), &json!({ "jsonrpc": "2.0", "id": 2, "method": "ping" })).await;
    assert_eq!(res.status(), 307);
    assert!(res.headers().get("location").is_none());
    assert!(hits.lock().unwrap().is_empty(), "the redirect was followed: {:?}", hits.lock().unwrap());
    assert_eq!(s.balance(&k.key).await, 1_000);
    assert_eq!(rows_of(&s.ledger(&k.key).await, "weather/forecast"), ["hold", "release"]);
}

/// An upstream (raw SSE) that sends look-alikes of the response before (or instead of) the real
/// one: only the response carrying the gateway's id settles; the rest is dropped.
async fn only_the_response_to_the_gateways_id_settles(db: &TestDb) {
    let answer_for_real = Arc::new(AtomicU8::new(1));
    let flag = answer_for_real.clone();
    let raw = axum::Router::new().fallback(move |body: Bytes| {
        let real = flag.load(Ordering::SeqCst) == 1;
        async move {
            let req: Value = serde_json::from_slice(&body).unwrap();
            let id = req["id"].clone();
            let result = |text: &str| json!({ "content": [{ "type": "text", "text": text }] });
            let mut events = vec![
                json!({ "jsonrpc": "2.0", "id": 1, "result": result("decoy with the caller's id") }).to_string(),
                json!({ "jsonrpc": "2.0", "id": 1.0, "result": result("decoy 1.0") }).to_string(),
                "not json".to_string(),
                json!({ "jsonrpc": "2.0", "method": "notifications/message", "params": { "level": "info", "data": "hi" } }).to_string(),
            ];
            if real {
                events.push(json!({ "jsonrpc": "2.0", "id": id, "result": result("real") }).to_string());
            }
            let text: String = events.iter().map(|e| format!("event: message\ndata: {e}\n\n")).collect();
            axum::response::Response::builder().status(200).header("content-type", "text/event-stream").body(Body::from(text)).unwrap()
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, raw).await.unwrap() });
    let s = gateway(db, vec![weather("weather", &url)]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;

    let res = post(&s, "/mcp/weather", Some(&k.key), &tools_call(1, "forecast", json!({}))).await;
    let messages = sse_messages(&res.text().await.unwrap());
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0]["method"], "notifications/message");
    assert_eq!(messages[1]["id"], 1);
    assert_eq!(messages[1]["result"]["content"][0]["text"], "real");
    assert_eq!(messages[1]["result"]["_meta"]["io.mcpay/charged_mcents"], 250);
    assert_eq!(s.balance(&k.key).await, 750);

    // The stream ends without the real response: released, the decoys never reach the caller.
    answer_for_real.store(0, Ordering::SeqCst);
    let res = post(&s, "/mcp/weather", Some(&k.key), &tools_call(1, "forecast", json!({}))).await;
    let messages = sse_messages(&res.text().await.unwrap());
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[1]["id"], 1);
    assert_eq!(messages[1]["result"]["isError"], true);
    assert_eq!(messages[1]["result"]["_meta"]["io.mcpay/refunded"], true);
    assert_eq!(s.balance(&k.key).await, 750);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(rows_of(&ledger, "weather/forecast"), ["hold", "capture", "hold", "release"]);
    assert_eq!(amount_sum(&ledger), 750);
}

// ------------------------------------------------------------- a legacy HTTP+SSE upstream

const LEGACY_OK: u8 = 0;
/// A posted tools/call is accepted, then the session's stream ends without its response.
const LEGACY_HANG_UP: u8 = 1;
/// The endpoint event names another origin (this server under the name `localhost`).
const LEGACY_FOREIGN: u8 = 2;
/// A posted tools/call is refused with 500.
const LEGACY_POST_500: u8 = 3;
/// GET /sse is refused with 401.
const LEGACY_GET_401: u8 = 4;

/// A legacy HTTP+SSE MCP server (MCP 2024-11-05): `GET /sse` opens a session (an `endpoint`
/// event, then the server's messages as `message` events), `POST /messages?sessionId=ID` feeds it
/// (202). Each session runs the same rmcp server as the Streamable HTTP upstream ([`Upstream`]),
/// over an in-memory pipe. It records every message posted and every request's headers.
#[derive(Clone, Default)]
struct Legacy {
    up: Upstream,
    sessions: Arc<Mutex<HashMap<String, LegacySession>>>,
    /// (session, method, or "response") of every message posted, in order.
    posted: Arc<Mutex<Vec<(String, String)>>>,
    /// Every request's headers (GET and POST).
    headers: Arc<Mutex<Vec<axum::http::HeaderMap>>>,
    opened: Arc<AtomicUsize>,
    /// Sessions whose stream the client closed.
    closed: Arc<AtomicUsize>,
    mode: Arc<AtomicU8>,
}

#[derive(Clone)]
struct LegacySession {
    /// The stream's events; None ends it.
    events: tokio::sync::mpsc::UnboundedSender<Option<String>>,
    to_server: Arc<tokio::sync::Mutex<tokio::io::WriteHalf<tokio::io::DuplexStream>>>,
}

impl Legacy {
    fn posted(&self) -> Vec<(String, String)> {
        self.posted.lock().unwrap().clone()
    }

    fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn open(&self, headers: axum::http::HeaderMap) -> axum::response::Response {
        use tokio::io::AsyncBufReadExt;
        let host = headers.get("host").unwrap().to_str().unwrap().to_string();
        self.headers.lock().unwrap().push(headers);
        let mode = self.mode.load(Ordering::SeqCst);
        if mode == LEGACY_GET_401 {
            return axum::response::Response::builder().status(401).body(Body::from("who are you")).unwrap();
        }
        let id = format!("s{}", self.opened.fetch_add(1, Ordering::SeqCst));
        let (server_side, ours) = tokio::io::duplex(1 << 20);
        let handler = self.up.clone();
        tokio::spawn(async move {
            if let Ok(running) = handler.serve(server_side).await {
                let _ = running.waiting().await;
            }
        });
        let (from_server, to_server) = tokio::io::split(ours);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
        let endpoint = if mode == LEGACY_FOREIGN {
            format!("http://{}/messages?sessionId={id}", host.replace("127.0.0.1", "localhost"))
        } else {
            format!("/messages?sessionId={id}")
        };
        tx.send(Some(format!("event: endpoint\ndata: {endpoint}\n\n"))).unwrap();
        let session = LegacySession { events: tx.clone(), to_server: Arc::new(tokio::sync::Mutex::new(to_server)) };
        self.sessions.lock().unwrap().insert(id.clone(), session);
        // The server's messages become the stream's events.
        let events = tx.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(from_server).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if events.send(Some(format!("event: message\ndata: {line}\n\n"))).is_err() {
                    break;
                }
            }
        });
        // A comment every 100 ms tells when the client closed the stream: the session ends.
        let (sessions, closed) = (self.sessions.clone(), self.closed.clone());
        tokio::spawn(async move {
            while tx.send(Some(": keep-alive\n\n".into())).is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            closed.fetch_add(1, Ordering::SeqCst);
            sessions.lock().unwrap().remove(&id);
        });
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.flatten().map(|e| (Ok::<_, std::convert::Infallible>(Bytes::from(e)), rx))
        });
        axum::response::Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(body)).unwrap()
    }

    async fn post(&self, uri: axum::http::Uri, headers: axum::http::HeaderMap, body: Bytes) -> axum::response::Response {
        use tokio::io::AsyncWriteExt;
        self.headers.lock().unwrap().push(headers);
        let id = uri.query().and_then(|q| q.strip_prefix("sessionId=")).unwrap_or("").to_string();
        let Some(session) = self.sessions.lock().unwrap().get(&id).cloned() else {
            return axum::response::Response::builder().status(404).body(Body::from("no such session")).unwrap();
        };
        let message: Value = serde_json::from_slice(&body).unwrap();
        let method = message["method"].as_str().unwrap_or("response").to_string();
        self.posted.lock().unwrap().push((id, method.clone()));
        match self.mode.load(Ordering::SeqCst) {
            LEGACY_HANG_UP if method == "tools/call" => {
                let _ = session.events.send(None);
            }
            LEGACY_POST_500 if method == "tools/call" => {
                return axum::response::Response::builder().status(500).body(Body::from("upstream broke")).unwrap();
            }
            _ => {
                let mut w = session.to_server.lock().await;
                w.write_all(&[body.as_ref(), b"\n"].concat()).await.unwrap();
            }
        }
        axum::response::Response::builder().status(202).body(Body::from("Accepted")).unwrap()
    }
}

/// Starts the legacy server on 127.0.0.1:0; returns its /sse URL.
async fn start_legacy(l: &Legacy) -> String {
    let (on_get, on_post) = (l.clone(), l.clone());
    let router = axum::Router::new()
        .route("/sse", axum::routing::get(move |headers: axum::http::HeaderMap| std::future::ready(on_get.open(headers))))
        .route(
            "/messages",
            axum::routing::post(move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: Bytes| {
                let l = on_post.clone();
                async move { l.post(uri, headers, body).await }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/sse")
}

fn legacy(name: &str, url: &str) -> UpstreamConfig {
    UpstreamConfig { transport: UpstreamTransport::Sse(leak(url.to_string())), ..weather(name, url) }
}

/// The methods posted in each session, in order of the sessions.
fn sessions_of(posted: &[(String, String)]) -> Vec<Vec<String>> {
    let mut order: Vec<&String> = Vec::new();
    for (s, _) in posted {
        if !order.contains(&s) {
            order.push(s);
        }
    }
    order.iter().map(|s| posted.iter().filter(|(p, _)| p == *s).map(|(_, m)| m.clone()).collect()).collect()
}

async fn a_legacy_sse_upstream_is_metered_through_a_session_per_call(db: &TestDb) {
    let l = Legacy::default();
    let url = start_legacy(&l).await;
    let s = gateway(db, vec![legacy("weather", &url)]).await;
    let k = db.seed_key(10_000, &["weather"], None).await;

    // The official client, through the gateway: its initialize goes to a session of its own (no
    // handshake of the gateway's), tools/list to another one, rewritten with the terms.
    let c = client(&s, "/mcp/weather", &k.key).await;
    let tools = c.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), 8);
    for t in &tools {
        let m = serde_json::to_value(t.meta.as_ref().unwrap()).unwrap();
        let price = match t.name.as_ref() {
            "forecast" => 250,
            "alerts" => 0,
            _ => 100,
        };
        assert_eq!(m["io.mcpay/price_mcents"], price, "{}", t.name);
        assert_eq!(m["io.mcpay/scope"], "weather");
    }
    // A paid call: charged once, through a session initialized by the gateway.
    let r = call(&c, "forecast", json!({})).await;
    assert_ne!(r.is_error, Some(true));
    assert_eq!(meta(&r)["io.mcpay/charged_mcents"], 250);
    assert_eq!(meta(&r)["io.mcpay/balance_mcents"], 9_750);
    // A free tool: forwarded, not charged.
    let r = call(&c, "alerts", json!({})).await;
    assert!(meta(&r).get("io.mcpay/charged_mcents").is_none());
    assert_eq!(s.balance(&k.key).await, 9_750);
    let sessions = sessions_of(&l.posted());
    assert_eq!(sessions.len(), 4, "one session per request: {sessions:?}");
    assert_eq!(sessions[0], ["initialize"], "the caller's initialize goes alone");
    for (i, method) in [(1, "tools/list"), (2, "tools/call"), (3, "tools/call")] {
        assert_eq!(sessions[i], ["initialize", "notifications/initialized", method], "handshake first: {sessions:?}");
    }
    assert_eq!((l.up.calls("forecast"), l.up.calls("alerts")), (1, 1));

    // Raw: a JSON answer with the final terms, the caller's id, no session id, the gateway's
    // `mcpay-` id upstream.
    let res = post(&s, "/mcp/weather", Some(&k.key), &tools_call(41, "rpcid", json!({ "x": 1 }))).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    assert!(res.headers().get("mcp-session-id").is_none());
    assert_eq!(res.headers()["x-charged-mcents"], "100");
    assert_eq!(res.headers()["x-balance-mcents"], "9650");
    assert!(res.headers().contains_key("x-upstream-duration-ms"));
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["id"], 41);
    let seen: Value = serde_json::from_str(body["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(seen["id"], format!("mcpay-{rid}"), "{seen}");
    assert_eq!(body["result"]["_meta"]["io.mcpay/request_id"], rid);
    assert_eq!(db.hold_state(&rid).await.as_deref(), Some("captured"));

    // Notifications and responses of the caller: 202, nothing forwarded, no session opened.
    let opened = l.opened.load(Ordering::SeqCst);
    for message in [
        json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }),
        json!({ "jsonrpc": "2.0", "id": "x", "result": {} }),
    ] {
        let res = post(&s, "/mcp/weather", Some(&k.key), &message).await;
        assert_eq!(res.status(), 202);
        assert!(res.text().await.unwrap().is_empty());
    }
    assert_eq!(l.opened.load(Ordering::SeqCst), opened);
    // GET and DELETE: 405 (no session to stream or end); OPTIONS as for every upstream.
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let res = s.client.request(method.clone(), s.url("/mcp/weather")).header("authorization", format!("Bearer {}", k.key)).send().await.unwrap();
        assert_eq!(res.status(), 405, "{method}");
        assert_eq!(res.headers()["allow"], "POST, OPTIONS");
        // The key comes first, as for every method.
        let res = s.client.request(method.clone(), s.url("/mcp/weather")).send().await.unwrap();
        assert_eq!(res.status(), 401, "{method} without a key");
    }
    let res = s.client.request(reqwest::Method::OPTIONS, s.url("/mcp/weather")).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(l.opened.load(Ordering::SeqCst), opened);

    // The configured header reached every request of every session; the caller's key, cookie
    // and session id none.
    let res = s
        .client
        .post(s.url("/mcp/weather"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", k.key))
        .header("cookie", "session=caller-cookie")
        .header("mcp-session-id", "caller-session")
        .body(tools_call(42, "alerts", json!({})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let headers = l.headers.lock().unwrap().clone();
    assert_eq!(headers.len(), l.posted().len() + l.opened.load(Ordering::SeqCst));
    for h in &headers {
        assert_eq!(h["x-upstream-token"], TOKEN);
        for name in ["authorization", "cookie", "mcp-session-id"] {
            assert!(h.get(name).is_none(), "{name} reached the upstream: {h:?}");
        }
    }
    assert_eq!(headers.iter().filter(|h| h.get("accept").is_some_and(|v| v == "text/event-stream")).count(), l.opened.load(Ordering::SeqCst));
    // Every session's stream was closed by the gateway once its answer arrived.
    let deadline = Instant::now() + Duration::from_secs(5);
    while l.closed.load(Ordering::SeqCst) < l.opened.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(l.closed.load(Ordering::SeqCst), l.opened.load(Ordering::SeqCst), "sessions left open");

    let ledger = s.ledger(&k.key).await;
    assert_eq!(rows_of(&ledger, "weather/forecast"), ["hold", "capture"]);
    assert_eq!(rows_of(&ledger, "weather/rpcid"), ["hold", "capture"]);
    assert!(rows_of(&ledger, "weather/alerts").is_empty());
    assert_eq!(ledger.len(), 5, "mint + 2 × (hold, capture): {ledger:?}");
    assert_eq!(amount_sum(&ledger), 9_650);
    assert_eq!(s.balance(&k.key).await, 9_650);

    // /v1/pricing names the transport.
    let pricing: Value = s.get("/v1/pricing").await.json().await.unwrap();
    assert_eq!(pricing["upstreams"][0]["transport"], "sse");
}

async fn legacy_sse_failures_are_released(db: &TestDb) {
    let l = Legacy::default();
    let url = start_legacy(&l).await;
    let s = gateway(db, vec![legacy("weather", &url)]).await;
    let k = db.seed_key(10_000, &["weather"], None).await;
    // A JSON-RPC error: the upstream's answer, released.
    let res = post(&s, "/mcp/weather", Some(&k.key), &tools_call(1, "fail", json!({}))).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-charged-mcents"], "0");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["id"], 1);
    assert!(body["error"].is_object(), "{body}");
    // Slow past the timeout (1 s, counted from the GET) → 504, released.
    let started = Instant::now();
    let res = post(&s, "/mcp/weather", Some(&k.key), &tools_call(2, "slow", json!({ "ms": 3000 }))).await;
    assert!(started.elapsed() < Duration::from_millis(2_500));
    let body = expect_error(res, 504, "upstream_timeout", false).await;
    assert_eq!((body["refunded"].clone(), body["charged_mcents"].clone()), (json!(true), json!(0)));
    // The session's stream ends before the response → 502, released.
    l.set_mode(LEGACY_HANG_UP);
    let body = expect_error(post(&s, "/mcp/weather", Some(&k.key), &tools_call(3, "forecast", json!({}))).await, 502, "upstream_failed", false).await;
    assert_eq!(body["refunded"], true);
    // The endpoint on another origin → 502, released, nothing posted there (nor here).
    l.set_mode(LEGACY_FOREIGN);
    let posted = l.posted().len();
    let body = expect_error(post(&s, "/mcp/weather", Some(&k.key), &tools_call(4, "forecast", json!({}))).await, 502, "upstream_failed", false).await;
    assert_eq!(body["refunded"], true);
    assert_eq!(l.posted().len(), posted, "nothing posted to another origin");
    // The POST of the call refused with 500 → 502, released.
    l.set_mode(LEGACY_POST_500);
    let body = expect_error(post(&s, "/mcp/weather", Some(&k.key), &tools_call(5, "forecast", json!({}))).await, 502, "upstream_failed", false).await;
    assert_eq!(body["refunded"], true);
    // The GET refused with 401 → the upstream's status and body, released.
    l.set_mode(LEGACY_GET_401);
    let res = post(&s, "/mcp/weather", Some(&k.key), &tools_call(6, "forecast", json!({}))).await;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["x-charged-mcents"], "0");
    assert_eq!(res.text().await.unwrap(), "who are you");
    // Nothing listens → 502, released.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/sse", listener.local_addr().unwrap())
    };
    let s2 = gateway(db, vec![legacy("gone", &closed)]).await;
    expect_error(post(&s2, "/mcp/gone", Some(&k.key), &tools_call(7, "forecast", json!({}))).await, 502, "upstream_failed", false).await;
    // A free message whose session fails: 502 without settlement fields.
    l.set_mode(LEGACY_FOREIGN);
    let body = expect_error(post(&s, "/mcp/weather", Some(&k.key), &json!({ "jsonrpc": "2.0", "id": 8, "method": "tools/list" })).await, 502, "upstream_failed", false).await;
    assert!(body.get("refunded").is_none(), "{body}");
    l.set_mode(LEGACY_OK);

    assert_eq!(s.balance(&k.key).await, 10_000);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(rows_of(&ledger, "weather/fail"), ["hold", "release"]);
    assert_eq!(rows_of(&ledger, "weather/slow"), ["hold", "release"]);
    assert_eq!(rows_of(&ledger, "weather/forecast"), ["hold", "release", "hold", "release", "hold", "release", "hold", "release"]);
    assert_eq!(rows_of(&ledger, "gone/forecast"), ["hold", "release"]);
    assert_eq!(count_kind(&ledger, "capture"), 0);
    assert_eq!(amount_sum(&ledger), 10_000);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM holds WHERE state = 'held'").await, 0);
    // The upstream ran fail and slow only (the hung-up and refused calls never reached it).
    assert_eq!((l.up.calls("fail"), l.up.calls("slow"), l.up.calls("forecast")), (1, 1, 0));
}

async fn legacy_sse_progress_is_relayed_before_the_answer(db: &TestDb) {
    let l = Legacy::default();
    let url = start_legacy(&l).await;
    let mut u = legacy("weather", &url);
    u.timeout_ms = 5_000;
    let s = gateway(db, vec![u]).await;
    let k = db.seed_key(1_000, &["weather"], None).await;
    let (text, first, last) = progress_call(&s, &k.key).await;
    assert!(last >= first + Duration::from_millis(500), "first progress {first:?}, response {last:?}");
    let messages = sse_messages(&text);
    assert_eq!(messages.iter().filter(|m| m["method"] == "notifications/progress").count(), 4, "{text}");
    assert!(messages.iter().filter(|m| m["method"] == "notifications/progress").all(|m| m["params"]["progressToken"] == "p-1"));
    // Nothing of the gateway's handshake reaches the caller; the stream ends with the response.
    assert!(!text.contains("mcpay-init-"), "{text}");
    assert_eq!(messages.last().unwrap()["id"], 9);
    assert_eq!(messages.last().unwrap()["result"]["_meta"]["io.mcpay/charged_mcents"], 100);
    // Without Accept: text/event-stream, the same call answers JSON (no progress relayed).
    let res = s
        .client
        .post(s.url("/mcp/weather"))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("authorization", format!("Bearer {}", k.key))
        .body(progress_body().to_string())
        .send()
        .await
        .unwrap();
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["result"]["_meta"]["io.mcpay/charged_mcents"], 100);
    assert_eq!(s.balance(&k.key).await, 800);
    assert_eq!(rows_of(&s.ledger(&k.key).await, "weather/progress"), ["hold", "capture", "hold", "capture"]);
}
