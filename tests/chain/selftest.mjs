#!/usr/bin/env node
// Proves the harness on its own, with no gateway: starts chain.mjs, makes payments with the official
// x402 client and sends them to the facilitator's /verify and /settle directly, reading balances on
// chain. Prints one line per check and exits 1 if any failed.
//
//   node selftest.mjs

import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { assert, balances, handSigned, payerClient, publicClient, reporter, show } from "./lib.mjs";

const freePort = () =>
  new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

const [rpcPort, facilitatorPort] = [await freePort(), await freePort()];
const child = spawn(
  process.execPath,
  [fileURLToPath(new URL("./chain.mjs", import.meta.url)), "--port", rpcPort, "--facilitator-port", facilitatorPort],
  { stdio: ["ignore", "pipe", "pipe"] },
);
let childLog = "";
child.stderr.on("data", (d) => (childLog += d));
const stopChild = () => child.exitCode === null && child.kill("SIGTERM");
process.on("exit", stopChild);

const started = Date.now();
const info = await new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`chain.mjs not ready in 120 s:\n${childLog}`)), 120_000);
  child.once("exit", (c) => reject(new Error(`chain.mjs exited (${c}):\n${childLog}`)));
  createInterface({ input: child.stdout }).once("line", (line) => {
    clearTimeout(timer);
    resolve(JSON.parse(line));
  });
});
console.log(`# chain ready in ${((Date.now() - started) / 1000).toFixed(1)} s: ${JSON.stringify(info)}`);

const { check, done } = reporter();
const pub = publicClient(info);
const amount = 1_000_000n; // 1 USDC
const requirement = {
  scheme: "exact",
  network: info.network,
  amount: String(amount),
  asset: info.asset,
  payTo: info.payTo,
  maxTimeoutSeconds: 120,
  extra: { name: info.assetName, version: info.assetVersion },
};
const paymentRequired = {
  x402Version: 2,
  error: "PAYMENT-SIGNATURE header is required",
  resource: { url: "http://127.0.0.1/v1/signup", description: "selftest", mimeType: "application/json" },
  accepts: [requirement],
  extensions: {},
};

async function facilitator(path, paymentPayload, paymentRequirements) {
  const res = await fetch(`${info.facilitatorUrl}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ x402Version: paymentPayload.x402Version, paymentPayload, paymentRequirements }),
  });
  const body = await res.json();
  assert(res.status === 200, `${path} answered ${res.status}: ${show(body)}`);
  return body;
}

const client = payerClient(info, info.payerKey, amount);
let before;
let good;

await check("supported lists exact on eip155:31337 for v1 and v2", async () => {
  const s = await (await fetch(`${info.facilitatorUrl}/supported`)).json();
  for (const v of [1, 2]) {
    assert(s.kinds.some((k) => k.x402Version === v && k.scheme === "exact" && k.network === info.network), show(s));
  }
});

await check("token: payer funded, payTo and poorPayer empty", async () => {
  before = await balances(pub, info);
  assert(before.payer === 10n ** 12n && before.payTo === 0n && before.poorPayer === 0n, show(before));
});

await check("official client payment verifies", async () => {
  good = await client.createPaymentPayload(paymentRequired);
  assert(good.x402Version === 2 && show(good.accepted) === show(requirement), show(good));
  const v = await facilitator("/verify", good, requirement);
  assert(v.isValid === true && v.payer === info.payer, show(v));
});

await check("settle moves exactly the amount on chain", async () => {
  const s = await facilitator("/settle", good, requirement);
  assert(s.success === true && /^0x[0-9a-f]{64}$/.test(s.transaction) && s.network === info.network, show(s));
  const receipt = await pub.getTransactionReceipt({ hash: s.transaction });
  assert(receipt.status === "success", show(receipt.status));
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount && before.payer - after.payer === amount, show({ before, after }));
  before = after;
});

await check("replay: verify refuses the used authorization", async () => {
  const v = await facilitator("/verify", good, requirement);
  assert(v.isValid === false, show(v));
});

await check("replay: settle fails, no balance change", async () => {
  const s = await facilitator("/settle", good, requirement);
  assert(s.success === false && !s.transaction, show(s));
  const after = await balances(pub, info);
  assert(show(after) === show(before), show({ before, after }));
});

const bad = async (name, reasons, make) =>
  check(`refused: ${name} (${reasons})`, async () => {
    const payload = await make();
    const v = await facilitator("/verify", payload, requirement);
    assert(v.isValid === false && [reasons].flat().includes(v.invalidReason), show(v));
    const s = await facilitator("/settle", payload, requirement);
    assert(s.success === false, show(s));
    const after = await balances(pub, info);
    assert(show(after) === show(before), show({ before, after }));
  });
const v2 = (payload) => ({ x402Version: 2, accepted: requirement, payload });
await bad("value lower than required", "invalid_exact_evm_payload_authorization_value_mismatch", async () =>
  v2(await handSigned(info, requirement, { fromKey: info.payerKey, over: { value: String(amount - 1n) } })),
);
await bad("another recipient", "invalid_exact_evm_recipient_mismatch", async () =>
  v2(await handSigned(info, requirement, { fromKey: info.payerKey, over: { to: info.poorPayer } })),
);
await bad("expired", "invalid_exact_evm_payload_authorization_valid_before", async () =>
  v2(
    await handSigned(info, requirement, {
      fromKey: info.payerKey,
      over: { validBefore: String(Math.floor(Date.now() / 1000) - 60) },
    }),
  ),
);
await bad("signed by another key", "invalid_exact_evm_signature", async () =>
  v2(await handSigned(info, requirement, { fromKey: info.payerKey, signerKey: info.poorPayerKey })),
);
await bad(
  "payer without funds",
  // the simulation of transferWithAuthorization reverts: "ERC20: transfer amount exceeds balance"
  ["invalid_exact_evm_insufficient_balance", "invalid_exact_evm_transaction_simulation_failed"],
  async () =>
  payerClient(info, info.poorPayerKey, amount).createPaymentPayload(paymentRequired),
);

await check("v1 payload (network eip155:31337) verifies and settles", async () => {
  const p = await client.createPaymentPayload(paymentRequired);
  const v1 = { x402Version: 1, scheme: "exact", network: info.network, payload: p.payload };
  const r1 = {
    scheme: "exact",
    network: info.network,
    maxAmountRequired: String(amount),
    resource: "http://127.0.0.1/v1/signup",
    description: "selftest",
    mimeType: "application/json",
    payTo: info.payTo,
    maxTimeoutSeconds: 120,
    asset: info.asset,
    extra: requirement.extra,
  };
  const v = await facilitator("/verify", v1, r1);
  assert(v.isValid === true, show(v));
  const s = await facilitator("/settle", v1, r1);
  assert(s.success === true, show(s));
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount, show({ before, after }));
  before = after;
  const again = await facilitator("/settle", v1, r1);
  assert(again.success === false, show(again));
});

stopChild();
done();
