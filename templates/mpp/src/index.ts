// Worker entry point: the MPP compute gateway (src/mpp/app.ts) on top of the worker gateway,
// paid with the production methods of mcpay.toml ([mpp].methods) built from the environment.
// Tests build their own app with a deterministic payment method; it is not reachable from here.
import { HANDLERS } from "./generated/handlers";
import { createMppApp } from "./mpp/app";
import { productionPayments } from "./mpp/methods";

export { KeyDO } from "./lib/key-do";
export { LeaderboardDO } from "./lib/leaderboard-do";
export { AdminDO } from "./lib/admin-do";
export { PaymentDO } from "./mpp/payment-do";

export default createMppApp({ handlers: HANDLERS, payments: (env) => productionPayments(env) }) satisfies ExportedHandler<Env>;
