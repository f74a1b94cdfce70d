//! Request bodies: size limits with and without Content-Length, chunked uploads.

use anyhow::{Result, bail, ensure};

use super::prelude::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("body.oversized", "a 2 MiB body with Content-Length → 413 body_too_large, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let big = format!("{{\"pad\":\"{}\"}}", "a".repeat(2 * 1024 * 1024));
            let r = c.call(&ep, &key, &big);
            refused_uncharged(c, &r, 413, "body_too_large", &key, bal)
        }),
        scenario!("body.oversized_chunked", "a 2 MiB chunked body (no Content-Length) → 413 (or the upload cut short), no charge", |c, _| oversized_chunked(c)),
        scenario!("body.chunked_small", "a small valid chunked body → served and charged normally", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.post_chunked(&ep.path(), &[("Authorization", &key.bearer())], ep.sample().to_string().into_bytes());
            expect(&r, 200, "")?;
            ensure!(c.balance(&key)? == bal - ep.price, "charged wrong");
            pass(r.brief())
        }),
    ]
}

/// What local `wrangler dev` (`npm run dev`) answers when the worker stops reading a request body
/// early: its ProxyWorker, which streams each request on to the worker, sees the cut-off body as a
/// failed fetch, takes it for a worker restart and answers this plain-text 503 for any request
/// that is not GET or HEAD. Deployed Workers have no such proxy.
const WRANGLER_DEV_RESTART: &str = "Your worker restarted mid-request";

/// `r` is an answer local wrangler dev makes up (never one a gateway gives): which one.
pub(crate) fn dev_server_artefact(r: &Reply) -> Option<&'static str> {
    if r.status == 503 && r.body.contains(WRANGLER_DEV_RESTART) {
        return Some("503 \"Your worker restarted mid-request\"");
    }
    if r.status == 413 && r.body.trim().is_empty() {
        return Some("413 with its body cut off by the connection reset");
    }
    None
}

/// The balance right after an oversized upload. Local wrangler dev may still be restarting its
/// proxy then (the next request fails or gets its 503), so a read that is not a 200 is tried again
/// for about 3 s; a gateway that never answers /v1/me still fails.
fn balance_after_upload(c: &Client, key: &Key) -> Result<u64> {
    let mut last = String::new();
    for _ in 0..10 {
        let r = c.get("/v1/me", &[("Authorization", &key.bearer())]);
        if r.status == 200 {
            return c.balance(key);
        }
        last = r.brief();
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    bail!("/v1/me did not answer 200 after the oversized upload (last: {last})")
}

/// A few tries, because the dev-server artefacts (the 503 above, or a 413 whose body the connection
/// reset cut off) come and go; money moving is never an artefact and fails at once.
fn oversized_chunked(c: &mut Client) -> Result<Outcome> {
    let (ep, key, bal) = setup(c)?;
    let mut artefacts = Vec::new();
    for _ in 0..5 {
        let big = format!("{{\"pad\":\"{}\"}}", "a".repeat(2 * 1024 * 1024)).into_bytes();
        let r = c.post_chunked(&ep.path(), &[("Authorization", &key.bearer())], big);
        let now = balance_after_upload(c, &key)?;
        ensure!(now == bal, "balance moved from {bal} to {now} on an oversized upload ({})", r.brief());
        if r.status == 0 {
            // The gateway answered early and closed the connection while the body was still being
            // sent: it refused to read it. Then only the balance can tell.
            return pass(format!("connection closed mid-upload ({}), balance still {bal}", r.body));
        }
        if let Some(artefact) = dev_server_artefact(&r) {
            artefacts.push(artefact);
            continue;
        }
        if r.status == 413 && r.code() == "body_too_large" {
            return refused_uncharged(c, &r, 413, "body_too_large", &key, bal);
        }
        bail!("expected 413 body_too_large (or the upload cut short), got {}", r.brief());
    }
    let tries = artefacts.len();
    artefacts.sort_unstable();
    artefacts.dedup();
    Ok(Outcome::NotApplicable(format!(
        "local wrangler dev's proxy, not the gateway, answered all {tries} tries with {} (it takes a body the worker stopped reading for a worker restart; a deployed Worker has no such proxy); balance still {bal}",
        artefacts.join(" or ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, body: &str) -> Reply {
        Reply { status, headers: Default::default(), body: body.into() }
    }

    #[test]
    fn wrangler_dev_artefacts_are_told_from_gateway_answers() {
        let restart = "Your worker restarted mid-request. Please try sending the request again. Only GET or HEAD requests are retried automatically.";
        assert!(dev_server_artefact(&reply(503, restart)).is_some());
        assert!(dev_server_artefact(&reply(413, "")).is_some());
        // A gateway's own 503 or 413 is judged, never excused.
        assert!(dev_server_artefact(&reply(503, r#"{"ok":false,"error":{"code":"admin_disabled"}}"#)).is_none());
        assert!(dev_server_artefact(&reply(413, r#"{"ok":false,"error":{"code":"body_too_large"}}"#)).is_none());
        assert!(dev_server_artefact(&reply(200, restart)).is_none());
    }
}
