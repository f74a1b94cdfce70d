//! API key format, hashing and parsing. Raw keys exist only in the mint response and in the
//! caller's Authorization header; the database stores the SHA-256 hex of the key.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::generated::GATEWAY;

const KEY_HEX_LEN: usize = 64;

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the operating system's CSPRNG is available");
    hex::encode(buf)
}

/// A new API key: prefix + 64 lowercase hex characters (32 bytes from the OS CSPRNG).
pub fn generate_api_key() -> String {
    format!("{}{}", GATEWAY.key_prefix, random_hex(KEY_HEX_LEN / 2))
}

/// A new public key id: "k_" + 16 hex. Safe to show anywhere (leaderboard, /v1/me).
pub fn generate_key_id() -> String {
    format!("k_{}", random_hex(8))
}

pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// True when `key` has exactly the shape of a key minted by this gateway.
pub fn is_well_formed_key(key: &str) -> bool {
    let prefix = GATEWAY.key_prefix;
    key.len() == prefix.len() + KEY_HEX_LEN
        && key.starts_with(prefix)
        && key[prefix.len()..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    Missing,
    Invalid,
}

/// Parses `Authorization: Bearer <key>` (scheme case-insensitive). Only the header counts:
/// keys in the query string or body are ignored.
pub fn parse_bearer(header: Option<&[u8]>) -> Result<&str, BearerError> {
    let Some(raw) = header else { return Err(BearerError::Missing) };
    let Ok(text) = std::str::from_utf8(raw) else { return Err(BearerError::Invalid) };
    let text = text.trim();
    if text.is_empty() {
        return Err(BearerError::Missing);
    }
    let (scheme, rest) = text.split_once(' ').ok_or(BearerError::Invalid)?;
    let key = rest.trim_start_matches(' ');
    if !scheme.eq_ignore_ascii_case("bearer") || !scheme.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(BearerError::Invalid);
    }
    if !is_well_formed_key(key) {
        return Err(BearerError::Invalid);
    }
    Ok(key)
}

/// Constant-time comparison of two secrets of any length: both are hashed to SHA-256 digests,
/// which are compared with `subtle`.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    let da = Sha256::digest(a.as_bytes());
    let db = Sha256::digest(b.as_bytes());
    da[..].ct_eq(&db[..]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_documented_shape() {
        let k = generate_api_key();
        assert!(is_well_formed_key(&k));
        assert_ne!(k, generate_api_key());
        let id = generate_key_id();
        assert_eq!(id.len(), 18);
        assert!(id.starts_with("k_"));
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn bearer_parsing() {
        let good = format!("{}{}", GATEWAY.key_prefix, "a".repeat(64));
        for ok in [format!("Bearer {good}"), format!("bearer {good}"), format!("BEARER {good}")] {
            assert_eq!(parse_bearer(Some(ok.as_bytes())), Ok(good.as_str()));
        }
        assert_eq!(parse_bearer(None), Err(BearerError::Missing));
        assert_eq!(parse_bearer(Some(b"   ")), Err(BearerError::Missing));
        let p = GATEWAY.key_prefix;
        for bad in [
            good.clone(),
            format!("Basic {good}"),
            format!("Bearer {good} extra"),
            format!("Bearer {p}{}", "a".repeat(63)),
            format!("Bearer {p}{}", "a".repeat(65)),
            format!("Bearer {p}{}", "A".repeat(64)),
            format!("Bearer {p}{}", "g".repeat(64)),
            format!("Bearer x{}", &good[1..]),
            format!("Bearer {}", "a".repeat(64)),
        ] {
            assert_eq!(parse_bearer(Some(bad.as_bytes())), Err(BearerError::Invalid), "{bad}");
        }
    }

    #[test]
    fn secrets() {
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "abcd"));
        assert!(!secrets_equal("", "abc"));
    }
}
