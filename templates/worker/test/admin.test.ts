import { createExecutionContext } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { createApp } from "../src/app";
import { GATEWAY, SCOPES } from "../src/generated/manifest";
import { HANDLERS } from "../src/generated/handlers";
import { BASE, KEY_RE, SCOPE, errorOf, fetchSelf, getMe, mintViaAdmin, testEnv } from "./helpers";

// Mints in this file: keep the count below GATEWAY.mintsPerHour until the last test,
// which exhausts the hourly budget on purpose.

function expectNoCors(res: Response) {
  for (const [name] of res.headers) expect(name.toLowerCase().startsWith("access-control-"), name).toBe(false);
}

describe("admin mint: authentication", () => {
  it("503 admin_disabled when ADMIN_KEY is unset or empty", async () => {
    const app = createApp(HANDLERS);
    for (const adminKey of ["", undefined]) {
      const env = { ...testEnv, ADMIN_KEY: adminKey };
      const res = await app.fetch(
        new Request(`${BASE}/v1/admin/mint`, {
          method: "POST",
          headers: { "X-Admin-Key": "", "Content-Type": "application/json" },
          body: JSON.stringify({ balance_mcents: 1, scopes: [SCOPE] }),
        }),
        env,
        createExecutionContext(),
      );
      expect(res.status).toBe(503);
      expect((await errorOf(res)).error.code).toBe("admin_disabled");
      expectNoCors(res);
    }
  });

  it("401 invalid_admin_key on a wrong or missing admin key", async () => {
    for (const wrong of ["", "nope", testEnv.ADMIN_KEY + "x", testEnv.ADMIN_KEY!.slice(0, -1)]) {
      const res = await mintViaAdmin({ balance_mcents: 1, scopes: [SCOPE] }, wrong);
      expect(res.status, wrong).toBe(401);
      expect((await errorOf(res)).error.code).toBe("invalid_admin_key");
      expectNoCors(res);
    }
    const res = await fetchSelf("/v1/admin/mint", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ balance_mcents: 1, scopes: [SCOPE] }),
    });
    expect(res.status).toBe(401);
  });

  it("201 with the key shown once, its public id, balance, scopes and name", async () => {
    const res = await mintViaAdmin({ balance_mcents: 12345, scopes: [SCOPE, SCOPE], name: "agent-1.v2 test" });
    expect(res.status).toBe(201);
    expectNoCors(res);
    expect(res.headers.get("X-Request-Id")).toBeTruthy();
    const body = (await res.json()) as Record<string, unknown>;
    expect(Object.keys(body).sort()).toEqual(["balance_mcents", "key", "key_id", "name", "ok", "scopes"]);
    expect(body.ok).toBe(true);
    expect(body.key).toMatch(KEY_RE);
    expect(body.key_id).toMatch(/^k_[0-9a-f]{16}$/);
    expect(body.balance_mcents).toBe(12345);
    expect(body.scopes).toEqual([SCOPE]);
    expect(body.name).toBe("agent-1.v2 test");
    const me = await getMe(body.key as string);
    expect(me.key_id).toBe(body.key_id);
    expect(me.balance_mcents).toBe(12345);
    expect(me.scopes).toEqual([SCOPE]);
    expect(me.name).toBe("agent-1.v2 test");
  });

  it("name is optional (null)", async () => {
    const res = await mintViaAdmin({ balance_mcents: 1, scopes: [...SCOPES] });
    expect(res.status).toBe(201);
    expect(((await res.json()) as { name: unknown }).name).toBeNull();
  });
});

