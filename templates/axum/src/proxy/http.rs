//! `url` upstreams: the JSON-RPC messages of `/mcp/<name>` forwarded over Streamable HTTP with
//! reqwest. Free messages stream through untouched; a `tools/list` answer and a paid
//! `tools/call` answer are read (JSON: whole, bounded; SSE: event by event, streamed on) so
//! that the response can be rewritten and, for a paid call, settled before it is written.
//! The exchange with the upstream runs in a task of its own that feeds the caller's body through
//! a channel: a caller that goes away does not stop the upstream's answer from being read (within
//! `timeout_ms`) and the hold from being settled. The exchange reads an [`Answer`] from a
//! [`Source`]: a request sent here, or a legacy HTTP+SSE session ([`super::sse`]), so both
//! transports share every settlement, timeout and relay rule.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::{Checked, Kind, MAX_ANSWER_BYTES, UPSTREAM_FAILED, UPSTREAM_TIMEOUT};
use crate::app::{AppState, FailedCall, FailureText, HoldSpec, HoldStep, capture_hold, release_hold, take_hold};
use crate::generated::UpstreamConfig;
use crate::http::{ApiError, base_headers, set_header};
use crate::store::{CaptureOutcome, KeyRow, ReleaseReason};

/// The head and body of an upstream's answer to one forwarded message.
pub(crate) struct Answer {
    pub status: StatusCode,
    /// The upstream's response headers (only FORWARD_RESPONSE reach the caller).
    pub headers: HeaderMap,
    pub body: BoxStream<'static, Result<Bytes, std::io::Error>>,
}

impl From<reqwest::Response> for Answer {
    fn from(resp: reqwest::Response) -> Self {
        let status = resp.status();
        let headers = resp.headers().clone();
        Answer { status, headers, body: resp.bytes_stream().map(|c| c.map_err(std::io::Error::other)).boxed() }
    }
}

/// Where an exchange gets its answer from: resolves once the upstream's answer head is known
/// (`Err`: the upstream could not be reached or broke the protocol, logged). Run within the
/// call's deadline, and dropped (the upstream request aborted) when it passes.
pub(crate) type Source = Pin<Box<dyn Future<Output = Result<Answer, String>> + Send>>;

/// A request to a Streamable HTTP upstream as a [`Source`].
fn sent(builder: reqwest::RequestBuilder) -> Source {
    Box::pin(async move { builder.send().await.map(Answer::from).map_err(|e| e.to_string()) })
}

/// Where a `url` upstream is reached: its URL (after the env override), the configured headers
/// with their values, and the shared client.
pub(crate) struct Target {
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub client: reqwest::Client,
}

/// Request headers forwarded to the upstream (besides the configured ones and a body's
/// `Content-Type: application/json`). Never the caller's Authorization, Cookie, X-Admin-Key,
/// Payment*, Content-Type, hop-by-hop headers, nor Last-Event-ID (a resumed stream would replay
/// responses of calls already settled).
const FORWARD_REQUEST: [HeaderName; 3] =
    [header::ACCEPT, HeaderName::from_static("mcp-session-id"), HeaderName::from_static("mcp-protocol-version")];

/// Response headers passed back to the caller.
const FORWARD_RESPONSE: [HeaderName; 3] =
    [header::CONTENT_TYPE, HeaderName::from_static("mcp-session-id"), HeaderName::from_static("mcp-protocol-version")];

