//! The test upstream MCP server of the proxy tests (tests/upstream, contract 3.12) on its own: the
//! official SDK client calls every tool over Streamable HTTP and stdio, and the Rust helper the
//! end-to-end tests use starts it, switches its modes and reads its stats.
//! Needs Node.js >= 20 and npm, and fails (never skips) without them.

mod common;

use common::upstream::Upstream;

#[test]
#[ignore = "needs Node.js >= 20 and npm; run with --include-ignored"]
fn upstream_selftest_with_the_official_client() {
    common::upstream::run_selftest();
}

#[test]
#[ignore = "needs Node.js >= 20 and npm; run with --include-ignored"]
fn upstream_helper_starts_counts_and_switches_modes() {
    let up = Upstream::start();
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"forecast","arguments":{"city":"Oslo"}}}"#;
    let accept = [("Accept", "application/json, text/event-stream"), ("X-Upstream-Token", "t0k")];
    let (status, head, body) = common::http(up.port, "POST", "/mcp", &accept, call);
    assert_eq!(status, 200, "{head}{body}");
    assert!(head.to_ascii_lowercase().contains("text/event-stream"), "{head}");
    assert!(body.contains("Oslo"), "{body}");
    let stats = up.stats();
    assert_eq!(up.calls("forecast"), 1, "{stats}");
    assert_eq!(stats["last_headers"]["x-upstream-token"], "t0k", "{stats}");

    up.mode("http500");
    let (status, _, _) = common::http(up.port, "POST", "/mcp", &accept, call);
    assert_eq!(status, 500);
    up.mode("reset");
    assert!(common::try_http(up.port, "POST", "/mcp", &accept, call).map_or(true, |(s, _, _)| s == 0));
    up.mode("json");
    let (status, head, body) = common::http(up.port, "POST", "/mcp", &accept, call);
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("application/json") && body.contains("Oslo"), "{head}{body}");
    up.mode("ok");
    assert_eq!(up.calls("forecast"), 2, "http500 and reset never reach the tool");
    assert_eq!(up.stats()["mcp_requests"], 4);
    up.reset_stats();
    assert_eq!(up.calls("forecast"), 0);
    assert_eq!(common::upstream::stdio_command()[2], "--stdio");
}
