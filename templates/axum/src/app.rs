//! The HTTP gateway: routing, authentication, validate-before-charge, the charge, the handler
//! run and the refund on failure. Everything goes through one fallback handler so that the
//! status codes, headers and error shape are exactly the contract's (docs/contract.md).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::body::read_json;
use crate::config::SignupSettings;
use crate::generated::{Endpoint, GATEWAY, PROJECT_NAME, PROJECT_VERSION, SIGNUP};
use crate::handler::{Call, Context, Handlers, Reply};
use crate::http::{ApiError, add_cors, json_response, set_header, strip_cors};
use crate::keys::{BearerError, generate_api_key, generate_key_id, parse_bearer, secrets_equal, sha256_hex};
use crate::levels::{badges_for, level_for};
use crate::mint::parse_mint_input;
use crate::ratelimit::{Acquire, RateLimiter};
use crate::shape::{check_shape, normalize_integers};
use crate::signup::{Signup, pricing_entry};
use crate::store::{ChargeOutcome, KeyRow, MintOutcome, NewKey, Store};

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
        Arc::new(AppState { store, limiter, admin_key, handlers, signup })
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
    let mut res = match dispatch(&app, route, req, &request_id, admin).await {
        Ok(res) => res,
        Err(err) => err.into_response(&request_id),
    };
    let h = res.headers_mut();
    set_header(h, "x-request-id", &request_id);
    if admin {
        strip_cors(h);
    } else if path.starts_with("/v1/") {
        add_cors(h);
    }
    // Never log keys: no headers, no query string, no raw path.
    tracing::info!(
        request_id = %request_id,
        method = %method,
        route = route.map_or("(unmatched)", Route::label),
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
        Route::Pricing => Ok(pricing()),
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

fn bearer(headers: &HeaderMap, no_charge: bool) -> Result<String, ApiError> {
    let key = parse_bearer(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes())).map_err(|e| bearer_error(e, no_charge))?;
    Ok(sha256_hex(key))
}

async fn key_row(app: &AppState, key_hash: &str, no_charge: bool) -> Result<KeyRow, ApiError> {
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

fn pricing() -> Response {
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
    json_response(
        StatusCode::OK,
        &json!({ "ok": true, "unit": "mcents", "mcents_per_cent": 1000, "signup": pricing_entry(), "endpoints": endpoints }),
    )
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
    let k = key_row(app, &hash, false).await?;
    Ok(json_response(
        StatusCode::OK,
        &MeBody {
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
        },
    ))
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
    let k = key_row(app, &hash, false).await?;
    let entries = app.store.ledger(k.id, limit).await.map_err(|e| db_error(e, false))?;
    Ok(json_response(StatusCode::OK, &json!({ "ok": true, "entries": entries })))
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

fn paid_headers(res: &mut Response, charged: i64, balance: i64) {
    set_header(res.headers_mut(), "x-charged-mcents", charged);
    set_header(res.headers_mut(), "x-balance-mcents", balance);
}

async fn paid(app: &Arc<AppState>, ep: Endpoint, req: Request, request_id: &str) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    // 1. Key syntax (existence is checked just before the charge).
    let key_hash = bearer(&parts.headers, true)?;
    // 2-4. Content-Type, bounded body, JSON.
    let mut input = read_json(&parts.headers, body, GATEWAY.max_body_bytes, true).await?;
    // 5. Shape from mcpay.toml.
    check_shape(&input, ep.input_shape()).map_err(|m| ApiError::new(400, "invalid_input").message(m).no_charge())?;
    normalize_integers(&mut input, ep.input_shape());
    // 6. The handler's own validation (typed input).
    let handlers = app.handlers.clone();
    let call = match std::panic::catch_unwind(AssertUnwindSafe(|| handlers.prepare(ep, input))) {
        Ok(Ok(call)) => call,
        Ok(Err(message)) => {
            let message: String = message.chars().take(500).collect();
            return Err(ApiError::new(400, "invalid_input").message(message).no_charge());
        }
        Err(_) => {
            tracing::error!(request_id, endpoint = ep.name(), "validate panicked");
            return Err(ApiError::internal().no_charge());
        }
    };

    // 7-8. Charge, run and settle in a task of its own: once the charge is committed, a client that
    //      goes away (dropping this request's future) can no longer stop the handler from running
    //      or its failure from being settled.
    let task_app = app.clone();
    let rid = request_id.to_string();
    match tokio::spawn(async move { charge_and_run(&task_app, ep, &key_hash, call, &rid).await }).await {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(request_id, error = %e, "paid call task failed");
            Err(ApiError::internal())
        }
    }

}


