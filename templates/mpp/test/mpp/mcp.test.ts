// MCP (streamable HTTP, official SDK) with MPP over MCP: -32042 challenges, credential in
// params._meta, receipt in result._meta, -32043 on failed verification, replay refused, free
// tools, capabilities.experimental.payment, and prepaid keys.
import { Challenge, Credential } from "mppx";
import { describe, expect, it } from "vitest";
import { CALL_TYPES, PRICE_MCENTS, SAMPLE_INPUT } from "../../src/generated/manifest";
import { getMe, seedKey } from "../helpers";
import { SECRET, call, mcpRequest, rpc, testApp } from "./helpers";

const app = testApp();
const ARGS = { code: "return input.x + 1;", input: { x: 41 } };
const CRED = "org.paymentauth/credential";
const RECEIPT = "org.paymentauth/receipt";

async function challengeFor(tool: string, args: unknown): Promise<Challenge.Challenge> {
  const r = await rpc(app, "tools/call", { name: tool, arguments: args });
  expect(r.error?.code).toBe(-32042);
  expect(r.error?.message).toBe("Payment Required");
  expect(r.error?.data.httpStatus).toBe(402);
  const c = r.error!.data.challenges.find((x: { method: string }) => x.method === "test");
  return Challenge.from({ id: c.id, realm: c.realm, method: c.method, intent: c.intent, request: c.request, expires: c.expires, opaque: c.opaque } as never);
}

function credentialFor(challenge: Challenge.Challenge, token = "paid") {
  return Credential.from({ challenge, payload: { token } });
}

