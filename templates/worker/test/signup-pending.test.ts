// POST /v1/signup when the outcome of a payment is not known at once (contract 3.9, issue 11):
// the facilitator settles but answers 500, never answers, or says settlement_pending → the
// payment is `pending` (202 payment_pending, never "no charge applied"), and a later request or
// the PaymentDO's alarm alone resolves it from the chain and delivers the key; the payer is
// charged once (settle calls and the chain's transfers are counted). A forged payload naming a
// real payment's from/nonce learns nothing. Expired or canceled authorizations are released.
// The admin listing shows every payment's state. Keys are derived with SIGNUP_SECRET.
import { runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { decodePaymentResponseHeader } from "@x402/core/http";
import { Errors, Method } from "mppx";
import { afterEach, describe, expect, it, vi } from "vitest";
import { GATEWAY } from "../src/generated/manifest";
import type { AppEnv } from "../src/lib/env";
import type { SignupSnapshot } from "../src/lib/payment-do";
import { ADMIN_KEY, BASE, SCOPE, errorOf, getLedger, getMe, keyStub } from "./helpers";
import {
  AUTHORIZATION_USED_TOPIC,
  MALLORY,
  PAYER,
  REQUIREMENT,
  SECRET,
  TEST_SIGNUP,
  TestFacilitator,
  budgetCounts,
  call,
  expectedDerivedKey,
  freshNonce,
  idempotencyKey,
  mppCredential,
  paymentObjectFor,
  paymentSignature,
  signupApp,
  signupEnv,
  signupRequest,
  testCharge,
  txHashFor,
  x402Reference,
  xPayment,
  type SignupBody,
} from "./signup-helpers";

const PENDING_MESSAGE =
  "The payment was submitted but its outcome is not known yet; retry this request (same payment, same Idempotency-Key) to collect your key.";

afterEach(() => {
  vi.restoreAllMocks();
});

function snapshot(reference: string): Promise<SignupSnapshot | null> {
  return paymentObjectFor(`signup:${reference}`).signupSnapshot() as Promise<SignupSnapshot | null>;
}

async function expectPending(res: Response, reference: string, transaction: string | null, idem: string): Promise<void> {
  const text = await res.clone().text();
  expect(res.status, text).toBe(202);
  expect(res.headers.get("Retry-After")).toBe("5");
  expect(res.headers.get("Cache-Control")).toContain("no-store");
  expect(JSON.parse(text)).toEqual({
    ok: false,
    error: { code: "payment_pending", message: PENDING_MESSAGE },
    request_id: res.headers.get("X-Request-Id"),
    payment: { rail: "x402", reference, state: "pending", transaction },
    idempotency_key: idem,
    retry_after_seconds: 5,
  });
}

async function expectError(res: Response, status: number, code: string, note = true) {
  const body = await errorOf(res.clone());
  expect(res.status, JSON.stringify(body)).toBe(status);
  expect(body.error.code).toBe(code);
  if (note) expect(body.note).toBe("no charge applied");
  else expect(body.note).toBeUndefined();
  return body;
}

/**
 * A validBefore a few seconds ahead: long enough that a slow (loaded) machine still settles before
 * it, short enough to wait out. A 1 s margin made the first request itself arrive expired under load.
 */
function soonValidBefore(): number {
  return Math.floor(Date.now() / 1000) + 3;
}

/** Waits until this machine's clock (and the test chain's, offset 0) is past `validBefore`. */
async function waitPast(validBefore: number): Promise<void> {
  const ms = validBefore * 1000 + 150 - Date.now();
  if (ms > 0) await new Promise((r) => setTimeout(r, ms));
}

const FAST: AppEnv = { ...signupEnv, X402_FACILITATOR_TIMEOUT_MS: "300" };

type Fault = "settle_then_500" | "settle_then_hang" | "settle_pending";
const FAULTS: Fault[] = ["settle_then_500", "settle_then_hang", "settle_pending"];

/** A payment whose settlement hits `fault`: the 202, and what the test needs to go on. */
async function pendingPayment(fault: Fault, withIdem = true) {
  const facilitator = new TestFacilitator(fault);
  const { app, chain } = signupApp({ facilitator });
  const nonce = freshNonce();
  const reference = x402Reference(nonce);
  const sig = await paymentSignature({ nonce });
  const idem = withIdem ? idempotencyKey() : null;
  const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem ?? undefined }), FAST);
  const body = (await res.clone().json()) as { idempotency_key: string };
  const tx = fault === "settle_pending" ? txHashFor(nonce) : null;
  await expectPending(res, reference, tx, idem ?? body.idempotency_key);
  expect(facilitator.settleCalls).toBe(1);
  // The money moved (or is about to, for settlement_pending) exactly once.
  expect(chain.transfers).toBe(fault === "settle_pending" ? 0 : 1);
  expect((await snapshot(reference))!.state).toBe("pending");
  return { app, chain, facilitator, nonce, reference, sig, idem: idem ?? body.idempotency_key, tx };
}

