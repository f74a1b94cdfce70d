// The billing core of a paid call (contract 3.8 steps 7–11), shared by every face of the gateway:
// POST /v1/<endpoint> and a paid MCP tools/call run exactly this code. Each face parses its own
// request (HTTP body / JSON-RPC arguments), then calls `runPaidCall` and maps the outcome to its
// own answer (an HTTP response / a JSON-RPC error or tool result). Refusals before the hold are
// thrown as HttpError (with the no-charge note); after the hold the outcome is always returned.
// /mcp/<upstream> (lib/proxy.ts) holds on explicit terms and settles with the same captureHold /
// releaseHold (retries, refund_pending) and maps refusals with the same holdRefusal.
import { INPUT_SHAPE, RATE_LIMIT_PER_MINUTE, SCOPE_FOR, type CallType } from "../generated/manifest";
import type { AppEnv } from "./env";
import type { Handler, HandlerContext, ValidateContext } from "./handler";
import { HttpError, withoutCredentials } from "./http";
import type { CaptureResult, HoldResult, KeyDO, ReleaseReason, SettleResult, StoredResponse } from "./key-do";
import { sha256Hex } from "./keys";
import { checkShape } from "./shape";

/** `Idempotency-Key` syntax (contract 3.8); also the syntax of `_meta["io.mcpay/idempotency_key"]`. */
export const IDEMPOTENCY_KEY_RE = /^[A-Za-z0-9_-]{32,128}$/;
/** Answers larger than this are not stored for Idempotency-Key replays. */
export const IDEMPOTENCY_MAX_STORED_BYTES = 65_536;
/** Settlement RPC attempts in the request before leaving the hold to the KeyDO's alarm. */
const SETTLE_ATTEMPTS = 3;
const SETTLE_BACKOFF_MS = [50, 250];

export interface Charge {
  readonly chargedMcents: number;
  readonly balanceMcents: number;
}

/** How one face turns a successful handler output into its answer. */
export interface Face<A> {
  /**
   * The answer for a handler output (a value, or the handler's own Response with status < 500),
   * plus, when `store` is set, what an Idempotency-Key replay sends (body null when too large).
   * Throwing here (e.g. a value that is not JSON) makes the call a caller failure.
   */
  present(out: unknown, charge: Charge, store: boolean): Promise<{ answer: A; stored?: StoredResponse }>;
  /** Frees an answer that will not be sent (a capture that found the hold already released). */
  discard(answer: A): Promise<void>;
}

export interface PaidCall {
  readonly endpoint: CallType;
  readonly handler: Handler<unknown>;
  /** The parsed input (HTTP body / MCP arguments), not yet shape-checked. */
  readonly input: unknown;
  /** What the Idempotency-Key record hashes: the HTTP body text, or the tool name and arguments. */
  readonly bodyForHash: string;
  /** Already syntax-checked (IDEMPOTENCY_KEY_RE). */
  readonly idempotencyKey?: string | undefined;
  readonly stub: DurableObjectStub<KeyDO>;
  /** The gateway's call id: the X-Request-Id, or `<X-Request-Id>/mcp/<uuid>` per MCP tools/call. */
  readonly callId: string;
  readonly env: AppEnv;
  readonly ctx: ExecutionContext;
  readonly request: Request;
  readonly timeoutMs: number;
}

export interface Failed {
  readonly kind: "failed";
  readonly status: 502 | 504;
  readonly code: "handler_failed" | "handler_timeout";
  readonly message?: string;
  /** The fields HTTP adds to the error body (and X-Charged-Mcents / X-Balance-Mcents). */
  readonly extra: { refunded: boolean; refund_pending?: true; charged_mcents: number; balance_mcents: number };
}

export type PaidOutcome<A> = { kind: "ok"; answer: A } | { kind: "replay"; stored: StoredResponse } | Failed;

type RunResult<A> = { kind: "ok"; answer: A; stored?: StoredResponse } | { kind: "failed"; failure: string } | { kind: "timeout" };

/**
 * Shape check → validate → hold (key, scope, idempotency, rate limit, balance) → run within the
 * time limit → capture or release (with retries, refund cap, refund_pending).
 */
