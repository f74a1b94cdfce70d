//! The test upstream MCP server (tests/upstream/server.mjs, built with the official TypeScript SDK)
//! that the end-to-end tests put a price on (contract 3.12): started on a free port, stopped on drop,
//! with its plain-HTTP control endpoints (mode, stats).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

/// The audit's proxy.* scenarios (contract 3.12): all n/a on a gateway audited without `--upstream`
/// (src/audit/mod.rs checks this list names exactly them).
pub const PROXY_NA: &[&str] = &[
    "proxy.auth", "proxy.scope_denied", "proxy.unknown_upstream", "proxy.free_discovery",
    "proxy.tool_terms", "proxy.charge_exact", "proxy.default_price", "proxy.free_tool",
    "proxy.insufficient_balance", "proxy.jsonrpc_error", "proxy.tool_error", "proxy.upstream_500",
    "proxy.upstream_reset", "proxy.timeout", "proxy.credentials_not_forwarded", "proxy.sse_progress",
    "proxy.json_answer", "proxy.response_headers", "proxy.session", "proxy.bad_messages",
    "proxy.body_too_large", "proxy.cors", "proxy.stdio_crash", "proxy.rate_limited",
];
/// ... with `--upstream` for this server over HTTP ([`Upstream::audit_args`]): it has no `crash` tool.
pub const PROXY_HTTP_NA: &[&str] = &["proxy.stdio_crash"];
/// ... with `--upstream` for this server over stdio (an axum `command` upstream, [`stdio_command`]):
/// no control endpoints (so no HTTP 500, reset or JSON answers to ask for), no sessions.
pub const PROXY_STDIO_NA: &[&str] = &["proxy.upstream_500", "proxy.upstream_reset", "proxy.json_answer", "proxy.session"];

/// The token the gateways under test are given for the upstream's configured header
/// (`X-Upstream-Token = "env:UPSTREAM_TEST_TOKEN"`); `whoami` / `stats().last_headers` show it arrived.
pub const UPSTREAM_TOKEN: &str = "e2e-upstream-token-0123456789";

pub fn upstream_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/upstream")
}

/// Installs tests/upstream (npm ci, once per checkout and lockfile).
pub fn install() {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        super::node::require_node();
        super::node::npm_ci_once(&upstream_dir());
    });
}

/// The argv of the same server over stdio (an axum `command` upstream): absolute paths, installed.
pub fn stdio_command() -> Vec<String> {
    install();
    vec!["node".into(), upstream_dir().join("server.mjs").to_string_lossy().into_owned(), "--stdio".into()]
}

/// A running Streamable HTTP test upstream; dropping it stops it.
pub struct Upstream {
    /// `http://127.0.0.1:PORT/mcp`
    pub url: String,
    pub port: u16,
    server: Server,
    _dir: tempfile::TempDir,
}

