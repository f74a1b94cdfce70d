//! POST /v1/signup: pay once (x402 or MPP), receive a prepaid key (docs/contract.md, 3.9).
//!
//! Order of checks: rails configured (503) → optional body and Idempotency-Key (415/413/400) →
//! at most one payment credential (400) → a credential for a configured rail (402 with the offer)
//! → the credential names this offer (402 payment_invalid) → the payment's claim, in one database
//! transaction shared by every instance: already used (200 replay / 409), in progress (409),
//! hourly signup budget (429) → verify → settle → mint the key and mark the payment used.
//! A failed verification or settlement gives the claim (and its budget slot) back.

pub mod mpp;
#[cfg(feature = "x402")]
pub mod x402;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::app::AppState;
use crate::body::{is_json_content_type, read_bounded};
use crate::config::SignupSettings;
use crate::generated::{GATEWAY, PROJECT_NAME, SIGNUP};
use crate::http::{ApiError, json_response, set_header};
use crate::keys::{generate_api_key, generate_key_id, secrets_equal, sha256_hex};
use crate::mint::parse_signup_input;
use crate::shape::MAX_JSON_DEPTH;
use crate::store::{ClaimOutcome, NewKey, SettleRecordOutcome, SettledPayment, SignupClaim, SignupMint, SignupRecord};

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
/// The derived-key domain: key = prefix + hex(HMAC-SHA256(Idempotency-Key, this + reference)).
const DERIVED_KEY_CONTEXT: &str = "mcpay-signup-v1:";

/// The signup rails of a running gateway. Each is `None` when not offered, `Some(Err(msg))`
/// when configured but missing a setting (the route answers 503 with `msg`).
pub struct Signup {
    pub x402: Option<Result<X402Rail, String>>,
    pub mpp: Option<Result<MppRail, String>>,
    /// Signups per rolling hour, gateway-wide (`[signup] signups_per_hour`).
    pub per_hour: u32,
}

