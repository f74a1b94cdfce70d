// POST /v1/signup over MPP, end to end through the mppx client (mppx/client) paying with a
// deterministic test method: challenges, pay → 201 + Payment-Receipt + a working key, replay and
// idempotency, refused credentials (tampered, expired, foreign realm or route, refused by the
// method), a receipt reference used twice, and concurrent submissions of one credential.
import { Challenge, Credential, PaymentRequest, Receipt } from "mppx";
import { describe, expect, it } from "vitest";
import { errorOf, getLedger, getMe, SCOPE, KEY_RE } from "./helpers";
import {
  REALM,
  SECRET,
  call,
  expectedDerivedKey,
  idempotencyKey,
  mppClient,
  mppCredential,
  mppVerified,
  signupApp,
  signupRequest,
  SIGNUP_URL,
  type SignupBody,
} from "./signup-helpers";

const PROBLEMS = "https://paymentauth.org/problems/";

async function expectError(res: Response, status: number, code: string) {
  const body = await errorOf(res.clone());
  expect(res.status, JSON.stringify(body)).toBe(status);
  expect(body.error.code).toBe(code);
  expect(body.note).toBe("no charge applied");
  return body;
}

function idOf(credential: string): string {
  return Credential.deserialize(credential).challenge.id;
}

/** Re-signs a challenge from a 402 with changed fields (an HMAC-valid challenge we never offered). */
function reissue(c: Challenge.Challenge, changes: Partial<Challenge.Challenge>, secretKey = SECRET): Challenge.Challenge {
  const meta = c.opaque !== undefined ? (PaymentRequest.deserialize(c.opaque) as Record<string, string>) : undefined;
  const { id: _id, opaque: _opaque, ...rest } = { ...c, meta, ...changes };
  return Challenge.from({ ...rest, secretKey } as Parameters<typeof Challenge.from>[0]) as Challenge.Challenge;
}

function credentialFor(challenge: Challenge.Challenge, token = "paid"): string {
  return Credential.serialize(Credential.from({ challenge, payload: { token } }));
}

async function offered(app: ReturnType<typeof signupApp>["app"]): Promise<Challenge.Challenge> {
  const res = await call(app, signupRequest());
  return Challenge.fromResponseList(res).find((c) => c.method === "test")!;
}

describe("signup over MPP: the mppx client pays", () => {
  it("402 → pay → 201 with a Payment-Receipt and a working key", async () => {
    const { app } = signupApp();
    const client = mppClient(app);
    const idem = idempotencyKey();
    const res = await client.fetch(SIGNUP_URL, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": idem },
      body: JSON.stringify({ name: "mpp agent" }),
    });
    expect(res.status, await res.clone().text()).toBe(201);
    const receipt = Receipt.fromResponse(res);
    expect(receipt).toMatchObject({ status: "success", method: "test" });
    const body = (await res.json()) as SignupBody;
    expect(body).toMatchObject({ ok: true, balance_mcents: 12_345, scopes: [SCOPE], name: "mpp agent", payment: { rail: "mpp", reference: receipt.reference } });
    expect(body.key).toMatch(KEY_RE);
    const challengeId = receipt.reference.replace(/^test-/, "");
    expect(body.key).toBe(await expectedDerivedKey(idem, `mpp:${challengeId}`));

    const me = await getMe(body.key);
    expect(me).toMatchObject({ key_id: body.key_id, balance_mcents: 12_345, scopes: [SCOPE], name: "mpp agent" });
    expect((await getLedger(body.key))[0]).toMatchObject({ kind: "mint", amount_mcents: 12_345 });
  });

  it("replay: same credential + same Idempotency-Key → 200 replayed; otherwise 409 payment_already_used", async () => {
    const { app } = signupApp();
    const credential = await mppCredential(app);
    const idem = idempotencyKey();
    const first = await call(app, signupRequest({ Authorization: credential, "Idempotency-Key": idem }));
    expect(first.status).toBe(201);
    const a = (await first.json()) as SignupBody;
    const verifiedOnce = mppVerified.filter((id) => id === idOf(credential)).length;
    expect(verifiedOnce).toBe(1);

    const again = await call(app, signupRequest({ Authorization: credential, "Idempotency-Key": idem }));
    expect(again.status).toBe(200);
    expect(await again.json()).toEqual({ ...a, request_id: again.headers.get("X-Request-Id"), replayed: true });
    expect(Receipt.fromResponse(again).reference).toBe(a.payment.reference);

    for (const headers of [{ Authorization: credential }, { Authorization: credential, "Idempotency-Key": idempotencyKey() }]) {
      const body = await expectError(await call(app, signupRequest(headers)), 409, "payment_already_used");
      expect(body.key_id).toBe(a.key_id);
    }
    // The method never verified (i.e. took) this payment again, and the key holds one mint.
    expect(mppVerified.filter((id) => id === idOf(credential)).length).toBe(1);
    expect((await getMe(a.key)).balance_mcents).toBe(12_345);
  });

  it("one WWW-Authenticate challenge per configured method, each payable", async () => {
    const { app } = signupApp({ withOther: true });
    const res = await call(app, signupRequest());
    expect(res.status).toBe(402);
    const challenges = Challenge.fromResponseList(res);
    expect(challenges.map((c) => c.method)).toEqual(["test", "other"]);
    expect(new Set(challenges.map((c) => c.id)).size).toBe(2);
    const other = challenges[1]!;
    const paid = await call(app, signupRequest({ Authorization: credentialFor(other) }));
    expect(paid.status).toBe(201);
    expect(Receipt.fromResponse(paid).method).toBe("other");
  });
});

