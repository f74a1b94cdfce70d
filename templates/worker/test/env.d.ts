// Test-only typing: ADMIN_KEY is injected by vitest.config.mts (miniflare bindings).
declare namespace Cloudflare {
  interface Env {
    ADMIN_KEY?: string;
  }
}
