// /mcp/<upstream> (contract 3.12) against a REAL upstream MCP server (test/upstream-server.mjs, the
// official SDK on node:http, started by test/upstream-global-setup.mjs; its URL reaches the worker
// through the env var UPSTREAM_TESTUP_URL). The gateway is built with a test upstream table (the
// project's mcpay.toml may have no upstream), and every case counts the money: balances, ledger rows,
// and the calls the upstream really received. The same server also speaks the legacy HTTP+SSE
// transport (the SDK's SSEServerTransport), bridged by the gateway for transport = "sse".
import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { beforeAll, describe, expect, it, vi } from "vitest";
import { createApp, type App } from "../src/app";
import { HANDLERS } from "../src/generated/handlers";
import { GATEWAY, UPSTREAMS, type UpstreamConfig } from "../src/generated/manifest";
import type { AppEnv } from "../src/lib/env";
import type { KeyDO } from "../src/lib/key-do";
import { sha256Hex } from "../src/lib/keys";
import { toolPrice } from "../src/lib/proxy";
import { BASE, SCOPE, getLedger, getMe, seedKey, testEnv } from "./helpers";

const NAME = "testup";
const PATH = `/mcp/${NAME}`;
const DEFAULT_PRICE = 100;
const FORECAST = 250;
const TOKEN = "test-upstream-token-0123456789";
const vars = testEnv as unknown as Record<string, string>;

function upstream(over: Partial<UpstreamConfig> = {}): UpstreamConfig {
  return {
    name: NAME,
    transport: "http",
    url: "",
    urlEnv: "UPSTREAM_TESTUP_URL",
    priceMcents: DEFAULT_PRICE,
    tools: [["forecast", FORECAST], ["alerts", 0], ["whoami", 0]],
    scope: SCOPE,
    timeoutMs: 3000,
    rateLimitPerMinute: 60,
    headers: [["X-Upstream-Token", "UPSTREAM_TESTUP_TOKEN"]],
    enabled: true,
    refundToolErrors: false,
    description: "the test upstream",
    ...over,
  };
}

const app = createApp(HANDLERS, { upstreams: [upstream()] });

/** The upstream's base URL, as the worker got it (vitest.config.mts). */
function upstreamBase(): string {
  const u = new URL(vars.UPSTREAM_TESTUP_URL!);
  return `${u.protocol}//${u.host}`;
}

/**
 * An environment whose UPSTREAM_TESTUP_URL points at the test server in `mode`, counted under its
 * own tag: its Streamable HTTP endpoint (`mcp`), or the event stream of its legacy HTTP+SSE one (`sse`).
 */
function envFor(mode: string, tag: string = crypto.randomUUID(), kind: "mcp" | "sse" = "mcp"): { env: AppEnv; tag: string } {
  return { env: { ...testEnv, UPSTREAM_TESTUP_URL: `${upstreamBase()}/t/${tag}/${mode}/${kind}` } as AppEnv, tag };
}

interface Stats {
  requests: number;
  calls: Record<string, number>;
  authorization: number;
  tokens: string[];
  bodies: any[];
  last_event_ids: string[];
  /** Per legacy HTTP+SSE session: the method of each message posted to it. */
  sessions: string[][];
  open_sessions: number;
}

async function stats(tag: string): Promise<Stats> {
  return (await (await fetch(`${upstreamBase()}/stats/${tag}`)).json()) as Stats;
}

async function send(env: AppEnv, init: RequestInit, a: App = app, path = PATH): Promise<{ res: Response; ctx: ExecutionContext }> {
  const ctx = createExecutionContext();
  const res = await a.fetch(new Request(BASE + path, init), env, ctx);
  return { res, ctx };
}

function rpcInit(key: string | null, body: unknown, headers: Record<string, string> = {}): RequestInit {
  return {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Accept: "application/json, text/event-stream",
      ...(key !== null ? { Authorization: `Bearer ${key}` } : {}),
      ...headers,
    },
    body: typeof body === "string" ? body : JSON.stringify(body),
  };
}

function toolsCall(name: string, args: Record<string, unknown> = {}, meta?: Record<string, unknown>, id: number | string = 1) {
  return { jsonrpc: "2.0", id, method: "tools/call", params: { name, arguments: args, ...(meta ? { _meta: meta } : {}) } };
}

type Msg = { jsonrpc: string; id?: unknown; method?: string; params?: any; result?: any; error?: any };

/** The JSON-RPC messages of an answer (JSON or event stream), read whole; then the settlement is awaited. */
async function messages(res: Response, ctx: ExecutionContext): Promise<Msg[]> {
  const type = res.headers.get("Content-Type") ?? "";
  const text = await res.text();
  await waitOnExecutionContext(ctx);
  if (type.startsWith("text/event-stream")) return sseData(text).map((d) => JSON.parse(d) as Msg);
  return [JSON.parse(text) as Msg];
}

