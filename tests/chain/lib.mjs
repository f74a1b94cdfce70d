// Pieces shared by selftest.mjs and signup-x402.mjs: the payer's x402 client (the official
// @x402/core client with @x402/evm's `exact` scheme), on-chain balances, hand-made authorizations
// for the deliberately bad payments, and a check reporter.

import { randomBytes } from "node:crypto";

import { x402Client, x402HTTPClient } from "@x402/core/client";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { createPublicClient, defineChain, getAddress, http, parseAbi, toHex } from "viem";
import { privateKeyToAccount } from "viem/accounts";

export const erc20Abi = parseAbi([
  "function balanceOf(address) view returns (uint256)",
  "function authorizationState(address authorizer, bytes32 nonce) view returns (bool)",
]);

export function publicClient(info) {
  const chain = defineChain({
    id: info.chainId,
    name: "anvil",
    nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
    rpcUrls: { default: { http: [info.rpcUrl] } },
  });
  return createPublicClient({ chain, transport: http(info.rpcUrl, { retryCount: 0 }) });
}

export async function balances(pub, info) {
  const of = (a) => pub.readContract({ address: info.asset, abi: erc20Abi, functionName: "balanceOf", args: [a] });
  const [payer, payTo, poorPayer] = await Promise.all([of(info.payer), of(info.payTo), of(info.poorPayer)]);
  return { payer, payTo, poorPayer };
}

/** The official x402 HTTP client for the account `key`, allowed to pay this chain's token up to `cap`. */
export function payerClient(info, key, cap) {
  const account = privateKeyToAccount(key);
  const client = x402Client.fromConfig({
    schemes: [{ network: info.network, client: new ExactEvmScheme(account) }],
    // The local token is no default asset of @x402/evm: allow it explicitly, capped.
    spendControls: { allowedAssets: [{ network: info.network, asset: info.asset, maxAmountPerPayment: String(cap) }] },
  });
  return new x402HTTPClient(client);
}

const authorizationTypes = {
  TransferWithAuthorization: [
    { name: "from", type: "address" },
    { name: "to", type: "address" },
    { name: "value", type: "uint256" },
    { name: "validAfter", type: "uint256" },
    { name: "validBefore", type: "uint256" },
    { name: "nonce", type: "bytes32" },
  ],
};

/**
 * A hand-signed EIP-3009 authorization for `requirement` (only for deliberately bad payments):
 * `over` changes fields of the authorization, `signerKey` signs it (default: the `from` account's key).
 */
export async function handSigned(info, requirement, { fromKey, signerKey, over = {} }) {
  const from = privateKeyToAccount(fromKey).address;
  const now = Math.floor(Date.now() / 1000);
  const authorization = {
    from,
    to: getAddress(requirement.payTo),
    value: String(requirement.amount),
    validAfter: "0",
    validBefore: String(now + requirement.maxTimeoutSeconds),
    nonce: toHex(randomBytes(32)),
    ...over,
  };
  const signer = privateKeyToAccount(signerKey ?? fromKey);
  const signature = await signer.signTypedData({
    domain: {
      name: requirement.extra.name,
      version: requirement.extra.version,
      chainId: info.chainId,
      verifyingContract: getAddress(requirement.asset),
    },
    types: authorizationTypes,
    primaryType: "TransferWithAuthorization",
    message: {
      from: authorization.from,
      to: authorization.to,
      value: BigInt(authorization.value),
      validAfter: BigInt(authorization.validAfter),
      validBefore: BigInt(authorization.validBefore),
      nonce: authorization.nonce,
    },
  });
  return { authorization, signature };
}

export const b64json = (v) => Buffer.from(JSON.stringify(v), "utf8").toString("base64");

/** Decodes a header holding standard base64 (with padding) of JSON; throws on anything else. */
export function unb64json(h) {
  if (typeof h !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(h) || h.length % 4 !== 0) {
    throw new Error(`not standard padded base64: ${String(h).slice(0, 80)}`);
  }
  return JSON.parse(Buffer.from(h, "base64").toString("utf8"));
}

/** A TAP-like reporter: `ok - name` / `not ok - name: details`; `done()` exits 1 if any failed. */
export function reporter() {
  let failed = 0;
  let passed = 0;
  const check = async (name, fn) => {
    try {
      await fn();
      passed++;
      console.log(`ok - ${name}`);
    } catch (e) {
      failed++;
      console.log(`not ok - ${name}: ${(e?.message ?? String(e)).replace(/\s*\n\s*/g, " | ")}`);
    }
  };
  const done = () => {
    console.log(`# ${passed + failed} checks: ${passed} ok, ${failed} not ok`);
    process.exit(failed ? 1 : 0);
  };
  return { check, done };
}

export function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

export const show = (v) => JSON.stringify(v, (_, x) => (typeof x === "bigint" ? x.toString() : x));
