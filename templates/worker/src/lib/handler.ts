// The contract between the gateway and your endpoint handlers (src/handlers/*.ts).
import type { CallType, Inputs } from "../generated/manifest";
import type { AppEnv } from "./env";

/** Passed to `validate`: runs BEFORE any charge, so it knows nothing about the caller's balance. */
export interface ValidateContext {
  readonly env: AppEnv;
  readonly endpoint: CallType;
  readonly requestId: string;
}

/** Passed to `run`: the call has been charged when `run` starts. */
export interface HandlerContext extends ValidateContext {
  /** Public id of the calling key ("k_" + 16 hex). Never the key itself. */
  readonly keyId: string;
  /** What this call was charged, in mcents (1 mcent = 1/1000 cent). */
  readonly chargedMcents: number;
  /** The key's balance after the charge, in mcents. */
  readonly balanceMcents: number;
  /** The request: method, URL and headers, without the caller's credentials (Authorization and
   *  X-Admin-Key are removed) and without a body (it has been read: use `input`). */
  readonly request: Request;
  /** Extend the worker's lifetime past the response (logging, cache fills, ...). */
  readonly waitUntil: (promise: Promise<unknown>) => void;
}

export interface Handler<I> {
  /**
   * Optional semantic validation on top of the shape check generated from mcpay.toml.
   * Return `null` when the input is acceptable, or a message: the caller gets
   * 400 invalid_input with "note":"no charge applied". Must not have side effects.
   */
  validate?(input: I, ctx: ValidateContext): string | null | Promise<string | null>;
  /**
   * Do the paid work. Return any JSON-serializable value (sent as `result`), or a Response
   * to take full control of the body. Throwing, or returning a Response with status >= 500,
   * refunds the charge (capped per key per hour) and answers 502 handler_failed.
   */
  run(input: I, ctx: HandlerContext): unknown | Promise<unknown>;
}

export type Handlers = { readonly [K in CallType]: Handler<Inputs[K]> };
