// The HTTP gateway. `createApp(handlers, options)` builds the worker; src/index.ts wires in the
// generated handlers and the production payment rails, tests inject their own handlers (e.g.
// failing ones), signup settings, x402 facilitator and MPP methods without any test-only
// production code.
import {
  CALL_TYPES,
  DESCRIPTION,
  GATEWAY,
  INPUT_SHAPE,
  PRICE_MCENTS,
  PROJECT,
  RATE_LIMIT_PER_MINUTE,
  SCOPE_FOR,
  TIMEOUT_MS,
  UPSTREAMS,
  XP_AWARD,
  type CallType,
  type UpstreamConfig,
} from "./generated/manifest";
import { readJsonBody, readJsonBodyText } from "./lib/body";
import type { AppEnv } from "./lib/env";
import type { Handler, Handlers } from "./lib/handler";
import { CORS_HEADERS, HttpError, answering, errorResponse, json, withHeaders, withoutCors } from "./lib/http";
import type { KeyDO, KeyStats, StoredResponse } from "./lib/key-do";
import { generateApiKey, generateKeyId, parseBearer, secretsEqual, sha256Hex } from "./lib/keys";
import { isCallType } from "./lib/manifest-util";
import { MCP_PATH, handleMcp } from "./lib/mcp";
import { parseMintInput } from "./lib/mint";
import { UPSTREAM_PATH_PREFIX, handleUpstream, upstreamsPricing } from "./lib/proxy";
import { IDEMPOTENCY_KEY_RE, IDEMPOTENCY_MAX_STORED_BYTES, runPaidCall, type Face } from "./lib/paid-call";
import { SIGNUP_PATH, handleSignup, pricingSignup, resolveSignup, type SignupOptions } from "./lib/signup";
import type { SignupConfig } from "./lib/signup-config";

export interface AppOptions {
  /** POST /v1/signup: its settings and payment rails (default: mcpay.toml and the environment). */
  readonly signup?: SignupOptions;
  /** Per-endpoint handler time limits in ms (default: TIMEOUT_MS from mcpay.toml). */
  readonly timeoutMs?: Partial<Record<CallType, number>>;
  /** How a paid route reaches a key's Durable Object (default: env.KEYS); tests wrap it to inject failures. */
  readonly keyStub?: (env: AppEnv, keyHash: string) => DurableObjectStub<KeyDO>;
  /** The MCP servers metered at /mcp/<name> (default: UPSTREAMS from mcpay.toml); tests bring their own. */
  readonly upstreams?: readonly UpstreamConfig[];
}

export interface App {
  fetch(request: Request, env: AppEnv, ctx: ExecutionContext): Promise<Response>;
}

interface RequestInfo {
  readonly request: Request;
  readonly url: URL;
  readonly env: AppEnv;
  readonly ctx: ExecutionContext;
  readonly requestId: string;
}

type RouteHandler = (r: RequestInfo) => Promise<Response>;
interface Route {
  readonly method: "GET" | "POST";
  readonly handle: RouteHandler;
}

const LEDGER_DEFAULT = 50;
const LEDGER_MAX = 500;

/** Paths under /v1/admin never carry CORS headers and never answer a preflight. */
export function isAdminPath(pathname: string): boolean {
  const p = pathname.replace(/\/{2,}/g, "/").toLowerCase();
  return p === "/v1/admin" || p.startsWith("/v1/admin/");
}

function keyStub(env: AppEnv, keyHash: string): DurableObjectStub<KeyDO> {
  return env.KEYS.get(env.KEYS.idFromName(keyHash));
}

/** Authorization: Bearer <key> → the key's Durable Object stub (syntax only; existence is checked by the object). */
async function bearerStub(r: RequestInfo, noCharge: boolean): Promise<DurableObjectStub<KeyDO>> {
  const bearer = parseBearer(r.request.headers.get("Authorization"));
  if (!bearer.ok) throw new HttpError(401, bearer.code, { noCharge });
  return keyStub(r.env, await sha256Hex(bearer.key));
}

// ---------------------------------------------------------------- free routes

async function health(): Promise<Response> {
  return json(200, { ok: true, status: "ok", service: PROJECT.name, version: PROJECT.version });
}

