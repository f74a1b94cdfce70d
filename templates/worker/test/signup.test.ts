// POST /v1/signup (contract 3.9): routing and pricing from mcpay.toml, the checks before any
// payment, the offer (402), and the x402 rail against a deterministic facilitator (and, for the
// wire format and failure handling, @x402/core's own HTTP facilitator client against a stubbed
// fetch). Idempotency, replay and concurrency: one payment mints at most one key.
import { runInDurableObject } from "cloudflare:test";
import { decodePaymentRequiredHeader, decodePaymentResponseHeader } from "@x402/core/http";
import { Challenge } from "mppx";
import { afterEach, describe, expect, it, vi } from "vitest";
import { SIGNUP } from "../src/generated/manifest";
import { sha256Hex } from "../src/lib/keys";
import { pricingSignup } from "../src/lib/signup";
import type { SignupConfig } from "../src/lib/signup-config";
import { BASE, KEY_RE, SCOPE, errorOf, fetchSelf, getLedger, getMe, keyStub, mintViaAdmin } from "./helpers";
import {
  PAYER,
  PAY_TO,
  REALM,
  REQUIREMENT,
  SECRET,
  SIGNUP_URL,
  TEST_SIGNUP,
  TestFacilitator,
  budgetCounts,
  call,
  networkFetch,
  dumpPaymentObject,
  expectedDerivedKey,
  freshNonce,
  idempotencyKey,
  paymentSignature,
  signupApp,
  signupEnv,
  signupRequest,
  txHashFor,
  x402Reference,
  xPayment,
  type SignupBody,
} from "./signup-helpers";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

async function expectError(res: Response, status: number, code: string, note = true) {
  const body = await errorOf(res.clone());
  expect(res.status, JSON.stringify(body)).toBe(status);
  expect(body.error.code).toBe(code);
  expect(body.request_id).toBe(res.headers.get("X-Request-Id"));
  if (note) expect(body.note).toBe("no charge applied");
  else expect(body.note).toBeUndefined();
  return body;
}

describe("signup: routing and pricing follow mcpay.toml", () => {
  it("GET /v1/pricing has the signup field of this project", async () => {
    const body = (await (await fetchSelf("/v1/pricing")).json()) as { signup: unknown };
    expect(body).toHaveProperty("signup");
    if (!SIGNUP.enabled) expect(body.signup).toBeNull();
    else {
      expect(body.signup).toEqual({
        path: "/v1/signup",
        price_mcents: SIGNUP.priceMcents,
        balance_mcents: SIGNUP.balanceMcents,
        scopes: [...SIGNUP.scopes],
        rails: [...SIGNUP.rails],
      });
    }
  });

  it("the production app serves POST /v1/signup only when enabled (without payment settings: 503 naming them, or 402)", async () => {
    const res = await fetchSelf("/v1/signup", { method: "POST" });
    if (!SIGNUP.enabled) {
      await expectError(res, 404, "not_found", false);
      return;
    }
    expect([402, 503]).toContain(res.status);
    const body = await errorOf(res);
    if (res.status === 503) {
      expect(body.error.code).toBe("signup_unavailable");
      expect(body.error.message).toMatch(/X402_PAY_TO|X402_RPC_URL|TEMPO_RECIPIENT|STRIPE_SECRET_KEY|MPP_SECRET_KEY|SIGNUP_SECRET/);
    } else {
      expect(body.error.code).toBe("payment_required");
    }
  });

  it("disabled → 404 and signup: null; enabled → the pricing entry with the configured rails", async () => {
    const off = signupApp({ config: { ...TEST_SIGNUP, enabled: false } }).app;
    await expectError(await call(off, signupRequest()), 404, "not_found", false);
    const offPricing = (await (await call(off, new Request(`${BASE}/v1/pricing`))).json()) as { signup: unknown };
    expect(offPricing.signup).toBeNull();

    const on = signupApp().app;
    const pricing = (await (await call(on, new Request(`${BASE}/v1/pricing`))).json()) as Record<string, unknown>;
    expect(Object.keys(pricing)).toEqual(["ok", "unit", "mcents_per_cent", "signup", "endpoints", "upstreams"]);
    expect(pricing.signup).toEqual({ path: "/v1/signup", price_mcents: 50_000, balance_mcents: 12_345, scopes: [SCOPE], rails: ["x402", "mpp"] });
    expect(pricingSignup({ ...TEST_SIGNUP, rails: ["mpp"], x402: null })).toMatchObject({ rails: ["mpp"] });
  });

  it("405 on GET, 204 preflight with the payment headers allowed and exposed", async () => {
    const { app } = signupApp();
    const get = await call(app, new Request(SIGNUP_URL));
    await expectError(get, 405, "method_not_allowed", false);
    expect(get.headers.get("Allow")).toBe("POST, OPTIONS");
    const pre = await call(app, new Request(SIGNUP_URL, { method: "OPTIONS" }));
    expect(pre.status).toBe(204);
    expect(pre.headers.get("Access-Control-Allow-Methods")).toBe("POST, OPTIONS");
    expect(pre.headers.get("Access-Control-Allow-Headers")).toBe("Authorization, Content-Type, Idempotency-Key, PAYMENT-SIGNATURE, X-PAYMENT");
    expect(pre.headers.get("Access-Control-Expose-Headers")).toBe(
      "X-Request-Id, X-Charged-Mcents, X-Balance-Mcents, Retry-After, WWW-Authenticate, Idempotent-Replayed, PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE, Payment-Receipt",
    );
  });
});

