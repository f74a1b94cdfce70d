// The MPP compute gateway: the worker gateway (prepaid keys, /v1/*) plus
//   POST /execute        execute_code paid with MPP (HTTP 402 + WWW-Authenticate: Payment)
//   POST /pay/<tool>     the manifest's paid endpoints, paid with MPP
//   POST /mcp            MCP (streamable HTTP): paid tools (-32042 / credential in _meta), free tools
//   GET  /SKILL.md, /llms.txt   discovery documents generated from mcpay.toml
//   /mcp/<upstream>      metered upstream MCP servers: the worker gateway's route (src/lib/proxy.ts)
// `createMppApp` takes the payment setup as a parameter: src/index.ts builds the production
// methods from the environment; tests build their own app with a deterministic method.
import { createApp, type AppOptions } from "../app";
import { withoutCredentials } from "../lib/http";
import { CALL_TYPES, GATEWAY, type CallType } from "../generated/manifest";
import { FAILURE_POLICY, LLMS_TXT, MPP, SKILL_MD } from "../generated/mpp";
import { readJsonBody } from "../lib/body";
import type { Handlers } from "../lib/handler";
import type { SignupOptions } from "../lib/signup";
import { HttpError, json } from "../lib/http";
import { isCallType } from "../lib/manifest-util";
import type { MppEnv } from "./env";
import { handleMcp } from "./mcp";
import type { PaymentSetupResult } from "./methods";
import { classifyHttp, issueCredit, mppReference, newTrace, payHandler, realmFor, redeemCredit, type PaymentTrace } from "./pay";
import type { SandboxLimits } from "./sandbox";
import { DEFAULT_LIMITS } from "./sandbox";
import { EXECUTE, parseCall, runTool, type ToolOutcome } from "./tools";

export interface MppAppOptions {
  handlers: Handlers;
  /** Payment methods and secret for a request's environment. */
  payments: (env: MppEnv) => PaymentSetupResult;
  limits?: SandboxLimits;
  /** POST /v1/signup (default: mcpay.toml [signup] and the environment). */
  signup?: SignupOptions;
  /** The MCP servers metered at /mcp/<name> (default: mcpay.toml's upstreams). */
  upstreams?: AppOptions["upstreams"];
}

export interface MppApp {
  fetch(request: Request, env: MppEnv, ctx: ExecutionContext): Promise<Response>;
}

export interface Gateway {
  readonly options: MppAppOptions;
  readonly limits: SandboxLimits;
}

function problem(status: number, code: string, message: string, requestId: string, extra: Record<string, unknown> = {}): Response {
  return json(status, { ok: false, error: { code, message }, request_id: requestId, ...extra });
}

function withRequestId(res: Response, requestId: string): Response {
  const out = new Response(res.body, res);
  out.headers.set("X-Request-Id", requestId);
  return out;
}

/** Outcome of a paid run → HTTP response body parts (failures carry the credit, if one was issued). */
export async function settleOutcome(
  env: MppEnv,
  tool: CallType,
  outcome: ToolOutcome,
  paidWithCredit: boolean,
): Promise<{ ok: true; body: Record<string, unknown> } | { ok: false; status: number; body: Record<string, unknown> }> {
  if (outcome.kind === "done") return { ok: true, body: outcome.body };
  const credit = paidWithCredit ? null : await issueCredit(env, tool);
  return {
    ok: false,
    status: 502,
    body: {
      ok: false,
      error: { code: outcome.code, message: outcome.message },
      charged: true,
      credit,
      policy: FAILURE_POLICY,
    },
  };
}

