//! `POST /v1/admin/mint`: the admin key, the mint body's validation and the admin routes' CORS.

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};

use super::prelude::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("admin.missing_key", "mint without X-Admin-Key → 401 invalid_admin_key", |c, _| {
            let r = c.post("/v1/admin/mint", &[], &json!({"balance_mcents": 100, "scopes": [scopes_of(c)]}).to_string());
            expect(&r, 401, "invalid_admin_key")?;
            pass(r.brief())
        }),
        scenario!("admin.wrong_key", "mint with a wrong admin key of the same length → 401, no key", |c, _| {
            let Some(real) = c.admin_key.clone() else { return Ok(Outcome::NotApplicable("needs --admin-key".into())) };
            let wrong: String = real.chars().map(|ch| if ch == 'x' { 'y' } else { 'x' }).collect();
            let r = c.post("/v1/admin/mint", &[("X-Admin-Key", &wrong)], &json!({"balance_mcents": 100, "scopes": [scopes_of(c)]}).to_string());
            expect(&r, 401, "invalid_admin_key")?;
            ensure!(r.json()["key"].is_null(), "returned a key");
            pass(r.brief())
        }),
        scenario!("admin.key_prefix_of_real", "a prefix of the real admin key → 401", |c, _| {
            let Some(real) = c.admin_key.clone() else { return Ok(Outcome::NotApplicable("needs --admin-key".into())) };
            let r = c.post("/v1/admin/mint", &[("X-Admin-Key", &real[..real.len() / 2])], &json!({"balance_mcents": 100, "scopes": [scopes_of(c)]}).to_string());
            expect(&r, 401, "invalid_admin_key")?;
            pass(r.brief())
        }),
        scenario!("admin.unset", "with no ADMIN_KEY configured, mint → 503 admin_disabled", |c, o| {
            let Some(url) = o.unconfigured_url.clone() else {
                return Ok(Outcome::NotApplicable("needs --unconfigured-url (a deployment with no ADMIN_KEY)".into()));
            };
            let other = Client::connect(&url, None)?;
            let r = other.post("/v1/admin/mint", &[("X-Admin-Key", "anything")], &json!({"balance_mcents": 100, "scopes": [scopes_of(c)]}).to_string());
            expect(&r, 503, "admin_disabled")?;
            let r2 = other.post("/v1/admin/mint", &[("X-Admin-Key", "")], "{}");
            expect(&r2, 503, "admin_disabled")?;
            pass(r.brief())
        }),
        scenario!("admin.balance_string", "balance_mcents \"1000\" (a string) → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": "1000", "scopes": [s]})) }),
        scenario!("admin.balance_float", "balance_mcents 10.5 → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": 10.5, "scopes": [s]})) }),
        scenario!("admin.balance_float_integral", "balance_mcents 100.0 → 400 or minted as 100, never another amount", |c, _| {
            let s = scopes_of(c);
            let r = c.mint_raw(&format!("{{\"balance_mcents\": 100.0, \"scopes\": [\"{s}\"]}}"));
            if r.status == 201 {
                ensure!(r.json()["balance_mcents"] == 100, "minted {}", r.body);
            } else {
                expect(&r, 400, "invalid_input")?;
            }
            pass(r.brief())
        }),
        scenario!("admin.balance_negative", "balance_mcents -5 → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": -5, "scopes": [s]})) }),
        scenario!("admin.balance_zero", "balance_mcents 0 → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": 0, "scopes": [s]})) }),
        scenario!("admin.balance_huge", "balance_mcents 1e30 → 400", |c, _| {
            let s = scopes_of(c);
            let r = c.mint_raw(&format!("{{\"balance_mcents\": 1e30, \"scopes\": [\"{s}\"]}}"));
            expect(&r, 400, "invalid_input")?;
            pass(r.brief())
        }),
        scenario!("admin.balance_unsafe_integer", "balance_mcents 2^53 + 1 → 400 (not rounded)", |c, _| {
            let s = scopes_of(c);
            let r = c.mint_raw(&format!("{{\"balance_mcents\": 9007199254740993, \"scopes\": [\"{s}\"]}}"));
            expect(&r, 400, "invalid_input")?;
            pass(r.brief())
        }),
        scenario!("admin.ceiling", "balance_mcents 2^53 − 1 (above any sane ceiling) → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": 9007199254740991u64, "scopes": [s]})) }),
        scenario!("admin.balance_null", "balance_mcents null → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": null, "scopes": [s]})) }),
        scenario!("admin.balance_bool", "balance_mcents true → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": true, "scopes": [s]})) }),
        scenario!("admin.balance_missing", "no balance_mcents → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"scopes": [s]})) }),
        scenario!("admin.scopes_missing", "no scopes (default deny needs them) → 400", |c, _| mint_refused(c, json!({"balance_mcents": 100}))),
        scenario!("admin.scopes_empty", "scopes [] → 400", |c, _| mint_refused(c, json!({"balance_mcents": 100, "scopes": []}))),
        scenario!("admin.scopes_unknown", "an unknown scope → 400", |c, _| mint_refused(c, json!({"balance_mcents": 100, "scopes": ["root:everything"]}))),
        scenario!("admin.scopes_wildcard", "scope \"*\" → 400 (no wildcard grants)", |c, _| mint_refused(c, json!({"balance_mcents": 100, "scopes": ["*"]}))),
        scenario!("admin.scopes_not_array", "scopes as a string → 400", |c, _| { let s = scopes_of(c); mint_refused(c, json!({"balance_mcents": 100, "scopes": s})) }),
        scenario!("admin.invalid_json", "a mint body that is not JSON → 400", |c, _| {
            let r = c.mint_raw("{\"balance_mcents\": 100,");
            ensure!(r.status == 400, "got {}", r.brief());
            pass(r.brief())
        }),
        scenario!("admin.mint_ok", "a valid mint → 201 with a prefixed 64-hex key and a public key_id", |c, _| {
            let ep = c.first();
            let k = c.key_for(&ep, 1)?;
            let p = c.prefix();
            ensure!(k.key.len() == p.len() + 64 && k.key[p.len()..].chars().all(|ch| ch.is_ascii_hexdigit() && !ch.is_ascii_uppercase()), "key {}…", &k.key[..p.len()]);
            ensure!(!k.key_id.is_empty() && !k.key.contains(&k.key_id), "key_id {:?}", k.key_id);
            pass(format!("key {p}<64 hex>, key_id {}", k.key_id))
        }),
        scenario!("admin.no_cors_preflight", "OPTIONS /v1/admin/mint from a browser origin → no Access-Control-Allow-Origin, not 2xx", |c, _| {
            let r = c.request("OPTIONS", "/v1/admin/mint", &[("Origin", "https://evil.example"), ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "x-admin-key,content-type")], None);
            ensure!(r.header("access-control-allow-origin").is_none(), "ACAO: {:?}", r.header("access-control-allow-origin"));
            ensure!(!(200..300).contains(&r.status), "preflight answered {}", r.status);
            pass(r.brief())
        }),
        scenario!("admin.no_cors_response", "POST /v1/admin/mint with an Origin → no Access-Control-* headers", |c, _| {
            let admin = c.admin_key.clone().unwrap_or_default();
            let r = c.post("/v1/admin/mint", &[("X-Admin-Key", &admin), ("Origin", "https://evil.example")], "{}");
            ensure!(!r.headers.keys().any(|k| k.as_str().starts_with("access-control-")), "CORS headers on an admin response");
            pass(r.brief())
        }),
    ]
}

