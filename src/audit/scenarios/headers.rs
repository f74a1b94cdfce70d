//! Headers and shapes every answer shares: request ids, the error shape, CORS, caching.

use anyhow::ensure;

use super::prelude::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("headers.request_id", "every response, errors included, has a unique X-Request-Id", |c, _| {
            let ep = c.first();
            let rs = [c.get("/v1/health", &[]), c.get("/nope", &[]), c.post(&ep.path(), &[], "{}"), c.get("/v1/pricing", &[])];
            let ids: Vec<String> = rs.iter().filter_map(|r| r.header("x-request-id")).collect();
            ensure!(ids.len() == rs.len(), "{} of {} responses had X-Request-Id", ids.len(), rs.len());
            let mut uniq = ids.clone();
            uniq.sort();
            uniq.dedup();
            ensure!(uniq.len() == ids.len(), "repeated ids {ids:?}");
            pass(format!("{} distinct ids", ids.len()))
        }),
        scenario!("headers.error_shape", "errors are {ok:false, error:{code,message}, request_id} matching X-Request-Id", |c, _| {
            let ep = c.first();
            for r in [c.get("/nope", &[]), c.post(&ep.path(), &[], "{}")] {
                let v = r.json();
                ensure!(v["ok"] == false && v["error"]["code"].is_string() && v["error"]["message"].is_string(), "shape: {}", r.body);
                ensure!(v["request_id"].as_str() == r.header("x-request-id").as_deref(), "request_id differs from X-Request-Id");
            }
            pass("shape ok")
        }),
        scenario!("headers.cors_public", "OPTIONS on a paid endpoint → 204 with CORS allowing Authorization and exposing the billing headers", |c, _| {
            let ep = c.first();
            let r = c.request("OPTIONS", &ep.path(), &[("Origin", "https://agent.example"), ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "authorization,content-type")], None);
            ensure!(r.status == 204 || r.status == 200, "preflight {}", r.brief());
            ensure!(r.header("access-control-allow-origin").is_some(), "no ACAO");
            let allow = r.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
            for h in ["authorization", "content-type", "idempotency-key", "payment-signature", "x-payment"] {
                ensure!(allow.contains(h), "Allow-Headers {allow:?} lacks {h}");
            }
            let call = c.post("/v1/health", &[("Origin", "https://agent.example")], "");
            let _ = call;
            let paid = c.post(&ep.path(), &[("Origin", "https://agent.example")], "{}");
            let expose = paid.header("access-control-expose-headers").unwrap_or_default().to_ascii_lowercase();
            for h in ["x-request-id", "x-charged-mcents", "x-balance-mcents", "retry-after", "www-authenticate", "payment-required", "payment-response", "x-payment-response", "payment-receipt"] {
                ensure!(expose.contains(h), "Expose-Headers {expose:?} lacks {h}");
            }
            pass(r.brief())
        }),
        scenario!("headers.no_store_on_me", "/v1/me answers are not cacheable by shared caches", |c, _| {
            let (_, key, _) = setup(c)?;
            let r = c.get("/v1/me", &[("Authorization", &key.bearer())]);
            let cc = r.header("cache-control").unwrap_or_default().to_ascii_lowercase();
            ensure!(cc.contains("no-store") || cc.contains("private"), "Cache-Control {cc:?}");
            pass(format!("Cache-Control: {cc}"))
        }),
    ]
}
