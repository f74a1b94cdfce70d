// A real MCP server for the /mcp/<upstream> tests (contract 3.12), built with the official SDK
// (@modelcontextprotocol/sdk: low-level Server + StreamableHTTPServerTransport on node:http, and the
// deprecated SSEServerTransport for legacy HTTP+SSE upstreams, contract 3.12 transport "sse"). It
// runs in Node, started by test/upstream-global-setup.mjs; the gateway under test (in workerd)
// reaches it over the network, as it would reach a publisher's server. Used only by the tests.
//
// URLs: /t/<tag>/<mode>/mcp, where <tag> keeps one test's counters apart from the others' (tests
// run in parallel) and <mode> is how the server answers:
//   sse      stateless, answers as an event stream (progress notifications go on it)
//   json     stateless, answers application/json
//   session  stateful (Mcp-Session-Id), event streams
//   http500  every request → 500
//   reset    every request → the connection is destroyed
//   cutoff   an event stream that ends before the response
//   bigjson, bigsse   an answer larger than the gateway reads (5 MiB): JSON, or one event
//   spoof     an event stream of decoys (not JSON, a response with the id 1, a message with the
//             request's id and both `method` and `result`, a batch), a notification, then the real response
//   spoofcut  the same decoys and notification, then the stream ends (no real response)
//   spoofjson a JSON answer with the id 1 (not the request's id)
//   getreplay GET → an event stream of a notification and responses (as a resumed stream replays them)
// Legacy HTTP+SSE (MCP 2024-11-05): GET /t/<tag>/<mode>/sse opens a session (the SDK's
// SSEServerTransport: an `endpoint` event naming /t/<tag>/<mode>/messages?sessionId=…, then the
// session's messages), POST /t/<tag>/<mode>/messages?sessionId=… sends it one message (202). <mode>:
//   ok        the SDK's server, as it is
//   http500   a POST of a tools/call → 500 (the GET and the handshake work)
//   reset     every POST → the connection is destroyed
//   cutoff    the session's stream ends as soon as a tools/call is accepted (no response)
//   foreign   the endpoint event names another origin (http://localhost:<port>/…)
//   noendpoint  the stream sends a message event but no endpoint event, then ends
// GET /stats/<tag> → { requests, calls: {tool: n}, authorization: n (requests that carried one), tokens: [...],
//   bodies: [the JSON-RPC messages POSTed], last_event_ids: [Last-Event-ID headers received],
//   sessions: [per legacy session, in order: the `method` of each message POSTed to it ("response" for a response)],
//   open_sessions: n (legacy sessions whose event stream is still open) }.
// Tools: forecast, alerts, echo, fail (JSON-RPC error), tool_error (isError), slow {ms},
// progress {steps, interval_ms} (progress notifications, then the answer), whoami (the headers it got).
import http from "node:http";
import { Server } from "@modelcontextprotocol/sdk/server/index.js";
import { SSEServerTransport } from "@modelcontextprotocol/sdk/server/sse.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { CallToolRequestSchema, ListToolsRequestSchema, McpError, ErrorCode } from "@modelcontextprotocol/sdk/types.js";

const OBJ = (properties = {}) => ({ type: "object", properties });
const TOOLS = [
  { name: "forecast", description: "Weather forecast", inputSchema: OBJ({ city: { type: "string" } }), _meta: { "acme.example/tier": "gold" } },
  { name: "alerts", description: "Weather alerts", inputSchema: OBJ() },
  { name: "echo", description: "Echo", inputSchema: OBJ({ message: { type: "string" } }) },
  { name: "fail", description: "Always a JSON-RPC error", inputSchema: OBJ() },
  { name: "tool_error", description: "Always isError", inputSchema: OBJ() },
  { name: "slow", description: "Answers after ms", inputSchema: OBJ({ ms: { type: "number" } }) },
  { name: "progress", description: "Progress notifications, then the answer", inputSchema: OBJ({ steps: { type: "number" }, interval_ms: { type: "number" } }) },
  { name: "whoami", description: "The request headers this server got", inputSchema: OBJ() },
];

const sleep = (ms) => new Promise((res) => setTimeout(res, ms));
const text = (t) => ({ content: [{ type: "text", text: t }] });

function statsFor(stats, tag) {
  let s = stats.get(tag);
  if (!s) {
    s = { requests: 0, calls: {}, authorization: 0, tokens: [], bodies: [], last_event_ids: [], sessions: [], open_sessions: 0 };
    stats.set(tag, s);
  }
  return s;
}