function sseData(text: string): string[] {
  return text
    .split(/\r\n\r\n|\n\n|\r\r/)
    .map((ev) => ev.split(/\r\n|\n|\r/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n"))
    .filter((d) => d !== "");
}

async function rpc(env: AppEnv, key: string | null, body: unknown, a: App = app): Promise<{ res: Response; msgs: Msg[] }> {
  const { res, ctx } = await send(env, rpcInit(key, body), a);
  return { res, msgs: await messages(res, ctx) };
}

function last(msgs: Msg[]): Msg {
  return msgs[msgs.length - 1]!;
}

/** An event stream's messages with the time (ms since `started`) each one arrived; then the settlement is awaited. */
async function timedMessages(res: Response, ctx: ExecutionContext, started: number): Promise<{ at: number; msg: Msg }[]> {
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  const seen: { at: number; msg: Msg }[] = [];
  let buf = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buf += value;
    const parts = buf.split("\n\n");
    buf = parts.pop()!;
    for (const p of parts) for (const d of sseData(`${p}\n\n`)) seen.push({ at: Date.now() - started, msg: JSON.parse(d) as Msg });
  }
  await waitOnExecutionContext(ctx);
  return seen;
}

beforeAll(() => {
  // Upstream failures are logged with console.error; keep the output quiet.
  vi.spyOn(console, "error").mockImplementation(() => {});
});

/** The official MCP client (Streamable HTTP) connected to /mcp/<upstream> of `gateway`, with `key`. */
async function connectClient(gateway: typeof app, env: AppEnv, key: string): Promise<{ transport: StreamableHTTPClientTransport; client: Client }> {
  const transport = new StreamableHTTPClientTransport(new URL(BASE + PATH), {
    requestInit: { headers: { Authorization: `Bearer ${key}` } },
    fetch: async (url, init) => {
      const ctx = createExecutionContext();
      const res = await gateway.fetch(new Request(url, init), env, ctx);
      void waitOnExecutionContext(ctx);
      return res;
    },
  });
  const client = new Client({ name: "proxy-test", version: "0" });
  await client.connect(transport);
  return { transport, client };
}

describe("/mcp/<upstream>: paid tools/call", () => {
  for (const mode of ["json", "sse"]) {
    it(`${mode}: a priced tool is charged exactly its price: hold + capture named <NAME>/<tool>, terms in _meta and headers`, async () => {
      const { env, tag } = envFor(mode);
      const { key } = await seedKey({ balance: 1000 });
      const { res, msgs } = await rpc(env, key, toolsCall("forecast", { city: "Oslo" }));
      expect(res.status).toBe(200);
      const rid = res.headers.get("X-Request-Id")!;
      expect(rid).toMatch(/^[0-9a-f-]{36}$/);
      expect(res.headers.get("X-Charged-Mcents")).toBe(String(FORECAST));
      expect(res.headers.get("X-Balance-Mcents")).toBe(String(1000 - FORECAST));
      expect(Number(res.headers.get("X-Upstream-Duration-Ms"))).toBeGreaterThanOrEqual(0);
      expect(res.headers.get("Access-Control-Allow-Origin")).toBe("*");
      const answer = last(msgs);
      expect(answer.id).toBe(1);
      expect(answer.result.structuredContent).toEqual({ city: "Oslo", sky: "sunny" });
      expect(answer.result._meta).toEqual({ "io.mcpay/charged_mcents": FORECAST, "io.mcpay/balance_mcents": 1000 - FORECAST, "io.mcpay/request_id": rid });
      expect((await getMe(key)).balance_mcents).toBe(1000 - FORECAST);
      const ledger = await getLedger(key);
      expect(ledger.map((e) => [e.kind, e.endpoint, e.amount_mcents, e.request_id])).toEqual([
        ["capture", `${NAME}/forecast`, 0, rid],
        ["hold", `${NAME}/forecast`, -FORECAST, rid],
        ["mint", null, 1000, expect.any(String)],
      ]);
      expect((await stats(tag)).calls).toEqual({ forecast: 1 });
    });
  }

  it("a free tool (price 0) is forwarded without a hold or a ledger row", async () => {
    const { env, tag } = envFor("json");
    const { key } = await seedKey({ balance: 1000 });
    const { res, msgs } = await rpc(env, key, toolsCall("alerts"));
    expect(res.status).toBe(200);
    expect(last(msgs).result.content[0].text).toBe("no alerts");
    expect(res.headers.get("X-Charged-Mcents")).toBeNull();
    expect((await getMe(key)).balance_mcents).toBe(1000);
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["mint"]);
    expect((await stats(tag)).calls).toEqual({ alerts: 1 });
  });

  it("a tool not in the table costs the upstream's default price", async () => {
    const { env } = envFor("json");
    const { key } = await seedKey({ balance: 1000 });
    const { msgs } = await rpc(env, key, toolsCall("echo", { message: "hi" }));
    expect(last(msgs).result.content[0].text).toBe("hi");
    expect(last(msgs).result._meta["io.mcpay/charged_mcents"]).toBe(DEFAULT_PRICE);
    expect((await getMe(key)).balance_mcents).toBe(1000 - DEFAULT_PRICE);
    expect((await getLedger(key)).filter((e) => e.kind === "hold").map((e) => [e.endpoint, e.amount_mcents])).toEqual([[`${NAME}/echo`, -DEFAULT_PRICE]]);
  });

  it("a balance below the price → JSON-RPC -32002 with the request's id, nothing forwarded or written", async () => {
    const { env, tag } = envFor("json");
    const { key } = await seedKey({ balance: FORECAST - 1 });
    const { res, msgs } = await rpc(env, key, toolsCall("forecast", {}, undefined, "abc"));
    expect(res.status).toBe(200);
    expect(last(msgs)).toMatchObject({ id: "abc", error: { code: -32002, data: { code: "insufficient_balance", price_mcents: FORECAST, balance_mcents: FORECAST - 1, note: "no charge applied" } } });
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["mint"]);
    expect((await stats(tag)).requests).toBe(0);
  });

  it("the upstream's rate limit counts per key across its tools → -32004, nothing forwarded", async () => {
    const limited = createApp(HANDLERS, { upstreams: [upstream({ rateLimitPerMinute: 2 })] });
    const { env, tag } = envFor("json");
    const { key } = await seedKey({ balance: 10_000 });
    expect(last((await rpc(env, key, toolsCall("forecast"), limited)).msgs).result).toBeDefined();
    expect(last((await rpc(env, key, toolsCall("echo"), limited)).msgs).result).toBeDefined();
    const third = last((await rpc(env, key, toolsCall("forecast"), limited)).msgs);
    expect(third.error).toMatchObject({ code: -32004, data: { code: "rate_limited" } });
    expect((await stats(tag)).calls).toEqual({ forecast: 1, echo: 1 });
    expect((await getMe(key)).balance_mcents).toBe(10_000 - FORECAST - DEFAULT_PRICE);
  });
});

