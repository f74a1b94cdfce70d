// Response helpers: JSON bodies, the error shape, and the headers every response carries.
import { PROJECT } from "../generated/manifest";

export const NO_CHARGE_NOTE = "no charge applied";

export type ErrorCode =
  | "not_found"
  | "method_not_allowed"
  | "missing_key"
  | "invalid_key"
  | "unsupported_media_type"
  | "body_too_large"
  | "invalid_json"
  | "invalid_input"
  | "scope_denied"
  | "rate_limited"
  | "insufficient_balance"
  | "admin_disabled"
  | "invalid_admin_key"
  | "handler_failed"
  | "handler_timeout"
  | "idempotency_mismatch"
  | "idempotency_in_progress"
  | "idempotency_response_not_stored"
  | "internal_error"
  | "invalid_payment"
  | "payment_required"
  | "payment_invalid"
  | "payment_failed"
  | "payment_already_used"
  | "payment_in_progress"
  | "payment_unavailable"
  | "payment_pending"
  | "signup_unavailable"
  | "upstream_failed"
  | "upstream_timeout"
  | "upstream_disabled"
  | "upstream_unavailable";

const MESSAGES: Record<ErrorCode, string> = {
  not_found: "No such route.",
  method_not_allowed: "Method not allowed on this route.",
  missing_key: "Missing API key: send Authorization: Bearer <key>.",
  invalid_key: "Invalid API key.",
  unsupported_media_type: "Content-Type must be application/json.",
  body_too_large: "Request body too large.",
  invalid_json: "Request body is not valid JSON.",
  invalid_input: "Invalid input.",
  scope_denied: "This key is not allowed to call this endpoint.",
  rate_limited: "Rate limit exceeded.",
  insufficient_balance: "Insufficient balance for this call.",
  admin_disabled: "Admin API disabled: ADMIN_KEY is not configured.",
  invalid_admin_key: "Invalid admin key.",
  handler_failed: "The endpoint handler failed.",
  handler_timeout: "The endpoint handler did not finish in time; the held price was released.",
  idempotency_mismatch: "This Idempotency-Key was used with another endpoint or body; use a new Idempotency-Key.",
  idempotency_in_progress: "A call with this Idempotency-Key is still running; retry after Retry-After seconds.",
  idempotency_response_not_stored:
    "This Idempotency-Key's call succeeded and was charged once, but its answer was too large to store; it cannot be replayed.",
  internal_error: "Internal error.",
  invalid_payment: "Send at most one payment credential (PAYMENT-SIGNATURE, X-PAYMENT or Authorization: Payment).",
  payment_required: "Payment required.",
  payment_invalid: "The payment is malformed, not for this offer, or was refused.",
  payment_failed: "The payment could not be settled.",
  payment_already_used: "This payment has already bought a key.",
  payment_in_progress: "This payment is being processed by another request; retry shortly.",
  payment_unavailable: "The payment service is unavailable; nothing was charged. Retry later.",
  payment_pending: "The payment was submitted but its outcome is not known yet; retry the same request to collect what it bought.",
  signup_unavailable: "Signup is not configured on this gateway.",
  upstream_failed: "The upstream MCP server failed.",
  upstream_timeout: "The upstream MCP server did not answer in time.",
  upstream_disabled: "This upstream MCP server is paused on this gateway.",
  upstream_unavailable: "This upstream MCP server is not configured on this gateway (its URL or a header secret is missing).",
};

const BASE_HEADERS: Readonly<Record<string, string>> = {
  "Content-Type": "application/json; charset=utf-8",
  "Cache-Control": "no-store",
  "X-Content-Type-Options": "nosniff",
};

/** A JSON response. `headers` override the base headers; a repeated header (e.g. one
 *  WWW-Authenticate per payment method, given as [name, value] pairs) stays repeated. */
export function json(status: number, body: unknown, headers?: HeadersInit): Response {
  const h = new Headers(headers);
  for (const [k, v] of Object.entries(BASE_HEADERS)) if (!h.has(k)) h.set(k, v);
  return new Response(JSON.stringify(body), { status, headers: h });
}

export interface ErrorOptions {
  message?: string;
  /** Adds "note":"no charge applied". */
  noCharge?: boolean;
  extra?: Record<string, unknown>;
  headers?: HeadersInit;
}

export function errorResponse(status: number, code: ErrorCode, requestId: string, opts: ErrorOptions = {}): Response {
  const body = errorBody(code, requestId, opts);
  const headers = new Headers(opts.headers);
  if (status === 401) headers.set("WWW-Authenticate", `Bearer realm="${PROJECT.name}"`);
  return json(status, body, headers);
}

/** The error shape of section 2 (also the structuredContent of a failed MCP tool call). */
export function errorBody(code: ErrorCode, requestId: string, opts: ErrorOptions = {}): Record<string, unknown> {
  const body: Record<string, unknown> = {
    ok: false,
    error: { code, message: opts.message ?? MESSAGES[code] },
    request_id: requestId,
  };
  if (opts.noCharge) body.note = NO_CHARGE_NOTE;
  if (opts.extra) Object.assign(body, opts.extra);
  return body;
}

/** Thrown inside request processing to short-circuit with an error response. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: ErrorCode,
    readonly opts: ErrorOptions = {},
  ) {
    super(opts.message ?? MESSAGES[code]);
  }
  toResponse(requestId: string): Response {
    return errorResponse(this.status, this.code, requestId, this.opts);
  }
}

/** Runs `handle`; an HttpError becomes its response, anything else a logged 500 internal_error. */
export async function answering(requestId: string, handle: () => Promise<Response>): Promise<Response> {
  try {
    return await handle();
  } catch (err) {
    if (err instanceof HttpError) return err.toResponse(requestId);
    console.error(JSON.stringify({ msg: "unhandled error", request_id: requestId, error: String(err) }));
    return errorResponse(500, "internal_error", requestId);
  }
}

export const CORS_HEADERS: Readonly<Record<string, string>> = {
  "Access-Control-Allow-Origin": "*",
  "Access-Control-Allow-Headers": "Authorization, Content-Type, Idempotency-Key, PAYMENT-SIGNATURE, X-PAYMENT",
  "Access-Control-Expose-Headers":
    "X-Request-Id, X-Charged-Mcents, X-Balance-Mcents, Retry-After, WWW-Authenticate, Idempotent-Replayed, PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE, Payment-Receipt",
};

/** Returns a copy of `res` with extra headers set (the body is streamed through, not copied). */
export function withHeaders(res: Response, headers: Record<string, string>): Response {
  const out = new Response(res.body, res);
  for (const [k, v] of Object.entries(headers)) out.headers.set(k, v);
  return out;
}

/** Drops any CORS header (admin routes must never carry one). */
export function withoutCors(res: Response): Response {
  const out = new Response(res.body, res);
  for (const k of [...out.headers.keys()]) {
    if (k.toLowerCase().startsWith("access-control-")) out.headers.delete(k);
  }
  return out;
}

/**
 * The request as a handler sees it: method, URL and headers without the caller's credentials
 * (Authorization, X-Admin-Key, Payment credentials travel in Authorization too), and no body.
 */
export function withoutCredentials(request: Request): Request {
  const headers = new Headers(request.headers);
  headers.delete("Authorization");
  headers.delete("X-Admin-Key");
  return new Request(request.url, { method: request.method, headers });
}
