//! `/mcp/<name>`: a price on an MCP server that already exists (contract 3.12). Each
//! `[upstreams.NAME]` of mcpay.toml (`generated::UPSTREAMS`) is served at `/mcp/NAME`: the
//! caller's key and the upstream's scope are checked before anything is forwarded, every message
//! but a priced `tools/call` is forwarded free, and a priced `tools/call` is held, forwarded and
//! captured or released through the gateway's one billing core ([`crate::app::take_hold`],
//! [`crate::app::capture_hold`], [`crate::app::release_hold`]), in the same ledger as `/v1`.
//!
//! `url` upstreams (Streamable HTTP) are forwarded with reqwest ([`http`]), legacy HTTP+SSE ones
//! (`transport = "sse"`) bridged through a session of their own per request ([`sse`]); `command`
//! upstreams (a stdio MCP server the gateway spawns and keeps alive) are served by rmcp ([`stdio`]).

pub mod http;
pub mod sse;
pub mod stdio;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use rmcp::model::ErrorCode;
use serde_json::{Value, json};

use crate::app::{AppState, FailureText, bearer, key_row};
use crate::body::read_bounded;
use crate::generated::{GATEWAY, UPSTREAMS, UpstreamConfig, UpstreamTransport};
use crate::http::{ApiError, set_header};
use crate::store::KeyRow;
use crate::mcp::{rpc_error, rpc_error_response};

/// The route of every upstream, for logs (never the raw path).
pub const ROUTE_LABEL: &str = "/mcp/<upstream>";

/// An upstream's `application/json` answer (and a refused answer's body) is read up to this.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Longest tool name a paid call may name (it becomes the ledger's `<NAME>/<tool>`).
pub const MAX_TOOL_NAME_BYTES: usize = 128;

/// `_meta` keys of the terms and of the settlement (contract 3.11, 3.12).
pub const META_PRICE: &str = "io.mcpay/price_mcents";
pub const META_SCOPE: &str = "io.mcpay/scope";
pub const META_CHARGED: &str = "io.mcpay/charged_mcents";
pub const META_BALANCE: &str = "io.mcpay/balance_mcents";
pub const META_REQUEST_ID: &str = "io.mcpay/request_id";
pub const META_REFUNDED: &str = "io.mcpay/refunded";
pub const META_REFUND_PENDING: &str = "io.mcpay/refund_pending";

/// Longest server-sent event read from an upstream (longer: the stream counts as failed).
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// Keys a lenient upstream decoder (Go's encoding/json: case-insensitive, `ſ`≈`s`, `K`≈`k`)
/// could read as one of these: refused unless byte-equal (contract 3.12).
const GUARDED_KEYS: [&str; 9] = ["jsonrpc", "id", "method", "params", "result", "error", "name", "arguments", "_meta"];

/// The name of `/mcp/<name>` (any path under /mcp/; unknown names answer 404).
pub fn upstream_name(path: &str) -> Option<&str> {
    path.strip_prefix("/mcp/")
}

/// The metered upstreams of one gateway: the table (default `generated::UPSTREAMS`), where their
/// header secrets and URL overrides are read (default: the process environment), the HTTP client
/// and the stdio servers it keeps alive.
pub struct Upstreams {
    list: Vec<UpstreamConfig>,
    vars: Option<HashMap<String, String>>,
    client: OnceLock<Option<reqwest::Client>>,
    children: stdio::Children,
}

impl Upstreams {
    /// `[upstreams]` of mcpay.toml, secrets from the environment.
    pub fn generated() -> Self {
        Upstreams::new(UPSTREAMS.to_vec())
    }

    pub fn new(list: Vec<UpstreamConfig>) -> Self {
        Upstreams { list, vars: None, client: OnceLock::new(), children: stdio::Children::default() }
    }

    /// Reads header secrets and URL overrides from `vars` instead of the environment (tests).
    pub fn with_vars<K: Into<String>, V: Into<String>>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self {
        self.vars = Some(vars.into_iter().map(|(k, v)| (k.into(), v.into())).collect());
        self
    }

    pub fn list(&self) -> &[UpstreamConfig] {
        &self.list
    }

    pub fn find(&self, name: &str) -> Option<&UpstreamConfig> {
        self.list.iter().find(|u| u.name == name)
    }

