//! POST /v1/signup: pay once (x402 or MPP), receive a prepaid key (docs/contract.md, 3.9).
//!
//! Order of checks: rails configured, SIGNUP_SECRET, X402_RPC_URL (503) → optional body and
//! Idempotency-Key (415/413/400) → at most one payment credential (400) → a credential for a
//! configured rail (402 with the offer) → the credential names this offer and is genuine, checked
//! locally with no I/O (402 payment_invalid) → the payment's record, in one database transaction
//! shared by every instance: already used (200 replay / 409), in progress (409), open (taken over
//! and resolved), new (hourly signup budget, 429) → verify → record `settling` → settle → mint.
//!
//! Exactly once: the payment is recorded (`settling`, with what the chain needs) before any money
//! can move. A settlement whose outcome is unknown (the facilitator's `settlement_pending`, a 5xx,
//! a timeout, a reset) is `pending`, answered `202 payment_pending`, never "no charge applied";
//! the next request presenting the payment, or the sweep ([`sweep`]), resolves it from the chain
//! and mints the key from the recorded Idempotency-Key hash. Records: claimed → settling → paid →
//! done, or settling → pending → paid → done | released.

#[cfg(feature = "x402")]
pub mod chain;
pub mod mpp;
#[cfg(feature = "x402")]
pub mod x402;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::app::AppState;
use crate::body::{is_json_content_type, parse_json, read_bounded};
use crate::config::SignupSettings;
use crate::generated::{GATEWAY, PROJECT_NAME, SIGNUP};
use crate::http::{ApiError, json_response, set_header};
use crate::keys::{generate_api_key, generate_key_id, secrets_equal, sha256_hex};
use crate::mint::parse_signup_input;
use crate::store::{ClaimOutcome, NewKey, SettleRecordOutcome, SettlingRecord, SignupClaim, SignupJob, SignupMint, SignupRecord};

pub use self::mpp::{Method, MppRail, SignupMethod};
#[cfg(feature = "x402")]
pub use self::x402::X402Rail;

/// Without the `x402` Cargo feature there is no x402 rail (a configured one answers 503).
#[cfg(not(feature = "x402"))]
#[derive(Debug)]
pub enum X402Rail {}

pub const PATH: &str = "/v1/signup";
/// Retry-After of `409 payment_in_progress`.
const IN_PROGRESS_RETRY_SECONDS: u64 = 2;
/// Retry-After of `202 payment_pending`.
const PENDING_RETRY_SECONDS: u64 = 5;
/// The derived-key domain: key = prefix + hex(HMAC-SHA256(SIGNUP_SECRET, this + sha256_hex(idem) + ":" + reference)).
const DERIVED_KEY_CONTEXT: &str = "mcpay-signup-v2:";
/// The shortest SIGNUP_SECRET.
pub const MIN_SECRET_BYTES: usize = 32;
/// The sweep's period.
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The signup rails of a running gateway. Each is `None` when not offered, `Some(Err(msg))`
/// when configured but missing a setting (the route answers 503 with `msg`).
pub struct Signup {
    pub x402: Option<Result<X402Rail, String>>,
    pub mpp: Option<Result<MppRail, String>>,
    /// Signups per rolling hour, gateway-wide (`[signup] signups_per_hour`).
    pub per_hour: u32,
    /// SIGNUP_SECRET: the server secret of every derived key.
    secret: Option<String>,
    /// How long a request (or the sweep) holds a payment's claim before another may take it over:
    /// longer than a verification plus a settlement (default: twice the facilitator timeout + 30 s).
    pub lease: Duration,
    /// The period of the sweep (default 30 s).
    pub sweep_every: Duration,
}

impl std::fmt::Debug for Signup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signup")
            .field("x402", &self.x402)
            .field("mpp", &self.mpp)
            .field("per_hour", &self.per_hour)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("lease", &self.lease)
            .field("sweep_every", &self.sweep_every)
            .finish()
    }
}

/// Settled payment: what the payment record keeps and the success response carries.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The transaction hash / receipt reference (`payment.reference` of the response).
    pub settled_ref: String,
    /// Rail-qualified `settled_ref`: one key per settled payment, across claims.
    pub receipt_key: String,
    /// PAYMENT-RESPONSE / X-PAYMENT-RESPONSE / Payment-Receipt value.
    pub response_header: String,
}

/// Why verification or settlement did not take the payment.
#[derive(Debug)]
pub enum PayError {
    /// Refused at verification: 402 payment_invalid (MPP: with its problem type).
    Invalid { message: String, problem: Option<String> },
    /// Refused at settlement: 402 payment_failed.
    Failed(String),
    /// Facilitator / payment service unreachable or failing: 502 payment_unavailable.
    Unavailable(String),
}

impl Signup {
    /// The rails of `[signup]` in mcpay.toml with the given environment.
    pub fn from_settings(settings: &SignupSettings) -> Signup {
        if !SIGNUP.enabled {
            return Signup::build(None, None, None);
        }
        let x402 = SIGNUP.x402.as_ref().map(|cfg| x402_from_settings(cfg, settings));
        let mpp = SIGNUP.mpp.as_ref().map(|cfg| MppRail::from_settings(cfg, settings));
        let mut signup = Signup::build(x402, mpp, settings.signup_secret.clone());
        if let Some(ms) = settings.signup_sweep_interval_ms.as_deref() {
            match ms.parse::<u64>().ok().filter(|ms| (1000..=300_000).contains(ms)) {
                Some(ms) => signup.sweep_every = Duration::from_millis(ms),
                None => tracing::warn!(value = ms, "SIGNUP_SWEEP_INTERVAL_MS must be 1000..300000 (ms): using 30000"),
            }
        }
        signup
    }

    fn build(x402: Option<Result<X402Rail, String>>, mpp: Option<Result<MppRail, String>>, secret: Option<String>) -> Signup {
        #[cfg(feature = "x402")]
        let timeout = x402.as_ref().and_then(|r| r.as_ref().ok()).map_or(x402::DEFAULT_FACILITATOR_TIMEOUT, X402Rail::timeout);
        #[cfg(not(feature = "x402"))]
        let timeout = Duration::from_secs(60);
        Signup { x402, mpp, per_hour: SIGNUP.signups_per_hour, secret, lease: timeout * 2 + Duration::from_secs(30), sweep_every: SWEEP_EVERY }
    }