pub(crate) async fn serve(
    app: &Arc<AppState>,
    u: &UpstreamConfig,
    target: Target,
    checked: Checked,
    req: Request,
    request_id: &str,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    if parts.method != Method::POST {
        // GET (the server's event stream) and DELETE (end of a session): forwarded as they are.
        let builder = upstream_request(&target, parts.method.clone(), &parts.headers, None);
        return forward_free(u, builder, parts.method == Method::GET).await;
    }
    let (raw, message) = match super::read_message(&parts.headers, body).await? {
        Ok(read) => read,
        Err(answer) => return Ok(*answer),
    };
    let kind = super::classify(u, &message);
    match kind {
        Kind::Free => forward_free(u, upstream_request(&target, Method::POST, &parts.headers, Some(raw)), false).await,
        Kind::List { id } => {
            let builder = upstream_request(&target, Method::POST, &parts.headers, Some(raw));
            Ok(exchange(u, request_id, sent(builder), id.clone(), id, Hook::List { u: *u }).await)
        }
        Kind::Paid { tool, price, id } => {
            let send = |forwarded: Bytes, _: &Value| sent(upstream_request(&target, Method::POST, &parts.headers, Some(forwarded)));
            forward_paid(app, u, checked, request_id, &message, tool, price, id, send).await
        }
    }
}

/// A paid `tools/call` (`tool` of `message`, priced `price`, the caller's `id`): forwarded
/// re-serialized under an id of the gateway's own by `send` (given the body and that id), so
/// that only the response to it settles the call, and the caller gets its own id back.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward_paid(
    app: &Arc<AppState>,
    u: &UpstreamConfig,
    checked: Checked,
    request_id: &str,
    message: &Value,
    tool: String,
    price: i64,
    id: Value,
    send: impl FnOnce(Bytes, &Value) -> Source,
) -> Result<Response, ApiError> {
    if let Err(answer) = super::check_tool_name(&tool, &id) {
        return Ok(*answer);
    }
    let upstream_id = super::upstream_call_id(request_id);
    let forwarded = serde_json::to_vec(&super::paid_message(message, &upstream_id)).unwrap_or_default();
    let match_id = Value::String(upstream_id);
    // Lazy: nothing reaches the upstream before the hold is taken.
    let source = send(Bytes::from(forwarded), &match_id);
    // The hold and the exchange run in a task of their own: once the hold is taken, a caller
    // that goes away cannot stop it from being settled.
    let (app, u, key, rid) = (app.clone(), *u, checked.key, request_id.to_string());
    let task = tokio::spawn(async move { paid_call(&app, &u, tool, price, id, match_id, &key, &rid, source).await });
    task.await.map_err(|e| {
        tracing::error!(request_id, error = %e, "paid upstream call task failed");
        ApiError::internal()
    })
}

/// A paid `tools/call`: the hold of the tool's price under `<NAME>/<tool>` (refusals are
/// JSON-RPC errors with the request's id, nothing forwarded), then the exchange.
#[allow(clippy::too_many_arguments)]
async fn paid_call(
    app: &Arc<AppState>,
    u: &UpstreamConfig,
    tool: String,
    price: i64,
    id: Value,
    match_id: Value,
    key: &KeyRow,
    request_id: &str,
    source: Source,
) -> Response {
    let endpoint = format!("{}/{}", u.name, tool);
    let rate_bucket = format!("upstream:{}", u.name);
    let spec = HoldSpec {
        endpoint: &endpoint,
        scope: u.scope,
        price,
        xp: 0,
        rate_limit_per_minute: u.rate_limit_per_minute,
        rate_bucket: &rate_bucket,
        time_limit: super::time_limit(u),
    };
    // The call id is the request's X-Request-Id (one call per request: no batches).
    let held = match take_hold(app, &spec, key, request_id, None).await {
        Ok(HoldStep::Held(held)) => held,
        Ok(HoldStep::Idempotent(_)) => return ApiError::internal().into_response(request_id),
        Err(refused) => return super::refusal(&refused, id),
    };
    let paid = Paid {
        app: app.clone(),
        key_ref: held.key_ref,
        price,
        balance: held.balance,
        call_id: request_id.to_string(),
        refund_tool_errors: u.refund_tool_errors,
        endpoint,
    };
    exchange(u, request_id, source, id, match_id, Hook::Paid(paid)).await
}

