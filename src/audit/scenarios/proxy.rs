//! `/mcp/<upstream>`, a metered MCP server that already exists (contract 3.12): the caller's key,
//! scope and rate limit are checked before anything is forwarded; only `tools/call` of a priced tool
//! holds money (the tool's price, else the upstream's default), settled by the upstream's outcome
//! (result: captured; JSON-RPC error, 5xx, reset, timeout: released); free traffic passes without a
//! ledger row; `tools/list` carries each tool's terms; the caller's credentials never reach the
//! upstream; SSE answers stream through.
//!
//! Run against a gateway with an upstream named by `--upstream NAME` (its terms are read from
//! `/v1/pricing`'s `upstreams`). Most scenarios call the tools of tests/upstream/server.mjs
//! (forecast, alerts, echo, fail, tool_error, progress, whoami, slow; crash over stdio) and are n/a on an upstream
//! without the one they need; `--upstream-control URL` (that server's base URL) lets the audit count
//! what reached the upstream and make it fail (HTTP 500, a reset connection, JSON answers).
//! Without `--upstream` every proxy.* scenario is n/a.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

use super::mcp::{
    BALANCE, CHARGED, PRICE, PROTOCOL, REFUNDED, REQUEST_ID, SCOPE, answer, fresh_id, is_uuid, messages, post_to, pricing, refused, result,
    settled_as, unauthorized,
};
use super::prelude::*;
use crate::audit::client::random_hex64;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("proxy.auth", "/mcp/<upstream> without Authorization → 401 missing_key; a malformed or unknown key → 401 invalid_key (POST, GET, DELETE); nothing reaches the upstream", |c, o| auth(c, o)),
        scenario!("proxy.scope_denied", "a key without the upstream's scope → HTTP 403 scope_denied with required_scope (tools/list and tools/call); nothing forwarded or charged", |c, o| scope_denied(c, o)),
        scenario!("proxy.unknown_upstream", "/mcp/<a name that is no upstream> and /mcp/<upstream>/ (trailing slash) → 404 not_found, with a valid key", |c, o| unknown(c, o)),
        scenario!("proxy.free_discovery", "initialize, notifications/initialized, ping and tools/list with the key → the upstream's answers; no hold, balance and ledger unchanged", |c, o| free_discovery(c, o)),
        scenario!("proxy.tool_terms", "tools/list: every tool's _meta io.mcpay/price_mcents is its price in /v1/pricing (listed, else the default) and io.mcpay/scope the upstream's scope; the upstream's own tools and _meta keys kept", |c, o| tool_terms(c, o)),
        scenario!("proxy.charge_exact", "a priced tools/call (forecast) → the upstream's result with _meta charged_mcents = price, balance_mcents, request_id = X-Request-Id; balance − price; ledger hold + capture under <upstream>/<tool>; forwarded once", |c, o| charge_exact(c, o)),
        scenario!("proxy.default_price", "a tool missing from [upstreams.NAME.tools] (echo) costs the upstream's price_mcents: hold + capture of that price", |c, o| default_price(c, o)),
        scenario!("proxy.free_tool", "a tool priced 0 (alerts) is forwarded and answered without a hold: balance and ledger unchanged", |c, o| free_tool(c, o)),
        scenario!("proxy.insufficient_balance", "a key whose balance is below the tool's price → JSON-RPC -32002 insufficient_balance with price_mcents and balance_mcents + no-charge note; nothing forwarded or charged", |c, o| insufficient(c, o)),
        scenario!("proxy.jsonrpc_error", "the upstream answers a JSON-RPC error (fail) → passed through, released (hold + release); 8 in a row all released (upstream failures are outside the refund cap)", |c, o| jsonrpc_error(c, o)),
        scenario!("proxy.tool_error", "a result with isError: true (tool_error) → passed through and captured (released when the upstream has refund_tool_errors)", |c, o| tool_error(c, o)),
        scenario!("proxy.upstream_500", "the upstream answers HTTP 500 (--upstream-control) → 502 upstream_failed, refunded true, charged_mcents 0; balance unchanged, hold + release", |c, o| upstream_down(c, o, "http500")),
        scenario!("proxy.upstream_reset", "the upstream resets the connection (--upstream-control) → 502 upstream_failed, refunded; balance unchanged, hold + release", |c, o| upstream_down(c, o, "reset")),
        scenario!("proxy.timeout", "a call the upstream answers after its timeout_seconds (--upstream-slow-call) → 504 upstream_timeout (in an event stream already started: its body as an isError result) before the upstream answers, refunded; hold + release", |c, o| timeout(c, o)),
        scenario!("proxy.credentials_not_forwarded", "the upstream (whoami) never sees the caller's Authorization, Cookie, X-Admin-Key or payment headers, nor any key material; it gets the configured header (--upstream-header)", |c, o| credentials(c, o)),
        scenario!("proxy.sse_progress", "a tools/call answered over SSE (progress, steps 3, a progressToken) → the progress notifications reach the caller as they happen, ≥ 300 ms before the response; charged once", |c, o| sse_progress(c, o)),
        scenario!("proxy.json_answer", "an upstream answering application/json (--upstream-control) → one JSON answer with _meta charged_mcents, final X-Charged-Mcents / X-Balance-Mcents; hold + capture", |c, o| json_answer(c, o)),
        scenario!("proxy.response_headers", "every answer carries X-Request-Id (uuid) and X-Upstream-Duration-Ms; a paid call's X-Charged-Mcents and X-Balance-Mcents", |c, o| response_headers(c, o)),
        scenario!("proxy.session", "Mcp-Session-Id from the upstream's initialize passes back; sent with later requests it (and Mcp-Protocol-Version) reaches the upstream; DELETE ends the session upstream; a legacy SSE upstream: none issued or forwarded, one upstream session and handshake per call, GET/DELETE 405", |c, o| session(c, o)),
        scenario!("proxy.bad_messages", "a JSON-RPC batch → 400 -32600; a body that is not JSON → 400 -32700; nothing forwarded or charged", |c, o| bad_messages(c, o)),
        scenario!("proxy.body_too_large", "a 2 MiB tools/call → 413 body_too_large; nothing forwarded or charged", |c, o| too_large(c, o)),
        scenario!("proxy.cors", "OPTIONS /mcp/<upstream> → 204 with Access-Control-Allow-Methods GET, POST, DELETE, OPTIONS; PUT → 405", |c, o| cors(c, o)),
        scenario!("proxy.stdio_crash", "a stdio upstream (axum `command`) that dies in the middle of a call (crash) → 502 upstream_failed, released; the next call is served by a new process (whoami's pid)", |c, o| stdio_crash(c, o)),
        scenario!("proxy.rate_limited", "paid calls past the upstream's rate_limit_per_minute → JSON-RPC -32004 rate_limited with retry_after_seconds, nothing forwarded or charged; free traffic still answered", |c, o| rate_limited(c, o)),
    ]
}

/// The upstream under audit, as `/v1/pricing`'s `upstreams` lists it (contract 3.2).
struct Up {
    name: String,
    path: String,
    price: u64,
    tools: BTreeMap<String, u64>,
    scope: String,
    rate_limit: u64,
    refund_tool_errors: bool,
    /// A stdio upstream (`"transport": "stdio"`): the gateway's own MCP server fronts it, so its
    /// failures after the hold are isError results (contract 3.12), never 502/504.
    stdio: bool,
    /// A legacy HTTP+SSE upstream (`"transport": "sse"`): one upstream session per request, the
    /// handshake made by the gateway, no sessions for the caller (contract 3.12).
    sse: bool,
}