    /// Rails built by hand (tests, or custom MPP methods); see [`Signup::with_secret`].
    pub fn new(x402: Option<X402Rail>, mpp: Option<MppRail>) -> Signup {
        Signup::build(x402.map(Ok), mpp.map(Ok), None)
    }

    /// The same rails with this SIGNUP_SECRET.
    pub fn with_secret(mut self, secret: &str) -> Signup {
        self.secret = Some(secret.to_string());
        self
    }

    /// Step 2: every configured rail has its settings, and SIGNUP_SECRET is set.
    pub fn ready(&self) -> Result<(), String> {
        if let Some(Err(m)) = &self.x402 {
            return Err(m.clone());
        }
        #[cfg(feature = "x402")]
        if let Some(Ok(rail)) = &self.x402 {
            rail.ready()?;
        }
        if let Some(Err(m)) = &self.mpp {
            return Err(m.clone());
        }
        if self.x402.is_none() && self.mpp.is_none() {
            return Err("No signup payment rail is configured ([signup.x402] or [signup.mpp] in mcpay.toml).".into());
        }
        match self.secret.as_deref() {
            Some(s) if s.len() >= MIN_SECRET_BYTES => Ok(()),
            Some(_) => Err(format!("SIGNUP_SECRET is shorter than {MIN_SECRET_BYTES} bytes: set it to a random secret, e.g. `openssl rand -hex 32`.")),
            None => Err("Signup needs the SIGNUP_SECRET secret (at least 32 bytes, e.g. `openssl rand -hex 32`): it derives every signup key.".into()),
        }
    }

    fn secret(&self) -> &str {
        self.secret.as_deref().unwrap_or("")
    }

    fn x402_rail(&self) -> Option<&X402Rail> {
        self.x402.as_ref().and_then(|r| r.as_ref().ok())
    }

    fn mpp_rail(&self) -> Option<&MppRail> {
        self.mpp.as_ref().and_then(|r| r.as_ref().ok())
    }

    /// Log line at start-up.
    pub fn describe(&self) -> String {
        if !SIGNUP.enabled {
            return "disabled".into();
        }
        match self.ready() {
            Ok(()) => {
                let mut rails = Vec::new();
                if self.x402_rail().is_some() {
                    rails.push("x402".to_string());
                }
                if let Some(m) = self.mpp_rail() {
                    let names: Vec<&str> = m.methods().map(|m| m.name()).collect();
                    rails.push(format!("mpp ({})", names.join(", ")));
                }
                rails.join(" + ")
            }
            Err(m) => format!("unavailable: {m}"),
        }
    }
}

#[cfg(feature = "x402")]
fn x402_from_settings(cfg: &crate::generated::SignupX402Config, settings: &SignupSettings) -> Result<X402Rail, String> {
    X402Rail::from_settings(cfg, settings)
}

#[cfg(not(feature = "x402"))]
fn x402_from_settings(_: &crate::generated::SignupX402Config, _: &SignupSettings) -> Result<X402Rail, String> {
    Err("The x402 rail needs the `x402` Cargo feature (on by default): build with `cargo build --release --features x402`.".into())
}

/// The `signup` field of GET /v1/pricing (null when signup is disabled).
pub fn pricing_entry() -> Value {
    if !SIGNUP.enabled {
        return Value::Null;
    }
    json!({
        "path": PATH,
        "price_mcents": SIGNUP.price_mcents,
        "balance_mcents": SIGNUP.balance_mcents,
        "scopes": SIGNUP.scopes,
        "rails": SIGNUP.rails,
    })
}

/// An HTTPS client on rustls + ring with Mozilla's root certificates (no system store needed).
#[cfg(feature = "tls")]
pub fn http_client() -> Result<reqwest::Client, String> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())
}

