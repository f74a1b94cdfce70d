// The x402 rail of POST /v1/signup, with the official @x402/core library: protocol v2
// (PAYMENT-REQUIRED / PAYMENT-SIGNATURE / PAYMENT-RESPONSE) and v1's X-PAYMENT, scheme `exact` on
// an EVM network (EIP-3009 transferWithAuthorization), verified and settled by a facilitator over
// its HTTP API (POST /verify, POST /settle). Nothing here checks a signature itself: the facilitator
// does, and only its answer counts.
import { HTTPFacilitatorClient, decodePaymentSignatureHeader, encodePaymentRequiredHeader, encodePaymentResponseHeader, type FacilitatorClient } from "@x402/core/http";
import { PaymentPayloadV1Schema, PaymentPayloadV2Schema } from "@x402/core/schemas";
import { SettleError, VerifyError, type PaymentPayload, type PaymentRequired, type PaymentRequirements, type SettleResponse } from "@x402/core/types";
import { Base64EncodedRegex, deepEqual, safeBase64Decode } from "@x402/core/utils";
import type { AppEnv } from "./env";
import type { SignupConfig } from "./signup-config";

export type { FacilitatorClient };

/** How long one facilitator call may take (verify, settle). */
export const FACILITATOR_TIMEOUT_MS = 60_000;

/** Creates the facilitator client for a facilitator URL (tests pass a deterministic one). */
export type FacilitatorFactory = (env: AppEnv, url: string) => FacilitatorClient;

export const httpFacilitator: FacilitatorFactory = (env, url) => {
  const auth = env.X402_FACILITATOR_AUTHORIZATION;
  return new HTTPFacilitatorClient({
    url,
    timeoutMs: FACILITATOR_TIMEOUT_MS,
    ...(auth
      ? {
          createAuthHeaders: async () => {
            const h = { Authorization: auth };
            return { verify: h, settle: h, supported: h };
          },
        }
      : {}),
  });
};

export interface X402Rail {
  /** The one payment requirement offered (deterministic: a client echoes it as `accepted`). */
  readonly requirement: PaymentRequirements;
  readonly facilitator: FacilitatorClient;
  /** x402 v1 names of our network (v1 used plain names such as "base"). */
  readonly v1Networks: readonly string[];
}

const ADDRESS = /^0x[0-9a-fA-F]{40}$/;
const NONCE = /^0x[0-9a-fA-F]{64}$/;

/** x402 v1 network names (as in @x402/evm) by EVM chain id. */
const V1_NETWORK_NAMES: Readonly<Record<string, string>> = {
  "1": "ethereum",
  "11155111": "sepolia",
  "8453": "base",
  "84532": "base-sepolia",
  "43114": "avalanche",
  "43113": "avalanche-fuji",
  "137": "polygon",
  "80002": "polygon-amoy",
  "1329": "sei",
  "1328": "sei-testnet",
  "4689": "iotex",
  "2741": "abstract",
  "11124": "abstract-testnet",
  "3338": "peaq",
  "1514": "story",
  "41923": "educhain",
  "42220": "celo",
};

/** The x402 rail from the manifest and the environment, or what is missing. */
export function x402Rail(
  cfg: NonNullable<SignupConfig["x402"]>,
  env: AppEnv,
  factory: FacilitatorFactory,
): { ok: true; rail: X402Rail } | { ok: false; problems: string[] } {
  const problems: string[] = [];
  const payTo = (env.X402_PAY_TO ?? "").trim() || cfg.payTo;
  if (payTo === "") problems.push("x402: set X402_PAY_TO (or [signup.x402] pay_to) to the address receiving payments");
  else if (!ADDRESS.test(payTo)) problems.push("x402: X402_PAY_TO must be a 0x address (40 hex digits)");
  const url = (env.X402_FACILITATOR_URL ?? "").trim() || cfg.facilitatorUrl;
  let urlOk = false;
  try {
    const u = new URL(url);
    urlOk = u.protocol === "https:" || u.protocol === "http:";
  } catch {
    urlOk = false;
  }
  if (!urlOk) problems.push("x402: X402_FACILITATOR_URL (or [signup.x402] facilitator_url) must be an http(s) URL");
  if (problems.length > 0) return { ok: false, problems };
  const requirement: PaymentRequirements = {
    scheme: "exact",
    network: cfg.network as PaymentRequirements["network"],
    amount: cfg.amount,
    asset: cfg.asset,
    payTo,
    maxTimeoutSeconds: cfg.maxTimeoutSeconds,
    extra: { name: cfg.assetName, version: cfg.assetVersion },
  };
  const chainId = cfg.network.startsWith("eip155:") ? cfg.network.slice("eip155:".length) : "";
  const v1 = V1_NETWORK_NAMES[chainId];
  return {
    ok: true,
    rail: { requirement, facilitator: factory(env, url.replace(/\/+$/, "")), v1Networks: v1 ? [v1, cfg.network] : [cfg.network] },
  };
}