/** The body of GET /v1/pricing (also the MCP `pricing` tool's structuredContent). */
export function pricingBody(signup: SignupConfig, upstreams: readonly UpstreamConfig[] = UPSTREAMS): Record<string, unknown> {
  const endpoints = CALL_TYPES.map((name: CallType) => ({
    name,
    method: "POST",
    path: `/v1/${name}`,
    price_mcents: PRICE_MCENTS[name],
    xp: XP_AWARD[name],
    scope: SCOPE_FOR[name],
    description: DESCRIPTION[name],
    rate_limit_per_minute: RATE_LIMIT_PER_MINUTE[name],
    input: Object.fromEntries(
      Object.entries(INPUT_SHAPE[name]).map(([field, spec]) => [field, { type: spec.type, required: spec.required }]),
    ),
  }));
  return { ok: true, unit: "mcents", mcents_per_cent: 1000, signup: pricingSignup(signup), endpoints, upstreams: upstreamsPricing(upstreams) };
}

async function pricing(signup: SignupConfig, upstreams: readonly UpstreamConfig[] | undefined): Promise<Response> {
  return json(200, pricingBody(signup, upstreams));
}

async function me(r: RequestInfo): Promise<Response> {
  const stub = await bearerStub(r, false);
  const s = await stub.stats();
  if (!s) throw new HttpError(401, "invalid_key");
  return json(200, meBody(s));
}

/** The body of GET /v1/me (also the MCP `balance` tool's structuredContent). */
export function meBody(s: KeyStats): Record<string, unknown> {
  return {
    ok: true,
    key_id: s.keyId,
    name: s.name,
    balance_mcents: s.balanceMcents,
    scopes: s.scopes,
    xp: s.xp,
    level: s.level,
    badges: s.badges,
    calls: s.calls,
    spent_mcents: s.spentMcents,
    refunded_mcents: s.refundedMcents,
  };
}

async function myLedger(r: RequestInfo): Promise<Response> {
  const stub = await bearerStub(r, false);
  let limit = LEDGER_DEFAULT;
  const raw = r.url.searchParams.get("limit");
  if (raw !== null) {
    if (!/^[0-9]{1,6}$/.test(raw) || Number(raw) < 1) {
      throw new HttpError(400, "invalid_input", { message: `limit must be an integer from 1 to ${LEDGER_MAX}.` });
    }
    limit = Math.min(Number(raw), LEDGER_MAX);
  }
  // before=<seq>: the page of entries older than that seq (the previous page's next_before).
  let before: number | null = null;
  const rawBefore = r.url.searchParams.get("before");
  if (rawBefore !== null) {
    if (!/^[0-9]{1,15}$/.test(rawBefore) || Number(rawBefore) < 1) {
      throw new HttpError(400, "invalid_input", { message: "before must be a ledger seq: an integer from 1 to 999999999999999." });
    }
    before = Number(rawBefore);
  }
  const page = await stub.ledgerPage(limit, before);
  if (!page) throw new HttpError(401, "invalid_key");
  return json(200, { ok: true, entries: page.entries, next_before: page.nextBefore });
}

async function leaderboard(r: RequestInfo): Promise<Response> {
  const lb = r.env.LEADERBOARD.get(r.env.LEADERBOARD.idFromName("global"));
  const entries = await lb.top(GATEWAY.leaderboardSize);
  return json(200, { ok: true, entries });
}

// ---------------------------------------------------------------- admin

/** X-Admin-Key against ADMIN_KEY: 503 admin_disabled when unset, 401 invalid_admin_key when wrong. */
async function requireAdmin(r: RequestInfo): Promise<void> {
  const adminKey = r.env.ADMIN_KEY;
  // Disabled first, before looking at the request at all: no timing oracle on an unset key.
  if (typeof adminKey !== "string" || adminKey === "") throw new HttpError(503, "admin_disabled");
  const provided = r.request.headers.get("X-Admin-Key") ?? "";
  if (!(await secretsEqual(provided, adminKey))) throw new HttpError(401, "invalid_admin_key");
}