describe("/mcp/<upstream>: failures are released (the gateway's side, never capped)", () => {
  async function expectReleased(key: string, rid: string, tool: string, price: number, balance: number) {
    const me = await getMe(key);
    expect(me.balance_mcents).toBe(balance);
    const rows = (await getLedger(key)).filter((e) => e.request_id === rid);
    expect(rows.map((e) => [e.kind, e.endpoint, e.amount_mcents])).toEqual([
      ["release", `${NAME}/${tool}`, price],
      ["hold", `${NAME}/${tool}`, -price],
    ]);
  }

  it("upstream 500 → 502 upstream_failed, released; more failures than the refund cap are all released", async () => {
    const { env, tag } = envFor("http500");
    const { key } = await seedKey({ balance: 1000 });
    const n = GATEWAY.refundsPerKeyPerHour + 2;
    for (let i = 0; i < n; i++) {
      const { res, ctx } = await send(env, rpcInit(key, toolsCall("forecast")));
      const body = (await res.json()) as Record<string, any>;
      await waitOnExecutionContext(ctx);
      expect(res.status).toBe(502);
      expect(body).toMatchObject({ ok: false, error: { code: "upstream_failed" }, refunded: true, charged_mcents: 0, balance_mcents: 1000 });
      expect(body.request_id).toBe(res.headers.get("X-Request-Id"));
      expect(res.headers.get("X-Charged-Mcents")).toBe("0");
      expect(res.headers.get("X-Balance-Mcents")).toBe("1000");
      await expectReleased(key, body.request_id, "forecast", FORECAST, 1000);
    }
    expect((await getMe(key)).refunded_mcents).toBe(n * FORECAST);
    expect((await stats(tag)).requests).toBe(n);
  });

  it("connection reset → 502 upstream_failed, released", async () => {
    const { env, tag } = envFor("reset");
    const { key } = await seedKey({ balance: 1000 });
    const { res, ctx } = await send(env, rpcInit(key, toolsCall("echo")));
    const body = (await res.json()) as Record<string, any>;
    await waitOnExecutionContext(ctx);
    expect(res.status).toBe(502);
    expect(body).toMatchObject({ error: { code: "upstream_failed" }, refunded: true, charged_mcents: 0 });
    expect(Number(res.headers.get("X-Upstream-Duration-Ms"))).toBeGreaterThanOrEqual(0);
    await expectReleased(key, body.request_id, "echo", DEFAULT_PRICE, 1000);
    expect((await stats(tag)).requests).toBe(1);
  });

  it("slow past the timeout (JSON answer) → 504 upstream_timeout, released", async () => {
    const quick = createApp(HANDLERS, { upstreams: [upstream({ timeoutMs: 400 })] });
    const { env } = envFor("json");
    const { key } = await seedKey({ balance: 1000 });
    const started = Date.now();
    const { res, ctx } = await send(env, rpcInit(key, toolsCall("slow", { ms: 3000 })), quick);
    const body = (await res.json()) as Record<string, any>;
    await waitOnExecutionContext(ctx);
    expect(Date.now() - started).toBeLessThan(2500);
    expect(res.status).toBe(504);
    expect(body).toMatchObject({ error: { code: "upstream_timeout" }, refunded: true, charged_mcents: 0, balance_mcents: 1000 });
    await expectReleased(key, body.request_id, "slow", DEFAULT_PRICE, 1000);
  });

  it("slow past the timeout (event stream) → a final isError result with upstream_timeout, released", async () => {
    const quick = createApp(HANDLERS, { upstreams: [upstream({ timeoutMs: 400 })] });
    const { env } = envFor("sse");
    const { key } = await seedKey({ balance: 1000 });
    const { res, msgs } = await rpc(env, key, toolsCall("slow", { ms: 3000 }, undefined, 7), quick);
    expect(res.status).toBe(200);
    const answer = last(msgs);
    expect(answer.id).toBe(7);
    expect(answer.result.isError).toBe(true);
    expect(answer.result.structuredContent).toMatchObject({ error: { code: "upstream_timeout" }, refunded: true, charged_mcents: 0, balance_mcents: 1000 });
    expect(answer.result._meta).toMatchObject({ "io.mcpay/refunded": true, "io.mcpay/charged_mcents": 0 });
    await expectReleased(key, res.headers.get("X-Request-Id")!, "slow", DEFAULT_PRICE, 1000);
  });

  it("an event stream that ends before the response → released, with a final isError result", async () => {
    const { env } = envFor("cutoff");
    const { key } = await seedKey({ balance: 1000 });
    const { msgs, res } = await rpc(env, key, toolsCall("forecast"));
    expect(msgs[0]!.method).toBe("notifications/message");
    expect(last(msgs).result).toMatchObject({ isError: true, structuredContent: { error: { code: "upstream_failed" }, refunded: true } });
    await expectReleased(key, res.headers.get("X-Request-Id")!, "forecast", FORECAST, 1000);
  });

  it("an answer larger than 4 MiB (JSON, or one event) → released", async () => {
    const { key } = await seedKey({ balance: 1000 });
    const json = await send(envFor("bigjson").env, rpcInit(key, toolsCall("forecast")));
    const body = (await json.res.json()) as Record<string, any>;
    await waitOnExecutionContext(json.ctx);
    expect([json.res.status, body.error.code, body.refunded]).toEqual([502, "upstream_failed", true]);
    await expectReleased(key, body.request_id, "forecast", FORECAST, 1000);
    const sse = await send(envFor("bigsse").env, rpcInit(key, toolsCall("forecast")));
    const msgs = await messages(sse.res, sse.ctx);
    expect(last(msgs).result).toMatchObject({ isError: true, structuredContent: { error: { code: "upstream_failed" }, refunded: true } });
    expect((await getMe(key)).balance_mcents).toBe(1000);
  });

  for (const mode of ["json", "sse"]) {
    it(`${mode}: a JSON-RPC error → the upstream's answer, released`, async () => {
      const { env, tag } = envFor(mode);
      const { key } = await seedKey({ balance: 1000 });
      const { res, msgs } = await rpc(env, key, toolsCall("fail"));
      expect(res.status).toBe(200);
      expect(last(msgs).error).toMatchObject({ code: -32603, message: expect.stringContaining("the tool failed") });
      if (mode === "json") expect(res.headers.get("X-Charged-Mcents")).toBe("0");
      await expectReleased(key, res.headers.get("X-Request-Id")!, "fail", DEFAULT_PRICE, 1000);
      expect((await stats(tag)).calls).toEqual({ fail: 1 });
    });
  }

  it("isError: true is charged by default, and released with refund_tool_errors", async () => {
    const { env } = envFor("json");
    const { key } = await seedKey({ balance: 1000 });
    const charged = await rpc(env, key, toolsCall("tool_error"));
    expect(last(charged.msgs).result).toMatchObject({ isError: true, _meta: { "io.mcpay/charged_mcents": DEFAULT_PRICE } });
    expect((await getMe(key)).balance_mcents).toBe(1000 - DEFAULT_PRICE);

    const refunding = createApp(HANDLERS, { upstreams: [upstream({ refundToolErrors: true })] });
    const released = await rpc(env, key, toolsCall("tool_error"), refunding);
    expect(last(released.msgs).result).toMatchObject({ isError: true, _meta: { "io.mcpay/charged_mcents": 0, "io.mcpay/refunded": true } });
    await expectReleased(key, released.res.headers.get("X-Request-Id")!, "tool_error", DEFAULT_PRICE, 1000 - DEFAULT_PRICE);
  });

  it("a caller that goes away mid-stream: the gateway still reads the answer and settles (captured)", async () => {
    const { env, tag } = envFor("sse");
    const { key } = await seedKey({ balance: 1000 });
    const { res, ctx } = await send(env, rpcInit(key, toolsCall("slow", { ms: 300 })));
    expect(res.status).toBe(200);
    await res.body!.cancel();
    await waitOnExecutionContext(ctx);
    const rid = res.headers.get("X-Request-Id")!;
    expect((await getLedger(key)).filter((e) => e.request_id === rid).map((e) => e.kind)).toEqual(["capture", "hold"]);
    expect((await getMe(key)).balance_mcents).toBe(1000 - DEFAULT_PRICE);
    expect((await stats(tag)).calls).toEqual({ slow: 1 });
  });
});

describe("/mcp/<upstream>: streaming and discovery", () => {
  it("progress notifications reach the caller as they happen, before the upstream answers", async () => {
    const { env } = envFor("sse");
    const { key } = await seedKey({ balance: 1000 });
    const started = Date.now();
    const { res, ctx } = await send(env, rpcInit(key, toolsCall("progress", { steps: 3, interval_ms: 300 }, { progressToken: "p1" })));
    expect(res.headers.get("Content-Type")).toMatch(/^text\/event-stream/);
    const seen = await timedMessages(res, ctx, started);
    const progress = seen.filter((s) => s.msg.method === "notifications/progress");
    const answer = seen.find((s) => s.msg.id === 1)!;
    expect(progress.map((s) => s.msg.params.progress)).toEqual([1, 2, 3]);
    // The first notification arrived well before the answer (~600 ms later), not buffered with it.
    expect(answer.at - progress[0]!.at).toBeGreaterThanOrEqual(400);
    expect(answer.msg.result._meta["io.mcpay/charged_mcents"]).toBe(DEFAULT_PRICE);
    expect((await getMe(key)).balance_mcents).toBe(1000 - DEFAULT_PRICE);
  });

  for (const mode of ["json", "sse"]) {
    it(`${mode}: tools/list is free and carries each tool's price and scope in _meta (the upstream's own keys kept)`, async () => {
      const { env } = envFor(mode);
      const { key } = await seedKey({ balance: 1000 });
      const { res, msgs } = await rpc(env, key, { jsonrpc: "2.0", id: 3, method: "tools/list" });
      expect(res.status).toBe(200);
      const tools = last(msgs).result.tools as { name: string; _meta: Record<string, unknown> }[];
      const meta = Object.fromEntries(tools.map((t) => [t.name, t._meta]));
      expect(meta.forecast).toEqual({ "acme.example/tier": "gold", "io.mcpay/price_mcents": FORECAST, "io.mcpay/scope": SCOPE });
      expect(meta.alerts).toEqual({ "io.mcpay/price_mcents": 0, "io.mcpay/scope": SCOPE });
      expect(meta.echo).toEqual({ "io.mcpay/price_mcents": DEFAULT_PRICE, "io.mcpay/scope": SCOPE });
      expect((await getLedger(key)).map((e) => e.kind)).toEqual(["mint"]);
    });
  }

  it("the official MCP client through the gateway: session id both ways, terms in tools/list, a paid call charged", async () => {
    const { env, tag } = envFor("session");
    const { key } = await seedKey({ balance: 1000 });
    const { transport, client } = await connectClient(app, env, key);
    expect(transport.sessionId).toMatch(/^[0-9a-f-]{36}$/);
    const { tools } = await client.listTools();
    expect(tools.find((t) => t.name === "forecast")?._meta?.["io.mcpay/price_mcents"]).toBe(FORECAST);
    const result = await client.callTool({ name: "forecast", arguments: { city: "Lima" } });
    expect(result.structuredContent).toEqual({ city: "Lima", sky: "sunny" });
    expect(result._meta?.["io.mcpay/charged_mcents"]).toBe(FORECAST);
    await client.close();
    expect((await getMe(key)).balance_mcents).toBe(1000 - FORECAST);
    expect((await stats(tag)).calls).toEqual({ forecast: 1 });
  });
});

