//! End to end: generate a worker project, install it, type-check it and run its own test suite in
//! workerd; then add an endpoint and do it all again, and finally serve it with `wrangler dev` and
//! pay for a call over real HTTP. Needs Node.js >= 20 and npm, and fails (never skips) without them.
//! Run with `cargo test -- --include-ignored` (as .ci/run does).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_create-mcpay"))
}

/// Environment that keeps wrangler and npm offline-friendly and quiet in CI.
fn node_cmd(program: &str, dir: &Path, xdg: &Path) -> Command {
    let mut c = Command::new(program);
    c.current_dir(dir)
        .env("CI", "true")
        .env("WRANGLER_SEND_METRICS", "false")
        .env("WRANGLER_SEND_ERROR_REPORTS", "false")
        .env("WRANGLER_HIDE_BANNER", "true")
        .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
        .env("XDG_CONFIG_HOME", xdg)
        .env("NO_COLOR", "1")
        .env("npm_config_fund", "false")
        .env("npm_config_audit", "false")
        .env("npm_config_update_notifier", "false");
    c
}

fn npm(dir: &Path, xdg: &Path, args: &[&str]) {
    let mut c = node_cmd("npm", dir, xdg);
    c.args(args);
    run(c, &format!("npm {}", args.join(" ")));
}

fn run(mut c: Command, what: &str) {
    let started = Instant::now();
    let status = c.status().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(status.success(), "{what} failed ({status})");
    eprintln!("e2e: {what} ok in {:.1}s", started.elapsed().as_secs_f64());
}

fn require_node() {
    let node = Command::new("node").arg("--version").output().unwrap_or_else(|_| {
        panic!("node is not installed: the worker end-to-end test needs Node.js >= 20 and npm")
    });
    let v = String::from_utf8_lossy(&node.stdout);
    let major: u32 = v.trim().trim_start_matches('v').split('.').next().unwrap_or("0").parse().unwrap_or(0);
    assert!(major >= 20, "Node.js >= 20 is required, found {v}");
    Command::new("npm").arg("--version").output().expect("npm is not installed: the worker end-to-end test needs it");
}

#[test]
#[ignore = "needs Node.js >= 20 and npm; run with --include-ignored"]
fn worker_project_installs_typechecks_and_passes_its_own_tests() {
    require_node();
    let t = tempfile::tempdir().unwrap();
    let xdg = t.path().join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    let dir = t.path().join("demo");
    let status = cli().arg(&dir).args(["-y", "--no-git"]).status().unwrap();
    assert!(status.success());

    npm(&dir, &xdg, &["ci", "--no-audit", "--no-fund"]);
    npm(&dir, &xdg, &["run", "typecheck"]);
    npm(&dir, &xdg, &["test"]);

    // add-endpoint, then the same checks (node_modules are reused: one install per run).
    let status = cli().current_dir(&dir).args(["add-endpoint", "mytool", "--price", "250"]).status().unwrap();
    assert!(status.success());
    npm(&dir, &xdg, &["run", "typecheck"]);
    npm(&dir, &xdg, &["test"]);

    // Make the new handler fail on demand, so the audit can check refunds and their cap.
    std::fs::write(dir.join("src/handlers/mytool.ts"), FAILING_HANDLER).unwrap();

    // Serve it for real: one instance with an ADMIN_KEY, one without (for the 503 scenario).
    let port = free_port();
    let server = wrangler_dev(&dir, &xdg, port, Some(ADMIN), &t.path().join("state-a"));
    let bare_port = free_port();
    let bare = wrangler_dev(&dir, &xdg, bare_port, None, &t.path().join("state-b"));
    wait_ready(port, &server);
    wait_ready(bare_port, &bare);

    // Pay for a call to the new endpoint.
    let (status, _, body) = http(port, "POST", "/v1/admin/mint", &[("X-Admin-Key", ADMIN)],
        r#"{"balance_mcents": 1000, "scopes": ["mytool"]}"#);
    assert_eq!(status, 201, "mint: {body}");
    let key = json_str(&body, "key");
    assert!(key.starts_with("mcp_") && key.len() == 4 + 64, "{key}");

    let auth = format!("Bearer {key}");
    let (status, headers, body) = http(port, "POST", "/v1/mytool", &[("Authorization", &auth)], r#"{"query":"hello"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-charged-mcents"), Some("250".into()), "{headers}");
    assert_eq!(header(&headers, "x-balance-mcents"), Some("750".into()));

    let (status, _, body) = http(port, "GET", "/v1/me", &[("Authorization", &auth)], "");
    assert_eq!(status, 200);
    assert!(body.contains("\"balance_mcents\":750"), "{body}");

    // Malformed input costs nothing.
    let (status, _, body) = http(port, "POST", "/v1/mytool", &[("Authorization", &auth)], r#"{"query":42}"#);
    assert_eq!(status, 400);
    assert!(body.contains("no charge applied"), "{body}");
    let (_, _, body) = http(port, "GET", "/v1/me", &[("Authorization", &auth)], "");
    assert!(body.contains("\"balance_mcents\":750"), "{body}");

    // The whole attack suite, with nothing left out.
    let out = cli()
        .args(["audit", &format!("http://127.0.0.1:{port}"), "--admin-key", ADMIN])
        .args(["--failing-call", r#"mytool={"query":"fail"}"#])
        .args(["--unconfigured-url", &format!("http://127.0.0.1:{bare_port}")])
        .args(["--color", "never"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "audit failed against the worker");
    assert!(report.contains(" 0 failed, 0 not applicable"), "every scenario must apply to the worker: {report}");
    drop(server);
    drop(bare);
}

const ADMIN: &str = "e2e-admin-key-0123456789abcdef";

const FAILING_HANDLER: &str = r#"import type { Handler } from "../lib/handler";
import type { MytoolInput } from "../generated/manifest";

// Fails on {"query":"fail"} (an upstream outage, as far as the gateway can tell).
export const handler: Handler<MytoolInput> = {
  async run(input) {
    if (input.query === "fail") throw new Error("simulated upstream failure");
    return { echo: input };
  },
};
"#;

fn wrangler_dev(dir: &Path, xdg: &Path, port: u16, admin: Option<&str>, state: &Path) -> Server {
    let wrangler = dir.join("node_modules/.bin/wrangler");
    let mut dev = node_cmd(wrangler.to_str().unwrap(), dir, xdg);
    // Its own process group, so that stopping it stops workerd too.
    std::os::unix::process::CommandExt::process_group(&mut dev, 0);
    dev.args(["dev", "--ip", "127.0.0.1", "--port", &port.to_string()])
        .arg("--persist-to")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(key) = admin {
        dev.args(["--var", &format!("ADMIN_KEY:{key}")]);
    }
    Server(dev.spawn().expect("start wrangler dev"))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_ready(port: u16, server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            if let Ok((200, _, _)) = std::panic::catch_unwind(|| http(port, "GET", "/v1/health", &[], "")) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = server;
    panic!("wrangler dev did not answer /v1/health on port {port} within 60 s");
}

/// A minimal HTTP/1.1 client (Connection: close), enough for these checks.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    (status, head.to_string(), body)
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

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

fn json_str(body: &str, key: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {body}")).to_string()
}