describe("signup over x402: settled, but the facilitator's answer is lost → 202 payment_pending, then the key", () => {
  it("the AuthorizationUsed topic is keccak256 of the event signature", () => {
    expect(AUTHORIZATION_USED_TOPIC).toBe("0x98de503528ee59b575ef0c0a2576a82497bfc029a5685b209e9ec333479b10a5");
  });

  it.each(FAULTS)("%s: a later request (same payment, same Idempotency-Key) gets the key; charged once", async (fault) => {
    const logs = vi.spyOn(console, "log");
    const p = await pendingPayment(fault);
    if (fault === "settle_pending") {
      // Not mined yet: still pending; the facilitator is asked again (it reconciles its own pending settlement).
      await expectPending(await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": p.sig, "Idempotency-Key": p.idem }), FAST), p.reference, p.tx, p.idem);
      expect(p.facilitator.settleCalls).toBe(2);
      expect(p.chain.transfers).toBe(0);
      p.chain.mine();
    }
    const settles = p.facilitator.settleCalls;
    const res = await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": p.sig, "Idempotency-Key": p.idem }), FAST);
    expect(res.status, await res.clone().text()).toBe(201);
    const body = (await res.json()) as SignupBody;
    expect(body.key).toBe(await expectedDerivedKey(p.idem, p.reference));
    expect(body.payment).toEqual({ rail: "x402", reference: txHashFor(p.nonce) });
    expect(decodePaymentResponseHeader(res.headers.get("PAYMENT-RESPONSE")!)).toMatchObject({ success: true, transaction: txHashFor(p.nonce) });
    expect((await getMe(body.key)).balance_mcents).toBe(12_345);
    // Found on chain: not settled again; the money moved once.
    expect(p.facilitator.settleCalls).toBe(settles);
    expect(p.chain.transfers).toBe(1);
    expect(p.chain.count("eth_getLogs")).toBeGreaterThanOrEqual(1);
    // Replay: the same key, nothing moves.
    const again = await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": p.sig, "Idempotency-Key": p.idem }), FAST);
    expect(again.status).toBe(200);
    expect(((await again.json()) as SignupBody).key).toBe(body.key);
    expect(p.facilitator.settleCalls).toBe(settles);
    expect(p.chain.transfers).toBe(1);
    expect(p.facilitator.verifyCalls).toBe(1);
    expect(await getLedger(body.key)).toHaveLength(1);
    // An info line on every state change, with the reference.
    const states = logs.mock.calls
      .map((c) => String(c[0]))
      .filter((l) => l.includes('"msg":"signup payment"') && l.includes(p.reference))
      .map((l) => JSON.parse(l).state);
    expect(states).toEqual(expect.arrayContaining(["claimed", "settling", "pending", "paid", "done"]));
  });

  it.each(FAULTS)("%s: the PaymentDO's alarm alone resolves it and mints the key; the holder collects it later", async (fault) => {
    const p = await pendingPayment(fault);
    const obj = paymentObjectFor(`signup:${p.reference}`);
    if (fault === "settle_pending") {
      // Not mined: the sweep settles again (the facilitator still says pending) and stays armed.
      expect(await runDurableObjectAlarm(obj)).toBe(true);
      expect((await snapshot(p.reference))!.state).toBe("pending");
      expect(await runInDurableObject(obj, (_i, state) => state.storage.getAlarm())).not.toBeNull();
      expect(p.chain.transfers).toBe(0);
      p.chain.mine();
    }
    expect(await runDurableObjectAlarm(obj)).toBe(true);
    const snap = await snapshot(p.reference);
    expect(snap!.state).toBe("done");
    expect(snap!.transaction).toBe(txHashFor(p.nonce));
    expect(p.chain.transfers).toBe(1);
    // No client was involved; the holder's next request gets the key the sweep minted.
    const res = await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": p.sig, "Idempotency-Key": p.idem }), FAST);
    expect(res.status, await res.clone().text()).toBe(200);
    const body = (await res.json()) as SignupBody;
    expect(body).toMatchObject({ replayed: true, balance_mcents: 12_345, scopes: [SCOPE], payment: { rail: "x402", reference: txHashFor(p.nonce) } });
    expect(body.key).toBe(await expectedDerivedKey(p.idem, p.reference));
    expect((await getMe(body.key)).balance_mcents).toBe(12_345);
    expect(await getLedger(body.key)).toHaveLength(1);
    expect(p.chain.transfers).toBe(1);
    expect(p.facilitator.settleCalls).toBe(fault === "settle_pending" ? 2 : 1);
    // Someone else presenting the same payment learns only that it was used.
    const other = await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": p.sig, "Idempotency-Key": idempotencyKey() }), FAST);
    expect((await expectError(other, 409, "payment_already_used")).key_id).toBe(body.key_id);
  });

  it("without an Idempotency-Key the 202 carries one made by the gateway; the retry with it gets the key", async () => {
    const p = await pendingPayment("settle_then_500", false);
    expect(p.idem).toMatch(/^[A-Za-z0-9_-]{43}$/);
    // Without it, the key cannot be shown.
    const without = await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": p.sig }), FAST);
    const err = await expectError(without, 409, "payment_already_used");
    expect(JSON.stringify(err)).not.toContain(p.idem);
    const res = await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": p.sig, "Idempotency-Key": p.idem }), FAST);
    expect(res.status).toBe(200);
    const body = (await res.json()) as SignupBody;
    expect(body.key).toBe(await expectedDerivedKey(p.idem, p.reference));
    expect(body.key_id).toBe(err.key_id);
    expect(p.chain.transfers).toBe(1);
    expect(p.facilitator.settleCalls).toBe(1);
  });

  it("the chain unreachable while resolving: stays pending (202); reachable again: the key", async () => {
    const p = await pendingPayment("settle_then_500");
    p.chain.down = true;
    await expectPending(await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": p.sig, "Idempotency-Key": p.idem }), FAST), p.reference, null, p.idem);
    expect(await runDurableObjectAlarm(paymentObjectFor(`signup:${p.reference}`))).toBe(true);
    expect((await snapshot(p.reference))!.state).toBe("pending");
    p.chain.down = false;
    expect((await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": p.sig, "Idempotency-Key": p.idem }), FAST)).status).toBe(201);
    expect(p.chain.transfers).toBe(1);
    expect(p.facilitator.settleCalls).toBe(1);
  });

  it("another authorization with the same from/nonce (validly signed) is refused while the recorded one is pending or done", async () => {
    const p = await pendingPayment("settle_then_500");
    const other = await paymentSignature({ nonce: p.nonce, validBefore: String(Math.floor(Date.now() / 1000) + 900) });
    await expectError(await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": other, "Idempotency-Key": p.idem }), FAST), 402, "payment_invalid");
    expect((await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": p.sig, "Idempotency-Key": p.idem }), FAST)).status).toBe(201);
    const res = await call(p.app, signupRequest({ "PAYMENT-SIGNATURE": other, "Idempotency-Key": p.idem }), FAST);
    const body = await expectError(res, 402, "payment_invalid");
    expect(body).not.toHaveProperty("key_id");
    expect(body).not.toHaveProperty("key");
  });
});

describe("signup over x402: a request that died while settling", () => {
  it.each([
    ["the transfer happened", true],
    ["nothing moved yet (the sweep settles it through the facilitator's HTTP API)", false],
  ])("%s: once its lease expired the sweep resolves it and mints the key", async (_label, moved) => {
    const { app, chain, facilitator } = signupApp();
    const nonce = freshNonce();
    const reference = x402Reference(nonce);
    const header = await paymentSignature({ nonce });
    const payload = JSON.parse(atob(header)) as { payload: { authorization: Record<string, string> } } & Record<string, unknown>;
    const idem = idempotencyKey();
    const obj = paymentObjectFor(`signup:${reference}`);
    // What a request records before /settle (step 11), then it dies.
    const begin = await obj.signupBegin({ rail: "x402", reference });
    if (begin.state !== "claimed") throw new Error(`unexpected ${begin.state}`);
    const authorization = payload.payload.authorization as never;
    expect(
      await obj.signupSettling(begin.token, {
        idemHash: await sha256(idem),
        permit: null,
        purchase: { name: "died", balanceMcents: 12_345, scopes: [SCOPE] },
        x402: { payload, requirement: { ...REQUIREMENT }, version: 2, clientNetwork: REQUIREMENT.network, authorization, facilitatorUrl: facilitator.url, rpcUrl: chain.url, fromBlock: String(chain.block) },
      }),
    ).toBe(true);
    if (moved) chain.transfer(PAYER, nonce);
    // While its lease runs, the sweep leaves it to its request (and stays armed).
    expect(await runDurableObjectAlarm(obj)).toBe(true);
    expect((await snapshot(reference))!.state).toBe("settling");
    await runInDurableObject(obj, (_i, state) => {
      state.storage.sql.exec("UPDATE signup_payment SET lease_until = 0");
    });
    expect(await runDurableObjectAlarm(obj)).toBe(true);
    expect((await snapshot(reference))!.state).toBe("done");
    expect(chain.transfers).toBe(1);
    expect(facilitator.settleCalls).toBe(moved ? 0 : 1);
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": header, "Idempotency-Key": idem }));
    expect(res.status, await res.clone().text()).toBe(200);
    const body = (await res.json()) as SignupBody;
    expect(body).toMatchObject({ name: "died", replayed: true, payment: { rail: "x402", reference: txHashFor(nonce) } });
    expect(body.key).toBe(await expectedDerivedKey(idem, reference));
    expect((await getMe(body.key)).balance_mcents).toBe(12_345);
    expect(chain.transfers).toBe(1);
  });
});

describe("signup over x402: a forged payload naming a real payment learns nothing", () => {
  it("unsigned / forged / another signer with a settled payment's from and nonce → 402 payment_invalid, no key_id, no key, no record read", async () => {
    const { app, facilitator, chain } = signupApp();
    const nonce = freshNonce();
    const reference = x402Reference(nonce);
    const idem = idempotencyKey();
    const paid = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }), "Idempotency-Key": idem }));
    expect(paid.status).toBe(201);
    const victim = (await paid.json()) as SignupBody;
    const obj = paymentObjectFor(`signup:${reference}`);
    const before = await runInDurableObject(obj, (_i, state) => JSON.stringify(state.storage.sql.exec("SELECT * FROM signup_payment").toArray()));

    const forgeries = [
      await paymentSignature({ nonce, signer: MALLORY }),
      await paymentSignature({ nonce, signature: "0x" + "ab".repeat(65) }),
      await paymentSignature({ nonce, signature: "0x" }),
      await xPayment({ nonce, signer: MALLORY }),
    ];
    for (const [i, forged] of forgeries.entries()) {
      const header = i === 3 ? "X-PAYMENT" : "PAYMENT-SIGNATURE";
      // With the victim's Idempotency-Key and without.
      for (const key of [idem, undefined]) {
        const res = await call(app, signupRequest({ [header]: forged, "Idempotency-Key": key }));
        const text = await res.clone().text();
        const body = await expectError(res, 402, "payment_invalid");
        expect(body).not.toHaveProperty("key_id");
        expect(body).not.toHaveProperty("key");
        expect(text).not.toContain(victim.key_id);
        expect(text).not.toContain(victim.key.slice(-64));
      }
    }
    expect(facilitator.verifyCalls).toBe(1);
    expect(facilitator.settleCalls).toBe(1);
    expect(chain.transfers).toBe(1);
    // The record was not touched (not even its lease or sequence number).
    const after = await runInDurableObject(obj, (_i, state) => JSON.stringify(state.storage.sql.exec("SELECT * FROM signup_payment").toArray()));
    expect(after).toBe(before);
  });

  it("a forged payload for a payment another request is processing → 402, not 409 payment_in_progress", async () => {
    const { app, facilitator } = signupApp();
    let open!: () => void;
    facilitator.gate = new Promise((r) => (open = r));
    const nonce = freshNonce();
    const first = call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }) }));
    for (let i = 0; i < 200 && facilitator.verifyCalls === 0; i++) await new Promise((r) => setTimeout(r, 5));
    const forged = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce, signer: MALLORY }) }));
    await expectError(forged, 402, "payment_invalid");
    open();
    expect((await first).status).toBe(201);
  });
});

