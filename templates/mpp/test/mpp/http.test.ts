// POST /execute and POST /pay/<tool>: validation before payment, 402 challenges, paid runs with
// receipts, refused credentials (tampered, expired, foreign realm, wrong tool, replayed,
// concurrent), claim-then-take (a second payment for a challenge is never taken: counted by the
// test method's verifications), whose failure it is (the agent's: charged; ours: a one-time
// credit), and answers after a payment was taken (never a 500).
import { exports } from "cloudflare:workers";
import { runInDurableObject } from "cloudflare:test";
import { CLAIM_LEASE_MS } from "../../src/mpp/payment-do";
import { Challenge, Credential, Receipt } from "mppx";
import { describe, expect, it } from "vitest";
import { CALL_TYPES, PRICE_MCENTS, SAMPLE_INPUT } from "../../src/generated/manifest";
import { MPP } from "../../src/generated/mpp";
import type { Handler, HandlerContext } from "../../src/lib/handler";
import { executeHandler } from "../../src/mpp/execute-handler";
import { callPaid, getLedger, getMe, seedKey } from "../helpers";
import { HANDLERS } from "../../src/generated/handlers";
import {
  BASE,
  LOADER_FAILS,
  REALM,
  SECRET,
  call,
  countingEnv,
  creditsDownEnv,
  executeRequest,
  flakyAttempts,
  mppEnv,
  pay,
  paymentHeader,
  testApp,
  testChallengeOf,
  verified,
} from "./helpers";

const app = testApp();
const SUM = { code: "return { sum: input.a + input.b };", input: { a: 1, b: 2 } };

describe("POST /execute: validation comes first (no challenge, no charge)", () => {
  it.each([
    ["code missing", { input: 1 }, 400],
    ["code not a string", { code: 42 }, 400],
    ["unknown field", { code: "return 1", extra: true }, 400],
    ["body not an object", [1, 2], 400],
    ["body not JSON", "{nope", 400],
  ])("%s → %i", async (_name, body, status) => {
    const res = await call(app, executeRequest(body));
    expect(res.status).toBe(status);
    expect(res.headers.get("WWW-Authenticate")).toBeNull();
  });

  it("code larger than mpp.max_code_bytes → 413", async () => {
    const res = await call(app, executeRequest({ code: "x".repeat(MPP.maxCodeBytes + 1) }));
    expect(res.status).toBe(413);
    expect(res.headers.get("WWW-Authenticate")).toBeNull();
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("code_too_large");
  });

  it("wrong content type → 415", async () => {
    const res = await call(app, new Request(BASE + "/execute", { method: "POST", body: "x", headers: { "Content-Type": "text/plain" } }));
    expect(res.status).toBe(415);
    expect(res.headers.get("WWW-Authenticate")).toBeNull();
  });
});

