// MCP over streamable HTTP (stateless: one server per request) with the official MCP SDK.
// Paid tools: execute_code and every endpoint of mcpay.toml. Without payment they answer the
// JSON-RPC error -32042 with MPP challenges (mppx's MCP SDK transport); the credential goes in
// params._meta["org.paymentauth/credential"], the receipt comes back in
// result._meta["org.paymentauth/receipt"]; -32043 when verification fails. Challenges are bound to
// the tool name (opaque). A prepaid key (Authorization: Bearer) is charged like POST /v1/<tool>.
// Free tools: "pricing" and "limits".
import { Server } from "@modelcontextprotocol/sdk/server/index.js";
import { withoutCredentials } from "../lib/http";
import { WebStandardStreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/webStandardStreamableHttp.js";
import { CallToolRequestSchema, ErrorCode, ListToolsRequestSchema, McpError, type CallToolResult } from "@modelcontextprotocol/sdk/types.js";
import { CALL_TYPES, DESCRIPTION, INPUT_SHAPE, PRICE_MCENTS, PROJECT, SCOPE_FOR, type CallType } from "../generated/manifest";
import { FAILURE_POLICY, MPP } from "../generated/mpp";
import { parseBearer, sha256Hex } from "../lib/keys";
import { isCallType } from "../lib/manifest-util";
import type { Gateway } from "./app";
import { paymentOf, settleOutcome } from "./app";
import { IDEMPOTENCY_KEY_RE, IDEMPOTENCY_MAX_STORED_BYTES } from "../app";
import type { MppEnv } from "./env";
import { classifyMcp, issueCredit, newTrace, payHandler, realmFor, redeemCredit, type PaymentTrace } from "./pay";
import { EXECUTE, parseCall, runTool, type RunContext } from "./tools";

export const PAYMENT_REQUIRED = -32042;
export const VERIFICATION_FAILED = -32043;

/**
 * A JSON-RPC error with exactly this code, message and data. (McpError prefixes its message with
 * "MCP error <code>: "; the MPP transport spec wants e.g. message "Payment Required".)
 */
export class RpcError extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly data?: unknown,
  ) {
    super(message);
  }
}

/** mppx's challenge (an McpError) as a spec-shaped JSON-RPC error. */
function paymentError(err: unknown, override?: { code: number; message: string }): RpcError {
  const e = err as { code?: number; data?: unknown };
  const code = override?.code ?? e.code ?? PAYMENT_REQUIRED;
  const message =
    override?.message ?? (code === PAYMENT_REQUIRED ? "Payment Required" : code === VERIFICATION_FAILED ? "Payment Verification Failed" : "Invalid payment credential");
  return new RpcError(code, message, e.data);
}

function jsonSchemaFor(tool: CallType): Record<string, unknown> {
  const credit = { type: "string", description: "A one-time credit from an earlier gateway-side failure (instead of paying)." };
  if (tool === EXECUTE) {
    return {
      type: "object",
      properties: {
        code: { type: "string", description: `Body of an async JavaScript function of "input"; return a JSON value. At most ${MPP.maxCodeBytes} bytes.` },
        input: { description: "Any JSON value, passed to the code as `input`." },
        credit,
      },
      required: ["code"],
    };
  }
  const properties: Record<string, unknown> = { credit };
  const required: string[] = [];
  for (const [name, spec] of Object.entries(INPUT_SHAPE[tool])) {
    properties[name] = { type: spec.type };
    if (spec.required) required.push(name);
  }
  return { type: "object", properties, required };
}

function pricing(): Record<string, unknown> {
  return {
    unit: "mcents",
    mcents_per_cent: 1000,
    methods: MPP.methods,
    tools: CALL_TYPES.map((t) => ({ name: t, price_mcents: PRICE_MCENTS[t], description: DESCRIPTION[t], scope: SCOPE_FOR[t] })),
  };
}

function limits(): Record<string, unknown> {
  return { max_code_bytes: MPP.maxCodeBytes, timeout_ms: MPP.timeoutMs, cpu_ms: MPP.cpuMs, network: false, secrets: false, failure_policy: FAILURE_POLICY };
}

/** The per-call Idempotency-Key of an MCP tools/call (contract 3.10). */
const IDEMPOTENCY_META = "io.mcpay/idempotency_key";

function idempotencyOf(meta: Record<string, unknown> | undefined): string | null | "invalid" {
  const v = meta?.[IDEMPOTENCY_META];
  if (v === undefined) return null;
  return typeof v === "string" && IDEMPOTENCY_KEY_RE.test(v) ? v : "invalid";
}

