// The mpp gateway serves /mcp/<upstream> through the worker gateway's own route (src/lib/proxy.ts,
// tested in depth by test/proxy.test.ts): a paid tools/call on a real upstream MCP server
// (test/upstream-server.mjs; Streamable HTTP, and legacy HTTP+SSE bridged by the gateway) is held
// and captured on a prepaid key, in the same ledger.
import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { HANDLERS } from "../../src/generated/handlers";
import type { UpstreamConfig } from "../../src/generated/manifest";
import { createMppApp } from "../../src/mpp/app";
import type { MppEnv } from "../../src/mpp/env";
import { SCOPE, getLedger, getMe, seedKey } from "../helpers";
import { BASE, mppEnv, testPayments } from "./helpers";

const TESTUP: UpstreamConfig = {
  name: "testup",
  transport: "http",
  url: "",
  urlEnv: "UPSTREAM_TESTUP_URL",
  priceMcents: 100,
  tools: [["forecast", 250]],
  scope: SCOPE,
  timeoutMs: 3000,
  rateLimitPerMinute: 60,
  headers: [["X-Upstream-Token", "UPSTREAM_TESTUP_TOKEN"]],
  enabled: true,
  refundToolErrors: false,
  description: "",
};

describe("mpp: /mcp/<upstream>", () => {
  // [transport, the test server's path for it]
  for (const [transport, path] of [["http", "json/mcp"], ["sse", "ok/sse"]] as const) {
    it(`${transport}: a priced tools/call with a prepaid key: forwarded, charged, one hold and one capture`, async () => {
      const app = createMppApp({ handlers: HANDLERS, payments: () => testPayments(), upstreams: [{ ...TESTUP, transport }] });
      const base = new URL((mppEnv as unknown as Record<string, string>).UPSTREAM_TESTUP_URL!);
      const tag = crypto.randomUUID();
      const env = { ...mppEnv, UPSTREAM_TESTUP_URL: `${base.protocol}//${base.host}/t/${tag}/${path}` } as MppEnv;
      const { key } = await seedKey({ balance: 1000 });
      const ctx = createExecutionContext();
      const res = await app.fetch(
        new Request(`${BASE}/mcp/testup`, {
          method: "POST",
          headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json", Accept: "application/json, text/event-stream" },
          body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "tools/call", params: { name: "forecast", arguments: { city: "Oslo" } } }),
        }),
        env,
        ctx,
      );
      const body = (await res.json()) as { result: { structuredContent: unknown; _meta: Record<string, unknown> } };
      await waitOnExecutionContext(ctx);
      expect(res.status).toBe(200);
      expect(body.result.structuredContent).toEqual({ city: "Oslo", sky: "sunny" });
      expect(body.result._meta["io.mcpay/charged_mcents"]).toBe(250);
      expect((await getMe(key)).balance_mcents).toBe(750);
      expect((await getLedger(key)).map((e) => [e.kind, e.endpoint])).toEqual([["capture", "testup/forecast"], ["hold", "testup/forecast"], ["mint", null]]);
      // What the upstream saw: one call; over HTTP+SSE, in a session opened by the gateway's handshake.
      const seen = (await (await fetch(`${base.protocol}//${base.host}/stats/${tag}`)).json()) as { calls: unknown; sessions: unknown };
      expect(seen.calls).toEqual({ forecast: 1 });
      expect(seen.sessions).toEqual(transport === "sse" ? [["initialize", "notifications/initialized", "tools/call"]] : []);
    });
  }
});
