//! `POST /v1/signup` (contract 3.9): what every gateway must do before any payment is verified.
//! Paying for real needs a chain or a payment processor; the end-to-end suites do that. Without
//! `--x402-harness` these scenarios only send payments that must be refused, so an audit never
//! spends or mints; with it, the harness's payer pays for real (its test money) while the harness's
//! facilitator loses answers on purpose.

use anyhow::{Result, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use crate::audit::client::{Client, Reply, random_hex64};
use crate::audit::scenario::{Outcome, Scenario};

const PATH: &str = "/v1/signup";
const NO_CHARGE: &str = "no charge applied";

fn na(why: &str) -> Result<Outcome> {
    Ok(Outcome::NotApplicable(why.into()))
}

fn has_rail(c: &Client, rail: &str) -> bool {
    c.signup["rails"].as_array().is_some_and(|r| r.iter().any(|x| x == rail))
}

/// POST /v1/signup with an empty body and these headers.
fn signup(c: &Client, headers: &[(&str, &str)]) -> Reply {
    c.request("POST", PATH, headers, Some(b""))
}

/// The gateway's offer, or why the scenario does not apply (signup off, or its rails unconfigured).
fn offer(c: &Client) -> std::result::Result<Reply, Outcome> {
    if c.signup.is_null() {
        return Err(Outcome::NotApplicable("signup is disabled on this gateway (/v1/pricing: signup null)".into()));
    }
    let r = signup(c, &[]);
    if r.status == 503 && r.code() == "signup_unavailable" {
        let msg = r.json()["error"]["message"].as_str().unwrap_or("").to_string();
        return Err(Outcome::NotApplicable(format!("signup's rails are not configured here: {msg}")));
    }
    Ok(r)
}

macro_rules! offer_or_na {
    ($c:expr) => {
        match offer($c) {
            Ok(r) => r,
            Err(o) => return Ok(o),
        }
    };
}

/// A refusal before any payment: the status, the code, the note, and the offer carried again.
fn refused(r: &Reply, status: u16, code: &str) -> Result<Outcome> {
    ensure!(r.status == status && r.code() == code, "expected {status} {code}, got {}", r.brief());
    ensure!(r.body.contains(NO_CHARGE), "{} without \"note\": \"{NO_CHARGE}\": {}", r.status, r.body);
    ensure!(r.json()["key"].is_null(), "a refused signup returned a key");
    Ok(Outcome::Pass(r.brief()))
}

fn decode_required(r: &Reply) -> Result<Value> {
    let raw = r.header("payment-required").ok_or_else(|| anyhow::anyhow!("402 without PAYMENT-REQUIRED"))?;
    let bytes = STANDARD.decode(raw.trim()).map_err(|e| anyhow::anyhow!("PAYMENT-REQUIRED is not standard base64: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("PAYMENT-REQUIRED is not JSON: {e}"))
}

/// Every `Payment` challenge in the WWW-Authenticate header lines (a server may send one line per
/// challenge or join them with commas, RFC 9110 §11.6.1), as its parameters.
fn challenges(r: &Reply) -> Vec<Vec<(String, String)>> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in r.headers.get_all("www-authenticate").iter().filter_map(|v| v.to_str().ok()) {
        out.extend(parse_challenges(line));
    }
    out.into_iter().filter(|(scheme, _)| scheme.eq_ignore_ascii_case("payment")).map(|(_, p)| p).collect()
}

/// `Scheme k=v, k="v", Other k=v` → [(scheme, params)].
fn parse_challenges(line: &str) -> Vec<(String, Vec<(String, String)>)> {
    let b = line.as_bytes();
    let mut i = 0;
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let skip = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b',' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && !matches!(b[*i], b' ' | b',' | b'=' | b'\t') {
            *i += 1;
        }
        line[s..*i].to_string()
    };
    loop {
        skip(&mut i);
        if i >= b.len() {
            break;
        }
        let t = token(&mut i);
        if i < b.len() && b[i] == b'=' {
            i += 1;
            let v = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    v.push(b[i]);
                    i += 1;
                }
                i += 1;
                String::from_utf8_lossy(&v).into_owned()
            } else {
                token(&mut i)
            };
            if let Some(last) = out.last_mut() {
                last.1.push((t, v));
            }
        } else {
            out.push((t, Vec::new()));
        }
    }
    out
}

