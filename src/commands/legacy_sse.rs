//! The client side of MCP's legacy HTTP+SSE transport (protocol 2024-11-05), for
//! `add-upstream --discover`: rmcp 3 ships no client for it, so this is the transport only —
//! rmcp's client speaks JSON-RPC over it. `GET url` opens the server's event stream, whose first
//! `endpoint` event names the URL every message is POSTed to; the server's messages arrive as
//! `message` events on the stream.

use std::pin::Pin;

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::{Stream, StreamExt as _};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue};
use rmcp::RoleClient;
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;

type Events = Pin<Box<dyn Stream<Item = Result<sse_stream::Sse, sse_stream::Error>> + Send>>;

pub struct LegacySse {
    client: reqwest::Client,
    post_url: reqwest::Url,
    headers: HeaderMap,
    events: Events,
}

impl LegacySse {
    /// Opens the event stream and waits for its `endpoint` event (which must name a URL of the
    /// stream's own origin).
    pub async fn connect(client: reqwest::Client, url: &str, headers: HeaderMap) -> Result<Self> {
        let base = reqwest::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?;
        let resp = client
            .get(base.clone())
            .headers(headers.clone())
            .header(ACCEPT, HeaderValue::from_static("text/event-stream"))
            .send()
            .await
            .map_err(|e| anyhow!("GET {url}: {}", super::add_upstream::chain(&e)))?;
        let status = resp.status();
        let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        if !status.is_success() || !content_type.starts_with("text/event-stream") {
            bail!("GET {url} answered {status} ({content_type:?}), not an event stream");
        }
        let mut events: Events = Box::pin(sse_stream::SseStream::from_bytes_stream(resp.bytes_stream()));
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| anyhow!("the event stream failed: {e}"))?;
            if event.event.as_deref() != Some("endpoint") {
                continue;
            }
            let data = event.data.unwrap_or_default();
            let post_url = base.join(data.trim()).map_err(|e| anyhow!("its endpoint event {data:?} is not a URL: {e}"))?;
            if post_url.origin() != base.origin() {
                bail!("its endpoint event names another origin ({post_url}); refused");
            }
            return Ok(LegacySse { client, post_url, headers, events });
        }
        bail!("the event stream ended before its `endpoint` event (is {url} a legacy HTTP+SSE MCP server?)")
    }
}

impl Transport<RoleClient> for LegacySse {
    type Error = std::io::Error;

    fn send(&mut self, item: TxJsonRpcMessage<RoleClient>) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let request = serde_json::to_vec(&item).map(|body| {
            self.client
                .post(self.post_url.clone())
                .headers(self.headers.clone())
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(body)
        });
        async move {
            let resp = request.map_err(std::io::Error::other)?.send().await.map_err(std::io::Error::other)?;
            if !resp.status().is_success() {
                return Err(std::io::Error::other(format!("the server answered a message with {}", resp.status())));
            }
            Ok(())
        }
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleClient>> {
        loop {
            let event = self.events.next().await?.ok()?;
            // No event type (or an empty one) is a `message` event.
            if event.event.as_deref().is_some_and(|e| !e.is_empty() && e != "message") {
                continue;
            }
            if let Some(message) = event.data.as_deref().and_then(|d| serde_json::from_str(d).ok()) {
                return Some(message);
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}