impl Up {
    fn price_of(&self, tool: &str) -> u64 {
        self.tools.get(tool).copied().unwrap_or(self.price)
    }
    /// The endpoint name its ledger rows carry for `tool`.
    fn endpoint(&self, tool: &str) -> String {
        format!("{}/{tool}", self.name)
    }
    /// A stand-in endpoint for the client's shared-key cache: a key with the upstream's scope and
    /// room for 1000 calls of its dearest tool.
    fn as_endpoint(&self) -> Endpoint {
        let dearest = self.tools.values().copied().chain([self.price]).max().unwrap_or(1).max(1);
        Endpoint { name: format!("{} (proxy)", self.path), price: dearest, xp: 0, scope: self.scope.clone(), rate_limit: self.rate_limit, input: Vec::new() }
    }
}

/// `Ok(Up)`, or the n/a outcome without `--upstream`. An upstream that /v1/pricing does not list
/// (or lists disabled) fails: the gateway was meant to serve it.
fn upstream(c: &Client, o: &Options) -> Result<std::result::Result<Up, Outcome>> {
    let Some(name) = o.upstream.as_deref() else {
        return Ok(Err(Outcome::NotApplicable("needs --upstream NAME (an [upstreams.NAME] of the gateway, e.g. tests/upstream/server.mjs)".into())));
    };
    let p = pricing(c)?;
    let list = p["upstreams"].as_array().ok_or_else(|| anyhow!("/v1/pricing has no upstreams array (contract 3.2)"))?;
    let e = list.iter().find(|u| u["name"] == name).ok_or_else(|| {
        let names: Vec<&str> = list.iter().filter_map(|u| u["name"].as_str()).collect();
        anyhow!("--upstream {name}: /v1/pricing lists no such upstream (upstreams: {names:?})")
    })?;
    let path = e["path"].as_str().unwrap_or_default().to_string();
    ensure!(path == format!("/mcp/{name}"), "upstream {name}: path {:?} (expected /mcp/{name})", e["path"]);
    let price = e["price_mcents"].as_u64().filter(|p| *p >= 1).ok_or_else(|| anyhow!("upstream {name}: price_mcents {} is not an integer ≥ 1", e["price_mcents"]))?;
    let scope = e["scope"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| anyhow!("upstream {name}: no scope: {e}"))?.to_string();
    let tools_v = e["tools"].as_object().ok_or_else(|| anyhow!("upstream {name}: tools is not an object: {e}"))?;
    let mut tools = BTreeMap::new();
    for (t, v) in tools_v {
        tools.insert(t.clone(), v.as_u64().ok_or_else(|| anyhow!("upstream {name}: tools.{t} = {v} is not an integer ≥ 0"))?);
    }
    ensure!(e["enabled"] == true, "upstream {name} is listed with enabled {} (the audit needs it served)", e["enabled"]);
    let rate_limit = e["rate_limit_per_minute"].as_u64().ok_or_else(|| anyhow!("upstream {name}: rate_limit_per_minute {} is not an integer", e["rate_limit_per_minute"]))?;
    let refund_tool_errors = e["refund_tool_errors"].as_bool().ok_or_else(|| anyhow!("upstream {name}: refund_tool_errors is not a boolean: {e}"))?;
    let (stdio, sse) = match e["transport"].as_str() {
        Some("http") => (false, false),
        Some("sse") => (false, true),
        Some("stdio") => (true, false),
        _ => bail!("upstream {name}: transport {} is not \"http\", \"sse\" or \"stdio\" (contract 3.2)", e["transport"]),
    };
    Ok(Ok(Up { name: name.to_string(), path, price, tools, scope, rate_limit, refund_tool_errors, stdio, sse }))
}

macro_rules! up {
    ($c:expr, $o:expr) => {
        match upstream($c, $o)? {
            Ok(u) => u,
            Err(na) => return Ok(na),
        }
    };
}

/// The test upstream's control base URL, or the n/a outcome.
macro_rules! control {
    ($o:expr, $why:expr) => {
        match $o.upstream_control.as_deref() {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => return Ok(Outcome::NotApplicable(format!("needs --upstream-control URL (the test upstream's base URL) to {}", $why))),
        }
    };
}

/// n/a unless the upstream lists every tool of `names` (they are tests/upstream/server.mjs's).
fn need_tools(tools: &[Value], names: &[&str]) -> Option<Outcome> {
    let missing: Vec<&str> = names.iter().copied().filter(|n| !tools.iter().any(|t| t["name"] == *n)).collect();
    (!missing.is_empty()).then(|| Outcome::NotApplicable(format!("the upstream has no {missing:?} tool (these scenarios call tests/upstream/server.mjs's tools)")))
}

/// POST one JSON-RPC message to the upstream's path (MCP-Protocol-Version, the key when given).
fn send(c: &Client, up: &Up, key: Option<&Key>, extra: &[(&str, &str)], body: &Value) -> Reply {
    let bearer = key.map(Key::bearer);
    let mut h: Vec<(&str, &str)> = vec![("MCP-Protocol-Version", PROTOCOL)];
    if let Some(b) = &bearer {
        h.push(("Authorization", b.as_str()));
    }
    h.extend_from_slice(extra);
    post_to(c, &up.path, &h, body.to_string().as_bytes())
}

fn rpc(c: &Client, up: &Up, key: Option<&Key>, method: &str, params: Value) -> Reply {
    send(c, up, key, &[], &json!({"jsonrpc": "2.0", "id": fresh_id(), "method": method, "params": params}))
}

fn call(c: &Client, up: &Up, key: &Key, tool: &str, args: Value) -> Reply {
    rpc(c, up, Some(key), "tools/call", json!({"name": tool, "arguments": args}))
}

/// The key with the upstream's scope shared by these scenarios, and its balance now.
fn key(c: &mut Client, up: &Up) -> Result<(Key, u64)> {
    c.shared_key(&up.as_endpoint())
}

/// tools/list through the gateway.
fn listed(c: &Client, up: &Up, key: &Key) -> Result<Vec<Value>> {
    let res = result(&rpc(c, up, Some(key), "tools/list", json!({}))).context("tools/list through the gateway")?;
    res["tools"].as_array().cloned().ok_or_else(|| anyhow!("tools/list result has no tools array: {res}"))
}

/// Arguments that pass a tool's inputSchema: each required property with a sample of its type.
fn sample_args(tools: &[Value], name: &str) -> Value {
    let mut args = serde_json::Map::new();
    if let Some(t) = tools.iter().find(|t| t["name"] == name) {
        for req in t["inputSchema"]["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let ty = t["inputSchema"]["properties"][req]["type"].as_str().unwrap_or("string");
            args.insert(req.to_string(), crate::spec::sample_value(ty));
        }
    }
    Value::Object(args)
}

/// The first tool the upstream lists whose price in /v1/pricing is `pred`, preferring `prefer`.
fn pick(up: &Up, tools: &[Value], prefer: &str, pred: impl Fn(&str, u64) -> bool) -> Option<String> {
    let names: Vec<String> = tools.iter().filter_map(|t| t["name"].as_str().map(str::to_string)).collect();
    if names.iter().any(|n| n == prefer) && pred(prefer, up.price_of(prefer)) {
        return Some(prefer.to_string());
    }
    names.into_iter().find(|n| pred(n, up.price_of(n)))
}

fn rid(r: &Reply) -> Result<String> {
    r.header("x-request-id").filter(|s| !s.is_empty()).ok_or_else(|| anyhow!("the answer has no X-Request-Id ({})", r.brief()))
}

/// The ledger of `key` has, for call `id`, a hold of `price` then `settle`, naming `<upstream>/<tool>`,
/// and the balance is `expected`.
#[allow(clippy::too_many_arguments)]
fn settled(c: &Client, up: &Up, key: &Key, id: &str, tool: &str, price: u64, settle: &str, expected: u64) -> Result<()> {
    settled_as(c, key, id, price, settle)?;
    let rows = ledger_rows(c, key)?;
    let names: Vec<&Value> = rows.iter().filter(|e| e["request_id"] == id).map(|e| &e["endpoint"]).collect();
    ensure!(names.iter().all(|n| **n == up.endpoint(tool)), "ledger rows of {id} name endpoint {names:?} (expected {:?})", up.endpoint(tool));
    let now = c.balance(key)?;
    ensure!(now == expected, "/v1/me: balance {now} (expected {expected})");
    Ok(())
}