pub(crate) fn upstream_request(target: &Target, method: Method, headers: &HeaderMap, body: Option<Bytes>) -> reqwest::RequestBuilder {
    let mut out = HeaderMap::new();
    for name in FORWARD_REQUEST {
        for v in headers.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    // MCP clients accept both answer types; scripts often send no Accept or `*/*` (taken, as
    // /mcp takes it): the upstream is asked for what the transport needs.
    let accept = out.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if method == Method::GET && !accept.contains("text/event-stream") {
        out.insert(header::ACCEPT, HeaderValue::from_static("text/event-stream"));
    } else if method == Method::POST && !(accept.contains("application/json") && accept.contains("text/event-stream")) {
        out.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
    }
    for (name, value) in &target.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            out.insert(n, v);
        }
    }
    if body.is_some() {
        out.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let mut builder = target.client.request(method, &target.url).headers(out);
    if let Some(body) = body {
        builder = builder.body(body);
    }
    builder
}

fn duration_header(res: &mut Response, started: Instant) {
    set_header(res.headers_mut(), "x-upstream-duration-ms", started.elapsed().as_millis() as u64);
}

fn copy_response_headers(from: &reqwest::header::HeaderMap, to: &mut HeaderMap) {
    for name in FORWARD_RESPONSE {
        if let Some(v) = from.get(&name) {
            to.insert(name, v.clone());
        }
    }
    base_headers(to);
}

/// A free message: the upstream's answer streamed back untouched (status, content type, session
/// headers). No hold, no ledger row, no rate limit. `drop_responses` (GET streams): the events
/// that are JSON-RPC responses are dropped (a replayed response must not reach the caller).
async fn forward_free(u: &UpstreamConfig, builder: reqwest::RequestBuilder, drop_responses: bool) -> Result<Response, ApiError> {
    let started = Instant::now();
    let resp = match tokio::time::timeout(super::time_limit(u), builder.send()).await {
        Err(_) => return Err(ApiError::new(504, "upstream_timeout").message("The upstream MCP server did not answer in time.")),
        Ok(Err(e)) => {
            tracing::warn!(upstream = u.name, error = %e, "upstream unreachable");
            return Err(ApiError::new(502, "upstream_failed").message("The upstream MCP server could not be reached."));
        }
        Ok(Ok(resp)) => resp,
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    copy_response_headers(resp.headers(), &mut headers);
    let sse = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.to_ascii_lowercase().starts_with("text/event-stream"));
    let body = if drop_responses && sse {
        let events = sse_stream::SseStream::from_bytes_stream(super::cap_events(resp.bytes_stream()));
        Body::from_stream(events.take_while(|e| std::future::ready(e.is_ok())).filter_map(|e| {
            std::future::ready(match e {
                Ok(event) if !is_any_response(&event) => Some(Ok::<_, Infallible>(encode_sse(&event))),
                _ => None,
            })
        }))
    } else {
        Body::from_stream(resp.bytes_stream())
    };
    let mut res = Response::new(body);
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    duration_header(&mut res, started);
    Ok(res)
}

/// How long, once a call is answered, relaying waits for a caller that does not read.
const RELAY_AFTER_ANSWER: std::time::Duration = std::time::Duration::from_secs(30);

/// A paid call held for the duration of the exchange.
pub(crate) struct Paid {
    pub app: Arc<AppState>,
    pub key_ref: i64,
    pub price: i64,
    pub balance: i64,
    pub call_id: String,
    pub refund_tool_errors: bool,
    pub endpoint: String,
}

/// What the answer to the forwarded request needs: the `tools/list` rewrite, the settlement, or
/// nothing (a free message of a legacy HTTP+SSE upstream).
pub(crate) enum Hook {
    List { u: UpstreamConfig },
    Paid(Paid),
    Free,
}

/// How a paid call settled, for its answer.
pub(crate) struct Settled {
    pub charged: i64,
    pub balance: i64,
    pub refunded: bool,
    /// The settlement failed or its outcome is unknown: the price is counted as charged until
    /// the sweeper settles the hold.
    pub refund_pending: bool,
}

