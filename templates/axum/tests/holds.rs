//! Paid calls as holds (contract 3.8): every call holds its price, then captures it (success) or
//! releases it (failure within the refund cap, timeout, a release the request could not write,
//! a request that died). Tests count ledger rows, balances and /v1/me, on SQLite and (with
//! TEST_DATABASE_URL) PostgreSQL.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use gateway::generated::GATEWAY;
use gateway::handler::{HandlerError, Reply};
use gateway::store::{CaptureOutcome, HoldOutcome, HoldRequest, HoldState, IdemRequest, ReleaseReason};
use gateway::{start_hold_sweeper, sweep_holds};
use serde_json::Value;

backend_tests!(
    success_holds_then_captures,
    failure_releases_the_hold,
    caller_failures_past_the_cap_are_captured,
    old_refund_rows_count_toward_the_cap,
    timeout_answers_504_and_releases_uncounted,
    a_running_call_is_held_and_counted,
    a_client_that_goes_away_cannot_stop_settlement,
    failing_release_is_left_to_the_sweeper,
    failing_capture_still_answers_and_the_sweeper_releases,
    startup_pass_releases_holds_left_by_a_crash,
    two_instances_sweep_each_hold_once,
    settlement_is_idempotent_per_call_id,
);

const CAP: i64 = GATEWAY.refunds_per_key_per_hour as i64;

fn rate_limit() -> i64 {
    match ep().rate_limit_per_minute() {
        0 => i64::MAX,
        n => i64::from(n),
    }
}

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

/// A hold taken directly through the store, as a request that then died would have left it.
async fn hold_directly(db: &TestDb, key: &SeededKey, request_id: &str, idem: Option<&str>) -> i64 {
    let ep = ep();
    let key_ref = db.key_ref(key).await;
    let hold = HoldRequest {
        key_ref,
        endpoint: ep.name(),
        price: ep.price_mcents(),
        xp: ep.xp(),
        request_id,
        timeout_ms: 100,
        idem: idem.map(|k| IdemRequest { key: k, body_sha256: "00" }),
    };
    match db.store.hold(&hold).await.unwrap() {
        HoldOutcome::Held { balance_mcents, .. } => balance_mcents,
        other => panic!("hold refused: {other:?}"),
    }
}

async fn success_holds_then_captures(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(3, ep);
    let h = TestHandlers::echo();
    let s = db.server_running(&h).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
    assert_eq!(res.status(), 200);
    let id = header(&res, "x-request-id");
    let body = json_of(res).await;
    assert_eq!(body["request_id"], id.as_str());
    assert_eq!(body["charged_mcents"], price);
    assert_eq!(body["balance_mcents"], start - price);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger), ["capture", "hold", "mint"]);
    assert_eq!(ledger[1]["endpoint"], ep.name());
    assert_eq!(ledger[1]["amount_mcents"], -price);
    assert_eq!(ledger[1]["balance_after"], start - price);
    assert_eq!(ledger[1]["request_id"], id.as_str());
    assert_eq!(ledger[0]["endpoint"], ep.name());
    assert_eq!(ledger[0]["amount_mcents"], 0);
    assert_eq!(ledger[0]["balance_after"], start - price);
    assert_eq!(ledger[0]["request_id"], id.as_str());
    assert_eq!(amount_sum(&ledger), start - price);
    let me = s.me(&k.key).await;
    assert_eq!(me["balance_mcents"], start - price);
    assert_eq!(me["calls"], 1);
    assert_eq!(me["xp"], ep.xp());
    assert_eq!(me["spent_mcents"], price);
    assert_eq!(me["refunded_mcents"], 0);
    assert_eq!(db.hold_state(&id).await.as_deref(), Some("captured"));
    assert_eq!(h.run_count(), 1);
}