/// Nothing moved: the balance and the whole ledger are as before.
fn unmoved(c: &Client, key: &Key, bal: u64, ledger: (i64, usize), what: &str) -> Result<()> {
    let now = c.balance(key)?;
    ensure!(now == bal, "{what}: balance moved {bal} → {now}");
    let l = ledger_sum(c, key)?;
    ensure!(l == ledger, "{what}: the ledger moved ({} → {} rows)", ledger.1, l.1);
    Ok(())
}

// --- the test upstream's control endpoints ---

fn stats(c: &Client, ctl: &str) -> Result<Value> {
    let r = c.request_url("GET", &format!("{ctl}/control/stats"), &[], None);
    ensure!(r.status == 200, "GET {ctl}/control/stats: {}", r.brief());
    Ok(r.json())
}

fn set_mode(c: &Client, ctl: &str, mode: &str) -> Result<()> {
    let r = c.request_url("POST", &format!("{ctl}/control/mode"), &[("Content-Type", "application/json")], Some(json!({"mode": mode}).to_string().as_bytes()));
    ensure!(r.status == 200, "POST {ctl}/control/mode {mode}: {}", r.brief());
    Ok(())
}

/// Runs `f` with the test upstream in `mode`, then puts it back in `ok` (also when `f` fails).
fn with_mode<T>(c: &Client, ctl: &str, mode: &str, f: impl FnOnce() -> T) -> Result<T> {
    set_mode(c, ctl, mode)?;
    let out = f();
    set_mode(c, ctl, "ok")?;
    Ok(out)
}

/// How many HTTP requests reached the upstream's /mcp, and how many tools/call of `tool`.
fn reached(s: &Value, tool: &str) -> (u64, u64) {
    (s["mcp_requests"].as_u64().unwrap_or(0), s["tools_call"][tool].as_u64().unwrap_or(0))
}

/// `Some(stats)` when --upstream-control is given (to prove nothing was forwarded).
fn maybe_stats(c: &Client, o: &Options) -> Result<Option<Value>> {
    o.upstream_control.as_deref().map(|ctl| stats(c, ctl.trim_end_matches('/'))).transpose()
}

fn nothing_forwarded(c: &Client, o: &Options, before: &Option<Value>, what: &str) -> Result<&'static str> {
    let (Some(before), Some(ctl)) = (before, o.upstream_control.as_deref()) else { return Ok("") };
    let after = stats(c, ctl.trim_end_matches('/'))?;
    ensure!(after["mcp_requests"] == before["mcp_requests"], "{what} reached the upstream ({} → {} requests)", before["mcp_requests"], after["mcp_requests"]);
    Ok(", nothing reached the upstream")
}

// --- scenarios ---

fn auth(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let _ = key(c, &up)?; // learns the key prefix, so the unknown key looks real
    let before = maybe_stats(c, o)?;
    let prefix = c.prefix();
    let hex = random_hex64();
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}});
    let paid = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "forecast", "arguments": {"city": "Paris"}}});
    let mut n = 0;
    for (auth, code) in [
        (None, "missing_key"),
        (Some(format!("Basic {prefix}{hex}")), "invalid_key"),
        (Some(format!("Bearer {prefix}{}", &hex[..63])), "invalid_key"),
        (Some(format!("Bearer {prefix}{hex}")), "invalid_key"),
    ] {
        let h: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("Authorization", a)]).unwrap_or_default();
        let shown = auth.clone().unwrap_or_else(|| "none".into());
        for body in [&list, &paid] {
            let r = send(c, &up, None, &h, body);
            unauthorized(&r, code).map_err(|e| e.context(format!("POST {} {} with Authorization: {shown}", up.path, body["method"])))?;
            n += 1;
        }
        for method in ["GET", "DELETE"] {
            let mut hh = h.clone();
            hh.push(("Accept", "text/event-stream"));
            let r = c.request(method, &up.path, &hh, None);
            unauthorized(&r, code).map_err(|e| e.context(format!("{method} {} with Authorization: {shown}", up.path)))?;
            n += 1;
        }
    }
    let fwd = nothing_forwarded(c, o, &before, "a request without a valid key")?;
    pass(format!("{n} requests (POST tools/list and tools/call, GET, DELETE × no key, 3 bad keys): 401{fwd}"))
}

fn scope_denied(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (ep, key, bal) = setup(c)?;
    if ep.scope == up.scope {
        return Ok(Outcome::NotApplicable(format!("the endpoint {} has the upstream's scope {}: no key without it at hand", ep.name, up.scope)));
    }
    let ledger = ledger_sum(c, &key)?;
    let before = maybe_stats(c, o)?;
    for (method, params) in [("tools/list", json!({})), ("tools/call", json!({"name": "forecast", "arguments": {"city": "Paris"}}))] {
        let r = rpc(c, &up, Some(&key), method, params);
        expect(&r, 403, "scope_denied").map_err(|e| e.context(format!("{method} with a key of scope {}", ep.scope)))?;
        ensure!(r.json()["required_scope"] == up.scope.as_str(), "{method}: required_scope {} (expected {})", r.json()["required_scope"], up.scope);
    }
    unmoved(c, &key, bal, ledger, "a refused request")?;
    let fwd = nothing_forwarded(c, o, &before, "a request with a key lacking the scope")?;
    pass(format!("403 scope_denied, required_scope {}, balance still {bal}{fwd}", up.scope))
}

fn unknown(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, _) = key(c, &up)?;
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).to_string();
    let bearer = key.bearer();
    let h = [("Authorization", bearer.as_str()), ("MCP-Protocol-Version", PROTOCOL)];
    let paths = [format!("/mcp/zz_no_such_upstream_{}", &random_hex64()[..6]), format!("{}/", up.path)];
    for p in &paths {
        let r = post_to(c, p, &h, body.as_bytes());
        expect(&r, 404, "not_found").map_err(|e| e.context(format!("POST {p}")))?;
    }
    pass(format!("POST {} and {}: 404 not_found", paths[0], paths[1]))
}

fn free_discovery(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, bal) = key(c, &up)?;
    let ledger = ledger_sum(c, &key)?;
    let before = maybe_stats(c, o)?;
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "create-mcpay-audit", "version": env!("CARGO_PKG_VERSION")}}});
    let r = send(c, &up, Some(&key), &[], &init);
    let res = result(&r).context("initialize")?;
    ensure!(res["serverInfo"]["name"].is_string() && res["protocolVersion"].is_string(), "initialize result without serverInfo / protocolVersion: {res}");
    let session = r.header("mcp-session-id");
    let mut h: Vec<(&str, &str)> = Vec::new();
    if let Some(s) = &session {
        h.push(("Mcp-Session-Id", s.as_str()));
    }
    let n = send(c, &up, Some(&key), &h, &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    ensure!((200..300).contains(&n.status), "notifications/initialized → {}", n.brief());
    ensure!(!up.sse || (n.status == 202 && session.is_none()), "a legacy SSE upstream: initialize issues no Mcp-Session-Id ({session:?}) and a notification is answered 202 ({})", n.brief());
    let ping = result(&send(c, &up, Some(&key), &h, &json!({"jsonrpc": "2.0", "id": fresh_id(), "method": "ping", "params": {}}))).context("ping")?;
    ensure!(ping.is_object(), "ping result {ping}");
    let tools = result(&send(c, &up, Some(&key), &h, &json!({"jsonrpc": "2.0", "id": fresh_id(), "method": "tools/list", "params": {}}))).context("tools/list")?;
    let count = tools["tools"].as_array().map_or(0, Vec::len);
    ensure!(count > 0, "tools/list listed no tools: {tools}");
    unmoved(c, &key, bal, ledger, "free traffic")?;
    let mut fwd = String::new();
    if let (Some(b), Some(ctl)) = (&before, o.upstream_control.as_deref()) {
        let a = stats(c, ctl.trim_end_matches('/'))?;
        // A legacy SSE upstream: the caller's notification is not forwarded (its session is
        // gone), and ping and tools/list each come after the gateway's own handshake.
        let expected: [(&str, u64); 4] =
            if up.sse { [("initialize", 3), ("notifications/initialized", 2), ("ping", 1), ("tools/list", 1)] } else { [("initialize", 1), ("notifications/initialized", 1), ("ping", 1), ("tools/list", 1)] };
        for (m, times) in expected {
            let (x, y) = (b["methods"][m].as_u64().unwrap_or(0), a["methods"][m].as_u64().unwrap_or(0));
            ensure!(y == x + times, "{m} reached the upstream {} times (expected {times})", y - x);
        }
        fwd = if up.sse { ", forwarded once each after the gateway's handshake".into() } else { ", each forwarded once".into() };
    }
    pass(format!("server {}, notification {}, {count} tools; balance {bal} and ledger unchanged{fwd}", res["serverInfo"]["name"], n.status))
}

