// A real MCP server, built with the official TypeScript SDK, that the tests put a price on as an
// upstream (contract 3.12). Two ways to serve it:
//
//   node server.mjs --port 0   Streamable HTTP on 127.0.0.1 (POST/GET/DELETE /mcp); prints one line
//                              {"url":"http://127.0.0.1:PORT/mcp"} on stdout once it listens.
//                              tools/call answers are SSE when the client accepts it (so progress
//                              notifications stream). An `initialize` starts a session (the answer
//                              carries Mcp-Session-Id; later requests with it are routed to it);
//                              a request without Mcp-Session-Id that is not an `initialize` is served
//                              statelessly, so a bare tools/call works without a handshake.
//                              Plain-HTTP control endpoints (not MCP):
//                                POST /control/mode {"mode": "ok" | "json" | "http500" | "reset"}
//                                     json: answers are application/json (no SSE) on stateless
//                                     requests and new sessions; http500: every POST /mcp answers
//                                     500; reset: every POST /mcp has its socket destroyed unanswered.
//                                GET  /control/stats → {"mode", "mcp_requests", "methods": {m: n},
//                                     "tools_call": {tool: n}, "last_headers": {...}}
//                                POST /control/reset-stats
//                              The same server also speaks MCP's legacy HTTP+SSE transport
//                              (2024-11-05, the SDK's SSEServerTransport): GET /sse opens a session
//                              whose `endpoint` event names POST /messages?sessionId=…; the url line
//                              also carries {"sse_url": "http://127.0.0.1:PORT/sse"}. Modes apply
//                              to POST /messages too; stats count its messages with the others and
//                              "sse_sessions" counts the sessions opened.
//   node server.mjs --stdio    the same tools over stdio (for axum's `command` upstreams), plus
//                              `crash` (exits the process with code 1 mid-call) and `stats`.
//
// Tools: forecast {city}, alerts, echo {text}, fail (a JSON-RPC error), tool_error (isError: true),
// slow {ms}, progress {steps} (one notifications/progress every ~200 ms when the request has a
// progressToken, then the answer), whoami (the HTTP request headers it received, and its pid),
// big {bytes} (a text of that many bytes).

import http from "node:http";
import { randomUUID } from "node:crypto";
import { Server } from "@modelcontextprotocol/sdk/server/index.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { StdioServerTransport } from "@modelcontextprotocol/sdk/server/stdio.js";
import { SSEServerTransport } from "@modelcontextprotocol/sdk/server/sse.js";
import {
  CallToolRequestSchema,
  ErrorCode,
  ListToolsRequestSchema,
  McpError,
  isInitializeRequest,
} from "@modelcontextprotocol/sdk/types.js";

const args = process.argv.slice(2);
const stdio = args.includes("--stdio");
const portArg = args.indexOf("--port");
const port = portArg >= 0 ? Number(args[portArg + 1]) : 0;

const stats = newStats();
function newStats() {
  return { mcp_requests: 0, methods: {}, tools_call: {}, last_headers: {}, sse_sessions: 0 };
}
let mode = "ok";

const object = (properties = {}, required = []) => ({
  type: "object",
  properties,
  required,
  additionalProperties: false,
});

const TOOLS = [
  {
    name: "forecast",
    description: "Weather forecast for a city",
    inputSchema: object({ city: { type: "string" } }, ["city"]),
    // The upstream's own _meta: a gateway rewriting tools/list must keep it.
    _meta: { "test.upstream/kind": "weather" },
  },
  { name: "alerts", description: "Active weather alerts", inputSchema: object() },
  { name: "echo", description: "Echoes its text", inputSchema: object({ text: { type: "string" } }, ["text"]) },
  { name: "fail", description: "Always answers a JSON-RPC error", inputSchema: object() },
  { name: "tool_error", description: "Always answers a result with isError: true", inputSchema: object() },
  { name: "slow", description: "Waits ms milliseconds, then answers", inputSchema: object({ ms: { type: "integer" } }, ["ms"]) },
  {
    name: "progress",
    description: "Sends `steps` progress notifications ~200 ms apart, then answers ~200 ms after the last",
    inputSchema: object({ steps: { type: "integer" } }, ["steps"]),
  },
  { name: "whoami", description: "The HTTP request headers this server received", inputSchema: object() },
  { name: "big", description: "A text of `bytes` bytes", inputSchema: object({ bytes: { type: "integer" } }, ["bytes"]) },
];
if (stdio) {
  TOOLS.push(
    { name: "crash", description: "Exits the server process (code 1) in the middle of the call", inputSchema: object() },
    { name: "stats", description: "tools/call counts of this process", inputSchema: object() },
  );
}