async function paidHttp(g: Gateway, tool: CallType, request: Request, env: MppEnv, ctx: ExecutionContext, requestId: string): Promise<Response> {
  if (request.method.toUpperCase() !== "POST") {
    return json(405, { ok: false, error: { code: "method_not_allowed", message: "Use POST." }, request_id: requestId }, { Allow: "POST" });
  }
  // 1. Validate first: no challenge, no charge, no side effect for a bad request.
  const limit = tool === EXECUTE ? MPP.maxCodeBytes + GATEWAY.maxBodyBytes : GATEWAY.maxBodyBytes;
  let body: unknown;
  try {
    body = await readJsonBody(request, limit);
  } catch (err) {
    if (err instanceof HttpError) return err.toResponse(requestId);
    throw err;
  }
  const call = await parseCall(tool, body, g.options.handlers, env, requestId);
  if (!call.ok) return problem(call.status, call.code, call.message, requestId, { note: "no charge applied" });
  const runCtx = { env, requestId, request: withoutCredentials(request), waitUntil: (p: Promise<unknown>) => ctx.waitUntil(p), keyId: "mpp", chargedMcents: 0, balanceMcents: 0 };

  // 2a. A one-time credit from an earlier gateway-side failure.
  if (call.credit !== null) {
    if (!(await redeemCredit(env, call.credit, tool))) {
      return problem(400, "invalid_credit", "This credit is unknown, expired, already used or for another tool.", requestId);
    }
    const settled = await settleOutcome(env, tool, await runTool(tool, call.input, g.options.handlers, runCtx, g.limits), true);
    if (settled.ok) return json(200, { ...settled.body, paid_with: "credit", request_id: requestId });
    return json(settled.status, { ...settled.body, request_id: requestId });
  }

  // 2b. MPP: the challenge is claimed before the method verifies (src/mpp/pay.ts).
  const setup = g.options.payments(env);
  if (!setup.ok) {
    console.error(JSON.stringify({ msg: "payments not configured", problems: setup.problems }));
    return problem(503, "payments_unavailable", "Payments are not configured on this gateway.", requestId);
  }
  const trace = newTrace();
  const handler = payHandler(setup.setup, "http", realmFor(request), tool, env, trace);
  // The claim → verify → mark sequence finishes even if the client goes away meanwhile.
  const verifying = handler(request);
  ctx.waitUntil(verifying.then(() => undefined, () => undefined));
  let result: Awaited<typeof verifying>;
  try {
    result = await verifying;
  } catch (err) {
    if (trace.taken) return await notDelivered(env, tool, trace, requestId, err, false);
    if (trace.pending) return paymentPending(trace, requestId);
    throw err;
  }
  if (result.status === 402) {
    if (trace.taken) return await notDelivered(env, tool, trace, requestId, "the payment method answered 402 after taking the payment", false);
    if (trace.pending) {
      await (result.challenge as Response).body?.cancel();
      return paymentPending(trace, requestId);
    }
    if (trace.refused) return await challengeUsed(handler, request, requestId);
    return withRequestId(result.challenge as Response, requestId);
  }
  // 3. A management exchange (e.g. a session's channel top-up) runs nothing.
  const paid = classifyHttp(result.withReceipt);
  if (paid.kind === "management") return withRequestId(paid.response, requestId);
  if (paid.kind !== "paid") {
    // mppx accepted the payment but gave no receipt: the payment may have been taken; never run
    // for it, never answer 500 — keep it as a credit and name the reference.
    return await notDelivered(env, tool, trace, requestId, "payment accepted without a receipt", false);
  }
  // 4. Run, answer with the receipt. The payment is taken: from here on nothing ends in a 500.
  let settled: Awaited<ReturnType<typeof settleOutcome>>;
  try {
    settled = await settleOutcome(env, tool, await runTool(tool, call.input, g.options.handlers, runCtx, g.limits), false);
  } catch (err) {
    return await notDelivered(env, tool, trace, requestId, err, true);
  }
  if (!settled.ok) return json(settled.status, { ...settled.body, payment: paymentOf(trace, "paid"), request_id: requestId }, { "X-Request-Id": requestId });
  const answer = { ...settled.body, request_id: requestId };
  try {
    return withRequestId(result.withReceipt(json(200, answer)) as Response, requestId);
  } catch (err) {
    console.error(JSON.stringify({ msg: "receipt could not be attached", request_id: requestId, reference: referenceOf(trace), error: String(err) }));
    return json(200, { ...answer, payment: paymentOf(trace, "paid") }, { "X-Request-Id": requestId });
  }
}

function referenceOf(trace: PaymentTrace): string | null {
  const id = trace.taken?.challengeId ?? trace.pending?.challengeId ?? null;
  return id === null ? null : mppReference(id);
}

/** The payment as shown in answers: the gateway's reference and the method's own (e.g. a transaction hash). */
export function paymentOf(trace: PaymentTrace, state: "paid" | "pending"): Record<string, unknown> {
  return { rail: "mpp", reference: referenceOf(trace), state, transaction: trace.taken?.reference ?? null };
}

/** The method failed without refusing: whether money moved is unknown. Never "no charge applied". */
function paymentPending(trace: PaymentTrace, requestId: string): Response {
  return json(
    502,
    {
      ok: false,
      error: {
        code: "payment_unavailable",
        message: "The payment method failed while verifying this payment; whether it was taken is not known. Keep the reference; the operator resolves it. Do not pay this challenge again.",
      },
      payment: paymentOf(trace, "pending"),
      request_id: requestId,
    },
    { "X-Request-Id": requestId, "Cache-Control": "no-store" },
  );
}

