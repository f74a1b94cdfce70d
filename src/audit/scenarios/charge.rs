//! Charging: exact prices, balances, bursts, the ledger, XP and refunds.

use anyhow::{Result, bail, ensure};

use super::prelude::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("charge.exact_price", "a paid call is charged exactly the listed price, shown in headers and body", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.call_sample(&ep, &key);
            expect(&r, 200, "")?;
            ensure!(r.header("x-charged-mcents") == Some(ep.price.to_string()), "X-Charged-Mcents {:?}", r.header("x-charged-mcents"));
            ensure!(r.header("x-balance-mcents") == Some((bal - ep.price).to_string()), "X-Balance-Mcents {:?}", r.header("x-balance-mcents"));
            let v = r.json();
            ensure!(v["charged_mcents"] == ep.price && v["balance_mcents"] == bal - ep.price, "body {}", r.body);
            ensure!(c.balance(&key)? == bal - ep.price, "/v1/me disagrees");
            pass(format!("charged {} of {bal}", ep.price))
        }),
        scenario!("charge.every_endpoint", "every listed endpoint charges its own listed price", |c, _| {
            let eps = c.endpoints.clone();
            for ep in &eps {
                let key = c.key_for(ep, 2)?;
                let r = c.call_sample(ep, &key);
                expect(&r, 200, "")?;
                ensure!(c.balance(&key)? == ep.price, "{} charged wrong", ep.name);
            }
            pass(format!("{} endpoints", eps.len()))
        }),
        scenario!("charge.insufficient", "balance below the price → 402 insufficient_balance, nothing charged", |c, _| {
            let ep = c.first();
            if ep.price < 2 {
                return Ok(Outcome::NotApplicable("the price is 1 mcent: no balance is below it".into()));
            }
            let key = c.mint(ep.price - 1, &[ep.scope.as_str()])?;
            let r = c.call_sample(&ep, &key);
            expect(&r, 402, "insufficient_balance")?;
            ensure!(c.balance(&key)? == ep.price - 1, "balance moved");
            pass(r.brief())
        }),
        scenario!("charge.exact_balance", "a balance of exactly one price → one 200, then 402, final balance 0", |c, _| {
            let ep = c.first();
            let key = c.key_for(&ep, 1)?;
            expect(&c.call_sample(&ep, &key), 200, "")?;
            expect(&c.call_sample(&ep, &key), 402, "insufficient_balance")?;
            ensure!(c.balance(&key)? == 0, "balance not 0");
            pass("200 then 402, balance 0")
        }),
        scenario!("charge.concurrent_burst", "60 concurrent calls on a key with room for 20 → exactly 20 served, balance 0, never negative", |c, _| {
            let ep = c.first();
            let n = 20u64;
            if ep.rate_limit < 3 * n {
                // Rate limiting would refuse some calls for another reason; keep the burst within it.
                return burst(c, &ep, ep.rate_limit.max(2) / 2, ep.rate_limit as usize);
            }
            burst(c, &ep, n, 3 * n as usize)
        }),
        scenario!("charge.ledger_matches", "the ledger's entries sum to the balance change", |c, _| {
            let ep = c.first();
            let minted = ep.price * 5;
            let key = c.key_for(&ep, 5)?;
            for _ in 0..3 {
                expect(&c.call_sample(&ep, &key), 200, "")?;
            }
            let _ = c.call(&ep, &key, "not json");
            let now = c.balance(&key)?;
            let (sum, _) = ledger_sum(c, &key)?;
            ensure!(minted as i64 + sum == now as i64, "minted {minted}, ledger sums to {sum}, balance {now}");
            ensure!(now == minted - 3 * ep.price, "balance {now}");
            // Contract 3.5: each paid call is a hold then its capture; the refused call wrote nothing.
            let (captured, released) = settled_holds(&ledger_rows(c, &key)?)?;
            ensure!(captured == 3 && released == 0, "{captured} holds captured and {released} released after 3 paid calls");
            pass(format!("{minted} {sum:+} = {now}; 3 × hold + capture"))
        }),
        scenario!("charge.keys_independent", "charges on one key never touch another", |c, _| {
            let (ep, a, _) = setup(c)?;
            let b = c.key_for(&ep, 3)?;
            let bal = ep.price * 3;
            expect(&c.call_sample(&ep, &a), 200, "")?;
            ensure!(c.balance(&b)? == bal, "the other key moved");
            pass("unchanged")
        }),
        scenario!("charge.xp_awarded", "a paid call awards the listed XP and counts one call", |c, _| {
            let (ep, key, _) = setup(c)?;
            let before = c.me(&key);
            expect(&c.call_sample(&ep, &key), 200, "")?;
            let after = c.me(&key);
            ensure!(after["xp"].as_u64() == before["xp"].as_u64().map(|x| x + ep.xp), "xp {} → {}", before["xp"], after["xp"]);
            ensure!(after["calls"].as_u64() == before["calls"].as_u64().map(|x| x + 1), "calls {} → {}", before["calls"], after["calls"]);
            pass(format!("+{} xp", ep.xp))
        }),
        scenario!("charge.refund_on_failure", "a call whose handler fails → 502 handler_failed, refunded", |c, o| {
            let Some((name, body)) = failing(o) else {
                return Ok(Outcome::NotApplicable("needs --failing-call ENDPOINT=JSON (a call the handler fails on)".into()));
            };
            let ep = c.endpoints.iter().find(|e| e.name == name).cloned().ok_or_else(|| anyhow::anyhow!("no endpoint {name}"))?;
            let key = c.key_for(&ep, 2)?;
            let r = c.call(&ep, &key, &body);
            expect(&r, 502, "handler_failed")?;
            ensure!(r.json()["refunded"] == true, "not refunded: {}", r.body);
            ensure!(c.balance(&key)? == ep.price * 2, "balance not restored");
            let id = r.header("x-request-id").unwrap_or_default();
            let kinds = kinds_for(&ledger_rows(c, &key)?, &id);
            ensure!(kinds == ["hold", "release"], "ledger rows of {id}: {kinds:?}, expected hold then release");
            pass(format!("{}, ledger hold + release", r.brief()))
        }),
        scenario!("charge.refund_cap", "refunds stop at the hourly cap per key; the ledger records each", |c, o| {
            let Some((name, body)) = failing(o) else {
                return Ok(Outcome::NotApplicable("needs --failing-call ENDPOINT=JSON (a call the handler fails on)".into()));
            };
            let ep = c.endpoints.iter().find(|e| e.name == name).cloned().ok_or_else(|| anyhow::anyhow!("no endpoint {name}"))?;
            let calls = ep.rate_limit.min(50);
            let key = c.key_for(&ep, calls)?;
            let mut refunded = 0;
            let mut kept = 0;
            for _ in 0..calls {
                let r = c.call(&ep, &key, &body);
                match (r.status, r.json()["refunded"].as_bool()) {
                    (502, Some(true)) => refunded += 1,
                    (502, Some(false)) => kept += 1,
                    _ => bail!("unexpected {}", r.brief()),
                }
            }
            ensure!(kept > 0, "all {calls} failures refunded: no cap within {calls} calls");
            let bal = c.balance(&key)?;
            ensure!(bal == ep.price * calls - kept * ep.price, "balance {bal} after {refunded} refunds and {kept} kept");
            let (sum, _) = ledger_sum(c, &key)?;
            ensure!((ep.price * calls) as i64 + sum == bal as i64, "ledger sums to {sum}");
            // Released within the cap, captured past it (contract 3.5).
            let (captured, released) = settled_holds(&ledger_rows(c, &key)?)?;
            ensure!(released as u64 == refunded && captured as u64 == kept, "ledger: {released} released and {captured} captured for {refunded} refunded and {kept} kept");
            pass(format!("{refunded} refunded, then {kept} not"))
        }),
    ]
}

