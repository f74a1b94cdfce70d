// Test-only payment plumbing. "test/charge" and "other/charge" are the deterministic MPP methods of
// the signup tests (../signup-helpers.ts), defined as mppx's own tests define theirs
// (Method.from + Method.toServer): a credential pays when its payload token is "paid" (every
// successful test/charge verification — the moment the money is taken — is counted in `verified`);
// "test/session" and "flaky/charge" (a method that fails without refusing) are defined below. They exist only in the test app built here, never in src/: the production app
// (src/index.ts) builds its methods from mcpay.toml and the environment.
import { env } from "cloudflare:workers";
import { createExecutionContext, waitOnExecutionContext } from "cloudflare:test";
import { Challenge, Credential, Errors, Method, type Store, z } from "mppx";
import { HANDLERS } from "../../src/generated/handlers";
import { createMppApp, type MppApp } from "../../src/mpp/app";
import type { MppEnv } from "../../src/mpp/env";
import type { Handlers } from "../../src/lib/handler";
import type { PaymentSetupResult } from "../../src/mpp/methods";
import type { SandboxLimits } from "../../src/mpp/sandbox";
import { durableStore } from "../../src/mpp/store";
import { otherChargeServer, testChargeServer } from "../signup-helpers";

export const BASE = "https://gateway.test";
export const REALM = "gateway.test";
export const mppEnv = env as unknown as MppEnv;
export const SECRET = mppEnv.MPP_SECRET_KEY!;

/** Challenge ids that test/charge accepted (to prove what ran and what did not). */
export { mppVerified as verified } from "../signup-helpers";

/**
 * A deterministic session method shaped like tempo/session: the payer signs off-chain cumulative
 * vouchers for a channel; the server keeps, per channel, acceptedCumulative and spent in the
 * production Durable Object store (src/mpp/store.ts), debits each call, and refuses with 402 and
 * the top-up needed when acceptedCumulative − spent < price. ("Signatures" are not checked here.)
 */
export const testSession = Method.from({
  name: "test",
  intent: "session",
  schema: {
    credential: { payload: z.object({ channelId: z.string(), cumulative: z.string() }) },
    request: z.object({ amount: z.string() }),
  },
});
export const testSessionServer = Method.toServer(testSession, {
  async verify({ credential, request }) {
    const store = durableStore(mppEnv.PAYMENTS);
    const cost = BigInt(request.amount);
    const key = `test-channel:${credential.payload.channelId}`;
    type Debit = { ok: false; topUp: string } | { ok: true; accepted: string; spent: string };
    const out = await store.update(key, (cur: unknown): Store.Change<unknown, Debit> => {
      const state = (cur as { accepted: string; spent: string } | null) ?? { accepted: "0", spent: "0" };
      const accepted = BigInt(state.accepted) > BigInt(credential.payload.cumulative) ? BigInt(state.accepted) : BigInt(credential.payload.cumulative);
      const spent = BigInt(state.spent);
      if (accepted - spent < cost) return { op: "noop", result: { ok: false, topUp: (cost - (accepted - spent)).toString() } };
      const next = { accepted: accepted.toString(), spent: (spent + cost).toString() };
      return { op: "set", value: next, result: { ok: true, ...next } };
    });
    if (!out.ok) throw new Errors.InsufficientBalanceError({ reason: `top up the channel by at least ${out.topUp}` });
    return { method: "test", reference: credential.payload.channelId, status: "success", timestamp: new Date().toISOString() } as const;
  },
});

/**
 * A charge method whose verification fails without a refusal (as a network error or an RPC 5xx
 * would): whether the money moved is unknown. Each attempt is counted in `flakyAttempts`.
 */
export const flakyCharge = Method.from({
  name: "flaky",
  intent: "charge",
  schema: { credential: { payload: z.object({ token: z.string() }) }, request: z.object({ amount: z.string() }) },
});
export const flakyAttempts: string[] = [];
export const flakyChargeServer = Method.toServer(flakyCharge, {
  async verify({ credential }) {
    flakyAttempts.push(credential.challenge.id);
    throw new Error("upstream payment network unreachable");
  },
});

export type Extra = "none" | "other" | "session" | "flaky";

export function testPayments(extra: Extra = "none"): PaymentSetupResult {
  const methods = [
    testChargeServer,
    ...(extra === "other" ? [otherChargeServer] : []),
    ...(extra === "session" ? [testSessionServer] : []),
    ...(extra === "flaky" ? [flakyChargeServer] : []),
  ];
  return {
    ok: true,
    setup: {
      methods,
      secretKey: SECRET,
      offers: (mcents) => methods.map((m) => [`${m.name}/${m.intent}`, { amount: String(mcents) }] as const),
    },
  };
}