describe("MCP", () => {
  it("initialize advertises tools and capabilities.experimental.payment", async () => {
    const r = await rpc(app, "initialize", { protocolVersion: "2025-06-18", capabilities: {}, clientInfo: { name: "t", version: "1" } });
    expect(r.result.capabilities.tools).toBeDefined();
    expect(r.result.capabilities.experimental.payment.methods).toBeDefined();
  });

  it("lists the paid tools (execute_code and the manifest's endpoints) and the free ones", async () => {
    const r = await rpc(app, "tools/list", {});
    const names = r.result.tools.map((t: { name: string }) => t.name);
    for (const t of CALL_TYPES) expect(names).toContain(t);
    expect(names).toEqual(expect.arrayContaining(["pricing", "limits"]));
  });

  it("free tools answer without payment", async () => {
    const r = await rpc(app, "tools/call", { name: "pricing", arguments: {} });
    expect(r.result.structuredContent.tools.find((t: { name: string }) => t.name === "execute_code").price_mcents).toBe(PRICE_MCENTS.execute_code);
    const l = await rpc(app, "tools/call", { name: "limits", arguments: {} });
    expect(l.result.structuredContent).toHaveProperty("cpu_ms");
  });

  it("invalid arguments are refused before any challenge", async () => {
    const r = await rpc(app, "tools/call", { name: "execute_code", arguments: { code: 1 } });
    expect(r.error?.code).toBe(-32602);
  });

  it("execute_code: -32042 with challenges → pay in _meta → result with receipt in _meta", async () => {
    const challenge = await challengeFor("execute_code", ARGS);
    expect(Challenge.verify(challenge, { secretKey: SECRET })).toBe(true);
    expect(challenge.request).toMatchObject({ amount: String(PRICE_MCENTS.execute_code) });
    const r = await rpc(app, "tools/call", { name: "execute_code", arguments: ARGS, _meta: { [CRED]: credentialFor(challenge) } });
    expect(r.error, JSON.stringify(r.error)).toBeUndefined();
    expect(r.result.structuredContent).toMatchObject({ ok: true, status: "ok", result: 42 });
    expect(r.result._meta[RECEIPT]).toMatchObject({ status: "success", method: "test", challengeId: challenge.id });

    // The same credential again: refused, nothing runs.
    const again = await rpc(app, "tools/call", { name: "execute_code", arguments: ARGS, _meta: { [CRED]: credentialFor(challenge) } });
    expect(again.error?.code).toBe(-32043);
    expect(again.error?.data.challenges.length).toBeGreaterThan(0);
    expect(again.result).toBeUndefined();
  });

  it("concurrent submissions of one credential run once", async () => {
    const challenge = await challengeFor("execute_code", ARGS);
    const rs = await Promise.all(
      Array.from({ length: 3 }, () => rpc(app, "tools/call", { name: "execute_code", arguments: ARGS, _meta: { [CRED]: credentialFor(challenge) } })),
    );
    expect(rs.filter((r) => r.result?._meta?.[RECEIPT])).toHaveLength(1);
    expect(rs.filter((r) => r.error?.code === -32043)).toHaveLength(2);
  });

  it("failed verification → -32043 with a fresh challenge", async () => {
    const challenge = await challengeFor("execute_code", ARGS);
    const r = await rpc(app, "tools/call", { name: "execute_code", arguments: ARGS, _meta: { [CRED]: credentialFor(challenge, "bad") } });
    expect(r.error?.code).toBe(-32043);
    expect(r.error?.data.challenges.length).toBeGreaterThan(0);
    expect(r.error?.data.problem.type).toBe("https://paymentauth.org/problems/verification-failed");
  });

  it("a challenge is bound to its tool name", async () => {
    const other = CALL_TYPES.find((t) => t !== "execute_code")!;
    const challenge = await challengeFor("execute_code", ARGS);
    const r = await rpc(app, "tools/call", { name: other, arguments: SAMPLE_INPUT[other], _meta: { [CRED]: credentialFor(challenge) } });
    expect(r.error?.code).toBe(-32043);
  });

  it("the manifest's endpoints are paid MCP tools at their price", async () => {
    for (const ep of CALL_TYPES.filter((t) => t !== "execute_code")) {
      const challenge = await challengeFor(ep, SAMPLE_INPUT[ep]);
      expect(challenge.request).toMatchObject({ amount: String(PRICE_MCENTS[ep]) });
      const r = await rpc(app, "tools/call", { name: ep, arguments: SAMPLE_INPUT[ep], _meta: { [CRED]: credentialFor(challenge) } });
      expect(r.result?._meta?.[RECEIPT]?.status, JSON.stringify(r)).toBe("success");
    }
  });

  it("a prepaid key (Bearer) is charged like POST /v1/execute_code", async () => {
    const price = PRICE_MCENTS.execute_code;
    const { key } = await seedKey({ balance: price * 2, scopes: ["execute_code"] });
    const r = await rpc(app, "tools/call", { name: "execute_code", arguments: ARGS }, { Authorization: `Bearer ${key}` });
    expect(r.result.structuredContent).toMatchObject({ ok: true, result: 42, charged_mcents: price, balance_mcents: price });
    expect((await getMe(key)).balance_mcents).toBe(price);
  });

  it("a prepaid key without the scope is refused and not charged", async () => {
    const other = CALL_TYPES.find((t) => t !== "execute_code")!;
    const { key } = await seedKey({ balance: 10_000, scopes: [other as never] });
    const r = await rpc(app, "tools/call", { name: "execute_code", arguments: ARGS }, { Authorization: `Bearer ${key}` });
    expect(r.error?.data?.code).toBe("scope_denied");
    expect((await getMe(key)).balance_mcents).toBe(10_000);
  });

  it("a batch of prepaid calls is settled call by call: a failing call refunds only itself", async () => {
    const quick = testApp({ timeoutMs: 300, cpuMs: 50 });
    const price = PRICE_MCENTS.execute_code;
    const { key } = await seedKey({ balance: price * 2, scopes: ["execute_code"] });
    const slow = { code: "await new Promise((resolve) => setTimeout(resolve, 3_600_000));" };
    const res = await call(
      quick,
      mcpRequest(
        [
          { jsonrpc: "2.0", id: "ok", method: "tools/call", params: { name: "execute_code", arguments: ARGS } },
          { jsonrpc: "2.0", id: "slow", method: "tools/call", params: { name: "execute_code", arguments: slow } },
        ],
        { Authorization: `Bearer ${key}` },
      ),
    );
    expect(res.status).toBe(200);
    const replies = (await res.json()) as { id: string; result?: any }[];
    const ok = replies.find((r) => r.id === "ok")!;
    const failed = replies.find((r) => r.id === "slow")!;
    expect(ok.result.structuredContent).toMatchObject({ ok: true, result: 42, charged_mcents: price });
    expect(failed.result.isError).toBe(true);
    expect(failed.result.structuredContent).toMatchObject({ ok: false, refunded: true });
    // One call served and charged, the failed one refunded: exactly one price spent.
    expect((await getMe(key)).balance_mcents).toBe(price);
  });
});
