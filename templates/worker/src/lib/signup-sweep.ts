// The signup payment steps shared by a request (POST /v1/signup) and the PaymentDO's alarm (the
// sweep): settle an x402 payment and decide its outcome from the facilitator's answer and, when
// that answer is not definite, from the chain; resolve a pending payment; mint the key it bought.
// A key is derived from the server secret and the SHA-256 of the signup's Idempotency-Key, so the
// sweep can mint it with no client, and only the holder of the Idempotency-Key can be shown it.
import type { PaymentPayload, PaymentRequirements } from "@x402/core/types";
import { GATEWAY } from "../generated/manifest";
import type { AppEnv } from "./env";
import type { KeyDO } from "./key-do";
import { generateKeyId } from "./keys";
import type { PaymentDO, SignupPaid, SignupRecord, SignupSnapshot, SignupStore, X402Settlement } from "./payment-do";
import { askChain, chainTime, facilitatorSettle, facilitatorTimeoutMs, httpFacilitator, settlementHeader, type FacilitatorClient } from "./signup-x402";

/** key = prefix + hex(HMAC-SHA256(SIGNUP_SECRET, DERIVATION_PREFIX + sha256_hex(idem) + ":" + reference)). */
export const DERIVATION_PREFIX = "mcpay-signup-v2:";
export const MIN_SIGNUP_SECRET_BYTES = 32;

/** SIGNUP_SECRET when it is set and long enough, else null. */
export function signupSecret(env: AppEnv): string | null {
  const s = env.SIGNUP_SECRET ?? "";
  return new TextEncoder().encode(s).length >= MIN_SIGNUP_SECRET_BYTES ? s : null;
}

