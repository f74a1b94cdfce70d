// MCP over streamable HTTP (stateless: one server per request) with the official MCP SDK.
// Paid tools: execute_code and every endpoint of mcpay.toml. Without payment they answer the
// JSON-RPC error -32042 with MPP challenges (mppx's MCP SDK transport); the credential goes in
// params._meta["org.paymentauth/credential"], the receipt comes back in
// result._meta["org.paymentauth/receipt"]; -32043 when verification fails. Challenges are bound to
// the tool name (opaque). A prepaid key (Authorization: Bearer) goes through the billing core of
// POST /v1/<tool> (src/lib/mcp.ts, contract 3.11). Free tools: "pricing", "balance" and "limits".
import { Server } from "@modelcontextprotocol/sdk/server/index.js";
import { withoutCredentials } from "../lib/http";
import { CallToolRequestSchema, ErrorCode, ListToolsRequestSchema, McpError, type CallToolResult, type Tool } from "@modelcontextprotocol/sdk/types.js";
import { CALL_TYPES, PRICE_MCENTS, PROJECT, type CallType } from "../generated/manifest";
import { FAILURE_POLICY, MPP } from "../generated/mpp";
import type { Handlers } from "../lib/handler";
import { isCallType } from "../lib/manifest-util";
import { FREE_TOOLS, RpcError, callPaidTool, freeTool, paidToolEntry, runServer, serveMcp, toolResult, unknownTool } from "../lib/mcp";
import type { McpKey, RawArguments } from "../lib/mcp";
import { isPlainObject } from "../lib/shape";
import { resolveSignup } from "../lib/signup";
import { keyStubFor } from "../app";
import type { Gateway } from "./app";
import { paymentOf, settleOutcome } from "./app";
import type { MppEnv } from "./env";
import { executeHandler, executeHandlerWith } from "./execute-handler";
import { classifyMcp, issueCredit, newTrace, payHandler, realmFor, redeemCredit, type PaymentTrace } from "./pay";
import { EXECUTE, parseCall, runTool, type RunContext } from "./tools";

export const PAYMENT_REQUIRED = -32042;
export const VERIFICATION_FAILED = -32043;

export { RpcError };

/** mppx's challenge (an McpError) as a spec-shaped JSON-RPC error. */
function paymentError(err: unknown, override?: { code: number; message: string }): RpcError {
  const e = err as { code?: number; data?: unknown };
  const code = override?.code ?? e.code ?? PAYMENT_REQUIRED;
  const message =
    override?.message ?? (code === PAYMENT_REQUIRED ? "Payment Required" : code === VERIFICATION_FAILED ? "Payment Verification Failed" : "Invalid payment credential");
  return new RpcError(code, message, e.data);
}

const CREDIT = { type: "string", description: "A one-time credit from an earlier gateway-side failure (instead of paying)." };

/** A paid tool: the manifest's schema and terms (contract 3.11), plus the MPP price and `credit`. */
function paidTool(tool: CallType): Tool {
  const entry = paidToolEntry(tool, { credit: CREDIT });
  if (tool === EXECUTE) {
    // The generated schema (the same shape as POST /v1/execute_code: `input` is an object), with
    // what each field is for. (Paid with MPP, `input` may be any JSON value; an object always works.)
    const properties = entry.inputSchema.properties as Record<string, Record<string, unknown>>;
    properties.code = { ...properties.code, description: `Body of an async JavaScript function of "input"; return a JSON value. At most ${MPP.maxCodeBytes} bytes.` };
    properties.input = { ...properties.input, description: "A JSON object, passed to the code as `input`." };
  }
  return { ...entry, _meta: { ...entry._meta, "org.paymentauth/price": { amount_mcents: PRICE_MCENTS[tool], methods: MPP.methods } } };
}

/** The handlers of prepaid calls: the built-in execute_code runs with this app's sandbox limits. */
function prepaidHandlers(g: Gateway): Handlers {
  const h = g.options.handlers;
  return h.execute_code === executeHandler ? { ...h, execute_code: executeHandlerWith(g.limits) } : h;
}