    /// A secret or setting by name: trimmed, None when unset or empty.
    fn var(&self, name: &str) -> Option<String> {
        let value = match &self.vars {
            Some(vars) => vars.get(name).cloned(),
            None => std::env::var(name).ok(),
        };
        value.map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
    }

    /// The HTTP client of `url` upstreams (HTTPS on rustls with Mozilla's roots when the `tls`
    /// feature is on, as it is by default). Its own, never following redirects: a 3xx would
    /// resend the body and the upstream's secret headers elsewhere. None: it could not be built.
    fn client(&self) -> Option<&reqwest::Client> {
        self.client
            .get_or_init(|| {
                let builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).redirect(reqwest::redirect::Policy::none());
                #[cfg(feature = "tls")]
                let builder = {
                    crate::signup::install_tls_provider();
                    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
                    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                        .with_safe_default_protocol_versions()
                        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
                    match tls {
                        Ok(tls) => builder.tls_backend_preconfigured(tls),
                        Err(e) => {
                            tracing::error!(error = %e, "upstream TLS configuration failed");
                            return None;
                        }
                    }
                };
                builder.build().inspect_err(|e| tracing::error!(error = %e, "upstream HTTP client failed")).ok()
            })
            .as_ref()
    }

    /// `upstreams` of GET /v1/pricing (contract 3.2), in manifest order.
    pub fn pricing(&self) -> Vec<Value> {
        self.list
            .iter()
            .map(|u| {
                let tools: serde_json::Map<String, Value> = u.tools.iter().map(|(t, p)| ((*t).to_string(), json!(p))).collect();
                json!({
                    "name": u.name,
                    "path": format!("/mcp/{}", u.name),
                    "price_mcents": u.price_mcents,
                    "scope": u.scope,
                    "description": u.description,
                    "rate_limit_per_minute": u.rate_limit_per_minute,
                    "enabled": u.enabled,
                    "refund_tool_errors": u.refund_tool_errors,
                    "transport": match u.transport {
                        UpstreamTransport::Url(_) => "http",
                        UpstreamTransport::Sse(_) => "sse",
                        UpstreamTransport::Command(_) => "stdio",
                    },
                    "tools": tools,
                })
            })
            .collect()
    }

    /// Starts the stdio upstreams now (instead of on their first request); failures are logged
    /// and retried on the next request.
    pub async fn start_stdio(&self) {
        for u in &self.list {
            if let UpstreamTransport::Command(argv) = u.transport
                && u.enabled
                && let Err(e) = self.children.get(u.name, argv).await
            {
                tracing::error!(upstream = u.name, error = %e, "stdio upstream did not start (retried on the next request)");
            }
        }
    }
}

/// The price of one `tools/call` of `tool` on `u`: its `[upstreams.NAME.tools]` entry, else the
/// upstream's default (0 = free).
pub fn tool_price(u: &UpstreamConfig, tool: &str) -> i64 {
    u.tools.iter().find(|(t, _)| *t == tool).map_or(u.price_mcents, |(_, p)| *p)
}

/// The time limit of one call.
pub(crate) fn time_limit(u: &UpstreamConfig) -> Duration {
    Duration::from_millis(u.timeout_ms.max(1))
}

pub(crate) const UPSTREAM_FAILED: FailureText = FailureText {
    status: 502,
    code: "upstream_failed",
    released: "The upstream MCP server failed this call; the held price was released.",
    kept: "The upstream MCP server failed this call.",
    pending: "The upstream MCP server failed this call; the held price will be released shortly.",
};

pub(crate) const UPSTREAM_TIMEOUT: FailureText = FailureText {
    status: 504,
    code: "upstream_timeout",
    released: "The upstream MCP server did not answer in time; the held price was released.",
    kept: "The upstream MCP server did not answer in time.",
    pending: "The upstream MCP server did not answer in time; the held price will be released shortly.",
};

/// What the checks before forwarding found: the caller's key (its row, read once).
pub(crate) struct Checked {
    pub key: KeyRow,
}

