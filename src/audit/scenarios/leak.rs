//! Key material never shown: /v1/me, the ledger, the leaderboard, error bodies.

use anyhow::{Result, ensure};

use super::prelude::*;
use crate::audit::client::random_hex64;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("leak.me", "/v1/me shows no key material", |c, _| leak_check(c, "/v1/me", true)),
        scenario!("leak.ledger", "/v1/me/ledger shows no key material", |c, _| leak_check(c, "/v1/me/ledger", true)),
        scenario!("leak.leaderboard", "/v1/leaderboard shows no key material", |c, _| leak_check(c, "/v1/leaderboard", false)),
        scenario!("leak.errors", "error bodies never echo the presented key", |c, _| {
            let ep = c.first();
            let fake = format!("{}{}", c.prefix(), random_hex64());
            let r = c.post(&ep.path(), &[("Authorization", &format!("Bearer {fake}"))], &ep.sample().to_string());
            ensure!(!r.body.contains(&fake[c.prefix().len()..]), "the key is echoed: {}", r.body);
            pass(r.brief())
        }),
    ]
}

/// After a paid call, `path` (read with the key when `with_key`) shows neither the key nor its hash.
fn leak_check(c: &mut Client, path: &str, with_key: bool) -> Result<Outcome> {
    let (ep, key, _) = setup(c)?;
    expect(&c.call_sample(&ep, &key), 200, "")?;
    let bearer = key.bearer();
    let headers: Vec<(&str, &str)> = if with_key { vec![("Authorization", bearer.as_str())] } else { vec![] };
    let r = c.get(path, &headers);
    expect(&r, 200, "")?;
    ensure!(r.json()["ok"] == true, "not an ok body: {}", r.body);
    no_key_material(&r.body, &[&key], &c.prefix())?;
    pass(format!("{} bytes, no key, no hash", r.body.len()))
}
