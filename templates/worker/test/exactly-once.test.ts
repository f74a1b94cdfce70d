// Exactly-once paid calls (contract 3.8): every call holds its price, then captures it (success)
// or releases it (failure, timeout, a dead request swept by the KeyDO alarm); an Idempotency-Key
// replays a stored answer instead of charging twice. Every test counts ledger rows and balances.
import { createExecutionContext, runDurableObjectAlarm, runInDurableObject, waitOnExecutionContext } from "cloudflare:test";
import { beforeAll, describe, expect, it, vi } from "vitest";
import { createApp, type AppOptions } from "../src/app";
import { HANDLERS } from "../src/generated/handlers";
import { CALL_TYPES, GATEWAY, PRICE_MCENTS, RATE_LIMIT_PER_MINUTE, SAMPLE_INPUT, SCOPE_FOR, type CallType } from "../src/generated/manifest";
import type { Handler, Handlers } from "../src/lib/handler";
import type { KeyDO } from "../src/lib/key-do";
import { EP, PRICE, SAMPLE, balanceFor, fetchSelf, getLedger, getMe, keyStub, paidRequest, seedKey, testEnv, type LedgerRow } from "./helpers";

const CAP = GATEWAY.refundsPerKeyPerHour;
const LIMIT = RATE_LIMIT_PER_MINUTE[EP];
const IDEM = "idem_0123456789abcdef0123456789abcdef";

function appWith(handler: Handler<unknown>, options: AppOptions = {}) {
  return createApp({ ...HANDLERS, [EP]: handler } as Handlers, options);
}

async function call(app: ReturnType<typeof createApp>, key: string, headers: Record<string, string> = {}, body: unknown = SAMPLE) {
  const ctx = createExecutionContext();
  const res = await app.fetch(paidRequest(EP, key, body, headers), testEnv, ctx);
  const text = await res.text();
  await waitOnExecutionContext(ctx);
  return { res, text };
}

function kinds(ledger: LedgerRow[]): string[] {
  return ledger.map((e) => e.kind);
}

function sum(ledger: LedgerRow[]): number {
  return ledger.reduce((s, e) => s + e.amount_mcents, 0);
}

let counter = 0;
const echo = appWith({ run: (input) => ({ echoed: input, n: ++counter }) });
const throwing = appWith({ run: () => { throw new Error("upstream exploded"); } });

beforeAll(() => {
  vi.spyOn(console, "error").mockImplementation(() => {});
});

