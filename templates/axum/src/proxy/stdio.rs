//! `command` upstreams: a stdio MCP server the gateway spawns (rmcp's child-process client
//! transport), keeps alive and restarts when it dies. `/mcp/<name>` is then an MCP server of the
//! gateway's own (rmcp, Streamable HTTP, stateless) whose handler forwards `tools/list`,
//! `tools/call`, resources and prompts to the child through the rmcp client peer, with the same
//! billing as `url` upstreams ([`super::http::Paid`]) and the same `tools/list` rewrite.
//! Progress notifications of a call are relayed to the caller (the child sees a progress token
//! of the gateway's own, mapped back to the caller's).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, header};
use axum::response::Response;
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, ClientRequest, CallToolResult, GetPromptRequestParams, GetPromptResponse, Implementation,
    ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    ProgressNotificationParam, ProgressToken, ReadResourceRequestParams, ReadResourceResponse, ServerConfig, ServerResult,
};
use rmcp::service::{NotificationContext, Peer, PeerRequestOptions, RequestContext, RoleClient, RunningService, ServiceError};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpService, TokioChildProcess};
use rmcp::{ClientHandler, ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::json;

use super::http::{Paid, failure_result};
use super::{Checked, UPSTREAM_FAILED, UPSTREAM_TIMEOUT};
use crate::app::{AppState, HoldSpec, HoldStep, take_hold};
use crate::generated::UpstreamConfig;
use crate::http::{ApiError, set_header};
use crate::mcp::rpc_error;
use crate::store::KeyRow;

/// How long a stdio server may take to start and answer `initialize`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The running stdio servers, by upstream name (started on first use, restarted when dead).
#[derive(Default)]
pub(crate) struct Children {
    slots: tokio::sync::Mutex<HashMap<String, Child>>,
}

/// One running stdio server: the rmcp client service on its stdin/stdout.
#[derive(Clone)]
pub(crate) struct Child {
    service: Arc<RunningService<RoleClient, Relay>>,
    relay: Relay,
}

impl Child {
    fn alive(&self) -> bool {
        !self.service.is_closed() && !self.service.peer().is_transport_closed()
    }

    fn peer(&self) -> &Peer<RoleClient> {
        self.service.peer()
    }
}

impl Children {
    /// The running server of `name`, started (or restarted, when it died) as needed.
    pub(crate) async fn get(&self, name: &str, argv: &[&str]) -> Result<Child, String> {
        let mut slots = self.slots.lock().await;
        if let Some(child) = slots.get(name) {
            if child.alive() {
                return Ok(child.clone());
            }
            tracing::warn!(upstream = name, "stdio upstream exited; restarting it");
        }
        let (program, args) = argv.split_first().ok_or("empty command")?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).kill_on_drop(true);
        let transport = TokioChildProcess::new(cmd).map_err(|e| format!("spawn {program}: {e}"))?;
        let relay = Relay::default();
        let service = match tokio::time::timeout(START_TIMEOUT, relay.clone().serve(transport)).await {
            Ok(Ok(service)) => service,
            Ok(Err(e)) => return Err(format!("initialize: {e}")),
            Err(_) => return Err("initialize: no answer within 30 s".into()),
        };
        tracing::info!(upstream = name, "stdio upstream started");
        let child = Child { service: Arc::new(service), relay };
        slots.insert(name.to_string(), child.clone());
        Ok(child)
    }
}

/// The client side's handler: relays the child's progress notifications to the caller whose
/// call they belong to.
#[derive(Clone, Default)]
struct Relay {
    routes: Arc<std::sync::Mutex<HashMap<String, Route>>>,
}

/// Where the progress of one forwarded call goes: the caller's token and its server peer.
type Route = (ProgressToken, Peer<RoleServer>);

impl Relay {
    fn key(token: &ProgressToken) -> String {
        serde_json::to_string(token).unwrap_or_default()
    }
}

impl ClientHandler for Relay {
    async fn on_progress(&self, mut params: ProgressNotificationParam, _: NotificationContext<RoleClient>) {
        let route = self.routes.lock().ok().and_then(|r| r.get(&Relay::key(&params.progress_token)).cloned());
        if let Some((token, peer)) = route {
            params.progress_token = token;
            let _ = peer.notify_progress(params).await;
        }
    }
}

/// A route of progress notifications, removed when the call ends.
struct RouteGuard<'a> {
    relay: &'a Relay,
    key: Option<String>,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        if let (Some(key), Ok(mut routes)) = (self.key.take(), self.relay.routes.lock()) {
            routes.remove(&key);
        }
    }
}

/// What the front hands the handler through the request's extensions.
#[derive(Clone)]
struct StdioRequest {
    key: KeyRow,
    request_id: String,
    /// The terms of a paid call, for the answer's headers: (charged, balance, upstream ms).
    terms: Arc<std::sync::Mutex<Option<(i64, i64, u64)>>>,
}