/// Last of all: it spends the hourly mint allowance.
pub fn hourly_limit() -> Scenario {
    scenario!("admin.hourly_limit", "minting past the hourly limit → 429 with Retry-After", |c, _| {
            if c.admin_key.is_none() {
                return Ok(Outcome::NotApplicable("needs --admin-key".into()));
            }
            let s = scopes_of(c);
            for i in 0..5000 {
                let r = c.mint_raw(&json!({"balance_mcents": 1, "scopes": [s]}).to_string());
                match r.status {
                    201 => continue,
                    429 => {
                        let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("429 without integer Retry-After"))?;
                        ensure!((1..=3600).contains(&retry), "Retry-After {retry}");
                        return pass(format!("429 after {i} more mints ({} this run), Retry-After {retry}", c.mints));
                    }
                    _ => bail!("unexpected {}", r.brief()),
                }
            }
            bail!("5000 mints within the hour were all accepted")
    })
}

fn mint_refused(c: &mut Client, body: Value) -> Result<Outcome> {
    let r = c.mint_raw(&body.to_string());
    expect(&r, 400, "invalid_input")?;
    ensure!(r.json()["key"].is_null(), "a refused mint returned a key");
    pass(format!("{} for {body}", r.brief()))
}

fn scopes_of(c: &Client) -> String {
    c.first().scope
}