function mcpServer(tagStats) {
  const server = new Server({ name: "test-upstream", version: "1.0.0" }, { capabilities: { tools: {} } });
  server.setRequestHandler(ListToolsRequestSchema, async () => ({ tools: TOOLS }));
  server.setRequestHandler(CallToolRequestSchema, async (req, extra) => {
    const { name } = req.params;
    const args = req.params.arguments ?? {};
    tagStats.calls[name] = (tagStats.calls[name] ?? 0) + 1;
    switch (name) {
      case "forecast":
        return { ...text(`sunny in ${args.city ?? "nowhere"}`), structuredContent: { city: args.city ?? null, sky: "sunny" } };
      case "alerts":
        return text("no alerts");
      case "echo":
        return text(String(args.message ?? ""));
      case "fail":
        throw new McpError(ErrorCode.InternalError, "the tool failed");
      case "tool_error":
        return { ...text("bad city"), isError: true };
      case "slow":
        await sleep(Number(args.ms ?? 1000));
        return text("finally");
      case "progress": {
        const steps = Number(args.steps ?? 3);
        const token = req.params._meta?.progressToken;
        for (let i = 1; i <= steps; i++) {
          await sleep(Number(args.interval_ms ?? 200));
          if (token !== undefined) await extra.sendNotification({ method: "notifications/progress", params: { progressToken: token, progress: i, total: steps } });
        }
        return text("done");
      }
      case "whoami": {
        const h = extra.requestInfo?.headers ?? {};
        const pick = (k) => (h[k] === undefined ? null : String(h[k]));
        return { ...text("headers"), structuredContent: { authorization: pick("authorization"), cookie: pick("cookie"), x_upstream_token: pick("x-upstream-token"), x_admin_key: pick("x-admin-key") } };
      }
      default:
        throw new McpError(ErrorCode.InvalidParams, `Unknown tool: ${name}`);
    }
  });
  return server;
}

