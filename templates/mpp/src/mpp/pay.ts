// The payment gate shared by HTTP and MCP: mppx verifies the credential (HMAC-bound challenge id,
// realm, method, intent, amount, the tool the challenge was issued for, expiry, the method's own
// verification); then the payment is consumed durably, exactly once, before any work runs.
import { Credential, Receipt } from "mppx";
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

/** One composed mppx handler offering every configured method for `tool`, bound to the tool name (opaque). */
export function payHandler(setup: PaymentSetup, transport: "http" | "mcp", realm: string, tool: CallType): AnyHandler {
  const mppx = Mppx.create({
    methods: setup.methods as never,
    secretKey: setup.secretKey,
    realm,
    transport: (transport === "http" ? Transport.http() : Transport.mcpSdk()) as never,
  }) as unknown as { compose: (...entries: unknown[]) => AnyHandler };
  const expires = new Date(Date.now() + MPP.challengeTtlSeconds * 1000).toISOString();
  const entries = setup.offers(priceOf(tool)).map(([key, options]) => [key, { ...options, scope: tool, expires, description: tool }]);
  return mppx.compose(...entries);
}

/** A verified payment: what must be consumed before running, and the receipt to attach. */
export interface AcceptedPayment {
  challengeId: string;
  intent: string;
  expires: string | undefined;
  receipt: Receipt.Receipt;
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

/**
 * Consumes a verified payment, atomically and durably: true exactly once per challenge id, even
 * for concurrent submissions of one credential. Session payments are per-call debits of a payment
 * channel (mppx keeps the channel's accepted cumulative amount and spent in PaymentDO, serially),
 * so every verified session request has paid for itself.
 */
export async function consumePayment(env: MppEnv, credential: Credential.Credential): Promise<boolean> {
  if (credential.challenge.intent === "session") return true;
  const expires = credential.challenge.expires ? Date.parse(credential.challenge.expires) : Date.now() + CREDIT_TTL_MS;
  const id = credential.challenge.id;
  return paymentObject(env.PAYMENTS, `claim:${id}`).claim(id, expires + 60_000);
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
