// /mcp/<NAME>: metering an MCP server that already exists (contract 3.12). The caller's key and
// the upstream's scope are checked before anything is forwarded; every message is forwarded free
// except a `tools/call` of a priced tool, which is held, forwarded and then captured or released
// through the billing core of /v1 and /mcp (the KeyDO's hold, lib/paid-call.ts's settlement).
// Forwarding is plain `fetch` to the upstream's Streamable HTTP endpoint: JSON answers are read
// whole (bounded) and settled before they are sent; event streams are passed on event by event,
// the event carrying the call's response being settled (and its `_meta` completed) before it is
// written. Settlement runs under ctx.waitUntil, so a caller that goes away cannot leave a hold open.
// A legacy HTTP+SSE upstream (transport "sse") is bridged: each POST opens a session of its own
// whose answer is made into a Response like a Streamable HTTP server's (JSON, or an event stream),
// consumed by the same code.
import { keyStubFor, type AppOptions } from "../app";
import { GATEWAY, PROJECT, UPSTREAMS, type UpstreamConfig } from "../generated/manifest";
import { readBoundedText, readStreamUpTo } from "./body";
import type { AppEnv } from "./env";
import { HttpError, answering, errorBody, errorResponse, withHeaders, type ErrorCode } from "./http";
import type { CaptureResult, HoldTerms, KeyDO, SettleResult } from "./key-do";
import { parseBearer, sha256Hex } from "./keys";
import { MCP_CORS_HEADERS, toRpcError } from "./mcp";
import { holdRefusal, settleWithRetry, type Charge, type Released } from "./paid-call";

export const UPSTREAM_PATH_PREFIX = "/mcp/";
/** Largest upstream JSON answer read (a paid call's answer, a tools/list result); more → 502. */
export const UPSTREAM_MAX_JSON_BYTES = 4 * 1024 * 1024;

const ALLOW = "GET, POST, DELETE, OPTIONS";
/** Request headers passed to the upstream; nothing else of the caller's (Authorization, Cookie, …) is. */
// Not Last-Event-ID: a resumed stream would replay answers (a released paid call's result) for free.
const FORWARDED_REQUEST_HEADERS = ["Accept", "Content-Type", "Mcp-Session-Id", "Mcp-Protocol-Version"];
/** Upstream answer headers passed back to the caller. */
const FORWARDED_RESPONSE_HEADERS = ["Content-Type", "Cache-Control", "Mcp-Session-Id", "Mcp-Protocol-Version"];
/** MCP tool names (1–128 visible ASCII characters): anything else is refused before it is held or forwarded. */
const TOOL_NAME_RE = /^[\x21-\x7e]{1,128}$/;
/** The id a paid tools/call is forwarded with is this prefix + its call id; a caller's id may not use it. */
const UPSTREAM_ID_PREFIX = "mcpay-";
/** Keys an upstream may match case-insensitively (Go's encoding/json also folds ſ→s and K→k). */
const RPC_KEYS = new Set(["jsonrpc", "id", "method", "params", "result", "error", "name", "arguments", "_meta"]);

const META_CHARGED = "io.mcpay/charged_mcents";
const META_BALANCE = "io.mcpay/balance_mcents";
const META_REQUEST_ID = "io.mcpay/request_id";
const META_REFUNDED = "io.mcpay/refunded";
const META_PRICE = "io.mcpay/price_mcents";
const META_SCOPE = "io.mcpay/scope";

// ---------------------------------------------------------------- the upstream table

export function upstreamByName(table: readonly UpstreamConfig[], name: string): UpstreamConfig | undefined {
  return table.find((u) => u.name === name);
}

/** The price of one tools/call of `tool`: its own price (0 = free), else the upstream's default. */
export function toolPrice(u: UpstreamConfig, tool: string): number {
  for (const [name, price] of u.tools) if (name === tool) return price;
  return u.priceMcents;
}

/** The `upstreams` of GET /v1/pricing (contract 3.2), in manifest order. */
export function upstreamsPricing(table: readonly UpstreamConfig[] = UPSTREAMS): Record<string, unknown>[] {
  return table.map((u) => ({
    name: u.name,
    path: `${UPSTREAM_PATH_PREFIX}${u.name}`,
    price_mcents: u.priceMcents,
    scope: u.scope,
    description: u.description,
    rate_limit_per_minute: u.rateLimitPerMinute,
    enabled: u.enabled,
    refund_tool_errors: u.refundToolErrors,
    // "http" or "sse" (a `command` upstream, "stdio", is refused by the CLI for Workers).
    transport: u.transport,
    tools: Object.fromEntries(u.tools.map(([name, price]) => [name, price])),
  }));
}

/** The hold terms of a priced tool: the endpoint `<NAME>/<tool>`, the upstream's scope, one rate window per upstream. */
function holdTerms(u: UpstreamConfig, price: number): HoldTerms {
  return { priceMcents: price, scope: u.scope, rateKey: `${UPSTREAM_PATH_PREFIX}${u.name}`, rateLimitPerMinute: u.rateLimitPerMinute, timeoutMs: u.timeoutMs };
}

// ---------------------------------------------------------------- JSON-RPC and SSE

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function rpcError(status: number, code: number, message: string, id: unknown = null, data?: unknown): Response {
  return new Response(JSON.stringify({ jsonrpc: "2.0", id, error: { code, message, ...(data !== undefined ? { data } : {}) } }), {
    status,
    headers: { "Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff" },
  });
}