function toHex(buf: ArrayBuffer): string {
  return Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The key a signup mints for this payment and this Idempotency-Key (given by its SHA-256). */
export async function deriveSignupKey(prefix: string, secret: string, idemHash: string, reference: string): Promise<string> {
  const enc = new TextEncoder();
  const k = await crypto.subtle.importKey("raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return prefix + toHex(await crypto.subtle.sign("HMAC", k, enc.encode(`${DERIVATION_PREFIX}${idemHash}:${reference}`)));
}

/** How a settlement ended: the money moved, it did not (and never will for this attempt), or unknown. */
export type Settled =
  | { kind: "paid"; paid: SignupPaid }
  | { kind: "released"; message: string }
  | { kind: "pending"; transaction: string | null };

function paidOf(x: X402Settlement, transaction: string): SignupPaid {
  const network = String(x.requirement.network);
  return { rail: "x402", reference: transaction, header: settlementHeader(x.version, x.clientNetwork, network, transaction, x.authorization.from) };
}

/**
 * Settles (mode "settle": step 12) or resolves (mode "resolve": a pending payment) an x402 payment
 * recorded as settling / pending, and records the outcome in `store`:
 *   success → paid; a definite refusal → the chain decides (moved → paid, else released);
 *   unknown → pending. Resolving asks the chain first: moved → paid; canceled, or expired unused →
 *   released; unused and still valid → /settle again (EIP-3009 moves money at most once per nonce).
 */
export async function settleX402(
  store: SignupStore,
  token: string,
  x: X402Settlement,
  facilitator: FacilitatorClient,
  timeoutMs: number,
  rpcUrl: string,
  mode: "settle" | "resolve",
  knownTx: string | null = null,
): Promise<Settled> {
  const asset = String(x.requirement.asset);
  const { from, nonce } = x.authorization;
  const fromBlock = BigInt(x.fromBlock);
  const validBefore = /^[0-9]{1,78}$/.test(x.authorization.validBefore) ? BigInt(x.authorization.validBefore) : 0n;
  const transaction = knownTx;
  const decide = async (s: Settled): Promise<Settled> => {
    if (s.kind === "paid") await store.signupPaid(token, s.paid);
    else if (s.kind === "released") await store.signupRelease(token, s.message);
    else await store.signupPending(token, s.transaction);
    return s;
  };
  const settleOnce = async (): Promise<Settled> => {
    const out = await facilitatorSettle(facilitator, x.payload as unknown as PaymentPayload, x.requirement as unknown as PaymentRequirements, timeoutMs);
    if (out.kind === "success") return decide({ kind: "paid", paid: paidOf(x, out.transaction) });
    if (out.kind === "unknown") return decide({ kind: "pending", transaction: out.transaction ?? transaction });
    // A definite refusal: the chain says whether anything moved (its clock first: see chainTime).
    const now = mode === "resolve" ? await chainTime(rpcUrl) : null;
    if (mode === "resolve" && now === null) return decide({ kind: "pending", transaction });
    const c = await askChain(rpcUrl, asset, from, nonce, fromBlock);
    if (c.kind === "transferred") return decide({ kind: "paid", paid: paidOf(x, c.transaction) });
    if (c.kind === "unreachable") return decide({ kind: "pending", transaction });
    if (mode === "resolve" && c.kind === "unused" && now! < validBefore) {
      // An earlier attempt's outcome was unknown: its transaction may still be in flight and mine
      // later, so a refusal now does not prove nothing will move. Pending until the chain's clock
      // passes validBefore.
      return decide({ kind: "pending", transaction });
    }
    return decide({ kind: "released", message: `Settlement failed: ${out.reason}.` });
  };
  if (mode === "settle") return settleOnce();
  // The chain's clock before its logs: expired by the chain's clock and no transfer seen after
  // that means none can ever be mined (the server's clock decides nothing).
  const now = await chainTime(rpcUrl);
  if (now === null) return decide({ kind: "pending", transaction });
  const c = await askChain(rpcUrl, asset, from, nonce, fromBlock);
  if (c.kind === "transferred") return decide({ kind: "paid", paid: paidOf(x, c.transaction) });
  if (c.kind === "unreachable") return decide({ kind: "pending", transaction });
  if (c.kind === "canceled") return decide({ kind: "released", message: "The payer canceled the authorization before it was settled; no money moved." });
  if (now >= validBefore) {
    return decide({ kind: "released", message: "The authorization expired without being settled; no money moved." });
  }
  return settleOnce();
}

function keyStub(env: AppEnv, keyHash: string): DurableObjectStub<KeyDO> {
  return env.KEYS.get(env.KEYS.idFromName(keyHash));
}

async function sha256Hex(text: string): Promise<string> {
  return toHex(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
}

/**
 * Mints the key a paid signup bought (idempotent: the derived key's object is initialised once)
 * and records the payment as done. Returns the key and the record that stands.
 */
export async function mintPaid(
  env: AppEnv,
  store: SignupStore,
  token: string,
  snap: Pick<SignupSnapshot, "reference" | "idemHash" | "purchase">,
  paid: SignupPaid,
  requestId: string,
  secret: string,
): Promise<{ key: string; record: SignupRecord }> {
  if (snap.idemHash === null || snap.purchase === null) throw new Error("signup: the payment record has no Idempotency-Key hash or purchase");
  const key = await deriveSignupKey(GATEWAY.keyPrefix, secret, snap.idemHash, snap.reference);
  const p = snap.purchase;
  const minted = await keyStub(env, await sha256Hex(key)).initOnce({
    keyId: generateKeyId(),
    name: p.name,
    balanceMcents: p.balanceMcents,
    scopes: [...p.scopes] as never,
    requestId,
  });
  if (!minted) throw new Error("signup: the key object refused the mint");
  const record = await store.signupComplete(token, {
    ...paid,
    keyId: minted.keyId,
    name: minted.created ? p.name : minted.name,
    balanceMcents: p.balanceMcents,
    scopes: [...p.scopes],
    idemHash: snap.idemHash,
    mintedAt: Date.now(),
  });
  return { key, record };
}

/** The alarm's work for one payment it holds (`token`): resolve it from the chain, mint when paid. */
export async function sweepSignup(obj: PaymentDO, env: AppEnv, token: string, snap: SignupSnapshot): Promise<void> {
  const requestId = `sweep:${crypto.randomUUID()}`;
  let paid = snap.state === "paid" ? snap.paid : null;
  if (paid === null) {
    const x = snap.x402;
    // `settling` is always written with the payload; a record without one cannot be resolved here.
    if (x === null) throw new Error("signup sweep: no x402 settlement recorded");
    const rpcUrl = (env.X402_RPC_URL ?? "").trim() || x.rpcUrl;
    const facilitatorUrl = (env.X402_FACILITATOR_URL ?? "").trim().replace(/\/+$/, "") || x.facilitatorUrl;
    const out = await settleX402(obj, token, x, httpFacilitator(env, facilitatorUrl), facilitatorTimeoutMs(env), rpcUrl, "resolve", snap.transaction);
    if (out.kind !== "paid") return;
    paid = out.paid;
  }
  const secret = signupSecret(env);
  if (secret === null) throw new Error("signup sweep: SIGNUP_SECRET is not set (at least 32 bytes); the paid key cannot be minted yet");
  await mintPaid(env, obj, token, snap, paid, requestId, secret);
}
