//! Concurrency: two server instances on one database (and one Redis when TEST_REDIS_URL is
//! set), real HTTP, a burst spread across both. No key is ever overdrawn, exactly the
//! affordable calls succeed, and each key's ledger sums to its balance.

mod common;

use common::*;
use gateway::generated::Endpoint;
use serde_json::Value;

backend_tests!(burst_across_two_instances_never_overdraws, rate_limit_shared_between_instances);

async fn burst_across_two_instances_never_overdraws(db: &TestDb) {
    let a = db.server().await;
    let b = db.server().await;
    // The endpoint with the largest rate limit, so that only the balance refuses calls.
    let ep = *Endpoint::ALL.iter().max_by_key(|e| e.rate_limit_per_minute()).unwrap();
    let per_key = i64::from(ep.rate_limit_per_minute()).min(40);
    let affordable = (per_key / 2).max(1);
    let keys = 4;
    let mut seeded = Vec::new();
    for _ in 0..keys {
        seeded.push(db.seed_key(affordable * ep.price_mcents(), &[ep.scope()], None).await);
    }
    let body = sample(ep);
    let mut tasks = Vec::new();
    for (ki, k) in seeded.iter().enumerate() {
        for i in 0..per_key {
            let server = if (i + ki as i64) % 2 == 0 { (a.client.clone(), a.url(ep.path())) } else { (b.client.clone(), b.url(ep.path())) };
            let key = k.key.clone();
            let body = body.to_string();
            tasks.push(tokio::spawn(async move { (ki, paid_post(server.0, server.1, key, body).await.status().as_u16()) }));
        }
    }
    let mut ok = vec![0i64; keys];
    for t in tasks {
        let (ki, status) = t.await.unwrap();
        match status {
            200 => ok[ki] += 1,
            402 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    for (ki, k) in seeded.iter().enumerate() {
        assert_eq!(ok[ki], affordable, "key {ki}: exactly the affordable calls succeed");
        let me = a.me(&k.key).await;
        let balance = me["balance_mcents"].as_i64().unwrap();
        assert_eq!(balance, 0, "never overdrawn, fully spent");
        assert_eq!(me["calls"], affordable);
        let ledger = b.ledger(&k.key).await;
        let sum: i64 = ledger.iter().map(|e| e["amount_mcents"].as_i64().unwrap()).sum();
        assert_eq!(sum, balance, "the ledger sums to the balance");
        let holds = ledger.iter().filter(|e| e["kind"] == "hold").count() as i64;
        assert_eq!(holds, affordable);
        let captures = ledger.iter().filter(|e| e["kind"] == "capture").count() as i64;
        assert_eq!(captures, affordable, "every successful call is captured");
        assert_eq!(db.store.ledger_sum(db.key_ref(k).await).await.unwrap(), balance);
        for e in &ledger {
            assert!(e["balance_after"].as_i64().unwrap() >= 0);
        }
    }
}

async fn rate_limit_shared_between_instances(db: &TestDb) {
    if !db.shared_limits() {
        eprintln!("in-process rate limits are per instance: set TEST_REDIS_URL to test shared limits");
        return;
    }
    let a = db.server().await;
    let b = db.server().await;
    let ep = *Endpoint::ALL.iter().min_by_key(|e| e.rate_limit_per_minute()).unwrap();
    let limit = i64::from(ep.rate_limit_per_minute());
    if limit > 200 {
        return;
    }
    let k = db.seed_key(balance_for(limit * 3, ep), &[ep.scope()], None).await;
    let body = sample(ep);
    let mut tasks = Vec::new();
    for i in 0..limit + 6 {
        let (client, url) = if i % 2 == 0 { (a.client.clone(), a.url(ep.path())) } else { (b.client.clone(), b.url(ep.path())) };
        let key = k.key.clone();
        let body = body.to_string();
        tasks.push(tokio::spawn(async move {
            let res = paid_post(client, url, key, body).await;
            let retry = res.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (res.status().as_u16(), retry)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (200, _) => ok += 1,
            (429, Some(r)) => {
                assert!((1..=60).contains(&r.parse::<u64>().unwrap()));
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, limit, "the limit holds across instances");
    assert_eq!(limited, 6);
    let v: Value = a.me(&k.key).await;
    assert_eq!(v["calls"], limit);
}

/// One paid call with a key, as a concurrent task sends it.
async fn paid_post(client: reqwest::Client, url: String, key: String, body: String) -> reqwest::Response {
    client
        .post(url)
        .header("Authorization", format!("Bearer {key}"))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}
