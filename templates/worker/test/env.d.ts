// Test-only typing: ADMIN_KEY and MPP_SECRET_KEY are injected by vitest.config.mts (miniflare bindings).
declare namespace Cloudflare {
  interface Env {
    ADMIN_KEY?: string;
    MPP_SECRET_KEY?: string;
  }
}
