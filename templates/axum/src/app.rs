//! The HTTP gateway: routing, authentication, validate-before-charge, the hold of a paid call,
//! the handler run within its time limit, then the capture (success) or release (failure). Everything goes through one fallback handler so that the
//! status codes, headers and error shape are exactly the contract's (docs/contract.md).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::body::{is_json_content_type, parse_json, read_bounded, read_json};
use crate::config::SignupSettings;
use crate::generated::{Endpoint, GATEWAY, PROJECT_NAME, PROJECT_VERSION, SIGNUP};
use crate::handler::{Call, Context, Handlers, Reply};
use crate::http::{ApiError, add_cors, json_response, set_header, strip_cors};
use crate::keys::{BearerError, generate_api_key, generate_key_id, parse_bearer, secrets_equal, sha256_hex};
use crate::levels::{badges_for, level_for};
use crate::mint::parse_mint_input;
use crate::ratelimit::{Acquire, RateLimiter};
use crate::shape::{check_shape, normalize_integers};
use crate::signup::{Signup, pricing_entry, valid_idempotency_key};
use crate::store::{
    CaptureOutcome, HoldOutcome, HoldRequest, IdemFound, IdemRequest, KeyRow, MintOutcome, NewKey, ReleaseReason, Store, StoredResponse,
};

const LEDGER_DEFAULT: i64 = 50;
const LEDGER_MAX: i64 = 500;
const MINUTE_MS: u64 = 60_000;

/// Everything a request needs. Cheap to share (`Arc`).
pub struct AppState {
    pub store: Store,
    pub limiter: RateLimiter,
    /// None or empty: the admin API is disabled (503).
    pub admin_key: Option<String>,
    pub handlers: Arc<dyn Handlers>,
    /// The payment rails of POST /v1/signup (see [`crate::signup`]).
    pub signup: Signup,
    /// BODY_READ_TIMEOUT_MS (see [`AppState::set_body_read_timeout`]).
    body_read_timeout_ms: std::sync::atomic::AtomicU64,
    /// MCP_ALLOWED_HOSTS (see [`AppState::set_mcp_allowed_hosts`]).
    mcp_allowed_hosts: std::sync::RwLock<Vec<String>>,
    /// The metered MCP servers of `/mcp/<name>` (see [`AppState::set_upstreams`]).
    upstreams: std::sync::RwLock<Arc<crate::proxy::Upstreams>>,
}

impl AppState {
    /// A state whose signup rails come from mcpay.toml and the environment.
    pub fn new(store: Store, limiter: RateLimiter, admin_key: Option<String>, handlers: Arc<dyn Handlers>) -> Arc<Self> {
        let signup = Signup::from_settings(&SignupSettings::from_env());
        AppState::with_signup(store, limiter, admin_key, handlers, signup)
    }

    pub fn with_signup(
        store: Store,
        limiter: RateLimiter,
        admin_key: Option<String>,
        handlers: Arc<dyn Handlers>,
        signup: Signup,
    ) -> Arc<Self> {
        let body_read_timeout_ms = (crate::config::DEFAULT_BODY_READ_TIMEOUT.as_millis() as u64).into();
        let upstreams = std::sync::RwLock::new(Arc::new(crate::proxy::Upstreams::generated()));
        Arc::new(AppState { store, limiter, admin_key, handlers, signup, body_read_timeout_ms, mcp_allowed_hosts: Default::default(), upstreams })
    }

