import { cloudflareTest } from "@cloudflare/vitest-pool-workers";
import { defineConfig } from "vitest/config";

// Tests run inside workerd (the Cloudflare Workers runtime) with the bindings from wrangler.jsonc.
// ADMIN_KEY is injected here for tests only; production uses `npx wrangler secret put ADMIN_KEY`.
export default defineConfig({
  plugins: [
    cloudflareTest({
      wrangler: { configPath: "./wrangler.jsonc" },
      miniflare: {
        bindings: { ADMIN_KEY: "test-admin-key-0123456789abcdef0123456789abcdef" },
      },
    }),
  ],
  test: {
    testTimeout: 30_000,
  },
});
