//! `GET /v1/me/ledger` paging (contract 3.5): following `next_before` lists every row once, newest
//! first; malformed cursors are refused.

use anyhow::{Result, bail, ensure};
use serde_json::Value;

use super::prelude::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![scenario!("ledger.paging", "limit=2 pages followed by next_before until null list every row once, seq strictly decreasing, as the unpaged list; before=0 / abc / 16 digits → 400 invalid_input", |c, _| paging(c))]
}

fn paging(c: &mut Client) -> Result<Outcome> {
    let ep = c.first();
    let key = c.key_for(&ep, 3)?;
    for _ in 0..3 {
        expect(&c.call_sample(&ep, &key), 200, "")?;
    }
    let whole = c.ledger_query(&key, "limit=500");
    expect(&whole, 200, "")?;
    let all: Vec<Value> = whole.json()["entries"].as_array().cloned().unwrap_or_default();
    ensure!(whole.json()["next_before"].is_null(), "the unpaged ledger of a new key has next_before {}", whole.json()["next_before"]);
    ensure!(all.len() >= 5, "{} ledger rows after a mint and 3 paid calls (expected a mint, 3 holds, 3 captures)", all.len());
    let (captured, released) = settled_holds(&all)?;
    ensure!(captured == 3 && released == 0 && count_kind(&all, "mint") == 1, "rows {:?}", all.iter().map(|e| e["kind"].clone()).collect::<Vec<_>>());

    let mut paged: Vec<Value> = Vec::new();
    let mut pages = 0;
    let mut query = "limit=2".to_string();
    loop {
        pages += 1;
        ensure!(pages <= all.len() + 1, "still paging after {pages} pages of 2 for {} rows", all.len());
        let r = c.ledger_query(&key, &query);
        expect(&r, 200, "").map_err(|e| e.context(format!("?{query}")))?;
        let v = r.json();
        let entries = v["entries"].as_array().cloned().unwrap_or_default();
        ensure!(entries.len() <= 2, "?{query} gave {} rows", entries.len());
        paged.extend(entries.iter().cloned());
        match &v["next_before"] {
            Value::Null => break,
            next => {
                let next = next.as_u64().ok_or_else(|| anyhow::anyhow!("?{query}: next_before {next} is not a seq"))?;
                ensure!(entries.len() == 2, "?{query}: a short page ({} rows) with next_before {next}", entries.len());
                ensure!(entries.last().and_then(|e| e["seq"].as_u64()) == Some(next), "?{query}: next_before {next} is not the last row's seq");
                query = format!("limit=2&before={next}");
            }
        }
    }
    let seqs: Vec<u64> = paged.iter().map(|e| e["seq"].as_u64().unwrap_or(0)).collect();
    ensure!(seqs.windows(2).all(|w| w[0] > w[1]), "seq not strictly decreasing across the pages: {seqs:?}");
    ensure!(paged == all, "the pages ({} rows, seq {seqs:?}) differ from the unpaged list ({} rows)", paged.len(), all.len());

    for bad in ["before=0", "before=abc", "before=1234567890123456", "before=-1", "limit=0", "limit=abc"] {
        let r = c.ledger_query(&key, bad);
        if r.status != 400 || r.code() != "invalid_input" {
            bail!("?{bad}: expected 400 invalid_input, got {}", r.brief());
        }
    }
    pass(format!("{} rows in {pages} pages of 2, as unpaged; 400 for before=0, abc, 16 digits, -1 and limit=0, abc", all.len()))
}