    /// How long a request body may take to arrive once its headers are read (BODY_READ_TIMEOUT_MS;
    /// default 10 s): past it the request answers 408 request_timeout, before anything is held.
    pub fn set_body_read_timeout(&self, timeout: std::time::Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        self.body_read_timeout_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn body_read_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.body_read_timeout_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The `Host` values /mcp accepts (MCP_ALLOWED_HOSTS); empty (the default): any host.
    pub fn set_mcp_allowed_hosts(&self, hosts: Vec<String>) {
        if let Ok(mut h) = self.mcp_allowed_hosts.write() {
            *h = hosts;
        }
    }

    pub fn mcp_allowed_hosts(&self) -> Vec<String> {
        self.mcp_allowed_hosts.read().map(|h| h.clone()).unwrap_or_default()
    }

    /// The upstream MCP servers served at `/mcp/<name>` (default: `generated::UPSTREAMS` from
    /// mcpay.toml with the process environment; tests pass their own).
    pub fn set_upstreams(&self, upstreams: crate::proxy::Upstreams) {
        if let Ok(mut u) = self.upstreams.write() {
            *u = Arc::new(upstreams);
        }
    }

    pub fn upstreams(&self) -> Arc<crate::proxy::Upstreams> {
        self.upstreams.read().map(|u| u.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(entry).with_state(state)
}

#[derive(Debug, Clone, Copy)]
enum Route {
    Health,
    Pricing,
    Me,
    Ledger,
    Leaderboard,
    Mint,
    Payments,
    Signup,
    Paid(Endpoint),
}

impl Route {
    fn find(path: &str) -> Option<Route> {
        Some(match path {
            "/v1/health" => Route::Health,
            "/v1/pricing" => Route::Pricing,
            "/v1/me" => Route::Me,
            "/v1/me/ledger" => Route::Ledger,
            "/v1/leaderboard" => Route::Leaderboard,
            "/v1/admin/mint" => Route::Mint,
            "/v1/admin/payments" => Route::Payments,
            "/v1/signup" if SIGNUP.enabled => Route::Signup,
            _ => Route::Paid(Endpoint::from_name(path.strip_prefix("/v1/")?)?),
        })
    }

    fn method(self) -> Method {
        match self {
            Route::Mint | Route::Signup | Route::Paid(_) => Method::POST,
            _ => Method::GET,
        }
    }

    /// For logs: the route, never the raw path (which may carry anything a client sent).
    fn label(self) -> &'static str {
        match self {
            Route::Health => "/v1/health",
            Route::Pricing => "/v1/pricing",
            Route::Me => "/v1/me",
            Route::Ledger => "/v1/me/ledger",
            Route::Leaderboard => "/v1/leaderboard",
            Route::Mint => "/v1/admin/mint",
            Route::Payments => "/v1/admin/payments",
            Route::Signup => crate::signup::PATH,
            Route::Paid(ep) => ep.path(),
        }
    }
}

/// Paths under /v1/admin never carry CORS headers and never answer a preflight.
pub fn is_admin_path(path: &str) -> bool {
    let mut p = path.to_ascii_lowercase();
    while p.contains("//") {
        p = p.replace("//", "/");
    }
    p == "/v1/admin" || p.starts_with("/v1/admin/")
}

async fn entry(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let request_id = uuid::Uuid::new_v4().to_string();
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let admin = is_admin_path(&path);
    let route = Route::find(&path);
    let mcp = path == crate::mcp::PATH;
    let upstream = crate::proxy::upstream_name(&path).map(str::to_string);
    let timeout = app.body_read_timeout();
    let (req, body_read) = crate::body::watch_body(req);
    let answer = async {
        if mcp {
            crate::mcp::serve(&app, req, &request_id).await
        } else if let Some(name) = &upstream {
            crate::proxy::serve(&app, name, req, &request_id).await
        } else {
            dispatch(&app, route, req, &request_id, admin).await
        }
    };
    let mut res = match crate::body::with_body_deadline(timeout, answer).await {
        Ok(res) => res,
        Err(err) => err.into_response(&request_id),
    };
    let h = res.headers_mut();
    set_header(h, "x-request-id", &request_id);
    if !body_read.load(std::sync::atomic::Ordering::Relaxed) {
        set_header(h, "connection", "close");
    }
    if admin {
        strip_cors(h);
    } else if path.starts_with("/v1/") {
        add_cors(h);
    } else if mcp || upstream.is_some() {
        crate::mcp::add_cors(h);
    }
    // Never log keys: no headers, no query string, no raw path.
    tracing::info!(
        request_id = %request_id,
        method = %method,
        route = if mcp {
            crate::mcp::PATH
        } else if upstream.is_some() {
            crate::proxy::ROUTE_LABEL
        } else {
            route.map_or("(unmatched)", Route::label)
        },
        status = res.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    res
}

async fn dispatch(app: &Arc<AppState>, route: Option<Route>, req: Request, request_id: &str, admin: bool) -> Result<Response, ApiError> {
    let Some(route) = route else { return Err(ApiError::new(404, "not_found")) };
    let method = req.method().clone();
    if method == Method::OPTIONS && matches!(route, Route::Payments) {
        return Err(ApiError::new(404, "not_found"));
    }
    if method == Method::OPTIONS && !admin {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        set_header(res.headers_mut(), "access-control-allow-methods", format!("{}, OPTIONS", route.method()));
        set_header(res.headers_mut(), "access-control-max-age", "86400");
        return Ok(res);
    }
    if method != route.method() {
        let allow = if admin { route.method().to_string() } else { format!("{}, OPTIONS", route.method()) };
        return Err(ApiError::new(405, "method_not_allowed").header(header::ALLOW, allow));
    }
    match route {
        Route::Health => Ok(health()),
        Route::Pricing => Ok(pricing(app)),
        Route::Me => me(app, req.headers()).await,
        Route::Ledger => ledger(app, req.headers(), req.uri().query()).await,
        Route::Leaderboard => leaderboard(app).await,
        Route::Mint => mint(app, req, request_id).await,
        Route::Payments => crate::signup::admin_payments(app, req.headers(), req.uri().query(), request_id).await,
        Route::Signup => crate::signup::signup(app, req, request_id).await,
        Route::Paid(ep) => paid(app, ep, req, request_id).await,
    }
}

fn db_error(e: sqlx::Error, no_charge: bool) -> ApiError {
    tracing::error!(error = %e, "database error");
    ApiError::internal().charge_note(no_charge)
}

fn bearer_error(e: BearerError, no_charge: bool) -> ApiError {
    match e {
        BearerError::Missing => ApiError::new(401, "missing_key"),
        BearerError::Invalid => ApiError::new(401, "invalid_key"),
    }
    .charge_note(no_charge)
}

pub(crate) fn bearer(headers: &HeaderMap, no_charge: bool) -> Result<String, ApiError> {
    // Two or more Authorization headers are never well-formed (contract 3.8 step 3): taking the
    // first would let a proxy and a client disagree on which key is charged.
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(bearer_error(BearerError::Invalid, no_charge));
    }
    let key = parse_bearer(first.map(|v| v.as_bytes())).map_err(|e| bearer_error(e, no_charge))?;
    Ok(sha256_hex(key))
}

pub(crate) async fn key_row(app: &AppState, key_hash: &str, no_charge: bool) -> Result<KeyRow, ApiError> {
    app.store
        .find_key(key_hash)
        .await
        .map_err(|e| db_error(e, no_charge))?
        .ok_or_else(|| ApiError::new(401, "invalid_key").charge_note(no_charge))
}

// ---------------------------------------------------------------------------- free routes

fn health() -> Response {
    json_response(StatusCode::OK, &json!({ "ok": true, "status": "ok", "service": PROJECT_NAME, "version": PROJECT_VERSION }))
}

fn pricing(app: &AppState) -> Response {
    json_response(StatusCode::OK, &pricing_body(app))
}

/// The body of GET /v1/pricing (also the MCP `pricing` tool's result).
pub(crate) fn pricing_body(app: &AppState) -> Value {
    let endpoints: Vec<Value> = Endpoint::ALL
        .iter()
        .map(|ep| {
            let mut input = Map::new();
            for f in ep.input_shape() {
                input.insert(f.name.to_string(), json!({ "type": f.ty.as_str(), "required": f.required }));
            }
            json!({
                "name": ep.name(),
                "method": "POST",
                "path": ep.path(),
                "price_mcents": ep.price_mcents(),
                "xp": ep.xp(),
                "scope": ep.scope(),
                "description": ep.description(),
                "rate_limit_per_minute": ep.rate_limit_per_minute(),
                "input": input,
            })
        })
        .collect();
    let upstreams = app.upstreams().pricing();
    json!({ "ok": true, "unit": "mcents", "mcents_per_cent": 1000, "signup": pricing_entry(), "endpoints": endpoints, "upstreams": upstreams })
}

#[derive(Serialize)]
struct MeBody {
    ok: bool,
    key_id: String,
    name: Option<String>,
    balance_mcents: i64,
    scopes: Vec<String>,
    xp: i64,
    level: i64,
    badges: Vec<&'static str>,
    calls: i64,
    spent_mcents: i64,
    refunded_mcents: i64,
}

async fn me(app: &AppState, headers: &HeaderMap) -> Result<Response, ApiError> {
    let hash = bearer(headers, false)?;
    Ok(json_response(StatusCode::OK, &me_body(app, &hash).await?))
}

/// The body of GET /v1/me for a key (also the MCP `balance` tool's result).
pub(crate) async fn me_body(app: &AppState, key_hash: &str) -> Result<Value, ApiError> {
    let k = key_row(app, key_hash, false).await?;
    serde_json::to_value(MeBody {
        ok: true,
        scopes: k.scope_list(),
        level: level_for(k.xp),
        badges: badges_for(k.calls, k.spent),
        key_id: k.key_id,
        name: k.name,
        balance_mcents: k.balance,
        xp: k.xp,
        calls: k.calls,
        spent_mcents: k.spent,
        refunded_mcents: k.refunded,
    })
    .map_err(|e| {
        tracing::error!(error = %e, "me body");
        ApiError::internal()
    })
}

/// The first `name=` parameter of a query string, if any.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

async fn ledger(app: &AppState, headers: &HeaderMap, query: Option<&str>) -> Result<Response, ApiError> {
    let hash = bearer(headers, false)?;
    let mut limit = LEDGER_DEFAULT;
    if let Some(raw) = query_param(query, "limit") {
        let n = (1..=6)
            .contains(&raw.len())
            .then(|| raw.parse::<i64>().ok())
            .flatten()
            .filter(|n| *n >= 1 && raw.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| ApiError::new(400, "invalid_input").message(format!("limit must be an integer from 1 to {LEDGER_MAX}.")))?;
        limit = n.min(LEDGER_MAX);
    }
    // before=<seq>: the page of entries older than that seq (the previous page's next_before).
    let mut before = None;
    if let Some(raw) = query_param(query, "before") {
        let n = ((1..=15).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_digit()))
            .then(|| raw.parse::<i64>().ok())
            .flatten()
            .filter(|n| *n >= 1)
            .ok_or_else(|| ApiError::new(400, "invalid_input").message("before must be a ledger seq: an integer from 1 to 999999999999999."))?;
        before = Some(n);
    }
    let k = key_row(app, &hash, false).await?;
    let (entries, next_before) = app.store.ledger(k.id, limit, before).await.map_err(|e| db_error(e, false))?;
    Ok(json_response(StatusCode::OK, &json!({ "ok": true, "entries": entries, "next_before": next_before })))
}

async fn leaderboard(app: &AppState) -> Result<Response, ApiError> {
    let rows = app.store.leaderboard(i64::from(GATEWAY.leaderboard_size)).await.map_err(|e| db_error(e, false))?;
    let entries: Vec<Value> = rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            json!({
                "rank": i + 1,
                "key_id": r.key_id,
                "name": r.name,
                "xp": r.xp,
                "level": level_for(r.xp),
                "badges": badges_for(r.calls, r.spent),
                "calls": r.calls,
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "ok": true, "entries": entries })))
}