describe("POST /execute: payment", () => {
  it("unpaid → 402 with a Payment challenge per method and problem+json, no-store", async () => {
    const res = await call(app, executeRequest(SUM));
    expect(res.status).toBe(402);
    expect(res.headers.get("Cache-Control")).toContain("no-store");
    expect(res.headers.get("Content-Type")).toContain("application/problem+json");
    const challenges = Challenge.fromResponseList(res);
    expect(challenges).toHaveLength(1);
    const c = challenges[0]!;
    expect(c.method).toBe("test");
    expect(c.intent).toBe("charge");
    expect(c.realm).toBe(REALM);
    expect(c.request).toMatchObject({ amount: String(PRICE_MCENTS.execute_code) });
    expect(Challenge.verify(c, { secretKey: SECRET })).toBe(true);
    const problem = (await res.json()) as { type: string; status: number };
    expect(problem.type).toBe("https://paymentauth.org/problems/payment-required");
  });

  it("paid → 200 with result, duration and a Payment-Receipt", async () => {
    const auth = await pay(app, SUM);
    const res = await call(app, executeRequest(SUM, { Authorization: auth }));
    expect(res.status, await res.clone().text()).toBe(200);
    const receipt = Receipt.fromResponse(res);
    expect(receipt.status).toBe("success");
    expect(receipt.method).toBe("test");
    expect(res.headers.get("Cache-Control")).toContain("private");
    const body = (await res.json()) as { ok: boolean; status: string; result: unknown; duration_ms: number };
    expect(body).toMatchObject({ ok: true, status: "ok", result: { sum: 3 } });
    expect(typeof body.duration_ms).toBe("number");
  });

  it("an exception in the agent's code is a paid execution with an error result", async () => {
    const body = { code: 'throw new TypeError("boom");' };
    const res = await call(app, executeRequest(body, { Authorization: await pay(app, body) }));
    expect(res.status).toBe(200);
    expect(Receipt.fromResponse(res).status).toBe("success");
    expect(await res.json()).toMatchObject({ ok: true, status: "error", error: { name: "TypeError", message: "boom" } });
  });

  it("a syntax error is the agent's error too", async () => {
    const body = { code: "return (;" };
    const res = await call(app, executeRequest(body, { Authorization: await pay(app, body) }));
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ ok: true, status: "error" });
  });

  it("a refused payment (verification failed) → 402, nothing runs", async () => {
    const auth = await pay(app, SUM, "/execute", "not-paid");
    const res = await call(app, executeRequest(SUM, { Authorization: auth }));
    expect(res.status).toBe(402);
    expect(res.headers.get("Payment-Receipt")).toBeNull();
    expect(((await res.json()) as { type: string }).type).toBe("https://paymentauth.org/problems/verification-failed");
  });

  it("a replayed credential is refused; it paid for exactly one execution", async () => {
    const auth = await pay(app, SUM);
    expect((await call(app, executeRequest(SUM, { Authorization: auth }))).status).toBe(200);
    const again = await call(app, executeRequest(SUM, { Authorization: auth }));
    expect(again.status).toBe(402);
    expect(again.headers.get("Payment-Receipt")).toBeNull();
    expect(again.headers.get("WWW-Authenticate")).toMatch(/^Payment /);
  });

  it("two concurrent submissions of one credential run the code once", async () => {
    const auth = await pay(app, SUM);
    const results = await Promise.all(Array.from({ length: 4 }, () => call(app, executeRequest(SUM, { Authorization: auth }))));
    const statuses = results.map((r) => r.status).sort();
    expect(statuses).toEqual([200, 402, 402, 402]);
    expect(results.filter((r) => r.headers.get("Payment-Receipt") !== null)).toHaveLength(1);
  });

  it("a tampered challenge (amount changed) is refused", async () => {
    const res = await call(app, executeRequest(SUM));
    const c = testChallengeOf(res);
    const tampered = { ...c, request: { ...c.request, amount: "1" } } as Challenge.Challenge;
    const paid = await call(app, executeRequest(SUM, { Authorization: paymentHeader(tampered) }));
    expect(paid.status).toBe(402);
    expect(paid.headers.get("Payment-Receipt")).toBeNull();
  });

  it("an expired challenge is refused even with a valid HMAC", async () => {
    const c = testChallengeOf(await call(app, executeRequest(SUM)));
    const { id: _id, ...fields } = c;
    const expired = Challenge.from({ ...fields, secretKey: SECRET, expires: new Date(Date.now() - 60_000).toISOString() } as never) as Challenge.Challenge;
    expect(Challenge.verify(expired, { secretKey: SECRET })).toBe(true);
    const res = await call(app, executeRequest(SUM, { Authorization: paymentHeader(expired) }));
    expect(res.status).toBe(402);
    expect(((await res.json()) as { type: string }).type).toBe("https://paymentauth.org/problems/payment-expired");
  });

  it("a challenge of a foreign realm is refused, even when signed with our key", async () => {
    const c = testChallengeOf(await call(app, executeRequest(SUM)));
    const { id: _id, ...fields } = c;
    const foreign = Challenge.from({ ...fields, secretKey: SECRET, realm: "evil.example" } as never) as Challenge.Challenge;
    expect(Challenge.verify(foreign, { secretKey: SECRET })).toBe(true);
    const res = await call(app, executeRequest(SUM, { Authorization: paymentHeader(foreign) }));
    expect(res.status).toBe(402);
    expect(res.headers.get("Payment-Receipt")).toBeNull();
  });

  it("a challenge signed with another key is refused", async () => {
    const c = testChallengeOf(await call(app, executeRequest(SUM)));
    const forged = Challenge.from({ secretKey: "another-secret-0123456789abcdef0123456789", realm: c.realm, method: c.method, intent: c.intent, request: c.request, expires: c.expires });
    const res = await call(app, executeRequest(SUM, { Authorization: paymentHeader(forged) }));
    expect(res.status).toBe(402);
  });

  it("a challenge is bound to its tool (opaque): an execute_code payment does not pay another tool", async () => {
    const ep = CALL_TYPES.find((t) => t !== "execute_code" && PRICE_MCENTS[t] === PRICE_MCENTS.execute_code);
    const auth = await pay(app, SUM);
    expect(Credential.deserialize(auth).challenge.opaque).toBeTruthy();
    const target = ep ?? CALL_TYPES.find((t) => t !== "execute_code")!;
    const res = await call(app, executeRequest(SAMPLE_INPUT[target], { Authorization: auth }, `/pay/${target}`));
    expect(res.status).toBe(402);
    expect(res.headers.get("Payment-Receipt")).toBeNull();
  });

  it("unpaid requests have no side effects: no verification, nothing consumed", async () => {
    const before = verified.length;
    const res = await call(app, executeRequest(SUM));
    expect(res.status).toBe(402);
    expect(verified.length).toBe(before);
  });
});