function sameId(a: unknown, b: unknown): boolean {
  return (typeof a === "string" || typeof a === "number") && a === b;
}

/** The JSON-RPC response to the request with this id, or null (a message with `method` never is one). */
function responseTo(msg: unknown, id: unknown): Json | null {
  // Matched by the id alone (as axum does): an upstream that leaves out `jsonrpc` is still answered.
  if (!isObject(msg) || "method" in msg || !sameId(msg.id, id)) return null;
  if (isObject(msg.result) || isObject(msg.error)) return msg;
  return null;
}

/** A JSON-RPC response (result or error, no `method`), or a batch holding one. */
function isResponseLike(msg: unknown): boolean {
  if (Array.isArray(msg)) return msg.some(isResponseLike);
  return isObject(msg) && !("method" in msg) && ("result" in msg || "error" in msg);
}

/** A key that is not byte-equal to a JSON-RPC / MCP key but that a case-folding upstream would read as one. */
function foldedKey(obj: Json): string | null {
  for (const k of Object.keys(obj)) {
    const folded = k.replace(/[A-Z]/g, (c) => c.toLowerCase()).replace(/\u017f/g, "s").replace(/\u212a/g, "k");
    if (folded !== k && RPC_KEYS.has(folded)) return k;
  }
  return null;
}

/** One server-sent event: its lines (field lines and comments, without the blank line that ends it) and its data. */
export interface SseEvent {
  readonly lines: readonly string[];
  readonly data: string | null;
}

/**
 * An incremental parser of text/event-stream (the WHATWG rules: lines end with CRLF, LF or CR; a
 * blank line ends an event; `data` lines join with LF; an event cut off by the end of the stream
 * is not dispatched). An event larger than `maxEventChars` is an error (the stream is bounded).
 */
export class SseParser {
  private readonly decoder = new TextDecoder();
  private buf = "";
  private lines: string[] = [];
  private eventChars = 0;

  constructor(private readonly maxEventChars: number = UPSTREAM_MAX_JSON_BYTES) {}

  push(chunk: Uint8Array): SseEvent[] {
    this.buf += this.decoder.decode(chunk, { stream: true });
    return this.drain(false);
  }

  end(): SseEvent[] {
    this.buf += this.decoder.decode();
    return this.drain(true);
  }

  private drain(final: boolean): SseEvent[] {
    const out: SseEvent[] = [];
    let pos = 0;
    const buf = this.buf;
    for (;;) {
      let i = pos;
      while (i < buf.length && buf[i] !== "\n" && buf[i] !== "\r") i++;
      if (i >= buf.length) break;
      // A CR at the very end may be the first half of a CRLF split across chunks.
      if (buf[i] === "\r" && i === buf.length - 1 && !final) break;
      const line = buf.slice(pos, i);
      pos = buf[i] === "\r" && buf[i + 1] === "\n" ? i + 2 : i + 1;
      if (line === "") {
        if (this.lines.length > 0) out.push(sseEvent(this.lines));
        this.lines = [];
        this.eventChars = 0;
      } else {
        this.lines.push(line);
        this.eventChars += line.length + 1;
      }
    }
    this.buf = buf.slice(pos);
    if (this.eventChars + this.buf.length > this.maxEventChars) throw new Error(`an event of the upstream's stream is larger than ${this.maxEventChars} characters`);
    if (final) {
      this.buf = "";
      this.lines = [];
    }
    return out;
  }
}

function sseEvent(lines: string[]): SseEvent {
  const data: string[] = [];
  for (const l of lines) {
    if (l === "data") data.push("");
    else if (l.startsWith("data:")) data.push(l.slice(l.startsWith("data: ") ? 6 : 5));
  }
  return { lines, data: data.length > 0 ? data.join("\n") : null };
}

const encoder = new TextEncoder();

/** An event as bytes; `data` replaces its data lines (one line: JSON has no raw newline). */
function sseBytes(ev: SseEvent, data?: string): Uint8Array {
  if (data === undefined) return encoder.encode(`${ev.lines.join("\n")}\n\n`);
  const lines: string[] = [];
  let placed = false;
  for (const l of ev.lines) {
    if (l === "data" || l.startsWith("data:")) {
      if (!placed) lines.push(`data: ${data}`);
      placed = true;
    } else {
      lines.push(l);
    }
  }
  return encoder.encode(`${lines.join("\n")}\n\n`);
}

function parseJson(text: string | null): unknown {
  if (text === null) return undefined;
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return undefined;
  }
}

/** Reads a body up to `limit` bytes as text; null when it is longer (the rest is cancelled). */
async function readUpTo(body: ReadableStream<Uint8Array> | null, limit: number): Promise<string | null> {
  const bytes = await readStreamUpTo(body, limit);
  return bytes === null ? null : new TextDecoder().decode(bytes);
}

function mediaType(res: Response): string {
  return (res.headers.get("Content-Type") ?? "").split(";", 1)[0]!.trim().toLowerCase();
}

/** A tools/list result with each tool's terms in `_meta` (the upstream's own `_meta` keys kept). */
function withToolTerms(msg: Json, u: UpstreamConfig): Json {
  const result = msg.result;
  if (!isObject(result) || !Array.isArray(result.tools)) return msg;
  const tools = result.tools.map((t: unknown) => {
    if (!isObject(t) || typeof t.name !== "string") return t;
    const meta = isObject(t._meta) ? t._meta : {};
    return { ...t, _meta: { ...meta, [META_PRICE]: toolPrice(u, t.name), [META_SCOPE]: u.scope } };
  });
  return { ...msg, result: { ...result, tools } };
}

