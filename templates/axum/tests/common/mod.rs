//! Test harness: real servers started in-process on 127.0.0.1:0, a real HTTP client, and a
//! fresh database per test: a SQLite file in a temporary directory, or (when TEST_DATABASE_URL
//! is set) a fresh PostgreSQL schema, with Redis rate limits when TEST_REDIS_URL is set.
#![allow(dead_code)]

#[cfg(feature = "x402")]
pub mod x402;

use std::str::FromStr;
use std::sync::Arc;

use gateway::generated::{Endpoint, GATEWAY};
use gateway::handler::Handlers;
use gateway::keys::{generate_api_key, generate_key_id, sha256_hex};
use gateway::store::NewKey;
use gateway::{AppState, GeneratedHandlers, RateLimiter, Signup, Store};
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use tokio::sync::{Semaphore, mpsc, oneshot};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef";
/// The SIGNUP_SECRET of the test gateways.
pub const SIGNUP_SECRET: &str = "test-signup-secret-0123456789abcdef-0123456789";

/// Makes a request wait (inside a payment verification) until the test lets it go.
pub struct Gate {
    entered: mpsc::UnboundedSender<()>,
    pub release: Semaphore,
}

impl Gate {
    pub fn new() -> (Arc<Gate>, mpsc::UnboundedReceiver<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Gate { entered: tx, release: Semaphore::new(0) }), rx)
    }

    pub async fn pass(&self) {
        let _ = self.entered.send(());
        self.release.acquire().await.unwrap().forget();
    }
}

/// Runs each listed `async fn(&TestDb)` against SQLite, and against PostgreSQL (+ Redis)
/// when TEST_DATABASE_URL is set (skipped otherwise).
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = $crate::common::TestDb::sqlite().await;
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(db) = $crate::common::TestDb::postgres().await else {
                        eprintln!("TEST_DATABASE_URL is not set: skipped");
                        return;
                    };
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

pub enum Backend {
    Sqlite { dir: std::path::PathBuf },
    Postgres { url: String, schema: String },
}

/// One isolated database for one test.
pub struct TestDb {
    pub backend: Backend,
    pub redis_url: Option<String>,
    /// Namespace for this test's Redis keys.
    pub redis_prefix: String,
    /// The store used for seeding and checks (servers get their own pools).
    pub store: Store,
    cleaned: bool,
}

fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = std::env::temp_dir().join(format!("gateway-test-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let backend = Backend::Sqlite { dir };
        let store = open_store(&backend).await;
        TestDb { backend, redis_url: None, redis_prefix: String::new(), store, cleaned: false }
    }

    pub async fn postgres() -> Option<TestDb> {
        let url = std::env::var("TEST_DATABASE_URL").ok().filter(|u| !u.is_empty())?;
        let schema = format!("t_{}", unique());
        let pool = sqlx::PgPool::connect(&url).await.expect("TEST_DATABASE_URL must be reachable");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&pool).await.unwrap();
        pool.close().await;
        let backend = Backend::Postgres { url, schema };
        let store = open_store(&backend).await;
        let redis_url = std::env::var("TEST_REDIS_URL").ok().filter(|u| !u.is_empty());
        Some(TestDb { backend, redis_url, redis_prefix: format!("gateway-test:{}:", unique()), store, cleaned: false })
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres { .. })
    }

    /// True when rate limits are shared between server instances (Redis).
    pub fn shared_limits(&self) -> bool {
        self.redis_url.is_some()
    }

    /// A new pool on the same database, as a separate server instance would have.
    pub async fn new_store(&self) -> Store {
        open_store(&self.backend).await
    }

    pub async fn new_limiter(&self) -> RateLimiter {
        match &self.redis_url {
            Some(url) => RateLimiter::redis(url, &self.redis_prefix).await.expect("TEST_REDIS_URL must be reachable"),
            None => RateLimiter::local(),
        }
    }

    pub async fn server(&self) -> TestServer {
        self.server_with(Some(ADMIN_KEY.to_string()), Arc::new(GeneratedHandlers)).await
    }

    pub async fn server_with(&self, admin_key: Option<String>, handlers: Arc<dyn Handlers>) -> TestServer {
        let state = AppState::new(self.new_store().await, self.new_limiter().await, admin_key, handlers);
        TestServer::start(state).await
    }

    /// A server whose POST /v1/signup uses these payment rails.
    pub async fn server_with_signup(&self, signup: Signup) -> TestServer {
        TestServer::start(self.signup_state(signup).await).await
    }

    /// The state of a gateway instance on this database with these payment rails (for the
    /// signup sweep: `gateway::signup::sweep(&state)`).
    pub async fn signup_state(&self, signup: Signup) -> Arc<AppState> {
        AppState::with_signup(
            self.new_store().await,
            self.new_limiter().await,
            Some(ADMIN_KEY.to_string()),
            Arc::new(GeneratedHandlers),
            signup,
        )
    }

    /// Runs one SQL statement that returns one BIGINT (counts, states as numbers…).
    pub async fn scalar(&self, sql: &'static str) -> i64 {
        match &self.store {
            Store::Sqlite { read: p, .. } => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await.unwrap(),
            Store::Postgres(p) => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await.unwrap(),
        }
    }

    /// How many times a signup claim was attempted (every claim first writes `signup_lock`: a
    /// request that never reached the payment records leaves it unchanged).
    pub async fn signup_claims(&self) -> i64 {
        self.scalar("SELECT claims FROM signup_lock WHERE id = 1").await
    }

    /// The state of the payment record `reference`, if any.
    pub async fn payment_state(&self, reference: &str) -> Option<String> {
        let sql = "SELECT state FROM signup_payments WHERE reference = $1";
        match &self.store {
            Store::Sqlite { read: p, .. } => sqlx::query_scalar(sql).bind(reference).fetch_optional(p).await.unwrap(),
            Store::Postgres(p) => sqlx::query_scalar(sql).bind(reference).fetch_optional(p).await.unwrap(),
        }
    }

    /// 'mint' ledger rows of the whole database.
    pub async fn mint_rows(&self) -> i64 {
        self.scalar("SELECT COUNT(*) FROM ledger WHERE kind = 'mint'").await
    }

    /// Creates a key directly in the database (as the mint route does, without its hourly
    /// limit), so tests can create as many keys as they need.
    pub async fn seed_key(&self, balance: i64, scopes: &[&str], name: Option<&str>) -> SeededKey {
        let key = generate_api_key();
        let key_id = generate_key_id();
        let hash = sha256_hex(&key);
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let rid = uuid::Uuid::new_v4().to_string();
        self.store
            .create_key(&NewKey { key_hash: &hash, key_id: &key_id, name, balance_mcents: balance, scopes: &scopes, request_id: &rid })
            .await
            .unwrap();
        SeededKey { key, key_id, hash }
    }

    pub async fn key_ref(&self, key: &SeededKey) -> i64 {
        self.store.find_key(&key.hash).await.unwrap().unwrap().id
    }

    /// Every value stored in the database, as one string (to look for leaked secrets).
    pub async fn dump(&self) -> String {
        let mut out = String::new();
        for (table, sql) in [
            ("api_keys", "SELECT key_hash, key_id, COALESCE(name, ''), scopes FROM api_keys"),
            ("ledger", "SELECT kind, COALESCE(endpoint, ''), request_id FROM ledger"),
            (
                "signup_payments",
                "SELECT reference, state, rail, claim_token, COALESCE(settled_ref, ''), COALESCE(receipt_key, ''), \
                 COALESCE(response_header, ''), COALESCE(idem_hash, ''), COALESCE(key_id, ''), COALESCE(scopes, ''), \
                 COALESCE(name, ''), COALESCE(payload, '') FROM signup_payments",
            ),
        ] {
            let rows: Vec<Vec<String>> = match &self.store {
                Store::Sqlite { read: p, .. } => sqlx::query(sql).fetch_all(p).await.unwrap().iter().map(row_strings_sqlite).collect(),
                Store::Postgres(p) => sqlx::query(sql).fetch_all(p).await.unwrap().iter().map(row_strings_pg).collect(),
            };
            out.push_str(&format!("{table}: {rows:?}\n"));
        }
        out
    }

    pub async fn cleanup(mut self) {
        self.store.close().await;
        drop_backend(&self.backend).await;
        self.cleaned = true;
    }
}

async fn drop_backend(backend: &Backend) {
    match backend {
        Backend::Sqlite { dir } => {
            let _ = std::fs::remove_dir_all(dir);
        }
        Backend::Postgres { url, schema } => {
            if let Ok(pool) = sqlx::PgPool::connect(url).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await;
                pool.close().await;
            }
        }
    }
}

/// A test that panicked never reached `cleanup`: drop its database anyway.
impl Drop for TestDb {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let backend = std::mem::replace(&mut self.backend, Backend::Sqlite { dir: std::path::PathBuf::new() });
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(drop_backend(&backend));
            }
        })
        .join();
    }
}

fn row_strings_sqlite(r: &sqlx::sqlite::SqliteRow) -> Vec<String> {
    use sqlx::Row;
    (0..r.len()).map(|i| r.try_get::<String, _>(i).unwrap_or_default()).collect()
}

fn row_strings_pg(r: &sqlx::postgres::PgRow) -> Vec<String> {
    use sqlx::Row;
    (0..r.len()).map(|i| r.try_get::<String, _>(i).unwrap_or_default()).collect()
}

