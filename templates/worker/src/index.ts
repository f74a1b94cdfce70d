// Worker entry point: the gateway with the handlers generated from mcpay.toml, plus the
// Durable Object classes bound in wrangler.jsonc.
import { createApp } from "./app";
import { HANDLERS } from "./generated/handlers";

export { KeyDO } from "./lib/key-do";
export { LeaderboardDO } from "./lib/leaderboard-do";
export { AdminDO } from "./lib/admin-do";

export default createApp(HANDLERS) satisfies ExportedHandler<Env>;
