// The mpp gateway serves /mcp/<upstream> through the worker gateway's own route (src/lib/proxy.ts,
// tested in depth by test/proxy.test.ts): a paid tools/call on a real upstream MCP server
// (test/upstream-server.mjs) is held and captured on a prepaid key, in the same ledger.
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
  it("a priced tools/call with a prepaid key: forwarded, charged, one hold and one capture", async () => {
    const app = createMppApp({ handlers: HANDLERS, payments: () => testPayments(), upstreams: [TESTUP] });
    const base = new URL((mppEnv as unknown as Record<string, string>).UPSTREAM_TESTUP_URL!);
    const env = { ...mppEnv, UPSTREAM_TESTUP_URL: `${base.protocol}//${base.host}/t/${crypto.randomUUID()}/json/mcp` } as MppEnv;
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
  });
});