pub(crate) async fn serve(
    app: &Arc<AppState>,
    u: &UpstreamConfig,
    child: Child,
    checked: Checked,
    req: Request,
    request_id: &str,
) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let raw = if parts.method == Method::POST {
        match super::read_message(&parts.headers, body).await? {
            Ok((raw, _)) => raw,
            Err(answer) => return Ok(*answer),
        }
    } else {
        Default::default()
    };
    let accept = parts.headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if !accept.contains("application/json") || !accept.contains("text/event-stream") {
        parts.headers.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
    }
    let terms = Arc::new(std::sync::Mutex::new(None));
    parts.extensions.insert(StdioRequest { key: checked.key, request_id: request_id.to_string(), terms: terms.clone() });
    let config = crate::mcp::server_config(app);
    let handler = Forward { app: app.clone(), u: *u, child };
    let service = StreamableHttpService::new(move || Ok(handler.clone()), Arc::new(NeverSessionManager::default()), config);
    let json_body = crate::body::is_json_content_type(&parts.headers);
    let started = std::time::Instant::now();
    let res = service.handle(Request::from_parts(parts, Body::from(raw))).await.map(Body::new);
    // Until the answer (JSON) or its stream's start: the stdio upstream has no response headers.
    let handled_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    // rmcp's plain-text refusals become JSON-RPC errors, as on /mcp.
    let mut res = crate::mcp::finish(res, json_body).await;
    if let Some((charged, balance, ms)) = terms.lock().ok().and_then(|t| *t) {
        set_header(res.headers_mut(), "x-charged-mcents", charged);
        set_header(res.headers_mut(), "x-balance-mcents", balance);
        set_header(res.headers_mut(), "x-upstream-duration-ms", ms);
    } else {
        set_header(res.headers_mut(), "x-upstream-duration-ms", handled_ms);
    }
    Ok(res)
}

/// The gateway's MCP server in front of one stdio upstream.
#[derive(Clone)]
struct Forward {
    app: Arc<AppState>,
    u: UpstreamConfig,
    child: Child,
}

fn upstream_error(e: ServiceError) -> ErrorData {
    match e {
        ServiceError::McpError(e) => e,
        other => {
            tracing::warn!(error = %other, "stdio upstream failed");
            ErrorData::internal_error("The upstream MCP server failed.", Some(json!({ "code": "upstream_failed" })))
        }
    }
}

impl Forward {
    /// Forwards one tools/call to the child within the upstream's time limit, relaying its
    /// progress notifications to the caller (rmcp gives the child request a progress token of
    /// its own, mapped back to the caller's). `Err(())`: no answer in time.
    async fn forward(&self, params: CallToolRequestParams, cx: &RequestContext<RoleServer>) -> Result<Result<CallToolResult, ServiceError>, ()> {
        let limit = super::time_limit(&self.u);
        let mut params = params;
        params.meta = Some(cx.meta.clone());
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
        let handle = match self.child.peer().send_request_with_option(request, PeerRequestOptions::with_timeout(limit)).await {
            Ok(handle) => handle,
            Err(e) => return Ok(Err(e)),
        };
        let mut route = RouteGuard { relay: &self.child.relay, key: None };
        if let Some(token) = cx.meta.get_progress_token() {
            let key = Relay::key(&handle.progress_token);
            if let Ok(mut routes) = self.child.relay.routes.lock() {
                routes.insert(key.clone(), (token, cx.peer.clone()));
            }
            route.key = Some(key);
        }
        let out = match tokio::time::timeout(limit + Duration::from_secs(1), handle.await_response()).await {
            Err(_) | Ok(Err(ServiceError::Timeout { .. })) => Err(()),
            Ok(Ok(ServerResult::CallToolResult(result))) => Ok(Ok(result)),
            Ok(Ok(_)) => Ok(Err(ServiceError::UnexpectedResponse)),
            Ok(Err(e)) => Ok(Err(e)),
        };
        drop(route);
        out
    }
}

impl ServerHandler for Forward {
    fn get_info(&self) -> ServerConfig {
        let info = self.child.peer().peer_info();
        let caps = info.as_ref().map(|i| i.capabilities.clone()).unwrap_or_default();
        let server = info
            .as_ref()
            .and_then(|i| i.server_info.clone())
            .unwrap_or_else(|| Implementation::new(self.u.name, env!("CARGO_PKG_VERSION")));
        let mut config = ServerConfig::new(caps).with_server_info(server);
        if let Some(instructions) = info.as_ref().and_then(|i| i.instructions.clone()) {
            config = config.with_instructions(instructions);
        }
        config
    }

    async fn list_tools(&self, request: Option<PaginatedRequestParams>, _: RequestContext<RoleServer>) -> Result<ListToolsResult, ErrorData> {
        let result = self.child.peer().list_tools(request).await.map_err(upstream_error)?;
        let mut value = serde_json::to_value(&result).map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        super::rewrite_tools(&self.u, &mut value);
        serde_json::from_value(value).map_err(|e| ErrorData::internal_error(e.to_string(), None))
    }