describe("/mcp/<upstream>: what reaches the upstream, and refusals before forwarding", () => {
  it("the caller's Authorization (and Cookie, X-Admin-Key) never reaches the upstream; the configured header does", async () => {
    const { env, tag } = envFor("json");
    const { key } = await seedKey({ balance: 1000 });
    const { res, ctx } = await send(env, rpcInit(key, toolsCall("whoami"), { Cookie: "session=secret", "X-Admin-Key": "admin-secret" }));
    const [answer] = await messages(res, ctx);
    expect(answer!.result.structuredContent).toEqual({ authorization: null, cookie: null, x_upstream_token: TOKEN, x_admin_key: null });
    // A paid call, a discovery request: never the caller's key either.
    await rpc(env, key, toolsCall("forecast"));
    await rpc(env, key, { jsonrpc: "2.0", id: 2, method: "tools/list" });
    const s = await stats(tag);
    expect(s.requests).toBe(3);
    expect(s.authorization).toBe(0);
    expect(s.tokens).toEqual([TOKEN, TOKEN, TOKEN]);
  });

  it("401 / 403 / 404 / 405 / 503 and bad bodies are answered before anything is forwarded or charged", async () => {
    const { env, tag } = envFor("json");
    const { key } = await seedKey({ balance: 1000 });
    const { key: noScope } = await seedKey({ balance: 1000, scopes: [] });
    const unknownKey = `${GATEWAY.keyPrefix}${"ab".repeat(32)}`;
    const status = async (init: RequestInit, a: App = app, path = PATH, e: AppEnv = env) => {
      const { res, ctx } = await send(e, init, a, path);
      const body = (await res.json()) as Record<string, any>;
      await waitOnExecutionContext(ctx);
      return { status: res.status, body, res };
    };
    const missing = await status(rpcInit(null, toolsCall("forecast")));
    expect([missing.status, missing.body.error.code]).toEqual([401, "missing_key"]);
    expect(missing.res.headers.get("WWW-Authenticate")).toMatch(/^Bearer realm=/);
    expect((await status(rpcInit("Bearer nope", toolsCall("forecast")))).status).toBe(401);
    const unknown = await status(rpcInit(unknownKey, toolsCall("forecast")));
    expect([unknown.status, unknown.body.error.code]).toEqual([401, "invalid_key"]);
    expect((await status(rpcInit(unknownKey, { jsonrpc: "2.0", id: 1, method: "tools/list" }))).status).toBe(401);
    for (const body of [toolsCall("forecast"), { jsonrpc: "2.0", id: 1, method: "tools/list" }]) {
      const denied = await status(rpcInit(noScope, body));
      expect([denied.status, denied.body.error.code, denied.body.required_scope]).toEqual([403, "scope_denied", SCOPE]);
    }
    const notFound = await status(rpcInit(key, toolsCall("forecast")), app, "/mcp/nope");
    expect([notFound.status, notFound.body.error.code]).toEqual([404, "not_found"]);
    const put = await status({ method: "PUT", headers: { Authorization: `Bearer ${key}` } });
    expect([put.status, put.res.headers.get("Allow")]).toEqual([405, "GET, POST, DELETE, OPTIONS"]);
    const paused = await status(rpcInit(key, toolsCall("forecast")), createApp(HANDLERS, { upstreams: [upstream({ enabled: false })] }));
    expect([paused.status, paused.body.error.code]).toEqual([503, "upstream_disabled"]);
    const noToken = { ...env, UPSTREAM_TESTUP_TOKEN: undefined } as unknown as AppEnv;
    const unconfigured = await status(rpcInit(key, toolsCall("forecast")), app, PATH, noToken);
    expect([unconfigured.status, unconfigured.body.error.code]).toEqual([503, "upstream_unavailable"]);
    const batch = await status(rpcInit(key, [toolsCall("forecast", {}, undefined, 1), toolsCall("echo", {}, undefined, 2)]));
    expect([batch.status, batch.body.error.code, batch.body.id]).toEqual([400, -32600, null]);
    for (const id of [1.5, null, true]) {
      const badId = await status(rpcInit(key, { ...toolsCall("forecast"), id }));
      expect([badId.status, badId.body.error.code]).toEqual([400, -32600]);
    }
    const badName = await status(rpcInit(key, toolsCall("")));
    expect([badName.status, badName.body.error.code, badName.body.error.data.code]).toEqual([200, -32602, "invalid_input"]);
    const parse = await status(rpcInit(key, "{not json"));
    expect([parse.status, parse.body.error.code]).toEqual([400, -32700]);
    const big = await status(rpcInit(key, JSON.stringify({ ...toolsCall("echo"), pad: "x".repeat(GATEWAY.maxBodyBytes) })));
    expect([big.status, big.body.error.code]).toEqual([413, "body_too_large"]);

    expect((await stats(tag)).requests).toBe(0);
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["mint"]);
    expect((await getMe(noScope)).balance_mcents).toBe(1000);
  });

  it("OPTIONS → 204 with the CORS of /mcp and the upstream route's methods, no key needed", async () => {
    const { env } = envFor("json");
    const { res } = await send(env, { method: "OPTIONS" });
    expect(res.status).toBe(204);
    expect(res.headers.get("Access-Control-Allow-Methods")).toBe("GET, POST, DELETE, OPTIONS");
    expect(res.headers.get("Access-Control-Allow-Headers")).toContain("Mcp-Session-Id");
    expect(res.headers.get("X-Request-Id")).toMatch(/^[0-9a-f-]{36}$/);
  });

  it("GET /v1/pricing lists the upstreams (contract 3.2)", async () => {
    const { res, ctx } = await send(testEnv, { method: "GET" }, app, "/v1/pricing");
    const body = (await res.json()) as { upstreams: unknown[] };
    await waitOnExecutionContext(ctx);
    expect(body.upstreams).toEqual([
      {
        name: NAME,
        path: PATH,
        price_mcents: DEFAULT_PRICE,
        scope: SCOPE,
        description: "the test upstream",
        rate_limit_per_minute: 60,
        enabled: true,
        refund_tool_errors: false,
        transport: "http",
        tools: { forecast: FORECAST, alerts: 0, whoami: 0 },
      },
    ]);
  });
});

