//! `Idempotency-Key` on paid calls (contract 3.8): a retry of a captured call replays its stored
//! answer byte for byte instead of charging again; a mismatch, a call still running or an answer
//! too large to store are refused without a charge; a failed call frees its key. Tests count
//! holds, captures and balances, on SQLite and (with TEST_DATABASE_URL) PostgreSQL.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use common::*;
use gateway::generated::{Endpoint, GATEWAY};
use gateway::handler::{HandlerError, Reply};
use gateway::store::{HoldOutcome, HoldRequest, IdemFound, IdemRequest};
use gateway::sweep_holds;
use serde_json::{Value, json};

backend_tests!(
    a_sequential_retry_replays_the_stored_answer,
    concurrent_retries_charge_once,
    another_body_is_a_mismatch,
    another_endpoint_is_a_mismatch,
    keys_do_not_share_idempotency_keys,
    a_running_call_answers_409_in_progress,
    answers_above_64_kib_are_sent_whole_but_not_stored,
    a_handler_response_is_replayed_with_its_status_and_headers,
    a_failed_call_frees_its_idempotency_key,
    a_failure_kept_past_the_cap_frees_its_idempotency_key,
    malformed_idempotency_keys_are_refused,
    expired_records_are_forgotten_by_the_sweeper,
);

const IDEM: &str = "idem_0123456789abcdef0123456789abcdef";

fn rate_limit() -> i64 {
    match ep().rate_limit_per_minute() {
        0 => i64::MAX,
        n => i64::from(n),
    }
}

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers().get(name).map(|v| v.to_str().unwrap().to_string())
}

/// One paid call with this Idempotency-Key: status, headers, body text.
async fn call(s: &TestServer, key: &str, idem: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, String) {
    let res = s.call_with(ep().name(), Some(key), body, &[("Idempotency-Key", idem)]).await;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (status, headers, res.text().await.unwrap())
}

fn h(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.to_str().unwrap().to_string())
}

async fn a_sequential_retry_replays_the_stored_answer(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    // Exactly one call's worth: the replay needs no balance.
    let start = price;
    let handlers = TestHandlers::echo();
    let s = db.server_running(&handlers).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let (status, first_h, first) = call(&s, &k.key, IDEM, &sample(ep)).await;
    assert_eq!(status, 200);
    assert_eq!(h(&first_h, "idempotent-replayed"), None);
    let (status, again_h, again) = call(&s, &k.key, IDEM, &sample(ep)).await;
    assert_eq!(status, 200);
    assert_eq!(again, first, "the stored body byte for byte");
    assert_eq!(h(&again_h, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(h(&again_h, "x-charged-mcents"), Some(price.to_string()));
    assert_eq!(h(&again_h, "x-balance-mcents"), Some((start - price).to_string()));
    assert_eq!(h(&again_h, "content-type"), h(&first_h, "content-type"));
    assert_eq!(h(&again_h, "access-control-allow-origin").as_deref(), Some("*"));
    let fresh = h(&again_h, "x-request-id").unwrap();
    assert_ne!(Some(fresh), h(&first_h, "x-request-id"), "a fresh X-Request-Id");
    let body: Value = serde_json::from_str(&again).unwrap();
    assert_eq!(body["request_id"].as_str(), h(&first_h, "x-request-id").as_deref(), "the original call's id");
    assert_eq!(handlers.run_count(), 1);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger), ["capture", "hold", "mint"]);
    assert_eq!(s.balance(&k.key).await, 0);
    // Without the header, the same body is a new call (and here: no balance left).
    let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
    expect_error(res, 402, "insufficient_balance", true).await;
}

