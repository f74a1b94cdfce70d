// The sandbox: agent code runs in a Dynamic Worker (Worker Loader binding LOADER), one fresh
// isolate per execution, with
//   - no network: globalOutbound is null, so fetch()/connect() inside the sandbox fail;
//   - no bindings and no secrets: its env is empty and it has no compatibility flags
//     (no nodejs_compat, so no process.env either);
//   - a CPU limit: limits.cpuMs = mpp.cpu_ms, enforced by Cloudflare in production. Local workerd
//     does NOT enforce it: a busy loop (`while (true) {}`) pins the local runtime, so local tests
//     never rely on it;
//   - no subrequests at all: limits.subRequests = 0;
//   - a wall-clock limit: the gateway stops waiting after mpp.timeout_ms (code that awaits timers
//     or I/O is answered on time).
//
// The gateway talks to the sandbox over JS RPC (a WorkerEntrypoint of the runner module), not
// through objects the agent's code can reach: the runner captures what it needs (JSON.stringify,
// String, Error, array and string methods) before the agent's module is imported, catches
// everything the code throws, and returns one string that the gateway parses with its own JSON.
// Agent code that overwrites globals (Response, JSON, prototypes) can only spoil its own result.
//
// Whose failure is it (the payment policy, README.md "Failure policy"):
//   ok          the code returned a JSON value                                → paid, result served
//   code_error  the agent's: the code threw, did not parse or start, returned non-JSON, broke the
//               runner's report, awaited a promise that can never settle, ran past the wall-clock
//               limit (`timedOut`), or was stopped by the runtime while running (CPU / memory
//               limits)                                                       → paid, error served
//   sandbox_error ours: the loader failed, or the isolate could not start although the agent's
//               module was not the cause (a probe isolate without it fails too), or crashed with
//               a runtime internal error                                      → credit / refund
import { MPP } from "../generated/mpp";

export type SandboxOutcome =
  | { kind: "ok"; result: unknown; logs: string[]; durationMs: number }
  | { kind: "code_error"; error: { name: string; message: string }; logs: string[]; durationMs: number; timedOut?: true }
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

// The runner is the sandbox's main module: a WorkerEntrypoint with two RPC methods, ready() (the
// isolate started; nothing of the agent's has run yet) and run(input). It imports the agent's module
// dynamically, so that the agent's code runs only inside run().
const RUNNER = `
import { WorkerEntrypoint } from "cloudflare:workers";
const call = Function.prototype.call;
const bind = (f) => call.bind(f);
const stringify = JSON.stringify;
const toString = String;
const ErrorClass = Error;
const slice = bind(String.prototype.slice);
const join = bind(Array.prototype.join);
const map = bind(Array.prototype.map);
const push = bind(Array.prototype.push);
const FAILED = '{"ok":false,"error":{"name":"SandboxError","message":"The code left the sandbox runner unable to report its result."},"logs":[]}';
const logs = [];
function fmt(v) {
  try {
    if (typeof v === "string") return v;
    const s = stringify(v);
    return typeof s === "string" ? s : toString(v);
  } catch {
    try { return toString(v); } catch { return "[unprintable]"; }
  }
}
for (const level of ["log", "info", "warn", "error", "debug"]) {
  console[level] = (...args) => {
    if (logs.length < ${MAX_LOG_LINES}) push(logs, slice(join(map(args, fmt), " "), 0, ${MAX_LOG_CHARS}));
  };
}
function errorOf(e) {
  try {
    if (e instanceof ErrorClass) return { name: slice(toString(e.name), 0, 100), message: slice(toString(e.message), 0, 2000) };
    return { name: "Error", message: slice(fmt(e), 0, 2000) };
  } catch {
    return { name: "Error", message: "The thrown value could not be read." };
  }
}
export default class Runner extends WorkerEntrypoint {
  ready() {
    return "mcpay-runner-1";
  }
  async run(input) {
    try {
      let out;
      try {
        const mod = await import("./agent.js");
        const value = await mod.default(input);
        const text = stringify(value === undefined ? null : value);
        if (typeof text !== "string") throw new ErrorClass("The code returned a value that is not JSON.");
        out = '{"ok":true,"result":' + text + ',"logs":' + stringify(logs) + "}";
      } catch (e) {
        out = stringify({ ok: false, error: errorOf(e), logs });
      }
      return typeof out === "string" ? out : FAILED;
    } catch {
      return FAILED;
    }
  }
}
`;

/** The agent's code is the body of `async function (input) { ... }`: it returns a JSON value. */
export function agentModule(code: string): string {
  return `export default async function run(input) {\n${code}\n}\n`;
}

interface RunnerApi {
  ready(): Promise<string>;
  run(input: unknown): Promise<string>;
}

type Report = { ok: true; result: unknown; logs: string[] } | { ok: false; error: { name: string; message: string }; logs: string[] };

const READY = "mcpay-runner-1";

function isLogs(v: unknown): v is string[] {
  return Array.isArray(v) && v.length <= MAX_LOG_LINES && v.every((x) => typeof x === "string");
}