function limits(): Record<string, unknown> {
  return { max_code_bytes: MPP.maxCodeBytes, timeout_ms: MPP.timeoutMs, cpu_ms: MPP.cpuMs, network: false, secrets: false, failure_policy: FAILURE_POLICY };
}

/** capabilities.experimental.payment: the methods and intents offered. */
export function paymentCapability(): Record<string, unknown> {
  const methods: Record<string, { intents: string[] }> = {};
  for (const key of MPP.methods) {
    const [name, intent] = key.split("/") as [string, string];
    (methods[name] ??= { intents: [] }).intents.push(intent);
  }
  return { methods };
}

/** The method failed without refusing: whether money moved is unknown (never "no charge applied"). */
function paymentPending(trace: PaymentTrace): RpcError {
  return new RpcError(ErrorCode.InternalError, "Payment outcome unknown", {
    code: "payment_unavailable",
    message: "The payment method failed while verifying this payment; whether it was taken is not known. Keep the reference; the operator resolves it. Do not pay this challenge again.",
    payment: paymentOf(trace, "pending"),
  });
}

/** The payment was taken but the call could not be served (ours): a credit if possible, and the reference. */
async function notDelivered(env: MppEnv, tool: CallType, trace: PaymentTrace, requestId: string, err: unknown, ran: boolean): Promise<CallToolResult> {
  const payment = paymentOf(trace, "paid");
  console.error(JSON.stringify({ msg: "paid call not delivered", request_id: requestId, reference: payment.reference, error: String(err).slice(0, 500) }));
  let credit: Awaited<ReturnType<typeof issueCredit>> | null = null;
  try {
    credit = await issueCredit(env, tool);
  } catch (e) {
    console.error(JSON.stringify({ msg: "credit could not be issued", request_id: requestId, reference: payment.reference, error: String(e).slice(0, 500) }));
  }
  return toolResult(
    {
      ok: false,
      error: {
        code: "delivery_failed",
        message: `Your payment was taken but the call ${ran ? "could not be completed" : "was not run"} on our side; ${credit ? "use the credit to run it again without paying" : "keep the payment reference and contact the operator"}.`,
      },
      charged: true,
      credit,
      payment,
      policy: FAILURE_POLICY,
      request_id: requestId,
    },
    true,
  );
}

