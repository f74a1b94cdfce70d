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
  XP_AWARD,
  type CallType,
} from "./generated/manifest";
import { readJsonBody, readJsonBodyText } from "./lib/body";
import type { AppEnv } from "./lib/env";
import type { Handler, HandlerContext, Handlers, ValidateContext } from "./lib/handler";
import { CORS_HEADERS, HttpError, errorResponse, json, withHeaders, withoutCors, withoutCredentials } from "./lib/http";
import type { CaptureResult, KeyDO, SettleResult, StoredResponse } from "./lib/key-do";
import { generateApiKey, generateKeyId, parseBearer, secretsEqual, sha256Hex } from "./lib/keys";
import { isCallType } from "./lib/manifest-util";
import { parseMintInput } from "./lib/mint";
import { checkShape } from "./lib/shape";
import { SIGNUP_PATH, handleSignup, pricingSignup, resolveSignup, type SignupOptions } from "./lib/signup";
import type { SignupConfig } from "./lib/signup-config";

export interface AppOptions {
  /** POST /v1/signup: its settings and payment rails (default: mcpay.toml and the environment). */
  readonly signup?: SignupOptions;
  /** Per-endpoint handler time limits in ms (default: TIMEOUT_MS from mcpay.toml). */
  readonly timeoutMs?: Partial<Record<CallType, number>>;
  /** How a paid route reaches a key's Durable Object (default: env.KEYS); tests wrap it to inject failures. */
  readonly keyStub?: (env: AppEnv, keyHash: string) => DurableObjectStub<KeyDO>;
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

async function pricing(signup: SignupConfig): Promise<Response> {
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
  return json(200, { ok: true, unit: "mcents", mcents_per_cent: 1000, signup: pricingSignup(signup), endpoints });
}

async function me(r: RequestInfo): Promise<Response> {
  const stub = await bearerStub(r, false);
  const s = await stub.stats();
  if (!s) throw new HttpError(401, "invalid_key");
  return json(200, {
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
  });
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

/** `Idempotency-Key` syntax (contract 3.8). */
export const IDEMPOTENCY_KEY_RE = /^[A-Za-z0-9_-]{32,128}$/;
/** Answers larger than this are not stored for Idempotency-Key replays. */
export const IDEMPOTENCY_MAX_STORED_BYTES = 65_536;
/** Settlement RPC attempts in the request before leaving the hold to the KeyDO's alarm. */
const SETTLE_ATTEMPTS = 3;
const SETTLE_BACKOFF_MS = [50, 250];

function keyStubFor(r: RequestInfo, keyHash: string, options: AppOptions): DurableObjectStub<KeyDO> {
  return options.keyStub ? options.keyStub(r.env, keyHash) : keyStub(r.env, keyHash);
}

function paidRoute(endpoint: CallType, handlers: Handlers, options: AppOptions): RouteHandler {
  return async (r) => {
    const handler = handlers[endpoint] as Handler<unknown>;
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
    const stub = keyStubFor(r, await sha256Hex(bearer.key), options);
    // 2-4. Content-Type, bounded body, JSON.
    const { value: input, text } = await readJsonBodyText(r.request, GATEWAY.maxBodyBytes);
    // 5. Shape from mcpay.toml.
    const shapeError = checkShape(input, INPUT_SHAPE[endpoint]);
    if (shapeError !== null) throw new HttpError(400, "invalid_input", { message: shapeError, noCharge: true });
    // 6. Handler's own validation.
    const vctx: ValidateContext = { env: r.env, endpoint, requestId: r.requestId };
    let validationError: string | null = null;
    if (handler.validate) {
      try {
        validationError = await handler.validate(input, vctx);
      } catch (err) {
        console.error(JSON.stringify({ msg: "validate threw", endpoint, request_id: r.requestId, error: String(err) }));
        throw new HttpError(500, "internal_error", { noCharge: true });
      }
    }
    if (validationError !== null && validationError !== undefined) {
      throw new HttpError(400, "invalid_input", { message: String(validationError).slice(0, 500), noCharge: true });
    }

    // 7. The hold: one RPC to this key's object, which owns price, scope, Idempotency-Key records,
    //    rate limit and balance. The call id is the gateway's request id, never the client's.
    const hold = await stub.hold(endpoint, r.requestId, {
      ...(idempotencyKey !== undefined ? { idempotencyKey, bodyHash: await sha256Hex(text) } : {}),
    });
    if (!hold.ok) {
      switch (hold.code) {
        case "invalid_key":
          throw new HttpError(401, "invalid_key", { noCharge: true });
        case "scope_denied":
          throw new HttpError(403, "scope_denied", {
            noCharge: true,
            extra: { required_scope: SCOPE_FOR[endpoint] },
          });
        case "rate_limited":
          throw new HttpError(429, "rate_limited", {
            message: `Rate limit of ${RATE_LIMIT_PER_MINUTE[endpoint]} calls per minute reached for this endpoint.`,
            noCharge: true,
            extra: { retry_after_seconds: hold.retryAfterSeconds },
            headers: { "Retry-After": String(hold.retryAfterSeconds) },
          });
        case "insufficient_balance":
          throw new HttpError(402, "insufficient_balance", {
            noCharge: true,
            extra: { price_mcents: hold.priceMcents, balance_mcents: hold.balanceMcents },
          });
        case "unknown_endpoint":
          throw new HttpError(404, "not_found", { noCharge: true });
        case "idempotency_mismatch":
          throw new HttpError(422, "idempotency_mismatch", { noCharge: true });
        case "idempotency_in_progress":
          throw new HttpError(409, "idempotency_in_progress", {
            noCharge: true,
            extra: { retry_after_seconds: hold.retryAfterSeconds },
            headers: { "Retry-After": String(hold.retryAfterSeconds) },
          });
        case "replay":
          if (hold.response === null) {
            throw new HttpError(409, "idempotency_response_not_stored", {
              noCharge: true,
              extra: { original_request_id: hold.originalRequestId, max_stored_bytes: IDEMPOTENCY_MAX_STORED_BYTES },
              headers: { "Idempotent-Replayed": "true" },
            });
          }
          return replayResponse(hold.response as StoredResponse);
      }
    }

    // 8. Run the handler within TIMEOUT_MS[endpoint], then capture or release the hold.
    const hctx: HandlerContext = {
      ...vctx,
      keyId: hold.keyId,
      chargedMcents: hold.chargedMcents,
      balanceMcents: hold.balanceMcents,
      request: withoutCredentials(r.request),
      waitUntil: (p) => r.ctx.waitUntil(p),
    };
    const timeoutMs = options.timeoutMs?.[endpoint] ?? TIMEOUT_MS[endpoint];
    // The work and its settlement run under waitUntil: a client that disconnects (or a response
    // stream that is cancelled) cannot leave a hold without a capture or a release.
    const work = runAndSettle(handler, input, hctx, stub, r, hold, endpoint, timeoutMs, idempotencyKey !== undefined);
    r.ctx.waitUntil(work.then(
      () => undefined,
      () => undefined,
    ));
    return work;
  };
}

function replayResponse(stored: StoredResponse): Response {
  const headers = new Headers(stored.headers);
  headers.set("Idempotent-Replayed", "true");
  return new Response(stored.body, { status: stored.status, headers });
}

type Outcome =
  | { kind: "ok"; response: Response; stored?: StoredResponse }
  | { kind: "failed"; failure: string }
  | { kind: "timeout" };

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

async function runHandler(
  handler: Handler<unknown>,
  input: unknown,
  hctx: HandlerContext,
  r: RequestInfo,
  charge: { chargedMcents: number; balanceMcents: number },
  store: boolean,
): Promise<Outcome> {
  try {
    const out = await handler.run(input, hctx);
    if (out instanceof Response) {
      if (out.status >= 500) {
        await out.body?.cancel().catch(() => {});
        return { kind: "failed", failure: `handler returned status ${out.status}` };
      }
      const res = withHeaders(out, paidHeaders(charge.chargedMcents, charge.balanceMcents));
      if (!store) return { kind: "ok", response: res };
      const { bytes, stream } = await bufferUpTo(res.body, IDEMPOTENCY_MAX_STORED_BYTES);
      const response = new Response(bytes ?? stream, res);
      return { kind: "ok", response, stored: toStored(res, bytes) };
    }
    const body = JSON.stringify({
      ok: true,
      result: out === undefined ? null : out,
      charged_mcents: charge.chargedMcents,
      balance_mcents: charge.balanceMcents,
      request_id: r.requestId,
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
    if (!store) return { kind: "ok", response };
    const bytes = new TextEncoder().encode(body);
    return { kind: "ok", response, stored: toStored(response, bytes.byteLength <= IDEMPOTENCY_MAX_STORED_BYTES ? bytes : null) };
  } catch (err) {
    return { kind: "failed", failure: err instanceof Error ? `${err.name}: ${err.message}` : String(err) };
  }
}

/** Calls a settlement RPC up to SETTLE_ATTEMPTS times; null when every attempt threw. */
async function settleWithRetry<T>(what: string, r: RequestInfo, rpc: () => Promise<T>): Promise<T | null> {
  for (let attempt = 0; attempt < SETTLE_ATTEMPTS; attempt++) {
    try {
      return await rpc();
    } catch (err) {
      console.error(JSON.stringify({ msg: `${what} failed`, request_id: r.requestId, attempt: attempt + 1, error: String(err) }));
      const wait = SETTLE_BACKOFF_MS[attempt];
      if (wait !== undefined && attempt + 1 < SETTLE_ATTEMPTS) await new Promise((res) => setTimeout(res, wait));
    }
  }
  return null;
}

async function runAndSettle(
  handler: Handler<unknown>,
  input: unknown,
  hctx: HandlerContext,
  stub: DurableObjectStub<KeyDO>,
  r: RequestInfo,
  charge: { chargedMcents: number; balanceMcents: number },
  endpoint: CallType,
  timeoutMs: number,
  store: boolean,
): Promise<Response> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timedOut = new Promise<Outcome>((res) => {
    timer = setTimeout(() => res({ kind: "timeout" }), timeoutMs);
  });
  const outcome = await Promise.race([runHandler(handler, input, hctx, r, charge, store), timedOut]);
  if (timer !== undefined) clearTimeout(timer);

  if (outcome.kind === "ok") {
    const captured = await settleWithRetry("capture", r, async (): Promise<CaptureResult> => await stub.capture(r.requestId, outcome.stored));
    if (captured === null || captured.ok) {
      // Captured; or the capture RPC kept failing: the answer is sent and the alarm releases the
      // hold (the gateway never keeps money for a call whose outcome it did not record).
      return outcome.response;
    }
    // The hold was released meanwhile (past its deadline): the call counts as timed out.
    await outcome.response.body?.cancel().catch(() => {});
    return errorResponse(504, "handler_timeout", r.requestId, {
      extra: { refunded: true, charged_mcents: 0, balance_mcents: captured.balanceMcents },
      headers: paidHeaders(0, captured.balanceMcents),
    });
  }

  const timeout = outcome.kind === "timeout";
  console.error(JSON.stringify({
    msg: timeout ? "handler timed out" : "handler failed",
    endpoint,
    request_id: r.requestId,
    ...(timeout ? { timeout_ms: timeoutMs } : { error: outcome.failure }),
  }));
  const settled = await settleWithRetry("release", r, async (): Promise<SettleResult> => await stub.release(r.requestId, timeout ? "timeout" : "caller"));
  const status = timeout ? 504 : 502;
  const code = timeout ? "handler_timeout" : "handler_failed";
  if (settled === null) {
    // The hold stays until the KeyDO's alarm releases it (within TIMEOUT_MS + HOLD_MARGIN_MS).
    return errorResponse(status, code, r.requestId, {
      message: "The endpoint handler failed; the held price will be released shortly.",
      extra: { refunded: false, refund_pending: true, charged_mcents: charge.chargedMcents, balance_mcents: charge.balanceMcents },
      headers: paidHeaders(charge.chargedMcents, charge.balanceMcents),
    });
  }
  const charged = settled.refunded ? 0 : charge.chargedMcents;
  return errorResponse(status, code, r.requestId, {
    ...(timeout
      ? {}
      : {
          message: settled.refunded
            ? "The endpoint handler failed; the charge was refunded."
            : "The endpoint handler failed; the hourly refund limit for this key is reached, so the charge stands.",
        }),
    extra: { refunded: settled.refunded, charged_mcents: charged, balance_mcents: settled.balanceMcents },
    headers: paidHeaders(charged, settled.balanceMcents),
  });
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
    ["/v1/pricing", { method: "GET", handle: () => pricing(signup) }],
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
      const admin = isAdminPath(url.pathname);
      let res: Response;
      try {
        res = await dispatch({ request, url, env, ctx, requestId }, admin);
      } catch (err) {
        if (err instanceof HttpError) {
          res = err.toResponse(requestId);
        } else {
          console.error(JSON.stringify({ msg: "unhandled error", request_id: requestId, error: String(err) }));
          res = errorResponse(500, "internal_error", requestId);
        }
      }
      if (admin) return withoutCors(withHeaders(res, { "X-Request-Id": requestId }));
      const extra: Record<string, string> = { "X-Request-Id": requestId };
      if (url.pathname.startsWith("/v1/")) Object.assign(extra, CORS_HEADERS);
      return withHeaders(res, extra);
    },
  };
}
