//! The x402 rail of POST /v1/signup ([signup.x402]): protocol v2 (`PAYMENT-REQUIRED`,
//! `PAYMENT-SIGNATURE`, `PAYMENT-RESPONSE`; v1's `X-PAYMENT` accepted), scheme `exact` on an EVM
//! network (EIP-3009), verified and settled by the facilitator over HTTPS
//! (`POST {url}/verify`, `POST {url}/settle`). Wire types from the `x402-types` crate.
//!
//! The signature of the EIP-3009 authorization is checked here first, locally (step 7): a forged
//! payment is refused before any payment record is read. A settlement whose outcome the
//! facilitator did not tell us is resolved from the chain ([`super::chain`], X402_RPC_URL).

use std::time::Duration;

use alloy_primitives::Address;
use alloy_sol_types::Eip712Domain;
use serde::Serialize;
use serde_json::{Value, json};
use x402_types::chain::ChainId;
use x402_types::proto::{v1, v2};
use x402_types::util::Base64Bytes;

use crate::config::{SignupSettings, redact_url};
use crate::generated::SignupX402Config;

use super::chain::{Authorization, Chain, eip155_chain_id, token_domain};
use super::{PayError, Settled};

/// The default bound of one facilitator call (X402_FACILITATOR_TIMEOUT_MS). Settlement sends a
/// transaction and waits for its receipt; an answer later than this is an unknown outcome.
pub const DEFAULT_FACILITATOR_TIMEOUT: Duration = Duration::from_secs(60);

/// The rail: the offered requirement, the facilitator and the HTTP client that reaches it.
pub struct X402Rail {
    cfg: SignupX402Config,
    facilitator: String,
    pay_to: String,
    requirement: Value,
    client: reqwest::Client,
    /// `Authorization` sent to the facilitator (X402_FACILITATOR_AUTHORIZATION), if any.
    authorization: Option<reqwest::header::HeaderValue>,
    /// The bound of one facilitator call.
    timeout: Duration,
    /// The chain (X402_RPC_URL / `[signup.x402] rpc_url`); None: the rail is not ready.
    chain: Option<Chain>,
    /// The token contract and its EIP-712 domain (what a payer signs).
    asset: Address,
    domain: Eip712Domain,
}

impl std::fmt::Debug for X402Rail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X402Rail")
            .field("facilitator", &redact_url(&self.facilitator))
            .field("pay_to", &self.pay_to)
            .field("authorization", &self.authorization.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .field("chain", &self.chain)
            .finish()
    }
}

/// The one requirement this gateway offers, serialized in the key order every target uses
/// (a client echoes it verbatim in `accepted`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Requirement<'a> {
    scheme: &'a str,
    network: &'a str,
    amount: &'a str,
    asset: &'a str,
    pay_to: &'a str,
    max_timeout_seconds: u64,
    extra: RequirementExtra<'a>,
}

#[derive(Serialize)]
struct RequirementExtra<'a> {
    name: &'a str,
    version: &'a str,
}

/// A credential that names this offer (step 6 of the contract), not yet verified.
#[derive(Debug)]
pub struct X402Payment {
    /// "x402:<network>:<asset>:<from>:<nonce>", lowercase.
    pub reference: String,
    /// Sent with `X-PAYMENT` (v1): answered with `X-PAYMENT-RESPONSE`.
    pub v1: bool,
    payer: String,
    /// The v2 PaymentPayload sent to the facilitator (a v1 payload converted).
    payload: Value,
    /// Its EIP-3009 authorization, whose signature was checked.
    pub authorization: Authorization,
}

impl X402Payment {
    /// The payment payload, as recorded before settling.
    pub fn payload(&self) -> &Value {
        &self.payload
    }

    /// True when `recorded` (a payload recorded for this payment's reference) holds the same
    /// authorization.
    pub fn same_authorization(&self, recorded: &str) -> bool {
        serde_json::from_str::<Value>(recorded)
            .ok()
            .and_then(|v| Authorization::parse(&v["payload"]["authorization"]).ok())
            .is_some_and(|a| a == self.authorization)
    }
}

