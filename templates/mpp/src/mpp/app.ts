// The MPP compute gateway: the worker gateway (prepaid keys, /v1/*) plus
//   POST /execute        execute_code paid with MPP (HTTP 402 + WWW-Authenticate: Payment)
//   POST /pay/<tool>     the manifest's paid endpoints, paid with MPP
//   POST /mcp            MCP (streamable HTTP): paid tools (-32042 / credential in _meta), free tools
//   GET  /SKILL.md, /llms.txt   discovery documents generated from mcpay.toml
// `createMppApp` takes the payment setup as a parameter: src/index.ts builds the production
// methods from the environment; tests build their own app with a deterministic method.
import { createApp } from "../app";
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
import { classifyHttp, consumePayment, credentialFromHttp, issueCredit, payHandler, realmFor, redeemCredit } from "./pay";
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
    status: outcome.code === "sandbox_timeout" ? 504 : 502,
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

  // 2b. MPP.
  const setup = g.options.payments(env);
  if (!setup.ok) {
    console.error(JSON.stringify({ msg: "payments not configured", problems: setup.problems }));
    return problem(503, "payments_unavailable", "Payments are not configured on this gateway.", requestId);
  }
  const handler = payHandler(setup.setup, "http", realmFor(request), tool);
  const result = await handler(request);
  if (result.status === 402) return withRequestId(result.challenge as Response, requestId);
  // 3. A 200 without a valid receipt is not a payment; a management exchange runs nothing.
  const paid = classifyHttp(result.withReceipt);
  if (paid.kind === "management") return withRequestId(paid.response, requestId);
  const credential = credentialFromHttp(request);
  if (paid.kind !== "paid" || !credential) {
    console.error(JSON.stringify({ msg: "payment accepted without receipt or credential", request_id: requestId }));
    return problem(500, "internal_error", "Payment could not be confirmed; nothing was run.", requestId);
  }
  // 4. Consume the payment durably, once, before running.
  if (!(await consumePayment(env, credential))) {
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
        detail: "This payment credential has already paid for an execution. Pay a fresh challenge.",
      }),
      { status: 402, headers },
    );
  }
  // 5. Run, answer with the receipt.
  const settled = await settleOutcome(env, tool, await runTool(tool, call.input, g.options.handlers, runCtx, g.limits), false);
  if (!settled.ok) return json(settled.status, { ...settled.body, request_id: requestId }, { "X-Request-Id": requestId });
  const res = result.withReceipt(json(200, { ...settled.body, request_id: requestId })) as Response;
  return withRequestId(res, requestId);
}

function text(body: string, type: string, requestId: string): Response {
  return new Response(body, {
    headers: { "Content-Type": `${type}; charset=utf-8`, "Cache-Control": "public, max-age=300", "X-Request-Id": requestId, "Access-Control-Allow-Origin": "*" },
  });
}

export function createMppApp(options: MppAppOptions): MppApp {
  const base = createApp(options.handlers, options.signup ? { signup: options.signup } : {});
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
