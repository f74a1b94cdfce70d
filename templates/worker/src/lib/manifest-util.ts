// Small helpers over the generated manifest.
import { CALL_TYPES, SCOPES, type CallType, type Scope } from "../generated/manifest";

export function isCallType(name: unknown): name is CallType {
  return typeof name === "string" && (CALL_TYPES as readonly string[]).includes(name);
}

export function isScope(name: unknown): name is Scope {
  return typeof name === "string" && (SCOPES as readonly string[]).includes(name);
}
