import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

// Tests run inside workerd (the Cloudflare Workers runtime) with the bindings from wrangler.jsonc.
// ADMIN_KEY and MPP_SECRET_KEY are injected here for tests only; production uses
// `npx wrangler secret put ...`. No x402 facilitator, Tempo or Stripe secret is set: the payment
// tests use a deterministic method defined in test/mpp/helpers.ts (and, for POST /v1/signup, the
// facilitator and method of test/signup-helpers.ts).
export default defineConfig({
  plugins: [
    cloudflareTest({
      wrangler: { configPath: "./wrangler.jsonc" },
      miniflare: {
        bindings: {
          ADMIN_KEY: "test-admin-key-0123456789abcdef0123456789abcdef",
          MPP_SECRET_KEY: "test-mpp-secret-0123456789abcdef0123456789abcdef",
        },
      },
    }),
  ],
  // Pre-bundle mppx, @x402/core and the MCP SDK once (much faster test start-up).
  test: {
    testTimeout: 30_000,
    deps: { optimizer: { ssr: { enabled: true, include: ["mppx", "mppx/server", "mppx/client", "@x402/core/http", "@x402/core/types", "@x402/core/schemas", "@x402/core/utils", "@modelcontextprotocol/sdk/server/index.js", "@modelcontextprotocol/sdk/server/webStandardStreamableHttp.js", "@modelcontextprotocol/sdk/types.js"], rolldownOptions: { external: [/^node:/, /^cloudflare:/] } } } },
  },
});