describe("signup over x402: payments that can no longer move are released", () => {
  it("settle unreachable (nothing moved), then the authorization expires → released: 402 on retry, budget slot back", async () => {
    const before = (await budgetCounts()).signups;
    const facilitator = new TestFacilitator("settle_down");
    const { app, chain } = signupApp({ facilitator });
    const nonce = freshNonce();
    const reference = x402Reference(nonce);
    const validBefore = soonValidBefore();
    const sig = await paymentSignature({ nonce, validBefore: String(validBefore) });
    const idem = idempotencyKey();
    await expectPending(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem })), reference, null, idem);
    expect((await budgetCounts()).signups).toBe(before + 1);
    await waitPast(validBefore);
    facilitator.mode = "ok";
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }));
    const body = await expectError(res, 402, "payment_failed");
    expect(body.error.message).toContain("expired without being settled");
    expect((await snapshot(reference))!.state).toBe("released");
    expect((await budgetCounts()).signups).toBe(before);
    // Never settled again after it expired; no money moved.
    expect(facilitator.settleCalls).toBe(1);
    expect(chain.transfers).toBe(0);
    // Released: claimable again, and refused by the facilitator (expired).
    await expectError(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem })), 402, "payment_invalid");
    expect(chain.transfers).toBe(0);
  });

  it("the sweep releases an expired pending payment too", async () => {
    const before = (await budgetCounts()).signups;
    const facilitator = new TestFacilitator("settle_down");
    const { app, chain } = signupApp({ facilitator });
    const nonce = freshNonce();
    const reference = x402Reference(nonce);
    const validBefore = soonValidBefore();
    const sig = await paymentSignature({ nonce, validBefore: String(validBefore) });
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig }))).status).toBe(202);
    await waitPast(validBefore);
    expect(await runDurableObjectAlarm(paymentObjectFor(`signup:${reference}`))).toBe(true);
    expect((await snapshot(reference))!.state).toBe("released");
    expect((await budgetCounts()).signups).toBe(before);
    expect(chain.transfers).toBe(0);
    expect(facilitator.settleCalls).toBe(1);
  });

  it("expiry is the chain's clock, not the server's: a server clock past validBefore with the chain behind keeps it pending (the transfer may still be mined); released once the chain passes it", async () => {
    const before = (await budgetCounts()).signups;
    const facilitator = new TestFacilitator("settle_down");
    const { app, chain } = signupApp({ facilitator });
    const nonce = freshNonce();
    const reference = x402Reference(nonce);
    const validBefore = soonValidBefore();
    const sig = await paymentSignature({ nonce, validBefore: String(validBefore) });
    const idem = idempotencyKey();
    await expectPending(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem })), reference, null, idem);
    await waitPast(validBefore);
    // This machine's clock is past validBefore; the chain's blocks are still stamped 30 s earlier,
    // so the facilitator's transfer can still be mined: not released, by a request nor the sweep.
    chain.clockOffsetSeconds = -30;
    facilitator.mode = "settle_false";
    await expectPending(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem })), reference, null, idem);
    expect(await runDurableObjectAlarm(paymentObjectFor(`signup:${reference}`))).toBe(true);
    expect((await snapshot(reference))!.state).toBe("pending");
    expect((await budgetCounts()).signups).toBe(before + 1);
    expect(chain.count("eth_getBlockByNumber")).toBeGreaterThanOrEqual(2);
    // The in-flight transfer is mined in a block stamped before validBefore: the payer gets the key.
    chain.transfer(PAYER, nonce);
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }));
    expect(res.status, await res.clone().text()).toBe(201);
    expect(((await res.json()) as SignupBody).key).toBe(await expectedDerivedKey(idem, reference));
    expect(chain.transfers).toBe(1);

    // Another payment, never mined: released only once the chain's clock passes validBefore.
    const nonce2 = freshNonce();
    const reference2 = x402Reference(nonce2);
    const vb2 = soonValidBefore();
    const sig2 = await paymentSignature({ nonce: nonce2, validBefore: String(vb2) });
    chain.clockOffsetSeconds = 0;
    facilitator.mode = "settle_down";
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig2, "Idempotency-Key": idem }))).status).toBe(202);
    await waitPast(vb2);
    chain.clockOffsetSeconds = -30;
    expect(await runDurableObjectAlarm(paymentObjectFor(`signup:${reference2}`))).toBe(true);
    expect((await snapshot(reference2))!.state).toBe("pending");
    chain.clockOffsetSeconds = 0;
    expect(await runDurableObjectAlarm(paymentObjectFor(`signup:${reference2}`))).toBe(true);
    expect((await snapshot(reference2))!.state).toBe("released");
    expect(chain.transfers).toBe(1);
  });

  it("the payer canceled the authorization → released: 402 payment_failed, budget slot back", async () => {
    const before = (await budgetCounts()).signups;
    const facilitator = new TestFacilitator("settle_down");
    const { app, chain } = signupApp({ facilitator });
    const nonce = freshNonce();
    const reference = x402Reference(nonce);
    const sig = await paymentSignature({ nonce });
    const idem = idempotencyKey();
    await expectPending(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem })), reference, null, idem);
    chain.cancel(PAYER, nonce);
    const body = await expectError(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem })), 402, "payment_failed");
    expect(body.error.message).toContain("canceled");
    expect((await snapshot(reference))!.state).toBe("released");
    expect((await budgetCounts()).signups).toBe(before);
    expect(facilitator.settleCalls).toBe(1);
    expect(chain.transfers).toBe(0);
  });

  it("a refusal when settling again (an earlier outcome unknown) keeps it pending until validBefore: a transfer may still be in flight", async () => {
    const facilitator = new TestFacilitator("settle_down");
    const { app, chain } = signupApp({ facilitator });
    const nonce = freshNonce();
    const reference = x402Reference(nonce);
    const sig = await paymentSignature({ nonce });
    const idem = idempotencyKey();
    await expectPending(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem })), reference, null, idem);
    facilitator.mode = "settle_false";
    await expectPending(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem })), reference, null, idem);
    expect(facilitator.settleCalls).toBe(2);
    expect((await snapshot(reference))!.state).toBe("pending");
    facilitator.mode = "ok";
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }))).status).toBe(201);
    expect(chain.transfers).toBe(1);
  });

  it("a definite settle refusal is checked on chain: nothing moved → 402 payment_failed (no charge), released", async () => {
    const facilitator = new TestFacilitator("settle_false");
    const { app, chain } = signupApp({ facilitator });
    const nonce = freshNonce();
    await expectError(await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }) })), 402, "payment_failed");
    expect(chain.count("eth_getLogs")).toBeGreaterThanOrEqual(1);
    expect((await snapshot(x402Reference(nonce)))!.state).toBe("released");
  });

  it("the chain unreachable before settle → 502 payment_unavailable, nothing settled, the claim released", async () => {
    const before = (await budgetCounts()).signups;
    const { app, chain, facilitator } = signupApp();
    const nonce = freshNonce();
    const sig = await paymentSignature({ nonce });
    chain.down = true;
    const body = await expectError(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig })), 502, "payment_unavailable");
    expect(body.error.message).toContain("X402_RPC_URL");
    expect(facilitator.settleCalls).toBe(0);
    expect((await snapshot(x402Reference(nonce)))!.state).toBe("released");
    expect((await budgetCounts()).signups).toBe(before);
    chain.down = false;
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig }))).status).toBe(201);
    expect(chain.transfers).toBe(1);
  });
});