// ---------------------------------------------------------------------------- admin

async fn mint(app: &AppState, req: Request, request_id: &str) -> Result<Response, ApiError> {
    // Disabled first, before looking at the request at all.
    let Some(admin_key) = app.admin_key.as_deref().filter(|k| !k.is_empty()) else {
        return Err(ApiError::new(503, "admin_disabled"));
    };
    let (parts, body) = req.into_parts();
    let provided = parts.headers.get("x-admin-key").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).unwrap_or_default();
    if !secrets_equal(&provided, admin_key) {
        return Err(ApiError::new(401, "invalid_admin_key"));
    }
    let body = read_json(&parts.headers, body, GATEWAY.max_body_bytes, false).await?;
    let input = parse_mint_input(&body)?;
    let key = generate_api_key();
    let key_id = generate_key_id();
    let hash = sha256_hex(&key);
    let new = NewKey {
        key_hash: &hash,
        key_id: &key_id,
        name: input.name.as_deref(),
        balance_mcents: input.balance_mcents,
        scopes: &input.scopes,
        request_id,
    };
    match app.store.admin_mint(&new, GATEWAY.mints_per_hour).await.map_err(|e| db_error(e, false))? {
        MintOutcome::Limited { retry_after_seconds } => Err(ApiError::new(429, "rate_limited")
            .message(format!("Mint limit of {} per hour reached.", GATEWAY.mints_per_hour))
            .extra("retry_after_seconds", retry_after_seconds)
            .header(header::RETRY_AFTER, retry_after_seconds)),
        MintOutcome::Created => {
            tracing::info!(request_id, key_id = %key_id, balance_mcents = input.balance_mcents, "key minted");
            Ok(json_response(
                StatusCode::CREATED,
                &json!({
                    "ok": true,
                    "key": key,
                    "key_id": key_id,
                    "balance_mcents": input.balance_mcents,
                    "scopes": input.scopes,
                    "name": input.name,
                }),
            ))
        }
    }
}

