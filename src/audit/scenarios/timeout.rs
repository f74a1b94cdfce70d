//! Handler time limits (contract 3.8, `TIMEOUT_MS`): a handler that outlives its endpoint's
//! `timeout_ms` is the gateway's failure, so the hold is always released.

use anyhow::{Result, anyhow, ensure};

use super::prelude::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![scenario!("timeout.handler", "a call whose handler outlives its timeout_ms → 504 handler_timeout, refunded, balance unchanged, ledger hold + release", |c, o| handler_timeout(c, o))]
}

fn handler_timeout(c: &mut Client, o: &Options) -> Result<Outcome> {
    let Some((name, body)) = o.slow_call.clone() else {
        return Ok(Outcome::NotApplicable("needs --slow-call ENDPOINT=JSON (a call the handler takes longer than the endpoint's timeout_ms on)".into()));
    };
    let ep = c.endpoints.iter().find(|e| e.name == name).cloned().ok_or_else(|| anyhow!("--slow-call names {name:?}, which /v1/pricing does not list"))?;
    let minted = ep.price * 2;
    let key = c.key_for(&ep, 2)?;
    let r = c.call(&ep, &key, &body);
    expect(&r, 504, "handler_timeout")?;
    let v = r.json();
    ensure!(v["refunded"] == true && v["charged_mcents"] == 0, "504 not refunded: {}", r.body);
    ensure!(v["balance_mcents"] == minted, "504 says balance_mcents {}, the key had {minted}", v["balance_mcents"]);
    ensure!(v.get("note").is_none(), "504 carries a note (contract 2: none on handler_timeout): {}", r.body);
    ensure!(r.header("x-charged-mcents").as_deref() == Some("0"), "X-Charged-Mcents {:?}", r.header("x-charged-mcents"));
    ensure!(r.header("x-balance-mcents") == Some(minted.to_string()), "X-Balance-Mcents {:?}", r.header("x-balance-mcents"));
    let id = r.header("x-request-id").unwrap_or_default();
    ensure!(v["request_id"] == id.as_str(), "request_id {} ≠ X-Request-Id {id}", v["request_id"]);
    ensure!(c.balance(&key)? == minted, "balance not restored after the timeout");
    let me = c.me(&key);
    ensure!(me["refunded_mcents"] == ep.price && me["calls"] == 0, "/v1/me after the release: refunded_mcents {}, calls {} (expected {}, 0)", me["refunded_mcents"], me["calls"], ep.price);
    let rows = ledger_rows(c, &key)?;
    ensure!(kinds_for(&rows, &id) == ["hold", "release"], "ledger rows of {id}: {:?}, expected hold then release", kinds_for(&rows, &id));
    let amounts: Vec<i64> = rows.iter().filter(|e| e["request_id"] == id.as_str()).filter_map(|e| e["amount_mcents"].as_i64()).collect();
    ensure!(amounts.iter().sum::<i64>() == 0 && amounts.contains(&-(ep.price as i64)), "hold/release amounts {amounts:?}");
    pass(format!("{} refunded, ledger hold + release, balance still {minted}", r.brief()))
}