export async function runPaidCall<A>(call: PaidCall, face: Face<A>): Promise<PaidOutcome<A>> {
  const { endpoint, handler, input, callId } = call;
  // Shape from mcpay.toml.
  const shapeError = checkShape(input, INPUT_SHAPE[endpoint]);
  if (shapeError !== null) throw new HttpError(400, "invalid_input", { message: shapeError, noCharge: true });
  // The handler's own validation.
  const vctx: ValidateContext = { env: call.env, endpoint, requestId: callId };
  let validationError: string | null = null;
  if (handler.validate) {
    try {
      validationError = await handler.validate(input, vctx);
    } catch (err) {
      console.error(JSON.stringify({ msg: "validate threw", endpoint, request_id: callId, error: String(err) }));
      throw new HttpError(500, "internal_error", { noCharge: true });
    }
  }
  if (validationError !== null && validationError !== undefined) {
    throw new HttpError(400, "invalid_input", { message: String(validationError).slice(0, 500), noCharge: true });
  }

  // The hold: one RPC to this key's object, which owns price, scope, Idempotency-Key records,
  // rate limit and balance. The call id is the gateway's, never the client's.
  const hold = await call.stub.hold(endpoint, callId, {
    ...(call.idempotencyKey !== undefined ? { idempotencyKey: call.idempotencyKey, bodyHash: await sha256Hex(call.bodyForHash) } : {}),
  });
  if (!hold.ok) {
    if (hold.code !== "replay") throw holdRefusal(hold, SCOPE_FOR[endpoint], RATE_LIMIT_PER_MINUTE[endpoint]);
    if (hold.response === null) {
      throw new HttpError(409, "idempotency_response_not_stored", {
        noCharge: true,
        extra: { original_request_id: hold.originalRequestId, max_stored_bytes: IDEMPOTENCY_MAX_STORED_BYTES },
        headers: { "Idempotent-Replayed": "true" },
      });
    }
    return { kind: "replay", stored: hold.response as StoredResponse };
  }

  const hctx: HandlerContext = {
    ...vctx,
    keyId: hold.keyId,
    chargedMcents: hold.chargedMcents,
    balanceMcents: hold.balanceMcents,
    request: withoutCredentials(call.request),
    waitUntil: (p) => call.ctx.waitUntil(p),
  };
  // The work and its settlement run under waitUntil: a client that disconnects (or a response
  // stream that is cancelled) cannot leave a hold without a capture or a release.
  const work = runAndSettle(call, face, hctx, hold);
  call.ctx.waitUntil(work.then(
    () => undefined,
    () => undefined,
  ));
  return work;
}

/** A refused hold (other than an idempotent replay) as the error its face answers (contract 3.8 steps 9–9d). */
export function holdRefusal(hold: Exclude<HoldResult, { ok: true } | { code: "replay" }>, requiredScope: string, rateLimitPerMinute: number): HttpError {
  switch (hold.code) {
    case "invalid_key":
      return new HttpError(401, "invalid_key", { noCharge: true });
    case "scope_denied":
      return new HttpError(403, "scope_denied", { noCharge: true, extra: { required_scope: requiredScope } });
    case "rate_limited":
      return new HttpError(429, "rate_limited", {
        message: `Rate limit of ${rateLimitPerMinute} calls per minute reached for this endpoint.`,
        noCharge: true,
        extra: { retry_after_seconds: hold.retryAfterSeconds },
        headers: { "Retry-After": String(hold.retryAfterSeconds) },
      });
    case "insufficient_balance":
      return new HttpError(402, "insufficient_balance", {
        noCharge: true,
        extra: { price_mcents: hold.priceMcents, balance_mcents: hold.balanceMcents },
      });
    case "unknown_endpoint":
      return new HttpError(404, "not_found", { noCharge: true });
    case "idempotency_mismatch":
      return new HttpError(422, "idempotency_mismatch", { noCharge: true });
    case "idempotency_in_progress":
      return new HttpError(409, "idempotency_in_progress", {
        noCharge: true,
        extra: { retry_after_seconds: hold.retryAfterSeconds },
        headers: { "Retry-After": String(hold.retryAfterSeconds) },
      });
  }
}

async function runHandler<A>(call: PaidCall, face: Face<A>, hctx: HandlerContext, charge: Charge): Promise<RunResult<A>> {
  try {
    const out = await call.handler.run(call.input, hctx);
    if (out instanceof Response && out.status >= 500) {
      await out.body?.cancel().catch(() => {});
      return { kind: "failed", failure: `handler returned status ${out.status}` };
    }
    return { kind: "ok", ...(await face.present(out, charge, call.idempotencyKey !== undefined)) };
  } catch (err) {
    return { kind: "failed", failure: err instanceof Error ? `${err.name}: ${err.message}` : String(err) };
  }
}

