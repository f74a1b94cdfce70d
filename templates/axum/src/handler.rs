//! The contract between the gateway and your endpoint handlers (src/handlers/*.rs).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;

use crate::generated::Endpoint;

/// Passed to `run`: the call's price is held when `run` starts (captured if it succeeds,
/// released if it fails or runs past its time limit).
#[derive(Debug, Clone)]
pub struct Context {
    pub endpoint: Endpoint,
    /// Public id of the calling key ("k_" + 16 hex). Never the key itself.
    pub key_id: String,
    pub request_id: String,
    /// What this call holds (its price), in mcents (1 mcent = 1/1000 cent).
    pub charged_mcents: i64,
    /// The key's balance after the hold, in mcents.
    pub balance_mcents: i64,
}

/// A failed handler run: the caller gets 502 handler_failed and the held price is released
/// (up to gateway.refunds_per_key_per_hour per key; past that it is kept). The message is
/// logged, never sent.
#[derive(Debug)]
pub struct HandlerError {
    message: String,
}

impl HandlerError {
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError { message: message.into() }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// `?` on any error inside `run` turns it into a handler failure.
impl<E: std::error::Error> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::new(e.to_string())
    }
}

/// What a handler's `run` returns: usually a JSON value (sent as `result` in the gateway's
/// envelope). A handler that needs full control returns its own HTTP response instead: with a
/// status below 500 it is sent as is (the call is captured) with the request id, charge and
/// CORS headers added; with 500 or more it is a failure (release, 502).
/// `run` may return `Result<Value, _>`, `Result<Reply, _>` or `Result<Response, _>`.
#[derive(Debug)]
pub enum Reply {
    Json(Value),
    Response(axum::response::Response),
}

impl From<Value> for Reply {
    fn from(v: Value) -> Self {
        Reply::Json(v)
    }
}

impl From<axum::response::Response> for Reply {
    fn from(r: axum::response::Response) -> Self {
        Reply::Response(r)
    }
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A validated call, ready to run once its price is held.
pub type Call = Box<dyn FnOnce(Context) -> BoxFuture<Result<Reply, HandlerError>> + Send>;

/// What the gateway needs from the handlers: turn a shape-checked JSON body into a validated
/// call (or a message for 400 invalid_input). `generated::handlers::GeneratedHandlers` is the
/// implementation rendered from mcpay.toml; tests can pass their own.
pub trait Handlers: Send + Sync + 'static {
    fn prepare(&self, endpoint: Endpoint, input: Value) -> Result<Call, String>;

    /// How long a call of `endpoint` may run: past it the gateway stops waiting, answers
    /// 504 handler_timeout and releases the hold. Default: the endpoint's `timeout_ms` from
    /// mcpay.toml.
    fn timeout(&self, endpoint: Endpoint) -> Duration {
        Duration::from_millis(endpoint.timeout_ms())
    }
}

/// Message for an input that passed the shape check but not the typed struct (rare).
pub fn input_error(e: &serde_json::Error) -> String {
    let mut m = format!("Invalid input: {e}");
    m.truncate(500);
    m
}
