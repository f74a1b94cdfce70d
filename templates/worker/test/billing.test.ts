import { runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { GATEWAY, RATE_LIMIT_PER_MINUTE, XP_AWARD } from "../src/generated/manifest";
import { levelFor } from "../src/lib/levels";
import {
  EP,
  PRICE,
  SAMPLE,
  balanceFor,
  callPaid,
  dumpSql,
  errorOf,
  fetchSelf,
  getLedger,
  getMe,
  keyStub,
  seedKey,
  testEnv,
} from "./helpers";

const LIMIT = RATE_LIMIT_PER_MINUTE[EP];
/** Successful calls a test may make on one key within a minute without hitting the rate limit. */
const MAX_CALLS = LIMIT > 0 ? LIMIT : Number.MAX_SAFE_INTEGER;

describe("insufficient balance", () => {
  it.skipIf(PRICE === 0)("402 with price and balance, no charge", async () => {
    const { key } = await seedKey({ balance: PRICE - 1 > 0 ? PRICE - 1 : 0 });
    const before = await getMe(key);
    const res = await callPaid(EP, key, SAMPLE);
    expect(res.status).toBe(402);
    const body = await errorOf(res);
    expect(body.error.code).toBe("insufficient_balance");
    expect(body.price_mcents).toBe(PRICE);
    expect(body.balance_mcents).toBe(before.balance_mcents);
    expect(body.note).toBe("no charge applied");
    expect((await getMe(key)).balance_mcents).toBe(before.balance_mcents);
  });
});

describe("atomic charging", () => {
  it.skipIf(PRICE === 0)("a burst of 50 concurrent calls with balance for N: exactly N succeed, balance ends at 0", async () => {
    const N = Math.min(20, MAX_CALLS);
    const TOTAL = 50;
    const { key } = await seedKey({ balance: N * PRICE });
    const responses = await Promise.all(Array.from({ length: TOTAL }, () => callPaid(EP, key, SAMPLE)));
    const statuses = responses.map((r) => r.status);
    expect(statuses.filter((s) => s === 200)).toHaveLength(N);
    for (const s of statuses.filter((s) => s !== 200)) expect([402, 429]).toContain(s);
    const balances = responses.filter((r) => r.status === 200).map((r) => Number(r.headers.get("X-Balance-Mcents")));
    for (const b of balances) expect(b).toBeGreaterThanOrEqual(0);
    expect(new Set(balances).size).toBe(N); // every success saw a distinct balance
    const me = await getMe(key);
    expect(me.balance_mcents).toBe(0);
    expect(me.calls).toBe(N);
    expect(me.spent_mcents).toBe(N * PRICE);
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(N);
    expect(ledger.filter((e) => e.kind === "capture")).toHaveLength(N);
    expect(ledger.filter((e) => e.kind === "release")).toHaveLength(0);
    expect(ledger.reduce((sum, e) => sum + e.amount_mcents, 0)).toBe(0);
    for (const e of ledger) expect(e.balance_after).toBeGreaterThanOrEqual(0);
  });

  it("charges on different keys do not interfere", async () => {
    const n = Math.min(5, MAX_CALLS);
    const keys = await Promise.all(Array.from({ length: 5 }, (_, i) => seedKey({ balance: balanceFor(n) + i })));
    await Promise.all(keys.flatMap(({ key }) => Array.from({ length: n }, () => callPaid(EP, key, SAMPLE))));
    for (const [i, { key }] of keys.entries()) {
      const me = await getMe(key);
      expect(me.calls).toBe(n);
      expect(me.balance_mcents).toBe(balanceFor(n) + i - n * PRICE);
    }
  });

  it("the key object rejects charges for keys that were never minted without writing storage", async () => {
    const stub = keyStub("0".repeat(64));
    expect(await stub.hold(EP, crypto.randomUUID())).toEqual({ ok: false, code: "invalid_key" });
    expect(await stub.capture(crypto.randomUUID())).toEqual({ ok: false, state: "unknown", balanceMcents: 0 });
    expect((await stub.release(crypto.randomUUID(), "ours")).state).toBe("unknown");
    expect(await stub.stats()).toBeNull();
    const dump = await runInDurableObject(stub, (_i, state) => dumpSql(state.storage.sql));
    expect(dump).toBe("[]");
  });
});

describe("/v1/me and /v1/me/ledger", () => {
  it("reports balance, xp, level, badges, calls and spend", async () => {
    const calls = Math.min(3, MAX_CALLS);
    const balance = balanceFor(calls + 2);
    const { key, keyId } = await seedKey({ balance, name: "me-test" });
    const fresh = await getMe(key);
    expect(fresh).toEqual({
      ok: true,
      key_id: keyId,
      name: "me-test",
      balance_mcents: balance,
      scopes: fresh.scopes,
      xp: 0,
      level: 1,
      badges: [],
      calls: 0,
      spent_mcents: 0,
      refunded_mcents: 0,
    });
    for (let i = 0; i < calls; i++) expect((await callPaid(EP, key, SAMPLE)).status).toBe(200);
    const me = await getMe(key);
    expect(me.balance_mcents).toBe(balance - calls * PRICE);
    expect(me.xp).toBe(calls * XP_AWARD[EP]);
    expect(me.level).toBe(levelFor(calls * XP_AWARD[EP]));
    expect(me.calls).toBe(calls);
    expect(me.badges).toContain("first_call");
    expect(me.spent_mcents).toBe(calls * PRICE);
  });

  it("ledger is newest first, sums to the balance, and honours limit", async () => {
    const calls = Math.min(4, MAX_CALLS);
    const balance = balanceFor(calls + 1);
    const { key } = await seedKey({ balance });
    const ids: string[] = [];
    for (let i = 0; i < calls; i++) {
      const res = await callPaid(EP, key, SAMPLE);
      ids.push(res.headers.get("X-Request-Id")!);
    }
    const ledger = await getLedger(key);
    expect(ledger).toHaveLength(2 * calls + 1); // mint, then a hold and its capture per call
    expect(ledger[ledger.length - 1]!.kind).toBe("mint");
    expect(ledger[ledger.length - 1]!.amount_mcents).toBe(balance);
    expect(ledger[0]!.request_id).toBe(ids[ids.length - 1]);
    for (let i = 1; i < ledger.length; i++) expect(ledger[i - 1]!.seq).toBeGreaterThan(ledger[i]!.seq);
    expect(ledger[0]!.kind).toBe("capture");
    for (const e of ledger.filter((x) => x.kind === "hold" || x.kind === "capture")) {
      expect(e.endpoint).toBe(EP);
      expect(e.amount_mcents).toBe(e.kind === "hold" ? -PRICE : 0);
      expect(Object.keys(e).sort()).toEqual(["amount_mcents", "balance_after", "endpoint", "kind", "request_id", "seq", "ts"]);
    }
    expect(ledger.reduce((s, e) => s + e.amount_mcents, 0)).toBe((await getMe(key)).balance_mcents);
    expect(ledger[0]!.balance_after).toBe((await getMe(key)).balance_mcents);

    expect(await getLedger(key, 2)).toHaveLength(2);
    const auth = { headers: { Authorization: `Bearer ${key}` } };
    const def = (await (await fetchSelf("/v1/me/ledger", auth)).json()) as { entries: unknown[] };
    expect(def.entries).toHaveLength(2 * calls + 1);
    expect((await fetchSelf("/v1/me/ledger?limit=100000", auth)).status).toBe(200);
    for (const bad of ["0", "-1", "abc", "1.5", ""]) {
      expect((await fetchSelf(`/v1/me/ledger?limit=${bad}`, auth)).status, bad).toBe(400);
    }
    expect((await fetchSelf("/v1/me/ledger")).status).toBe(401);
  });
});

describe("leaderboard", () => {
  it("is updated from key alarms (off the hot path) and never exposes key material", async () => {
    const a = await seedKey({ balance: balanceFor(3), name: "alpha" });
    const b = await seedKey({ balance: balanceFor(3), name: "beta" });
    const callsA = Math.min(2, MAX_CALLS);
    for (let i = 0; i < callsA; i++) expect((await callPaid(EP, a.key, SAMPLE)).status).toBe(200);
    expect((await callPaid(EP, b.key, SAMPLE)).status).toBe(200);

    // The paid calls did not touch the leaderboard.
    const before = (await (await fetchSelf("/v1/leaderboard")).json()) as { entries: Array<{ key_id: string }> };
    expect(before.entries.map((e) => e.key_id)).not.toContain(a.keyId);

    expect(await runDurableObjectAlarm(keyStub(a.hash))).toBe(true);
    expect(await runDurableObjectAlarm(keyStub(b.hash))).toBe(true);
    expect(await runDurableObjectAlarm(keyStub(b.hash))).toBe(false); // one batched report per change window

    const res = await fetchSelf("/v1/leaderboard");
    expect(res.status).toBe(200);
    const text = await res.text();
    const body = JSON.parse(text) as {
      ok: boolean;
      entries: Array<{ rank: number; key_id: string; name: string | null; xp: number; level: number; badges: string[]; calls: number }>;
    };
    expect(body.ok).toBe(true);
    const ea = body.entries.find((e) => e.key_id === a.keyId)!;
    const eb = body.entries.find((e) => e.key_id === b.keyId)!;
    expect(ea).toMatchObject({ name: "alpha", xp: callsA * XP_AWARD[EP], calls: callsA, level: levelFor(callsA * XP_AWARD[EP]) });
    expect(eb).toMatchObject({ name: "beta", xp: XP_AWARD[EP], calls: 1 });
    expect(ea.badges).toContain("first_call");
    for (const e of body.entries) expect(Object.keys(e).sort()).toEqual(["badges", "calls", "key_id", "level", "name", "rank", "xp"]);
    body.entries.forEach((e, i) => expect(e.rank).toBe(i + 1));
    for (let i = 1; i < body.entries.length; i++) expect(body.entries[i - 1]!.xp).toBeGreaterThanOrEqual(body.entries[i]!.xp);
    expect(body.entries.length).toBeLessThanOrEqual(GATEWAY.leaderboardSize);

    expect(text).not.toMatch(/[0-9a-f]{64}/);
    for (const k of [a, b]) {
      expect(text).not.toContain(k.key);
      expect(text).not.toContain(k.hash);
    }
    if (GATEWAY.keyPrefix.length > 0) expect(text).not.toContain(GATEWAY.keyPrefix);

    // The leaderboard's own storage holds no key material either.
    const lb = testEnv.LEADERBOARD.get(testEnv.LEADERBOARD.idFromName("global"));
    const dump = await runInDurableObject(lb, (_i, state) => dumpSql(state.storage.sql));
    expect(dump).not.toMatch(/[0-9a-f]{64}/);
  });
});