const PAYMENT_STATES = ["claimed", "settling", "pending", "paid", "done", "released", "all"] as const;
const PAYMENTS_DEFAULT = 100;
const PAYMENTS_MAX = 500;

/** GET /v1/admin/payments?state=…&limit=N: the signup payments and their states, newest first. */
async function adminPayments(r: RequestInfo): Promise<Response> {
  await requireAdmin(r);
  const stateRaw = r.url.searchParams.get("state") ?? "all";
  const state = PAYMENT_STATES.find((s) => s === stateRaw);
  if (state === undefined) throw new HttpError(400, "invalid_input", { message: `state must be one of ${PAYMENT_STATES.join(", ")}.` });
  let limit = PAYMENTS_DEFAULT;
  const raw = r.url.searchParams.get("limit");
  if (raw !== null) {
    if (!/^[0-9]{1,3}$/.test(raw) || Number(raw) < 1 || Number(raw) > PAYMENTS_MAX) {
      throw new HttpError(400, "invalid_input", { message: `limit must be an integer from 1 to ${PAYMENTS_MAX}.` });
    }
    limit = Number(raw);
  }
  const admin = r.env.ADMIN.get(r.env.ADMIN.idFromName("global"));
  const payments = await admin.listPayments(state, limit);
  return json(200, { ok: true, payments, request_id: r.requestId });
}

async function mint(r: RequestInfo): Promise<Response> {
  await requireAdmin(r);

  const input = parseMintInput(await readJsonBody(r.request, GATEWAY.maxBodyBytes).catch(stripNote));

  const admin = r.env.ADMIN.get(r.env.ADMIN.idFromName("global"));
  const permit = await admin.acquireMint();
  if (!permit.ok) {
    throw new HttpError(429, "rate_limited", {
      message: `Mint limit of ${GATEWAY.mintsPerHour} per hour reached.`,
      extra: { retry_after_seconds: permit.retryAfterSeconds },
      headers: { "Retry-After": String(permit.retryAfterSeconds) },
    });
  }

  const key = generateApiKey();
  const keyId = generateKeyId();
  const created = await keyStub(r.env, await sha256Hex(key)).init({
    keyId,
    name: input.name,
    balanceMcents: input.balanceMcents,
    scopes: input.scopes,
    requestId: r.requestId,
  });
  if (!created.ok) throw new Error("key object already initialized (hash collision?)");
  return json(201, {
    ok: true,
    key,
    key_id: keyId,
    balance_mcents: input.balanceMcents,
    scopes: input.scopes,
    name: input.name,
  });
}

/** Admin errors have nothing to do with charging: drop the "no charge applied" note. */
function stripNote(err: unknown): never {
  if (err instanceof HttpError) throw new HttpError(err.status, err.code, { ...err.opts, noCharge: false });
  throw err;
}

// ---------------------------------------------------------------- paid routes

function paidHeaders(chargedMcents: number, balanceMcents: number): Record<string, string> {
  return { "X-Charged-Mcents": String(chargedMcents), "X-Balance-Mcents": String(balanceMcents) };
}

export { IDEMPOTENCY_KEY_RE, IDEMPOTENCY_MAX_STORED_BYTES };

/** How a paid route or a paid MCP tool reaches a key's Durable Object. */
export function keyStubFor(env: AppEnv, keyHash: string, options: AppOptions): DurableObjectStub<KeyDO> {
  return options.keyStub ? options.keyStub(env, keyHash) : keyStub(env, keyHash);
}

/** The handler time limit of an endpoint (tests may shorten it). */
export function timeoutFor(endpoint: CallType, options: AppOptions): number {
  return options.timeoutMs?.[endpoint] ?? TIMEOUT_MS[endpoint];
}