/// What `/settle` told us.
#[derive(Debug)]
pub enum SettleOutcome {
    /// `success: true` with the transaction.
    Settled(Settled),
    /// A definite refusal (`success: false`, other than `settlement_pending`): the reason.
    Refused(String),
    /// Anything else: `settlement_pending`, a 5xx, a reset, a timeout, a malformed answer. The
    /// money may have moved; the transaction hash when the facilitator gave one.
    Unknown { transaction: Option<String>, reason: String },
}

/// The bound of one chain JSON-RPC call.
const RPC_TIMEOUT: Duration = Duration::from_secs(15);

fn is_hex(s: &str, digits: usize) -> bool {
    s.len() == digits + 2 && s.starts_with("0x") && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_url(url: &str) -> bool {
    (url.starts_with("https://") || url.starts_with("http://")) && url.len() > 8 && !url.contains(char::is_whitespace)
}

impl X402Rail {
    /// A rail for `[signup.x402]` with this facilitator and payee.
    pub fn new(cfg: &SignupX402Config, facilitator_url: &str, pay_to: &str) -> Result<X402Rail, String> {
        if !valid_url(facilitator_url) {
            return Err(format!(
                "The x402 facilitator URL {facilitator_url:?} is not an http(s) URL: set X402_FACILITATOR_URL or [signup.x402] facilitator_url."
            ));
        }
        if !is_hex(pay_to, 40) {
            return Err(format!(
                "The x402 payee {pay_to:?} is not a 0x address (40 hex digits): set X402_PAY_TO or [signup.x402] pay_to."
            ));
        }
        let requirement = serde_json::to_value(Requirement {
            scheme: "exact",
            network: cfg.network,
            amount: cfg.amount,
            asset: cfg.asset,
            pay_to,
            max_timeout_seconds: cfg.max_timeout_seconds,
            extra: RequirementExtra { name: cfg.asset_name, version: cfg.asset_version },
        })
        .map_err(|e| e.to_string())?;
        // The requirement must be a valid x402 v2 PaymentRequirements (CAIP-2 network, …).
        serde_json::from_value::<v2::PaymentRequirements>(requirement.clone())
            .map_err(|e| format!("[signup.x402] does not make a valid x402 requirement: {e}"))?;
        let chain_id = eip155_chain_id(cfg.network)
            .ok_or_else(|| format!("[signup.x402] network {:?} is not an EVM network (eip155:<chain id>).", cfg.network))?;
        let asset: Address = cfg.asset.parse().map_err(|_| format!("[signup.x402] asset {:?} is not a 0x address.", cfg.asset))?;
        let client = super::http_client().map_err(|e| format!("HTTPS client for the x402 facilitator: {e}"))?;
        let rail = X402Rail {
            cfg: *cfg,
            facilitator: facilitator_url.trim_end_matches('/').to_string(),
            pay_to: pay_to.to_string(),
            requirement,
            client,
            authorization: None,
            timeout: DEFAULT_FACILITATOR_TIMEOUT,
            chain: None,
            asset,
            domain: token_domain(cfg.asset_name, cfg.asset_version, chain_id, asset),
        };
        if cfg.rpc_url.is_empty() { Ok(rail) } else { rail.with_rpc_url(cfg.rpc_url) }
    }

    /// The same rail, resolving unknown settlements through this EVM JSON-RPC endpoint.
    pub fn with_rpc_url(mut self, rpc_url: &str) -> Result<X402Rail, String> {
        if !valid_url(rpc_url) {
            return Err("X402_RPC_URL (or [signup.x402] rpc_url) is not an http(s) URL of the network's JSON-RPC endpoint.".into());
        }
        self.chain = Some(Chain::new(self.client.clone(), rpc_url, RPC_TIMEOUT));
        Ok(self)
    }

    /// The same rail, bounding each facilitator call by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> X402Rail {
        self.timeout = timeout;
        self
    }

    /// Step 2: what the rail still needs (the chain's JSON-RPC endpoint).
    pub fn ready(&self) -> Result<(), String> {
        match self.chain {
            Some(_) => Ok(()),
            None => Err("The x402 rail needs the network's JSON-RPC endpoint to resolve settlements: set X402_RPC_URL or [signup.x402] rpc_url.".into()),
        }
    }

    /// The chain (set when [`X402Rail::ready`]).
    pub fn chain(&self) -> Option<&Chain> {
        self.chain.as_ref()
    }

    /// The token contract.
    pub fn asset(&self) -> Address {
        self.asset
    }

    /// The facilitator call bound.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A recorded payload (see [`X402Payment::payload`]) as a payment to resolve or settle again.
    pub fn recorded(&self, reference: &str, payload: &str) -> Result<X402Payment, String> {
        let payload: Value = serde_json::from_str(payload).map_err(|e| format!("recorded payload: {e}"))?;
        let authorization = Authorization::parse(&payload["payload"]["authorization"])?;
        Ok(X402Payment { reference: reference.to_string(), v1: false, payer: format!("{:#x}", authorization.from), payload, authorization })
    }

    /// The PAYMENT-RESPONSE of a settlement found on the chain (the facilitator's answer was lost).
    pub fn settled_on_chain(&self, p: &X402Payment, transaction: &str) -> Settled {
        let body = json!({ "success": true, "transaction": transaction, "network": self.cfg.network, "payer": p.payer });
        Settled {
            receipt_key: format!("x402:{}:{}", self.cfg.network, transaction).to_lowercase(),
            settled_ref: transaction.to_string(),
            response_header: String::from_utf8(Base64Bytes::encode(body.to_string()).0.into_owned()).unwrap_or_default(),
        }
    }

    /// The same rail, sending `authorization` as the `Authorization` header of every facilitator
    /// call (a facilitator that takes a static credential). Refused when it is not a valid header
    /// value.
    pub fn with_authorization(mut self, authorization: &str) -> Result<X402Rail, String> {
        let mut value = reqwest::header::HeaderValue::from_str(authorization.trim())
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or("X402_FACILITATOR_AUTHORIZATION is not a valid HTTP header value (one line of visible ASCII, e.g. `Bearer …`).")?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    /// The rail described by `[signup.x402]` and the environment (X402_FACILITATOR_URL and
    /// X402_PAY_TO override the manifest; X402_FACILITATOR_AUTHORIZATION is sent to the
    /// facilitator).
    pub fn from_settings(cfg: &SignupX402Config, settings: &SignupSettings) -> Result<X402Rail, String> {
        let url = settings.x402_facilitator_url.as_deref().unwrap_or(cfg.facilitator_url);
        let pay_to = settings.x402_pay_to.as_deref().unwrap_or(cfg.pay_to);
        if pay_to.is_empty() {
            return Err("The x402 rail needs a payee: set the X402_PAY_TO secret (your 0x address) or [signup.x402] pay_to.".into());
        }
        let mut rail = X402Rail::new(cfg, url, pay_to)?;
        if let Some(ms) = settings.x402_facilitator_timeout_ms.as_deref() {
            let ms: u64 = ms.parse().ok().filter(|ms| (1..=600_000).contains(ms)).ok_or_else(|| {
                format!("X402_FACILITATOR_TIMEOUT_MS={ms:?} must be a number of milliseconds from 1 to 600000 (default 60000).")
            })?;
            rail = rail.with_timeout(Duration::from_millis(ms));
        }
        if let Some(rpc) = settings.x402_rpc_url.as_deref() {
            rail = rail.with_rpc_url(rpc)?;
        }
        rail.ready()?;
        match settings.x402_facilitator_authorization.as_deref() {
            Some(auth) => rail.with_authorization(auth),
            None => Ok(rail),
        }
    }

    /// The offered requirement (`accepts[0]`).
    pub fn requirement(&self) -> &Value {
        &self.requirement
    }

    /// The PaymentRequired (v2) of a 402 for `resource`, and its `PAYMENT-REQUIRED` header value
    /// (standard base64 with padding of the JSON).
    pub fn payment_required(&self, resource: &Value, error: &str) -> (Value, String) {
        let body = json!({
            "x402Version": 2,
            "error": error,
            "resource": resource,
            "accepts": [self.requirement],
            "extensions": {},
        });
        let header = String::from_utf8(Base64Bytes::encode(body.to_string()).0.into_owned()).unwrap_or_default();
        (body, header)
    }

    /// Steps 6-7: decodes a `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) value, checks that it
    /// names this offer and that its signature is the payer's. Returns the reason on refusal.
    /// Nothing is looked up or written.
    pub fn check(&self, header: &[u8], v1: bool) -> Result<X402Payment, String> {
        let bytes = Base64Bytes::from(header.trim_ascii()).decode().map_err(|_| "The payment header is not base64.".to_string())?;
        let payload: Value = serde_json::from_slice(&bytes).map_err(|_| "The payment header is not JSON.".to_string())?;
        let payload = if v1 {
            let p: v1::PaymentPayload<String, Value> =
                serde_json::from_value(payload).map_err(|e| format!("Not an x402 v1 payment payload: {e}"))?;
            if p.scheme != "exact" {
                return Err(format!("Scheme {:?} is not offered (exact).", p.scheme));
            }
            let ours = p.network == self.cfg.network
                || ChainId::from_network_name(&p.network).is_some_and(|c| c.to_string() == self.cfg.network);
            if !ours {
                return Err(format!("Network {:?} is not offered ({}).", p.network, self.cfg.network));
            }
            // The v2 form of the same payment: it accepted our one requirement.
            json!({ "x402Version": 2, "accepted": self.requirement, "payload": p.payload })
        } else {
            let p: v2::PaymentPayload<Value, Value> =
                serde_json::from_value(payload.clone()).map_err(|e| format!("Not an x402 v2 payment payload: {e}"))?;
            if p.accepted != self.requirement {
                return Err("The payment's `accepted` is not the offered requirement.".into());
            }
            payload
        };
        let auth = &payload["payload"]["authorization"];
        let field = |k: &str| auth.get(k).and_then(Value::as_str).unwrap_or("");
        let (from, to, value, nonce) = (field("from"), field("to"), field("value"), field("nonce"));
        if !is_hex(from, 40) || !is_hex(nonce, 64) {
            return Err("The payment has no EIP-3009 authorization (from, nonce).".into());
        }
        if !to.eq_ignore_ascii_case(&self.pay_to) || value != self.cfg.amount {
            return Err("The authorization does not pay this offer (payee or amount).".into());
        }
        // 7. Genuine: the EIP-712 signature recovers to `from` (no I/O; EIP-1271 wallets are refused).
        let authorization = Authorization::parse(auth)?;
        let signature = payload["payload"]["signature"].as_str().ok_or("The payment has no signature.")?;
        if authorization.signer(&self.domain, signature)? != authorization.from {
            return Err("The payment's signature is not the payer's: it does not recover to authorization.from.".into());
        }
        let reference = format!("x402:{}:{}:{}:{}", self.cfg.network, self.cfg.asset, from, nonce).to_lowercase();
        Ok(X402Payment { reference, v1, payer: from.to_string(), payload, authorization })
    }

    /// POSTs `{x402Version, paymentPayload, paymentRequirements}` to `{facilitator}/{path}`.
    /// Returns the answer's class and JSON body. Unreachable, timing out, a 5xx or any answer
    /// that is not a JSON object: the facilitator is unavailable.
    async fn call(&self, path: &str, p: &X402Payment) -> Result<(Answer, Value), String> {
        let body = v2::VerifyRequest {
            x402_version: v2::X402Version2,
            payment_payload: &p.payload,
            payment_requirements: &self.requirement,
        };
        let url = format!("{}/{path}", self.facilitator);
        let mut req = self.client.post(&url).json(&body).timeout(self.timeout);
        if let Some(auth) = &self.authorization {
            req = req.header(reqwest::header::AUTHORIZATION, auth.clone());
        }
        let res = req.send().await.map_err(|e| {
            tracing::warn!(error = %e, url = %redact_url(&url), "x402 facilitator unreachable");
            if e.is_timeout() {
                format!("The x402 facilitator did not answer /{path} in time.")
            } else {
                "The x402 facilitator is unreachable.".to_string()
            }
        })?;
        let status = res.status();
        let value = res.json::<Value>().await;
        if !status.is_success() {
            tracing::warn!(status = status.as_u16(), url = %redact_url(&url), "x402 facilitator answered an error status");
        }
        let class = if status.is_success() {
            Answer::Success
        } else if status.is_client_error() {
            Answer::ClientError
        } else {
            Answer::Other
        };
        match value {
            Ok(v) if v.is_object() && class != Answer::Other => Ok((class, v)),
            _ => Err(format!("The x402 facilitator answered HTTP {} to /{path}.", status.as_u16())),
        }
    }

    /// Step 10: the facilitator's `/verify` must answer `isValid: true` for this payer. An answer
    /// `isValid: false` refuses the payment (facilitators send it with 200 or a 4xx); any other
    /// answer means the facilitator is unavailable.
    pub async fn verify(&self, p: &X402Payment) -> Result<(), PayError> {
        let (class, v) = self.call("verify", p).await.map_err(PayError::Unavailable)?;
        match v.get("isValid").and_then(Value::as_bool) {
            Some(true) if class == Answer::Success => {}
            Some(false) => {
                return Err(PayError::Invalid { message: format!("Payment refused: {}", reason(&v, "invalidReason", "invalidReasonDetails")), problem: None });
            }
            _ => return Err(PayError::Unavailable("The x402 facilitator's /verify answer is not a verification.".into())),
        }
        match v.get("payer").and_then(Value::as_str) {
            Some(payer) if !payer.is_empty() && !payer.eq_ignore_ascii_case(&p.payer) => Err(PayError::Invalid {
                message: "The facilitator verified another payer than the authorization's.".into(),
                problem: None,
            }),
            _ => Ok(()),
        }
    }

    /// Step 12: the facilitator's `/settle`. `success: true` with the transaction settled it;
    /// `success: false` (HTTP 200 or a 4xx) with a reason other than `settlement_pending` refused
    /// it; anything else leaves the outcome unknown.
    pub async fn settle(&self, p: &X402Payment) -> SettleOutcome {
        let (class, v) = match self.call("settle", p).await {
            Ok(answer) => answer,
            Err(reason) => return SettleOutcome::Unknown { transaction: None, reason },
        };
        let transaction = v
            .get("transaction")
            .and_then(Value::as_str)
            .filter(|t| is_hex(t, 64))
            .map(str::to_ascii_lowercase);
        let error_reason = v.get("errorReason").or_else(|| v.get("error_reason")).and_then(Value::as_str).unwrap_or("");
        match v.get("success").and_then(Value::as_bool) {
            Some(true) if class == Answer::Success => match transaction {
                Some(tx) => {
                    let header = String::from_utf8(Base64Bytes::encode(v.to_string()).0.into_owned()).unwrap_or_default();
                    SettleOutcome::Settled(Settled {
                        receipt_key: format!("x402:{}:{}", self.cfg.network, tx).to_lowercase(),
                        settled_ref: tx,
                        response_header: header,
                    })
                }
                None => SettleOutcome::Unknown {
                    transaction: None,
                    reason: "The facilitator reported success without a transaction.".into(),
                },
            },
            Some(false) if error_reason == "settlement_pending" => SettleOutcome::Unknown {
                transaction,
                reason: "The facilitator submitted the settlement but has not seen it confirmed (settlement_pending).".into(),
            },
            Some(false) => SettleOutcome::Refused(format!("Payment not settled: {}", reason(&v, "errorReason", "errorMessage"))),
            _ => SettleOutcome::Unknown { transaction, reason: "The x402 facilitator's /settle answer is not a settlement.".into() },
        }
    }
}

/// The class of a facilitator's HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Success,
    ClientError,
    Other,
}