/// Everything of `/mcp/<name>` before forwarding (contract 3.12): the name, the method, the
/// switch, the key and its scope; then the transport.
pub(crate) async fn serve(app: &Arc<AppState>, name: &str, req: Request, request_id: &str) -> Result<Response, ApiError> {
    let upstreams = app.upstreams();
    let Some(u) = upstreams.find(name).copied() else { return Err(ApiError::new(404, "not_found")) };
    let method = req.method().clone();
    if method == Method::OPTIONS {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        set_header(res.headers_mut(), "access-control-allow-methods", "GET, POST, DELETE, OPTIONS");
        set_header(res.headers_mut(), "access-control-max-age", "86400");
        return Ok(res);
    }
    if !matches!(method, Method::GET | Method::POST | Method::DELETE) {
        return Err(ApiError::new(405, "method_not_allowed").header(header::ALLOW, "GET, POST, DELETE, OPTIONS"));
    }
    if !u.enabled {
        return Err(ApiError::new(503, "upstream_disabled"));
    }
    // Every request needs a key with the upstream's scope, whatever it carries (an unknown key
    // writes nothing).
    let key_hash = bearer(req.headers(), false)?;
    let key = key_row(app, &key_hash, false).await?;
    if !key.scope_list().iter().any(|s| s == u.scope) {
        return Err(ApiError::new(403, "scope_denied").extra("required_scope", u.scope));
    }
    // A legacy HTTP+SSE upstream is bridged per POST: there is no session to stream or end (after
    // the key check: every method needs a key, contract 3.12).
    if matches!(u.transport, UpstreamTransport::Sse(_)) && method != Method::POST {
        return Err(ApiError::new(405, "method_not_allowed").header(header::ALLOW, "POST, OPTIONS"));
    }
    let checked = Checked { key };
    match u.transport {
        UpstreamTransport::Url(default_url) | UpstreamTransport::Sse(default_url) => {
            let url = upstreams.var(u.url_env).unwrap_or_else(|| default_url.to_string());
            if url.is_empty() {
                tracing::error!(upstream = u.name, missing = u.url_env, "upstream URL is not set");
                return Err(unavailable());
            }
            let mut headers = Vec::with_capacity(u.headers.len());
            for (header_name, var) in u.headers {
                let Some(value) = upstreams.var(var) else {
                    tracing::error!(upstream = u.name, missing = *var, "upstream header secret is not set");
                    return Err(unavailable());
                };
                headers.push((*header_name, value));
            }
            let Some(client) = upstreams.client() else { return Err(unavailable()) };
            let target = http::Target { url, headers, client: client.clone() };
            if let UpstreamTransport::Sse(_) = u.transport {
                sse::serve(app, &u, target, checked, req, request_id).await
            } else {
                http::serve(app, &u, target, checked, req, request_id).await
            }
        }
        UpstreamTransport::Command(argv) => {
            let child = match upstreams.children.get(u.name, argv).await {
                Ok(child) => child,
                Err(e) => {
                    tracing::error!(upstream = u.name, error = %e, "stdio upstream unavailable");
                    return Err(unavailable());
                }
            };
            stdio::serve(app, &u, child, checked, req, request_id).await
        }
    }
}

fn unavailable() -> ApiError {
    ApiError::new(503, "upstream_unavailable").message("This upstream MCP server is not configured on this gateway (a URL or a secret is missing).")
}

/// What a POST to `/mcp/<name>` carries, as far as billing is concerned.
pub(crate) enum Kind {
    /// A `tools/call` request of a priced tool.
    Paid { tool: String, price: i64, id: Value },
    /// A `tools/list` request: its result is rewritten with the terms.
    List { id: Value },
    /// Anything else (and a free tool): forwarded as it is.
    Free,
}

pub(crate) fn classify(u: &UpstreamConfig, message: &Value) -> Kind {
    // A tools/call without a usable id never gets here (check_message).
    let Some(id) = message.get("id").filter(|id| !id.is_null()).cloned() else { return Kind::Free };
    match message.get("method").and_then(Value::as_str) {
        Some("tools/call") => {
            let tool = message.get("params").and_then(|p| p.get("name")).and_then(Value::as_str).unwrap_or("");
            let price = tool_price(u, tool);
            if price > 0 { Kind::Paid { tool: tool.to_string(), price, id } } else { Kind::Free }
        }
        Some("tools/list") => Kind::List { id },
        _ => Kind::Free,
    }
}

/// A POST body read (bounded) and checked: the raw body and its message. `Ok(Err(answer))`:
/// refused before anything is forwarded.
pub(crate) async fn read_message(headers: &HeaderMap, body: Body) -> Result<Result<(Bytes, Value), Box<Response>>, ApiError> {
    let raw = match read_bounded(headers, body, GATEWAY.max_body_bytes, false).await {
        Ok(raw) => raw,
        Err(e) if e.code == "invalid_json" => return Ok(Err(Box::new(crate::mcp::parse_error()))),
        Err(e) => return Err(e),
    };
    Ok(check_message(&raw).map(|message| (raw, message)))
}

