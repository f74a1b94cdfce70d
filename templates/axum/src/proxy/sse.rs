//! `url` upstreams with `transport = "sse"`: legacy HTTP+SSE MCP servers (MCP 2024-11-05),
//! bridged to the Streamable HTTP that `/mcp/<name>` serves (contract 3.12). Each POST opens an
//! upstream session of its own: `GET url` (the session's event stream), whose first `endpoint`
//! event names where messages are posted; the gateway's own `initialize` and
//! `notifications/initialized` (unless the caller's message is `initialize`); then the caller's
//! message, whose response arrives on the event stream. The session is a [`Source`] of
//! [`super::http`]'s exchange, so holds, timeouts, settlement and relay follow its rules.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::{Value, json};

use super::http::{Answer, Hook, Source, Target, encode_sse, exchange, forward_paid, is_request_or_notification, is_response_to, upstream_request};
use super::{Checked, Kind};
use crate::app::AppState;
use crate::generated::UpstreamConfig;
use crate::http::{ApiError, base_headers, set_header};

/// The protocol version of the legacy transport, sent in the gateway's own `initialize`.
const PROTOCOL_VERSION: &str = "2024-11-05";

/// The session's stream, parsed (events of at most 4 MiB).
type Events = BoxStream<'static, Result<sse_stream::Sse, sse_stream::Error>>;

pub(crate) async fn serve(
    app: &Arc<AppState>,
    u: &UpstreamConfig,
    target: Target,
    checked: Checked,
    req: Request,
    request_id: &str,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let (raw, message) = match super::read_message(&parts.headers, body).await? {
        Ok(read) => read,
        Err(answer) => return Ok(*answer),
    };
    let method = message.get("method").and_then(Value::as_str).map(str::to_string);
    if method.is_none() || message.get("id").is_none_or(Value::is_null) {
        // A notification or a response of the caller: no session is kept for it to belong to.
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::ACCEPTED;
        base_headers(res.headers_mut());
        set_header(res.headers_mut(), "x-upstream-duration-ms", 0);
        return Ok(res);
    }
    let accept = parts.headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let progress = message.get("params").and_then(|p| p.get("_meta")).and_then(|m| m.get("progressToken")).is_some_and(|t| !t.is_null());
    let session = Session {
        target,
        // An id of its own: the call's id is first shown to the upstream with the call itself.
        init_id: (method.as_deref() != Some("initialize")).then(|| format!("mcpay-init-{}", uuid::Uuid::new_v4().simple())),
        stream: progress && accept.contains("text/event-stream"),
    };
    match super::classify(u, &message) {
        Kind::Free => {
            let id = message["id"].clone();
            Ok(exchange(u, request_id, session.source(raw, id.clone()), id.clone(), id, Hook::Free).await)
        }
        Kind::List { id } => Ok(exchange(u, request_id, session.source(raw, id.clone()), id.clone(), id, Hook::List { u: *u }).await),
        Kind::Paid { tool, price, id } => {
            let send = |forwarded: Bytes, match_id: &Value| session.source(forwarded, match_id.clone());
            forward_paid(app, u, checked, request_id, &message, tool, price, id, send).await
        }
    }
}

/// One upstream session: where, whether the gateway initializes it (its `initialize` id), and
/// whether the answer is an event stream.
struct Session {
    target: Target,
    init_id: Option<String>,
    stream: bool,
}

impl Session {
    /// The session that posts `message` and answers with the response to `match_id`: resolves
    /// once the upstream accepted `message` (or with the refusal of a step).
    fn source(self, message: Bytes, match_id: Value) -> Source {
        Box::pin(async move {
            let Session { target, init_id, stream } = self;
            let opened = upstream_request(&target, Method::GET, &HeaderMap::new(), None).send().await.map_err(|e| e.to_string())?;
            let content_type = opened.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
            if !opened.status().is_success() {
                return Ok(refused(opened));
            }
            if !content_type.starts_with("text/event-stream") {
                return Err(format!("the event stream answered {content_type:?}"));
            }
            let base = opened.url().clone();
            let mut events: Events = sse_stream::SseStream::from_bytes_stream(super::cap_events(opened.bytes_stream())).boxed();
            let endpoint = loop {
                match events.next().await {
                    Some(Ok(event)) if event.event.as_deref() == Some("endpoint") => match event.data {
                        Some(data) if !data.trim().is_empty() => break data,
                        _ => return Err("an endpoint event without a URL".into()),
                    },
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("event stream: {e}")),
                    None => return Err("the event stream ended before its endpoint event".into()),
                }
            };
            let endpoint = base.join(endpoint.trim()).map_err(|e| format!("endpoint {endpoint:?}: {e}"))?;
            if endpoint.origin() != base.origin() {
                return Err(format!("endpoint on another origin: {}", endpoint.origin().ascii_serialization()));
            }
            let post_to = Target { url: endpoint.to_string(), headers: target.headers, client: target.client };
            if let Some(init_id) = init_id {
                let init = json!({ "jsonrpc": "2.0", "id": init_id, "method": "initialize", "params": {
                    "protocolVersion": PROTOCOL_VERSION,
                    "capabilities": {},
                    "clientInfo": { "name": "mcpay-gateway", "version": env!("CARGO_PKG_VERSION") },
                } });
                if let Some(refused) = post(&post_to, &init).await? {
                    return Ok(refused);
                }
                let init_id = Value::String(init_id);
                let initialized = loop {
                    match next_message(&mut events).await? {
                        Some((response, _)) if is_response_to(&response, &init_id) => break response,
                        Some(_) => {}
                        None => return Err("the event stream ended before the response to initialize".into()),
                    }
                };
                if initialized.get("error").is_some() {
                    return Err(format!("initialize refused: {}", initialized["error"]));
                }
                if let Some(refused) = post(&post_to, &json!({ "jsonrpc": "2.0", "method": "notifications/initialized" })).await? {
                    return Ok(refused);
                }
            }
            if let Some(refused) = post_raw(&post_to, message).await? {
                return Ok(refused);
            }
            let content_type = if stream { "text/event-stream" } else { "application/json" };
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            Ok(Answer { status: StatusCode::OK, headers, body: answer(events, match_id, stream) })
        })
    }
}

