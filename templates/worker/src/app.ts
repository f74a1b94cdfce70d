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
  XP_AWARD,
  type CallType,
} from "./generated/manifest";
import { readJsonBody } from "./lib/body";
import type { AppEnv } from "./lib/env";
import type { Handler, HandlerContext, Handlers, ValidateContext } from "./lib/handler";
import { CORS_HEADERS, HttpError, errorResponse, json, withHeaders, withoutCors, withoutCredentials } from "./lib/http";
import type { KeyDO } from "./lib/key-do";
import { generateApiKey, generateKeyId, parseBearer, secretsEqual, sha256Hex } from "./lib/keys";
import { isCallType } from "./lib/manifest-util";
import { parseMintInput } from "./lib/mint";
import { checkShape } from "./lib/shape";
import { SIGNUP_PATH, handleSignup, pricingSignup, resolveSignup, type SignupOptions } from "./lib/signup";
import type { SignupConfig } from "./lib/signup-config";

export interface AppOptions {
  /** POST /v1/signup: its settings and payment rails (default: mcpay.toml and the environment). */
  readonly signup?: SignupOptions;
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
  const entries = await stub.ledger(limit);
  if (!entries) throw new HttpError(401, "invalid_key");
  return json(200, { ok: true, entries });
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

function paidRoute(endpoint: CallType, handlers: Handlers): RouteHandler {
  return async (r) => {
    const handler = handlers[endpoint] as Handler<unknown>;
    // 1. Key syntax (existence is checked atomically with the charge).
    const stub = await bearerStub(r, true);
    // 2-4. Content-Type, bounded body, JSON.
    const input = await readJsonBody(r.request, GATEWAY.maxBodyBytes);
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

    // 7. The charge: one RPC to this key's object, which owns price, scope, rate limit and balance.
    const charge = await stub.charge(endpoint, r.requestId);
    if (!charge.ok) {
      switch (charge.code) {
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
            extra: { retry_after_seconds: charge.retryAfterSeconds },
            headers: { "Retry-After": String(charge.retryAfterSeconds) },
          });
        case "insufficient_balance":
          throw new HttpError(402, "insufficient_balance", {
            noCharge: true,
            extra: { price_mcents: charge.priceMcents, balance_mcents: charge.balanceMcents },
          });
        case "unknown_endpoint":
          throw new HttpError(404, "not_found", { noCharge: true });
      }
    }

    // 8. Run the handler. Failure (throw, or a >= 500 Response) refunds within the hourly cap.
    const hctx: HandlerContext = {
      ...vctx,
      keyId: charge.keyId,
      chargedMcents: charge.chargedMcents,
      balanceMcents: charge.balanceMcents,
      request: withoutCredentials(r.request),
      waitUntil: (p) => r.ctx.waitUntil(p),
    };
    // The charged work and its settlement run under waitUntil: a client that disconnects (or a
    // response stream that is cancelled) cannot leave a charge without a result or a refund.
    const work = runAndSettle(handler, input, hctx, stub, r, charge, endpoint);
    r.ctx.waitUntil(work.then(
      () => undefined,
      () => undefined,
    ));
    return work;
  };
}


async function runAndSettle(
  handler: Handler<unknown>,
  input: unknown,
  hctx: HandlerContext,
  stub: DurableObjectStub<KeyDO>,
  r: RequestInfo,
  charge: { chargedMcents: number; balanceMcents: number },
  endpoint: CallType,
): Promise<Response> {
  let failure: string;
  try {
    const out = await handler.run(input, hctx);
    if (out instanceof Response) {
      if (out.status < 500) return withHeaders(out, paidHeaders(charge.chargedMcents, charge.balanceMcents));
      failure = `handler returned status ${out.status}`;
      await out.body?.cancel().catch(() => {});
    } else {
      const body = JSON.stringify({
        ok: true,
        result: out === undefined ? null : out,
        charged_mcents: charge.chargedMcents,
        balance_mcents: charge.balanceMcents,
        request_id: r.requestId,
      });
      return new Response(body, {
        status: 200,
        headers: {
          "Content-Type": "application/json; charset=utf-8",
          "Cache-Control": "no-store",
          "X-Content-Type-Options": "nosniff",
          ...paidHeaders(charge.chargedMcents, charge.balanceMcents),
        },
      });
    }
  } catch (err) {
    failure = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  }
  console.error(JSON.stringify({ msg: "handler failed", endpoint, request_id: r.requestId, error: failure }));
  const settled = await stub.settleFailure(r.requestId);
  const charged = settled.refunded ? 0 : charge.chargedMcents;
  return errorResponse(502, "handler_failed", r.requestId, {
    message: settled.refunded
      ? "The endpoint handler failed; the charge was refunded."
      : "The endpoint handler failed; the hourly refund limit for this key is reached, so the charge stands.",
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
    if (!routes.has(path) && isCallType(ep)) routes.set(path, { method: "POST", handle: paidRoute(ep, handlers) });
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
