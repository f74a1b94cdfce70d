// Test-only payment plumbing for POST /v1/signup. Nothing here is reachable from src/: the
// production app (src/index.ts) uses mcpay.toml's [signup], @x402/core's HTTP facilitator client,
// viem over X402_RPC_URL and mppx's tempo/stripe methods; these tests build their own app with
// createApp's options:
//   - TEST_SIGNUP: [signup] settings with both rails on (whatever this project's mcpay.toml says);
//   - FakeChain: a deterministic test double of the EVM JSON-RPC (eth_blockNumber, eth_getLogs for
//     the token's AuthorizationUsed event, eth_call authorizationState), served to viem's http
//     transport through fetch: it records every transfer, so tests count how often money moved;
//   - TestFacilitator: a deterministic x402 facilitator (the FacilitatorClient interface of
//     @x402/core) that checks the EIP-712 signature with viem and moves money on the FakeChain,
//     with fault modes (settle then 500 / hang / settlement_pending); it is also served over HTTP
//     (POST <url>/verify, /settle) for the PaymentDO's sweep, which uses the production client;
//   - payments are signed for real (viem's privateKeyToAccount(...).signTypedData);
//   - "test/charge" (and "other/charge"): deterministic MPP methods, defined as mppx's own tests
//     define theirs (Method.from + Method.toServer), paid by the mppx client.
// The workerd suite cannot reach a local chain; the real anvil + official facilitator path is
// covered end to end by tests/chain in the create-mcpay repository.
import { env } from "cloudflare:workers";
import { createExecutionContext, runInDurableObject, waitOnExecutionContext } from "cloudflare:test";
import { encodePaymentSignatureHeader, type FacilitatorClient } from "@x402/core/http";
import { VerifyError, type PaymentPayload, type PaymentRequirements, type SettleResponse, type SupportedResponse, type VerifyResponse } from "@x402/core/types";
import { deepEqual } from "@x402/core/utils";
import { Credential, Errors, Method, z } from "mppx";
import { Mppx as MppxClient } from "mppx/client";
import { decodeFunctionData, encodeFunctionResult, keccak256, pad, parseAbi, toHex, verifyTypedData, type Address, type Hex } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { createApp, type App } from "../src/app";
import { GATEWAY } from "../src/generated/manifest";
import { HANDLERS } from "../src/generated/handlers";
import type { AppEnv } from "../src/lib/env";
import type { PaymentSetupResult } from "../src/lib/mpp-methods";
import type { SignupConfig } from "../src/lib/signup-config";
import { TRANSFER_WITH_AUTHORIZATION, type FacilitatorFactory } from "../src/lib/signup-x402";
import { BASE, SCOPE, dumpSql } from "./helpers";

/**
 * The test environment without any payment setting a developer's .dev.vars may hold (tests that
 * need one set it explicitly); MPP_SECRET_KEY and SIGNUP_SECRET are the test values from
 * vitest.config.mts (the PaymentDO's sweep reads them from its own environment).
 */
export const signupEnv: AppEnv = {
  ...(env as AppEnv),
  X402_PAY_TO: undefined,
  X402_FACILITATOR_URL: undefined,
  X402_FACILITATOR_AUTHORIZATION: undefined,
  X402_RPC_URL: undefined,
  X402_FACILITATOR_TIMEOUT_MS: undefined,
  TEMPO_RECIPIENT: undefined,
  TEMPO_CURRENCY: undefined,
  TEMPO_TESTNET: undefined,
  TEMPO_RPC_URL: undefined,
  TEMPO_CHAIN_ID: undefined,
  STRIPE_SECRET_KEY: undefined,
  STRIPE_NETWORK_ID: undefined,
};
export const SECRET = signupEnv.MPP_SECRET_KEY!;
export const SIGNUP_SECRET = signupEnv.SIGNUP_SECRET!;
export const REALM = new URL(BASE).hostname;
export const SIGNUP_URL = `${BASE}/v1/signup`;

