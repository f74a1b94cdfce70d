//! Bounded request bodies: Content-Length is checked before reading, and the stream itself is
//! counted while reading, so chunked bodies without Content-Length are bounded too.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::time::Instant;

use crate::config::DEFAULT_BODY_READ_TIMEOUT;
use crate::http::ApiError;
use crate::shape::MAX_JSON_DEPTH;

tokio::task_local! {
    /// When the body of the request being served must have arrived (BODY_READ_TIMEOUT_MS after
    /// its headers). A task-local so that every route reading a body honours it.
    static BODY_DEADLINE: Instant;
}

/// The request with its body watched: the flag is true once the body has been read to its end
/// (at once for a request without one). A request answered before its body was read gets
/// `Connection: close`: hyper drops such a connection after the answer, and a client that does
/// not know would send its next request into it.
pub fn watch_body(req: axum::extract::Request) -> (axum::extract::Request, Arc<AtomicBool>) {
    use axum::body::HttpBody as _;
    use futures_util::StreamExt as _;
    let read = Arc::new(AtomicBool::new(req.body().is_end_stream()));
    if read.load(Ordering::Relaxed) {
        return (req, read);
    }
    let (parts, body) = req.into_parts();
    let watched = futures_util::stream::unfold((body.into_data_stream(), read.clone()), |(mut data, read)| async move {
        match data.next().await {
            Some(chunk) => Some((chunk, (data, read))),
            None => {
                read.store(true, Ordering::Relaxed);
                None
            }
        }
    });
    (axum::extract::Request::from_parts(parts, Body::from_stream(watched)), read)
}

/// Runs `f` (one request) with its body deadline `timeout` from now.
pub async fn with_body_deadline<F: Future>(timeout: Duration, f: F) -> F::Output {
    BODY_DEADLINE.scope(Instant::now() + timeout, f).await
}

fn body_deadline() -> Instant {
    BODY_DEADLINE.try_with(|d| *d).unwrap_or_else(|_| Instant::now() + DEFAULT_BODY_READ_TIMEOUT)
}

/// 408: the body stalled. Read before anything is held, so nothing was charged; the connection is
/// closed because the rest of the body may still arrive.
fn timed_out(no_charge: bool) -> ApiError {
    ApiError::new(408, "request_timeout")
        .message("The request body did not arrive in time.")
        .charge_note(no_charge)
        .header(header::CONNECTION, "close")
}

/// True if the Content-Type is application/json (parameters such as charset allowed).
/// Several Content-Type headers are read as one comma-joined value (as fetch does): refused.
pub fn is_json_content_type(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(v), None) = (values.next(), values.next()) else { return false };
    let Ok(v) = v.to_str() else { return false };
    v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json")
}

fn too_large(max: u64, no_charge: bool) -> ApiError {
    ApiError::new(413, "body_too_large")
        .message(format!("Request body exceeds {max} bytes."))
        .charge_note(no_charge)
        .extra("max_body_bytes", max)
}

/// Largest refused body that is drained (read and discarded) rather than cut off.
const DRAIN_MAX_BYTES: u64 = 8 * 1024 * 1024;

async fn drain(mut body: Body, limit: u64) {
    let work = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen >= limit {
                    break;
                }
            }
        }
    };
    let until = body_deadline().min(Instant::now() + Duration::from_secs(5));
    let _ = tokio::time::timeout_at(until, work).await;
}