describe("/mcp/<upstream>: a paid result never reaches the caller unbilled", () => {
  const rowsOf = async (key: string, rid: string) => (await getLedger(key)).filter((e) => e.request_id === rid).map((e) => [e.kind, e.amount_mcents]);

  it("the call is forwarded with the gateway's id (re-serialized, known keys only); the caller gets its own id back", async () => {
    const { env, tag } = envFor("json");
    const { key } = await seedKey({ balance: 1000 });
    const body = { ...toolsCall("forecast", { city: "Rome", extra: [1] }, { progressToken: "t" }, "caller-7"), extra_top: 1 };
    (body.params as Record<string, unknown>).extra_param = "x";
    const { res, msgs } = await rpc(env, key, body);
    const rid = res.headers.get("X-Request-Id")!;
    expect(last(msgs).id).toBe("caller-7");
    expect(last(msgs).result.structuredContent).toEqual({ city: "Rome", sky: "sunny" });
    expect((await stats(tag)).bodies).toEqual([
      { jsonrpc: "2.0", id: `mcpay-${rid}`, method: "tools/call", params: { name: "forecast", arguments: { city: "Rome", extra: [1] }, _meta: { progressToken: "t" } } },
    ]);
    expect(await rowsOf(key, rid)).toEqual([["capture", 0], ["hold", -FORECAST]]);
    // A caller's id may not look like the gateway's: refused, nothing forwarded or held.
    const { env: env2, tag: tag2 } = envFor("json");
    const spoofed = await rpc(env2, key, toolsCall("forecast", {}, undefined, `mcpay-${rid}`));
    expect([spoofed.res.status, last(spoofed.msgs).error.code]).toEqual([400, -32600]);
    expect((await stats(tag2)).requests).toBe(0);
    expect((await getMe(key)).balance_mcents).toBe(1000 - FORECAST);
  });

  it("event stream: decoys before the response (other ids, not JSON, `method` with a result, a batch) are dropped; notifications pass", async () => {
    const { env } = envFor("spoof");
    const { key } = await seedKey({ balance: 1000 });
    const { res, msgs } = await rpc(env, key, toolsCall("forecast"));
    const rid = res.headers.get("X-Request-Id")!;
    expect(msgs).toHaveLength(2);
    expect(msgs[0]).toEqual({ jsonrpc: "2.0", method: "notifications/message", params: { level: "info", data: "working" } });
    expect(msgs[1]!.id).toBe(1);
    expect(msgs[1]!.result.content[0].text).toBe("real");
    expect(msgs[1]!.result._meta["io.mcpay/charged_mcents"]).toBe(FORECAST);
    expect(await rowsOf(key, rid)).toEqual([["capture", 0], ["hold", -FORECAST]]);
  });

  it("event stream without the real response: no decoy reaches the caller, released", async () => {
    const { env } = envFor("spoofcut");
    const { key } = await seedKey({ balance: 1000 });
    const { res, msgs } = await rpc(env, key, toolsCall("forecast"));
    const rid = res.headers.get("X-Request-Id")!;
    expect(JSON.stringify(msgs)).not.toContain("stolen");
    expect(msgs.map((m) => m.method ?? m.id)).toEqual(["notifications/message", 1]);
    expect(last(msgs).result).toMatchObject({ isError: true, structuredContent: { refunded: true, charged_mcents: 0 } });
    expect(await rowsOf(key, rid)).toEqual([["release", FORECAST], ["hold", -FORECAST]]);
    expect((await getMe(key)).balance_mcents).toBe(1000);
  });

  it("JSON answer with the caller's id instead of the gateway's → 502, released, the result not passed on", async () => {
    const { env } = envFor("spoofjson");
    const { key } = await seedKey({ balance: 1000 });
    const { res, ctx } = await send(env, rpcInit(key, toolsCall("forecast")));
    const text = await res.text();
    await waitOnExecutionContext(ctx);
    expect(res.status).toBe(502);
    expect(text).not.toContain("stolen");
    expect(await rowsOf(key, res.headers.get("X-Request-Id")!)).toEqual([["release", FORECAST], ["hold", -FORECAST]]);
  });

  it("keys that equal a JSON-RPC/MCP key only after case folding (ASCII, ſ, K) → 400 -32600, nothing forwarded or held", async () => {
    const { env, tag } = envFor("json");
    const { key } = await seedKey({ balance: 1000 });
    const bodies = [
      { jsonrpc: "2.0", id: 1, method: "tools/list", Method: "tools/call", params: { name: "forecast" } },
      { jsonrpc: "2.0", id: 1, method: "tools/call", params: { name: "alerts", NAME: "forecast" } },
      { jsonrpc: "2.0", id: 1, method: "tools/call", params: { name: "alerts" }, "param\u017f": { name: "forecast" } },
      { jsonrpc: "2.0", id: 1, method: "tools/call", params: { name: "alerts", "argument\u017f": {} } },
      { jsonrpc: "2.0", ID: 2, id: 1, method: "tools/list" },
    ];
    for (const b of bodies) {
      const { res, msgs } = await rpc(env, key, b);
      expect([res.status, last(msgs).error.code, last(msgs).id]).toEqual([400, -32600, null]);
    }
    expect((await stats(tag)).requests).toBe(0);
    // A key that folds to something else (K → "key") is not refused: forwarded as it is (a free tool).
    const ok = await rpc(env, key, { ...toolsCall("alerts"), "\u212aey": 1 });
    expect(ok.res.headers.get("X-Request-Id")).not.toBeNull();
    expect((await stats(tag)).bodies).toEqual([{ ...toolsCall("alerts"), "\u212aey": 1 }]);
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["mint"]);
  });

  it("GET: Last-Event-ID is not forwarded, and responses on the stream are dropped (no free replay)", async () => {
    const { env, tag } = envFor("getreplay");
    const { key } = await seedKey({ balance: 1000 });
    const { res, ctx } = await send(env, { method: "GET", headers: { Authorization: `Bearer ${key}`, Accept: "text/event-stream", "Last-Event-ID": "e1" } });
    expect(res.status).toBe(200);
    const msgs = await messages(res, ctx);
    expect(msgs).toEqual([{ jsonrpc: "2.0", method: "notifications/message", params: { level: "info", data: "hello" } }]);
    const s = await stats(tag);
    expect([s.requests, s.last_event_ids]).toEqual([1, []]);
  });
});