async fn concurrent_retries_charge_once(db: &TestDb) {
    let ep = ep();
    let n = 20;
    if n + 1 > rate_limit() {
        eprintln!("rate limit below 21 calls per minute: skipped");
        return;
    }
    let start = balance_for(25, ep);
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let slow = TestHandlers::new(move |input| {
        let run = r.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(Reply::Json(json!({ "echoed": input, "run": run })))
        }
    });
    let s = Arc::new(db.server_running(&slow).await);
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (s, key) = (s.clone(), k.key.clone());
        tasks.push(tokio::spawn(async move { call(&s, &key, IDEM, &sample(ep)).await }));
    }
    let mut answers = Vec::new();
    let mut busy = 0;
    for t in tasks {
        let (status, headers, text) = t.await.unwrap();
        match status {
            200 => answers.push(text),
            409 => {
                let body: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(body["error"]["code"], "idempotency_in_progress", "{body}");
                assert_eq!(body["note"], "no charge applied");
                let retry: u64 = h(&headers, "retry-after").unwrap().parse().unwrap();
                assert!((1..=5).contains(&retry));
                assert_eq!(body["retry_after_seconds"], retry);
                busy += 1;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert!(!answers.is_empty());
    // Everyone told to retry gets the same answer.
    for _ in 0..busy {
        let (status, headers, text) = call(&s, &k.key, IDEM, &sample(ep)).await;
        assert_eq!(status, 200);
        assert_eq!(h(&headers, "idempotent-replayed").as_deref(), Some("true"));
        answers.push(text);
    }
    assert_eq!(answers.len() as i64, n);
    assert!(answers.iter().all(|a| *a == answers[0]), "identical bodies");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    let ledger = s.ledger(&k.key).await;
    assert_eq!(count_kind(&ledger, "hold"), 1);
    assert_eq!(count_kind(&ledger, "capture"), 1);
    assert_eq!(s.balance(&k.key).await, start - ep.price_mcents());
}

async fn another_body_is_a_mismatch(db: &TestDb) {
    let ep = ep();
    let start = balance_for(3, ep);
    let s = db.server_running(&TestHandlers::echo()).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    assert_eq!(call(&s, &k.key, IDEM, &sample(ep)).await.0, 200);
    // The same JSON value in other bytes is another body too.
    let other = Value::String(format!("{} ", sample(ep)));
    let res = s.call_with(ep.name(), Some(&k.key), &other, &[("Idempotency-Key", IDEM)]).await;
    let body = expect_error(res, 422, "idempotency_mismatch", true).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("Idempotency-Key"));
    let ledger = s.ledger(&k.key).await;
    assert_eq!(count_kind(&ledger, "hold"), 1);
    assert_eq!(s.balance(&k.key).await, start - ep.price_mcents());
}

async fn another_endpoint_is_a_mismatch(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(5, ep);
    let s = db.server_running(&TestHandlers::echo()).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let key_ref = db.key_ref(&k).await;
    let (_, first_h, _) = call(&s, &k.key, IDEM, &sample(ep)).await;
    let original = h(&first_h, "x-request-id").unwrap();
    let hash = "unused";
    let idem = IdemRequest { key: IDEM, body_sha256: hash };
    // The record is per endpoint: any other name (whatever this manifest's endpoints) mismatches,
    // at the look-up and inside the hold itself.
    assert_eq!(db.store.find_idempotency(key_ref, &idem, "another-endpoint").await.unwrap(), Some(IdemFound::Mismatch));
    let hold = HoldRequest {
        key_ref,
        endpoint: "another-endpoint",
        price,
        xp: 0,
        request_id: "other-call",
        timeout_ms: 100,
        idem: Some(idem),
    };
    assert_eq!(db.store.hold(&hold).await.unwrap(), HoldOutcome::Idempotent(IdemFound::Mismatch));
    // Over HTTP when the manifest has a second endpoint.
    if let Some(ep2) = Endpoint::ALL.get(1).copied() {
        let k2 = db.seed_key(balance_for(2, ep) + ep2.price_mcents(), &[ep.scope(), ep2.scope()], None).await;
        assert_eq!(call(&s, &k2.key, IDEM, &sample(ep)).await.0, 200);
        let res = s.call_with(ep2.name(), Some(&k2.key), &sample(ep2), &[("Idempotency-Key", IDEM)]).await;
        expect_error(res, 422, "idempotency_mismatch", true).await;
        assert_eq!(count_kind(&s.ledger(&k2.key).await, "hold"), 1);
    }
    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger), ["capture", "hold", "mint"]);
    assert_eq!(ledger[0]["request_id"], original.as_str());
    assert_eq!(s.balance(&k.key).await, start - price);
}

