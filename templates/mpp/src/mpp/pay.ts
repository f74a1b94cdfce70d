// The payment gate shared by HTTP and MCP. mppx checks the credential (HMAC-bound challenge id,
// realm, method, intent, amount, the tool the challenge was issued for, expiry, payload shape);
// then, for a charge, the challenge id is CLAIMED atomically in PaymentDO ("claim:<id>") before the
// payment method's verification runs — that verification is what takes the money. A payment for a
// challenge another request has claimed (or already used) is refused before its method runs, so it
// is never taken. A refusal by the method releases the claim; a taken payment marks it used; a
// method error that is not a refusal leaves the outcome unknown: the claim stays (`pending`) and
// the answer is 502 payment_unavailable with the reference (see src/mpp/payment-do.ts).
import { Credential, Errors, Receipt, type Method } from "mppx";
import { Mppx, Transport } from "mppx/server";
import type { CallType } from "../generated/manifest";
import { MPP } from "../generated/mpp";
import type { MppEnv } from "./env";
import type { PaidResult } from "../lib/mpp-methods";
import type { PaymentSetup } from "./methods";
import { paymentObject } from "./store";
import { priceOf } from "./tools";

export const CREDIT_TTL_MS = 24 * 3600_000;

/** The realm of challenges: mpp.realm, or the host the request came to. */
export function realmFor(request: Request): string {
  return MPP.realm !== "" ? MPP.realm : new URL(request.url).hostname;
}

type AnyHandler = (input: unknown) => Promise<
  { status: 402; challenge: unknown } | { status: 200; withReceipt: (response?: unknown) => unknown }
>;

/**
 * What happened to the money during one paid request, as seen by the claim guard around the
 * payment method (one per request: a composed handler verifies at most one credential).
 */
export interface PaymentTrace {
  /** The challenge was already claimed / used / pending: refused before the method ran. */
  refused: { challengeId: string; state: string } | null;
  /** The method took the payment (its receipt reference). */
  taken: { challengeId: string; reference: string } | null;
  /** The method failed without a refusal: the outcome is unknown. */
  pending: { challengeId: string; error: string } | null;
}

export function newTrace(): PaymentTrace {
  return { refused: null, taken: null, pending: null };
}

/** The reference of an MPP payment in answers and logs. */
export function mppReference(challengeId: string): string {
  return `mpp:${challengeId}`;
}

type VerifyFn = (parameters: { credential: { challenge: { id: string; expires?: string | undefined } } }) => Promise<Receipt.Receipt>;

function logPayment(fields: Record<string, unknown>): void {
  console.log(JSON.stringify({ msg: "mpp payment", rail: "mpp", ...fields }));
}

/**
 * Wraps a charge method so that its verification runs only while this request holds the
 * challenge's claim. Session methods are per-call debits of a channel (mppx keeps the channel's
 * accepted and spent amounts in PaymentDO, serially): they are not claimed.
 */
