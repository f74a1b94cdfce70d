// The mpp gateway's environment: the worker's bindings and ADMIN_KEY, plus the payment secrets.
// Secrets are set with `npx wrangler secret put NAME` (never in wrangler.jsonc).
import type { AppEnv } from "../lib/env";

export type MppEnv = AppEnv & {
  /** HMAC key of challenge ids, at least 32 bytes. Without it every paid route answers 503. */
  readonly MPP_SECRET_KEY?: string;
  /** Tempo: address receiving payments (required for tempo/charge and tempo/session). */
  readonly TEMPO_RECIPIENT?: string;
  /** Tempo: TIP-20 token address; default: mppx's default stablecoin for the chain. */
  readonly TEMPO_CURRENCY?: string;
  /** Tempo: "1" to use the testnet. */
  readonly TEMPO_TESTNET?: string;
  /** Tempo: RPC URL (with TEMPO_CHAIN_ID) instead of mppx's default. */
  readonly TEMPO_RPC_URL?: string;
  readonly TEMPO_CHAIN_ID?: string;
  /** Stripe: secret API key and the network (profile) id for Shared Payment Tokens. */
  readonly STRIPE_SECRET_KEY?: string;
  readonly STRIPE_NETWORK_ID?: string;
};