function paidRoute(endpoint: CallType, handlers: Handlers, options: AppOptions): RouteHandler {
  return async (r) => {
    // 1. Key syntax (existence is checked atomically with the hold).
    const bearer = parseBearer(r.request.headers.get("Authorization"));
    if (!bearer.ok) throw new HttpError(401, bearer.code, { noCharge: true });
    // 1a. Idempotency-Key syntax (optional header).
    const idempotencyKey = r.request.headers.get("Idempotency-Key") ?? undefined;
    if (idempotencyKey !== undefined && !IDEMPOTENCY_KEY_RE.test(idempotencyKey)) {
      throw new HttpError(400, "invalid_input", {
        message: "Idempotency-Key must be 32 to 128 characters from A-Z a-z 0-9 _ - (one header).",
        noCharge: true,
      });
    }
    const stub = keyStubFor(r.env, await sha256Hex(bearer.key), options);
    // 2-4. Content-Type, bounded body, JSON.
    const { value: input, text } = await readJsonBodyText(r.request, GATEWAY.maxBodyBytes);
    // 5-11. The billing core (shared with /mcp): shape, validate, hold, run, capture or release.
    const outcome = await runPaidCall(
      {
        endpoint,
        handler: handlers[endpoint] as Handler<unknown>,
        input,
        bodyForHash: text,
        idempotencyKey,
        stub,
        callId: r.requestId,
        env: r.env,
        ctx: r.ctx,
        request: r.request,
        timeoutMs: timeoutFor(endpoint, options),
      },
      httpFace(r.requestId),
    );
    switch (outcome.kind) {
      case "ok":
        return outcome.answer;
      case "replay":
        return replayResponse(outcome.stored);
      case "failed":
        return errorResponse(outcome.status, outcome.code, r.requestId, {
          ...(outcome.message !== undefined ? { message: outcome.message } : {}),
          extra: outcome.extra,
          headers: paidHeaders(outcome.extra.charged_mcents, outcome.extra.balance_mcents),
        });
    }
  };
}

function replayResponse(stored: StoredResponse): Response {
  const headers = new Headers(stored.headers);
  headers.set("Idempotent-Replayed", "true");
  return new Response(stored.body, { status: stored.status, headers });
}

/** Reads a body up to `limit` bytes: the bytes when it fits, else a stream replaying everything. */
async function bufferUpTo(body: ReadableStream<Uint8Array> | null, limit: number): Promise<{ bytes: Uint8Array | null; stream: ReadableStream<Uint8Array> | null }> {
  if (body === null) return { bytes: new Uint8Array(0), stream: null };
  const reader = body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    total += value.byteLength;
    if (total > limit) {
      let i = 0;
      const stream = new ReadableStream<Uint8Array>({
        async pull(controller) {
          if (i < chunks.length) return controller.enqueue(chunks[i++]!);
          const next = await reader.read();
          if (next.done) controller.close();
          else controller.enqueue(next.value);
        },
        cancel(reason) {
          return reader.cancel(reason);
        },
      });
      return { bytes: null, stream };
    }
  }
  const bytes = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    bytes.set(c, off);
    off += c.byteLength;
  }
  return { bytes, stream: null };
}

/** What an Idempotency-Key replay sends: the answer's status, headers and body (null when too large). */
function toStored(res: Response, bytes: Uint8Array | null): StoredResponse {
  const headers: [string, string][] = [];
  res.headers.forEach((v, k) => {
    if (k.toLowerCase() !== "x-request-id" && !k.toLowerCase().startsWith("access-control-")) headers.push([k, v]);
  });
  return { status: res.status, headers, body: bytes === null ? null : (bytes.slice().buffer as ArrayBuffer) };
}

/** POST /v1/<endpoint>'s success answer: the handler's own Response, or {ok, result, charged_mcents, …}. */
function httpFace(requestId: string): Face<Response> {
  return {
    async present(out, charge, store) {
      if (out instanceof Response) {
        const res = withHeaders(out, paidHeaders(charge.chargedMcents, charge.balanceMcents));
        if (!store) return { answer: res };
        const { bytes, stream } = await bufferUpTo(res.body, IDEMPOTENCY_MAX_STORED_BYTES);
        return { answer: new Response(bytes ?? stream, res), stored: toStored(res, bytes) };
      }
      const body = JSON.stringify({
        ok: true,
        result: out === undefined ? null : out,
        charged_mcents: charge.chargedMcents,
        balance_mcents: charge.balanceMcents,
        request_id: requestId,
      });
      const response = new Response(body, {
        status: 200,
        headers: {
          "Content-Type": "application/json; charset=utf-8",
          "Cache-Control": "no-store",
          "X-Content-Type-Options": "nosniff",
          ...paidHeaders(charge.chargedMcents, charge.balanceMcents),
        },
      });
      if (!store) return { answer: response };
      const bytes = new TextEncoder().encode(body);
      return { answer: response, stored: toStored(response, bytes.byteLength <= IDEMPOTENCY_MAX_STORED_BYTES ? bytes : null) };
    },
    async discard(answer) {
      await answer.body?.cancel().catch(() => {});
    },
  };
}