/** The runner's report, checked with the gateway's own JSON (the sandbox's answer is untrusted). */
function parseReport(text: unknown): Report | null {
  if (typeof text !== "string") return null;
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof v !== "object" || v === null) return null;
  const r = v as Record<string, unknown>;
  if (!isLogs(r.logs)) return null;
  if (r.ok === true && "result" in r) return { ok: true, result: r.result, logs: r.logs };
  const e = r.error as Record<string, unknown> | undefined;
  if (r.ok === false && e && typeof e.name === "string" && typeof e.message === "string") {
    return { ok: false, error: { name: e.name.slice(0, 100), message: e.message.slice(0, 2000) }, logs: r.logs };
  }
  return null;
}

/** workerd's own failures, which no code can cause: an internal error, a lost connection to the isolate. */
const INFRASTRUCTURE = /^(?:Error: )?(?:internal error|Network connection lost)/i;

function describe(err: unknown): string {
  return err instanceof Error ? `${err.name}: ${err.message}` : String(err);
}

function workerCode(code: string | null, limits: SandboxLimits): WorkerLoaderWorkerCode {
  return {
    compatibilityDate: SANDBOX_COMPAT_DATE,
    compatibilityFlags: [],
    mainModule: "runner.js",
    modules: { "runner.js": RUNNER, "agent.js": code === null ? "export default async function run() { return null; }\n" : agentModule(code) },
    env: {},
    globalOutbound: null,
    limits: { cpuMs: limits.cpuMs, subRequests: 0 },
  };
}

/** The runner of a new isolate (load() itself compiles nothing: it throws only when the loader fails). */
function load(loader: WorkerLoader, code: string | null, limits: SandboxLimits): RunnerApi {
  return loader.load(workerCode(code, limits)).getEntrypoint() as unknown as RunnerApi;
}

/** Starts the runner's isolate (the modules are compiled; none of the agent's code runs). */
async function start(runner: RunnerApi): Promise<RunnerApi> {
  const ready = await runner.ready();
  if (ready !== READY) throw new Error("the sandbox runner did not answer its handshake");
  return runner;
}

export async function runInSandbox(
  loader: WorkerLoader,
  code: string,
  input: unknown,
  limits: SandboxLimits = DEFAULT_LIMITS,
): Promise<SandboxOutcome> {
  const started = Date.now();
  const elapsed = () => Date.now() - started;
  let timer: ReturnType<typeof setTimeout> | null = null;
  const timeout = new Promise<"timeout">((resolve) => {
    timer = setTimeout(() => resolve("timeout"), limits.timeoutMs);
  });
  const agentError = (name: string, message: string, logs: string[] = []): SandboxOutcome => ({
    kind: "code_error",
    error: { name, message },
    logs,
    durationMs: elapsed(),
  });
  try {
    // 1. The isolate starts (the agent's module is compiled, none of its code runs). A loader
    //    that throws here is down: ours (caught below).
    let runner = load(loader, code, limits);
    try {
      const up = await Promise.race([start(runner), timeout]);
      if (up === "timeout") return { kind: "sandbox_error", durationMs: elapsed(), detail: "the sandbox did not start within the time limit" };
      runner = up;
    } catch (err) {
      // Did the agent's module stop it (a syntax error, a bad import)? A probe isolate without it
      // tells: if the probe starts, the agent's module was the cause.
      const detail = describe(err);
      const probe = await Promise.race([
        (async () => start(load(loader, null, limits)))().then(
          () => true,
          () => false,
        ),
        timeout,
      ]);
      if (probe === true) {
        const m = /Uncaught (\w+): ([^\n]*)/.exec(detail);
        return agentError(m ? m[1]! : "SyntaxError", (m ? m[2]! : "The code could not be loaded.").slice(0, 2000));
      }
      return { kind: "sandbox_error", durationMs: elapsed(), detail };
    }
    // 2. The agent's code runs: from here on, a failure is the agent's unless the runtime itself broke.
    const run = runner.run(input === undefined ? null : input);
    let text: unknown;
    try {
      const winner = await Promise.race([run, timeout]);
      if (winner === "timeout") {
        run.catch(() => {});
        return { ...agentError("TimeoutError", `The code did not finish within ${limits.timeoutMs} ms (wall clock).`), timedOut: true } as SandboxOutcome;
      }
      text = winner;
    } catch (err) {
      const detail = describe(err);
      // workerd cancels an isolate whose code awaits something that can never settle (no pending
      // I/O or timer): that is the agent's code.
      if (/hung and would never generate a response|will never generate a response/i.test(detail)) {
        return agentError("Hung", "The code awaited a promise that can never settle.");
      }
      if (INFRASTRUCTURE.test(err instanceof Error ? err.message : detail)) return { kind: "sandbox_error", durationMs: elapsed(), detail };
      // Stopped by the runtime while the agent's code ran (CPU or memory limit, a crash the code
      // caused): the agent's.
      return agentError("SandboxError", `The code was stopped: ${detail.slice(0, 500)}`);
    }
    const report = parseReport(text);
    if (!report) return agentError("SandboxError", "The code left the sandbox runner unable to report its result.");
    if (report.ok) return { kind: "ok", result: report.result, logs: report.logs, durationMs: elapsed() };
    return { kind: "code_error", error: report.error, logs: report.logs, durationMs: elapsed() };
  } catch (err) {
    // The loader itself failed (load() threw): ours.
    return { kind: "sandbox_error", durationMs: elapsed(), detail: describe(err) };
  } finally {
    if (timer !== null) clearTimeout(timer);
  }
}
