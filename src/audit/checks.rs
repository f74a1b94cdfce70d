//! Checks the scenarios of several areas share: expected answers, refusals that charge nothing, the
//! shared key, and the ledger's sum.

use anyhow::{Result, ensure};
use serde_json::Value;

use super::client::{Client, Endpoint, Key, Reply};
use super::scenario::Outcome;

pub const NO_CHARGE: &str = "no charge applied";

pub fn pass(s: impl Into<String>) -> Result<Outcome> {
    Ok(Outcome::Pass(s.into()))
}

pub fn expect(r: &Reply, status: u16, code: &str) -> Result<()> {
    ensure!(r.status == status, "expected {status} {code}, got {}", r.brief());
    if !code.is_empty() {
        ensure!(r.code() == code, "expected error code {code}, got {}", r.brief());
    }
    Ok(())
}

/// `r` is a refusal before any charge: the status, the note, and the key's balance unchanged.
pub fn refused_uncharged(c: &Client, r: &Reply, status: u16, code: &str, key: &Key, balance: u64) -> Result<Outcome> {
    expect(r, status, code)?;
    ensure!(r.body.contains(NO_CHARGE), "{} without \"note\": \"{NO_CHARGE}\": {}", r.status, r.body);
    let now = c.balance(key)?;
    ensure!(now == balance, "balance moved from {balance} to {now} on a refused call");
    pass(format!("{} {}, balance still {balance}", r.status, r.code()))
}

/// The first endpoint, its shared key and that key's balance now.
pub fn setup(c: &mut Client) -> Result<(Endpoint, Key, u64)> {
    let ep = c.first();
    let (key, bal) = c.shared_key(&ep)?;
    Ok((ep, key, bal))
}

/// The key's whole ledger (every page: `next_before` is followed while the gateway gives one, and a
/// gateway that does not page answers everything at once) as the sum of every row but the mint, and
/// the number of rows.
pub fn ledger_sum(c: &Client, key: &Key) -> Result<(i64, usize)> {
    let rows = ledger_rows(c, key)?;
    let sum = rows.iter().filter(|e| e["kind"] != "mint").map(|e| e["amount_mcents"].as_i64().unwrap_or(0)).sum::<i64>();
    Ok((sum, rows.len()))
}

/// Every row of the key's ledger, newest first, read page by page as `ledger_sum` does.
pub fn ledger_rows(c: &Client, key: &Key) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    let mut before: Option<u64> = None;
    for _ in 0..10_000 {
        let l = c.ledger(key, before);
        let entries = l["entries"].as_array().ok_or_else(|| anyhow::anyhow!("/v1/me/ledger has no entries: {l}"))?;
        rows.extend(entries.iter().cloned());
        match l.get("next_before") {
            None | Some(Value::Null) => return Ok(rows),
            Some(next) => {
                let next = next.as_u64().ok_or_else(|| anyhow::anyhow!("/v1/me/ledger: next_before {next} is not a seq"))?;
                ensure!(!entries.is_empty(), "/v1/me/ledger gave an empty page with next_before {next}");
                ensure!(before.is_none_or(|b| next < b), "/v1/me/ledger: next_before {next} does not move back from before={}", before.unwrap_or(0));
                before = Some(next);
            }
        }
    }
    anyhow::bail!("/v1/me/ledger: still paging after 10000 pages")
}

/// The kinds of the ledger rows written for one call id (oldest first), e.g. `["hold", "capture"]`.
pub fn kinds_for(rows: &[Value], request_id: &str) -> Vec<String> {
    let mut kinds: Vec<(u64, String)> = rows
        .iter()
        .filter(|e| e["request_id"] == request_id)
        .map(|e| (e["seq"].as_u64().unwrap_or(0), e["kind"].as_str().unwrap_or("?").to_string()))
        .collect();
    kinds.sort();
    kinds.into_iter().map(|(_, k)| k).collect()
}

/// How many rows of `kind` the ledger has.
pub fn count_kind(rows: &[Value], kind: &str) -> usize {
    rows.iter().filter(|e| e["kind"] == kind).count()
}

/// Contract 3.5: every paid call in `rows` is a `hold` followed by exactly one `capture` or
/// `release` with its call id, and no row has a kind the contract does not list for new ledgers
/// (`charge` and `refund` belong to ledgers written before holds existed). Returns (captured, released).
pub fn settled_holds(rows: &[Value]) -> Result<(usize, usize)> {
    let (mut captured, mut released) = (0, 0);
    for e in rows {
        let kind = e["kind"].as_str().unwrap_or("");
        ensure!(matches!(kind, "mint" | "hold" | "capture" | "release"), "ledger row of kind {kind:?} (contract 3.5: mint, hold, capture, release): {e}");
        if kind != "hold" {
            continue;
        }
        let id = e["request_id"].as_str().unwrap_or("");
        ensure!(!id.is_empty(), "a hold without a request_id: {e}");
        let kinds = kinds_for(rows, id);
        match kinds.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["hold", "capture"] => captured += 1,
            ["hold", "release"] => released += 1,
            other => anyhow::bail!("call {id}: ledger rows {other:?}, expected a hold then one capture or one release"),
        }
    }
    Ok((captured, released))
}