fn concurrent(c: &Client, ep: &Endpoint, key: &Key, n: usize) -> Vec<Reply> {
    let body = ep.sample().to_string();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|_| s.spawn(|| c.call(ep, key, &body))).collect();
        handles.into_iter().map(|h| h.join().expect("request thread")).collect()
    })
}

fn failing(opts: &Options) -> Option<(String, String)> {
    opts.failing_call.clone()
}

fn burst(c: &mut Client, ep: &Endpoint, room: u64, n: usize) -> Result<Outcome> {
    let key = c.key_for(ep, room)?;
    let replies = concurrent(c, ep, &key, n);
    let ok = replies.iter().filter(|r| r.status == 200).count() as u64;
    let poor = replies.iter().filter(|r| r.status == 402).count();
    let other: Vec<String> = replies.iter().filter(|r| r.status != 200 && r.status != 402).map(Reply::brief).take(3).collect();
    ensure!(other.is_empty(), "unexpected answers: {other:?}");
    let bal = c.balance(&key)?;
    ensure!(ok == room, "{ok} served with room for {room}");
    ensure!(bal == 0, "balance {bal} after the burst");
    let (sum, _) = ledger_sum(c, &key)?;
    ensure!(sum == -((room * ep.price) as i64), "ledger sums to {sum}");
    pass(format!("{n} at once: {ok} served, {poor} × 402, balance 0"))
}