// ---------------------------------------------------------------------------- paid routes

/// Answers larger than this are not stored for `Idempotency-Key` replays (contract 3.8).
pub const IDEMPOTENCY_MAX_STORED_BYTES: usize = 65_536;
/// Settlement attempts in the request before the hold is left to the sweeper, and the pauses
/// between them (at most 3 attempts within about 0.5 s, contract 3.8).
const SETTLE_ATTEMPTS: usize = 3;
const SETTLE_BACKOFF_MS: [u64; 2] = [50, 250];

fn paid_headers(res: &mut Response, charged: i64, balance: i64) {
    set_header(res.headers_mut(), "x-charged-mcents", charged);
    set_header(res.headers_mut(), "x-balance-mcents", balance);
}

/// A paid call's `Idempotency-Key` and the SHA-256 of its body bytes (MCP: of its tool name and
/// arguments, see [`crate::mcp`]).
pub(crate) struct Idem {
    pub key: String,
    pub body_sha256: String,
}

/// Step 3a: the optional `Idempotency-Key`, one header matching `^[A-Za-z0-9_-]{32,128}$`.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(first) = values.next() else { return Ok(None) };
    match first.to_str() {
        Ok(k) if values.next().is_none() && valid_idempotency_key(k) => Ok(Some(k.to_string())),
        _ => Err(ApiError::new(400, "invalid_input")
            .message("Idempotency-Key must be 32 to 128 characters from A-Z a-z 0-9 _ - (one header).")
            .no_charge()),
    }
}

async fn paid(app: &Arc<AppState>, ep: Endpoint, req: Request, request_id: &str) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    // 2-3. Key syntax (existence is checked with the hold).
    let key_hash = bearer(&parts.headers, true)?;
    // 3a. Idempotency-Key syntax.
    let idem_key = idempotency_key(&parts.headers)?;
    // 4-6. Content-Type, bounded body, JSON. The bytes are kept: an Idempotency-Key record holds
    //      their SHA-256 (a retry must send the same bytes, not just the same JSON value).
    if !is_json_content_type(&parts.headers) {
        return Err(ApiError::new(415, "unsupported_media_type").no_charge());
    }
    let raw = read_bounded(&parts.headers, body, GATEWAY.max_body_bytes, true).await?;
    let input = parse_json(&raw, true)?;
    let idem = idem_key.map(|key| Idem { key, body_sha256: hex::encode(Sha256::digest(&raw)) });
    let call = PaidCall { ep, key_hash, input, idem, call_id: request_id.to_string(), face: Face::Http };
    match run_paid_call(app, call).await? {
        PaidOutcome::Success(Answer::Http(response)) => Ok(response),
        PaidOutcome::Success(Answer::Mcp(_)) => Err(ApiError::internal()),
        PaidOutcome::Replay(stored) => Ok(replay_response(stored)),
        PaidOutcome::Failed(failed) => Ok(failed.http_response(request_id)),
    }
}

/// Which face of the gateway a paid call answers on: `POST /v1/<endpoint>` or an MCP
/// `tools/call` (contract 3.11). Only the presentation of the handler's answer differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Face {
    Http,
    Mcp,
}

/// A successful call's answer, presented for its face.
pub(crate) enum Answer {
    Http(Response),
    /// An MCP `CallToolResult` as JSON.
    Mcp(Value),
}

/// A paid call whose body was read and parsed: what the billing core needs.
pub(crate) struct PaidCall {
    pub ep: Endpoint,
    /// SHA-256 of the caller's well-formed key (its existence is checked with the hold).
    pub key_hash: String,
    /// The JSON body (MCP: the tool's arguments).
    pub input: Value,
    pub idem: Option<Idem>,
    /// The gateway's call id: the request's X-Request-Id, or `<X-Request-Id>/mcp/<uuid>`.
    pub call_id: String,
    pub face: Face,
}