/** Calls a settlement RPC up to SETTLE_ATTEMPTS times; null when every attempt threw. */
export async function settleWithRetry<T>(what: string, callId: string, rpc: () => Promise<T>): Promise<T | null> {
  for (let attempt = 0; attempt < SETTLE_ATTEMPTS; attempt++) {
    try {
      return await rpc();
    } catch (err) {
      console.error(JSON.stringify({ msg: `${what} failed`, request_id: callId, attempt: attempt + 1, error: String(err) }));
      const wait = SETTLE_BACKOFF_MS[attempt];
      if (wait !== undefined && attempt + 1 < SETTLE_ATTEMPTS) await new Promise((res) => setTimeout(res, wait));
    }
  }
  return null;
}

async function runAndSettle<A>(call: PaidCall, face: Face<A>, hctx: HandlerContext, charge: Charge): Promise<PaidOutcome<A>> {
  const { stub, callId } = call;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timedOut = new Promise<RunResult<A>>((res) => {
    timer = setTimeout(() => res({ kind: "timeout" }), call.timeoutMs);
  });
  const outcome = await Promise.race([runHandler(call, face, hctx, charge), timedOut]);
  if (timer !== undefined) clearTimeout(timer);

  if (outcome.kind === "ok") {
    const captured = await captureHold(stub, callId, outcome.stored);
    if (captured.kept) return { kind: "ok", answer: outcome.answer };
    // The hold was released meanwhile (past its deadline): the call counts as timed out.
    await face.discard(outcome.answer);
    return { kind: "failed", status: 504, code: "handler_timeout", extra: { refunded: true, charged_mcents: 0, balance_mcents: captured.balanceMcents } };
  }

  const timeout = outcome.kind === "timeout";
  console.error(JSON.stringify({
    msg: timeout ? "handler timed out" : "handler failed",
    endpoint: call.endpoint,
    request_id: callId,
    ...(timeout ? { timeout_ms: call.timeoutMs } : { error: outcome.failure }),
  }));
  const settled = await releaseHold(stub, callId, timeout ? "timeout" : "caller", charge);
  const status = timeout ? 504 : 502;
  const code = timeout ? "handler_timeout" : "handler_failed";
  if (settled.refund_pending) {
    // The hold stays until the KeyDO's alarm releases it (within TIMEOUT_MS + HOLD_MARGIN_MS).
    return { kind: "failed", status, code, message: "The endpoint handler failed; the held price will be released shortly.", extra: settled };
  }
  return {
    kind: "failed",
    status,
    code,
    ...(timeout
      ? {}
      : {
          message: settled.refunded
            ? "The endpoint handler failed; the charge was refunded."
            : "The endpoint handler failed; the hourly refund limit for this key is reached, so the charge stands.",
        }),
    extra: settled,
  };
}

/** The money fields of a released (or kept, or pending) call: the body of 502/504 and MCP `_meta`. */
export type Released = Failed["extra"];

/**
 * Captures a held call (with retries). `kept`: captured, or the capture RPC kept failing (the
 * answer is still sent and the alarm releases the hold: the gateway never keeps money for a call
 * whose outcome it did not record). Not kept: the hold was released meanwhile (past its deadline).
 */
export async function captureHold(
  stub: DurableObjectStub<KeyDO>,
  callId: string,
  stored?: StoredResponse,
): Promise<{ kept: true } | { kept: false; balanceMcents: number }> {
  const captured = await settleWithRetry("capture", callId, async (): Promise<CaptureResult> => await stub.capture(callId, stored));
  if (captured === null || captured.ok) return { kept: true };
  return { kept: false, balanceMcents: captured.balanceMcents };
}

/**
 * Releases a held call (with retries). When every attempt failed the hold is left to the KeyDO's
 * alarm: `refund_pending`, and the money fields are the held ones.
 */
export async function releaseHold(stub: DurableObjectStub<KeyDO>, callId: string, reason: ReleaseReason, charge: Charge): Promise<Released> {
  const settled = await settleWithRetry("release", callId, async (): Promise<SettleResult> => await stub.release(callId, reason));
  if (settled === null) return { refunded: false, refund_pending: true, charged_mcents: charge.chargedMcents, balance_mcents: charge.balanceMcents };
  return { refunded: settled.refunded, charged_mcents: settled.refunded ? 0 : charge.chargedMcents, balance_mcents: settled.balanceMcents };
}
