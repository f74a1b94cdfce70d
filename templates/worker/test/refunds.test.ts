import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { beforeAll, describe, expect, it, vi } from "vitest";
import { createApp } from "../src/app";
import { HANDLERS } from "../src/generated/handlers";
import { GATEWAY, RATE_LIMIT_PER_MINUTE } from "../src/generated/manifest";
import type { Handler, Handlers } from "../src/lib/handler";
import { EP, PRICE, SAMPLE, balanceFor, errorOf, getLedger, getMe, paidRequest, seedKey, testEnv } from "./helpers";

const CAP = GATEWAY.refundsPerKeyPerHour;
const LIMIT = RATE_LIMIT_PER_MINUTE[EP];

function appWith(handler: Handler<unknown>) {
  const handlers = { ...HANDLERS, [EP]: handler } as Handlers;
  return createApp(handlers);
}

async function call(app: ReturnType<typeof createApp>, key: string) {
  const ctx = createExecutionContext();
  const res = await app.fetch(paidRequest(EP, key, SAMPLE), testEnv, ctx);
  await waitOnExecutionContext(ctx);
  return res;
}

const throwing = appWith({ run: () => { throw new Error("upstream exploded"); } });
const failing5xx = appWith({ run: () => new Response("bad gateway", { status: 503 }) });