describe("signup over MPP: an error that is not a refusal leaves the payment pending", () => {
  it("the method throws (network) → 502 payment_unavailable with the payment reference, no note; never run again", async () => {
    let runs = 0;
    const flaky = Method.toServer(testCharge, {
      defaults: { currency: "usd-test", recipient: "acct-test" },
      async verify() {
        runs++;
        throw new TypeError("fetch failed: connection reset");
      },
    });
    const { app } = signupApp({
      payments: () => ({ ok: true, setup: { methods: [flaky], secretKey: SECRET, offers: (m: number) => [["test/charge", { amount: String(m) }] as const] } }),
    });
    const credential = await mppCredential(app);
    const res = await call(app, signupRequest({ Authorization: credential }));
    const body = await expectError(res, 502, "payment_unavailable", false);
    const reference = (body.payment as { reference: string }).reference;
    expect(body.payment).toEqual({ rail: "mpp", reference: expect.stringMatching(/^mpp:/), state: "pending" });
    expect(runs).toBe(1);
    expect((await snapshot(reference))!.state).toBe("pending");
    // Again: still pending, the method is not run a second time.
    await expectError(await call(app, signupRequest({ Authorization: credential })), 502, "payment_unavailable", false);
    expect(runs).toBe(1);
    // A refusal is still a refusal (released, 402, no charge).
    const refusing = Method.toServer(testCharge, {
      defaults: { currency: "usd-test", recipient: "acct-test" },
      async verify() {
        throw new Errors.VerificationFailedError({ reason: "refused" });
      },
    });
    const { app: app2 } = signupApp({
      payments: () => ({ ok: true, setup: { methods: [refusing], secretKey: SECRET, offers: (m: number) => [["test/charge", { amount: String(m) }] as const] } }),
    });
    const c2 = await mppCredential(app2);
    await expectError(await call(app2, signupRequest({ Authorization: c2 })), 402, "payment_invalid");
  });
});

