import { runInDurableObject } from "cloudflare:test";
import { describe, expect, it } from "vitest";
import { GATEWAY, PROJECT, SCOPES } from "../src/generated/manifest";
import { isWellFormedKey, parseBearer, sha256Hex } from "../src/lib/keys";
import {

  EP,
  KEY_RE,
  PRICE,
  SAMPLE,
  SCOPE,
  balanceFor,
  callPaid,
  dumpSql,
  errorOf,
  fetchSelf,
  getMe,
  keyStub,
  mintViaAdmin,
  seedKey,
  testEnv,
} from "./helpers";

describe("key format and storage", () => {
  it("mints prefix + 64 lowercase hex, shown once, stored only as SHA-256", async () => {
    const res = await mintViaAdmin({ balance_mcents: balanceFor(3), scopes: [SCOPE], name: "storage-check" });
    expect(res.status).toBe(201);
    const minted = (await res.json()) as { key: string; key_id: string };
    expect(minted.key).toMatch(KEY_RE);
    expect(minted.key_id).toMatch(/^k_[0-9a-f]{16}$/);
    const hex = minted.key.slice(GATEWAY.keyPrefix.length);
    const hash = await sha256Hex(minted.key);

    // Use the key so every table has rows.
    expect((await callPaid(EP, minted.key, SAMPLE)).status).toBe(200);

    const dump = await runInDurableObject(keyStub(hash), (_instance, state) => dumpSql(state.storage.sql));
    expect(dump).toContain(minted.key_id); // sanity: the dump has the data
    expect(dump).not.toContain(hex);
    expect(dump).not.toContain(minted.key);
    expect(dump).not.toContain(hash); // not even the hash: it is only the object's name

    // Nor does the admin object (it only keeps mint timestamps).
    const admin = testEnv.ADMIN.get(testEnv.ADMIN.idFromName("global"));
    const adminDump = await runInDurableObject(admin, (_instance, state) => dumpSql(state.storage.sql));
    expect(adminDump).not.toContain(hex);
    expect(adminDump).not.toContain(hash);

    // /v1/me never shows the key again.
    const meText = await (await fetchSelf("/v1/me", { headers: { Authorization: `Bearer ${minted.key}` } })).text();
    expect(meText).not.toContain(hex);
    expect(meText).not.toContain(hash);
  });

  it("keys are unique", async () => {
    const a = await seedKey({ balance: 1 });
    const b = await seedKey({ balance: 1 });
    expect(a.key).not.toBe(b.key);
    expect(a.keyId).not.toBe(b.keyId);
  });

  it("parseBearer accepts only well-formed keys", () => {
    const good = GATEWAY.keyPrefix + "a".repeat(64);
    expect(isWellFormedKey(good)).toBe(true);
    expect(parseBearer(`Bearer ${good}`)).toEqual({ ok: true, key: good });
    expect(parseBearer(`bearer ${good}`)).toEqual({ ok: true, key: good });
    expect(parseBearer(`BEARER ${good}`)).toEqual({ ok: true, key: good });
    expect(parseBearer(null)).toEqual({ ok: false, code: "missing_key" });
    expect(parseBearer("   ")).toEqual({ ok: false, code: "missing_key" });
    for (const bad of [
      good,
      `Basic ${good}`,
      `Bearer ${good} extra`,
      `Bearer ${GATEWAY.keyPrefix}${"a".repeat(63)}`,
      `Bearer ${GATEWAY.keyPrefix}${"a".repeat(65)}`,
      `Bearer ${GATEWAY.keyPrefix}${"A".repeat(64)}`,
      `Bearer ${GATEWAY.keyPrefix}${"g".repeat(64)}`,
      `Bearer x${good.slice(1)}`,
      `Bearer ${"a".repeat(64)}`,
    ]) {
      expect(parseBearer(bad), bad).toEqual({ ok: false, code: "invalid_key" });
    }
  });
});

