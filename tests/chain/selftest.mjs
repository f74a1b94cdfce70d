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

// ---- the fault layer and the control API --------------------------------------------------------
const control = async (path, body) => {
  const res = await fetch(`${info.controlUrl}${path}`, body === undefined ? {} : { method: "POST", body: JSON.stringify(body) });
  const json = await res.json();
  assert(res.status === 200, `${path} answered ${res.status}: ${show(json)}`);
  return json;
};
const rawSettle = (payload, signal) =>
  fetch(`${info.facilitatorUrl}/settle`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ x402Version: 2, paymentPayload: payload, paymentRequirements: requirement }),
    signal,
  });
const usedEvents = async (payload) => {
  const a = payload.payload.authorization;
  return (await control(`/stats?from=${a.from}&nonce=${a.nonce}`)).authorization.usedEvents;
};
/** Pays with the official client while `mode` is the settle fault; `answer` checks what came back. */
const faulted = (mode, moved, answer) =>
  check(`fault ${mode}: ${moved ? "the transfer happens once" : "nothing moves"}, the answer is lost or wrong`, async () => {
    const payload = await client.createPaymentPayload(paymentRequired);
    const s0 = await control("/stats");
    await control("/fault", { settle: mode });
    try {
      await answer(payload);
    } finally {
      await control("/fault", { settle: "none" });
    }
    const after = await balances(pub, info);
    const want = moved ? amount : 0n;
    assert(after.payTo - before.payTo === want && before.payer - after.payer === want, show({ before, after }));
    before = after;
    assert((await usedEvents(payload)) === (moved ? 1 : 0), "AuthorizationUsed events");
    const s1 = await control("/stats");
    assert(s1.settle === s0.settle + 1 && s1.settleFaulted === s0.settleFaulted + 1, show({ s0, s1 }));
    assert(s1.settleRan === s0.settleRan + (mode.endsWith("_before_settle") ? 0 : 1), show({ s0, s1 }));
    assert(BigInt(s1.receivedByPayTo) - BigInt(s0.receivedByPayTo) === want, show({ s0, s1 }));
    if (moved) {
      // The facilitator really settled: a second settle of the same payment is refused and moves nothing.
      const again = await facilitator("/settle", payload, requirement);
      assert(again.success === false, show(again));
      assert((await balances(pub, info)).payTo === after.payTo, "a second settle moved money");
    }
  });

await faulted("error_before_settle", false, async (p) => {
  const r = await rawSettle(p);
  assert(r.status === 500, `status ${r.status}`);
});
for (const [mode, moved] of [
  ["refuse_before_settle", false],
  ["refuse_after_settle", true],
]) {
  await faulted(mode, moved, async (p) => {
    const r = await rawSettle(p);
    const body = await r.json();
    assert(r.status === 200 && body.success === false && body.errorReason === "unexpected_settle_error", `${r.status} ${show(body)}`);
  });
}
await faulted("error_after_settle", true, async (p) => {
  const r = await rawSettle(p);
  assert(r.status === 500, `status ${r.status}`);
});
await faulted("reset_after_settle", true, async (p) => {
  const e = await rawSettle(p).then(
    (r) => new Error(`answered ${r.status}`),
    (err) => err,
  );
  assert(/fetch failed|socket|reset|other side closed/i.test(`${e.message} ${e.cause?.message ?? ""} ${e.cause?.code ?? ""}`), `expected a reset, got ${e.message}`);
});
await faulted("hang_after_settle", true, async (p) => {
  const t = Date.now();
  const e = await rawSettle(p, AbortSignal.timeout(2500)).then(
    (r) => new Error(`answered ${r.status}`),
    (err) => err,
  );
  assert(e.name === "TimeoutError" && Date.now() - t >= 2400, `expected no answer, got ${e.name} ${e.message}`);
});

