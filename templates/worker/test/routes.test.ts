import { describe, expect, it } from "vitest";
import { CALL_TYPES, DESCRIPTION, INPUT_SHAPE, PRICE_MCENTS, PROJECT, RATE_LIMIT_PER_MINUTE, SCOPE_FOR, XP_AWARD } from "../src/generated/manifest";
import { EP, SAMPLE, callPaid, errorOf, fetchSelf, seedKey, balanceFor } from "./helpers";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

describe("free routes", () => {
  it("GET /v1/health", async () => {
    const res = await fetchSelf("/v1/health");
    expect(res.status).toBe(200);
    expect(res.headers.get("Content-Type")).toMatch(/^application\/json/);
    expect(await res.json()).toEqual({ ok: true, status: "ok", service: PROJECT.name, version: PROJECT.version });
  });

  it("GET /v1/pricing lists every endpoint from the manifest", async () => {
    const res = await fetchSelf("/v1/pricing");
    expect(res.status).toBe(200);
    const body = (await res.json()) as { ok: boolean; unit: string; mcents_per_cent: number; endpoints: Array<Record<string, unknown>> };
    expect(body.ok).toBe(true);
    expect(body.unit).toBe("mcents");
    expect(body.mcents_per_cent).toBe(1000);
    expect(body.endpoints.map((e) => e.name)).toEqual([...CALL_TYPES]);
    for (const ep of CALL_TYPES) {
      const e = body.endpoints.find((x) => x.name === ep)!;
      expect(e).toEqual({
        name: ep,
        method: "POST",
        path: `/v1/${ep}`,
        price_mcents: PRICE_MCENTS[ep],
        xp: XP_AWARD[ep],
        scope: SCOPE_FOR[ep],
        description: DESCRIPTION[ep],
        rate_limit_per_minute: RATE_LIMIT_PER_MINUTE[ep],
        input: Object.fromEntries(Object.entries(INPUT_SHAPE[ep]).map(([k, v]) => [k, { type: v.type, required: v.required }])),
      });
    }
  });
});

describe("routing", () => {
  it("404 not_found on unknown routes, with X-Request-Id", async () => {
    for (const path of ["/", "/v1", "/v1/", "/v1/nope", "/v1/health/", "/v2/health", `/v1/${EP}/x`]) {
      const res = await fetchSelf(path);
      expect(res.status, path).toBe(404);
      const body = await errorOf(res);
      expect(body.ok).toBe(false);
      expect(body.error.code).toBe("not_found");
      expect(body.request_id).toMatch(UUID);
      expect(res.headers.get("X-Request-Id")).toBe(body.request_id);
    }
  });

  it("405 method_not_allowed with Allow header", async () => {
    const get = await fetchSelf(`/v1/${EP}`);
    expect(get.status).toBe(405);
    expect(get.headers.get("Allow")).toBe("POST, OPTIONS");
    expect((await errorOf(get)).error.code).toBe("method_not_allowed");

    const post = await fetchSelf("/v1/health", { method: "POST" });
    expect(post.status).toBe(405);
    expect(post.headers.get("Allow")).toBe("GET, OPTIONS");

    const mintGet = await fetchSelf("/v1/admin/mint");
    expect(mintGet.status).toBe(405);
    expect(mintGet.headers.get("Allow")).toBe("POST");
  });

  it("every response carries a fresh X-Request-Id", async () => {
    const a = await fetchSelf("/v1/health");
    const b = await fetchSelf("/v1/health");
    expect(a.headers.get("X-Request-Id")).toMatch(UUID);
    expect(b.headers.get("X-Request-Id")).toMatch(UUID);
    expect(a.headers.get("X-Request-Id")).not.toBe(b.headers.get("X-Request-Id"));
  });
});

describe("CORS on public routes", () => {
  it("adds CORS headers to /v1 responses, errors included", async () => {
    for (const res of [await fetchSelf("/v1/health"), await fetchSelf("/v1/nope"), await callPaid(EP, null, SAMPLE)]) {
      expect(res.headers.get("Access-Control-Allow-Origin")).toBe("*");
      expect(res.headers.get("Access-Control-Allow-Headers")).toBe("Authorization, Content-Type, Idempotency-Key, PAYMENT-SIGNATURE, X-PAYMENT");
      expect(res.headers.get("Access-Control-Expose-Headers")).toBe(
        "X-Request-Id, X-Charged-Mcents, X-Balance-Mcents, Retry-After, WWW-Authenticate, Idempotent-Replayed, PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE, Payment-Receipt",
      );
    }
  });

  it("answers a preflight with 204", async () => {
    for (const path of [`/v1/${EP}`, "/v1/me", "/v1/pricing"]) {
      const res = await fetchSelf(path, {
        method: "OPTIONS",
        headers: { Origin: "https://example.com", "Access-Control-Request-Method": "POST" },
      });
      expect(res.status, path).toBe(204);
      expect(res.headers.get("Access-Control-Allow-Origin")).toBe("*");
      expect(res.headers.get("Access-Control-Allow-Methods")).toMatch(/OPTIONS/);
    }
  });
});

describe("paid response headers", () => {
  it("success carries X-Request-Id, X-Charged-Mcents, X-Balance-Mcents and the envelope", async () => {
    const { key } = await seedKey({ balance: balanceFor(2) });
    const res = await callPaid(EP, key, SAMPLE);
    expect(res.status).toBe(200);
    const body = (await res.json()) as { ok: boolean; result: unknown; charged_mcents: number; balance_mcents: number; request_id: string };
    expect(body.ok).toBe(true);
    expect(body).toHaveProperty("result");
    expect(body.charged_mcents).toBe(PRICE_MCENTS[EP]);
    expect(body.balance_mcents).toBe(balanceFor(2) - PRICE_MCENTS[EP]);
    expect(body.request_id).toMatch(UUID);
    expect(res.headers.get("X-Request-Id")).toBe(body.request_id);
    expect(res.headers.get("X-Charged-Mcents")).toBe(String(PRICE_MCENTS[EP]));
    expect(res.headers.get("X-Balance-Mcents")).toBe(String(body.balance_mcents));
    expect(res.headers.get("Cache-Control")).toBe("no-store");
  });
});
