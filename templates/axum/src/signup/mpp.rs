//! The MPP rail of POST /v1/signup ([signup.mpp]): `charge` challenges whose ids are
//! HMAC-SHA256-bound with MPP_SECRET_KEY, `Authorization: Payment` credentials, and the payment
//! methods' own verification — all through the official `mpp` crate. The methods are injected
//! (`Vec<Arc<dyn SignupMethod>>`): tempo/charge and stripe/charge come from the crate behind the
//! Cargo features `tempo` and `stripe`; any other [`mpp::ChargeMethod`] can be wrapped in
//! [`Method`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use mpp::protocol::core::{
    Base64UrlJson, PaymentChallenge, PaymentCredential, Receipt, compute_challenge_id_with_header, format_receipt,
    format_www_authenticate, parse_authorization,
};
use mpp::protocol::intents::ChargeRequest;
use mpp::protocol::traits::{ChargeMethod, VerificationError};
use mpp::server::Mpp;
use mpp::{CORE_PROBLEM_TYPE_BASE, MppError};
use subtle::ConstantTimeEq;

use crate::config::SignupSettings;
use crate::generated::{SIGNUP, SignupMppConfig};

use super::{PayError, Settled};

/// The crate's minimum (and the worker's): MPP_SECRET_KEY must have at least 32 bytes.
pub const MIN_SECRET_BYTES: usize = 32;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One MPP payment method offered at signup, as a trait object.
pub trait SignupMethod: Send + Sync {
    /// The method name in challenges and credentials ("tempo", "stripe", …).
    fn name(&self) -> &str;
    /// The charge request offered (and required) for one signup: amount, currency, recipient.
    fn request(&self) -> &ChargeRequest;
    /// Accepts a credential for [`SignupMethod::request`]: the crate's server verification
    /// (challenge HMAC, expiry, realm, the request's amount / currency / recipient), then the
    /// method's own verification and settlement. A receipt means paid.
    fn accept<'a>(
        &'a self,
        realm: &'a str,
        secret: &'a str,
        credential: &'a PaymentCredential,
    ) -> BoxFuture<'a, Result<Receipt, VerificationError>>;
}

/// Any [`ChargeMethod`] of the `mpp` crate (or of your own) as a signup method.
pub struct Method<M> {
    method: M,
    request: ChargeRequest,
}

impl<M: ChargeMethod + 'static> Method<M> {
    pub fn new(method: M, request: ChargeRequest) -> Self {
        Method { method, request }
    }
}

impl<M: ChargeMethod + 'static> SignupMethod for Method<M> {
    fn name(&self) -> &str {
        self.method.method()
    }

    fn request(&self) -> &ChargeRequest {
        &self.request
    }

    fn accept<'a>(
        &'a self,
        realm: &'a str,
        secret: &'a str,
        credential: &'a PaymentCredential,
    ) -> BoxFuture<'a, Result<Receipt, VerificationError>> {
        Box::pin(async move {
            let server = Mpp::new(self.method.clone(), realm, secret);
            server.broadcast_credential_with_expected_request(credential, &self.request).await
        })
    }
}

/// The MPP rail: the secret that binds challenge ids and the methods offered.
pub struct MppRail {
    secret: String,
    methods: Vec<Arc<dyn SignupMethod>>,
    /// `[signup.mpp] realm`; empty: the host the request came to.
    realm: String,
    ttl_seconds: u64,
}

impl std::fmt::Debug for MppRail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.methods.iter().map(|m| m.name()).collect();
        f.debug_struct("MppRail").field("methods", &names).field("realm", &self.realm).finish()
    }
}

/// A credential that names this offer (step 6 of the contract), not yet verified.
pub struct MppPayment {
    /// "mpp:<challenge id>".
    pub reference: String,
    method: Arc<dyn SignupMethod>,
    credential: PaymentCredential,
}

/// A refused credential: the contract's message and the MPP problem type.
#[derive(Debug)]
pub struct MppRefusal {
    pub message: String,
    pub problem: String,
}

impl From<MppError> for MppRefusal {
    fn from(e: MppError) -> Self {
        let suffix = e.problem_type_suffix().unwrap_or("verification-failed");
        MppRefusal { message: e.to_string(), problem: format!("{CORE_PROBLEM_TYPE_BASE}/{suffix}") }
    }
}