fn tool_terms(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, _) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    ensure!(!tools.is_empty(), "tools/list listed no tools");
    let (mut listed_n, mut default_n) = (0, 0);
    for t in &tools {
        let name = t["name"].as_str().ok_or_else(|| anyhow!("a tool without a name: {t}"))?;
        let want = up.price_of(name);
        ensure!(t["_meta"][PRICE] == want, "tool {name}: _meta {PRICE} {} (expected {want})", t["_meta"][PRICE]);
        ensure!(t["_meta"][SCOPE] == up.scope.as_str(), "tool {name}: _meta {SCOPE} {} (expected {})", t["_meta"][SCOPE], up.scope);
        if up.tools.contains_key(name) { listed_n += 1 } else { default_n += 1 }
    }
    let mut kept = String::new();
    if let Some(ctl) = o.upstream_control.as_deref() {
        // The upstream's own tools/list, asked directly: same tools, its _meta keys kept.
        let url = format!("{}/mcp", ctl.trim_end_matches('/'));
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}).to_string();
        let r = c.request_url("POST", &url, &[("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream"), ("MCP-Protocol-Version", PROTOCOL)], Some(body.as_bytes()));
        let direct = result(&r).with_context(|| format!("tools/list asked of the upstream at {url}"))?;
        let direct = direct["tools"].as_array().cloned().unwrap_or_default();
        let names = |v: &[Value]| v.iter().map(|t| t["name"].as_str().unwrap_or("").to_string()).collect::<Vec<_>>();
        ensure!(names(&direct) == names(&tools), "the gateway lists {:?}, the upstream {:?}", names(&tools), names(&direct));
        let mut keys = 0;
        for (d, g) in direct.iter().zip(&tools) {
            for (k, v) in d["_meta"].as_object().into_iter().flatten() {
                ensure!(&g["_meta"][k] == v, "tool {}: the upstream's _meta {k} = {v} became {}", d["name"], g["_meta"][k]);
                keys += 1;
            }
            ensure!(d["inputSchema"] == g["inputSchema"], "tool {}: inputSchema changed", d["name"]);
        }
        kept = format!("; same tools as the upstream, its {keys} own _meta key(s) and the input schemas kept");
    }
    pass(format!("{} tools: {listed_n} priced in [upstreams.{}.tools], {default_n} at the default {}{kept}", tools.len(), up.name, up.price))
}

/// A paid tools/call that succeeds: the answer, its terms and the money. Returns the evidence.
fn paid_ok(c: &mut Client, o: &Options, up: &Up, tool: &str, args: Value) -> Result<String> {
    let price = up.price_of(tool);
    ensure!(price > 0, "{tool} is free");
    let (key, bal) = key(c, up)?;
    let before = maybe_stats(c, o)?;
    let r = call(c, up, &key, tool, args);
    let res = result(&r).with_context(|| format!("tools/call {tool}"))?;
    ensure!(res["isError"] != true, "{tool} answered isError: {res}");
    ensure!(res["content"].is_array(), "{tool}: the upstream's result has no content: {res}");
    let meta = &res["_meta"];
    let id = rid(&r)?;
    ensure!(meta[CHARGED] == price && meta[BALANCE] == bal - price, "_meta {meta} (expected {CHARGED} {price}, {BALANCE} {})", bal - price);
    ensure!(meta[REQUEST_ID] == id.as_str(), "_meta {REQUEST_ID} {} ≠ X-Request-Id {id}", meta[REQUEST_ID]);
    let charged = r.header("x-charged-mcents");
    let balance = r.header("x-balance-mcents");
    ensure!(charged.as_deref() == Some(&price.to_string()), "X-Charged-Mcents {charged:?} (expected {price})");
    ensure!(balance.as_deref() == Some(&(bal - price).to_string()), "X-Balance-Mcents {balance:?} (expected {})", bal - price);
    settled(c, up, &key, &id, tool, price, "capture", bal - price)?;
    let mut fwd = String::new();
    if let (Some(b), Some(ctl)) = (&before, o.upstream_control.as_deref()) {
        let a = stats(c, ctl.trim_end_matches('/'))?;
        let (n0, n1) = (reached(b, tool).1, reached(&a, tool).1);
        ensure!(n1 == n0 + 1, "the upstream ran {tool} {} times for one call", n1 - n0);
        fwd = ", run once upstream".into();
    }
    Ok(format!("{tool}: charged {price} of {bal}, hold + capture under {id} ({}){fwd}", up.endpoint(tool)))
}

fn charge_exact(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, _) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    let Some(tool) = pick(&up, &tools, "forecast", |n, p| p > 0 && up.tools.contains_key(n)) else {
        return Ok(Outcome::NotApplicable(format!("no tool the upstream lists has a price > 0 in [upstreams.{}.tools]", up.name)));
    };
    let args = sample_args(&tools, &tool);
    pass(paid_ok(c, o, &up, &tool, args)?)
}

fn default_price(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, _) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    if let Some(na) = need_tools(&tools, &["echo"]) {
        return Ok(na);
    }
    if up.tools.contains_key("echo") {
        return Ok(Outcome::NotApplicable(format!("echo has its own price in [upstreams.{}.tools]: no unlisted tool to call", up.name)));
    }
    let e = paid_ok(c, o, &up, "echo", json!({"text": "audit"}))?;
    pass(format!("the default price {}: {e}", up.price))
}

fn free_tool(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, bal) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    let Some(tool) = pick(&up, &tools, "alerts", |_, p| p == 0) else {
        return Ok(Outcome::NotApplicable(format!("no tool the upstream lists is priced 0 in [upstreams.{}.tools]", up.name)));
    };
    let ledger = ledger_sum(c, &key)?;
    let before = maybe_stats(c, o)?;
    let r = call(c, &up, &key, &tool, sample_args(&tools, &tool));
    let res = result(&r).with_context(|| format!("tools/call {tool}"))?;
    ensure!(res["isError"] != true && res["content"].is_array(), "{tool}: {res}");
    unmoved(c, &key, bal, ledger, &format!("the free tool {tool}"))?;
    let mut fwd = String::new();
    if let (Some(b), Some(ctl)) = (&before, o.upstream_control.as_deref()) {
        let a = stats(c, ctl.trim_end_matches('/'))?;
        ensure!(reached(&a, &tool).1 == reached(b, &tool).1 + 1, "{tool} did not run upstream exactly once");
        fwd = ", run upstream".into();
    }
    pass(format!("{tool} answered, balance {bal} and ledger unchanged{fwd}"))
}