describe("POST /pay/<tool>: the manifest's endpoints paid with MPP", () => {
  const eps = CALL_TYPES.filter((t) => t !== "execute_code");
  it.each(eps)("%s: 402 → pay → 200 + receipt", async (ep) => {
    const first = await call(app, executeRequest(SAMPLE_INPUT[ep], {}, `/pay/${ep}`));
    expect(first.status).toBe(402);
    expect(testChallengeOf(first).request).toMatchObject({ amount: String(PRICE_MCENTS[ep]) });
    const auth = paymentHeader(testChallengeOf(first));
    const res = await call(app, executeRequest(SAMPLE_INPUT[ep], { Authorization: auth }, `/pay/${ep}`));
    expect(res.status, await res.clone().text()).toBe(200);
    expect(Receipt.fromResponse(res).status).toBe("success");
    expect(await res.json()).toMatchObject({ ok: true, status: "ok" });
  });

  it("unknown tool → 404", async () => {
    expect((await call(app, executeRequest({}, {}, "/pay/nope"))).status).toBe(404);
  });
});

/** How many times the test method took money for `challengeId`. */
function taken(challengeId: string): number {
  return verified.filter((id) => id === challengeId).length;
}

describe("claim, then take the money: one challenge is paid at most once", () => {
  it("two different payments for one /execute challenge, one after the other: the second is refused before its method runs", async () => {
    const { env, loads } = countingEnv();
    const c = testChallengeOf(await call(app, executeRequest(SUM), env));
    const first = await call(app, executeRequest(SUM, { Authorization: paymentHeader(c, "paid", "payment-a") }), env);
    expect(first.status).toBe(200);
    const second = await call(app, executeRequest(SUM, { Authorization: paymentHeader(c, "paid", "payment-b") }), env);
    expect(second.status).toBe(402);
    expect(second.headers.get("Payment-Receipt")).toBeNull();
    expect(((await second.json()) as { type: string }).type).toBe("https://paymentauth.org/problems/invalid-challenge");
    expect(second.headers.get("WWW-Authenticate")).toMatch(/^Payment /);
    expect(taken(c.id)).toBe(1); // the method took money once
    expect(loads).toHaveLength(1); // one execution
  });

  it("two different payments for one /execute challenge, concurrently: money taken once, one execution, the loser 402", async () => {
    const { env, loads } = countingEnv();
    const c = testChallengeOf(await call(app, executeRequest(SUM), env));
    const results = await Promise.all(
      ["payment-a", "payment-b", "payment-c"].map((ref) => call(app, executeRequest(SUM, { Authorization: paymentHeader(c, "paid", ref) }), env)),
    );
    expect(results.map((r) => r.status).sort()).toEqual([200, 402, 402]);
    expect(results.filter((r) => r.headers.get("Payment-Receipt") !== null)).toHaveLength(1);
    expect(taken(c.id)).toBe(1);
    expect(loads).toHaveLength(1);
  });

  it("/pay/<tool>: two different payments for one challenge, concurrently and then again: one run, money taken once", async () => {
    const ep = CALL_TYPES.find((t) => t !== "execute_code")!;
    let runs = 0;
    const counting: Handler<unknown> = {
      ...(HANDLERS[ep] as Handler<unknown>),
      async run(input, ctx) {
        runs++;
        return (HANDLERS[ep] as Handler<unknown>).run(input, ctx);
      },
    };
    const counted = testApp(undefined, "none", { ...HANDLERS, [ep]: counting });
    const path = `/pay/${ep}`;
    const c = testChallengeOf(await call(counted, executeRequest(SAMPLE_INPUT[ep], {}, path)));
    const results = await Promise.all(
      ["a", "b"].map((ref) => call(counted, executeRequest(SAMPLE_INPUT[ep], { Authorization: paymentHeader(c, "paid", ref) }, path))),
    );
    expect(results.map((r) => r.status).sort()).toEqual([200, 402]);
    const later = await call(counted, executeRequest(SAMPLE_INPUT[ep], { Authorization: paymentHeader(c, "paid", "c") }, path));
    expect(later.status).toBe(402);
    expect(taken(c.id)).toBe(1);
    expect(runs).toBe(1);
  });

  it("a payment the method refuses releases the claim: the challenge can still be paid", async () => {
    const c = testChallengeOf(await call(app, executeRequest(SUM)));
    const refused = await call(app, executeRequest(SUM, { Authorization: paymentHeader(c, "not-paid") }));
    expect(refused.status).toBe(402);
    expect(((await refused.json()) as { type: string }).type).toBe("https://paymentauth.org/problems/verification-failed");
    expect(taken(c.id)).toBe(0);
    const paid = await call(app, executeRequest(SUM, { Authorization: paymentHeader(c, "paid") }));
    expect(paid.status).toBe(200);
    expect(taken(c.id)).toBe(1);
  });

  it("a method error that is not a refusal: 502 payment_unavailable with the reference (pending), never 'no charge applied'; the challenge is not paid again", async () => {
    const flaky = testApp(undefined, "flaky");
    const { env, loads } = countingEnv();
    const res402 = await call(flaky, executeRequest(SUM), env);
    const c = Challenge.fromResponseList(res402).find((x) => x.method === "flaky")!;
    const res = await call(flaky, executeRequest(SUM, { Authorization: paymentHeader(c, "any") }), env);
    expect(res.status).toBe(502);
    const body = (await res.json()) as { error: { code: string }; payment: { rail: string; reference: string; state: string }; note?: string };
    expect(body.error.code).toBe("payment_unavailable");
    expect(body.payment).toMatchObject({ rail: "mpp", reference: `mpp:${c.id}`, state: "pending" });
    expect(body.note).toBeUndefined();
    const attempts = flakyAttempts.filter((id) => id === c.id).length;
    expect(attempts).toBe(1);
    // Another payment for that challenge is refused before the method runs.
    const again = await call(flaky, executeRequest(SUM, { Authorization: paymentHeader(c, "other") }), env);
    expect(again.status).toBe(402);
    expect(flakyAttempts.filter((id) => id === c.id).length).toBe(1);
    expect(loads).toHaveLength(0);
  });
});