impl Paid {
    /// Settles by the upstream's JSON-RPC response and writes the terms into its result.
    pub(crate) async fn settle_response(&self, message: &mut Value) -> Settled {
        let is_error_result = message.get("result").and_then(|r| r.get("isError")).and_then(Value::as_bool) == Some(true);
        let rpc_error = message.get("error").is_some() || message.get("result").is_none();
        let settled = if rpc_error || (is_error_result && self.refund_tool_errors) {
            self.release(&UPSTREAM_FAILED).await
        } else {
            match capture_hold(&self.app, self.key_ref, &self.call_id, None).await {
                Some(CaptureOutcome::Captured { balance_mcents }) => {
                    Settled { charged: self.price, balance: balance_mcents, refunded: false, refund_pending: false }
                }
                // The capture kept failing: the answer is still sent and the sweeper releases the hold.
                None => Settled { charged: self.price, balance: self.balance, refunded: false, refund_pending: true },
                // Released meanwhile (swept past its deadline): nothing is charged.
                Some(CaptureOutcome::Released { balance_mcents }) => {
                    tracing::warn!(request_id = %self.call_id, endpoint = %self.endpoint, "hold released before its capture");
                    Settled { charged: 0, balance: balance_mcents, refunded: true, refund_pending: false }
                }
                // No such hold: the outcome is not known, never answered as "no charge".
                Some(CaptureOutcome::Unknown { balance_mcents }) => {
                    tracing::error!(request_id = %self.call_id, endpoint = %self.endpoint, "hold unknown at its capture");
                    Settled { charged: self.price, balance: balance_mcents, refunded: false, refund_pending: true }
                }
            }
        };
        if let Some(result) = message.get_mut("result") {
            super::add_terms(result, settled.charged, settled.balance, &self.call_id, settled.refunded, settled.refund_pending);
        }
        tracing::info!(
            request_id = %self.call_id,
            endpoint = %self.endpoint,
            charged_mcents = settled.charged,
            refunded = settled.refunded,
            "upstream call settled"
        );
        settled
    }

    /// Releases the hold for an upstream failure (always, never counted against the refund cap).
    async fn release(&self, text: &FailureText) -> Settled {
        let f = self.release_failed(text).await;
        Settled { charged: f.charged_mcents, balance: f.balance_mcents, refunded: f.refunded, refund_pending: f.refund_pending == Some(true) }
    }

    pub(crate) async fn release_failed(&self, text: &FailureText) -> FailedCall {
        release_hold(&self.app, self.key_ref, &self.call_id, ReleaseReason::Upstream, self.price, self.balance, text).await
    }
}

/// The answer of a failed exchange: paid → released, the error shape with the settlement's
/// fields; free → the error shape.
async fn failed(hook: &Hook, text: &FailureText, request_id: &str) -> Response {
    match hook {
        Hook::Paid(paid) => paid.release_failed(text).await.http_response(request_id),
        Hook::List { .. } | Hook::Free => ApiError::new(text.status, text.code).message(text.kept).into_response(request_id),
    }
}

fn paid_headers(res: &mut Response, charged: i64, balance: i64) {
    set_header(res.headers_mut(), "x-charged-mcents", charged);
    set_header(res.headers_mut(), "x-balance-mcents", balance);
}

/// Runs `source` and produces the answer in a task of its own; returns as soon as the answer's
/// head is known (JSON: once settled; SSE: at once, the events follow). The deadline
/// (`timeout_ms`) counts from here. `id` is the caller's; `match_id` the one the response
/// carries (a paid call's: the gateway's).
pub(crate) async fn exchange(u: &UpstreamConfig, request_id: &str, source: Source, id: Value, match_id: Value, hook: Hook) -> Response {
    let (head_tx, head_rx) = oneshot::channel::<Response>();
    let (u, rid) = (*u, request_id.to_string());
    tokio::spawn(async move { run_exchange(u, rid, source, id, match_id, hook, head_tx).await });
    match head_rx.await {
        Ok(res) => res,
        Err(_) => ApiError::internal().into_response(request_id),
    }
}