async fn failure_releases_the_hold(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(2, ep);
    let s = db.server_running(&TestHandlers::failing()).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
    let id = header(&res, "x-request-id");
    assert_eq!(header(&res, "x-charged-mcents"), "0");
    assert_eq!(header(&res, "x-balance-mcents"), start.to_string());
    let body = expect_error(res, 502, "handler_failed", false).await;
    assert_eq!(body["refunded"], true);
    assert_eq!(body["charged_mcents"], 0);
    assert_eq!(body["balance_mcents"], start);
    assert!(body.get("refund_pending").is_none(), "{body}");
    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger), ["release", "hold", "mint"]);
    assert_eq!(ledger[0]["amount_mcents"], price);
    assert_eq!(ledger[0]["balance_after"], start);
    assert_eq!(ledger[0]["request_id"], id.as_str());
    assert_eq!(ledger[1]["request_id"], id.as_str());
    assert_eq!(amount_sum(&ledger), start);
    let me = s.me(&k.key).await;
    assert_eq!(me["balance_mcents"], start);
    assert_eq!(me["calls"], 0);
    assert_eq!(me["xp"], 0);
    assert_eq!(me["spent_mcents"], 0);
    assert_eq!(me["refunded_mcents"], price);
    assert_eq!(db.hold_state(&id).await.as_deref(), Some("released"));
}

async fn caller_failures_past_the_cap_are_captured(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let calls = (CAP + 2).min(rate_limit());
    let start = balance_for(calls + 1, ep);
    let s = db.server_running(&TestHandlers::failing()).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    for i in 0..calls {
        let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
        let body = expect_error(res, 502, "handler_failed", false).await;
        let refunded = i < CAP;
        assert_eq!(body["refunded"], refunded, "call {i}: {body}");
        assert_eq!(body["charged_mcents"], if refunded { 0 } else { price });
    }
    let kept = calls - calls.min(CAP);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(count_kind(&ledger, "hold") as i64, calls);
    assert_eq!(count_kind(&ledger, "release") as i64, calls.min(CAP));
    assert_eq!(count_kind(&ledger, "capture") as i64, kept);
    assert_eq!(amount_sum(&ledger), start - kept * price);
    let me = s.me(&k.key).await;
    assert_eq!(me["balance_mcents"], start - kept * price);
    assert_eq!(me["spent_mcents"], kept * price, "spent = holds - releases");
    assert_eq!(me["refunded_mcents"], calls.min(CAP) * price);
    assert_eq!(me["calls"], 0, "failed calls are not counted");
    assert_eq!(me["xp"], 0);
}

/// Refunds written before holds existed (kind 'refund') use up the same hourly budget.
async fn old_refund_rows_count_toward_the_cap(db: &TestDb) {
    let ep = ep();
    let start = balance_for(2, ep);
    let s = db.server_running(&TestHandlers::failing()).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let key_ref = db.key_ref(&k).await;
    let now = db.store.db_now().await.unwrap();
    for i in 0..CAP {
        let sql = "INSERT INTO ledger (key_ref, ts, kind, endpoint, amount_mcents, balance_after, request_id) \
                   VALUES ($1, $2, 'refund', $3, 0, $4, $5)";
        let rid = format!("old-{i}");
        match &db.store {
            gateway::Store::Sqlite { write: p, .. } => {
                sqlx::query(sql).bind(key_ref).bind(now).bind(ep.name()).bind(start).bind(&rid).execute(p).await.unwrap();
            }
            gateway::Store::Postgres(p) => {
                sqlx::query(sql).bind(key_ref).bind(now).bind(ep.name()).bind(start).bind(&rid).execute(p).await.unwrap();
            }
        }
    }
    let body = expect_error(s.call(ep.name(), Some(&k.key), &sample(ep)).await, 502, "handler_failed", false).await;
    assert_eq!(body["refunded"], false, "{body}");
    assert_eq!(body["charged_mcents"], ep.price_mcents());
    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger)[..2], ["capture", "hold"]);
    assert_eq!(s.balance(&k.key).await, start - ep.price_mcents());
}