/** The PaymentRequired object (v2) for the 402 header and body. */
export function paymentRequired(rail: X402Rail, resourceUrl: string, description: string, error: string): PaymentRequired {
  return {
    x402Version: 2,
    error,
    resource: { url: resourceUrl, description, mimeType: "application/json" },
    accepts: [rail.requirement],
    extensions: {},
  };
}

export function paymentRequiredHeader(pr: PaymentRequired): string {
  return encodePaymentRequiredHeader(pr);
}

/** A decoded x402 payment for our offer. */
export interface X402Payment {
  readonly version: 1 | 2;
  /** The v2 payload sent to the facilitator (v1 payloads are converted; `accepted` is our requirement). */
  readonly payload: PaymentPayload;
  /** `x402:<network>:<asset>:<from>:<nonce>`, lowercase. */
  readonly reference: string;
  /** The network name the client used (v1 answers with it). */
  readonly clientNetwork: string;
}

export type ParseResult = { ok: true; payment: X402Payment } | { ok: false; message: string };

function eip3009Reference(rail: X402Rail, payload: Record<string, unknown>): string | null {
  const auth = payload.authorization as Record<string, unknown> | undefined;
  if (typeof payload.signature !== "string" || typeof auth !== "object" || auth === null) return null;
  const from = auth.from;
  const nonce = auth.nonce;
  if (typeof from !== "string" || !ADDRESS.test(from) || typeof nonce !== "string" || !NONCE.test(nonce)) return null;
  const r = rail.requirement;
  return `x402:${r.network}:${r.asset}:${from}:${nonce}`.toLowerCase();
}

/** PAYMENT-SIGNATURE (v2): base64 JSON PaymentPayload whose `accepted` deep-equals our requirement. */
export function parseV2(rail: X402Rail, header: string): ParseResult {
  let raw: unknown;
  try {
    raw = decodePaymentSignatureHeader(header.trim());
  } catch {
    return { ok: false, message: "PAYMENT-SIGNATURE is not base64-encoded JSON." };
  }
  const parsed = PaymentPayloadV2Schema.safeParse(raw);
  if (!parsed.success) return { ok: false, message: "PAYMENT-SIGNATURE is not an x402 v2 PaymentPayload." };
  const p = raw as PaymentPayload;
  if (!deepEqual(p.accepted, rail.requirement)) {
    return { ok: false, message: "The payment's `accepted` requirement is not the one offered (echo accepts[0] unchanged)." };
  }
  const reference = eip3009Reference(rail, p.payload);
  if (!reference) return { ok: false, message: "The payment is not an EIP-3009 authorization (payload.signature, payload.authorization.from/nonce)." };
  const payload: PaymentPayload = { x402Version: 2, accepted: rail.requirement, payload: p.payload };
  if (p.resource) payload.resource = p.resource;
  if (p.extensions) payload.extensions = p.extensions;
  return { ok: true, payment: { version: 2, payload, reference, clientNetwork: rail.requirement.network } };
}