/// The checks of a POST body (contract 3.12): a JSON object, not a batch. `Err` is the answer.
pub(crate) fn check_message(raw: &[u8]) -> Result<Value, Box<Response>> {
    let Ok(message) = serde_json::from_slice::<Value>(raw) else { return Err(Box::new(crate::mcp::parse_error())) };
    if !message.is_object() {
        let what = if message.is_array() {
            "Invalid Request: JSON-RPC batches are not supported (removed from MCP in 2025-06-18); send one message per request. Nothing was forwarded or charged."
        } else {
            "Invalid Request: the body must be one JSON-RPC message (an object). Nothing was forwarded or charged."
        };
        return Err(Box::new(rpc_error_response(StatusCode::BAD_REQUEST, ErrorCode::INVALID_REQUEST, what, Value::Null, None)));
    }
    let invalid = |what: &str| -> Result<Value, Box<Response>> { Err(Box::new(rpc_error_response(StatusCode::BAD_REQUEST, ErrorCode::INVALID_REQUEST, what, Value::Null, None))) };
    if has_look_alike_key(&message) || message.get("params").is_some_and(has_look_alike_key) {
        return invalid("Invalid Request: a member name differs from a JSON-RPC/MCP name only in case or look-alike letters. Nothing was forwarded or charged.");
    }
    let usable_id = match message.get("id") {
        Some(Value::String(_)) => true,
        Some(Value::Number(n)) => n.is_i64() || n.is_u64(),
        _ => false,
    };
    if message.get("id").and_then(Value::as_str).is_some_and(|id| id.starts_with(GATEWAY_ID_PREFIX)) {
        return invalid("Invalid Request: ids starting with \"mcpay-\" are the gateway's own. Nothing was forwarded or charged.");
    }
    if message.get("method").and_then(Value::as_str) == Some("tools/call") && !usable_id {
        return invalid("Invalid Request: a tools/call needs an id that is a string or an integer. Nothing was forwarded or charged.");
    }
    Ok(message)
}

/// Whether an object has a key that folds (ASCII lowercase, U+017F → s, U+212A → k) to a
/// guarded JSON-RPC/MCP name without being it.
fn has_look_alike_key(value: &Value) -> bool {
    let Some(obj) = value.as_object() else { return false };
    obj.keys().any(|k| {
        let folded: String = k
            .chars()
            .map(|c| match c {
                '\u{17F}' => 's',
                '\u{212A}' => 'k',
                c => c.to_ascii_lowercase(),
            })
            .collect();
        GUARDED_KEYS.iter().any(|g| *g == folded && *g != k)
    })
}

/// The prefix of the ids the gateway gives the calls it forwards; a caller's id cannot start with it.
const GATEWAY_ID_PREFIX: &str = "mcpay-";

/// The id the gateway gives a paid tools/call it forwards (its response is matched by it only).
pub(crate) fn upstream_call_id(request_id: &str) -> String {
    format!("{GATEWAY_ID_PREFIX}{request_id}")
}

/// A paid tools/call as forwarded: re-serialized with only jsonrpc/id/method/params, params only
/// name/arguments/_meta, and the gateway's id.
pub(crate) fn paid_message(message: &Value, upstream_id: &str) -> Value {
    let mut params = serde_json::Map::new();
    if let Some(p) = message.get("params").and_then(Value::as_object) {
        for k in ["name", "arguments", "_meta"] {
            if let Some(v) = p.get(k) {
                params.insert(k.to_string(), v.clone());
            }
        }
    }
    json!({ "jsonrpc": "2.0", "id": upstream_id, "method": "tools/call", "params": params })
}