describe("challenge claims (PaymentDO)", () => {
  it("a claim whose request died is taken over after its lease; used and pending claims never are", async () => {
    const ns = mppEnv.PAYMENTS;
    const stubFor = (id: string) => ns.get(ns.idFromName(`claim:${id}`));
    const expires = Date.now() + 300_000;
    const dead = stubFor("dead-request");
    const first = await dead.claimChallenge("dead-request", expires);
    expect(first.ok).toBe(true);
    const live = await dead.claimChallenge("dead-request", expires);
    expect(live).toMatchObject({ ok: false, state: "claimed" });
    expect((live as { retryAfterMs: number }).retryAfterMs).toBeGreaterThan(CLAIM_LEASE_MS - 5_000);
    // The holder died: its lease runs out.
    await runInDurableObject(dead, (_o, state) => {
      state.storage.sql.exec("UPDATE challenge_claims SET lease_until = ? WHERE k = ?", Date.now() - 1, "dead-request");
    });
    const takeover = await dead.claimChallenge("dead-request", expires);
    expect(takeover.ok).toBe(true);
    // The dead holder can no longer settle or release it.
    expect(await dead.releaseChallenge("dead-request", (first as { token: string }).token)).toBe(false);
    expect(await dead.settleChallenge("dead-request", (takeover as { token: string }).token, "used", "ref")).toBe(true);
    for (const state of ["used", "pending"] as const) {
      const id = `final-${state}`;
      const stub = stubFor(id);
      const c = await stub.claimChallenge(id, expires);
      expect(await stub.settleChallenge(id, (c as { token: string }).token, state, null)).toBe(true);
      await runInDurableObject(stub, (_o, st) => {
        st.storage.sql.exec("UPDATE challenge_claims SET lease_until = ? WHERE k = ?", Date.now() - 1, id);
      });
      expect(await stub.claimChallenge(id, expires)).toMatchObject({ ok: false, state });
    }
  });
});