describe("signup over x402: a replay answers in the presenting request's protocol version", () => {
  it("settled through v2 (PAYMENT-SIGNATURE), replayed as v1 (X-PAYMENT) → X-PAYMENT-RESPONSE with v1's network name; and back", async () => {
    const { app, facilitator } = signupApp();
    for (const [first, second] of [["v2", "v1"], ["v1", "v2"]] as const) {
      const nonce = freshNonce();
      const idem = idempotencyKey();
      const header = async (v: "v1" | "v2") =>
        v === "v2" ? { "PAYMENT-SIGNATURE": await paymentSignature({ nonce }) } : { "X-PAYMENT": await xPayment({ nonce, network: "base-sepolia" }) };
      const a = await call(app, signupRequest({ ...(await header(first)), "Idempotency-Key": idem }));
      expect(a.status).toBe(201);
      const b = await call(app, signupRequest({ ...(await header(second)), "Idempotency-Key": idem }));
      expect(b.status).toBe(200);
      expect(((await b.json()) as SignupBody).key).toBe(((await a.json()) as SignupBody).key);
      if (second === "v1") {
        expect(b.headers.get("PAYMENT-RESPONSE")).toBeNull();
        expect(decodePaymentResponseHeader(b.headers.get("X-PAYMENT-RESPONSE")!)).toMatchObject({ success: true, transaction: txHashFor(nonce), network: "base-sepolia" });
      } else {
        expect(b.headers.get("X-PAYMENT-RESPONSE")).toBeNull();
        expect(decodePaymentResponseHeader(b.headers.get("PAYMENT-RESPONSE")!)).toMatchObject({ success: true, transaction: txHashFor(nonce), network: REQUIREMENT.network });
      }
    }
    expect(facilitator.settleCalls).toBe(2);
  });
});

