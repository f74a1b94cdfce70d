//! Validation of the admin mint and signup request bodies: strict types, no coercion.

use serde_json::Value;

use crate::generated::{GATEWAY, SCOPES};
use crate::http::ApiError;
use crate::shape::as_safe_integer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintInput {
    pub balance_mcents: i64,
    pub scopes: Vec<String>,
    pub name: Option<String>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "invalid_input").message(message)
}

fn valid_name(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'_' | b'.' | b'-'))
}

pub fn parse_mint_input(body: &Value) -> Result<MintInput, ApiError> {
    let Some(obj) = body.as_object() else { return Err(bad("Body must be a JSON object.")) };
    for k in obj.keys() {
        if !matches!(k.as_str(), "balance_mcents" | "scopes" | "name") {
            return Err(bad(format!("Unknown field \"{}\".", k.chars().take(64).collect::<String>())));
        }
    }
    // A JSON integer literal only: strings, floats, booleans, null, arrays are refused.
    let balance = obj
        .get("balance_mcents")
        .and_then(as_safe_integer)
        .filter(|b| (1..=GATEWAY.max_mint_mcents).contains(b))
        .ok_or_else(|| bad(format!("balance_mcents must be an integer between 1 and {}.", GATEWAY.max_mint_mcents)))?;
    let scopes = match obj.get("scopes") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        _ => return Err(bad("scopes must be a non-empty array of scope names (keys get no scope by default).")),
    };
    let mut unique: Vec<String> = Vec::new();
    for s in scopes {
        match s.as_str() {
            Some(s) if SCOPES.contains(&s) => {
                if !unique.iter().any(|u| u == s) {
                    unique.push(s.to_string());
                }
            }
            _ => {
                let shown: String = s.to_string().chars().take(64).collect();
                return Err(bad(format!("Unknown scope {shown}.")));
            }
        }
    }
    let name = match obj.get("name") {
        None => None,
        Some(Value::String(s)) if valid_name(s) => Some(s.clone()),
        Some(_) => return Err(bad("name must be 1-32 characters of A-Z a-z 0-9 space _ . -")),
    };
    Ok(MintInput { balance_mcents: balance, scopes: unique, name })
}

/// The optional JSON body of POST /v1/signup: an object whose only field is `name` (same rule as
/// the admin mint's `name`).
pub fn parse_signup_input(body: &Value) -> Result<Option<String>, ApiError> {
    let bad = |m: &str| bad(m).no_charge();
    let Some(obj) = body.as_object() else { return Err(bad("Body must be a JSON object (or empty).")) };
    for k in obj.keys() {
        if k != "name" {
            return Err(bad(&format!("Unknown field \"{}\".", k.chars().take(64).collect::<String>())));
        }
    }
    match obj.get("name") {
        None => Ok(None),
        Some(Value::String(s)) if valid_name(s) => Ok(Some(s.clone())),
        Some(_) => Err(bad("name must be 1-32 characters of A-Z a-z 0-9 space _ . -")),
    }
}
