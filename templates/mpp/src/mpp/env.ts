// The mpp gateway's environment: the worker's bindings and secrets (src/lib/env.ts: ADMIN_KEY,
// MPP_SECRET_KEY, TEMPO_*, STRIPE_*, X402_*), which include everything the MPP-paid routes need.
// Secrets are set with `npx wrangler secret put NAME` (never in wrangler.jsonc).
import type { AppEnv } from "../lib/env";

export type MppEnv = AppEnv;