describe("signup: 503 signup_unavailable when a configured rail lacks a setting (before reading the request)", () => {
  it("x402 without a pay_to and without X402_PAY_TO", async () => {
    const config: SignupConfig = { ...TEST_SIGNUP, x402: { ...TEST_SIGNUP.x402!, payTo: "" } };
    const { app, facilitator } = signupApp({ config });
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature() }, "{not json"));
    const body = await expectError(res, 503, "signup_unavailable", false);
    expect(body.error.message).toContain("X402_PAY_TO");
    expect(res.headers.get("Access-Control-Allow-Origin")).toBe("*");
    expect(facilitator.verifyCalls).toBe(0);
    // X402_PAY_TO set: the offer pays to it.
    const ok = await call(app, signupRequest(), { ...signupEnv, X402_PAY_TO: PAY_TO });
    expect(ok.status).toBe(402);
    expect(((await ok.json()) as { accepts: Array<{ payTo: string }> }).accepts[0]!.payTo).toBe(PAY_TO);
    const bad = await call(app, signupRequest(), { ...signupEnv, X402_PAY_TO: "not-an-address" });
    expect((await expectError(bad, 503, "signup_unavailable", false)).error.message).toContain("X402_PAY_TO");
  });

  it("X402_PAY_TO overrides pay_to; a bad X402_FACILITATOR_URL is refused", async () => {
    const { app } = signupApp();
    const other = "0x3333333333333333333333333333333333333333";
    const res = await call(app, signupRequest(), { ...signupEnv, X402_PAY_TO: other });
    expect(((await res.json()) as { accepts: Array<{ payTo: string }> }).accepts[0]!.payTo).toBe(other);
    const bad = await call(app, signupRequest(), { ...signupEnv, X402_FACILITATOR_URL: "ftp://nope" });
    expect((await expectError(bad, 503, "signup_unavailable", false)).error.message).toContain("X402_FACILITATOR_URL");
  });

  it("MPP with the production methods: MPP_SECRET_KEY and the method's secrets are named", async () => {
    const config: SignupConfig = { ...TEST_SIGNUP, mpp: { methods: ["tempo/charge", "stripe/charge"], realm: "", challengeTtlSeconds: 300 } };
    const { app } = signupApp({ config, productionMpp: true });
    const res = await call(app, signupRequest(), { ...signupEnv, MPP_SECRET_KEY: undefined });
    const msg = (await expectError(res, 503, "signup_unavailable", false)).error.message;
    for (const name of ["MPP_SECRET_KEY", "TEMPO_RECIPIENT", "STRIPE_SECRET_KEY", "STRIPE_NETWORK_ID"]) expect(msg).toContain(name);
    const short = await call(app, signupRequest(), { ...signupEnv, MPP_SECRET_KEY: "too-short" });
    expect((await expectError(short, 503, "signup_unavailable", false)).error.message).toContain("at least 32 bytes");
  });
});

