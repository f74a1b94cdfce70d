//! The end-to-end flow shared by the Workers targets (worker, mpp).

use std::path::Path;
use std::process::{Command, Stdio};

use super::*;

/// Environment that keeps wrangler and npm offline-friendly and quiet in CI.
pub fn node_cmd(program: &str, dir: &Path, xdg: &Path) -> Command {
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

pub fn npm(dir: &Path, xdg: &Path, args: &[&str]) {
    let mut c = node_cmd("npm", dir, xdg);
    c.args(args);
    run(c, &format!("npm {}", args.join(" ")));
}

pub fn require_node() {
    let node = Command::new("node").arg("--version").output().unwrap_or_else(|_| {
        panic!("node is not installed: the Workers end-to-end tests need Node.js >= 20 and npm")
    });
    let v = String::from_utf8_lossy(&node.stdout);
    let major: u32 = v.trim().trim_start_matches('v').split('.').next().unwrap_or("0").parse().unwrap_or(0);
    assert!(major >= 20, "Node.js >= 20 is required, found {v}");
    Command::new("npm").arg("--version").output().expect("npm is not installed: the Workers end-to-end tests need it");
}

/// Generate a project of `target`, install it once, type-check it and run its own suite in workerd;
/// add an endpoint and do it again; then serve it with `wrangler dev`, pay for a call to the new
/// endpoint over real HTTP and run the whole audit against it. With `signup`, the project sells
/// signups over x402 (on a local chain, paid for real) and MPP (tempo and stripe offers).
pub fn workers_project_end_to_end(target: &str, signup: bool) {
    require_node();
    let chain = signup.then(super::chain::Chain::start);
    let t = tempfile::tempdir().unwrap();
    let xdg = t.path().join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    let dir = t.path().join("demo");
    let status = cli().arg(&dir).args(["-t", target, "-y", "--no-git"]).status().unwrap();
    assert!(status.success());
    if let Some(chain) = &chain {
        enable_signup(&dir, &format!("{}\n[signup.mpp]\nmethods = [\"tempo/charge\", \"stripe/charge\"]\n", chain.manifest_toml()));
    }

    npm(&dir, &xdg, &["ci", "--no-audit", "--no-fund"]);
    npm(&dir, &xdg, &["run", "typecheck"]);
    npm(&dir, &xdg, &["test"]);

    // add-endpoint, then the same checks (node_modules are reused: one install per run).
    let status = cli().current_dir(&dir).args(["add-endpoint", "mytool", "--price", "250"]).status().unwrap();
    assert!(status.success());
    // A short handler time limit, so the audit's timeout.handler meets a 504 within a second.
    set_timeout_ms(&dir, "mytool", MYTOOL_TIMEOUT_MS);
    npm(&dir, &xdg, &["run", "typecheck"]);
    npm(&dir, &xdg, &["test"]);

    // Make the new handler fail or hang on demand, so the audit can check refunds, their cap and
    // the 504 of a handler past its timeout_ms.
    std::fs::write(dir.join("src/handlers/mytool.ts"), FAILING_HANDLER).unwrap();
    npm(&dir, &xdg, &["run", "typecheck"]);

    // Put a price on a real MCP server (tests/upstream, the official TS SDK): add-upstream lists its
    // tools with --discover, prices two of them, and the gateway sends it the configured header.
    let upstream = super::upstream::Upstream::start();
    super::upstream::add_test_upstream(&dir, "weather", &upstream.url);
    // The same server over the legacy HTTP+SSE transport (--discover recognises it).
    super::upstream::add_test_upstream(&dir, "legacy", &upstream.sse_url());
    npm(&dir, &xdg, &["run", "typecheck"]);

    // Serve it for real: one instance with an ADMIN_KEY, one without (for the 503 scenario).
    let port = free_port();
    let mut vars: Vec<(&str, String)> = MPP_VARS.iter().map(|(k, v)| (*k, v.to_string())).collect();
    vars.push(("UPSTREAM_TEST_TOKEN", super::upstream::UPSTREAM_TOKEN.to_string()));
    if let Some(chain) = &chain {
        vars.extend(chain.gateway_env());
    }
    let mut server = wrangler_dev(&dir, &xdg, port, Some(ADMIN), &t.path().join("state-a"), &vars);
    let bare_port = free_port();
    let mut bare = wrangler_dev(&dir, &xdg, bare_port, None, &t.path().join("state-b"), &[]);
    wait_ready(port, &mut server);
    wait_ready(bare_port, &mut bare);

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

    // Signups paid for real on the local chain, then the whole attack suite, with nothing left out.
    if let Some(chain) = &chain {
        chain.run_signup_checks(port, "mcp_", ADMIN, &server);
    }
    // Every target serves /mcp (contract 3.11): no mcp.* scenario is n/a.
    // The legacy SSE upstream's proxy.* scenarios first (the whole audit after them ends by
    // exhausting the hourly mint limit on purpose).
    let legacy_args: Vec<String> = ["--only".to_string(), "proxy.".to_string()].into_iter().chain(upstream.audit_args("legacy")).collect();
    audit_with(port, ADMIN, &legacy_args, super::upstream::PROXY_HTTP_NA);
    let mut na: Vec<&str> = if signup { SIGNUP_ON_NA } else { SIGNUP_OFF_NA }.to_vec();
    na.extend(super::upstream::PROXY_HTTP_NA);
    let harness = chain.as_ref().map(|c| c.control_url());
    audit(port, ADMIN, FAILING_CALL, SLOW_CALL, bare_port, harness.as_deref(), &upstream.audit_args("weather"), &na);
    drop(server);
    drop(bare);
}

const ADMIN: &str = "e2e-admin-key-0123456789abcdef";

const FAILING_HANDLER: &str = r#"import type { Handler } from "../lib/handler";
import type { MytoolInput } from "../generated/manifest";

// Fails on {"query":"fail"} (an upstream outage, as far as the gateway can tell) and, on
// {"query":"slow"}, takes 5 s: far past mytool's timeout_ms (a stuck upstream).
export const handler: Handler<MytoolInput> = {
  async run(input) {
    if (input.query === "fail") throw new Error("simulated upstream failure");
    if (input.query === "slow") await new Promise((resolve) => setTimeout(resolve, 5000));
    return { echo: input };
  },
};
"#;

/// The MPP secrets of the served signup (offers only: no Tempo chain or Stripe account is reachable
/// offline, so no MPP payment completes here; the projects' own suites pay with a test method).
const MPP_VARS: &[(&str, &str)] = &[
    ("MPP_SECRET_KEY", "e2e-mpp-secret-0123456789abcdef0123456789abcdef"),
    ("TEMPO_RECIPIENT", "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"),
    ("STRIPE_SECRET_KEY", "sk_test_e2e_offline"),
    ("STRIPE_NETWORK_ID", "e2e-network"),
];

fn wrangler_dev(dir: &Path, xdg: &Path, port: u16, admin: Option<&str>, state: &Path, vars: &[(&str, String)]) -> Server {
    let wrangler = dir.join("node_modules/.bin/wrangler");
    let mut dev = node_cmd(wrangler.to_str().unwrap(), dir, xdg);
    // Every instance gets its own inspector port too (the default, 9229, is shared and races).
    dev.args(["dev", "--ip", "127.0.0.1", "--port", &port.to_string()])
        .args(["--inspector-port", &free_port().to_string()])
        .arg("--persist-to")
        .arg(state)
        .stdin(Stdio::null());
    // Its output goes to a log beside its state, printed if it never answers.
    let log_path = state.with_extension("log");
    let log = std::fs::File::create(&log_path).expect("wrangler log file");
    dev.stdout(log.try_clone().unwrap()).stderr(log);
    if let Some(key) = admin {
        dev.args(["--var", &format!("ADMIN_KEY:{key}")]);
    }
    for (k, v) in vars {
        dev.args(["--var", &format!("{k}:{v}")]);
    }
    Server::spawn_logged(dev, Some(log_path))
}

/// `npm ci` in `dir` (a harness of tests/, e.g. tests/upstream) once per checkout and lockfile: a
/// marker in node_modules holds the lockfile it was installed from; concurrent tests wait on a lock.
pub fn npm_ci_once(dir: &Path) {
    use std::time::{Duration, Instant};
    let lockfile = std::fs::read(dir.join("package-lock.json")).unwrap_or_else(|e| panic!("{}/package-lock.json: {e}", dir.display()));
    let marker = dir.join("node_modules/.mcpay-installed");
    let current = || std::fs::read(&marker).is_ok_and(|m| m == lockfile);
    if current() {
        return;
    }
    let tmp = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    // A lock held by creating a directory (atomic); one left by a process that died is taken over.
    let lock = tmp.join(format!("{name}-install.lock"));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        std::fs::create_dir_all(&tmp).unwrap();
        match std::fs::create_dir(&lock) {
            Ok(()) => {
                std::fs::write(lock.join("pid"), std::process::id().to_string()).unwrap();
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(lock.join("pid")).ok();
                if holder.is_some_and(|pid| !Path::new(&format!("/proc/{}", pid.trim())).exists()) {
                    let _ = std::fs::remove_dir_all(&lock);
                    continue;
                }
                assert!(Instant::now() < deadline, "{} is still held after 600 s", lock.display());
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("cannot create {}: {e}", lock.display()),
        }
    }
    struct Unlock(std::path::PathBuf);
    impl Drop for Unlock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _unlock = Unlock(lock);
    if current() {
        return;
    }
    let xdg = tmp.join(format!("{name}-xdg"));
    std::fs::create_dir_all(&xdg).unwrap();
    npm(dir, &xdg, &["ci", "--ignore-scripts", "--no-audit", "--no-fund"]);
    std::fs::write(&marker, &lockfile).unwrap();
}
