//! The contract (docs/contract.md), end to end over HTTP: routing, CORS, admin mint, keys,
//! authentication, scopes, validate-before-charge, body bounds, charging, rate limits,
//! refunds, /v1/me, the ledger and the leaderboard. Every test runs on SQLite, and on
//! PostgreSQL (+ Redis) when TEST_DATABASE_URL (and TEST_REDIS_URL) are set.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use gateway::generated::{Endpoint, GATEWAY, PROJECT_NAME, PROJECT_VERSION, SCOPES};
use gateway::handler::{Call, Context, HandlerError, Handlers, Reply};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

backend_tests!(
    health_and_pricing,
    routing_and_request_ids,
    unread_bodies_close_the_connection,
    cors_on_public_routes_only,
    admin_disabled_without_admin_key,
    admin_rejects_wrong_admin_key,
    admin_mint_shows_the_key_once,
    admin_mint_input_is_strict,
    admin_mint_hourly_limit,
    authentication_on_paid_routes,
    scopes_are_default_deny,
    validate_before_charge,
    body_size_bounds,
    charge_headers_and_envelope,
    insufficient_balance,
    rate_limit_per_key_per_endpoint,
    refunds_on_handler_failure_are_capped,
    settlement_is_idempotent_per_request,
    me_ledger_and_leaderboard,
    two_authorization_headers_are_invalid,
    out_of_range_numbers_are_invalid_input,
    non_decimal_content_length_is_refused,
    stalled_body_times_out_without_charge,
    ledger_pages_with_next_before,
);

const UUID_LEN: usize = 36;

fn is_uuid_v4(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok_and(|u| u.get_version_num() == 4) && s.len() == UUID_LEN && s == s.to_lowercase()
}

fn assert_no_cors(res: &reqwest::Response) {
    for (name, _) in res.headers() {
        assert!(!name.as_str().starts_with("access-control-"), "admin response carries {name}");
    }
}

async fn health_and_pricing(db: &TestDb) {
    let s = db.server().await;
    let res = s.get("/v1/health").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    assert_eq!(json_of(res).await, json!({ "ok": true, "status": "ok", "service": PROJECT_NAME, "version": PROJECT_VERSION }));

    let body = json_of(s.get("/v1/pricing").await).await;
    assert_eq!(body["ok"], true);
    assert_eq!(body["unit"], "mcents");
    assert_eq!(body["mcents_per_cent"], 1000);
    let eps = body["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), Endpoint::ALL.len());
    for (e, ep) in eps.iter().zip(Endpoint::ALL) {
        let mut input = serde_json::Map::new();
        for f in ep.input_shape() {
            input.insert(f.name.into(), json!({ "type": f.ty.as_str(), "required": f.required }));
        }
        assert_eq!(
            e,
            &json!({
                "name": ep.name(), "method": "POST", "path": format!("/v1/{}", ep.name()),
                "price_mcents": ep.price_mcents(), "xp": ep.xp(), "scope": ep.scope(),
                "description": ep.description(), "rate_limit_per_minute": ep.rate_limit_per_minute(),
                "input": input,
            })
        );
    }
}

async fn routing_and_request_ids(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    for path in ["/", "/v1", "/v1/", "/v1/nope", "/v1/health/", "/v2/health", &format!("/v1/{}/x", ep.name())] {
        let body = expect_error(s.get(path).await, 404, "not_found", false).await;
        assert!(is_uuid_v4(body["request_id"].as_str().unwrap()));
    }
    let res = s.get(&format!("/v1/{}", ep.name())).await;
    assert_eq!(res.headers()["allow"], "POST, OPTIONS");
    expect_error(res, 405, "method_not_allowed", false).await;
    let res = s.client.post(s.url("/v1/health")).send().await.unwrap();
    assert_eq!(res.headers()["allow"], "GET, OPTIONS");
    expect_error(res, 405, "method_not_allowed", false).await;
    let res = s.get("/v1/admin/mint").await;
    assert_eq!(res.headers()["allow"], "POST");
    assert_no_cors(&res);
    expect_error(res, 405, "method_not_allowed", false).await;

    let a = s.get("/v1/health").await;
    let b = s.get("/v1/health").await;
    let (a, b) = (a.headers()["x-request-id"].to_str().unwrap().to_string(), b.headers()["x-request-id"].to_str().unwrap().to_string());
    assert!(is_uuid_v4(&a) && is_uuid_v4(&b));
    assert_ne!(a, b);
}

async fn unread_bodies_close_the_connection(db: &TestDb) {
    let s = db.server().await;
    let rpc = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#;
    // Refused before its body was read (no key): the client is told the connection ends.
    let refused = s.call(ep().name(), None, &sample(ep())).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers().get("connection").map(|v| v.to_str().unwrap()), Some("close"));
    // The body read (or none at all): the connection is kept.
    let k = db.seed_key(1000, &[ep().scope()], None).await;
    let read = s.client.post(s.url("/mcp")).header("authorization", format!("Bearer {}", k.key)).header("content-type", "application/json").header("accept", "application/json, text/event-stream").body(rpc).send().await.unwrap();
    assert_eq!(read.status(), 200);
    assert!(read.headers().get("connection").is_none(), "{:?}", read.headers());
    assert!(s.get("/v1/health").await.headers().get("connection").is_none());
}

async fn cors_on_public_routes_only(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    for res in [s.get("/v1/health").await, s.get("/v1/nope").await, s.call(ep.name(), None, &sample(ep)).await] {
        assert_eq!(res.headers()["access-control-allow-origin"], "*");
        assert_eq!(
            res.headers()["access-control-allow-headers"],
            "Authorization, Content-Type, Idempotency-Key, PAYMENT-SIGNATURE, X-PAYMENT"
        );
        assert_eq!(
            res.headers()["access-control-expose-headers"],
            "X-Request-Id, X-Charged-Mcents, X-Balance-Mcents, Retry-After, WWW-Authenticate, Idempotent-Replayed, PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE, Payment-Receipt"
        );
    }
    for path in [format!("/v1/{}", ep.name()), "/v1/me".into(), "/v1/pricing".into()] {
        let res = s
            .client
            .request(reqwest::Method::OPTIONS, s.url(&path))
            .header("Origin", "https://example.com")
            .header("Access-Control-Request-Method", "POST")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 204, "{path}");
        assert_eq!(res.headers()["access-control-allow-origin"], "*");
        // The preflight carries the same lists (contract section 2), Idempotent-Replayed included.
        assert_eq!(
            res.headers()["access-control-allow-headers"],
            "Authorization, Content-Type, Idempotency-Key, PAYMENT-SIGNATURE, X-PAYMENT"
        );
        assert_eq!(
            res.headers()["access-control-expose-headers"],
            "X-Request-Id, X-Charged-Mcents, X-Balance-Mcents, Retry-After, WWW-Authenticate, Idempotent-Replayed, PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE, Payment-Receipt"
        );
        assert!(res.headers()["access-control-allow-methods"].to_str().unwrap().contains("OPTIONS"));
    }
    // Admin paths: no preflight, no CORS, errors included.
    for path in ["/v1/admin/mint", "/v1/admin/other", "/v1/admin", "//v1//admin/mint"] {
        let res = s
            .client
            .request(reqwest::Method::OPTIONS, s.url(path))
            .header("Origin", "https://evil.example")
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "x-admin-key, content-type")
            .send()
            .await
            .unwrap();
        assert!([404, 405].contains(&res.status().as_u16()), "{path}: {}", res.status());
        assert_no_cors(&res);
    }
    assert_no_cors(&s.mint(&json!({}), "wrong").await);
    assert_no_cors(&s.mint(&json!({ "balance_mcents": "x" }), ADMIN_KEY).await);
}