async fn open_store(backend: &Backend) -> Store {
    match backend {
        Backend::Sqlite { dir } => {
            let opts = SqliteConnectOptions::new().filename(dir.join("test.db"));
            Store::connect_sqlite(opts, 8).await.unwrap()
        }
        Backend::Postgres { url, schema } => {
            let opts = PgConnectOptions::from_str(url).unwrap().options([("search_path", schema.as_str())]);
            Store::connect_postgres(opts, 8).await.unwrap()
        }
    }
}

pub struct SeededKey {
    pub key: String,
    pub key_id: String,
    pub hash: String,
}

/// A gateway served on 127.0.0.1:0 until dropped.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start(state: Arc<AppState>) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            gateway::serve(listener, state, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        // The project's reqwest uses rustls on ring: its process-wide provider must be installed.
        gateway::signup::install_tls_provider();
        TestServer { base: format!("http://{addr}"), client: reqwest::Client::new(), stop: Some(tx) }
    }

    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn get_auth(&self, path: &str, key: &str) -> reqwest::Response {
        self.client.get(self.url(path)).header("Authorization", format!("Bearer {key}")).send().await.unwrap()
    }

    /// POST /v1/<endpoint> with `Authorization: Bearer <key>` (if any) and a JSON body
    /// (a `Value::String` is sent as raw text).
    pub async fn call(&self, endpoint: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
        self.call_with(endpoint, key, body, &[]).await
    }

    pub async fn call_with(&self, endpoint: &str, key: Option<&str>, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let raw = match body {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let mut req = self.client.post(self.url(&format!("/v1/{endpoint}")));
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
            req = req.header("Content-Type", "application/json");
        }
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(raw).send().await.unwrap()
    }

    pub async fn mint(&self, body: &Value, admin_key: &str) -> reqwest::Response {
        let raw = match body {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        self.client
            .post(self.url("/v1/admin/mint"))
            .header("X-Admin-Key", admin_key)
            .header("Content-Type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap()
    }

    pub async fn me(&self, key: &str) -> Value {
        let res = self.get_auth("/v1/me", key).await;
        assert_eq!(res.status(), 200, "GET /v1/me");
        res.json().await.unwrap()
    }

    pub async fn balance(&self, key: &str) -> i64 {
        self.me(key).await["balance_mcents"].as_i64().unwrap()
    }

    pub async fn ledger(&self, key: &str) -> Vec<Value> {
        let res = self.get_auth("/v1/me/ledger?limit=500", key).await;
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        body["entries"].as_array().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The first endpoint of mcpay.toml, its price, scope and sample input.
pub fn ep() -> Endpoint {
    Endpoint::ALL[0]
}

pub fn sample(ep: Endpoint) -> Value {
    serde_json::from_str(ep.sample_input()).unwrap()
}

/// A balance that covers `n` calls of `ep` (at least 1 mcent, as mint requires).
pub fn balance_for(n: i64, ep: Endpoint) -> i64 {
    (n * ep.price_mcents()).max(1)
}

pub fn key_prefix() -> &'static str {
    GATEWAY.key_prefix
}

pub async fn json_of(res: reqwest::Response) -> Value {
    res.json().await.unwrap()
}

/// Asserts the error shape and code, and "note":"no charge applied" when `no_charge`.
pub async fn expect_error(res: reqwest::Response, status: u16, code: &str, no_charge: bool) -> Value {
    assert_eq!(res.status().as_u16(), status, "status for {code}");
    let rid = res.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_string());
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["ok"], Value::Bool(false));
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string());
    assert_eq!(body["request_id"].as_str(), rid.as_deref());
    if no_charge {
        assert_eq!(body["note"], "no charge applied", "{body}");
    } else {
        assert!(body.get("note").is_none(), "{body}");
    }
    body
}

// ------------------------------------------------------------------------ signup (both rails)

/// The receiving address of the signup tests' x402 rail.
pub const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
/// An Idempotency-Key of the signup tests.
pub const IDEM: &str = "idem-0123456789abcdef0123456789abcdef";

/// The requirement every target emits for this manifest, byte for byte.
pub fn expected_requirement() -> String {
    let x = gateway::generated::SIGNUP.x402.unwrap();
    format!(
        r#"{{"scheme":"exact","network":"{}","amount":"{}","asset":"{}","payTo":"{}","maxTimeoutSeconds":{},"extra":{{"name":"{}","version":"{}"}}}}"#,
        x.network, x.amount, x.asset, PAY_TO, x.max_timeout_seconds, x.asset_name, x.asset_version
    )
}

/// A URL nothing listens on.
pub async fn url_of_nothing() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

/// `POST /v1/signup` with no payment: the offer.
pub async fn offer(s: &TestServer) -> reqwest::Response {
    s.client.post(s.url("/v1/signup")).send().await.unwrap()
}

