//! `/mcp`: the MCP face of the gateway (contract 3.11), served by the official Rust SDK (rmcp)
//! over Streamable HTTP, stateless (no session, a fresh server per request) with JSON answers.
//! Every paid endpoint is a tool; a paid `tools/call` goes through the same billing core as
//! `POST /v1/<endpoint>` ([`crate::app::run_paid_call`]). The gateway's own rules run before
//! rmcp: methods, CORS, the body bound, batches, and the key of `balance` and paid tools.

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ErrorCode, Implementation, ListToolsResult, PaginatedRequestParams,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::app::{AppState, Answer, Face, Idem, IDEMPOTENCY_MAX_STORED_BYTES, PaidCall, PaidOutcome, bearer, key_row, me_body, pricing_body, run_paid_call};
use crate::body::{is_json_content_type, read_bounded};
use crate::generated::{Endpoint, GATEWAY, PROJECT_NAME, PROJECT_VERSION};
use crate::handler::Reply;
use crate::http::{ApiError, CORS_HEADERS, NO_CHARGE_NOTE, base_headers, json_response, set_header};
use crate::signup::valid_idempotency_key;
use crate::store::StoredResponse;

pub const PATH: &str = "/mcp";

/// The per-call Idempotency-Key of a paid `tools/call` (contract 3.10, 3.11).
pub const IDEMPOTENCY_META: &str = "io.mcpay/idempotency_key";

/// CORS of /mcp: the /v1 public headers plus the MCP transport's own (contract 3.11).
pub fn add_cors(h: &mut HeaderMap) {
    let [(origin_name, origin), (allow_name, allow), (expose_name, expose)] = CORS_HEADERS;
    set_header(h, origin_name, origin);
    set_header(h, allow_name, format!("{allow}, Mcp-Protocol-Version, Mcp-Session-Id, Last-Event-ID"));
    set_header(h, expose_name, format!("{expose}, Mcp-Session-Id"));
}

/// What the front hands the MCP server through the request's extensions (rmcp passes the HTTP
/// request's parts to `call_tool`).
#[derive(Clone)]
struct McpRequest {
    app: Arc<AppState>,
    /// The HTTP request's X-Request-Id: each paid call gets its own call id under it.
    request_id: String,
    /// SHA-256 of the caller's key, checked by the front when the request needs one.
    key_hash: Option<String>,
}

/// Whether a tools/call of `name` needs the caller's key: `balance` and every paid tool.
fn needs_key(name: &str) -> bool {
    name == "balance" || Endpoint::from_name(name).is_some()
}

/// Everything of /mcp that happens before the MCP server (contract 3.11), then the server.
pub(crate) async fn serve(app: &Arc<AppState>, req: Request, request_id: &str) -> Result<Response, ApiError> {
    let method = req.method().clone();
    if method == Method::OPTIONS {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        set_header(res.headers_mut(), "access-control-allow-methods", "POST, OPTIONS");
        set_header(res.headers_mut(), "access-control-max-age", "86400");
        return Ok(res);
    }
    // Stateless: no server-initiated stream (GET), no session to end (DELETE).
    if method != Method::POST {
        return Err(ApiError::new(405, "method_not_allowed").header(header::ALLOW, "POST"));
    }
    let (mut parts, body) = req.into_parts();
    let raw = match read_bounded(&parts.headers, body, GATEWAY.max_body_bytes, false).await {
        Ok(raw) => raw,
        Err(e) if e.code == "invalid_json" => return Ok(parse_error()),
        Err(e) => return Err(e),
    };
    let Ok(message) = serde_json::from_slice::<Value>(&raw) else { return Ok(parse_error()) };
    // Batches were removed from MCP (2025-06-18) and rmcp refuses them (415, plain text): the
    // front refuses them whole, before any call runs or is charged, with a JSON-RPC error.
    if message.is_array() {
        return Ok(rpc_error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::INVALID_REQUEST,
            "Invalid Request: JSON-RPC batches are not supported (removed from MCP in 2025-06-18); send one message per request. Nothing was run or charged.",
            Value::Null,
            None,
        ));
    }
    // The key is read only for calls that need it (a key on discovery requests is not read), and
    // decided here, as HTTP 401, before the MCP server runs. An unknown key writes nothing.
    let mut key_hash = None;
    if message.get("method").and_then(Value::as_str) == Some("tools/call") {
        let params = message.get("params").unwrap_or(&Value::Null);
        if params.get("name").and_then(Value::as_str).is_some_and(needs_key) {
            let hash = bearer(&parts.headers, false)?;
            key_row(app, &hash, false).await?;
            key_hash = Some(hash);
        }
        // rmcp would refuse arguments that are not an object with its own error; the gateway's is
        // the contract's (-32602 invalid_input), as the shape check answers on /v1.
        if params.get("arguments").is_some_and(|a| !a.is_object() && !a.is_null()) {
            let id = message.get("id").cloned().unwrap_or(Value::Null);
            let err = ApiError::new(400, "invalid_input").message("Tool arguments must be a JSON object.").no_charge();
            let data = rpc_error(&err);
            return Ok(rpc_error_response(StatusCode::OK, data.code, &data.message, id, data.data));
        }
    }
    // Clients that send no Accept header (curl, scripts) get JSON: rmcp wants both types.
    let accept = parts.headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if !accept.contains("application/json") || !accept.contains("text/event-stream") {
        parts.headers.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
    }
    parts.extensions.insert(McpRequest { app: app.clone(), request_id: request_id.to_string(), key_hash });
    let service = mcp_service(app);
    let json_body = is_json_content_type(&parts.headers);
    let res = service.handle(Request::from_parts(parts, Body::from(raw))).await.map(Body::new);
    Ok(finish(res, json_body).await)
}

