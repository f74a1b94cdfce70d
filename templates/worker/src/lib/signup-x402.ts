// The x402 rail of POST /v1/signup, with the official @x402/core library: protocol v2
// (PAYMENT-REQUIRED / PAYMENT-SIGNATURE / PAYMENT-RESPONSE) and v1's X-PAYMENT, scheme `exact` on
// an EVM network (EIP-3009 transferWithAuthorization), verified and settled by a facilitator over
// its HTTP API (POST /verify, POST /settle).
// The EIP-712 signature is checked here first, locally with viem and with no I/O (step 7: nothing
// is looked up for a forged payload); the facilitator's verification then decides. The chain (viem
// over X402_RPC_URL) is the source of truth for a settlement whose outcome the facilitator did not
// tell us: the token's AuthorizationUsed event and authorizationState(from, nonce).
import { HTTPFacilitatorClient, decodePaymentSignatureHeader, encodePaymentRequiredHeader, encodePaymentResponseHeader, type FacilitatorClient } from "@x402/core/http";
import { PaymentPayloadV1Schema, PaymentPayloadV2Schema } from "@x402/core/schemas";
import { SettleError, VerifyError, type PaymentPayload, type PaymentRequired, type PaymentRequirements, type SettleResponse } from "@x402/core/types";
import { Base64EncodedRegex, deepEqual, safeBase64Decode } from "@x402/core/utils";
import { createPublicClient, http, parseAbi, parseAbiItem, verifyTypedData, type Address, type Hex } from "viem";
import type { AppEnv } from "./env";
import type { SignupConfig } from "./signup-config";

export type { FacilitatorClient };

/** Default bound of one facilitator call (verify, settle); X402_FACILITATOR_TIMEOUT_MS overrides it. */
export const FACILITATOR_TIMEOUT_MS = 60_000;

/** The bound of one facilitator call for this environment (X402_FACILITATOR_TIMEOUT_MS, else 60 s). */
export function facilitatorTimeoutMs(env: AppEnv): number {
  const raw = (env.X402_FACILITATOR_TIMEOUT_MS ?? "").trim();
  if (/^[0-9]{1,9}$/.test(raw) && Number(raw) >= 1) return Number(raw);
  return FACILITATOR_TIMEOUT_MS;
}

/** Creates the facilitator client for a facilitator URL (tests pass a deterministic one). */
export type FacilitatorFactory = (env: AppEnv, url: string) => FacilitatorClient;

export const httpFacilitator: FacilitatorFactory = (env, url) => {
  const auth = env.X402_FACILITATOR_AUTHORIZATION;
  return new HTTPFacilitatorClient({
    url,
    timeoutMs: facilitatorTimeoutMs(env),
    ...(auth
      ? {
          createAuthHeaders: async () => {
            const h = { Authorization: auth };
            return { verify: h, settle: h, supported: h };
          },
        }
      : {}),
  });
};

export interface X402Rail {
  /** The one payment requirement offered (deterministic: a client echoes it as `accepted`). */
  readonly requirement: PaymentRequirements;
  readonly facilitator: FacilitatorClient;
  /** The facilitator's base URL (recorded with a settling payment, for the sweep). */
  readonly facilitatorUrl: string;
  /** The chain's JSON-RPC URL (X402_RPC_URL, else [signup.x402] rpc_url). */
  readonly rpcUrl: string;
  /** The bound of one facilitator call, in ms. */
  readonly timeoutMs: number;
  /** x402 v1 names of our network (v1 used plain names such as "base"). */
  readonly v1Networks: readonly string[];
}

const ADDRESS = /^0x[0-9a-fA-F]{40}$/;
const NONCE = /^0x[0-9a-fA-F]{64}$/;

/** x402 v1 network names (as in @x402/evm) by EVM chain id. */
const V1_NETWORK_NAMES: Readonly<Record<string, string>> = {
  "1": "ethereum",
  "11155111": "sepolia",
  "8453": "base",
  "84532": "base-sepolia",
  "43114": "avalanche",
  "43113": "avalanche-fuji",
  "137": "polygon",
  "80002": "polygon-amoy",
  "1329": "sei",
  "1328": "sei-testnet",
  "4689": "iotex",
  "2741": "abstract",
  "11124": "abstract-testnet",
  "3338": "peaq",
  "1514": "story",
  "41923": "educhain",
  "42220": "celo",
};