/// Whether a tool name can be billed (it becomes the ledger's `<NAME>/<tool>`): 1 to 128 bytes of
/// printable ASCII without spaces.
pub(crate) fn valid_tool_name(tool: &str) -> bool {
    (1..=MAX_TOOL_NAME_BYTES).contains(&tool.len()) && tool.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// An upstream's byte stream that fails once one server-sent event passes MAX_EVENT_BYTES.
pub(crate) fn cap_events<S, E>(stream: S) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> + Send
where
    S: futures_util::Stream<Item = Result<axum::body::Bytes, E>> + Send,
    E: std::fmt::Display,
{
    use futures_util::StreamExt;
    // (bytes of the current event, the current line is empty, the last byte was \r, failed)
    let mut state = (0usize, true, false, false);
    stream.map(move |chunk| {
        if state.3 {
            return Err(std::io::Error::other("event stream already failed"));
        }
        let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()))?;
        for &b in chunk.iter() {
            let (run, line_empty, prev_cr, _) = &mut state;
            if b == b'\n' && *prev_cr {
                *prev_cr = false;
                continue;
            }
            *prev_cr = b == b'\r';
            if b == b'\n' || b == b'\r' {
                if *line_empty {
                    *run = 0;
                }
                *line_empty = true;
            } else {
                *line_empty = false;
                *run += 1;
                if *run > MAX_EVENT_BYTES {
                    state.3 = true;
                    return Err(std::io::Error::other("upstream event larger than 4 MiB"));
                }
            }
        }
        Ok(chunk)
    })
}

/// A refusal before the hold as the JSON-RPC error of contract 3.11 (HTTP 200, the request's id).
pub(crate) fn refusal(err: &ApiError, id: Value) -> Response {
    let data = rpc_error(err);
    rpc_error_response(StatusCode::OK, data.code, &data.message, id, data.data)
}

/// A tool name that cannot be billed: -32602, nothing forwarded.
pub(crate) fn check_tool_name(tool: &str, id: &Value) -> Result<(), Box<Response>> {
    if !valid_tool_name(tool) {
        let err = ApiError::new(400, "invalid_input")
            .message(format!("params.name must be a tool name of 1 to {MAX_TOOL_NAME_BYTES} printable ASCII characters (no spaces)."))
            .no_charge();
        return Err(Box::new(refusal(&err, id.clone())));
    }
    Ok(())
}

/// A `tools/list` result with the terms in each tool's `_meta` (the upstream's own keys kept).
pub(crate) fn rewrite_tools(u: &UpstreamConfig, result: &mut Value) {
    let Some(tools) = result.get_mut("tools").and_then(Value::as_array_mut) else { return };
    for tool in tools {
        let Some(obj) = tool.as_object_mut() else { continue };
        let name = obj.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        let meta = obj.entry("_meta").or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        meta[META_PRICE] = json!(tool_price(u, &name));
        meta[META_SCOPE] = json!(u.scope);
    }
}

/// The settlement's terms in a result's `_meta` (contract 3.12).
pub(crate) fn add_terms(result: &mut Value, charged: i64, balance: i64, call_id: &str, refunded: bool, refund_pending: bool) {
    let Some(obj) = result.as_object_mut() else { return };
    let meta = obj.entry("_meta").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta[META_CHARGED] = json!(charged);
    meta[META_BALANCE] = json!(balance);
    meta[META_REQUEST_ID] = json!(call_id);
    if refunded {
        meta[META_REFUNDED] = json!(true);
    }
    if refund_pending {
        meta[META_REFUND_PENDING] = json!(true);
    }
}