async fn timeout_answers_504_and_releases_uncounted(db: &TestDb) {
    let ep = ep();
    let calls = CAP + 1;
    if calls + 1 > rate_limit() {
        eprintln!("rate limit below the refund cap + 2: skipped");
        return;
    }
    let start = balance_for(calls + 2, ep);
    // Sleeps past the limit, then would count a late finish: the gateway must discard it.
    let finished = Arc::new(AtomicUsize::new(0));
    let late = finished.clone();
    let slow = TestHandlers::new(move |_| {
        let late = late.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(2_000)).await;
            late.fetch_add(1, Ordering::SeqCst);
            Ok(Reply::Json(Value::Null))
        }
    })
    .with_timeout(Duration::from_millis(150));
    let s = db.server_running(&slow).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    for i in 0..calls {
        let began = Instant::now();
        let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
        assert!(began.elapsed() < Duration::from_millis(1_500), "answered at the time limit, not when the handler ended");
        assert_eq!(header(&res, "x-charged-mcents"), "0");
        assert_eq!(header(&res, "x-balance-mcents"), start.to_string());
        let body = expect_error(res, 504, "handler_timeout", false).await;
        assert_eq!(body["refunded"], true, "call {i}");
        assert_eq!(body["charged_mcents"], 0);
        assert_eq!(body["balance_mcents"], start);
    }
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(finished.load(Ordering::SeqCst), 0, "a timed-out handler is stopped");
    let ledger = s.ledger(&k.key).await;
    assert_eq!(count_kind(&ledger, "hold") as i64, calls);
    assert_eq!(count_kind(&ledger, "release") as i64, calls);
    assert_eq!(amount_sum(&ledger), start);
    // Timeouts are not counted against the refund cap: a caller failure is still released.
    let f = db.server_running(&TestHandlers::failing()).await;
    let body = expect_error(f.call(ep.name(), Some(&k.key), &sample(ep)).await, 502, "handler_failed", false).await;
    assert_eq!(body["refunded"], CAP > 0);
    if CAP > 0 {
        assert_eq!(s.balance(&k.key).await, start);
    }
}

async fn a_running_call_is_held_and_counted(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(2, ep);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let blocked = TestHandlers::new(move |_| {
        let g = g.clone();
        async move {
            g.acquire().await.unwrap().forget();
            Ok(Reply::Json(Value::Null))
        }
    });
    let s = Arc::new(db.server_running(&blocked).await);
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let (s2, key) = (s.clone(), k.key.clone());
    let call = tokio::spawn(async move { s2.call(ep.name(), Some(&key), &sample(ep)).await.status().as_u16() });
    while blocked.run_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Held: out of the balance, counted as a call, spent, in the ledger.
    let me = s.me(&k.key).await;
    assert_eq!(me["balance_mcents"], start - price);
    assert_eq!(me["calls"], 1);
    assert_eq!(me["spent_mcents"], price);
    assert_eq!(kinds(&s.ledger(&k.key).await), ["hold", "mint"]);
    gate.add_permits(1);
    assert_eq!(call.await.unwrap(), 200);
    assert_eq!(kinds(&s.ledger(&k.key).await), ["capture", "hold", "mint"]);
}

async fn a_client_that_goes_away_cannot_stop_settlement(db: &TestDb) {
    let ep = ep();
    let start = balance_for(2, ep);
    let slow_fail = TestHandlers::new(|_| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Err(HandlerError::new("late failure"))
    });
    let s = db.server_running(&slow_fail).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let gone = s
        .client
        .post(s.url(ep.path()))
        .header("Authorization", format!("Bearer {}", k.key))
        .header("Content-Type", "application/json")
        .body(sample(ep).to_string())
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up before the answer");
    let deadline = Instant::now() + Duration::from_secs(5);
    while kinds(&s.ledger(&k.key).await)[0] != "release" {
        assert!(Instant::now() < deadline, "the hold was never released: {:?}", kinds(&s.ledger(&k.key).await));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(kinds(&s.ledger(&k.key).await), ["release", "hold", "mint"]);
    assert_eq!(s.balance(&k.key).await, start);
}