/// The process-wide rustls provider (ring) for the clients the payment crates build themselves.
pub fn install_tls_provider() {
    #[cfg(feature = "tls")]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The key prefix + `hex(HMAC-SHA256(key: SIGNUP_SECRET, message: "mcpay-signup-v2:" +
/// sha256_hex(Idempotency-Key) + ":" + reference))`: the key a signup mints. The gateway stores
/// only `idem_hash` = sha256_hex(Idempotency-Key), so the sweep can mint the key without a client,
/// only the holder of the Idempotency-Key is shown it again, and nothing public plus a client
/// string yields it (the secret is the server's).
pub fn derived_key(secret: &str, idem_hash: &str, reference: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(DERIVED_KEY_CONTEXT.as_bytes());
    mac.update(idem_hash.as_bytes());
    mac.update(b":");
    mac.update(reference.as_bytes());
    format!("{}{}", GATEWAY.key_prefix, hex::encode(mac.finalize().into_bytes()))
}

/// An Idempotency-Key made by the gateway for a request that sent none: 43 characters of
/// base64url (32 random bytes). Returned to the client only in a `202 payment_pending`.
pub fn new_idempotency_key() -> String {
    use base64::Engine;
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).expect("the operating system's CSPRNG is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

pub fn valid_idempotency_key(k: &str) -> bool {
    (32..=128).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

// ---------------------------------------------------------------------------- the request

/// Where the request came to: the x402 resource URL and the default MPP realm.
#[cfg_attr(not(feature = "x402"), allow(dead_code))]
struct Origin {
    scheme: &'static str,
    host: String,
}

impl Origin {
    fn of(headers: &HeaderMap) -> Origin {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|h| {
                (1..=255).contains(&h.len())
                    && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
            })
            .unwrap_or("localhost")
            .to_ascii_lowercase();
        // Behind a TLS-terminating proxy the public scheme is https.
        let https = headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').next().unwrap_or("").trim().eq_ignore_ascii_case("https"));
        Origin { scheme: if https { "https" } else { "http" }, host }
    }

    #[cfg_attr(not(feature = "x402"), allow(dead_code))]
    fn resource(&self) -> Value {
        json!({
            "url": format!("{}://{}{}", self.scheme, self.host, PATH),
            "description": format!("A prepaid API key for {PROJECT_NAME}"),
            "mimeType": "application/json",
        })
    }
}

#[cfg_attr(not(feature = "x402"), allow(dead_code))]
enum Credential {
    X402 { value: Vec<u8>, v1: bool },
    Mpp(String),
}

/// Step 4: the payment credentials of the request (`Authorization` with another scheme is not one).
fn credentials(headers: &HeaderMap) -> Vec<Credential> {
    let mut out = Vec::new();
    for v in headers.get_all("payment-signature") {
        out.push(Credential::X402 { value: v.as_bytes().to_vec(), v1: false });
    }
    for v in headers.get_all("x-payment") {
        out.push(Credential::X402 { value: v.as_bytes().to_vec(), v1: true });
    }
    for v in headers.get_all(header::AUTHORIZATION) {
        let text = String::from_utf8_lossy(v.as_bytes()).into_owned();
        // Several credentials can share one field, comma-separated (base64url has no comma).
        let payments = text
            .split(',')
            .filter(|part| {
                let p = part.trim_start();
                p.len() > 8 && p[..8].eq_ignore_ascii_case("payment ")
            })
            .count();
        for _ in 0..payments {
            out.push(Credential::Mpp(text.clone()));
        }
    }
    out
}

/// Step 3: the optional body — empty (any Content-Type), or a JSON object `{name?}`.
async fn read_name(headers: &HeaderMap, body: Body) -> Result<Option<String>, ApiError> {
    let declared = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(v.to_str().ok().map(str::trim).filter(|s| s.bytes().all(|b| b.is_ascii_digit())).and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| {
            ApiError::new(400, "invalid_json").message("Invalid Content-Length.").no_charge()
        })?),
    };
    if declared == Some(0) {
        return Ok(None);
    }
    if !is_json_content_type(headers) {
        // A body of unknown length may still be empty.
        if declared.is_none() && read_bounded(headers, body, GATEWAY.max_body_bytes, true).await.is_ok_and(|b| b.is_empty()) {
            return Ok(None);
        }
        return Err(ApiError::new(415, "unsupported_media_type")
            .message("A signup body must be application/json ({\"name\": …}) or empty.")
            .no_charge());
    }
    let bytes = read_bounded(headers, body, GATEWAY.max_body_bytes, true).await?;
    if bytes.is_empty() {
        return Ok(None);
    }
    // The paid routes' parser: invalid JSON → invalid_json; valid JSON it cannot hold (1e400,
    // nesting past the limit) → invalid_input.
    parse_signup_input(&parse_json(&bytes, true)?)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(first) = values.next() else { return Ok(None) };
    let bad = || {
        ApiError::new(400, "invalid_input")
            .message("Idempotency-Key must be one value of 32 to 128 characters A-Z a-z 0-9 _ -.")
            .no_charge()
    };
    if values.next().is_some() {
        return Err(bad());
    }
    match first.to_str() {
        Ok(k) if valid_idempotency_key(k) => Ok(Some(k.to_string())),
        _ => Err(bad()),
    }
}

fn dollars(mcents: i64) -> String {
    let whole = mcents / 100_000;
    let frac = format!("{:05}", mcents % 100_000);
    let frac = frac.trim_end_matches('0');
    let frac = if frac.len() < 2 { format!("{frac:0<2}") } else { frac.to_string() };
    format!("${whole}.{frac}")
}

/// A 402 of this route: the error, the offer again (x402 PaymentRequired fields in the body and
/// `PAYMENT-REQUIRED`; one `WWW-Authenticate: Payment` per MPP method), "no charge applied".
fn payment_error(signup: &Signup, origin: &Origin, code: &'static str, message: String, problem: Option<String>) -> ApiError {
    let mut err = ApiError::new(402, code)
        .message(message.clone())
        .no_charge()
        .extra("price_mcents", SIGNUP.price_mcents)
        .extra("balance_mcents", SIGNUP.balance_mcents)
        .extra("scopes", SIGNUP.scopes);
    #[cfg(feature = "x402")]
    if let Some(rail) = signup.x402_rail() {
        let (required, header) = rail.payment_required(&origin.resource(), &message);
        for k in ["x402Version", "resource", "accepts", "extensions"] {
            err = err.extra(k, required[k].clone());
        }
        err = err.header(axum::http::HeaderName::from_static("payment-required"), header);
    }
    if let Some(rail) = signup.mpp_rail() {
        let realm = rail.realm(&origin.host);
        for challenge in rail.challenges(realm, &format!("Sign up to {PROJECT_NAME}")) {
            err = err.header(header::WWW_AUTHENTICATE, challenge);
        }
    }
    if let Some(problem) = problem {
        err = err.extra("problem", problem);
    }
    err
}

fn offer_message() -> String {
    format!(
        "Pay to sign up: {} ({} mcents) buys an API key holding {} mcents for the scopes {}.",
        dollars(SIGNUP.price_mcents),
        SIGNUP.price_mcents,
        SIGNUP.balance_mcents,
        SIGNUP.scopes.join(", "),
    )
}

/// A credential that names the offer (after step 6).
enum Payment {
    #[cfg(feature = "x402")]
    X402(Box<x402::X402Payment>),
    Mpp(Box<self::mpp::MppPayment>),
}

impl Payment {
    fn reference(&self) -> &str {
        match self {
            #[cfg(feature = "x402")]
            Payment::X402(p) => &p.reference,
            Payment::Mpp(p) => &p.reference,
        }
    }

    fn rail(&self) -> &'static str {
        match self {
            #[cfg(feature = "x402")]
            Payment::X402(_) => "x402",
            Payment::Mpp(_) => "mpp",
        }
    }

    /// The success header that carries the settlement / receipt.
    fn response_header(&self) -> &'static str {
        match self {
            #[cfg(feature = "x402")]
            Payment::X402(p) if p.v1 => "x-payment-response",
            #[cfg(feature = "x402")]
            Payment::X402(_) => "payment-response",
            Payment::Mpp(_) => "payment-receipt",
        }
    }
}

