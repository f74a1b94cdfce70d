//! Discovery (contract 3.11 "Tools", "Who may do what"): `initialize`, `ping`, `tools/list`,
//! notifications and the `pricing` tool need no key, and what they say for sale is what
//! `/v1/pricing` says; `balance` is `/v1/me` for the caller's key.

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};

use super::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("mcp.initialize", "initialize without a key → a result with protocolVersion, serverInfo and the tools capability, no Mcp-Session-Id (stateless); notifications/initialized → 202, no body", |c, _| initialize(c)),
        scenario!("mcp.ping", "ping without a key → an empty result", |c, _| {
            if let Some(na) = unserved(c) {
                return Ok(na);
            }
            let res = result(&rpc(c, None, json!(fresh_id()), "ping", json!({})))?;
            ensure!(res == json!({}) || res.as_object().is_some_and(|m| m.keys().all(|k| k == "_meta")), "ping result {res} (expected {{}})");
            pass("ping → {}")
        }),
        scenario!("mcp.free_ignores_authorization", "initialize, ping, tools/list and the pricing tool with a malformed or unknown Authorization → still answered (the header is not read on them)", |c, _| free_ignores_authorization(c)),
        scenario!("mcp.tools_list", "tools/list without a key → one tool per /v1/pricing endpoint, same order, names and descriptions, then the free tools pricing and balance", |c, _| tools_list(c)),
        scenario!("mcp.tool_terms", "every paid tool's _meta io.mcpay/price_mcents and io.mcpay/scope equal the endpoint's price_mcents and scope in /v1/pricing", |c, _| tool_terms(c)),
        scenario!("mcp.input_schema", "every paid tool's inputSchema is its endpoint's input shape: type object, one property per field with its type, the required fields, additionalProperties false", |c, _| input_schema(c)),
        scenario!("mcp.pricing_tool", "tools/call pricing without a key → structuredContent = GET /v1/pricing's body, the same JSON as text", |c, _| {
            if let Some(na) = unserved(c) {
                return Ok(na);
            }
            let r = call_tool(c, None, "pricing", json!({}), None);
            let (sc, _) = tool_ok(&r)?;
            let body = pricing(c)?;
            ensure!(sc == body, "pricing tool:\n  {sc}\n/v1/pricing:\n  {body}");
            text_is(&result(&r)?, &body)?;
            pass(format!("{} endpoints, equal to /v1/pricing", body["endpoints"].as_array().map_or(0, Vec::len)))
        }),
        scenario!("mcp.balance_tool", "tools/call balance with the key → structuredContent = GET /v1/me's body for that key", |c, _| {
            if let Some(na) = unserved(c) {
                return Ok(na);
            }
            let (_, key, _) = setup(c)?;
            let r = call_tool(c, Some(&key), "balance", json!({}), None);
            let (sc, _) = tool_ok(&r)?;
            let me = c.me(&key);
            ensure!(sc == me, "balance tool:\n  {sc}\n/v1/me:\n  {me}");
            text_is(&result(&r)?, &me)?;
            pass(format!("balance_mcents {}, equal to /v1/me", me["balance_mcents"]))
        }),
    ]
}

