// Test-only payment plumbing for POST /v1/signup. Nothing here is reachable from src/: the
// production app (src/index.ts) uses mcpay.toml's [signup], @x402/core's HTTP facilitator client
// and mppx's tempo/stripe methods; these tests build their own app with createApp's options:
//   - TEST_SIGNUP: [signup] settings with both rails on (whatever this project's mcpay.toml says);
//   - TestFacilitator: a deterministic x402 facilitator (the FacilitatorClient interface of
//     @x402/core) that models the chain as a set of used EIP-3009 nonces;
//   - "test/charge" (and "other/charge"): deterministic MPP methods, defined as mppx's own tests
//     define theirs (Method.from + Method.toServer), paid by the mppx client.
import { env } from "cloudflare:workers";
import { createExecutionContext, runInDurableObject, waitOnExecutionContext } from "cloudflare:test";
import { encodePaymentSignatureHeader, type FacilitatorClient } from "@x402/core/http";
import { VerifyError, type PaymentPayload, type PaymentRequirements, type SettleResponse, type SupportedResponse, type VerifyResponse } from "@x402/core/types";
import { deepEqual } from "@x402/core/utils";
import { Credential, Errors, Method, z } from "mppx";
import { Mppx as MppxClient } from "mppx/client";
import { createApp, type App } from "../src/app";
import { GATEWAY } from "../src/generated/manifest";
import { HANDLERS } from "../src/generated/handlers";
import type { AppEnv } from "../src/lib/env";
import type { PaymentSetupResult } from "../src/lib/mpp-methods";
import type { SignupConfig } from "../src/lib/signup-config";
import type { FacilitatorFactory } from "../src/lib/signup-x402";
import { BASE, SCOPE, dumpSql } from "./helpers";

/**
 * The test environment without any payment setting a developer's .dev.vars may hold (tests that
 * need one set it explicitly); MPP_SECRET_KEY is the test value from vitest.config.mts.
 */
export const signupEnv: AppEnv = {
  ...(env as AppEnv),
  X402_PAY_TO: undefined,
  X402_FACILITATOR_URL: undefined,
  X402_FACILITATOR_AUTHORIZATION: undefined,
  TEMPO_RECIPIENT: undefined,
  TEMPO_CURRENCY: undefined,
  TEMPO_TESTNET: undefined,
  TEMPO_RPC_URL: undefined,
  TEMPO_CHAIN_ID: undefined,
  STRIPE_SECRET_KEY: undefined,
  STRIPE_NETWORK_ID: undefined,
};
export const SECRET = signupEnv.MPP_SECRET_KEY!;
export const REALM = new URL(BASE).hostname;
export const SIGNUP_URL = `${BASE}/v1/signup`;

const PRICE = 50_000;
const DECIMALS = 6;
export const PAY_TO = "0x1111111111111111111111111111111111111111";

/** [signup] with both rails on, independent of this project's mcpay.toml. */
export const TEST_SIGNUP: SignupConfig = {
  enabled: true,
  priceMcents: PRICE,
  balanceMcents: 12_345,
  scopes: [SCOPE],
  signupsPerHour: 1000,
  rails: ["x402", "mpp"],
  x402: {
    network: "eip155:84532",
    asset: "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    assetName: "USDC",
    assetVersion: "2",
    assetDecimals: DECIMALS,
    amount: (BigInt(PRICE) * 10n ** BigInt(DECIMALS - 5)).toString(),
    payTo: PAY_TO,
    facilitatorUrl: "https://facilitator.invalid",
    maxTimeoutSeconds: 120,
  },
  mpp: { methods: ["test/charge"], realm: "", challengeTtlSeconds: 300 },
};

export const REQUIREMENT: PaymentRequirements = {
  scheme: "exact",
  network: "eip155:84532",
  amount: TEST_SIGNUP.x402!.amount,
  asset: TEST_SIGNUP.x402!.asset,
  payTo: PAY_TO,
  maxTimeoutSeconds: 120,
  extra: { name: "USDC", version: "2" },
};

// ------------------------------------------------------------------ x402

export const GOOD_SIGNATURE = "0x" + "5a".repeat(65);

type Mode = "ok" | "invalid" | "settle_false" | "down" | "verify_4xx" | "settle_down";

/**
 * A deterministic facilitator. verify: `accepted` must be the requirement, the authorization must
 * pay `amount` to `payTo`, carry GOOD_SIGNATURE and an unused nonce; settle: marks the nonce used
 * (a second settle of one nonce fails, as on chain). `gate` holds verify until released.
 */
export class TestFacilitator implements FacilitatorClient {
  verifyCalls = 0;
  settleCalls = 0;
  readonly used = new Set<string>();
  readonly seen: Array<{ payload: PaymentPayload; requirements: PaymentRequirements }> = [];
  gate: Promise<void> | null = null;

  constructor(public mode: Mode = "ok") {}