const PRICE = 50_000;
const DECIMALS = 6;
export const PAY_TO = "0x1111111111111111111111111111111111111111";
export const DEFAULT_RPC_URL = "http://rpc.chain.test/";

/** [signup] with both rails on, independent of this project's mcpay.toml. */
export const TEST_SIGNUP: SignupConfig = {
  enabled: true,
  priceMcents: PRICE,
  balanceMcents: 12_345,
  scopes: [SCOPE],
  signupsPerHour: 1000,
  rails: ["x402", "mpp"],
  x402: {
    network: "eip155:84532",
    asset: "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    assetName: "USDC",
    assetVersion: "2",
    assetDecimals: DECIMALS,
    amount: (BigInt(PRICE) * 10n ** BigInt(DECIMALS - 5)).toString(),
    payTo: PAY_TO,
    facilitatorUrl: "https://facilitator.invalid",
    rpcUrl: DEFAULT_RPC_URL,
    maxTimeoutSeconds: 120,
  },
  mpp: { methods: ["test/charge"], realm: "", challengeTtlSeconds: 300 },
};

export const REQUIREMENT: PaymentRequirements = {
  scheme: "exact",
  network: "eip155:84532",
  amount: TEST_SIGNUP.x402!.amount,
  asset: TEST_SIGNUP.x402!.asset,
  payTo: PAY_TO,
  maxTimeoutSeconds: 120,
  extra: { name: "USDC", version: "2" },
};

// ------------------------------------------------------------------ the chain (a JSON-RPC test double)

/** keccak256("AuthorizationUsed(address,bytes32)"), computed (the contract's topic0). */
export const AUTHORIZATION_USED_TOPIC = keccak256(toHex("AuthorizationUsed(address,bytes32)"));
const STATE_ABI = parseAbi(["function authorizationState(address authorizer, bytes32 nonce) view returns (bool)"]);

function authKey(from: string, nonce: string): string {
  return `${from.toLowerCase()}:${nonce.toLowerCase()}`;
}

let chainSeq = 0;

/**
 * The token contract of one chain: EIP-3009 authorizations used (each a transfer, with its
 * transaction and block) or canceled, as a JSON-RPC endpoint at `url`. `transfers` counts how
 * often money moved; a second transfer of one authorization is refused, as on chain.
 */
export class FakeChain {
  readonly url: string;
  block = 1000n;
  readonly used = new Map<string, { tx: string; block: bigint }>();
  readonly canceled = new Set<string>();
  /** Transfers submitted but not mined yet (mine() mines them). */
  readonly mempool: Array<{ from: string; nonce: string; tx: string }> = [];
  transfers = 0;
  /** The JSON-RPC methods asked, in order. */
  readonly asked: string[] = [];
  down = false;
  /** Seconds the chain's block clock runs ahead of (or, negative, behind) this machine's. */
  clockOffsetSeconds = 0;

  constructor() {
    chainSeq++;
    this.url = chainSeq === 1 ? DEFAULT_RPC_URL : `http://rpc-${chainSeq}.chain.test/`;
    CHAINS.set(this.url, this);
  }

  isUsed(from: string, nonce: string): boolean {
    const k = authKey(from, nonce);
    return this.used.has(k) || this.canceled.has(k) || this.mempool.some((m) => authKey(m.from, m.nonce) === k);
  }

  /** Moves the money of (from, nonce) now; its transaction hash. */
  transfer(from: string, nonce: string): string {
    const k = authKey(from, nonce);
    if (this.used.has(k) || this.canceled.has(k)) throw new Error("authorization is used or canceled");
    const tx = txHashFor(nonce);
    this.block += 1n;
    this.used.set(k, { tx, block: this.block });
    this.transfers++;
    return tx;
  }

  /** Submits the transfer without mining it (an anvil with automine off). */
  submit(from: string, nonce: string): string {
    const tx = txHashFor(nonce);
    this.mempool.push({ from, nonce, tx });
    return tx;
  }

  mine(): void {
    for (const m of this.mempool.splice(0)) this.transfer(m.from, m.nonce);
  }

