// execute_code as a prepaid-key endpoint (POST /v1/execute_code, scope "execute_code"): the worker
// gateway charges the key, then calls this handler. Only a failure on our side (the sandbox could
// not run: loader error, runtime crash) throws, so the worker answers 502 handler_failed and
// refunds the charge (within the key's hourly refund limit). Everything the agent's code causes —
// its exceptions, running past the wall-clock limit, tampering with the runner — is a completed,
// charged call whose error is the result.
import type { ExecuteCodeInput } from "../generated/manifest";
import { MPP } from "../generated/mpp";
import type { Handler } from "../lib/handler";
import type { MppEnv } from "./env";
import { DEFAULT_LIMITS, runInSandbox, type SandboxLimits } from "./sandbox";
import { codeBytes } from "./tools";

/** The execute_code handler with these sandbox limits (an app built with other limits uses its own). */
export function executeHandlerWith(limits: SandboxLimits): Handler<ExecuteCodeInput> {
  return {
    validate: executeHandler.validate!,
    async run(input, ctx) {
      return runExecute(input, ctx.env as MppEnv, limits);
    },
  };
}

async function runExecute(input: ExecuteCodeInput, env: MppEnv, limits: SandboxLimits): Promise<unknown> {
  const out = await runInSandbox(env.LOADER, input.code, input.input ?? null, limits);
  if (out.kind === "ok") return { status: "ok", result: out.result, logs: out.logs, duration_ms: out.durationMs };
  if (out.kind === "code_error") {
    return { status: "error", error: out.error, logs: out.logs, duration_ms: out.durationMs, ...(out.timedOut ? { timed_out: true } : {}) };
  }
  throw new Error(`sandbox failed: ${out.detail}`);
}

export const executeHandler: Handler<ExecuteCodeInput> = {
  validate(input) {
    if (codeBytes(input.code) > MPP.maxCodeBytes) return `code exceeds ${MPP.maxCodeBytes} bytes.`;
    return null;
  },
  async run(input, ctx) {
    return runExecute(input, ctx.env as MppEnv, DEFAULT_LIMITS);
  },
};