impl Upstream {
    /// Installs tests/upstream if needed, starts `server.mjs --port 0` and waits for its url line.
    pub fn start() -> Upstream {
        install();
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("upstream.log");
        let log = std::fs::File::create(&log_path).expect("upstream log file");
        let mut c = Command::new("node");
        c.current_dir(upstream_dir())
            .args(["server.mjs", "--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut server = Server::spawn_logged(c, Some(log_path));
        let stdout = server.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some(url) = v["url"].as_str()
                {
                    let _ = tx.send(url.to_string());
                    break;
                }
            }
            for _ in lines {}
        });
        let started = Instant::now();
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("tests/upstream/server.mjs did not print its url line{}", server.log_tail()));
        let port: u16 = url
            .trim_start_matches("http://127.0.0.1:")
            .trim_end_matches("/mcp")
            .parse()
            .unwrap_or_else(|_| panic!("unexpected upstream url {url}"));
        eprintln!("e2e: test upstream at {url} in {:.1}s", started.elapsed().as_secs_f64());
        Upstream { url, port, server, _dir: dir }
    }

    /// `http://127.0.0.1:PORT/sse`: the same server over MCP's legacy HTTP+SSE transport.
    pub fn sse_url(&self) -> String {
        format!("http://127.0.0.1:{}/sse", self.port)
    }

    /// `http://127.0.0.1:PORT`: the base of the control endpoints (the audit's `--upstream-control`).
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `POST /control/mode`: "ok", "json" (answers application/json), "http500" or "reset".
    pub fn mode(&self, mode: &str) {
        let (status, _, body) = http(self.port, "POST", "/control/mode", &[], &format!(r#"{{"mode":"{mode}"}}"#));
        assert_eq!(status, 200, "upstream mode {mode}: {body}");
    }

    /// `GET /control/stats`: {"mode", "mcp_requests", "methods": {..}, "tools_call": {tool: n}, "last_headers": {..}}.
    pub fn stats(&self) -> serde_json::Value {
        let (status, _, body) = http(self.port, "GET", "/control/stats", &[], "");
        assert_eq!(status, 200, "upstream stats: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("upstream stats: {e}: {body}"))
    }

    /// How many `tools/call` of `tool` the upstream has answered (or started) since the last reset.
    pub fn calls(&self, tool: &str) -> u64 {
        self.stats()["tools_call"][tool].as_u64().unwrap_or(0)
    }

    pub fn reset_stats(&self) {
        let (status, _, body) = http(self.port, "POST", "/control/reset-stats", &[], "{}");
        assert_eq!(status, 200, "upstream reset-stats: {body}");
    }

    /// The `[upstreams.NAME]` tables the audit's proxy.* scenarios expect (see the audit's
    /// `--upstream`): forecast 250, alerts free, everything else 100, the token header, a 2 s timeout.
    pub fn manifest_toml(&self, name: &str) -> String {
        format!(
            "\n[upstreams.{name}]\nurl = \"{}\"\nprice_mcents = 100\ntimeout_seconds = 2\n\
             headers = {{ X-Upstream-Token = \"env:UPSTREAM_TEST_TOKEN\" }}\n\
             [upstreams.{name}.tools]\nforecast = 250\nalerts = 0\n",
            self.url
        )
    }

    /// The audit flags that run every proxy.* scenario against the gateway's `[upstreams.NAME]`
    /// made from [`Upstream::manifest_toml`] (served with `UPSTREAM_TEST_TOKEN` = [`UPSTREAM_TOKEN`]).
    /// (For a `command` upstream on [`stdio_command`]: `--upstream NAME --upstream-slow-call
    /// 'slow={"ms":4000}'` only, and [`PROXY_STDIO_NA`].)
    pub fn audit_args(&self, name: &str) -> Vec<String> {
        vec![
            "--upstream".into(),
            name.into(),
            "--upstream-control".into(),
            self.base(),
            "--upstream-slow-call".into(),
            r#"slow={"ms":4000}"#.into(),
            "--upstream-header".into(),
            format!("X-Upstream-Token={UPSTREAM_TOKEN}"),
        ]
    }

    pub fn log_tail(&self) -> String {
        self.server.log_tail()
    }
}

/// Runs tests/upstream/selftest.mjs (the official SDK client against the server over Streamable HTTP
/// and stdio: every tool, progress streaming, the control endpoints); panics with its report on failure.
pub fn run_selftest() {
    install();
    let out = Command::new("node")
        .current_dir(upstream_dir())
        .arg("selftest.mjs")
        .stdin(Stdio::null())
        .output()
        .expect("run node selftest.mjs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    assert!(out.status.success(), "the test upstream's self-test failed ({}):\n{report}", out.status);
}

/// `create-mcpay add-upstream NAME --url URL --discover` in `dir`, priced as the audit's proxy.*
/// scenarios expect ([`Upstream::manifest_toml`]): the CLI lists the server's tools and writes them.
pub fn add_test_upstream(dir: &Path, name: &str, url: &str) {
    let out = cli()
        .current_dir(dir)
        .args(["add-upstream", name, "--url", url, "--price", "100", "--timeout-seconds", "2"])
        .args(["--tool-price", "forecast=250", "--tool-price", "alerts=0"])
        .args(["--header", "X-Upstream-Token=env:UPSTREAM_TEST_TOKEN", "--discover"])
        .env("UPSTREAM_TEST_TOKEN", UPSTREAM_TOKEN)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "add-upstream --discover: {text}");
    let manifest = std::fs::read_to_string(dir.join("mcpay.toml")).unwrap();
    if url.ends_with("/sse") {
        assert!(manifest.contains(&format!("[upstreams.{name}]\nurl = \"{url}\"\ntransport = \"sse\"\n")), "--discover did not recognise the legacy SSE server: {text}\n{manifest}");
    }
    for tool in ["forecast = 250", "alerts = 0", "echo = 100", "whoami = 100"] {
        assert!(manifest.contains(tool), "add-upstream --discover did not write {tool:?}: {text}\n{manifest}");
    }
    unlist_echo(dir, name);
}

/// Takes `echo` out of the discovered price list (and syncs), so that one tool is left at the
/// upstream's default price (the audit's proxy.default_price).
fn unlist_echo(dir: &Path, name: &str) {
    let path = dir.join("mcpay.toml");
    let manifest = std::fs::read_to_string(&path).unwrap();
    let table = format!("[upstreams.{name}.tools]\n");
    let (head, tail) = manifest.split_once(&table).unwrap_or_else(|| panic!("no {table} in {manifest}"));
    let end = tail.find("\n[").map_or(tail.len(), |i| i + 1);
    let (tools, rest) = tail.split_at(end);
    assert_eq!(tools.matches("echo = 100\n").count(), 1, "one discovered echo entry for {name}: {manifest}");
    std::fs::write(&path, format!("{head}{table}{}{rest}", tools.replacen("echo = 100\n", "", 1))).unwrap();
    let status = cli().current_dir(dir).arg("sync").status().unwrap();
    assert!(status.success(), "sync after unlisting echo");
}

/// `create-mcpay add-upstream NAME --command "node …/server.mjs --stdio" --discover` (axum).
pub fn add_stdio_upstream(dir: &Path, name: &str) {
    let argv = stdio_command();
    let command = shlex::try_join(argv.iter().map(String::as_str)).expect("no NUL in the command");
    let out = cli()
        .current_dir(dir)
        .args(["add-upstream", name, "--command", &command, "--price", "100", "--timeout-seconds", "2"])
        .args(["--tool-price", "forecast=250", "--tool-price", "alerts=0", "--discover"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "add-upstream --command --discover: {text}");
    unlist_echo(dir, name);
}