fn mcp_service(app: &AppState) -> StreamableHttpService<Gateway, NeverSessionManager> {
    StreamableHttpService::new(|| Ok(Gateway), Arc::new(NeverSessionManager::default()), server_config(app))
}

/// The transport settings of every MCP server the gateway runs (`/mcp`, and the one fronting a
/// stdio upstream): stateless, JSON answers unless a tool streams, the body bound, allowed hosts.
pub(crate) fn server_config(app: &AppState) -> StreamableHttpServerConfig {
    StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_max_request_body_bytes(usize::try_from(GATEWAY.max_body_bytes).unwrap_or(usize::MAX))
        // rmcp's default accepts only loopback Host headers (DNS-rebinding protection for local
        // servers); a gateway is reached by its public name and every tool that reads or spends
        // money needs a bearer key, so any host is accepted unless MCP_ALLOWED_HOSTS lists them.
        .with_allowed_hosts(app.mcp_allowed_hosts())
}

/// rmcp's answer with the gateway's headers; its plain-text refusals (406, 415, 403 Host, ...)
/// become JSON-RPC errors so that every body is JSON (contract section 2). rmcp answers 415 to a
/// JSON body that is not a JSON-RPC message too (`{}`, `"id": null`, `_meta` a string); with a JSON
/// Content-Type that is an invalid request (400 -32600), as on the Workers targets' 400.
pub(crate) async fn finish(res: Response, json_body: bool) -> Response {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
    let mut status = res.status();
    if status == StatusCode::UNSUPPORTED_MEDIA_TYPE && json_body {
        status = StatusCode::BAD_REQUEST;
    }
    if !is_json && status.as_u16() >= 400 {
        let (_, body) = res.into_parts();
        let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
        let code = if status.is_server_error() { ErrorCode::INTERNAL_ERROR } else { ErrorCode::INVALID_REQUEST };
        let mut out = rpc_error_response(status, code, String::from_utf8_lossy(&text).trim(), Value::Null, None);
        if status == StatusCode::METHOD_NOT_ALLOWED {
            set_header(out.headers_mut(), "allow", "POST");
        }
        return out;
    }
    let mut res = res;
    *res.status_mut() = status;
    if is_json {
        base_headers(res.headers_mut());
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    }
    res
}

pub(crate) fn parse_error() -> Response {
    rpc_error_response(StatusCode::BAD_REQUEST, ErrorCode::PARSE_ERROR, "Parse error: the body is not JSON the gateway can read (invalid UTF-8 or JSON, or nested more than 128 levels deep).", Value::Null, None)
}

/// A JSON-RPC error answered by the gateway itself (before or instead of the MCP server).
pub(crate) fn rpc_error_response(status: StatusCode, code: ErrorCode, message: &str, id: Value, data: Option<Value>) -> Response {
    let mut error = json!({ "code": code.0, "message": message });
    if let Some(data) = data {
        error["data"] = data;
    }
    json_response(status, &json!({ "jsonrpc": "2.0", "error": error, "id": id }))
}

/// A refusal of the billing core as the JSON-RPC error of contract 3.11: `data` carries the
/// contract's `code`, the no-charge note and the same extra fields as HTTP.
pub(crate) fn rpc_error(err: &ApiError) -> ErrorData {
    let code = match err.code {
        "invalid_input" | "not_found" => ErrorCode::INVALID_PARAMS,
        "insufficient_balance" => ErrorCode(-32002),
        "scope_denied" => ErrorCode(-32003),
        "rate_limited" => ErrorCode(-32004),
        "idempotency_mismatch" | "idempotency_in_progress" | "idempotency_response_not_stored" => ErrorCode(-32005),
        // Not reachable (the front checks the key before the MCP server runs); outside the spec's range.
        "invalid_key" | "missing_key" => ErrorCode(-32001),
        _ => ErrorCode::INTERNAL_ERROR,
    };
    let mut data = serde_json::Map::new();
    data.insert("code".into(), json!(err.code));
    data.insert("note".into(), json!(NO_CHARGE_NOTE));
    for (k, v) in &err.extra {
        data.insert((*k).into(), v.clone());
    }
    ErrorData::new(code, err.message_text(), Some(Value::Object(data)))
}

