// The billing core of a paid call (contract 3.8 steps 7–11), shared by every face of the gateway:
// POST /v1/<endpoint> and a paid MCP tools/call run exactly this code. Each face parses its own
// request (HTTP body / JSON-RPC arguments), then calls `runPaidCall` and maps the outcome to its
// own answer (an HTTP response / a JSON-RPC error or tool result). Refusals before the hold are
// thrown as HttpError (with the no-charge note); after the hold the outcome is always returned.
import { INPUT_SHAPE, RATE_LIMIT_PER_MINUTE, SCOPE_FOR, type CallType } from "../generated/manifest";
import type { AppEnv } from "./env";
import type { Handler, HandlerContext, ValidateContext } from "./handler";
import { HttpError, withoutCredentials } from "./http";
import type { CaptureResult, KeyDO, SettleResult, StoredResponse } from "./key-do";
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
    switch (hold.code) {
      case "invalid_key":
        throw new HttpError(401, "invalid_key", { noCharge: true });
      case "scope_denied":
        throw new HttpError(403, "scope_denied", { noCharge: true, extra: { required_scope: SCOPE_FOR[endpoint] } });
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
        return { kind: "replay", stored: hold.response as StoredResponse };
    }
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
async function settleWithRetry<T>(what: string, callId: string, rpc: () => Promise<T>): Promise<T | null> {
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
    const captured = await settleWithRetry("capture", callId, async (): Promise<CaptureResult> => await stub.capture(callId, outcome.stored));
    if (captured === null || captured.ok) {
      // Captured; or the capture RPC kept failing: the answer is sent and the alarm releases the
      // hold (the gateway never keeps money for a call whose outcome it did not record).
      return { kind: "ok", answer: outcome.answer };
    }
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
  const settled = await settleWithRetry("release", callId, async (): Promise<SettleResult> => await stub.release(callId, timeout ? "timeout" : "caller"));
  const status = timeout ? 504 : 502;
  const code = timeout ? "handler_timeout" : "handler_failed";
  if (settled === null) {
    // The hold stays until the KeyDO's alarm releases it (within TIMEOUT_MS + HOLD_MARGIN_MS).
    return {
      kind: "failed",
      status,
      code,
      message: "The endpoint handler failed; the held price will be released shortly.",
      extra: { refunded: false, refund_pending: true, charged_mcents: charge.chargedMcents, balance_mcents: charge.balanceMcents },
    };
  }
  const charged = settled.refunded ? 0 : charge.chargedMcents;
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
    extra: { refunded: settled.refunded, charged_mcents: charged, balance_mcents: settled.balanceMcents },
  };
}