describe("refunds on handler failure", () => {
  // Handler failures are logged with console.error; keep the test output quiet.
  beforeAll(() => {
    vi.spyOn(console, "error").mockImplementation(() => {});
  });

  it("a throwing handler → 502 handler_failed, refunded, balance restored, refund in the ledger", async () => {
    const balance = balanceFor(2);
    const { key } = await seedKey({ balance });
    const res = await call(throwing, key);
    expect(res.status).toBe(502);
    const body = await errorOf(res);
    expect(body.error.code).toBe("handler_failed");
    expect(body.refunded).toBe(true);
    expect(body.balance_mcents).toBe(balance);
    expect(body.error.message).not.toContain("upstream exploded"); // internals are logged, not leaked
    expect(res.headers.get("X-Charged-Mcents")).toBe("0");
    expect(res.headers.get("X-Balance-Mcents")).toBe(String(balance));
    expect(res.headers.get("X-Request-Id")).toBe(body.request_id);
    const me = await getMe(key);
    expect(me.balance_mcents).toBe(balance);
    expect(me.refunded_mcents).toBe(PRICE);
    expect(me.xp).toBe(0); // no XP for a failed call
    expect(me.calls).toBe(0);
    const ledger = await getLedger(key);
    expect(ledger.map((e) => e.kind)).toEqual(["release", "hold", "mint"]);
    expect(ledger[1]).toMatchObject({ kind: "hold", endpoint: EP, amount_mcents: -PRICE, balance_after: balance - PRICE, request_id: body.request_id });
    expect(ledger[0]).toMatchObject({ kind: "release", endpoint: EP, amount_mcents: PRICE, balance_after: balance, request_id: body.request_id });
    expect(ledger.reduce((s, e) => s + e.amount_mcents, 0)).toBe(balance);
  });

  it("a handler answering 5xx → 502 handler_failed, refunded", async () => {
    const balance = balanceFor(2);
    const { key } = await seedKey({ balance });
    const res = await call(failing5xx, key);
    expect(res.status).toBe(502);
    const body = await errorOf(res);
    expect(body.error.code).toBe("handler_failed");
    expect(body.refunded).toBe(true);
    expect((await getMe(key)).balance_mcents).toBe(balance);
  });

  it("a handler's own 4xx Response is passed through and charged", async () => {
    const app = appWith({ run: () => new Response(JSON.stringify({ ok: false, custom: true }), { status: 409 }) });
    const balance = balanceFor(2);
    const { key } = await seedKey({ balance });
    const res = await call(app, key);
    expect(res.status).toBe(409);
    expect(res.headers.get("X-Charged-Mcents")).toBe(String(PRICE));
    expect((await getMe(key)).balance_mcents).toBe(balance - PRICE);
  });

  it.skipIf(PRICE === 0 || (LIMIT > 0 && LIMIT < CAP + 1))(
    `refunds are capped at GATEWAY.refundsPerKeyPerHour per key per rolling hour`,
    async () => {
      const balance = balanceFor(CAP + 3);
      const { key } = await seedKey({ balance });
      for (let i = 0; i < CAP; i++) {
        const res = await call(i % 2 === 0 ? throwing : failing5xx, key);
        expect(res.status).toBe(502);
        expect((await errorOf(res)).refunded).toBe(true);
      }
      const over = await call(throwing, key);
      expect(over.status).toBe(502);
      const body = await errorOf(over);
      expect(body.refunded).toBe(false);
      expect(body.balance_mcents).toBe(balance - PRICE);
      expect(over.headers.get("X-Charged-Mcents")).toBe(String(PRICE));
      const me = await getMe(key);
      expect(me.balance_mcents).toBe(balance - PRICE);
      expect(me.refunded_mcents).toBe(CAP * PRICE);
      const ledger = await getLedger(key);
      expect(ledger.filter((e) => e.kind === "release")).toHaveLength(CAP);
      expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(CAP + 1);
      // Past the cap the hold is captured: the charge stands, recorded as a capture of amount 0.
      expect(ledger[0]).toMatchObject({ kind: "capture", amount_mcents: 0, balance_after: balance - PRICE, request_id: body.request_id });
      expect(ledger.reduce((s, e) => s + e.amount_mcents, 0)).toBe(me.balance_mcents);
      // Another key has its own refund budget.
      const other = await seedKey({ balance: balanceFor(2) });
      expect((await errorOf(await call(throwing, other.key))).refunded).toBe(true);
    },
  );

  it("release is idempotent per call id and needs a real hold", async () => {
    const { key, hash } = await seedKey({ balance: balanceFor(2) });
    const res = await call(throwing, key);
    const requestId = res.headers.get("X-Request-Id")!;
    const stub = testEnv.KEYS.get(testEnv.KEYS.idFromName(hash));
    // Released once: a second release reports the same outcome and moves nothing.
    expect(await stub.release(requestId, "ours")).toMatchObject({ refunded: true, state: "released", balanceMcents: balanceFor(2) });
    expect(await stub.release(crypto.randomUUID(), "ours")).toMatchObject({ refunded: false, state: "unknown" });
    expect(await stub.capture(requestId)).toMatchObject({ ok: false, state: "released" });
    expect((await getMe(key)).balance_mcents).toBe(balanceFor(2));
    expect((await getLedger(key)).filter((e) => e.kind === "release")).toHaveLength(1);
  });

  it("a handler that validates rejects before any charge", async () => {
    const app = appWith({ validate: () => "nope, not that", run: () => ({}) });
    const balance = balanceFor(2);
    const { key } = await seedKey({ balance });
    const res = await call(app, key);
    expect(res.status).toBe(400);
    const body = await errorOf(res);
    expect(body.error).toEqual({ code: "invalid_input", message: "nope, not that" });
    expect(body.note).toBe("no charge applied");
    expect((await getMe(key)).balance_mcents).toBe(balance);
  });

  it("handler context carries the key id, charge and balance", async () => {
    let seen: Record<string, unknown> = {};
    const app = appWith({
      run: (_input, ctx) => {
        seen = { keyId: ctx.keyId, charged: ctx.chargedMcents, balance: ctx.balanceMcents, endpoint: ctx.endpoint, requestId: ctx.requestId };
        return { fine: true };
      },
    });
    const balance = balanceFor(2);
    const { key, keyId } = await seedKey({ balance });
    const res = await call(app, key);
    expect(res.status).toBe(200);
    expect(((await res.json()) as { result: unknown }).result).toEqual({ fine: true });
    expect(seen).toEqual({ keyId, charged: PRICE, balance: balance - PRICE, endpoint: EP, requestId: res.headers.get("X-Request-Id") });
  });
});

describe("what a handler sees", () => {
  it("ctx.request carries no credentials, so a handler cannot log or forward the caller's key", async () => {
    const { key } = await seedKey({ balance: balanceFor(1) });
    const seen = appWith({
      run: (_input, ctx) => ({
        authorization: ctx.request.headers.get("Authorization"),
        admin: ctx.request.headers.get("X-Admin-Key"),
        contentType: ctx.request.headers.get("Content-Type"),
      }),
    });
    const res = await call(seen, key);
    expect(res.status).toBe(200);
    const body = (await res.json()) as { result: Record<string, string | null> };
    expect(body.result.authorization).toBeNull();
    expect(body.result.admin).toBeNull();
    expect(body.result.contentType).toContain("application/json");
    expect(JSON.stringify(body)).not.toContain(key);
  });
});
