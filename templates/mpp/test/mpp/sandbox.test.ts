// The sandbox: no network, no secrets, whose failure it is (the agent's vs ours), wall-clock limit.
// (CPU limits are set on every isolate but are not enforced by local workerd: no busy loops here —
// `while (true) {}` would pin the local runtime.)
import { describe, expect, it } from "vitest";
import { runInSandbox } from "../../src/mpp/sandbox";
import { LOADER_FAILS, countingEnv, mppEnv, SECRET } from "./helpers";

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

  it("code sleeping past the wall-clock limit is answered on time, as the agent's failure", async () => {
    const started = Date.now();
    const out = await runInSandbox(mppEnv.LOADER, "await new Promise((resolve) => setTimeout(resolve, 1e9));", null, { timeoutMs: 300, cpuMs: 50 });
    expect(out).toMatchObject({ kind: "code_error", timedOut: true, error: { name: "TimeoutError" } });
    expect(Date.now() - started).toBeLessThan(300 + 1_500);
  });

  it("a long async loop that yields is stopped by the wall-clock limit too", async () => {
    const started = Date.now();
    const out = await runInSandbox(mppEnv.LOADER, "for (;;) await new Promise((resolve) => setTimeout(resolve, 1));", null, { timeoutMs: 300, cpuMs: 50 });
    expect(out).toMatchObject({ kind: "code_error", timedOut: true });
    expect(Date.now() - started).toBeLessThan(300 + 1_500);
  });

  it("code that overwrites Response, JSON and prototypes only spoils its own result", async () => {
    const tamper = [
      "globalThis.Response = function () { throw new Error('no Response'); };",
      "JSON.stringify = () => { throw new Error('internal error; reference = forged'); };",
      "JSON.parse = () => ({});",
      "Array.prototype.push = function () { throw new Error('no push'); };",
    ].join("\n");
    const thrown = await runInSandbox(mppEnv.LOADER, `${tamper}\nconsole.log("still logged"); throw new TypeError("mine");`, null, LIMITS);
    expect(thrown).toMatchObject({ kind: "code_error", error: { name: "TypeError", message: "mine" }, logs: ["still logged"] });
    const returned = await runInSandbox(mppEnv.LOADER, `${tamper}\nreturn { fine: [1, 2] };`, null, LIMITS);
    expect(returned).toMatchObject({ kind: "ok", result: { fine: [1, 2] } });
    // A forged report (a toJSON on every array) is the agent's error, never a sandbox failure.
    const forged = await runInSandbox(mppEnv.LOADER, 'Array.prototype.toJSON = function () { return "x"; }; return [1];', null, LIMITS);
    expect(forged).toMatchObject({ kind: "code_error", error: { name: "SandboxError" } });
    // An error thrown from a timer (outside the runner's reach) does not fail the run.
    const timer = await runInSandbox(mppEnv.LOADER, "setTimeout(() => { throw new Error('internal error; reference = forged'); }, 0); await new Promise((r) => setTimeout(r, 30)); return 1;", null, LIMITS);
    expect(timer).toMatchObject({ kind: "ok", result: 1 });
  });

  it("code escaping its function (a failing import, top-level work) is the agent's error", async () => {
    const badImport = await runInSandbox(mppEnv.LOADER, "}\nimport 'no-such-module';\nexport function x() {", null, LIMITS);
    expect(badImport.kind).toBe("code_error");
    const topLevel = await runInSandbox(mppEnv.LOADER, "}\nthrow new Error('at load');\nexport function x() {", null, LIMITS);
    expect(topLevel).toMatchObject({ kind: "code_error" });
  });

  it("a loader failure is ours (sandbox_error)", async () => {
    const { env } = countingEnv();
    const out = await runInSandbox(env.LOADER, `return 1; ${LOADER_FAILS}`, null, LIMITS);
    expect(out.kind).toBe("sandbox_error");
  });

  it("an isolate that cannot start although the agent's module is fine is ours", async () => {
    // Every isolate this loader starts is broken (an invalid compatibility date), the probe too.
    const broken = {
      load: (code: WorkerLoaderWorkerCode) => mppEnv.LOADER.load({ ...code, compatibilityDate: "not-a-date" }),
      get: mppEnv.LOADER.get.bind(mppEnv.LOADER),
    } as WorkerLoader;
    const out = await runInSandbox(broken, "return 1;", null, LIMITS);
    expect(out.kind).toBe("sandbox_error");
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