/// POST /v1/signup (the route exists only when `[signup] enabled = true`).
pub async fn signup(app: &Arc<AppState>, req: Request, request_id: &str) -> Result<Response, ApiError> {
    let signup = &app.signup;
    // 2. Every configured rail has its settings (before reading anything of the request).
    signup.ready().map_err(|m| ApiError::new(503, "signup_unavailable").message(m))?;
    let (parts, body) = req.into_parts();
    let origin = Origin::of(&parts.headers);
    // 3. Optional body, Idempotency-Key.
    let name = read_name(&parts.headers, body).await?;
    let idem = idempotency_key(&parts.headers)?;
    // 4. At most one payment credential.
    let mut creds = credentials(&parts.headers);
    if creds.len() > 1 {
        return Err(ApiError::new(400, "invalid_payment")
            .message("Send one payment credential: PAYMENT-SIGNATURE, X-PAYMENT or Authorization: Payment.")
            .no_charge());
    }
    // 5. A credential for a configured rail.
    let offered = match creds.pop() {
        Some(c @ Credential::X402 { .. }) if signup.x402_rail().is_some() => Some(c),
        Some(c @ Credential::Mpp(_)) if signup.mpp_rail().is_some() => Some(c),
        _ => None,
    };
    let Some(credential) = offered else {
        return Err(payment_error(signup, &origin, "payment_required", offer_message(), None));
    };
    // 6. The credential decodes and names this offer.
    let payment = match credential {
        #[cfg(feature = "x402")]
        Credential::X402 { value, v1 } => {
            let rail = signup.x402_rail().ok_or_else(ApiError::internal)?;
            Payment::X402(Box::new(rail.check(&value, v1).map_err(|m| payment_error(signup, &origin, "payment_invalid", m, None))?))
        }
        #[cfg(not(feature = "x402"))]
        Credential::X402 { .. } => return Err(payment_error(signup, &origin, "payment_required", offer_message(), None)),
        Credential::Mpp(value) => {
            let rail = signup.mpp_rail().ok_or_else(ApiError::internal)?;
            let realm = rail.realm(&origin.host);
            Payment::Mpp(Box::new(
                rail.check(realm, &value)
                    .map_err(|r| payment_error(signup, &origin, "payment_invalid", r.message, Some(r.problem)))?,
            ))
        }
    };
    // 7-12 in a task of their own: once a payment is claimed, a client that goes away cannot
    // stop its settlement from being recorded or its key from being minted.
    let task_app = app.clone();
    let rid = request_id.to_string();
    match tokio::spawn(async move { complete(&task_app, &origin, payment, idem, name, &rid).await }).await {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(request_id, error = %e, "signup task failed");
            Err(ApiError::internal())
        }
    }
}

fn db_error(e: sqlx::Error, before_payment: bool) -> ApiError {
    tracing::error!(error = %e, "database error (signup)");
    ApiError::internal().charge_note(before_payment)
}

/// The info line of every state change of a payment record.
fn log_state(reference: &str, rail: &str, state: &str, transaction: Option<&str>) {
    tracing::info!(reference, rail, state, transaction, "signup payment");
}

/// A payment record held by this request (or sweep pass), and what minting needs.
#[derive(Debug, Clone)]
struct Job {
    reference: String,
    rail: String,
    /// The claim token (request id or sweep id).
    token: String,
    /// The state the record was in when taken.
    state: String,
    idem_hash: Option<String>,
    name: Option<String>,
    settled_ref: Option<String>,
    response_header: Option<String>,
    #[cfg_attr(not(feature = "x402"), allow(dead_code))]
    payload: Option<String>,
    #[cfg_attr(not(feature = "x402"), allow(dead_code))]
    from_block: Option<i64>,
}

impl Job {
    fn taken(r: SignupJob, token: &str) -> Job {
        Job {
            reference: r.reference,
            rail: r.rail,
            token: token.to_string(),
            state: r.state,
            idem_hash: r.idem_hash,
            name: r.name,
            settled_ref: r.settled_ref,
            response_header: r.response_header,
            payload: r.payload,
            from_block: r.from_block,
        }
    }
}

/// Where a payment ended up after this request's (or sweep pass's) work.
#[derive(Debug)]
enum Outcome {
    /// Paid, and the key minted (`key` is the secret, shown once).
    Minted { key: String, key_id: String, settled: Settled, name: Option<String> },
    /// The outcome is unknown: the record is `pending` (the transaction, when known).
    Pending { transaction: Option<String> },
    /// No money moved and none can: the record is `released`.
    Released { message: String },
    /// The settled payment (same transaction / receipt) already bought another record's key.
    AlreadyUsed { key_id: Option<String> },
    /// The claim passed to another holder (its lease expired); it finishes the work.
    Lost,
}

/// → `pending` (outcome unknown; the claim is let go).
async fn to_pending(app: &AppState, job: &Job, transaction: Option<String>) -> Result<Outcome, sqlx::Error> {
    if !app.store.signup_pending(&job.reference, &job.token, transaction.as_deref()).await? {
        return Ok(Outcome::Lost);
    }
    let transaction = transaction.or_else(|| job.settled_ref.clone());
    log_state(&job.reference, &job.rail, "pending", transaction.as_deref());
    Ok(Outcome::Pending { transaction })
}

/// → `released` (no money moved and none can).
async fn release(app: &AppState, job: &Job, message: String) -> Result<Outcome, sqlx::Error> {
    if !app.store.release_signup(&job.reference, &job.token).await? {
        return Ok(Outcome::Lost);
    }
    log_state(&job.reference, &job.rail, "released", None);
    Ok(Outcome::Released { message })
}

/// → `paid` with this settlement, then mint → `done`.
async fn paid_and_mint(app: &AppState, job: &Job, settled: Settled) -> Result<Outcome, sqlx::Error> {
    let recorded = app
        .store
        .record_signup_settled(&job.reference, &job.token, &settled.receipt_key, &settled.settled_ref, Some(&settled.response_header))
        .await?;
    match recorded {
        SettleRecordOutcome::Recorded => {
            log_state(&job.reference, &job.rail, "paid", Some(&settled.settled_ref));
            mint(app, job, settled).await
        }
        SettleRecordOutcome::AlreadyUsed { key_id } => {
            log_state(&job.reference, &job.rail, "released", Some(&settled.settled_ref));
            Ok(Outcome::AlreadyUsed { key_id })
        }
        SettleRecordOutcome::Lost => Ok(Outcome::Lost),
    }
}