fn internal_error(what: &str) -> ErrorData {
    tracing::error!("mcp: {what}");
    rpc_error(&ApiError::internal())
}

fn to_result(value: Value) -> Result<CallToolResponse, ErrorData> {
    serde_json::from_value::<CallToolResult>(value).map(Into::into).map_err(|e| internal_error(&format!("tool result: {e}")))
}

/// A tool result whose text item is `body` as JSON and whose structuredContent is `body`.
fn tool_result(body: &Value, is_error: bool, meta: Option<Value>) -> Value {
    let mut result = json!({ "content": [{ "type": "text", "text": body.to_string() }], "structuredContent": body });
    if is_error {
        result["isError"] = json!(true);
    }
    if let Some(meta) = meta {
        result["_meta"] = meta;
    }
    result
}

/// A paid tool's success as an MCP result (contract 3.11), and what an Idempotency-Key replay
/// sends (the result as JSON; None past IDEMPOTENCY_MAX_STORED_BYTES). Called by the billing
/// core within the handler's time limit; an error is a handler failure.
pub(crate) async fn present(
    reply: Reply,
    store: bool,
    charged: i64,
    balance: i64,
    call_id: &str,
) -> Result<(Value, Option<StoredResponse>), String> {
    let (text, value) = match reply {
        Reply::Json(value) => (value.to_string(), value),
        Reply::Response(response) => {
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .map_err(|e| format!("handler response body failed: {e}"))?;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let value = serde_json::from_str::<Value>(&text).unwrap_or_else(|_| Value::String(text.clone()));
            (text, value)
        }
    };
    let structured = if value.is_object() { value } else { json!({ "result": value }) };
    let result = json!({
        "content": [{ "type": "text", "text": text }],
        "structuredContent": structured,
        "_meta": { "io.mcpay/charged_mcents": charged, "io.mcpay/balance_mcents": balance, "io.mcpay/request_id": call_id },
    });
    let stored = store.then(|| {
        let bytes = serde_json::to_vec(&result).unwrap_or_default();
        StoredResponse { status: 200, headers: Vec::new(), body: (bytes.len() <= IDEMPOTENCY_MAX_STORED_BYTES).then_some(bytes) }
    });
    Ok((result, stored))
}

/// The MCP server: the tools from mcpay.toml and the free tools.
#[derive(Clone, Copy)]
struct Gateway;

const NO_ARGUMENTS: &str = r#"{"type":"object","properties":{},"additionalProperties":false}"#;

/// tools/list: one tool per paid endpoint in CALL_TYPES order, then `pricing` and `balance`.
fn tools() -> &'static [Tool] {
    static TOOLS: OnceLock<Vec<Tool>> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let paid = Endpoint::ALL.iter().map(|ep| {
            json!({
                "name": ep.name(),
                "description": ep.description(),
                "inputSchema": serde_json::from_str::<Value>(ep.input_schema()).unwrap_or_else(|_| json!({ "type": "object" })),
                "_meta": { "io.mcpay/price_mcents": ep.price_mcents(), "io.mcpay/scope": ep.scope() },
            })
        });
        let free = [
            ("pricing", "Free: what every tool costs (the body of GET /v1/pricing). No key needed."),
            ("balance", "Free: your key's balance and stats (the body of GET /v1/me). Needs Authorization: Bearer <key>."),
        ]
        .into_iter()
        .map(|(name, description)| json!({ "name": name, "description": description, "inputSchema": serde_json::from_str::<Value>(NO_ARGUMENTS).unwrap_or_default() }));
        paid.chain(free).filter_map(|t| serde_json::from_value::<Tool>(t).ok()).collect()
    })
}

