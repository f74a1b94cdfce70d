//! POST /v1/signup on the x402 rail (docs/contract.md, 3.9), end to end over HTTP, against a
//! deterministic facilitator and a deterministic EVM JSON-RPC chain served by this test
//! (tests/common/x402.rs), with really signed EIP-3009 authorizations: the offer, payments,
//! replays, refusals, and exactly-once delivery when the settlement's outcome is unknown
//! (settled then 500, settled then hang past X402_FACILITATOR_TIMEOUT_MS, `settlement_pending`):
//! `202 payment_pending`, then the next request or the sweep alone mints the one key; forged
//! payments read nothing; expired / cancelled authorizations are released; the admin listing;
//! a request killed mid-settlement is resolved by the sweep. Tests count settlements, chain
//! transfers, keys and mint rows, not only statuses.
//!
//! With TEST_X402_CHAIN set to the JSON line printed by tests/chain/chain.mjs (anvil, Circle's
//! FiatToken, the official @x402 facilitator), `x402_real_chain` runs the same recovery against
//! the real chain. Every test runs on SQLite, and on PostgreSQL (+ Redis) when TEST_DATABASE_URL
//! is set.
#![cfg(feature = "x402")]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::x402::*;
use common::*;
use gateway::generated::{SIGNUP, SignupX402Config};
use gateway::keys::sha256_hex;
use gateway::signup::{Signup, X402Rail, derived_key};
use serde_json::{Value, json};

backend_tests!(
    x402_pays_and_replays,
    x402_refusals,
    x402_v1_payment,
    x402_facilitator_failures,
    x402_facilitator_authorization,
    x402_concurrent_submissions_mint_once,
    x402_unknown_outcomes_resolve_on_the_next_request,
    x402_pending_without_idempotency_key,
    x402_sweep_alone_resolves,
    x402_forged_payment_reads_nothing,
    x402_expired_and_cancelled_are_released,
    x402_expiry_follows_the_chain_clock,
    x402_killed_request_is_resolved_by_the_sweep,
    admin_payments_listing,
    derived_keys_depend_on_the_secret,
    x402_real_chain,
);


fn payer() -> Payer {
    Payer::new(7)
}

fn skip() -> bool {
    let on = SIGNUP.enabled && SIGNUP.x402.is_some();
    if !on {
        eprintln!("no [signup.x402] in mcpay.toml (or signup is disabled): skipped");
    }
    !on
}

/// The rail of mcpay.toml with this test's facilitator, chain and payee.
fn rail(f: &Facilitator) -> X402Rail {
    X402Rail::new(&SIGNUP.x402.unwrap(), &f.url, PAY_TO).unwrap().with_rpc_url(&f.chain.url).unwrap()
}

fn rails(f: &Facilitator) -> Signup {
    Signup::new(Some(rail(f)), None).with_secret(SIGNUP_SECRET)
}

async fn accepted_requirement(s: &TestServer) -> Value {
    let body = json_of(offer(s).await).await;
    body["accepts"][0].clone()
}

fn reference(nonce: &str) -> String {
    let x = SIGNUP.x402.unwrap();
    format!("x402:{}:{}:{}:{}", x.network, x.asset, payer().address, nonce).to_lowercase()
}

/// The transaction the fake chain records for this payer's nonce.
fn tx_of(nonce: &str) -> String {
    format!("0x{}", sha256_hex(&format!("{}{}", payer().address, nonce)))
}

/// The key a payment with this Idempotency-Key buys.
fn key_for(idem: &str, reference: &str) -> String {
    derived_key(SIGNUP_SECRET, &sha256_hex(idem), reference)
}

/// A `202 payment_pending` for `reference`: Retry-After, no note, the payment and the key to retry with.
async fn expect_pending(res: reqwest::Response, reference: &str, transaction: Option<&str>) -> Value {
    assert_eq!(res.headers()["retry-after"], "5");
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body = expect_error(res, 202, "payment_pending", false).await;
    assert_eq!(body["payment"], json!({ "rail": "x402", "reference": reference, "state": "pending", "transaction": transaction }));
    assert_eq!(body["retry_after_seconds"], 5);
    assert!(body.get("key").is_none() && body.get("key_id").is_none());
    body
}

async fn admin_payments(s: &TestServer, query: &str) -> reqwest::Response {
    s.client.get(s.url(&format!("/v1/admin/payments{query}"))).header("X-Admin-Key", ADMIN_KEY).send().await.unwrap()
}

/// The admin listing's row for `reference`.
async fn listed(s: &TestServer, reference: &str) -> Value {
    let body = json_of(admin_payments(s, "?limit=500").await).await;
    body["payments"].as_array().unwrap().iter().find(|p| p["reference"] == reference).cloned().unwrap_or(Value::Null)
}

// ------------------------------------------------------------------------ payments and refusals