/// `paid` → `done`: mints the key from the recorded Idempotency-Key hash (no client needed).
async fn mint(app: &AppState, job: &Job, settled: Settled) -> Result<Outcome, sqlx::Error> {
    let key = match job.idem_hash.as_deref() {
        Some(h) => derived_key(app.signup.secret(), h, &job.reference),
        // A record from before derived keys always had an Idempotency-Key hash.
        None => generate_api_key(),
    };
    let key_id = generate_key_id();
    let key_hash = sha256_hex(&key);
    let scopes: Vec<String> = SIGNUP.scopes.iter().map(|s| s.to_string()).collect();
    let new = NewKey {
        key_hash: &key_hash,
        key_id: &key_id,
        name: job.name.as_deref(),
        balance_mcents: SIGNUP.balance_mcents,
        scopes: &scopes,
        request_id: &job.token,
    };
    if !app.store.finish_signup(&job.reference, &job.token, &SignupMint { key: new }).await? {
        return Ok(Outcome::Lost);
    }
    log_state(&job.reference, &job.rail, "done", Some(&settled.settled_ref));
    tracing::info!(key_id = %key_id, rail = %job.rail, payment = %settled.settled_ref, "signup: key minted");
    Ok(Outcome::Minted { key, key_id, settled, name: job.name.clone() })
}

/// Step 12 (x402): settle the recorded (`settling` / `pending`) payment and record the outcome.
/// `again`: a re-submission of a payment whose first outcome was lost.
#[cfg(feature = "x402")]
async fn settle_x402(app: &AppState, rail: &X402Rail, job: &Job, p: &x402::X402Payment, again: bool) -> Result<Outcome, sqlx::Error> {
    match rail.settle(p).await {
        x402::SettleOutcome::Settled(settled) => paid_and_mint(app, job, settled).await,
        x402::SettleOutcome::Unknown { transaction, reason } => {
            tracing::warn!(reference = %job.reference, reason = %reason, transaction = ?transaction, "x402 settlement outcome unknown: pending");
            to_pending(app, job, transaction).await
        }
        x402::SettleOutcome::Refused(message) => {
            // Refused: ask the chain whether the money moved anyway.
            let Some(chain) = rail.chain() else { return to_pending(app, job, None).await };
            let a = &p.authorization;
            let from_block = job.from_block.unwrap_or(0).max(0) as u64;
            match chain.transfer_done(rail.asset(), a.from, a.nonce, from_block).await {
                Ok(Some(tx)) => paid_and_mint(app, job, rail.settled_on_chain(p, &tx)).await,
                // A re-submission refused while an earlier submission may still be in flight:
                // wait for the chain (moved) or for validBefore (released).
                Ok(None) if again || job.settled_ref.is_some() => to_pending(app, job, None).await,
                Ok(None) => release(app, job, format!("{message} No money moved (checked on chain).")).await,
                Err(e) => {
                    tracing::warn!(reference = %job.reference, error = %e, "x402 settlement refused; chain unreachable: pending");
                    to_pending(app, job, None).await
                }
            }
        }
    }
}

/// Resolves an x402 payment whose outcome is open, from the chain: moved → paid → mint; not
/// moved and cancelled or expired → released; not moved and still valid → settle again.
#[cfg(feature = "x402")]
async fn resolve_x402(app: &AppState, rail: &X402Rail, job: &Job, p: &x402::X402Payment) -> Result<Outcome, sqlx::Error> {
    let Some(chain) = rail.chain() else { return to_pending(app, job, None).await };
    let a = &p.authorization;
    let from_block = job.from_block.unwrap_or(0).max(0) as u64;
    // The chain's clock first, then its logs: expired by the chain's clock with no transfer seen
    // after that means none can ever be mined (this server's clock decides nothing).
    let chain_now = match chain.chain_time().await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(reference = %job.reference, error = %e, "x402 chain unreachable: still pending");
            return to_pending(app, job, None).await;
        }
    };
    let done = match chain.transfer_done(rail.asset(), a.from, a.nonce, from_block).await {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!(reference = %job.reference, error = %e, "x402 chain unreachable: still pending");
            return to_pending(app, job, None).await;
        }
    };
    if let Some(tx) = done {
        return paid_and_mint(app, job, rail.settled_on_chain(p, &tx)).await;
    }
    match chain.authorization_state(rail.asset(), a.from, a.nonce).await {
        Err(e) => {
            tracing::warn!(reference = %job.reference, error = %e, "x402 chain unreachable: still pending");
            to_pending(app, job, None).await
        }
        Ok(true) => {
            release(app, job, "The payer cancelled the authorization before it was used; no money moved (checked on chain).".into()).await
        }
        Ok(false) if i64::try_from(chain_now).unwrap_or(i64::MAX) >= a.valid_before_secs() => {
            release(app, job, "The authorization expired without being settled; no money moved (checked on chain).".into()).await
        }
        Ok(false) => settle_x402(app, rail, job, p, true).await,
    }
}

/// Resolves a record taken over (by a request or the sweep): `paid` → mint; `claimed` (its
/// request died verifying, no money moved) → released; `settling` / `pending` → from the chain
/// (x402) or left `pending` for the operator (MPP: no generic receipt look-up).
async fn resolve(app: &AppState, job: &Job) -> Result<Outcome, sqlx::Error> {
    match job.state.as_str() {
        "paid" => {
            let settled = Settled {
                settled_ref: job.settled_ref.clone().unwrap_or_default(),
                receipt_key: String::new(),
                response_header: job.response_header.clone().unwrap_or_default(),
            };
            return mint(app, job, settled).await;
        }
        "claimed" => return release(app, job, "The request verifying this payment stopped before settling; no money moved.".into()).await,
        _ => {}
    }
    #[cfg(feature = "x402")]
    if job.rail == "x402" {
        let Some(rail) = app.signup.x402_rail() else { return to_pending(app, job, None).await };
        let p = match job.payload.as_deref().map(|payload| rail.recorded(&job.reference, payload)) {
            Some(Ok(p)) => p,
            _ => {
                tracing::error!(reference = %job.reference, "x402 payment record without a usable payload: left pending for the operator");
                return to_pending(app, job, None).await;
            }
        };
        return resolve_x402(app, rail, job, &p).await;
    }
    to_pending(app, job, None).await
}