impl std::fmt::Debug for Signup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signup").field("x402", &self.x402).field("mpp", &self.mpp).field("per_hour", &self.per_hour).finish()
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
            return Signup { x402: None, mpp: None, per_hour: SIGNUP.signups_per_hour };
        }
        let x402 = SIGNUP.x402.as_ref().map(|cfg| x402_from_settings(cfg, settings));
        let mpp = SIGNUP.mpp.as_ref().map(|cfg| MppRail::from_settings(cfg, settings));
        Signup { x402, mpp, per_hour: SIGNUP.signups_per_hour }
    }

    /// Rails built by hand (tests, or custom MPP methods).
    pub fn new(x402: Option<X402Rail>, mpp: Option<MppRail>) -> Signup {
        Signup { x402: x402.map(Ok), mpp: mpp.map(Ok), per_hour: SIGNUP.signups_per_hour }
    }

    /// Step 2: every configured rail has its settings.
    pub fn ready(&self) -> Result<(), String> {
        if let Some(Err(m)) = &self.x402 {
            return Err(m.clone());
        }
        if let Some(Err(m)) = &self.mpp {
            return Err(m.clone());
        }
        if self.x402.is_none() && self.mpp.is_none() {
            return Err("No signup payment rail is configured ([signup.x402] or [signup.mpp] in mcpay.toml).".into());
        }
        Ok(())
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

/// `hex(HMAC-SHA256(key: Idempotency-Key, message: "mcpay-signup-v1:" + reference))` with the key
/// prefix: the key a signup with an Idempotency-Key mints, so a retry can get it back while the
/// gateway stores only `sha256_hex(Idempotency-Key)`.
pub fn derived_key(idempotency_key: &str, reference: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(idempotency_key.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(DERIVED_KEY_CONTEXT.as_bytes());
    mac.update(reference.as_bytes());
    format!("{}{}", GATEWAY.key_prefix, hex::encode(mac.finalize().into_bytes()))
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
        Some(v) => Some(v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()).ok_or_else(|| {
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
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            ApiError::new(400, "invalid_input").message(format!("JSON nesting deeper than {MAX_JSON_DEPTH} levels.")).no_charge()
        } else {
            ApiError::new(400, "invalid_json").no_charge()
        }
    })?;
    parse_signup_input(&value)
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
    X402(x402::X402Payment),
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
            Payment::X402(rail.check(&value, v1).map_err(|m| payment_error(signup, &origin, "payment_invalid", m, None))?)
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
    let claim = SignupClaim { reference: &reference, rail: payment.rail(), token: request_id };
    // 7-9. Already used / in progress / hourly budget, and the claim.
    let settled = match app.store.claim_signup(claim, signup.per_hour).await.map_err(|e| db_error(e, true))? {
        ClaimOutcome::Done(record) => return replay(app, &payment, record, idem.as_deref(), request_id).await,
        ClaimOutcome::InProgress => {
            return Err(ApiError::new(409, "payment_in_progress")
                .no_charge()
                .header(header::RETRY_AFTER, IN_PROGRESS_RETRY_SECONDS));
        }
        ClaimOutcome::Limited { retry_after_seconds } => {
            return Err(ApiError::new(429, "rate_limited")
                .message(format!("Signup limit of {} per hour reached.", signup.per_hour))
                .no_charge()
                .extra("retry_after_seconds", retry_after_seconds)
                .header(header::RETRY_AFTER, retry_after_seconds));
        }
        ClaimOutcome::Resumed(SettledPayment { settled_ref, response_header }) => {
            tracing::warn!(request_id, reference = %reference, "resuming a settled signup whose key was never minted");
            Settled { receipt_key: String::new(), settled_ref, response_header: response_header.unwrap_or_default() }
        }
        ClaimOutcome::Claimed => {
            // 10-11. Verify, settle.
            let paid = pay(signup, origin, &payment).await;
            let settled = match paid {
                Ok(s) => s,
                Err(e) => {
                    if let Err(db) = app.store.release_signup(&reference, request_id).await {
                        tracing::error!(error = %db, reference = %reference, "could not release a signup claim");
                    }
                    return Err(match e {
                        PayError::Invalid { message, problem } => payment_error(signup, origin, "payment_invalid", message, problem),
                        PayError::Failed(message) => payment_error(signup, origin, "payment_failed", message, None),
                        PayError::Unavailable(message) => {
                            ApiError::new(502, "payment_unavailable").message(message).no_charge()
                        }
                    });
                }
            };
            let recorded = app
                .store
                .record_signup_settled(&reference, request_id, &settled.receipt_key, &settled.settled_ref, Some(&settled.response_header))
                .await;
            match recorded {
                Ok(SettleRecordOutcome::Recorded) => settled,
                Ok(SettleRecordOutcome::AlreadyUsed { key_id: Some(key_id) }) => {
                    return Err(ApiError::new(409, "payment_already_used")
                        .message("This payment already bought a key.")
                        .no_charge()
                        .extra("key_id", key_id));
                }
                Ok(SettleRecordOutcome::AlreadyUsed { key_id: None }) => {
                    return Err(ApiError::new(409, "payment_in_progress")
                        .no_charge()
                        .header(header::RETRY_AFTER, IN_PROGRESS_RETRY_SECONDS));
                }
                Ok(SettleRecordOutcome::Lost) => {
                    tracing::error!(request_id, reference = %reference, "signup claim lost after settlement");
                    return Err(ApiError::internal());
                }
                Err(e) => {
                    tracing::error!(error = %e, request_id, reference = %reference, settled = %settled.settled_ref,
                        "settled signup payment not recorded; the payer can present it again");
                    return Err(ApiError::internal());
                }
            }
        }
    };
    // 12. Mint.
    let key = match idem.as_deref() {
        Some(k) => derived_key(k, &reference),
        None => generate_api_key(),
    };
    let key_id = generate_key_id();
    let key_hash = sha256_hex(&key);
    let idem_hash = idem.as_deref().map(sha256_hex);
    let scopes: Vec<String> = SIGNUP.scopes.iter().map(|s| s.to_string()).collect();
    let mint = SignupMint {
        key: NewKey {
            key_hash: &key_hash,
            key_id: &key_id,
            name: name.as_deref(),
            balance_mcents: SIGNUP.balance_mcents,
            scopes: &scopes,
            request_id,
        },
        idem_hash: idem_hash.as_deref(),
    };
    match app.store.finish_signup(&reference, request_id, &mint).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::error!(request_id, reference = %reference, "signup claim lost before minting");
            return Err(ApiError::internal());
        }
        Err(e) => {
            tracing::error!(error = %e, request_id, reference = %reference,
                "settled signup payment without a key; the payer can present it again");
            return Err(ApiError::internal());
        }
    }
    tracing::info!(request_id, key_id = %key_id, rail = payment.rail(), payment = %settled.settled_ref, "signup: key minted");
    let body = success_body(&key, &key_id, SIGNUP.balance_mcents, &scopes, name.as_deref(), payment.rail(), &settled.settled_ref, request_id);
    let mut res = json_response(StatusCode::CREATED, &body);
    set_header(res.headers_mut(), payment.response_header(), &settled.response_header);
    Ok(res)
}

async fn pay(signup: &Signup, origin: &Origin, payment: &Payment) -> Result<Settled, PayError> {
    match payment {
        #[cfg(feature = "x402")]
        Payment::X402(p) => {
            let rail = signup.x402_rail().ok_or_else(|| PayError::Unavailable("x402 rail not configured".into()))?;
            rail.verify(p).await?;
            rail.settle(p).await
        }
        Payment::Mpp(p) => {
            let rail = signup.mpp_rail().ok_or_else(|| PayError::Unavailable("MPP rail not configured".into()))?;
            rail.pay(rail.realm(&origin.host), p).await
        }
    }
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
    let key = derived_key(idem, payment.reference());
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
    fn derived_key_is_hmac_sha256_of_the_reference() {
        // Independent check: Python's hmac.new(b"k"*32, b"mcpay-signup-v1:mpp:abc", sha256).hexdigest().
        let k = derived_key(&"k".repeat(32), "mpp:abc");
        assert_eq!(k, format!("{}{}", GATEWAY.key_prefix, "69cf288fbd789c272c98c39c6a709367d7dba0a97e70f6a43c6c30541e1e2119"));
        assert!(crate::keys::is_well_formed_key(&k));
        assert_ne!(derived_key(&"k".repeat(32), "mpp:abd"), k);
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