async fn x402_pays_and_replays(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(rails(&f)).await;
    let accepted = accepted_requirement(&s).await;
    assert_eq!(accepted.to_string(), expected_requirement());
    let pay = payer().header(&accepted, &nonce(1), FOREVER);
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 201);
    let settled: Value = serde_json::from_slice(&B64.decode(res.headers()["payment-response"].as_bytes()).unwrap()).unwrap();
    assert_eq!(settled["success"], true);
    let tx = tx_of(&nonce(1));
    assert_eq!(settled["transaction"], tx);
    let minted = json_of(res).await;
    assert_eq!(minted["payment"], json!({"rail": "x402", "reference": tx}));
    assert_eq!(minted["key"], key_for(IDEM, &reference(&nonce(1))));
    assert_key_works(&s, &minted, None).await;
    // The facilitator got {x402Version, paymentPayload, paymentRequirements}, verify then settle.
    for path in ["verify", "settle"] {
        let calls = f.calls(path);
        assert_eq!(calls.len(), 1, "{path}");
        assert_eq!(calls[0]["x402Version"], 2);
        assert_eq!(calls[0]["paymentRequirements"], accepted);
        assert_eq!(calls[0]["paymentPayload"]["accepted"], accepted);
        assert_eq!(calls[0]["paymentPayload"]["payload"], payer().payload(&accepted, &nonce(1), FOREVER));
    }

    // The same payment again: replay with the same Idempotency-Key, refusal otherwise.
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("payment-response").is_some());
    let replayed = json_of(res).await;
    assert_eq!(replayed["replayed"], true);
    assert_eq!(replayed["key"], minted["key"]);
    assert_eq!(replayed["payment"], minted["payment"]);
    let body = expect_error(signup(&s, &[("PAYMENT-SIGNATURE", &pay)]).await, 409, "payment_already_used", true).await;
    assert_eq!(body["key_id"], minted["key_id"]);
    // The same authorization sent as v1 (X-PAYMENT) is the same payment.
    let v1 = B64.encode(json!({ "x402Version": 1, "scheme": "exact", "network": accepted["network"], "payload": payer().payload(&accepted, &nonce(1), FOREVER) }).to_string());
    let res = signup(&s, &[("X-PAYMENT", &v1)]).await;
    expect_error(res, 409, "payment_already_used", true).await;
    assert_eq!(f.calls("verify").len(), 1, "a used payment is never verified again");
    assert_eq!(f.calls("settle").len(), 1);
    // No credential of the gateway's or the buyer's reaches the facilitator unless configured.
    assert_eq!(f.authorizations(), [None, None]);
}

/// X402_FACILITATOR_AUTHORIZATION is the `Authorization` of every facilitator call; a buyer's
/// `Authorization` header is never forwarded in its place.
async fn x402_facilitator_authorization(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(Signup::new(Some(rail(&f).with_authorization("Bearer fac-key").unwrap()), None).with_secret(SIGNUP_SECRET)).await;
    let accepted = accepted_requirement(&s).await;
    let pay = payer().header(&accepted, &nonce(12), FOREVER);
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Authorization", "Bearer buyer-secret")]).await;
    assert_eq!(res.status(), 201);
    assert_eq!(f.authorizations(), [Some("Bearer fac-key".to_string()), Some("Bearer fac-key".to_string())]);
}

async fn x402_refusals(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(rails(&f)).await;
    let accepted = accepted_requirement(&s).await;
    let mut cheaper = accepted.clone();
    cheaper["amount"] = json!("1");
    let mut other_pay_to = accepted.clone();
    other_pay_to["payTo"] = json!(format!("0x{}", "1".repeat(40)));
    let mut wrong_value = json!({ "x402Version": 2, "accepted": accepted, "payload": payer().payload(&accepted, &nonce(5), FOREVER) });
    wrong_value["payload"]["authorization"]["value"] = json!("1");
    let mut no_nonce = json!({ "x402Version": 2, "accepted": accepted, "payload": payer().payload(&accepted, &nonce(5), FOREVER) });
    no_nonce["payload"]["authorization"]["nonce"] = json!("0x12");
    for bad in [
        "not base64!".to_string(),
        B64.encode("not json"),
        B64.encode(json!({ "x402Version": 1, "accepted": accepted, "payload": payer().payload(&accepted, &nonce(5), FOREVER) }).to_string()),
        payer().header(&cheaper, &nonce(5), FOREVER),
        payer().header(&other_pay_to, &nonce(5), FOREVER),
        B64.encode(wrong_value.to_string()),
        B64.encode(no_nonce.to_string()),
    ] {
        let res = signup(&s, &[("PAYMENT-SIGNATURE", &bad)]).await;
        assert!(res.headers().get("payment-required").is_some(), "the offer again");
        let body = expect_error(res, 402, "payment_invalid", true).await;
        assert_eq!(body["accepts"][0], accepted);
    }
    let pay = payer().header(&accepted, &nonce(5), FOREVER);
    let two = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("X-PAYMENT", &pay)]).await;
    expect_error(two, 400, "invalid_payment", true).await;
    let two = s.client.post(s.url("/v1/signup")).header("PAYMENT-SIGNATURE", &pay).header("PAYMENT-SIGNATURE", &pay).send().await.unwrap();
    expect_error(two, 400, "invalid_payment", true).await;
    assert!(f.calls("verify").is_empty(), "nothing reached the facilitator");
}

async fn x402_v1_payment(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(rails(&f)).await;
    let accepted = accepted_requirement(&s).await;
    let x = SIGNUP.x402.unwrap();
    let v1 = |network: &str, scheme: &str, n: u64| {
        B64.encode(json!({ "x402Version": 1, "scheme": scheme, "network": network, "payload": payer().payload(&accepted, &nonce(n), FOREVER) }).to_string())
    };
    for bad in [v1(x.network, "upto", 7), v1("eip155:1", "exact", 7), v1("solana", "exact", 7)] {
        let res = signup(&s, &[("X-PAYMENT", &bad)]).await;
        expect_error(res, 402, "payment_invalid", true).await;
    }
    let res = signup(&s, &[("X-PAYMENT", &v1(x.network, "exact", 7))]).await;
    assert_eq!(res.status(), 201);
    assert!(res.headers().get("payment-response").is_none());
    let settled: Value = serde_json::from_slice(&B64.decode(res.headers()["x-payment-response"].as_bytes()).unwrap()).unwrap();
    assert_eq!(settled["success"], true);
    assert_key_works(&s, &json_of(res).await, None).await;
    // Converted to v2: the facilitator sees our requirement as `accepted`.
    let verify = &f.calls("verify")[0];
    assert_eq!(verify["x402Version"], 2);
    assert_eq!(verify["paymentPayload"]["x402Version"], 2);
    assert_eq!(verify["paymentPayload"]["accepted"], accepted);
    assert_eq!(verify["paymentPayload"]["payload"], payer().payload(&accepted, &nonce(7), FOREVER));
    // The v1 network name of the same chain is ours too (e.g. "base" for eip155:8453).
    let v1_name = match x.network {
        "eip155:8453" => Some("base"),
        "eip155:84532" => Some("base-sepolia"),
        _ => None,
    };
    if let Some(name) = v1_name {
        assert_eq!(signup(&s, &[("X-PAYMENT", &v1(name, "exact", 8))]).await.status(), 201);
    }
}