  cancel(from: string, nonce: string): void {
    this.canceled.add(authKey(from, nonce));
  }

  async rpc(body: { id: number; method: string; params: unknown[] }): Promise<unknown> {
    this.asked.push(body.method);
    switch (body.method) {
      case "eth_chainId":
        return toHex(84532);
      case "eth_blockNumber":
        return toHex(this.block);
      case "eth_getBlockByNumber": {
        // latest: the last block; pending: the next one, stamped with the chain's clock.
        const tag = String(body.params[0]);
        const number = tag === "pending" ? this.block + 1n : this.block;
        const timestamp = BigInt(Math.floor(Date.now() / 1000) + this.clockOffsetSeconds);
        return {
          number: toHex(number),
          hash: pad(toHex(number), { size: 32 }),
          parentHash: pad(toHex(number - 1n), { size: 32 }),
          timestamp: toHex(tag === "pending" ? timestamp : timestamp - 1n),
          transactions: [],
          uncles: [],
          logsBloom: null,
          gasLimit: "0x0",
          gasUsed: "0x0",
          baseFeePerGas: "0x0",
          difficulty: "0x0",
          extraData: "0x",
          miner: "0x0000000000000000000000000000000000000000",
          nonce: "0x0000000000000000",
          size: "0x0",
          stateRoot: pad("0x0", { size: 32 }),
          receiptsRoot: pad("0x0", { size: 32 }),
          transactionsRoot: pad("0x0", { size: 32 }),
          sha3Uncles: pad("0x0", { size: 32 }),
          mixHash: pad("0x0", { size: 32 }),
          totalDifficulty: "0x0",
        };
      }
      case "eth_getLogs": {
        const f = body.params[0] as { address: string; topics: Array<string | null>; fromBlock: string };
        const from = BigInt(f.fromBlock === "earliest" ? 0 : f.fromBlock);
        if (f.address.toLowerCase() !== REQUIREMENT.asset.toLowerCase() || f.topics[0] !== AUTHORIZATION_USED_TOPIC) return [];
        const out: unknown[] = [];
        for (const [k, u] of this.used) {
          const [authorizer, nonce] = k.split(":") as [string, string];
          const t1 = pad(authorizer as Hex, { size: 32 });
          if (f.topics[1] && f.topics[1].toLowerCase() !== t1) continue;
          if (f.topics[2] && f.topics[2].toLowerCase() !== nonce) continue;
          if (u.block < from) continue;
          out.push({
            address: REQUIREMENT.asset.toLowerCase(),
            topics: [AUTHORIZATION_USED_TOPIC, t1, nonce],
            data: "0x",
            blockNumber: toHex(u.block),
            blockHash: pad(toHex(u.block), { size: 32 }),
            transactionHash: u.tx,
            transactionIndex: "0x0",
            logIndex: "0x0",
            removed: false,
          });
        }
        return out;
      }
      case "eth_call": {
        const call = body.params[0] as { to: string; data: Hex };
        const { args } = decodeFunctionData({ abi: STATE_ABI, data: call.data });
        const k = authKey(args[0], args[1]);
        return encodeFunctionResult({ abi: STATE_ABI, functionName: "authorizationState", result: this.used.has(k) || this.canceled.has(k) });
      }
      default:
        throw new Error(`FakeChain: unexpected method ${body.method}`);
    }
  }

  count(method: string): number {
    return this.asked.filter((m) => m === method).length;
  }
}

const CHAINS = new Map<string, FakeChain>();
const FACILITATORS = new Map<string, TestFacilitator>();
const realFetch = globalThis.fetch;

/**
 * The network the worker (and its Durable Objects, which run in this isolate) sees: each FakeChain
 * at its URL, each TestFacilitator's HTTP API at its URL, anything else the real fetch.
 */