impl MppRail {
    /// A rail offering `methods` with challenge ids bound by `secret` (≥ 32 bytes).
    pub fn new(secret: &str, methods: Vec<Arc<dyn SignupMethod>>) -> Result<MppRail, String> {
        let cfg = SIGNUP.mpp.unwrap_or(SignupMppConfig { methods: &[], realm: "", challenge_ttl_seconds: 300 });
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "MPP_SECRET_KEY must be at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -base64 32`)."
            ));
        }
        if methods.is_empty() {
            return Err("[signup.mpp] offers no payment method.".into());
        }
        Ok(MppRail { secret: secret.to_string(), methods, realm: cfg.realm.to_string(), ttl_seconds: cfg.challenge_ttl_seconds })
    }

    /// The rail described by `[signup.mpp]` and the environment.
    pub fn from_settings(cfg: &SignupMppConfig, settings: &SignupSettings) -> Result<MppRail, String> {
        // The methods' HTTP clients (Stripe API, Tempo RPC) need the process-wide TLS provider.
        super::install_tls_provider();
        let mut methods: Vec<Arc<dyn SignupMethod>> = Vec::new();
        for name in cfg.methods {
            methods.push(method_from_settings(name, settings)?);
        }
        let Some(secret) = settings.mpp_secret_key.as_deref() else {
            return Err(format!(
                "The MPP rail needs the MPP_SECRET_KEY secret (at least {MIN_SECRET_BYTES} bytes, e.g. `openssl rand -base64 32`)."
            ));
        };
        MppRail::new(secret, methods)
    }

    pub fn methods(&self) -> impl Iterator<Item = &Arc<dyn SignupMethod>> {
        self.methods.iter()
    }

    /// The realm of a request to `host`.
    pub fn realm<'a>(&'a self, host: &'a str) -> &'a str {
        if self.realm.is_empty() { host } else { &self.realm }
    }

    /// Fresh challenges, one `WWW-Authenticate: Payment …` value per method.
    pub fn challenges(&self, realm: &str, description: &str) -> Vec<String> {
        let expires = mpp::expires::seconds(self.ttl_seconds);
        self.methods
            .iter()
            .filter_map(|m| {
                let request = Base64UrlJson::from_typed(m.request()).ok()?;
                let challenge = PaymentChallenge::with_secret_key_full(
                    &self.secret,
                    realm,
                    m.name(),
                    "charge",
                    request,
                    Some(&expires),
                    None,
                    Some(description),
                    None,
                    None,
                );
                format_www_authenticate(&challenge).ok()
            })
            .collect()
    }

    /// Step 6: the credential decodes, its challenge was issued by this server for this realm
    /// (HMAC over the echoed challenge, compared in constant time), has not expired, and names
    /// one of the offered methods with the offered request. Nothing is looked up or written.
    pub fn check(&self, realm: &str, authorization: &str) -> Result<MppPayment, MppRefusal> {
        let credential = parse_authorization(authorization)?;
        let echo = &credential.challenge;
        let expected_id = compute_challenge_id_with_header(
            &self.secret,
            realm,
            echo.method.as_str(),
            echo.intent.as_str(),
            echo.request.raw(),
            echo.expires.as_deref(),
            echo.digest.as_deref(),
            echo.opaque.as_ref().map(|o| o.raw()),
            echo.header.as_deref(),
        );
        let issued: bool = expected_id.as_bytes().ct_eq(echo.id.as_bytes()).into();
        if !issued || echo.realm != realm {
            return Err(MppError::invalid_challenge_reason("The challenge was not issued by this server for this realm.").into());
        }
        mpp::expires::assert(echo.expires.as_deref(), Some(&echo.id))?;
        if !echo.intent.is_charge() {
            return Err(MppError::invalid_challenge_reason("Only the charge intent is offered here.").into());
        }
        let Some(method) = self.methods.iter().find(|m| m.name() == echo.method.as_str()) else {
            return Err(MppError::invalid_challenge_reason("The challenge names a payment method this signup does not offer.").into());
        };
        let request: ChargeRequest = echo
            .request
            .decode()
            .map_err(|_| MppError::invalid_challenge_reason("The challenge request does not decode."))?;
        let offered = method.request();
        if request.amount != offered.amount || request.currency != offered.currency || request.recipient != offered.recipient {
            return Err(MppError::invalid_challenge_reason("The challenge is not for this signup's price.").into());
        }
        Ok(MppPayment { reference: format!("mpp:{}", echo.id), method: method.clone(), credential })
    }

    /// Steps 10-11: the method verifies (and settles) the payment.
    pub async fn pay(&self, realm: &str, p: &MppPayment) -> Result<Settled, PayError> {
        let receipt = p.method.accept(realm, &self.secret, &p.credential).await.map_err(|e| {
            let err = MppError::from(e);
            if err.problem_type_suffix().is_none() {
                // Retryable, network or internal failures: nothing was accepted.
                PayError::Unavailable(err.to_string())
            } else {
                let refusal = MppRefusal::from(err);
                PayError::Invalid { message: refusal.message, problem: Some(refusal.problem) }
            }
        })?;
        if !receipt.is_success() || receipt.reference.is_empty() {
            return Err(PayError::Invalid {
                message: "The payment method returned no successful receipt.".into(),
                problem: Some(format!("{CORE_PROBLEM_TYPE_BASE}/verification-failed")),
            });
        }
        let header = format_receipt(&receipt).map_err(|e| PayError::Unavailable(e.to_string()))?;
        Ok(Settled {
            receipt_key: format!("mpp:{}:{}", p.method.name(), receipt.reference),
            settled_ref: receipt.reference,
            response_header: header,
        })
    }
}

