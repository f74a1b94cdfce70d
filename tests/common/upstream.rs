//! The test upstream MCP server (tests/upstream/server.mjs, built with the official TypeScript SDK)
//! that the end-to-end tests put a price on (contract 3.12): started on a free port, stopped on drop,
//! with its plain-HTTP control endpoints (mode, stats).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

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
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let Some(url) = v["url"].as_str() {
                        let _ = tx.send(url.to_string());
                        break;
                    }
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