fn param<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "signup.pricing",
            expect: "/v1/pricing says whether a signup is sold: null, or its price, balance, scopes and rails",
            run: |c, _| {
                let s = &c.signup;
                if s.is_null() {
                    return Ok(Outcome::Pass("signup: null".into()));
                }
                ensure!(s["path"] == PATH, "signup.path {}", s["path"]);
                ensure!(s["price_mcents"].as_u64().is_some_and(|p| p >= 1), "signup.price_mcents {}", s["price_mcents"]);
                ensure!(s["balance_mcents"].as_u64().is_some_and(|p| p >= 1), "signup.balance_mcents {}", s["balance_mcents"]);
                ensure!(s["scopes"].as_array().is_some_and(|a| !a.is_empty()), "signup.scopes {}", s["scopes"]);
                let rails = s["rails"].as_array().cloned().unwrap_or_default();
                ensure!(!rails.is_empty() && rails.iter().all(|r| r == "x402" || r == "mpp"), "signup.rails {}", s["rails"]);
                Ok(Outcome::Pass(format!("{s}")))
            },
        },
        Scenario {
            name: "signup.disabled",
            expect: "with signup disabled, POST /v1/signup → 404 not_found",
            run: |c, _| {
                if !c.signup.is_null() {
                    return na("signup is enabled on this gateway");
                }
                let r = signup(c, &[]);
                ensure!(r.status == 404 && r.code() == "not_found", "got {}", r.brief());
                Ok(Outcome::Pass(r.brief()))
            },
        },
        Scenario {
            name: "signup.payment_required",
            expect: "POST /v1/signup without a payment → 402 payment_required, no-store, the price, no key",
            run: |c, _| {
                let r = offer_or_na!(c);
                refused(&r, 402, "payment_required")?;
                let cc = r.header("cache-control").unwrap_or_default();
                ensure!(cc.contains("no-store"), "Cache-Control {cc:?}");
                let v = r.json();
                ensure!(v["price_mcents"] == c.signup["price_mcents"], "body price_mcents {} ≠ pricing's {}", v["price_mcents"], c.signup["price_mcents"]);
                ensure!(v["balance_mcents"] == c.signup["balance_mcents"], "body balance_mcents {}", v["balance_mcents"]);
                Ok(Outcome::Pass(r.brief()))
            },
        },
        Scenario {
            name: "signup.x402_offer",
            expect: "the 402 carries PAYMENT-REQUIRED (base64 x402 v2, scheme exact) and the same accepts in the body",
            run: |c, _| {
                if !has_rail(c, "x402") {
                    return na("no x402 rail");
                }
                let r = offer_or_na!(c);
                let req = decode_required(&r)?;
                ensure!(req["x402Version"] == 2, "x402Version {}", req["x402Version"]);
                let accepts = req["accepts"].as_array().cloned().unwrap_or_default();
                ensure!(!accepts.is_empty(), "no accepts");
                for a in &accepts {
                    ensure!(a["scheme"] == "exact", "scheme {}", a["scheme"]);
                    ensure!(a["network"].as_str().is_some_and(|n| n.starts_with("eip155:")), "network {}", a["network"]);
                    ensure!(a["amount"].as_str().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())), "amount {}", a["amount"]);
                    ensure!(a["payTo"].as_str().is_some_and(|n| n.len() == 42), "payTo {}", a["payTo"]);
                }
                ensure!(r.json()["accepts"] == req["accepts"], "body accepts differ from the header's");
                ensure!(req["resource"]["url"].as_str().is_some_and(|u| u.ends_with(PATH)), "resource {}", req["resource"]);
                Ok(Outcome::Pass(format!("{} offer(s), amount {}", accepts.len(), accepts[0]["amount"])))
            },
        },
        Scenario {
            name: "signup.mpp_offer",
            expect: "the 402 carries one WWW-Authenticate: Payment per MPP method (id, realm, method, intent charge, request, expires)",
            run: |c, _| {
                if !has_rail(c, "mpp") {
                    return na("no MPP rail");
                }
                let r = offer_or_na!(c);
                let ch = challenges(&r);
                ensure!(!ch.is_empty(), "no WWW-Authenticate: Payment header");
                let mut methods = Vec::new();
                for p in &ch {
                    for k in ["id", "realm", "method", "intent", "request", "expires"] {
                        ensure!(param(p, k).is_some_and(|v| !v.is_empty()), "challenge without {k}: {p:?}");
                    }
                    ensure!(param(p, "intent") == Some("charge"), "intent {:?}", param(p, "intent"));
                    methods.push(param(p, "method").unwrap_or_default().to_string());
                }
                let mut uniq = methods.clone();
                uniq.sort();
                uniq.dedup();
                ensure!(uniq.len() == methods.len(), "one challenge per method, got {methods:?}");
                Ok(Outcome::Pass(format!("methods {methods:?}")))
            },
        },
        Scenario {
            name: "signup.x402_malformed",
            expect: "a PAYMENT-SIGNATURE that is not base64 JSON → 402 payment_invalid, nothing minted",
            run: |c, _| {
                if !has_rail(c, "x402") {
                    return na("no x402 rail");
                }
                offer_or_na!(c);
                let r = signup(c, &[("PAYMENT-SIGNATURE", "%%% not base64 %%%")]);
                refused(&r, 402, "payment_invalid")?;
                decode_required(&r)?;
                Ok(Outcome::Pass(r.brief()))
            },
        },
        Scenario {
            name: "signup.x402_other_offer",
            expect: "a signed payload for another offer (accepted.amount = \"1\") → 402 payment_invalid before any facilitator",
            run: |c, _| {
                if !has_rail(c, "x402") {
                    return na("no x402 rail");
                }
                let r = offer_or_na!(c);
                let req = decode_required(&r)?;
                let mut accepted = req["accepts"][0].clone();
                accepted["amount"] = json!("1");
                let from = format!("0x{}", "1".repeat(40));
                let payload = json!({
                    "x402Version": 2, "resource": req["resource"], "accepted": accepted,
                    "payload": {"signature": format!("0x{}", "ab".repeat(65)), "authorization": {
                        "from": from, "to": accepted["payTo"], "value": "1", "validAfter": "0",
                        "validBefore": "99999999999", "nonce": format!("0x{}", "00".repeat(32))}}
                });
                let header = STANDARD.encode(payload.to_string());
                let r = signup(c, &[("PAYMENT-SIGNATURE", &header)]);
                refused(&r, 402, "payment_invalid")
            },
        },
        Scenario {
            name: "signup.mpp_tampered",
            expect: "an MPP credential whose challenge was altered (amount) → 402 payment_invalid, nothing minted",
            run: |c, _| {
                if !has_rail(c, "mpp") {
                    return na("no MPP rail");
                }
                let r = offer_or_na!(c);
                let ch = challenges(&r);
                let p = ch.first().ok_or_else(|| anyhow::anyhow!("no challenge"))?;
                let request = param(p, "request").unwrap_or_default();
                let decoded: Value = URL_SAFE_NO_PAD
                    .decode(request)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| anyhow::anyhow!("request is not base64url JSON: {request}"))?;
                let mut cheaper = decoded.clone();
                cheaper["amount"] = json!("0.00001");
                let challenge = json!({
                    "id": param(p, "id"), "realm": param(p, "realm"), "method": param(p, "method"),
                    "intent": param(p, "intent"), "expires": param(p, "expires"),
                    "request": URL_SAFE_NO_PAD.encode(cheaper.to_string()),
                });
                let cred = URL_SAFE_NO_PAD.encode(json!({"challenge": challenge, "payload": {}}).to_string());
                let r = signup(c, &[("Authorization", &format!("Payment {cred}"))]);
                refused(&r, 402, "payment_invalid")
            },
        },
        Scenario {
            name: "signup.two_credentials",
            expect: "two payment credentials on one request → 400 invalid_payment",
            run: |c, _| {
                offer_or_na!(c);
                let r = signup(c, &[("PAYMENT-SIGNATURE", "e30="), ("X-PAYMENT", "e30=")]);
                refused(&r, 400, "invalid_payment")
            },
        },
        Scenario {
            name: "signup.idempotency_key_syntax",
            expect: "an Idempotency-Key that is too short → 400 invalid_input, before any payment",
            run: |c, _| {
                offer_or_na!(c);
                let r = signup(c, &[("Idempotency-Key", "short")]);
                refused(&r, 400, "invalid_input")
            },
        },
        Scenario {
            name: "signup.body_cannot_buy_more",
            expect: "a body asking for its own balance or scopes → 400 invalid_input (the manifest decides)",
            run: |c, _| {
                offer_or_na!(c);
                let r = c.post(PATH, &[], r#"{"balance_mcents": 100000000, "scopes": ["admin"]}"#);
                refused(&r, 400, "invalid_input")
            },
        },
        Scenario {
            name: "signup.cors",
            expect: "OPTIONS /v1/signup allows the payment headers; responses expose the payment headers",
            run: |c, _| {
                offer_or_na!(c);
                let pre = c.request("OPTIONS", PATH, &[("Origin", "https://agent.example"), ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "payment-signature,idempotency-key")], None);
                ensure!(pre.status == 204, "preflight {}", pre.brief());
                let allow = pre.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
                for h in ["payment-signature", "x-payment", "idempotency-key", "authorization"] {
                    ensure!(allow.contains(h), "Allow-Headers {allow:?} lacks {h}");
                }
                let r = signup(c, &[("Origin", "https://agent.example")]);
                let expose = r.header("access-control-expose-headers").unwrap_or_default().to_ascii_lowercase();
                for h in ["payment-required", "payment-response", "x-payment-response", "www-authenticate", "payment-receipt"] {
                    ensure!(expose.contains(h), "Expose-Headers {expose:?} lacks {h}");
                }
                Ok(Outcome::Pass(pre.brief()))
            },
        },
        Scenario {
            name: "signup.x402_forged_replay",
            expect: "an x402 payload for this offer with a forged signature (with --x402-harness: a settled payment's from/nonce and Idempotency-Key) → 402 payment_invalid, no key_id, no key",
            run: |c, o| {
                if !has_rail(c, "x402") {
                    return na("no x402 rail");
                }
                let r = offer_or_na!(c);
                let req = decode_required(&r)?;
                let accepted = req["accepts"][0].clone();
                // Some payer's authorization, well formed, for exactly this offer, with a signature
                // nobody made: nothing about the payment may be looked up or answered.
                let authorization = json!({
                    "from": format!("0x{}", &random_hex64()[..40]), "to": accepted["payTo"], "value": accepted["amount"],
                    "validAfter": "0", "validBefore": (now_secs() + 600).to_string(), "nonce": format!("0x{}", random_hex64()),
                });
                let r = signup(c, &[("PAYMENT-SIGNATURE", &forged_header(&req, &authorization)), ("Idempotency-Key", &random_hex64())]);
                forged_refused(&r, &[])?;
                let Some(h) = &o.x402_harness else {
                    return Ok(Outcome::Pass(format!("{} (an invented from/nonce; a settled payment's needs --x402-harness)", r.brief())));
                };
                // A payment settled for real, then its public from/nonce with a forged signature,
                // with and without the victim's Idempotency-Key.
                let harness = Harness::connect(c, h, &accepted)?;
                let idem = random_hex64();
                let paid = harness.pay(c, &req)?;
                let r = signup(c, &[("PAYMENT-SIGNATURE", &paid.header), ("Idempotency-Key", &idem)]);
                ensure!(r.status == 201, "the real payment was not sold a key: {}", r.brief());
                let v = r.json();
                let (key, key_id) = (v["key"].as_str().unwrap_or_default().to_string(), v["key_id"].as_str().unwrap_or_default().to_string());
                ensure!(!key.is_empty() && !key_id.is_empty(), "201 without key/key_id: {}", r.brief());
                let stats0 = harness.stats(c, None)?;
                let a = &paid.payload["payload"]["authorization"];
                for sig in [format!("0x{}", "ab".repeat(65)), "0x".to_string()] {
                    let mut forged = paid.payload.clone();
                    forged["payload"] = json!({"authorization": a, "signature": sig});
                    let header = STANDARD.encode(forged.to_string());
                    for with_idem in [true, false] {
                        let mut headers = vec![("PAYMENT-SIGNATURE", header.as_str())];
                        if with_idem {
                            headers.push(("Idempotency-Key", idem.as_str()));
                        }
                        let r = signup(c, &headers);
                        forged_refused(&r, &[&key, &key[key.find('_').map_or(0, |i| i + 1)..], &key_id])?;
                    }
                }
                let stats1 = harness.stats(c, None)?;
                ensure!(
                    stats1["verify"] == stats0["verify"] && stats1["settle"] == stats0["settle"],
                    "a forged payload reached the facilitator: /verify {} → {}, /settle {} → {}",
                    stats0["verify"], stats1["verify"], stats0["settle"], stats1["settle"]
                );
                Ok(Outcome::Pass(format!("invented and settled ({key_id}) payments forged: 402 payment_invalid, no key_id, no key, no facilitator call")))
            },
        },
        Scenario {
            name: "signup.x402_pending_recovery",
            expect: "settled but the facilitator's answer is lost → 202 payment_pending with the reference; the retry delivers the key once, paid exactly once (needs --x402-harness)",
            run: |c, o| {
                if !has_rail(c, "x402") {
                    return na("no x402 rail");
                }
                let r = offer_or_na!(c);
                let Some(h) = &o.x402_harness else {
                    return na("needs --x402-harness CONTROL_URL: a tests/chain harness whose facilitator this gateway uses, to lose the facilitator's answer on purpose");
                };
                let req = decode_required(&r)?;
                let accepted = req["accepts"][0].clone();
                let harness = Harness::connect(c, h, &accepted)?;
                let amount: u128 = accepted["amount"].as_str().and_then(|a| a.parse().ok()).ok_or_else(|| anyhow::anyhow!("amount {}", accepted["amount"]))?;
                let before = harness.balance(c, &accepted)?;
                let idem = random_hex64();
                let paid = harness.pay(c, &req)?;
                let headers = [("PAYMENT-SIGNATURE", paid.header.as_str()), ("Idempotency-Key", idem.as_str())];
                let r = {
                    let _fault = harness.fault(c, "error_after_settle")?;
                    signup(c, &headers)
                };
                ensure!(r.status == 202 && r.code() == "payment_pending", "settled, answer lost: expected 202 payment_pending, got {}", r.brief());
                ensure!(!r.body.contains(NO_CHARGE), "a settled payment answered \"{NO_CHARGE}\": {}", r.body);
                ensure!(r.json()["key"].is_null(), "a key in the pending answer");
                let v = r.json();
                let a = &paid.payload["payload"]["authorization"];
                let reference = format!(
                    "x402:{}:{}:{}:{}",
                    accepted["network"].as_str().unwrap_or_default(),
                    accepted["asset"].as_str().unwrap_or_default(),
                    a["from"].as_str().unwrap_or_default(),
                    a["nonce"].as_str().unwrap_or_default()
                )
                .to_ascii_lowercase();
                ensure!(v["payment"]["reference"].as_str().map(str::to_ascii_lowercase) == Some(reference.clone()), "payment {} (want reference {reference})", v["payment"]);
                ensure!(v["payment"]["state"] == "pending", "payment.state {}", v["payment"]["state"]);
                ensure!(v["idempotency_key"] == idem.as_str(), "idempotency_key {} is not the request's", v["idempotency_key"]);
                ensure!(r.header("retry-after").is_some_and(|s| s.trim().parse::<u64>().is_ok()), "202 without Retry-After");
                let mid = harness.balance(c, &accepted)?;
                ensure!(mid == before + amount, "the facilitator settled but payTo moved {before} → {mid} (want +{amount})");
                // The retry (same payment, same Idempotency-Key) collects the key.
                let mut got = signup(c, &headers);
                for _ in 0..15 {
                    if !((got.status == 409 && got.code() == "payment_in_progress") || got.status == 202) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    got = signup(c, &headers);
                }
                let gv = got.json();
                ensure!(got.status == 201 || (got.status == 200 && gv["replayed"] == true), "the retry: expected 201 (or 200 replayed), got {}", got.brief());
                let key = gv["key"].as_str().unwrap_or_default().to_string();
                let key_id = gv["key_id"].as_str().unwrap_or_default().to_string();
                ensure!(!key.is_empty() && !key_id.is_empty(), "no key in {}", got.brief());
                let me = c.get("/v1/me", &[("Authorization", &format!("Bearer {key}"))]);
                ensure!(me.status == 200 && me.json()["key_id"] == key_id.as_str(), "/v1/me with the delivered key: {}", me.brief());
                let again = signup(c, &headers);
                let av = again.json();
                ensure!(again.status == 200 && av["replayed"] == true && av["key"] == key.as_str(), "the next retry: expected 200 replayed with the same key, got {}", again.brief());
                let after = harness.balance(c, &accepted)?;
                ensure!(after == before + amount, "payTo moved {before} → {after}: want exactly +{amount}");
                let used = harness.stats(c, Some((a["from"].as_str().unwrap_or_default(), a["nonce"].as_str().unwrap_or_default())))?;
                ensure!(used["authorization"]["usedEvents"] == 1, "AuthorizationUsed events for the payment: {}", used["authorization"]);
                Ok(Outcome::Pass(format!("202 payment_pending, then {} with {key_id}; payTo +{amount} once", got.status)))
            },
        },
    ]
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A PAYMENT-SIGNATURE for the offer `req` with `authorization` and a signature nobody made.
fn forged_header(req: &Value, authorization: &Value) -> String {
    let payload = json!({
        "x402Version": 2, "resource": req["resource"], "accepted": req["accepts"][0],
        "payload": {"signature": format!("0x{}", "ab".repeat(65)), "authorization": authorization},
    });
    STANDARD.encode(payload.to_string())
}