describe("hold → capture / release", () => {
  it("a successful call holds then captures once: ledger hold (−price) + capture (0), balance −price", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    const { res, text } = await call(echo, key);
    expect(res.status).toBe(200);
    const id = res.headers.get("X-Request-Id");
    expect(JSON.parse(text).request_id).toBe(id);
    const ledger = await getLedger(key);
    expect(kinds(ledger)).toEqual(["capture", "hold", "mint"]);
    expect(ledger[1]).toMatchObject({ endpoint: EP, amount_mcents: -PRICE, balance_after: balance - PRICE, request_id: id });
    expect(ledger[0]).toMatchObject({ endpoint: EP, amount_mcents: 0, balance_after: balance - PRICE, request_id: id });
    expect(sum(ledger)).toBe(balance - PRICE);
    const me = await getMe(key);
    expect(me).toMatchObject({ balance_mcents: balance - PRICE, calls: 1, spent_mcents: PRICE, refunded_mcents: 0 });
  });

  it("a throwing handler → hold then release (+price), balance restored", async () => {
    const balance = balanceFor(2);
    const { key } = await seedKey({ balance });
    const { res } = await call(throwing, key);
    expect(res.status).toBe(502);
    const ledger = await getLedger(key);
    expect(kinds(ledger)).toEqual(["release", "hold", "mint"]);
    expect(sum(ledger)).toBe(balance);
    expect((await getMe(key)).balance_mcents).toBe(balance);
  });

  it.skipIf(LIMIT > 0 && LIMIT < CAP + 2)("a handler past timeout_ms → 504 handler_timeout, released, never counted against the refund cap", async () => {
    const hanging = appWith({ run: () => new Promise(() => {}) }, { timeoutMs: { [EP]: 150 } });
    const balance = balanceFor(CAP + 3);
    const { key } = await seedKey({ balance });
    for (let i = 0; i < CAP + 1; i++) {
      const { res, text } = await call(hanging, key);
      expect(res.status).toBe(504);
      const body = JSON.parse(text) as Record<string, unknown> & { error: { code: string } };
      expect(body.error.code).toBe("handler_timeout");
      expect(body).toMatchObject({ refunded: true, charged_mcents: 0, balance_mcents: balance });
      expect(body.note).toBeUndefined();
      expect(res.headers.get("X-Charged-Mcents")).toBe("0");
    }
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(CAP + 1);
    expect(ledger.filter((e) => e.kind === "release")).toHaveLength(CAP + 1);
    expect(sum(ledger)).toBe(balance);
    // The caller-failure budget is untouched: the next handler failure is still refunded.
    const failed = await call(throwing, key);
    expect(failed.res.status).toBe(502);
    expect(JSON.parse(failed.text)).toMatchObject({ refunded: true });
    expect((await getMe(key)).balance_mcents).toBe(balance);
  });

  it("the KeyDO alarm releases a hold whose request died, in full, once", async () => {
    const balance = balanceFor(2);
    const { key, hash } = await seedKey({ balance });
    const stub = keyStub(hash);
    const callId = crypto.randomUUID();
    const held = await stub.hold(EP, callId);
    expect(held).toMatchObject({ ok: true, balanceMcents: balance - PRICE });
    // Before its deadline the alarm leaves the hold alone.
    await runDurableObjectAlarm(stub);
    expect(kinds(await getLedger(key))).toEqual(["hold", "mint"]);
    expect((await getMe(key)).balance_mcents).toBe(balance - PRICE);
    // Past it (request crashed, never settled): released by the alarm, which is armed by the hold.
    await runInDurableObject(stub, (_i: KeyDO, state) => {
      state.storage.sql.exec("UPDATE holds SET deadline = 0 WHERE call_id = ?", callId);
    });
    expect(await runInDurableObject(stub, (_i: KeyDO, state) => state.storage.getAlarm())).not.toBeNull();
    expect(await runDurableObjectAlarm(stub)).toBe(true);
    const ledger = await getLedger(key);
    expect(kinds(ledger)).toEqual(["release", "hold", "mint"]);
    expect(ledger[0]).toMatchObject({ amount_mcents: PRICE, balance_after: balance, request_id: callId });
    expect(await getMe(key)).toMatchObject({ balance_mcents: balance, calls: 0, xp: 0, refunded_mcents: PRICE });
    // A late capture of the released call does not charge; the alarm again changes nothing.
    expect(await stub.capture(callId)).toMatchObject({ ok: false, state: "released" });
    await runDurableObjectAlarm(stub);
    expect(kinds(await getLedger(key))).toEqual(["release", "hold", "mint"]);
  });

  it("a failing release RPC → 502 refund_pending, then the alarm converges the ledger", async () => {
    const balance = balanceFor(2);
    const { key, hash } = await seedKey({ balance });
    let releaseCalls = 0;
    // The key's object, except that release always fails (a storage/RPC error after the hold).
    const faulty: AppOptions["keyStub"] = (env, keyHash) => {
      const real = env.KEYS.get(env.KEYS.idFromName(keyHash));
      const wrapped = {
        hold: (...a: Parameters<KeyDO["hold"]>) => real.hold(...a),
        capture: (...a: Parameters<KeyDO["capture"]>) => real.capture(...a),
        release: () => {
          releaseCalls++;
          return Promise.reject(new Error("injected store failure"));
        },
      };
      return wrapped as unknown as DurableObjectStub<KeyDO>;
    };
    const app = appWith({ run: () => { throw new Error("boom"); } }, { keyStub: faulty });
    const { res, text } = await call(app, key);
    expect(res.status).toBe(502);
    const body = JSON.parse(text) as Record<string, unknown> & { error: { code: string } };
    expect(body.error.code).toBe("handler_failed");
    expect(body).toMatchObject({ refunded: false, refund_pending: true, charged_mcents: PRICE, balance_mcents: balance - PRICE });
    expect(releaseCalls).toBe(3); // retried in the request, bounded
    expect(kinds(await getLedger(key))).toEqual(["hold", "mint"]);
    // The sweeper releases it once the hold's deadline passed.
    const stub = keyStub(hash);
    await runInDurableObject(stub, (_i: KeyDO, state) => {
      state.storage.sql.exec("UPDATE holds SET deadline = 0 WHERE call_id = ?", body.request_id as string);
    });
    await runDurableObjectAlarm(stub);
    const ledger = await getLedger(key);
    expect(kinds(ledger)).toEqual(["release", "hold", "mint"]);
    expect(sum(ledger)).toBe(balance);
    expect((await getMe(key)).balance_mcents).toBe(balance);
  });
});