describe("GET /v1/admin/payments", () => {
  const url = `${BASE}/v1/admin/payments`;
  const admin = (query = "", key: string | null = ADMIN_KEY, init: RequestInit = {}) =>
    new Request(url + query, { ...init, headers: { ...(key !== null ? { "X-Admin-Key": key } : {}), Origin: "https://evil.example" } });

  it("needs the admin key, validates its query, never carries CORS", async () => {
    const { app } = signupApp();
    await expectError(await call(app, admin("", null)), 401, "invalid_admin_key", false);
    await expectError(await call(app, admin("", "wrong")), 401, "invalid_admin_key", false);
    await expectError(await call(app, admin(""), { ...signupEnv, ADMIN_KEY: "" }), 503, "admin_disabled", false);
    const post = await call(app, admin("", ADMIN_KEY, { method: "POST" }));
    await expectError(post, 405, "method_not_allowed", false);
    expect(post.headers.get("Allow")).toBe("GET");
    for (const q of ["?state=bogus", "?limit=0", "?limit=501", "?limit=abc", "?limit=-1"]) {
      await expectError(await call(app, admin(q)), 400, "invalid_input", false);
    }
    const ok = await call(app, admin());
    expect(ok.status).toBe(200);
    for (const [k] of ok.headers) expect(k.startsWith("access-control-")).toBe(false);
  });

  it("lists each payment with its state, newest first, without any secret", async () => {
    const facilitator = new TestFacilitator();
    const { app } = signupApp({ facilitator });
    const idem = idempotencyKey();
    // done
    const doneNonce = freshNonce();
    const doneSig = await paymentSignature({ nonce: doneNonce });
    const done = (await (await call(app, signupRequest({ "PAYMENT-SIGNATURE": doneSig, "Idempotency-Key": idem }))).json()) as SignupBody;
    // released (refused settle, nothing moved)
    facilitator.mode = "settle_false";
    const relNonce = freshNonce();
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce: relNonce }) }))).status).toBe(402);
    // pending
    facilitator.mode = "settle_then_500";
    const pendNonce = freshNonce();
    const pendIdem = idempotencyKey();
    expect((await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce: pendNonce }), "Idempotency-Key": pendIdem }))).status).toBe(202);

    const res = await call(app, admin("?limit=500"));
    expect(res.status).toBe(200);
    const text = await res.clone().text();
    const body = JSON.parse(text) as { ok: boolean; payments: Array<Record<string, unknown>>; request_id: string };
    expect(body.ok).toBe(true);
    expect(body.request_id).toBe(res.headers.get("X-Request-Id"));
    const byRef = new Map(body.payments.map((p) => [p.reference as string, p]));
    const d = byRef.get(x402Reference(doneNonce))!;
    expect(d).toEqual({
      reference: x402Reference(doneNonce),
      rail: "x402",
      state: "done",
      transaction: txHashFor(doneNonce),
      key_id: done.key_id,
      created_at: expect.any(Number),
      updated_at: expect.any(Number),
    });
    expect(byRef.get(x402Reference(relNonce))).toMatchObject({ state: "released", key_id: null });
    expect(byRef.get(x402Reference(pendNonce))).toMatchObject({ state: "pending", key_id: null, transaction: null });
    const times = body.payments.map((p) => p.updated_at as number);
    expect([...times].sort((a, b) => b - a)).toEqual(times);
    // Never a key, a key hash, an Idempotency-Key (or its hash) or a signature.
    for (const secret of [done.key, done.key.slice(-64), idem, pendIdem, doneSig]) expect(text).not.toContain(secret);
    const sigHex = (JSON.parse(atob(doneSig)) as { payload: { signature: string } }).payload.signature;
    expect(text).not.toContain(sigHex.slice(2));
    expect(text).not.toContain(await sha256(idem));
    expect(text).not.toContain(await sha256(done.key));

    // ?state= filters, ?limit= bounds.
    const pend = (await (await call(app, admin("?state=pending&limit=500"))).json()) as { payments: Array<{ state: string; reference: string }> };
    expect(pend.payments.every((p) => p.state === "pending")).toBe(true);
    expect(pend.payments.map((p) => p.reference)).toContain(x402Reference(pendNonce));
    const one = (await (await call(app, admin("?limit=1"))).json()) as { payments: unknown[] };
    expect(one.payments).toHaveLength(1);

    // Resolved: the index follows.
    expect(await runDurableObjectAlarm(paymentObjectFor(`signup:${x402Reference(pendNonce)}`))).toBe(true);
    const after = (await (await call(app, admin("?state=done&limit=500"))).json()) as { payments: Array<{ reference: string; transaction: string }> };
    expect(after.payments.find((p) => p.reference === x402Reference(pendNonce))).toMatchObject({ transaction: txHashFor(pendNonce) });
  });
});