describe("signup: request checks before any payment (step 3-5)", () => {
  const { app, facilitator } = signupApp();

  it("body: empty or {name}; anything else is refused with no charge", async () => {
    const cases: Array<[string, Request, number, string]> = [
      ["text body", signupRequest({ "Content-Type": "text/plain" }, "hello"), 415, "unsupported_media_type"],
      ["not JSON", signupRequest({}, "{nope"), 400, "invalid_json"],
      ["array", signupRequest({}, [1]), 400, "invalid_input"],
      ["unknown field", signupRequest({}, { name: "a", scopes: ["x"] }), 400, "invalid_input"],
      ["name null", signupRequest({}, { name: null }), 400, "invalid_input"],
      ["bad name", signupRequest({}, { name: "no/slash" }), 400, "invalid_input"],
      ["long name", signupRequest({}, { name: "x".repeat(33) }), 400, "invalid_input"],
      ["too large", signupRequest({}, { name: "a", pad: "x".repeat(70_000) }), 413, "body_too_large"],
    ];
    for (const [label, req, status, code] of cases) {
      req.headers.set("PAYMENT-SIGNATURE", await paymentSignature());
      const res = await call(app, req);
      expect(res.status, label).toBe(status);
      await expectError(res, status, code);
    }
    expect(facilitator.verifyCalls).toBe(0);
  });

  it("Idempotency-Key must match ^[A-Za-z0-9_-]{32,128}$", async () => {
    for (const bad of ["short", "x".repeat(129), "a".repeat(31) + "!", "a".repeat(20) + " " + "a".repeat(20), "a".repeat(32) + "."]) {
      const res = await call(app, signupRequest({ "Idempotency-Key": bad, "PAYMENT-SIGNATURE": await paymentSignature() }));
      await expectError(res, 400, "invalid_input");
    }
    expect(facilitator.verifyCalls).toBe(0);
  });

  it("more than one payment credential → 400 invalid_payment", async () => {
    const mpp = "Payment eyJjaGFsbGVuZ2UiOnt9fQ";
    for (const headers of [
      { "PAYMENT-SIGNATURE": await paymentSignature(), "X-PAYMENT": await xPayment() },
      { "PAYMENT-SIGNATURE": await paymentSignature(), Authorization: mpp },
      { "X-PAYMENT": await xPayment(), Authorization: mpp },
      { Authorization: `${mpp}, ${mpp}` },
    ]) {
      await expectError(await call(app, signupRequest(headers)), 400, "invalid_payment");
    }
    expect(facilitator.verifyCalls).toBe(0);
  });

  it("no credential (an Authorization with another scheme is ignored) → 402 payment_required", async () => {
    for (const headers of [{}, { Authorization: "Bearer abc" }]) {
      const res = await call(app, signupRequest(headers));
      await expectError(res, 402, "payment_required");
    }
    // A credential for a rail that is not configured is no credential.
    const mppOnly = signupApp({ config: { ...TEST_SIGNUP, rails: ["mpp"], x402: null } }).app;
    const res = await call(mppOnly, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature() }));
    const body = await expectError(res, 402, "payment_required");
    expect(res.headers.get("PAYMENT-REQUIRED")).toBeNull();
    expect(body).not.toHaveProperty("accepts");
    expect(Challenge.fromResponseList(res)).toHaveLength(1);
  });
});

describe("signup: the offer (402)", () => {
  const { app } = signupApp({ withOther: true });

  it("PAYMENT-REQUIRED (x402 v2) and the same fields in the body, one WWW-Authenticate per MPP method", async () => {
    const res = await call(app, signupRequest());
    const body = await expectError(res, 402, "payment_required");
    expect(res.headers.get("Cache-Control")).toContain("no-store");
    const pr = decodePaymentRequiredHeader(res.headers.get("PAYMENT-REQUIRED")!);
    expect(pr).toEqual({
      x402Version: 2,
      error: body.error.message,
      resource: { url: SIGNUP_URL, description: expect.any(String), mimeType: "application/json" },
      accepts: [REQUIREMENT],
      extensions: {},
    });
    expect(body).toMatchObject({ price_mcents: 50_000, balance_mcents: 12_345, scopes: [SCOPE] });
    expect({ x402Version: body.x402Version, resource: body.resource, accepts: body.accepts, extensions: body.extensions }).toEqual({
      x402Version: pr.x402Version,
      resource: pr.resource,
      accepts: pr.accepts,
      extensions: pr.extensions,
    });
    expect(body).not.toHaveProperty("problem");
    // The key order of the body: the error shape first.
    expect(Object.keys(body).slice(0, 4)).toEqual(["ok", "error", "request_id", "note"]);

    const challenges = Challenge.fromResponseList(res);
    expect(challenges.map((c) => `${c.method}/${c.intent}`)).toEqual(["test/charge", "other/charge"]);
    for (const c of challenges) {
      expect(c.realm).toBe(REALM);
      expect(c.request).toMatchObject({ amount: "50000" });
      expect(Challenge.verify(c, { secretKey: SECRET })).toBe(true);
      expect(Date.parse(c.expires!)).toBeGreaterThan(Date.now());
    }
  });

  it("accepts is deterministic: two offers are deep-equal", async () => {
    const a = (await (await call(app, signupRequest())).json()) as { accepts: unknown };
    const b = (await (await call(app, signupRequest())).json()) as { accepts: unknown };
    expect(a.accepts).toEqual(b.accepts);
    expect(a.accepts).toEqual([REQUIREMENT]);
  });

  it("[signup.mpp] realm is used when set", async () => {
    const { app: realmApp } = signupApp({ config: { ...TEST_SIGNUP, mpp: { ...TEST_SIGNUP.mpp!, realm: "pay.example.com" } } });
    const [c] = Challenge.fromResponseList(await call(realmApp, signupRequest()));
    expect(c!.realm).toBe("pay.example.com");
  });
});