// ---------------------------------------------------------------- the route

interface Target {
  readonly url: string;
  readonly headers: readonly (readonly [string, string])[];
}

/** The upstream's URL and configured headers from the environment; null (logged) when one is missing. */
function resolveTarget(u: UpstreamConfig, env: AppEnv, requestId: string): Target | null {
  const vars = env as unknown as Record<string, unknown>;
  const override = vars[u.urlEnv];
  const url = typeof override === "string" && override !== "" ? override : u.url;
  const missing: string[] = [];
  if (url === "") missing.push(u.urlEnv);
  const headers: [string, string][] = [];
  for (const [header, name] of u.headers) {
    const v = vars[name];
    if (typeof v === "string" && v !== "") headers.push([header, v]);
    else missing.push(name);
  }
  if (missing.length > 0) {
    console.error(JSON.stringify({ msg: "upstream not configured", upstream: u.name, missing, request_id: requestId }));
    return null;
  }
  return { url, headers };
}

/** /mcp/<NAME> (contract 3.12). Every answer carries X-Request-Id; a known upstream's also the CORS of /mcp. */
export async function handleUpstream(
  request: Request,
  env: AppEnv,
  ctx: ExecutionContext,
  requestId: string,
  url: URL,
  options: AppOptions,
): Promise<Response> {
  const u = upstreamByName(options.upstreams ?? UPSTREAMS, url.pathname.slice(UPSTREAM_PATH_PREFIX.length));
  if (u === undefined) return withHeaders(errorResponse(404, "not_found", requestId), { "X-Request-Id": requestId });
  const res = await answering(requestId, () => proxy(u, request, env, ctx, requestId, options));
  return withHeaders(res, { "X-Request-Id": requestId, ...MCP_CORS_HEADERS });
}

interface Forward {
  readonly u: UpstreamConfig;
  readonly target: Target;
  readonly request: Request;
  readonly method: string;
  readonly body: string | null;
  /** The gateway's id of this request (X-Request-Id). */
  readonly callId: string;
}

async function proxy(u: UpstreamConfig, request: Request, env: AppEnv, ctx: ExecutionContext, requestId: string, options: AppOptions): Promise<Response> {
  const method = request.method.toUpperCase();
  if (method === "OPTIONS") {
    return new Response(null, { status: 204, headers: { "Access-Control-Allow-Methods": ALLOW, "Access-Control-Max-Age": "86400" } });
  }
  if (method !== "GET" && method !== "POST" && method !== "DELETE") throw new HttpError(405, "method_not_allowed", { headers: { Allow: ALLOW } });
  if (!u.enabled) throw new HttpError(503, "upstream_disabled");
  const target = resolveTarget(u, env, requestId);
  if (target === null) throw new HttpError(503, "upstream_unavailable");
  const bearer = parseBearer(request.headers.get("Authorization"));
  if (!bearer.ok) throw new HttpError(401, bearer.code);
  const stub = keyStubFor(env, await sha256Hex(bearer.key), options);

  // One JSON-RPC message per POST, read whole (bounded) before anything is forwarded.
  let body: string | null = null;
  let msg: Json | null = null;
  if (method === "POST") {
    try {
      body = await readBoundedText(request, GATEWAY.maxBodyBytes);
    } catch (err) {
      if (err instanceof HttpError && err.code === "body_too_large") throw new HttpError(413, "body_too_large", { ...err.opts, noCharge: false });
      return rpcError(400, -32700, "Parse error: the body is not UTF-8 JSON.");
    }
    const parsed = parseJson(body);
    if (parsed === undefined) return rpcError(400, -32700, "Parse error: the body is not JSON.");
    if (Array.isArray(parsed)) return rpcError(400, -32600, "Invalid Request: send one JSON-RPC message per request (no batches). Nothing was forwarded or charged.");
    if (!isObject(parsed)) return rpcError(400, -32600, "Invalid Request: a JSON-RPC message is a JSON object.");
    const folded = foldedKey(parsed) ?? (isObject(parsed.params) ? foldedKey(parsed.params) : null);
    if (folded !== null) return rpcError(400, -32600, `Invalid Request: the key ${JSON.stringify(folded)} differs from a JSON-RPC/MCP key only by case. Nothing was forwarded or charged.`);
    if (typeof parsed.id === "string" && parsed.id.startsWith(UPSTREAM_ID_PREFIX)) return rpcError(400, -32600, `Invalid Request: ids starting with "${UPSTREAM_ID_PREFIX}" are the gateway's. Nothing was forwarded or charged.`);
    msg = parsed;
  }
  const fwd: Forward = { u, target, request, method, body, callId: requestId };

  let badName: Response | null = null;
  if (msg !== null && msg.method === "tools/call") {
    const id = msg.id;
    if (typeof id !== "string" && (typeof id !== "number" || !Number.isInteger(id))) return rpcError(400, -32600, "Invalid Request: tools/call must be a request with a string or integer id.");
    const tool = isObject(msg.params) ? msg.params.name : undefined;
    if (typeof tool === "string" && TOOL_NAME_RE.test(tool)) {
      const price = toolPrice(u, tool);
      // The hold checks the key and the scope itself (HTTP 401 / 403), atomically with the charge.
      if (price > 0) return paidCall({ ...fwd, body: paidBody(msg, `${UPSTREAM_ID_PREFIX}${requestId}`) }, stub, id, tool, price, ctx, requestId);
    } else {
      badName = rpcError(200, -32602, "Invalid params: params.name must be a tool name (1 to 128 visible ASCII characters).", id, { code: "invalid_input", note: "no charge applied" });
    }
  }

  // Free traffic: the key must exist and hold the upstream's scope (read-only: nothing is written).
  const stats = await stub.stats();
  if (stats === null) throw new HttpError(401, "invalid_key");
  if (!stats.scopes.includes(u.scope)) throw new HttpError(403, "scope_denied", { extra: { required_scope: u.scope } });
  // A legacy HTTP+SSE upstream is served without sessions: no event stream to open, none to end
  // (after the key check: every method needs a key, contract 3.12).
  if (u.transport === "sse" && method !== "POST") throw new HttpError(405, "method_not_allowed", { headers: { Allow: "POST, OPTIONS" } });
  return badName ?? freeForward(fwd, msg);
}