/// Steps 7-8 of a paid call: the charge (key → scope → rate limit → balance, nothing written unless
/// all pass), then the handler, then the settlement of a failure.
async fn charge_and_run(app: &Arc<AppState>, ep: Endpoint, key_hash: &str, call: Call, request_id: &str) -> Result<Response, ApiError> {
    let key = key_row(app, key_hash, true).await?;
    if !key.scope_list().iter().any(|s| s == ep.scope()) {
        return Err(ApiError::new(403, "scope_denied").no_charge().extra("required_scope", ep.scope()));
    }
    let bucket = format!("rl:{}:{}", key.key_id, ep.name());
    let limit = ep.rate_limit_per_minute();
    let limited = if limit == 0 { Ok(Acquire::Allowed) } else { app.limiter.acquire(&bucket, limit, MINUTE_MS, request_id).await };
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
    let price = ep.price_mcents();
    let balance = match app.store.charge(key.id, ep.name(), price, ep.xp(), request_id).await {
        Ok(ChargeOutcome::Charged { balance_mcents }) => balance_mcents,
        other => {
            if limit > 0 {
                app.limiter.release(&bucket, request_id).await;
            }
            return Err(match other {
                Ok(ChargeOutcome::Insufficient { balance_mcents }) => ApiError::new(402, "insufficient_balance")
                    .no_charge()
                    .extra("price_mcents", price)
                    .extra("balance_mcents", balance_mcents),
                Ok(_) => ApiError::new(401, "invalid_key").no_charge(),
                Err(e) => db_error(e, true),
            });
        }
    };

    // 8. Run the handler in its own task: a panic is a failure, and the settlement happens
    //    even if the client goes away. Failure refunds within the hourly cap.
    let ctx = Context {
        endpoint: ep,
        key_id: key.key_id.clone(),
        request_id: request_id.to_string(),
        charged_mcents: price,
        balance_mcents: balance,
    };
    let app2 = app.clone();
    let rid = request_id.to_string();
    let key_ref = key.id;
    let outcome = tokio::spawn(async move {
        let failure = match tokio::spawn(call(ctx)).await {
            Ok(Ok(Reply::Response(r))) if r.status().is_server_error() => format!("handler returned status {}", r.status()),
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(e)) => e.message().to_string(),
            Err(e) if e.is_panic() => "handler panicked".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(request_id = %rid, endpoint = ep.name(), error = %failure, "handler failed");
        let settled = app2
            .store
            .settle_failure(key_ref, ep.name(), ep.xp(), &rid, GATEWAY.refunds_per_key_per_hour)
            .await;
        Err(settled)
    })
    .await;

    match outcome {
        Ok(Ok(Reply::Response(mut res))) => {
            paid_headers(&mut res, price, balance);
            Ok(res)
        }
        Ok(Ok(Reply::Json(result))) => {
            let mut res = json_response(
                StatusCode::OK,
                &json!({ "ok": true, "result": result, "charged_mcents": price, "balance_mcents": balance, "request_id": request_id }),
            );
            paid_headers(&mut res, price, balance);
            Ok(res)
        }
        Ok(Err(Ok(settled))) => {
            let charged = if settled.refunded { 0 } else { price };
            let message = if settled.refunded {
                "The endpoint handler failed; the charge was refunded."
            } else {
                "The endpoint handler failed; the hourly refund limit for this key is reached, so the charge stands."
            };
            let mut res = ApiError::new(502, "handler_failed")
                .message(message)
                .extra("refunded", settled.refunded)
                .extra("charged_mcents", charged)
                .extra("balance_mcents", settled.balance_mcents)
                .into_response(request_id);
            paid_headers(&mut res, charged, settled.balance_mcents);
            Ok(res)
        }
        Ok(Err(Err(e))) => Err(db_error(e, false)),
        Err(e) => {
            tracing::error!(request_id, error = %e, "paid call task failed");
            Err(ApiError::internal())
        }
    }
}