/** X-PAYMENT (v1): base64 JSON {x402Version: 1, scheme, network, payload} for scheme exact on our network. */
export function parseV1(rail: X402Rail, header: string, resourceUrl: string): ParseResult {
  let raw: unknown;
  try {
    const h = header.trim();
    if (!Base64EncodedRegex.test(h)) throw new Error("not base64");
    raw = JSON.parse(safeBase64Decode(h));
  } catch {
    return { ok: false, message: "X-PAYMENT is not base64-encoded JSON." };
  }
  const parsed = PaymentPayloadV1Schema.safeParse(raw);
  if (!parsed.success) return { ok: false, message: "X-PAYMENT is not an x402 v1 payment payload." };
  const v1 = parsed.data;
  if (v1.scheme !== "exact") return { ok: false, message: `Scheme ${JSON.stringify(v1.scheme).slice(0, 40)} is not offered (use "exact").` };
  if (!rail.v1Networks.includes(v1.network)) {
    return { ok: false, message: `Network ${JSON.stringify(v1.network).slice(0, 40)} is not offered (${rail.v1Networks.join(" or ")}).` };
  }
  const reference = eip3009Reference(rail, v1.payload);
  if (!reference) return { ok: false, message: "The payment is not an EIP-3009 authorization (payload.signature, payload.authorization.from/nonce)." };
  const payload: PaymentPayload = {
    x402Version: 2,
    resource: { url: resourceUrl },
    accepted: rail.requirement,
    payload: v1.payload,
  };
  return { ok: true, payment: { version: 1, payload, reference, clientNetwork: v1.network } };
}

export type SettleOutcome =
  | { ok: true; settle: SettleResponse; transaction: string; header: { name: string; value: string } }
  | { ok: false; status: 402 | 502; code: "payment_invalid" | "payment_failed" | "payment_unavailable"; message: string };

function reasonOf(reason: string | undefined, message: string | undefined, fallback: string): string {
  const r = [reason, message].filter((x) => typeof x === "string" && x !== "").join(": ");
  return (r || fallback).slice(0, 300);
}

/**
 * Verifies, then settles, through the facilitator. A definite refusal (isValid:false, success:false,
 * also when a facilitator sends it with a 4xx status) is the payer's problem (402); no answer, a
 * 5xx or a malformed answer is ours (502), and nothing was charged.
 */
export async function verifyAndSettle(rail: X402Rail, payment: X402Payment): Promise<SettleOutcome> {
  const req = rail.requirement;
  try {
    const v = await rail.facilitator.verify(payment.payload, req);
    if (v.isValid !== true) {
      return { ok: false, status: 402, code: "payment_invalid", message: `Payment refused: ${reasonOf(v.invalidReason, v.invalidMessage, "invalid")}.` };
    }
  } catch (err) {
    if (err instanceof VerifyError && err.statusCode >= 400 && err.statusCode < 500) {
      return { ok: false, status: 402, code: "payment_invalid", message: `Payment refused: ${reasonOf(err.invalidReason, err.invalidMessage, "invalid")}.` };
    }
    console.error(JSON.stringify({ msg: "x402 facilitator verify failed", error: String(err).slice(0, 500) }));
    return { ok: false, status: 502, code: "payment_unavailable", message: "The payment facilitator could not verify the payment; nothing was charged. Retry later." };
  }
  let s: SettleResponse;
  try {
    s = await rail.facilitator.settle(payment.payload, req);
  } catch (err) {
    if (err instanceof SettleError && err.statusCode >= 400 && err.statusCode < 500) {
      return { ok: false, status: 402, code: "payment_failed", message: `Settlement failed: ${reasonOf(err.errorReason, err.errorMessage, "failed")}.` };
    }
    console.error(JSON.stringify({ msg: "x402 facilitator settle failed", error: String(err).slice(0, 500) }));
    return { ok: false, status: 502, code: "payment_unavailable", message: "The payment facilitator could not settle the payment; retry later." };
  }
  if (s.success !== true) {
    return { ok: false, status: 402, code: "payment_failed", message: `Settlement failed: ${reasonOf(s.errorReason, s.errorMessage, "failed")}.` };
  }
  const header =
    payment.version === 2
      ? { name: "PAYMENT-RESPONSE", value: encodePaymentResponseHeader(s) }
      : { name: "X-PAYMENT-RESPONSE", value: encodePaymentResponseHeader({ ...s, network: payment.clientNetwork as SettleResponse["network"] }) };
  return { ok: true, settle: s, transaction: s.transaction, header };
}
