//! Bounded request bodies: Content-Length is checked before reading, and the stream itself is
//! counted while reading, so chunked bodies without Content-Length are bounded too.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::http::ApiError;
use crate::shape::MAX_JSON_DEPTH;

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
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), work).await;
}

/// Reads at most `max` bytes of the body.
pub async fn read_bounded(headers: &HeaderMap, body: Body, max: u64, no_charge: bool) -> Result<Bytes, ApiError> {
    if let Some(v) = headers.get(header::CONTENT_LENGTH) {
        let n = v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()).ok_or_else(|| {
            ApiError::new(400, "invalid_json").message("Invalid Content-Length.").charge_note(no_charge)
        })?;
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
}

/// Content-Type, bounded read and JSON parse (415 / 413 / 400).
pub async fn read_json(headers: &HeaderMap, body: Body, max: u64, no_charge: bool) -> Result<Value, ApiError> {
    if !is_json_content_type(headers) {
        return Err(ApiError::new(415, "unsupported_media_type").charge_note(no_charge));
    }
    let bytes = read_bounded(headers, body, max, no_charge).await?;
    serde_json::from_slice::<Value>(&bytes).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            // serde_json stops at 128 levels; the contract's limit is 32 anyway.
            ApiError::new(400, "invalid_input")
                .message(format!("JSON nesting deeper than {MAX_JSON_DEPTH} levels."))
                .charge_note(no_charge)
        } else {
            ApiError::new(400, "invalid_json").charge_note(no_charge)
        }
    })
}