/// How a paid call ended once it was checked; a refusal before the hold is an `Err(ApiError)`.
pub(crate) enum PaidOutcome {
    /// Captured (or left to the sweeper when the capture kept failing).
    Success(Answer),
    /// An `Idempotency-Key` retry of a captured call: its stored answer, nothing held.
    Replay(StoredResponse),
    /// 502 handler_failed / 504 handler_timeout, with the settlement's fields.
    Failed(FailedCall),
}

/// A call that failed or timed out after its hold, and how it was settled.
pub(crate) struct FailedCall {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
    pub refunded: bool,
    pub charged_mcents: i64,
    pub balance_mcents: i64,
    /// Some(true) when the release is left to the sweeper.
    pub refund_pending: Option<bool>,
}

impl FailedCall {
    /// The error HTTP answers (its body is also an MCP isError result's structuredContent).
    pub(crate) fn error(&self) -> ApiError {
        let mut err = ApiError::new(self.status, self.code).message(self.message).extra("refunded", self.refunded);
        if let Some(pending) = self.refund_pending {
            err = err.extra("refund_pending", pending);
        }
        err.extra("charged_mcents", self.charged_mcents).extra("balance_mcents", self.balance_mcents)
    }

    pub(crate) fn http_response(&self, request_id: &str) -> Response {
        let mut res = self.error().into_response(request_id);
        paid_headers(&mut res, self.charged_mcents, self.balance_mcents);
        res
    }
}

/// The billing core of a paid call, shared by `POST /v1/<endpoint>` and MCP `tools/call`
/// (steps 7-11 of contract 3.8): shape check, the handler's `validate`, then the hold, the run
/// within the time limit and the capture or release in a task of their own.
pub(crate) async fn run_paid_call(app: &Arc<AppState>, call: PaidCall) -> Result<PaidOutcome, ApiError> {
    let PaidCall { ep, key_hash, mut input, idem, call_id, face } = call;
    // 7. Shape from mcpay.toml.
    check_shape(&input, ep.input_shape()).map_err(|m| ApiError::new(400, "invalid_input").message(m).no_charge())?;
    normalize_integers(&mut input, ep.input_shape());
    // 8. The handler's own validation (typed input).
    let handlers = app.handlers.clone();
    let prepared = match std::panic::catch_unwind(AssertUnwindSafe(|| handlers.prepare(ep, input))) {
        Ok(Ok(prepared)) => prepared,
        Ok(Err(message)) => {
            let message: String = message.chars().take(500).collect();
            return Err(ApiError::new(400, "invalid_input").message(message).no_charge());
        }
        Err(_) => {
            tracing::error!(request_id = %call_id, endpoint = ep.name(), "validate panicked");
            return Err(ApiError::internal().no_charge());
        }
    };

    // 9-11. Hold, run and settle in a task of its own: once the hold is committed, a client that
    //       goes away (dropping this request's future) can no longer stop the handler from running
    //       or the hold from being captured or released.
    let task_app = app.clone();
    let rid = call_id.clone();
    match tokio::spawn(async move { hold_and_run(&task_app, ep, &key_hash, prepared, &rid, idem, face).await }).await {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(request_id = %call_id, error = %e, "paid call task failed");
            Err(ApiError::internal())
        }
    }
}

/// Step 9b's answers: a recorded Idempotency-Key with another endpoint or body, still running,
/// or captured (the stored answer replayed, or 409 when it was too large to store).
fn idempotent_outcome(found: IdemFound) -> Result<PaidOutcome, ApiError> {
    match found {
        IdemFound::Mismatch => Err(ApiError::new(422, "idempotency_mismatch")
            .message("This Idempotency-Key was used with another endpoint or body; use a new Idempotency-Key.")
            .no_charge()),
        IdemFound::InProgress { retry_after_seconds } => Err(ApiError::new(409, "idempotency_in_progress")
            .message("A call with this Idempotency-Key is still running; retry after Retry-After seconds.")
            .no_charge()
            .extra("retry_after_seconds", retry_after_seconds)
            .header(header::RETRY_AFTER, retry_after_seconds)),
        IdemFound::Replay { original_request_id, response: None } => Err(ApiError::new(409, "idempotency_response_not_stored")
            .message(
                "This Idempotency-Key's call succeeded and was charged once, but its answer was too large to store; it cannot be replayed.",
            )
            .no_charge()
            .extra("original_request_id", original_request_id)
            .extra("max_stored_bytes", IDEMPOTENCY_MAX_STORED_BYTES)
            .header(HeaderName::from_static("idempotent-replayed"), "true")),
        IdemFound::Replay { response: Some(stored), .. } => Ok(PaidOutcome::Replay(stored)),
    }
}

/// An HTTP replay: the stored answer (status, headers, body byte for byte).
fn replay_response(stored: StoredResponse) -> Response {
    let mut res = Response::new(Body::from(stored.body.unwrap_or_default()));
    *res.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let h = res.headers_mut();
    for (name, value) in &stored.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            h.append(n, v);
        }
    }
    set_header(h, "idempotent-replayed", "true");
    res
}