describe("admin mint: strict input", () => {
  const invalidBalances: unknown[] = [
    "1000",
    "1e3",
    1.5,
    0.1,
    0,
    -1,
    -1000,
    null,
    true,
    false,
    GATEWAY.maxMintMcents + 1,
    Number.MAX_SAFE_INTEGER + 2,
    1e308,
    [1000],
    { v: 1000 },
  ];

  it.each(invalidBalances.map((v) => [JSON.stringify(v), v]))("balance_mcents %s → 400", async (_label, v) => {
    const res = await mintViaAdmin({ balance_mcents: v, scopes: [SCOPE] });
    expect(res.status).toBe(400);
    expect((await errorOf(res)).error.code).toBe("invalid_input");
  });

  it("huge numeric literals → 400", async () => {
    for (const raw of [
      `{"balance_mcents": 1e400, "scopes": ["${SCOPE}"]}`,
      `{"balance_mcents": 99999999999999999999999, "scopes": ["${SCOPE}"]}`,
    ]) {
      const res = await mintViaAdmin(raw);
      expect(res.status, raw).toBe(400);
    }
  });

  it("missing balance → 400", async () => {
    expect((await mintViaAdmin({ scopes: [SCOPE] })).status).toBe(400);
  });

  it("the ceiling itself is accepted", async () => {
    const res = await mintViaAdmin({ balance_mcents: GATEWAY.maxMintMcents, scopes: [SCOPE] });
    expect(res.status).toBe(201);
  });

  it("scopes are required, non-empty and known", async () => {
    for (const scopes of [undefined, null, [], "example", [SCOPE, "__not_a_scope__"], [1], [null], {}]) {
      const body: Record<string, unknown> = { balance_mcents: 100 };
      if (scopes !== undefined) body.scopes = scopes;
      const res = await mintViaAdmin(body);
      expect(res.status, JSON.stringify(scopes)).toBe(400);
      expect((await errorOf(res)).error.code).toBe("invalid_input");
    }
  });

  it("name must be ≤ 32 chars of [A-Za-z0-9 _.-]", async () => {
    for (const name of ["", "x".repeat(33), "<script>", "a/b", "名前", 42, null, ["a"]]) {
      const res = await mintViaAdmin({ balance_mcents: 100, scopes: [SCOPE], name });
      expect(res.status, JSON.stringify(name)).toBe(400);
    }
    expect((await mintViaAdmin({ balance_mcents: 100, scopes: [SCOPE], name: "x".repeat(32) })).status).toBe(201);
  });

  it("unknown fields, non-objects, bad JSON, wrong content type", async () => {
    expect((await mintViaAdmin({ balance_mcents: 100, scopes: [SCOPE], admin: true })).status).toBe(400);
    expect((await mintViaAdmin([1, 2])).status).toBe(400);
    const bad = await mintViaAdmin("{nope");
    expect(bad.status).toBe(400);
    const badBody = await errorOf(bad);
    expect(badBody.error.code).toBe("invalid_json");
    expect(badBody.note).toBeUndefined();
    const ct = await mintViaAdmin({ balance_mcents: 100, scopes: [SCOPE] }, undefined, { "Content-Type": "text/plain" });
    expect(ct.status).toBe(415);
    const big = await mintViaAdmin(JSON.stringify({ balance_mcents: 100, scopes: [SCOPE], pad: "x".repeat(GATEWAY.maxBodyBytes) }));
    expect(big.status).toBe(413);
  });
});

describe("admin paths have no CORS", () => {
  it("preflight is refused without any Access-Control-* header", async () => {
    for (const path of ["/v1/admin/mint", "/v1/admin/other", "/v1/admin"]) {
      const res = await fetchSelf(path, {
        method: "OPTIONS",
        headers: {
          Origin: "https://evil.example",
          "Access-Control-Request-Method": "POST",
          "Access-Control-Request-Headers": "x-admin-key, content-type",
        },
      });
      expect([404, 405], path).toContain(res.status);
      expectNoCors(res);
    }
  });

  it("no CORS on admin errors either", async () => {
    expectNoCors(await mintViaAdmin({}, "wrong", { Origin: "https://evil.example" }));
    expectNoCors(await mintViaAdmin({ balance_mcents: "x" }, undefined, { Origin: "https://evil.example" }));
    expectNoCors(await fetchSelf("/v1/admin/mint"));
  });
});

describe("admin mint: hourly limit (runs last in this file)", () => {
  it(`at most GATEWAY.mintsPerHour mints per rolling hour, then 429 with Retry-After`, async () => {
    let limited: Response | null = null;
    for (let i = 0; i <= GATEWAY.mintsPerHour; i++) {
      const res = await mintViaAdmin({ balance_mcents: 1, scopes: [SCOPE] });
      if (res.status === 429) {
        limited = res;
        break;
      }
      expect(res.status).toBe(201);
    }
    expect(limited).not.toBeNull();
    const retry = Number(limited!.headers.get("Retry-After"));
    expect(Number.isInteger(retry)).toBe(true);
    expect(retry).toBeGreaterThanOrEqual(1);
    expect(retry).toBeLessThanOrEqual(3600);
    const body = await errorOf(limited!);
    expect(body.error.code).toBe("rate_limited");
    expect(body.retry_after_seconds).toBe(retry);
    expectNoCors(limited!);
    // Rejected requests do not consume the budget, and the limit holds.
    expect((await mintViaAdmin({ balance_mcents: 1, scopes: [SCOPE] })).status).toBe(429);
    expect((await mintViaAdmin({ balance_mcents: "bad", scopes: [SCOPE] })).status).toBe(400);
  });
});
