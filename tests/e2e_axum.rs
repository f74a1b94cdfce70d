//! End to end: generate an axum project, build it with --locked (one CARGO_TARGET_DIR shared by
//! every generated Rust project of the run), run its own tests on SQLite and — when
//! TEST_DATABASE_URL / TEST_REDIS_URL are set, as .ci/run does — on PostgreSQL + Redis; add an
//! endpoint and test again; then serve the built binary and run the audit against it.
//! Run with `cargo test -- --include-ignored`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const ADMIN: &str = "e2e-admin-key-0123456789abcdef";

/// The target dir every generated Rust project of this run shares (MCPAY_GENERATED_TARGET_DIR, or
/// one under this crate's target dir).
fn shared_target() -> PathBuf {
    std::env::var_os("MCPAY_GENERATED_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("generated-target"))
}

fn cargo(dir: &Path, args: &[&str], env: &[(&str, &str)]) {
    let mut c = Command::new(env!("CARGO"));
    c.current_dir(dir).args(args).env("CARGO_TARGET_DIR", shared_target()).env_remove("RUSTFLAGS");
    for (k, v) in env {
        c.env(k, v);
    }
    run(c, &format!("cargo {} {}", args.join(" "), env.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(" ")));
}

fn services() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for var in ["TEST_DATABASE_URL", "TEST_REDIS_URL"] {
        if let Some(v) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
            out.push((var, v));
        }
    }
    out
}

