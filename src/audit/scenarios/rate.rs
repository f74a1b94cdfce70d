//! Per-minute rate limits.

use anyhow::{bail, ensure};

use super::prelude::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("rate.limit", "more calls than the per-minute limit → 429 rate_limited with Retry-After, not charged", |c, _| {
            let ep = c.endpoints.iter().min_by_key(|e| e.rate_limit).cloned().expect("endpoints");
            if ep.rate_limit > 500 {
                return Ok(Outcome::NotApplicable(format!("the lowest limit is {}/min; too many calls to audit", ep.rate_limit)));
            }
            let key = c.key_for(&ep, ep.rate_limit + 5)?;
            let mut served = 0;
            let mut limited = None;
            for _ in 0..ep.rate_limit + 5 {
                let r = c.call_sample(&ep, &key);
                match r.status {
                    200 => served += 1,
                    429 => { limited = Some(r); break; }
                    _ => bail!("unexpected {}", r.brief()),
                }
            }
            let r = limited.ok_or_else(|| anyhow::anyhow!("{served} calls served, no 429 (limit {}/min)", ep.rate_limit))?;
            expect(&r, 429, "rate_limited")?;
            let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("429 without integer Retry-After"))?;
            ensure!((1..=60).contains(&retry), "Retry-After {retry}");
            ensure!(served <= ep.rate_limit, "{served} served with a limit of {}", ep.rate_limit);
            ensure!(c.balance(&key)? == (ep.rate_limit + 5 - served) * ep.price, "the 429 was charged");
            pass(format!("{served} served, then 429 Retry-After {retry}"))
        }),
    ]
}
