//! POST /v1/signup (docs/contract.md, 3.9), end to end over HTTP: the offer (402), both rails,
//! idempotent replays, refusals, the hourly signup budget and concurrent submissions of one
//! payment (one key, whichever instance). MPP runs against deterministic `mpp::ChargeMethod`s
//! defined here (the real chain / Stripe paths are configuration only); the x402 rail's tests are
//! in tests/signup_x402.rs. Every test runs on SQLite, and on PostgreSQL (+ Redis) when
//! TEST_DATABASE_URL is set.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use gateway::generated::{GATEWAY, SIGNUP};
use gateway::keys::sha256_hex;
use gateway::signup::{Method, MppRail, Signup, SignupMethod, derived_key};
use mpp::protocol::core::{Base64UrlJson, PaymentChallenge, PaymentCredential, Receipt, format_authorization, parse_www_authenticate};
use mpp::protocol::intents::ChargeRequest;
use mpp::protocol::traits::{ChargeMethod, VerificationError};
use serde_json::{Value, json};

backend_tests!(
    disabled_signup_is_not_served,
    offer_and_request_checks,
    unconfigured_rails_answer_503,
    mpp_pays_replays_and_refuses,
    mpp_concurrent_submissions_mint_once,
    signup_budget_is_its_own,
    signup_secret_is_required,
);

const SECRET: &str = "test-mpp-secret-0123456789abcdef-0123456789";

// ------------------------------------------------------------------------ a test MPP method

/// A deterministic charge method: the payload `{"proof": P}` pays unless P is "bad"; the
/// receipt reference is "ref-" + P.
#[derive(Clone)]
struct TestMethod {
    name: &'static str,
    verified: Arc<AtomicUsize>,
    gate: Option<Arc<Gate>>,
}

impl ChargeMethod for TestMethod {
    fn method(&self) -> &str {
        self.name
    }

    fn verify(
        &self,
        credential: &PaymentCredential,
        _request: &ChargeRequest,
    ) -> impl Future<Output = Result<Receipt, VerificationError>> + Send {
        let proof = credential.payload.get("proof").and_then(Value::as_str).unwrap_or("").to_string();
        let this = self.clone();
        async move {
            if let Some(g) = &this.gate {
                g.pass().await;
            }
            this.verified.fetch_add(1, Ordering::SeqCst);
            if proof == "bad" || proof.is_empty() {
                return Err(VerificationError::transaction_failed("proof refused"));
            }
            Ok(Receipt::success(this.name, format!("ref-{proof}")))
        }
    }
}

fn method_request(name: &str) -> ChargeRequest {
    ChargeRequest {
        amount: (SIGNUP.price_mcents * 10).to_string(),
        currency: format!("0x{}", "c".repeat(40)),
        recipient: Some(format!("acct-{name}")),
        ..Default::default()
    }
}

struct MppTest {
    verified: Arc<AtomicUsize>,
    gate: Option<Arc<Gate>>,
}

impl MppTest {
    fn new() -> MppTest {
        MppTest { verified: Arc::new(AtomicUsize::new(0)), gate: None }
    }

    fn rail(&self) -> MppRail {
        let methods: Vec<Arc<dyn SignupMethod>> = ["alpha", "beta"]
            .into_iter()
            .map(|name| {
                let m = TestMethod { name, verified: self.verified.clone(), gate: self.gate.clone() };
                Arc::new(Method::new(m, method_request(name))) as Arc<dyn SignupMethod>
            })
            .collect();
        MppRail::new(SECRET, methods).unwrap()
    }
}

/// The first challenge of a 402 (method "alpha").
fn challenges(res: &reqwest::Response) -> Vec<PaymentChallenge> {
    res.headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| parse_www_authenticate(v.to_str().unwrap()).unwrap())
        .collect()
}

fn mpp_credential(challenge: &PaymentChallenge, proof: &str) -> String {
    format_authorization(&PaymentCredential::new(challenge.to_echo(), json!({ "proof": proof }))).unwrap()
}

fn skip_disabled() -> bool {
    if !SIGNUP.enabled {
        eprintln!("[signup] is disabled in mcpay.toml: only the 404 is tested");
    }
    !SIGNUP.enabled
}

// ------------------------------------------------------------------------ route and offer