async fn x402_facilitator_failures(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let mut signup_rails = rails(&f);
    signup_rails.per_hour = 1;
    let s = db.server_with_signup(signup_rails).await;
    let accepted = accepted_requirement(&s).await;
    let pay = payer().header(&accepted, &nonce(9), FOREVER);
    // Failures before any money can move give the claim and the budget slot back (the budget
    // here is one signup) and say "no charge applied".
    f.set(Answer::Refuse, Answer::Ok);
    let body = expect_error(signup(&s, &[("PAYMENT-SIGNATURE", &pay)]).await, 402, "payment_invalid", true).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("invalid_exact_evm_payload_signature"));
    assert_eq!(f.calls("settle").len(), 0, "an invalid payment is not settled");
    f.set(Answer::RefuseWithStatus, Answer::Ok);
    let body = expect_error(signup(&s, &[("PAYMENT-SIGNATURE", &pay)]).await, 402, "payment_invalid", true).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("valid_before (expired)"), "{body}");
    f.set(Answer::Http500, Answer::Ok);
    expect_error(signup(&s, &[("PAYMENT-SIGNATURE", &pay)]).await, 502, "payment_unavailable", true).await;
    let down = db
        .server_with_signup(
            Signup::new(Some(X402Rail::new(&SIGNUP.x402.unwrap(), &url_of_nothing().await, PAY_TO).unwrap().with_rpc_url(&f.chain.url).unwrap()), None)
                .with_secret(SIGNUP_SECRET),
        )
        .await;
    expect_error(signup(&down, &[("PAYMENT-SIGNATURE", &pay)]).await, 502, "payment_unavailable", true).await;
    // The chain unreachable before settling: nothing was sent to /settle.
    f.set(Answer::Ok, Answer::Ok);
    f.chain.state.down.store(true, Ordering::SeqCst);
    let body = expect_error(signup(&s, &[("PAYMENT-SIGNATURE", &pay)]).await, 502, "payment_unavailable", true).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("JSON-RPC"), "{body}");
    f.chain.state.down.store(false, Ordering::SeqCst);
    assert_eq!(f.calls("settle").len(), 0);
    // Refused at settlement, and the chain confirms nothing moved: released, "no charge applied".
    f.set(Answer::Ok, Answer::Refuse);
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay)]).await;
    assert!(res.headers().get("payment-required").is_some());
    let body = expect_error(res, 402, "payment_failed", true).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("insufficient_funds"));
    assert!(body["error"]["message"].as_str().unwrap().contains("checked on chain"));
    f.set(Answer::Ok, Answer::RefuseWithStatus);
    let body = expect_error(signup(&s, &[("PAYMENT-SIGNATURE", &pay)]).await, 402, "payment_failed", true).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("unexpected_settle_error (reverted)"), "{body}");
    assert_eq!(db.payment_state(&reference(&nonce(9))).await.as_deref(), Some("released"));
    // A 5xx of /settle (here: nothing moved) is an unknown outcome: pending, never "no charge".
    f.set(Answer::Ok, Answer::Http500);
    let body = expect_error(signup(&s, &[("PAYMENT-SIGNATURE", &pay)]).await, 202, "payment_pending", false).await;
    assert_eq!(body["payment"]["state"], "pending");
    assert_eq!(db.payment_state(&reference(&nonce(9))).await.as_deref(), Some("pending"));
    // The next request (with the Idempotency-Key the gateway made) resolves it: the chain shows no
    // transfer and the authorization is still valid, so it is settled again — and this time it is.
    let idem = body["idempotency_key"].as_str().unwrap().to_string();
    f.set(Answer::Ok, Answer::Ok);
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", &idem)]).await;
    assert_eq!(res.status(), 201);
    assert_key_works(&s, &json_of(res).await, None).await;
    assert_eq!(f.chain.state.transfers(), 1, "the money moved once");
    assert_eq!(f.calls("verify").len(), 7, "the pending payment was not verified again");
    let other = payer().header(&accepted, &nonce(10), FOREVER);
    expect_error(signup(&s, &[("PAYMENT-SIGNATURE", &other)]).await, 429, "rate_limited", true).await;
}

async fn x402_concurrent_submissions_mint_once(db: &TestDb) {
    if skip() {
        return;
    }
    let (gate, mut entered) = Gate::new();
    let f = Facilitator::start(Some(gate.clone())).await;
    let a = db.server_with_signup(rails(&f)).await;
    let b = db.server_with_signup(rails(&f)).await;
    let accepted = accepted_requirement(&a).await;
    let pay = payer().header(&accepted, &nonce(11), FOREVER);
    let first = {
        let (client, url, pay) = (a.client.clone(), a.url("/v1/signup"), pay.clone());
        tokio::spawn(async move { client.post(url).header("PAYMENT-SIGNATURE", pay).send().await.unwrap() })
    };
    entered.recv().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = if i % 2 == 0 { &a } else { &b };
        let (client, url, pay) = (s.client.clone(), s.url("/v1/signup"), pay.clone());
        tasks.push(tokio::spawn(async move { client.post(url).header("PAYMENT-SIGNATURE", pay).send().await.unwrap() }));
    }
    for t in tasks {
        let res = t.await.unwrap();
        assert!(res.headers().get("retry-after").is_some());
        expect_error(res, 409, "payment_in_progress", true).await;
    }
    gate.release.add_permits(1);
    let res = first.await.unwrap();
    assert_eq!(res.status(), 201);
    let minted = json_of(res).await;
    gate.release.add_permits(100);
    let body = expect_error(signup(&b, &[("PAYMENT-SIGNATURE", &pay)]).await, 409, "payment_already_used", true).await;
    assert_eq!(body["key_id"], minted["key_id"]);
    assert_eq!(f.calls("verify").len(), 1);
    assert_eq!(f.calls("settle").len(), 1);
}