async fn keys_do_not_share_idempotency_keys(db: &TestDb) {
    let ep = ep();
    let start = balance_for(2, ep);
    let s = db.server_running(&TestHandlers::echo()).await;
    let a = db.seed_key(start, &[ep.scope()], None).await;
    let b = db.seed_key(start, &[ep.scope()], None).await;
    let (sa, _, ta) = call(&s, &a.key, IDEM, &sample(ep)).await;
    let (sb, hb, tb) = call(&s, &b.key, IDEM, &sample(ep)).await;
    assert_eq!((sa, sb), (200, 200));
    assert_eq!(h(&hb, "idempotent-replayed"), None);
    assert_ne!(ta, tb);
    for k in [&a, &b] {
        assert_eq!(kinds(&s.ledger(&k.key).await), ["capture", "hold", "mint"]);
        assert_eq!(s.balance(&k.key).await, start - ep.price_mcents());
    }
}

async fn a_running_call_answers_409_in_progress(db: &TestDb) {
    let ep = ep();
    let start = balance_for(3, ep);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let blocked = TestHandlers::new(move |input| {
        let g = g.clone();
        async move {
            g.acquire().await.unwrap().forget();
            Ok(Reply::Json(input))
        }
    });
    let s = Arc::new(db.server_running(&blocked).await);
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let (s2, key) = (s.clone(), k.key.clone());
    let first = tokio::spawn(async move { call(&s2, &key, IDEM, &sample(ep)).await });
    while blocked.run_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let res = s.call_with(ep.name(), Some(&k.key), &sample(ep), &[("Idempotency-Key", IDEM)]).await;
    let retry: u64 = header(&res, "retry-after").unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry), "{retry}");
    let body = expect_error(res, 409, "idempotency_in_progress", true).await;
    assert_eq!(body["retry_after_seconds"], retry);
    assert_eq!(count_kind(&s.ledger(&k.key).await, "hold"), 1, "no second hold");
    gate.add_permits(1);
    let (status, _, text) = first.await.unwrap();
    assert_eq!(status, 200);
    let (status, headers, again) = call(&s, &k.key, IDEM, &sample(ep)).await;
    assert_eq!((status, again.as_str()), (200, text.as_str()));
    assert_eq!(h(&headers, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(blocked.run_count(), 1);
    assert_eq!(s.balance(&k.key).await, start - ep.price_mcents());
}

/// A handler Response body made of `chunks` frames of `size` bytes each.
struct Chunks {
    left: usize,
    chunk: Bytes,
}

type FrameResult = <http_body_util::combinators::Frame<'static, Body> as std::future::Future>::Output;

impl HttpBody for Chunks {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<FrameResult> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Pin::new(&mut Body::from(self.chunk.clone())).poll_frame(cx)
    }
}

