// Self-test of the test upstream with the official SDK client: starts `server.mjs --port 0` and
// `server.mjs --stdio`, lists the tools and calls each one, checks the control endpoints.
// Run: node selftest.mjs (exits non-zero on the first failed check).

import { spawn } from "node:child_process";
import { once } from "node:events";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";

const serverPath = fileURLToPath(new URL("./server.mjs", import.meta.url));
let checks = 0;
const ok = (what) => {
  checks += 1;
  console.log(`ok ${checks} - ${what}`);
};

async function startHttp() {
  const child = spawn(process.execPath, [serverPath, "--port", "0"], { stdio: ["ignore", "pipe", "inherit"] });
  const lines = createInterface({ input: child.stdout });
  const [line] = await Promise.race([
    once(lines, "line"),
    once(child, "exit").then(([code]) => Promise.reject(new Error(`server exited (${code}) before its url line`))),
  ]);
  const { url, sse_url } = JSON.parse(line);
  return { child, url, sseUrl: sse_url };
}

const textOf = (r) => r.content?.[0]?.text;

async function callEach(client, label) {
  const { tools } = await client.listTools();
  const names = tools.map((t) => t.name);
  for (const n of ["forecast", "alerts", "echo", "fail", "tool_error", "slow", "progress", "whoami", "big"]) {
    assert.ok(names.includes(n), `${label}: tools/list lacks ${n}: ${names}`);
  }
  assert.deepEqual(tools.find((t) => t.name === "forecast")._meta, { "test.upstream/kind": "weather" });
  ok(`${label}: tools/list (${names.length} tools)`);

  assert.match(textOf(await client.callTool({ name: "forecast", arguments: { city: "Paris" } })), /Paris/);
  assert.equal(textOf(await client.callTool({ name: "alerts", arguments: {} })), "No active alerts");
  assert.equal(textOf(await client.callTool({ name: "echo", arguments: { text: "héllo" } })), "héllo");
  ok(`${label}: forecast, alerts, echo`);

  await assert.rejects(client.callTool({ name: "fail", arguments: {} }), (e) => e.code === -32603 && /simulated/.test(e.message));
  ok(`${label}: fail answers a JSON-RPC error`);
  const te = await client.callTool({ name: "tool_error", arguments: {} });
  assert.equal(te.isError, true);
  ok(`${label}: tool_error answers isError: true`);

  const t0 = Date.now();
  assert.equal(textOf(await client.callTool({ name: "slow", arguments: { ms: 300 } })), "slept 300 ms");
  assert.ok(Date.now() - t0 >= 290, "slow answered too early");
  ok(`${label}: slow waits`);

  const seen = [];
  const started = Date.now();
  const pr = await client.callTool({ name: "progress", arguments: { steps: 3 } }, undefined, {
    onprogress: (p) => seen.push({ ...p, at: Date.now() - started }),
  });
  const done = Date.now() - started;
  assert.equal(textOf(pr), "done 3 steps");
  assert.deepEqual(seen.map((p) => p.progress), [1, 2, 3]);
  assert.ok(seen[0].at < done - 300, `the first progress (${seen[0].at} ms) came long before the answer (${done} ms)`);
  ok(`${label}: progress streams 3 notifications before the answer (${seen.map((p) => p.at)} / ${done} ms)`);

  const who = JSON.parse(textOf(await client.callTool({ name: "whoami", arguments: {} })));
  assert.equal(typeof who.pid, "number");
  assert.equal(textOf(await client.callTool({ name: "big", arguments: { bytes: 100000 } })).length, 100000);
  ok(`${label}: whoami, big`);
  return who;
}