async function sha256(text: string): Promise<string> {
  return Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text))), (b) => b.toString(16).padStart(2, "0")).join("");
}

describe("signup: SIGNUP_SECRET and X402_RPC_URL", () => {
  it("missing or shorter than 32 bytes → 503 signup_unavailable naming SIGNUP_SECRET, before anything is read", async () => {
    const { app, facilitator } = signupApp();
    for (const s of [undefined, "", "x".repeat(31)]) {
      const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature() }, "{not json"), { ...signupEnv, SIGNUP_SECRET: s });
      expect((await expectError(res, 503, "signup_unavailable", false)).error.message).toContain("SIGNUP_SECRET");
    }
    expect(facilitator.verifyCalls).toBe(0);
  });

  it("the derived key depends on SIGNUP_SECRET", async () => {
    const { app } = signupApp();
    const other = "another-signup-secret-0123456789abcdef-0123456789";
    const idem = idempotencyKey();
    const nonce = freshNonce();
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature({ nonce }), "Idempotency-Key": idem }), { ...signupEnv, SIGNUP_SECRET: other });
    expect(res.status).toBe(201);
    const key = ((await res.json()) as SignupBody).key;
    expect(key).toBe(await expectedDerivedKey(idem, x402Reference(nonce), other));
    expect(key).not.toBe(await expectedDerivedKey(idem, x402Reference(nonce)));
  });

  it("the x402 rail without X402_RPC_URL or rpc_url → 503 naming X402_RPC_URL; X402_RPC_URL overrides rpc_url", async () => {
    const config = { ...TEST_SIGNUP, x402: { ...TEST_SIGNUP.x402!, rpcUrl: "" } };
    const facilitator = new TestFacilitator();
    const { app } = signupApp({ config, facilitator, keepUrls: true });
    const res = await call(app, signupRequest());
    expect((await expectError(res, 503, "signup_unavailable", false)).error.message).toContain("X402_RPC_URL");
    const ok = await call(app, signupRequest({ "PAYMENT-SIGNATURE": await paymentSignature() }), { ...signupEnv, X402_RPC_URL: facilitator.chain.url });
    expect(ok.status, await ok.clone().text()).toBe(201);
    expect(facilitator.chain.count("eth_blockNumber")).toBe(1);
  });
});

