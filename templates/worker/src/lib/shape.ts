// Input shape check generated from mcpay.toml ([endpoints.<name>.input] fields).
import type { FieldSpec, FieldType } from "../generated/manifest";

export const MAX_JSON_DEPTH = 32;

/** Nesting depth of a parsed JSON value (scalars are depth 0). Iterative: no stack overflow. */
export function jsonDepthExceeds(value: unknown, maxDepth: number): boolean {
  const stack: Array<[unknown, number]> = [[value, 0]];
  while (stack.length > 0) {
    const [v, d] = stack.pop()!;
    if (v === null || typeof v !== "object") continue;
    if (d + 1 > maxDepth) return true;
    const children = Array.isArray(v) ? v : Object.values(v as Record<string, unknown>);
    for (const c of children) stack.push([c, d + 1]);
  }
  return false;
}

export function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function hasType(v: unknown, t: FieldType): boolean {
  switch (t) {
    case "string":
      return typeof v === "string";
    case "number":
      return typeof v === "number" && Number.isFinite(v);
    case "integer":
      return typeof v === "number" && Number.isSafeInteger(v);
    case "boolean":
      return typeof v === "boolean";
    case "object":
      return isPlainObject(v);
    case "array":
      return Array.isArray(v);
  }
}

/** Returns null when `input` matches `shape`, else a message naming the first problem. */
export function checkShape(input: unknown, shape: Readonly<Record<string, FieldSpec>>): string | null {
  if (!isPlainObject(input)) return "Body must be a JSON object.";
  if (jsonDepthExceeds(input, MAX_JSON_DEPTH)) return `JSON nesting deeper than ${MAX_JSON_DEPTH} levels.`;
  for (const field of Object.keys(input)) {
    if (!Object.hasOwn(shape, field)) return `Unknown field "${field.slice(0, 64)}".`;
  }
  for (const [field, spec] of Object.entries(shape)) {
    if (!Object.hasOwn(input, field)) {
      if (spec.required) return `Missing required field "${field}".`;
      continue;
    }
    if (!hasType(input[field], spec.type)) return `Field "${field}" must be of type ${spec.type}.`;
  }
  return null;
}