// ------------------------------------------------------------------------ unknown outcomes

/// Settled, but the answer is a 500 / never comes (past X402_FACILITATOR_TIMEOUT_MS) /
/// `settlement_pending`: 202 with the reference; the next request mints the one key from the chain.
async fn x402_unknown_outcomes_resolve_on_the_next_request(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    // One facilitator call is bounded by 1 s here (X402_FACILITATOR_TIMEOUT_MS; the hang is 30 s).
    let rails = Signup::new(Some(rail(&f).with_timeout(Duration::from_millis(1000))), None).with_secret(SIGNUP_SECRET);
    let s = db.server_with_signup(rails).await;
    let accepted = accepted_requirement(&s).await;
    for (i, answer) in [Answer::SettleThen500, Answer::SettleThenHang, Answer::SettlementPending].into_iter().enumerate() {
        let n = nonce(100 + i as u64);
        let idem = format!("{IDEM}-{i}");
        let r = reference(&n);
        let pay = payer().header(&accepted, &n, FOREVER);
        f.set(Answer::Ok, answer);
        let settles = f.calls("settle").len();
        let mints = db.mint_rows().await;
        let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", &idem)]).await;
        let tx = (answer == Answer::SettlementPending).then(|| tx_of(&n));
        let body = expect_pending(res, &r, tx.as_deref()).await;
        assert_eq!(body["idempotency_key"], idem.as_str());
        assert_eq!(db.payment_state(&r).await.as_deref(), Some("pending"), "{answer:?}");
        assert_eq!(f.chain.state.transfers(), i + 1, "the money moved");
        assert_eq!(db.mint_rows().await, mints, "no key yet");
        assert_eq!(listed(&s, &r).await["state"], "pending");
        // The facilitator is healthy again; the same request collects the key, from the chain.
        f.set(Answer::Ok, Answer::Ok);
        let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", &idem)]).await;
        assert_eq!(res.status(), 201, "{answer:?}");
        let settled: Value = serde_json::from_slice(&B64.decode(res.headers()["payment-response"].as_bytes()).unwrap()).unwrap();
        assert_eq!(settled["success"], true);
        assert_eq!(settled["transaction"], tx_of(&n));
        let minted = json_of(res).await;
        assert_eq!(minted["key"], key_for(&idem, &r));
        assert_eq!(minted["payment"], json!({"rail": "x402", "reference": tx_of(&n)}));
        assert_key_works(&s, &minted, None).await;
        // Counted: one settlement, one transfer, one key, one mint row.
        assert_eq!(f.calls("settle").len(), settles + 1, "not settled again: the chain showed the transfer");
        assert_eq!(f.chain.state.transfers(), i + 1);
        assert_eq!(db.mint_rows().await, mints + 1);
        // Afterwards: the usual replay; the admin listing shows it done.
        let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", &idem)]).await;
        assert_eq!(res.status(), 200);
        assert_eq!(json_of(res).await["key"], minted["key"]);
        let row = listed(&s, &r).await;
        assert_eq!(row["state"], "done");
        assert_eq!(row["key_id"], minted["key_id"]);
        assert_eq!(row["transaction"], tx_of(&n));
    }
    assert_eq!(f.calls("verify").len(), 3, "verified once per payment");
}

