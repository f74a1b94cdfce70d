// The challenge id is HMAC-SHA256 over realm|method|intent|request|expires|digest|opaque
// (base64url, no padding): the reproducible vector of the MPP spec.
import { Challenge } from "mppx";
import { describe, expect, it } from "vitest";
import { mcentsToCents, mcentsToDollars, productionPayments, secretKeyProblem } from "../../src/mpp/methods";
import { mppEnv } from "./helpers";

const VECTOR = {
  secretKey: "secret-key",
  realm: "api.example.com",
  method: "tempo",
  intent: "charge",
  request: { amount: "100", currency: "0xabc", recipient: "0xdef" },
  expires: "2099-01-01T00:00:00Z",
};

describe("challenge id HMAC binding", () => {
  it("reproduces the spec vector", () => {
    const c = Challenge.from(VECTOR);
    expect(c.id).toBe("Ip25HCkqcMaW6FT_ziOG9BT58-7_KEwkzhdUwX8tmI8");
    expect(Challenge.verify(c, { secretKey: "secret-key" })).toBe(true);
  });

  it("any changed field or another key breaks it", () => {
    const c = Challenge.from(VECTOR);
    expect(Challenge.verify({ ...c, realm: "other.example.com" }, { secretKey: "secret-key" })).toBe(false);
    expect(Challenge.verify({ ...c, request: { ...c.request, amount: "101" } }, { secretKey: "secret-key" })).toBe(false);
    expect(Challenge.verify({ ...c, expires: "2099-01-01T00:00:01Z" }, { secretKey: "secret-key" })).toBe(false);
    expect(Challenge.verify(c, { secretKey: "another-key" })).toBe(false);
  });
});

describe("production payment configuration", () => {
  it("requires MPP_SECRET_KEY of at least 32 bytes", () => {
    expect(secretKeyProblem(undefined)).not.toBeNull();
    expect(secretKeyProblem("short")).not.toBeNull();
    expect(secretKeyProblem("x".repeat(32))).toBeNull();
  });

  it("refuses to take payments without each method's secrets", () => {
    const r = productionPayments({ ...mppEnv, TEMPO_RECIPIENT: undefined, STRIPE_SECRET_KEY: undefined }, ["tempo/charge", "stripe/charge"]);
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.problems.join("\n")).toMatch(/TEMPO_RECIPIENT[\s\S]*STRIPE_SECRET_KEY/);
  });

  it("builds mppx's tempo (charge, session) and stripe methods when configured (not exercised against a network)", () => {
    const r = productionPayments(
      { ...mppEnv, TEMPO_RECIPIENT: "0x00000000000000000000000000000000000000aa", STRIPE_SECRET_KEY: "sk_test_x", STRIPE_NETWORK_ID: "net_x" },
      ["tempo/charge", "tempo/session", "stripe/charge"],
    );
    expect(r.ok, r.ok ? "" : r.problems.join()).toBe(true);
    if (!r.ok) return;
    expect(r.setup.methods.map((m) => `${m.name}/${m.intent}`)).toEqual(["tempo/charge", "tempo/session", "stripe/charge"]);
    expect(r.setup.offers(1000)).toEqual([
      ["tempo/charge", { amount: "0.01" }],
      ["tempo/session", { amount: "0.01" }],
      ["stripe/charge", { amount: "0.01" }],
    ]);
  });

  it("converts mcents to dollar amounts (cards: whole cents, rounded up)", () => {
    expect(mcentsToDollars(1000)).toBe("0.01");
    expect(mcentsToDollars(250)).toBe("0.0025");
    expect(mcentsToDollars(123_456_789)).toBe("1234.56789");
    expect(mcentsToCents(250)).toBe("0.01");
    expect(mcentsToCents(100_000)).toBe("1");
  });
});