async fn run_exchange(u: UpstreamConfig, rid: String, source: Source, id: Value, match_id: Value, hook: Hook, head: oneshot::Sender<Response>) {
    let deadline = tokio::time::Instant::now() + super::time_limit(&u);
    let name = u.name;
    let started = Instant::now();
    let resp = match tokio::time::timeout_at(deadline, source).await {
        Err(_) => {
            tracing::warn!(upstream = name, request_id = %rid, "upstream timed out");
            let mut res = failed(&hook, &UPSTREAM_TIMEOUT, &rid).await;
            duration_header(&mut res, started);
            let _ = head.send(res);
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(upstream = name, request_id = %rid, error = %e, "upstream unreachable");
            let mut res = failed(&hook, &UPSTREAM_FAILED, &rid).await;
            duration_header(&mut res, started);
            let _ = head.send(res);
            return;
        }
        Ok(Ok(resp)) => resp,
    };
    let headers_after = started.elapsed();
    let status = resp.status;
    let mut head_headers = HeaderMap::new();
    copy_response_headers(&resp.headers, &mut head_headers);
    set_header(&mut head_headers, "x-upstream-duration-ms", headers_after.as_millis() as u64);
    let content_type = resp.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let sse = content_type.starts_with("text/event-stream");

    if !status.is_success() || !(sse || content_type.starts_with("application/json")) {
        // Refused or not JSON-RPC: released; a 4xx answers with the upstream's status and body.
        let body = tokio::time::timeout_at(deadline, read_capped(resp.body)).await.ok().and_then(Result::ok);
        tracing::warn!(upstream = name, request_id = %rid, status = status.as_u16(), "upstream refused the call");
        let mut res = match (&hook, body) {
            (Hook::Paid(paid), Some(body)) if status.is_client_error() => {
                let f = paid.release_failed(&UPSTREAM_FAILED).await;
                let mut res = Response::new(Body::from(body));
                *res.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                *res.headers_mut() = head_headers.clone();
                paid_headers(&mut res, f.charged_mcents, f.balance_mcents);
                res
            }
            (Hook::List { .. } | Hook::Free, Some(body)) if status.is_client_error() => {
                let mut res = Response::new(Body::from(body));
                *res.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                *res.headers_mut() = head_headers.clone();
                res
            }
            _ => failed(&hook, &UPSTREAM_FAILED, &rid).await,
        };
        set_header(res.headers_mut(), "x-upstream-duration-ms", headers_after.as_millis() as u64);
        let _ = head.send(res);
        return;
    }

    if !sse {
        // application/json: read whole (bounded), settled, then sent.
        let body = match tokio::time::timeout_at(deadline, read_capped(resp.body)).await {
            Err(_) => Err(&UPSTREAM_TIMEOUT),
            Ok(Err(())) => Err(&UPSTREAM_FAILED),
            Ok(Ok(body)) => Ok(body),
        };
        let message = body.and_then(|b| serde_json::from_slice::<Value>(&b).ok().filter(|m| is_response_to(m, &match_id)).ok_or(&UPSTREAM_FAILED));
        let mut res = match message {
            Err(text) => failed(&hook, text, &rid).await,
            Ok(mut message) => {
                message["id"] = id.clone();
                let terms = apply(&hook, &mut message).await;
                let mut res = Response::new(Body::from(serde_json::to_vec(&message).unwrap_or_default()));
                *res.headers_mut() = head_headers;
                if let Some(s) = terms {
                    paid_headers(&mut res, s.charged, s.balance);
                }
                res
            }
        };
        set_header(res.headers_mut(), "x-upstream-duration-ms", headers_after.as_millis() as u64);
        let _ = head.send(res);
        return;
    }

    // text/event-stream: streamed event by event; the response event is settled before it is
    // written. Headers now: a paid call's terms are the hold's (the final ones are in `_meta`).
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    let mut res = Response::new(Body::from_stream(body));
    *res.headers_mut() = head_headers;
    if let Hook::Paid(p) = &hook {
        paid_headers(&mut res, p.price, p.balance);
    }
    let mut caller_gone = head.send(res).is_err();
    let paid = matches!(hook, Hook::Paid(_));
    let mut events = sse_stream::SseStream::from_bytes_stream(super::cap_events(resp.body));
    let mut answered = false;
    let mut relayed: usize = 0;
    loop {
        let next = if answered {
            // After the response: relay what the upstream still sends while the caller listens.
            if caller_gone {
                break;
            }
            events.next().await
        } else {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(next) => next,
                Err(_) => {
                    tracing::warn!(upstream = name, request_id = %rid, "upstream timed out mid-stream");
                    let event = failure_event(&hook, &UPSTREAM_TIMEOUT, &id, &rid).await;
                    let _ = tx.send(event).await;
                    return;
                }
            }
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                tracing::warn!(upstream = name, request_id = %rid, error = %e, "upstream event stream failed");
                break;
            }
            None => break,
        };
        let mut event = event;
        if !answered {
            match event.data.as_deref().and_then(|data| serde_json::from_str::<Value>(data).ok()) {
                Some(mut message) if is_response_to(&message, &match_id) => {
                    answered = true;
                    message["id"] = id.clone();
                    apply(&hook, &mut message).await;
                    event.data = Some(message.to_string());
                }
                Some(message) if is_request_or_notification(&message) => {}
                // Until a paid call is settled, nothing else reaches the caller (no look-alike
                // of its response, no other call's response).
                _ if paid => continue,
                _ => {}
            }
        }
        relayed += 1;
        if !caller_gone {
            // A caller that stops reading must not hold up the settlement: before the response,
            // writing waits at most until the deadline, then the caller counts as gone.
            let sent = if answered {
                // Settled already: a caller that stops reading is let go after a while.
                matches!(tokio::time::timeout(RELAY_AFTER_ANSWER, tx.send(encode_sse(&event))).await, Ok(Ok(())))
            } else {
                matches!(tokio::time::timeout_at(deadline, tx.send(encode_sse(&event))).await, Ok(Ok(())))
            };
            caller_gone = !sent;
        }
    }
    if !answered {
        tracing::warn!(upstream = name, request_id = %rid, events = relayed, "upstream stream ended before the response");
        let event = failure_event(&hook, &UPSTREAM_FAILED, &id, &rid).await;
        let _ = tx.send(event).await;
    }
}

