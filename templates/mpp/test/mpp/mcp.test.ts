// MCP (streamable HTTP, official SDK) with MPP over MCP: -32042 challenges, credential in
// params._meta, receipt in result._meta, -32043 on failed verification, replay refused, a second
// payment for a claimed challenge never taken (counted), free tools,
// capabilities.experimental.payment, and prepaid keys (charge ids made by the gateway per call;
// batches with duplicate JSON-RPC ids refused before any charge; counted in the key's ledger).
import { Challenge, Credential } from "mppx";
import { describe, expect, it } from "vitest";
import { CALL_TYPES, PRICE_MCENTS, SAMPLE_INPUT } from "../../src/generated/manifest";
import { getLedger, getMe, seedKey } from "../helpers";
import { LOADER_FAILS, SECRET, call, countingEnv, flakyAttempts, mcpRequest, rpc, testApp, verified } from "./helpers";

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

function credentialFor(challenge: Challenge.Challenge, token = "paid", ref?: string) {
  return Credential.from({ challenge, payload: ref === undefined ? { token } : { token, ref } });
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
    expect(names).toEqual(expect.arrayContaining(["pricing", "balance", "limits"]));
    const exec = r.result.tools.find((t: { name: string }) => t.name === "execute_code");
    expect(exec._meta).toMatchObject({ "io.mcpay/price_mcents": PRICE_MCENTS.execute_code, "io.mcpay/scope": "execute_code", "org.paymentauth/price": { amount_mcents: PRICE_MCENTS.execute_code } });
    expect(exec.inputSchema).toMatchObject({ required: ["code"], additionalProperties: false });
  });

  it("free tools answer without payment (pricing = GET /v1/pricing's body)", async () => {
    const r = await rpc(app, "tools/call", { name: "pricing", arguments: {} });
    expect(r.result.structuredContent.endpoints.find((t: { name: string }) => t.name === "execute_code").price_mcents).toBe(PRICE_MCENTS.execute_code);
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
    expect(r.result.structuredContent).toMatchObject({ status: "ok", result: 42 });
    expect(r.result._meta).toMatchObject({ "io.mcpay/charged_mcents": price, "io.mcpay/balance_mcents": price });
    const callId = r.result._meta["io.mcpay/request_id"];
    expect(callId).toMatch(/^[0-9a-f-]{36}\/mcp\/[0-9a-f-]{36}$/);
    const rows = (await getLedger(key)).filter((e) => e.request_id === callId);
    expect(rows.map((e) => e.kind).sort()).toEqual(["capture", "hold"]);
    expect((await getMe(key)).balance_mcents).toBe(price);
  });

  it("prepaid key + _meta io.mcpay/idempotency_key: a retry gets the stored result, held once; other arguments → idempotency_mismatch; a bad key → invalid_input", async () => {
    const price = PRICE_MCENTS.execute_code;
    const { key } = await seedKey({ balance: price * 3, scopes: ["execute_code"] });
    const auth = { Authorization: `Bearer ${key}` };
    const meta = { "io.mcpay/idempotency_key": "mcp-idem-" + crypto.randomUUID().replaceAll("-", "") };
    const first = await rpc(app, "tools/call", { name: "execute_code", arguments: ARGS, _meta: meta }, auth);
    expect(first.result.structuredContent).toMatchObject({ status: "ok", result: 42 });
    expect(first.result._meta).toMatchObject({ "io.mcpay/charged_mcents": price, "io.mcpay/balance_mcents": price * 2 });
    const again = await rpc(app, "tools/call", { name: "execute_code", arguments: ARGS, _meta: meta }, auth);
    expect(again.result.structuredContent).toEqual(first.result.structuredContent);
    expect(again.result._meta["io.mcpay/idempotent_replayed"]).toBe(true);
    const other = await rpc(app, "tools/call", { name: "execute_code", arguments: { ...ARGS, input: { x: 1 } }, _meta: meta }, auth);
    expect(other.error?.data).toMatchObject({ code: "idempotency_mismatch", note: "no charge applied" });
    const bad = await rpc(app, "tools/call", { name: "execute_code", arguments: ARGS, _meta: { "io.mcpay/idempotency_key": "short" } }, auth);
    expect(bad.error?.data).toMatchObject({ code: "invalid_input", note: "no charge applied" });
    // Held and captured once for the three attempts.
    expect((await getMe(key)).balance_mcents).toBe(price * 2);
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(1);
    expect(ledger.filter((e) => e.kind === "capture")).toHaveLength(1);
  });

  it("a prepaid key without the scope is refused and not charged", async () => {
    const other = CALL_TYPES.find((t) => t !== "execute_code")!;
    const { key } = await seedKey({ balance: 10_000, scopes: [other as never] });
    const r = await rpc(app, "tools/call", { name: "execute_code", arguments: ARGS }, { Authorization: `Bearer ${key}` });
    expect(r.error?.data?.code).toBe("scope_denied");
    expect((await getMe(key)).balance_mcents).toBe(10_000);
  });

  it("a batch of prepaid calls is settled call by call: a call failing on our side refunds only itself", async () => {
    const { env } = countingEnv();
    const price = PRICE_MCENTS.execute_code;
    const { key } = await seedKey({ balance: price * 2, scopes: ["execute_code"] });
    const broken = { code: `return 1; ${LOADER_FAILS}` };
    const res = await call(
      app,
      mcpRequest(
        [
          { jsonrpc: "2.0", id: "ok", method: "tools/call", params: { name: "execute_code", arguments: ARGS } },
          { jsonrpc: "2.0", id: "broken", method: "tools/call", params: { name: "execute_code", arguments: broken } },
        ],
        { Authorization: `Bearer ${key}` },
      ),
      env,
    );
    expect(res.status).toBe(200);
    const replies = (await res.json()) as { id: string; result?: any }[];
    const ok = replies.find((r) => r.id === "ok")!;
    const failed = replies.find((r) => r.id === "broken")!;
    expect(ok.result.structuredContent).toMatchObject({ status: "ok", result: 42 });
    expect(ok.result._meta["io.mcpay/charged_mcents"]).toBe(price);
    expect(failed.result._meta["io.mcpay/refunded"]).toBe(true);
    expect(failed.result.isError).toBe(true);
    expect(failed.result.structuredContent).toMatchObject({ ok: false, refunded: true });
    // One call served and charged, the failed one refunded: exactly one price spent.
    expect((await getMe(key)).balance_mcents).toBe(price);
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(2);
    expect(ledger.filter((e) => e.kind === "release")).toHaveLength(1);
  });

  it("a batch whose tools/call share one JSON-RPC id is refused whole (-32600, HTTP 400) before any charge", async () => {
    const price = PRICE_MCENTS.execute_code;
    const { key } = await seedKey({ balance: price * 10, scopes: ["execute_code"] });
    const calls = [1, 2, 3].map(() => ({ jsonrpc: "2.0", id: 7, method: "tools/call", params: { name: "execute_code", arguments: ARGS } }));
    const res = await call(app, mcpRequest(calls, { Authorization: `Bearer ${key}` }));
    expect(res.status).toBe(400);
    const body = (await res.json()) as { jsonrpc: string; id: unknown; error: { code: number; message: string } };
    expect(body).toMatchObject({ jsonrpc: "2.0", id: null, error: { code: -32600 } });
    expect(body.error.message).toMatch(/more than once/);
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(0);
    expect((await getMe(key)).balance_mcents).toBe(price * 10);
  });

  it("three tools/call with distinct ids that fail on our side: exactly three charges and three refunds", async () => {
    const { env } = countingEnv();
    const price = PRICE_MCENTS.execute_code;
    const { key } = await seedKey({ balance: price * 10, scopes: ["execute_code"] });
    const broken = { code: `return 1; ${LOADER_FAILS}` };
    // Ids that a naive "request id / JSON-RPC id" scheme would confuse (1 and "1" are distinct ids).
    const calls = [1, "1", "x"].map((id) => ({ jsonrpc: "2.0", id, method: "tools/call", params: { name: "execute_code", arguments: broken } }));
    const res = await call(app, mcpRequest(calls, { Authorization: `Bearer ${key}` }), env);
    expect(res.status).toBe(200);
    const replies = (await res.json()) as { id: unknown; result?: any }[];
    expect(replies).toHaveLength(3);
    for (const r of replies) expect(r.result.structuredContent).toMatchObject({ ok: false, refunded: true });
    const ledger = await getLedger(key);
    const charges = ledger.filter((e) => e.kind === "hold");
    const refunds = ledger.filter((e) => e.kind === "release");
    expect(charges).toHaveLength(3);
    expect(refunds).toHaveLength(3);
    // Every charge has its own gateway-made id, refunded exactly once.
    expect(new Set(charges.map((e) => e.request_id)).size).toBe(3);
    expect(refunds.map((e) => e.request_id).sort()).toEqual(charges.map((e) => e.request_id).sort());
    for (const id of [1, "1", "x"]) expect(charges.some((e) => e.request_id.endsWith(`/${String(id)}`))).toBe(false);
    expect(charges.reduce((n, e) => n + e.amount_mcents, 0) + refunds.reduce((n, e) => n + e.amount_mcents, 0)).toBe(0);
    expect((await getMe(key)).balance_mcents).toBe(price * 10);
  });

  it("prepaid key: the agent's failures (tampering, sleeping past the limit, exceptions) are charged, not refunded", async () => {
    const quick = testApp({ timeoutMs: 300, cpuMs: 50 });
    const price = PRICE_MCENTS.execute_code;
    const { key } = await seedKey({ balance: price * 3, scopes: ["execute_code"] });
    const codes = [
      "globalThis.Response = function () { throw new Error('hijacked'); }; throw new Error('agent broke it');",
      "await new Promise((resolve) => setTimeout(resolve, 1e9));",
      "throw new RangeError('nope');",
    ];
    for (const code of codes) {
      const started = Date.now();
      const r = await rpc(quick, "tools/call", { name: "execute_code", arguments: { code } }, { Authorization: `Bearer ${key}` });
      expect(Date.now() - started).toBeLessThan(300 + 2_000);
      expect(r.result.structuredContent).toMatchObject({ status: "error" });
      expect(r.result.isError).toBeUndefined();
      expect(r.result._meta["io.mcpay/charged_mcents"]).toBe(price);
    }
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(3);
    expect(ledger.filter((e) => e.kind === "release")).toHaveLength(0);
    expect((await getMe(key)).balance_mcents).toBe(0);
  });
});