/// One pass of the sweep: every x402 `pending` record, and every record whose claim's lease
/// expired, is taken (through the same lease, so several instances are safe) and resolved.
/// Returns how many records it took.
pub async fn sweep(app: &AppState) -> usize {
    if app.signup.ready().is_err() {
        return 0;
    }
    let due = match app.store.due_signups(100).await {
        Ok(due) => due,
        Err(e) => {
            tracing::error!(error = %e, "signup sweep: database error");
            return 0;
        }
    };
    let lease = app.signup.lease.as_millis() as i64;
    let mut taken = 0;
    for reference in due {
        let token = format!("sweep-{}", uuid::Uuid::new_v4());
        let record = match app.store.take_signup(&reference, &token, lease).await {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(error = %e, reference = %reference, "signup sweep: database error");
                continue;
            }
        };
        taken += 1;
        let job = Job::taken(record, &token);
        match resolve(app, &job).await {
            Ok(outcome) => tracing::info!(reference = %reference, outcome = ?OutcomeLog(&outcome), "signup sweep: resolved"),
            Err(e) => tracing::error!(error = %e, reference = %reference, "signup sweep: database error (the record is retried after its lease)"),
        }
    }
    taken
}

/// An [`Outcome`] for logs (never the key).
struct OutcomeLog<'a>(&'a Outcome);

impl std::fmt::Debug for OutcomeLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Outcome::Minted { key_id, .. } => write!(f, "done ({key_id})"),
            Outcome::Pending { .. } => f.write_str("pending"),
            Outcome::Released { .. } => f.write_str("released"),
            Outcome::AlreadyUsed { .. } => f.write_str("already used"),
            Outcome::Lost => f.write_str("taken by another holder"),
        }
    }
}

/// Starts the sweep of a serving gateway: one pass now, then one every `signup.sweep_every`.
/// None when signup is off or not ready (nothing can be resolved).
pub fn spawn_sweeper(app: Arc<AppState>) -> Option<tokio::task::JoinHandle<()>> {
    if !SIGNUP.enabled || app.signup.ready().is_err() {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            sweep(&app).await;
            tokio::time::sleep(app.signup.sweep_every).await;
        }
    }))
}

async fn complete(
    app: &Arc<AppState>,
    origin: &Origin,
    payment: Payment,
    idem: Option<String>,
    name: Option<String>,
    request_id: &str,
) -> Result<Response, ApiError> {
    let signup = &app.signup;
    let reference = payment.reference().to_string();
    // Derived keys always: a request without an Idempotency-Key gets one made here.
    let (idem, gateway_made) = match idem {
        Some(k) => (k, false),
        None => (new_idempotency_key(), true),
    };
    let idem_hash = sha256_hex(&idem);
    let claim = SignupClaim {
        reference: &reference,
        rail: payment.rail(),
        token: request_id,
        idem_hash: &idem_hash,
        name: name.as_deref(),
        lease_ms: signup.lease.as_millis() as i64,
    };
    // 8-9. The payment's record: used / in progress / open / new (hourly budget), and the claim.
    let (job, outcome) = match app.store.claim_signup(claim, signup.per_hour).await.map_err(|e| db_error(e, true))? {
        ClaimOutcome::Done(record) => {
            #[cfg(feature = "x402")]
            if let (Payment::X402(p), Some(recorded)) = (&payment, record.payload.as_deref())
                && !p.same_authorization(recorded)
            {
                return Err(other_authorization(signup, origin));
            }
            return replay(app, &payment, record, (!gateway_made).then_some(idem.as_str()), request_id).await;
        }
        ClaimOutcome::InProgress => return Err(in_progress()),
        ClaimOutcome::Limited { retry_after_seconds } => {
            return Err(ApiError::new(429, "rate_limited")
                .message(format!("Signup limit of {} per hour reached.", signup.per_hour))
                .no_charge()
                .extra("retry_after_seconds", retry_after_seconds)
                .header(header::RETRY_AFTER, retry_after_seconds));
        }
        ClaimOutcome::Resolve(record) => {
            let job = Job::taken(record, request_id);
            #[cfg(feature = "x402")]
            if let (Payment::X402(p), Some(recorded)) = (&payment, job.payload.as_deref())
                && !p.same_authorization(recorded)
            {
                let _ = app.store.unlease_signup(&job.reference, request_id).await;
                return Err(other_authorization(signup, origin));
            }
            tracing::info!(request_id, reference = %reference, state = %job.state, "signup payment taken over to resolve");
            let outcome = resolve(app, &job).await;
            (job, outcome)
        }
        ClaimOutcome::Claimed => {
            log_state(&reference, payment.rail(), "claimed", None);
            let job = Job {
                reference: reference.clone(),
                rail: payment.rail().to_string(),
                token: request_id.to_string(),
                state: "claimed".into(),
                idem_hash: Some(idem_hash.clone()),
                name: name.clone(),
                settled_ref: None,
                response_header: None,
                payload: None,
                from_block: None,
            };
            let outcome = pay_new(app, origin, &payment, job.clone()).await?;
            (job, outcome)
        }
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            // The record is settling / pending under this claim's lease: the sweep resolves it.
            tracing::error!(error = %e, request_id, reference = %reference, "database error after the payment was recorded: pending");
            Outcome::Pending { transaction: None }
        }
    };
    let holder = job.idem_hash.as_deref().is_some_and(|h| secrets_equal(h, &idem_hash));
    answer(signup, origin, &payment, outcome, holder, (!gateway_made || holder).then_some(idem.as_str()), request_id)
}