function isHttpUrl(url: string): boolean {
  try {
    const u = new URL(url);
    return u.protocol === "https:" || u.protocol === "http:";
  } catch {
    return false;
  }
}

/** The x402 rail from the manifest and the environment, or what is missing. */
export function x402Rail(
  cfg: NonNullable<SignupConfig["x402"]>,
  env: AppEnv,
  factory: FacilitatorFactory,
): { ok: true; rail: X402Rail } | { ok: false; problems: string[] } {
  const problems: string[] = [];
  const payTo = (env.X402_PAY_TO ?? "").trim() || cfg.payTo;
  if (payTo === "") problems.push("x402: set X402_PAY_TO (or [signup.x402] pay_to) to the address receiving payments");
  else if (!ADDRESS.test(payTo)) problems.push("x402: X402_PAY_TO must be a 0x address (40 hex digits)");
  const url = (env.X402_FACILITATOR_URL ?? "").trim() || cfg.facilitatorUrl;
  const urlOk = isHttpUrl(url);
  if (!urlOk) problems.push("x402: X402_FACILITATOR_URL (or [signup.x402] facilitator_url) must be an http(s) URL");
  const rpcUrl = (env.X402_RPC_URL ?? "").trim() || cfg.rpcUrl;
  if (!isHttpUrl(rpcUrl)) {
    problems.push("x402: set X402_RPC_URL (or [signup.x402] rpc_url) to an http(s) JSON-RPC URL of the network, used to resolve settlements whose outcome is unknown");
  }
  if (problems.length > 0) return { ok: false, problems };
  const requirement: PaymentRequirements = {
    scheme: "exact",
    network: cfg.network as PaymentRequirements["network"],
    amount: cfg.amount,
    asset: cfg.asset,
    payTo,
    maxTimeoutSeconds: cfg.maxTimeoutSeconds,
    extra: { name: cfg.assetName, version: cfg.assetVersion },
  };
  const chainId = cfg.network.startsWith("eip155:") ? cfg.network.slice("eip155:".length) : "";
  const v1 = V1_NETWORK_NAMES[chainId];
  return {
    ok: true,
    rail: {
      requirement,
      facilitator: factory(env, url.replace(/\/+$/, "")),
      facilitatorUrl: url.replace(/\/+$/, ""),
      rpcUrl,
      timeoutMs: facilitatorTimeoutMs(env),
      v1Networks: v1 ? [v1, cfg.network] : [cfg.network],
    },
  };
}

/** The PaymentRequired object (v2) for the 402 header and body. */
export function paymentRequired(rail: X402Rail, resourceUrl: string, description: string, error: string): PaymentRequired {
  return {
    x402Version: 2,
    error,
    resource: { url: resourceUrl, description, mimeType: "application/json" },
    accepts: [rail.requirement],
    extensions: {},
  };
}

export function paymentRequiredHeader(pr: PaymentRequired): string {
  return encodePaymentRequiredHeader(pr);
}

/** A decoded x402 payment for our offer. */
export interface X402Payment {
  readonly version: 1 | 2;
  /** The v2 payload sent to the facilitator (v1 payloads are converted; `accepted` is our requirement). */
  readonly payload: PaymentPayload;
  /** `x402:<network>:<asset>:<from>:<nonce>`, lowercase. */
  readonly reference: string;
  /** The network name the client used (v1 answers with it). */
  readonly clientNetwork: string;
}

export type ParseResult = { ok: true; payment: X402Payment } | { ok: false; message: string };

function eip3009Reference(rail: X402Rail, payload: Record<string, unknown>): string | null {
  const auth = payload.authorization as Record<string, unknown> | undefined;
  if (typeof payload.signature !== "string" || typeof auth !== "object" || auth === null) return null;
  const from = auth.from;
  const nonce = auth.nonce;
  if (typeof from !== "string" || !ADDRESS.test(from) || typeof nonce !== "string" || !NONCE.test(nonce)) return null;
  const r = rail.requirement;
  return `x402:${r.network}:${r.asset}:${from}:${nonce}`.toLowerCase();
}