/// One signup's price in the base units of a token with `decimals` decimals (1 mcent = $0.00001).
pub fn dollar_base_units(price_mcents: i64, decimals: u32) -> String {
    if decimals >= 5 {
        format!("{}{}", price_mcents, "0".repeat((decimals - 5) as usize))
    } else {
        let unit = 10i64.pow(5 - decimals);
        ((price_mcents + unit - 1) / unit).to_string()
    }
}

fn method_from_settings(name: &str, settings: &SignupSettings) -> Result<Arc<dyn SignupMethod>, String> {
    match name {
        "tempo/charge" => tempo_method(settings),
        "stripe/charge" => stripe_method(settings),
        other => Err(format!("[signup.mpp] method {other:?} is not supported here (use tempo/charge or stripe/charge).")),
    }
}

#[cfg(feature = "tempo")]
fn tempo_method(settings: &SignupSettings) -> Result<Arc<dyn SignupMethod>, String> {
    use mpp::protocol::methods::tempo as t;
    let Some(recipient) = settings.tempo_recipient.as_deref() else {
        return Err("MPP tempo/charge needs the TEMPO_RECIPIENT setting (your 0x address on Tempo).".into());
    };
    if !is_evm_address(recipient) {
        return Err(format!("TEMPO_RECIPIENT={recipient:?} is not a 0x address (40 hex digits)."));
    }
    let rpc_url = settings.tempo_rpc_url.clone().unwrap_or_else(|| t::DEFAULT_RPC_URL.to_string());
    let provider = mpp::server::tempo_provider(&rpc_url).map_err(|e| format!("TEMPO_RPC_URL: {e}"))?;
    // The chain the RPC serves (the crate's own rule: Moderato testnet when the URL says so).
    let testnet = rpc_url.contains("moderato");
    let chain_id = if testnet { t::MODERATO_CHAIN_ID } else { t::CHAIN_ID };
    let default_currency = if testnet { t::DEFAULT_CURRENCY_TESTNET } else { t::DEFAULT_CURRENCY_MAINNET };
    let currency = settings.tempo_currency.clone().unwrap_or_else(|| default_currency.to_string());
    if !is_evm_address(&currency) {
        return Err(format!("TEMPO_CURRENCY={currency:?} is not a token address (0x + 40 hex digits)."));
    }
    let method = mpp::server::TempoChargeMethod::new(provider).with_store(Arc::new(mpp::MemoryStore::new()));
    let request = ChargeRequest {
        amount: dollar_base_units(SIGNUP.price_mcents, 6),
        currency,
        recipient: Some(recipient.to_string()),
        method_details: Some(serde_json::json!({ "chainId": chain_id })),
        ..Default::default()
    };
    Ok(Arc::new(Method::new(method, request)))
}

#[cfg(not(feature = "tempo"))]
fn tempo_method(_: &SignupSettings) -> Result<Arc<dyn SignupMethod>, String> {
    Err("MPP tempo/charge needs the `tempo` Cargo feature: build with `cargo build --release --features tempo` (then set TEMPO_RECIPIENT).".into())
}

#[cfg(feature = "stripe")]
fn stripe_method(settings: &SignupSettings) -> Result<Arc<dyn SignupMethod>, String> {
    let (Some(secret_key), Some(network_id)) = (settings.stripe_secret_key.as_deref(), settings.stripe_network_id.as_deref()) else {
        return Err("MPP stripe/charge needs the STRIPE_SECRET_KEY and STRIPE_NETWORK_ID settings.".into());
    };
    let types = vec!["card".to_string()];
    let details = mpp::server::StripeMethodDetails {
        network_id: network_id.to_string(),
        payment_method_types: types.clone(),
        metadata: None,
    };
    let method = mpp::server::StripeChargeMethod::new(secret_key, network_id, types);
    let request = ChargeRequest {
        // Whole cents, rounded up.
        amount: ((SIGNUP.price_mcents + 999) / 1000).to_string(),
        currency: "usd".into(),
        method_details: Some(serde_json::to_value(details).map_err(|e| e.to_string())?),
        ..Default::default()
    };
    Ok(Arc::new(Method::new(method, request)))
}