describe("whose failure is it: the agent's failures are charged, ours earn a one-time credit", () => {
  const fast = testApp({ timeoutMs: 300, cpuMs: MPP.cpuMs });
  type Body = { ok: boolean; status?: string; error: { code?: string; name?: string }; credit?: { token: string } | null; charged?: boolean; timed_out?: boolean };

  it("code overwriting Response: a paid execution with an error result (200 + receipt, no credit)", async () => {
    const code = { code: "globalThis.Response = function () { throw new Error('hijacked'); }; throw new Error('agent broke it');" };
    const auth = await pay(app, code);
    const res = await call(app, executeRequest(code, { Authorization: auth }));
    expect(res.status).toBe(200);
    expect(Receipt.fromResponse(res).status).toBe("success");
    const body = (await res.json()) as Body;
    expect(body).toMatchObject({ ok: true, status: "error", error: { name: "Error" } });
    expect(body.credit).toBeUndefined();
  });

  it("code sleeping past the wall-clock limit: answered within the limit, charged, no credit", async () => {
    const sleep = { code: "await new Promise((resolve) => setTimeout(resolve, 1e9));" };
    const auth = await pay(fast, sleep);
    const started = Date.now();
    const res = await call(fast, executeRequest(sleep, { Authorization: auth }));
    expect(Date.now() - started).toBeLessThan(300 + 2_000);
    expect(res.status).toBe(200);
    expect(Receipt.fromResponse(res).status).toBe("success");
    const body = (await res.json()) as Body;
    expect(body).toMatchObject({ ok: true, status: "error", timed_out: true, error: { name: "TimeoutError" } });
    expect(body.credit).toBeUndefined();
  });

  it("a loader failure is ours: 502 sandbox_failed with a credit, no receipt; the credit runs once, then is spent", async () => {
    const { env, loads } = countingEnv();
    const broken = { code: `return 1; ${LOADER_FAILS}` };
    const auth = await pay(app, broken);
    const res = await call(app, executeRequest(broken, { Authorization: auth }), env);
    expect(res.status).toBe(502);
    expect(res.headers.get("Payment-Receipt")).toBeNull();
    const body = (await res.json()) as Body & { payment: { reference: string } };
    expect(body).toMatchObject({ ok: false, charged: true, error: { code: "sandbox_failed" } });
    expect(body.payment.reference).toBe(`mpp:${Credential.deserialize(auth).challenge.id}`);
    expect(body.credit!.token).toMatch(/^crd_[0-9a-f]{48}$/);
    expect(loads).toHaveLength(0);

    const before = verified.length;
    const redeemed = await call(app, executeRequest({ ...SUM, credit: body.credit!.token }), env);
    expect(redeemed.status).toBe(200);
    expect(await redeemed.json()).toMatchObject({ ok: true, result: { sum: 3 }, paid_with: "credit" });
    expect(verified.length).toBe(before); // no payment taken for the credit run
    expect(loads).toHaveLength(1);
    const twice = await call(app, executeRequest({ ...SUM, credit: body.credit!.token }), env);
    expect(twice.status).toBe(400);
    expect(((await twice.json()) as { error: { code: string } }).error.code).toBe("invalid_credit");
  });

  it("a run paid with a credit that fails again on our side earns no further credit", async () => {
    const { env } = countingEnv();
    const broken = { code: `return 1; ${LOADER_FAILS}` };
    const auth = await pay(app, broken);
    const first = (await (await call(app, executeRequest(broken, { Authorization: auth }), env)).json()) as Body;
    const res = await call(app, executeRequest({ ...broken, credit: first.credit!.token }), env);
    expect(res.status).toBe(502);
    expect(((await res.json()) as Body).credit).toBeNull();
  });

  it("a credit is bound to its tool", async () => {
    const { env } = countingEnv();
    const broken = { code: `return 1; ${LOADER_FAILS}` };
    const auth = await pay(app, broken);
    const first = (await (await call(app, executeRequest(broken, { Authorization: auth }), env)).json()) as Body;
    const ep = CALL_TYPES.find((t) => t !== "execute_code")!;
    const res = await call(app, executeRequest({ ...(SAMPLE_INPUT[ep] as object), credit: first.credit!.token }, {}, `/pay/${ep}`));
    expect(res.status).toBe(400);
  });

  it("after the payment was taken, a storage failure is never a 500: 502 with the payment reference", async () => {
    const { env } = countingEnv();
    const broken = { code: `return 1; ${LOADER_FAILS}` };
    const auth = await pay(app, broken);
    const id = Credential.deserialize(auth).challenge.id;
    const res = await call(app, executeRequest(broken, { Authorization: auth }), creditsDownEnv(env));
    expect(res.status).toBe(502);
    const body = (await res.json()) as Body & { payment: { rail: string; reference: string; state: string; transaction: string } };
    expect(body).toMatchObject({ ok: false, charged: true, credit: null, error: { code: "delivery_failed" } });
    expect(body.payment).toMatchObject({ rail: "mpp", reference: `mpp:${id}`, state: "paid", transaction: `test-${id}` });
    expect(taken(id)).toBe(1);
  });
});