/** PAYMENT-SIGNATURE (v2): base64 JSON PaymentPayload whose `accepted` deep-equals our requirement. */
export function parseV2(rail: X402Rail, header: string): ParseResult {
  let raw: unknown;
  try {
    raw = decodePaymentSignatureHeader(header.trim());
  } catch {
    return { ok: false, message: "PAYMENT-SIGNATURE is not base64-encoded JSON." };
  }
  const parsed = PaymentPayloadV2Schema.safeParse(raw);
  if (!parsed.success) return { ok: false, message: "PAYMENT-SIGNATURE is not an x402 v2 PaymentPayload." };
  const p = raw as PaymentPayload;
  if (!deepEqual(p.accepted, rail.requirement)) {
    return { ok: false, message: "The payment's `accepted` requirement is not the one offered (echo accepts[0] unchanged)." };
  }
  const reference = eip3009Reference(rail, p.payload);
  if (!reference) return { ok: false, message: "The payment is not an EIP-3009 authorization (payload.signature, payload.authorization.from/nonce)." };
  const payload: PaymentPayload = { x402Version: 2, accepted: rail.requirement, payload: p.payload };
  if (p.resource) payload.resource = p.resource;
  if (p.extensions) payload.extensions = p.extensions;
  return { ok: true, payment: { version: 2, payload, reference, clientNetwork: rail.requirement.network } };
}

/** X-PAYMENT (v1): base64 JSON {x402Version: 1, scheme, network, payload} for scheme exact on our network. */
export function parseV1(rail: X402Rail, header: string, resourceUrl: string): ParseResult {
  let raw: unknown;
  try {
    const h = header.trim();
    if (!Base64EncodedRegex.test(h)) throw new Error("not base64");
    raw = JSON.parse(safeBase64Decode(h));
  } catch {
    return { ok: false, message: "X-PAYMENT is not base64-encoded JSON." };
  }
  const parsed = PaymentPayloadV1Schema.safeParse(raw);
  if (!parsed.success) return { ok: false, message: "X-PAYMENT is not an x402 v1 payment payload." };
  const v1 = parsed.data;
  if (v1.scheme !== "exact") return { ok: false, message: `Scheme ${JSON.stringify(v1.scheme).slice(0, 40)} is not offered (use "exact").` };
  if (!rail.v1Networks.includes(v1.network)) {
    return { ok: false, message: `Network ${JSON.stringify(v1.network).slice(0, 40)} is not offered (${rail.v1Networks.join(" or ")}).` };
  }
  const reference = eip3009Reference(rail, v1.payload);
  if (!reference) return { ok: false, message: "The payment is not an EIP-3009 authorization (payload.signature, payload.authorization.from/nonce)." };
  const payload: PaymentPayload = {
    x402Version: 2,
    resource: { url: resourceUrl },
    accepted: rail.requirement,
    payload: v1.payload,
  };
  return { ok: true, payment: { version: 1, payload, reference, clientNetwork: v1.network } };
}

// ------------------------------------------------------------------ step 7: the signature, locally

/** An EIP-3009 authorization as signed (decimal strings, 0x hex). */
export interface Authorization {
  readonly from: string;
  readonly to: string;
  readonly value: string;
  readonly validAfter: string;
  readonly validBefore: string;
  readonly nonce: string;
}

const UINT = /^[0-9]{1,78}$/;
const SIGNATURE_65 = /^0x[0-9a-fA-F]{130}$/;

/** EIP-3009 TransferWithAuthorization, the EIP-712 type x402 `exact` payments sign. */
export const TRANSFER_WITH_AUTHORIZATION = {
  TransferWithAuthorization: [
    { name: "from", type: "address" },
    { name: "to", type: "address" },
    { name: "value", type: "uint256" },
    { name: "validAfter", type: "uint256" },
    { name: "validBefore", type: "uint256" },
    { name: "nonce", type: "bytes32" },
  ],
} as const;

