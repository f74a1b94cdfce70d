//! Responses: JSON bodies, the error shape, and the headers every response carries.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::generated::PROJECT_NAME;

pub const NO_CHARGE_NOTE: &str = "no charge applied";

pub const CORS_HEADERS: [(&str, &str); 3] = [
    ("access-control-allow-origin", "*"),
    ("access-control-allow-headers", "Authorization, Content-Type, Idempotency-Key, PAYMENT-SIGNATURE, X-PAYMENT"),
    (
        "access-control-expose-headers",
        "X-Request-Id, X-Charged-Mcents, X-Balance-Mcents, Retry-After, WWW-Authenticate, Idempotent-Replayed, PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE, Payment-Receipt",
    ),
];

/// An error answered with the contract's error shape:
/// `{ok:false, error:{code,message}, request_id, note?, ...extra}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: Option<String>,
    /// Adds "note":"no charge applied".
    pub no_charge: bool,
    pub extra: Vec<(&'static str, Value)>,
    /// Response headers; a name listed twice is sent twice (e.g. one WWW-Authenticate per offer).
    pub headers: Vec<(HeaderName, String)>,
}

fn default_message(code: &str) -> &'static str {
    match code {
        "not_found" => "No such route.",
        "method_not_allowed" => "Method not allowed on this route.",
        "missing_key" => "Missing API key: send Authorization: Bearer <key>.",
        "invalid_key" => "Invalid API key.",
        "unsupported_media_type" => "Content-Type must be application/json.",
        "body_too_large" => "Request body too large.",
        "request_timeout" => "The request body did not arrive in time.",
        "invalid_json" => "Request body is not valid JSON.",
        "invalid_input" => "Invalid input.",
        "scope_denied" => "This key is not allowed to call this endpoint.",
        "rate_limited" => "Rate limit exceeded.",
        "insufficient_balance" => "Insufficient balance for this call.",
        "admin_disabled" => "Admin API disabled: ADMIN_KEY is not configured.",
        "invalid_admin_key" => "Invalid admin key.",
        "handler_failed" => "The endpoint handler failed.",
        "payment_required" => "Payment required.",
        "payment_invalid" => "The payment credential is not valid for this offer.",
        "payment_failed" => "The payment could not be settled.",
        "invalid_payment" => "Send at most one payment credential.",
        "payment_already_used" => "This payment already bought a key.",
        "payment_in_progress" => "This payment is being processed by another request; retry shortly.",
        "payment_unavailable" => "The payment service is unavailable; nothing was charged.",
        "signup_unavailable" => "Signup is not configured on this server.",
        "upstream_failed" => "The upstream MCP server failed.",
        "upstream_timeout" => "The upstream MCP server did not answer in time.",
        "upstream_disabled" => "This upstream MCP server is paused on this gateway.",
        "upstream_unavailable" => "This upstream MCP server is not configured on this gateway.",
        _ => "Internal error.",
    }
}

impl ApiError {
    pub fn new(status: u16, code: &'static str) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: None,
            no_charge: false,
            extra: Vec::new(),
            headers: Vec::new(),
        }
    }

    pub fn internal() -> Self {
        ApiError::new(500, "internal_error")
    }

    pub fn message(mut self, m: impl Into<String>) -> Self {
        self.message = Some(m.into());
        self
    }

    pub fn no_charge(mut self) -> Self {
        self.no_charge = true;
        self
    }

    pub fn charge_note(mut self, on: bool) -> Self {
        self.no_charge = on;
        self
    }

    pub fn extra(mut self, k: &'static str, v: impl Into<Value>) -> Self {
        self.extra.push((k, v.into()));
        self
    }

    pub fn header(mut self, name: HeaderName, value: impl ToString) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    /// The human message: the one given, else the code's default.
    pub fn message_text(&self) -> String {
        self.message.clone().unwrap_or_else(|| default_message(self.code).to_string())
    }

    /// The error shape's body (section 2), as HTTP sends it.
    pub fn body(&self, request_id: &str) -> Value {
        let mut body = Map::new();
        body.insert("ok".into(), Value::Bool(false));
        body.insert("error".into(), json!({ "code": self.code, "message": self.message_text() }));
        body.insert("request_id".into(), Value::String(request_id.to_string()));
        if self.no_charge {
            body.insert("note".into(), Value::String(NO_CHARGE_NOTE.into()));
        }
        for (k, v) in &self.extra {
            body.insert((*k).into(), v.clone());
        }
        Value::Object(body)
    }

    pub fn into_response(self, request_id: &str) -> Response {
        let mut res = json_response(self.status, &self.body(request_id));
        let h = res.headers_mut();
        let mut seen: Vec<HeaderName> = Vec::new();
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                if seen.contains(&name) {
                    h.append(name, v);
                } else {
                    seen.push(name.clone());
                    h.insert(name, v);
                }
            }
        }
        if self.status == StatusCode::UNAUTHORIZED
            && let Ok(v) = HeaderValue::from_str(&format!("Bearer realm=\"{PROJECT_NAME}\""))
        {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
        res
    }
}

/// A JSON response with the base headers (content type, no-store, nosniff).
pub fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    let mut res = Response::new(Body::from(bytes));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    base_headers(h);
    res
}

pub fn base_headers(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

pub fn set_header(h: &mut HeaderMap, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        h.insert(HeaderName::from_static(name), v);
    }
}

pub fn add_cors(h: &mut HeaderMap) {
    for (k, v) in CORS_HEADERS {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
}

/// Admin responses never carry a CORS header.
pub fn strip_cors(h: &mut HeaderMap) {
    let names: Vec<HeaderName> = h.keys().filter(|k| k.as_str().starts_with("access-control-")).cloned().collect();
    for n in names {
        h.remove(n);
    }
}
