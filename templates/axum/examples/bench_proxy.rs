//! Proxy benchmark (run by scripts/bench.sh): what `/mcp/<name>` adds to an MCP server. In one
//! run it starts a Streamable HTTP MCP server built with rmcp (stateless, JSON answers, one tool)
//! and a gateway metering it as an upstream (SQLite in a temporary directory, each on a runtime of
//! its own), then drives the same paid `tools/call` at the upstream directly and through the
//! gateway, one call at a time (what the gateway adds to a call; goal: ≤ 1 ms at p50) and with
//! BENCH_CONCURRENCY calls at once, and prints p50/p99 latency, throughput, the added latency and
//! the ratios of each. Finally checks the books: every 200 through the gateway is one captured hold.
//!
//! Environment: BENCH_REQUESTS (default 20000 per phase), BENCH_CONCURRENCY (default 64),
//! BENCH_SECONDS (time cap per phase, default 30). Loopback only.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gateway::generated::{UpstreamConfig, UpstreamTransport};
use gateway::keys::{generate_api_key, generate_key_id, sha256_hex};
use gateway::proxy::Upstreams;
use gateway::store::NewKey;
use gateway::{AppState, GeneratedHandlers, RateLimiter, Store};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ErrorData, ListToolsResult, PaginatedRequestParams, ServerCapabilities,
    ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler};
use serde_json::json;

const PRICE: i64 = 100;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The upstream: one tool that answers at once.
#[derive(Clone, Copy)]
struct Upstream;

impl ServerHandler for Upstream {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(&self, _: Option<PaginatedRequestParams>, _: RequestContext<RoleServer>) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::default())
    }

    async fn call_tool(&self, _: CallToolRequestParams, _: RequestContext<RoleServer>) -> Result<CallToolResponse, ErrorData> {
        let r = json!({ "content": [{ "type": "text", "text": "sunny" }] });
        serde_json::from_value::<CallToolResult>(r).map(Into::into).map_err(|e| ErrorData::internal_error(e.to_string(), None))
    }
}

/// Runs `f` on a runtime of its own (2 worker threads) in a thread of its own; returns what the
/// future's setup sends back.
fn spawn_runtime<T: Send + 'static>(f: impl FnOnce(std::sync::mpsc::Sender<T>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(f(tx));
    });
    rx.recv().expect("server started")
}

struct Phase {
    ok: usize,
    other: usize,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Phase {
    fn pct(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or_default()
    }

    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn report(&self, label: &str) {
        println!(
            "{label:<28} {:>7} requests in {:>6.2}s  {:>8.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  ({} ok, {} other)",
            self.latencies.len(),
            self.elapsed.as_secs_f64(),
            self.rps(),
            self.pct(0.50).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
            self.ok,
            self.other,
        );
    }
}

/// `total` requests with `concurrency` workers; `make(i)` builds request i. A 200 whose body is
/// a JSON-RPC result counts as ok.
async fn drive<F>(total: usize, concurrency: usize, cap: Duration, make: F) -> Phase
where
    F: Fn(usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, make) = (next.clone(), make.clone());
        workers.push(tokio::spawn(async move {
            let (mut lat, mut ok, mut other) = (Vec::new(), 0usize, 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || started.elapsed() > cap {
                    break;
                }
                let t = Instant::now();
                let good = match make(i).send().await {
                    Ok(res) if res.status() == 200 => res.bytes().await.is_ok_and(|b| b.windows(8).any(|w| w == b"\"result\"")),
                    Ok(res) => {
                        let _ = res.bytes().await;
                        false
                    }
                    Err(_) => false,
                };
                lat.push(t.elapsed());
                if good { ok += 1 } else { other += 1 }
            }
            (lat, ok, other)
        }));
    }
    let mut phase = Phase { ok: 0, other: 0, latencies: Vec::new(), elapsed: Duration::ZERO };
    for w in workers {
        let (lat, ok, other) = w.await.unwrap();
        phase.latencies.extend(lat);
        phase.ok += ok;
        phase.other += other;
    }
    phase.elapsed = started.elapsed();
    phase
}