/**
 * A paid tools/call as forwarded: re-serialized from the parsed message with the gateway's id and
 * only jsonrpc / id / method / params (params: only name / arguments / _meta), never the raw bytes.
 */
function paidBody(msg: Json, upstreamId: string): string {
  const params = msg.params as Json;
  const kept: Json = {};
  for (const k of ["name", "arguments", "_meta"]) if (k in params) kept[k] = params[k];
  return JSON.stringify({ jsonrpc: msg.jsonrpc, id: upstreamId, method: msg.method, params: kept });
}

/** The upstream's answer to the request: a Streamable HTTP server's, or a legacy session's made into one. */
function exchange(fwd: Forward, signal: AbortSignal): Promise<Response> {
  return fwd.u.transport === "sse" ? legacyExchange(fwd, signal) : fetchUpstream(fwd, signal);
}

/** Sends the request to the upstream (as URL + init: the body is the text already read). */
function fetchUpstream(fwd: Forward, signal: AbortSignal): Promise<Response> {
  const headers = new Headers();
  for (const h of FORWARDED_REQUEST_HEADERS) {
    const v = fwd.request.headers.get(h);
    if (v !== null) headers.set(h, v);
  }
  if (fwd.method === "POST") {
    headers.set("Content-Type", "application/json");
    const accept = headers.get("Accept") ?? "";
    if (!accept.includes("application/json") || !accept.includes("text/event-stream")) headers.set("Accept", "application/json, text/event-stream");
  } else if (fwd.method === "GET" && !headers.has("Accept")) {
    headers.set("Accept", "text/event-stream");
  }
  for (const [h, v] of fwd.target.headers) headers.set(h, v);
  return fetch(fwd.target.url, { method: fwd.method, headers, body: fwd.body, signal, redirect: "manual" });
}

// ---------------------------------------------------------------- a legacy HTTP+SSE upstream

/** The protocol version of the HTTP+SSE transport, offered in the gateway's own initialize. */
const LEGACY_PROTOCOL_VERSION = "2024-11-05";

/** An event's type: its last `event` field, "message" without one (the WHATWG rules). */
function eventType(ev: SseEvent): string {
  let type = "message";
  for (const l of ev.lines) {
    if (l === "event") type = "message";
    else if (l.startsWith("event:")) type = l.slice(l.startsWith("event: ") ? 7 : 6) || "message";
  }
  return type;
}

/** The events of a stream, as they arrive (an event larger than 4 MiB is an error). */
async function* sseEvents(reader: ReadableStreamDefaultReader<Uint8Array>): AsyncGenerator<SseEvent, void> {
  const parser = new SseParser();
  for (;;) {
    const chunk = await reader.read();
    if (chunk.done) {
      yield* parser.end();
      return;
    }
    yield* parser.push(chunk.value);
  }
}

/**
 * Reads a session's stream up to the response to `id` (its event; null when the stream ends first).
 * Messages with a `method` met on the way (notifications, server requests) go to `relay`; anything
 * else (other responses, not JSON, other event types) is dropped.
 */
async function sessionResponse(events: AsyncGenerator<SseEvent, void>, id: string | number, relay: (ev: SseEvent) => void): Promise<SseEvent | null> {
  for (let next = await events.next(); !next.done; next = await events.next()) {
    const ev = next.value;
    if (eventType(ev) !== "message") continue;
    const msg = parseJson(ev.data);
    if (responseTo(msg, id) !== null) return ev;
    if (isObject(msg) && typeof msg.method === "string" && !("result" in msg) && !("error" in msg)) relay(ev);
  }
  return null;
}

/**
 * A legacy HTTP+SSE upstream (contract 3.12, transport "sse"): one session per request. GET the
 * event stream, POST to the URL of its first `endpoint` event (same origin only) the gateway's own
 * initialize and notifications/initialized (unless the message is an initialize), then the message;
 * its answer is the session's message carrying its id. Returned as a Streamable HTTP server would
 * answer, once the message was accepted (so X-Upstream-Duration-Ms is the time until then): an
 * application/json Response whose body is that response, or — when the request asks for progress
 * and the caller accepts event streams — a text/event-stream of the session's messages with a
 * `method`, then the response, ending right after it (the session is closed then). A status >= 400
 * of the GET or of a POST is returned as the answer; the stream ending first errors the body.
 * `signal` is the deadline of the whole session. Notifications and responses → 202, nothing sent.
 */