async fn admin_disabled_without_admin_key(db: &TestDb) {
    for admin in [None, Some(String::new())] {
        let s = db.server_with(admin, Arc::new(gateway::GeneratedHandlers)).await;
        for given in ["", "anything", ADMIN_KEY] {
            let res = s.mint(&json!({ "balance_mcents": 1, "scopes": [SCOPES[0]] }), given).await;
            assert_no_cors(&res);
            expect_error(res, 503, "admin_disabled", false).await;
        }
    }
}

async fn admin_rejects_wrong_admin_key(db: &TestDb) {
    let s = db.server().await;
    let body = json!({ "balance_mcents": 1, "scopes": [SCOPES[0]] });
    for wrong in ["", "nope", &format!("{ADMIN_KEY}x"), &ADMIN_KEY[..ADMIN_KEY.len() - 1]] {
        let res = s.mint(&body, wrong).await;
        assert_eq!(res.headers()["www-authenticate"], format!("Bearer realm=\"{PROJECT_NAME}\""));
        assert_no_cors(&res);
        expect_error(res, 401, "invalid_admin_key", false).await;
    }
    let res = s.client.post(s.url("/v1/admin/mint")).header("Content-Type", "application/json").body(body.to_string()).send().await.unwrap();
    expect_error(res, 401, "invalid_admin_key", false).await;
}

