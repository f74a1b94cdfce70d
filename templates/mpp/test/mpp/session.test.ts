// Session-style payments (per-call debits of a payment channel) and the plumbing they rely on:
// the Durable Object store applies one channel's updates serially; several offered methods give
// one challenge each; the sandbox is configured with its limits for real.
import { Challenge, Credential, Receipt } from "mppx";
import { describe, expect, it } from "vitest";
import { PRICE_MCENTS } from "../../src/generated/manifest";
import { MPP } from "../../src/generated/mpp";
import { runInSandbox } from "../../src/mpp/sandbox";
import { durableStore } from "../../src/mpp/store";
import { call, executeRequest, mppEnv, testApp } from "./helpers";

const SUM = { code: "return input.a + input.b;", input: { a: 2, b: 3 } };
const PRICE = PRICE_MCENTS.execute_code;

describe("several methods", () => {
  it("402 carries one WWW-Authenticate: Payment challenge per offered method", async () => {
    const res = await call(testApp(undefined, "other"), executeRequest(SUM));
    expect(res.status).toBe(402);
    const list = Challenge.fromResponseList(res);
    expect(list.map((c) => `${c.method}/${c.intent}`).sort()).toEqual(["other/charge", "test/charge"]);
  });
});

describe("session intent: per-call debits of one channel, handled serially", () => {
  const app = testApp(undefined, "session");

  async function sessionAuth(channelId: string, cumulative: number): Promise<string> {
    const res = await call(app, executeRequest(SUM));
    const c = Challenge.fromResponseList(res).find((x) => x.intent === "session")!;
    return Credential.serialize(Credential.from({ challenge: c, payload: { channelId, cumulative: String(cumulative) } }));
  }

  it("a voucher covering 3 calls pays for exactly 3 of 6 concurrent calls; the others get 402 with the top-up", async () => {
    const channel = `ch-${crypto.randomUUID()}`;
    const auth = await sessionAuth(channel, 3 * PRICE);
    const results = await Promise.all(Array.from({ length: 6 }, () => call(app, executeRequest(SUM, { Authorization: auth }))));
    const ok = results.filter((r) => r.status === 200);
    expect(ok).toHaveLength(3);
    for (const r of ok) expect(Receipt.fromResponse(r).reference).toBe(channel);
    const refused = results.filter((r) => r.status === 402);
    expect(refused).toHaveLength(3);
    const problem = (await refused[0]!.json()) as { type: string; detail: string };
    expect(problem.type).toContain("insufficient-balance");
    expect(problem.detail).toContain(String(PRICE));

    // A larger cumulative voucher tops the channel up by one call.
    const more = await sessionAuth(channel, 4 * PRICE);
    expect((await call(app, executeRequest(SUM, { Authorization: more }))).status).toBe(200);
    expect((await call(app, executeRequest(SUM, { Authorization: more }))).status).toBe(402);
  });
});

describe("durable atomic store", () => {
  it("serializes concurrent updates of one key (compare-and-set in one Durable Object)", async () => {
    const store = durableStore(mppEnv.PAYMENTS);
    const key = `counter:${crypto.randomUUID()}`;
    await Promise.all(
      Array.from({ length: 20 }, () =>
        store.update(key, (cur: unknown) => ({ op: "set", value: ((cur as number | null) ?? 0) + 1, result: null })),
      ),
    );
    expect(await store.get(key)).toBe(20);
  });
});

describe("sandbox configuration", () => {
  it("every isolate gets no outbound network, no env, and the CPU limit of mcpay.toml", async () => {
    const seen: WorkerLoaderWorkerCode[] = [];
    const spy = {
      load(code: WorkerLoaderWorkerCode) {
        seen.push(code);
        return mppEnv.LOADER.load(code);
      },
      get: mppEnv.LOADER.get.bind(mppEnv.LOADER),
    } as WorkerLoader;
    const out = await runInSandbox(spy, "return 1;", null);
    expect(out.kind).toBe("ok");
    expect(seen).toHaveLength(1);
    expect(seen[0]!.globalOutbound).toBeNull();
    expect(seen[0]!.env).toEqual({});
    expect(seen[0]!.limits).toEqual({ cpuMs: MPP.cpuMs, subRequests: 0 });
    expect(seen[0]!.compatibilityFlags ?? []).not.toContain("nodejs_compat");
  });
});