async function legacyExchange(fwd: Forward, signal: AbortSignal): Promise<Response> {
  const msg = parseJson(fwd.body) as Json;
  const id = msg.id;
  if (typeof msg.method !== "string" || (typeof id !== "string" && typeof id !== "number")) return new Response(null, { status: 202 });
  const stream = new URL(fwd.target.url);
  const headers = (h: Record<string, string>): Headers => {
    const out = new Headers(h);
    for (const [k, v] of fwd.target.headers) out.set(k, v);
    return out;
  };
  // The upstream's own failure (status, content type and body only: no session header passes back).
  const failure = (res: Response): Response => {
    const type = res.headers.get("Content-Type");
    return new Response(res.body, { status: res.status, headers: type === null ? {} : { "Content-Type": type } });
  };

  const get = await fetch(stream, { method: "GET", headers: headers({ Accept: "text/event-stream" }), signal, redirect: "manual" });
  if (get.status >= 400) return failure(get);
  if (get.status !== 200 || mediaType(get) !== "text/event-stream" || get.body === null) {
    await get.body?.cancel().catch(() => {});
    throw new Error(`the upstream's event stream answered ${get.status} ${mediaType(get) || "without a content type"}`);
  }
  const reader = get.body.getReader();
  const close = (): void => void reader.cancel().catch(() => {});
  const events = sseEvents(reader);
  let handedOver = false;
  try {
    let endpoint: URL | null = null;
    while (endpoint === null) {
      const next = await events.next();
      if (next.done) break;
      if (eventType(next.value) !== "endpoint") continue;
      const data = (next.value.data ?? "").trim();
      if (data === "") throw new Error("the upstream's endpoint event names no URL");
      endpoint = new URL(data, stream);
    }
    if (endpoint === null) throw new Error("the upstream's event stream ended without an endpoint event");
    if (endpoint.origin !== stream.origin) throw new Error(`the upstream's endpoint event names another origin (${endpoint.origin})`);
    const target = endpoint;
    /** POSTs one message: null once accepted, else the upstream's failure (a status >= 400). */
    const post = async (body: string): Promise<Response | null> => {
      const res = await fetch(target, { method: "POST", headers: headers({ "Content-Type": "application/json" }), body, signal, redirect: "manual" });
      if (res.status >= 400) return failure(res);
      await res.body?.cancel().catch(() => {});
      if (res.status < 200 || res.status > 299) throw new Error(`the upstream answered a message with ${res.status}`);
      return null;
    };

    if (msg.method !== "initialize") {
      // An id of its own: the call's id is first shown to the upstream with the call itself.
      const initId = `${UPSTREAM_ID_PREFIX}init-${crypto.randomUUID()}`;
      const params = { protocolVersion: LEGACY_PROTOCOL_VERSION, capabilities: {}, clientInfo: { name: "mcpay-gateway", version: PROJECT.version } };
      const refused = await post(JSON.stringify({ jsonrpc: "2.0", id: initId, method: "initialize", params }));
      if (refused !== null) return refused;
      const init = await sessionResponse(events, initId, () => {});
      const initialized = init === null ? null : responseTo(parseJson(init.data), initId);
      if (initialized === null || !isObject(initialized.result)) throw new Error("the upstream did not initialize the session");
      const refusedNote = await post(JSON.stringify({ jsonrpc: "2.0", method: "notifications/initialized" }));
      if (refusedNote !== null) return refusedNote;
    }
    const refused = await post(fwd.body!);
    if (refused !== null) return refused;

    const meta = isObject(msg.params) && isObject(msg.params._meta) ? msg.params._meta : {};
    const streamed = meta.progressToken !== undefined && meta.progressToken !== null && (fwd.request.headers.get("Accept") ?? "").toLowerCase().includes("text/event-stream");
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        void (async () => {
          try {
            const answer = await sessionResponse(events, id, (ev) => {
              if (streamed) controller.enqueue(sseBytes(ev));
            });
            if (answer === null) throw new Error("the upstream's event stream ended before the response");
            controller.enqueue(streamed ? sseBytes(answer) : encoder.encode(answer.data!));
            controller.close();
          } catch (err) {
            try {
              controller.error(err);
            } catch {
              // The reader went away: nothing to tell.
            }
          } finally {
            close();
          }
        })();
      },
      cancel: close,
    });
    handedOver = true;
    return new Response(body, { status: 200, headers: { "Content-Type": streamed ? "text/event-stream" : "application/json" } });
  } finally {
    if (!handedOver) close();
  }
}

function answerHeaders(upstream: Response, durationMs: number, extra: Record<string, string> = {}): Headers {
  const headers = new Headers();
  for (const h of FORWARDED_RESPONSE_HEADERS) {
    const v = upstream.headers.get(h);
    if (v !== null) headers.set(h, v);
  }
  headers.set("X-Content-Type-Options", "nosniff");
  headers.set("X-Upstream-Duration-Ms", String(durationMs));
  for (const [k, v] of Object.entries(extra)) headers.set(k, v);
  return headers;
}

function gatewayError(status: number, code: ErrorCode, requestId: string, extra: Record<string, string> = {}, money?: Released, message?: string): Response {
  const res = errorResponse(status, code, requestId, { ...(money ? { extra: money } : {}), ...(message ? { message } : {}) });
  return withHeaders(res, extra);
}