/** The authorization of a decoded payment (its shape was checked by eip3009Reference). */
export function authorizationOf(payment: X402Payment): Authorization {
  const a = payment.payload.payload.authorization as Record<string, unknown>;
  const str = (v: unknown) => (typeof v === "string" ? v : typeof v === "number" || typeof v === "bigint" ? String(v) : "");
  return {
    from: str(a.from),
    to: str(a.to),
    value: str(a.value),
    validAfter: str(a.validAfter),
    validBefore: str(a.validBefore),
    nonce: str(a.nonce),
  };
}

/** Two authorizations are the same payment terms (hex compared case-insensitively). */
export function sameAuthorization(a: Authorization, b: Authorization): boolean {
  const keys: Array<keyof Authorization> = ["from", "to", "value", "validAfter", "validBefore", "nonce"];
  return keys.every((k) => a[k].toLowerCase() === b[k].toLowerCase());
}

/**
 * Step 7: the EIP-712 TransferWithAuthorization signature recovers (ECDSA, 65 bytes r||s||v) to
 * `authorization.from`, and the authorization pays the offered amount to the offered address.
 * Local, no I/O. Returns null when genuine, else why not. Smart-contract wallets (EIP-1271) are
 * refused: their signatures cannot be checked without asking the chain.
 */
export async function checkSignature(rail: X402Rail, payment: X402Payment): Promise<string | null> {
  const req = rail.requirement;
  const a = authorizationOf(payment);
  const signature = payment.payload.payload.signature;
  if (typeof signature !== "string" || !SIGNATURE_65.test(signature)) {
    return "The payment's signature must be a 65-byte ECDSA signature (0x + 130 hex digits); smart-contract wallet signatures are not accepted.";
  }
  if (!ADDRESS.test(a.to) || a.to.toLowerCase() !== req.payTo.toLowerCase()) return "The authorization does not pay the offered address (payTo).";
  if (!UINT.test(a.value) || BigInt(a.value) !== BigInt(req.amount)) return "The authorization is not for the offered amount.";
  if (!UINT.test(a.validAfter) || !UINT.test(a.validBefore)) return "The authorization's validAfter/validBefore must be unsigned integers.";
  const chainId = Number(req.network.slice("eip155:".length));
  const extra = (req.extra ?? {}) as { name?: string; version?: string };
  let ok = false;
  try {
    ok = await verifyTypedData({
      address: a.from as Address,
      domain: { name: extra.name, version: extra.version, chainId, verifyingContract: req.asset as Address },
      types: TRANSFER_WITH_AUTHORIZATION,
      primaryType: "TransferWithAuthorization",
      message: {
        from: a.from as Address,
        to: a.to as Address,
        value: BigInt(a.value),
        validAfter: BigInt(a.validAfter),
        validBefore: BigInt(a.validBefore),
        nonce: a.nonce as Hex,
      },
      signature: signature as Hex,
    });
  } catch {
    ok = false;
  }
  return ok ? null : "The payment's signature is not a valid EIP-712 TransferWithAuthorization signature by authorization.from.";
}

// ------------------------------------------------------------------ the facilitator, bounded

class Timeout extends Error {
  constructor(what: string, ms: number) {
    super(`facilitator ${what} did not answer within ${ms} ms`);
    this.name = "FacilitatorTimeout";
  }
}

/** `p`, or a rejection after `ms` (the facilitator call itself may still finish: its outcome is then unknown). */
function bounded<T>(p: Promise<T>, what: string, ms: number): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Timeout(what, ms)), ms);
  });
  return Promise.race([p, t]).finally(() => {
    if (timer !== undefined) clearTimeout(timer);
  });
}

function reasonOf(reason: string | undefined, message: string | undefined, fallback: string): string {
  const r = [reason, message].filter((x) => typeof x === "string" && x !== "").join(": ");
  return (r || fallback).slice(0, 300);
}

export type VerifyOutcome = { ok: true } | { ok: false; status: 402 | 502; message: string };

/**
 * Step 10: the facilitator's verification. A definite refusal (isValid:false, also with a 4xx) is
 * the payer's (402); no answer, a 5xx, a timeout or a malformed answer is ours (502). Verify moves
 * no money either way.
 */