await check("fault verify=error: /verify answers 500, nothing moves; cleared, it verifies", async () => {
  const payload = await client.createPaymentPayload(paymentRequired);
  await control("/fault", { verify: "error" });
  try {
    const r = await fetch(`${info.facilitatorUrl}/verify`, {
      method: "POST",
      body: JSON.stringify({ x402Version: 2, paymentPayload: payload, paymentRequirements: requirement }),
    });
    assert(r.status === 500, `status ${r.status}`);
  } finally {
    await control("/fault", { verify: "none" });
  }
  const v = await facilitator("/verify", payload, requirement);
  assert(v.isValid === true, show(v));
  assert(show(await balances(pub, info)) === show(before), "balances moved");
});

await check("automine off: settle answers settlement_pending with the tx; mined, the retry settles once", async () => {
  const payload = await client.createPaymentPayload(paymentRequired);
  await control("/automine", { enabled: false });
  let first;
  try {
    const t = Date.now();
    first = await facilitator("/settle", payload, requirement);
    assert(first.success === false && first.errorReason === "settlement_pending", show(first));
    assert(/^0x[0-9a-f]{64}$/.test(first.transaction), `no transaction: ${show(first)}`);
    assert(Date.now() - t < 2000 + info.confirmationTimeoutMs, `settlement_pending took ${Date.now() - t} ms`);
    assert(show(await balances(pub, info)) === show(before), "moved before being mined");
    const second = await facilitator("/settle", payload, requirement);
    assert(second.errorReason === "settlement_pending" && second.transaction === first.transaction, show(second));
  } finally {
    await control("/automine", { enabled: true });
    await control("/mine", { blocks: 1 });
  }
  const third = await facilitator("/settle", payload, requirement);
  assert(third.success === true && third.transaction === first.transaction, show(third));
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount && before.payer - after.payer === amount, show({ before, after }));
  before = after;
  assert((await usedEvents(payload)) === 1, "AuthorizationUsed events");
});

await check("control: pay signs a payment that verifies and settles; balance and stats agree with the chain", async () => {
  const s0 = await control("/stats");
  const r = await control("/pay", { paymentRequired });
  assert(r.header === "PAYMENT-SIGNATURE" && r.headers["PAYMENT-SIGNATURE"] === r.value, show(r));
  assert(show(JSON.parse(Buffer.from(r.value, "base64").toString())) === show(r.payload), "value is not the payload");
  assert(r.payload.payload.authorization.from === info.payer && show(r.payload.accepted) === show(requirement), show(r.payload));
  const v = await facilitator("/verify", r.payload, requirement);
  assert(v.isValid === true, show(v));
  const st = await facilitator("/settle", r.payload, requirement);
  assert(st.success === true, show(st));
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount, show({ before, after }));
  before = after;
  const bal = await control(`/balance?address=${info.payTo}`);
  assert(BigInt(bal.balance) === after.payTo, show(bal));
  const s1 = await control("/stats");
  assert(s1.verify === s0.verify + 1 && s1.settle === s0.settle + 1 && s1.authorizationUsed === s0.authorizationUsed + 1, show({ s0, s1 }));
  assert(s1.transfersToPayTo === s0.transfersToPayTo + 1 && BigInt(s1.payToBalance) === after.payTo, show(s1));
});

await check("control: pay with a short validBefore or the poor payer is refused at verify", async () => {
  const short = await control("/pay", { accepted: requirement, validBeforeOffset: 3 });
  const v = await facilitator("/verify", short.payload, requirement);
  assert(v.isValid === false && v.invalidReason === "invalid_exact_evm_payload_authorization_valid_before", show(v));
  const poor = await control("/pay", { accepted: requirement, payer: "poor" });
  assert(poor.payload.payload.authorization.from === info.poorPayer, show(poor.payload));
  const v2 = await facilitator("/verify", poor.payload, requirement);
  assert(v2.isValid === false, show(v2));
  const bad = await fetch(`${info.controlUrl}/fault`, { method: "POST", body: JSON.stringify({ settle: "sometimes" }) });
  assert(bad.status === 400, `bad fault mode answered ${bad.status}`);
});

stopChild();
done();