/// What a hold is taken for (step 9-10 of contract 3.8): the ledger's endpoint name, the scope the
/// key needs, the price and XP, the rate limit and its bucket, and the time limit (the hold's
/// deadline is that + the sweep margin). `POST /v1/<endpoint>`, MCP `tools/call` and the
/// metered upstreams of `/mcp/<name>` (contract 3.12) all hold through [`take_hold`].
pub(crate) struct HoldSpec<'a> {
    pub endpoint: &'a str,
    pub scope: &'a str,
    pub price: i64,
    pub xp: i64,
    /// Holds per key per rolling minute counted under `rate_bucket` (0: unlimited).
    pub rate_limit_per_minute: u32,
    /// The rate limit's bucket is `rl:<key_id>:<rate_bucket>`.
    pub rate_bucket: &'a str,
    pub time_limit: Duration,
}

/// A hold taken: the key it is on and the balance after it.
pub(crate) struct Held {
    pub key_ref: i64,
    pub key_id: String,
    pub balance: i64,
}

/// What step 9 ends in when no refusal answers.
pub(crate) enum HoldStep {
    Held(Held),
    /// A recorded Idempotency-Key answers instead (nothing held).
    Idempotent(IdemFound),
}

/// Steps 9-10 for a key read by [`key_row`] (step 9: an unknown key is `401`): scope →
/// Idempotency-Key → rate limit → balance, nothing written unless all pass, then the hold (one
/// atomic step per key; a key deleted meanwhile is `401`). A refusal is an `Err` with the
/// no-charge note.
pub(crate) async fn take_hold(
    app: &AppState,
    spec: &HoldSpec<'_>,
    key: &KeyRow,
    request_id: &str,
    idem: Option<&Idem>,
) -> Result<HoldStep, ApiError> {
    if !key.scope_list().iter().any(|s| s == spec.scope) {
        return Err(ApiError::new(403, "scope_denied").no_charge().extra("required_scope", spec.scope));
    }
    let idem_request = idem.map(|i| IdemRequest { key: &i.key, body_sha256: &i.body_sha256 });
    // 9b. A recorded Idempotency-Key answers before the rate limit (checked again with the hold).
    if let Some(ir) = &idem_request
        && let Some(found) = app.store.find_idempotency(key.id, ir, spec.endpoint).await.map_err(|e| db_error(e, true))?
    {
        return Ok(HoldStep::Idempotent(found));
    }
    let bucket = format!("rl:{}:{}", key.key_id, spec.rate_bucket);
    let bucket = bucket.as_str();
    let limit = spec.rate_limit_per_minute;
    let limited = if limit == 0 { Ok(Acquire::Allowed) } else { app.limiter.acquire(bucket, limit, MINUTE_MS, request_id).await };
    match limited {
        Ok(Acquire::Allowed) => {}
        Ok(Acquire::Limited { retry_after_seconds }) => {
            return Err(ApiError::new(429, "rate_limited")
                .message(format!("Rate limit of {limit} calls per minute reached for this endpoint."))
                .no_charge()
                .extra("retry_after_seconds", retry_after_seconds)
                .header(header::RETRY_AFTER, retry_after_seconds));
        }
        Err(e) => {
            tracing::error!(request_id, error = %e, "rate limiter unavailable");
            return Err(ApiError::internal().no_charge());
        }
    }
    let price = spec.price;
    let hold = HoldRequest {
        key_ref: key.id,
        endpoint: spec.endpoint,
        price,
        xp: spec.xp,
        request_id,
        timeout_ms: i64::try_from(spec.time_limit.as_millis()).unwrap_or(i64::MAX / 2),
        idem: idem_request,
    };
    match app.store.hold(&hold).await {
        Ok(HoldOutcome::Held { balance_mcents, .. }) => Ok(HoldStep::Held(Held { key_ref: key.id, key_id: key.key_id.clone(), balance: balance_mcents })),
        other => {
            // Nothing was held: the rate-limit slot is given back (only holds count).
            if limit > 0 {
                app.limiter.release(bucket, request_id).await;
            }
            match other {
                Ok(HoldOutcome::Insufficient { balance_mcents }) => Err(ApiError::new(402, "insufficient_balance")
                    .no_charge()
                    .extra("price_mcents", price)
                    .extra("balance_mcents", balance_mcents)),
                Ok(HoldOutcome::Idempotent(found)) => Ok(HoldStep::Idempotent(found)),
                Ok(_) => Err(ApiError::new(401, "invalid_key").no_charge()),
                Err(e) => Err(db_error(e, true)),
            }
        }
    }
}

/// Step 11, success: the capture, retried (contract 3.8). None when every attempt failed: the
/// answer is still sent and the sweeper releases the hold.
pub(crate) async fn capture_hold(app: &AppState, key_ref: i64, request_id: &str, stored: Option<&StoredResponse>) -> Option<CaptureOutcome> {
    settle_with_retry(request_id, "capture", || app.store.capture(key_ref, request_id, stored)).await
}

/// How a failed call is presented: its status, code and the messages of its three endings.
pub(crate) struct FailureText {
    pub status: u16,
    pub code: &'static str,
    /// Released.
    pub released: &'static str,
    /// Captured past the refund cap (caller failures only).
    pub kept: &'static str,
    /// The release kept failing: left to the sweeper.
    pub pending: &'static str,
}