export async function facilitatorVerify(rail: X402Rail, payment: X402Payment): Promise<VerifyOutcome> {
  try {
    const v = await bounded(rail.facilitator.verify(payment.payload, rail.requirement), "verify", rail.timeoutMs);
    if (v.isValid !== true) return { ok: false, status: 402, message: `Payment refused: ${reasonOf(v.invalidReason, v.invalidMessage, "invalid")}.` };
    return { ok: true };
  } catch (err) {
    if (err instanceof VerifyError && err.statusCode >= 400 && err.statusCode < 500) {
      return { ok: false, status: 402, message: `Payment refused: ${reasonOf(err.invalidReason, err.invalidMessage, "invalid")}.` };
    }
    console.error(JSON.stringify({ msg: "x402 facilitator verify failed", error: String(err).slice(0, 500) }));
    return { ok: false, status: 502, message: "The payment facilitator could not verify the payment; nothing was charged. Retry later." };
  }
}

export type SettleOutcome =
  | { kind: "success"; transaction: string }
  | { kind: "refused"; reason: string }
  | { kind: "unknown"; transaction: string | null; reason: string };

const TX_HASH = /^0x[0-9a-fA-F]{64}$/;

function txOrNull(tx: unknown): string | null {
  return typeof tx === "string" && TX_HASH.test(tx) ? tx.toLowerCase() : null;
}

/**
 * Step 12: one /settle. `success:true` with a transaction is done; `success:false` (HTTP 200 or
 * 4xx) with a reason other than settlement_pending is a definite refusal; anything else (the
 * facilitator's settlement_pending, a 5xx, a reset, a timeout, a malformed answer) leaves the
 * outcome unknown: the transfer may have happened.
 */
export async function facilitatorSettle(facilitator: FacilitatorClient, payload: PaymentPayload, requirement: PaymentRequirements, timeoutMs: number): Promise<SettleOutcome> {
  let s: SettleResponse;
  try {
    s = await bounded(facilitator.settle(payload, requirement), "settle", timeoutMs);
  } catch (err) {
    if (err instanceof SettleError && err.statusCode >= 400 && err.statusCode < 500 && err.errorReason !== "settlement_pending") {
      return { kind: "refused", reason: reasonOf(err.errorReason, err.errorMessage, "failed") };
    }
    const tx = err instanceof SettleError ? txOrNull(err.transaction) : null;
    console.error(JSON.stringify({ msg: "x402 facilitator settle: outcome unknown", error: String(err).slice(0, 500), transaction: tx }));
    return { kind: "unknown", transaction: tx, reason: String(err).slice(0, 300) };
  }
  if (s === null || typeof s !== "object") return { kind: "unknown", transaction: null, reason: "malformed settle answer" };
  if (s.success === true) {
    const tx = txOrNull(s.transaction);
    if (tx !== null) return { kind: "success", transaction: tx };
    return { kind: "unknown", transaction: null, reason: "settle answered success without a transaction hash" };
  }
  if (s.success === false && s.errorReason !== "settlement_pending") {
    return { kind: "refused", reason: reasonOf(s.errorReason, s.errorMessage, "failed") };
  }
  console.error(JSON.stringify({ msg: "x402 facilitator settle: outcome unknown", reason: s.errorReason ?? "malformed", transaction: txOrNull(s.transaction) }));
  return { kind: "unknown", transaction: txOrNull(s.transaction), reason: reasonOf(s.errorReason, s.errorMessage, "malformed settle answer") };
}

/** The success header of an x402 payment (PAYMENT-RESPONSE for v2, X-PAYMENT-RESPONSE for v1). */
export function settlementHeader(version: 1 | 2, clientNetwork: string, network: string, transaction: string, payer: string): { name: string; value: string } {
  const s: SettleResponse = { success: true, transaction, network: network as SettleResponse["network"], payer };
  return version === 2
    ? { name: "PAYMENT-RESPONSE", value: encodePaymentResponseHeader(s) }
    : { name: "X-PAYMENT-RESPONSE", value: encodePaymentResponseHeader({ ...s, network: clientNetwork as SettleResponse["network"] }) };
}