/// A JSON-RPC error answered by the gateway for a message it forwarded (SSE: written as an event).
pub(crate) fn failure_message(id: &Value, code: &str, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": ErrorCode::INTERNAL_ERROR.0, "message": message, "data": { "code": code } } })
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: UpstreamConfig = UpstreamConfig {
        name: "weather",
        transport: UpstreamTransport::Url("http://127.0.0.1:9/mcp"),
        url_env: "UPSTREAM_WEATHER_URL",
        price_mcents: 100,
        tools: &[("forecast", 250), ("alerts", 0)],
        scope: "weather",
        timeout_ms: 30_000,
        rate_limit_per_minute: 60,
        headers: &[],
        enabled: true,
        refund_tool_errors: false,
        description: "",
    };

    #[test]
    fn prices_and_kinds() {
        assert_eq!(tool_price(&U, "forecast"), 250);
        assert_eq!(tool_price(&U, "alerts"), 0);
        assert_eq!(tool_price(&U, "echo"), 100);
        let call = |tool: &str| json!({ "jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": { "name": tool } });
        assert!(matches!(classify(&U, &call("forecast")), Kind::Paid { price: 250, .. }));
        assert!(matches!(classify(&U, &call("alerts")), Kind::Free));
        assert!(matches!(classify(&U, &call("echo")), Kind::Paid { price: 100, .. }));
        // A notification (no id) is never billed.
        assert!(matches!(classify(&U, &json!({ "jsonrpc": "2.0", "method": "tools/call", "params": { "name": "echo" } })), Kind::Free));
        assert!(matches!(classify(&U, &json!({ "jsonrpc": "2.0", "id": "a", "method": "tools/list" })), Kind::List { .. }));
    }

    #[test]
    fn tools_list_gains_the_terms() {
        let mut result = json!({ "tools": [
            { "name": "forecast", "_meta": { "x.upstream/own": 1 } },
            { "name": "alerts" },
            { "name": "echo", "_meta": "junk" },
        ] });
        rewrite_tools(&U, &mut result);
        assert_eq!(result["tools"][0]["_meta"], json!({ "x.upstream/own": 1, META_PRICE: 250, META_SCOPE: "weather" }));
        assert_eq!(result["tools"][1]["_meta"], json!({ META_PRICE: 0, META_SCOPE: "weather" }));
        assert_eq!(result["tools"][2]["_meta"], json!({ META_PRICE: 100, META_SCOPE: "weather" }));
    }

    #[test]
    fn batches_and_non_objects_are_refused() {
        assert_eq!(check_message(b"[]").unwrap_err().status(), StatusCode::BAD_REQUEST);
        assert_eq!(check_message(b"12").unwrap_err().status(), StatusCode::BAD_REQUEST);
        assert_eq!(check_message(b"{").unwrap_err().status(), StatusCode::BAD_REQUEST);
        assert!(check_message(br#"{"jsonrpc":"2.0","method":"ping","id":1}"#).is_ok());
    }

    #[test]
    fn look_alike_keys_and_unusable_ids_are_refused() {
        let refused = |body: &str| check_message(body.as_bytes()).is_err();
        assert!(refused(r#"{"jsonrpc":"2.0","id":1,"method":"ping","ID":2}"#));
        assert!(refused("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"param\u{17f}\":{}}"));
        assert!(refused(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","NAME":"b"}}"#));
        assert!(refused(r#"{"jsonrpc":"2.0","id":1.0,"method":"tools/call","params":{"name":"a"}}"#));
        assert!(refused(r#"{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"a"}}"#));
        assert!(refused(r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"a"}}"#));
        assert!(refused(r#"{"jsonrpc":"2.0","id":"mcpay-1","method":"ping"}"#));
        assert!(refused(r#"{"jsonrpc":"2.0","id":"mcpay-x","result":{}}"#));
        assert!(!refused(r#"{"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"name":"a","other":1},"more":{"ID":1}}"#));
        // Not a tools/call: its id is the upstream's business.
        assert!(!refused(r#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#));
        let forwarded = paid_message(&json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call", "x": 1,
            "params": { "name": "a", "arguments": { "k": 1 }, "_meta": { "progressToken": 1 }, "task": {} } }), "mcpay-r");
        assert_eq!(forwarded, json!({ "jsonrpc": "2.0", "id": "mcpay-r", "method": "tools/call",
            "params": { "name": "a", "arguments": { "k": 1 }, "_meta": { "progressToken": 1 } } }));
    }

    #[test]
    fn tool_names_are_printable_ascii() {
        assert!(valid_tool_name("forecast"));
        assert!(valid_tool_name(&"a".repeat(128)));
        for bad in ["", "a b", "caf\u{e9}", "a\u{7f}", "tab\t"] {
            assert!(!valid_tool_name(bad), "{bad:?}");
        }
        assert!(!valid_tool_name(&"a".repeat(129)));
    }

    #[tokio::test]
    async fn events_are_capped_at_4_mib() {
        use futures_util::StreamExt;
        let chunk = |s: Vec<u8>| Ok::<_, std::io::Error>(axum::body::Bytes::from(s));
        // Many small events pass, whatever their total.
        let small: Vec<_> = (0..10).map(|_| chunk([b"data: ".as_slice(), &vec![b'x'; 1024 * 1024], b"\r\n\r\n"].concat())).collect();
        let out: Vec<_> = cap_events(futures_util::stream::iter(small)).collect().await;
        assert!(out.iter().all(Result::is_ok));
        // One event past 4 MiB, even across lines: fails.
        let big: Vec<_> = (0..5).map(|_| chunk([b"data: ".as_slice(), &vec![b'x'; 1024 * 1024], b"\n"].concat())).collect();
        let out: Vec<_> = cap_events(futures_util::stream::iter(big)).collect().await;
        assert!(out.iter().any(Result::is_err));
    }
}
