//! A local chain with a real x402 facilitator (tests/chain/chain.mjs: anvil, Circle's FiatToken v2.2
//! and @x402/core + @x402/evm's facilitator), for paying `POST /v1/signup` for real, offline.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use super::*;

/// The SIGNUP_SECRET of the gateways under test (signup-x402.mjs derives the expected keys with it).
pub const SIGNUP_SECRET: &str = "e2e-signup-secret-0123456789abcdef0123456789abcdef";

/// A running chain + facilitator; dropping it stops both.
pub struct Chain {
    /// The line chain.mjs printed when ready: rpcUrl, chainId, network, asset, assetName,
    /// assetVersion, assetDecimals, payTo, payer, payerKey, poorPayer, poorPayerKey, facilitatorUrl.
    pub info: serde_json::Value,
    server: Server,
    _dir: tempfile::TempDir,
}

fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chain")
}

impl Chain {
    /// Installs tests/chain (once per checkout and lockfile), starts the chain and the facilitator
    /// on free ports and waits until they are ready.
    pub fn start() -> Chain {
        super::node::require_node();
        install();
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("chain.log");
        let log = std::fs::File::create(&log_path).expect("chain log file");
        let mut c = Command::new("node");
        c.current_dir(harness_dir())
            .arg("chain.mjs")
            .args(["--port", &free_port().to_string()])
            .args(["--facilitator-port", &free_port().to_string()])
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
                if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(&line) {
                    let _ = tx.send(v);
                    break;
                }
            }
            // Keep reading so the harness never writes into a closed pipe.
            for _ in lines {}
        });
        let started = Instant::now();
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(info) => {
                eprintln!("e2e: chain + facilitator ready in {:.1}s: {info}", started.elapsed().as_secs_f64());
                Chain { info, server, _dir: dir }
            }
            Err(_) => panic!("tests/chain/chain.mjs did not print its ready line{}", server.log_tail()),
        }
    }

    fn get(&self, field: &str) -> String {
        match &self.info[field] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            other => panic!("chain info has no {field}: {other}"),
        }
    }

    /// The `[signup.x402]` table of a manifest paying on this chain through its facilitator.
    pub fn manifest_toml(&self) -> String {
        format!(
            "[signup.x402]\nnetwork = \"{}\"\nasset = \"{}\"\nasset_name = \"{}\"\nasset_version = \"{}\"\n\
             asset_decimals = {}\npay_to = \"{}\"\nfacilitator_url = \"{}\"\n",
            self.get("network"),
            self.get("asset"),
            self.get("assetName"),
            self.get("assetVersion"),
            self.get("assetDecimals"),
            self.get("payTo"),
            self.get("facilitatorUrl"),
        )
    }

    /// The harness's control API (faults, automine, signed payments, balances, counts), for
    /// `create-mcpay audit --x402-harness`.
    pub fn control_url(&self) -> String {
        self.get("controlUrl")
    }

    /// The environment of a gateway selling signups on this chain: the signup secret, the chain's RPC
    /// (to resolve pending payments), a facilitator timeout short enough for the "hang" fault, and a
    /// short sweep interval (so the sweep's recovery is seen within the test).
    pub fn gateway_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SIGNUP_SECRET", SIGNUP_SECRET.to_string()),
            ("X402_RPC_URL", self.get("rpcUrl")),
            ("X402_FACILITATOR_TIMEOUT_MS", "3000".to_string()),
            ("SIGNUP_SWEEP_INTERVAL_MS", "1000".to_string()),
        ]
    }

    /// Runs tests/chain/signup-x402.mjs against the gateway on `port` (generated with signup enabled,
    /// this chain's `[signup.x402]` table and API keys starting with `key_prefix`, served with
    /// [`Chain::gateway_env`] and the admin key `admin`); panics with its report (and the ends of the
    /// chain's and `gateway`'s logs) unless every check passed.
    pub fn run_signup_checks(&self, port: u16, key_prefix: &str, admin: &str, gateway: &Server) {
        let started = Instant::now();
        let out = Command::new("node")
            .current_dir(harness_dir())
            .arg("signup-x402.mjs")
            .args(["--gateway", &format!("http://127.0.0.1:{port}")])
            .args(["--chain", &self.info.to_string()])
            .args(["--key-prefix", key_prefix])
            .args(["--admin-key", admin])
            .args(["--signup-secret", SIGNUP_SECRET])
            .stdin(Stdio::null())
            .output()
            .expect("run node signup-x402.mjs");
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("{report}");
        assert!(
            out.status.success(),
            "x402 signup checks failed ({}):\n{report}{}{}",
            out.status,
            self.server.log_tail(),
            gateway.log_tail()
        );
        eprintln!("e2e: x402 signup checks ok in {:.1}s", started.elapsed().as_secs_f64());
    }
}

/// Runs tests/chain/selftest.mjs (its own chain; payments sent to the facilitator directly, balances
/// read on chain, replays and bad authorizations refused); panics with its report on failure.
pub fn run_selftest() {
    super::node::require_node();
    install();
    let out = Command::new("node")
        .current_dir(harness_dir())
        .arg("selftest.mjs")
        .stdin(Stdio::null())
        .output()
        .expect("run node selftest.mjs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    assert!(out.status.success(), "the chain harness self-test failed ({}):\n{report}", out.status);
}

/// `npm ci` of tests/chain, once per lockfile: a marker in node_modules records the lockfile it was
/// installed from, and a lock directory keeps test binaries running at the same time from
/// installing together.
fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = harness_dir();
        let lockfile = std::fs::read(dir.join("package-lock.json")).expect("tests/chain/package-lock.json");
        let marker = dir.join("node_modules/.mcpay-installed");
        let current = || std::fs::read(&marker).is_ok_and(|m| m == lockfile);
        if current() {
            return;
        }
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let _lock = DirLock::acquire(tmp.join("chain-install.lock"));
        if current() {
            return;
        }
        let xdg = tmp.join("chain-xdg");
        std::fs::create_dir_all(&xdg).unwrap();
        super::node::npm(&dir, &xdg, &["ci", "--ignore-scripts", "--no-audit", "--no-fund"]);
        std::fs::write(&marker, &lockfile).unwrap();
    });
}

/// A lock held by creating a directory (atomic); one left by a process that died is taken over.
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(path: PathBuf) -> DirLock {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    std::fs::write(path.join("pid"), std::process::id().to_string()).unwrap();
                    return DirLock(path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(path.join("pid")).ok();
                    let dead = holder.is_some_and(|pid| !Path::new(&format!("/proc/{}", pid.trim())).exists());
                    if dead {
                        let _ = std::fs::remove_dir_all(&path);
                        continue;
                    }
                    assert!(Instant::now() < deadline, "{} is still held after 600 s", path.display());
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("cannot create {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