/// A facilitator's reason, with its details when given (bounded: it is echoed to the client).
fn reason(v: &Value, key: &str, details: &str) -> String {
    let snake: String = key.chars().flat_map(|c| if c.is_ascii_uppercase() { vec!['_', c.to_ascii_lowercase()] } else { vec![c] }).collect();
    let r = v.get(key).or_else(|| v.get(&snake)).and_then(Value::as_str).unwrap_or("refused by the facilitator");
    let text = match v.get(details).and_then(Value::as_str).filter(|d| !d.is_empty()) {
        Some(d) => format!("{r} ({d})"),
        None => r.to_string(),
    };
    text.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SignupX402Config {
        SignupX402Config {
            network: "eip155:8453",
            asset: "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
            asset_name: "USD Coin",
            asset_version: "2",
            asset_decimals: 6,
            amount: "5000000",
            pay_to: "",
            facilitator_url: "https://www.x402.org/facilitator",
            rpc_url: "",
            max_timeout_seconds: 120,
        }
    }

    #[test]
    fn requirement_bytes_are_the_cross_target_form() {
        let rail = X402Rail::new(&cfg(), "https://www.x402.org/facilitator/", "0x209693Bc6afc0C5328bA36FaF03C514EF312287C").unwrap();
        assert_eq!(
            rail.requirement().to_string(),
            r#"{"scheme":"exact","network":"eip155:8453","amount":"5000000","asset":"0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","maxTimeoutSeconds":120,"extra":{"name":"USD Coin","version":"2"}}"#
        );
        assert_eq!(rail.facilitator, "https://www.x402.org/facilitator");
    }

    #[test]
    fn settings_are_checked() {
        let none = SignupSettings::default();
        assert!(X402Rail::from_settings(&cfg(), &none).unwrap_err().contains("X402_PAY_TO"));
        let bad = SignupSettings { x402_pay_to: Some("0x12".into()), ..Default::default() };
        assert!(X402Rail::from_settings(&cfg(), &bad).unwrap_err().contains("X402_PAY_TO"));
        let url = SignupSettings {
            x402_pay_to: Some(format!("0x{}", "a".repeat(40))),
            x402_facilitator_url: Some("ftp://x".into()),
            ..Default::default()
        };
        assert!(X402Rail::from_settings(&cfg(), &url).unwrap_err().contains("X402_FACILITATOR_URL"));
        let no_rpc = SignupSettings { x402_pay_to: Some(format!("0x{}", "a".repeat(40))), ..Default::default() };
        assert!(X402Rail::from_settings(&cfg(), &no_rpc).unwrap_err().contains("X402_RPC_URL"));
        let bad_rpc = SignupSettings { x402_rpc_url: Some("localhost:8545".into()), ..no_rpc.clone() };
        assert!(X402Rail::from_settings(&cfg(), &bad_rpc).unwrap_err().contains("X402_RPC_URL"));
        for t in ["0", "x", "600001"] {
            let bad_timeout = SignupSettings {
                x402_rpc_url: Some("http://127.0.0.1:8545".into()),
                x402_facilitator_timeout_ms: Some(t.into()),
                ..no_rpc.clone()
            };
            assert!(X402Rail::from_settings(&cfg(), &bad_timeout).unwrap_err().contains("X402_FACILITATOR_TIMEOUT_MS"));
        }
        let auth = |a: &str| SignupSettings {
            x402_pay_to: Some(format!("0x{}", "a".repeat(40))),
            x402_facilitator_authorization: Some(a.into()),
            x402_rpc_url: Some("https://user:pw@rpc.example/v2/rpc-secret".into()),
            x402_facilitator_timeout_ms: Some("2500".into()),
            ..Default::default()
        };
        assert!(X402Rail::from_settings(&cfg(), &auth("Bearer a\nb")).unwrap_err().contains("X402_FACILITATOR_AUTHORIZATION"));
        let rail = X402Rail::from_settings(&cfg(), &auth("Bearer fac-key")).unwrap();
        assert!(!format!("{rail:?}").contains("fac-key"), "Debug shows no credential: {rail:?}");
        assert!(!format!("{rail:?}").contains("rpc-secret") && !format!("{rail:?}").contains("pw"), "{rail:?}");
        assert_eq!(rail.timeout(), Duration::from_millis(2500));
        assert!(rail.ready().is_ok());
    }
}
