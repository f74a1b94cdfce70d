//! `POST /mcp` (gateways that serve MCP): what a batch of tool calls may not do to a prepaid key.
//! Charges must be made under ids the gateway makes, never under the client's JSON-RPC ids; a batch
//! whose calls share one id is refused with a JSON-RPC error before anything is charged.

use anyhow::ensure;
use serde_json::{Value, json};

use crate::audit::client::{Client, Reply};
use crate::audit::checks::ledger_sum;
use crate::audit::scenario::{Outcome, Scenario};

const PATH: &str = "/mcp";

/// The JSON-RPC messages of an MCP answer: a JSON body (one message or a batch), or an SSE stream's
/// `data:` lines.
fn messages(r: &Reply) -> Vec<Value> {
    let one_or_many = |v: Value| match v {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        v => vec![v],
    };
    if let Ok(v) = serde_json::from_str::<Value>(&r.body) {
        return one_or_many(v);
    }
    r.body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .flat_map(one_or_many)
        .collect()
}

fn mcp(c: &Client, headers: &[(&str, &str)], body: &Value) -> Reply {
    let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")];
    h.extend_from_slice(headers);
    c.request("POST", PATH, &h, Some(body.to_string().as_bytes()))
}

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario {
        name: "mcp.duplicate_jsonrpc_ids",
        expect: "POST /mcp with a batch of three tools/call sharing one JSON-RPC id (prepaid key) → a JSON-RPC error, nothing charged",
        run: |c, _| {
            let probe = mcp(c, &[], &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}));
            if probe.status == 404 {
                return Ok(Outcome::NotApplicable(format!("this gateway serves no MCP endpoint (POST {PATH}: {})", probe.brief())));
            }
            let ep = c.first();
            let (key, balance) = c.shared_key(&ep)?;
            let (sum0, rows0) = ledger_sum(c, &key)?;
            let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": ep.name, "arguments": ep.sample()}});
            let r = mcp(c, &[("Authorization", &key.bearer())], &json!([call, call, call]));
            ensure!(r.status != 0 && r.status < 500, "the batch: {}", r.brief());
            let msgs = messages(&r);
            ensure!(!msgs.is_empty(), "the batch got no JSON-RPC answer: {}", r.brief());
            ensure!(
                msgs.iter().all(|m| m.get("error").is_some_and(Value::is_object) && m.get("result").is_none()),
                "a batch with one id three times was run (a result came back): {}",
                r.brief()
            );
            let now = c.balance(&key)?;
            let (sum1, rows1) = ledger_sum(c, &key)?;
            ensure!(now == balance, "the refused batch moved the balance {balance} → {now}");
            ensure!(rows1 == rows0 && sum1 == sum0, "the refused batch wrote ledger rows ({rows0} → {rows1} entries)");
            let codes: Vec<String> = msgs.iter().map(|m| m["error"]["code"].to_string()).collect();
            Ok(Outcome::Pass(format!("HTTP {}, JSON-RPC error(s) {codes:?}, balance still {balance}", r.status)))
        },
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(body: &str) -> Reply {
        Reply { status: 200, headers: Default::default(), body: body.into() }
    }

    #[test]
    fn messages_from_json_batches_and_sse() {
        assert_eq!(messages(&reply(r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600}}"#)).len(), 1);
        assert_eq!(messages(&reply(r#"[{"id":1,"error":{}},{"id":1,"result":{}}]"#)).len(), 2);
        let sse = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{}}\n\nevent: message\ndata: {\"id\":7,\"error\":{}}\n\n";
        let m = messages(&reply(sse));
        assert_eq!(m.len(), 2);
        assert!(m[0].get("result").is_some());
        assert!(messages(&reply("")).is_empty());
    }
}