#[cfg(not(feature = "stripe"))]
fn stripe_method(_: &SignupSettings) -> Result<Arc<dyn SignupMethod>, String> {
    Err("MPP stripe/charge needs the `stripe` Cargo feature: build with `cargo build --release --features stripe` (then set STRIPE_SECRET_KEY and STRIPE_NETWORK_ID).".into())
}

#[cfg(feature = "tempo")]
fn is_evm_address(s: &str) -> bool {
    s.len() == 42 && s.starts_with("0x") && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cross-SDK vector published with the protocol (mpp.md / mpp-tools conformance).
    #[test]
    fn challenge_id_vector() {
        let request = Base64UrlJson::from_value(&serde_json::json!({
            "amount": "100", "currency": "0xabc", "recipient": "0xdef"
        }))
        .unwrap();
        let id = mpp::compute_challenge_id(
            "secret-key",
            "api.example.com",
            "tempo",
            "charge",
            request.raw(),
            Some("2099-01-01T00:00:00Z"),
            None,
            None,
        );
        assert_eq!(id, "Ip25HCkqcMaW6FT_ziOG9BT58-7_KEwkzhdUwX8tmI8");
    }

    #[test]
    fn base_units() {
        // 1 mcent = $0.00001: 6 decimals (USDC) → 10 base units per mcent.
        assert_eq!(dollar_base_units(500_000, 6), "5000000");
        assert_eq!(dollar_base_units(1, 6), "10");
        assert_eq!(dollar_base_units(123, 5), "123");
        assert_eq!(dollar_base_units(1, 18), "10000000000000");
        // Fewer decimals round up.
        assert_eq!(dollar_base_units(1001, 2), "2");
    }

    #[test]
    fn missing_settings_are_named() {
        let none = SignupSettings::default();
        let cfg = SignupMppConfig { methods: &["tempo/charge"], realm: "", challenge_ttl_seconds: 300 };
        let err = MppRail::from_settings(&cfg, &none).unwrap_err();
        if cfg!(feature = "tempo") {
            assert!(err.contains("TEMPO_RECIPIENT"), "{err}");
        } else {
            assert!(err.contains("--features tempo"), "{err}");
        }
        let cfg = SignupMppConfig { methods: &["stripe/charge"], realm: "", challenge_ttl_seconds: 300 };
        let err = MppRail::from_settings(&cfg, &none).unwrap_err();
        if cfg!(feature = "stripe") {
            assert!(err.contains("STRIPE_SECRET_KEY"), "{err}");
        } else {
            assert!(err.contains("--features stripe"), "{err}");
        }
        let cfg = SignupMppConfig { methods: &[], realm: "", challenge_ttl_seconds: 300 };
        assert!(MppRail::from_settings(&cfg, &none).unwrap_err().contains("MPP_SECRET_KEY"));
        let short = SignupSettings { mpp_secret_key: Some("short".into()), ..Default::default() };
        assert!(MppRail::from_settings(&cfg, &short).unwrap_err().contains("32 bytes"));
    }

    /// With the features on, the crate's methods are built from the settings and offered with
    /// the signup's price (checked with `cargo test --features tempo,stripe`).
    #[cfg(all(feature = "tempo", feature = "stripe"))]
    #[test]
    fn configured_methods_offer_the_price() {
        let settings = SignupSettings {
            mpp_secret_key: Some("s".repeat(32)),
            tempo_recipient: Some(format!("0x{}", "1".repeat(40))),
            stripe_secret_key: Some("sk_test_x".into()),
            stripe_network_id: Some("net".into()),
            ..Default::default()
        };
        let cfg = SignupMppConfig { methods: &["tempo/charge", "stripe/charge"], realm: "", challenge_ttl_seconds: 300 };
        let rail = MppRail::from_settings(&cfg, &settings).unwrap();
        let names: Vec<&str> = rail.methods().map(|m| m.name()).collect();
        assert_eq!(names, ["tempo", "stripe"]);
        let tempo = rail.methods().next().unwrap().request().clone();
        assert_eq!(tempo.amount, dollar_base_units(SIGNUP.price_mcents, 6));
        assert_eq!(tempo.recipient.as_deref(), Some(settings.tempo_recipient.as_deref().unwrap()));
        assert_eq!(tempo.method_details.unwrap()["chainId"], mpp::protocol::methods::tempo::CHAIN_ID);
        let stripe = rail.methods().nth(1).unwrap().request().clone();
        assert_eq!(stripe.amount, ((SIGNUP.price_mcents + 999) / 1000).to_string());
        assert_eq!(stripe.currency, "usd");
        let challenges = rail.challenges("api.example.com", "Sign up");
        assert_eq!(challenges.len(), 2);
        for c in challenges {
            let c = mpp::parse_www_authenticate(&c).unwrap();
            assert!(c.verify(&"s".repeat(32)));
            assert_eq!(c.realm, "api.example.com");
        }
    }
}