/// Step 11, failure: the release (or, for a caller failure past the cap, the capture), retried;
/// when every attempt failed the hold is left to the sweeper (`refund_pending`).
pub(crate) async fn release_hold(
    app: &AppState,
    key_ref: i64,
    request_id: &str,
    reason: ReleaseReason,
    price: i64,
    balance: i64,
    text: &FailureText,
) -> FailedCall {
    let Some(settled) = settle_with_retry(request_id, "release", || app.store.release(key_ref, request_id, reason)).await else {
        // The hold stays until the sweeper releases it (within the time limit + the sweep margin).
        return FailedCall {
            status: text.status,
            code: text.code,
            message: text.pending,
            refunded: false,
            charged_mcents: price,
            balance_mcents: balance,
            refund_pending: Some(true),
        };
    };
    FailedCall {
        status: text.status,
        code: text.code,
        message: if settled.refunded { text.released } else { text.kept },
        refunded: settled.refunded,
        charged_mcents: if settled.refunded { 0 } else { price },
        balance_mcents: settled.balance_mcents,
        refund_pending: None,
    }
}

const HANDLER_TIMEOUT: FailureText = FailureText {
    status: 504,
    code: "handler_timeout",
    released: TIMEOUT_MESSAGE,
    kept: TIMEOUT_MESSAGE,
    pending: "The endpoint handler failed; the held price will be released shortly.",
};

const HANDLER_FAILED: FailureText = FailureText {
    status: 502,
    code: "handler_failed",
    released: "The endpoint handler failed; the charge was refunded.",
    kept: "The endpoint handler failed; the hourly refund limit for this key is reached, so the charge stands.",
    pending: "The endpoint handler failed; the held price will be released shortly.",
};

/// Steps 9-11 of a paid call: the hold ([`take_hold`]), then the handler within its time limit,
/// then the capture (success) or the release (failure, timeout).
async fn hold_and_run(
    app: &Arc<AppState>,
    ep: Endpoint,
    key_hash: &str,
    call: Call,
    request_id: &str,
    idem: Option<Idem>,
    face: Face,
) -> Result<PaidOutcome, ApiError> {
    let time_limit = app.handlers.timeout(ep);
    let spec = HoldSpec {
        endpoint: ep.name(),
        scope: ep.scope(),
        price: ep.price_mcents(),
        xp: ep.xp(),
        rate_limit_per_minute: ep.rate_limit_per_minute(),
        rate_bucket: ep.name(),
        time_limit,
    };
    let key = key_row(app, key_hash, true).await?;
    let held = match take_hold(app, &spec, &key, request_id, idem.as_ref()).await? {
        HoldStep::Held(held) => held,
        HoldStep::Idempotent(found) => return idempotent_outcome(found),
    };
    let (price, balance) = (spec.price, held.balance);

    // 10. The handler, within its time limit.
    let ctx = Context {
        endpoint: ep,
        key_id: held.key_id.clone(),
        request_id: request_id.to_string(),
        charged_mcents: price,
        balance_mcents: balance,
    };
    let charge = Charge { face, store: idem.is_some(), charged: price, balance, request_id };
    let outcome = run_handler(call, ctx, time_limit, &charge).await;

    // 11. Capture or release.
    let failure = match outcome {
        Outcome::Success { answer, stored } => {
            return match capture_hold(app, held.key_ref, request_id, stored.as_ref()).await {
                // Captured; or the capture kept failing: the answer is still sent and the sweeper
                // releases the hold (the gateway never keeps money for an outcome it did not record).
                Some(CaptureOutcome::Captured { .. }) | None => Ok(PaidOutcome::Success(answer)),
                // Released meanwhile (past its deadline): the call counts as timed out, uncharged.
                Some(CaptureOutcome::Released { balance_mcents } | CaptureOutcome::Unknown { balance_mcents }) => {
                    tracing::warn!(request_id, endpoint = ep.name(), "hold released before its capture");
                    Ok(PaidOutcome::Failed(FailedCall {
                        status: 504,
                        code: "handler_timeout",
                        message: TIMEOUT_MESSAGE,
                        refunded: true,
                        charged_mcents: 0,
                        balance_mcents,
                        refund_pending: None,
                    }))
                }
            };
        }
        Outcome::Failed(failure) => Some(failure),
        Outcome::TimedOut => None,
    };
    let timed_out = failure.is_none();
    match &failure {
        Some(error) => tracing::error!(request_id, endpoint = ep.name(), error = %error, "handler failed"),
        None => tracing::error!(request_id, endpoint = ep.name(), timeout_ms = time_limit.as_millis() as u64, "handler timed out"),
    }
    let (reason, text) = if timed_out {
        (ReleaseReason::Timeout, &HANDLER_TIMEOUT)
    } else {
        (ReleaseReason::Caller { cap: GATEWAY.refunds_per_key_per_hour }, &HANDLER_FAILED)
    };
    Ok(PaidOutcome::Failed(release_hold(app, held.key_ref, request_id, reason, price, balance, text).await))
}

const TIMEOUT_MESSAGE: &str = "The endpoint handler did not finish in time; the held price was released.";