const text = (t) => ({ content: [{ type: "text", text: t }] });
const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

function integerArg(a, name, max) {
  const v = a[name];
  if (!Number.isInteger(v) || v < 0 || v > max) {
    throw new McpError(ErrorCode.InvalidParams, `${name} must be an integer in 0..${max}`);
  }
  return v;
}

function stringArg(a, name) {
  if (typeof a[name] !== "string") throw new McpError(ErrorCode.InvalidParams, `${name} must be a string`);
  return a[name];
}

function headersOf(extra) {
  const h = extra.requestInfo?.headers ?? {};
  const out = {};
  for (const [k, v] of Object.entries(h)) out[k.toLowerCase()] = Array.isArray(v) ? v.join(", ") : v;
  return out;
}

async function callTool(request, extra) {
  const name = request.params.name;
  const a = request.params.arguments ?? {};
  stats.tools_call[name] = (stats.tools_call[name] ?? 0) + 1;
  switch (name) {
    case "forecast":
      return text(`Forecast for ${stringArg(a, "city")}: sunny, 21 °C`);
    case "alerts":
      return text("No active alerts");
    case "echo":
      return text(stringArg(a, "text"));
    case "fail":
      throw new McpError(ErrorCode.InternalError, "simulated upstream failure");
    case "tool_error":
      return { content: [{ type: "text", text: "the tool failed" }], isError: true };
    case "slow": {
      const ms = integerArg(a, "ms", 600_000);
      await sleep(ms, extra.signal);
      return text(`slept ${ms} ms`);
    }
    case "progress": {
      const steps = integerArg(a, "steps", 100);
      const token = request.params._meta?.progressToken;
      // Notification i at ~(i-1)*200 ms, the answer ~200 ms after the last one.
      for (let i = 1; i <= steps; i++) {
        if (token !== undefined) {
          await extra.sendNotification({
            method: "notifications/progress",
            params: { progressToken: token, progress: i, total: steps, message: `step ${i}` },
          });
        }
        await sleep(200, extra.signal);
      }
      return text(`done ${steps} steps`);
    }
    case "whoami": {
      const who = { pid: process.pid, transport: stdio ? "stdio" : "http", headers: headersOf(extra) };
      return { content: [{ type: "text", text: JSON.stringify(who) }], structuredContent: who };
    }
    case "big":
      return text("x".repeat(integerArg(a, "bytes", 64 * 1024 * 1024)));
    case "crash":
      if (stdio) {
        process.stderr.write("test upstream: crash tool called, exiting with code 1\n");
        process.exit(1);
      }
      break;
    case "stats":
      if (stdio) return { content: [{ type: "text", text: JSON.stringify(stats) }], structuredContent: { ...stats } };
      break;
  }
  throw new McpError(ErrorCode.InvalidParams, `Unknown tool: ${name}`);
}

function newServer() {
  const server = new Server({ name: "mcpay-test-upstream", version: "1.0.0" }, { capabilities: { tools: {} } });
  server.setRequestHandler(ListToolsRequestSchema, async () => ({ tools: TOOLS }));
  server.setRequestHandler(CallToolRequestSchema, callTool);
  return server;
}

if (stdio) {
  const server = newServer();
  await server.connect(new StdioServerTransport());
  process.stderr.write(`test upstream: serving over stdio (pid ${process.pid})\n`);
} else {
  await serveHttp();
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    req.on("error", reject);
  });
}