  async verify(payload: PaymentPayload, requirements: PaymentRequirements): Promise<VerifyResponse> {
    this.verifyCalls++;
    this.seen.push({ payload, requirements });
    if (this.gate) await this.gate;
    if (this.mode === "down") throw new TypeError("fetch failed: connection refused");
    // What @x402/core's HTTP client throws for a 4xx answer carrying {isValid: false}.
    if (this.mode === "verify_4xx") throw new VerifyError(400, { isValid: false, invalidReason: "invalid_exact_evm_payload_signature" });
    const auth = payload.payload.authorization as Record<string, string>;
    const refuse = (invalidReason: string): VerifyResponse => ({ isValid: false, invalidReason, payer: auth?.from });
    if (this.mode === "invalid") return refuse("invalid_exact_evm_payload_signature");
    if (!deepEqual(payload.accepted, requirements)) return refuse("accepted_mismatch");
    if (payload.payload.signature !== GOOD_SIGNATURE) return refuse("invalid_exact_evm_payload_signature");
    if (auth.to !== requirements.payTo || auth.value !== requirements.amount) return refuse("invalid_exact_evm_payload_recipient_or_value");
    if (this.used.has(auth.nonce!.toLowerCase())) return refuse("invalid_exact_evm_payload_authorization_used");
    return { isValid: true, payer: auth.from };
  }

  async settle(payload: PaymentPayload, requirements: PaymentRequirements): Promise<SettleResponse> {
    this.settleCalls++;
    const auth = payload.payload.authorization as Record<string, string>;
    if (this.mode === "settle_down") throw new TypeError("fetch failed: connection reset");
    const nonce = auth.nonce!.toLowerCase();
    if (this.mode === "settle_false" || this.used.has(nonce)) {
      return { success: false, errorReason: "insufficient_funds", transaction: "", network: requirements.network, payer: auth.from };
    }
    this.used.add(nonce);
    return { success: true, transaction: txHashFor(nonce), network: requirements.network, payer: auth.from };
  }

  async getSupported(): Promise<SupportedResponse> {
    return { kinds: [{ x402Version: 2, scheme: "exact", network: REQUIREMENT.network }], extensions: [], signers: {} };
  }
}

export function txHashFor(nonce: string): string {
  return "0x" + nonce.slice(2).split("").reverse().join("");
}

let nonceSeq = 0;
export function freshNonce(): string {
  nonceSeq++;
  return "0x" + crypto.getRandomValues(new Uint8Array(28)).reduce((s, b) => s + b.toString(16).padStart(2, "0"), "") + nonceSeq.toString(16).padStart(8, "0");
}

export const PAYER = "0x2222222222222222222222222222222222222222";

export interface PaymentOpts {
  nonce?: string;
  from?: string;
  accepted?: unknown;
  signature?: string;
}

/** The `payload` of an `exact` EVM payment (an EIP-3009 authorization; the test facilitator checks it). */
export function authorizationPayload(o: PaymentOpts = {}): Record<string, unknown> {
  return {
    signature: o.signature ?? GOOD_SIGNATURE,
    authorization: {
      from: o.from ?? PAYER,
      to: PAY_TO,
      value: REQUIREMENT.amount,
      validAfter: "0",
      validBefore: String(Math.floor(Date.now() / 1000) + 600),
      nonce: o.nonce ?? freshNonce(),
    },
  };
}

/** PAYMENT-SIGNATURE for a v2 payment echoing `accepted` (default: the offered requirement). */
export function paymentSignature(o: PaymentOpts = {}): string {
  const p = {
    x402Version: 2,
    resource: { url: SIGNUP_URL },
    accepted: o.accepted ?? REQUIREMENT,
    payload: authorizationPayload(o),
  } as PaymentPayload;
  return encodePaymentSignatureHeader(p);
}

/** X-PAYMENT for a v1 payment. */
export function xPayment(o: PaymentOpts & { scheme?: string; network?: string } = {}): string {
  return btoa(JSON.stringify({ x402Version: 1, scheme: o.scheme ?? "exact", network: o.network ?? "base-sepolia", payload: authorizationPayload(o) }));
}

/** The contract's reference of an x402 payment. */
export function x402Reference(nonce: string, from = PAYER): string {
  return `x402:${REQUIREMENT.network}:${REQUIREMENT.asset}:${from}:${nonce}`.toLowerCase();
}

// ------------------------------------------------------------------ MPP

export const testCharge = Method.from({
  name: "test",
  intent: "charge",
  schema: {
    credential: { payload: z.object({ token: z.string(), ref: z.optional(z.string()) }) },
    request: z.object({ amount: z.string(), currency: z.string(), recipient: z.string() }),
  },
});

/** Verifications that succeeded, by challenge id (to prove what ran and what did not). */
export const mppVerified: string[] = [];

export const testChargeServer = Method.toServer(testCharge, {
  defaults: { currency: "usd-test", recipient: "acct-test" },
  async verify({ credential }) {
    if (credential.payload.token !== "paid") throw new Errors.VerificationFailedError({ reason: "test token refused" });
    mppVerified.push(credential.challenge.id);
    const reference = credential.payload.ref ?? `test-${credential.challenge.id}`;
    return { method: "test", reference, status: "success", timestamp: new Date().toISOString() } as const;
  },
});