// --- Streamable HTTP ---
const { child, url, sseUrl } = await startHttp();
try {
  const base = url.replace(/\/mcp$/, "");
  const client = new Client({ name: "selftest", version: "1.0.0" });
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { "X-Upstream-Token": "tok-123", Authorization: "Bearer visible-here" } },
  });
  await client.connect(transport);
  assert.ok(transport.sessionId, "initialize started a session");
  ok(`http: initialize, session ${transport.sessionId}`);
  const who = await callEach(client, "http");
  assert.equal(who.headers["x-upstream-token"], "tok-123");
  assert.equal(who.headers["authorization"], "Bearer visible-here");
  assert.equal(who.headers["mcp-session-id"], transport.sessionId);
  ok("http: whoami shows the headers received");

  const stats = await (await fetch(`${base}/control/stats`)).json();
  assert.equal(stats.tools_call.forecast, 1);
  assert.equal(stats.tools_call.progress, 1);
  assert.equal(stats.methods.initialize, 1);
  assert.equal(stats.last_headers["x-upstream-token"], "tok-123");
  ok("control: stats count tools/call per tool");

  // A bare tools/call without initialize or session is served statelessly, answered as SSE.
  const call = (id, name, a = {}) =>
    fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json", accept: "application/json, text/event-stream" },
      body: JSON.stringify({ jsonrpc: "2.0", id, method: "tools/call", params: { name, arguments: a } }),
    });
  const bare = await call(7, "echo", { text: "bare" });
  assert.equal(bare.status, 200);
  assert.match(bare.headers.get("content-type"), /text\/event-stream/);
  assert.match(await bare.text(), /"id":7/);
  ok("http: a bare tools/call is answered over SSE");

  assert.equal((await fetch(`${base}/control/mode`, { method: "POST", body: '{"mode":"http500"}' })).status, 200);
  assert.equal((await call(8, "echo", { text: "x" })).status, 500);
  ok("control: http500 mode");
  await fetch(`${base}/control/mode`, { method: "POST", body: '{"mode":"reset"}' });
  await assert.rejects(call(9, "echo", { text: "x" }).then((r) => r.text()));
  ok("control: reset mode destroys the connection");
  await fetch(`${base}/control/mode`, { method: "POST", body: '{"mode":"json"}' });
  const asJson = await call(11, "echo", { text: "j" });
  assert.match(asJson.headers.get("content-type"), /application\/json/);
  assert.equal((await asJson.json()).result.content[0].text, "j");
  ok("control: json mode answers application/json");
  await fetch(`${base}/control/mode`, { method: "POST", body: '{"mode":"ok"}' });
  assert.equal((await call(10, "echo", { text: "x" })).status, 200);
  await fetch(`${base}/control/reset-stats`, { method: "POST" });
  const after = await (await fetch(`${base}/control/stats`)).json();
  assert.deepEqual(after.tools_call, {});
  assert.equal(after.mcp_requests, 0);
  ok("control: back to ok, stats reset");
  await client.close();

  // --- legacy HTTP+SSE (2024-11-05) on the same server ---
  const legacy = new Client({ name: "selftest-sse", version: "1.0.0" });
  const sseTransport = new SSEClientTransport(new URL(sseUrl), {
    requestInit: { headers: { "X-Upstream-Token": "tok-sse" } },
    eventSourceInit: { fetch: (u, init) => fetch(u, { ...init, headers: { ...init?.headers, "X-Upstream-Token": "tok-sse" } }) },
  });
  await legacy.connect(sseTransport);
  ok("sse: initialize over the legacy transport");
  const whoSse = await callEach(legacy, "sse");
  assert.equal(whoSse.headers["x-upstream-token"], "tok-sse");
  const sseStats = await (await fetch(`${base}/control/stats`)).json();
  assert.equal(sseStats.sse_sessions, 1);
  assert.equal(sseStats.methods.initialize, 1);
  assert.equal(sseStats.tools_call.forecast, 1);
  ok("sse: stats count its session and calls");
  await fetch(`${base}/control/mode`, { method: "POST", body: '{"mode":"http500"}' });
  await assert.rejects(legacy.callTool({ name: "echo", arguments: { text: "x" } }));
  await fetch(`${base}/control/mode`, { method: "POST", body: '{"mode":"ok"}' });
  ok("sse: http500 mode applies to POST /messages");
  await legacy.close();
} finally {
  child.kill("SIGTERM");
}

// --- stdio ---
{
  const client = new Client({ name: "selftest", version: "1.0.0" });
  const transport = new StdioClientTransport({ command: process.execPath, args: [serverPath, "--stdio"], stderr: "ignore" });
  await client.connect(transport);
  const who = await callEach(client, "stdio");
  assert.equal(who.transport, "stdio");
  const stats = (await client.callTool({ name: "stats", arguments: {} })).structuredContent;
  assert.equal(stats.tools_call.forecast, 1);
  ok("stdio: stats tool");
  const pid = transport.pid;
  const closed = new Promise((resolve) => (client.onclose = resolve));
  await assert.rejects(client.callTool({ name: "crash", arguments: {} }), (e) => e.code === -32000);
  await closed;
  assert.throws(() => process.kill(pid, 0), { code: "ESRCH" });
  ok(`stdio: crash exits the process (pid ${pid}) mid-call`);
}

console.log(`${checks} passed, 0 failed`);
process.exit(0);