async fn admin_mint_shows_the_key_once(db: &TestDb) {
    let s = db.server().await;
    let scope = ep().scope();
    let res = s.mint(&json!({ "balance_mcents": 12345, "scopes": [scope, scope], "name": "agent-1.v2 test" }), ADMIN_KEY).await;
    assert_eq!(res.status(), 201);
    assert_no_cors(&res);
    assert!(res.headers().contains_key("x-request-id"));
    let body = json_of(res).await;
    let mut keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["balance_mcents", "key", "key_id", "name", "ok", "scopes"]);
    let key = body["key"].as_str().unwrap();
    let hex = key.strip_prefix(key_prefix()).unwrap();
    assert!(hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    let key_id = body["key_id"].as_str().unwrap();
    assert!(key_id.len() == 18 && key_id.starts_with("k_") && key_id[2..].bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(body["balance_mcents"], 12345);
    assert_eq!(body["scopes"], json!([scope]));
    assert_eq!(body["name"], "agent-1.v2 test");

    let me = s.me(key).await;
    assert_eq!(me["key_id"], key_id);
    assert_eq!(me["balance_mcents"], 12345);
    assert_eq!(me["scopes"], json!([scope]));
    assert_eq!(me["name"], "agent-1.v2 test");

    // Use it, then look for the key anywhere: stored only as its SHA-256.
    let ep = Endpoint::ALL.iter().copied().find(|e| e.scope() == scope).unwrap();
    let _ = s.call(ep.name(), Some(key), &sample(ep)).await;
    let dump = db.dump().await;
    assert!(dump.contains(key_id));
    assert!(!dump.contains(hex), "the raw key is stored");
    let me_text = s.get_auth("/v1/me", key).await.text().await.unwrap();
    let lb_text = s.get("/v1/leaderboard").await.text().await.unwrap();
    let hash = gateway::keys::sha256_hex(key);
    for text in [&me_text, &lb_text] {
        assert!(!text.contains(hex) && !text.contains(&hash));
    }

    let res = s.mint(&json!({ "balance_mcents": 1, "scopes": SCOPES }), ADMIN_KEY).await;
    assert_eq!(res.status(), 201);
    let other = json_of(res).await;
    assert_eq!(other["name"], Value::Null);
    assert_ne!(other["key"], body["key"]);
    assert_ne!(other["key_id"], body["key_id"]);
}

async fn admin_mint_input_is_strict(db: &TestDb) {
    let s = db.server().await;
    let scope = SCOPES[0];
    let max = GATEWAY.max_mint_mcents;
    for v in [
        json!("1000"), json!("1e3"), json!(1.5), json!(0.1), json!(0.0), json!(0), json!(-1), json!(-1000), Value::Null,
        json!(true), json!(false), json!(max + 1), json!([1000]), json!({ "v": 1000 }),
    ] {
        let res = s.mint(&json!({ "balance_mcents": v, "scopes": [scope] }), ADMIN_KEY).await;
        expect_error(res, 400, "invalid_input", false).await;
    }
    for raw in [
        format!(r#"{{"balance_mcents": 1e400, "scopes": ["{scope}"]}}"#),
        format!(r#"{{"balance_mcents": -1e400, "scopes": ["{scope}"]}}"#),
        format!(r#"{{"balance_mcents": 99999999999999999999999, "scopes": ["{scope}"]}}"#),
        format!(r#"{{"balance_mcents": 1e-3, "scopes": ["{scope}"]}}"#),
    ] {
        expect_error(s.mint(&Value::String(raw.clone()), ADMIN_KEY).await, 400, "invalid_input", false).await;
    }
    // A safe integer written with an exponent or a zero fraction is an integer (as in JSON.parse).
    let res = s.mint(&Value::String(format!(r#"{{"balance_mcents": 1e3, "scopes": ["{scope}"]}}"#)), ADMIN_KEY).await;
    assert_eq!(json_of(res).await["balance_mcents"], 1000);
    assert_eq!(s.mint(&json!({ "scopes": [scope] }), ADMIN_KEY).await.status(), 400);
    assert_eq!(s.mint(&json!({ "balance_mcents": max, "scopes": [scope] }), ADMIN_KEY).await.status(), 201);

    for scopes in [None, Some(Value::Null), Some(json!([])), Some(json!(scope)), Some(json!([scope, "__not_a_scope__"])), Some(json!([1])), Some(json!([null])), Some(json!({}))] {
        let mut body = json!({ "balance_mcents": 100 });
        if let Some(sc) = scopes {
            body["scopes"] = sc;
        }
        expect_error(s.mint(&body, ADMIN_KEY).await, 400, "invalid_input", false).await;
    }
    for name in [json!(""), json!("x".repeat(33)), json!("<script>"), json!("a/b"), json!("名前"), json!(42), Value::Null, json!(["a"])] {
        let res = s.mint(&json!({ "balance_mcents": 100, "scopes": [scope], "name": name }), ADMIN_KEY).await;
        assert_eq!(res.status(), 400, "{name}");
    }
    assert_eq!(s.mint(&json!({ "balance_mcents": 100, "scopes": [scope], "name": "x".repeat(32) }), ADMIN_KEY).await.status(), 201);

    expect_error(s.mint(&json!({ "balance_mcents": 100, "scopes": [scope], "admin": true }), ADMIN_KEY).await, 400, "invalid_input", false).await;
    expect_error(s.mint(&json!([1, 2]), ADMIN_KEY).await, 400, "invalid_input", false).await;
    expect_error(s.mint(&Value::String("{nope".into()), ADMIN_KEY).await, 400, "invalid_json", false).await;
    let res = s
        .client
        .post(s.url("/v1/admin/mint"))
        .header("X-Admin-Key", ADMIN_KEY)
        .header("Content-Type", "text/plain")
        .body(json!({ "balance_mcents": 100, "scopes": [scope] }).to_string())
        .send()
        .await
        .unwrap();
    expect_error(res, 415, "unsupported_media_type", false).await;
    let big = json!({ "balance_mcents": 100, "scopes": [scope], "pad": "x".repeat(GATEWAY.max_body_bytes as usize) });
    expect_error(s.mint(&big, ADMIN_KEY).await, 413, "body_too_large", false).await;
}

async fn admin_mint_hourly_limit(db: &TestDb) {
    // Two instances share the budget: it lives in the database.
    let a = db.server().await;
    let b = db.server().await;
    let body = json!({ "balance_mcents": 1, "scopes": [SCOPES[0]] });
    let mut limited = None;
    for i in 0..=GATEWAY.mints_per_hour {
        let s = if i % 2 == 0 { &a } else { &b };
        let res = s.mint(&body, ADMIN_KEY).await;
        if res.status() == 429 {
            limited = Some((i, res));
            break;
        }
        assert_eq!(res.status(), 201);
    }
    let (i, res) = limited.expect("the hourly mint limit applies");
    assert_eq!(i, GATEWAY.mints_per_hour);
    let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry));
    assert_no_cors(&res);
    let err = expect_error(res, 429, "rate_limited", false).await;
    assert_eq!(err["retry_after_seconds"], retry);
    assert_eq!(a.mint(&body, ADMIN_KEY).await.status(), 429);
    assert_eq!(b.mint(&json!({ "balance_mcents": "bad", "scopes": [SCOPES[0]] }), ADMIN_KEY).await.status(), 400);
}

async fn authentication_on_paid_routes(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let input = sample(ep);
    async fn expect_401(res: reqwest::Response, code: &str) {
        assert_eq!(res.headers()["www-authenticate"], format!("Bearer realm=\"{PROJECT_NAME}\""));
        expect_error(res, 401, code, true).await;
    }
    expect_401(s.call(ep.name(), None, &input).await, "missing_key").await;

    let k = db.seed_key(balance_for(1, ep), &[ep.scope()], None).await;
    let hex = k.key.strip_prefix(key_prefix()).unwrap().to_string();
    for bad in [
        "not-a-key".to_string(),
        format!("zz_{hex}"),
        hex.clone(),
        k.key[..k.key.len() - 1].to_string(),
        format!("{}0", k.key),
        k.key.to_uppercase(),
        format!("{}{}", key_prefix(), "x".repeat(64)),
    ] {
        expect_401(s.call(ep.name(), Some(&bad), &input).await, "invalid_key").await;
    }
    let res = s
        .client
        .post(s.url(&format!("/v1/{}", ep.name())))
        .header("Authorization", format!("Basic {}", k.key))
        .header("Content-Type", "application/json")
        .body(input.to_string())
        .send()
        .await
        .unwrap();
    expect_401(res, "invalid_key").await;

    let unknown = format!("{}{}", key_prefix(), "0".repeat(64));
    expect_401(s.call(ep.name(), Some(&unknown), &input).await, "invalid_key").await;
    expect_error(s.get_auth("/v1/me", &unknown).await, 401, "invalid_key", false).await;
    expect_error(s.get("/v1/me").await, 401, "missing_key", false).await;

    // Keys in the query string are ignored.
    for q in ["key", "api_key", "access_token"] {
        let res = s
            .client
            .post(s.url(&format!("/v1/{}?{q}={}", ep.name(), k.key)))
            .header("Content-Type", "application/json")
            .body(input.to_string())
            .send()
            .await
            .unwrap();
        expect_401(res, "missing_key").await;
    }
    assert_eq!(s.balance(&k.key).await, balance_for(1, ep));

    // The scheme is case-insensitive.
    for scheme in ["bearer", "BEARER"] {
        // A fresh key each time: the endpoint's rate limit may be 1 per minute.
        let k2 = db.seed_key(balance_for(2, ep), &[ep.scope()], None).await;
        let res = s
            .client
            .post(s.url(&format!("/v1/{}", ep.name())))
            .header("Authorization", format!("{scheme} {}", k2.key))
            .header("Content-Type", "application/json")
            .body(input.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
}

async fn scopes_are_default_deny(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let others: Vec<&str> = SCOPES.iter().copied().filter(|sc| *sc != ep.scope()).collect();
    for scopes in [others.clone(), vec![]] {
        let k = db.seed_key(balance_for(3, ep), &scopes, None).await;
        let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
        assert!(res.headers().get("x-charged-mcents").is_none());
        let body = expect_error(res, 403, "scope_denied", true).await;
        assert_eq!(body["required_scope"], ep.scope());
        let me = s.me(&k.key).await;
        assert_eq!(me["balance_mcents"], balance_for(3, ep));
        assert_eq!(me["calls"], 0);
    }
    let k = db.seed_key(balance_for(3, ep), &[ep.scope()], None).await;
    assert_eq!(s.call(ep.name(), Some(&k.key), &sample(ep)).await.status(), 200);
    assert_eq!(s.balance(&k.key).await, balance_for(3, ep) - ep.price_mcents());
}

async fn expect_no_charge(s: &TestServer, res: reqwest::Response, status: u16, code: &str, key: &str, balance: i64) -> Value {
    assert!(res.headers().get("x-charged-mcents").is_none(), "{code}: {}", res.status());
    let body = expect_error(res, status, code, true).await;
    let me = s.me(key).await;
    assert_eq!(me["balance_mcents"], balance);
    assert_eq!(me["calls"], 0);
    body
}

fn deep(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

async fn validate_before_charge(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let sample = sample(ep);
    let balance = balance_for(3, ep);
    let k = db.seed_key(balance, &[ep.scope()], None).await;
    let key = k.key.as_str();
    let name = ep.name();
    for raw in ["{", "", "nope", "{'a':1}", "[1,]"] {
        expect_no_charge(&s, s.call(name, Some(key), &Value::String(raw.into())).await, 400, "invalid_json", key, balance).await;
    }
    for raw in ["[]", "null", "42", "\"str\"", "true"] {
        expect_no_charge(&s, s.call(name, Some(key), &Value::String(raw.into())).await, 400, "invalid_input", key, balance).await;
    }
    let mut unknown = sample.clone();
    unknown["__unknown_field__"] = json!(1);
    expect_no_charge(&s, s.call(name, Some(key), &unknown).await, 400, "invalid_input", key, balance).await;
    for raw in [r#"{"constructor": 1}"#, r#"{"__proto__": {"x": 1}}"#] {
        expect_no_charge(&s, s.call(name, Some(key), &Value::String(raw.into())).await, 400, "invalid_input", key, balance).await;
    }
    for f in ep.input_shape() {
        if sample.get(f.name).is_none() {
            continue;
        }
        let wrong = if f.ty == gateway::shape::FieldType::String { json!(12345) } else { json!("not-the-right-type") };
        for v in [wrong, Value::Null] {
            let mut body = sample.clone();
            body[f.name] = v;
            expect_no_charge(&s, s.call(name, Some(key), &body).await, 400, "invalid_input", key, balance).await;
        }
        if f.required {
            let mut body = sample.clone();
            body.as_object_mut().unwrap().remove(f.name);
            expect_no_charge(&s, s.call(name, Some(key), &body).await, 400, "invalid_input", key, balance).await;
        }
    }
    let mut too_deep = sample.clone();
    too_deep["__deep__"] = deep(gateway::shape::MAX_JSON_DEPTH + 5);
    let body = expect_no_charge(&s, s.call(name, Some(key), &too_deep).await, 400, "invalid_input", key, balance).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("nesting"));
    // Thousands of levels (as many as the body limit allows) are refused without a crash.
    let n = ((GATEWAY.max_body_bytes as usize - 32) / 2).min(5000);
    let raw = format!("{{\"__deep__\": {}{}}}", "[".repeat(n), "]".repeat(n));
    expect_no_charge(&s, s.call(name, Some(key), &Value::String(raw)).await, 400, "invalid_input", key, balance).await;

    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx"] {
        let res = s.call_with(name, Some(key), &sample, &[("Content-Type", ct)]).await;
        expect_no_charge(&s, res, 415, "unsupported_media_type", key, balance).await;
    }
    let res = s
        .client
        .post(s.url(&format!("/v1/{name}")))
        .header("Authorization", format!("Bearer {key}"))
        .body(sample.to_string())
        .send()
        .await
        .unwrap();
    expect_no_charge(&s, res, 415, "unsupported_media_type", key, balance).await;
    let res = s.call_with(name, Some(key), &sample, &[("Content-Type", "Application/JSON; charset=utf-8")]).await;
    assert_eq!(res.status(), 200);

    // The handler's own validate() refuses before any charge.
    let s2 = db.server_with(Some(ADMIN_KEY.into()), Arc::new(Scripted::refusing())).await;
    let k2 = db.seed_key(balance, &[ep.scope()], None).await;
    let body = expect_no_charge(&s2, s2.call(name, Some(&k2.key), &sample).await, 400, "invalid_input", &k2.key, balance).await;
    assert_eq!(body["error"]["message"], "refused by validate");
}

/// Sends a raw HTTP/1.1 request with a chunked body of `total` bytes (or fewer if the server
/// answers first) and returns (status line, bytes sent).
async fn chunked_post(addr: &str, path: &str, key: &str, prefix: &[u8], total: usize) -> (String, usize) {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut sent = 0usize;
    let mut first = true;
    let chunk = vec![b' '; 1024];
    while sent < total {
        let data: &[u8] = if first { prefix } else { &chunk };
        first = false;
        let frame = [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat();
        if sock.write_all(&frame).await.is_err() {
            break;
        }
        sent += data.len();
        tokio::task::yield_now().await;
    }
    let _ = sock.write_all(b"0\r\n\r\n").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), sock.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    (text.lines().next().unwrap_or("").to_string(), sent)
}

async fn body_size_bounds(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let max = GATEWAY.max_body_bytes as usize;
    let balance = balance_for(3, ep);
    let k = db.seed_key(balance, &[ep.scope()], None).await;
    let mut big = sample(ep);
    big["pad"] = json!("x".repeat(max));
    let body = expect_no_charge(&s, s.call(ep.name(), Some(&k.key), &big).await, 413, "body_too_large", &k.key, balance).await;
    assert_eq!(body["max_body_bytes"], max);

    // A chunked body without Content-Length is counted while streaming.
    let (status, _sent) = chunked_post(&s.addr(), &format!("/v1/{}", ep.name()), &k.key, b"{\"pad\":\"", max * 64).await;
    assert!(status.contains(" 413"), "{status}");
    assert_eq!(s.balance(&k.key).await, balance);

    // A small chunked body is accepted.
    let bytes = sample(ep).to_string().into_bytes();
    let (status, _) = chunked_post(&s.addr(), &format!("/v1/{}", ep.name()), &k.key, &bytes, bytes.len()).await;
    assert!(status.contains(" 200"), "{status}");
}

async fn charge_headers_and_envelope(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let k = db.seed_key(balance_for(2, ep), &[ep.scope()], None).await;
    let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    let body = json_of(res).await;
    assert_eq!(body["ok"], true);
    assert!(body.get("result").is_some());
    assert_eq!(body["charged_mcents"], ep.price_mcents());
    assert_eq!(body["balance_mcents"], balance_for(2, ep) - ep.price_mcents());
    assert!(is_uuid_v4(body["request_id"].as_str().unwrap()));
    assert_eq!(h["x-request-id"], body["request_id"].as_str().unwrap());
    assert_eq!(h["x-charged-mcents"], ep.price_mcents().to_string().as_str());
    assert_eq!(h["x-balance-mcents"], body["balance_mcents"].to_string().as_str());
    assert_eq!(h["cache-control"], "no-store");
    let me = s.me(&k.key).await;
    assert_eq!(me["xp"], ep.xp());
    assert_eq!(me["calls"], 1);
    assert_eq!(me["spent_mcents"], ep.price_mcents());
}

async fn insufficient_balance(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let start = ep.price_mcents() - 1;
    if start < 1 {
        return; // a 1-mcent endpoint cannot be underfunded by a minted key
    }
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let body = expect_no_charge(&s, s.call(ep.name(), Some(&k.key), &sample(ep)).await, 402, "insufficient_balance", &k.key, start).await;
    assert_eq!(body["price_mcents"], ep.price_mcents());
    assert_eq!(body["balance_mcents"], start);
}

async fn rate_limit_per_key_per_endpoint(db: &TestDb) {
    let s = db.server().await;
    let ep = *Endpoint::ALL.iter().min_by_key(|e| e.rate_limit_per_minute()).unwrap();
    let limit = i64::from(ep.rate_limit_per_minute());
    if limit > 300 {
        return;
    }
    let k = db.seed_key(balance_for(limit + 5, ep), &[ep.scope()], None).await;
    for _ in 0..limit {
        assert_eq!(s.call(ep.name(), Some(&k.key), &sample(ep)).await.status(), 200);
    }
    let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
    let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    let body = expect_error(res, 429, "rate_limited", true).await;
    assert_eq!(body["retry_after_seconds"], retry);
    assert_eq!(s.balance(&k.key).await, balance_for(limit + 5, ep) - limit * ep.price_mcents());
    // Another key is not limited.
    let k2 = db.seed_key(balance_for(1, ep), &[ep.scope()], None).await;
    assert_eq!(s.call(ep.name(), Some(&k2.key), &sample(ep)).await.status(), 200);
    // Refused calls (402) do not use up the budget.
    let poor = db.seed_key(1, &[ep.scope()], None).await;
    if ep.price_mcents() > 1 {
        for _ in 0..limit + 2 {
            assert_eq!(s.call(ep.name(), Some(&poor.key), &sample(ep)).await.status(), 402);
        }
    }
}

/// Test handlers: fail (Err or panic) or refuse in validate, counting runs.
struct Scripted {
    mode: &'static str,
    runs: Arc<AtomicUsize>,
}

impl Scripted {
    fn failing() -> Self {
        Scripted { mode: "fail", runs: Arc::default() }
    }
    fn panicking() -> Self {
        Scripted { mode: "panic", runs: Arc::default() }
    }
    fn refusing() -> Self {
        Scripted { mode: "refuse", runs: Arc::default() }
    }
    fn responding(mode: &'static str) -> Self {
        Scripted { mode, runs: Arc::default() }
    }
}

impl Handlers for Scripted {
    fn prepare(&self, _endpoint: Endpoint, _input: Value) -> Result<Call, String> {
        if self.mode == "refuse" {
            return Err("refused by validate".into());
        }
        let mode = self.mode;
        let runs = self.runs.clone();
        Ok(Box::new(move |_ctx: Context| {
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let own = |status: u16| {
                    let mut r = axum::response::Response::new(axum::body::Body::from("custom"));
                    *r.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
                    Ok(Reply::Response(r))
                };
                match mode {
                    "panic" => panic!("handler bug"),
                    "own503" => own(503),
                    "own418" => own(418),
                    _ => Err(HandlerError::new("upstream down")),
                }
            })
        }))
    }
}

async fn refunds_on_handler_failure_are_capped(db: &TestDb) {
    let ep = ep();
    let price = ep.price_mcents();
    let cap = i64::from(GATEWAY.refunds_per_key_per_hour);
    let handlers = Arc::new(Scripted::failing());
    let runs = handlers.runs.clone();
    let s = db.server_with(Some(ADMIN_KEY.into()), handlers).await;
    let start = balance_for(cap + 3, ep);
    let k = db.seed_key(start, &[ep.scope()], None).await;
    let calls = (cap + 2).min(i64::from(ep.rate_limit_per_minute()));
    for i in 0..calls {
        let res = s.call(ep.name(), Some(&k.key), &sample(ep)).await;
        let h = res.headers().clone();
        let body = expect_error(res, 502, "handler_failed", false).await;
        let refunded = i < cap;
        assert_eq!(body["refunded"], refunded, "call {i}");
        let expected_balance = start - (i + 1 - (i + 1).min(cap)) * price;
        assert_eq!(body["balance_mcents"], expected_balance, "call {i}");
        assert_eq!(body["charged_mcents"], if refunded { 0 } else { price });
        assert_eq!(h["x-charged-mcents"], (if refunded { 0 } else { price }).to_string().as_str());
        assert_eq!(h["x-balance-mcents"], expected_balance.to_string().as_str());
    }
    assert_eq!(runs.load(Ordering::SeqCst) as i64, calls);
    let me = s.me(&k.key).await;
    let unrefunded = calls - calls.min(cap);
    assert_eq!(me["balance_mcents"], start - unrefunded * price);
    assert_eq!(me["refunded_mcents"], calls.min(cap) * price);
    assert_eq!(me["calls"], 0, "failed calls are not counted");
    assert_eq!(me["xp"], 0);
    let ledger = s.ledger(&k.key).await;
    let releases = ledger.iter().filter(|e| e["kind"] == "release").count() as i64;
    assert_eq!(releases, calls.min(cap));
    let captures = ledger.iter().filter(|e| e["kind"] == "capture").count() as i64;
    assert_eq!(captures, unrefunded, "failures past the cap are captured");
    let sum: i64 = ledger.iter().map(|e| e["amount_mcents"].as_i64().unwrap()).sum();
    assert_eq!(sum, me["balance_mcents"].as_i64().unwrap());

    // A handler's own response: < 500 is sent as is and stays charged; >= 500 is a failure.
    let s3 = db.server_with(Some(ADMIN_KEY.into()), Arc::new(Scripted::responding("own418"))).await;
    let k3 = db.seed_key(balance_for(2, ep), &[ep.scope()], None).await;
    let res = s3.call(ep.name(), Some(&k3.key), &sample(ep)).await;
    assert_eq!(res.status(), 418);
    assert_eq!(res.headers()["x-charged-mcents"], price.to_string().as_str());
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    assert!(res.headers().contains_key("x-request-id"));
    assert_eq!(res.text().await.unwrap(), "custom");
    assert_eq!(s3.balance(&k3.key).await, balance_for(2, ep) - price);
    let s4 = db.server_with(Some(ADMIN_KEY.into()), Arc::new(Scripted::responding("own503"))).await;
    let k4 = db.seed_key(balance_for(2, ep), &[ep.scope()], None).await;
    let body = expect_error(s4.call(ep.name(), Some(&k4.key), &sample(ep)).await, 502, "handler_failed", false).await;
    assert_eq!(body["refunded"], cap > 0);

    // A panic is a failure too.
    let s2 = db.server_with(Some(ADMIN_KEY.into()), Arc::new(Scripted::panicking())).await;
    let k2 = db.seed_key(balance_for(1, ep), &[ep.scope()], None).await;
    let body = expect_error(s2.call(ep.name(), Some(&k2.key), &sample(ep)).await, 502, "handler_failed", false).await;
    assert_eq!(body["refunded"], cap > 0);
}

async fn me_ledger_and_leaderboard(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let a = db.seed_key(balance_for(10, ep), &[ep.scope()], Some("alice")).await;
    let b = db.seed_key(balance_for(10, ep), &[ep.scope()], None).await;
    let idle = db.seed_key(balance_for(10, ep), &[ep.scope()], Some("idle")).await;
    let n = 3.min(i64::from(ep.rate_limit_per_minute()));
    for _ in 0..n {
        assert_eq!(s.call(ep.name(), Some(&a.key), &sample(ep)).await.status(), 200);
    }
    assert_eq!(s.call(ep.name(), Some(&b.key), &sample(ep)).await.status(), 200);

    let me = s.me(&a.key).await;
    let mut fields: Vec<&String> = me.as_object().unwrap().keys().collect();
    fields.sort();
    assert_eq!(
        fields,
        ["badges", "balance_mcents", "calls", "key_id", "level", "name", "ok", "refunded_mcents", "scopes", "spent_mcents", "xp"]
    );
    assert_eq!(me["key_id"], a.key_id);
    assert_eq!(me["name"], "alice");
    assert_eq!(me["calls"], n);
    assert_eq!(me["xp"], n * ep.xp());
    assert_eq!(me["level"], gateway::levels::level_for(n * ep.xp()));
    assert_eq!(me["badges"], json!(["first_call"]));
    assert_eq!(me["spent_mcents"], n * ep.price_mcents());
    assert_eq!(me["refunded_mcents"], 0);

    let entries = s.ledger(&a.key).await;
    assert_eq!(entries.len() as i64, 2 * n + 1, "a hold and a capture per call, and the mint");
    assert_eq!(entries.last().unwrap()["kind"], "mint");
    assert_eq!(entries.last().unwrap()["endpoint"], Value::Null);
    assert_eq!(entries[0]["kind"], "capture");
    assert_eq!(entries[0]["endpoint"], ep.name());
    assert_eq!(entries[0]["amount_mcents"], 0);
    assert_eq!(entries[0]["balance_after"], me["balance_mcents"]);
    assert_eq!(entries[1]["kind"], "hold");
    assert_eq!(entries[1]["amount_mcents"], -ep.price_mcents());
    assert_eq!(entries[1]["balance_after"], me["balance_mcents"]);
    assert_eq!(entries[1]["request_id"], entries[0]["request_id"]);
    assert!(entries.windows(2).all(|w| w[0]["seq"].as_i64() > w[1]["seq"].as_i64()), "newest first");
    for e in &entries {
        let mut f: Vec<&String> = e.as_object().unwrap().keys().collect();
        f.sort();
        assert_eq!(f, ["amount_mcents", "balance_after", "endpoint", "kind", "request_id", "seq", "ts"]);
        assert!(e["ts"].as_i64().unwrap() > 1_600_000_000_000);
    }
    let one = json_of(s.get_auth("/v1/me/ledger?limit=1", &a.key).await).await;
    assert_eq!(one["entries"].as_array().unwrap().len(), 1);
    assert_eq!(s.get_auth("/v1/me/ledger?limit=100000", &a.key).await.status(), 200);
    for bad in ["0", "-1", "abc", "1.5", "", "9999999"] {
        let res = s.get_auth(&format!("/v1/me/ledger?limit={bad}"), &a.key).await;
        expect_error(res, 400, "invalid_input", false).await;
    }
    expect_error(s.get("/v1/me/ledger").await, 401, "missing_key", false).await;

    let lb = json_of(s.get("/v1/leaderboard").await).await;
    assert_eq!(lb["ok"], true);
    let entries = lb["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "keys that never called are not ranked");
    // Ordered by xp desc, calls desc, key_id asc.
    let mut expected = [(n * ep.xp(), n, a.key_id.clone(), "alice"), (ep.xp(), 1, b.key_id.clone(), "")];
    expected.sort_by(|x, y| y.0.cmp(&x.0).then(y.1.cmp(&x.1)).then(x.2.cmp(&y.2)));
    for (i, (xp, calls, key_id, name)) in expected.iter().enumerate() {
        let e = &entries[i];
        assert_eq!(e["rank"], i + 1);
        assert_eq!(e["key_id"], key_id.as_str());
        assert_eq!(e["xp"], *xp);
        assert_eq!(e["calls"], *calls);
        assert_eq!(e["level"], gateway::levels::level_for(*xp));
        assert_eq!(e["badges"], json!(["first_call"]));
        if name.is_empty() {
            assert_eq!(e["name"], Value::Null);
        } else {
            assert_eq!(e["name"], *name);
        }
    }
    let mut f: Vec<&String> = entries[0].as_object().unwrap().keys().collect();
    f.sort();
    assert_eq!(f, ["badges", "calls", "key_id", "level", "name", "rank", "xp"]);
    let _ = idle;
}

/// Releasing the same failed call twice (a retry, another instance) gives the price back once; a
/// call id that never held releases nothing.
async fn settlement_is_idempotent_per_request(db: &TestDb) {
    use gateway::store::{HoldOutcome, HoldRequest, HoldState, ReleaseReason};
    let ep = ep();
    let price = ep.price_mcents();
    let k = db.seed_key(price * 2, &[ep.scope()], None).await;
    let key_ref = db.key_ref(&k).await;
    let hold = HoldRequest { key_ref, endpoint: ep.name(), price, xp: ep.xp(), request_id: "req-1", timeout_ms: 1000, idem: None };
    let held = db.store.hold(&hold).await.unwrap();
    assert!(matches!(held, HoldOutcome::Held { .. }), "{held:?}");
    let caller = ReleaseReason::Caller { cap: 100 };
    let first = db.store.release(key_ref, "req-1", caller).await.unwrap();
    assert!(first.refunded && first.settled_now);
    assert_eq!(first.balance_mcents, price * 2);
    let again = db.store.release(key_ref, "req-1", caller).await.unwrap();
    assert!(!again.settled_now, "a second settlement released again");
    assert_eq!(again.balance_mcents, price * 2);
    let stranger = db.store.release(key_ref, "never-charged", caller).await.unwrap();
    assert!(!stranger.refunded && stranger.state == HoldState::Unknown);
    assert_eq!(db.store.ledger_sum(key_ref).await.unwrap(), price * 2);
    assert_eq!(kinds(&db.server().await.ledger(&k.key).await), ["release", "hold", "mint"]);
}

// ---------------------------------------------------------------------------- raw HTTP

/// One HTTP/1.1 exchange on a fresh connection: writes `request`, then reads until the server
/// closes (or 15 s). Returns (status code, lowercase headers, body).
async fn raw_exchange(addr: &str, request: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(request).await.unwrap();
    read_answer(&mut sock).await
}

async fn read_answer(sock: &mut tokio::net::TcpStream) -> (u16, Vec<(String, String)>, String) {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(15), sock.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Checks a raw answer against the error shape: status, code, note, X-Request-Id = request_id.
fn expect_raw_error(answer: &(u16, Vec<(String, String)>, String), status: u16, code: &str, no_charge: bool) -> Value {
    let (got, headers, body) = answer;
    assert_eq!(*got, status, "{code}: {body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{code}: not JSON ({e}): {body:?}"));
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["request_id"].as_str(), header_of(headers, "x-request-id"), "request_id = X-Request-Id");
    if no_charge {
        assert_eq!(v["note"], "no charge applied", "{v}");
    } else {
        assert!(v.get("note").is_none(), "{v}");
    }
    v
}

/// Contract 3.3 / 3.8 step 3: two or more Authorization headers are never well-formed, on every
/// Bearer route (the first one does not win), and nothing is charged.
async fn two_authorization_headers_are_invalid(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let addr = s.addr();
    let balance = balance_for(3, ep);
    let k = db.seed_key(balance, &[ep.scope()], None).await;
    let other = db.seed_key(balance, &[ep.scope()], None).await;
    let rows = s.ledger(&k.key).await.len();
    let realm = format!("Bearer realm=\"{PROJECT_NAME}\"");
    let auth = |keys: &[&str]| keys.iter().map(|key| format!("Authorization: Bearer {key}\r\n")).collect::<String>();
    for pair in [[k.key.as_str(), k.key.as_str()], [k.key.as_str(), other.key.as_str()]] {
        for path in ["/v1/me", "/v1/me/ledger"] {
            let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{}Connection: close\r\n\r\n", auth(&pair));
            let answer = raw_exchange(&addr, req.as_bytes()).await;
            expect_raw_error(&answer, 401, "invalid_key", false);
            assert_eq!(header_of(&answer.1, "www-authenticate"), Some(realm.as_str()), "{path}");
        }
        let body = sample(ep).to_string();
        let req = format!(
            "POST /v1/{} HTTP/1.1\r\nHost: {addr}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            ep.name(),
            auth(&pair),
            body.len()
        );
        let answer = raw_exchange(&addr, req.as_bytes()).await;
        expect_raw_error(&answer, 401, "invalid_key", true);
        assert_eq!(header_of(&answer.1, "www-authenticate"), Some(realm.as_str()));
        assert!(header_of(&answer.1, "x-charged-mcents").is_none());
    }
    assert_eq!(s.balance(&k.key).await, balance);
    assert_eq!(s.balance(&other.key).await, balance);
    assert_eq!(s.ledger(&k.key).await.len(), rows, "no ledger row");
    // The same raw request with one header is served (the check is about the count, not the helper).
    let req = format!("GET /v1/me HTTP/1.1\r\nHost: {addr}\r\n{}Connection: close\r\n\r\n", auth(&[&k.key]));
    assert_eq!(raw_exchange(&addr, req.as_bytes()).await.0, 200);
}

/// 1e400 is valid JSON that no field accepts (the Worker reads it as Infinity): 400 invalid_input,
/// not invalid_json, on the admin mint and on paid routes (with the note); truncated JSON stays
/// invalid_json.
async fn out_of_range_numbers_are_invalid_input(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let scope = SCOPES[0];
    let mints = db.mint_rows().await;
    let body = expect_error(
        s.mint(&Value::String(format!(r#"{{"balance_mcents": 1e400, "scopes": ["{scope}"]}}"#)), ADMIN_KEY).await,
        400,
        "invalid_input",
        false,
    )
    .await;
    assert!(body["error"]["message"].as_str().unwrap().contains("out of range"), "{body}");
    expect_error(s.mint(&Value::String(r#"{"balance_mcents": 1e400"#.into()), ADMIN_KEY).await, 400, "invalid_json", false).await;
    assert_eq!(db.mint_rows().await, mints, "nothing minted");

    let balance = balance_for(2, ep);
    let k = db.seed_key(balance, &[ep.scope()], None).await;
    let rows = s.ledger(&k.key).await.len();
    let field = ep.input_shape().first().map_or("__unknown", |f| f.name);
    for raw in [format!(r#"{{"{field}": 1e400}}"#), format!(r#"{{"{field}": -1e400}}"#), r#"{"__unknown": 1e400}"#.to_string()] {
        expect_no_charge(&s, s.call(ep.name(), Some(&k.key), &Value::String(raw)).await, 400, "invalid_input", &k.key, balance).await;
    }
    let truncated = Value::String(format!(r#"{{"{field}": 1e400"#));
    expect_no_charge(&s, s.call(ep.name(), Some(&k.key), &truncated).await, 400, "invalid_json", &k.key, balance).await;
    assert_eq!(s.ledger(&k.key).await.len(), rows, "no ledger row");
}

/// A Content-Length that is not decimal digits never reaches a handler and never charges. hyper
/// (the HTTP/1 parser under axum) refuses it itself, before any gateway code runs: a bare
/// `400 Bad Request`, empty body, `connection: close` (no X-Request-Id, no JSON; documented). A
/// request that got past it would be answered 400 invalid_json by the gateway (src/body.rs).
async fn non_decimal_content_length_is_refused(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let addr = s.addr();
    let balance = balance_for(2, ep);
    let k = db.seed_key(balance, &[ep.scope()], None).await;
    let rows = s.ledger(&k.key).await.len();
    let body = sample(ep).to_string();
    for declared in ["-5", "12abc", "1e3", "+5", "0x10", ""] {
        let req = format!(
            "POST /v1/{} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n{body}",
            ep.name(),
            k.key
        );
        let answer = raw_exchange(&addr, req.as_bytes()).await;
        if answer.2.is_empty() {
            // hyper's own answer.
            assert_eq!(answer.0, 400, "Content-Length: {declared}");
            assert_eq!(header_of(&answer.1, "content-length"), Some("0"), "Content-Length: {declared}");
        } else {
            expect_raw_error(&answer, 400, "invalid_json", true);
        }
    }
    assert_eq!(s.balance(&k.key).await, balance);
    assert_eq!(s.ledger(&k.key).await.len(), rows, "no ledger row");
    // Control: the same request with a correct Content-Length is served and charged.
    let req = format!(
        "POST /v1/{} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        ep.name(),
        k.key,
        body.len()
    );
    assert_eq!(raw_exchange(&addr, req.as_bytes()).await.0, 200);
    assert_eq!(s.balance(&k.key).await, balance - ep.price_mcents());
}

/// A body that stalls (Content-Length: 100, 10 bytes sent, then nothing) is answered
/// 408 request_timeout once BODY_READ_TIMEOUT_MS has passed: nothing held, nothing minted.
async fn stalled_body_times_out_without_charge(db: &TestDb) {
    let timeout = std::time::Duration::from_millis(800);
    let state = gateway::AppState::new(
        db.new_store().await,
        db.new_limiter().await,
        Some(ADMIN_KEY.into()),
        Arc::new(gateway::GeneratedHandlers),
    );
    state.set_body_read_timeout(timeout);
    assert_eq!(state.body_read_timeout(), timeout);
    let s = TestServer::start(state).await;
    let ep = ep();
    let addr = s.addr();
    let balance = balance_for(2, ep);
    let k = db.seed_key(balance, &[ep.scope()], None).await;
    let rows = s.ledger(&k.key).await.len();
    let mints = db.mint_rows().await;

    let paid_head = format!(
        "POST /v1/{} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
        ep.name(),
        k.key
    );
    let mint_head = format!(
        "POST /v1/admin/mint HTTP/1.1\r\nHost: {addr}\r\nX-Admin-Key: {ADMIN_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    for (head, no_charge) in [(paid_head, true), (mint_head, false)] {
        let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let started = std::time::Instant::now();
        sock.write_all(head.as_bytes()).await.unwrap();
        sock.write_all(b"{\"message\"").await.unwrap();
        // The socket stays open and silent: only the gateway's timeout can end the request.
        let answer = read_answer(&mut sock).await;
        let elapsed = started.elapsed();
        expect_raw_error(&answer, 408, "request_timeout", no_charge);
        assert!(elapsed >= timeout, "answered after {elapsed:?}, before the timeout");
        assert!(elapsed < timeout + std::time::Duration::from_secs(5), "answered after {elapsed:?}");
        assert!(header_of(&answer.1, "x-charged-mcents").is_none());
        drop(sock);
    }
    assert_eq!(s.balance(&k.key).await, balance);
    assert_eq!(s.ledger(&k.key).await.len(), rows, "no hold, no ledger row");
    assert_eq!(db.mint_rows().await, mints, "nothing minted");

    // A body that arrives in pieces within the timeout is served normally.
    let body = sample(ep).to_string();
    let (a, b) = body.split_at(body.len() / 2);
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/{} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{a}",
        ep.name(),
        k.key,
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    sock.write_all(b.as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut sock).await.0, 200);
    assert_eq!(s.balance(&k.key).await, balance - ep.price_mcents());
}

/// GET /v1/me/ledger?limit=N&before=SEQ (contract 3.5): following next_before until null lists
/// every entry exactly once, newest first; `before` is validated after auth and `limit`.
async fn ledger_pages_with_next_before(db: &TestDb) {
    let s = db.server().await;
    let ep = ep();
    let k = db.seed_key(balance_for(10, ep), &[ep.scope()], None).await;
    let n = 2.min(i64::from(ep.rate_limit_per_minute()));
    for _ in 0..n {
        assert_eq!(s.call(ep.name(), Some(&k.key), &sample(ep)).await.status(), 200);
    }
    let all = s.ledger(&k.key).await;
    assert!(all.len() >= 3, "a mint and at least one call: {all:?}");
    let first = json_of(s.get_auth("/v1/me/ledger", &k.key).await).await;
    assert_eq!(first["next_before"], Value::Null, "everything fits in the default page");
    assert_eq!(first["entries"].as_array().unwrap(), &all);

    for limit in [1usize, 2] {
        let mut listed: Vec<Value> = Vec::new();
        let mut query = format!("/v1/me/ledger?limit={limit}");
        loop {
            let page = json_of(s.get_auth(&query, &k.key).await).await;
            let entries = page["entries"].as_array().unwrap().clone();
            assert!(entries.len() <= limit);
            listed.extend(entries.iter().cloned());
            match page["next_before"].as_i64() {
                Some(cursor) => {
                    assert_eq!(entries.len(), limit, "a full page before a cursor");
                    assert_eq!(Some(cursor), entries.last().unwrap()["seq"].as_i64(), "next_before = last seq");
                    query = format!("/v1/me/ledger?limit={limit}&before={cursor}");
                }
                None => {
                    assert_eq!(page["next_before"], Value::Null);
                    break;
                }
            }
        }
        assert_eq!(listed, all, "limit={limit}: every entry once, newest first");
    }
    // Only entries with seq < before; a cursor below every seq gives an empty last page.
    let newest = all[0]["seq"].as_i64().unwrap();
    let page = json_of(s.get_auth(&format!("/v1/me/ledger?before={newest}"), &k.key).await).await;
    assert_eq!(page["entries"].as_array().unwrap(), &all[1..].to_vec());
    assert_eq!(page["next_before"], Value::Null);
    let oldest = all.last().unwrap()["seq"].as_i64().unwrap();
    let page = json_of(s.get_auth(&format!("/v1/me/ledger?before={oldest}"), &k.key).await).await;
    assert_eq!(page["entries"], json!([]));
    assert_eq!(page["next_before"], Value::Null);
    assert_eq!(s.get_auth("/v1/me/ledger?before=999999999999999", &k.key).await.status(), 200);

    for bad in ["0", "-1", "abc", "1.5", "", "1e3", "+5", "%201", "1234567890123456"] {
        let body = expect_error(s.get_auth(&format!("/v1/me/ledger?before={bad}"), &k.key).await, 400, "invalid_input", false).await;
        assert!(body["error"]["message"].as_str().unwrap().contains("before"), "{bad}: {body}");
    }
    // Order: auth, then limit, then before.
    expect_error(s.get("/v1/me/ledger?limit=0&before=0").await, 401, "missing_key", false).await;
    let body = expect_error(s.get_auth("/v1/me/ledger?limit=0&before=0", &k.key).await, 400, "invalid_input", false).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("limit"), "{body}");
    let unknown = format!("{}{}", key_prefix(), "0".repeat(64));
    expect_error(s.get_auth("/v1/me/ledger?before=5", &unknown).await, 401, "invalid_key", false).await;
}

/// ADMIN_KEY with surrounding whitespace could never match an X-Admin-Key header (HTTP strips
/// it): the server refuses to start and says why; the same key without the whitespace starts.
#[test]
fn admin_key_with_whitespace_refuses_to_start() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    // The server binary of this package, next to the test binary's deps/ directory.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join(format!("{PROJECT_NAME}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} not built", bin.display());
    let dir = std::env::temp_dir().join(format!("mcpay-adminkey-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite:{}", dir.join("gate.db").display());
    // Runs the server until it exits or `within` passes (then stops it); returns (exited by
    // itself with success?, its whole output).
    let run = |admin_key: &str, within: Duration, until: &str| -> (Option<bool>, String) {
        let mut child = Command::new(&bin)
            .env("ADMIN_KEY", admin_key)
            .env("DATABASE_URL", &db)
            .env("BIND", "127.0.0.1")
            .env("PORT", "0")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env_remove("REDIS_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for mut pipe in [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                        break;
                    }
                }
            });
        }
        let deadline = Instant::now() + within;
        let mut out = String::new();
        let exited = loop {
            while let Ok(chunk) = rx.try_recv() {
                out.push_str(&chunk);
            }
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status.success());
            }
            if out.contains(until) || Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // What the pipes still hold once the process is gone.
        std::thread::sleep(Duration::from_millis(100));
        while let Ok(chunk) = rx.try_recv() {
            out.push_str(&chunk);
        }
        (exited, out)
    };
    for bad in [" test-admin-key", "test-admin-key ", "test-admin-key\n", "\ttest-admin-key"] {
        let (exited, out) = run(bad, Duration::from_secs(30), "listening");
        assert_eq!(exited, Some(false), "{bad:?} must stop the server with an error: {out}");
        assert!(out.contains("ADMIN_KEY") && out.contains("whitespace"), "{bad:?}: {out}");
        assert!(!out.contains("listening"), "{out}");
    }
    // Control: the same key without the whitespace starts (the refusal is about the whitespace).
    let (exited, out) = run("test-admin-key", Duration::from_secs(30), "listening");
    assert_eq!(exited, None, "{out}");
    assert!(out.contains("listening"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
