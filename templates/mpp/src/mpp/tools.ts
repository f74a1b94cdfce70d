// The paid tools: execute_code (the sandbox) and every endpoint of mcpay.toml. The same checks and
// the same run step serve HTTP (/execute, /pay/<tool>), MCP (/mcp) and prepaid keys.
import { CALL_TYPES, INPUT_SHAPE, PRICE_MCENTS, type CallType } from "../generated/manifest";
import { MPP } from "../generated/mpp";
import type { Handler, HandlerContext, Handlers } from "../lib/handler";
import { isCallType } from "../lib/manifest-util";
import { checkShape, isPlainObject, jsonDepthExceeds, MAX_JSON_DEPTH } from "../lib/shape";
import type { MppEnv } from "./env";
import { runInSandbox, type SandboxLimits, DEFAULT_LIMITS } from "./sandbox";

export const EXECUTE = "execute_code" as const;

export type ParsedCall =
  | { ok: true; tool: CallType; input: unknown; credit: string | null }
  | { ok: false; status: 400 | 413; code: "invalid_input" | "code_too_large"; message: string };

export type ToolOutcome =
  | { kind: "done"; body: Record<string, unknown> }
  | { kind: "failed"; code: "sandbox_failed" | "handler_failed"; message: string };

export interface RunContext {
  env: MppEnv;
  requestId: string;
  request: Request;
  waitUntil: (p: Promise<unknown>) => void;
  keyId: string;
  chargedMcents: number;
  balanceMcents: number;
}

export const PAID_TOOLS: readonly CallType[] = CALL_TYPES;

export function priceOf(tool: CallType): number {
  return PRICE_MCENTS[tool];
}

export function codeBytes(code: string): number {
  return new TextEncoder().encode(code).byteLength;
}

/** execute_code's own checks: code is a string of at most mpp.max_code_bytes; input is any JSON value. */
export function checkExecuteInput(args: Record<string, unknown>): string | null {
  for (const k of Object.keys(args)) if (k !== "code" && k !== "input") return `Unknown field "${k.slice(0, 64)}".`;
  if (typeof args.code !== "string") return 'Field "code" must be a string.';
  if (jsonDepthExceeds(args.input ?? null, MAX_JSON_DEPTH)) return `JSON nesting deeper than ${MAX_JSON_DEPTH} levels.`;
  return null;
}

/**
 * Validates a paid call before any payment: nothing here has side effects. `args` may carry a
 * `credit` (a one-time credit from an earlier gateway-side failure), which is taken out.
 */
export async function parseCall(tool: string, args: unknown, handlers: Handlers, env: MppEnv, requestId: string): Promise<ParsedCall> {
  if (!isCallType(tool)) return { ok: false, status: 400, code: "invalid_input", message: `Unknown tool "${tool.slice(0, 64)}".` };
  if (!isPlainObject(args)) return { ok: false, status: 400, code: "invalid_input", message: "Arguments must be a JSON object." };
  const { credit, ...rest } = args;
  if (credit !== undefined && typeof credit !== "string") {
    return { ok: false, status: 400, code: "invalid_input", message: 'Field "credit" must be a string.' };
  }
  if (tool === EXECUTE) {
    const problem = checkExecuteInput(rest);
    if (problem) return { ok: false, status: 400, code: "invalid_input", message: problem };
    if (codeBytes(rest.code as string) > MPP.maxCodeBytes) {
      return { ok: false, status: 413, code: "code_too_large", message: `code exceeds ${MPP.maxCodeBytes} bytes.` };
    }
    return { ok: true, tool, input: { code: rest.code, input: rest.input ?? null }, credit: credit ?? null };
  }
  const shapeError = checkShape(rest, INPUT_SHAPE[tool]);
  if (shapeError) return { ok: false, status: 400, code: "invalid_input", message: shapeError };
  const handler = handlers[tool] as Handler<unknown>;
  if (handler.validate) {
    const v = await handler.validate(rest, { env, endpoint: tool, requestId });
    if (v !== null && v !== undefined) return { ok: false, status: 400, code: "invalid_input", message: String(v).slice(0, 500) };
  }
  return { ok: true, tool, input: rest, credit: credit ?? null };
}

/** Runs a paid call whose payment has been accepted. */
export async function runTool(
  tool: CallType,
  input: unknown,
  handlers: Handlers,
  ctx: RunContext,
  limits: SandboxLimits = DEFAULT_LIMITS,
): Promise<ToolOutcome> {
  if (tool === EXECUTE) {
    const { code, input: codeInput } = input as { code: string; input: unknown };
    const out = await runInSandbox(ctx.env.LOADER, code, codeInput, limits);
    switch (out.kind) {
      case "ok":
        return { kind: "done", body: { ok: true, status: "ok", result: out.result, logs: out.logs, duration_ms: out.durationMs } };
      case "code_error":
        // The agent's failure (its exception, its timeout, its tampering): a paid execution.
        return {
          kind: "done",
          body: { ok: true, status: "error", error: out.error, logs: out.logs, duration_ms: out.durationMs, ...(out.timedOut ? { timed_out: true } : {}) },
        };
      case "sandbox_error":
        console.error(JSON.stringify({ msg: "sandbox failed", request_id: ctx.requestId, error: out.detail }));
        return { kind: "failed", code: "sandbox_failed", message: "The sandbox failed on our side; nothing of your code's result is served." };
    }
  }
  const handler = handlers[tool] as Handler<unknown>;
  const hctx: HandlerContext = {
    env: ctx.env,
    endpoint: tool,
    requestId: ctx.requestId,
    keyId: ctx.keyId,
    chargedMcents: ctx.chargedMcents,
    balanceMcents: ctx.balanceMcents,
    request: ctx.request,
    waitUntil: ctx.waitUntil,
  };
  try {
    const out = await handler.run(input, hctx);
    let result: unknown = out === undefined ? null : out;
    if (out instanceof Response) {
      if (out.status >= 500) throw new Error(`handler returned status ${out.status}`);
      const text = await out.text();
      try {
        result = JSON.parse(text);
      } catch {
        result = text;
      }
    }
    JSON.stringify(result);
    return { kind: "done", body: { ok: true, status: "ok", result } };
  } catch (err) {
    console.error(JSON.stringify({ msg: "handler failed", endpoint: tool, request_id: ctx.requestId, error: String(err) }));
    return { kind: "failed", code: "handler_failed", message: "The tool failed on our side." };
  }
}