impl ServerHandler for Gateway {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_server_info(Implementation::new(PROJECT_NAME, PROJECT_VERSION))
    }

    async fn list_tools(&self, _: Option<PaginatedRequestParams>, _: RequestContext<RoleServer>) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools().to_vec()))
    }

    async fn call_tool(&self, params: CallToolRequestParams, cx: RequestContext<RoleServer>) -> Result<CallToolResponse, ErrorData> {
        let Some(mcp) = cx.extensions.get::<axum::http::request::Parts>().and_then(|p| p.extensions.get::<McpRequest>()).cloned() else {
            return Err(internal_error("request context missing"));
        };
        let name = params.name.as_ref();
        if name == "pricing" {
            return to_result(tool_result(&pricing_body(&mcp.app), false, None));
        }
        if name == "balance" {
            let Some(hash) = mcp.key_hash.as_deref() else { return Err(rpc_error(&ApiError::new(401, "missing_key"))) };
            let body = me_body(&mcp.app, hash).await.map_err(|e| rpc_error(&e))?;
            return to_result(tool_result(&body, false, None));
        }
        let Some(ep) = Endpoint::from_name(name) else {
            let short: String = name.chars().take(64).collect();
            return Err(rpc_error(&ApiError::new(400, "invalid_input").message(format!("Unknown tool \"{short}\".")).no_charge()));
        };
        // The front checked the key of every paid tool.
        let Some(key_hash) = mcp.key_hash.clone() else { return Err(rpc_error(&ApiError::new(401, "missing_key"))) };
        // params._meta arrives in the request context (rmcp moves it there).
        let idem_key = match cx.meta.get(IDEMPOTENCY_META) {
            None => None,
            Some(Value::String(k)) if valid_idempotency_key(k) => Some(k.clone()),
            Some(_) => {
                return Err(rpc_error(
                    &ApiError::new(400, "invalid_input")
                        .message(format!("_meta[\"{IDEMPOTENCY_META}\"] must be 32 to 128 characters from A-Z a-z 0-9 _ -."))
                        .no_charge(),
                ));
            }
        };
        let input = Value::Object(params.arguments.unwrap_or_default());
        // The "body" of an MCP call is its tool name and arguments (as the Workers targets hash it),
        // never equal to an HTTP body.
        let idem = idem_key.map(|key| {
            let hashed = format!("mcp:{}", json!([ep.name(), input]));
            Idem { key, body_sha256: hex::encode(Sha256::digest(hashed.as_bytes())) }
        });
        // Every tools/call is held and settled under its own id, made here (never the client's
        // JSON-RPC id).
        let call_id = format!("{}/mcp/{}", mcp.request_id, uuid::Uuid::new_v4());
        let call = PaidCall { ep, key_hash, input, idem, call_id: call_id.clone(), face: Face::Mcp };
        match run_paid_call(&mcp.app, call).await.map_err(|e| rpc_error(&e))? {
            PaidOutcome::Success(Answer::Mcp(result)) => to_result(result),
            PaidOutcome::Success(Answer::Http(_)) => Err(internal_error("an HTTP answer on the MCP face")),
            PaidOutcome::Replay(stored) => {
                let mut result = stored
                    .body
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .filter(Value::is_object)
                    .ok_or_else(|| internal_error("stored MCP result unreadable"))?;
                if !result.get("_meta").is_some_and(Value::is_object) {
                    result["_meta"] = json!({});
                }
                result["_meta"]["io.mcpay/idempotent_replayed"] = json!(true);
                to_result(result)
            }
            PaidOutcome::Failed(failed) => {
                let body = failed.error().body(&call_id);
                let meta = json!({
                    "io.mcpay/refunded": failed.refunded,
                    "io.mcpay/charged_mcents": failed.charged_mcents,
                    "io.mcpay/balance_mcents": failed.balance_mcents,
                    "io.mcpay/request_id": call_id,
                });
                to_result(tool_result(&body, true, Some(meta)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_parses_with_its_schema_and_terms() {
        let tools = tools();
        assert_eq!(tools.len(), Endpoint::ALL.len() + 2);
        for (tool, ep) in tools.iter().zip(Endpoint::ALL) {
            assert_eq!(tool.name, ep.name());
            let schema = serde_json::to_value(tool.input_schema.as_ref()).unwrap();
            assert_eq!(schema, serde_json::from_str::<Value>(ep.input_schema()).unwrap());
            let meta = serde_json::to_value(tool.meta.as_ref().unwrap()).unwrap();
            assert_eq!(meta, json!({ "io.mcpay/price_mcents": ep.price_mcents(), "io.mcpay/scope": ep.scope() }));
        }
    }

    #[test]
    fn refusals_carry_the_contract_code_and_fields() {
        let e = rpc_error(&ApiError::new(402, "insufficient_balance").no_charge().extra("price_mcents", 5).extra("balance_mcents", 1));
        assert_eq!(e.code.0, -32002);
        assert_eq!(
            e.data.unwrap(),
            json!({ "code": "insufficient_balance", "note": NO_CHARGE_NOTE, "price_mcents": 5, "balance_mcents": 1 })
        );
        assert_eq!(rpc_error(&ApiError::new(403, "scope_denied")).code.0, -32003);
        assert_eq!(rpc_error(&ApiError::new(429, "rate_limited")).code.0, -32004);
        assert_eq!(rpc_error(&ApiError::new(409, "idempotency_in_progress")).code.0, -32005);
        assert_eq!(rpc_error(&ApiError::new(400, "invalid_input")).code.0, -32602);
        assert_eq!(rpc_error(&ApiError::internal()).code.0, -32603);
    }
}