describe("signup over MPP: refused credentials → 402 payment_invalid with the problem type, nothing paid", () => {
  const { app } = signupApp();

  async function refused(credential: string, problem: string) {
    const before = mppVerified.length;
    const res = await call(app, signupRequest({ Authorization: credential }));
    const body = await expectError(res, 402, "payment_invalid");
    expect(body.problem).toBe(PROBLEMS + problem);
    // The 402 carries the offer again.
    expect(Challenge.fromResponseList(res).length).toBeGreaterThan(0);
    expect(res.headers.get("PAYMENT-REQUIRED")).toBeTruthy();
    expect(mppVerified.length).toBe(before);
  }

  it("not a credential", async () => {
    await refused("Payment not-base64!!", "malformed-credential");
  });

  it("tampered amount (HMAC no longer matches)", async () => {
    const c = await offered(app);
    await refused(credentialFor({ ...c, request: { ...c.request, amount: "1" } }), "invalid-challenge");
  });

  it("signed with another secret", async () => {
    const c = await offered(app);
    await refused(credentialFor(reissue(c, {}, "another-secret-0123456789abcdef0123456789")), "invalid-challenge");
  });

  it("expired (HMAC-valid)", async () => {
    const c = await offered(app);
    await refused(credentialFor(reissue(c, { expires: new Date(Date.now() - 1000).toISOString() })), "payment-expired");
  });

  it("foreign realm (HMAC-valid)", async () => {
    const c = await offered(app);
    await refused(credentialFor(reissue(c, { realm: "other.example" })), "invalid-challenge");
  });

  it("issued for another route (HMAC-valid, another scope)", async () => {
    const c = await offered(app);
    await refused(credentialFor(reissue(c, { meta: { _mppx_scope: "execute_code" } })), "invalid-challenge");
    await refused(credentialFor(reissue(c, { meta: undefined })), "invalid-challenge");
  });

  it("another amount (HMAC-valid)", async () => {
    const c = await offered(app);
    await refused(credentialFor(reissue(c, { request: { ...c.request, amount: "1" } })), "invalid-challenge");
  });

  it("refused by the method's verification; the challenge can then still be paid", async () => {
    const c = await offered(app);
    const res = await call(app, signupRequest({ Authorization: credentialFor(c, "unpaid") }));
    const body = await expectError(res, 402, "payment_invalid");
    expect(body.problem).toBe(PROBLEMS + "verification-failed");
    const paid = await call(app, signupRequest({ Authorization: credentialFor(c) }));
    expect(paid.status).toBe(201);
  });
});

describe("signup over MPP: one payment, one key", () => {
  it("a receipt reference already used for a key does not mint again (with another challenge)", async () => {
    const { app } = signupApp();
    const ref = "tx-" + crypto.randomUUID();
    const first = await call(app, signupRequest({ Authorization: await mppCredential(app, "paid", ref) }));
    expect(first.status).toBe(201);
    const a = (await first.json()) as SignupBody;
    expect(a.payment.reference).toBe(ref);
    const second = await call(app, signupRequest({ Authorization: await mppCredential(app, "paid", ref) }));
    const body = await expectError(second, 409, "payment_already_used");
    expect(body.key_id).toBe(a.key_id);
  });

  it("a forged credential carrying a paid challenge's id learns nothing about it (402, not 409)", async () => {
    const { app } = signupApp();
    const credential = await mppCredential(app);
    expect((await call(app, signupRequest({ Authorization: credential }))).status).toBe(201);
    const paid = Credential.deserialize(credential).challenge;
    // Same id, another expiry (everything else as offered): the HMAC no longer matches, so the
    // payment record is not consulted.
    const forged = credentialFor({ ...paid, expires: new Date(Date.parse(paid.expires!) + 60_000).toISOString() });
    const res = await call(app, signupRequest({ Authorization: forged }));
    const body = await expectError(res, 402, "payment_invalid");
    expect(body.problem).toBe(PROBLEMS + "invalid-challenge");
    expect(body).not.toHaveProperty("key_id");
  });

  it("one credential sent concurrently mints exactly one key", async () => {
    const { app } = signupApp();
    const credential = await mppCredential(app);
    const results = await Promise.all(Array.from({ length: 6 }, () => call(app, signupRequest({ Authorization: credential }))));
    const statuses = results.map((r) => r.status);
    expect(statuses.filter((s) => s === 201)).toHaveLength(1);
    for (const r of results.filter((x) => x.status !== 201)) {
      expect(r.status).toBe(409);
      expect(["payment_in_progress", "payment_already_used"]).toContain((await errorOf(r)).error.code);
    }
    expect(mppVerified.filter((id) => id === idOf(credential))).toHaveLength(1);
  });

  it("the realm of challenges is the request's host", async () => {
    const { app } = signupApp();
    const c = await offered(app);
    expect(c.realm).toBe(REALM);
  });
});