export function testApp(limits?: SandboxLimits, extra: Extra = "none", handlers: Handlers = HANDLERS): MppApp {
  return createMppApp({ handlers, payments: () => testPayments(extra), ...(limits ? { limits } : {}) });
}

export async function call(app: MppApp, req: Request, env: MppEnv = mppEnv): Promise<Response> {
  const ctx = createExecutionContext();
  const res = await app.fetch(req, env, ctx);
  await waitOnExecutionContext(ctx);
  return res;
}

/** Agent code carrying this marker meets a broken Worker Loader (an infrastructure failure). */
export const LOADER_FAILS = "/* loader-fails */";

/**
 * The environment with a Worker Loader that counts the isolates it starts (`loads`: one per
 * execution that ran) and fails — as the loader service would — for code carrying LOADER_FAILS.
 */
export function countingEnv(): { env: MppEnv; loads: string[] } {
  const loads: string[] = [];
  const real = mppEnv.LOADER;
  const LOADER = {
    load(code: WorkerLoaderWorkerCode) {
      const agent = String(code.modules["agent.js"] ?? "");
      if (agent.includes(LOADER_FAILS)) throw new Error("Worker Loader unavailable (injected)");
      // The probe isolate (no agent code) is not an execution.
      if (!agent.startsWith("export default async function run() { return null; }")) loads.push(agent);
      return real.load(code);
    },
    get: real.get.bind(real),
  } as WorkerLoader;
  return { env: { ...mppEnv, LOADER } as MppEnv, loads };
}

/** The environment whose PaymentDO refuses to issue credits (a storage outage after the payment was taken). */
export function creditsDownEnv(base: MppEnv = mppEnv): MppEnv {
  const ns = base.PAYMENTS;
  const PAYMENTS = {
    idFromName: (name: string) => ns.idFromName(name),
    get(id: DurableObjectId) {
      const stub = ns.get(id) as unknown as Record<string | symbol, (...a: unknown[]) => unknown>;
      return new Proxy({} as Record<string | symbol, unknown>, {
        get(_target, prop) {
          if (prop === "then") return undefined;
          if (prop === "issueCredit") return () => Promise.reject(new Error("PaymentDO unavailable (injected)"));
          return (...args: unknown[]) => stub[prop]!(...args);
        },
      });
    },
  };
  return { ...base, PAYMENTS } as unknown as MppEnv;
}

export function executeRequest(body: unknown, headers: Record<string, string> = {}, path = "/execute"): Request {
  return new Request(BASE + path, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

/** The test method's challenge of a 402 response. */
export function testChallengeOf(res: Response): Challenge.Challenge {
  const all = Challenge.fromResponseList(res);
  const c = all.find((x) => x.method === "test");
  if (!c) throw new Error("no test challenge");
  return c;
}

export function paymentHeader(challenge: Challenge.Challenge, token = "paid", ref?: string): string {
  // Credential.serialize already gives "Payment <base64url>". `ref` makes a distinct payment.
  return Credential.serialize(Credential.from({ challenge, payload: ref === undefined ? { token } : { token, ref } }));
}

/** 402 → pay → returns the Authorization header for `body` on `path`. */
export async function pay(app: MppApp, body: unknown, path = "/execute", token = "paid"): Promise<string> {
  const res = await call(app, executeRequest(body, {}, path));
  if (res.status !== 402) throw new Error(`expected 402, got ${res.status}: ${await res.text()}`);
  return paymentHeader(testChallengeOf(res), token);
}

export function mcpRequest(body: unknown, headers: Record<string, string> = {}): Request {
  return new Request(BASE + "/mcp", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json, text/event-stream", ...headers },
    body: JSON.stringify(body),
  });
}

let rpcId = 1;
export async function rpc(app: MppApp, method: string, params: unknown, headers: Record<string, string> = {}, env: MppEnv = mppEnv) {
  const res = await call(app, mcpRequest({ jsonrpc: "2.0", id: rpcId++, method, params }, headers), env);
  const text = await res.text();
  if (res.status !== 200) throw new Error(`MCP ${method} -> ${res.status}: ${text}`);
  return JSON.parse(text) as { result?: any; error?: { code: number; message: string; data?: any } };
}
