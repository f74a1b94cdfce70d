// Production MPP payment methods (mppx's own tempo/stripe implementations), built from the
// worker's secrets, and the amount conversions. Used by the signup route ([signup.mpp]) and, in
// the mpp target, by the MPP-paid routes ([mpp]). Tests never come through buildPayments: they pass
// their own PaymentSetup with a deterministic method, so no test method is reachable from the
// production configuration.
import { Receipt, type Method } from "mppx";
import { stripe, tempo } from "mppx/server";
import type { AppEnv } from "./env";
import { durableStore } from "./payment-store";

export type MppMethodKey = "tempo/charge" | "tempo/session" | "stripe/charge";

/** What a gateway needs to take payments: mppx server methods and how to price one call with each. */
export interface PaymentSetup {
  readonly methods: readonly Method.AnyServer[];
  /** The compose entries ([method key, request options]) for a price of `mcents`. */
  readonly offers: (mcents: number) => ReadonlyArray<readonly [string, Record<string, unknown>]>;
  /** HMAC key of challenge ids (≥ 32 bytes). */
  readonly secretKey: string;
}

export type PaymentSetupResult = { ok: true; setup: PaymentSetup } | { ok: false; problems: string[] };

/** mcents → a decimal amount in dollars ("0.01" for 1000 mcents); tokens with ≥ 5 decimals represent it exactly. */
export function mcentsToDollars(mcents: number): string {
  const whole = Math.floor(mcents / 100_000);
  const frac = String(mcents % 100_000).padStart(5, "0").replace(/0+$/, "");
  return frac ? `${whole}.${frac}` : `${whole}`;
}

/** Card payments are in whole cents: the price is rounded up. */
export function mcentsToCents(mcents: number): string {
  return mcentsToDollars(Math.ceil(mcents / 1000) * 1000);
}

export const MIN_SECRET_BYTES = 32;

export function secretKeyProblem(secret: string | undefined): string | null {
  if (!secret) return "MPP_SECRET_KEY is not set";
  if (new TextEncoder().encode(secret).byteLength < MIN_SECRET_BYTES) return `MPP_SECRET_KEY must be at least ${MIN_SECRET_BYTES} bytes`;
  return null;
}

/** The production methods for `methods`, or the list of missing settings (each naming what to set). */
export function buildPayments(env: AppEnv, methods: readonly MppMethodKey[]): PaymentSetupResult {
  const problems: string[] = [];
  const secretProblem = secretKeyProblem(env.MPP_SECRET_KEY);
  if (secretProblem) problems.push(secretProblem);
  const servers: Method.AnyServer[] = [];
  const tempoCommon = (): Record<string, unknown> => {
    const p: Record<string, unknown> = { recipient: env.TEMPO_RECIPIENT, store: durableStore(env.PAYMENTS) };
    if (env.TEMPO_CURRENCY) p.currency = env.TEMPO_CURRENCY;
    if (env.TEMPO_TESTNET === "1" || env.TEMPO_TESTNET === "true") p.testnet = true;
    if (env.TEMPO_RPC_URL && env.TEMPO_CHAIN_ID) p.rpcUrl = { [Number(env.TEMPO_CHAIN_ID)]: env.TEMPO_RPC_URL };
    return p;
  };
  for (const m of methods) {
    if (m === "tempo/charge" || m === "tempo/session") {
      if (!env.TEMPO_RECIPIENT) {
        problems.push(`${m}: TEMPO_RECIPIENT is not set`);
        continue;
      }
      // mppx's own Tempo implementations; their parameter types are generic over literal
      // configurations, so the runtime-built configuration is passed untyped.
      servers.push(m === "tempo/charge" ? tempo.charge(tempoCommon() as never) : tempo.session(tempoCommon() as never));
    } else if (m === "stripe/charge") {
      if (!env.STRIPE_SECRET_KEY || !env.STRIPE_NETWORK_ID) {
        problems.push("stripe/charge: STRIPE_SECRET_KEY and STRIPE_NETWORK_ID must be set");
        continue;
      }
      servers.push(
        stripe.charge({
          secretKey: env.STRIPE_SECRET_KEY,
          networkId: env.STRIPE_NETWORK_ID,
          currency: "usd",
          decimals: 2,
          paymentMethodTypes: ["card"],
        } as never) as Method.AnyServer,
      );
    } else {
      problems.push(`unknown payment method ${JSON.stringify(m)}`);
    }
  }
  if (problems.length > 0) return { ok: false, problems };
  return {
    ok: true,
    setup: {
      methods: servers,
      secretKey: env.MPP_SECRET_KEY!,
      offers: (mcents) =>
        methods.map((m) => [m, { amount: m === "stripe/charge" ? mcentsToCents(mcents) : mcentsToDollars(mcents) }] as const),
    },
  };
}

/**
 * What an mppx 200 means. Either a paid call (with its receipt: no valid receipt means NOT paid),
 * or a payment-management exchange (e.g. a Tempo session's channel open / top-up / close) for
 * which mppx supplies its own answer: then nothing paid may run.
 */
export type PaidResult<R> =
  | { kind: "paid"; receipt: Receipt.Receipt }
  | { kind: "management"; response: R }
  | { kind: "unpaid" };

export function classifyHttp(withReceipt: (r?: unknown) => unknown): PaidResult<Response> {
  const marker = crypto.randomUUID();
  try {
    const probe = withReceipt(new Response(null, { status: 299, headers: { "X-Mcpay-Probe": marker } })) as Response;
    if (probe.headers.get("X-Mcpay-Probe") !== marker) {
      // Not our response: mppx answered a management request itself.
      return { kind: "management", response: probe };
    }
    const header = probe.headers.get("Payment-Receipt");
    if (!header) return { kind: "unpaid" };
    const receipt = Receipt.deserialize(header);
    return receipt.status === "success" ? { kind: "paid", receipt } : { kind: "unpaid" };
  } catch {
    return { kind: "unpaid" };
  }
}