async fn disabled_signup_is_not_served(db: &TestDb) {
    let s = db.server().await;
    let pricing = json_of(s.get("/v1/pricing").await).await;
    if SIGNUP.enabled {
        assert_eq!(
            pricing["signup"],
            json!({"path": "/v1/signup", "price_mcents": SIGNUP.price_mcents, "balance_mcents": SIGNUP.balance_mcents,
                   "scopes": SIGNUP.scopes, "rails": SIGNUP.rails})
        );
        return;
    }
    assert_eq!(pricing["signup"], Value::Null);
    expect_error(offer(&s).await, 404, "not_found", false).await;
}

async fn offer_and_request_checks(db: &TestDb) {
    if skip_disabled() {
        return;
    }
    let mpp = MppTest::new();
    let s = db.server_with_signup(Signup::new(x402_rail(&url_of_nothing().await), Some(mpp.rail())).with_secret(SIGNUP_SECRET)).await;

    let res = offer(&s).await;
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    let found = challenges(&res);
    assert_eq!(found.len(), 2, "one WWW-Authenticate per method");
    assert_eq!(found[0].method.as_str(), "alpha");
    assert_eq!(found[1].method.as_str(), "beta");
    for c in &found {
        assert_eq!(c.intent.as_str(), "charge");
        assert_eq!(c.realm, s.addr(), "realm: [signup.mpp] realm, or the request's host");
        assert!(c.verify(SECRET), "HMAC-bound id");
        assert!(!c.is_expired());
        let req: ChargeRequest = c.request.decode().unwrap();
        assert_eq!(req.amount, method_request(c.method.as_str()).amount);
    }
    let header = res.headers().get("payment-required").map(|v| v.to_str().unwrap().to_string());
    let body = expect_error(res, 402, "payment_required", true).await;
    assert_eq!(body["price_mcents"], SIGNUP.price_mcents);
    assert_eq!(body["balance_mcents"], SIGNUP.balance_mcents);
    assert_eq!(body["scopes"], json!(SIGNUP.scopes));
    assert!(body["error"]["message"].as_str().unwrap().starts_with("Pay to sign up"));
    if x402_configured() {
        let header = header.expect("PAYMENT-REQUIRED");
        let decoded = String::from_utf8(B64.decode(&header).unwrap()).unwrap();
        assert_eq!(B64.encode(decoded.as_bytes()), header, "standard base64 with padding");
        assert!(decoded.contains(&expected_requirement()), "the requirement, byte for byte: {decoded}");
        let required: Value = serde_json::from_str(&decoded).unwrap();
        assert_eq!(required["x402Version"], 2);
        assert_eq!(required["error"], body["error"]["message"]);
        for k in ["x402Version", "resource", "accepts", "extensions"] {
            assert_eq!(body[k], required[k], "{k}: body and header carry the same offer");
        }
        assert_eq!(
            body["resource"],
            json!({"url": format!("http://{}/v1/signup", s.addr()), "description": body["resource"]["description"], "mimeType": "application/json"})
        );
        assert_eq!(body["accepts"].as_array().unwrap().len(), 1);
        assert_eq!(body["extensions"], json!({}));
    } else {
        assert!(header.is_none());
        assert!(body.get("x402Version").is_none());
    }

    // Step 3: the optional body and the Idempotency-Key; step 4: one credential.
    let pay = mpp_credential(&found[0], "p-checks");
    let url = s.url("/v1/signup");
    let post = |ct: Option<&str>, body: &str| {
        let mut r = s.client.post(&url).header("Authorization", &pay);
        if let Some(ct) = ct {
            r = r.header("Content-Type", ct);
        }
        r.body(body.to_string()).send()
    };
    expect_error(post(Some("text/plain"), "hi").await.unwrap(), 415, "unsupported_media_type", true).await;
    expect_error(post(Some("application/json"), "{").await.unwrap(), 400, "invalid_json", true).await;
    expect_error(post(Some("application/json"), r#"{"nom":"x"}"#).await.unwrap(), 400, "invalid_input", true).await;
    expect_error(post(Some("application/json"), r#"{"name":"bad/name"}"#).await.unwrap(), 400, "invalid_input", true).await;
    expect_error(post(Some("application/json"), "[]").await.unwrap(), 400, "invalid_input", true).await;
    let big = format!(r#"{{"name":"{}"}}"#, "a".repeat(GATEWAY.max_body_bytes as usize));
    expect_error(post(Some("application/json"), &big).await.unwrap(), 413, "body_too_large", true).await;
    for bad in ["short", &"a".repeat(129), &format!("{}!", "a".repeat(40))] {
        let res = signup(&s, &[("Authorization", &pay), ("Idempotency-Key", bad)]).await;
        expect_error(res, 400, "invalid_input", true).await;
    }
    let two = s.client.post(&url).header("Authorization", &pay).header("X-PAYMENT", "e30=").send().await.unwrap();
    expect_error(two, 400, "invalid_payment", true).await;
    let two = s.client.post(&url).header("Authorization", format!("{pay}, {pay}")).send().await.unwrap();
    expect_error(two, 400, "invalid_payment", true).await;
    // Another Authorization scheme is not a payment credential.
    let bearer = signup(&s, &[("Authorization", &format!("Bearer {}{}", GATEWAY.key_prefix, "a".repeat(64)))]).await;
    expect_error(bearer, 402, "payment_required", true).await;
    assert_eq!(mpp.verified.load(Ordering::SeqCst), 0, "nothing was verified");

    // Routing: POST only; the preflight advertises it.
    let res = s.get("/v1/signup").await;
    assert_eq!(res.headers()["allow"], "POST, OPTIONS");
    expect_error(res, 405, "method_not_allowed", false).await;
    let res = s.client.request(reqwest::Method::OPTIONS, &url).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(res.headers()["access-control-allow-methods"], "POST, OPTIONS");

    // An empty body with any Content-Type (or a JSON name) is fine: this one pays.
    let res = post(Some("application/json"), r#"{"name":"agent-7"}"#).await.unwrap();
    assert_eq!(res.status(), 201);
    let body = json_of(res).await;
    assert_key_works(&s, &body, Some("agent-7")).await;
}

async fn unconfigured_rails_answer_503(db: &TestDb) {
    if skip_disabled() {
        return;
    }
    // The rails of mcpay.toml with no secret in the environment.
    let rails = Signup::from_settings(&Default::default());
    let readiness = rails.ready();
    let s = db.server_with_signup(rails).await;
    match readiness {
        Err(message) => {
            for res in [offer(&s).await, signup(&s, &[("Authorization", "Payment !!!")]).await] {
                let body = expect_error(res, 503, "signup_unavailable", false).await;
                assert_eq!(body["error"]["message"], message);
            }
            assert!(
                ["X402_PAY_TO", "X402_RPC_URL", "MPP_SECRET_KEY", "--features", "TEMPO_RECIPIENT", "STRIPE_SECRET_KEY", "SIGNUP_SECRET"]
                    .iter()
                    .any(|k| message.contains(k)),
                "names what to set: {message}"
            );
        }
        Ok(()) => panic!("signup cannot be ready without SIGNUP_SECRET"),
    }
    let err = MppRail::new("too-short", vec![]).unwrap_err();
    assert!(err.contains("MPP_SECRET_KEY"), "{err}");
}

// ------------------------------------------------------------------------ MPP

async fn mpp_pays_replays_and_refuses(db: &TestDb) {
    if skip_disabled() {
        return;
    }
    let mpp = MppTest::new();
    let s = db.server_with_signup(Signup::new(None, Some(mpp.rail())).with_secret(SIGNUP_SECRET)).await;
    let found = challenges(&offer(&s).await);
    let challenge = &found[1];

    // Pay (method "beta") with an Idempotency-Key.
    let pay = mpp_credential(challenge, "p1");
    let res = signup(&s, &[("Authorization", &pay), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 201);
    let receipt = res.headers().get("payment-receipt").unwrap().to_str().unwrap().to_string();
    let receipt = mpp::parse_receipt(&receipt).unwrap();
    assert!(receipt.is_success());
    assert_eq!(receipt.reference, "ref-p1");
    assert_eq!(receipt.method.as_str(), "beta");
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let minted = json_of(res).await;
    assert_eq!(minted["ok"], true);
    assert_eq!(minted["payment"], json!({"rail": "mpp", "reference": "ref-p1"}));
    assert_eq!(minted["request_id"], rid);
    assert_eq!(minted["name"], Value::Null);
    // The key is derived from the Idempotency-Key and the payment reference.
    assert_eq!(minted["key"], derived_key(SIGNUP_SECRET, &sha256_hex(IDEM), &format!("mpp:{}", challenge.id)));
    assert_key_works(&s, &minted, None).await;
    assert_eq!(mpp.verified.load(Ordering::SeqCst), 1);

    // Replays never verify again: the same Idempotency-Key gets the same body back …
    let res = signup(&s, &[("Authorization", &pay), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("payment-receipt").is_some());
    let replayed = json_of(res).await;
    assert_eq!(replayed["replayed"], true);
    for k in ["key", "key_id", "balance_mcents", "scopes", "name", "payment"] {
        assert_eq!(replayed[k], minted[k], "{k}");
    }
    // … any other request is refused with the key id it bought.
    let other = format!("{}x", &IDEM[..IDEM.len() - 1]);
    for headers in [vec![("Authorization", pay.as_str())], vec![("Authorization", pay.as_str()), ("Idempotency-Key", other.as_str())]] {
        let body = expect_error(signup(&s, &headers).await, 409, "payment_already_used", true).await;
        assert_eq!(body["key_id"], minted["key_id"]);
    }
    assert_eq!(mpp.verified.load(Ordering::SeqCst), 1);

    // Refusals: 402 payment_invalid with the MPP problem type, and the offer again.
    let problem = |p: &str| format!("https://paymentauth.org/problems/{p}");
    let realm = challenge.realm.clone();
    let request = Base64UrlJson::from_typed(&method_request("alpha")).unwrap();
    let future = mpp::expires::minutes(5);
    let cases: Vec<(String, String)> = vec![
        ("Payment !!!".into(), problem("malformed-credential")),
        ("Payment e30".into(), problem("malformed-credential")),
        // Tampered: the echoed request changed, the id did not.
        {
            let mut t = found[0].clone();
            t.request = Base64UrlJson::from_typed(&ChargeRequest { amount: "1".into(), ..method_request("alpha") }).unwrap();
            (mpp_credential(&t, "p2"), problem("invalid-challenge"))
        },
        // Another server's secret.
        {
            let c = PaymentChallenge::with_secret_key_full(
                "another-secret-0123456789abcdef-0123", &realm, "alpha", "charge", request.clone(), Some(future.as_str()), None, None, None, None,
            );
            (mpp_credential(&c, "p2"), problem("invalid-challenge"))
        },
        // Our secret, another realm.
        {
            let c = PaymentChallenge::with_secret_key_full(
                SECRET, "other.example.com", "alpha", "charge", request.clone(), Some(future.as_str()), None, None, None, None,
            );
            (mpp_credential(&c, "p2"), problem("invalid-challenge"))
        },
        // Our secret and realm, expired.
        {
            let c = PaymentChallenge::with_secret_key_full(
                SECRET, &realm, "alpha", "charge", request.clone(), Some("2020-01-01T00:00:00Z"), None, None, None, None,
            );
            (mpp_credential(&c, "p2"), problem("payment-expired"))
        },
        // Our secret and realm, another price.
        {
            let cheap = Base64UrlJson::from_typed(&ChargeRequest { amount: "1".into(), ..method_request("alpha") }).unwrap();
            let c = PaymentChallenge::with_secret_key_full(SECRET, &realm, "alpha", "charge", cheap, Some(future.as_str()), None, None, None, None);
            (mpp_credential(&c, "p2"), problem("invalid-challenge"))
        },
        // A method that is not offered.
        {
            let c = PaymentChallenge::with_secret_key_full(SECRET, &realm, "gamma", "charge", request.clone(), Some(future.as_str()), None, None, None, None);
            (mpp_credential(&c, "p2"), problem("invalid-challenge"))
        },
    ];
    for (credential, expected) in cases {
        let res = signup(&s, &[("Authorization", &credential)]).await;
        assert_eq!(challenges(&res).len(), 2, "the offer again");
        let body = expect_error(res, 402, "payment_invalid", true).await;
        assert_eq!(body["problem"], expected, "{credential}");
    }
    assert_eq!(mpp.verified.load(Ordering::SeqCst), 1, "refused before verification");
    // The challenge id is checked before the payment record is looked at: a forged credential
    // that reuses the paid challenge's id replays nothing, even with the Idempotency-Key.
    for forged in [
        {
            let mut t = challenge.clone();
            t.realm = "other.example.com".into();
            t
        },
        {
            let mut t = challenge.clone();
            t.expires = Some(mpp::expires::minutes(30));
            t
        },
    ] {
        let res = signup(&s, &[("Authorization", &mpp_credential(&forged, "p1")), ("Idempotency-Key", IDEM)]).await;
        let body = expect_error(res, 402, "payment_invalid", true).await;
        assert_eq!(body["problem"], problem("invalid-challenge"));
        assert!(body.get("key").is_none());
    }

    // Refused by the method: the claim is given back, so the same challenge can be paid again.
    let bad = mpp_credential(&found[0], "bad");
    let body = expect_error(signup(&s, &[("Authorization", &bad)]).await, 402, "payment_invalid", true).await;
    assert_eq!(body["problem"], problem("verification-failed"));
    let res = signup(&s, &[("Authorization", &mpp_credential(&found[0], "p3"))]).await;
    assert_eq!(res.status(), 201);
    let second = json_of(res).await;
    assert_ne!(second["key"], minted["key"]);
    assert_key_works(&s, &second, None).await;
    // Without an Idempotency-Key the key is random and cannot be shown again.
    let again = signup(&s, &[("Authorization", &mpp_credential(&found[0], "p3"))]).await;
    expect_error(again, 409, "payment_already_used", true).await;

    // The same receipt bought through another challenge is the same payment.
    let fresh = challenges(&offer(&s).await);
    let reuse = signup(&s, &[("Authorization", &mpp_credential(&fresh[0], "p3")), ("Idempotency-Key", IDEM)]).await;
    let body = expect_error(reuse, 409, "payment_already_used", true).await;
    assert_eq!(body["key_id"], second["key_id"]);

    // Nothing stored holds a key or an Idempotency-Key.
    let dump = db.dump().await;
    for secret in [minted["key"].as_str().unwrap(), second["key"].as_str().unwrap(), IDEM] {
        assert!(!dump.contains(secret), "stored: {secret}");
    }
    assert!(dump.contains(&sha256_hex(IDEM)));
}

async fn mpp_concurrent_submissions_mint_once(db: &TestDb) {
    if skip_disabled() {
        return;
    }
    let (gate, mut entered) = Gate::new();
    let mpp = MppTest { verified: Arc::new(AtomicUsize::new(0)), gate: Some(gate.clone()) };
    // Two instances on one database.
    let a = db.server_with_signup(Signup::new(None, Some(mpp.rail())).with_secret(SIGNUP_SECRET)).await;
    let b = db.server_with_signup(Signup::new(None, Some(mpp.rail())).with_secret(SIGNUP_SECRET)).await;
    let found = challenges(&offer(&a).await);
    let pay = mpp_credential(&found[0], "same");
    let first = {
        let (client, url, pay) = (a.client.clone(), a.url("/v1/signup"), pay.clone());
        tokio::spawn(async move {
            client.post(url).header("Authorization", pay).header("Idempotency-Key", IDEM).send().await.unwrap()
        })
    };
    entered.recv().await.unwrap();
    // While the first request is verifying, every other submission, on either instance, loses.
    // (Both instances serve one host, the realm of the challenge.)
    let host = a.addr();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = if i % 2 == 0 { &a } else { &b };
        let (client, url, pay, host) = (s.client.clone(), s.url("/v1/signup"), pay.clone(), host.clone());
        tasks.push(tokio::spawn(async move {
            client.post(url).header("Host", host).header("Authorization", pay).header("Idempotency-Key", IDEM).send().await.unwrap()
        }));
    }
    for t in tasks {
        let res = t.await.unwrap();
        let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry >= 1);
        expect_error(res, 409, "payment_in_progress", true).await;
    }
    gate.release.add_permits(1);
    let res = first.await.unwrap();
    assert_eq!(res.status(), 201);
    let minted = json_of(res).await;
    assert_eq!(mpp.verified.load(Ordering::SeqCst), 1, "verified once");
    // Afterwards: the replay from the other instance.
    gate.release.add_permits(100);
    let res = signup(&b, &[("Host", &host), ("Authorization", &pay), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 200);
    assert_eq!(json_of(res).await["key"], minted["key"]);
    assert_eq!(mpp.verified.load(Ordering::SeqCst), 1);
    assert_eq!(db.dump().await.matches("\"done\"").count(), 1, "one payment record");
}

async fn signup_budget_is_its_own(db: &TestDb) {
    if skip_disabled() {
        return;
    }
    let mpp = MppTest::new();
    let mut signup_cfg = Signup::new(None, Some(mpp.rail())).with_secret(SIGNUP_SECRET);
    signup_cfg.per_hour = 2;
    let s = db.server_with_signup(signup_cfg).await;
    // A refused payment gives its slot back.
    for _ in 0..3 {
        let c = challenges(&offer(&s).await);
        expect_error(signup(&s, &[("Authorization", &mpp_credential(&c[0], "bad"))]).await, 402, "payment_invalid", true).await;
    }
    let mut paid = Vec::new();
    for proof in ["b1", "b2"] {
        let c = challenges(&offer(&s).await);
        let credential = mpp_credential(&c[0], proof);
        assert_eq!(signup(&s, &[("Authorization", &credential)]).await.status(), 201);
        paid.push(credential);
    }
    let fresh = challenges(&offer(&s).await);
    let res = signup(&s, &[("Authorization", &mpp_credential(&fresh[0], "b3"))]).await;
    let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let body = expect_error(res, 429, "rate_limited", true).await;
    assert_eq!(body["retry_after_seconds"], retry);
    assert!((1..=3600).contains(&retry));
    assert_eq!(mpp.verified.load(Ordering::SeqCst), 5, "the limited request was not verified");
    // A used payment is still answered (replay check comes first).
    expect_error(signup(&s, &[("Authorization", &paid[0])]).await, 409, "payment_already_used", true).await;
    // The admin mint budget is separate.
    let res = s.mint(&json!({"balance_mcents": 10, "scopes": [SIGNUP.scopes[0]]}), ADMIN_KEY).await;
    assert_eq!(res.status(), 201);
}

/// SIGNUP_SECRET is required (≥ 32 bytes) before anything of the request is read.
async fn signup_secret_is_required(db: &TestDb) {
    if skip_disabled() {
        return;
    }
    let mpp = MppTest::new();
    for (secret, what) in [(None, "SIGNUP_SECRET"), (Some("too-short-secret"), "SIGNUP_SECRET is shorter than 32 bytes")] {
        let mut rails = Signup::new(None, Some(mpp.rail()));
        if let Some(secret) = secret {
            rails = rails.with_secret(secret);
        }
        let s = db.server_with_signup(rails).await;
        let c = challenges(&offer(&MppServer::of(db, &mpp).await).await);
        for res in [offer(&s).await, signup(&s, &[("Authorization", &mpp_credential(&c[0], "p-secret"))]).await] {
            let body = expect_error(res, 503, "signup_unavailable", false).await;
            assert!(body["error"]["message"].as_str().unwrap().contains(what), "{body}");
        }
    }
    assert_eq!(mpp.verified.load(Ordering::SeqCst), 0);
    assert_eq!(db.signup_claims().await, 0, "nothing was read or claimed");
}

/// A ready MPP-only server (for its challenges).
struct MppServer;

impl MppServer {
    async fn of(db: &TestDb, mpp: &MppTest) -> TestServer {
        db.server_with_signup(Signup::new(None, Some(mpp.rail())).with_secret(SIGNUP_SECRET)).await
    }
}

// ------------------------------------------------------------------------ x402 (the offer only; see tests/signup_x402.rs)

fn x402_configured() -> bool {
    cfg!(feature = "x402") && SIGNUP.enabled && SIGNUP.x402.is_some()
}

#[cfg(feature = "x402")]
fn x402_rail(facilitator: &str) -> Option<gateway::signup::X402Rail> {
    let cfg = SIGNUP.x402?;
    Some(gateway::signup::X402Rail::new(&cfg, facilitator, PAY_TO).unwrap().with_rpc_url(facilitator).unwrap())
}

#[cfg(not(feature = "x402"))]
fn x402_rail(_: &str) -> Option<gateway::signup::X402Rail> {
    None
}