/** Forwards a message that costs nothing (and GET / DELETE); tools/list results gain each tool's terms. */
async function freeForward(fwd: Forward, msg: Json | null): Promise<Response> {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), fwd.u.timeoutMs);
  const started = Date.now();
  let res: Response;
  try {
    res = await exchange(fwd, ac.signal);
  } catch (err) {
    clearTimeout(timer);
    const timedOut = ac.signal.aborted;
    console.error(JSON.stringify({ msg: timedOut ? "upstream timed out" : "upstream unreachable", upstream: fwd.u.name, error: String(err) }));
    throw new HttpError(timedOut ? 504 : 502, timedOut ? "upstream_timeout" : "upstream_failed", { headers: { "X-Upstream-Duration-Ms": String(Date.now() - started) } });
  }
  // A stream (GET, an SSE answer) lives as long as the caller keeps it: only the headers are timed.
  // A legacy session is timed to its end (timeout_ms from its GET): its answer is still to come.
  if (fwd.u.transport !== "sse") clearTimeout(timer);
  const headers = answerHeaders(res, Date.now() - started);
  if (fwd.u.transport === "sse" && res.status >= 500) {
    // A legacy session's failure is the gateway's 502 (contract 3.12), as on axum.
    clearTimeout(timer);
    await res.body?.cancel().catch(() => {});
    throw new HttpError(502, "upstream_failed", { headers: { "X-Upstream-Duration-Ms": headers.get("X-Upstream-Duration-Ms") ?? "0" } });
  }
  if (fwd.method === "GET" && res.body !== null && mediaType(res) === "text/event-stream") {
    // A GET stream carries the upstream's requests and notifications; a response on it (a replay of
    // some call's answer) is dropped, so no paid result reaches the caller outside its settlement.
    const parser = new SseParser();
    const pass = (ev: SseEvent, controller: TransformStreamDefaultController<Uint8Array>): void => {
      if (!isResponseLike(parseJson(ev.data))) controller.enqueue(sseBytes(ev));
    };
    const stream = res.body.pipeThrough(
      new TransformStream<Uint8Array, Uint8Array>({
        transform(chunk, controller) {
          for (const ev of parser.push(chunk)) pass(ev, controller);
        },
        flush(controller) {
          for (const ev of parser.end()) pass(ev, controller);
        },
      }),
    );
    return new Response(stream, { status: res.status, headers });
  }
  const listId = msg !== null && msg.method === "tools/list" ? msg.id : undefined;
  const type = mediaType(res);
  // A tools/list answer is read whole to be rewritten; a legacy session's JSON answer too, within
  // its deadline (a timeout is then a 504, not a cut body).
  const whole = type === "application/json" && (listId !== undefined || fwd.u.transport === "sse");
  if (res.status !== 200 || (listId === undefined && !whole)) return new Response(res.body, { status: res.status, headers });

  if (whole) {
    const text = await readUpTo(res.body, UPSTREAM_MAX_JSON_BYTES)
      .catch((err: unknown) => {
        const timedOut = ac.signal.aborted;
        console.error(JSON.stringify({ msg: timedOut ? "upstream timed out" : "upstream answer failed", upstream: fwd.u.name, error: String(err) }));
        throw new HttpError(timedOut ? 504 : 502, timedOut ? "upstream_timeout" : "upstream_failed");
      })
      .finally(() => clearTimeout(timer));
    if (text === null) throw new HttpError(502, "upstream_failed", { message: "The upstream's answer is larger than 4 MiB." });
    const answer = listId === undefined ? null : responseTo(parseJson(text), listId);
    headers.set("Cache-Control", "no-store");
    return new Response(answer === null ? text : JSON.stringify(withToolTerms(answer, fwd.u)), { status: 200, headers });
  }
  if (type === "text/event-stream" && res.body !== null) {
    const parser = new SseParser();
    const rewrite = (ev: SseEvent): Uint8Array => {
      const answer = responseTo(parseJson(ev.data), listId);
      return answer === null ? sseBytes(ev) : sseBytes(ev, JSON.stringify(withToolTerms(answer, fwd.u)));
    };
    const stream = res.body.pipeThrough(
      new TransformStream<Uint8Array, Uint8Array>({
        transform(chunk, controller) {
          for (const ev of parser.push(chunk)) controller.enqueue(rewrite(ev));
        },
        flush(controller) {
          for (const ev of parser.end()) controller.enqueue(rewrite(ev));
        },
      }),
    );
    return new Response(stream, { status: 200, headers });
  }
  return new Response(res.body, { status: res.status, headers });
}

// ---------------------------------------------------------------- a paid tools/call

/** The terms of a settled call in a result's `_meta` (contract 3.12). */
function chargeMeta(money: Released, callId: string): Json {
  return {
    [META_CHARGED]: money.charged_mcents,
    [META_BALANCE]: money.balance_mcents,
    [META_REQUEST_ID]: callId,
    ...(money.refunded ? { [META_REFUNDED]: true } : {}),
    ...(money.refund_pending ? { "io.mcpay/refund_pending": true } : {}),
  };
}

function withChargeMeta(answer: Json, money: Released, callId: string): Json {
  const result = answer.result;
  if (!isObject(result)) return answer;
  const meta = isObject(result._meta) ? result._meta : {};
  return { ...answer, result: { ...result, _meta: { ...meta, ...chargeMeta(money, callId) } } };
}