describe("authentication on paid routes", () => {
  async function expect401(res: Response, code: string) {
    expect(res.status).toBe(401);
    expect(res.headers.get("WWW-Authenticate")).toBe(`Bearer realm="${PROJECT.name}"`);
    const body = await errorOf(res);
    expect(body.error.code).toBe(code);
    expect(body.note).toBe("no charge applied");
  }

  it("missing key → 401 missing_key", async () => {
    await expect401(await callPaid(EP, null, SAMPLE), "missing_key");
  });

  it("malformed, wrong prefix, wrong length, non-hex → 401 invalid_key", async () => {
    const { key } = await seedKey({ balance: balanceFor(1) });
    const hex = key.slice(GATEWAY.keyPrefix.length);
    for (const bad of [
      "not-a-key",
      `zz_${hex}`,
      hex,
      key.slice(0, -1),
      key + "0",
      key.toUpperCase(),
      `${GATEWAY.keyPrefix}${"x".repeat(64)}`,
    ]) {
      await expect401(await callPaid(EP, bad, SAMPLE), "invalid_key");
    }
    await expect401(
      await fetchSelf(`/v1/${EP}`, {
        method: "POST",
        headers: { Authorization: `Basic ${key}`, "Content-Type": "application/json" },
        body: JSON.stringify(SAMPLE),
      }),
      "invalid_key",
    );
    expect((await getMe(key)).balance_mcents).toBe(balanceFor(1));
  });

  it("well-formed but unknown key → 401 invalid_key, no charge", async () => {
    const unknown = GATEWAY.keyPrefix + "0".repeat(64);
    await expect401(await callPaid(EP, unknown, SAMPLE), "invalid_key");
    const me = await fetchSelf("/v1/me", { headers: { Authorization: `Bearer ${unknown}` } });
    expect(me.status).toBe(401);
    expect((await errorOf(me)).error.code).toBe("invalid_key");
  });

  it("scheme is case-insensitive", async () => {
    const { key } = await seedKey({ balance: balanceFor(2) });
    for (const scheme of ["bearer", "BEARER"]) {
      const res = await fetchSelf(`/v1/${EP}`, {
        method: "POST",
        headers: { Authorization: `${scheme} ${key}`, "Content-Type": "application/json" },
        body: JSON.stringify(SAMPLE),
      });
      expect(res.status).toBe(200);
    }
  });

  it("a key in the query string is ignored", async () => {
    const { key } = await seedKey({ balance: balanceFor(1) });
    for (const q of [`key=${key}`, `api_key=${key}`, `access_token=${key}`]) {
      const res = await fetchSelf(`/v1/${EP}?${q}`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(SAMPLE),
      });
      expect(res.status).toBe(401);
      expect((await errorOf(res)).error.code).toBe("missing_key");
    }
    expect((await getMe(key)).balance_mcents).toBe(balanceFor(1));
  });
});

describe("scopes are default-deny", () => {
  it("a key without the endpoint's scope gets 403 scope_denied and is not charged", async () => {
    const others = SCOPES.filter((s) => s !== SCOPE);
    // Seeding with no scopes at all is impossible through mint; the object still denies.
    const { key } = await seedKey({ balance: balanceFor(3), scopes: others });
    const res = await callPaid(EP, key, SAMPLE);
    expect(res.status).toBe(403);
    const body = await errorOf(res);
    expect(body.error.code).toBe("scope_denied");
    expect(body.note).toBe("no charge applied");
    expect(res.headers.get("X-Charged-Mcents")).toBeNull();
    const me = await getMe(key);
    expect(me.balance_mcents).toBe(balanceFor(3));
    expect(me.calls).toBe(0);
  });

  it("a key with the scope is charged exactly the price", async () => {
    const { key } = await seedKey({ balance: balanceFor(3) });
    const res = await callPaid(EP, key, SAMPLE);
    expect(res.status).toBe(200);
    expect((await getMe(key)).balance_mcents).toBe(balanceFor(3) - PRICE);
  });

  it("an unknown endpoint name is rejected by the key object itself", async () => {
    const { hash } = await seedKey({ balance: balanceFor(3) });
    const r = await keyStub(hash).hold("__no_such_endpoint__", crypto.randomUUID());
    expect(r).toEqual({ ok: false, code: "unknown_endpoint" });
  });
});
