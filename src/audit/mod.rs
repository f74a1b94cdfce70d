//! `create-mcpay audit URL`: the attack suite any gateway speaking docs/contract.md is checked against.

mod checks;
mod client;
mod scenario;
mod scenarios;

use std::time::Instant;

use anyhow::{Result, bail};
use console::style;
use serde_json::json;

use crate::cli::AuditArgs;
pub use scenario::{Options, Outcome, Scenario};
pub use scenarios::all;

pub fn run(args: &AuditArgs) -> Result<()> {
    let selected: Vec<Scenario> = all()
        .into_iter()
        .filter(|s| args.only.as_deref().is_none_or(|p| matches(p, s.name)))
        .collect();
    if args.list {
        for s in &selected {
            println!("{:<32} {}", s.name, s.expect);
        }
        if !args.json {
            println!("{} scenarios", selected.len());
        }
        return Ok(());
    }
    let Some(raw_url) = &args.url else { bail!("audit needs the gateway's URL, e.g. `create-mcpay audit http://127.0.0.1:8787 --admin-key $ADMIN_KEY`") };
    let url = &client::base_url(raw_url, "the gateway URL")?;
    if !raw_url.contains("://") {
        eprintln!("note: reading {raw_url:?} as {url}");
    }
    if selected.is_empty() {
        bail!("--only {:?} matches no scenario; see `create-mcpay audit --list`", args.only.as_deref().unwrap_or(""));
    }
    // Most scenarios mint the keys they attack with: without the admin key the audit would report
    // dozens of failures that are not the gateway's. Stop before the first request instead.
    let admin_key = args.admin_key.clone().filter(|k| !k.trim().is_empty());
    if admin_key.is_none() {
        bail!(
            "audit needs the gateway's admin key to mint the keys its scenarios use: pass --admin-key KEY or set MCPAY_ADMIN_KEY \
             (the ADMIN_KEY the gateway at {url} runs with: .dev.vars for a worker, the environment for axum)"
        );
    }
    let unconfigured_url = match &args.unconfigured_url {
        Some(u) => Some(client::base_url(u, "--unconfigured-url")?),
        None => None,
    };
    let failing_call = endpoint_call("--failing-call", args.failing_call.as_deref())?;
    let slow_call = endpoint_call("--slow-call", args.slow_call.as_deref())?;
    let x402_harness = args.x402_harness.as_deref().map(|u| u.trim_end_matches('/').to_string());
    if let Some(h) = &x402_harness
        && !(h.starts_with("http://") || h.starts_with("https://"))
    {
        bail!("--x402-harness {h:?}: expected the harness's control URL, e.g. http://127.0.0.1:8402/__control (the controlUrl of tests/chain/chain.mjs's ready line)");
    }
    let upstream = args.upstream.as_deref().map(str::trim).filter(|n| !n.is_empty()).map(str::to_string);
    let upstream_control = match &args.upstream_control {
        Some(u) => Some(client::base_url(u, "--upstream-control")?),
        None => None,
    };
    let upstream_slow_call = endpoint_call("--upstream-slow-call", args.upstream_slow_call.as_deref())?;
    let upstream_header = match args.upstream_header.as_deref() {
        None => None,
        Some(raw) => match raw.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() => Some((name.trim().to_string(), value.to_string())),
            _ => bail!("--upstream-header {raw:?}: expected NAME=VALUE, e.g. --upstream-header X-Upstream-Token=secret"),
        },
    };
    let opts = Options { failing_call, slow_call, unconfigured_url, x402_harness, upstream, upstream_control, upstream_slow_call, upstream_header };
    let mut client = client::Client::connect(url, admin_key)?;
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut results = Vec::new();
    let started = Instant::now();
    for s in &selected {
        let t = Instant::now();
        let (status, evidence) = match (s.run)(&mut client, &opts) {
            Ok(Outcome::Pass(e)) => { passed += 1; ("pass", e) }
            Ok(Outcome::NotApplicable(e)) => { skipped += 1; ("n/a", e) }
            Err(e) => { failed += 1; ("FAIL", format!("{e:#}")) }
        };
        let ms = t.elapsed().as_millis();
        if args.json {
            results.push(json!({"name": s.name, "expect": s.expect, "status": status, "evidence": evidence, "ms": ms}));
        } else {
            let tag = match status {
                "pass" => style("pass").green(),
                "n/a" => style("n/a ").yellow(),
                _ => style("FAIL").red().bold(),
            };
            println!("{tag} {:<32} {}  — {evidence}", s.name, s.expect);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json!({
            "url": url, "passed": passed, "failed": failed, "not_applicable": skipped,
            "mints": client.mints, "seconds": started.elapsed().as_secs_f64(), "scenarios": results,
        }))?);
    } else {
        println!("audit: {passed} passed, {failed} failed, {skipped} not applicable ({} keys minted, {:.1}s)", client.mints, started.elapsed().as_secs_f64());
    }
    if failed > 0 {
        bail!("{failed} scenario(s) failed against {url}");
    }
    Ok(())
}