export const networkFetch: typeof fetch = async (input, init) => {
  const req = new Request(input as RequestInfo, init);
  const chain = CHAINS.get(req.url);
  if (chain) {
    if (chain.down) throw new TypeError("fetch failed: connection refused");
    const body = (await req.json()) as { id: number; method: string; params: unknown[] };
    try {
      return Response.json({ jsonrpc: "2.0", id: body.id, result: await chain.rpc(body) });
    } catch (err) {
      return Response.json({ jsonrpc: "2.0", id: body.id, error: { code: -32000, message: String(err) } });
    }
  }
  const url = new URL(req.url);
  const fac = FACILITATORS.get(url.origin);
  if (fac && req.method === "POST") {
    const body = (await req.json()) as { paymentPayload: PaymentPayload; paymentRequirements: PaymentRequirements };
    try {
      const out = url.pathname.endsWith("/verify")
        ? await fac.verify(body.paymentPayload, body.paymentRequirements)
        : await fac.settle(body.paymentPayload, body.paymentRequirements);
      return Response.json(out);
    } catch (err) {
      return new Response(`facilitator error: ${String(err)}`, { status: 500 });
    }
  }
  return realFetch(input as RequestInfo, init);
};
globalThis.fetch = networkFetch;

// ------------------------------------------------------------------ x402

/** The payer (anvil's second well-known development key; never a real account). */
const PAYER_ACCOUNT = privateKeyToAccount("0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d");
/** Someone else (forges the payer's payments). */
export const MALLORY = privateKeyToAccount("0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a");
export const PAYER = PAYER_ACCOUNT.address;

const TRANSFER_TYPES = TRANSFER_WITH_AUTHORIZATION;

const DOMAIN = { name: "USDC", version: "2", chainId: 84532, verifyingContract: REQUIREMENT.asset as Address };

function typedMessage(a: Record<string, string>) {
  return {
    from: a.from as Address,
    to: a.to as Address,
    value: BigInt(a.value!),
    validAfter: BigInt(a.validAfter!),
    validBefore: BigInt(a.validBefore!),
    nonce: a.nonce as Hex,
  };
}

type Mode = "ok" | "invalid" | "settle_false" | "down" | "verify_4xx" | "settle_down" | "settle_then_500" | "settle_then_hang" | "settle_pending";

let facilitatorSeq = 0;

/**
 * A deterministic facilitator on a FakeChain. verify: `accepted` must be the requirement, the
 * EIP-712 signature must recover to `from` (viem), the authorization must pay `amount` to `payTo`
 * and be unused; settle moves the money on the chain (a second settle of one nonce fails, as on
 * chain). Fault modes after the money moved: settle_then_500 (answers 500), settle_then_hang
 * (never answers), settle_pending (submitted, not mined: `settlement_pending` with the hash).
 * `gate` holds verify until released.
 */
export class TestFacilitator implements FacilitatorClient {
  verifyCalls = 0;
  settleCalls = 0;
  readonly seen: Array<{ payload: PaymentPayload; requirements: PaymentRequirements }> = [];
  gate: Promise<void> | null = null;
  readonly chain: FakeChain;
  /** Its HTTP API (for the sweep, which uses @x402/core's HTTP client). */
  readonly url: string;

  constructor(
    public mode: Mode = "ok",
    chain?: FakeChain,
  ) {
    this.chain = chain ?? new FakeChain();
    facilitatorSeq++;
    this.url = `https://facilitator-${facilitatorSeq}.test`;
    FACILITATORS.set(this.url, this);
  }