/// SQL built at run time, for `TestDb::exec` (which takes `&'static str`; a few bytes per test).
fn sql(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// Makes the database itself refuse ledger rows of `kind` (a real store error, from a trigger).
async fn refuse_ledger_rows(db: &TestDb, kind: &str) {
    db.exec(
        sql(format!(
            "CREATE TRIGGER fail_{kind} BEFORE INSERT ON ledger WHEN NEW.kind = '{kind}' \
             BEGIN SELECT RAISE(ABORT, 'injected {kind} failure'); END"
        )),
        sql(format!(
            "CREATE FUNCTION fail_{kind}() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected {kind} failure'; END $$"
        )),
    )
    .await;
    db.exec(
        "SELECT 1",
        sql(format!(
            "CREATE TRIGGER fail_{kind} BEFORE INSERT ON ledger FOR EACH ROW WHEN (NEW.kind = '{kind}') \
             EXECUTE FUNCTION fail_{kind}()"
        )),
    )
    .await;
}

/// Undoes [`refuse_ledger_rows`].
async fn accept_ledger_rows(db: &TestDb, kind: &str) {
    db.exec(sql(format!("DROP TRIGGER fail_{kind}")), sql(format!("DROP TRIGGER fail_{kind} ON ledger"))).await;
}

/// A store error while releasing (a real one: a trigger refuses 'release' ledger rows) →
/// 502 with refund_pending, after bounded retries; the sweeper releases the hold later.
async fn failing_release_is_left_to_the_sweeper(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(2, ep);
    let s = db.server_running(&TestHandlers::failing()).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let key_ref = db.key_ref(&k).await;
    refuse_ledger_rows(db, "release").await;
    let began = Instant::now();
    let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
    let elapsed = began.elapsed();
    let id = header(&res, "x-request-id");
    assert_eq!(header(&res, "x-charged-mcents"), price.to_string());
    assert_eq!(header(&res, "x-balance-mcents"), (start - price).to_string());
    let body = expect_error(res, 502, "handler_failed", false).await;
    assert_eq!(body["refunded"], false, "{body}");
    assert_eq!(body["refund_pending"], true);
    assert_eq!(body["charged_mcents"], price);
    assert_eq!(body["balance_mcents"], start - price);
    // Three attempts, 50 ms then 250 ms apart.
    assert!(elapsed >= Duration::from_millis(290), "retried with pauses: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "bounded: {elapsed:?}");
    assert_eq!(kinds(&s.ledger(&k.key).await), ["hold", "mint"]);
    assert_eq!(db.hold_state(&id).await.as_deref(), Some("held"));

    // Before its deadline the sweeper leaves it alone.
    assert_eq!(sweep_holds(&db.store).await.released, 0);
    assert_eq!(db.hold_state(&id).await.as_deref(), Some("held"));
    // Past the deadline, while the store still fails: nothing changes, the failure is reported.
    db.exec("UPDATE holds SET deadline = 0 WHERE state = 'held'", "UPDATE holds SET deadline = 0 WHERE state = 'held'").await;
    let failed = sweep_holds(&db.store).await;
    assert_eq!((failed.released, failed.failed), (0, 1));
    assert_eq!(kinds(&s.ledger(&k.key).await), ["hold", "mint"]);
    // The store works again: the next pass releases it, once, in full.
    accept_ledger_rows(db, "release").await;
    assert_eq!(sweep_holds(&db.store).await.released, 1);
    assert_eq!(sweep_holds(&db.store).await.released, 0);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger), ["release", "hold", "mint"]);
    assert_eq!(ledger[0]["request_id"], id.as_str());
    assert_eq!(ledger[0]["amount_mcents"], price);
    assert_eq!(amount_sum(&ledger), start);
    let me = s.me(&k.key).await;
    assert_eq!(me["balance_mcents"], start);
    assert_eq!(me["calls"], 0);
    assert_eq!(me["refunded_mcents"], price);
    // A capture arriving after the sweep does not charge.
    assert_eq!(db.store.capture(key_ref, &id, None).await.unwrap(), CaptureOutcome::Released { balance_mcents: start });
    assert_eq!(kinds(&s.ledger(&k.key).await), ["release", "hold", "mint"]);
}