function moneyHeaders(money: Released): Record<string, string> {
  return { "X-Charged-Mcents": String(money.charged_mcents), "X-Balance-Mcents": String(money.balance_mcents) };
}

type Settlement = "capture" | "release";

/** What the upstream's response settles: a result is captured (a tool error released when configured), an error released. */
function settlementOf(answer: Json, u: UpstreamConfig): Settlement {
  if (isObject(answer.error)) return "release";
  const result = answer.result as Json;
  return result.isError === true && u.refundToolErrors ? "release" : "capture";
}

async function paidCall(
  fwd: Forward,
  stub: DurableObjectStub<KeyDO>,
  id: string | number,
  tool: string,
  price: number,
  ctx: ExecutionContext,
  callId: string,
): Promise<Response> {
  const { u } = fwd;
  // The hold, the forward and the settlement are one promise under waitUntil: a caller that
  // disconnects (even during the hold) cannot leave a hold without a capture or a release (the
  // event-stream pump registers itself too).
  const work = (async (): Promise<Response> => {
    // The hold: key, scope, the upstream's rate limit, balance — one atomic step in the key's object.
    const hold = await stub.hold(`${u.name}/${tool}`, callId, { terms: holdTerms(u, price) });
    if (!hold.ok) {
      if (hold.code === "invalid_key") throw new HttpError(401, "invalid_key");
      if (hold.code === "scope_denied") throw new HttpError(403, "scope_denied", { extra: { required_scope: u.scope } });
      if (hold.code === "replay" || hold.code === "unknown_endpoint") throw new Error(`upstream hold refused: ${hold.code}`);
      // Balance and rate limit: a JSON-RPC error with the request's id (3.11's table), nothing forwarded.
      const err = toRpcError(holdRefusal(hold, u.scope, u.rateLimitPerMinute));
      return rpcError(200, err.code, err.message, id, err.data);
    }
    const charge: Charge = { chargedMcents: hold.chargedMcents, balanceMcents: hold.balanceMcents };
    return forwardPaid({ fwd, stub, id, upstreamId: `${UPSTREAM_ID_PREFIX}${callId}`, charge, callId, ctx });
  })();
  ctx.waitUntil(work.then(
    () => undefined,
    () => undefined,
  ));
  return work;
}

interface PaidForward {
  readonly fwd: Forward;
  readonly stub: DurableObjectStub<KeyDO>;
  /** The caller's id (put back in the answer) and the gateway's id the call was forwarded with. */
  readonly id: string | number;
  readonly upstreamId: string;
  readonly charge: Charge;
  readonly callId: string;
  readonly ctx: ExecutionContext;
}

/**
 * Captures or releases (reason `upstream`: never counted against the refund cap); the money fields
 * of the answer. An outcome the gateway does not know (every RPC attempt failed, or the hold's state
 * is "unknown") is never answered as refunded: `refund_pending`, charged the held price (the KeyDO's
 * alarm releases a hold still open past its deadline).
 */
async function settle(c: PaidForward, how: Settlement): Promise<Released> {
  const pending: Released = { refunded: false, refund_pending: true, charged_mcents: c.charge.chargedMcents, balance_mcents: c.charge.balanceMcents };
  if (how === "release") {
    const released = await settleWithRetry("release", c.callId, async (): Promise<SettleResult> => await c.stub.release(c.callId, "upstream"));
    if (released === null || released.state === "unknown") return pending;
    return { refunded: released.refunded, charged_mcents: released.refunded ? 0 : c.charge.chargedMcents, balance_mcents: released.balanceMcents };
  }
  const captured = await settleWithRetry("capture", c.callId, async (): Promise<CaptureResult> => await c.stub.capture(c.callId));
  if (captured === null || (!captured.ok && captured.state === "unknown")) return pending;
  if (captured.ok) return { refunded: false, charged_mcents: c.charge.chargedMcents, balance_mcents: c.charge.balanceMcents };
  // Released meanwhile (past its deadline): nothing is charged for this answer.
  return { refunded: true, charged_mcents: 0, balance_mcents: captured.balanceMcents };
}

function failMessage(status: 502 | 504, money: Released): string {
  return `The upstream MCP server ${status === 504 ? "did not answer in time" : "failed"}; the held price ${money.refund_pending ? "will be released shortly" : "was released"}.`;
}