function buildServer(g: Gateway, request: Request, env: MppEnv, ctx: ExecutionContext, requestId: string, key: McpKey | null, rawArguments: RawArguments): Server {
  const server = new Server(
    { name: PROJECT.name, version: PROJECT.version },
    { capabilities: { tools: {}, experimental: { payment: paymentCapability() } } },
  );
  server.setRequestHandler(ListToolsRequestSchema, async () => ({
    tools: [
      ...CALL_TYPES.map(paidTool),
      ...FREE_TOOLS,
      { name: "limits", description: "Free: sandbox limits and the failure policy.", inputSchema: { type: "object" as const, properties: {}, additionalProperties: false } },
    ],
  }));

  server.setRequestHandler(CallToolRequestSchema, async (req, extra) => {
    const name = req.params.name;
    const args = rawArguments(extra.requestId, req.params.arguments);
    const free = await freeTool(name, resolveSignup(g.options.signup).config, key);
    if (free !== null) return free;
    if (name === "limits") return toolResult(limits());
    if (!isCallType(name)) throw unknownTool(name);
    const tool: CallType = name;

    // 1. A prepaid key (checked before the server ran): the billing core of POST /v1/<tool>. A
    //    `credit` argument means nothing to a key (it is for MPP payers) and is left out.
    if (key !== null) {
      let input = args;
      if (isPlainObject(args)) {
        const { credit: _credit, ...rest } = args;
        input = rest;
      }
      return callPaidTool({ tool, args: input, meta: req.params._meta, handlers: prepaidHandlers(g), options: {}, key, env, ctx, request, requestId });
    }

    // 2. Validate first: no challenge, no charge.
    const call = await parseCall(tool, args === undefined ? {} : args, g.options.handlers, env, requestId);
    if (!call.ok) throw new McpError(ErrorCode.InvalidParams, call.message, { code: call.code });
    const runCtx: RunContext = { env, requestId, request: withoutCredentials(request), waitUntil: (p) => ctx.waitUntil(p), keyId: "mpp", chargedMcents: 0, balanceMcents: 0 };

    // 3a. A one-time credit.
    if (call.credit !== null) {
      if (!(await redeemCredit(env, call.credit, tool))) {
        throw new McpError(ErrorCode.InvalidParams, "This credit is unknown, expired, already used or for another tool.", { code: "invalid_credit" });
      }
      const settled = await settleOutcome(env, tool, await runTool(tool, call.input, g.options.handlers, runCtx, g.limits), true);
      return toolResult({ ...settled.body, paid_with: "credit", request_id: requestId }, !settled.ok);
    }

    // 3b. MPP over MCP.
    const setup = g.options.payments(env);
    if (!setup.ok) {
      console.error(JSON.stringify({ msg: "payments not configured", problems: setup.problems }));
      throw new McpError(ErrorCode.InternalError, "Payments are not configured on this gateway.");
    }
    const trace = newTrace();
    const handler = payHandler(setup.setup, "mcp", realmFor(request), tool, env, trace);
    // The claim → verify → mark sequence finishes even if the client goes away meanwhile.
    const verifying = handler(extra);
    ctx.waitUntil(verifying.then(() => undefined, () => undefined));
    let result: Awaited<typeof verifying>;
    try {
      result = await verifying;
    } catch (err) {
      if (trace.taken) return notDelivered(env, tool, trace, requestId, err, false);
      if (trace.pending) throw paymentPending(trace);
      throw err;
    }
    if (result.status === 402) {
      if (trace.taken) return notDelivered(env, tool, trace, requestId, "the payment method refused after taking the payment", false);
      if (trace.pending) throw paymentPending(trace);
      if (trace.refused) {
        const fresh = await handler({ ...extra, _meta: {} });
        throw paymentError(fresh.status === 402 ? fresh.challenge : {}, { code: VERIFICATION_FAILED, message: "Payment credential already used" });
      }
      throw paymentError(result.challenge);
    }
    const paid = classifyMcp(result.withReceipt);
    if (paid.kind === "management") return paid.response as CallToolResult;
    if (paid.kind !== "paid") return notDelivered(env, tool, trace, requestId, "payment accepted without a receipt", false);
    // The payment is taken: from here on every failure is answered with the payment's reference.
    let settled: Awaited<ReturnType<typeof settleOutcome>>;
    try {
      settled = await settleOutcome(env, tool, await runTool(tool, call.input, g.options.handlers, runCtx, g.limits), false);
    } catch (err) {
      return notDelivered(env, tool, trace, requestId, err, true);
    }
    if (!settled.ok) return toolResult({ ...settled.body, payment: paymentOf(trace, "paid"), request_id: requestId }, true);
    const body = { ...settled.body, request_id: requestId };
    try {
      return result.withReceipt({ content: [{ type: "text", text: JSON.stringify(body) }], structuredContent: body }) as CallToolResult;
    } catch (err) {
      console.error(JSON.stringify({ msg: "receipt could not be attached", request_id: requestId, error: String(err) }));
      return toolResult({ ...body, payment: paymentOf(trace, "paid") });
    }
  });
  return server;
}

/** /mcp: a paid tool is paid with a prepaid key when the request carries Authorization, else with MPP. */
export function handleMcp(g: Gateway, request: Request, env: MppEnv, ctx: ExecutionContext, requestId: string): Promise<Response> {
  return serveMcp(request, env, requestId, {
    needsKey: (tool, req) => tool === "balance" || (isCallType(tool) && req.headers.has("Authorization")),
    keyStub: (e, hash) => keyStubFor(e, hash, {}),
    serve: (req, key, rawArguments) => runServer(buildServer(g, req, env, ctx, requestId, key, rawArguments), req),
  });
}
