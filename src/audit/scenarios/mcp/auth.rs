//! Keys on /mcp (contract 3.11 "Who may do what", 3.3): `balance` and paid tools need
//! `Authorization: Bearer <key>` on the HTTP request, refused with the 401 of section 2 before the
//! MCP server runs; a key anywhere else is never read; no answer carries key material.

use anyhow::{Result, ensure};
use serde_json::json;

use super::*;
use crate::audit::client::random_hex64;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("mcp.auth_missing", "balance and a paid tool without Authorization → HTTP 401 missing_key with WWW-Authenticate: Bearer realm (mpp: a paid tool is offered for MPP instead)", |c, _| missing(c)),
        scenario!("mcp.auth_invalid", "balance and a paid tool with another scheme, a wrong prefix, uppercase hex or a key nobody minted → HTTP 401 invalid_key with WWW-Authenticate", |c, _| invalid(c)),
        scenario!("mcp.key_elsewhere_ignored", "a valid key in params._meta or in the arguments, none in Authorization → still 401 missing_key (or the MPP offer), nothing charged", |c, _| elsewhere(c)),
        scenario!("mcp.no_key_material", "no MCP answer (initialize, tools/list, pricing, balance, a paid call, errors, 401s) carries the key, its hex or any 64-hex string", |c, _| no_material(c)),
    ]
}

/// A paid tool without a key: 401 missing_key, or the mpp target's MPP offer. Returns the evidence.
fn paid_without_key(r: &Reply, ep: &str) -> Result<String> {
    if mpp_offer(r) {
        return Ok(format!("{ep}: offered for MPP ({MPP_PAYMENT_REQUIRED})"));
    }
    unauthorized(r, "missing_key").map_err(|e| e.context(format!("tools/call {ep} without a key")))?;
    Ok(format!("{ep}: 401 missing_key"))
}

/// A JSON-RPC -32602 invalid_input refusal.
fn refused_shape(r: &Reply) -> Result<()> {
    let e = rpc_error(r, -32602)?;
    ensure!(e["data"]["code"] == "invalid_input", "error.data.code {} (expected invalid_input)", e["data"]["code"]);
    Ok(())
}

fn missing(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let ep = c.first();
    let r = call_tool(c, None, "balance", json!({}), None);
    unauthorized(&r, "missing_key").map_err(|e| e.context("tools/call balance without a key"))?;
    let paid = paid_without_key(&call_tool(c, None, &ep.name, ep.sample(), None), &ep.name)?;
    pass(format!("balance: 401 missing_key, {paid}"))
}

fn invalid(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let ep = c.first();
    // The prefix is learnt from a mint; the shared key also makes the fake keys look real.
    let _ = c.shared_key(&ep)?;
    let prefix = c.prefix();
    let hex = random_hex64();
    let headers = [
        format!("Basic {prefix}{hex}"),
        format!("Bearer x{prefix}{hex}"),
        format!("Bearer {prefix}{}", hex.to_ascii_uppercase()),
        format!("Bearer {prefix}{}", &hex[..63]),
        format!("Bearer {prefix}{hex}"),
    ];
    for h in &headers {
        for (tool, args) in [("balance".to_string(), json!({})), (ep.name.clone(), ep.sample())] {
            let r = mcp(c, &[("Authorization", h), ("MCP-Protocol-Version", PROTOCOL)], &json!({"jsonrpc": "2.0", "id": fresh_id(), "method": "tools/call", "params": {"name": tool, "arguments": args}}));
            unauthorized(&r, "invalid_key").map_err(|e| e.context(format!("tools/call {tool} with Authorization: {h}")))?;
        }
    }
    pass(format!("{} bad Authorization headers × balance and {}: 401 invalid_key", headers.len(), ep.name))
}

fn elsewhere(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let (ep, key, bal) = setup(c)?;
    let ledger = ledger_sum(c, &key)?;
    let meta = json!({"authorization": key.bearer(), "io.mcpay/key": key.key, "api_key": key.key});
    let r = call_tool(c, None, "balance", json!({}), Some(meta.clone()));
    unauthorized(&r, "missing_key").map_err(|e| e.context("balance with the key in params._meta"))?;
    let r = call_tool(c, None, "balance", json!({"api_key": key.key, "authorization": key.bearer()}), None);
    unauthorized(&r, "missing_key").map_err(|e| e.context("balance with the key in the arguments"))?;
    let in_meta = paid_without_key(&call_tool(c, None, &ep.name, ep.sample(), Some(meta)), &ep.name)?;
    // The key as the value of a string argument keeps the arguments valid (so an MPP gateway
    // answers with its offer, not a shape error); without a string field it goes in a field of its own.
    let mut args = ep.sample();
    match ep.input.iter().find(|(_, ty, _)| ty == "string") {
        Some((name, _, _)) => args[name.as_str()] = json!(key.key),
        None => args["api_key"] = json!(key.key),
    }
    let r = call_tool(c, None, &ep.name, args.clone(), None);
    let in_args = match paid_without_key(&r, &ep.name) {
        Ok(e) => e,
        // The MPP path checks the arguments before it asks for a payment: an unknown field is refused.
        Err(_) if in_meta.contains("MPP") && args.get("api_key").is_some() => {
            refused_shape(&r)?;
            format!("{}: -32602 invalid_input (the MPP path checks arguments first)", ep.name)
        }
        Err(e) => return Err(e.context(format!("the key in the arguments {args}"))),
    };
    ensure!(c.balance(&key)? == bal, "the key was charged though it was never in Authorization");
    ensure!(ledger_sum(c, &key)? == ledger, "the key's ledger moved though it was never in Authorization");
    pass(format!("balance: 401 missing_key twice; key in _meta → {in_meta}; in arguments → {in_args}; balance still {bal}"))
}

fn no_material(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let (ep, key, _) = setup(c)?;
    let prefix = c.prefix();
    let fake = Key { key: format!("{prefix}{}", random_hex64()), key_id: String::new() };
    let mut bad = ep.sample();
    bad["zz_not_a_field"] = json!(1);
    let answers = [
        ("initialize", mcp(c, &[("Authorization", &key.bearer())], &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "audit", "version": "1"}}}))),
        ("tools/list", rpc(c, Some(&key), json!(1), "tools/list", json!({}))),
        ("pricing", call_tool(c, Some(&key), "pricing", json!({}), None)),
        ("balance", call_tool(c, Some(&key), "balance", json!({}), None)),
        ("a paid call", call_tool(c, Some(&key), &ep.name, ep.sample(), None)),
        ("invalid arguments", call_tool(c, Some(&key), &ep.name, bad, None)),
        ("an unknown tool", call_tool(c, Some(&key), "no_such_tool_zz", json!({}), None)),
        ("an unknown key", call_tool(c, Some(&fake), "balance", json!({}), None)),
        ("an unknown key, paid tool", call_tool(c, Some(&fake), &ep.name, ep.sample(), None)),
    ];
    for (what, r) in &answers {
        ensure!(r.status != 0, "{what}: {}", r.body);
        let headers: String = r.headers.iter().map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or(""))).collect();
        no_key_material(&format!("{headers}\n{}", r.body), &[&key, &fake], &prefix).map_err(|e| e.context(format!("the answer to {what} ({})", r.brief())))?;
    }
    pass(format!("{} answers, headers and bodies: no key, no hex of it, no 64-hex string", answers.len()))
}