/// A store error while capturing: the answer is still sent, and the sweeper releases the hold
/// (money is never kept for a call whose outcome was not recorded).
async fn failing_capture_still_answers_and_the_sweeper_releases(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(2, ep);
    let s = db.server_running(&TestHandlers::echo()).await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    refuse_ledger_rows(db, "capture").await;
    let began = Instant::now();
    let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
    assert!(began.elapsed() >= Duration::from_millis(290), "retried with pauses");
    assert_eq!(res.status(), 200);
    let id = header(&res, "x-request-id");
    let body = json_of(res).await;
    assert_eq!(body["ok"], true);
    assert_eq!(kinds(&s.ledger(&k.key).await), ["hold", "mint"]);
    assert_eq!(db.hold_state(&id).await.as_deref(), Some("held"));
    accept_ledger_rows(db, "capture").await;
    db.exec("UPDATE holds SET deadline = 0 WHERE state = 'held'", "UPDATE holds SET deadline = 0 WHERE state = 'held'").await;
    assert_eq!(sweep_holds(&db.store).await.released, 1);
    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger), ["release", "hold", "mint"]);
    assert_eq!(ledger[0]["amount_mcents"], price);
    assert_eq!(amount_sum(&ledger), start);
    assert_eq!(s.balance(&k.key).await, start);
}

