//! Scopes: default deny, and no escalation through the call body.

use anyhow::ensure;
use serde_json::json;

use super::prelude::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("scope.allowed", "a key with the endpoint's scope → 200", |c, _| {
            let (ep, key, _) = setup(c)?;
            expect(&c.call_sample(&ep, &key), 200, "")?;
            pass("200")
        }),
        scenario!("scope.default_deny", "a key without the endpoint's scope → 403 scope_denied, nothing charged", |c, _| {
            let ep = c.first();
            let Some(other) = c.other_scope(&ep) else {
                return Ok(Outcome::NotApplicable("every endpoint needs the same scope; no second scope to test with".into()));
            };
            let key = c.key_for(&other, 3)?;
            let bal = other.price * 3;
            let r = c.call_sample(&ep, &key);
            expect(&r, 403, "scope_denied")?;
            ensure!(c.balance(&key)? == bal, "balance moved on a 403");
            pass(format!("{} calling {} with scope {}", r.brief(), ep.name, other.scope))
        }),
        scenario!("scope.no_escalation_in_body", "scopes smuggled in the call body grant nothing", |c, _| {
            let ep = c.first();
            let Some(other) = c.other_scope(&ep) else {
                return Ok(Outcome::NotApplicable("no second scope to escalate to".into()));
            };
            let key = c.key_for(&other, 3)?;
            let mut body = ep.sample();
            body["scopes"] = json!([ep.scope]);
            let r = c.call(&ep, &key, &body.to_string());
            ensure!(r.status == 403 || r.status == 400, "got {}", r.brief());
            ensure!(c.balance(&key)? == other.price * 3, "balance moved");
            pass(r.brief())
        }),
    ]
}