describe("/mcp/<upstream>: settlement the gateway cannot confirm, and a caller gone during the hold", () => {
  function faultyApp(over: Partial<Pick<KeyDO, "capture" | "release" | "hold">>) {
    const keyStub = (env: AppEnv, keyHash: string) => {
      const real = env.KEYS.get(env.KEYS.idFromName(keyHash));
      return {
        stats: () => real.stats(),
        hold: (...a: Parameters<KeyDO["hold"]>) => (over.hold ? over.hold(...a) : real.hold(...a)),
        capture: (...a: Parameters<KeyDO["capture"]>) => (over.capture ? over.capture(...a) : real.capture(...a)),
        release: (...a: Parameters<KeyDO["release"]>) => (over.release ? over.release(...a) : real.release(...a)),
      } as unknown as DurableObjectStub<KeyDO>;
    };
    return createApp(HANDLERS, { upstreams: [upstream()], keyStub });
  }
  const pendingMeta = { "io.mcpay/charged_mcents": FORECAST, "io.mcpay/balance_mcents": 1000 - FORECAST, "io.mcpay/refund_pending": true };

  for (const [what, capture] of [
    ["the capture RPC keeps failing", () => Promise.reject(new Error("injected"))],
    ["the capture finds no such hold (state unknown)", () => Promise.resolve({ ok: false, state: "unknown", balanceMcents: 0 })],
  ] as const) {
    it(`${what} → refund_pending, charged the price (never "refunded" / 0)`, async () => {
      const { env } = envFor("json");
      const { key } = await seedKey({ balance: 1000 });
      const { res, msgs } = await rpc(env, key, toolsCall("forecast"), faultyApp({ capture: capture as unknown as KeyDO["capture"] }));
      expect(last(msgs).result._meta).toMatchObject(pendingMeta);
      expect(last(msgs).result._meta["io.mcpay/refunded"]).toBeUndefined();
      expect(res.headers.get("X-Charged-Mcents")).toBe(String(FORECAST));
      // The hold is still open (the KeyDO's alarm settles it), not recorded as released.
      expect((await getLedger(key)).map((e) => e.kind)).toEqual(["hold", "mint"]);
    });
  }

  for (const [what, release] of [
    ["the release RPC keeps failing", () => Promise.reject(new Error("injected"))],
    ["the release finds no such hold (state unknown)", () => Promise.resolve({ refunded: false, refundedMcents: 0, balanceMcents: 0, state: "unknown" })],
  ] as const) {
    it(`${what} → refund_pending, charged the price`, async () => {
      const { env } = envFor("http500");
      const { key } = await seedKey({ balance: 1000 });
      const { res, ctx } = await send(env, rpcInit(key, toolsCall("forecast")), faultyApp({ release: release as unknown as KeyDO["release"] }));
      const body = (await res.json()) as Record<string, any>;
      await waitOnExecutionContext(ctx);
      expect(res.status).toBe(502);
      expect(body).toMatchObject({ error: { code: "upstream_failed" }, refunded: false, refund_pending: true, charged_mcents: FORECAST, balance_mcents: 1000 - FORECAST });
      expect(res.headers.get("X-Charged-Mcents")).toBe(String(FORECAST));
      expect((await getLedger(key)).map((e) => e.kind)).toEqual(["hold", "mint"]);
    });
  }

  it("the hold, the forward and the settlement are under waitUntil from the moment the hold starts", async () => {
    const { env, tag } = envFor("json");
    const { key } = await seedKey({ balance: 1000 });
    let holdStarted!: () => void;
    const started = new Promise<void>((r) => (holdStarted = r));
    const slowHold = (async (...a: Parameters<KeyDO["hold"]>) => {
      holdStarted();
      await new Promise((r) => setTimeout(r, 200));
      const [endpoint, callId, opts] = a;
      return env.KEYS.get(env.KEYS.idFromName(await sha256Hex(key))).hold(endpoint, callId, opts);
    }) as unknown as KeyDO["hold"];
    const ctx = createExecutionContext();
    const pending = faultyApp({ hold: slowHold }).fetch(new Request(BASE + PATH, rpcInit(key, toolsCall("forecast"))), env, ctx);
    await started;
    // The caller is gone (its response is never read): what waitUntil holds still settles the call.
    await waitOnExecutionContext(ctx);
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["capture", "hold", "mint"]);
    expect((await stats(tag)).calls).toEqual({ forecast: 1 });
    await (await pending).body?.cancel();
  });
});

