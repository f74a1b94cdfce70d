// The sandbox: agent code runs in a Dynamic Worker (Worker Loader binding LOADER), one fresh
// isolate per execution, with
//   - no network: globalOutbound is null, so fetch()/connect() inside the sandbox fail;
//   - no bindings and no secrets: its env is empty and it has no compatibility flags
//     (no nodejs_compat, so no process.env either);
//   - a CPU limit: limits.cpuMs = mpp.cpu_ms, enforced by Cloudflare in production (local
//     workerd does not enforce it, so local tests never rely on it);
//   - no subrequests at all: limits.subRequests = 0;
//   - a wall-clock limit: the gateway stops waiting after mpp.timeout_ms and aborts the call.
//
// Outcomes are told apart so that the payment policy can be applied (see README.md):
//   ok          the code returned a JSON value                         → paid, result served
//   code_error  the code threw, did not parse, returned non-JSON, or awaited a promise that can
//               never settle (detected by the runtime)                → paid, error served as the result
//   timeout     no answer within timeout_ms (wall clock)               → gateway-side failure
//   sandbox_error the isolate could not be created, crashed or broke the runner protocol
//                 (this includes exceeding the CPU limit)              → gateway-side failure
import { MPP } from "../generated/mpp";

export type SandboxOutcome =
  | { kind: "ok"; result: unknown; logs: string[]; durationMs: number }
  | { kind: "code_error"; error: { name: string; message: string }; logs: string[]; durationMs: number }
  | { kind: "timeout"; durationMs: number }
  | { kind: "sandbox_error"; durationMs: number; detail: string };

export interface SandboxLimits {
  timeoutMs: number;
  cpuMs: number;
}

export const DEFAULT_LIMITS: SandboxLimits = { timeoutMs: MPP.timeoutMs, cpuMs: MPP.cpuMs };

/** Compatibility date of the sandbox isolates (≤ the newest date the local workerd accepts). */
const SANDBOX_COMPAT_DATE = "2026-04-01";
const MAX_LOG_LINES = 50;
const MAX_LOG_CHARS = 2_000;

// The runner is the sandbox's main module. It imports the agent's module dynamically so that a
// syntax error in the agent's code is reported as the agent's error, not as a sandbox failure.
const RUNNER = `
const logs = [];
function fmt(v) {
  if (typeof v === "string") return v;
  try { return JSON.stringify(v); } catch { return String(v); }
}
for (const level of ["log", "info", "warn", "error", "debug"]) {
  console[level] = (...args) => {
    if (logs.length < ${MAX_LOG_LINES}) logs.push(args.map(fmt).join(" ").slice(0, ${MAX_LOG_CHARS}));
  };
}
function errorOf(e) {
  if (e instanceof Error) return { name: String(e.name).slice(0, 100), message: String(e.message).slice(0, 2000) };
  return { name: "Error", message: fmt(e).slice(0, 2000) };
}
export default {
  async fetch(request) {
    let body;
    try {
      const { input } = await request.json();
      const mod = await import("./agent.js");
      const value = await mod.default(input);
      const text = JSON.stringify(value === undefined ? null : value);
      body = '{"ok":true,"result":' + text + ',"logs":' + JSON.stringify(logs) + "}";
    } catch (e) {
      body = JSON.stringify({ ok: false, error: errorOf(e), logs });
    }
    return new Response(body, { headers: { "content-type": "application/json", "x-mcpay-runner": "1" } });
  },
};
`;

/** The agent's code is the body of `async function (input) { ... }`: it returns a JSON value. */
export function agentModule(code: string): string {
  return `export default async function run(input) {\n${code}\n}\n`;
}

export async function runInSandbox(
  loader: WorkerLoader,
  code: string,
  input: unknown,
  limits: SandboxLimits = DEFAULT_LIMITS,
): Promise<SandboxOutcome> {
  const started = Date.now();
  const elapsed = () => Date.now() - started;
  const abort = new AbortController();
  let timer: ReturnType<typeof setTimeout> | null = null;
  const timeout = new Promise<"timeout">((resolve) => {
    timer = setTimeout(() => resolve("timeout"), limits.timeoutMs);
  });
  const run = (async () => {
    const worker = loader.load({
      compatibilityDate: SANDBOX_COMPAT_DATE,
      compatibilityFlags: [],
      mainModule: "runner.js",
      modules: { "runner.js": RUNNER, "agent.js": agentModule(code) },
      env: {},
      globalOutbound: null,
      limits: { cpuMs: limits.cpuMs, subRequests: 0 },
    });
    const res = await worker.getEntrypoint().fetch("https://sandbox.invalid/run", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ input: input === undefined ? null : input }),
      signal: abort.signal,
    });
    if (res.headers.get("x-mcpay-runner") !== "1") {
      await res.body?.cancel();
      throw new Error(`sandbox answered without the runner protocol (status ${res.status})`);
    }
    return (await res.json()) as
      | { ok: true; result: unknown; logs: string[] }
      | { ok: false; error: { name: string; message: string }; logs: string[] };
  })();
  try {
    const winner = await Promise.race([run, timeout]);
    if (winner === "timeout") {
      abort.abort();
      run.catch(() => {});
      return { kind: "timeout", durationMs: elapsed() };
    }
    if (winner.ok) return { kind: "ok", result: winner.result, logs: winner.logs, durationMs: elapsed() };
    return { kind: "code_error", error: winner.error, logs: winner.logs, durationMs: elapsed() };
  } catch (err) {
    // workerd cancels an isolate whose code awaits something that can never settle (no pending
    // I/O or timer): that is the agent's code, not a gateway failure.
    if (err instanceof Error && /hung and would never generate a response/.test(err.message)) {
      return { kind: "code_error", error: { name: "Hung", message: "The code awaited a promise that can never settle." }, logs: [], durationMs: elapsed() };
    }
    // The isolate validates its modules at start-up: a syntax error in the agent's module.
    const startup = err instanceof Error ? /^Failed to start Worker:\s*Uncaught (\w+): ([^\n]*)\n\s*at agent\.js/.exec(err.message) : null;
    if (startup) {
      return { kind: "code_error", error: { name: startup[1]!, message: startup[2]!.slice(0, 2000) }, logs: [], durationMs: elapsed() };
    }
    return { kind: "sandbox_error", durationMs: elapsed(), detail: err instanceof Error ? `${err.name}: ${err.message}` : String(err) };
  } finally {
    if (timer !== null) clearTimeout(timer);
  }
}