describe("Idempotency-Key", () => {
  it("a sequential retry replays the stored answer byte for byte, with Idempotent-Replayed, and charges once", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    const first = await call(echo, key, { "Idempotency-Key": IDEM });
    expect(first.res.status).toBe(200);
    expect(first.res.headers.get("Idempotent-Replayed")).toBeNull();
    const again = await call(echo, key, { "Idempotency-Key": IDEM });
    expect(again.res.status).toBe(200);
    expect(again.text).toBe(first.text);
    expect(again.res.headers.get("Idempotent-Replayed")).toBe("true");
    expect(again.res.headers.get("X-Charged-Mcents")).toBe(String(PRICE));
    expect(again.res.headers.get("X-Request-Id")).not.toBe(first.res.headers.get("X-Request-Id"));
    const ledger = await getLedger(key);
    expect(kinds(ledger)).toEqual(["capture", "hold", "mint"]);
    expect((await getMe(key)).balance_mcents).toBe(balance - PRICE);
  });

  it.skipIf(LIMIT > 0 && LIMIT < 21)("20 concurrent calls with one Idempotency-Key → one charge, identical bodies", async () => {
    const balance = balanceFor(25);
    const { key } = await seedKey({ balance });
    let runs = 0;
    const slow = appWith({
      run: async (input) => {
        runs++;
        await new Promise((r) => setTimeout(r, 200));
        return { echoed: input, run: runs };
      },
    });
    const results = await Promise.all(Array.from({ length: 20 }, () => call(slow, key, { "Idempotency-Key": IDEM })));
    const ok = results.filter((r) => r.res.status === 200);
    const busy = results.filter((r) => r.res.status === 409);
    expect(ok.length + busy.length).toBe(20);
    expect(ok.length).toBeGreaterThanOrEqual(1);
    for (const b of busy) {
      const e = JSON.parse(b.text) as { error: { code: string }; note: string; retry_after_seconds: number };
      expect(e.error.code).toBe("idempotency_in_progress");
      expect(e.note).toBe("no charge applied");
      expect(Number(b.res.headers.get("Retry-After"))).toBeGreaterThanOrEqual(1);
    }
    // Everyone who was told to retry gets the same answer.
    for (const _ of busy) ok.push(await call(slow, key, { "Idempotency-Key": IDEM }));
    expect(new Set(ok.map((r) => r.text)).size).toBe(1);
    expect(runs).toBe(1);
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(1);
    expect(ledger.filter((e) => e.kind === "capture")).toHaveLength(1);
    expect((await getMe(key)).balance_mcents).toBe(balance - PRICE);
  });

  it("the same Idempotency-Key with another body → 422 idempotency_mismatch, no charge", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    expect((await call(echo, key, { "Idempotency-Key": IDEM })).res.status).toBe(200);
    // Another body: the same JSON value with different bytes counts as different too.
    const other = JSON.stringify(SAMPLE, null, 1);
    const { res, text } = await call(echo, key, { "Idempotency-Key": IDEM }, other === JSON.stringify(SAMPLE) ? `${other} ` : other);
    expect(res.status).toBe(422);
    expect(JSON.parse(text)).toMatchObject({ error: { code: "idempotency_mismatch" }, note: "no charge applied" });
    expect((await getLedger(key)).filter((e) => e.kind === "hold")).toHaveLength(1);
    expect((await getMe(key)).balance_mcents).toBe(balance - PRICE);
  });

  it.skipIf(CALL_TYPES.length < 2)("the same Idempotency-Key on another endpoint → 422 idempotency_mismatch", async () => {
    const ep2 = (CALL_TYPES as readonly CallType[])[1]!;
    const { key } = await seedKey({ balance: balanceFor(5) + PRICE_MCENTS[ep2], scopes: [SCOPE_FOR[EP], SCOPE_FOR[ep2]] });
    expect((await call(echo, key, { "Idempotency-Key": IDEM })).res.status).toBe(200);
    const res = await fetchSelf(`/v1/${ep2}`, {
      method: "POST",
      headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json", "Idempotency-Key": IDEM },
      body: JSON.stringify(SAMPLE_INPUT[ep2]),
    });
    expect(res.status).toBe(422);
    expect((await getLedger(key)).filter((e) => e.kind === "hold")).toHaveLength(1);
  });

  it("different keys with one Idempotency-Key are independent", async () => {
    const a = await seedKey({ balance: balanceFor(2) });
    const b = await seedKey({ balance: balanceFor(2) });
    const ra = await call(echo, a.key, { "Idempotency-Key": IDEM });
    const rb = await call(echo, b.key, { "Idempotency-Key": IDEM });
    expect([ra.res.status, rb.res.status]).toEqual([200, 200]);
    expect(rb.res.headers.get("Idempotent-Replayed")).toBeNull();
    expect(rb.text).not.toBe(ra.text);
    for (const k of [a, b]) {
      expect((await getLedger(k.key)).filter((e) => e.kind === "hold")).toHaveLength(1);
      expect((await getMe(k.key)).balance_mcents).toBe(balanceFor(2) - PRICE);
    }
  });

  it("a failed call frees its Idempotency-Key: the retry runs again and is charged once", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    expect((await call(throwing, key, { "Idempotency-Key": IDEM })).res.status).toBe(502);
    const retry = await call(echo, key, { "Idempotency-Key": IDEM });
    expect(retry.res.status).toBe(200);
    expect(retry.res.headers.get("Idempotent-Replayed")).toBeNull();
    const ledger = await getLedger(key);
    expect(kinds(ledger)).toEqual(["capture", "hold", "release", "hold", "mint"]);
    expect((await getMe(key)).balance_mcents).toBe(balance - PRICE);
  });

  it("an answer above 64 KiB is not stored: the replay is 409 idempotency_response_not_stored, still one charge", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    const big = appWith({ run: () => ({ blob: "x".repeat(70_000) }) });
    const first = await call(big, key, { "Idempotency-Key": IDEM });
    expect(first.res.status).toBe(200);
    expect(first.text.length).toBeGreaterThan(70_000);
    const again = await call(big, key, { "Idempotency-Key": IDEM });
    expect(again.res.status).toBe(409);
    expect(again.res.headers.get("Idempotent-Replayed")).toBe("true");
    expect(JSON.parse(again.text)).toMatchObject({
      error: { code: "idempotency_response_not_stored" },
      note: "no charge applied",
      original_request_id: first.res.headers.get("X-Request-Id"),
      max_stored_bytes: 65_536,
    });
    expect((await getLedger(key)).filter((e) => e.kind === "hold")).toHaveLength(1);
    expect((await getMe(key)).balance_mcents).toBe(balance - PRICE);
  });

  it("a handler's own Response is stored and replayed with its status and headers", async () => {
    const { key } = await seedKey({ balance: balanceFor(3) });
    const own = appWith({ run: () => new Response("plain answer", { status: 201, headers: { "Content-Type": "text/plain", "X-Custom": "1" } }) });
    const first = await call(own, key, { "Idempotency-Key": IDEM });
    const again = await call(own, key, { "Idempotency-Key": IDEM });
    expect([first.res.status, again.res.status]).toEqual([201, 201]);
    expect(again.text).toBe("plain answer");
    expect(again.res.headers.get("X-Custom")).toBe("1");
    expect(again.res.headers.get("Idempotent-Replayed")).toBe("true");
    expect((await getLedger(key)).filter((e) => e.kind === "hold")).toHaveLength(1);
  });

  it("a malformed Idempotency-Key → 400 invalid_input with the no-charge note", async () => {
    const { key } = await seedKey({ balance: balanceFor(2) });
    for (const bad of ["short", "x".repeat(129), `${"a".repeat(31)}!`, `${IDEM}, ${IDEM}`]) {
      const { res, text } = await call(echo, key, { "Idempotency-Key": bad });
      expect(res.status, bad).toBe(400);
      expect(JSON.parse(text)).toMatchObject({ error: { code: "invalid_input" }, note: "no charge applied" });
    }
    expect(kinds(await getLedger(key))).toEqual(["mint"]);
  });

  it("the alarm forgets an expired Idempotency-Key: the same key then runs and charges again", async () => {
    const balance = balanceFor(3);
    const { key, hash } = await seedKey({ balance });
    expect((await call(echo, key, { "Idempotency-Key": IDEM })).res.status).toBe(200);
    const stub = keyStub(hash);
    await runInDurableObject(stub, (_i: KeyDO, state) => {
      state.storage.sql.exec("UPDATE idempotency SET expires_at = 1");
    });
    await runDurableObjectAlarm(stub);
    const n = await runInDurableObject(stub, (_i: KeyDO, state) => state.storage.sql.exec("SELECT COUNT(*) AS n FROM idempotency").one().n);
    expect(n).toBe(0);
    const again = await call(echo, key, { "Idempotency-Key": IDEM });
    expect(again.res.status).toBe(200);
    expect(again.res.headers.get("Idempotent-Replayed")).toBeNull();
    expect((await getMe(key)).balance_mcents).toBe(balance - 2 * PRICE);
  });

  it("CORS allows Idempotency-Key and exposes Idempotent-Replayed", async () => {
    const res = await fetchSelf(`/v1/${EP}`, { method: "OPTIONS" });
    expect(res.headers.get("Access-Control-Allow-Headers")).toContain("Idempotency-Key");
    expect(res.headers.get("Access-Control-Expose-Headers")).toContain("Idempotent-Replayed");
  });
});