/** Starts the server on 127.0.0.1:`port` (0: a free port); resolves to { url, close }. */
export async function startUpstream(port = 0) {
  const stats = new Map();
  const sessions = new Map();
  /** Legacy HTTP+SSE sessions: sessionId → { transport, res (the GET), methods (the stats' list) }. */
  const legacy = new Map();
  const httpServer = http.createServer(async (req, res) => {
    try {
      const url = new URL(req.url ?? "/", "http://localhost");
      const statsMatch = /^\/stats\/([^/]+)$/.exec(url.pathname);
      if (statsMatch) {
        res.writeHead(200, { "Content-Type": "application/json" });
        res.end(JSON.stringify(statsFor(stats, statsMatch[1])));
        return;
      }
      const m = /^\/t\/([^/]+)\/([a-z0-9]+)\/(mcp|sse|messages)$/.exec(url.pathname);
      if (!m) {
        res.writeHead(404).end();
        return;
      }
      const [, tag, mode, kind] = m;
      const s = statsFor(stats, tag);
      s.requests += 1;
      if (req.headers.authorization !== undefined) s.authorization += 1;
      if (req.headers["x-upstream-token"] !== undefined) s.tokens.push(String(req.headers["x-upstream-token"]));
      if (req.headers["last-event-id"] !== undefined) s.last_event_ids.push(String(req.headers["last-event-id"]));
      let body;
      if (req.method === "POST") {
        const chunks = [];
        for await (const c of req) chunks.push(c);
        try {
          body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
        } catch {
          body = undefined;
        }
        s.bodies.push(body ?? null);
      }
      if (kind !== "mcp") {
        await legacyRequest(req, res, { tag, mode, kind, s, body, sessionId: url.searchParams.get("sessionId") });
        return;
      }
      if (mode === "http500") {
        res.writeHead(500, { "Content-Type": "text/plain" }).end("upstream exploded");
        return;
      }
      if (mode === "reset") {
        req.socket.destroy();
        return;
      }
      if (mode === "cutoff") {
        res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
        res.write(`event: message\ndata: ${JSON.stringify({ jsonrpc: "2.0", method: "notifications/message", params: { level: "info", data: "about to fall over" } })}\n\n`);
        setTimeout(() => res.end(), 50);
        return;
      }
      if (mode === "spoof" || mode === "spoofcut") {
        const id = body?.id;
        const ev = (msg) => `event: message\ndata: ${typeof msg === "string" ? msg : JSON.stringify(msg)}\n\n`;
        const stolen = { content: [{ type: "text", text: "stolen" }] };
        res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
        res.write(ev("not json {"));
        res.write(ev({ jsonrpc: "2.0", id: 1, result: stolen }));
        res.write(ev({ jsonrpc: "2.0", id, method: "notifications/message", result: stolen }));
        res.write(ev([{ jsonrpc: "2.0", id, result: stolen }]));
        res.write(ev({ jsonrpc: "2.0", method: "notifications/message", params: { level: "info", data: "working" } }));
        if (mode === "spoof") res.write(ev({ jsonrpc: "2.0", id, result: { content: [{ type: "text", text: "real" }] } }));
        setTimeout(() => res.end(), 50);
        return;
      }
      if (mode === "spoofjson") {
        res.writeHead(200, { "Content-Type": "application/json" });
        res.end(JSON.stringify({ jsonrpc: "2.0", id: 1, result: { content: [{ type: "text", text: "stolen" }] } }));
        return;
      }
      if (mode === "getreplay") {
        const ev = (msg) => `id: e${Math.random()}\nevent: message\ndata: ${JSON.stringify(msg)}\n\n`;
        res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
        res.write(ev({ jsonrpc: "2.0", id: "mcpay-old", result: { content: [{ type: "text", text: "stolen" }] } }));
        res.write(ev({ jsonrpc: "2.0", method: "notifications/message", params: { level: "info", data: "hello" } }));
        res.write(ev({ jsonrpc: "2.0", id: 1, error: { code: -32603, message: "stolen" } }));
        res.write(ev([{ jsonrpc: "2.0", id: 2, result: {} }]));
        setTimeout(() => res.end(), 50);
        return;
      }
      if (mode === "bigjson" || mode === "bigsse") {
        const pad = "x".repeat(5 * 1024 * 1024);
        const sse = mode === "bigsse";
        const msg = JSON.stringify({ jsonrpc: "2.0", id: 1, result: { content: [{ type: "text", text: pad }] } });
        res.writeHead(200, { "Content-Type": sse ? "text/event-stream" : "application/json" });
        res.end(sse ? `event: message\ndata: ${msg}\n\n` : msg);
        return;
      }
      if (mode === "session") {
        const sid = req.headers["mcp-session-id"];
        let transport = typeof sid === "string" ? sessions.get(sid) : undefined;
        if (transport === undefined) {
          if (typeof sid === "string") {
            res.writeHead(404, { "Content-Type": "application/json" }).end(JSON.stringify({ jsonrpc: "2.0", error: { code: -32001, message: "Session not found" }, id: null }));
            return;
          }
          transport = new StreamableHTTPServerTransport({ sessionIdGenerator: () => crypto.randomUUID(), onsessioninitialized: (id) => sessions.set(id, transport) });
          await mcpServer(s).connect(transport);
        }
        await transport.handleRequest(req, res, body);
        return;
      }
      if (mode !== "sse" && mode !== "json") {
        res.writeHead(404).end();
        return;
      }
      // Stateless: a fresh server and transport per request.
      const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: mode === "json" });
      const server = mcpServer(s);
      res.on("close", () => {
        void transport.close();
        void server.close();
      });
      await server.connect(transport);
      await transport.handleRequest(req, res, body);
    } catch (err) {
      if (!res.headersSent) res.writeHead(500).end(String(err));
    }
  });

  /** The legacy HTTP+SSE transport: GET …/sse opens a session, POST …/messages?sessionId=… feeds it. */
  async function legacyRequest(req, res, { tag, mode, kind, s, body, sessionId }) {
    const messages = `/t/${tag}/${mode}/messages`;
    if (kind === "sse" && req.method === "GET") {
      res.on("error", () => {});
      if (mode === "foreign") {
        res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
        res.write(`event: endpoint\ndata: http://localhost:${httpServer.address().port}${messages}?sessionId=elsewhere\n\n`);
        return;
      }
      if (mode === "noendpoint") {
        res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
        res.write(`event: message\ndata: ${JSON.stringify({ jsonrpc: "2.0", method: "notifications/message", params: { level: "info", data: "hello" } })}\n\n`);
        setTimeout(() => res.end(), 50);
        return;
      }
      const transport = new SSEServerTransport(messages, res);
      const methods = [];
      s.sessions.push(methods);
      const server = mcpServer(s);
      legacy.set(transport.sessionId, { transport, res, methods });
      s.open_sessions += 1;
      res.on("close", () => {
        s.open_sessions -= 1;
        legacy.delete(transport.sessionId);
        void server.close();
      });
      await server.connect(transport);
      return;
    }
    if (kind !== "messages" || req.method !== "POST") {
      res.writeHead(405).end();
      return;
    }
    const session = legacy.get(sessionId ?? "");
    if (session === undefined) {
      res.writeHead(404, { "Content-Type": "text/plain" }).end("Session not found");
      return;
    }
    session.methods.push(typeof body?.method === "string" ? body.method : "response");
    if (mode === "http500" && body?.method === "tools/call") {
      res.writeHead(500, { "Content-Type": "text/plain" }).end("upstream exploded");
      return;
    }
    if (mode === "reset") {
      req.socket.destroy();
      return;
    }
    if (mode === "cutoff" && body?.method === "tools/call") {
      res.writeHead(202).end("Accepted");
      setTimeout(() => session.res.end(), 50);
      return;
    }
    await session.transport.handlePostMessage(req, res, body);
  }

  await new Promise((resolve) => httpServer.listen(port, "127.0.0.1", resolve));
  const address = httpServer.address();
  return {
    url: `http://127.0.0.1:${address.port}`,
    close: () =>
      new Promise((resolve) => {
        httpServer.closeAllConnections?.();
        httpServer.close(() => resolve());
      }),
  };
}