/// Steps 10-12 for a new claim. Refusals before any money can move release the claim and are
/// answered here (with "no charge applied"); after the record is `settling` the outcome decides.
async fn pay_new(app: &AppState, origin: &Origin, payment: &Payment, mut job: Job) -> Result<Result<Outcome, sqlx::Error>, ApiError> {
    let signup = &app.signup;
    let lease = signup.lease.as_millis() as i64;
    // Gives the claim back and answers `err` (nothing moved).
    let refuse = async |job: &Job, err: ApiError| -> Result<Result<Outcome, sqlx::Error>, ApiError> {
        match release(app, job, String::new()).await {
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, reference = %job.reference, "could not release a signup claim (the sweep will)"),
        }
        Err(err)
    };
    let refusal = |e: PayError| match e {
        PayError::Invalid { message, problem } => payment_error(signup, origin, "payment_invalid", message, problem),
        PayError::Failed(message) => payment_error(signup, origin, "payment_failed", message, None),
        PayError::Unavailable(message) => ApiError::new(502, "payment_unavailable").message(message).no_charge(),
    };
    match payment {
        #[cfg(feature = "x402")]
        Payment::X402(p) => {
            let Some(rail) = signup.x402_rail() else { return refuse(&job, ApiError::internal().no_charge()).await };
            let Some(chain) = rail.chain() else { return refuse(&job, ApiError::internal().no_charge()).await };
            // 10. Verify (moves no money).
            if let Err(e) = rail.verify(p).await {
                return refuse(&job, refusal(e)).await;
            }
            // 11. Record the payment before settling, with the chain's current block.
            let block = match chain.block_number().await {
                Ok(b) => b,
                Err(e) => {
                    let err = ApiError::new(502, "payment_unavailable").message(format!("Cannot settle now: {e}.")).no_charge();
                    return refuse(&job, err).await;
                }
            };
            let payload = p.payload().to_string();
            let record = SettlingRecord {
                payload: Some(&payload),
                valid_before: Some(p.authorization.valid_before_secs()),
                from_block: Some(block as i64),
            };
            match app.store.signup_settling(&job.reference, &job.token, record, lease).await {
                Ok(true) => {}
                Ok(false) => return Err(in_progress()),
                Err(e) => return refuse(&job, db_error(e, true)).await,
            }
            log_state(&job.reference, &job.rail, "settling", None);
            job.state = "settling".into();
            job.payload = Some(payload);
            job.from_block = Some(block as i64);
            // 12. Settle.
            Ok(settle_x402(app, rail, &job, p, false).await)
        }
        Payment::Mpp(p) => {
            let Some(rail) = signup.mpp_rail() else { return refuse(&job, ApiError::internal().no_charge()).await };
            match app.store.signup_settling(&job.reference, &job.token, SettlingRecord { payload: None, valid_before: None, from_block: None }, lease).await {
                Ok(true) => {}
                Ok(false) => return Err(in_progress()),
                Err(e) => return refuse(&job, db_error(e, true)).await,
            }
            log_state(&job.reference, &job.rail, "settling", None);
            job.state = "settling".into();
            // The method's verification takes the payment.
            match rail.pay(rail.realm(&origin.host), p).await {
                Ok(settled) => Ok(paid_and_mint(app, &job, settled).await),
                Err(PayError::Unavailable(message)) => {
                    // Not a refusal: whether the method took the money is unknown.
                    tracing::warn!(reference = %job.reference, error = %message, "MPP verification outcome unknown: pending");
                    Ok(to_pending(app, &job, None).await)
                }
                Err(e) => refuse(&job, refusal(e)).await,
            }
        }
    }
}

fn in_progress() -> ApiError {
    ApiError::new(409, "payment_in_progress").no_charge().header(header::RETRY_AFTER, IN_PROGRESS_RETRY_SECONDS)
}

/// The presented authorization is not the one recorded for its (payer, nonce).
#[cfg(feature = "x402")]
fn other_authorization(signup: &Signup, origin: &Origin) -> ApiError {
    payment_error(
        signup,
        origin,
        "payment_invalid",
        "This payer's nonce belongs to another authorization than the one presented.".into(),
        None,
    )
}

/// The answer for an outcome. `holder`: the request's Idempotency-Key is the recorded one (only
/// its holder is shown the key); `idem`: the Idempotency-Key a 202 tells the client to retry with.
fn answer(
    signup: &Signup,
    origin: &Origin,
    payment: &Payment,
    outcome: Outcome,
    holder: bool,
    idem: Option<&str>,
    request_id: &str,
) -> Result<Response, ApiError> {
    match outcome {
        Outcome::Minted { key, key_id, settled, name } if holder => {
            let scopes: Vec<String> = SIGNUP.scopes.iter().map(|s| s.to_string()).collect();
            let body = success_body(
                &key,
                &key_id,
                SIGNUP.balance_mcents,
                &scopes,
                name.as_deref(),
                payment.rail(),
                &settled.settled_ref,
                request_id,
            );
            let mut res = json_response(StatusCode::CREATED, &body);
            if !settled.response_header.is_empty() {
                set_header(res.headers_mut(), payment.response_header(), &settled.response_header);
            }
            Ok(res)
        }
        Outcome::Minted { key_id, .. } => Err(ApiError::new(409, "payment_already_used")
            .message("This payment already bought a key (for the request with another Idempotency-Key).")
            .no_charge()
            .extra("key_id", key_id)),
        Outcome::Pending { transaction } if payment.rail() == "x402" => {
            let mut err = ApiError::new(202, "payment_pending")
                .message("The payment was submitted but its outcome is not known yet; retry this request (same payment, same Idempotency-Key) to collect your key.")
                .extra("payment", json!({ "rail": "x402", "reference": payment.reference(), "state": "pending", "transaction": transaction }))
                .extra("retry_after_seconds", PENDING_RETRY_SECONDS)
                .header(header::RETRY_AFTER, PENDING_RETRY_SECONDS);
            if let Some(idem) = idem {
                err = err.extra("idempotency_key", idem);
            }
            Err(err)
        }
        Outcome::Pending { transaction } => Err(ApiError::new(502, "payment_unavailable")
            .message("The payment method failed and whether it took the payment is unknown; the payment is recorded as pending for the operator.")
            .extra("payment", json!({ "rail": payment.rail(), "reference": payment.reference(), "state": "pending", "transaction": transaction }))),
        Outcome::Released { message } => Err(payment_error(signup, origin, "payment_failed", message, None)),
        Outcome::AlreadyUsed { key_id: Some(key_id) } => Err(ApiError::new(409, "payment_already_used")
            .message("This payment already bought a key.")
            .no_charge()
            .extra("key_id", key_id)),
        Outcome::AlreadyUsed { key_id: None } | Outcome::Lost => Err(in_progress()),
    }
}