/// Holds left by requests that died (a crash): the start-up pass releases those past their
/// deadline, leaves the others, and the periodic task releases them once due.
async fn startup_pass_releases_holds_left_by_a_crash(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(4, ep);
    let s = db.server().await;
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let idem = "crash-0123456789abcdef0123456789abcdef";
    hold_directly(db, &k, "crashed-1", Some(idem)).await;
    hold_directly(db, &k, "crashed-2", None).await;
    hold_directly(db, &k, "in-flight", None).await;
    assert_eq!(s.balance(&k.key).await, start - 3 * price);
    assert_eq!(s.me(&k.key).await["calls"], 3);
    db.exec(
        "UPDATE holds SET deadline = 0 WHERE request_id IN ('crashed-1', 'crashed-2')",
        "UPDATE holds SET deadline = 0 WHERE request_id IN ('crashed-1', 'crashed-2')",
    )
    .await;
    // A restarted instance: its start-up pass runs before it returns.
    let sweeper = start_hold_sweeper(db.new_store().await, Duration::from_millis(200)).await;
    assert_eq!(db.hold_state("crashed-1").await.as_deref(), Some("released"));
    assert_eq!(db.hold_state("crashed-2").await.as_deref(), Some("released"));
    assert_eq!(db.hold_state("in-flight").await.as_deref(), Some("held"));
    assert_eq!(s.balance(&k.key).await, start - price);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM idempotency").await, 0, "a swept call's Idempotency-Key is freed");
    // The periodic pass picks up the last one once it is due.
    db.exec("UPDATE holds SET deadline = 0 WHERE request_id = 'in-flight'", "UPDATE holds SET deadline = 0 WHERE request_id = 'in-flight'")
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while db.hold_state("in-flight").await.as_deref() != Some("released") {
        assert!(Instant::now() < deadline, "the periodic sweep did not release the hold");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sweeper.abort();
    let ledger = s.ledger(&k.key).await;
    assert_eq!(count_kind(&ledger, "hold"), 3);
    assert_eq!(count_kind(&ledger, "release"), 3);
    assert_eq!(amount_sum(&ledger), start);
    let me = s.me(&k.key).await;
    assert_eq!(me["balance_mcents"], start);
    assert_eq!(me["calls"], 0);
    assert_eq!(me["xp"], 0);
    assert_eq!(me["spent_mcents"], 0);
    assert_eq!(me["refunded_mcents"], 3 * price);
}

async fn two_instances_sweep_each_hold_once(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let n = 12;
    let start = balance_for(n, ep);
    let k = db.seed_key(start, &[ep.scope()], None).await;
    for i in 0..n {
        hold_directly(db, &k, &format!("dead-{i}"), None).await;
    }
    db.exec("UPDATE holds SET deadline = 0", "UPDATE holds SET deadline = 0").await;
    let (a, b) = (db.new_store().await, db.new_store().await);
    let (ra, rb) = tokio::join!(sweep_holds(&a), sweep_holds(&b));
    assert_eq!(ra.released + rb.released, n as usize, "{ra:?} {rb:?}");
    assert_eq!((ra.failed, rb.failed), (0, 0));
    let s = db.server().await;
    let ledger = s.ledger(&k.key).await;
    assert_eq!(count_kind(&ledger, "release") as i64, n);
    assert_eq!(amount_sum(&ledger), start);
    assert_eq!(s.balance(&k.key).await, start);
    assert_eq!(s.me(&k.key).await["refunded_mcents"], n * price);
}

/// Capturing or releasing a call already settled changes nothing and reports the standing outcome.
async fn settlement_is_idempotent_per_call_id(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let start = balance_for(3, ep);
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let key_ref = db.key_ref(&k).await;
    let caller = ReleaseReason::Caller { cap: 100 };

    hold_directly(db, &k, "ok-1", None).await;
    assert_eq!(db.store.capture(key_ref, "ok-1", None).await.unwrap(), CaptureOutcome::Captured { balance_mcents: start - price });
    assert_eq!(db.store.capture(key_ref, "ok-1", None).await.unwrap(), CaptureOutcome::Captured { balance_mcents: start - price });
    let late = db.store.release(key_ref, "ok-1", caller).await.unwrap();
    assert_eq!((late.refunded, late.state, late.settled_now), (false, HoldState::Captured, false));

    hold_directly(db, &k, "bad-1", None).await;
    let first = db.store.release(key_ref, "bad-1", caller).await.unwrap();
    assert_eq!((first.refunded, first.state, first.settled_now, first.balance_mcents), (true, HoldState::Released, true, start - price));
    let again = db.store.release(key_ref, "bad-1", ReleaseReason::Timeout).await.unwrap();
    assert_eq!((again.refunded, again.state, again.settled_now, again.balance_mcents), (true, HoldState::Released, false, start - price));
    assert_eq!(db.store.capture(key_ref, "bad-1", None).await.unwrap(), CaptureOutcome::Released { balance_mcents: start - price });

    let stranger = db.store.release(key_ref, "never-held", caller).await.unwrap();
    assert_eq!((stranger.refunded, stranger.state), (false, HoldState::Unknown));
    assert!(matches!(db.store.capture(key_ref, "never-held", None).await.unwrap(), CaptureOutcome::Unknown { .. }));
    // A call id holds at most once.
    let reuse = HoldRequest {
        key_ref,
        endpoint: ep.name(),
        price,
        xp: ep.xp(),
        request_id: "ok-1",
        timeout_ms: 100,
        idem: None,
    };
    assert!(db.store.hold(&reuse).await.is_err(), "a reused call id must not hold again");

    let s = db.server().await;
    let ledger = s.ledger(&k.key).await;
    assert_eq!(kinds(&ledger), ["release", "hold", "capture", "hold", "mint"]);
    assert_eq!(amount_sum(&ledger), start - price);
    assert_eq!(db.store.ledger_sum(key_ref).await.unwrap(), start - price);
    let me = s.me(&k.key).await;
    assert_eq!(me["balance_mcents"], start - price);
    assert_eq!(me["calls"], 1);
    assert_eq!(me["spent_mcents"], price);
    assert_eq!(me["refunded_mcents"], price);
}
