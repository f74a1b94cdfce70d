// /mcp (contract 3.11) with the official MCP client: discovery without a key, paid tools charged
// through the same billing core as POST /v1/<endpoint> (ledger rows, balances), refusals as
// JSON-RPC errors with no charge, failures and timeouts released, batches, idempotent retries.
import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { McpError } from "@modelcontextprotocol/sdk/types.js";
import { exports } from "cloudflare:workers";
import { beforeAll, describe, expect, it, vi } from "vitest";
import { createApp, type App, type AppOptions } from "../src/app";
import { HANDLERS } from "../src/generated/handlers";
import { CALL_TYPES, DESCRIPTION, GATEWAY, INPUT_SCHEMA, PROJECT } from "../src/generated/manifest";
import type { Handler, Handlers } from "../src/lib/handler";
import { BASE, EP, PRICE, SAMPLE, SCOPE, balanceFor, fetchSelf, getLedger, getMe, seedKey, testEnv } from "./helpers";

const MCP_URL = `${BASE}/mcp`;
// The mpp target (whose gateway is this one plus MPP payments) sells execute_code, a name every
// other manifest reserves; it adds its own tools after these, its own _meta keys and a `credit`
// argument, and sells a paid tool called without Authorization over MPP instead of answering 401.
const MPP_TARGET = (CALL_TYPES as readonly string[]).includes("execute_code");
const OWN_TOOLS = [...CALL_TYPES, "pricing", "balance"];
const CALL_ID_RE = /^[0-9a-f-]{36}\/mcp\/[0-9a-f-]{36}$/;

type Fetch = (url: string | URL, init?: RequestInit) => Promise<Response>;

/** The gateway in-process: the default worker, or an app built with other handlers/options. */
function fetcher(app?: App): Fetch {
  if (!app) return (url, init) => exports.default.fetch(new Request(url, init));
  return async (url, init) => {
    const ctx = createExecutionContext();
    const res = await app.fetch(new Request(url, init), testEnv, ctx);
    await waitOnExecutionContext(ctx);
    return res;
  };
}

async function connect(key: string | null, app?: App): Promise<Client> {
  const transport = new StreamableHTTPClientTransport(new URL(MCP_URL), {
    ...(key !== null ? { requestInit: { headers: { Authorization: `Bearer ${key}` } } } : {}),
    fetch: fetcher(app),
  });
  const client = new Client({ name: "gateway-test", version: "0" });
  await client.connect(transport);
  return client;
}

function appWith(handler: Handler<unknown>, options: AppOptions = {}): App {
  return createApp({ ...HANDLERS, [EP]: handler } as Handlers, options);
}

