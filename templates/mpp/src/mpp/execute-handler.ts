// execute_code as a prepaid-key endpoint (POST /v1/execute_code, scope "execute_code"): the worker
// gateway charges the key, then calls this handler. A gateway-side failure (timeout, sandbox error)
// throws, so the worker answers 502 handler_failed and refunds the charge (within the key's hourly
// refund limit); an exception in the agent's code is a completed, charged call.
import type { ExecuteCodeInput } from "../generated/manifest";
import { MPP } from "../generated/mpp";
import type { Handler } from "../lib/handler";
import type { MppEnv } from "./env";
import { runInSandbox } from "./sandbox";
import { codeBytes } from "./tools";

export const executeHandler: Handler<ExecuteCodeInput> = {
  validate(input) {
    if (codeBytes(input.code) > MPP.maxCodeBytes) return `code exceeds ${MPP.maxCodeBytes} bytes.`;
    return null;
  },
  async run(input, ctx) {
    const out = await runInSandbox((ctx.env as MppEnv).LOADER, input.code, input.input ?? null);
    if (out.kind === "ok") return { status: "ok", result: out.result, logs: out.logs, duration_ms: out.durationMs };
    if (out.kind === "code_error") return { status: "error", error: out.error, logs: out.logs, duration_ms: out.durationMs };
    throw new Error(out.kind === "timeout" ? "sandbox timeout" : `sandbox failed: ${out.detail}`);
  },
};
