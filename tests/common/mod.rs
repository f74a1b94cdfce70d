//! Helpers shared by the end-to-end tests: the CLI binary, processes that are stopped with their
//! children, and a minimal HTTP/1.1 client.
#![allow(dead_code)]

pub mod chain;
pub mod node;
pub mod crash;
pub mod upstream;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_create-mcpay"))
}

/// Runs a command to completion; panics with `what` when it fails.
pub fn run(mut c: Command, what: &str) {
    let started = Instant::now();
    let status = c.status().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(status.success(), "{what} failed ({status})");
    eprintln!("e2e: {what} ok in {:.1}s", started.elapsed().as_secs_f64());
}

/// Turns on signup in the project at `dir` (scopes ["example"]) with the given rail tables appended
/// to its mcpay.toml, and regenerates it with `create-mcpay sync`.
#[allow(dead_code)]
pub fn enable_signup(dir: &std::path::Path, rails: &str) {
    let path = dir.join("mcpay.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("enabled = false") && text.contains("scopes = []"), "unexpected default manifest:\n{text}");
    let text = text.replacen("enabled = false", "enabled = true", 1).replacen("scopes = []", "scopes = [\"example\"]", 1);
    std::fs::write(&path, format!("{text}\n{rails}")).unwrap();
    let out = cli().current_dir(dir).arg("sync").output().unwrap();
    assert!(out.status.success(), "sync after enabling signup: {}", String::from_utf8_lossy(&out.stderr));
}

/// Gives `endpoint` of the project at `dir` a `timeout_ms` in its mcpay.toml (add-endpoint has no
/// flag for it) and regenerates the project with `create-mcpay sync`.
#[allow(dead_code)]
pub fn set_timeout_ms(dir: &std::path::Path, endpoint: &str, ms: u64) {
    let path = dir.join("mcpay.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let table = format!("[endpoints.{endpoint}]\n");
    assert!(text.contains(&table) && !text.contains(&format!("{table}timeout_ms")), "no plain {table:?} table in:\n{text}");
    std::fs::write(&path, text.replacen(&table, &format!("{table}timeout_ms = {ms}\n"), 1)).unwrap();
    let out = cli().current_dir(dir).arg("sync").output().unwrap();
    assert!(out.status.success(), "sync after setting timeout_ms: {}", String::from_utf8_lossy(&out.stderr));
}

/// The `mytool` calls the e2e handlers (FAILING_HANDLER) fail on and outlive `MYTOOL_TIMEOUT_MS` on.
#[allow(dead_code)]
pub const FAILING_CALL: &str = r#"mytool={"query":"fail"}"#;
#[allow(dead_code)]
pub const SLOW_CALL: &str = r#"mytool={"query":"slow"}"#;
/// `mytool`'s timeout_ms in the e2e projects: short, so `timeout.handler` waits about a second.
#[allow(dead_code)]
pub const MYTOOL_TIMEOUT_MS: u64 = 1000;

/// The audit scenarios that cannot apply to a gateway with signup disabled.
#[allow(dead_code)]
pub const SIGNUP_OFF_NA: &[&str] = &[
    "signup.payment_required", "signup.x402_offer", "signup.mpp_offer", "signup.x402_malformed",
    "signup.x402_other_offer", "signup.mpp_tampered", "signup.two_credentials",
    "signup.idempotency_key_syntax", "signup.body_cannot_buy_more", "signup.cors",
    "signup.x402_forged_replay", "signup.x402_pending_recovery",
];
/// ... to a gateway whose POST /mcp answers 404 (every mcp.* scenario of the audit, contract 3.11).
#[allow(dead_code)]
pub const MCP_NA: &[&str] = &[
    "mcp.initialize", "mcp.ping", "mcp.free_ignores_authorization", "mcp.tools_list",
    "mcp.tool_terms", "mcp.input_schema", "mcp.pricing_tool", "mcp.balance_tool",
    "mcp.auth_missing", "mcp.auth_invalid", "mcp.key_elsewhere_ignored", "mcp.no_key_material",
    "mcp.charge_exact", "mcp.call_id_per_call", "mcp.xp_awarded", "mcp.every_tool",
    "mcp.concurrent_burst", "mcp.invalid_arguments", "mcp.insufficient_balance",
    "mcp.scope_default_deny", "mcp.rate_limited", "mcp.shared_rate_limit", "mcp.unknown_tool",
    "mcp.refund_on_failure", "mcp.timeout", "mcp.refund_cap", "mcp.idempotency_replay",
    "mcp.idempotency_concurrent", "mcp.idempotency_mismatch", "mcp.idempotency_syntax",
    "mcp.duplicate_jsonrpc_ids", "mcp.batch_distinct_ids", "mcp.body_too_large",
    "mcp.malformed_json", "mcp.json_answers", "mcp.accept_optional", "mcp.get_delete_405",
    "mcp.cors", "mcp.request_id",
];
/// ... with signup enabled and both rails configured.
#[allow(dead_code)]
pub const SIGNUP_ON_NA: &[&str] = &["signup.disabled"];
/// ... with signup enabled on the x402 rail only.
#[allow(dead_code)]
pub const SIGNUP_X402_NA: &[&str] = &["signup.disabled", "signup.mpp_offer", "signup.mpp_tampered"];

/// Runs the audit against a gateway (with `x402_harness`, the control URL of the tests/chain harness
/// whose facilitator the gateway uses; `failing_call` and `slow_call` as ENDPOINT=JSON, the calls
/// its handler fails on and outlives its timeout_ms on); every scenario must pass except those
/// named in `not_applicable`, which must be reported n/a (and no others).
/// The whole audit against a served gateway; `extra`: more flags (e.g. the upstream's, for proxy.*).
#[allow(clippy::too_many_arguments)]
pub fn audit(port: u16, admin: &str, failing_call: &str, slow_call: &str, bare_port: u16, x402_harness: Option<&str>, extra: &[String], not_applicable: &[&str]) {
    let mut args: Vec<String> = vec!["--failing-call".into(), failing_call.into(), "--slow-call".into(), slow_call.into()];
    args.extend(extra.iter().cloned());
    args.extend(["--unconfigured-url".into(), format!("http://127.0.0.1:{bare_port}")]);
    if let Some(url) = x402_harness {
        args.extend(["--x402-harness".into(), url.into()]);
    }
    audit_with(port, admin, &args, not_applicable);
}

/// `create-mcpay audit --json` with these flags; every scenario passes except exactly `not_applicable`.
pub fn audit_with(port: u16, admin: &str, args: &[String], not_applicable: &[&str]) {
    let mut c = cli();
    c.args(["audit", &format!("http://127.0.0.1:{port}"), "--admin-key", admin]).args(args).args(["--json"]);
    let out = c.output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&report).unwrap_or_else(|e| panic!("audit --json: {e}: {report}"));
    let mut failed = Vec::new();
    let mut na = Vec::new();
    for s in v["scenarios"].as_array().expect("scenarios") {
        let name = s["name"].as_str().unwrap_or_default().to_string();
        eprintln!("audit: {:<5} {name} — {}", s["status"].as_str().unwrap_or(""), s["evidence"].as_str().unwrap_or(""));
        match s["status"].as_str() {
            Some("pass") => {}
            Some("n/a") => na.push(name),
            _ => failed.push(name),
        }
    }
    eprintln!("audit: {} passed, {} failed, {} not applicable", v["passed"], v["failed"], v["not_applicable"]);
    assert!(failed.is_empty() && out.status.success(), "audit scenarios failed: {failed:?}");
    let mut expected: Vec<String> = not_applicable.iter().map(|s| s.to_string()).collect();
    expected.sort();
    na.sort();
    assert_eq!(na, expected, "the scenarios reported not applicable");
}

/// A spawned server in its own process group; dropping it stops the whole group.
pub struct Server(pub Child, pub Option<std::path::PathBuf>);

impl Server {
    /// Spawns `c` in a new process group.
    pub fn spawn(c: Command) -> Server {
        Server::spawn_logged(c, None)
    }

    /// Spawns `c` in a new process group; `log` is where its output goes (shown if it fails).
    pub fn spawn_logged(mut c: Command, log: Option<std::path::PathBuf>) -> Server {
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        Server(c.spawn().expect("start the server"), log)
    }

    pub fn log_tail(&self) -> String {
        let Some(path) = &self.1 else { return String::new() };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("\n--- last lines of {}:\n{}", path.display(), lines[lines.len().saturating_sub(40)..].join("\n"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).stderr(std::process::Stdio::null()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(std::process::Stdio::null()).status();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_ready(port: u16, server: &mut Server) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("the server on port {port} exited ({status}) before answering{}", server.log_tail());
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok()
            && let Ok((200, _, _)) = std::panic::catch_unwind(|| http(port, "GET", "/v1/health", &[], ""))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("the server did not answer /v1/health on port {port} within 180 s{}", server.log_tail());
}

/// A minimal HTTP/1.1 client (Connection: close), enough for these checks.
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    try_http(port, method, path, headers, body).unwrap()
}

/// [`http`], with connection and I/O errors returned (a server that dies mid-request).
pub fn try_http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Ok((status, head.to_string(), body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

pub fn json_str(body: &str, key: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {body}")).to_string()
}
