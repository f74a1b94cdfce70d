//! A stdio MCP server built with the official SDK (rmcp): the `command` upstream that
//! tests/proxy.rs has the gateway spawn (`[upstreams.NAME] command = [...]`). Tools: forecast,
//! echo, pid (the process id, to see restarts), slow ({ms}), progress ({n} notifications 200 ms
//! apart), fail (a JSON-RPC error), tool_error (isError) and crash (the process exits mid-call).

use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ErrorData, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServerHandler, ServiceExt};
use serde_json::{Value, json};

#[derive(Clone, Copy)]
struct Upstream;

fn result(text: String, is_error: bool) -> Result<CallToolResponse, ErrorData> {
    let mut r = json!({ "content": [{ "type": "text", "text": text }] });
    if is_error {
        r["isError"] = json!(true);
    }
    serde_json::from_value::<CallToolResult>(r).map(Into::into).map_err(|e| ErrorData::internal_error(e.to_string(), None))
}

impl ServerHandler for Upstream {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(&self, _: Option<PaginatedRequestParams>, _: RequestContext<RoleServer>) -> Result<ListToolsResult, ErrorData> {
        let tools = ["forecast", "echo", "pid", "slow", "progress", "fail", "tool_error", "crash"]
            .iter()
            .filter_map(|n| serde_json::from_value::<Tool>(json!({ "name": n, "inputSchema": { "type": "object" } })).ok())
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(&self, params: CallToolRequestParams, cx: RequestContext<RoleServer>) -> Result<CallToolResponse, ErrorData> {
        let args = Value::Object(params.arguments.clone().unwrap_or_default());
        match params.name.as_ref() {
            "forecast" => result("sunny".into(), false),
            "echo" => result(args.to_string(), false),
            "pid" => result(std::process::id().to_string(), false),
            "slow" => {
                let ms = args["ms"].as_u64().unwrap_or(2000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                result(format!("slept {ms} ms"), false)
            }
            "progress" => {
                let n = args["n"].as_u64().unwrap_or(3);
                if let Some(token) = cx.meta.get_progress_token() {
                    for i in 0..n {
                        let _ = cx.peer.notify_progress(ProgressNotificationParam::new(token.clone(), i as f64).with_total(n as f64)).await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                result("done".into(), false)
            }
            "fail" => Err(ErrorData::internal_error("the upstream failed on purpose", None)),
            "tool_error" => result("the tool could not do it".into(), true),
            "crash" => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::process::exit(3);
            }
            _ => Err(ErrorData::invalid_params("unknown tool", None)),
        }
    }
}

#[tokio::main]
async fn main() {
    let service = Upstream.serve(rmcp::transport::stdio()).await.expect("stdio transport");
    let _ = service.waiting().await;
}