function toolResult(body: Record<string, unknown>, isError = false): CallToolResult {
  return { content: [{ type: "text", text: JSON.stringify(body) }], structuredContent: body, ...(isError ? { isError: true } : {}) };
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

function buildServer(g: Gateway, request: Request, env: MppEnv, ctx: ExecutionContext, requestId: string): Server {
  const server = new Server(
    { name: PROJECT.name, version: PROJECT.version },
    { capabilities: { tools: {}, experimental: { payment: paymentCapability() } } },
  );
  server.setRequestHandler(ListToolsRequestSchema, async () => ({
    tools: [
      ...CALL_TYPES.map((t) => ({
        name: t,
        description: `${DESCRIPTION[t]} Paid: ${PRICE_MCENTS[t]} mcents per call (MPP or prepaid key).`,
        inputSchema: jsonSchemaFor(t) as { type: "object" },
        _meta: { "org.paymentauth/price": { amount_mcents: PRICE_MCENTS[t], methods: MPP.methods } },
      })),
      { name: "pricing", description: "Free: prices of the paid tools and the payment methods.", inputSchema: { type: "object" as const, properties: {} } },
      { name: "limits", description: "Free: sandbox limits and the failure policy.", inputSchema: { type: "object" as const, properties: {} } },
    ],
  }));

  server.setRequestHandler(CallToolRequestSchema, async (req, extra) => {
    const name = req.params.name;
    if (name === "pricing") return toolResult(pricing());
    if (name === "limits") return toolResult(limits());
    if (!isCallType(name)) throw new McpError(ErrorCode.InvalidParams, `Unknown tool ${name.slice(0, 64)}`);
    const tool: CallType = name;

    // 1. Validate first: no challenge, no charge.
    const call = await parseCall(tool, req.params.arguments ?? {}, g.options.handlers, env, requestId);
    if (!call.ok) throw new McpError(ErrorCode.InvalidParams, call.message, { code: call.code });
    const runCtx: RunContext = { env, requestId, request: withoutCredentials(request), waitUntil: (p) => ctx.waitUntil(p), keyId: "mpp", chargedMcents: 0, balanceMcents: 0 };

    // 2a. Prepaid key: charged by the key's Durable Object exactly like POST /v1/<tool>.
    const auth = request.headers.get("Authorization");
    if (auth !== null && /^\s*bearer\s/i.test(auth)) {
      const bearer = parseBearer(auth);
      if (!bearer.ok) throw new McpError(ErrorCode.InvalidRequest, "Invalid API key.", { code: bearer.code });
      const stub = env.KEYS.get(env.KEYS.idFromName(await sha256Hex(bearer.key)));
      // Every tools/call is charged and settled under its own id, made here (never from the
      // client's JSON-RPC id), so a failing call can only ever refund itself.
      const callId = `${requestId}/mcp/${crypto.randomUUID()}`;
      // Idempotency over MCP: params._meta["io.mcpay/idempotency_key"] plays the Idempotency-Key
      // header's part (one per tools/call, so it also works inside a batch); the "body" is the tool
      // name and its arguments. A retry after a lost answer gets the stored result, never a second hold.
      const idem = idempotencyOf(req.params._meta);
      if (idem === "invalid") {
        throw new McpError(ErrorCode.InvalidParams, `${IDEMPOTENCY_META} must match ${IDEMPOTENCY_KEY_RE.source}.`, { code: "invalid_input", note: "no charge applied" });
      }
      const holdOptions =
        idem === null ? {} : { idempotencyKey: idem, bodyHash: await sha256Hex(`mcp:${JSON.stringify([tool, req.params.arguments ?? {}])}`) };
      // Held, then captured (done) or released (failed); a hold left by a dead request is released
      // by the key's alarm (contract 3.8).
      const charge = await stub.hold(tool, callId, holdOptions);
      if (!charge.ok && charge.code === "replay") {
        if (charge.response?.body == null) {
          throw new McpError(ErrorCode.InvalidRequest, "The first call with this idempotency key succeeded but its result was too large to store; it is not run or charged again.", {
            code: "idempotency_response_not_stored",
            original_request_id: charge.originalRequestId,
            max_stored_bytes: IDEMPOTENCY_MAX_STORED_BYTES,
            note: "no charge applied",
          });
        }
        const stored = JSON.parse(new TextDecoder().decode(charge.response.body)) as Record<string, unknown>;
        return { ...toolResult(stored), _meta: { "io.mcpay/idempotent_replayed": true } };
      }
      if (!charge.ok) throw new McpError(ErrorCode.InvalidRequest, `Not charged: ${charge.code}.`, { ...charge, note: "no charge applied" });
      const outcome = await runTool(tool, call.input, g.options.handlers, { ...runCtx, keyId: charge.keyId, chargedMcents: charge.chargedMcents, balanceMcents: charge.balanceMcents }, g.limits);
      if (outcome.kind === "done") {
        const body = { ...outcome.body, charged_mcents: charge.chargedMcents, balance_mcents: charge.balanceMcents, request_id: requestId };
        const bytes = new TextEncoder().encode(JSON.stringify(body));
        const stored = idem === null ? undefined : { status: 200, headers: [], body: bytes.byteLength <= IDEMPOTENCY_MAX_STORED_BYTES ? (bytes.buffer as ArrayBuffer) : null };
        // A capture that fails leaves the hold to the alarm (released): the result is still served.
        const captured = await stub.capture(callId, stored).catch((err: unknown) => {
          console.error(JSON.stringify({ msg: "capture failed", request_id: requestId, call_id: callId, error: String(err) }));
          return null;
        });
        if (captured !== null && !captured.ok && captured.state === "released") {
          return toolResult({ ok: false, error: { code: "handler_timeout", message: "The tool did not finish in time; the held price was released." }, refunded: true, balance_mcents: captured.balanceMcents, request_id: requestId }, true);
        }
        return toolResult(body);
      }
      // A failing tool is settled like a failing handler of POST /v1/<tool> (refund cap applies).
      // A release that fails is left to the key's alarm, which releases the hold in full.
      const settled = await stub.release(callId, "caller").catch((err: unknown) => {
        console.error(JSON.stringify({ msg: "release failed", request_id: requestId, call_id: callId, error: String(err) }));
        return null;
      });
      if (settled === null) {
        return toolResult({ ok: false, error: { code: outcome.code, message: outcome.message }, refunded: false, refund_pending: true, request_id: requestId }, true);
      }
      return toolResult(
        { ok: false, error: { code: outcome.code, message: outcome.message }, refunded: settled.refunded, balance_mcents: settled.balanceMcents, request_id: requestId },
        true,
      );
    }

    // 2b. A one-time credit.
    if (call.credit !== null) {
      if (!(await redeemCredit(env, call.credit, tool))) {
        throw new McpError(ErrorCode.InvalidParams, "This credit is unknown, expired, already used or for another tool.", { code: "invalid_credit" });
      }
      const settled = await settleOutcome(env, tool, await runTool(tool, call.input, g.options.handlers, runCtx, g.limits), true);
      return toolResult({ ...settled.body, paid_with: "credit", request_id: requestId }, !settled.ok);
    }

    // 2c. MPP over MCP.
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

/** The first JSON-RPC id used by more than one request of a batch, or null (not a batch / no duplicate / not JSON). */
export function duplicateBatchId(text: string): string | null {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    return null; // the SDK answers the parse error
  }
  if (!Array.isArray(body)) return null;
  const seen = new Set<string>();
  for (const m of body) {
    if (typeof m !== "object" || m === null || Array.isArray(m) || !("id" in m) || !("method" in m)) continue;
    const id = JSON.stringify((m as { id: unknown }).id) ?? "undefined";
    if (seen.has(id)) return id;
    seen.add(id);
  }
  return null;
}

export async function handleMcp(g: Gateway, request: Request, env: MppEnv, ctx: ExecutionContext, requestId: string): Promise<Response> {
  if (request.method.toUpperCase() !== "POST") {
    return new Response(JSON.stringify({ jsonrpc: "2.0", error: { code: -32000, message: "Method not allowed: this MCP endpoint is stateless, use POST." }, id: null }), {
      status: 405,
      headers: { Allow: "POST", "Content-Type": "application/json" },
    });
  }
  // Payment clients often send no Accept header; the streamable HTTP transport requires both types.
  const accept = request.headers.get("Accept") ?? "";
  if (!accept.includes("application/json") || !accept.includes("text/event-stream")) {
    const headers = new Headers(request.headers);
    headers.set("Accept", "application/json, text/event-stream");
    request = new Request(request, { headers });
  }
  // A batch whose requests share a JSON-RPC id is refused whole, before any of its calls is
  // charged: replies could not be told apart (charges and refunds are per call, by ids made here).
  const text = await request.text();
  const duplicate = duplicateBatchId(text);
  if (duplicate !== null) {
    return new Response(
      JSON.stringify({
        jsonrpc: "2.0",
        error: { code: ErrorCode.InvalidRequest, message: `Invalid Request: the batch uses the JSON-RPC id ${duplicate.slice(0, 64)} more than once; give every request its own id. Nothing was run or charged.` },
        id: null,
      }),
      { status: 400, headers: { "Content-Type": "application/json", "Cache-Control": "no-store" } },
    );
  }
  request = new Request(request.url, { method: request.method, headers: request.headers, body: text });
  const server = buildServer(g, request, env, ctx, requestId);
  const transport = new WebStandardStreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
  await server.connect(transport);
  return transport.handleRequest(request);
}