  async verify(payload: PaymentPayload, requirements: PaymentRequirements): Promise<VerifyResponse> {
    this.verifyCalls++;
    this.seen.push({ payload, requirements });
    if (this.gate) await this.gate;
    if (this.mode === "down") throw new TypeError("fetch failed: connection refused");
    // What @x402/core's HTTP client throws for a 4xx answer carrying {isValid: false}.
    if (this.mode === "verify_4xx") throw new VerifyError(400, { isValid: false, invalidReason: "invalid_exact_evm_payload_signature" });
    const auth = payload.payload.authorization as Record<string, string>;
    const refuse = (invalidReason: string): VerifyResponse => ({ isValid: false, invalidReason, payer: auth?.from });
    if (this.mode === "invalid") return refuse("invalid_exact_evm_payload_signature");
    if (!deepEqual(payload.accepted, requirements)) return refuse("accepted_mismatch");
    const genuine = await verifyTypedData({
      address: auth.from as Address,
      domain: DOMAIN,
      types: TRANSFER_TYPES,
      primaryType: "TransferWithAuthorization",
      message: typedMessage(auth),
      signature: payload.payload.signature as Hex,
    }).catch(() => false);
    if (!genuine) return refuse("invalid_exact_evm_payload_signature");
    if (auth.to !== requirements.payTo || auth.value !== requirements.amount) return refuse("invalid_exact_evm_payload_recipient_or_value");
    if (BigInt(auth.validBefore!) <= BigInt(Math.floor(Date.now() / 1000))) return refuse("invalid_exact_evm_payload_authorization_valid_before");
    if (this.chain.isUsed(auth.from!, auth.nonce!)) return refuse("invalid_exact_evm_payload_authorization_used");
    return { isValid: true, payer: auth.from };
  }

  async settle(payload: PaymentPayload, requirements: PaymentRequirements): Promise<SettleResponse> {
    this.settleCalls++;
    const auth = payload.payload.authorization as Record<string, string>;
    if (this.mode === "settle_down") throw new TypeError("fetch failed: connection reset");
    const fail = (errorReason: string, transaction = ""): SettleResponse => ({ success: false, errorReason, transaction, network: requirements.network, payer: auth.from });
    if (this.mode === "settle_false") return fail("insufficient_funds");
    // Its own settlement still in flight: reconciled, still pending (as the official facilitator does).
    const inFlight = this.chain.mempool.find((m) => m.nonce.toLowerCase() === auth.nonce!.toLowerCase());
    if (inFlight) return fail("settlement_pending", inFlight.tx);
    if (this.chain.isUsed(auth.from!, auth.nonce!)) return fail("invalid_exact_evm_payload_authorization_used");
    if (this.mode === "settle_pending") return fail("settlement_pending", this.chain.submit(auth.from!, auth.nonce!));
    const tx = this.chain.transfer(auth.from!, auth.nonce!);
    if (this.mode === "settle_then_500") throw new Error("Facilitator settle failed (500): internal error");
    if (this.mode === "settle_then_hang") await new Promise(() => {});
    return { success: true, transaction: tx, network: requirements.network, payer: auth.from };
  }

  async getSupported(): Promise<SupportedResponse> {
    return { kinds: [{ x402Version: 2, scheme: "exact", network: REQUIREMENT.network }], extensions: [], signers: {} };
  }
}

/** A 32-byte transaction hash for a nonce (deterministic). */
export function txHashFor(nonce: string): string {
  return ("0x" + nonce.slice(2).split("").reverse().join("")).toLowerCase();
}

let nonceSeq = 0;
export function freshNonce(): string {
  nonceSeq++;
  return "0x" + crypto.getRandomValues(new Uint8Array(28)).reduce((s, b) => s + b.toString(16).padStart(2, "0"), "") + nonceSeq.toString(16).padStart(8, "0");
}

export interface PaymentOpts {
  nonce?: string;
  from?: string;
  accepted?: unknown;
  /** A signature to send instead of signing (e.g. garbage). */
  signature?: string;
  /** Signs with this account instead of the payer's (a forgery when `from` is the payer). */
  signer?: typeof PAYER_ACCOUNT;
  validBefore?: string;
  value?: string;
}

/** validBefore of every test payment unless given: fixed, so one nonce signed twice is the same authorization. */
const DEFAULT_VALID_BEFORE = String(Math.floor(Date.now() / 1000) + 3600);

/** The `payload` of an `exact` EVM payment: an EIP-3009 authorization, signed for real with viem. */
export async function authorizationPayload(o: PaymentOpts = {}): Promise<Record<string, unknown>> {
  const authorization = {
    from: o.from ?? PAYER,
    to: PAY_TO,
    value: o.value ?? REQUIREMENT.amount,
    validAfter: "0",
    validBefore: o.validBefore ?? DEFAULT_VALID_BEFORE,
    nonce: o.nonce ?? freshNonce(),
  };
  const signature =
    o.signature ??
    (await (o.signer ?? PAYER_ACCOUNT).signTypedData({ domain: DOMAIN, types: TRANSFER_TYPES, primaryType: "TransferWithAuthorization", message: typedMessage(authorization) }));
  return { signature, authorization };
}