/// Reads at most `max` bytes of the body.
pub async fn read_bounded(headers: &HeaderMap, body: Body, max: u64, no_charge: bool) -> Result<Bytes, ApiError> {
    if let Some(v) = headers.get(header::CONTENT_LENGTH) {
        // Decimal digits only, as on the Worker: "-5", "+5", "12abc", "1e3" are refused. (hyper
        // already answers a bare 400 to most of these before the gateway sees the request.)
        let n = v
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|s| (1..=15).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| ApiError::new(400, "invalid_json").message("Invalid Content-Length.").charge_note(no_charge))?;
        if n > max {
            // Refused before reading: nothing is buffered. A declared body of moderate size is
            // discarded as it arrives (bounded in bytes and time) so that the client, still
            // uploading, can read the 413 instead of seeing the connection reset.
            if n <= DRAIN_MAX_BYTES {
                drain(body, n).await;
            }
            return Err(too_large(max, no_charge));
        }
    }
    let read = async {
        let mut body = body;
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| {
                ApiError::new(400, "invalid_json").message("Could not read the request body.").charge_note(no_charge)
            })?;
            if let Ok(data) = frame.into_data() {
                if (buf.len() + data.len()) as u64 > max {
                    return Err(too_large(max, no_charge));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout_at(body_deadline(), read).await.unwrap_or_else(|_| Err(timed_out(no_charge)))
}

/// Content-Type, bounded read and JSON parse (415 / 413 / 400).
pub async fn read_json(headers: &HeaderMap, body: Body, max: u64, no_charge: bool) -> Result<Value, ApiError> {
    if !is_json_content_type(headers) {
        return Err(ApiError::new(415, "unsupported_media_type").charge_note(no_charge));
    }
    let bytes = read_bounded(headers, body, max, no_charge).await?;
    parse_json(&bytes, no_charge)
}

/// JSON text → Value (400 invalid_json), telling apart valid JSON that serde_json cannot hold.
pub fn parse_json(bytes: &[u8], no_charge: bool) -> Result<Value, ApiError> {
    let invalid_json = || ApiError::new(400, "invalid_json").charge_note(no_charge);
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(invalid_json().message("Request body is not valid UTF-8."));
    };
    serde_json::from_str::<Value>(text).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            // serde_json stops at 128 levels; the contract's limit is 32 anyway.
            ApiError::new(400, "invalid_input")
                .message(format!("JSON nesting deeper than {MAX_JSON_DEPTH} levels."))
                .charge_note(no_charge)
        } else if e.to_string().starts_with("number out of range")
            // Valid JSON (checked without converting numbers) with a number beyond f64, e.g. 1e400:
            // the Worker reads it as Infinity, which no field accepts (not finite, not an integer).
            && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
        {
            ApiError::new(400, "invalid_input")
                .message("Numbers must be finite: the body holds a number out of range (e.g. 1e400).")
                .charge_note(no_charge)
        } else {
            invalid_json()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // hyper refuses most of these before the gateway runs; the gateway refuses them anyway.
    #[tokio::test]
    async fn content_length_must_be_decimal_digits() {
        for declared in ["-5", "+5", "12abc", "1e3", "0x10", "", "1234567890123456"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_LENGTH, declared.parse().unwrap());
            let err = read_bounded(&headers, Body::from("{}"), 16, true).await.unwrap_err();
            assert_eq!((err.status.as_u16(), err.code, err.no_charge), (400, "invalid_json", true), "{declared:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, " 2 ".parse().unwrap());
        assert_eq!(read_bounded(&headers, Body::from("{}"), 16, true).await.unwrap(), "{}");
    }

    #[test]
    fn out_of_range_numbers_are_invalid_input_only_in_valid_json() {
        let code = |s: &str| parse_json(s.as_bytes(), false).map(|_| "ok").unwrap_or_else(|e| e.code);
        assert_eq!(code(r#"{"balance_mcents": 1e400, "scopes": ["x"]}"#), "invalid_input");
        assert_eq!(code("-1e400"), "invalid_input");
        assert_eq!(code("[1, 2e999]"), "invalid_input");
        assert_eq!(code(r#"{"a": 1e400"#), "invalid_json");
        assert_eq!(code(r#"{"a": 1e400,}"#), "invalid_json");
        assert_eq!(code(r#"{"a": 1e400} x"#), "invalid_json");
        assert_eq!(code(""), "invalid_json");
        assert_eq!(code(r#"{"a": 1e-400}"#), "ok");
        assert_eq!(code(r#"{"a": 1e300}"#), "ok");
    }
}