fn insufficient(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (shared, _) = key(c, &up)?;
    let tools = listed(c, &up, &shared)?;
    let Some(tool) = pick(&up, &tools, "forecast", |_, p| p >= 2) else {
        return Ok(Outcome::NotApplicable("no tool the upstream lists costs 2 mcents or more".into()));
    };
    let price = up.price_of(&tool);
    let key = c.mint(price - 1, &[up.scope.as_str()])?;
    let ledger = ledger_sum(c, &key)?;
    let before = maybe_stats(c, o)?;
    let r = call(c, &up, &key, &tool, sample_args(&tools, &tool));
    let data = refused(c, &r, -32002, "insufficient_balance", &key, price - 1, ledger)?;
    ensure!(data["price_mcents"] == price && data["balance_mcents"] == price - 1, "error.data {data} (expected price_mcents {price}, balance_mcents {})", price - 1);
    let fwd = nothing_forwarded(c, o, &before, "a call the key cannot pay")?;
    pass(format!("{tool} ({price}) with {}: -32002 insufficient_balance{fwd}", price - 1))
}

fn jsonrpc_error(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, bal) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    if let Some(na) = need_tools(&tools, &["fail"]) {
        return Ok(na);
    }
    let price = up.price_of("fail");
    if price == 0 {
        return Ok(Outcome::NotApplicable("fail is free: nothing to release".into()));
    }
    let r = call(c, &up, &key, "fail", json!({}));
    let m = answer(&r).context("tools/call fail")?;
    let e = m.get("error").ok_or_else(|| anyhow!("the upstream's JSON-RPC error became {m}"))?;
    ensure!(e["code"].is_i64() && e["message"].is_string(), "not the upstream's JSON-RPC error: {e}");
    let id = rid(&r)?;
    settled(c, &up, &key, &id, "fail", price, "release", bal)?;
    // Upstream failures are the gateway's side: never capped like a caller's failures.
    let n = 8;
    for i in 2..=n {
        let r = call(c, &up, &key, "fail", json!({}));
        ensure!(answer(&r)?.get("error").is_some(), "fail call {i}: {}", r.brief());
        settled_as(c, &key, &rid(&r)?, price, "release").map_err(|e| e.context(format!("fail call {i} of {n}")))?;
    }
    ensure!(c.balance(&key)? == bal, "balance {} after {n} released calls (expected {bal})", c.balance(&key)?);
    pass(format!("error {} passed through; {n} calls, each hold + release, balance still {bal}", e["code"]))
}

fn tool_error(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, bal) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    if let Some(na) = need_tools(&tools, &["tool_error"]) {
        return Ok(na);
    }
    let price = up.price_of("tool_error");
    if price == 0 {
        return Ok(Outcome::NotApplicable("tool_error is free".into()));
    }
    let r = call(c, &up, &key, "tool_error", json!({}));
    let res = result(&r).context("tools/call tool_error")?;
    ensure!(res["isError"] == true, "the upstream's isError result became {res}");
    let id = rid(&r)?;
    let (settle, left, meta_refunded) = if up.refund_tool_errors { ("release", bal, true) } else { ("capture", bal - price, false) };
    ensure!(res["_meta"][REFUNDED].as_bool().unwrap_or(false) == meta_refunded, "_meta {} (refund_tool_errors {})", res["_meta"], up.refund_tool_errors);
    let charged = if up.refund_tool_errors { 0 } else { price };
    ensure!(res["_meta"][CHARGED] == charged, "_meta {CHARGED} {} (expected {charged})", res["_meta"][CHARGED]);
    settled(c, &up, &key, &id, "tool_error", price, settle, left)?;
    pass(format!("isError passed through; refund_tool_errors {}: hold + {settle}, balance {left}", up.refund_tool_errors))
}

/// A 502/504 after the hold: the error shape with refunded true, charged 0, the balance restored,
/// hold + release. Once the answer is an event stream (its 200 and headers already sent), the same
/// body comes as the call's result in the stream, as /mcp answers a failure after the hold (3.11):
/// `isError: true`, `structuredContent` = that body, `_meta` io.mcpay/refunded true.
#[allow(clippy::too_many_arguments)]
fn released_failure(c: &Client, up: &Up, key: &Key, bal: u64, r: &Reply, tool: &str, status: u16, code: &str) -> Result<String> {
    let id = rid(r)?;
    let streamed = r.status == 200 && r.header("content-type").is_some_and(|t| t.starts_with("text/event-stream"));
    let (v, form) = if streamed || (up.stdio && r.status == 200) {
        let res = result(r).with_context(|| format!("expected {status} {code}, or its body as an isError result (an event stream, or a stdio upstream)"))?;
        ensure!(res["isError"] == true, "expected {status} {code}; the stream carries a result that is not isError: {res}");
        ensure!(res["_meta"][REFUNDED] == true && res["_meta"][CHARGED] == 0, "the stream's isError result: _meta {} (expected {REFUNDED} true, {CHARGED} 0)", res["_meta"]);
        (res["structuredContent"].clone(), format!("200 event stream, isError result with {code}"))
    } else {
        expect(r, status, code)?;
        (r.json(), format!("{status} {code}"))
    };
    ensure!(v["error"]["code"] == code, "error.code {} (expected {code}): {v}", v["error"]["code"]);
    ensure!(v["ok"] == false && v["request_id"] == id.as_str(), "{status} not in the error shape of section 2 (request_id = X-Request-Id {id}): {v}");
    ensure!(v["refunded"] == true && v["charged_mcents"] == 0 && v["balance_mcents"] == bal, "{status}: refunded {}, charged_mcents {}, balance_mcents {} (expected true, 0, {bal})", v["refunded"], v["charged_mcents"], v["balance_mcents"]);
    ensure!(v.get("note").is_none(), "{status} after the hold carries a note: {v}");
    settled(c, up, key, &id, tool, up.price_of(tool), "release", bal)?;
    Ok(format!("{form}, refunded, hold + release under {id}"))
}

fn upstream_down(c: &mut Client, o: &Options, mode: &str) -> Result<Outcome> {
    let up = up!(c, o);
    let ctl = control!(o, &format!("make the upstream fail ({mode})"));
    let (key, bal) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    let Some(tool) = pick(&up, &tools, "forecast", |_, p| p > 0) else {
        return Ok(Outcome::NotApplicable("no priced tool".into()));
    };
    let args = sample_args(&tools, &tool);
    let before = stats(c, &ctl)?;
    let r = with_mode(c, &ctl, mode, || call(c, &up, &key, &tool, args))?;
    let after = stats(c, &ctl)?;
    ensure!(reached(&after, &tool).0 > reached(&before, &tool).0, "the call never reached the upstream");
    let e = released_failure(c, &up, &key, bal, &r, &tool, 502, "upstream_failed")?;
    pass(format!("upstream {mode}: {e}"))
}

fn timeout(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let Some((tool, body)) = o.upstream_slow_call.clone() else {
        return Ok(Outcome::NotApplicable("needs --upstream-slow-call TOOL=JSON (a call the upstream answers after its timeout_seconds, e.g. slow={\"ms\":4000})".into()));
    };
    let args: Value = serde_json::from_str(&body).map_err(|e| anyhow!("--upstream-slow-call {tool}={body}: the arguments are not JSON ({e})"))?;
    if up.price_of(&tool) == 0 {
        bail!("--upstream-slow-call {tool}: the tool is free, nothing would be held");
    }
    let (key, bal) = key(c, &up)?;
    let t = Instant::now();
    let r = call(c, &up, &key, &tool, args.clone());
    let took = t.elapsed().as_millis();
    let e = released_failure(c, &up, &key, bal, &r, &tool, 504, "upstream_timeout")?;
    let mut early = String::new();
    if let Some(ms) = args["ms"].as_u64() {
        ensure!(took < ms as u128, "the 504 came after {took} ms, when the upstream (ms {ms}) had answered already");
        early = format!(" (ms {ms})");
    }
    pass(format!("{e}, after {took} ms{early}"))
}