export const otherCharge = Method.from({
  name: "other",
  intent: "charge",
  schema: { credential: { payload: z.object({ token: z.string() }) }, request: z.object({ amount: z.string() }) },
});

export const otherChargeServer = Method.toServer(otherCharge, {
  async verify({ credential }) {
    if (credential.payload.token !== "paid") throw new Errors.VerificationFailedError({ reason: "test token refused" });
    return { method: "other", reference: `other-${credential.challenge.id}`, status: "success", timestamp: new Date().toISOString() } as const;
  },
});

export function testPayments(withOther = false): PaymentSetupResult {
  const methods = withOther ? [testChargeServer, otherChargeServer] : [testChargeServer];
  return {
    ok: true,
    setup: {
      methods,
      secretKey: SECRET,
      offers: (mcents) => methods.map((m) => [`${m.name}/${m.intent}`, { amount: String(mcents) }] as const),
    },
  };
}

// ------------------------------------------------------------------ apps and requests

export interface TestAppOptions {
  config?: SignupConfig;
  facilitator?: TestFacilitator | null;
  withOther?: boolean;
  /** Use the production MPP methods (built from the environment) instead of the test method. */
  productionMpp?: boolean;
}

export function signupApp(o: TestAppOptions = {}): { app: App; facilitator: TestFacilitator } {
  const facilitator = o.facilitator ?? new TestFacilitator();
  const factory: FacilitatorFactory = () => facilitator;
  const app = createApp(HANDLERS, {
    signup: {
      config: o.config ?? TEST_SIGNUP,
      ...(o.facilitator === null ? {} : { facilitator: factory }),
      ...(o.productionMpp ? {} : { payments: () => testPayments(o.withOther ?? false) }),
    },
  });
  return { app, facilitator };
}

export async function call(app: App, req: Request, e: AppEnv = signupEnv): Promise<Response> {
  const ctx = createExecutionContext();
  const res = await app.fetch(req, e, ctx);
  await waitOnExecutionContext(ctx);
  return res;
}

export function signupRequest(headers: Record<string, string | undefined> = {}, body?: unknown): Request {
  const h: Record<string, string> = {};
  for (const [k, v] of Object.entries(headers)) if (v !== undefined) h[k] = v;
  const init: RequestInit = { method: "POST", headers: h };
  if (body !== undefined) {
    init.body = typeof body === "string" ? body : JSON.stringify(body);
    if (!Object.keys(headers).some((h) => h.toLowerCase() === "content-type")) (init.headers as Record<string, string>)["Content-Type"] = "application/json";
  }
  return new Request(SIGNUP_URL, init);
}

export function idempotencyKey(): string {
  return "idem_" + crypto.randomUUID().replaceAll("-", "");
}

/** The mppx client paying with the test method: a credential for every "test" challenge it is shown. */
export function mppClient(app: App, token = "paid", ref?: string) {
  const client = Method.toClient(testCharge, {
    async createCredential({ challenge }) {
      return Credential.serialize(Credential.from({ challenge, payload: ref ? { token, ref } : { token } }));
    },
  });
  return MppxClient.create({
    methods: [client],
    polyfill: false,
    fetch: (input: RequestInfo | URL, init?: RequestInit) => call(app, new Request(input, init)),
  });
}

/** 402 → a Payment credential from the mppx client (not sent). */
export async function mppCredential(app: App, token = "paid", ref?: string): Promise<string> {
  const res = await call(app, signupRequest());
  if (res.status !== 402) throw new Error(`expected 402, got ${res.status}`);
  return mppClient(app, token, ref).createCredential(res);
}

/** Derived key, computed independently of src/ from the contract's formula. */
export async function expectedDerivedKey(idem: string, reference: string): Promise<string> {
  const enc = new TextEncoder();
  const k = await crypto.subtle.importKey("raw", enc.encode(idem), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", k, enc.encode("mcpay-signup-v1:" + reference)));
  return GATEWAY.keyPrefix + Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function paymentObjectFor(name: string) {
  return signupEnv.PAYMENTS.get(signupEnv.PAYMENTS.idFromName(name));
}

export async function dumpPaymentObject(name: string): Promise<string> {
  return runInDurableObject(paymentObjectFor(name), (_i, state) => dumpSql(state.storage.sql));
}

/** Rows in the admin object's budget tables (signups, mints). */
export async function budgetCounts(): Promise<{ signups: number; mints: number }> {
  const admin = signupEnv.ADMIN.get(signupEnv.ADMIN.idFromName("global"));
  return runInDurableObject(admin, (_i, state) => ({
    signups: state.storage.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM signups").one().n,
    mints: state.storage.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM mints").one().n,
  }));
}

export interface SignupBody {
  ok: true;
  key: string;
  key_id: string;
  balance_mcents: number;
  scopes: string[];
  name: string | null;
  payment: { rail: string; reference: string };
  request_id: string;
  replayed?: boolean;
}