describe("small fixes", () => {
  it("two Authorization headers → 401, no charge", async () => {
    const { key } = await seedKey({ balance: balanceFor(2) });
    const headers = new Headers({ "Content-Type": "application/json" });
    headers.append("Authorization", `Bearer ${key}`);
    headers.append("Authorization", `Bearer ${key}`);
    const res = await fetchSelf(`/v1/${EP}`, { method: "POST", headers, body: JSON.stringify(SAMPLE) });
    expect(res.status).toBe(401);
    expect(res.headers.get("WWW-Authenticate")).toContain("Bearer");
    expect(kinds(await getLedger(key))).toEqual(["mint"]);
  });

  it("/v1/me/ledger pages with before=<seq> and next_before", async () => {
    const calls = Math.min(3, LIMIT > 0 ? LIMIT : 3);
    const { key } = await seedKey({ balance: balanceFor(calls + 1) });
    for (let i = 0; i < calls; i++) expect((await call(echo, key)).res.status).toBe(200);
    const auth = { headers: { Authorization: `Bearer ${key}` } };
    const all = await getLedger(key);
    expect(all).toHaveLength(2 * calls + 1);
    const seen: LedgerRow[] = [];
    let before: number | null = null;
    for (;;) {
      const page = (await (await fetchSelf(`/v1/me/ledger?limit=2${before === null ? "" : `&before=${before}`}`, auth)).json()) as {
        entries: LedgerRow[];
        next_before: number | null;
      };
      seen.push(...page.entries);
      if (page.next_before === null) break;
      expect(page.next_before).toBe(page.entries[page.entries.length - 1]!.seq);
      before = page.next_before;
    }
    expect(seen).toEqual(all);
    const last = (await (await fetchSelf(`/v1/me/ledger?limit=500`, auth)).json()) as { next_before: number | null };
    expect(last.next_before).toBeNull();
    for (const bad of ["0", "-1", "abc", "1.5", "", "9999999999999999"]) {
      expect((await fetchSelf(`/v1/me/ledger?before=${bad}`, auth)).status, bad).toBe(400);
    }
  });

  it("an invalid Content-Length reaching the worker → 400 invalid_json JSON answer, no charge", async () => {
    const { key } = await seedKey({ balance: balanceFor(2) });
    for (const cl of ["-5", "12abc", "1e3"]) {
      const req = new Request(`https://gateway.test/v1/${EP}`, {
        method: "POST",
        headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
        body: JSON.stringify(SAMPLE),
      });
      // workerd's own Request keeps the body length; set the header as an HTTP client would have sent it.
      const headers = new Headers(req.headers);
      headers.set("Content-Length", cl);
      const ctx = createExecutionContext();
      const res = await echo.fetch(new Request(req, { headers }), testEnv, ctx);
      await waitOnExecutionContext(ctx);
      expect(res.status, cl).toBe(400);
      expect(res.headers.get("Content-Type")).toContain("application/json");
      expect(await res.json()).toMatchObject({ error: { code: "invalid_json" }, note: "no charge applied" });
    }
    expect(kinds(await getLedger(key))).toEqual(["mint"]);
  });

  it("a key object created before holds existed is migrated: old ledger rows kept, holds work", async () => {
    const balance = balanceFor(3);
    const { key, hash } = await seedKey({ balance });
    const stub = keyStub(hash);
    await runInDurableObject(stub, (instance: KeyDO, state) => {
      const sql = state.storage.sql;
      // The previous schema: ledger kinds mint/charge/refund only, no holds, no idempotency table.
      sql.exec("DROP TABLE holds");
      sql.exec("DROP TABLE idempotency");
      sql.exec("DROP TABLE ledger");
      sql.exec(`CREATE TABLE ledger (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('mint', 'charge', 'refund')), endpoint TEXT,
        amount_mcents INTEGER NOT NULL, balance_after INTEGER NOT NULL, request_id TEXT NOT NULL,
        xp_delta INTEGER NOT NULL DEFAULT 0)`);
      sql.exec("INSERT INTO ledger (ts, kind, endpoint, amount_mcents, balance_after, request_id) VALUES (1, 'mint', NULL, ?, ?, 'm')", balance + PRICE, balance + PRICE);
      sql.exec("INSERT INTO ledger (ts, kind, endpoint, amount_mcents, balance_after, request_id) VALUES (2, 'charge', ?, ?, ?, 'c')", EP, -PRICE, balance);
      (instance as unknown as { migrate(): void }).migrate();
    });
    expect((await call(echo, key)).res.status).toBe(200);
    const ledger = await getLedger(key);
    expect(kinds(ledger)).toEqual(["capture", "hold", "charge", "mint"]);
    expect(sum(ledger)).toBe(balance - PRICE);
    expect((await getMe(key)).balance_mcents).toBe(balance - PRICE);
  });
});