describe("signup over x402: malformed or foreign payments → 402 payment_invalid, nothing verified", () => {
  const { app, facilitator } = signupApp();

  it.each([
    ["not base64", async () => "%%%"],
    ["base64 of not JSON", async () => btoa("hello")],
    ["JSON but not a payment payload", async () => btoa(JSON.stringify({ x402Version: 2 }))],
    ["v1 payload in PAYMENT-SIGNATURE", () => xPayment()],
    ["another amount", () => paymentSignature({ accepted: { ...REQUIREMENT, amount: "1" } })],
    ["another payTo", () => paymentSignature({ accepted: { ...REQUIREMENT, payTo: PAYER } })],
    ["another EIP-712 name", () => paymentSignature({ accepted: { ...REQUIREMENT, extra: { name: "USD Coin", version: "2" } } })],
    ["another network", () => paymentSignature({ accepted: { ...REQUIREMENT, network: "eip155:8453" } })],
    ["no EIP-3009 nonce", () => paymentSignature({ nonce: "0x1234", signature: "0x" + "11".repeat(65) })],
  ] as Array<[string, () => Promise<string>]>)("%s", async (_label, header) => {
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await header() }));
    const body = await expectError(res, 402, "payment_invalid");
    expect(res.headers.get("PAYMENT-REQUIRED")).toBeTruthy();
    expect(body.accepts).toEqual([REQUIREMENT]);
    expect(facilitator.verifyCalls).toBe(0);
  });

  it.each([
    ["scheme other than exact", () => xPayment({ scheme: "upto" })],
    ["another network", () => xPayment({ network: "base" })],
    ["not JSON", async () => btoa("{")],
  ] as Array<[string, () => Promise<string>]>)("X-PAYMENT (v1): %s", async (_label, header) => {
    await expectError(await call(app, signupRequest({ "X-PAYMENT": await header() })), 402, "payment_invalid");
    expect(facilitator.verifyCalls).toBe(0);
  });
});

