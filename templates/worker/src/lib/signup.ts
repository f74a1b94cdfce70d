// POST /v1/signup: an agent with no key pays once (x402 or MPP) and receives a new prepaid key.
// The checks run in the order of the contract (docs/contract.md, 3.9):
//    2. rails configured, SIGNUP_SECRET (else 503)   3. optional body {name?}, Idempotency-Key syntax
//    4. at most one payment credential               5. a credential for a configured rail (else 402 + offer)
//    6. the credential names this offer              7. the credential is genuine, checked locally (no I/O)
//    8. the payment's durable record: replay / in progress / pending (resolved now) / new claim
//    9. the signup hourly budget (new claims only)  10. verify (facilitator / the MPP method)
//   11. x402: record `settling` (payload, validBefore, block number) before any money may move
//   12. settle; an unknown outcome is `pending` (202 payment_pending), resolved from the chain
//   13. mint the key, record the payment as used, 201.
// Every payment is recorded by its reference in its own PaymentDO ("signup:<reference>"): a
// payment mints at most one key, even when it arrives concurrently; a payment shown not to have
// moved money releases its claim (and its slot in the hourly budget) so the payer can try again.
// Keys are always derived from SIGNUP_SECRET and the signup's Idempotency-Key (the client's, or one
// the gateway makes and returns only in a 202), so a pending payment's key can be minted by the
// PaymentDO's alarm and shown to its holder later.
import { decodePaymentResponseHeader } from "@x402/core/http";
import { PROJECT } from "../generated/manifest";
import { isJsonContentType, readBoundedText } from "./body";
import type { AppEnv } from "./env";
import { HttpError, errorResponse, json, type ErrorCode } from "./http";
import { secretsEqual, sha256Hex } from "./keys";
import { buildPayments, type MppMethodKey, type PaymentSetupResult } from "./mpp-methods";
import type { PaymentDO, SignupBegin, SignupPaid, SignupRecord, SignupSnapshot, SignupStateView, X402Settlement } from "./payment-do";
import { paymentObject } from "./payment-store";
import { MAX_JSON_DEPTH, isPlainObject, jsonDepthExceeds } from "./shape";
import { MANIFEST_SIGNUP, type SignupConfig } from "./signup-config";
import { checkCredential, mppChallenges, verifyPayment, type MppRail } from "./signup-mpp";
import { MIN_SIGNUP_SECRET_BYTES, deriveSignupKey, mintPaid, settleX402, signupSecret } from "./signup-sweep";
import {
  authorizationOf,
  checkSignature,
  currentBlock,
  facilitatorVerify,
  httpFacilitator,
  parseV1,
  parseV2,
  paymentRequired,
  paymentRequiredHeader,
  sameAuthorization,
  settlementHeader,
  x402Rail,
  type FacilitatorFactory,
  type X402Payment,
  type X402Rail,
} from "./signup-x402";

export { DERIVATION_PREFIX, deriveSignupKey } from "./signup-sweep";

export const SIGNUP_PATH = "/v1/signup";
const IDEMPOTENCY_KEY = /^[A-Za-z0-9_-]{32,128}$/;
const NAME = /^[A-Za-z0-9 _.-]{1,32}$/;
/** Retry-After of 409 payment_in_progress. */
const IN_PROGRESS_RETRY_SECONDS = 2;
/** Retry-After of 202 payment_pending. */
const PENDING_RETRY_SECONDS = 5;
const PENDING_MESSAGE =
  "The payment was submitted but its outcome is not known yet; retry this request (same payment, same Idempotency-Key) to collect your key.";

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
  readonly secret: string;
  /** The x402 protocol version (and network name) of the presented payment, once read. */
  presented?: { readonly version: 1 | 2; readonly clientNetwork: string };
}

function describe(config: SignupConfig): string {
  return `A ${PROJECT.name} API key holding ${usd(config.balanceMcents)} of credit (scopes: ${config.scopes.join(", ")}).`;
}

