//! Authentication: how a paid endpoint treats missing, malformed, foreign and smuggled keys.

use anyhow::{Result, ensure};

use super::prelude::*;
use crate::audit::client::random_hex64;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("auth.missing", "no Authorization → 401 missing_key with WWW-Authenticate", |c, _| {
            let ep = c.first();
            let r = c.post(&ep.path(), &[], &ep.sample().to_string());
            expect(&r, 401, "missing_key")?;
            auth_case(c, None)
        }),
        scenario!("auth.empty_bearer", "\"Bearer \" with no key → 401", |c, _| auth_case(c, Some("Bearer ".into()))),
        scenario!("auth.basic_scheme", "Basic credentials → 401", |c, _| auth_case(c, Some("Basic YWRtaW46YWRtaW4=".into()))),
        scenario!("auth.wrong_prefix", "a well-formed key with another prefix → 401 invalid_key", |c, _| {
            auth_case(c, Some(format!("Bearer zzz_{}", random_hex64())))
        }),
        scenario!("auth.short_key", "a key one hex digit short → 401", |c, _| {
            let p = c.prefix();
            auth_case(c, Some(format!("Bearer {p}{}", &random_hex64()[..63])))
        }),
        scenario!("auth.long_key", "a key one hex digit long → 401", |c, _| {
            let p = c.prefix();
            auth_case(c, Some(format!("Bearer {p}{}0", random_hex64())))
        }),
        scenario!("auth.non_hex", "a key of the right length that is not hex → 401", |c, _| {
            let p = c.prefix();
            auth_case(c, Some(format!("Bearer {p}{}", "z".repeat(64))))
        }),
        scenario!("auth.oversized", "a 32 KiB Authorization header → refused (4xx), never 2xx or 5xx", |c, _| {
            let ep = c.first();
            let huge = format!("Bearer {}{}", c.prefix(), "a".repeat(32 * 1024));
            let r = c.post(&ep.path(), &[("Authorization", &huge)], &ep.sample().to_string());
            ensure!((400..500).contains(&r.status), "got {}", r.brief());
            pass(r.brief())
        }),
        scenario!("auth.unknown_key", "a well-formed key nobody minted → 401 invalid_key", |c, _| {
            let ep = c.first();
            let key = format!("Bearer {}{}", c.prefix(), random_hex64());
            let r = c.post(&ep.path(), &[("Authorization", &key)], &ep.sample().to_string());
            expect(&r, 401, "invalid_key")?;
            pass(r.brief())
        }),
        scenario!("auth.lowercase_scheme", "\"bearer KEY\" (scheme is case-insensitive) → accepted", |c, _| {
            let (ep, key, _) = setup(c)?;
            let r = c.post(&ep.path(), &[("Authorization", &format!("bearer {}", key.key))], &ep.sample().to_string());
            expect(&r, 200, "")?;
            pass(r.brief())
        }),
        scenario!("auth.uppercase_key", "the key's hex upper-cased is a different key → 401", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let p = c.prefix();
            let upper = format!("Bearer {p}{}", key.key[p.len()..].to_ascii_uppercase());
            let r = c.post(&ep.path(), &[("Authorization", &upper)], &ep.sample().to_string());
            expect(&r, 401, "")?;
            ensure!(c.balance(&key)? == bal, "balance moved");
            pass(r.brief())
        }),
        scenario!("auth.trailing_garbage", "\"Bearer KEY extra\" → 401", |c, _| {
            let (ep, key, _) = setup(c)?;
            let r = c.post(&ep.path(), &[("Authorization", &format!("Bearer {} extra", key.key))], &ep.sample().to_string());
            expect(&r, 401, "")?;
            pass(r.brief())
        }),
        scenario!("auth.query_string", "a key in the query string (no header) → 401, nothing charged", |c, _| {
            let (ep, key, bal) = setup(c)?;
            for q in ["key", "api_key", "token", "access_token"] {
                let r = c.post(&format!("{}?{q}={}", ep.path(), key.key), &[], &ep.sample().to_string());
                ensure!(r.status == 401, "?{q}= got {}", r.brief());
            }
            ensure!(c.balance(&key)? == bal, "balance moved");
            pass("401 for ?key=, ?api_key=, ?token=, ?access_token=")
        }),
        scenario!("auth.duplicate_authorization", "two Authorization headers (a valid key first) on a paid route and /v1/me → 401 invalid_key, nothing charged", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let (sum, rows) = ledger_sum(c, &key)?;
            let other = format!("Bearer {}{}", c.prefix(), random_hex64());
            let valid = key.bearer();
            for (what, second) in [("an unknown key", other.as_str()), ("the same key again", valid.as_str())] {
                let h = [("Authorization", valid.as_str()), ("Authorization", second)];
                let r = c.post(&ep.path(), &h, &ep.sample().to_string());
                refused_uncharged(c, &r, 401, "invalid_key", &key, bal).map_err(|e| e.context(format!("POST {} with the key, then {what}", ep.path())))?;
                let me = c.get("/v1/me", &h);
                expect(&me, 401, "invalid_key").map_err(|e| e.context(format!("GET /v1/me with the key, then {what}")))?;
            }
            ensure!(ledger_sum(c, &key)? == (sum, rows), "a refused call wrote ledger rows");
            pass(format!("401 invalid_key on {} and /v1/me, balance still {bal}", ep.path()))
        }),
        scenario!("auth.me_requires_key", "GET /v1/me and /v1/me/ledger without a key → 401", |c, _| {
            expect(&c.get("/v1/me", &[]), 401, "")?;
            expect(&c.get("/v1/me/ledger", &[]), 401, "")?;
            pass("401, 401")
        }),
    ]
}

fn auth_case(c: &mut Client, header: Option<String>) -> Result<Outcome> {
    let ep = c.first();
    let h: Vec<(&str, &str)> = header.iter().map(|v| ("Authorization", v.as_str())).collect();
    let r = c.post(&ep.path(), &h, &ep.sample().to_string());
    ensure!(r.status == 401, "expected 401, got {}", r.brief());
    ensure!(r.header("www-authenticate").is_some_and(|v| v.to_ascii_lowercase().starts_with("bearer")),
        "401 without WWW-Authenticate: Bearer");
    pass(r.brief())
}