function json(res, status, value) {
  const body = JSON.stringify(value);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

function count(message) {
  for (const m of Array.isArray(message) ? message : [message]) {
    if (m && typeof m.method === "string") stats.methods[m.method] = (stats.methods[m.method] ?? 0) + 1;
  }
}

async function serveHttp() {
  /** Sessions started by an `initialize`, by Mcp-Session-Id. */
  const sessions = new Map();
  /** Legacy HTTP+SSE sessions, by sessionId. */
  const legacy = new Map();

  const httpServer = http.createServer(async (req, res) => {
    try {
      const path = new URL(req.url, "http://x").pathname;
      if (path === "/control/mode" && req.method === "POST") {
        const body = JSON.parse((await readBody(req)) || "{}");
        if (!["ok", "json", "http500", "reset"].includes(body.mode)) {
          return json(res, 400, { error: "mode must be ok, json, http500 or reset" });
        }
        mode = body.mode;
        return json(res, 200, { mode });
      }
      if (path === "/control/stats" && req.method === "GET") return json(res, 200, { mode, ...stats });
      if (path === "/control/reset-stats" && req.method === "POST") {
        Object.assign(stats, newStats());
        return json(res, 200, { ok: true });
      }
      if (path === "/sse" && req.method === "GET") {
        stats.sse_sessions += 1;
        stats.last_headers = { ...req.headers };
        const transport = new SSEServerTransport("/messages", res);
        legacy.set(transport.sessionId, transport);
        transport.onclose = () => legacy.delete(transport.sessionId);
        await newServer().connect(transport);
        return;
      }
      if (path === "/messages" && req.method === "POST") {
        stats.mcp_requests += 1;
        stats.last_headers = { ...req.headers };
        const transport = legacy.get(new URL(req.url, "http://x").searchParams.get("sessionId") ?? "");
        const raw = await readBody(req);
        let message;
        try {
          message = JSON.parse(raw);
          count(message);
        } catch {
          return json(res, 400, { error: "not JSON" });
        }
        if (mode === "http500") return json(res, 500, { error: "simulated upstream outage" });
        if (mode === "reset") {
          req.socket.destroy();
          return;
        }
        if (!transport) return json(res, 404, { error: "no such session" });
        return await transport.handlePostMessage(req, res, message);
      }
      if (path !== "/mcp") return json(res, 404, { error: "not found" });

      stats.mcp_requests += 1;
      stats.last_headers = { ...req.headers };
      let parsed;
      if (req.method === "POST") {
        const raw = await readBody(req);
        try {
          parsed = JSON.parse(raw);
          count(parsed);
        } catch {
          parsed = undefined; // the transport answers the parse error
        }
        if (mode === "http500") return json(res, 500, { error: "simulated upstream outage" });
        if (mode === "reset") {
          req.socket.destroy();
          return;
        }
        if (parsed === undefined) {
          return json(res, 400, { jsonrpc: "2.0", id: null, error: { code: ErrorCode.ParseError, message: "Parse error" } });
        }
      }

      const sid = req.headers["mcp-session-id"];
      if (typeof sid === "string") {
        const transport = sessions.get(sid);
        if (!transport) {
          return json(res, 404, { jsonrpc: "2.0", id: null, error: { code: -32001, message: "Session not found" } });
        }
        return await transport.handleRequest(req, res, parsed);
      }
      if (req.method === "POST" && isInitializeRequest(parsed)) {
        const transport = new StreamableHTTPServerTransport({
          sessionIdGenerator: () => randomUUID(),
          enableJsonResponse: mode === "json",
          onsessioninitialized: (id) => sessions.set(id, transport),
        });
        transport.onclose = () => {
          if (transport.sessionId) sessions.delete(transport.sessionId);
        };
        await newServer().connect(transport);
        return await transport.handleRequest(req, res, parsed);
      }
      if (req.method !== "POST") {
        return json(res, 400, { jsonrpc: "2.0", id: null, error: { code: -32000, message: "Bad Request: Mcp-Session-Id required" } });
      }
      // Stateless: one transport and server for this request only.
      const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: mode === "json" });
      const server = newServer();
      res.on("close", () => {
        transport.close().catch(() => {});
        server.close().catch(() => {});
      });
      await server.connect(transport);
      await transport.handleRequest(req, res, parsed);
    } catch (e) {
      process.stderr.write(`test upstream: ${e?.stack ?? e}\n`);
      if (!res.headersSent) json(res, 500, { error: String(e?.message ?? e) });
      else res.end();
    }
  });
  // Answers never time out on the server side: `slow` may take minutes.
  httpServer.requestTimeout = 0;
  httpServer.headersTimeout = 0;
  httpServer.keepAliveTimeout = 5_000;
  await new Promise((resolve) => httpServer.listen(port, "127.0.0.1", resolve));
  const { port: actual } = httpServer.address();
  process.stdout.write(`${JSON.stringify({ url: `http://127.0.0.1:${actual}/mcp`, sse_url: `http://127.0.0.1:${actual}/sse` })}\n`);
  const stop = () => {
    httpServer.close();
    httpServer.closeAllConnections?.();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}