#[test]
#[ignore = "builds a generated Rust project (minutes); run with --include-ignored"]
fn axum_project_builds_locked_and_passes_its_own_tests() {
    // Signups are sold over x402 on a local chain (paid for real below). The MPP rail's tempo and
    // stripe methods are Cargo features left off by default (built and unit-tested below); the
    // project's own tests pay over MPP with a test method.
    let chain = common::chain::Chain::start();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("api");
    let status = cli().arg(&dir).args(["-t", "axum", "-y", "--no-git"]).status().unwrap();
    assert!(status.success());
    assert!(dir.join("Cargo.lock").exists(), "the template ships a Cargo.lock");

    // The default project (signup off), then the same project selling signups.
    cargo(&dir, &["build", "--locked", "--all-targets"], &[]);
    cargo(&dir, &["test", "--locked"], &[]);
    enable_signup(&dir, &chain.manifest_toml());
    cargo(&dir, &["test", "--locked"], &[]);
    // The opt-in MPP methods (the mpp crate's tempo and stripe clients) build from the shipped
    // lockfile and their unit tests pass; a build without the x402 rail still compiles.
    cargo(&dir, &["test", "--locked", "--lib", "--features", "tempo,stripe"], &[]);
    cargo(&dir, &["check", "--locked", "--all-targets", "--no-default-features"], &[]);
    let svc = services();
    let svc_env: Vec<(&str, &str)> = svc.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if svc.len() == 2 {
        cargo(&dir, &["test", "--locked"], &svc_env);
    } else {
        eprintln!("e2e: TEST_DATABASE_URL and TEST_REDIS_URL are not both set: the PostgreSQL + Redis run is left to .ci/run");
    }

    // add-endpoint, then build and test again (on PostgreSQL + Redis when available).
    let status = cli().current_dir(&dir).args(["add-endpoint", "mytool", "--price", "250"]).status().unwrap();
    assert!(status.success());
    // A short handler time limit, so the audit's timeout.handler meets a 504 within a second.
    set_timeout_ms(&dir, "mytool", MYTOOL_TIMEOUT_MS);
    let check = cli().current_dir(&dir).arg("check").status().unwrap();
    assert!(check.success());
    cargo(&dir, &["test", "--locked"], &svc_env);

    // Serve the built binary and audit it (the new handler fails or hangs on demand, for the refund
    // and timeout checks).
    std::fs::write(dir.join("src/handlers/mytool.rs"), FAILING_HANDLER).unwrap();
    // Put a price on real MCP servers (tests/upstream, the official TS SDK): over Streamable HTTP
    // and as a stdio process the gateway spawns; add-upstream lists their tools with --discover.
    let upstream = common::upstream::Upstream::start();
    common::upstream::add_test_upstream(&dir, "weather", &upstream.url);
    common::upstream::add_test_upstream(&dir, "legacy", &upstream.sse_url());
    common::upstream::add_stdio_upstream(&dir, "local");
    cargo(&dir, &["build", "--locked"], &[]);
    let bin = shared_target().join("debug/api");
    let port = free_port();
    let bare_port = free_port();
    let mut gateway_env = chain.gateway_env();
    gateway_env.push(("UPSTREAM_TEST_TOKEN", common::upstream::UPSTREAM_TOKEN.to_string()));
    let mut server = serve(&bin, port, Some(ADMIN), &t.path().join("a.db"), &gateway_env);
    let mut bare = serve(&bin, bare_port, None, &t.path().join("b.db"), &[]);
    wait_ready(port, &mut server);
    wait_ready(bare_port, &mut bare);

    let (status, _, body) = http(port, "POST", "/v1/admin/mint", &[("X-Admin-Key", ADMIN)], r#"{"balance_mcents": 1000, "scopes": ["mytool"]}"#);
    assert_eq!(status, 201, "mint: {body}");
    let auth = format!("Bearer {}", json_str(&body, "key"));
    let (status, headers, body) = http(port, "POST", "/v1/mytool", &[("Authorization", &auth)], r#"{"query":"hello"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-charged-mcents"), Some("250".into()), "{headers}");
    assert_eq!(header(&headers, "x-balance-mcents"), Some("750".into()));

    chain.run_signup_checks(port, "mcp_", ADMIN, &server);
    // The stdio upstream first (its proxy.* scenarios against /mcp/local mint 4 keys; the whole
    // audit after it ends by exhausting the hourly mint limit on purpose).
    let stdio_args: Vec<String> = ["--only", "proxy.", "--upstream", "local", "--upstream-slow-call", r#"slow={"ms":4000}"#]
        .map(String::from)
        .to_vec();
    audit_with(port, ADMIN, &stdio_args, common::upstream::PROXY_STDIO_NA);
    // The same server over the legacy HTTP+SSE transport.
    let legacy_args: Vec<String> = ["--only".to_string(), "proxy.".to_string()].into_iter().chain(upstream.audit_args("legacy")).collect();
    audit_with(port, ADMIN, &legacy_args, common::upstream::PROXY_HTTP_NA);
    let mut na: Vec<&str> = SIGNUP_X402_NA.to_vec();
    na.extend(common::upstream::PROXY_HTTP_NA);
    audit(port, ADMIN, FAILING_CALL, SLOW_CALL, bare_port, Some(&chain.control_url()), &upstream.audit_args("weather"), &na);
    drop(server);
    drop(bare);

    // kill -9 under load, restart, and the ledger read with SQL: on SQLite and on PostgreSQL at once.
    let sweep_bound = std::time::Duration::from_millis(MYTOOL_TIMEOUT_MS + 60_000 + 5_000 + 25_000);
    let gateway_env = chain.gateway_env();
    std::thread::scope(|s| {
        let sqlite = s.spawn(|| {
            let db = crash::Db::Sqlite(t.path().join("crash.db"));
            let port = free_port();
            let start = || serve_url(&bin, port, Some(ADMIN), &db.database_url(), &t.path().join("crash-sqlite.log"), &gateway_env);
            crash::kill_under_load("sqlite", port, &db, &start, ADMIN, NAP_BODY, sweep_bound);
        });
        if let Some(url) = services().into_iter().find(|(k, _)| *k == "TEST_DATABASE_URL").map(|(_, v)| v) {
            let pg = crash::TempPgDb::create(&url);
            let db = crash::Db::Postgres(pg.url.clone());
            let port = free_port();
            let start = || serve_url(&bin, port, Some(ADMIN), &db.database_url(), &t.path().join("crash-pg.log"), &gateway_env);
            crash::kill_under_load("postgres", port, &db, &start, ADMIN, NAP_BODY, sweep_bound);
        } else {
            eprintln!("e2e: TEST_DATABASE_URL is not set: the kill -9 test on PostgreSQL is left to .ci/run");
        }
        sqlite.join().unwrap();
    });
}

/// A body the mytool handler answers after 300 ms (so calls are in flight when the server is killed).
const NAP_BODY: &str = r#"{"query":"nap"}"#;

fn serve(bin: &Path, port: u16, admin: Option<&str>, db: &Path, env: &[(&str, String)]) -> Server {
    serve_url(bin, port, admin, &format!("sqlite:{}", db.display()), &db.with_extension("log"), env)
}

fn serve_url(bin: &Path, port: u16, admin: Option<&str>, database_url: &str, log_path: &Path, env: &[(&str, String)]) -> Server {
    let mut c = Command::new(bin);
    for var in ["SIGNUP_SECRET", "X402_RPC_URL", "X402_FACILITATOR_TIMEOUT_MS", "SIGNUP_SWEEP_INTERVAL_MS"] {
        c.env_remove(var);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.env("PORT", port.to_string())
        .env("BIND", "127.0.0.1")
        .env("DATABASE_URL", database_url)
        .env_remove("REDIS_URL")
        .env_remove("ADMIN_KEY")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    // Its output goes to a log beside its database (the payment state lines are info), shown if it fails.
    // Appended to: a restarted server keeps the log of the one before it.
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).expect("server log file");
    c.stdout(log.try_clone().unwrap()).stderr(log);
    if let Some(k) = admin {
        c.env("ADMIN_KEY", k);
    }
    Server::spawn_logged(c, Some(log_path.to_path_buf()))
}

const FAILING_HANDLER: &str = r#"//! Fails on {"query":"fail"} (an upstream outage, as far as the gateway can tell) and, on
//! {"query":"slow"}, takes 5 s: far past mytool's timeout_ms (a stuck upstream). {"query":"nap"}
//! succeeds after 300 ms (the kill -9 test's load).

use serde_json::{Value, json};

use crate::generated::MytoolInput;
use crate::handler::{Context, HandlerError};

pub fn validate(_input: &MytoolInput) -> Result<(), String> {
    Ok(())
}

pub async fn run(input: MytoolInput, _ctx: Context) -> Result<Value, HandlerError> {
    if input.query == "fail" {
        return Err(HandlerError::new("simulated upstream failure"));
    }
    if input.query == "nap" {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    if input.query == "slow" {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
    Ok(json!({ "echo": input }))
}
"#;
