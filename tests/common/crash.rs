//! `kill -9` under load (contract 3.8, *The sweeper*): a server target is killed while 32 clients
//! pay for calls, restarted on the same database, and then the database itself is read with SQL:
//! every `hold` in the ledger ends with exactly one `capture` or `release` within the sweep bound,
//! no hold is left `held`, and each key's balance change equals the sum of its captured holds.
//! Every call whose client got no answer is retried with its `Idempotency-Key`: it is replayed
//! (captured) or runs again (released), so each logical call is paid for exactly once.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// Where the gateway keeps its data, read here with the database's own tools (sqlite3 through
/// Python's standard library; psql for PostgreSQL).
pub enum Db {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Db {
    pub fn database_url(&self) -> String {
        match self {
            Db::Sqlite(p) => format!("sqlite:{}", p.display()),
            Db::Postgres(url) => url.clone(),
        }
    }

    /// Rows of `sql`, each a list of column texts (NULL → "").
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        let out = match self {
            Db::Sqlite(p) => Command::new("python3")
                .args([
                    "-c",
                    "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nfor r in c.execute(sys.argv[2]):\n print('|'.join('' if v is None else str(v) for v in r))",
                ])
                .arg(p)
                .arg(sql)
                .output()
                .expect("python3 is needed to read the SQLite database"),
            Db::Postgres(url) => Command::new("psql")
                .args(["-X", "-q", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
                .output()
                .expect("psql is needed to read the PostgreSQL database"),
        };
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    }

    fn count(&self, sql: &str) -> i64 {
        self.query(sql)[0][0].parse().unwrap()
    }
}

/// A fresh PostgreSQL database next to the one in `admin_url` (…/test), dropped when this is dropped.
pub struct TempPgDb {
    admin_url: String,
    pub url: String,
    name: String,
}

impl TempPgDb {
    pub fn create(admin_url: &str) -> TempPgDb {
        let name = format!("mcpay_crash_{}_{}", std::process::id(), rand_hex(4));
        let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin_url);
        let url = format!("{base}/{name}");
        Db::Postgres(admin_url.to_string()).query(&format!("CREATE DATABASE {name}"));
        TempPgDb { admin_url: admin_url.to_string(), url, name }
    }
}

impl Drop for TempPgDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-X", "-q", "-d", &self.admin_url, "-c", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)])
            .output();
    }
}

fn rand_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// One paid call; None when the server could not be reached or the answer was cut (the server
/// was killed): only a complete Content-Length answer counts.
fn try_call(port: u16, auth: &str, idem: &str, body: &str) -> Option<(u16, String)> {
    let (status, head, rest) = try_http(port, "POST", "/v1/mytool", &[("Authorization", auth), ("Idempotency-Key", idem)], body).ok()?;
    let len: usize = header(&head, "content-length")?.parse().ok()?;
    (status != 0 && rest.len() == len).then_some((status, head))
}

/// The call a client made, and what it learned.
struct Sent {
    key: usize,
    idem: String,
    answered: Option<u16>,
}