describe("signup over x402: pay, replay, idempotency", () => {
  it("201: a working key with the configured balance and scopes, a mint ledger row, PAYMENT-RESPONSE", async () => {
    const { app, facilitator } = signupApp();
    const nonce = freshNonce();
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }) }, { name: "agent-7" }));
    expect(res.status, await res.clone().text()).toBe(201);
    expect(res.headers.get("Cache-Control")).toContain("no-store");
    const body = (await res.json()) as SignupBody;
    expect(Object.keys(body)).toEqual(["ok", "key", "key_id", "balance_mcents", "scopes", "name", "payment", "request_id"]);
    expect(body).toMatchObject({ ok: true, balance_mcents: 12_345, scopes: [SCOPE], name: "agent-7", payment: { rail: "x402", reference: txHashFor(nonce) } });
    expect(body.key).toMatch(KEY_RE);
    expect(body.key_id).toMatch(/^k_[0-9a-f]{16}$/);
    expect(body.request_id).toBe(res.headers.get("X-Request-Id"));
    const settle = decodePaymentResponseHeader(res.headers.get("PAYMENT-RESPONSE")!);
    expect(settle).toMatchObject({ success: true, transaction: txHashFor(nonce), network: REQUIREMENT.network, payer: PAYER });
    expect(facilitator.verifyCalls).toBe(1);
    expect(facilitator.settleCalls).toBe(1);
    // The facilitator saw a v2 payload whose `accepted` is the offered requirement.
    expect(facilitator.seen[0]!.requirements).toEqual(REQUIREMENT);
    expect(facilitator.seen[0]!.payload.accepted).toEqual(REQUIREMENT);

    const me = await getMe(body.key);
    expect(me).toMatchObject({ key_id: body.key_id, balance_mcents: 12_345, scopes: [SCOPE], name: "agent-7", calls: 0 });
    const ledger = await getLedger(body.key);
    expect(ledger).toHaveLength(1);
    expect(ledger[0]).toMatchObject({ kind: "mint", amount_mcents: 12_345, balance_after: 12_345, request_id: body.request_id });
  });

  it("with an Idempotency-Key: the derived key; a retry gets 200 + the same body + replayed; others get 409", async () => {
    const { app, facilitator } = signupApp();
    const nonce = freshNonce();
    const idem = idempotencyKey();
    const sig = await paymentSignature({ nonce });
    const first = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }));
    expect(first.status).toBe(201);
    const a = (await first.json()) as SignupBody;
    expect(a.key).toBe(await expectedDerivedKey(idem, x402Reference(nonce)));

    const again = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }));
    expect(again.status).toBe(200);
    const b = (await again.json()) as SignupBody;
    expect(b).toEqual({ ...a, request_id: again.headers.get("X-Request-Id"), replayed: true });
    expect(decodePaymentResponseHeader(again.headers.get("PAYMENT-RESPONSE")!).transaction).toBe(txHashFor(nonce));

    for (const headers of [{ "PAYMENT-SIGNATURE": sig }, { "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idempotencyKey() }]) {
      const res = await call(app, signupRequest(headers));
      const err = await expectError(res, 409, "payment_already_used");
      expect(err.key_id).toBe(a.key_id);
    }
    // Never verified, settled or minted again.
    expect(facilitator.verifyCalls).toBe(1);
    expect(facilitator.settleCalls).toBe(1);
    expect((await getMe(a.key)).balance_mcents).toBe(12_345);
    expect(await getLedger(a.key)).toHaveLength(1);
  });

  it("without an Idempotency-Key the key is random and a retry is 409 (even with a key this time)", async () => {
    const { app } = signupApp();
    const sig = await paymentSignature();
    const first = (await (await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig }))).json()) as SignupBody;
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idempotencyKey() }));
    expect((await expectError(res, 409, "payment_already_used")).key_id).toBe(first.key_id);
  });

  it("the same authorization presented as v1 (X-PAYMENT) is the same payment", async () => {
    const { app, facilitator } = signupApp();
    const nonce = freshNonce();
    const idem = idempotencyKey();
    const first = (await (await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }), "Idempotency-Key": idem }))).json()) as SignupBody;
    const v1 = await call(app, signupRequest({ "X-PAYMENT": await xPayment({ nonce }), "Idempotency-Key": idem }));
    expect(v1.status).toBe(200);
    expect(((await v1.json()) as SignupBody).key).toBe(first.key);
    // Upper-case hex in the authorization is the same payment too.
    const upper = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce: nonce.toUpperCase().replace("0X", "0x") }) }));
    await expectError(upper, 409, "payment_already_used");
    expect(facilitator.verifyCalls).toBe(1);
  });

  it("X-PAYMENT (v1): converted to v2 with our requirement; answered with X-PAYMENT-RESPONSE", async () => {
    const { app, facilitator } = signupApp();
    const nonce = freshNonce();
    for (const network of ["base-sepolia", "eip155:84532"]) {
      const n = network === "base-sepolia" ? nonce : freshNonce();
      const res = await call(app, signupRequest({ "X-PAYMENT": await xPayment({ nonce: n, network }) }));
      expect(res.status, await res.clone().text()).toBe(201);
      expect(res.headers.get("PAYMENT-RESPONSE")).toBeNull();
      const settle = decodePaymentResponseHeader(res.headers.get("X-PAYMENT-RESPONSE")!);
      expect(settle).toMatchObject({ success: true, transaction: txHashFor(n), network });
    }
    const seen = facilitator.seen[0]!;
    expect(seen.payload.x402Version).toBe(2);
    expect(seen.payload.accepted).toEqual(REQUIREMENT);
    expect(seen.requirements).toEqual(REQUIREMENT);
  });

  it("stores no key and no Idempotency-Key, only its SHA-256", async () => {
    const { app } = signupApp();
    const nonce = freshNonce();
    const idem = idempotencyKey();
    const body = (await (await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }), "Idempotency-Key": idem }))).json()) as SignupBody;
    const dump = await dumpPaymentObject(`signup:${x402Reference(nonce)}`);
    expect(dump).toContain(body.key_id);
    expect(dump).toContain(await sha256Hex(idem));
    expect(dump).not.toContain(idem);
    expect(dump).not.toContain(body.key);
    expect(dump).not.toContain(body.key.slice(-64));
    expect(dump).not.toContain(await sha256Hex(body.key));
  });
});