// ---------------------------------------------------------------- router

function signupRoute(options: SignupOptions | undefined): RouteHandler {
  const resolved = resolveSignup(options);
  return async (r) => {
    // The payment is verified, settled and turned into a key under waitUntil: a client that
    // disconnects cannot leave a taken payment without its key (a retry gets it, see 3.9).
    const work = handleSignup(resolved, r.request, r.env, r.requestId, GATEWAY.keyPrefix, GATEWAY.maxBodyBytes);
    r.ctx.waitUntil(work.then(
      () => undefined,
      () => undefined,
    ));
    return work;
  };
}

function buildRoutes(handlers: Handlers, options: AppOptions): Map<string, Route> {
  const signup = resolveSignup(options.signup).config;
  const routes = new Map<string, Route>([
    ["/v1/health", { method: "GET", handle: health }],
    ["/v1/pricing", { method: "GET", handle: () => pricing(signup, options.upstreams) }],
    ["/v1/me", { method: "GET", handle: me }],
    ["/v1/me/ledger", { method: "GET", handle: myLedger }],
    ["/v1/leaderboard", { method: "GET", handle: leaderboard }],
    ["/v1/admin/mint", { method: "POST", handle: mint }],
    ["/v1/admin/payments", { method: "GET", handle: adminPayments }],
  ]);
  // Served only when [signup] enabled = true; otherwise 404 like any unknown path.
  if (signup.enabled) routes.set(SIGNUP_PATH, { method: "POST", handle: signupRoute(options.signup) });
  for (const ep of CALL_TYPES) {
    const path = `/v1/${ep}`;
    // Built-in routes win; create-mcpay refuses endpoint names that collide with them.
    if (!routes.has(path) && isCallType(ep)) routes.set(path, { method: "POST", handle: paidRoute(ep, handlers, options) });
  }
  return routes;
}

export function createApp(handlers: Handlers, options: AppOptions = {}): App {
  const routes = buildRoutes(handlers, options);
  const signup = resolveSignup(options.signup).config;

  async function dispatch(r: RequestInfo, admin: boolean): Promise<Response> {
    const route = routes.get(r.url.pathname);
    if (!route) throw new HttpError(404, "not_found");
    const method = r.request.method.toUpperCase();
    if (method === "OPTIONS" && !admin) {
      return new Response(null, {
        status: 204,
        headers: {
          "Access-Control-Allow-Methods": `${route.method}, OPTIONS`,
          "Access-Control-Max-Age": "86400",
        },
      });
    }
    if (method !== route.method) {
      throw new HttpError(405, "method_not_allowed", {
        headers: { Allow: admin ? route.method : `${route.method}, OPTIONS` },
      });
    }
    return route.handle(r);
  }

  return {
    async fetch(request, env, ctx) {
      const requestId = crypto.randomUUID();
      const url = new URL(request.url);
      // The MCP face (contract 3.11): its own methods, CORS and errors, the same billing core.
      if (url.pathname === MCP_PATH) return handleMcp(request, env, ctx, requestId, handlers, options, signup);
      // Metered upstream MCP servers (contract 3.12).
      if (url.pathname.startsWith(UPSTREAM_PATH_PREFIX)) return handleUpstream(request, env, ctx, requestId, url, options);
      const admin = isAdminPath(url.pathname);
      const res = await answering(requestId, () => dispatch({ request, url, env, ctx, requestId }, admin));
      if (admin) return withoutCors(withHeaders(res, { "X-Request-Id": requestId }));
      const extra: Record<string, string> = { "X-Request-Id": requestId };
      if (url.pathname.startsWith("/v1/")) Object.assign(extra, CORS_HEADERS);
      return withHeaders(res, extra);
    },
  };
}