/// Without an Idempotency-Key the gateway makes one, returned only in the 202: it collects the key.
async fn x402_pending_without_idempotency_key(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(rails(&f)).await;
    let accepted = accepted_requirement(&s).await;
    let n = nonce(150);
    let r = reference(&n);
    let pay = payer().header(&accepted, &n, FOREVER);
    f.set(Answer::Ok, Answer::SettleThen500);
    let body = expect_pending(signup(&s, &[("PAYMENT-SIGNATURE", &pay)]).await, &r, None).await;
    let made = body["idempotency_key"].as_str().unwrap().to_string();
    assert_eq!(made.len(), 43);
    assert!(made.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{made}");
    // Someone presenting the payment without that key resolves it, but is not shown the key.
    f.set(Answer::Ok, Answer::Ok);
    let body = expect_error(signup(&s, &[("PAYMENT-SIGNATURE", &pay)]).await, 409, "payment_already_used", true).await;
    assert!(body.get("key").is_none());
    let key_id = body["key_id"].clone();
    // The holder of the gateway-made key gets it.
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", &made)]).await;
    assert_eq!(res.status(), 200);
    let replayed = json_of(res).await;
    assert_eq!(replayed["key"], key_for(&made, &r));
    assert_eq!(replayed["key_id"], key_id);
    assert_key_works(&s, &replayed, None).await;
    assert_eq!((f.calls("settle").len(), f.chain.state.transfers(), db.mint_rows().await), (1, 1, 1));
    assert!(!db.dump().await.contains(&made), "only the hash of the Idempotency-Key is stored");
}

/// The sweep alone (no request) resolves pending payments and mints their keys; the payer then
/// collects the key. The sweep task of a serving gateway runs at start-up and every period.
async fn x402_sweep_alone_resolves(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(rails(&f)).await;
    let accepted = accepted_requirement(&s).await;
    let n = nonce(200);
    let r = reference(&n);
    let pay = payer().header(&accepted, &n, FOREVER);
    f.set(Answer::Ok, Answer::SettleThen500);
    expect_pending(signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", IDEM)]).await, &r, None).await;
    f.set(Answer::Ok, Answer::Ok);
    // Another instance's sweep, alone.
    let other = db.signup_state(rails(&f)).await;
    assert_eq!(gateway::signup::sweep(&other).await, 1);
    assert_eq!(db.payment_state(&r).await.as_deref(), Some("done"));
    assert_eq!(db.mint_rows().await, 1);
    assert_eq!(gateway::signup::sweep(&other).await, 0, "nothing left to resolve");
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 200);
    let replayed = json_of(res).await;
    assert_eq!(replayed["replayed"], true);
    assert_eq!(replayed["key"], key_for(IDEM, &r));
    assert_key_works(&s, &replayed, None).await;
    assert_eq!((f.calls("settle").len(), f.chain.state.transfers(), db.mint_rows().await), (1, 1, 1));

    // The task: a settlement_pending payment, resolved by a started sweeper without any request.
    let n2 = nonce(201);
    let r2 = reference(&n2);
    f.set(Answer::Ok, Answer::SettlementPending);
    let pay2 = payer().header(&accepted, &n2, FOREVER);
    expect_pending(signup(&s, &[("PAYMENT-SIGNATURE", &pay2), ("Idempotency-Key", IDEM)]).await, &r2, Some(&tx_of(&n2))).await;
    let mut fast = rails(&f);
    fast.sweep_every = Duration::from_millis(100);
    let task = gateway::signup::spawn_sweeper(db.signup_state(fast).await).expect("signup is ready: the sweeper runs");
    let mut waited = 0;
    while db.payment_state(&r2).await.as_deref() != Some("done") {
        assert!(waited < 100, "the sweeper resolved nothing in 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    task.abort();
    assert_eq!((f.calls("settle").len(), f.chain.state.transfers(), db.mint_rows().await), (2, 2, 2));
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay2), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(json_of(res).await["key"], key_for(IDEM, &r2));
}

/// A payload copying a settled payment's public from / nonce, unsigned or wrongly signed, gets
/// 402 payment_invalid: no key, no key_id, and no payment record is read (no claim happened).
async fn x402_forged_payment_reads_nothing(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(rails(&f)).await;
    let accepted = accepted_requirement(&s).await;
    let n = nonce(300);
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &payer().header(&accepted, &n, FOREVER)), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 201);
    let minted = json_of(res).await;
    let claims = db.signup_claims().await;
    let calls = (f.calls("verify").len(), f.calls("settle").len());
    let real = payer().payload(&accepted, &n, FOREVER);
    let with_signature = |sig: String| {
        let mut p = real.clone();
        p["signature"] = json!(sig);
        p
    };
    let mut altered = real.clone();
    altered["authorization"]["validBefore"] = json!("99999999998");
    let forgeries = [
        with_signature("0x".into()),
        with_signature(format!("0x{}", "00".repeat(65))),
        with_signature(format!("0x{}", "ab".repeat(65))),
        with_signature(Payer::new(8).sign(&real["authorization"], &accepted)),
        altered,
    ];
    for forged in forgeries {
        let header = B64.encode(json!({ "x402Version": 2, "accepted": accepted, "payload": forged }).to_string());
        let res = signup(&s, &[("PAYMENT-SIGNATURE", &header), ("Idempotency-Key", IDEM)]).await;
        let body = expect_error(res, 402, "payment_invalid", true).await;
        assert!(body.get("key").is_none() && body.get("key_id").is_none(), "{body}");
        assert!(!body.to_string().contains(minted["key_id"].as_str().unwrap()), "{body}");
    }
    assert_eq!(db.signup_claims().await, claims, "no payment record was read for a forged payment");
    assert_eq!((f.calls("verify").len(), f.calls("settle").len()), calls);
}

/// A pending payment that can no longer move is released, from the chain's word: expired
/// (validBefore passed) or cancelled by the payer. Never settled again.
async fn x402_expired_and_cancelled_are_released(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(rails(&f)).await;
    let accepted = accepted_requirement(&s).await;
    // Expired: valid for 2 more seconds; /settle answers 500 and nothing moved.
    let n1 = nonce(400);
    let valid_before = now_secs() + 2;
    let pay1 = payer().header(&accepted, &n1, valid_before);
    f.set(Answer::Ok, Answer::Http500);
    expect_pending(signup(&s, &[("PAYMENT-SIGNATURE", &pay1), ("Idempotency-Key", IDEM)]).await, &reference(&n1), None).await;
    while now_secs() <= valid_before {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f.set(Answer::Ok, Answer::Ok);
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay1), ("Idempotency-Key", IDEM)]).await;
    let body = expect_error(res, 402, "payment_failed", true).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("expired without being settled"), "{body}");
    assert_eq!(db.payment_state(&reference(&n1)).await.as_deref(), Some("released"));
    assert_eq!(listed(&s, &reference(&n1)).await["state"], "released");
    // Cancelled by the payer before anything moved.
    let n2 = nonce(401);
    let pay2 = payer().header(&accepted, &n2, FOREVER);
    f.set(Answer::Ok, Answer::Http500);
    expect_pending(signup(&s, &[("PAYMENT-SIGNATURE", &pay2), ("Idempotency-Key", IDEM)]).await, &reference(&n2), None).await;
    f.chain.state.cancel(&payer().address, &n2);
    f.set(Answer::Ok, Answer::Ok);
    let body = expect_error(signup(&s, &[("PAYMENT-SIGNATURE", &pay2)]).await, 402, "payment_failed", true).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("cancelled"), "{body}");
    assert_eq!(db.payment_state(&reference(&n2)).await.as_deref(), Some("released"));
    // The sweep releases an expired one on its own.
    let n3 = nonce(402);
    let valid_before = now_secs() + 2;
    f.set(Answer::Ok, Answer::Http500);
    expect_pending(
        signup(&s, &[("PAYMENT-SIGNATURE", &payer().header(&accepted, &n3, valid_before))]).await,
        &reference(&n3),
        None,
    )
    .await;
    while now_secs() <= valid_before {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gateway::signup::sweep(&*db.signup_state(rails(&f)).await).await, 1);
    assert_eq!(db.payment_state(&reference(&n3)).await.as_deref(), Some("released"));
    // Counted: three settlement attempts (one each), nothing moved, no key.
    assert_eq!((f.calls("settle").len(), f.chain.state.transfers(), db.mint_rows().await), (3, 0, 0));
}