#[tokio::main]
async fn main() {
    let total = env_num("BENCH_REQUESTS", 20_000).min(1_000_000);
    let concurrency = env_num("BENCH_CONCURRENCY", 64).clamp(1, 1024);
    let cap = Duration::from_secs(env_num("BENCH_SECONDS", 30).min(600) as u64);
    let work = std::env::temp_dir().join(format!("bench-proxy-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work).unwrap();
    let db_url = format!("sqlite:{}", work.join("bench.db").display());

    // The upstream MCP server.
    let upstream_url: String = spawn_runtime(|tx| {
        Box::pin(async move {
            let config = StreamableHttpServerConfig::default().with_legacy_session_mode(false).with_json_response(true).with_sse_keep_alive(None);
            let service = StreamableHttpService::new(|| Ok(Upstream), Arc::new(NeverSessionManager::default()), config);
            let router = axum::Router::new().nest_service("/mcp", service);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(format!("http://{}/mcp", listener.local_addr().unwrap())).unwrap();
            axum::serve(listener, router).await.unwrap();
        })
    });

    // The gateway, metering it as `bench` (no rate limit: the bench measures the path, not the limit).
    let u = UpstreamConfig {
        name: "bench",
        transport: UpstreamTransport::Url(Box::leak(upstream_url.clone().into_boxed_str())),
        url_env: "UPSTREAM_BENCH_URL",
        price_mcents: PRICE,
        tools: &[],
        scope: "bench",
        timeout_ms: 30_000,
        rate_limit_per_minute: 0,
        headers: &[],
        enabled: true,
        refund_tool_errors: false,
        description: "",
    };
    let gw_db = db_url.clone();
    let gateway_url: String = spawn_runtime(move |tx| {
        Box::pin(async move {
            let store = Store::connect(&gw_db).await.expect("open the bench database");
            let state = AppState::new(store, RateLimiter::local(), None, Arc::new(GeneratedHandlers));
            state.set_upstreams(Upstreams::new(vec![u]).with_vars(Vec::<(String, String)>::new()));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(format!("http://{}", listener.local_addr().unwrap())).unwrap();
            gateway::serve(listener, state, std::future::pending()).await.unwrap();
        })
    });

    // Keys: enough that holds on one key rarely queue behind each other.
    let store = Store::connect(&db_url).await.expect("open the bench database");
    let n_keys = concurrency * 4;
    // Warm-up, the unloaded phase and the loaded one.
    let per_key = (2 * total + n_keys).div_ceil(n_keys) as i64 + 1;
    let mut keys = Vec::with_capacity(n_keys);
    let scopes = vec!["bench".to_string()];
    for _ in 0..n_keys {
        let key = generate_api_key();
        let (key_id, hash, rid) = (generate_key_id(), sha256_hex(&key), uuid::Uuid::new_v4().to_string());
        let new = NewKey { key_hash: &hash, key_id: &key_id, name: None, balance_mcents: PRICE * per_key, scopes: &scopes, request_id: &rid };
        store.create_key(&new).await.expect("seed key");
        keys.push((format!("Bearer {key}"), hash));
    }
    println!("upstream {upstream_url}, gateway {gateway_url}/mcp/bench ({PRICE} mcents a call), {n_keys} keys, concurrency {concurrency}");

    gateway::signup::install_tls_provider();
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().unwrap();
    let body = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": { "name": "forecast", "arguments": {} } }).to_string();
    let request = |c: &reqwest::Client, url: &str, body: &str| {
        c.post(url).header("content-type", "application/json").header("accept", "application/json, text/event-stream").body(body.to_string())
    };
    // Warm both paths (connections, the database), then measure.
    let (c, url, b) = (client.clone(), upstream_url.clone(), body.clone());
    drive(concurrency * 4, concurrency, cap, move |_| request(&c, &url, &b)).await;
    let (c, url, b, auth) = (client.clone(), format!("{gateway_url}/mcp/bench"), body.clone(), Arc::new(keys.iter().map(|k| k.0.clone()).collect::<Vec<_>>()));
    let a = auth.clone();
    let warm = drive(concurrency * 4, concurrency, cap, move |i| request(&c, &url, &b).header("authorization", &a[i % a.len()])).await;
    let warm_calls = warm.ok as i64;

    // Unloaded (one call at a time: what the gateway adds to a call) and loaded (`concurrency`).
    let mut proxied_ok = 0i64;
    let mut errors = 0usize;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for c_level in [1, concurrency] {
        let n = if c_level == 1 { total.min(3_000) } else { total };
        let (c, url, b) = (client.clone(), upstream_url.clone(), body.clone());
        let direct = drive(n, c_level, cap, move |_| request(&c, &url, &b)).await;
        direct.report(&format!("c={c_level:<3} tools/call direct"));
        let (c, url, b, a) = (client.clone(), format!("{gateway_url}/mcp/bench"), body.clone(), auth.clone());
        let proxied = drive(n, c_level, cap, move |i| request(&c, &url, &b).header("authorization", &a[i % a.len()])).await;
        proxied.report(&format!("c={c_level:<3} via /mcp/bench"));
        let (p50d, p50p, p99d, p99p) = (direct.pct(0.5), proxied.pct(0.5), direct.pct(0.99), proxied.pct(0.99));
        let goal = if c_level == 1 { if ms(p50p) - ms(p50d) <= 1.0 { " — goal ≤ 1 ms at p50: met" } else { " — goal ≤ 1 ms at p50: NOT met" } } else { "" };
        println!(
            "c={c_level:<3} added latency: p50 {:+.3} ms (x{:.2}), p99 {:+.3} ms (x{:.2}); throughput x{:.2} of direct ({:.0} vs {:.0} req/s){goal}",
            ms(p50p) - ms(p50d),
            ms(p50p) / ms(p50d).max(1e-9),
            ms(p99p) - ms(p99d),
            ms(p99p) / ms(p99d).max(1e-9),
            proxied.rps() / direct.rps().max(1e-9),
            proxied.rps(),
            direct.rps(),
        );
        proxied_ok += proxied.ok as i64;
        errors += direct.other + proxied.other;
    }
    println!("(the loaded figures share 2 cores between the client, the upstream and the gateway; a paid call's two writes go through the one SQLite writer)");

    // Books: every ok answer through the gateway is one held and captured call, nothing else moved.
    let mut charged = 0i64;
    let mut bad = 0;
    for (_, hash) in &keys {
        let row = store.find_key(hash).await.unwrap().expect("key exists");
        if row.balance < 0 || store.ledger_sum(row.id).await.unwrap() != row.balance {
            bad += 1;
        }
        charged += row.calls;
    }
    store.close().await;
    let _ = std::fs::remove_dir_all(&work);
    let expected = proxied_ok + warm_calls;
    println!("checked {} keys: {bad} with a negative balance or a ledger mismatch; {charged} charged calls vs {expected} results", keys.len());
    if bad > 0 || charged != expected || errors > 0 {
        eprintln!("FAILED: errors during the run or the books do not add up");
        std::process::exit(1);
    }
    println!("OK");
}
