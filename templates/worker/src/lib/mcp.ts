// /mcp: the MCP face of the gateway (contract 3.11), over streamable HTTP with the official SDK
// (low-level Server + WebStandardStreamableHTTPServerTransport, stateless: a fresh server per
// request, JSON answers). Every paid endpoint is a tool; a paid tools/call goes through the same
// billing core as POST /v1/<endpoint> (lib/paid-call.ts). The mpp target builds its /mcp from the
// pieces exported here (its MPP-paid path on top).
import { Server } from "@modelcontextprotocol/sdk/server/index.js";
import { WebStandardStreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/webStandardStreamableHttp.js";
import { CallToolRequestSchema, ErrorCode, ListToolsRequestSchema, type CallToolResult, type Tool } from "@modelcontextprotocol/sdk/types.js";
import { keyStubFor, meBody, pricingBody, timeoutFor, type AppOptions } from "../app";
import { CALL_TYPES, DESCRIPTION, GATEWAY, INPUT_SCHEMA, PRICE_MCENTS, PROJECT, SCOPE_FOR, type CallType } from "../generated/manifest";
import { readBoundedText } from "./body";
import type { AppEnv } from "./env";
import type { Handler, Handlers } from "./handler";
import { CORS_HEADERS, HttpError, NO_CHARGE_NOTE, answering, errorBody, errorResponse, withHeaders } from "./http";
import type { KeyDO } from "./key-do";
import { parseBearer, sha256Hex } from "./keys";
import { isCallType } from "./manifest-util";
import { IDEMPOTENCY_KEY_RE, IDEMPOTENCY_MAX_STORED_BYTES, runPaidCall, type Face } from "./paid-call";
import { isPlainObject } from "./shape";
import type { SignupConfig } from "./signup-config";

export const MCP_PATH = "/mcp";

/** CORS of /mcp: the /v1 public headers plus the MCP transport's own. */
export const MCP_CORS_HEADERS: Readonly<Record<string, string>> = {
  ...CORS_HEADERS,
  "Access-Control-Allow-Headers": `${CORS_HEADERS["Access-Control-Allow-Headers"]}, Mcp-Protocol-Version, Mcp-Session-Id, Last-Event-ID`,
  "Access-Control-Expose-Headers": `${CORS_HEADERS["Access-Control-Expose-Headers"]}, Mcp-Session-Id`,
};

/** The per-call Idempotency-Key of a paid tools/call (contract 3.10, 3.11). */
export const IDEMPOTENCY_META = "io.mcpay/idempotency_key";

/** JSON-RPC error codes of refusals before the hold (contract 3.11). */
const RPC_CODE: Partial<Record<string, number>> = {
  invalid_input: ErrorCode.InvalidParams,
  not_found: ErrorCode.InvalidParams,
  insufficient_balance: -32002,
  scope_denied: -32003,
  rate_limited: -32004,
  idempotency_mismatch: -32005,
  idempotency_in_progress: -32005,
  idempotency_response_not_stored: -32005,
  internal_error: ErrorCode.InternalError,
  // Not reachable (the key is checked before the MCP server runs); kept out of the spec's range.
  invalid_key: -32001,
  missing_key: -32001,
};

/**
 * A JSON-RPC error with exactly this code, message and data (the SDK sends a thrown error's
 * `code`, `message` and `data`; McpError would prefix the message with "MCP error <code>: ").
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

/** A refusal of the billing core (HttpError) as the JSON-RPC error of contract 3.11. */
export function toRpcError(err: HttpError): RpcError {
  const code = err.code === "not_found" ? "invalid_input" : err.code;
  return new RpcError(RPC_CODE[err.code] ?? ErrorCode.InternalError, err.message, { code, note: NO_CHARGE_NOTE, ...(err.opts.extra ?? {}) });
}

export function unknownTool(name: string): RpcError {
  return new RpcError(ErrorCode.InvalidParams, `Unknown tool "${name.slice(0, 64)}".`, { code: "invalid_input", note: NO_CHARGE_NOTE });
}

/** A paid endpoint as a tool: JSON Schema from the manifest, its terms in `_meta`. */
export function paidToolEntry(ep: CallType, extraProperties: Record<string, object> = {}): Tool {
  const schema = INPUT_SCHEMA[ep];
  return {
    name: ep,
    description: DESCRIPTION[ep],
    inputSchema: { ...schema, properties: { ...schema.properties, ...extraProperties } },
    _meta: { "io.mcpay/price_mcents": PRICE_MCENTS[ep], "io.mcpay/scope": SCOPE_FOR[ep] },
  };
}

const NO_ARGUMENTS = { type: "object" as const, properties: {}, additionalProperties: false };

/** The free tools every gateway serves. */
export const FREE_TOOLS: readonly Tool[] = [
  { name: "pricing", description: "Free: what every tool costs (the body of GET /v1/pricing). No key needed.", inputSchema: NO_ARGUMENTS },
  { name: "balance", description: "Free: your key's balance and stats (the body of GET /v1/me). Needs Authorization: Bearer <key>.", inputSchema: NO_ARGUMENTS },
];

export function toolResult(body: Record<string, unknown>, isError = false, meta?: Record<string, unknown>): CallToolResult {
  return {
    content: [{ type: "text", text: JSON.stringify(body) }],
    structuredContent: body,
    ...(isError ? { isError: true } : {}),
    ...(meta ? { _meta: meta } : {}),
  };
}

/** The caller's key, checked before the MCP server runs. */
export interface McpKey {
  readonly stub: DurableObjectStub<KeyDO>;
}

/** `pricing` and `balance`; null for any other name. */
export async function freeTool(name: string, signup: SignupConfig, key: McpKey | null): Promise<CallToolResult | null> {
  if (name === "pricing") return toolResult(pricingBody(signup));
  if (name !== "balance") return null;
  // The front answered 401 without a valid key; a key cannot disappear meanwhile.
  const stats = key === null ? null : await key.stub.stats();
  if (stats === null) throw new RpcError(-32001, "Invalid API key.", { code: "invalid_key" });
  return toolResult(meBody(stats));
}

/** A paid tool's success as an MCP result (contract 3.11), and what an idempotent replay sends. */
function mcpFace(callId: string): Face<CallToolResult> {
  return {
    async present(out, charge, store) {
      let value: unknown = out === undefined ? null : out;
      let text: string;
      if (out instanceof Response) {
        text = await out.text();
        try {
          value = JSON.parse(text);
        } catch {
          value = text;
        }
      } else {
        // Throws on values that are not JSON (BigInt, cycles): a caller failure, as on /v1.
        text = JSON.stringify(value) ?? "null";
      }
      const result: CallToolResult = {
        content: [{ type: "text", text }],
        structuredContent: isPlainObject(value) ? value : { result: value },
        _meta: { "io.mcpay/charged_mcents": charge.chargedMcents, "io.mcpay/balance_mcents": charge.balanceMcents, "io.mcpay/request_id": callId },
      };
      if (!store) return { answer: result };
      const bytes = new TextEncoder().encode(JSON.stringify(result));
      return { answer: result, stored: { status: 200, headers: [], body: bytes.byteLength <= IDEMPOTENCY_MAX_STORED_BYTES ? (bytes.buffer as ArrayBuffer) : null } };
    },
    async discard() {},
  };
}

export interface PaidToolCall {
  readonly tool: CallType;
  readonly args: unknown;
  readonly meta: Record<string, unknown> | undefined;
  readonly handlers: Handlers;
  readonly options: AppOptions;
  readonly key: McpKey;
  readonly env: AppEnv;
  readonly ctx: ExecutionContext;
  readonly request: Request;
  /** The HTTP request's X-Request-Id; each call gets its own call id under it. */
  readonly requestId: string;
}

/** A paid tools/call with a prepaid key: the billing core of POST /v1/<endpoint>, answered in MCP. */
export async function callPaidTool(c: PaidToolCall): Promise<CallToolResult> {
  // Every tools/call is held and settled under its own id, made here (never from the client's
  // JSON-RPC id), so a call inside a batch only ever settles itself.
  const callId = `${c.requestId}/mcp/${crypto.randomUUID()}`;
  const idem = c.meta?.[IDEMPOTENCY_META];
  if (idem !== undefined && (typeof idem !== "string" || !IDEMPOTENCY_KEY_RE.test(idem))) {
    throw toRpcError(new HttpError(400, "invalid_input", { message: `_meta["${IDEMPOTENCY_META}"] must be 32 to 128 characters from A-Z a-z 0-9 _ -.`, noCharge: true }));
  }
  const args = c.args === undefined ? {} : c.args;
  let outcome;
  try {
    outcome = await runPaidCall(
      {
        endpoint: c.tool,
        handler: c.handlers[c.tool] as Handler<unknown>,
        input: args,
        // The "body" of an MCP call is its tool name and arguments (never equal to an HTTP body).
        bodyForHash: `mcp:${JSON.stringify([c.tool, args])}`,
        idempotencyKey: idem as string | undefined,
        stub: c.key.stub,
        callId,
        env: c.env,
        ctx: c.ctx,
        request: c.request,
        timeoutMs: timeoutFor(c.tool, c.options),
      },
      mcpFace(callId),
    );
  } catch (err) {
    if (err instanceof HttpError) throw toRpcError(err);
    throw err;
  }
  switch (outcome.kind) {
    case "ok":
      return outcome.answer;
    case "replay": {
      const stored = JSON.parse(new TextDecoder().decode(outcome.stored.body!)) as CallToolResult;
      return { ...stored, _meta: { ...(stored._meta ?? {}), "io.mcpay/idempotent_replayed": true } };
    }
    case "failed": {
      const body = errorBody(outcome.code, callId, { ...(outcome.message !== undefined ? { message: outcome.message } : {}), extra: outcome.extra });
      return toolResult(body, true, {
        "io.mcpay/refunded": outcome.extra.refunded,
        "io.mcpay/charged_mcents": outcome.extra.charged_mcents,
        "io.mcpay/balance_mcents": outcome.extra.balance_mcents,
        "io.mcpay/request_id": callId,
      });
    }
  }
}

/** The first JSON-RPC id used by more than one request of a batch, or null (not a batch / no duplicate). */
export function duplicateBatchId(body: unknown): string | null {
  if (!Array.isArray(body)) return null;
  const seen = new Set<string>();
  for (const m of body) {
    if (!isPlainObject(m) || !("id" in m) || !("method" in m)) continue;
    const id = JSON.stringify(m.id) ?? "undefined";
    if (seen.has(id)) return id;
    seen.add(id);
  }
  return null;
}

function rpcErrorResponse(status: number, code: number, message: string): Response {
  return new Response(JSON.stringify({ jsonrpc: "2.0", error: { code, message }, id: null }), {
    status,
    headers: { "Content-Type": "application/json; charset=utf-8" },
  });
}

/**
 * tools/call arguments the SDK's request schema would refuse with -32603 before the gateway sees
 * them (not an object; an own `constructor` or `__proto__` field trips its record check). The
 * front hands them to the tool handler instead, so the shape check refuses them (-32602), as on /v1.
 */
export type RawArguments = (jsonRpcId: unknown, sdkArguments: unknown) => unknown;

function sdkRefuses(args: unknown): boolean {
  return !isPlainObject(args) || Object.hasOwn(args, "constructor") || Object.hasOwn(args, "__proto__");
}

export interface McpFront {
  /** Whether a tools/call of this tool needs the caller's key (balance and paid tools). */
  needsKey(tool: string, request: Request): boolean;
  /** Runs the MCP server on the (re-built) request; `key` is set when one was sent and valid. */
  serve(request: Request, key: McpKey | null, rawArguments: RawArguments): Promise<Response>;
  keyStub(env: AppEnv, keyHash: string): DurableObjectStub<KeyDO>;
}

/**
 * Everything of /mcp that happens before the MCP server (contract 3.11): methods, CORS, the body
 * bound, batches with duplicate ids, and the key of balance and paid calls (HTTP 401 without one).
 */
export async function serveMcp(request: Request, env: AppEnv, requestId: string, front: McpFront): Promise<Response> {
  const res = await answering(requestId, () => mcpFront(request, env, front));
  const headers: Record<string, string> = { "X-Request-Id": requestId, ...MCP_CORS_HEADERS };
  if (res.status !== 204 && res.headers.get("Content-Type")?.startsWith("application/json")) {
    // The SDK's answers get the headers of every JSON answer of the gateway (section 2).
    headers["Content-Type"] = "application/json; charset=utf-8";
    headers["Cache-Control"] = "no-store";
    headers["X-Content-Type-Options"] = "nosniff";
  }
  return withHeaders(res, headers);
}

async function mcpFront(request: Request, env: AppEnv, front: McpFront): Promise<Response> {
  const method = request.method.toUpperCase();
  if (method === "OPTIONS") {
    return new Response(null, { status: 204, headers: { "Access-Control-Allow-Methods": "POST, OPTIONS", "Access-Control-Max-Age": "86400" } });
  }
  // Stateless: no server-initiated stream (GET), no session to end (DELETE).
  if (method !== "POST") throw new HttpError(405, "method_not_allowed", { headers: { Allow: "POST" } });

  let text: string;
  try {
    text = await readBoundedText(request, GATEWAY.maxBodyBytes);
  } catch (err) {
    if (err instanceof HttpError && err.code === "body_too_large") throw new HttpError(413, "body_too_large", { ...err.opts, noCharge: false });
    return rpcErrorResponse(400, ErrorCode.ParseError, "Parse error: the body is not UTF-8 JSON.");
  }
  let body: unknown = undefined;
  try {
    body = JSON.parse(text);
  } catch {
    // The SDK answers the parse error (-32700).
  }
  // A batch whose requests share a JSON-RPC id is refused whole, before any of its calls is
  // charged: replies could not be told apart (charges and refunds are per call, by ids made here).
  const duplicate = duplicateBatchId(body);
  if (duplicate !== null) {
    return rpcErrorResponse(
      400,
      ErrorCode.InvalidRequest,
      `Invalid Request: the batch uses the JSON-RPC id ${duplicate.slice(0, 64)} more than once; give every request its own id. Nothing was run or charged.`,
    );
  }

  // The key is read only for calls that need it (a key on discovery requests is not read), and
  // decided here, as HTTP 401, before the MCP server runs.
  const messages = Array.isArray(body) ? body : [body];
  const needsKey = messages.some(
    (m) => isPlainObject(m) && m.method === "tools/call" && isPlainObject(m.params) && typeof m.params.name === "string" && front.needsKey(m.params.name, request),
  );
  let key: McpKey | null = null;
  if (needsKey) {
    const bearer = parseBearer(request.headers.get("Authorization"));
    if (!bearer.ok) throw new HttpError(401, bearer.code);
    const stub = front.keyStub(env, await sha256Hex(bearer.key));
    // Read-only: an unknown key writes nothing.
    if ((await stub.stats()) === null) throw new HttpError(401, "invalid_key");
    key = { stub };
  }

  const held = new Map<string, unknown>();
  for (const m of messages) {
    if (isPlainObject(m) && m.method === "tools/call" && "id" in m && isPlainObject(m.params) && "arguments" in m.params && sdkRefuses(m.params.arguments)) {
      held.set(JSON.stringify(m.id), m.params.arguments);
      m.params.arguments = {};
    }
  }
  if (held.size > 0) text = JSON.stringify(body);
  const rawArguments: RawArguments = (id, sdkArguments) => {
    const k = JSON.stringify(id);
    return held.has(k) ? held.get(k) : sdkArguments;
  };

  // Clients that send no Accept header (curl, payment clients) get JSON: the transport wants both types.
  const headers = new Headers(request.headers);
  const accept = headers.get("Accept") ?? "";
  if (!accept.includes("application/json") || !accept.includes("text/event-stream")) headers.set("Accept", "application/json, text/event-stream");
  return front.serve(new Request(request.url, { method: "POST", headers, body: text }), key, rawArguments);
}

/** A fresh stateless transport for one request, JSON answers. */
export async function runServer(server: Server, request: Request): Promise<Response> {
  const transport = new WebStandardStreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
  await server.connect(transport);
  return transport.handleRequest(request);
}

/** The worker target's /mcp: the paid endpoints and the free tools. */
export function handleMcp(
  request: Request,
  env: AppEnv,
  ctx: ExecutionContext,
  requestId: string,
  handlers: Handlers,
  options: AppOptions,
  signup: SignupConfig,
): Promise<Response> {
  return serveMcp(request, env, requestId, {
    needsKey: (tool) => tool === "balance" || isCallType(tool),
    keyStub: (e, hash) => keyStubFor(e, hash, options),
    serve: (req, key, rawArguments) => {
      const server = new Server({ name: PROJECT.name, version: PROJECT.version }, { capabilities: { tools: {} } });
      server.setRequestHandler(ListToolsRequestSchema, async () => ({ tools: [...CALL_TYPES.map((ep) => paidToolEntry(ep)), ...FREE_TOOLS] }));
      server.setRequestHandler(CallToolRequestSchema, async (call, extra) => {
        const name = call.params.name;
        const free = await freeTool(name, signup, key);
        if (free !== null) return free;
        if (!isCallType(name)) throw unknownTool(name);
        // The front checked the key for every paid tool of this request.
        if (key === null) throw new RpcError(-32001, "Missing API key.", { code: "missing_key" });
        return callPaidTool({ tool: name, args: rawArguments(extra.requestId, call.params.arguments), meta: call.params._meta, handlers, options, key, env, ctx, request: req, requestId });
      });
      return runServer(server, req);
    },
  });
}