/** PAYMENT-SIGNATURE for a v2 payment echoing `accepted` (default: the offered requirement). */
export async function paymentSignature(o: PaymentOpts = {}): Promise<string> {
  const p = {
    x402Version: 2,
    resource: { url: SIGNUP_URL },
    accepted: o.accepted ?? REQUIREMENT,
    payload: await authorizationPayload(o),
  } as PaymentPayload;
  return encodePaymentSignatureHeader(p);
}

/** X-PAYMENT for a v1 payment. */
export async function xPayment(o: PaymentOpts & { scheme?: string; network?: string } = {}): Promise<string> {
  return btoa(JSON.stringify({ x402Version: 1, scheme: o.scheme ?? "exact", network: o.network ?? "base-sepolia", payload: await authorizationPayload(o) }));
}

/** The contract's reference of an x402 payment. */
export function x402Reference(nonce: string, from: string = PAYER): string {
  return `x402:${REQUIREMENT.network}:${REQUIREMENT.asset}:${from}:${nonce}`.toLowerCase();
}

// ------------------------------------------------------------------ MPP

export const testCharge = Method.from({
  name: "test",
  intent: "charge",
  schema: {
    credential: { payload: z.object({ token: z.string(), ref: z.optional(z.string()) }) },
    request: z.object({ amount: z.string(), currency: z.string(), recipient: z.string() }),
  },
});

/** Verifications that succeeded, by challenge id (to prove what ran and what did not). */
export const mppVerified: string[] = [];

export const testChargeServer = Method.toServer(testCharge, {
  defaults: { currency: "usd-test", recipient: "acct-test" },
  async verify({ credential }) {
    if (credential.payload.token !== "paid") throw new Errors.VerificationFailedError({ reason: "test token refused" });
    mppVerified.push(credential.challenge.id);
    const reference = credential.payload.ref ?? `test-${credential.challenge.id}`;
    return { method: "test", reference, status: "success", timestamp: new Date().toISOString() } as const;
  },
});

export const otherCharge = Method.from({
  name: "other",
  intent: "charge",
  schema: { credential: { payload: z.object({ token: z.string() }) }, request: z.object({ amount: z.string() }) },
});

export const otherChargeServer = Method.toServer(otherCharge, {
  async verify({ credential }) {
    if (credential.payload.token !== "paid") throw new Errors.VerificationFailedError({ reason: "test token refused" });
    return { method: "other", reference: `other-${credential.challenge.id}`, status: "success", timestamp: new Date().toISOString() } as const;
  },
});

export function testPayments(withOther = false): PaymentSetupResult {
  const methods = withOther ? [testChargeServer, otherChargeServer] : [testChargeServer];
  return {
    ok: true,
    setup: {
      methods,
      secretKey: SECRET,
      offers: (mcents) => methods.map((m) => [`${m.name}/${m.intent}`, { amount: String(mcents) }] as const),
    },
  };
}

// ------------------------------------------------------------------ apps and requests

export interface TestAppOptions {
  config?: SignupConfig;
  facilitator?: TestFacilitator | null;
  withOther?: boolean;
  /** Use the production MPP methods (built from the environment) instead of the test method. */
  productionMpp?: boolean;
  /** Keep config.x402.rpcUrl / facilitatorUrl as given (default: this app's FakeChain and facilitator). */
  keepUrls?: boolean;
  /** The MPP methods (default: the test method). */
  payments?: () => PaymentSetupResult;
}