/** One raw JSON-RPC POST (for what the client would not send: batches, bad bodies, no key). */
function post(body: unknown, headers: Record<string, string> = {}, app?: App): Promise<Response> {
  return fetcher(app)(MCP_URL, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json, text/event-stream", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

function toolsCall(id: unknown, name: string, args: unknown) {
  return { jsonrpc: "2.0", id, method: "tools/call", params: { name, arguments: args } };
}

async function rpcError(p: Promise<unknown>): Promise<McpError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(McpError);
  return err as McpError;
}

beforeAll(() => {
  // Handler failures and timeouts are logged with console.error; keep the output quiet.
  vi.spyOn(console, "error").mockImplementation(() => {});
});

describe("/mcp discovery (no key)", () => {
  it("tools/list: every endpoint with its JSON Schema and terms (= /v1/pricing), then pricing and balance", async () => {
    const client = await connect(null);
    const { tools } = await client.listTools();
    expect(tools.map((t) => t.name).slice(0, OWN_TOOLS.length)).toEqual(OWN_TOOLS);
    if (!MPP_TARGET) expect(tools).toHaveLength(OWN_TOOLS.length);
    const pricing = (await (await fetchSelf("/v1/pricing")).json()) as { endpoints: { name: string; price_mcents: number; scope: string }[] };
    for (const ep of CALL_TYPES) {
      const tool = tools.find((t) => t.name === ep)!;
      const listed = pricing.endpoints.find((e) => e.name === ep)!;
      expect(tool.description).toBe(DESCRIPTION[ep]);
      expect(tool.inputSchema.additionalProperties).toBe(false);
      if (!MPP_TARGET) {
        expect(tool.inputSchema).toEqual(INPUT_SCHEMA[ep]);
        expect(tool._meta).toEqual({ "io.mcpay/price_mcents": listed.price_mcents, "io.mcpay/scope": listed.scope });
      } else {
        expect(tool.inputSchema.required).toEqual(INPUT_SCHEMA[ep].required);
        if ((ep as string) !== "execute_code") expect(tool.inputSchema.properties).toEqual({ ...INPUT_SCHEMA[ep].properties, credit: expect.anything() });
        expect(tool._meta).toMatchObject({ "io.mcpay/price_mcents": listed.price_mcents, "io.mcpay/scope": listed.scope });
      }
    }
    await client.close();
  });

  it("the pricing tool answers GET /v1/pricing's body without a key; ping works", async () => {
    const client = await connect(null);
    await client.ping();
    const r = await client.callTool({ name: "pricing", arguments: {} });
    expect(r.structuredContent).toEqual(await (await fetchSelf("/v1/pricing")).json());
    expect(JSON.parse((r.content as { text: string }[])[0]!.text)).toEqual(r.structuredContent);
  });

  it("an Authorization header on discovery requests is not read (a malformed one does not matter)", async () => {
    const res = await post({ jsonrpc: "2.0", id: 1, method: "tools/list" }, { Authorization: "Bearer nope" });
    expect(res.status).toBe(200);
    expect(res.headers.get("Content-Type")).toBe("application/json; charset=utf-8");
    expect(res.headers.get("Cache-Control")).toBe("no-store");
    expect(res.headers.get("X-Request-Id")).toMatch(/^[0-9a-f-]{36}$/);
    const names = ((await res.json()) as { result: { tools: { name: string }[] } }).result.tools.map((t) => t.name);
    expect(names.slice(0, OWN_TOOLS.length)).toEqual(OWN_TOOLS);
  });
});

describe("/mcp keys", () => {
  it("balance and paid tools without a key → HTTP 401 missing_key (WWW-Authenticate; mpp: paid tools are offered over MPP); a key in _meta or arguments is ignored", async () => {
    const { key } = await seedKey({ balance: balanceFor(2) });
    for (const body of [
      toolsCall(1, "balance", {}),
      toolsCall(2, EP, SAMPLE),
      { jsonrpc: "2.0", id: 3, method: "tools/call", params: { name: EP, arguments: SAMPLE, _meta: { authorization: `Bearer ${key}`, "io.mcpay/key": key } } },
      toolsCall(4, EP, { ...(SAMPLE as object), api_key: key }),
    ]) {
      const res = await post(body);
      if (MPP_TARGET && body.params.name !== "balance") {
        // mpp: without Authorization a paid tool is for MPP payment (a JSON-RPC error: the challenge,
        // or "payments not configured" in this suite's environment), never served or charged.
        expect(res.status).toBe(200);
        const reply = (await res.json()) as { error?: { code: number }; result?: unknown };
        expect(reply.result).toBeUndefined();
        expect(reply.error).toBeDefined();
        continue;
      }
      expect(res.status).toBe(401);
      expect(res.headers.get("WWW-Authenticate")).toBe(`Bearer realm="${PROJECT.name}"`);
      expect(res.headers.get("X-Request-Id")).toBeTruthy();
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe("missing_key");
    }
    const me = await getMe(key);
    expect(me.balance_mcents).toBe(balanceFor(2));
    expect((await getLedger(key)).map((e) => e.kind)).toEqual(["mint"]);
  });

  it("a malformed or unknown key → HTTP 401 invalid_key; the official client fails the call", async () => {
    const unknown = `${GATEWAY.keyPrefix}${"ab".repeat(32)}`;
    for (const auth of ["Bearer x", `Bearer ${unknown}`, `Basic ${unknown}`]) {
      const res = await post(toolsCall(1, "balance", {}), { Authorization: auth });
      expect(res.status).toBe(401);
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe("invalid_key");
    }
    const client = await connect(unknown);
    await expect(client.callTool({ name: "balance", arguments: {} })).rejects.toThrow();
    // Discovery still works with that client.
    expect((await client.listTools()).tools.map((t) => t.name).slice(0, OWN_TOOLS.length)).toEqual(OWN_TOOLS);
  });

  it("balance answers GET /v1/me's body", async () => {
    const { key } = await seedKey({ balance: 1234 });
    const client = await connect(key);
    const r = await client.callTool({ name: "balance", arguments: {} });
    expect(r.structuredContent).toEqual(await getMe(key));
    expect(r.isError).toBeUndefined();
  });
});

describe("/mcp paid tools", () => {
  it("a paid call: charged the price, handler's value as structuredContent, ledger hold + capture under a gateway call id", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    const client = await connect(key);
    const r = await client.callTool({ name: EP, arguments: SAMPLE as Record<string, unknown>, _meta: { "io.mcpay/request_id": "mine" } });
    expect(r.isError).toBeUndefined();
    const meta = r._meta as Record<string, unknown>;
    expect(meta["io.mcpay/charged_mcents"]).toBe(PRICE);
    expect(meta["io.mcpay/balance_mcents"]).toBe(balance - PRICE);
    const callId = meta["io.mcpay/request_id"] as string;
    expect(callId).toMatch(CALL_ID_RE);
    expect(typeof r.structuredContent).toBe("object");
    const text = (r.content as { type: string; text: string }[])[0]!;
    expect(text.type).toBe("text");
    // The same value /v1 returns as `result` (objects as they are, anything else under "result").
    const v1 = (await (await fetchSelf(`/v1/${EP}`, { method: "POST", headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" }, body: JSON.stringify(SAMPLE) })).json()) as { result: unknown };
    const expected = typeof v1.result === "object" && v1.result !== null && !Array.isArray(v1.result) ? v1.result : { result: v1.result };
    expect(r.structuredContent).toEqual(expected);
    expect(JSON.parse(text.text)).toEqual(v1.result);

    const me = await getMe(key);
    expect(me.balance_mcents).toBe(balance - 2 * PRICE);
    const rows = (await getLedger(key)).filter((e) => e.request_id === callId);
    expect(rows.map((e) => e.kind).sort()).toEqual(["capture", "hold"]);
    expect(rows.find((e) => e.kind === "hold")).toMatchObject({ endpoint: EP, amount_mcents: -PRICE, balance_after: balance - PRICE });
    expect(rows.find((e) => e.kind === "capture")).toMatchObject({ amount_mcents: 0 });
  });

  it("insufficient balance → -32002 with price and balance, no charge, no ledger row", async () => {
    const { key } = await seedKey({ balance: PRICE - 1 > 0 ? PRICE - 1 : 0 });
    const client = await connect(key);
    const err = await rpcError(client.callTool({ name: EP, arguments: SAMPLE as Record<string, unknown> }));
    expect(err.code).toBe(-32002);
    expect(err.data).toMatchObject({ code: "insufficient_balance", note: "no charge applied", price_mcents: PRICE, balance_mcents: Math.max(0, PRICE - 1) });
    expect((await getLedger(key)).filter((e) => e.kind !== "mint")).toEqual([]);
  });

  it("scope denied → -32003 with required_scope, no charge", async () => {
    const { key } = await seedKey({ balance: balanceFor(2), scopes: [] });
    const client = await connect(key);
    const err = await rpcError(client.callTool({ name: EP, arguments: SAMPLE as Record<string, unknown> }));
    expect(err.code).toBe(-32003);
    expect(err.data).toMatchObject({ code: "scope_denied", note: "no charge applied", required_scope: SCOPE });
    expect((await getMe(key)).balance_mcents).toBe(balanceFor(2));
    expect((await getLedger(key)).filter((e) => e.kind === "hold")).toEqual([]);
  });

  it("invalid arguments (unknown field, not an object) and an unknown tool → -32602 invalid_input, no charge", async () => {
    const { key } = await seedKey({ balance: balanceFor(2) });
    const client = await connect(key);
    for (const args of [{ ...(SAMPLE as object), surplus_field: 1 }, { constructor: 1 }]) {
      const err = await rpcError(client.callTool({ name: EP, arguments: args as Record<string, unknown> }));
      expect(err.code).toBe(-32602);
      expect(err.data).toMatchObject({ code: "invalid_input", note: "no charge applied" });
    }
    const res = await post(toolsCall(1, EP, [1, 2]), { Authorization: `Bearer ${key}` });
    expect(((await res.json()) as { error: { code: number } }).error.code).toBe(-32602);
    const unknown = await rpcError(client.callTool({ name: "no_such_tool", arguments: {} }));
    expect(unknown.code).toBe(-32602);
    expect((await getMe(key)).balance_mcents).toBe(balanceFor(2));
    expect((await getLedger(key)).filter((e) => e.kind === "hold")).toEqual([]);
  });

  it("a failing handler → isError result, refunded (hold + release), _meta says so", async () => {
    const app = appWith({ run: () => { throw new Error("upstream exploded"); } });
    const balance = balanceFor(2);
    const { key } = await seedKey({ balance });
    const client = await connect(key, app);
    const r = await client.callTool({ name: EP, arguments: SAMPLE as Record<string, unknown> });
    expect(r.isError).toBe(true);
    const meta = r._meta as Record<string, unknown>;
    expect(meta).toMatchObject({ "io.mcpay/refunded": true, "io.mcpay/charged_mcents": 0, "io.mcpay/balance_mcents": balance });
    expect(r.structuredContent).toMatchObject({ ok: false, error: { code: "handler_failed" }, refunded: true, charged_mcents: 0, balance_mcents: balance, request_id: meta["io.mcpay/request_id"] });
    expect(JSON.stringify(r)).not.toContain("upstream exploded");
    expect((await getMe(key)).balance_mcents).toBe(balance);
    const rows = (await getLedger(key)).filter((e) => e.request_id === meta["io.mcpay/request_id"]);
    expect(rows.map((e) => e.kind).sort()).toEqual(["hold", "release"]);
  });

  it("a handler past timeout_ms → isError handler_timeout, released", async () => {
    const app = appWith({ run: () => new Promise(() => {}) }, { timeoutMs: { [EP]: 150 } });
    const balance = balanceFor(2);
    const { key } = await seedKey({ balance });
    const client = await connect(key, app);
    const r = await client.callTool({ name: EP, arguments: SAMPLE as Record<string, unknown> });
    expect(r.isError).toBe(true);
    expect(r.structuredContent).toMatchObject({ ok: false, error: { code: "handler_timeout" }, refunded: true, charged_mcents: 0, balance_mcents: balance });
    expect((await getMe(key)).balance_mcents).toBe(balance);
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(1);
    expect(ledger.filter((e) => e.kind === "release")).toHaveLength(1);
  });

  it("_meta io.mcpay/idempotency_key: a retry replays the stored result, held once; a bad key → -32602", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    const client = await connect(key);
    const meta = { "io.mcpay/idempotency_key": "mcp-idem-" + crypto.randomUUID().replaceAll("-", "") };
    const first = await client.callTool({ name: EP, arguments: SAMPLE as Record<string, unknown>, _meta: meta });
    const again = await client.callTool({ name: EP, arguments: SAMPLE as Record<string, unknown>, _meta: meta });
    expect(again.structuredContent).toEqual(first.structuredContent);
    expect(again._meta).toMatchObject({ ...first._meta, "io.mcpay/idempotent_replayed": true });
    // Other arguments that fail the shape check are refused by it first (-32602), before the record.
    const other = await rpcError(client.callTool({ name: EP, arguments: { ...(SAMPLE as object), extra_field_for_mismatch: 1 } as Record<string, unknown>, _meta: meta }));
    expect(other.code).toBe(-32602);
    const bad = await rpcError(client.callTool({ name: EP, arguments: SAMPLE as Record<string, unknown>, _meta: { "io.mcpay/idempotency_key": "short" } }));
    expect(bad.code).toBe(-32602);
    expect(bad.data).toMatchObject({ code: "invalid_input", note: "no charge applied" });
    expect((await getMe(key)).balance_mcents).toBe(balance - PRICE);
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(1);
    expect(ledger.filter((e) => e.kind === "capture")).toHaveLength(1);
  });

  it("an idempotency key used over MCP, then on POST /v1 with the same input → 422 idempotency_mismatch (another body)", async () => {
    const { key } = await seedKey({ balance: balanceFor(3) });
    const idem = "mcp-idem-" + crypto.randomUUID().replaceAll("-", "");
    const auth = { Authorization: `Bearer ${key}` };
    const call = (args: unknown) => post({ jsonrpc: "2.0", id: 1, method: "tools/call", params: { name: EP, arguments: args, _meta: { "io.mcpay/idempotency_key": idem } } }, auth);
    expect(((await (await call(SAMPLE)).json()) as { result: unknown }).result).toBeDefined();
    // The HTTP face with the same Idempotency-Key and the same input is another "body": a mismatch there.
    const res = await fetchSelf(`/v1/${EP}`, { method: "POST", headers: { ...auth, "Content-Type": "application/json", "Idempotency-Key": idem }, body: JSON.stringify(SAMPLE) });
    expect(res.status).toBe(422);
    expect((await getLedger(key)).filter((e) => e.kind === "hold")).toHaveLength(1);
  });
});

describe("/mcp HTTP", () => {
  it("a batch with duplicate ids → 400 -32600, nothing charged; distinct ids → one hold and capture per call, each with its own call id", async () => {
    const balance = balanceFor(5);
    const { key } = await seedKey({ balance });
    const auth = { Authorization: `Bearer ${key}` };
    const dup = await post([toolsCall(7, EP, SAMPLE), toolsCall(7, EP, SAMPLE)], auth);
    expect(dup.status).toBe(400);
    expect(await dup.json()).toMatchObject({ jsonrpc: "2.0", id: null, error: { code: -32600 } });
    expect((await getLedger(key)).filter((e) => e.kind === "hold")).toEqual([]);

    const ok = await post([toolsCall(1, EP, SAMPLE), toolsCall("1", EP, SAMPLE)], auth);
    expect(ok.status).toBe(200);
    const replies = (await ok.json()) as { id: unknown; result: { _meta: Record<string, unknown> } }[];
    expect(replies).toHaveLength(2);
    const ids = replies.map((r) => r.result._meta["io.mcpay/request_id"] as string);
    expect(new Set(ids).size).toBe(2);
    for (const id of ids) expect(id).toMatch(CALL_ID_RE);
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold").map((e) => e.request_id).sort()).toEqual([...ids].sort());
    expect(ledger.filter((e) => e.kind === "capture")).toHaveLength(2);
    expect((await getMe(key)).balance_mcents).toBe(balance - 2 * PRICE);
  });

  it("GET and DELETE → 405 Allow: POST; OPTIONS → 204 with the MCP CORS headers", async () => {
    for (const method of ["GET", "DELETE"]) {
      const res = await fetchSelf("/mcp", { method });
      expect(res.status).toBe(405);
      expect(res.headers.get("Allow")).toBe("POST");
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe("method_not_allowed");
    }
    const pre = await fetchSelf("/mcp", { method: "OPTIONS" });
    expect(pre.status).toBe(204);
    expect(pre.headers.get("Access-Control-Allow-Methods")).toBe("POST, OPTIONS");
    expect(pre.headers.get("Access-Control-Allow-Origin")).toBe("*");
    expect(pre.headers.get("Access-Control-Allow-Headers")).toMatch(/Mcp-Protocol-Version/);
    expect(pre.headers.get("Access-Control-Allow-Headers")).toMatch(/Mcp-Session-Id/);
    expect(pre.headers.get("Access-Control-Allow-Headers")).toMatch(/Last-Event-ID/);
    expect(pre.headers.get("Access-Control-Expose-Headers")).toMatch(/Mcp-Session-Id/);
    expect(pre.headers.get("X-Request-Id")).toBeTruthy();
  });

  it("a body over maxBodyBytes → 413 body_too_large; not JSON → 400 -32700; a notification → 202", async () => {
    const big = await post({ jsonrpc: "2.0", id: 1, method: "tools/list", params: { pad: "x".repeat(GATEWAY.maxBodyBytes) } });
    expect(big.status).toBe(413);
    expect(await big.json()).toMatchObject({ ok: false, error: { code: "body_too_large" }, max_body_bytes: GATEWAY.maxBodyBytes });
    const bad = await post("{not json");
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: { code: number } }).error.code).toBe(-32700);
    const note = await post({ jsonrpc: "2.0", method: "notifications/initialized" });
    expect(note.status).toBe(202);
    expect(note.headers.get("Access-Control-Allow-Origin")).toBe("*");
  });
});
