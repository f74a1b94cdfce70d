import { describe, expect, it } from "vitest";
import { CALL_TYPES, RATE_LIMIT_PER_MINUTE, SAMPLE_INPUT, SCOPE_FOR } from "../src/generated/manifest";
import { EP, PRICE, SAMPLE, balanceFor, callPaid, errorOf, getMe, seedKey } from "./helpers";

const LIMIT = RATE_LIMIT_PER_MINUTE[EP];

describe("per-key, per-endpoint rate limit", () => {
  it.skipIf(LIMIT <= 0 || LIMIT > 600)("RATE_LIMIT_PER_MINUTE calls succeed, the next → 429 with Retry-After, no charge", async () => {
    const balance = balanceFor(LIMIT + 5);
    const { key } = await seedKey({ balance });
    for (let i = 0; i < LIMIT; i++) {
      const res = await callPaid(EP, key, SAMPLE);
      expect(res.status, `call ${i + 1}`).toBe(200);
    }
    const res = await callPaid(EP, key, SAMPLE);
    expect(res.status).toBe(429);
    const retry = Number(res.headers.get("Retry-After"));
    expect(Number.isInteger(retry)).toBe(true);
    expect(retry).toBeGreaterThanOrEqual(1);
    expect(retry).toBeLessThanOrEqual(60);
    const body = await errorOf(res);
    expect(body.error.code).toBe("rate_limited");
    expect(body.retry_after_seconds).toBe(retry);
    expect(body.note).toBe("no charge applied");
    expect(res.headers.get("X-Charged-Mcents")).toBeNull();
    const me = await getMe(key);
    expect(me.balance_mcents).toBe(balance - LIMIT * PRICE);
    expect(me.calls).toBe(LIMIT);

    // Another key is not affected.
    const other = await seedKey({ balance: balanceFor(1) });
    expect((await callPaid(EP, other.key, SAMPLE)).status).toBe(200);

    // Another endpoint of the same key is not affected (when the manifest has one).
    const ep2 = CALL_TYPES.find((c) => c !== EP && RATE_LIMIT_PER_MINUTE[c] !== 0);
    if (ep2) {
      const k2 = await seedKey({ balance: balanceFor(LIMIT) + balanceFor(2, ep2), scopes: [SCOPE_FOR[EP], SCOPE_FOR[ep2]] });
      for (let i = 0; i < LIMIT; i++) await callPaid(EP, k2.key, SAMPLE);
      expect((await callPaid(ep2, k2.key, SAMPLE_INPUT[ep2])).status).toBe(200);
    }
  });
});