describe("signup: records of the first schema (before SIGNUP_SECRET)", () => {
  it("a used payment stays used; its Idempotency-Key still gets the key it bought (first derivation)", async () => {
    const { app, facilitator } = signupApp();
    const nonce = freshNonce();
    const reference = x402Reference(nonce);
    const idem = idempotencyKey();
    const enc = new TextEncoder();
    const k = await crypto.subtle.importKey("raw", enc.encode(idem), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    const mac = new Uint8Array(await crypto.subtle.sign("HMAC", k, enc.encode("mcpay-signup-v1:" + reference)));
    const v1Key = GATEWAY.keyPrefix + Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join("");
    const keyId = "k_00112233445566ff";
    expect(await keyStub(await sha256(v1Key)).initOnce({ keyId, name: null, balanceMcents: 12_345, scopes: [SCOPE], requestId: crypto.randomUUID() })).toMatchObject({ created: true });
    const record = { rail: "x402", reference: "0xold", header: null, keyId, name: null, balanceMcents: 12_345, scopes: [SCOPE], idemHash: await sha256(idem), mintedAt: 1 };
    await runInDurableObject(paymentObjectFor(`signup:${reference}`), (_i, state) => {
      state.storage.sql.exec(`CREATE TABLE signup (
        id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT NOT NULL CHECK (state IN ('pending', 'paid', 'done')), token TEXT NOT NULL,
        lease_until INTEGER NOT NULL, paid TEXT, record TEXT, updated_at INTEGER NOT NULL)`);
      state.storage.sql.exec("INSERT INTO signup VALUES (1, 'done', 'old', 0, NULL, ?, 1)", JSON.stringify(record));
    });
    const sig = await paymentSignature({ nonce });
    const res = await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig, "Idempotency-Key": idem }));
    expect(res.status, await res.clone().text()).toBe(200);
    expect(((await res.json()) as SignupBody).key).toBe(v1Key);
    expect((await expectError(await call(app, signupRequest({ "PAYMENT-SIGNATURE": sig })), 409, "payment_already_used")).key_id).toBe(keyId);
    expect(facilitator.verifyCalls).toBe(0);
  });
});