describe("signup over x402: refused or failed payments charge nothing and can be retried", () => {
  it("isValid:false → 402 payment_invalid (the reason), not settled; the payment stays usable", async () => {
    const facilitator = new TestFacilitator("invalid");
    const { app } = signupApp({ facilitator });
    const sig = await paymentSignature();
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig }));
    const body = await expectError(res, 402, "payment_invalid");
    expect(body.error.message).toContain("invalid_exact_evm_payload_signature");
    expect(res.headers.get("PAYMENT-REQUIRED")).toBeTruthy();
    expect(facilitator.settleCalls).toBe(0);
    facilitator.mode = "ok";
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig }))).status).toBe(201);
  });

  it("a facilitator's 4xx {isValid:false} → 402 payment_invalid", async () => {
    const { app } = signupApp({ facilitator: new TestFacilitator("verify_4xx") });
    const body = await expectError(await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature() })), 402, "payment_invalid");
    expect(body.error.message).toContain("invalid_exact_evm_payload_signature");
  });

  it("a bad signature is refused locally (step 7): the facilitator is never asked", async () => {
    const { app, facilitator } = signupApp();
    await expectError(await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ signature: "0x" + "00".repeat(65) }) })), 402, "payment_invalid");
    expect(facilitator.verifyCalls).toBe(0);
    expect(facilitator.settleCalls).toBe(0);
  });

  it("success:false → 402 payment_failed; the payment stays usable", async () => {
    const facilitator = new TestFacilitator("settle_false");
    const { app } = signupApp({ facilitator });
    const sig = await paymentSignature();
    const body = await expectError(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig })), 402, "payment_failed");
    expect(body.error.message).toContain("insufficient_funds");
    expect(body.accepts).toEqual([REQUIREMENT]);
    facilitator.mode = "ok";
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig }))).status).toBe(201);
  });

  it("facilitator unreachable at verify → 502 payment_unavailable (nothing moved); the payment stays usable", async () => {
    const facilitator = new TestFacilitator("down");
    const { app, chain } = signupApp({ facilitator });
    const sig = await paymentSignature();
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig }));
    await expectError(res, 502, "payment_unavailable");
    expect(res.headers.get("PAYMENT-REQUIRED")).toBeNull();
    expect(facilitator.settleCalls).toBe(0);
    facilitator.mode = "ok";
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig }))).status).toBe(201);
    expect(chain.transfers).toBe(1);
  });

  it("facilitator unreachable at settle → 202 payment_pending (never 'no charge applied'); the retry settles once", async () => {
    const facilitator = new TestFacilitator("settle_down");
    const { app, chain } = signupApp({ facilitator });
    const sig = await paymentSignature();
    const idem = idempotencyKey();
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }));
    await expectError(res, 202, "payment_pending", false);
    expect(chain.transfers).toBe(0);
    facilitator.mode = "ok";
    // The retry asks the chain (nothing moved, still valid) and settles again.
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }))).status).toBe(201);
    expect(facilitator.settleCalls).toBe(2);
    expect(chain.transfers).toBe(1);
  });
});

describe("signup over x402: concurrency", () => {
  it("the same payment sent concurrently mints exactly one key; the others get 409 payment_in_progress", async () => {
    const { app, facilitator } = signupApp();
    let open!: () => void;
    facilitator.gate = new Promise((r) => (open = r));
    const sig = await paymentSignature();
    const idem = idempotencyKey();
    const first = call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }));
    // Wait until the first request holds the payment (its verify is waiting on the gate).
    for (let i = 0; i < 200 && facilitator.verifyCalls === 0; i++) await new Promise((r) => setTimeout(r, 5));
    expect(facilitator.verifyCalls).toBe(1);
    const losers = await Promise.all(Array.from({ length: 4 }, () => call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }))));
    for (const res of losers) {
      await expectError(res, 409, "payment_in_progress");
      expect(Number(res.headers.get("Retry-After"))).toBeGreaterThanOrEqual(1);
    }
    open();
    expect((await first).status).toBe(201);
    expect(facilitator.verifyCalls).toBe(1);
    expect(facilitator.settleCalls).toBe(1);
  });

  it("a burst of identical requests: one 201, the rest 409, one verification", async () => {
    const { app, facilitator } = signupApp();
    const sig = await paymentSignature();
    const results = await Promise.all(Array.from({ length: 8 }, () => call(app, signupRequest({ "PAYMENT-SIGNATURE": sig }))));
    const statuses = results.map((r) => r.status).sort();
    expect(statuses.filter((s) => s === 201)).toHaveLength(1);
    expect(statuses.filter((s) => s === 409)).toHaveLength(7);
    expect(facilitator.verifyCalls).toBe(1);
  });
});