/// Posts one message of the session. `Ok(Some(_))`: the upstream refused it (status ≥ 300).
async fn post(target: &Target, message: &Value) -> Result<Option<Answer>, String> {
    post_raw(target, Bytes::from(message.to_string())).await
}

async fn post_raw(target: &Target, body: Bytes) -> Result<Option<Answer>, String> {
    let resp = upstream_request(target, Method::POST, &HeaderMap::new(), Some(body)).send().await.map_err(|e| e.to_string())?;
    Ok((!resp.status().is_success()).then(|| refused(resp)))
}

/// A step the upstream refused, as the answer (its status and body), without session headers:
/// the caller is given no session.
fn refused(resp: reqwest::Response) -> Answer {
    let mut answer = Answer::from(resp);
    answer.headers.remove("mcp-session-id");
    answer.headers.remove("mcp-protocol-version");
    answer
}

/// The next JSON-RPC message of the session's stream (`message` events), with its event.
async fn next_message(events: &mut Events) -> Result<Option<(Value, sse_stream::Sse)>, String> {
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| format!("event stream: {e}"))?;
        // No event type (or an empty one) is a `message` event.
        if !matches!(event.event.as_deref(), None | Some("") | Some("message")) {
            continue;
        }
        if let Some(message) = event.data.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok()) {
            return Ok(Some((message, event)));
        }
    }
    Ok(None)
}

/// The answer's body: the response to `match_id` (JSON), or (`stream`) the session's messages
/// that have a method, then that response, as events. It ends right after the response, which
/// closes the session's stream; a stream that ends (or fails) before it fails the body.
fn answer(events: Events, match_id: Value, stream: bool) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(Some(events), move |events| {
        let match_id = match_id.clone();
        async move {
            let mut events = events?;
            loop {
                let (message, event) = match next_message(&mut events).await {
                    Ok(Some(next)) => next,
                    Ok(None) => return Some((Err(std::io::Error::other("the session's stream ended before the response")), None)),
                    Err(e) => return Some((Err(std::io::Error::other(e)), None)),
                };
                if is_response_to(&message, &match_id) {
                    let data = message.to_string();
                    let out = if stream { encode_sse(&sse_stream::Sse::default().event("message").data(data)) } else { Bytes::from(data) };
                    return Some((Ok(out), None));
                }
                if stream && is_request_or_notification(&message) {
                    return Some((Ok(encode_sse(&event)), Some(events)));
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(items: &[(&str, &str)]) -> Events {
        let items: Vec<_> = items.iter().map(|(name, data)| Ok(sse_stream::Sse::default().event(name.to_string()).data(data.to_string()))).collect();
        futures_util::stream::iter(items).boxed()
    }

    async fn collect(body: BoxStream<'static, Result<Bytes, std::io::Error>>) -> Vec<Result<String, String>> {
        body.map(|c| c.map(|b| String::from_utf8(b.to_vec()).unwrap()).map_err(|e| e.to_string())).collect().await
    }

    const PROGRESS: &str = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":0}}"#;
    const DECOY: &str = r#"{"jsonrpc":"2.0","id":"7","result":{}}"#;
    const RESPONSE: &str = r#"{"jsonrpc":"2.0","id":7,"result":{"content":[]}}"#;
    const AFTER: &str = r#"{"jsonrpc":"2.0","method":"notifications/message","params":{}}"#;

    #[tokio::test]
    async fn the_answer_ends_with_the_response() {
        let session = [("endpoint", "/x"), ("message", PROGRESS), ("message", DECOY), ("message", "junk"), ("message", RESPONSE), ("message", AFTER)];
        // JSON: the response alone.
        let out = collect(answer(events(&session), json!(7), false)).await;
        assert_eq!(out.len(), 1);
        assert_eq!(serde_json::from_str::<Value>(out[0].as_ref().unwrap()).unwrap(), serde_json::from_str::<Value>(RESPONSE).unwrap());
        // Event stream: the messages with a method, then the response; nothing after it.
        let out = collect(answer(events(&session), json!(7), true)).await;
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].as_ref().unwrap().contains("notifications/progress"));
        assert!(out[1].as_ref().unwrap().starts_with("event: message\ndata: "));
        assert!(out[1].as_ref().unwrap().contains("\"id\":7"));
    }

    #[tokio::test]
    async fn smuggled_results_are_not_relayed_and_an_empty_event_type_is_a_message() {
        // A "notification" that also carries a result is not relayed before the response; a
        // response sent as `event:` (empty type) is the response.
        let smuggled = r#"{"jsonrpc":"2.0","id":1,"method":"x","result":{"content":[{"type":"text","text":"free"}]}}"#;
        let session = [("message", smuggled), ("", RESPONSE)];
        let out = collect(answer(events(&session), json!(7), true)).await;
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].as_ref().unwrap().contains("\"id\":7") && !out[0].as_ref().unwrap().contains("free"), "{out:?}");
    }

    #[tokio::test]
    async fn a_session_that_ends_first_fails_the_answer() {
        for stream in [false, true] {
            let out = collect(answer(events(&[("message", PROGRESS), ("message", DECOY)]), json!(7), stream)).await;
            assert!(out.last().unwrap().is_err(), "{out:?}");
        }
    }
}
