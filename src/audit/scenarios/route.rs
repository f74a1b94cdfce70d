//! Routes: health, pricing, unknown paths and methods.

use anyhow::ensure;

use super::prelude::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("route.health", "GET /v1/health → 200 {ok:true}", |c, _| {
            let r = c.get("/v1/health", &[]);
            expect(&r, 200, "")?;
            ensure!(r.json()["ok"] == true, "body: {}", r.body);
            pass(r.brief())
        }),
        scenario!("route.pricing", "GET /v1/pricing → 200, every endpoint with an integer price, scope and path", |c, _| {
            let r = c.get("/v1/pricing", &[]);
            expect(&r, 200, "")?;
            for e in r.json()["endpoints"].as_array().cloned().unwrap_or_default() {
                ensure!(e["price_mcents"].is_u64() && e["scope"].is_string() && e["path"].is_string(), "bad entry {e}");
            }
            pass(format!("{} endpoints", c.endpoints.len()))
        }),
        scenario!("route.unknown", "an unknown path → 404 not_found in the error shape", |c, _| {
            let r = c.get("/nope/at/all", &[]);
            expect(&r, 404, "not_found")?;
            pass(r.brief())
        }),
        scenario!("route.unknown_v1", "POST /v1/<unknown> → 404 not_found, nothing charged", |c, _| {
            let (_, key, bal) = setup(c)?;
            let r = c.post("/v1/no_such_endpoint_x", &[("Authorization", &key.bearer())], "{}");
            expect(&r, 404, "not_found")?;
            ensure!(c.balance(&key)? == bal, "balance moved");
            pass(r.brief())
        }),
        scenario!("route.trailing_slash", "POST /v1/<endpoint>/ is not the endpoint → 404, nothing charged", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.post(&format!("{}/", ep.path()), &[("Authorization", &key.bearer())], &ep.sample().to_string());
            expect(&r, 404, "")?;
            ensure!(c.balance(&key)? == bal, "balance moved");
            pass(r.brief())
        }),
        scenario!("route.wrong_method", "GET on a paid endpoint → 405 with Allow: POST", |c, _| {
            let ep = c.first();
            let r = c.get(&ep.path(), &[]);
            expect(&r, 405, "method_not_allowed")?;
            ensure!(r.header("allow").is_some_and(|a| a.contains("POST")), "no Allow header");
            pass(r.brief())
        }),
        scenario!("route.admin_get", "GET /v1/admin/mint → 405 (or 404), never a key", |c, _| {
            let admin = c.admin_key.clone().unwrap_or_default();
            let r = c.get("/v1/admin/mint", &[("X-Admin-Key", &admin)]);
            ensure!(r.status == 405 || r.status == 404, "got {}", r.brief());
            ensure!(r.json()["key"].is_null(), "returned a key");
            pass(r.brief())
        }),
    ]
}