async function forwardPaid(c: PaidForward): Promise<Response> {
  const { u } = c.fwd;
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), u.timeoutMs);
  const started = Date.now();
  const failed = async (status: 502 | 504, why: string, headers: Record<string, string> = {}): Promise<Response> => {
    clearTimeout(timer);
    console.error(JSON.stringify({ msg: "upstream call failed", upstream: u.name, request_id: c.callId, status, why }));
    const money = await settle(c, "release");
    return gatewayError(status, status === 504 ? "upstream_timeout" : "upstream_failed", c.callId, { ...headers, ...moneyHeaders(money) }, money, failMessage(status, money));
  };

  let res: Response;
  try {
    res = await exchange(c.fwd, ac.signal);
  } catch (err) {
    return failed(ac.signal.aborted ? 504 : 502, String(err), { "X-Upstream-Duration-Ms": String(Date.now() - started) });
  }
  const duration = { "X-Upstream-Duration-Ms": String(Date.now() - started) };
  if (res.status >= 400) {
    if (res.status >= 500) {
      await res.body?.cancel().catch(() => {});
      return failed(502, `upstream status ${res.status}`, duration);
    }
    // A 4xx is the upstream's own answer (e.g. an expired session): released, passed on as it is.
    const text = await readUpTo(res.body, UPSTREAM_MAX_JSON_BYTES).catch(() => null);
    clearTimeout(timer);
    const money = await settle(c, "release");
    return new Response(text ?? "", { status: res.status, headers: answerHeaders(res, Date.now() - started, moneyHeaders(money)) });
  }
  const type = mediaType(res);
  if (type === "text/event-stream" && res.body !== null && res.status === 200) return streamPaid(c, res, ac, timer, Date.now() - started);
  if (type !== "application/json" || res.status !== 200) {
    await res.body?.cancel().catch(() => {});
    return failed(502, `not a JSON-RPC answer (status ${res.status}, ${type || "no content type"})`, duration);
  }
  let text: string | null;
  try {
    text = await readUpTo(res.body, UPSTREAM_MAX_JSON_BYTES);
  } catch (err) {
    return failed(ac.signal.aborted ? 504 : 502, String(err), duration);
  }
  if (text === null) return failed(502, "answer larger than 4 MiB", duration);
  const upstreamAnswer = responseTo(parseJson(text), c.upstreamId);
  if (upstreamAnswer === null) return failed(502, "not a JSON-RPC response to the call", duration);
  const answer = { ...upstreamAnswer, id: c.id };
  clearTimeout(timer);
  const money = await settle(c, settlementOf(answer, u));
  const headers = answerHeaders(res, Date.now() - started, moneyHeaders(money));
  headers.set("X-Upstream-Duration-Ms", duration["X-Upstream-Duration-Ms"]);
  headers.set("Content-Type", "application/json");
  headers.set("Cache-Control", "no-store");
  return new Response(JSON.stringify(withChargeMeta(answer, money, c.callId)), { status: 200, headers });
}

/**
 * An event stream: passed on event by event as it arrives; the event carrying the call's response
 * is settled before it is written. The pump runs under waitUntil and keeps reading (within the
 * time limit) after the caller went away, so the hold is always settled. A stream that fails or
 * ends before the response gets a final event: a result with isError and the 502/504 body.
 */
function streamPaid(c: PaidForward, res: Response, ac: AbortController, timer: ReturnType<typeof setTimeout>, durationMs: number): Response {
  const { u } = c.fwd;
  const { readable, writable } = new TransformStream<Uint8Array, Uint8Array>();
  const writer = writable.getWriter();
  let callerGone = false;
  writer.closed.catch(() => {
    callerGone = true;
  });
  const send = (bytes: Uint8Array): void => {
    if (callerGone) return;
    // Not awaited before the response is settled: a slow reader never delays the settlement.
    writer.write(bytes).catch(() => {
      callerGone = true;
    });
  };
  const failure = async (status: 502 | 504, why: string): Promise<void> => {
    console.error(JSON.stringify({ msg: "upstream call failed", upstream: u.name, request_id: c.callId, status, why }));
    const money = await settle(c, "release");
    const body = errorBody(status === 504 ? "upstream_timeout" : "upstream_failed", c.callId, { message: failMessage(status, money), extra: money });
    const result = { content: [{ type: "text", text: JSON.stringify(body) }], structuredContent: body, isError: true, _meta: chargeMeta(money, c.callId) };
    send(encoder.encode(`event: message\ndata: ${JSON.stringify({ jsonrpc: "2.0", id: c.id, result })}\n\n`));
  };

  const pump = (async () => {
    const reader = res.body!.getReader();
    const parser = new SseParser();
    let settled = false;
    try {
      for (;;) {
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await reader.read();
        } catch (err) {
          if (!settled) await failure(ac.signal.aborted ? 504 : 502, String(err));
          settled = true;
          break;
        }
        let events: SseEvent[];
        try {
          events = chunk.done ? parser.end() : parser.push(chunk.value);
        } catch (err) {
          if (!settled) await failure(502, String(err));
          settled = true;
          await reader.cancel().catch(() => {});
          break;
        }
        for (const ev of events) {
          if (settled) {
            send(sseBytes(ev));
            continue;
          }
          const msg = parseJson(ev.data);
          const answer = responseTo(msg, c.upstreamId);
          if (answer === null) {
            // Until the call is settled only requests and notifications pass: anything else (not
            // JSON, a batch, another response, a message mixing `method` with a result) is dropped.
            if (isObject(msg) && "method" in msg && !("result" in msg) && !("error" in msg)) send(sseBytes(ev));
            continue;
          }
          clearTimeout(timer);
          settled = true;
          const money = await settle(c, settlementOf(answer, u));
          send(sseBytes(ev, JSON.stringify(withChargeMeta({ ...answer, id: c.id }, money, c.callId))));
        }
        if (chunk.done) break;
        if (settled && callerGone) {
          await reader.cancel().catch(() => {});
          break;
        }
      }
      if (!settled) {
        settled = true;
        await failure(502, "the stream ended before the response");
      }
    } finally {
      clearTimeout(timer);
      if (!callerGone) writer.close().catch(() => {});
    }
  })();
  c.ctx.waitUntil(pump.catch((err: unknown) => console.error(JSON.stringify({ msg: "upstream stream pump failed", request_id: c.callId, error: String(err) }))));

  const headers = answerHeaders(res, durationMs, moneyHeaders({ refunded: false, charged_mcents: c.charge.chargedMcents, balance_mcents: c.charge.balanceMcents }));
  return new Response(readable, { status: 200, headers });
}