/// The rewrite (tools/list) or settlement (paid call) of the response message.
async fn apply(hook: &Hook, message: &mut Value) -> Option<Settled> {
    match hook {
        Hook::List { u } => {
            if let Some(result) = message.get_mut("result") {
                super::rewrite_tools(u, result);
            }
            None
        }
        Hook::Paid(paid) => Some(paid.settle_response(message).await),
        Hook::Free => None,
    }
}

/// The event that ends a stream whose upstream failed before its response: a paid call's
/// failure result (contract 3.11's shape: isError, the error body, the settlement in `_meta`),
/// else a JSON-RPC error.
async fn failure_event(hook: &Hook, text: &FailureText, id: &Value, request_id: &str) -> Bytes {
    let message = match hook {
        Hook::Paid(paid) => {
            let f = paid.release_failed(text).await;
            json!({ "jsonrpc": "2.0", "id": id, "result": failure_result(&f, request_id) })
        }
        Hook::List { .. } | Hook::Free => super::failure_message(id, text.code, text.kept),
    };
    encode_sse(&sse_stream::Sse::default().event("message").data(message.to_string()))
}

/// A paid call that failed after its hold, as a tool result (contract 3.11's shape): isError, the
/// error body as structuredContent and text, the settlement in `_meta`.
pub(crate) fn failure_result(f: &FailedCall, request_id: &str) -> Value {
    let body = f.error().body(request_id);
    let mut result = json!({
        "content": [{ "type": "text", "text": body.to_string() }],
        "structuredContent": body,
        "isError": true,
    });
    super::add_terms(&mut result, f.charged_mcents, f.balance_mcents, request_id, f.refunded, f.refund_pending == Some(true));
    result
}

