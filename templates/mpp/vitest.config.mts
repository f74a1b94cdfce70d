import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

// Tests run inside workerd (the Cloudflare Workers runtime) with the bindings from wrangler.jsonc.
// ADMIN_KEY and MPP_SECRET_KEY are injected here for tests only; production uses
// `npx wrangler secret put ...`. No Tempo/Stripe secrets are set: the payment tests use a
// deterministic method defined in test/mpp/helpers.ts.
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
  // Pre-bundle mppx and the MCP SDK once (much faster test start-up).
  test: {
    testTimeout: 30_000,
    deps: { optimizer: { ssr: { enabled: true, include: ["mppx", "mppx/server", "@modelcontextprotocol/sdk/server/index.js", "@modelcontextprotocol/sdk/server/webStandardStreamableHttp.js", "@modelcontextprotocol/sdk/types.js"], rolldownOptions: { external: [/^node:/, /^cloudflare:/] } } } },
  },
});