/// GET /v1/admin/payments?state=…&limit=N: the signup payment records, last changed first
/// (`X-Admin-Key` as the admin mint). Never a key, key hash, Idempotency-Key or signature.
pub async fn admin_payments(app: &AppState, headers: &HeaderMap, query: Option<&str>, request_id: &str) -> Result<Response, ApiError> {
    let Some(admin_key) = app.admin_key.as_deref().filter(|k| !k.is_empty()) else {
        return Err(ApiError::new(503, "admin_disabled"));
    };
    let provided = headers.get("x-admin-key").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).unwrap_or_default();
    if !secrets_equal(&provided, admin_key) {
        return Err(ApiError::new(401, "invalid_admin_key"));
    }
    let mut state: Option<&str> = None;
    let mut limit: i64 = 100;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "state" => match v {
                "all" => state = None,
                v if crate::store::SIGNUP_STATES.contains(&v) => state = Some(v),
                _ => {
                    return Err(ApiError::new(400, "invalid_input")
                        .message("state must be one of claimed, settling, pending, paid, done, released, all."));
                }
            },
            "limit" => {
                limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=500).contains(n) && (1..=3).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| ApiError::new(400, "invalid_input").message("limit must be an integer from 1 to 500."))?;
            }
            _ => {}
        }
    }
    let rows = app.store.list_signup_payments(state, limit).await.map_err(|e| db_error(e, false))?;
    Ok(json_response(StatusCode::OK, &json!({ "ok": true, "payments": rows, "request_id": request_id })))
}

#[allow(clippy::too_many_arguments)]
fn success_body(
    key: &str,
    key_id: &str,
    balance: i64,
    scopes: &[String],
    name: Option<&str>,
    rail: &str,
    reference: &str,
    request_id: &str,
) -> Value {
    json!({
        "ok": true,
        "key": key,
        "key_id": key_id,
        "balance_mcents": balance,
        "scopes": scopes,
        "name": name,
        "payment": { "rail": rail, "reference": reference },
        "request_id": request_id,
    })
}

/// Step 7: a payment that already bought a key. With the Idempotency-Key of the request that
/// minted it: the same body again (the key is derived, never stored) and `"replayed": true`;
/// otherwise 409 payment_already_used.
async fn replay(app: &AppState, payment: &Payment, record: SignupRecord, idem: Option<&str>, request_id: &str) -> Result<Response, ApiError> {
    let already_used = || {
        ApiError::new(409, "payment_already_used")
            .message("This payment already bought a key.")
            .no_charge()
            .extra("key_id", record.key_id.clone())
    };
    let (Some(idem), Some(stored)) = (idem, record.idem_hash.as_deref()) else { return Err(already_used()) };
    if !secrets_equal(&sha256_hex(idem), stored) {
        return Err(already_used());
    }
    let key = derived_key(app.signup.secret(), stored, payment.reference());
    // The key must still be the one minted (e.g. the key prefix has not changed since).
    let row = app.store.find_key(&sha256_hex(&key)).await.map_err(|e| db_error(e, true))?;
    if row.is_none_or(|r| r.key_id != record.key_id) {
        return Err(already_used());
    }
    let mut body = success_body(
        &key,
        &record.key_id,
        record.balance_mcents,
        &record.scope_list(),
        record.name.as_deref(),
        &record.rail,
        &record.settled_ref,
        request_id,
    );
    body["replayed"] = Value::Bool(true);
    let mut res = json_response(StatusCode::OK, &body);
    if let Some(h) = record.response_header.as_deref() {
        set_header(res.headers_mut(), payment.response_header(), h);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_key_is_hmac_sha256_with_the_server_secret() {
        // Independent check (Python): h = sha256(b"k"*32).hexdigest();
        // hmac.new(b"s"*32, b"mcpay-signup-v2:" + h.encode() + b":mpp:abc", sha256).hexdigest().
        let h = sha256_hex(&"k".repeat(32));
        let k = derived_key(&"s".repeat(32), &h, "mpp:abc");
        assert_eq!(k, format!("{}{}", GATEWAY.key_prefix, "71e214c26b8dab936db6dd9c32367da520b8cc0d1a0e1e1f643529961e98aaf5"));
        assert!(crate::keys::is_well_formed_key(&k));
        assert_ne!(derived_key(&"s".repeat(32), &h, "mpp:abd"), k);
        assert_ne!(derived_key(&"t".repeat(32), &h, "mpp:abc"), k, "depends on SIGNUP_SECRET");
    }

    #[test]
    fn gateway_made_idempotency_keys() {
        let a = new_idempotency_key();
        assert_eq!(a.len(), 43);
        assert!(valid_idempotency_key(&a));
        assert_ne!(a, new_idempotency_key());
    }

    #[test]
    fn idempotency_key_syntax() {
        assert!(valid_idempotency_key(&"a".repeat(32)));
        assert!(valid_idempotency_key(&"A_-9".repeat(32)));
        assert!(!valid_idempotency_key(&"a".repeat(31)));
        assert!(!valid_idempotency_key(&"a".repeat(129)));
        assert!(!valid_idempotency_key(&format!("{}!", "a".repeat(40))));
    }

    #[test]
    fn dollar_amounts() {
        assert_eq!(dollars(500_000), "$5.00");
        assert_eq!(dollars(100_000), "$1.00");
        assert_eq!(dollars(150_000), "$1.50");
        assert_eq!(dollars(123), "$0.00123");
    }
}