describe("/mcp/<upstream>: a legacy HTTP+SSE upstream (transport \"sse\"), one session per request", () => {
  const legacyApp = createApp(HANDLERS, { upstreams: [upstream({ transport: "sse" })] });
  const legacyEnv = (mode = "ok") => envFor(mode, crypto.randomUUID(), "sse");
  const HANDSHAKE = ["initialize", "notifications/initialized"];
  const call = (env: AppEnv, key: string, body: unknown, headers: Record<string, string> = {}, a: App = legacyApp) => send(env, rpcInit(key, body, headers), a);
  const rowsOf = async (key: string, rid: string) => (await getLedger(key)).filter((e) => e.request_id === rid).map((e) => [e.kind, e.endpoint, e.amount_mcents]);
  async function failedBody(res: Response, ctx: ExecutionContext): Promise<Record<string, any>> {
    const body = (await res.json()) as Record<string, any>;
    await waitOnExecutionContext(ctx);
    return body;
  }

  it("a priced tool: the gateway's handshake, then the call under mcpay-<request id>; charged exactly once", async () => {
    const { env, tag } = legacyEnv();
    const { key } = await seedKey({ balance: 1000 });
    const { res, ctx } = await call(env, key, toolsCall("forecast", { city: "Oslo" }, undefined, "c-1"));
    const [answer] = await messages(res, ctx);
    const rid = res.headers.get("X-Request-Id")!;
    expect(res.status).toBe(200);
    expect(res.headers.get("Content-Type")).toMatch(/^application\/json/);
    expect(res.headers.get("Mcp-Session-Id")).toBeNull();
    expect([res.headers.get("X-Charged-Mcents"), res.headers.get("X-Balance-Mcents")]).toEqual([String(FORECAST), String(1000 - FORECAST)]);
    expect(Number(res.headers.get("X-Upstream-Duration-Ms"))).toBeGreaterThanOrEqual(0);
    expect(answer!.id).toBe("c-1");
    expect(answer!.result.structuredContent).toEqual({ city: "Oslo", sky: "sunny" });
    expect(answer!.result._meta).toEqual({ "io.mcpay/charged_mcents": FORECAST, "io.mcpay/balance_mcents": 1000 - FORECAST, "io.mcpay/request_id": rid });
    expect((await getMe(key)).balance_mcents).toBe(1000 - FORECAST);
    expect(await rowsOf(key, rid)).toEqual([["capture", `${NAME}/forecast`, 0], ["hold", `${NAME}/forecast`, -FORECAST]]);
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["capture", "hold", "mint"]);
    const s = await stats(tag);
    expect(s.sessions).toEqual([[...HANDSHAKE, "tools/call"]]);
    expect(s.calls).toEqual({ forecast: 1 });
    // The session is closed once the response has arrived (the gateway ends its GET).
    await vi.waitFor(async () => expect((await stats(tag)).open_sessions).toBe(0), { timeout: 2000 });
    expect(s.bodies).toEqual([
      { jsonrpc: "2.0", id: expect.stringMatching(/^mcpay-init-[0-9a-f-]{36}$/), method: "initialize", params: { protocolVersion: "2024-11-05", capabilities: {}, clientInfo: { name: "mcpay-gateway", version: expect.any(String) } } },
      { jsonrpc: "2.0", method: "notifications/initialized" },
      { jsonrpc: "2.0", id: `mcpay-${rid}`, method: "tools/call", params: { name: "forecast", arguments: { city: "Oslo" } } },
    ]);
    // The call's id is first shown to the upstream with the call itself, not with the handshake.
    expect(JSON.stringify(s.bodies[0])).not.toContain(rid);
  });

  it("a free tool and tools/list: forwarded in a session of their own, no hold, no ledger row; tools/list carries the terms", async () => {
    const { env, tag } = legacyEnv();
    const { key } = await seedKey({ balance: 1000 });
    const free = await call(env, key, toolsCall("alerts"));
    expect(last(await messages(free.res, free.ctx)).result.content[0].text).toBe("no alerts");
    expect(free.res.headers.get("X-Charged-Mcents")).toBeNull();
    const list = await call(env, key, { jsonrpc: "2.0", id: 3, method: "tools/list" });
    const listed = last(await messages(list.res, list.ctx));
    expect(listed.id).toBe(3);
    const meta = Object.fromEntries((listed.result.tools as { name: string; _meta: unknown }[]).map((t) => [t.name, t._meta]));
    expect(meta.forecast).toEqual({ "acme.example/tier": "gold", "io.mcpay/price_mcents": FORECAST, "io.mcpay/scope": SCOPE });
    expect(meta.echo).toEqual({ "io.mcpay/price_mcents": DEFAULT_PRICE, "io.mcpay/scope": SCOPE });
    expect((await getMe(key)).balance_mcents).toBe(1000);
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["mint"]);
    const s = await stats(tag);
    expect(s.sessions).toEqual([[...HANDSHAKE, "tools/call"], [...HANDSHAKE, "tools/list"]]);
    expect(s.calls).toEqual({ alerts: 1 });
  });

  it("a free call whose POST answers 500 → 502 upstream_failed (as on axum), nothing charged", async () => {
    const { env } = legacyEnv("http500");
    const { key } = await seedKey({ balance: 1000 });
    const { res, ctx } = await call(env, key, toolsCall("alerts"));
    const body = await failedBody(res, ctx);
    expect([res.status, body.error.code]).toEqual([502, "upstream_failed"]);
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["mint"]);
  });

  it("a JSON-RPC error → the upstream's answer, released", async () => {
    const { env, tag } = legacyEnv();
    const { key } = await seedKey({ balance: 1000 });
    const { res, ctx } = await call(env, key, toolsCall("fail"));
    const [answer] = await messages(res, ctx);
    expect(res.status).toBe(200);
    expect(answer!.error).toMatchObject({ code: -32603, message: expect.stringContaining("the tool failed") });
    expect(res.headers.get("X-Charged-Mcents")).toBe("0");
    expect(await rowsOf(key, res.headers.get("X-Request-Id")!)).toEqual([["release", `${NAME}/fail`, DEFAULT_PRICE], ["hold", `${NAME}/fail`, -DEFAULT_PRICE]]);
    expect((await getMe(key)).balance_mcents).toBe(1000);
    expect((await stats(tag)).calls).toEqual({ fail: 1 });
  });

  for (const [mode, what, posted] of [
    ["http500", "the call's POST answered 500", [...HANDSHAKE, "tools/call"]],
    ["reset", "the connection reset (at the handshake)", ["initialize"]],
    ["cutoff", "the session's stream ended before the response", [...HANDSHAKE, "tools/call"]],
    ["noendpoint", "no endpoint event", null],
    ["foreign", "an endpoint on another origin (nothing posted there)", null],
  ] as const) {
    it(`${what} → 502 upstream_failed, released`, async () => {
      const { env, tag } = legacyEnv(mode);
      const { key } = await seedKey({ balance: 1000 });
      const { res, ctx } = await call(env, key, toolsCall("forecast"));
      const body = await failedBody(res, ctx);
      expect(res.status).toBe(502);
      expect(body).toMatchObject({ error: { code: "upstream_failed" }, refunded: true, charged_mcents: 0, balance_mcents: 1000 });
      expect(res.headers.get("X-Charged-Mcents")).toBe("0");
      expect(await rowsOf(key, body.request_id)).toEqual([["release", `${NAME}/forecast`, FORECAST], ["hold", `${NAME}/forecast`, -FORECAST]]);
      expect((await getMe(key)).balance_mcents).toBe(1000);
      const s = await stats(tag);
      expect(s.sessions).toEqual(posted === null ? [] : [posted]);
      if (posted === null) expect(s.requests).toBe(1);
      expect(s.calls).toEqual({});
    });
  }

  it("slow past timeout_ms, counted from the GET → 504 upstream_timeout, released (JSON; and the final event of a stream)", async () => {
    const quick = createApp(HANDLERS, { upstreams: [upstream({ transport: "sse", timeoutMs: 400 })] });
    const { env } = legacyEnv();
    const { key } = await seedKey({ balance: 1000 });
    const started = Date.now();
    const json = await call(env, key, toolsCall("slow", { ms: 3000 }), {}, quick);
    const body = await failedBody(json.res, json.ctx);
    expect(Date.now() - started).toBeLessThan(2500);
    expect(json.res.status).toBe(504);
    expect(body).toMatchObject({ error: { code: "upstream_timeout" }, refunded: true, charged_mcents: 0, balance_mcents: 1000 });
    expect(await rowsOf(key, body.request_id)).toEqual([["release", `${NAME}/slow`, DEFAULT_PRICE], ["hold", `${NAME}/slow`, -DEFAULT_PRICE]]);

    const streamed = await call(env, key, toolsCall("slow", { ms: 3000 }, { progressToken: "p" }, 9), {}, quick);
    expect(streamed.res.headers.get("Content-Type")).toMatch(/^text\/event-stream/);
    const answer = last(await messages(streamed.res, streamed.ctx));
    expect(answer.id).toBe(9);
    expect(answer.result).toMatchObject({ isError: true, structuredContent: { error: { code: "upstream_timeout" }, refunded: true }, _meta: { "io.mcpay/refunded": true } });
    expect((await getMe(key)).balance_mcents).toBe(1000);
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["release", "hold", "release", "hold", "mint"]);
  });

  it("a free call past timeout_ms → 504 upstream_timeout (its answer is read within the session's deadline), nothing charged", async () => {
    const quickFree = createApp(HANDLERS, { upstreams: [upstream({ transport: "sse", timeoutMs: 400, tools: [["slow", 0]] })] });
    const { env } = legacyEnv();
    const { key } = await seedKey({ balance: 1000 });
    const { res, ctx } = await call(env, key, toolsCall("slow", { ms: 3000 }), {}, quickFree);
    const body = await failedBody(res, ctx);
    expect([res.status, body.error.code]).toEqual([504, "upstream_timeout"]);
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["mint"]);
  });

  it("progress: with a progressToken and Accept: text/event-stream, the session's notifications arrive before the answer; the stream ends with it", async () => {
    const { env, tag } = legacyEnv();
    const { key } = await seedKey({ balance: 1000 });
    const started = Date.now();
    const { res, ctx } = await call(env, key, toolsCall("progress", { steps: 3, interval_ms: 300 }, { progressToken: "p1" }));
    expect(res.headers.get("Content-Type")).toMatch(/^text\/event-stream/);
    expect(res.headers.get("X-Charged-Mcents")).toBe(String(DEFAULT_PRICE));
    const seen = await timedMessages(res, ctx, started);
    expect(seen.map((s) => s.msg.method ?? s.msg.id)).toEqual(["notifications/progress", "notifications/progress", "notifications/progress", 1]);
    expect(seen.slice(0, 3).map((s) => s.msg.params)).toEqual([1, 2, 3].map((progress) => ({ progressToken: "p1", progress, total: 3 })));
    expect(seen[3]!.at - seen[0]!.at).toBeGreaterThanOrEqual(400);
    expect(last(seen.map((s) => s.msg)).result._meta["io.mcpay/charged_mcents"]).toBe(DEFAULT_PRICE);
    expect((await getMe(key)).balance_mcents).toBe(1000 - DEFAULT_PRICE);
    await vi.waitFor(async () => expect((await stats(tag)).open_sessions).toBe(0), { timeout: 2000 });
    // Without text/event-stream in Accept: one JSON answer (the notifications are not relayed).
    // X-Upstream-Duration-Ms is the time until the call was accepted, not until its answer (~600 ms).
    const json = await call(env, key, toolsCall("progress", { steps: 2, interval_ms: 300 }, { progressToken: "p2" }), { Accept: "application/json" });
    expect(json.res.headers.get("Content-Type")).toMatch(/^application\/json/);
    expect(Number(json.res.headers.get("X-Upstream-Duration-Ms"))).toBeLessThan(450);
    expect((await messages(json.res, json.ctx)).map((m) => m.result.content[0].text)).toEqual(["done"]);
    expect((await getMe(key)).balance_mcents).toBe(1000 - 2 * DEFAULT_PRICE);
    expect((await stats(tag)).calls).toEqual({ progress: 2 });
  });

  it("the configured header reaches the upstream on the GET and every POST; the caller's Authorization, Cookie, X-Admin-Key never", async () => {
    const { env, tag } = legacyEnv();
    const { key } = await seedKey({ balance: 1000 });
    const { res, ctx } = await call(env, key, toolsCall("whoami"), { Cookie: "session=secret", "X-Admin-Key": "admin-secret", "Mcp-Session-Id": "caller-session" });
    const [answer] = await messages(res, ctx);
    expect(answer!.result.structuredContent).toEqual({ authorization: null, cookie: null, x_upstream_token: TOKEN, x_admin_key: null });
    const paid = await call(env, key, toolsCall("forecast"));
    expect(last(await messages(paid.res, paid.ctx)).result._meta["io.mcpay/charged_mcents"]).toBe(FORECAST);
    const s = await stats(tag);
    expect(s.requests).toBe(8);
    expect(s.authorization).toBe(0);
    expect(s.tokens).toEqual(Array(8).fill(TOKEN));
  });

  it("the caller's initialize is forwarded as it is (no handshake of the gateway's); notifications and responses → 202, nothing forwarded", async () => {
    const { env, tag } = legacyEnv();
    const { key } = await seedKey({ balance: 1000 });
    const init = { jsonrpc: "2.0", id: 0, method: "initialize", params: { protocolVersion: "2024-11-05", capabilities: {}, clientInfo: { name: "t", version: "0" } } };
    const { res, ctx } = await call(env, key, init);
    const [answer] = await messages(res, ctx);
    expect([answer!.id, answer!.result.serverInfo.name]).toEqual([0, "test-upstream"]);
    expect(res.headers.get("Mcp-Session-Id")).toBeNull();
    for (const body of [{ jsonrpc: "2.0", method: "notifications/initialized" }, { jsonrpc: "2.0", id: 5, result: {} }]) {
      const note = await call(env, key, body);
      expect([note.res.status, await note.res.text()]).toEqual([202, ""]);
    }
    const s = await stats(tag);
    expect(s.sessions).toEqual([["initialize"]]);
    expect(s.bodies).toEqual([init]);
  });

  it("GET and DELETE → 405 (Allow: POST, OPTIONS), nothing forwarded; OPTIONS → 204", async () => {
    const { env, tag } = legacyEnv();
    const { key } = await seedKey({ balance: 1000 });
    for (const method of ["GET", "DELETE"]) {
      const { res, ctx } = await send(env, { method, headers: { Authorization: `Bearer ${key}`, Accept: "text/event-stream" } }, legacyApp);
      const body = await failedBody(res, ctx);
      expect([res.status, body.error.code, res.headers.get("Allow")]).toEqual([405, "method_not_allowed", "POST, OPTIONS"]);
      // The key comes first, as for every method.
      const bare = await send(env, { method, headers: { Accept: "text/event-stream" } }, legacyApp);
      expect([bare.res.status, (await failedBody(bare.res, bare.ctx)).error.code]).toEqual([401, "missing_key"]);
    }
    expect((await send(env, { method: "OPTIONS" }, legacyApp)).res.status).toBe(204);
    expect((await stats(tag)).requests).toBe(0);
  });

  it("GET /v1/pricing says transport \"sse\"", async () => {
    const { res, ctx } = await send(testEnv, { method: "GET" }, legacyApp, "/v1/pricing");
    const body = (await res.json()) as { upstreams: { name: string; transport: string }[] };
    await waitOnExecutionContext(ctx);
    expect(body.upstreams.map((u) => [u.name, u.transport])).toEqual([[NAME, "sse"]]);
  });

  it("the official MCP client (Streamable HTTP) through the gateway: initialize, tools/list with terms, a paid call charged", async () => {
    const { env, tag } = legacyEnv();
    const { key } = await seedKey({ balance: 1000 });
    const { transport, client } = await connectClient(legacyApp, env, key);
    expect(transport.sessionId).toBeUndefined();
    const { tools } = await client.listTools();
    expect(tools.find((t) => t.name === "forecast")?._meta?.["io.mcpay/price_mcents"]).toBe(FORECAST);
    const result = await client.callTool({ name: "forecast", arguments: { city: "Lima" } });
    expect(result.structuredContent).toEqual({ city: "Lima", sky: "sunny" });
    expect(result._meta?.["io.mcpay/charged_mcents"]).toBe(FORECAST);
    await client.close();
    expect((await getMe(key)).balance_mcents).toBe(1000 - FORECAST);
    const s = await stats(tag);
    expect(s.sessions).toEqual([["initialize"], [...HANDSHAKE, "tools/list"], [...HANDSHAKE, "tools/call"]]);
    expect(s.calls).toEqual({ forecast: 1 });
  });
});