describe("signup: a payment taken but not yet turned into a key is finished by a retry", () => {
  it("after the holder's lease, a retry mints without verifying or settling again", async () => {
    const { app, facilitator } = signupApp();
    const nonce = freshNonce();
    const reference = x402Reference(nonce);
    const idem = idempotencyKey();
    const obj = signupEnv.PAYMENTS.get(signupEnv.PAYMENTS.idFromName(`signup:${reference}`));
    // A request claimed the payment and settled it, then died before minting.
    const begin = await obj.signupBegin({ rail: "x402", reference });
    expect(begin.state).toBe("claimed");
    if (begin.state !== "claimed") return;
    const purchase = { name: null, balanceMcents: 12_345, scopes: [SCOPE] };
    expect(await obj.signupSettling(begin.token, { idemHash: await sha256Hex(idem), permit: null, purchase, x402: null })).toBe(true);
    expect(await obj.signupPaid(begin.token, { rail: "x402", reference: "0xsettled", header: null })).toBe(true);
    const busy = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }), "Idempotency-Key": idem }));
    await expectError(busy, 409, "payment_in_progress");
    await runInDurableObject(obj, (_i, state) => {
      state.storage.sql.exec("UPDATE signup_payment SET lease_until = 0");
    });
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }), "Idempotency-Key": idem }));
    expect(res.status).toBe(201);
    const body = (await res.json()) as SignupBody;
    expect(body.payment).toEqual({ rail: "x402", reference: "0xsettled" });
    expect(body.key).toBe(await expectedDerivedKey(idem, reference));
    expect((await getMe(body.key)).balance_mcents).toBe(12_345);
    expect(facilitator.verifyCalls).toBe(0);
    expect(facilitator.settleCalls).toBe(0);
  });

  it("minting into a key object that already holds the key returns it and credits nothing", async () => {
    const hash = await sha256Hex("srch_" + "ab".repeat(32));
    const stub = keyStub(hash);
    const args = { keyId: "k_0123456789abcdef", name: "x", balanceMcents: 500, scopes: [SCOPE], requestId: crypto.randomUUID() };
    expect(await stub.initOnce(args)).toEqual({ created: true, keyId: "k_0123456789abcdef", name: "x" });
    expect(await stub.initOnce({ ...args, keyId: "k_fedcba9876543210", balanceMcents: 999 })).toEqual({ created: false, keyId: "k_0123456789abcdef", name: "x" });
    expect((await stub.stats())!.balanceMcents).toBe(500);
    expect(await stub.ledger(10)).toHaveLength(1);
  });
});

describe("signup: its own hourly budget", () => {
  it("429 rate_limited with Retry-After when the signup budget is used up; a refused payment gives its slot back; admin mint is unaffected", async () => {
    const before = await budgetCounts();
    const facilitator = new TestFacilitator();
    const limit = before.signups + 1;
    const { app } = signupApp({ config: { ...TEST_SIGNUP, signupsPerHour: limit }, facilitator });

    // A refused payment takes the last slot only while it is processed.
    facilitator.mode = "invalid";
    await expectError(await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature() })), 402, "payment_invalid");
    expect((await budgetCounts()).signups).toBe(before.signups);
    facilitator.mode = "ok";
    const ok = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature() }));
    expect(ok.status).toBe(201);
    const after = await budgetCounts();
    expect(after.signups).toBe(limit);
    // Signups do not use the admin budget.
    expect(after.mints).toBe(before.mints);

    const verified = facilitator.verifyCalls;
    const sig = await paymentSignature();
    const limited = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig }));
    const body = await expectError(limited, 429, "rate_limited");
    const retry = Number(limited.headers.get("Retry-After"));
    expect(retry).toBeGreaterThanOrEqual(1);
    expect(body.retry_after_seconds).toBe(retry);
    expect(facilitator.verifyCalls).toBe(verified);

    // The admin budget is separate.
    const minted = await mintViaAdmin({ balance_mcents: 10, scopes: [SCOPE] });
    expect(minted.status).toBe(201);
    expect((await budgetCounts()).signups).toBe(limit);
    // The limited payment was not used up: with room in the budget, it buys a key.
    const { app: roomy } = signupApp({ facilitator });
    expect((await call(roomy, signupRequest({ "PAYMENT-SIGNATURE": sig }))).status).toBe(201);
  });
});

