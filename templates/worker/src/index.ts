// Worker entry point: the gateway with the handlers generated from mcpay.toml and the production
// signup rails (mcpay.toml [signup] and the environment), plus the Durable Object classes bound in
// wrangler.jsonc.
import { createApp } from "./app";
import { HANDLERS } from "./generated/handlers";

export { KeyDO } from "./lib/key-do";
export { LeaderboardDO } from "./lib/leaderboard-do";
export { AdminDO } from "./lib/admin-do";
export { PaymentDO } from "./lib/payment-do";

export default createApp(HANDLERS) satisfies ExportedHandler<Env>;