/** An app paying through its own TestFacilitator on its own FakeChain. */
export function signupApp(o: TestAppOptions = {}): { app: App; facilitator: TestFacilitator; chain: FakeChain } {
  const facilitator = o.facilitator ?? new TestFacilitator();
  const factory: FacilitatorFactory = () => facilitator;
  let config = o.config ?? TEST_SIGNUP;
  if (config.x402 && !o.keepUrls) config = { ...config, x402: { ...config.x402, rpcUrl: facilitator.chain.url, facilitatorUrl: facilitator.url } };
  const app = createApp(HANDLERS, {
    signup: {
      config,
      ...(o.facilitator === null ? {} : { facilitator: factory }),
      ...(o.productionMpp ? {} : { payments: o.payments ?? (() => testPayments(o.withOther ?? false)) }),
    },
  });
  return { app, facilitator, chain: facilitator.chain };
}

export async function call(app: App, req: Request, e: AppEnv = signupEnv): Promise<Response> {
  const ctx = createExecutionContext();
  const res = await app.fetch(req, e, ctx);
  await waitOnExecutionContext(ctx);
  return res;
}

export function signupRequest(headers: Record<string, string | undefined> = {}, body?: unknown): Request {
  const h: Record<string, string> = {};
  for (const [k, v] of Object.entries(headers)) if (v !== undefined) h[k] = v;
  const init: RequestInit = { method: "POST", headers: h };
  if (body !== undefined) {
    init.body = typeof body === "string" ? body : JSON.stringify(body);
    if (!Object.keys(headers).some((h) => h.toLowerCase() === "content-type")) (init.headers as Record<string, string>)["Content-Type"] = "application/json";
  }
  return new Request(SIGNUP_URL, init);
}

export function idempotencyKey(): string {
  return "idem_" + crypto.randomUUID().replaceAll("-", "");
}

/** The mppx client paying with the test method: a credential for every "test" challenge it is shown. */
export function mppClient(app: App, token = "paid", ref?: string) {
  const client = Method.toClient(testCharge, {
    async createCredential({ challenge }) {
      return Credential.serialize(Credential.from({ challenge, payload: ref ? { token, ref } : { token } }));
    },
  });
  return MppxClient.create({
    methods: [client],
    polyfill: false,
    fetch: (input: RequestInfo | URL, init?: RequestInit) => call(app, new Request(input, init)),
  });
}

/** 402 → a Payment credential from the mppx client (not sent). */
export async function mppCredential(app: App, token = "paid", ref?: string): Promise<string> {
  const res = await call(app, signupRequest());
  if (res.status !== 402) throw new Error(`expected 402, got ${res.status}`);
  return mppClient(app, token, ref).createCredential(res);
}

/** Derived key, computed independently of src/ from the contract's formula (SIGNUP_SECRET, sha256(idem), reference). */
export async function expectedDerivedKey(idem: string, reference: string, secret: string = SIGNUP_SECRET): Promise<string> {
  const enc = new TextEncoder();
  const idemHash = Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", enc.encode(idem))), (b) => b.toString(16).padStart(2, "0")).join("");
  const k = await crypto.subtle.importKey("raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", k, enc.encode(`mcpay-signup-v2:${idemHash}:${reference}`)));
  return GATEWAY.keyPrefix + Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function paymentObjectFor(name: string) {
  return signupEnv.PAYMENTS.get(signupEnv.PAYMENTS.idFromName(name));
}

export async function dumpPaymentObject(name: string): Promise<string> {
  return runInDurableObject(paymentObjectFor(name), (_i, state) => dumpSql(state.storage.sql));
}

/** Rows in the admin object's budget tables (signups, mints). */
export async function budgetCounts(): Promise<{ signups: number; mints: number }> {
  const admin = signupEnv.ADMIN.get(signupEnv.ADMIN.idFromName("global"));
  return runInDurableObject(admin, (_i, state) => ({
    signups: state.storage.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM signups").one().n,
    mints: state.storage.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM mints").one().n,
  }));
}

export interface SignupBody {
  ok: true;
  key: string;
  key_id: string;
  balance_mcents: number;
  scopes: string[];
  name: string | null;
  payment: { rail: string; reference: string };
  request_id: string;
  replayed?: boolean;
}
