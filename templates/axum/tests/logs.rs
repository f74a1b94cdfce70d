//! Logs never contain keys, key hashes, the admin key or Authorization headers, even at
//! trace level, whatever the request (keys in headers, query strings, bodies and paths).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::json;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_never_contain_secrets() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let db = TestDb::sqlite().await;
    let s = db.server().await;
    let ep = ep();
    let res = s.mint(&json!({ "balance_mcents": balance_for(5, ep), "scopes": [ep.scope()] }), ADMIN_KEY).await;
    assert_eq!(res.status(), 201);
    let key = json_of(res).await["key"].as_str().unwrap().to_string();
    let hex = key[key_prefix().len()..].to_string();
    let hash = gateway::keys::sha256_hex(&key);

    assert_eq!(s.call(ep.name(), Some(&key), &sample(ep)).await.status(), 200);
    let _ = s.call(ep.name(), Some(&format!("{key}x")), &sample(ep)).await;
    let _ = s.client.post(s.url(&format!("/v1/{}?key={key}", ep.name()))).send().await.unwrap();
    let _ = s.get(&format!("/v1/{key}")).await;
    let _ = s.get_auth("/v1/me", &key).await;
    let _ = s.get_auth("/v1/me/ledger?limit=abc", &key).await;
    let _ = s.mint(&json!({ "balance_mcents": 1 }), &format!("{ADMIN_KEY}-wrong")).await;
    drop(s);
    db.cleanup().await;

    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(text.contains("request"), "the access log is captured");
    for secret in [&key, &hex, &hash, &ADMIN_KEY.to_string()] {
        assert!(!text.contains(secret.as_str()), "a secret leaked into the logs");
    }
    assert!(!text.to_ascii_lowercase().contains("authorization: bearer"));
}