/** Step 2: every configured rail has its settings and secrets (else 503 naming what to set). */
function resolveRails(o: Resolved, env: AppEnv, url: URL): Rails & { secret: string } {
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
  if (signupSecret(env) === null) {
    problems.push(`set SIGNUP_SECRET (at least ${MIN_SIGNUP_SECRET_BYTES} bytes, e.g. \`openssl rand -hex 32\`): the server secret signup keys are derived from`);
  }
  if (problems.length > 0) {
    console.error(JSON.stringify({ msg: "signup not configured", problems }));
    throw new HttpError(503, "signup_unavailable", { message: `Signup is not configured: ${problems.join("; ")}.` });
  }
  return { x402, mpp, secret: signupSecret(env)! };
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

function signupObject(env: AppEnv, reference: string): DurableObjectStub<PaymentDO> {
  return paymentObject(env.PAYMENTS, `signup:${reference}`) as unknown as DurableObjectStub<PaymentDO>;
}

/** A fresh Idempotency-Key made by the gateway: 43 characters of base64url (32 random bytes). */
function makeIdempotencyKey(): string {
  const b = crypto.getRandomValues(new Uint8Array(32));
  return btoa(String.fromCharCode(...b)).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

async function idemMatches(idempotencyKey: string | null, idemHash: string | null): Promise<boolean> {
  return idemHash !== null && idempotencyKey !== null && (await secretsEqual(await sha256Hex(idempotencyKey), idemHash));
}

/** A key minted before SIGNUP_SECRET existed (records migrated from the first schema). */
async function deriveV1Key(prefix: string, idempotencyKey: string, reference: string): Promise<string> {
  const enc = new TextEncoder();
  const k = await crypto.subtle.importKey("raw", enc.encode(idempotencyKey), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", k, enc.encode("mcpay-signup-v1:" + reference)));
  return prefix + Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The answer for a payment that already bought a key: the same 201 body again, or 409. */
async function answerUsed(c: Ctx, reference: string, record: SignupRecord, idempotencyKey: string | null): Promise<Response> {
  if (record.idemHash !== null && (await idemMatches(idempotencyKey, record.idemHash))) {
    const key =
      record.derivation === "v1"
        ? await deriveV1Key(c.keyPrefix, idempotencyKey!, reference)
        : await deriveSignupKey(c.keyPrefix, c.secret, record.idemHash, reference);
    return json(200, { ...successBody(c, key, record), replayed: true }, successHeaders(c, record));
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

/** 202 payment_pending: the money may have moved; the same request later (or the sweep) finishes it. */
function pendingAnswer(c: Ctx, rail: "x402" | "mpp", reference: string, state: string, transaction: string | null, idempotencyKey: string | null): Response {
  return errorResponse(202, "payment_pending", c.requestId, {
    message: PENDING_MESSAGE,
    extra: {
      payment: { rail, reference, state, transaction },
      idempotency_key: idempotencyKey,
      retry_after_seconds: PENDING_RETRY_SECONDS,
    },
    headers: { "Retry-After": String(PENDING_RETRY_SECONDS) },
  });
}

/** 502 for an MPP payment whose outcome the method did not tell: recorded pending, for the operator. */
function mppUnknown(reference: string): HttpError {
  return new HttpError(502, "payment_unavailable", {
    message:
      "The payment method failed without saying whether the payment was taken. It is recorded as pending for the operator; do not pay again, and quote the payment reference if you contact them.",
    extra: { payment: { rail: "mpp", reference, state: "pending" } },
  });
}

function created(c: Ctx, key: string, record: SignupRecord): Response {
  return json(201, successBody(c, key, record), successHeaders(c, record));
}

/**
 * The success header of a signup's answer, in the protocol version of the request presenting the
 * payment: a v1 (X-PAYMENT) request gets X-PAYMENT-RESPONSE and a v2 one PAYMENT-RESPONSE, even
 * when the payment was settled through the other version's request.
 */
function successHeaders(c: Ctx, record: SignupRecord): Record<string, string> | undefined {
  const h = record.header;
  if (!h) return undefined;
  const p = c.presented;
  const rail = c.rails.x402;
  if (record.rail !== "x402" || !p || !rail || h.name === (p.version === 1 ? "X-PAYMENT-RESPONSE" : "PAYMENT-RESPONSE")) return { [h.name]: h.value };
  try {
    const settled = decodePaymentResponseHeader(h.value);
    const out = settlementHeader(p.version, p.clientNetwork, rail.requirement.network, settled.transaction, settled.payer ?? "");
    return { [out.name]: out.value };
  } catch {
    return { [h.name]: h.value };
  }
}

/** After a paid payment was minted: the key for the holder of its Idempotency-Key, else 409. */
async function answerMinted(c: Ctx, reference: string, idemHash: string, key: string, record: SignupRecord, idempotencyKey: string | null): Promise<Response> {
  if (record.idemHash === idemHash && (await idemMatches(idempotencyKey, idemHash))) return created(c, key, record);
  return answerUsed(c, reference, record, idempotencyKey);
}

/** Step 8, a payment whose outcome is unknown (or taken but not minted): resolve it now. */
async function resolveHeld(c: Ctx, cred: Credential, reference: string, token: string, snap: SignupSnapshot, idempotencyKey: string | null): Promise<Response> {
  const obj = signupObject(c.env, reference);
  if (cred.rail === "x402" && snap.x402 && !sameAuthorization(authorizationOf(cred.payment), snap.x402.authorization)) {
    await obj.signupLetGo(token);
    throw await offerError(c, "payment_invalid", "This authorization's nonce belongs to another recorded authorization.");
  }
  const holder = (await idemMatches(idempotencyKey, snap.idemHash)) ? idempotencyKey : null;
  let paid: SignupPaid | null = snap.state === "paid" ? snap.paid : null;
  try {
    if (paid === null) {
      if (snap.x402 === null || c.rails.x402 === null) {
        await obj.signupLetGo(token);
        return pendingAnswer(c, snap.rail, reference, snap.state, snap.transaction, holder);
      }
      const rail = c.rails.x402;
      const out = await settleX402(obj, token, snap.x402, rail.facilitator, rail.timeoutMs, rail.rpcUrl, "resolve", snap.transaction);
      if (out.kind === "pending") return pendingAnswer(c, "x402", reference, "pending", out.transaction, holder);
      if (out.kind === "released") throw await offerError(c, "payment_failed", out.message);
      paid = out.paid;
    }
    const { key, record } = await mintPaid(c.env, obj, token, snap, paid, c.requestId, c.secret);
    return answerMinted(c, reference, snap.idemHash!, key, record, idempotencyKey);
  } catch (err) {
    if (err instanceof HttpError) throw err;
    // Never a 500 once money may have moved: the payment stays recorded and the sweep finishes it.
    console.error(JSON.stringify({ msg: "signup resolution failed", reference, error: String(err).slice(0, 500) }));
    await obj.signupLetGo(token).catch(() => {});
    return pendingAnswer(c, snap.rail, reference, paid ? "paid" : "pending", paid?.rail === "x402" ? paid.reference : snap.transaction, holder);
  }
}

function x402Settlement(rail: X402Rail, payment: X402Payment, fromBlock: bigint): X402Settlement {
  return {
    payload: payment.payload as unknown as Record<string, unknown>,
    requirement: rail.requirement as unknown as Record<string, unknown>,
    version: payment.version,
    clientNetwork: payment.clientNetwork,
    authorization: authorizationOf(payment),
    facilitatorUrl: rail.facilitatorUrl,
    rpcUrl: rail.rpcUrl,
    fromBlock: fromBlock.toString(),
  };
}

/** Steps 9-13 for a new claim. */
async function processClaim(
  o: Resolved,
  c: Ctx,
  cred: Credential,
  reference: string,
  token: string,
  name: string | null,
  clientIdem: string | null,
): Promise<Response> {
  const obj = signupObject(c.env, reference);
  const admin = c.env.ADMIN.get(c.env.ADMIN.idFromName("global"));
  let permit: number | null = null;
  /** Before `settling` is recorded nothing can have moved: the claim and the budget slot go back. */
  const giveBack = async (why: string) => {
    await obj.signupRelease(token, why).catch((e) => console.error(JSON.stringify({ msg: "signup release failed", error: String(e) })));
    if (permit !== null) {
      await admin.releaseSignup(permit).catch((e) => console.error(JSON.stringify({ msg: "signup permit release failed", error: String(e) })));
    }
  };
  const idem = clientIdem ?? makeIdempotencyKey();
  const idemHash = await sha256Hex(idem);
  const purchase = { name, balanceMcents: o.config.balanceMcents, scopes: [...o.config.scopes] };
  let settling = false;
  let paid: SignupPaid | null = null;
  try {
    // 9. The signup hourly budget (its own, not the admin mint budget).
    const p = await admin.acquireSignup(o.config.signupsPerHour);
    if (!p.ok) {
      await giveBack("signup budget used up");
      throw new HttpError(429, "rate_limited", {
        message: `Signup limit of ${o.config.signupsPerHour} per hour reached.`,
        noCharge: true,
        extra: { retry_after_seconds: p.retryAfterSeconds },
        headers: { "Retry-After": String(p.retryAfterSeconds) },
      });
    }
    permit = p.permit;

    if (cred.rail === "x402") {
      const rail = c.rails.x402!;
      // 10. The facilitator's verification (moves no money).
      const v = await facilitatorVerify(rail, cred.payment);
      if (!v.ok) {
        await giveBack(v.message);
        if (v.status === 502) throw new HttpError(502, "payment_unavailable", { message: v.message, noCharge: true });
        throw await offerError(c, "payment_invalid", v.message);
      }
      // 11. Where the chain is now, then `settling`, durably, before /settle.
      let block: bigint;
      try {
        block = await currentBlock(rail.rpcUrl);
      } catch (err) {
        console.error(JSON.stringify({ msg: "x402 chain unreachable before settle", error: String(err).slice(0, 500) }));
        await giveBack("chain unreachable before settle");
        throw new HttpError(502, "payment_unavailable", {
          message: "The payment network's RPC (X402_RPC_URL) could not be reached; nothing was charged. Retry later.",
          noCharge: true,
        });
      }
      const x = x402Settlement(rail, cred.payment, block);
      if (!(await obj.signupSettling(token, { idemHash, permit, purchase, x402: x }))) {
        await giveBack("the claim was taken over before settling");
        throw inProgress();
      }
      settling = true;
      // 12. Settle; the outcome is recorded by settleX402 (paid / released / pending).
      const out = await settleX402(obj, token, x, rail.facilitator, rail.timeoutMs, rail.rpcUrl, "settle");
      if (out.kind === "pending") return pendingAnswer(c, "x402", reference, "pending", out.transaction, idem);
      if (out.kind === "released") throw await offerError(c, "payment_failed", `${out.message} No money moved (checked on chain).`);
      paid = out.paid;
    } else {
      // 10. The method's verification is the payment: `settling` first.
      if (!(await obj.signupSettling(token, { idemHash, permit, purchase, x402: null }))) {
        await giveBack("the claim was taken over before verifying");
        throw inProgress();
      }
      settling = true;
      const out = await verifyPayment(c.rails.mpp!, c.request);
      if (!out.ok) {
        if ("unknown" in out) {
          await obj.signupPending(token, null);
          throw mppUnknown(reference);
        }
        await obj.signupRelease(token, out.message);
        throw await offerError(c, "payment_invalid", out.message, out.problem);
      }
      const ref = out.receipt.reference;
      // An MPP receipt reference pays for one signup only, whatever challenge it came with.
      const link = await paymentObject(c.env.PAYMENTS, `signup-ref:${out.receipt.method}:${ref}`).signupLink(reference);
      if (!link.ok) {
        // The same payment as another signup's: nothing new was paid here.
        await obj.signupRelease(token, "receipt reference already used by another signup");
        const other: SignupStateView = await signupObject(c.env, link.payment).signupState();
        if (other.state === "done") return answerUsed(c, link.payment, other.record, clientIdem);
        throw inProgress();
      }
      paid = { rail: "mpp", reference: ref, header: out.header };
      await obj.signupPaid(token, paid);
    }
  } catch (err) {
    if (err instanceof HttpError) throw err;
    if (!settling) {
      // An unexpected failure before anything could move gives the claim and the slot back.
      await giveBack(`unexpected error: ${String(err).slice(0, 200)}`);
      throw err;
    }
    // Money may have moved: never a 500, never "no charge applied".
    console.error(JSON.stringify({ msg: "signup failed after settling started", reference, error: String(err).slice(0, 500) }));
    if (paid === null) await obj.signupPending(token, null).catch(() => false);
    if (cred.rail === "mpp" && paid === null) throw mppUnknown(reference);
    await obj.signupLetGo(token).catch(() => {});
    return pendingAnswer(c, cred.rail, reference, paid ? "paid" : "pending", paid?.rail === "x402" ? paid.reference : null, idem);
  }

  // 13. Mint (idempotent for a derived key), then record the payment as used.
  try {
    const { key, record } = await mintPaid(c.env, obj, token, { reference, idemHash, purchase }, paid, c.requestId, c.secret);
    if (record.idemHash !== idemHash) return answerUsed(c, reference, record, clientIdem);
    return created(c, key, record);
  } catch (err) {
    if (err instanceof HttpError) throw err;
    console.error(JSON.stringify({ msg: "signup mint failed after payment", reference, error: String(err).slice(0, 500) }));
    await obj.signupLetGo(token).catch(() => {});
    return pendingAnswer(c, paid.rail, reference, "paid", paid.rail === "x402" ? paid.reference : null, idem);
  }
}

export async function handleSignup(o: Resolved, request: Request, env: AppEnv, requestId: string, keyPrefix: string, maxBodyBytes: number): Promise<Response> {
  const url = new URL(request.url);
  // 2. Rails configured and SIGNUP_SECRET set, before reading anything from the request.
  const { secret, ...rails } = resolveRails(o, env, url);
  const c: Ctx = { request, url, env, requestId, config: o.config, rails, keyPrefix, secret };
  // 3. Body and Idempotency-Key.
  const name = await readSignupName(request, maxBodyBytes);
  const idempotencyKey = request.headers.get("Idempotency-Key");
  if (idempotencyKey !== null && !IDEMPOTENCY_KEY.test(idempotencyKey)) {
    throw new HttpError(400, "invalid_input", { message: "Idempotency-Key must be 32-128 characters of A-Z a-z 0-9 _ -.", noCharge: true });
  }
  // 4-6. One credential for a configured rail, naming this offer.
  const cred = await readCredential(c);
  if (cred.rail === "x402") c.presented = { version: cred.payment.version, clientNetwork: cred.payment.clientNetwork };
  // 7. The credential is genuine (x402: the EIP-712 signature, locally; MPP: checked in step 6).
  //    Nothing is looked up for a credential that fails here.
  if (cred.rail === "x402") {
    const problem = await checkSignature(rails.x402!, cred.payment);
    if (problem !== null) throw await offerError(c, "payment_invalid", problem);
  }
  const reference = cred.rail === "x402" ? cred.payment.reference : cred.reference;

  // 8. The payment's record: already used, being processed, pending, or ours to process now.
  const obj = signupObject(env, reference);
  const leaseMs = rails.x402 ? Math.max(5 * 60_000, 2 * rails.x402.timeoutMs + 60_000) : undefined;
  // (The RPC stub's type drops the variants carrying JSON records; the object returns a SignupBegin.)
  const begin = (await obj.signupBegin({ rail: cred.rail, reference, ...(leaseMs !== undefined ? { leaseMs } : {}) })) as unknown as SignupBegin;
  switch (begin.state) {
    case "done":
      if (cred.rail === "x402" && begin.x402 && !sameAuthorization(authorizationOf(cred.payment), begin.x402.authorization)) {
        throw await offerError(c, "payment_invalid", "This authorization's nonce belongs to another recorded authorization.");
      }
      return answerUsed(c, reference, begin.record, idempotencyKey);
    case "busy":
      throw inProgress();
    case "unresolved":
      throw mppUnknown(reference);
    case "resolve":
      return resolveHeld(c, cred, reference, begin.token, begin.snapshot, idempotencyKey);
    case "claimed":
      return processClaim(o, c, cred, reference, begin.token, name, idempotencyKey);
  }
}