fn credentials(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, _) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    if let Some(na) = need_tools(&tools, &["whoami"]) {
        return Ok(na);
    }
    let prefix = c.prefix();
    let cookie = format!("session={}", key.key);
    let extra = [
        ("Cookie", cookie.as_str()),
        ("X-Admin-Key", "audit-admin-key-must-not-travel"),
        ("Payment-Signature", "audit-payment-must-not-travel"),
        ("X-Payment", "audit-payment-must-not-travel"),
    ];
    let r = send(c, &up, Some(&key), &extra, &json!({"jsonrpc": "2.0", "id": fresh_id(), "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}));
    let res = result(&r).context("tools/call whoami")?;
    let text = res["content"][0]["text"].as_str().ok_or_else(|| anyhow!("whoami gave no text: {res}"))?;
    let who: Value = serde_json::from_str(text).map_err(|e| anyhow!("whoami text is not JSON ({e}): {text}"))?;
    let headers = who["headers"].as_object().ok_or_else(|| anyhow!("whoami has no headers object: {who}"))?;
    for h in ["cookie", "x-admin-key", "payment-signature", "x-payment"] {
        ensure!(!headers.contains_key(h), "the upstream received {h}: {:?}", headers[h]);
    }
    no_key_material(text, &[&key], &prefix).context("what the upstream received")?;
    let mut shown = String::new();
    if let Some(ctl) = o.upstream_control.as_deref() {
        let s = stats(c, ctl.trim_end_matches('/'))?;
        no_key_material(&s["last_headers"].to_string(), &[&key], &prefix).context("the upstream's last request headers")?;
    }
    if let Some((name, value)) = &o.upstream_header {
        let got = headers.get(&name.to_ascii_lowercase()).and_then(Value::as_str);
        // Neither value is printed: they are secrets.
        ensure!(got == Some(value.as_str()), "the configured header {name}: the upstream received {} (not the --upstream-header value)", got.map_or("none".to_string(), |g| format!("another value ({} bytes)", g.len())));
        shown = format!("; {name} arrived");
    }
    pass(format!("the upstream got {} headers, none of the caller's credentials, no key material{shown}", headers.len()))
}

fn sse_progress(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, bal) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    if let Some(na) = need_tools(&tools, &["progress"]) {
        return Ok(na);
    }
    let price = up.price_of("progress");
    let token = fresh_id();
    let jid = fresh_id();
    let body = json!({"jsonrpc": "2.0", "id": jid, "method": "tools/call", "params": {"name": "progress", "arguments": {"steps": 3}, "_meta": {"progressToken": token}}});
    let bearer = key.bearer();
    let h = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        ("MCP-Protocol-Version", PROTOCOL),
        ("Authorization", bearer.as_str()),
    ];
    let (r, lines) = c.request_timed("POST", &up.path, &h, Some(body.to_string().as_bytes()));
    ensure!(r.status == 200, "tools/call progress: {}", r.brief());
    let ct = r.header("content-type").unwrap_or_default();
    ensure!(ct.starts_with("text/event-stream"), "Content-Type {ct:?} (the upstream answered an event stream)");
    let mut progress = Vec::new();
    let mut response = None;
    for (at, line) in &lines {
        let Some(data) = line.strip_prefix("data:") else { continue };
        let Ok(m) = serde_json::from_str::<Value>(data.trim()) else { continue };
        if m["method"] == "notifications/progress" && m["params"]["progressToken"] == token.as_str() {
            ensure!(response.is_none(), "a progress notification after the response");
            progress.push(*at);
        } else if m["id"] == jid.as_str() {
            response = Some((*at, m));
        }
    }
    let (done, m) = response.ok_or_else(|| anyhow!("no response in the stream: {}", r.brief()))?;
    ensure!(progress.len() >= 3, "{} progress notification(s) reached the caller (the upstream sent 3)", progress.len());
    ensure!(done >= progress[0] + 300, "the first progress came at {} ms, the response at {done} ms: buffered, not streamed", progress[0]);
    let res = m.get("result").ok_or_else(|| anyhow!("the response is not a result: {m}"))?;
    ensure!(res["_meta"][CHARGED] == price, "the response's _meta {} (expected {CHARGED} {price})", res["_meta"]);
    // A stdio upstream's event stream starts before its hold: its terms are in _meta only (3.12).
    if !up.stdio {
        ensure!(r.header("x-charged-mcents").as_deref() == Some(&price.to_string()), "X-Charged-Mcents {:?} (the held price {price})", r.header("x-charged-mcents"));
    }
    let id = rid(&r)?;
    if price > 0 {
        settled(c, &up, &key, &id, "progress", price, "capture", bal - price)?;
    }
    pass(format!("progress at {progress:?} ms, the response at {done} ms; charged {price}, hold + capture"))
}

fn json_answer(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let ctl = control!(o, "make the upstream answer application/json");
    let (key, bal) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    let Some(tool) = pick(&up, &tools, "forecast", |_, p| p > 0) else {
        return Ok(Outcome::NotApplicable("no priced tool".into()));
    };
    let price = up.price_of(&tool);
    let args = sample_args(&tools, &tool);
    let r = with_mode(c, &ctl, "json", || call(c, &up, &key, &tool, args))?;
    let ct = r.header("content-type").unwrap_or_default();
    ensure!(ct.starts_with("application/json"), "Content-Type {ct:?} (the upstream answered application/json)");
    let res = result(&r)?;
    ensure!(res["_meta"][CHARGED] == price && res["_meta"][BALANCE] == bal - price, "_meta {} (expected {CHARGED} {price}, {BALANCE} {})", res["_meta"], bal - price);
    ensure!(r.header("x-charged-mcents").as_deref() == Some(&price.to_string()), "X-Charged-Mcents {:?}", r.header("x-charged-mcents"));
    ensure!(r.header("x-balance-mcents").as_deref() == Some(&(bal - price).to_string()), "X-Balance-Mcents {:?}", r.header("x-balance-mcents"));
    let id = rid(&r)?;
    settled(c, &up, &key, &id, &tool, price, "capture", bal - price)?;
    pass(format!("{tool}: application/json, _meta and headers final, charged {price}, hold + capture"))
}

fn response_headers(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, bal) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    let Some(tool) = pick(&up, &tools, "forecast", |_, p| p > 0) else {
        return Ok(Outcome::NotApplicable("no priced tool".into()));
    };
    let price = up.price_of(&tool);
    let list = rpc(c, &up, Some(&key), "tools/list", json!({}));
    let paid = call(c, &up, &key, &tool, sample_args(&tools, &tool));
    let mut ids = Vec::new();
    for (what, r) in [("tools/list", &list), ("a paid tools/call", &paid)] {
        ensure!(r.status == 200, "{what}: {}", r.brief());
        let id = rid(r)?;
        ensure!(is_uuid(&id), "{what}: X-Request-Id {id:?} is not a uuid");
        let d = r.header("x-upstream-duration-ms").unwrap_or_default();
        ensure!(d.parse::<u64>().is_ok(), "{what}: X-Upstream-Duration-Ms {d:?} is not an integer");
        ids.push(id);
    }
    ensure!(ids[0] != ids[1], "two answers share the X-Request-Id {}", ids[0]);
    ensure!(paid.header("x-charged-mcents").as_deref() == Some(&price.to_string()), "X-Charged-Mcents {:?} (expected {price})", paid.header("x-charged-mcents"));
    ensure!(paid.header("x-balance-mcents").as_deref() == Some(&(bal - price).to_string()), "X-Balance-Mcents {:?} (expected {})", paid.header("x-balance-mcents"), bal - price);
    settled(c, &up, &key, &ids[1], &tool, price, "capture", bal - price)?;
    pass(format!("X-Request-Id and X-Upstream-Duration-Ms on both; {tool}: X-Charged-Mcents {price}, X-Balance-Mcents {}", bal - price))
}