// ------------------------------------------------------------------ the chain, the source of truth

const AUTHORIZATION_USED = parseAbiItem("event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce)");
const AUTHORIZATION_STATE = parseAbi(["function authorizationState(address authorizer, bytes32 nonce) view returns (bool)"]);

function chain(rpcUrl: string) {
  // Few retries: a sweep asks again 30 s later anyway.
  return createPublicClient({ transport: http(rpcUrl, { retryCount: 1, timeout: 15_000 }) });
}

/** Step 11: the chain's current block number (where to start looking for the transfer later). */
export async function currentBlock(rpcUrl: string): Promise<bigint> {
  return chain(rpcUrl).getBlockNumber({ cacheTime: 0 });
}

/**
 * The chain's own clock: the timestamp the next block will carry, at least — the larger of the
 * `pending` block's timestamp (nodes that build one: the next block's time) and the `latest`
 * block's. An EIP-3009 transfer succeeds only in a block whose timestamp is before `validBefore`,
 * and block timestamps never go back, so once this is at or past `validBefore` no transfer of that
 * authorization can be mined any more. The server's own clock decides nothing: it may run ahead of
 * the chain, and a block stamped just before `validBefore` may not have reached our RPC yet.
 * Read it BEFORE looking for the transfer. Null when the RPC cannot be reached.
 */
export async function chainTime(rpcUrl: string): Promise<bigint | null> {
  const client = chain(rpcUrl);
  try {
    const latest = await client.getBlock({ blockTag: "latest" });
    let pending = 0n;
    try {
      pending = (await client.getBlock({ blockTag: "pending" })).timestamp ?? 0n;
    } catch {
      // Not every node serves a pending block: the latest one decides alone.
    }
    return latest.timestamp > pending ? latest.timestamp : pending;
  } catch (err) {
    console.error(JSON.stringify({ msg: "x402 chain time query failed", error: String(err).slice(0, 500) }));
    return null;
  }
}

export type ChainAnswer =
  | { kind: "transferred"; transaction: string }
  | { kind: "canceled" }
  | { kind: "unused" }
  | { kind: "unreachable"; error: string };

/**
 * Whether the token moved the money of (from, nonce): its AuthorizationUsed event since a few
 * blocks before the settlement started. No event and authorizationState true: the payer canceled
 * the authorization. No event and false: nothing moved (yet).
 */
export async function askChain(rpcUrl: string, asset: string, from: string, nonce: string, fromBlock: bigint): Promise<ChainAnswer> {
  const client = chain(rpcUrl);
  try {
    const logs = await client.getLogs({
      address: asset as Address,
      event: AUTHORIZATION_USED,
      args: { authorizer: from as Address, nonce: nonce as Hex },
      fromBlock: fromBlock > 5n ? fromBlock - 5n : 0n,
      toBlock: "latest",
    });
    const log = logs.find((l) => l.transactionHash !== null);
    if (log) return { kind: "transferred", transaction: log.transactionHash!.toLowerCase() };
    const used = await client.readContract({
      address: asset as Address,
      abi: AUTHORIZATION_STATE,
      functionName: "authorizationState",
      args: [from as Address, nonce as Hex],
    });
    if (used) {
      // Used but no event in our window: look once from the start of the chain (it may have been
      // settled before we recorded the block, by someone else holding the signed authorization).
      const all = await client.getLogs({
        address: asset as Address,
        event: AUTHORIZATION_USED,
        args: { authorizer: from as Address, nonce: nonce as Hex },
        fromBlock: 0n,
        toBlock: "latest",
      });
      const early = all.find((l) => l.transactionHash !== null);
      if (early) return { kind: "transferred", transaction: early.transactionHash!.toLowerCase() };
      return { kind: "canceled" };
    }
    return { kind: "unused" };
  } catch (err) {
    console.error(JSON.stringify({ msg: "x402 chain query failed", error: String(err).slice(0, 500) }));
    return { kind: "unreachable", error: String(err).slice(0, 300) };
  }
}