/// `POST /v1/signup` with these headers and no body.
pub async fn signup(s: &TestServer, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = s.client.post(s.url("/v1/signup"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// The minted key works: /v1/me shows the signup balance, scopes and name; one mint row.
pub async fn assert_key_works(s: &TestServer, body: &Value, name: Option<&str>) {
    let signup = gateway::generated::SIGNUP;
    let key = body["key"].as_str().unwrap();
    assert!(key.starts_with(GATEWAY.key_prefix) && key.len() == GATEWAY.key_prefix.len() + 64, "{body}");
    let me = s.me(key).await;
    assert_eq!(me["key_id"], body["key_id"]);
    assert_eq!(me["balance_mcents"], signup.balance_mcents);
    assert_eq!(me["scopes"], serde_json::json!(signup.scopes));
    assert_eq!(me["name"], serde_json::json!(name));
    let ledger = s.ledger(key).await;
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0]["kind"], "mint");
    assert_eq!(ledger[0]["amount_mcents"], signup.balance_mcents);
}

// ------------------------------------------------------------------------ paid calls (holds)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gateway::handler::{BoxFuture, Call, Context, HandlerError, Reply};

impl TestDb {
    /// Runs one SQL statement on this database: `sqlite` on SQLite, `postgres` on PostgreSQL.
    pub async fn exec(&self, sqlite: &'static str, postgres: &'static str) {
        match &self.store {
            Store::Sqlite { write: p, .. } => {
                sqlx::query(sqlite).execute(p).await.unwrap();
            }
            Store::Postgres(p) => {
                sqlx::query(postgres).execute(p).await.unwrap();
            }
        }
    }

    /// The state of the hold of call `request_id` (None: no such hold).
    pub async fn hold_state(&self, request_id: &str) -> Option<String> {
        let sql = "SELECT state FROM holds WHERE request_id = $1";
        match &self.store {
            Store::Sqlite { read: p, .. } => sqlx::query_scalar(sql).bind(request_id).fetch_optional(p).await.unwrap(),
            Store::Postgres(p) => sqlx::query_scalar(sql).bind(request_id).fetch_optional(p).await.unwrap(),
        }
    }
}

/// The kinds of ledger entries, newest first.
pub fn kinds(ledger: &[Value]) -> Vec<String> {
    ledger.iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect()
}

/// How many ledger entries are of `kind`.
pub fn count_kind(ledger: &[Value], kind: &str) -> usize {
    ledger.iter().filter(|e| e["kind"] == kind).count()
}

/// The sum of the ledger's amounts (equals the balance when the books are right).
pub fn amount_sum(ledger: &[Value]) -> i64 {
    ledger.iter().map(|e| e["amount_mcents"].as_i64().unwrap()).sum()
}

type RunFn = Arc<dyn Fn(Value) -> BoxFuture<Result<Reply, HandlerError>> + Send + Sync>;

/// Handlers whose every endpoint runs one closure (counting runs), with an optional time limit
/// in place of the endpoints' `timeout_ms`.
#[derive(Clone)]
pub struct TestHandlers {
    run: RunFn,
    timeout: Option<Duration>,
    pub runs: Arc<AtomicUsize>,
}

impl TestHandlers {
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Reply, HandlerError>> + Send + 'static,
    {
        TestHandlers { run: Arc::new(move |v| Box::pin(f(v))), timeout: None, runs: Arc::default() }
    }

    /// Echoes the input with the run number.
    pub fn echo() -> Self {
        let n = Arc::new(AtomicUsize::new(0));
        TestHandlers::new(move |input| {
            let run = n.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok(Reply::Json(serde_json::json!({ "echoed": input, "run": run }))) }
        })
    }

    /// Always fails (502 handler_failed).
    pub fn failing() -> Self {
        TestHandlers::new(|_| async { Err(HandlerError::new("upstream exploded")) })
    }

    /// Never finishes.
    pub fn hanging() -> Self {
        TestHandlers::new(|_| std::future::pending())
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn run_count(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

impl Handlers for TestHandlers {
    fn prepare(&self, _endpoint: Endpoint, input: Value) -> Result<Call, String> {
        let run = self.run.clone();
        let runs = self.runs.clone();
        Ok(Box::new(move |_ctx: Context| {
            runs.fetch_add(1, Ordering::SeqCst);
            run(input)
        }))
    }

    fn timeout(&self, endpoint: Endpoint) -> Duration {
        self.timeout.unwrap_or_else(|| Duration::from_millis(endpoint.timeout_ms()))
    }
}

impl TestDb {
    /// A gateway on this database whose endpoints all run `handlers`.
    pub async fn server_running(&self, handlers: &TestHandlers) -> TestServer {
        self.server_with(Some(ADMIN_KEY.to_string()), Arc::new(handlers.clone())).await
    }
}