    async fn call_tool(&self, params: CallToolRequestParams, cx: RequestContext<RoleServer>) -> Result<CallToolResponse, ErrorData> {
        let Some(req) = cx.extensions.get::<axum::http::request::Parts>().and_then(|p| p.extensions.get::<StdioRequest>()).cloned() else {
            return Err(ErrorData::internal_error("request context missing", None));
        };
        let tool = params.name.to_string();
        let price = super::tool_price(&self.u, &tool);
        if price == 0 {
            return match self.forward(params, &cx).await {
                Ok(Ok(result)) => Ok(result.into()),
                Ok(Err(e)) => Err(upstream_error(e)),
                Err(()) => Err(ErrorData::internal_error("The upstream MCP server did not answer in time.", Some(json!({ "code": "upstream_timeout" })))),
            };
        }
        if !super::valid_tool_name(&tool) {
            let message = format!("params.name must be a tool name of 1 to {} printable ASCII characters (no spaces).", super::MAX_TOOL_NAME_BYTES);
            return Err(rpc_error(&ApiError::new(400, "invalid_input").message(message).no_charge()));
        }
        // Hold, forward and settle in a task of its own: a caller that goes away does not stop
        // the settlement.
        let this = self.clone();
        let task = tokio::spawn(async move {
            let endpoint = format!("{}/{}", this.u.name, tool);
            let rate_bucket = format!("upstream:{}", this.u.name);
            let spec = HoldSpec {
                endpoint: &endpoint,
                scope: this.u.scope,
                price,
                xp: 0,
                rate_limit_per_minute: this.u.rate_limit_per_minute,
                rate_bucket: &rate_bucket,
                time_limit: super::time_limit(&this.u),
            };
            let held = match take_hold(&this.app, &spec, &req.key, &req.request_id, None).await {
                Ok(HoldStep::Held(held)) => held,
                Ok(HoldStep::Idempotent(_)) => return Err(rpc_error(&ApiError::internal())),
                Err(refused) => return Err(rpc_error(&refused)),
            };
            let paid = Paid {
                app: this.app.clone(),
                key_ref: held.key_ref,
                price,
                balance: held.balance,
                call_id: req.request_id.clone(),
                refund_tool_errors: this.u.refund_tool_errors,
                endpoint,
            };
            let started = Instant::now();
            let outcome = this.forward(params, &cx).await;
            let ms = started.elapsed().as_millis() as u64;
            let answer = match outcome {
                Ok(Ok(result)) => {
                    let mut message = json!({ "result": result });
                    let s = paid.settle_response(&mut message).await;
                    Some((s.charged, s.balance, Ok(message["result"].take())))
                }
                // The upstream's JSON-RPC error: released, answered as it is.
                Ok(Err(ServiceError::McpError(e))) => {
                    let mut message = json!({ "error": e });
                    let s = paid.settle_response(&mut message).await;
                    Some((s.charged, s.balance, Err(e)))
                }
                // The child died (or broke the protocol) before answering: released; the next
                // request restarts it.
                Ok(Err(e)) => {
                    tracing::warn!(upstream = this.u.name, request_id = %req.request_id, error = %e, "stdio upstream failed the call");
                    let f = paid.release_failed(&UPSTREAM_FAILED).await;
                    Some((f.charged_mcents, f.balance_mcents, Ok(failure_result(&f, &req.request_id))))
                }
                Err(()) => {
                    tracing::warn!(upstream = this.u.name, request_id = %req.request_id, "stdio upstream timed out");
                    let f = paid.release_failed(&UPSTREAM_TIMEOUT).await;
                    Some((f.charged_mcents, f.balance_mcents, Ok(failure_result(&f, &req.request_id))))
                }
            };
            let Some((charged, balance, answer)) = answer else { return Err(rpc_error(&ApiError::internal())) };
            if let Ok(mut t) = req.terms.lock() {
                *t = Some((charged, balance, ms));
            }
            match answer {
                Ok(result) => serde_json::from_value::<CallToolResult>(result)
                    .map(Into::into)
                    .map_err(|e| ErrorData::internal_error(format!("tool result: {e}"), None)),
                Err(e) => Err(e),
            }
        });
        task.await.unwrap_or_else(|e| Err(ErrorData::internal_error(format!("call task: {e}"), None)))
    }

    async fn list_resources(&self, request: Option<PaginatedRequestParams>, _: RequestContext<RoleServer>) -> Result<ListResourcesResult, ErrorData> {
        self.child.peer().list_resources(request).await.map_err(upstream_error)
    }

    async fn list_resource_templates(
        &self,
        request: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        self.child.peer().list_resource_templates(request).await.map_err(upstream_error)
    }

    async fn read_resource(&self, request: ReadResourceRequestParams, _: RequestContext<RoleServer>) -> Result<ReadResourceResponse, ErrorData> {
        self.child.peer().read_resource(request).await.map(Into::into).map_err(upstream_error)
    }

    async fn list_prompts(&self, request: Option<PaginatedRequestParams>, _: RequestContext<RoleServer>) -> Result<ListPromptsResult, ErrorData> {
        self.child.peer().list_prompts(request).await.map_err(upstream_error)
    }

    async fn get_prompt(&self, request: GetPromptRequestParams, _: RequestContext<RoleServer>) -> Result<GetPromptResponse, ErrorData> {
        self.child.peer().get_prompt(request).await.map(Into::into).map_err(upstream_error)
    }
}