describe("POST /v1/execute_code (prepaid key): the same classification", () => {
  it("code overwriting Response or throwing is a charged call, never refunded", async () => {
    const price = PRICE_MCENTS.execute_code;
    const { key } = await seedKey({ balance: price * 2, scopes: ["execute_code"] });
    for (const code of ["globalThis.Response = function () { throw new Error('hijacked'); }; throw new Error('x');", "throw new RangeError('nope');"]) {
      const res = await callPaid("execute_code", key, { code });
      expect(res.status).toBe(200);
      expect(await res.json()).toMatchObject({ ok: true, result: { status: "error" } });
    }
    const ledger = await getLedger(key);
    expect(ledger.filter((e) => e.kind === "hold")).toHaveLength(2);
    expect(ledger.filter((e) => e.kind === "release")).toHaveLength(0);
    expect((await getMe(key)).balance_mcents).toBe(0);
  });

  it("the handler throws (→ 502 handler_failed + refund) only for a failure on our side", async () => {
    const { env } = countingEnv();
    const ctx: HandlerContext = { env, endpoint: "execute_code", requestId: "t", keyId: "k", chargedMcents: 0, balanceMcents: 0, request: new Request(BASE), waitUntil: () => {} };
    await expect(executeHandler.run({ code: `return 1; ${LOADER_FAILS}` }, ctx)).rejects.toThrow(/sandbox failed/);
    await expect(executeHandler.run({ code: "await new Promise((r) => setTimeout(r, 1e9));" }, ctx)).resolves.toMatchObject({ status: "error", timed_out: true });
  }, MPP.timeoutMs + 5_000);
});

describe("production configuration", () => {
  it("the deployed app offers only the configured methods: without their secrets it takes no payment (503)", async () => {
    const res = await exports.default.fetch(executeRequest(SUM));
    expect(res.status).toBe(503);
    expect(res.headers.get("WWW-Authenticate")).toBeNull();
  });

  it("serves /SKILL.md and /llms.txt generated from the manifest", async () => {
    const skill = await exports.default.fetch(new Request(BASE + "/SKILL.md"));
    expect(skill.status).toBe(200);
    const text = await skill.text();
    for (const t of CALL_TYPES) {
      expect(text).toContain(t);
      expect(text).toContain(`${PRICE_MCENTS[t]} mcents`);
    }
    expect(text).toContain("org.paymentauth/credential");
    const llms = await (await exports.default.fetch(new Request(BASE + "/llms.txt"))).text();
    expect(llms).toContain("/execute");
  });
});
