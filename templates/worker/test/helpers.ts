// Shared test helpers. Everything is derived from the generated manifest, so the suite works
// for any mcpay.toml.
import { env, exports } from "cloudflare:workers";
import { CALL_TYPES, GATEWAY, PRICE_MCENTS, SAMPLE_INPUT, SCOPE_FOR, type CallType, type Scope } from "../src/generated/manifest";
import { generateApiKey, generateKeyId, sha256Hex } from "../src/lib/keys";
import type { AppEnv } from "../src/lib/env";
import type { LedgerEntry } from "../src/lib/key-do";

export const BASE = "https://gateway.test";
export const testEnv = env as AppEnv;
export const ADMIN_KEY = testEnv.ADMIN_KEY ?? "";
export const EP: CallType = CALL_TYPES[0];
export const PRICE = PRICE_MCENTS[EP];
export const SAMPLE = SAMPLE_INPUT[EP];
export const SCOPE: Scope = SCOPE_FOR[EP];
export const KEY_RE = new RegExp(`^${GATEWAY.keyPrefix.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}[0-9a-f]{64}$`);

export function fetchSelf(path: string, init?: RequestInit): Promise<Response> {
  return exports.default.fetch(new Request(BASE + path, init));
}

export interface SeededKey {
  key: string;
  keyId: string;
  hash: string;
}

/**
 * Creates a key directly in its Durable Object (as the mint route does), bypassing the admin
 * route and its hourly mint limit, so tests can create as many keys as they need.
 */
export async function seedKey(opts: { balance: number; scopes?: readonly Scope[]; name?: string | null }): Promise<SeededKey> {
  const key = generateApiKey();
  const keyId = generateKeyId();
  const hash = await sha256Hex(key);
  const res = await keyStub(hash).init({
    keyId,
    name: opts.name ?? null,
    balanceMcents: opts.balance,
    scopes: [...(opts.scopes ?? [SCOPE])],
    requestId: crypto.randomUUID(),
  });
  if (!res.ok) throw new Error("seedKey: init failed");
  return { key, keyId, hash };
}

export function keyStub(hash: string) {
  return testEnv.KEYS.get(testEnv.KEYS.idFromName(hash));
}

export async function stubForKey(key: string) {
  return keyStub(await sha256Hex(key));
}

export function mintViaAdmin(body: unknown, adminKey: string = ADMIN_KEY, extraHeaders: Record<string, string> = {}): Promise<Response> {
  return fetchSelf("/v1/admin/mint", {
    method: "POST",
    headers: { "X-Admin-Key": adminKey, "Content-Type": "application/json", ...extraHeaders },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

export function paidRequest(endpoint: string, key: string | null, body: unknown, headers: Record<string, string> = {}): Request {
  const h: Record<string, string> = { "Content-Type": "application/json", ...headers };
  if (key !== null) h.Authorization = `Bearer ${key}`;
  return new Request(`${BASE}/v1/${endpoint}`, {
    method: "POST",
    headers: h,
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

export function callPaid(endpoint: string, key: string | null, body: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return exports.default.fetch(paidRequest(endpoint, key, body, headers));
}

export interface MeBody {
  ok: boolean;
  key_id: string;
  name: string | null;
  balance_mcents: number;
  scopes: string[];
  xp: number;
  level: number;
  badges: string[];
  calls: number;
  spent_mcents: number;
  refunded_mcents: number;
}

export async function getMe(key: string): Promise<MeBody> {
  const res = await fetchSelf("/v1/me", { headers: { Authorization: `Bearer ${key}` } });
  if (res.status !== 200) throw new Error(`GET /v1/me -> ${res.status}`);
  return (await res.json()) as MeBody;
}

export type LedgerRow = LedgerEntry;

export async function getLedger(key: string, limit = 500): Promise<LedgerRow[]> {
  const res = await fetchSelf(`/v1/me/ledger?limit=${limit}`, { headers: { Authorization: `Bearer ${key}` } });
  if (res.status !== 200) throw new Error(`GET /v1/me/ledger -> ${res.status}`);
  return ((await res.json()) as { entries: LedgerRow[] }).entries;
}

export interface ErrorBody {
  ok: false;
  error: { code: string; message: string };
  request_id: string;
  note?: string;
  [extra: string]: unknown;
}

export async function errorOf(res: Response): Promise<ErrorBody> {
  return (await res.json()) as ErrorBody;
}

/** A balance that covers `n` calls of EP (at least 1 mcent, as mint requires). */
export function balanceFor(n: number, endpoint: CallType = EP): number {
  return Math.max(1, n * PRICE_MCENTS[endpoint]);
}

/** Every value stored in a Durable Object's SQLite database, as one string. */
export function dumpSql(sql: SqlStorage): string {
  const tables = sql
    .exec<{ name: string }>("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_cf_%'")
    .toArray()
    .map((r) => r.name);
  return JSON.stringify(tables.map((t) => [t, sql.exec(`SELECT * FROM "${t}"`).toArray()]));
}