/// Expiry is the chain's clock, not this server's: with the server's clock past validBefore but
/// the chain's blocks stamped earlier, the facilitator's transfer may still be mined, so the
/// payment stays pending (a request and the sweep); mined → the key; never mined → released only
/// once the chain's clock passes validBefore.
async fn x402_expiry_follows_the_chain_clock(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(rails(&f)).await;
    let accepted = accepted_requirement(&s).await;
    let n1 = nonce(450);
    let valid_before = now_secs() + 1;
    let pay1 = payer().header(&accepted, &n1, valid_before);
    f.set(Answer::Ok, Answer::Http500);
    expect_pending(signup(&s, &[("PAYMENT-SIGNATURE", &pay1), ("Idempotency-Key", IDEM)]).await, &reference(&n1), None).await;
    while now_secs() <= valid_before {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f.chain.state.clock_offset_secs.store(-30, std::sync::atomic::Ordering::SeqCst);
    f.set(Answer::Ok, Answer::Refuse);
    expect_pending(signup(&s, &[("PAYMENT-SIGNATURE", &pay1), ("Idempotency-Key", IDEM)]).await, &reference(&n1), None).await;
    gateway::signup::sweep(&*db.signup_state(rails(&f)).await).await;
    assert_eq!(db.payment_state(&reference(&n1)).await.as_deref(), Some("pending"));
    assert!(f.chain.state.calls("eth_getBlockByNumber") >= 2);
    // The transfer in flight is mined (in a block stamped before validBefore): the key, paid once.
    f.chain.state.transfer(&payer().address, &n1).unwrap();
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay1), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status().as_u16(), 201);
    assert_eq!(f.chain.state.transfers(), 1);
    // Never mined: pending while the chain is behind, released once its clock passes validBefore.
    let n2 = nonce(451);
    let valid_before = now_secs() + 1;
    f.chain.state.clock_offset_secs.store(0, std::sync::atomic::Ordering::SeqCst);
    f.set(Answer::Ok, Answer::Http500);
    let pay2 = payer().header(&accepted, &n2, valid_before);
    expect_pending(signup(&s, &[("PAYMENT-SIGNATURE", &pay2), ("Idempotency-Key", IDEM)]).await, &reference(&n2), None).await;
    while now_secs() <= valid_before {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f.chain.state.clock_offset_secs.store(-30, std::sync::atomic::Ordering::SeqCst);
    gateway::signup::sweep(&*db.signup_state(rails(&f)).await).await;
    assert_eq!(db.payment_state(&reference(&n2)).await.as_deref(), Some("pending"));
    f.chain.state.clock_offset_secs.store(0, std::sync::atomic::Ordering::SeqCst);
    gateway::signup::sweep(&*db.signup_state(rails(&f)).await).await;
    assert_eq!(db.payment_state(&reference(&n2)).await.as_deref(), Some("released"));
    assert_eq!(f.chain.state.transfers(), 1);
}

/// Kill-safety: a request dies while its payment is `settling` (the facilitator took the money
/// and never answered). After the claim's lease, another instance's sweep resolves it from the
/// chain and mints the key; the payer collects it anywhere.
async fn x402_killed_request_is_resolved_by_the_sweep(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    f.set(Answer::Ok, Answer::SettleThenHang);
    let mut a_rails = rails(&f);
    a_rails.lease = Duration::from_secs(1);
    let a = db.server_with_signup(a_rails).await;
    let accepted = accepted_requirement(&a).await;
    let n = nonce(500);
    let r = reference(&n);
    let pay = payer().header(&accepted, &n, FOREVER);
    let stuck = {
        let (client, url, pay) = (a.client.clone(), a.url("/v1/signup"), pay.clone());
        tokio::spawn(async move { client.post(url).header("PAYMENT-SIGNATURE", pay).header("Idempotency-Key", IDEM).send().await })
    };
    while f.calls("settle").is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(db.payment_state(&r).await.as_deref(), Some("settling"), "recorded before settling");
    assert_eq!(f.chain.state.transfers(), 1);
    // Within the lease, the sweep leaves it alone (its request may still finish).
    let b = db.signup_state(rails(&f)).await;
    assert_eq!(gateway::signup::sweep(&b).await, 0);
    let res = signup(&a, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", IDEM)]).await;
    expect_error(res, 409, "payment_in_progress", true).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(gateway::signup::sweep(&b).await, 1);
    assert_eq!(db.payment_state(&r).await.as_deref(), Some("done"));
    stuck.abort();
    let s = db.server_with_signup(rails(&f)).await;
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 200);
    let replayed = json_of(res).await;
    assert_eq!(replayed["key"], key_for(IDEM, &r));
    assert_key_works(&s, &replayed, None).await;
    assert_eq!((f.calls("settle").len(), f.chain.state.transfers(), db.mint_rows().await), (1, 1, 1));
}

// ------------------------------------------------------------------------ operators