fn initialize(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let params = json!({"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "create-mcpay-audit", "version": env!("CARGO_PKG_VERSION")}});
    // initialize is the one request sent without MCP-Protocol-Version.
    let r = mcp(c, &[], &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}));
    let res = result(&r)?;
    ensure!(res["protocolVersion"].is_string(), "initialize result without protocolVersion: {res}");
    ensure!(res["serverInfo"]["name"].is_string() && res["serverInfo"]["version"].is_string(), "initialize result without serverInfo name and version: {res}");
    ensure!(res["capabilities"]["tools"].is_object(), "initialize result without capabilities.tools: {res}");
    ensure!(r.header("mcp-session-id").is_none(), "a stateless server answered Mcp-Session-Id {:?}", r.header("mcp-session-id"));
    let n = mcp(c, &[("MCP-Protocol-Version", PROTOCOL)], &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    ensure!(n.status == 202, "notifications/initialized → {} (expected 202)", n.brief());
    ensure!(n.body.is_empty(), "202 with a body: {}", n.body);
    pass(format!("protocolVersion {}, server {}, notification 202", res["protocolVersion"], res["serverInfo"]["name"]))
}

fn free_ignores_authorization(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let unknown = format!("Bearer {}{}", c.key_prefix.clone().unwrap_or_else(|| "mcp_".into()), crate::audit::client::random_hex64());
    let body = pricing(c)?;
    for auth in ["Bearer not-a-key", "Basic dXNlcjpwYXNz", unknown.as_str()] {
        let h = [("Authorization", auth), ("MCP-Protocol-Version", PROTOCOL)];
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "audit", "version": "1"}}});
        let asks = [
            ("initialize", mcp(c, &[("Authorization", auth)], &init)),
            ("ping", mcp(c, &h, &json!({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {}}))),
            ("tools/list", mcp(c, &h, &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}))),
            ("pricing", mcp(c, &h, &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "pricing", "arguments": {}}}))),
        ];
        let mut got = Vec::new();
        for (what, r) in &asks {
            got.push(result(r).map_err(|e| e.context(format!("{what} with Authorization: {auth}")))?);
        }
        // Answered as without the header: the real answers, not merely some result.
        ensure!(got[0]["protocolVersion"].is_string(), "initialize with Authorization: {auth}: {}", got[0]);
        ensure!(got[2]["tools"].as_array().is_some_and(|t| t.len() >= c.endpoints.len() + 2), "tools/list with Authorization: {auth}: {}", got[2]);
        ensure!(got[3]["structuredContent"] == body, "pricing with Authorization: {auth}: {}", got[3]);
    }
    pass("initialize, ping, tools/list, pricing answered with 3 bad Authorization headers")
}

fn tools_list(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let list = tools(c)?;
    let names: Vec<&str> = list.iter().map(|t| t["name"].as_str().unwrap_or("")).collect();
    let body = pricing(c)?;
    let eps = body["endpoints"].as_array().cloned().unwrap_or_default();
    let want: Vec<&str> = eps.iter().map(|e| e["name"].as_str().unwrap_or("")).collect();
    ensure!(names.len() >= want.len() + 2, "tools/list has {} tools {names:?}; /v1/pricing lists {} endpoints {want:?}, plus pricing and balance", names.len(), want.len());
    ensure!(names[..want.len()] == want[..], "tools/list starts {:?}, /v1/pricing lists {want:?} (same order)", &names[..want.len()]);
    ensure!(names[want.len()..want.len() + 2] == ["pricing", "balance"], "after the paid tools: {:?} (expected pricing, balance)", &names[want.len()..]);
    for (t, e) in list.iter().zip(&eps) {
        ensure!(t["description"] == e["description"], "tool {}: description {} ≠ /v1/pricing's {}", e["name"], t["description"], e["description"]);
    }
    for free in &list[want.len()..want.len() + 2] {
        let schema = &free["inputSchema"];
        ensure!(schema["type"] == "object" && schema["properties"].as_object().is_none_or(|p| p.is_empty()), "free tool {}: inputSchema {schema} takes arguments", free["name"]);
    }
    let extra = &names[want.len() + 2..];
    pass(format!("{} paid tools in /v1/pricing order, then pricing, balance{}", want.len(), if extra.is_empty() { String::new() } else { format!(", then {extra:?}") }))
}

fn tool_terms(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let list = tools(c)?;
    for ep in &c.endpoints {
        let Some(t) = list.iter().find(|t| t["name"] == ep.name.as_str()) else { bail!("tools/list has no tool {}", ep.name) };
        let meta = &t["_meta"];
        ensure!(meta[PRICE] == ep.price, "tool {}: _meta {PRICE} {} ≠ price_mcents {}", ep.name, meta[PRICE], ep.price);
        ensure!(meta[SCOPE] == ep.scope.as_str(), "tool {}: _meta {SCOPE} {} ≠ scope {:?}", ep.name, meta[SCOPE], ep.scope);
    }
    pass(format!("{} tools priced and scoped as /v1/pricing", c.endpoints.len()))
}