/// A forged payment's answer: 402 payment_invalid, no key_id, no key, none of `secrets` anywhere.
fn forged_refused(r: &Reply, secrets: &[&str]) -> Result<()> {
    refused(r, 402, "payment_invalid")?;
    let v = r.json();
    ensure!(v["key_id"].is_null() && v["replayed"].is_null(), "a forged payment was answered from a record: {}", r.body);
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        ensure!(!r.body.contains(s), "a forged payment's answer contains the real payment's key or key_id: {}", r.body);
    }
    Ok(())
}

/// The tests/chain harness (chain.mjs) behind `--x402-harness`: its control API.
struct Harness {
    url: String,
}

/// A payment the harness's payer signed: the header value and the PaymentPayload.
struct Paid {
    header: String,
    payload: Value,
}

/// Sets a settle fault on the harness's facilitator; dropping it clears the fault.
struct Fault<'a> {
    client: &'a Client,
    url: String,
}

impl Drop for Fault<'_> {
    fn drop(&mut self) {
        let _ = self.client.request_url("POST", &format!("{}/fault", self.url), &[], Some(br#"{"settle":"none"}"#));
    }
}

impl Harness {
    /// Checks the harness answers and that the gateway's offer pays on its chain.
    fn connect(c: &Client, url: &str, accepted: &Value) -> Result<Harness> {
        let h = Harness { url: url.trim_end_matches('/').to_string() };
        let info = h.get(c, "")?;
        let same = |a: &Value, b: &Value| a.as_str().map(str::to_ascii_lowercase) == b.as_str().map(str::to_ascii_lowercase);
        ensure!(
            same(&info["payTo"], &accepted["payTo"]) && same(&info["asset"], &accepted["asset"]) && info["network"] == accepted["network"],
            "the gateway's offer (network {}, asset {}, payTo {}) is not on the --x402-harness chain (network {}, asset {}, payTo {})",
            accepted["network"], accepted["asset"], accepted["payTo"], info["network"], info["asset"], info["payTo"]
        );
        Ok(h)
    }

    fn get(&self, c: &Client, path: &str) -> Result<Value> {
        let r = c.request_url("GET", &format!("{}{path}", self.url), &[], None);
        ensure!(r.status == 200, "--x402-harness {}{path} answered {}", self.url, r.brief());
        Ok(r.json())
    }

    fn post(&self, c: &Client, path: &str, body: &Value) -> Result<Value> {
        let r = c.request_url("POST", &format!("{}{path}", self.url), &[("Content-Type", "application/json")], Some(body.to_string().as_bytes()));
        ensure!(r.status == 200, "--x402-harness {}{path} answered {}", self.url, r.brief());
        Ok(r.json())
    }

    fn pay(&self, c: &Client, req: &Value) -> Result<Paid> {
        let v = self.post(c, "/pay", &json!({"accepted": req["accepts"][0], "resource": req["resource"]}))?;
        let header = v["value"].as_str().ok_or_else(|| anyhow::anyhow!("the harness's /pay gave no value: {v}"))?.to_string();
        Ok(Paid { header, payload: v["payload"].clone() })
    }

    fn fault<'a>(&self, c: &'a Client, mode: &str) -> Result<Fault<'a>> {
        self.post(c, "/fault", &json!({"settle": mode}))?;
        Ok(Fault { client: c, url: self.url.clone() })
    }

    fn balance(&self, c: &Client, accepted: &Value) -> Result<u128> {
        let v = self.get(c, &format!("/balance?address={}", accepted["payTo"].as_str().unwrap_or_default()))?;
        v["balance"].as_str().and_then(|b| b.parse().ok()).ok_or_else(|| anyhow::anyhow!("the harness's balance: {v}"))
    }

    fn stats(&self, c: &Client, authorization: Option<(&str, &str)>) -> Result<Value> {
        match authorization {
            Some((from, nonce)) => self.get(c, &format!("/stats?from={from}&nonce={nonce}")),
            None => self.get(c, "/stats"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_challenges;

    #[test]
    fn challenges_in_one_line_or_many() {
        let one = parse_challenges(r#"Payment id="a", realm="r", method="tempo", intent="charge", Payment id="b", realm="r", method="stripe", intent="charge", description="x, Payment y=1""#);
        assert_eq!(one.len(), 2, "{one:?}");
        assert_eq!(one[1].1.iter().find(|(k, _)| k == "method").unwrap().1, "stripe");
        assert_eq!(one[1].1.iter().find(|(k, _)| k == "description").unwrap().1, "x, Payment y=1");
        let bearer = parse_challenges(r#"Bearer realm="api""#);
        assert_eq!(bearer[0].0, "Bearer");
    }
}