async fn admin_payments_listing(db: &TestDb) {
    if skip() {
        return;
    }
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(rails(&f)).await;
    let accepted = accepted_requirement(&s).await;
    let (done, pending, released) = (nonce(600), nonce(601), nonce(602));
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &payer().header(&accepted, &done, FOREVER)), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 201);
    let minted = json_of(res).await;
    f.set(Answer::Ok, Answer::SettleThen500);
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &payer().header(&accepted, &pending, FOREVER)), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 202);
    f.set(Answer::Ok, Answer::Refuse);
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &payer().header(&accepted, &released, FOREVER)), ("Idempotency-Key", IDEM)]).await;
    assert_eq!(res.status(), 402);

    let res = admin_payments(&s, "").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().keys().all(|k| !k.as_str().starts_with("access-control-")), "no CORS");
    let body = json_of(res).await;
    assert_eq!(body["ok"], true);
    assert!(body["request_id"].is_string());
    let rows = body["payments"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let mut seen = Vec::new();
    for row in rows {
        let keys: Vec<&str> = row.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["reference", "rail", "state", "transaction", "key_id", "created_at", "updated_at"]);
        assert_eq!(row["rail"], "x402");
        assert!(row["created_at"].as_i64().unwrap() > 1_600_000_000_000, "ms since the epoch");
        seen.push(row["updated_at"].as_i64().unwrap());
    }
    assert!(seen.windows(2).all(|w| w[0] >= w[1]), "newest first: {seen:?}");
    let by_state = |state: &str| rows.iter().find(|r| r["state"] == state).cloned().unwrap();
    assert_eq!(by_state("done")["reference"], reference(&done));
    assert_eq!(by_state("done")["key_id"], minted["key_id"]);
    assert_eq!(by_state("done")["transaction"], tx_of(&done));
    assert_eq!(by_state("pending")["reference"], reference(&pending));
    assert_eq!(by_state("pending")["key_id"], Value::Null);
    assert_eq!(by_state("released")["reference"], reference(&released));
    // Filters and limits.
    for (query, n) in [("?state=pending", 1), ("?state=done&limit=500", 1), ("?state=released", 1), ("?state=all", 3), ("?limit=2", 2), ("?state=settling", 0)] {
        let body = json_of(admin_payments(&s, query).await).await;
        assert_eq!(body["payments"].as_array().unwrap().len(), n, "{query}");
    }
    for query in ["?state=bogus", "?limit=0", "?limit=501", "?limit=abc", "?state="] {
        expect_error(admin_payments(&s, query).await, 400, "invalid_input", false).await;
    }
    // Never a key, a key hash, an Idempotency-Key (or its hash) or a signature.
    let text = json_of(admin_payments(&s, "").await).await.to_string();
    let key = minted["key"].as_str().unwrap();
    let signature = payer().payload(&accepted, &done, FOREVER)["signature"].as_str().unwrap().to_string();
    for secret in [key.to_string(), sha256_hex(key), IDEM.to_string(), sha256_hex(IDEM), signature[2..].to_string()] {
        assert!(!text.contains(&secret), "listed: {secret}");
    }
    // Admin only: 401 / 503, GET only, no preflight, no CORS.
    let res = s.client.get(s.url("/v1/admin/payments")).header("X-Admin-Key", "wrong").send().await.unwrap();
    expect_error(res, 401, "invalid_admin_key", false).await;
    let res = s.client.get(s.url("/v1/admin/payments")).send().await.unwrap();
    expect_error(res, 401, "invalid_admin_key", false).await;
    let res = s.client.post(s.url("/v1/admin/payments")).header("X-Admin-Key", ADMIN_KEY).send().await.unwrap();
    assert_eq!(res.headers()["allow"], "GET");
    expect_error(res, 405, "method_not_allowed", false).await;
    let res = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/v1/admin/payments"))
        .header("Origin", "https://evil.example")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    assert!(res.headers().keys().all(|k| !k.as_str().starts_with("access-control-")), "no CORS");
    expect_error(res, 404, "not_found", false).await;
    let disabled = db.server_with(None, std::sync::Arc::new(gateway::GeneratedHandlers)).await;
    expect_error(admin_payments(&disabled, "").await, 503, "admin_disabled", false).await;
}

/// Derived keys depend on SIGNUP_SECRET: the same payment and Idempotency-Key under another
/// secret would be another key (nothing public plus a client string yields a key).
async fn derived_keys_depend_on_the_secret(db: &TestDb) {
    if skip() {
        return;
    }
    const OTHER: &str = "another-signup-secret-0123456789abcdef-0123";
    let f = Facilitator::start(None).await;
    let s = db.server_with_signup(rails(&f)).await;
    let other = db.server_with_signup(Signup::new(Some(rail(&f)), None).with_secret(OTHER)).await;
    let accepted = accepted_requirement(&s).await;
    let (n1, n2) = (nonce(700), nonce(701));
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &payer().header(&accepted, &n1, FOREVER)), ("Idempotency-Key", IDEM)]).await;
    let k1 = json_of(res).await["key"].as_str().unwrap().to_string();
    assert_eq!(k1, derived_key(SIGNUP_SECRET, &sha256_hex(IDEM), &reference(&n1)));
    assert_ne!(k1, derived_key(OTHER, &sha256_hex(IDEM), &reference(&n1)));
    let res = signup(&other, &[("PAYMENT-SIGNATURE", &payer().header(&accepted, &n2, FOREVER)), ("Idempotency-Key", IDEM)]).await;
    let k2 = json_of(res).await["key"].as_str().unwrap().to_string();
    assert_eq!(k2, derived_key(OTHER, &sha256_hex(IDEM), &reference(&n2)));
    assert_ne!(k2, derived_key(SIGNUP_SECRET, &sha256_hex(IDEM), &reference(&n2)));
}

// ------------------------------------------------------------------------ the real chain

