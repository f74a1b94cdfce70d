// POST /execute and POST /pay/<tool>: validation before payment, 402 challenges, paid runs with
// receipts, refused credentials (tampered, expired, foreign realm, wrong tool, replayed,
// concurrent), and the failure policy (one-time credits).
import { exports } from "cloudflare:workers";
import { Challenge, Credential, Receipt } from "mppx";
import { describe, expect, it } from "vitest";
import { CALL_TYPES, PRICE_MCENTS, SAMPLE_INPUT } from "../../src/generated/manifest";
import { MPP } from "../../src/generated/mpp";
import { BASE, REALM, SECRET, call, executeRequest, pay, paymentHeader, testApp, testChallengeOf, verified } from "./helpers";

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

describe("failure policy: gateway-side failures keep the payment as a one-time credit", () => {
  const fast = testApp({ timeoutMs: 300, cpuMs: MPP.cpuMs });
  // Async code that never resolves within the limit (a pending timer; no busy loop: local workerd
  // does not enforce CPU limits).
  const hang = { code: "await new Promise((resolve) => setTimeout(resolve, 3_600_000));" };

  it("wall-clock timeout → 504 with a credit, no receipt; the credit runs once, then is spent", async () => {
    const auth = await pay(fast, hang);
    const res = await call(fast, executeRequest(hang, { Authorization: auth }));
    expect(res.status).toBe(504);
    expect(res.headers.get("Payment-Receipt")).toBeNull();
    const body = (await res.json()) as { error: { code: string }; credit: { token: string } };
    expect(body.error.code).toBe("sandbox_timeout");
    expect(body.credit.token).toMatch(/^crd_[0-9a-f]{48}$/);

    const redeemed = await call(fast, executeRequest({ ...SUM, credit: body.credit.token }));
    expect(redeemed.status).toBe(200);
    expect(await redeemed.json()).toMatchObject({ ok: true, result: { sum: 3 }, paid_with: "credit" });
    const twice = await call(fast, executeRequest({ ...SUM, credit: body.credit.token }));
    expect(twice.status).toBe(400);
    expect(((await twice.json()) as { error: { code: string } }).error.code).toBe("invalid_credit");
  });

  it("a run paid with a credit that fails again earns no further credit", async () => {
    const auth = await pay(fast, hang);
    const first = (await (await call(fast, executeRequest(hang, { Authorization: auth }))).json()) as { credit: { token: string } };
    const res = await call(fast, executeRequest({ ...hang, credit: first.credit.token }));
    expect(res.status).toBe(504);
    expect(((await res.json()) as { credit: unknown }).credit).toBeNull();
  });

  it("a credit is bound to its tool", async () => {
    const auth = await pay(fast, hang);
    const first = (await (await call(fast, executeRequest(hang, { Authorization: auth }))).json()) as { credit: { token: string } };
    const ep = CALL_TYPES.find((t) => t !== "execute_code")!;
    const res = await call(fast, executeRequest({ ...(SAMPLE_INPUT[ep] as object), credit: first.credit.token }, {}, `/pay/${ep}`));
    expect(res.status).toBe(400);
  });
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