function guarded(method: Method.AnyServer, env: MppEnv, trace: PaymentTrace): Method.AnyServer {
  if (method.intent === "session") return method;
  const m = method as unknown as { verify?: VerifyFn; broadcast?: VerifyFn };
  const wrap = (inner: VerifyFn): VerifyFn => async (parameters) => {
    const id = parameters.credential.challenge.id;
    const expires = parameters.credential.challenge.expires ? Date.parse(parameters.credential.challenge.expires) : NaN;
    const stub = paymentObject(env.PAYMENTS, `claim:${id}`);
    const claim = await stub.claimChallenge(id, (Number.isFinite(expires) ? expires : Date.now() + CREDIT_TTL_MS) + 60_000);
    if (!claim.ok) {
      trace.refused = { challengeId: id, state: claim.state };
      throw new Errors.InvalidChallengeError({ id, reason: claim.state === "claimed" ? "another payment for this challenge is being verified" : "this challenge has already been paid" });
    }
    let receipt: Receipt.Receipt;
    try {
      receipt = await inner(parameters);
    } catch (err) {
      if (err instanceof Errors.PaymentError) {
        // A refusal: nothing was taken; the challenge may be paid again.
        await stub.releaseChallenge(id, claim.token).catch((e: unknown) => {
          console.error(JSON.stringify({ msg: "claim release failed (the lease frees it)", reference: mppReference(id), error: String(e) }));
        });
        throw err;
      }
      trace.pending = { challengeId: id, error: String(err) };
      logPayment({ reference: mppReference(id), state: "pending", error: String(err).slice(0, 500) });
      await stub.settleChallenge(id, claim.token, "pending", null).catch(() => false);
      throw err;
    }
    trace.taken = { challengeId: id, reference: receipt.reference };
    logPayment({ reference: mppReference(id), state: "paid", transaction: receipt.reference });
    // The money is taken: whatever happens to this bookkeeping, the payment is delivered.
    const kept = await stub.settleChallenge(id, claim.token, "used", receipt.reference).catch((e: unknown) => {
      console.error(JSON.stringify({ msg: "claim could not be marked used", reference: mppReference(id), error: String(e) }));
      return true;
    });
    if (!kept) console.error(JSON.stringify({ msg: "claim lease ran out during verification", reference: mppReference(id) }));
    return receipt;
  };
  return {
    ...method,
    ...(m.verify ? { verify: wrap(m.verify) } : {}),
    ...(m.broadcast ? { broadcast: wrap(m.broadcast) } : {}),
  } as Method.AnyServer;
}

/**
 * One composed mppx handler offering every configured method for `tool`, bound to the tool name
 * (opaque), with every charge method's verification behind the challenge claim (`trace` records
 * what happened to the money).
 */
export function payHandler(setup: PaymentSetup, transport: "http" | "mcp", realm: string, tool: CallType, env: MppEnv, trace: PaymentTrace): AnyHandler {
  const mppx = Mppx.create({
    methods: setup.methods.map((m) => guarded(m, env, trace)) as never,
    secretKey: setup.secretKey,
    realm,
    transport: (transport === "http" ? Transport.http() : Transport.mcpSdk()) as never,
  }) as unknown as { compose: (...entries: unknown[]) => AnyHandler };
  const expires = new Date(Date.now() + MPP.challengeTtlSeconds * 1000).toISOString();
  const entries = setup.offers(priceOf(tool)).map(([key, options]) => [key, { ...options, scope: tool, expires, description: tool }]);
  return mppx.compose(...entries);
}

export { classifyHttp, type PaidResult } from "../lib/mpp-methods";

export function classifyMcp(withReceipt: (r?: unknown) => unknown): PaidResult<Record<string, unknown>> {
  const marker = crypto.randomUUID();
  try {
    const probe = withReceipt({ content: [], structuredContent: { probe: marker } }) as {
      structuredContent?: { probe?: string };
      _meta?: Record<string, unknown>;
    };
    if (probe.structuredContent?.probe !== marker) return { kind: "management", response: probe as Record<string, unknown> };
    const r = probe._meta?.["org.paymentauth/receipt"] as Receipt.Receipt | undefined;
    return r && r.status === "success" ? { kind: "paid", receipt: r } : { kind: "unpaid" };
  } catch {
    return { kind: "unpaid" };
  }
}

export function credentialFromHttp(request: Request): Credential.Credential | null {
  try {
    return Credential.fromRequest(request);
  } catch {
    return null;
  }
}

export function newCreditToken(): string {
  const b = crypto.getRandomValues(new Uint8Array(24));
  return "crd_" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

export async function issueCredit(env: MppEnv, tool: CallType): Promise<{ token: string; expires_at: string }> {
  const token = newCreditToken();
  const expiresAt = Date.now() + CREDIT_TTL_MS;
  await paymentObject(env.PAYMENTS, `credit:${token}`).issueCredit(token, tool, expiresAt);
  return { token, expires_at: new Date(expiresAt).toISOString() };
}

export async function redeemCredit(env: MppEnv, token: string, tool: CallType): Promise<boolean> {
  if (!/^crd_[0-9a-f]{48}$/.test(token)) return false;
  return paymentObject(env.PAYMENTS, `credit:${token}`).redeemCredit(token, tool);
}