/// `--failing-call` / `--slow-call ENDPOINT=JSON`, split at the first `=`.
fn endpoint_call(flag: &str, raw: Option<&str>) -> Result<Option<(String, String)>> {
    let Some(raw) = raw else { return Ok(None) };
    match raw.split_once('=') {
        Some((ep, body)) if !ep.trim().is_empty() => Ok(Some((ep.trim().to_string(), body.to_string()))),
        _ => bail!("{flag} {raw:?}: expected ENDPOINT=JSON, e.g. {flag} 'mytool={{\"query\":\"x\"}}'"),
    }
}

/// `--only` patterns: a substring, or a glob with `*`.
fn matches(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return name.contains(pattern);
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        match rest.find(part) {
            Some(pos) if i > 0 || pos == 0 => rest = &rest[pos + part.len()..],
            _ => return false,
        }
    }
    parts.last().is_some_and(|l| l.is_empty()) || rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_least_sixty_uniquely_named_scenarios() {
        let s = all();
        assert!(s.len() >= 60, "{}", s.len());
        let mut names: Vec<_> = s.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), s.len(), "duplicate scenario names");
        assert_eq!(s.last().unwrap().name, "admin.hourly_limit", "the mint-exhausting scenario runs last");
    }

    #[test]
    fn endpoint_calls_split_at_the_first_equals_sign() {
        assert_eq!(endpoint_call("--slow-call", None).unwrap(), None);
        assert_eq!(
            endpoint_call("--slow-call", Some(r#"mytool={"query":"a=b"}"#)).unwrap(),
            Some(("mytool".to_string(), r#"{"query":"a=b"}"#.to_string()))
        );
        for bad in ["mytool", r#"={"query":"slow"}"#, ""] {
            let e = endpoint_call("--slow-call", Some(bad)).unwrap_err().to_string();
            assert!(e.contains("--slow-call") && e.contains("ENDPOINT=JSON"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_contract_3_8_scenarios_are_listed() {
        let names: Vec<_> = all().iter().map(|s| s.name).collect();
        for n in ["idempotency.replay", "idempotency.mismatch", "idempotency.other_endpoint", "idempotency.scoped_to_key", "idempotency.syntax", "timeout.handler", "auth.duplicate_authorization", "ledger.paging"] {
            assert!(names.contains(&n), "{n} missing");
        }
    }

    /// Issue 13: at least 20 mcp.* scenarios; the e2e tests' MCP_NA (what a gateway without /mcp
    /// reports n/a) names exactly them.
    #[test]
    fn the_contract_3_11_scenarios_are_listed_and_the_e2e_na_list_matches() {
        let mut mcp: Vec<&str> = all().iter().map(|s| s.name).filter(|n| n.starts_with("mcp.")).collect();
        assert!(mcp.len() >= 20, "{} mcp.* scenarios", mcp.len());
        let common = include_str!("../../tests/common/mod.rs");
        let start = common.find("pub const MCP_NA: &[&str] = &[").expect("MCP_NA in tests/common/mod.rs");
        let block = &common[start..start + common[start..].find("];").expect("end of MCP_NA")];
        let mut listed: Vec<&str> = block.split('"').skip(1).step_by(2).collect();
        mcp.sort();
        listed.sort();
        assert_eq!(listed, mcp, "tests/common/mod.rs MCP_NA");
    }

    /// Issue 14: the proxy.* scenarios (contract 3.12); tests/common/upstream.rs PROXY_NA (what an
    /// audit without --upstream reports n/a) names exactly them.
    #[test]
    fn the_contract_3_12_scenarios_are_listed_and_the_e2e_na_list_matches() {
        let mut proxy: Vec<&str> = all().iter().map(|s| s.name).filter(|n| n.starts_with("proxy.")).collect();
        assert!(proxy.len() >= 20, "{} proxy.* scenarios", proxy.len());
        let common = include_str!("../../tests/common/upstream.rs");
        let start = common.find("pub const PROXY_NA: &[&str] = &[").expect("PROXY_NA in tests/common/upstream.rs");
        let block = &common[start..start + common[start..].find("];").expect("end of PROXY_NA")];
        let mut listed: Vec<&str> = block.split('"').skip(1).step_by(2).collect();
        proxy.sort();
        listed.sort();
        assert_eq!(listed, proxy, "tests/common/upstream.rs PROXY_NA");
    }

    #[test]
    fn only_patterns() {
        assert!(matches("auth", "auth.missing"));
        assert!(matches("auth.*", "auth.missing"));
        assert!(matches("*.missing", "auth.missing"));
        assert!(!matches("admin.*", "auth.missing"));
        assert!(matches("charge", "charge.exact_price"));
    }
}
