//! Load benchmark (run by scripts/bench.sh, which starts the server on SQLite first).
//! Seeds keys straight into the server's database, then drives GET /v1/health and paid calls
//! with many concurrent connections across many keys, and prints requests/s, p50/p99 latency
//! and the server's peak RSS. Finally checks that no key overdrew and every ledger adds up.
//!
//! Environment: BENCH_URL (http://127.0.0.1:PORT), BENCH_DATABASE_URL (the server's sqlite: URL),
//! BENCH_SERVER_PID (for RSS), BENCH_REQUESTS (default 20000), BENCH_CONCURRENCY (default 64),
//! BENCH_SECONDS (time cap per phase, default 30). Loopback only.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gateway::Store;
use gateway::generated::Endpoint;
use gateway::keys::{generate_api_key, generate_key_id, sha256_hex};
use gateway::store::NewKey;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn peak_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Phase {
    ok: usize,
    other: Vec<(u16, usize)>,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Phase {
    fn report(&self, label: &str) {
        let mut l = self.latencies.clone();
        l.sort();
        let pct = |p: f64| l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or_default();
        let total = l.len();
        println!(
            "{label:<16} {total:>7} requests in {:>6.2}s  {:>9.0} req/s  ({:>7.0} ok/s)  p50 {:>7.2} ms  p99 {:>7.2} ms  other statuses {:?}",
            self.elapsed.as_secs_f64(),
            total as f64 / self.elapsed.as_secs_f64(),
            self.ok as f64 / self.elapsed.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            self.other,
        );
    }
}

/// Runs `total` requests with `concurrency` workers; `make(i)` builds request i.
async fn drive<F>(total: usize, concurrency: usize, cap: Duration, make: F) -> Phase
where
    F: Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let make = make.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut statuses: Vec<u16> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || started.elapsed() > cap {
                    break;
                }
                let t = Instant::now();
                let status = match make(i).send().await {
                    Ok(res) => {
                        let s = res.status().as_u16();
                        let _ = res.bytes().await;
                        s
                    }
                    Err(_) => 0,
                };
                lat.push(t.elapsed());
                statuses.push(status);
            }
            (lat, statuses)
        }));
    }
    let mut phase = Phase { ok: 0, other: Vec::new(), latencies: Vec::new(), elapsed: Duration::ZERO };
    for w in workers {
        let (lat, statuses) = w.await.unwrap();
        phase.latencies.extend(lat);
        for s in statuses {
            if s == 200 {
                phase.ok += 1;
            } else if let Some(e) = phase.other.iter_mut().find(|(code, _)| *code == s) {
                e.1 += 1;
            } else {
                phase.other.push((s, 1));
            }
        }
    }
    phase.elapsed = started.elapsed();
    phase
}

#[tokio::main]
async fn main() {
    let url = std::env::var("BENCH_URL").expect("BENCH_URL");
    assert!(url.starts_with("http://127.0.0.1:") || url.starts_with("http://localhost:"), "loopback only");
    let db_url = std::env::var("BENCH_DATABASE_URL").expect("BENCH_DATABASE_URL");
    let pid = std::env::var("BENCH_SERVER_PID").unwrap_or_default();
    let total = env_num("BENCH_REQUESTS", 20_000).min(1_000_000);
    let concurrency = env_num("BENCH_CONCURRENCY", 64).clamp(1, 1024);
    let cap = Duration::from_secs(env_num("BENCH_SECONDS", 30).min(600) as u64);

    // The endpoint with the highest rate limit; each key makes at most that many calls (so no
    // 429s) and can afford all but one of them (so the balance check is exercised).
    let ep = *Endpoint::ALL.iter().max_by_key(|e| e.rate_limit_per_minute()).unwrap();
    let per_key = (ep.rate_limit_per_minute() as usize).clamp(2, 50);
    let n_keys = total.div_ceil(per_key);
    let store = Store::connect(&db_url).await.expect("open the server's database");
    let mut keys = Vec::with_capacity(n_keys);
    let seed_started = Instant::now();
    for _ in 0..n_keys {
        let key = generate_api_key();
        let (key_id, hash, rid) = (generate_key_id(), sha256_hex(&key), uuid::Uuid::new_v4().to_string());
        let balance = ep.price_mcents() * (per_key as i64 - 1);
        let new = NewKey { key_hash: &hash, key_id: &key_id, name: None, balance_mcents: balance, scopes: &[ep.scope().to_string()], request_id: &rid };
        store.create_key(&new).await.expect("seed key");
        keys.push((key, hash));
    }
    println!(
        "endpoint /v1/{} ({} mcents), {n_keys} keys x {per_key} calls, concurrency {concurrency} (seeded in {:.1}s)",
        ep.name(),
        ep.price_mcents(),
        seed_started.elapsed().as_secs_f64()
    );

    gateway::signup::install_tls_provider();
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().unwrap();
    let c = client.clone();
    let health_url = format!("{url}/v1/health");
    let health = drive(total, concurrency, cap, move |_| c.get(&health_url)).await;
    let rss_after_health = peak_rss_kib(&pid);
    health.report("GET /v1/health");

    let c = client.clone();
    let paid_url = format!("{url}{}", ep.path());
    let body = ep.sample_input().to_string();
    let auth: Arc<Vec<String>> = Arc::new(keys.iter().map(|(k, _)| format!("Bearer {k}")).collect());
    let paid = drive(n_keys * per_key, concurrency, cap, move |i| {
        c.post(&paid_url)
            .header("Authorization", &auth[i % auth.len()])
            .header("Content-Type", "application/json")
            .body(body.clone())
    })
    .await;
    paid.report(&format!("POST {}", ep.path()));
    match (rss_after_health, peak_rss_kib(&pid)) {
        (Some(h), Some(p)) => println!("server peak RSS: {:.1} MiB after health, {:.1} MiB after paid calls", h as f64 / 1024.0, p as f64 / 1024.0),
        _ => println!("server peak RSS: unavailable (set BENCH_SERVER_PID on Linux)"),
    }

    // Books: no overdraft, ledger sums equal balances, charges equal the 200s.
    let mut charges = 0i64;
    let mut bad = 0;
    for (_, hash) in &keys {
        let row = store.find_key(hash).await.unwrap().expect("key exists");
        let sum = store.ledger_sum(row.id).await.unwrap();
        if row.balance < 0 || sum != row.balance {
            bad += 1;
        }
        charges += row.calls;
    }
    store.close().await;
    println!("checked {} keys: {bad} with a negative balance or a ledger mismatch; {charges} charged calls vs {} 200 responses", keys.len(), paid.ok);
    if bad > 0 || charges != paid.ok as i64 {
        eprintln!("FAILED: the books do not add up");
        std::process::exit(1);
    }
    println!("OK: no key overdrew");
}