/// `text` carries no key material: none of `keys`, nor their hex part, nor any run of 64 hex
/// characters (which would be a key or a key hash).
pub fn no_key_material(text: &str, keys: &[&Key], prefix: &str) -> Result<()> {
    for k in keys {
        ensure!(!text.contains(&k.key), "the raw key appears");
        ensure!(!text.contains(&k.key[prefix.len().min(k.key.len())..]), "the key's hex appears");
    }
    let mut run = 0;
    for b in text.as_bytes() {
        run = if b.is_ascii_hexdigit() { run + 1 } else { 0 };
        ensure!(run < 64, "a 64-character hex string (a key or its hash) appears");
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// A one-thread HTTP server answering `answer(method, path)` on each request (connection: close).
    pub fn serve(answer: fn(&str, &str) -> (u16, String)) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap_or_default();
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                let mut length = 0usize;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let (status, text) = answer(&method, &path);
                let mut out = stream;
                let _ = write!(
                    out,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    const PRICING: &str = r#"{"ok":true,"endpoints":[{"name":"example","price_mcents":100,"scope":"example","path":"/v1/example"}],"signup":null}"#;

    fn key() -> Key {
        Key { key: "mcp_00".into(), key_id: "k_1".into() }
    }

    #[test]
    fn key_material_is_the_key_its_hex_or_any_64_hex_run() {
        let hex = "0123456789abcdef".repeat(4);
        let k = Key { key: format!("mcp_{hex}"), key_id: "k_1".into() };
        no_key_material(r#"{"key_id":"k_0123456789abcdef","id":"0f8fad5b-d9cb-469f-a165-70867728950e"}"#, &[&k], "mcp_").unwrap();
        for leak in [format!("Bearer mcp_{hex}"), format!("hash {hex}"), format!("{}x", "a".repeat(64))] {
            assert!(no_key_material(&leak, &[&k], "mcp_").is_err(), "{leak}");
        }
        assert!(no_key_material(&"f".repeat(63), &[], "mcp_").is_ok());
    }

    #[test]
    fn ledger_sum_follows_next_before_to_the_end() {
        let url = serve(|_, path| match path {
            "/v1/pricing" => (200, PRICING.into()),
            "/v1/me/ledger?limit=500" => (200, r#"{"ok":true,"entries":[
                {"seq":4,"kind":"release","amount_mcents":100},{"seq":3,"kind":"hold","amount_mcents":-100}],"next_before":3}"#.into()),
            "/v1/me/ledger?limit=500&before=3" => (200, r#"{"ok":true,"entries":[{"seq":2,"kind":"hold","amount_mcents":-100}],"next_before":2}"#.into()),
            "/v1/me/ledger?limit=500&before=2" => (200, r#"{"ok":true,"entries":[{"seq":1,"kind":"mint","amount_mcents":1000}],"next_before":null}"#.into()),
            _ => (404, "{}".into()),
        });
        let c = Client::connect(&url, None).unwrap();
        assert_eq!(ledger_sum(&c, &key()).unwrap(), (-100, 4));
    }

    #[test]
    fn ledger_sum_reads_a_gateway_that_does_not_page_and_refuses_a_cursor_that_does_not_move() {
        let url = serve(|_, path| match path {
            "/v1/pricing" => (200, PRICING.into()),
            "/v1/me/ledger?limit=500" => (200, r#"{"ok":true,"entries":[{"seq":2,"kind":"hold","amount_mcents":-100},{"seq":1,"kind":"mint","amount_mcents":500}]}"#.into()),
            _ => (404, "{}".into()),
        });
        let c = Client::connect(&url, None).unwrap();
        assert_eq!(ledger_sum(&c, &key()).unwrap(), (-100, 2));

        let stuck = serve(|_, path| match path {
            "/v1/pricing" => (200, PRICING.into()),
            _ => (200, r#"{"ok":true,"entries":[{"seq":2,"kind":"hold","amount_mcents":-100}],"next_before":5}"#.into()),
        });
        let c = Client::connect(&stuck, None).unwrap();
        let e = ledger_sum(&c, &key()).unwrap_err().to_string();
        assert!(e.contains("next_before 5"), "{e}");
    }
}
