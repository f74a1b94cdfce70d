// API key format, hashing and parsing. Raw keys exist only in the mint response and in the
// caller's Authorization header; everything stored is the SHA-256 hex of the key.
import { GATEWAY } from "../generated/manifest";

const KEY_HEX_LEN = 64;
const HEX64 = /^[0-9a-f]{64}$/;

function toHex(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += b.toString(16).padStart(2, "0");
  return s;
}

export function randomHex(byteLength: number): string {
  const bytes = new Uint8Array(byteLength);
  crypto.getRandomValues(bytes);
  return toHex(bytes);
}

/** A new API key: prefix + 64 lowercase hex chars (32 random bytes). */
export function generateApiKey(): string {
  return GATEWAY.keyPrefix + randomHex(KEY_HEX_LEN / 2);
}

/** A new public key id: "k_" + 16 hex chars. Safe to show anywhere (leaderboard, /v1/me). */
export function generateKeyId(): string {
  return "k_" + randomHex(8);
}

export async function sha256Bytes(text: string): Promise<ArrayBuffer> {
  return crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
}

export async function sha256Hex(text: string): Promise<string> {
  return toHex(new Uint8Array(await sha256Bytes(text)));
}

/** True when `key` has exactly the shape of a key minted by this gateway. */
export function isWellFormedKey(key: string): boolean {
  return (
    key.length === GATEWAY.keyPrefix.length + KEY_HEX_LEN &&
    key.startsWith(GATEWAY.keyPrefix) &&
    HEX64.test(key.slice(GATEWAY.keyPrefix.length))
  );
}

export type BearerResult = { ok: true; key: string } | { ok: false; code: "missing_key" | "invalid_key" };

/**
 * Parses `Authorization: Bearer <key>` (scheme case-insensitive). Only the header is
 * consulted: keys in the query string or body are ignored.
 */
export function parseBearer(header: string | null): BearerResult {
  if (header === null || header.trim() === "") return { ok: false, code: "missing_key" };
  const m = /^\s*([A-Za-z]+) +(\S+)\s*$/.exec(header);
  if (!m || m[1]!.toLowerCase() !== "bearer" || !isWellFormedKey(m[2]!)) {
    return { ok: false, code: "invalid_key" };
  }
  return { ok: true, key: m[2]! };
}

/**
 * Constant-time comparison of two secrets of any length: both sides are hashed to 32-byte
 * SHA-256 digests, which are compared with crypto.subtle.timingSafeEqual.
 */
export async function secretsEqual(a: string, b: string): Promise<boolean> {
  const [da, db] = await Promise.all([sha256Bytes(a), sha256Bytes(b)]);
  return crypto.subtle.timingSafeEqual(da, db);
}
