// The sandbox: no network, no secrets, agent errors vs gateway-side failures, wall-clock limit.
// (CPU limits are set on every isolate but are not enforced by local workerd: no busy loops here.)
import { describe, expect, it } from "vitest";
import { runInSandbox } from "../../src/mpp/sandbox";
import { mppEnv, SECRET } from "./helpers";

const LIMITS = { timeoutMs: 2_000, cpuMs: 50 };

describe("sandbox", () => {
  it("runs code with its input and returns JSON and logs", async () => {
    const out = await runInSandbox(mppEnv.LOADER, 'console.log("hi", input); return input.n * 2;', { n: 21 }, LIMITS);
    expect(out).toMatchObject({ kind: "ok", result: 42, logs: ['hi {"n":21}'] });
  });

  it("has no network: fetch() fails inside the sandbox", async () => {
    const code = 'try { const r = await fetch("https://example.com/"); return { fetched: r.status }; } catch (e) { return { blocked: String(e) }; }';
    const out = await runInSandbox(mppEnv.LOADER, code, null, LIMITS);
    expect(out.kind).toBe("ok");
    if (out.kind === "ok") expect(out.result).toHaveProperty("blocked");
  });

  it("sees no secrets and no bindings", async () => {
    const code = `
      const seen = { globals: Object.getOwnPropertyNames(globalThis), process: typeof process, env: typeof env };
      try { seen.processEnv = JSON.stringify(process.env); } catch (e) { seen.processEnv = null; }
      return seen;`;
    const out = await runInSandbox(mppEnv.LOADER, code, null, LIMITS);
    expect(out.kind).toBe("ok");
    const text = JSON.stringify(out);
    expect(text).not.toContain(SECRET);
    expect(text).not.toContain(mppEnv.ADMIN_KEY!);
    expect(text).not.toMatch(/MPP_SECRET_KEY|ADMIN_KEY|PAYMENTS|LOADER/);
    if (out.kind === "ok") expect((out.result as { process: string }).process).toBe("undefined");
  });

  it("an exception in the agent's code is a code_error (the agent's), not a sandbox failure", async () => {
    const out = await runInSandbox(mppEnv.LOADER, 'throw new RangeError("nope")', null, LIMITS);
    expect(out).toMatchObject({ kind: "code_error", error: { name: "RangeError", message: "nope" } });
  });

  it("a value that is not JSON is the agent's error", async () => {
    const out = await runInSandbox(mppEnv.LOADER, "return 10n;", null, LIMITS);
    expect(out.kind).toBe("code_error");
  });

  it("async code that never resolves hits the wall-clock timeout", async () => {
    const started = Date.now();
    const out = await runInSandbox(mppEnv.LOADER, "await new Promise((resolve) => setTimeout(resolve, 3_600_000));", null, { timeoutMs: 300, cpuMs: 50 });
    expect(out.kind).toBe("timeout");
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it("a promise that can never settle (no pending I/O) is detected by the runtime: the agent's error", async () => {
    const out = await runInSandbox(mppEnv.LOADER, "await new Promise(() => {});", null, LIMITS);
    expect(out).toMatchObject({ kind: "code_error", error: { name: "Hung" } });
  });

  it("executions do not share state", async () => {
    const code = "globalThis.counter = (globalThis.counter ?? 0) + 1; return globalThis.counter;";
    const a = await runInSandbox(mppEnv.LOADER, code, null, LIMITS);
    const b = await runInSandbox(mppEnv.LOADER, code, null, LIMITS);
    expect(a).toMatchObject({ kind: "ok", result: 1 });
    expect(b).toMatchObject({ kind: "ok", result: 1 });
  });
});