// The upstreams of mcpay.toml (the generated table; none by default), each pointed at the test server.
for (const u of UPSTREAMS) {
  it(`mcpay.toml's upstream ${u.name}: /mcp/${u.name} lists and bills the tools at the prices of mcpay.toml`, async () => {
    const manifestApp = createApp(HANDLERS);
    const tag = crypto.randomUUID();
    const secrets = Object.fromEntries(u.headers.map(([, name]) => [name, "test-secret"]));
    const url = u.transport === "sse" ? `${upstreamBase()}/t/${tag}/ok/sse` : `${upstreamBase()}/t/${tag}/json/mcp`;
    const env = { ...testEnv, ...secrets, [u.urlEnv]: url } as unknown as AppEnv;
    const { key } = await seedKey({ balance: 1_000_000, scopes: [u.scope] });
    if (!u.enabled) {
      const { res } = await send(env, rpcInit(key, toolsCall("echo")), manifestApp, `/mcp/${u.name}`);
      expect(res.status).toBe(503);
      return;
    }
    const list = await send(env, rpcInit(key, { jsonrpc: "2.0", id: 1, method: "tools/list" }), manifestApp, `/mcp/${u.name}`);
    const tools = last(await messages(list.res, list.ctx)).result.tools as { name: string; _meta: Record<string, unknown> }[];
    for (const t of tools) expect([t.name, t._meta["io.mcpay/price_mcents"], t._meta["io.mcpay/scope"]]).toEqual([t.name, toolPrice(u, t.name), u.scope]);
    const price = toolPrice(u, "echo");
    const call = await send(env, rpcInit(key, toolsCall("echo", { message: "hi" })), manifestApp, `/mcp/${u.name}`);
    expect(last(await messages(call.res, call.ctx)).result.content[0].text).toBe("hi");
    expect((await getMe(key)).balance_mcents).toBe(1_000_000 - price);
    const holds = (await getLedger(key)).filter((e) => e.kind === "hold");
    expect(holds.map((e) => [e.endpoint, e.amount_mcents])).toEqual(price > 0 ? [[`${u.name}/echo`, -price]] : []);
    expect((await stats(tag)).calls).toEqual({ echo: 1 });
  });
}