describe("MCP: claim, then take the money", () => {
  it("two different payments for one challenge, concurrently and then again: the method took money once, one run", async () => {
    const { env, loads } = countingEnv();
    const challenge = await challengeFor("execute_code", ARGS);
    const send = (ref: string) =>
      rpc(app, "tools/call", { name: "execute_code", arguments: ARGS, _meta: { [CRED]: credentialFor(challenge, "paid", ref) } }, {}, env);
    const rs = await Promise.all([send("a"), send("b")]);
    expect(rs.filter((r) => r.result?._meta?.[RECEIPT])).toHaveLength(1);
    const loser = rs.find((r) => r.error)!;
    expect(loser.error!.code).toBe(-32043);
    expect(loser.error!.message).toBe("Payment credential already used");
    const later = await send("c");
    expect(later.error?.code).toBe(-32043);
    expect(verified.filter((id) => id === challenge.id)).toHaveLength(1);
    expect(loads).toHaveLength(1);
  });

  it("a method error that is not a refusal: a JSON-RPC error with the pending payment's reference; nothing runs", async () => {
    const flaky = testApp(undefined, "flaky");
    const { env, loads } = countingEnv();
    const first = await rpc(flaky, "tools/call", { name: "execute_code", arguments: ARGS }, {}, env);
    const c = first.error!.data.challenges.find((x: { method: string }) => x.method === "flaky");
    const challenge = Challenge.from({ id: c.id, realm: c.realm, method: c.method, intent: c.intent, request: c.request, expires: c.expires, opaque: c.opaque } as never);
    const r = await rpc(flaky, "tools/call", { name: "execute_code", arguments: ARGS, _meta: { [CRED]: credentialFor(challenge, "x") } }, {}, env);
    expect(r.error?.code).toBe(-32603);
    expect(r.error?.data).toMatchObject({ code: "payment_unavailable", payment: { rail: "mpp", reference: `mpp:${challenge.id}`, state: "pending" } });
    expect(flakyAttempts.filter((id) => id === challenge.id)).toHaveLength(1);
    expect(loads).toHaveLength(0);
  });
});