/// Runs a settlement step up to SETTLE_ATTEMPTS times; None when every attempt failed.
async fn settle_with_retry<T, F, Fut>(request_id: &str, what: &str, mut step: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    for attempt in 0..SETTLE_ATTEMPTS {
        match step().await {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::error!(request_id, attempt = attempt + 1, error = %e, "{what} failed");
                if let Some(ms) = SETTLE_BACKOFF_MS.get(attempt).filter(|_| attempt + 1 < SETTLE_ATTEMPTS) {
                    tokio::time::sleep(Duration::from_millis(*ms)).await;
                }
            }
        }
    }
    None
}

enum Outcome {
    /// The answer to send, and what an Idempotency-Key replay will send (when the call has one).
    Success { answer: Answer, stored: Option<StoredResponse> },
    Failed(String),
    TimedOut,
}

/// What a successful answer carries: the face it is presented on, whether it is stored for
/// replays, the charge and the call id.
struct Charge<'a> {
    face: Face,
    store: bool,
    charged: i64,
    balance: i64,
    request_id: &'a str,
}

/// Runs the handler in a task of its own (a panic is a failure) for at most `limit`; past it the
/// task is aborted and whatever it still does is discarded. With `charge.store`, the answer is
/// also captured for replays: at most IDEMPOTENCY_MAX_STORED_BYTES + 1 bytes of it are buffered.
async fn run_handler(call: Call, ctx: Context, limit: Duration, charge: &Charge<'_>) -> Outcome {
    let task = tokio::spawn(call(ctx));
    let abort = task.abort_handle();
    let work = async move {
        match task.await {
            Ok(Ok(Reply::Response(r))) if r.status().is_server_error() => Outcome::Failed(format!("handler returned status {}", r.status())),
            Ok(Ok(reply)) if charge.face == Face::Mcp => {
                match crate::mcp::present(reply, charge.store, charge.charged, charge.balance, charge.request_id).await {
                    Ok((result, stored)) => Outcome::Success { answer: Answer::Mcp(result), stored },
                    Err(e) => Outcome::Failed(e),
                }
            }
            Ok(Ok(Reply::Response(mut r))) => {
                paid_headers(&mut r, charge.charged, charge.balance);
                http_success(r, charge.store).await
            }
            Ok(Ok(Reply::Json(result))) => {
                let mut response = json_response(
                    StatusCode::OK,
                    &json!({ "ok": true, "result": result, "charged_mcents": charge.charged, "balance_mcents": charge.balance, "request_id": charge.request_id }),
                );
                paid_headers(&mut response, charge.charged, charge.balance);
                http_success(response, charge.store).await
            }
            Ok(Err(e)) => Outcome::Failed(e.message().to_string()),
            Err(e) if e.is_panic() => Outcome::Failed("handler panicked".to_string()),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    };
    match tokio::time::timeout(limit, work).await {
        Ok(outcome) => outcome,
        Err(_) => {
            abort.abort();
            Outcome::TimedOut
        }
    }
}

/// An HTTP success, buffered for replays when the call has an Idempotency-Key.
async fn http_success(response: Response, store: bool) -> Outcome {
    if !store {
        return Outcome::Success { answer: Answer::Http(response), stored: None };
    }
    match buffer_for_replay(response).await {
        Ok((response, stored)) => Outcome::Success { answer: Answer::Http(response), stored: Some(stored) },
        Err(e) => Outcome::Failed(format!("response body failed: {e}")),
    }
}

/// Reads the answer's body up to IDEMPOTENCY_MAX_STORED_BYTES + 1 bytes: the stored copy (its
/// body None when larger) and the response to send, whole either way.
async fn buffer_for_replay(res: Response) -> Result<(Response, StoredResponse), axum::Error> {
    let (parts, mut body) = res.into_parts();
    // The request id and CORS headers are the replaying request's own.
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(n, _)| n.as_str() != "x-request-id" && !n.as_str().starts_with("access-control-"))
        .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let status = parts.status.as_u16();
    // The frames read so far, kept as they came (no copy).
    let mut head: VecDeque<Bytes> = VecDeque::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len += data.len();
            head.push_back(data);
            if len > IDEMPOTENCY_MAX_STORED_BYTES {
                // Too large to store: sent whole (what was read, then the rest), never stored.
                let rest = Body::new(Prefixed { head, tail: body });
                return Ok((Response::from_parts(parts, rest), StoredResponse { status, headers, body: None }));
            }
        }
    }
    let bytes: Vec<u8> = head.iter().flat_map(|b| b.iter().copied()).collect();
    let stored = StoredResponse { status, headers, body: Some(bytes.clone()) };
    Ok((Response::from_parts(parts, Body::from(bytes)), stored))
}

/// A response body that sends `head` (frames already read from `tail`), then the rest of `tail`.
struct Prefixed {
    head: VecDeque<Bytes>,
    tail: Body,
}

/// `Option<Result<http_body::Frame<Bytes>, axum::Error>>`, named through http-body-util.
type FrameResult = <http_body_util::combinators::Frame<'static, Body> as std::future::Future>::Output;

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<FrameResult> {
        while let Some(chunk) = self.head.pop_front() {
            if !chunk.is_empty() {
                // A body of exactly `chunk` yields it as one ready data frame.
                return Pin::new(&mut Body::from(chunk)).poll_frame(cx);
            }
        }
        Pin::new(&mut self.tail).poll_frame(cx)
    }
}
