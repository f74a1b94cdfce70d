// Validation of the admin mint request body.
import { GATEWAY, type Scope } from "../generated/manifest";
import { HttpError } from "./http";
import { isScope } from "./manifest-util";
import { isPlainObject } from "./shape";

export interface MintInput {
  balanceMcents: number;
  scopes: Scope[];
  name: string | null;
}

const NAME = /^[A-Za-z0-9 _.-]{1,32}$/;
const ALLOWED = new Set(["balance_mcents", "scopes", "name"]);

function bad(message: string): HttpError {
  return new HttpError(400, "invalid_input", { message });
}

export function parseMintInput(body: unknown): MintInput {
  if (!isPlainObject(body)) throw bad("Body must be a JSON object.");
  for (const k of Object.keys(body)) {
    if (!ALLOWED.has(k)) throw bad(`Unknown field "${k.slice(0, 64)}".`);
  }
  const balance = body.balance_mcents;
  // Strict: no coercion. Strings, floats, booleans, null, negatives and unsafe integers are rejected.
  if (typeof balance !== "number" || !Number.isSafeInteger(balance) || balance < 1 || balance > GATEWAY.maxMintMcents) {
    throw bad(`balance_mcents must be an integer between 1 and ${GATEWAY.maxMintMcents}.`);
  }
  const scopes = body.scopes;
  if (!Array.isArray(scopes) || scopes.length === 0) {
    throw bad("scopes must be a non-empty array of scope names (keys get no scope by default).");
  }
  const unique: Scope[] = [];
  for (const s of scopes) {
    if (!isScope(s)) throw bad(`Unknown scope ${JSON.stringify(s)?.slice(0, 64) ?? "value"}.`);
    if (!unique.includes(s)) unique.push(s);
  }
  let name: string | null = null;
  if (Object.hasOwn(body, "name")) {
    if (typeof body.name !== "string" || !NAME.test(body.name)) {
      throw bad("name must be 1-32 characters of A-Z a-z 0-9 space _ . -");
    }
    name = body.name;
  }
  return { balanceMcents: balance, scopes: unique, name };
}