/// Whether `message` is the JSON-RPC response (result or error) to the request `id`.
pub(crate) fn is_response_to(message: &Value, id: &Value) -> bool {
    message.get("method").is_none()
        && message.get("id") == Some(id)
        && (message.get("result").is_some_and(Value::is_object) || message.get("error").is_some_and(Value::is_object))
}

/// Whether `message` is a request or a notification of the upstream (a `method`, and neither a
/// `result` nor an `error`: a message carrying both is not relayed before a paid call settles).
pub(crate) fn is_request_or_notification(message: &Value) -> bool {
    message.get("method").is_some() && message.get("result").is_none() && message.get("error").is_none()
}

/// Whether an event of a GET stream is (or holds, in a batch) a JSON-RPC response.
fn is_any_response(event: &sse_stream::Sse) -> bool {
    let is_response = |m: &Value| m.get("method").is_none() && (m.get("result").is_some() || m.get("error").is_some());
    match event.data.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok()) {
        Some(Value::Array(items)) => items.iter().any(is_response),
        Some(m) => is_response(&m),
        None => false,
    }
}

/// Reads an upstream's body up to MAX_ANSWER_BYTES (more, or a read error: `Err`).
async fn read_capped(mut stream: BoxStream<'static, Result<Bytes, std::io::Error>>) -> Result<Vec<u8>, ()> {
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ())?;
        if buf.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// One server-sent event in the wire format (every data line prefixed, a blank line after).
pub(crate) fn encode_sse(event: &sse_stream::Sse) -> Bytes {
    let mut out = String::new();
    if let Some(name) = &event.event {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    if let Some(id) = &event.id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    if let Some(retry) = event.retry {
        out.push_str(&format!("retry: {retry}\n"));
    }
    if let Some(data) = &event.data {
        for line in data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push('\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let e = sse_stream::Sse::default().event("message").id("7").data("{\"a\":1}\n{\"b\":2}");
        assert_eq!(encode_sse(&e), Bytes::from("event: message\nid: 7\ndata: {\"a\":1}\ndata: {\"b\":2}\n\n"));
    }

    #[test]
    fn responses_are_matched_by_id() {
        let id = json!(3);
        assert!(is_response_to(&json!({ "jsonrpc": "2.0", "id": 3, "result": {} }), &id));
        assert!(is_response_to(&json!({ "jsonrpc": "2.0", "id": 3, "error": { "code": 1 } }), &id));
        assert!(!is_response_to(&json!({ "jsonrpc": "2.0", "id": "3", "result": {} }), &id));
        assert!(!is_response_to(&json!({ "jsonrpc": "2.0", "method": "notifications/progress", "params": {} }), &id));
        assert!(!is_response_to(&json!({ "jsonrpc": "2.0", "id": 3, "method": "sampling/createMessage", "params": {} }), &id));
    }

    #[test]
    fn get_streams_drop_responses() {
        let ev = |data: &str| sse_stream::Sse::default().data(data.to_string());
        assert!(is_any_response(&ev(r#"{"jsonrpc":"2.0","id":"mcpay-1","result":{}}"#)));
        assert!(is_any_response(&ev(r#"{"jsonrpc":"2.0","id":1,"error":{"code":1}}"#)));
        assert!(is_any_response(&ev(r#"[{"jsonrpc":"2.0","method":"x"},{"jsonrpc":"2.0","id":1,"result":{}}]"#)));
        assert!(!is_any_response(&ev(r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{}}"#)));
        assert!(!is_any_response(&ev(r#"{"jsonrpc":"2.0","id":4,"method":"sampling/createMessage","params":{}}"#)));
        assert!(!is_any_response(&sse_stream::Sse::default()));
    }
}