async fn answers_above_64_kib_are_sent_whole_but_not_stored(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(4, ep);
    // The gateway's own envelope around a large result.
    let big = TestHandlers::new(|_| async { Ok(Reply::Json(json!({ "blob": "x".repeat(70_000) }))) });
    let s = db.server_running(&big).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let (status, first_h, first) = call(&s, &k.key, IDEM, &sample(ep)).await;
    assert_eq!(status, 200);
    assert!(first.len() > 70_000);
    let res = s.call_with(ep.name(), Some(&k.key), &sample(ep), &[("Idempotency-Key", IDEM)]).await;
    assert_eq!(header(&res, "idempotent-replayed").as_deref(), Some("true"));
    let body = expect_error(res, 409, "idempotency_response_not_stored", true).await;
    assert_eq!(body["original_request_id"].as_str(), h(&first_h, "x-request-id").as_deref());
    assert_eq!(body["max_stored_bytes"], 65_536);
    assert_eq!(count_kind(&s.ledger(&k.key).await, "hold"), 1, "never a second charge");
    assert_eq!(s.balance(&k.key).await, start - price);

    // A handler's own streamed Response: sent whole although only 64 KiB + 1 are buffered.
    let streamed = TestHandlers::new(|_| async {
        let body = Body::new(Chunks { left: 20, chunk: Bytes::from(vec![b'y'; 10_000]) });
        Ok(Reply::Response(axum::response::Response::new(body)))
    });
    let s2 = db.server_running(&streamed).await;
    let other = "idem_streamed_0123456789abcdef0123456789";
    let res = s2.call_with(ep.name(), Some(&k.key), &sample(ep), &[("Idempotency-Key", other)]).await;
    assert_eq!(res.status(), 200);
    let bytes = res.bytes().await.unwrap();
    assert_eq!(bytes.len(), 200_000);
    assert!(bytes.iter().all(|b| *b == b'y'));
    let res = s2.call_with(ep.name(), Some(&k.key), &sample(ep), &[("Idempotency-Key", other)]).await;
    expect_error(res, 409, "idempotency_response_not_stored", true).await;
    assert_eq!(count_kind(&s.ledger(&k.key).await, "hold"), 2);
    assert_eq!(s.balance(&k.key).await, start - 2 * price);
}