fn input_schema(c: &mut Client) -> Result<Outcome> {
    if let Some(na) = unserved(c) {
        return Ok(na);
    }
    let list = tools(c)?;
    for ep in &c.endpoints {
        let Some(t) = list.iter().find(|t| t["name"] == ep.name.as_str()) else { bail!("tools/list has no tool {}", ep.name) };
        schema_matches(&t["inputSchema"], &ep.input).map_err(|e| e.context(format!("tool {}", ep.name)))?;
    }
    pass(format!("{} inputSchemas match their input shapes", c.endpoints.len()))
}

/// Contract 3.11: `{"type": "object", "properties": {<field>: {"type": <type>}}, "required": [...],
/// "additionalProperties": false}` for the shape's fields (name, type, required), plus, on the mpp
/// target, an optional `credit` string. The order of
/// `required` is not compared: the audit reads /v1/pricing's `input` into a map.
fn schema_matches(schema: &Value, shape: &[(String, String, bool)]) -> Result<()> {
    ensure!(schema["type"] == "object", "inputSchema type {} (expected \"object\")", schema["type"]);
    ensure!(schema["additionalProperties"] == false, "inputSchema additionalProperties {} (expected false)", schema["additionalProperties"]);
    let props = schema["properties"].as_object().cloned().unwrap_or_default();
    let mut want: Vec<&str> = shape.iter().map(|(n, _, _)| n.as_str()).collect();
    // The one extra the contract allows (the mpp target): an optional `credit` string.
    let extra_credit = |k: &str| k == "credit" && !want.contains(&"credit") && props[k]["type"] == "string";
    let mut got: Vec<&str> = props.keys().map(String::as_str).filter(|k| !extra_credit(k)).collect();
    got.sort();
    want.sort();
    ensure!(got == want, "inputSchema properties {got:?}, the input shape has {want:?}");
    for (name, ty, _) in shape {
        ensure!(props[name]["type"] == ty.as_str(), "property {name}: type {} (the shape says {ty:?})", props[name]["type"]);
    }
    let mut required: Vec<&str> = schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let mut want_req: Vec<&str> = shape.iter().filter(|(_, _, r)| *r).map(|(n, _, _)| n.as_str()).collect();
    required.sort();
    want_req.sort();
    ensure!(required == want_req, "inputSchema required {required:?}, the shape requires {want_req:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Vec<(String, String, bool)> {
        vec![("query".into(), "string".into(), true), ("limit".into(), "integer".into(), false)]
    }

    #[test]
    fn schemas_must_be_the_shape_exactly() {
        let good = json!({"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "description": "d"}}, "required": ["query"], "additionalProperties": false});
        schema_matches(&good, &shape()).unwrap();
        let mut open = good.clone();
        open["additionalProperties"] = json!(true);
        let mut extra = good.clone();
        extra["properties"]["other"] = json!({"type": "string"});
        // mpp's optional credit string is the one extra allowed; required, or of another type, it is not.
        let mut credit = good.clone();
        credit["properties"]["credit"] = json!({"type": "string"});
        schema_matches(&credit, &shape()).unwrap();
        let mut credit_required = credit.clone();
        credit_required["required"] = json!(["query", "credit"]);
        let mut credit_typed = credit.clone();
        credit_typed["properties"]["credit"]["type"] = json!("object");
        let mut typed = good.clone();
        typed["properties"]["limit"]["type"] = json!("number");
        let mut req = good.clone();
        req["required"] = json!(["query", "limit"]);
        let mut unrequired = good.clone();
        unrequired.as_object_mut().unwrap().remove("required");
        for (what, bad) in [("open", open), ("extra", extra), ("typed", typed), ("req", req), ("unrequired", unrequired), ("credit_required", credit_required), ("credit_typed", credit_typed)] {
            assert!(schema_matches(&bad, &shape()).is_err(), "{what}");
        }
        let empty = json!({"type": "object", "properties": {}, "additionalProperties": false});
        schema_matches(&empty, &[]).unwrap();
    }

    #[test]
    fn text_items_must_carry_the_same_json() {
        let res = json!({"content": [{"type": "text", "text": "{\"a\": 1}"}]});
        text_is(&res, &json!({"a": 1})).unwrap();
        assert!(text_is(&res, &json!({"a": 2})).is_err());
        assert!(text_is(&json!({"content": []}), &json!({})).is_err());
    }
}
