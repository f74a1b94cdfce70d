//! The x402 rail of POST /v1/signup ([signup.x402]): protocol v2 (`PAYMENT-REQUIRED`,
//! `PAYMENT-SIGNATURE`, `PAYMENT-RESPONSE`; v1's `X-PAYMENT` accepted), scheme `exact` on an EVM
//! network (EIP-3009), verified and settled by the facilitator over HTTPS
//! (`POST {url}/verify`, `POST {url}/settle`). Wire types from the `x402-types` crate.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use x402_types::chain::ChainId;
use x402_types::proto::{v1, v2};
use x402_types::util::Base64Bytes;

use crate::config::{SignupSettings, redact_url};
use crate::generated::SignupX402Config;

use super::{PayError, Settled};

const VERIFY_TIMEOUT: Duration = Duration::from_secs(30);
/// Settlement sends a transaction and waits for its receipt.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The rail: the offered requirement, the facilitator and the HTTP client that reaches it.
pub struct X402Rail {
    cfg: SignupX402Config,
    facilitator: String,
    pay_to: String,
    requirement: Value,
    client: reqwest::Client,
    /// `Authorization` sent to the facilitator (X402_FACILITATOR_AUTHORIZATION), if any.
    authorization: Option<reqwest::header::HeaderValue>,
}

impl std::fmt::Debug for X402Rail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X402Rail")
            .field("facilitator", &redact_url(&self.facilitator))
            .field("pay_to", &self.pay_to)
            .field("authorization", &self.authorization.as_ref().map(|_| "<set>"))
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
}

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
        let client = super::http_client().map_err(|e| format!("HTTPS client for the x402 facilitator: {e}"))?;
        Ok(X402Rail {
            cfg: *cfg,
            facilitator: facilitator_url.trim_end_matches('/').to_string(),
            pay_to: pay_to.to_string(),
            requirement,
            client,
            authorization: None,
        })
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
        let rail = X402Rail::new(cfg, url, pay_to)?;
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

    /// Step 6: decodes a `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) value and checks that it
    /// names this offer. Returns the reason on refusal. Nothing is looked up or written.
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
        let reference = format!("x402:{}:{}:{}:{}", self.cfg.network, self.cfg.asset, from, nonce).to_lowercase();
        Ok(X402Payment { reference, v1, payer: from.to_string(), payload })
    }

    /// POSTs `{x402Version, paymentPayload, paymentRequirements}` to `{facilitator}/{path}`.
    /// Returns the answer's class and JSON body. Unreachable, timing out, a 5xx or any answer
    /// that is not a JSON object: the facilitator is unavailable.
    async fn call(&self, path: &str, p: &X402Payment, timeout: Duration) -> Result<(Answer, Value), PayError> {
        let body = v2::VerifyRequest {
            x402_version: v2::X402Version2,
            payment_payload: &p.payload,
            payment_requirements: &self.requirement,
        };
        let url = format!("{}/{path}", self.facilitator);
        let mut req = self.client.post(&url).json(&body).timeout(timeout);
        if let Some(auth) = &self.authorization {
            req = req.header(reqwest::header::AUTHORIZATION, auth.clone());
        }
        let res = req.send().await.map_err(|e| {
            tracing::warn!(error = %e, url = %redact_url(&url), "x402 facilitator unreachable");
            PayError::Unavailable("The x402 facilitator is unreachable.".into())
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
            _ => Err(PayError::Unavailable(format!("The x402 facilitator answered HTTP {} to /{path}.", status.as_u16()))),
        }
    }

    /// Step 10: the facilitator's `/verify` must answer `isValid: true` for this payer. An answer
    /// `isValid: false` refuses the payment (facilitators send it with 200 or a 4xx); any other
    /// answer means the facilitator is unavailable.
    pub async fn verify(&self, p: &X402Payment) -> Result<(), PayError> {
        let (class, v) = self.call("verify", p, VERIFY_TIMEOUT).await?;
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

    /// Step 11: the facilitator's `/settle` must answer `success: true` with the transaction
    /// (an answer `success: false`, with HTTP 200 or a 4xx, is a failure).
    pub async fn settle(&self, p: &X402Payment) -> Result<Settled, PayError> {
        let (class, v) = self.call("settle", p, SETTLE_TIMEOUT).await?;
        match v.get("success").and_then(Value::as_bool) {
            Some(true) if class == Answer::Success => {}
            Some(false) => {
                return Err(PayError::Failed(format!("Payment not settled: {}", reason(&v, "errorReason", "errorMessage"))));
            }
            _ => return Err(PayError::Unavailable("The x402 facilitator's /settle answer is not a settlement.".into())),
        }
        let Some(tx) = v.get("transaction").and_then(Value::as_str).filter(|t| !t.is_empty()) else {
            return Err(PayError::Failed("The facilitator reported success without a transaction.".into()));
        };
        let header = String::from_utf8(Base64Bytes::encode(v.to_string()).0.into_owned()).unwrap_or_default();
        Ok(Settled {
            receipt_key: format!("x402:{}:{}", self.cfg.network, tx).to_lowercase(),
            settled_ref: tx.to_string(),
            response_header: header,
        })
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
        let auth = |a: &str| SignupSettings {
            x402_pay_to: Some(format!("0x{}", "a".repeat(40))),
            x402_facilitator_authorization: Some(a.into()),
            ..Default::default()
        };
        assert!(X402Rail::from_settings(&cfg(), &auth("Bearer a\nb")).unwrap_err().contains("X402_FACILITATOR_AUTHORIZATION"));
        let rail = X402Rail::from_settings(&cfg(), &auth("Bearer fac-key")).unwrap();
        assert!(!format!("{rail:?}").contains("fac-key"), "Debug shows no credential: {rail:?}");
    }
}