describe("signup: @x402/core's HTTP facilitator client (production path, fetch stubbed)", () => {
  afterEach(() => {
    vi.restoreAllMocks();
  });

  const FACILITATOR = "https://facilitator.example/x402";
  const env = { ...signupEnv, X402_FACILITATOR_URL: FACILITATOR + "/" };

  function stubFetch(answer: (path: string, body: any) => Response | Promise<Response>) {
    const calls: Array<{ url: string; body: any; authorization: string | null }> = [];
    vi.spyOn(globalThis, "fetch").mockImplementation(async (input: RequestInfo | URL, init?: RequestInit) => {
      const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
      // The chain (X402_RPC_URL) stays the test double of signup-helpers.ts.
      if (!url.startsWith(FACILITATOR)) return networkFetch(input, init);
      const body = JSON.parse(String(init?.body ?? "null"));
      calls.push({ url, body, authorization: new Headers(init?.headers).get("Authorization") });
      return answer(new URL(url).pathname, body);
    });
    return calls;
  }

  it("verify and settle are POSTed to X402_FACILITATOR_URL with {x402Version, paymentPayload, paymentRequirements}", async () => {
    const { app } = signupApp({ facilitator: null });
    const nonce = freshNonce();
    const calls = stubFetch((path) =>
      path.endsWith("/verify")
        ? Response.json({ isValid: true, payer: PAYER })
        : Response.json({ success: true, transaction: txHashFor(nonce), network: REQUIREMENT.network, payer: PAYER }),
    );
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }) }), env);
    expect(res.status, await res.clone().text()).toBe(201);
    expect(calls.map((c) => c.url)).toEqual([`${FACILITATOR}/verify`, `${FACILITATOR}/settle`]);
    for (const c of calls) {
      expect(c.body.x402Version).toBe(2);
      expect(c.body.paymentRequirements).toEqual(REQUIREMENT);
      expect(c.body.paymentPayload.accepted).toEqual(REQUIREMENT);
      expect(c.body.paymentPayload.payload.authorization.nonce).toBe(nonce);
    }
    expect(decodePaymentResponseHeader(res.headers.get("PAYMENT-RESPONSE")!).transaction).toBe(txHashFor(nonce));
    expect(calls.map((c) => c.authorization)).toEqual([null, null]);
  });

  it("X402_FACILITATOR_AUTHORIZATION is sent to the facilitator as Authorization", async () => {
    const { app } = signupApp({ facilitator: null });
    const nonce = freshNonce();
    const calls = stubFetch((path) =>
      path.endsWith("/verify") ? Response.json({ isValid: true }) : Response.json({ success: true, transaction: txHashFor(nonce), network: REQUIREMENT.network }),
    );
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }) }), { ...env, X402_FACILITATOR_AUTHORIZATION: "Bearer fac-key" });
    expect(res.status).toBe(201);
    expect(calls.map((c) => c.authorization)).toEqual(["Bearer fac-key", "Bearer fac-key"]);
  });

  it.each([
    ["verify 500", (p: string) => (p.endsWith("/verify") ? new Response("oops", { status: 500 }) : Response.json({})), 502, "payment_unavailable"],
    ["verify not JSON", () => new Response("<html>", { status: 200 }), 502, "payment_unavailable"],
    ["verify unreachable", () => Promise.reject(new TypeError("fetch failed")), 502, "payment_unavailable"],
    ["verify 400 {isValid:false}", () => Response.json({ isValid: false, invalidReason: "invalid_exact_evm_payload_signature" }, { status: 400 }), 402, "payment_invalid"],
    ["verify 200 {isValid:false}", () => Response.json({ isValid: false, invalidReason: "invalid_exact_evm_payload_signature" }), 402, "payment_invalid"],
    [
      "settle 200 {success:false}",
      (p: string) =>
        p.endsWith("/verify") ? Response.json({ isValid: true }) : Response.json({ success: false, errorReason: "invalid_transaction_state", transaction: "", network: REQUIREMENT.network }),
      402,
      "payment_failed",
    ],
    ["settle 502 (outcome unknown)", (p: string) => (p.endsWith("/verify") ? Response.json({ isValid: true }) : new Response("bad gateway", { status: 502 })), 202, "payment_pending"],
    [
      "settle 200 {success:false, settlement_pending}",
      (p: string) =>
        p.endsWith("/verify") ? Response.json({ isValid: true }) : Response.json({ success: false, errorReason: "settlement_pending", transaction: "", network: REQUIREMENT.network }),
      202,
      "payment_pending",
    ],
  ])("%s: the contract's answer, and the payment stays usable", async (_label, answer, status, code) => {
    const { app } = signupApp({ facilitator: null });
    const nonce = freshNonce();
    // The same payment and Idempotency-Key again (a pending payment is collected by its holder).
    const sig = await paymentSignature({ nonce });
    const idem = idempotencyKey();
    stubFetch(answer as (p: string) => Response);
    await expectError(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }), env), status, code, status !== 202);
    vi.restoreAllMocks();
    const calls = stubFetch((path) =>
      path.endsWith("/verify") ? Response.json({ isValid: true }) : Response.json({ success: true, transaction: txHashFor(nonce), network: REQUIREMENT.network }),
    );
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }), env)).status).toBe(201);
    // A pending payment is resolved without verifying again: the chain shows nothing moved, so it is settled again.
    expect(calls.map((c) => new URL(c.url).pathname)).toEqual(status === 202 ? ["/x402/settle"] : ["/x402/verify", "/x402/settle"]);
  });
});

describe("signup: CORS and request ids", () => {
  it("every signup response carries CORS and X-Request-Id", async () => {
    const { app } = signupApp();
    for (const req of [signupRequest(), signupRequest({ "PAYMENT-SIGNATURE": "%%%" }), signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature() })]) {
      const res = await call(app, req);
      expect(res.headers.get("Access-Control-Allow-Origin")).toBe("*");
      expect(res.headers.get("X-Request-Id")).toMatch(UUID);
    }
  });
});