fn session(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, _) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    if let Some(na) = need_tools(&tools, &["whoami"]) {
        return Ok(na);
    }
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "create-mcpay-audit", "version": env!("CARGO_PKG_VERSION")}}});
    let r = send(c, &up, Some(&key), &[], &init);
    result(&r).context("initialize")?;
    if up.sse {
        return sse_sessionless(c, o, &up, &key, &r);
    }
    let Some(sid) = r.header("mcp-session-id") else {
        return Ok(Outcome::NotApplicable("the upstream's initialize started no session (no Mcp-Session-Id passed back)".into()));
    };
    let h = [("Mcp-Session-Id", sid.as_str())];
    let n = send(c, &up, Some(&key), &h, &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    ensure!((200..300).contains(&n.status), "notifications/initialized in the session: {}", n.brief());
    let w = send(c, &up, Some(&key), &h, &json!({"jsonrpc": "2.0", "id": fresh_id(), "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}));
    let res = result(&w).context("whoami in the session")?;
    let who: Value = serde_json::from_str(res["content"][0]["text"].as_str().unwrap_or("")).unwrap_or_default();
    ensure!(who["headers"]["mcp-session-id"] == sid.as_str(), "the upstream received Mcp-Session-Id {} (expected {sid})", who["headers"]["mcp-session-id"]);
    ensure!(who["headers"]["mcp-protocol-version"] == PROTOCOL, "the upstream received Mcp-Protocol-Version {}", who["headers"]["mcp-protocol-version"]);
    let d = c.request("DELETE", &up.path, &[("Authorization", &key.bearer()), ("Mcp-Session-Id", &sid), ("MCP-Protocol-Version", PROTOCOL)], None);
    ensure!((200..300).contains(&d.status), "DELETE of the session: {}", d.brief());
    let after = send(c, &up, Some(&key), &h, &json!({"jsonrpc": "2.0", "id": fresh_id(), "method": "tools/list", "params": {}}));
    ensure!(after.status == 404 && after.code().is_empty(), "tools/list in the deleted session: {} (expected the upstream's 404)", after.brief());
    pass(format!("session {sid}: passed back, forwarded with Mcp-Protocol-Version, DELETE {} ended it (then the upstream's 404)", d.status))
}

/// A legacy SSE upstream (3.12): no Mcp-Session-Id issued, none forwarded; GET and DELETE → 405;
/// each request is its own upstream session, opened with the gateway's handshake.
fn sse_sessionless(c: &mut Client, o: &Options, up: &Up, key: &Key, init: &Reply) -> Result<Outcome> {
    ensure!(init.header("mcp-session-id").is_none(), "initialize passed back Mcp-Session-Id {:?} (a legacy SSE upstream has no sessions across requests)", init.header("mcp-session-id"));
    let before = maybe_stats(c, o)?;
    let h = [("Mcp-Session-Id", "caller-made-session")];
    let w = send(c, up, Some(key), &h, &json!({"jsonrpc": "2.0", "id": fresh_id(), "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}));
    let res = result(&w).context("whoami without a handshake")?;
    let who: Value = serde_json::from_str(res["content"][0]["text"].as_str().unwrap_or("")).unwrap_or_default();
    ensure!(who["headers"].get("mcp-session-id").is_none(), "the upstream received the caller's Mcp-Session-Id {}", who["headers"]["mcp-session-id"]);
    let mut seen = String::new();
    if let (Some(b), Some(ctl)) = (&before, o.upstream_control.as_deref()) {
        let a = stats(c, ctl.trim_end_matches('/'))?;
        let grew = |k: &str| a["methods"][k].as_u64().unwrap_or(0) - b["methods"][k].as_u64().unwrap_or(0);
        let sessions = a["sse_sessions"].as_u64().unwrap_or(0) - b["sse_sessions"].as_u64().unwrap_or(0);
        ensure!(
            (sessions, grew("initialize"), grew("notifications/initialized")) == (1, 1, 1),
            "one session with one handshake expected for the call; the upstream saw {sessions} session(s), {} initialize, {} initialized",
            grew("initialize"),
            grew("notifications/initialized")
        );
        seen = ", one upstream session with the gateway's handshake".into();
    }
    for method in ["GET", "DELETE"] {
        let r = c.request(method, &up.path, &[("Authorization", &key.bearer()), ("Accept", "text/event-stream")], None);
        ensure!(r.status == 405, "{method} {}: {} (expected 405: a legacy SSE upstream has no sessions through the gateway)", up.path, r.brief());
    }
    pass(format!("no Mcp-Session-Id issued or forwarded; whoami answered without a handshake{seen}; GET and DELETE 405"))
}

fn bad_messages(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, bal) = key(c, &up)?;
    let ledger = ledger_sum(c, &key)?;
    let before = maybe_stats(c, o)?;
    let one = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "forecast", "arguments": {"city": "Paris"}}});
    let bearer = key.bearer();
    let h = [("Authorization", bearer.as_str()), ("MCP-Protocol-Version", PROTOCOL)];
    for (what, body, code) in [
        ("a batch", json!([one, one]).to_string(), -32600),
        ("a batch of one", json!([one]).to_string(), -32600),
        ("a body that is not JSON", r#"{"jsonrpc": "2.0", "id": 1, "method": "tools/list""#.to_string(), -32700),
    ] {
        let r = post_to(c, &up.path, &h, body.as_bytes());
        ensure!(r.status == 400, "{what}: expected 400, got {}", r.brief());
        ensure!(messages(&r).iter().any(|m| m["error"]["code"] == code), "{what}: no JSON-RPC {code} in {}", r.brief());
    }
    unmoved(c, &key, bal, ledger, "a refused message")?;
    let fwd = nothing_forwarded(c, o, &before, "a refused message")?;
    pass(format!("batches: 400 -32600; not JSON: 400 -32700; balance {bal} unchanged{fwd}"))
}

fn too_large(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, bal) = key(c, &up)?;
    let ledger = ledger_sum(c, &key)?;
    let before = maybe_stats(c, o)?;
    let r = call(c, &up, &key, "echo", json!({"text": "a".repeat(2 * 1024 * 1024)}));
    expect(&r, 413, "body_too_large")?;
    ensure!(r.json()["max_body_bytes"].is_u64(), "413 without an integer max_body_bytes: {}", r.body);
    unmoved(c, &key, bal, ledger, "a 413")?;
    let fwd = nothing_forwarded(c, o, &before, "a body over the bound")?;
    pass(format!("413 body_too_large (max_body_bytes {}), balance {bal} unchanged{fwd}", r.json()["max_body_bytes"]))
}

fn cors(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let r = c.request("OPTIONS", &up.path, &[("Origin", "https://agent.example"), ("Access-Control-Request-Method", "POST")], None);
    ensure!(r.status == 204, "OPTIONS {}: {}", up.path, r.brief());
    let methods = r.header("access-control-allow-methods").unwrap_or_default();
    let got: Vec<&str> = methods.split(',').map(str::trim).collect();
    for m in ["GET", "POST", "DELETE", "OPTIONS"] {
        ensure!(got.contains(&m), "Access-Control-Allow-Methods {methods:?} lacks {m}");
    }
    ensure!(r.header("access-control-allow-origin").is_some(), "OPTIONS without Access-Control-Allow-Origin");
    let (key, _) = key(c, &up)?;
    let p = c.request("PUT", &up.path, &[("Authorization", &key.bearer()), ("Content-Type", "application/json")], Some(b"{}"));
    expect(&p, 405, "method_not_allowed").context("PUT")?;
    pass(format!("OPTIONS 204, Allow-Methods {methods}; PUT 405"))
}

/// whoami's pid (the test upstream's process).
fn upstream_pid(c: &Client, up: &Up, key: &Key) -> Result<u64> {
    let res = result(&call(c, up, key, "whoami", json!({}))).context("tools/call whoami")?;
    let who: Value = serde_json::from_str(res["content"][0]["text"].as_str().unwrap_or("")).unwrap_or_default();
    who["pid"].as_u64().ok_or_else(|| anyhow!("whoami gave no pid: {res}"))
}

fn stdio_crash(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    let (key, _) = key(c, &up)?;
    let tools = listed(c, &up, &key)?;
    if let Some(na) = need_tools(&tools, &["crash", "whoami"]) {
        return Ok(na);
    }
    if up.price_of("crash") == 0 {
        return Ok(Outcome::NotApplicable("crash is free: nothing to release".into()));
    }
    let before = upstream_pid(c, &up, &key)?;
    let bal = c.balance(&key)?;
    let r = call(c, &up, &key, "crash", json!({}));
    let e = released_failure(c, &up, &key, bal, &r, "crash", 502, "upstream_failed")?;
    // The gateway starts the server again (at once or on the next call).
    let mut after = Err(anyhow!("no answer"));
    for _ in 0..50 {
        after = upstream_pid(c, &up, &key);
        if after.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let after = after.context("whoami after the crash (the gateway did not restart the server within 10 s)")?;
    ensure!(after != before, "whoami answers from pid {after}, the process that crashed");
    pass(format!("{e}; pid {before} → {after}"))
}

fn rate_limited(c: &mut Client, o: &Options) -> Result<Outcome> {
    let up = up!(c, o);
    if up.rate_limit > 120 {
        return Ok(Outcome::NotApplicable(format!("rate_limit_per_minute {} is more calls than the audit makes for it (≤ 120)", up.rate_limit)));
    }
    let (shared, _) = key(c, &up)?;
    let tools = listed(c, &up, &shared)?;
    let Some(tool) = pick(&up, &tools, "echo", |_, p| p > 0) else {
        return Ok(Outcome::NotApplicable("no priced tool".into()));
    };
    let price = up.price_of(&tool);
    let args = sample_args(&tools, &tool);
    let calls = up.rate_limit + 1;
    let key = c.mint(price * calls, &[up.scope.as_str()])?;
    for i in 1..=up.rate_limit {
        let r = call(c, &up, &key, &tool, args.clone());
        let res = result(&r).with_context(|| format!("call {i} of {} (within the limit)", up.rate_limit))?;
        ensure!(res["isError"] != true, "call {i}: {res}");
    }
    let bal = c.balance(&key)?;
    ensure!(bal == price, "balance {bal} after {} calls of {price} (expected {price})", up.rate_limit);
    let ledger = ledger_sum(c, &key)?;
    let before = maybe_stats(c, o)?;
    let r = call(c, &up, &key, &tool, args);
    let data = refused(c, &r, -32004, "rate_limited", &key, bal, ledger)?;
    ensure!(data["retry_after_seconds"].as_u64().is_some_and(|s| (1..=60).contains(&s)), "data.retry_after_seconds {} (expected 1..60)", data["retry_after_seconds"]);
    let fwd = nothing_forwarded(c, o, &before, "a rate-limited call")?;
    // Free traffic is not rate limited.
    result(&rpc(c, &up, Some(&key), "tools/list", json!({}))).context("tools/list while rate limited")?;
    pass(format!("call {calls} of {tool}: -32004 rate_limited, retry_after_seconds {}{fwd}; tools/list still answered", data["retry_after_seconds"]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checks::tests::serve;

    fn opts(upstream: Option<&str>) -> Options {
        Options {
            failing_call: None,
            slow_call: None,
            unconfigured_url: None,
            x402_harness: None,
            upstream: upstream.map(str::to_string),
            upstream_control: None,
            upstream_slow_call: None,
            upstream_header: None,
        }
    }

    const PRICING: &str = r#"{"ok":true,"endpoints":[{"name":"example","price_mcents":100,"scope":"example","path":"/v1/example","input":{"message":{"type":"string","required":true}}}],"signup":null,
        "upstreams":[{"name":"weather","path":"/mcp/weather","price_mcents":100,"scope":"weather","description":"","rate_limit_per_minute":60,"enabled":true,"refund_tool_errors":false,"transport":"http","tools":{"forecast":250,"alerts":0}}]}"#;

    /// Without --upstream every proxy.* scenario is n/a and says why, sending nothing.
    #[test]
    fn every_scenario_is_not_applicable_without_an_upstream() {
        let url = serve(|_, path| match path {
            "/v1/pricing" => (200, PRICING.into()),
            _ => (500, "{}".into()),
        });
        let mut c = Client::connect(&url, Some("admin".into())).unwrap();
        let all = scenarios();
        assert!((20..=30).contains(&all.len()), "{}", all.len());
        for s in &all {
            assert!(s.name.starts_with("proxy."), "{}", s.name);
            match (s.run)(&mut c, &opts(None)) {
                Ok(Outcome::NotApplicable(why)) => assert!(why.contains("--upstream NAME"), "{}: {why}", s.name),
                Ok(Outcome::Pass(e)) => panic!("{} passed without an upstream: {e}", s.name),
                Err(e) => panic!("{} failed without an upstream: {e:#}", s.name),
            }
        }
        assert_eq!(c.mints, 0);
    }

    #[test]
    fn terms_are_read_from_pricing() {
        let url = serve(|_, path| match path {
            "/v1/pricing" => (200, PRICING.into()),
            _ => (404, "{}".into()),
        });
        let c = Client::connect(&url, None).unwrap();
        let up = match upstream(&c, &opts(Some("weather"))).unwrap() {
            Ok(u) => u,
            Err(_) => panic!("n/a"),
        };
        assert_eq!((up.price_of("forecast"), up.price_of("alerts"), up.price_of("echo")), (250, 0, 100));
        assert_eq!(up.endpoint("forecast"), "weather/forecast");
        assert_eq!(up.as_endpoint().price, 250);
        assert!(upstream(&c, &opts(Some("nope"))).err().unwrap().to_string().contains("no such upstream"));
    }

    #[test]
    fn sample_arguments_follow_the_input_schema() {
        let tools = vec![json!({"name": "slow", "inputSchema": {"type": "object", "properties": {"ms": {"type": "integer"}, "x": {"type": "string"}}, "required": ["ms"]}})];
        assert_eq!(sample_args(&tools, "slow"), json!({"ms": 1}));
        assert_eq!(sample_args(&tools, "none"), json!({}));
    }

    /// A gateway that answers everything under /mcp/ with the same result and never moves money
    /// passes none of the scenarios that run (but proxy.free_tool).
    #[test]
    fn a_proxy_that_meters_nothing_passes_nothing() {
        let url = serve(|method, path| match (method, path) {
            (_, "/v1/pricing") => (200, PRICING.into()),
            ("POST", "/v1/admin/mint") => (201, r#"{"ok":true,"key":"mcp_0000000000000000000000000000000000000000000000000000000000000001","key_id":"k_1"}"#.into()),
            ("GET", "/v1/me") => (200, r#"{"ok":true,"balance_mcents":100000}"#.into()),
            ("GET", p) if p.starts_with("/v1/me/ledger") => (200, r#"{"ok":true,"entries":[],"next_before":null}"#.into()),
            (_, p) if p.starts_with("/mcp/") => (200, r#"{"jsonrpc":"2.0","id":"x","result":{"tools":[{"name":"forecast"},{"name":"alerts"},{"name":"echo"},{"name":"fail"},{"name":"tool_error"},{"name":"whoami"},{"name":"progress"},{"name":"crash"}],"content":[{"type":"text","text":"{}"}]}}"#.into()),
            _ => (404, r#"{"ok":false,"error":{"code":"not_found","message":"Not found"}}"#.into()),
        });
        let mut c = Client::connect(&url, Some("admin".into())).unwrap();
        let o = opts(Some("weather"));
        for s in scenarios() {
            match (s.run)(&mut c, &o) {
                Err(_) => {}
                Ok(Outcome::NotApplicable(why)) => assert!(why.contains("--upstream-") || why.contains("scope") || why.contains("no session"), "{}: {why}", s.name),
                // Not charging a free tool is all a gateway can get right here.
                Ok(Outcome::Pass(_)) if s.name == "proxy.free_tool" => {}
                Ok(Outcome::Pass(e)) => panic!("{} passed against a proxy that meters nothing: {e}", s.name),
            }
        }
    }
}