/**
 * The payment was taken but the call could not be served (our failure): a one-time credit if one
 * can be issued, and always the payment's reference. 502, never 500.
 */
async function notDelivered(env: MppEnv, tool: CallType, trace: PaymentTrace, requestId: string, err: unknown, ran: boolean): Promise<Response> {
  const reference = referenceOf(trace);
  console.error(JSON.stringify({ msg: "paid call not delivered", request_id: requestId, reference, transaction: trace.taken?.reference ?? null, error: String(err).slice(0, 500) }));
  let credit: Awaited<ReturnType<typeof issueCredit>> | null = null;
  try {
    credit = await issueCredit(env, tool);
  } catch (e) {
    console.error(JSON.stringify({ msg: "credit could not be issued", request_id: requestId, reference, error: String(e).slice(0, 500) }));
  }
  return json(
    502,
    {
      ok: false,
      error: {
        code: "delivery_failed",
        message: credit
          ? `Your payment was taken but the call ${ran ? "could not be completed" : "was not run"} on our side; use the credit to run it again without paying.`
          : `Your payment was taken but the call ${ran ? "could not be completed" : "was not run"} on our side, and no credit could be issued; keep the payment reference and contact the operator.`,
      },
      charged: true,
      credit,
      payment: paymentOf(trace, "paid"),
      policy: FAILURE_POLICY,
      request_id: requestId,
    },
    { "X-Request-Id": requestId, "Cache-Control": "no-store" },
  );
}

/** A payment for a challenge that another payment already claimed: refused before its method ran. */
async function challengeUsed(handler: ReturnType<typeof payHandler>, request: Request, requestId: string): Promise<Response> {
  const fresh = await handler(new Request(request.url, { method: "POST" }));
  const res = fresh.status === 402 ? (fresh.challenge as Response) : new Response(null, { status: 402 });
  const headers = new Headers(res.headers);
  headers.set("Content-Type", "application/problem+json");
  headers.set("Cache-Control", "no-store");
  headers.set("X-Request-Id", requestId);
  await res.body?.cancel();
  return new Response(
    JSON.stringify({
      type: "https://paymentauth.org/problems/invalid-challenge",
      title: "Credential already used",
      status: 402,
      detail: "This challenge has already been paid (or another payment for it is being verified); this payment was not taken. Pay a fresh challenge.",
    }),
    { status: 402, headers },
  );
}

function text(body: string, type: string, requestId: string): Response {
  return new Response(body, {
    headers: { "Content-Type": `${type}; charset=utf-8`, "Cache-Control": "public, max-age=300", "X-Request-Id": requestId, "Access-Control-Allow-Origin": "*" },
  });
}

export function createMppApp(options: MppAppOptions): MppApp {
  const base = createApp(options.handlers, {
    ...(options.signup ? { signup: options.signup } : {}),
    ...(options.upstreams ? { upstreams: options.upstreams } : {}),
  });
  const g: Gateway = { options, limits: options.limits ?? DEFAULT_LIMITS };
  return {
    async fetch(request, env, ctx) {
      const url = new URL(request.url);
      const requestId = crypto.randomUUID();
      try {
        if (url.pathname === "/SKILL.md") return text(SKILL_MD, "text/markdown", requestId);
        if (url.pathname === "/llms.txt") return text(LLMS_TXT, "text/plain", requestId);
        if (url.pathname === "/execute") return await paidHttp(g, EXECUTE, request, env, ctx, requestId);
        if (url.pathname.startsWith("/pay/")) {
          const tool = url.pathname.slice("/pay/".length);
          if (!isCallType(tool) || tool === EXECUTE) return problem(404, "not_found", "No such route.", requestId);
          return await paidHttp(g, tool, request, env, ctx, requestId);
        }
        if (url.pathname === "/mcp") return withRequestId(await handleMcp(g, request, env, ctx, requestId), requestId);
      } catch (err) {
        console.error(JSON.stringify({ msg: "unhandled error", request_id: requestId, error: String(err) }));
        return problem(500, "internal_error", "Internal error.", requestId);
      }
      return base.fetch(request, env, ctx);
    },
  };
}

export const PAID_TOOL_NAMES: readonly CallType[] = CALL_TYPES;