async fn a_handler_response_is_replayed_with_its_status_and_headers(db: &TestDb) {
    let ep = ep();
    let start = balance_for(3, ep);
    let own = TestHandlers::new(|_| async {
        let mut r = axum::response::Response::new(Body::from("plain answer"));
        *r.status_mut() = axum::http::StatusCode::CREATED;
        r.headers_mut().insert("content-type", "text/plain".parse().unwrap());
        r.headers_mut().append("x-custom", "1".parse().unwrap());
        r.headers_mut().append("x-custom", "2".parse().unwrap());
        Ok(Reply::Response(r))
    });
    let s = db.server_running(&own).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let (s1, h1, t1) = call(&s, &k.key, IDEM, &sample(ep)).await;
    let (s2, h2, t2) = call(&s, &k.key, IDEM, &sample(ep)).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!((t1.as_str(), t2.as_str()), ("plain answer", "plain answer"));
    let customs = |hm: &reqwest::header::HeaderMap| hm.get_all("x-custom").iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(customs(&h2), ["1", "2"]);
    assert_eq!(customs(&h1), customs(&h2));
    assert_eq!(h(&h2, "content-type").as_deref(), Some("text/plain"));
    assert_eq!(h(&h2, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(h(&h2, "x-charged-mcents"), Some(ep.price_mcents().to_string()));
    assert_eq!(count_kind(&s.ledger(&k.key).await, "hold"), 1);
}

async fn a_failed_call_frees_its_idempotency_key(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(3, ep);
    // Fails on its first run only.
    let n = Arc::new(AtomicUsize::new(0));
    let flaky = TestHandlers::new(move |input| {
        let first = n.fetch_add(1, Ordering::SeqCst) == 0;
        async move { if first { Err(HandlerError::new("transient")) } else { Ok(Reply::Json(input)) } }
    });
    let s = db.server_running(&flaky).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let (status, _, _) = call(&s, &k.key, IDEM, &sample(ep)).await;
    assert_eq!(status, 502);
    let (status, headers, _) = call(&s, &k.key, IDEM, &sample(ep)).await;
    assert_eq!(status, 200);
    assert_eq!(h(&headers, "idempotent-replayed"), None, "ran again, not replayed");
    assert_eq!(flaky.run_count(), 2);
    assert_eq!(kinds(&s.ledger(&k.key).await), ["capture", "hold", "release", "hold", "mint"]);
    assert_eq!(s.balance(&k.key).await, start - price);
}

async fn a_failure_kept_past_the_cap_frees_its_idempotency_key(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let cap = i64::from(GATEWAY.refunds_per_key_per_hour);
    if cap + 2 > rate_limit() {
        eprintln!("rate limit below the refund cap + 2: skipped");
        return;
    }
    let start = balance_for(cap + 3, ep);
    let failing = db.server_running(&TestHandlers::failing()).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    for _ in 0..cap {
        assert_eq!(failing.call(ep.name(), Some(&k.key), &sample(ep)).await.status(), 502);
    }
    let (status, _, text) = call(&failing, &k.key, IDEM, &sample(ep)).await;
    assert_eq!(status, 502);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["refunded"], false, "past the cap: {body}");
    let echo = db.server_running(&TestHandlers::echo()).await;
    let (status, headers, _) = call(&echo, &k.key, IDEM, &sample(ep)).await;
    assert_eq!(status, 200);
    assert_eq!(h(&headers, "idempotent-replayed"), None, "the retry runs as a new call");
    let ledger = echo.ledger(&k.key).await;
    assert_eq!(count_kind(&ledger, "hold") as i64, cap + 2);
    assert_eq!(count_kind(&ledger, "capture"), 2);
    assert_eq!(echo.balance(&k.key).await, start - 2 * price);
}

async fn malformed_idempotency_keys_are_refused(db: &TestDb) {
    let ep = ep();
    let start = balance_for(2, ep);
    let s = db.server_running(&TestHandlers::echo()).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let long = "x".repeat(129);
    let bang = format!("{}!", "a".repeat(31));
    let spaced = format!("{} {}", "a".repeat(20), "b".repeat(20));
    for bad in ["short", long.as_str(), bang.as_str(), spaced.as_str(), ""] {
        let res = s.call_with(ep.name(), Some(&k.key), &sample(ep), &[("Idempotency-Key", bad)]).await;
        let body = expect_error(res, 400, "invalid_input", true).await;
        assert!(body["error"]["message"].as_str().unwrap().contains("Idempotency-Key"), "{bad}: {body}");
    }
    // Two headers, each valid on its own.
    let res = s
        .client
        .post(s.url(ep.path()))
        .header("Authorization", format!("Bearer {}", k.key))
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", IDEM)
        .header("Idempotency-Key", IDEM)
        .body(sample(ep).to_string())
        .send()
        .await
        .unwrap();
    expect_error(res, 400, "invalid_input", true).await;
    // 32 and 128 characters are fine.
    for good in ["a".repeat(32), "Z_-9".repeat(32)] {
        assert_eq!(call(&s, &k.key, &good, &sample(ep)).await.0, 200, "{good}");
    }
    assert_eq!(count_kind(&s.ledger(&k.key).await, "hold"), 2);
}

async fn expired_records_are_forgotten_by_the_sweeper(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(3, ep);
    let s = db.server_running(&TestHandlers::echo()).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    assert_eq!(call(&s, &k.key, IDEM, &sample(ep)).await.0, 200);
    // Not yet expired: kept by a sweep.
    assert_eq!(sweep_holds(&db.store).await.idempotency_forgotten, 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM idempotency").await, 1);
    db.exec("UPDATE idempotency SET expires_at = 1", "UPDATE idempotency SET expires_at = 1").await;
    // Past its 24 h: deleted by the sweep, and the same key then runs as a new call.
    assert_eq!(sweep_holds(&db.store).await.idempotency_forgotten, 1);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM idempotency").await, 0);
    let (status, headers, _) = call(&s, &k.key, IDEM, &sample(ep)).await;
    assert_eq!(status, 200);
    assert_eq!(h(&headers, "idempotent-replayed"), None);
    assert_eq!(s.balance(&k.key).await, start - 2 * price);
}
