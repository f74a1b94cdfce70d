// POST /v1/signup: an agent with no key pays once (x402 or MPP) and receives a new prepaid key.
// The checks run in the order of the contract (docs/contract.md, 3.9):
//    2. rails configured (else 503)          3. optional body {name?}, Idempotency-Key syntax
//    4. at most one payment credential       5. a credential for a configured rail (else 402 + offer)
//    6. the credential names this offer      7/8. the payment's durable record: replay / in progress
//    9. the signup hourly budget            10/11. verify, settle (x402) / the method's verification (MPP)
//   12. mint the key, record the payment as used, 201.
// Every payment is recorded by its reference in its own PaymentDO ("signup:<reference>"): a
// payment mints at most one key, even when it arrives concurrently; a refused payment releases its
// claim (and its slot in the hourly budget) so the payer can try again.
import { PROJECT } from "../generated/manifest";
import { isJsonContentType, readBoundedText } from "./body";
import type { AppEnv } from "./env";
import { HttpError, json, type ErrorCode } from "./http";
import type { KeyDO } from "./key-do";
import { generateApiKey, generateKeyId, secretsEqual, sha256Hex } from "./keys";
import { buildPayments, type MppMethodKey, type PaymentSetupResult } from "./mpp-methods";
import type { SignupPaid, SignupRecord } from "./payment-do";
import { paymentObject } from "./payment-store";
import { MAX_JSON_DEPTH, isPlainObject, jsonDepthExceeds } from "./shape";
import { MANIFEST_SIGNUP, type SignupConfig } from "./signup-config";
import { checkCredential, mppChallenges, verifyPayment, type MppRail } from "./signup-mpp";
import {
  httpFacilitator,
  parseV1,
  parseV2,
  paymentRequired,
  paymentRequiredHeader,
  verifyAndSettle,
  x402Rail,
  type FacilitatorFactory,
  type X402Payment,
  type X402Rail,
} from "./signup-x402";

export const SIGNUP_PATH = "/v1/signup";
/** Derived keys: key = prefix + hex(HMAC-SHA256(Idempotency-Key, DERIVATION_PREFIX + reference)). */
export const DERIVATION_PREFIX = "mcpay-signup-v1:";
const IDEMPOTENCY_KEY = /^[A-Za-z0-9_-]{32,128}$/;
const NAME = /^[A-Za-z0-9 _.-]{1,32}$/;
/** Retry-After of 409 payment_in_progress. */
const IN_PROGRESS_RETRY_SECONDS = 2;

export interface SignupOptions {
  /** The [signup] settings; default: mcpay.toml's (src/generated/manifest.ts). */
  readonly config?: SignupConfig;
  /** The x402 facilitator for a URL; default: @x402/core's HTTPFacilitatorClient. */
  readonly facilitator?: FacilitatorFactory;
  /** The MPP methods; default: mppx's tempo/stripe methods built from the environment. */
  readonly payments?: (env: AppEnv, config: SignupConfig) => PaymentSetupResult;
}

interface Resolved {
  readonly config: SignupConfig;
  readonly facilitator: FacilitatorFactory;
  readonly payments: (env: AppEnv, config: SignupConfig) => PaymentSetupResult;
}

export function resolveSignup(options: SignupOptions = {}): Resolved {
  return {
    config: options.config ?? MANIFEST_SIGNUP,
    facilitator: options.facilitator ?? httpFacilitator,
    payments: options.payments ?? ((env, config) => buildPayments(env, (config.mpp?.methods ?? []) as readonly MppMethodKey[])),
  };
}

/** The `signup` field of GET /v1/pricing. */
export function pricingSignup(config: SignupConfig): Record<string, unknown> | null {
  if (!config.enabled) return null;
  return {
    path: SIGNUP_PATH,
    price_mcents: config.priceMcents,
    balance_mcents: config.balanceMcents,
    scopes: [...config.scopes],
    rails: [...config.rails],
  };
}

function usd(mcents: number): string {
  return `$${(mcents / 100_000).toFixed(5).replace(/0+$/, "").replace(/\.$/, "")}`;
}