static REAL_CHAIN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// POSTs `body` to the chain harness's control API.
async fn control(info: &Value, path: &str, body: Value) {
    let url = format!("{}/{path}", info["controlUrl"].as_str().unwrap());
    let res = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
    assert!(res.status().is_success(), "{path}: {}", res.status());
}

/// With TEST_X402_CHAIN (the JSON line of tests/chain/chain.mjs: anvil, FiatToken, the official
/// @x402 facilitator with fault injection): the JSON-RPC client against the real chain, and a
/// settlement whose answer is lost (500 after settling) → 202 → the next request, then the sweep,
/// mint from what the chain says.
async fn x402_real_chain(db: &TestDb) {
    let Some(line) = std::env::var("TEST_X402_CHAIN").ok().filter(|l| !l.trim().is_empty()) else {
        eprintln!("TEST_X402_CHAIN is not set: the real-chain test is skipped");
        return;
    };
    if !SIGNUP.enabled {
        eprintln!("[signup] is disabled in mcpay.toml: skipped");
        return;
    }
    // The harness's faults are global: one real-chain test at a time (SQLite and Postgres run in parallel).
    let _one_at_a_time = REAL_CHAIN.lock().await;
    let info: Value = serde_json::from_str(line.trim()).expect("TEST_X402_CHAIN must be the JSON line of chain.mjs");
    let leak = |k: &str| -> &'static str { Box::leak(info[k].as_str().unwrap().to_string().into_boxed_str()) };
    let cfg = SignupX402Config {
        network: leak("network"),
        asset: leak("asset"),
        asset_name: leak("assetName"),
        asset_version: leak("assetVersion"),
        asset_decimals: info["assetDecimals"].as_u64().unwrap() as u32,
        amount: "10000",
        pay_to: leak("payTo"),
        facilitator_url: leak("facilitatorUrl"),
        rpc_url: leak("rpcUrl"),
        max_timeout_seconds: 300,
    };
    let rail = || X402Rail::new(&cfg, cfg.facilitator_url, cfg.pay_to).unwrap();
    let s = db.server_with_signup(Signup::new(Some(rail()), None).with_secret(SIGNUP_SECRET)).await;
    let accepted = accepted_requirement(&s).await;
    let payer = Payer::from_hex(info["payerKey"].as_str().unwrap());
    assert_eq!(payer.address, info["payer"].as_str().unwrap().to_lowercase());
    let chain = gateway::signup::chain::Chain::new(reqwest::Client::new(), cfg.rpc_url, Duration::from_secs(10));
    let asset = cfg.asset.parse().unwrap();
    let from = payer.address.parse().unwrap();
    let fresh = || format!("0x{}", sha256_hex(&uuid::Uuid::new_v4().to_string()));
    let reference = |n: &str| format!("x402:{}:{}:{}:{}", cfg.network, cfg.asset, payer.address, n).to_lowercase();

    // The JSON-RPC client on an unused authorization.
    let unused = fresh();
    assert!(chain.block_number().await.unwrap() > 0);
    assert_eq!(chain.transfer_done(asset, from, unused.parse().unwrap(), 0).await.unwrap(), None);
    assert!(!chain.authorization_state(asset, from, unused.parse().unwrap()).await.unwrap());

    let idem = format!("{IDEM}-{}", &fresh()[2..20]);
    for sweep in [false, true] {
        control(&info, "reset", json!({})).await;
        control(&info, "fault", json!({ "settle": "error_after_settle" })).await;
        let n = fresh();
        let pay = payer.header(&accepted, &n, now_secs() + 600);
        let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", &idem)]).await;
        expect_pending(res, &reference(&n), None).await;
        control(&info, "reset", json!({})).await;
        // The chain shows the transfer.
        let tx = chain.transfer_done(asset, from, n.parse().unwrap(), 0).await.unwrap().expect("settled on chain");
        assert!(chain.authorization_state(asset, from, n.parse().unwrap()).await.unwrap());
        if sweep {
            assert_eq!(gateway::signup::sweep(&*db.signup_state(Signup::new(Some(rail()), None).with_secret(SIGNUP_SECRET)).await).await, 1);
            assert_eq!(db.payment_state(&reference(&n)).await.as_deref(), Some("done"));
        }
        let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", &idem)]).await;
        assert_eq!(res.status(), if sweep { 200 } else { 201 });
        let body = json_of(res).await;
        assert_eq!(body["key"], key_for(&idem, &reference(&n)));
        assert_eq!(body["payment"]["reference"], tx);
        assert_key_works(&s, &body, None).await;
    }
    // The official facilitator's own `settlement_pending`: automine off, the receipt wait times
    // out. 202 with the transaction; retries stay pending (nothing mined yet, never "no charge");
    // once mined, the next request mints.
    control(&info, "reset", json!({})).await;
    control(&info, "automine", json!({ "enabled": false })).await;
    let n = fresh();
    let pay = payer.header(&accepted, &n, now_secs() + 600);
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", &idem)]).await;
    let body = expect_error(res, 202, "payment_pending", false).await;
    let tx = body["payment"]["transaction"].as_str().expect("settlement_pending carries the transaction").to_string();
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", &idem)]).await;
    let body = expect_error(res, 202, "payment_pending", false).await;
    assert_eq!(body["payment"]["state"], "pending");
    control(&info, "mine", json!({ "blocks": 1 })).await;
    let res = signup(&s, &[("PAYMENT-SIGNATURE", &pay), ("Idempotency-Key", &idem)]).await;
    assert_eq!(res.status(), 201);
    let body = json_of(res).await;
    assert_eq!(body["key"], key_for(&idem, &reference(&n)));
    assert_eq!(body["payment"]["reference"], tx.to_lowercase());
    assert_key_works(&s, &body, None).await;
    control(&info, "reset", json!({})).await;
}
