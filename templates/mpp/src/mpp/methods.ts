// Production payment methods of the MPP-paid routes, built from mcpay.toml ([mpp].methods) and the
// worker's secrets by the shared builder (src/lib/mpp-methods.ts, also used by POST /v1/signup).
// Tests never come through here: they build their own PaymentSetup with a deterministic method
// (see test/mpp/helpers.ts), so no test method is reachable from the production configuration.
import { MPP, type MppMethodKey } from "../generated/mpp";
import { buildPayments, type PaymentSetupResult } from "../lib/mpp-methods";
import type { MppEnv } from "./env";

export {
  MIN_SECRET_BYTES,
  mcentsToCents,
  mcentsToDollars,
  secretKeyProblem,
  type PaymentSetup,
  type PaymentSetupResult,
} from "../lib/mpp-methods";

export function productionPayments(env: MppEnv, methods: readonly MppMethodKey[] = MPP.methods): PaymentSetupResult {
  return buildPayments(env, methods);
}