function toHex(buf: ArrayBuffer): string {
  return Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The key a signup with this Idempotency-Key mints for this payment (and returns again on a retry). */
export async function deriveSignupKey(prefix: string, idempotencyKey: string, reference: string): Promise<string> {
  const enc = new TextEncoder();
  const k = await crypto.subtle.importKey("raw", enc.encode(idempotencyKey), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return prefix + toHex(await crypto.subtle.sign("HMAC", k, enc.encode(DERIVATION_PREFIX + reference)));
}

interface Rails {
  readonly x402: X402Rail | null;
  readonly mpp: MppRail | null;
}

interface Ctx {
  readonly request: Request;
  readonly url: URL;
  readonly env: AppEnv;
  readonly requestId: string;
  readonly config: SignupConfig;
  readonly rails: Rails;
  readonly keyPrefix: string;
}

function describe(config: SignupConfig): string {
  return `A ${PROJECT.name} API key holding ${usd(config.balanceMcents)} of credit (scopes: ${config.scopes.join(", ")}).`;
}

/** Step 2: every configured rail has its settings and secrets (else 503 naming what to set). */
function resolveRails(o: Resolved, env: AppEnv, url: URL): Rails {
  const cfg = o.config;
  const problems: string[] = [];
  let x402: X402Rail | null = null;
  let mpp: MppRail | null = null;
  if (cfg.x402) {
    const r = x402Rail(cfg.x402, env, o.facilitator);
    if (r.ok) x402 = r.rail;
    else problems.push(...r.problems);
  }
  if (cfg.mpp) {
    const p = o.payments(env, cfg);
    if (p.ok) {
      mpp = {
        setup: p.setup,
        realm: cfg.mpp.realm !== "" ? cfg.mpp.realm : url.hostname,
        ttlSeconds: cfg.mpp.challengeTtlSeconds,
        priceMcents: cfg.priceMcents,
        description: describe(cfg),
      };
    } else problems.push(...p.problems.map((x) => `mpp: ${x}`));
  }
  if (!x402 && !mpp && problems.length === 0) problems.push("no payment rail: add [signup.x402] or [signup.mpp] to mcpay.toml");
  if (problems.length > 0) {
    console.error(JSON.stringify({ msg: "signup not configured", problems }));
    throw new HttpError(503, "signup_unavailable", { message: `Signup is not configured: ${problems.join("; ")}.` });
  }
  return { x402, mpp };
}

/** Step 3: an empty body, or {"name": "..."} as JSON. Returns the name. */
async function readSignupName(request: Request, maxBytes: number): Promise<string | null> {
  const declared = request.headers.get("Content-Length");
  let text: string;
  if (declared !== null && /^\s*0+\s*$/.test(declared)) text = "";
  else if (declared !== null) {
    const n = Number(declared.trim());
    if (!Number.isFinite(n) || n < 0) throw new HttpError(400, "invalid_json", { message: "Invalid Content-Length.", noCharge: true });
    if (!isJsonContentType(request.headers.get("Content-Type"))) throw new HttpError(415, "unsupported_media_type", { noCharge: true });
    text = await readBoundedText(request, maxBytes);
  } else {
    text = request.body === null ? "" : await readBoundedText(request, maxBytes);
    if (text !== "" && !isJsonContentType(request.headers.get("Content-Type"))) {
      throw new HttpError(415, "unsupported_media_type", { noCharge: true });
    }
  }
  if (text === "") return null;
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw new HttpError(400, "invalid_json", { noCharge: true });
  }
  const bad = (message: string) => new HttpError(400, "invalid_input", { message, noCharge: true });
  if (!isPlainObject(body)) throw bad("Body must be empty or a JSON object.");
  if (jsonDepthExceeds(body, MAX_JSON_DEPTH)) throw bad(`JSON nesting deeper than ${MAX_JSON_DEPTH} levels.`);
  for (const k of Object.keys(body)) if (k !== "name") throw bad(`Unknown field "${k.slice(0, 64)}".`);
  if (!Object.hasOwn(body, "name")) return null;
  if (typeof body.name !== "string" || !NAME.test(body.name)) throw bad("name must be 1-32 characters of A-Z a-z 0-9 space _ . -");
  return body.name;
}

function countPaymentSchemes(authorization: string | null): number {
  if (authorization === null) return 0;
  return authorization.match(/(?:^|,)\s*Payment\s+/gi)?.length ?? 0;
}

/** A 402 (or other offer-carrying error) with the offer: PAYMENT-REQUIRED, one WWW-Authenticate per MPP method, the body fields. */
async function offerError(c: Ctx, code: ErrorCode, message: string, problem?: string): Promise<HttpError> {
  const headers: Array<[string, string]> = [];
  const extra: Record<string, unknown> = {
    price_mcents: c.config.priceMcents,
    balance_mcents: c.config.balanceMcents,
    scopes: [...c.config.scopes],
  };
  if (c.rails.x402) {
    const pr = paymentRequired(c.rails.x402, `${c.url.origin}${c.url.pathname}`, describe(c.config), message);
    headers.push(["PAYMENT-REQUIRED", paymentRequiredHeader(pr)]);
    Object.assign(extra, { x402Version: pr.x402Version, resource: pr.resource, accepts: pr.accepts, extensions: pr.extensions });
  }
  if (c.rails.mpp) for (const ch of await mppChallenges(c.rails.mpp)) headers.push(["WWW-Authenticate", ch]);
  if (problem !== undefined) extra.problem = problem;
  return new HttpError(402, code, { message, noCharge: true, extra, headers });
}

function successBody(c: Ctx, key: string, r: SignupRecord): Record<string, unknown> {
  return {
    ok: true,
    key,
    key_id: r.keyId,
    balance_mcents: r.balanceMcents,
    scopes: r.scopes,
    name: r.name,
    payment: { rail: r.rail, reference: r.reference },
    request_id: c.requestId,
  };
}

type Credential =
  | { rail: "x402"; payment: X402Payment }
  | { rail: "mpp"; reference: string };

/** Steps 4-6: the one credential, decoded and checked against our offer. */
async function readCredential(c: Ctx): Promise<Credential> {
  const h = c.request.headers;
  const sig = h.get("PAYMENT-SIGNATURE");
  const xpay = h.get("X-PAYMENT");
  const mppCount = countPaymentSchemes(h.get("Authorization"));
  const count = (sig !== null ? 1 : 0) + (xpay !== null ? 1 : 0) + mppCount;
  if (count > 1) {
    throw new HttpError(400, "invalid_payment", {
      message: "Send exactly one payment credential: PAYMENT-SIGNATURE, X-PAYMENT or one Authorization: Payment.",
      noCharge: true,
    });
  }
  const resourceUrl = `${c.url.origin}${c.url.pathname}`;
  if (c.rails.x402 && (sig !== null || xpay !== null)) {
    const parsed = sig !== null ? parseV2(c.rails.x402, sig) : parseV1(c.rails.x402, xpay!, resourceUrl);
    if (!parsed.ok) throw await offerError(c, "payment_invalid", parsed.message);
    return { rail: "x402", payment: parsed.payment };
  }
  if (c.rails.mpp && mppCount === 1) {
    const checked = await checkCredential(c.rails.mpp, c.request);
    if (!checked.ok) throw await offerError(c, "payment_invalid", checked.message, checked.problem);
    return { rail: "mpp", reference: checked.reference };
  }
  const ways = [c.rails.x402 ? "x402 (PAYMENT-SIGNATURE, accepts below)" : null, c.rails.mpp ? "MPP (Authorization: Payment, challenges in WWW-Authenticate)" : null]
    .filter((x) => x !== null)
    .join(" or ");
  throw await offerError(
    c,
    "payment_required",
    `Pay to sign up: ${usd(c.config.priceMcents)} buys a key holding ${usd(c.config.balanceMcents)} of credit. Pay with ${ways}.`,
  );
}

function signupObject(env: AppEnv, reference: string) {
  return paymentObject(env.PAYMENTS, `signup:${reference}`);
}

function keyStub(env: AppEnv, keyHash: string): DurableObjectStub<KeyDO> {
  return env.KEYS.get(env.KEYS.idFromName(keyHash));
}

/** The answer for a payment that already bought a key: the same 201 body again, or 409. */
async function answerUsed(c: Ctx, reference: string, record: SignupRecord, idempotencyKey: string | null): Promise<Response> {
  if (record.idemHash !== null && idempotencyKey !== null && (await secretsEqual(await sha256Hex(idempotencyKey), record.idemHash))) {
    const key = await deriveSignupKey(c.keyPrefix, idempotencyKey, reference);
    return json(200, { ...successBody(c, key, record), replayed: true }, record.header ? { [record.header.name]: record.header.value } : undefined);
  }
  throw new HttpError(409, "payment_already_used", {
    message: "This payment has already bought a key (send the Idempotency-Key of that signup to get it again).",
    noCharge: true,
    extra: { key_id: record.keyId },
  });
}

function inProgress(): HttpError {
  return new HttpError(409, "payment_in_progress", {
    noCharge: true,
    headers: { "Retry-After": String(IN_PROGRESS_RETRY_SECONDS) },
  });
}

/** Steps 10-11: take the payment. */
async function takePayment(
  c: Ctx,
  cred: Credential,
): Promise<{ ok: true; paid: SignupPaid; linkRef: string | null } | { ok: false; error: HttpError }> {
  if (cred.rail === "x402") {
    const out = await verifyAndSettle(c.rails.x402!, cred.payment);
    if (!out.ok) {
      if (out.status === 502) return { ok: false, error: new HttpError(502, out.code, { message: out.message, noCharge: true }) };
      return { ok: false, error: await offerError(c, out.code, out.message) };
    }
    return { ok: true, paid: { rail: "x402", reference: out.transaction, header: out.header }, linkRef: null };
  }
  const out = await verifyPayment(c.rails.mpp!, c.request);
  if (!out.ok) return { ok: false, error: await offerError(c, "payment_invalid", out.message, out.problem) };
  const ref = out.receipt.reference;
  return {
    ok: true,
    paid: { rail: "mpp", reference: ref, header: out.header },
    linkRef: `signup-ref:${out.receipt.method}:${ref}`,
  };
}

export async function handleSignup(o: Resolved, request: Request, env: AppEnv, requestId: string, keyPrefix: string, maxBodyBytes: number): Promise<Response> {
  const url = new URL(request.url);
  // 2. Rails configured, before reading anything from the request.
  const rails = resolveRails(o, env, url);
  const c: Ctx = { request, url, env, requestId, config: o.config, rails, keyPrefix };
  // 3. Body and Idempotency-Key.
  const name = await readSignupName(request, maxBodyBytes);
  const idempotencyKey = request.headers.get("Idempotency-Key");
  if (idempotencyKey !== null && !IDEMPOTENCY_KEY.test(idempotencyKey)) {
    throw new HttpError(400, "invalid_input", { message: "Idempotency-Key must be 32-128 characters of A-Z a-z 0-9 _ -.", noCharge: true });
  }
  // 4-6. One credential for a configured rail, naming this offer.
  const cred = await readCredential(c);
  const reference = cred.rail === "x402" ? cred.payment.reference : cred.reference;

  // 7-8. The payment's record: already used, being processed, or ours to process now.
  const record = signupObject(env, reference);
  const begin = await record.signupBegin();
  if (begin.state === "done") return answerUsed(c, reference, begin.record, idempotencyKey);
  if (begin.state === "busy") throw inProgress();
  const token = begin.token;

  let paid: SignupPaid | null = begin.paid;
  let permit: number | null = null;
  const admin = env.ADMIN.get(env.ADMIN.idFromName("global"));
  const giveBack = async () => {
    await record.signupRelease(token).catch((e) => console.error(JSON.stringify({ msg: "signup release failed", error: String(e) })));
    if (permit !== null) {
      await admin.releaseSignup(permit).catch((e) => console.error(JSON.stringify({ msg: "signup permit release failed", error: String(e) })));
    }
  };

  if (paid === null) {
    let taken = false;
    try {
      // 9. The signup hourly budget (its own, not the admin mint budget).
      const p = await admin.acquireSignup(o.config.signupsPerHour);
      if (!p.ok) {
        await giveBack();
        throw new HttpError(429, "rate_limited", {
          message: `Signup limit of ${o.config.signupsPerHour} per hour reached.`,
          noCharge: true,
          extra: { retry_after_seconds: p.retryAfterSeconds },
          headers: { "Retry-After": String(p.retryAfterSeconds) },
        });
      }
      permit = p.permit;
      // 10-11. Verify and settle.
      const t = await takePayment(c, cred);
      if (!t.ok) {
        await giveBack();
        throw t.error;
      }
      taken = true;
      // An MPP receipt reference pays for one signup only, whatever challenge it came with.
      if (t.linkRef !== null) {
        const link = await paymentObject(env.PAYMENTS, t.linkRef).signupLink(reference);
        if (!link.ok) {
          // The same payment as another signup's: nothing new was paid here.
          await giveBack();
          const other = await signupObject(env, link.payment).signupState();
          if (other.state === "done") return answerUsed(c, link.payment, other.record, idempotencyKey);
          throw inProgress();
        }
      }
      paid = t.paid;
    } catch (err) {
      // An unexpected failure before the payment was taken gives the claim and the slot back.
      if (!taken && !(err instanceof HttpError)) await giveBack();
      throw err;
    }
    // The payment is taken from here on: the claim is never released, only completed.
    await record.signupPaid(token, paid);
  }

  // 12. Mint (idempotent for a derived key), then record the payment as used.
  const key = idempotencyKey !== null ? await deriveSignupKey(keyPrefix, idempotencyKey, reference) : generateApiKey();
  const minted = await keyStub(env, await sha256Hex(key)).initOnce({
    keyId: generateKeyId(),
    name,
    balanceMcents: o.config.balanceMcents,
    scopes: [...o.config.scopes],
    requestId,
  });
  if (!minted) throw new Error("signup: the key object refused the mint");
  const done = await record.signupComplete(token, {
    ...paid,
    keyId: minted.keyId,
    name: minted.created ? name : minted.name,
    balanceMcents: o.config.balanceMcents,
    scopes: [...o.config.scopes],
    idemHash: idempotencyKey !== null ? await sha256Hex(idempotencyKey) : null,
    mintedAt: Date.now(),
  });
  if (done.keyId !== minted.keyId) return answerUsed(c, reference, done, idempotencyKey);
  return json(201, successBody(c, key, done), done.header ? { [done.header.name]: done.header.value } : undefined);
}