/// Kills the server started by `start` (on `port`, with `db`) under load at concurrency 32,
/// restarts it and checks the ledger with SQL. `nap_body` is a body the `mytool` handler answers
/// successfully after sleeping a few hundred milliseconds (so calls are in flight when it dies);
/// `sweep_bound` is the endpoint's timeout + the sweep margin + the sweep period.
pub fn kill_under_load(label: &str, port: u16, db: &Db, start: &dyn Fn() -> Server, admin: &str, nap_body: &str, sweep_bound: Duration) {
    const CLIENTS: usize = 32;
    const PRICE: i64 = 250;
    const MINT: i64 = 1_000_000;
    let mut server = start();
    wait_ready(port, &mut server);
    let keys: Vec<String> = (0..CLIENTS)
        .map(|_| {
            let (status, _, body) = http(port, "POST", "/v1/admin/mint", &[("X-Admin-Key", admin)], &format!(r#"{{"balance_mcents": {MINT}, "scopes": ["mytool"]}}"#));
            assert_eq!(status, 201, "{label}: mint: {body}");
            format!("Bearer {}", json_str(&body, "key"))
        })
        .collect();

    // 32 clients, each paying for calls in a loop until the server dies under them.
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(k, auth)| {
            let (auth, sent, stop, body) = (auth.clone(), sent.clone(), stop.clone(), nap_body.to_string());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let idem = format!("crash-{k}-{}", rand_hex(16));
                    let answered = try_call(port, &auth, &idem, &body).map(|(s, _)| s);
                    sent.lock().unwrap().push(Sent { key: k, idem, answered });
                    if answered.is_none() {
                        break;
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    // SIGKILL: no shutdown code runs.
    server.0.kill().unwrap();
    let _ = server.0.wait();
    let killed_at = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let answered_200 = sent.iter().filter(|s| s.answered == Some(200)).count();
    let unanswered = sent.iter().filter(|s| s.answered.is_none()).count();
    let held = db.count("SELECT COUNT(*) FROM holds WHERE state = 'held'");
    eprintln!("e2e {label}: {} calls sent, {answered_200} answered 200, {unanswered} unanswered, {held} holds left held by the kill", sent.len());
    assert!(answered_200 > 0, "{label}: no call succeeded before the kill");
    assert!(held > 0, "{label}: the kill left no call in flight (the test proves nothing)");
    assert!(sent.iter().all(|s| matches!(s.answered, None | Some(200))), "{label}: a call failed under load");

    // Restart on the same database: the sweeper releases the dead calls' holds within the bound.
    let mut server = start();
    wait_ready(port, &mut server);
    loop {
        let left = db.count("SELECT COUNT(*) FROM holds WHERE state = 'held'");
        if left == 0 {
            break;
        }
        assert!(killed_at.elapsed() < sweep_bound, "{label}: {left} holds still held {:?} after the kill{}", killed_at.elapsed(), server.log_tail());
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("e2e {label}: every hold settled {:.1} s after the kill", killed_at.elapsed().as_secs_f64());

    // Every hold row of the ledger has exactly one capture or release (same key, same call id).
    let bad = db.query(
        "SELECT h.request_id, COUNT(s.seq) FROM ledger h LEFT JOIN ledger s ON s.key_ref = h.key_ref AND s.request_id = h.request_id \
         AND s.kind IN ('capture', 'release') WHERE h.kind = 'hold' GROUP BY h.request_id HAVING COUNT(s.seq) <> 1",
    );
    assert!(bad.is_empty(), "{label}: holds without exactly one capture or release: {bad:?}");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM ledger WHERE kind IN ('capture', 'release') AND request_id NOT IN (SELECT request_id FROM ledger WHERE kind = 'hold')"),
        0,
        "{label}: a capture or release without a hold"
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM ledger WHERE kind IN ('charge', 'refund')"), 0, "{label}: old one-step rows");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM holds"),
        db.count("SELECT COUNT(*) FROM ledger WHERE kind = 'hold'"),
        "{label}: hold records and hold rows differ"
    );
    // Per key: minted − balance = the sum of the captured holds = −(sum of the ledger's non-mint rows).
    let per_key = db.query(
        "SELECT k.id, k.balance, \
         (SELECT COALESCE(SUM(h.price), 0) FROM holds h WHERE h.key_ref = k.id AND h.state = 'captured'), \
         (SELECT COALESCE(SUM(l.amount_mcents), 0) FROM ledger l WHERE l.key_ref = k.id) FROM api_keys k",
    );
    assert_eq!(per_key.len(), CLIENTS, "{label}: keys");
    for row in &per_key {
        let n: Vec<i64> = row.iter().map(|v| v.parse().unwrap()).collect();
        assert_eq!(MINT - n[1], n[2], "{label}: key {}: balance change ≠ captured sum", n[0]);
        assert_eq!(n[3], n[1], "{label}: key {}: ledger sum ≠ balance", n[0]);
        assert_eq!(n[2] % PRICE, 0);
    }

    // The clients that got no answer retry with their Idempotency-Key: a captured call is replayed
    // (no new hold), a released one runs again (one new hold, captured).
    let holds_before = db.count("SELECT COUNT(*) FROM ledger WHERE kind = 'hold'");
    let mut runs_again = 0;
    let mut by_key: BTreeMap<usize, i64> = BTreeMap::new();
    for s in sent.iter().filter(|s| s.answered.is_none()) {
        let (status, head) = try_call(port, &keys[s.key], &s.idem, nap_body).unwrap_or_else(|| panic!("{label}: retry got no answer{}", server.log_tail()));
        assert_eq!(status, 200, "{label}: retry of an unanswered call: {head}");
        if header(&head, "idempotent-replayed").as_deref() != Some("true") {
            runs_again += 1;
        }
        *by_key.entry(s.key).or_default() += 1;
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM ledger WHERE kind = 'hold'"), holds_before + runs_again, "{label}: a replay held money");
    // Each logical call is now paid exactly once: captured holds = distinct calls that got a 200.
    let captured = db.count("SELECT COUNT(*) FROM holds WHERE state = 'captured'");
    assert_eq!(captured as usize, answered_200 + unanswered, "{label}: captured calls ≠ calls answered");
    eprintln!("e2e {label}: {unanswered} retried ({runs_again} ran again, the rest replayed); ledger consistent");
    drop(server);
}
