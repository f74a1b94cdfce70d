#!/usr/bin/env node
// Pays a gateway's POST /v1/signup for real over x402 (contract 3.9) on the chain of chain.mjs, with
// the official x402 client, and checks every answer against the chain's balances.
//
//   node signup-x402.mjs --gateway http://127.0.0.1:PORT --chain '<chain.mjs JSON line>' --key-prefix mcp_ \
//        --admin-key ADMIN_KEY --signup-secret SIGNUP_SECRET
//
// The gateway must be generated with `[signup] enabled = true` and `[signup.x402]` set to the chain's
// network, asset, asset_name, asset_version, asset_decimals, pay_to and facilitator_url, and served
// with SIGNUP_SECRET, ADMIN_KEY, X402_RPC_URL = the chain's rpcUrl, X402_FACILITATOR_TIMEOUT_MS ≈ 3000
// and a short SIGNUP_SWEEP_INTERVAL_MS; price, balance and scopes are read from its GET /v1/pricing.
// The facilitator's answers are lost on purpose through the harness's control API (chain.mjs), and
// every outcome is counted on chain (payTo's balance, AuthorizationUsed events), not only statuses.
// Prints `ok - name` / `not ok - name: details` per check and exits 1 if any failed.

import { createHash, createHmac, randomBytes } from "node:crypto";

import { assert, b64json, balances, handSigned, payerClient, publicClient, reporter, show, unb64json } from "./lib.mjs";

function arg(name, required = true) {
  const i = process.argv.indexOf(`--${name}`);
  if (i >= 0 && process.argv[i + 1] !== undefined) return process.argv[i + 1];
  if (!required) return undefined;
  console.error(
    `usage: node signup-x402.mjs --gateway URL --chain JSON --key-prefix PREFIX --admin-key K --signup-secret S (missing --${name})`,
  );
  process.exit(2);
}
const gateway = arg("gateway").replace(/\/+$/, "");
const info = JSON.parse(arg("chain"));
const keyPrefix = arg("key-prefix");
const adminKey = arg("admin-key");
const signupSecret = arg("signup-secret");
const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
const KEY_RE = new RegExp(`^${escapeRe(keyPrefix)}[0-9a-f]{64}$`);
const KEY_ANYWHERE = new RegExp(`${escapeRe(keyPrefix)}[0-9a-f]{64}`);

const { check, done } = reporter();
const pub = publicClient(info);
const lc = (s) => String(s).toLowerCase();

// ---- HTTP ----------------------------------------------------------------------------------------
async function signup(headers = {}) {
  const res = await fetch(`${gateway}/v1/signup`, { method: "POST", headers });
  const text = await res.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = { unparsed: text };
  }
  return { status: res.status, headers: res.headers, body, text };
}
const brief = (r) => `${r.status} ${r.text.slice(0, 600)}`;
const idemKey = () => randomBytes(24).toString("hex"); // 48 chars of [0-9a-f]
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- the harness's control API (chain.mjs): faults, automine, counts --------------------------------
assert(typeof info.controlUrl === "string", "the chain info has no controlUrl (an old chain.mjs?)");
async function control(path, body) {
  const res = await fetch(`${info.controlUrl}${path}`, body === undefined ? {} : { method: "POST", body: JSON.stringify(body) });
  const json = await res.json();
  if (res.status !== 200) throw new Error(`control ${path} answered ${res.status}: ${show(json)}`);
  return json;
}
/** Runs `fn` with the facilitator's /settle answering as `mode`; the fault is always cleared after. */
async function withFault(mode, fn) {
  await control("/fault", { settle: mode });
  try {
    return await fn();
  } finally {
    await control("/fault", { settle: "none" });
  }
}
async function usedEvents(payload) {
  const a = payload.payload.authorization;
  return (await control(`/stats?from=${a.from}&nonce=${a.nonce}`)).authorization.usedEvents;
}

// ---- the key and the payment's reference (contract 3.9) ---------------------------------------------
const sha256hex = (s) => createHash("sha256").update(s, "utf8").digest("hex");
const referenceOf = (payload) => {
  const a = payload.payload.authorization;
  return lc(`x402:${info.network}:${payload.accepted?.asset ?? info.asset}:${a.from}:${a.nonce}`);
};
const derivedKey = (idem, reference) =>
  keyPrefix + createHmac("sha256", signupSecret).update(`mcpay-signup-v2:${sha256hex(idem)}:${reference}`).digest("hex");

// ---- configuration from the gateway --------------------------------------------------------------
const pricing = await (await fetch(`${gateway}/v1/pricing`)).json();
const cfg = pricing?.signup;
if (!cfg || !Array.isArray(cfg.rails) || !cfg.rails.includes("x402")) {
  console.log(`not ok - signup with the x402 rail is configured: /v1/pricing signup = ${show(cfg)}`);
  process.exit(1);
}
const P = BigInt(cfg.price_mcents);
const amount = P * 10n ** BigInt(info.assetDecimals - 5);
const client = payerClient(info, info.payerKey, amount);
console.log(`# signup price ${P} mcents = ${amount} base units; balance ${cfg.balance_mcents}; scopes ${show(cfg.scopes)}`);

/** Checks a 402 of this route: the offer in the header and body, the error code, no key. */
function expect402(r, codes) {
  assert(r.status === 402, `expected 402, got ${brief(r)}`);
  assert([codes].flat().includes(r.body?.error?.code), `expected ${codes}, got ${brief(r)}`);
  assert(r.body.ok === false && r.body.note === "no charge applied", `error shape: ${brief(r)}`);
  assert(!("key" in r.body) && !KEY_ANYWHERE.test(r.text), `a key in a 402: ${brief(r)}`);
  assert(r.headers.get("payment-required"), `no PAYMENT-REQUIRED on the 402: ${brief(r)}`);
  assert(/no-store/.test(r.headers.get("cache-control") ?? ""), `Cache-Control: ${r.headers.get("cache-control")}`);
}

async function unchanged(before, what) {
  const after = await balances(pub, info);
  assert(show(after) === show(before), `${what}: balances moved ${show({ before, after })}`);
}

let offer; // the PaymentRequired the gateway sent
let requirement; // its accepts[0]

// a. no payment
await check("a. no payment: 402 payment_required with the offer (header, body, CORS)", async () => {
  const r = await signup();
  expect402(r, "payment_required");
  const raw = r.headers.get("payment-required");
  const decoded = unb64json(raw);
  offer = client.getPaymentRequiredResponse((n) => r.headers.get(n), r.body);
  assert(show(offer) === show(decoded), "the official client decodes the header differently");
  assert(offer.x402Version === 2, `x402Version ${offer.x402Version}`);
  assert(Array.isArray(offer.accepts) && offer.accepts.length >= 1, `accepts: ${show(offer.accepts)}`);
  requirement = offer.accepts[0];
  const want = { scheme: "exact", network: info.network, amount: String(amount) };
  for (const [k, v] of Object.entries(want)) assert(requirement[k] === v, `accepts[0].${k} = ${show(requirement[k])}, want ${v}`);
  assert(lc(requirement.asset) === lc(info.asset), `asset ${requirement.asset} != ${info.asset}`);
  assert(lc(requirement.payTo) === lc(info.payTo), `payTo ${requirement.payTo} != ${info.payTo}`);
  assert(
    requirement.extra?.name === info.assetName && requirement.extra?.version === info.assetVersion,
    `extra ${show(requirement.extra)}`,
  );
  assert(Number.isInteger(requirement.maxTimeoutSeconds) && requirement.maxTimeoutSeconds > 0, "maxTimeoutSeconds");
  assert(typeof offer.resource?.url === "string" && offer.resource.url.endsWith("/v1/signup"), `resource ${show(offer.resource)}`);
  assert(show(r.body.accepts) === show(offer.accepts), `body accepts ${show(r.body.accepts)} != header's`);
  assert(r.body.x402Version === 2, `body x402Version ${r.body.x402Version}`);
  assert(r.body.price_mcents === Number(P), `body price_mcents ${r.body.price_mcents}`);
  const expose = (r.headers.get("access-control-expose-headers") ?? "").split(",").map((s) => s.trim().toUpperCase());
  for (const h of ["PAYMENT-REQUIRED", "PAYMENT-RESPONSE"]) assert(expose.includes(h), `Expose-Headers lacks ${h}: ${expose}`);
});
if (!requirement) {
  console.log("# no usable offer: the payment checks cannot run");
  done();
}

const payTo = requirement.payTo;
const start = await balances(pub, info); // everything paid from here on must have bought a key
const startStats = await control("/stats");
const delivered = new Map(); // key_id -> key, every key this run bought
const v2 = (authz, accepted = requirement) => ({
  "PAYMENT-SIGNATURE": b64json({ x402Version: 2, resource: offer.resource, accepted, payload: authz }),
});

// b. refusals: none may move money or mint a key
const refused = (name, codes, headers) =>
  check(`b. ${name}: 402 ${[codes].flat().join(" or ")}, no key, no transfer`, async () => {
    const before = await balances(pub, info);
    const h = await headers();
    const r = await signup({ ...h, "Idempotency-Key": idemKey() });
    expect402(r, codes);
    await unchanged(before, name);
  });
const now = () => Math.floor(Date.now() / 1000);

await refused("value lower than required", "payment_invalid", async () =>
  v2(await handSigned(info, requirement, { fromKey: info.payerKey, over: { value: String(amount - 1n) } })),
);
await refused("another recipient", "payment_invalid", async () =>
  v2(await handSigned(info, requirement, { fromKey: info.payerKey, over: { to: info.poorPayer } })),
);
await refused("expired authorization", "payment_invalid", async () =>
  v2(await handSigned(info, requirement, { fromKey: info.payerKey, over: { validBefore: String(now() - 60) } })),
);
await refused("signed by another key", "payment_invalid", async () =>
  v2(await handSigned(info, requirement, { fromKey: info.payerKey, signerKey: info.poorPayerKey })),
);
await refused("`accepted` altered to a lower amount (and signed for it)", "payment_invalid", async () => {
  const cheaper = { ...requirement, amount: String(amount / 2n) };
  return v2(await handSigned(info, cheaper, { fromKey: info.payerKey }), cheaper);
});
await refused("payer without funds", ["payment_invalid", "payment_failed"], async () => {
  const poor = payerClient(info, info.poorPayerKey, amount);
  return poor.encodePaymentSignatureHeader(await poor.createPaymentPayload(offer));
});

// c. a good payment with an Idempotency-Key
const idem = idemKey();
let paid; // { headers, payload, body }
await check("c. good payment: 201, key, PAYMENT-RESPONSE, exact transfer on chain, /v1/me", async () => {
  const before = await balances(pub, info);
  const payload = await client.createPaymentPayload(offer);
  assert(show(payload.accepted) === show(requirement), "the official client did not echo accepts[0]");
  const headers = { ...client.encodePaymentSignatureHeader(payload), "Idempotency-Key": idem };
  const r = await signup(headers);
  assert(r.status === 201, `expected 201, got ${brief(r)}`);
  const b = r.body;
  assert(b.ok === true && KEY_RE.test(b.key ?? ""), `key ${b.key} !~ ${KEY_RE}`);
  assert(/^k_[0-9a-f]{16}$/.test(b.key_id ?? ""), `key_id ${b.key_id}`);
  assert(b.balance_mcents === cfg.balance_mcents, `balance_mcents ${b.balance_mcents}`);
  assert(show(b.scopes) === show(cfg.scopes), `scopes ${show(b.scopes)}`);
  assert(b.payment?.rail === "x402", `payment ${show(b.payment)}`);
  const settle = client.getPaymentSettleResponse((n) => r.headers.get(n));
  const rawSettle = unb64json(r.headers.get("payment-response"));
  assert(settle.success === true && /^0x[0-9a-f]{64}$/i.test(settle.transaction), `PAYMENT-RESPONSE ${show(rawSettle)}`);
  // payment.reference is the settled transaction, or the payment's reference with the transaction beside it.
  const tx = /^0x[0-9a-f]{64}$/i.test(b.payment.reference ?? "") ? b.payment.reference : b.payment.transaction;
  if (tx !== b.payment.reference) {
    assert(lc(b.payment.reference) === referenceOf(payload), `payment.reference ${b.payment.reference} is neither the transaction nor ${referenceOf(payload)}`);
  }
  assert(lc(settle.transaction) === lc(tx ?? ""), `payment ${show(b.payment)} does not name the settled transaction ${settle.transaction}`);
  const receipt = await pub.getTransactionReceipt({ hash: settle.transaction });
  assert(receipt.status === "success", `receipt ${receipt.status}`);
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount, `payTo rose by ${after.payTo - before.payTo}, want ${amount}`);
  assert(before.payer - after.payer === amount, `payer fell by ${before.payer - after.payer}, want ${amount}`);
  const me = await fetch(`${gateway}/v1/me`, { headers: { Authorization: `Bearer ${b.key}` } });
  const meBody = await me.json();
  assert(me.status === 200 && meBody.key_id === b.key_id, `/v1/me ${me.status} ${show(meBody)}`);
  assert(meBody.balance_mcents === cfg.balance_mcents && show(meBody.scopes) === show(cfg.scopes), `/v1/me ${show(meBody)}`);
  paid = { headers, payload, body: b };
  delivered.set(b.key_id, b.key);
});

await check("c. the key is derived from SIGNUP_SECRET, the Idempotency-Key's hash and the payment (contract 3.9)", async () => {
  assert(paid, "no good payment");
  assert(paid.body.key === derivedKey(idem, referenceOf(paid.payload)), `key is not HMAC(SIGNUP_SECRET, "mcpay-signup-v2:" + sha256_hex(idem) + ":" + reference)`);
});

// d. the same payment with the same Idempotency-Key: the lost response again, no new charge
await check("d. same payment + same Idempotency-Key: 200 replayed, same key, no transfer", async () => {
  assert(paid, "no good payment");
  const before = await balances(pub, info);
  const r = await signup(paid.headers);
  assert(r.status === 200, `expected 200, got ${brief(r)}`);
  assert(r.body.replayed === true, `replayed ${r.body.replayed}`);
  for (const k of ["key", "key_id", "payment"]) {
    assert(show(r.body[k]) === show(paid.body[k]), `${k}: ${show(r.body[k])} != ${show(paid.body[k])}`);
  }
  await unchanged(before, "replay");
});

// e. the same payment without (or with another) Idempotency-Key: refused, never charged twice
await check("e. same payment, no Idempotency-Key: 409 payment_already_used with the key_id, no transfer", async () => {
  assert(paid, "no good payment");
  const before = await balances(pub, info);
  const { "Idempotency-Key": _, ...noIdem } = paid.headers;
  const r = await signup(noIdem);
  assert(r.status === 409 && r.body?.error?.code === "payment_already_used", `expected 409 payment_already_used, got ${brief(r)}`);
  assert(r.body.key_id === paid.body.key_id && !("key" in r.body), `key_id ${r.body.key_id} / ${brief(r)}`);
  await unchanged(before, "reuse");
});
await check("e. same payment, another Idempotency-Key: 409 payment_already_used, no transfer", async () => {
  assert(paid, "no good payment");
  const before = await balances(pub, info);
  const r = await signup({ ...paid.headers, "Idempotency-Key": idemKey() });
  assert(r.status === 409 && r.body?.error?.code === "payment_already_used", `expected 409, got ${brief(r)}`);
  assert(!("key" in r.body), `a key in the 409: ${brief(r)}`);
  await unchanged(before, "reuse");
});

// f. x402 v1: X-PAYMENT in, X-PAYMENT-RESPONSE out
await check("f. v1 X-PAYMENT: 201 with X-PAYMENT-RESPONSE, transfer once", async () => {
  const before = await balances(pub, info);
  const p = await client.createPaymentPayload(offer);
  const v1 = { x402Version: 1, scheme: "exact", network: info.network, payload: p.payload };
  const r = await signup({ "X-PAYMENT": b64json(v1) });
  assert(r.status === 201, `expected 201, got ${brief(r)}`);
  assert(KEY_RE.test(r.body.key ?? "") && r.body.payment?.rail === "x402", `body ${brief(r)}`);
  const settle = unb64json(r.headers.get("x-payment-response"));
  assert(settle.success === true && /^0x[0-9a-f]{64}$/i.test(settle.transaction ?? ""), `X-PAYMENT-RESPONSE ${show(settle)}`);
  delivered.set(r.body.key_id, r.body.key);
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount && before.payer - after.payer === amount, `moved ${show({ before, after })}`);
});

// g. one payment sent 6 times at once: one key, one transfer
await check("g. one payment sent 6x at once: exactly one 201, five 409, one transfer", async () => {
  const before = await balances(pub, info);
  const headers = client.encodePaymentSignatureHeader(await client.createPaymentPayload(offer));
  const rs = await Promise.all(Array.from({ length: 6 }, () => signup(headers)));
  const statuses = rs.map((r) => r.status).sort();
  const created = rs.filter((r) => r.status === 201);
  const conflicts = rs.filter((r) => r.status === 409);
  assert(created.length === 1 && conflicts.length === 5, `statuses ${statuses}: ${rs.map(brief).join(" || ")}`);
  for (const r of conflicts) {
    assert(["payment_already_used", "payment_in_progress"].includes(r.body?.error?.code), `409 ${brief(r)}`);
  }
  delivered.set(created[0].body.key_id, created[0].body.key);
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount && before.payer - after.payer === amount, `moved ${show({ before, after })}`);
});

// ---- h. a forged payload copying a settled payment's public from/nonce --------------------------------
// Step 7: the signature is checked locally before any record is read: no key_id, no key, no
// facilitator call, nothing moved — with or without the victim's Idempotency-Key.
const forged = (name, make) =>
  check(`h. forged replay of a settled payment (${name}): 402 payment_invalid, no key_id, no key, no lookup`, async () => {
    assert(paid, "no good payment");
    const before = await balances(pub, info);
    const s0 = await control("/stats");
    const payload = { ...paid.payload, payload: await make(paid.payload.payload.authorization) };
    for (const extra of [{ "Idempotency-Key": idem }, {}]) {
      const r = await signup({ "PAYMENT-SIGNATURE": b64json(payload), ...extra });
      expect402(r, "payment_invalid");
      assert(!("key_id" in r.body) && !r.text.includes(paid.body.key_id), `the victim's key_id in the answer: ${brief(r)}`);
      assert(!r.text.includes(paid.body.key.slice(keyPrefix.length)), `the victim's key in the answer: ${brief(r)}`);
      assert(r.body.replayed === undefined, `replayed in ${brief(r)}`);
    }
    const s1 = await control("/stats");
    assert(s1.verify === s0.verify && s1.settle === s0.settle, `the facilitator was asked: ${show({ s0, s1 })}`);
    await unchanged(before, name);
  });
await forged("garbage signature", async (a) => ({ authorization: { ...a }, signature: `0x${"ab".repeat(65)}` }));
await forged("no signature", async (a) => ({ authorization: { ...a }, signature: "0x" }));
await forged("signed by another key", async (a) =>
  handSigned(info, requirement, { fromKey: info.payerKey, signerKey: info.poorPayerKey, over: { ...a } }),
);

// ---- i. the facilitator settles but its answer is lost ----------------------------------------------
/** The answer of a payment whose outcome the gateway cannot know yet: pending, never "no charge". */
function expectPending(r, reference, idem) {
  const ok = (r.status === 202 && r.body?.error?.code === "payment_pending") || (r.status === 502 && r.body?.error?.code === "payment_unavailable");
  assert(ok, `expected 202 payment_pending (or 502 payment_unavailable with the reference), got ${brief(r)}`);
  assert(!/no charge applied/i.test(r.text), `a pending payment says "no charge applied": ${brief(r)}`);
  assert(!KEY_ANYWHERE.test(r.text) && !("key" in r.body), `a key in a pending answer: ${brief(r)}`);
  const p = r.body.payment ?? {};
  assert(p.rail === "x402" && lc(p.reference) === reference, `payment ${show(p)}, want reference ${reference}`);
  assert(p.state === "pending", `payment.state ${show(p.state)}`);
  const key = r.body.idempotency_key;
  if (idem) assert(key === idem, `idempotency_key ${show(key)} is not the request's ${idem}`);
  else assert(typeof key === "string" && /^[A-Za-z0-9_-]{32,128}$/.test(key), `idempotency_key ${show(key)}`);
  if (r.status === 202) {
    assert(/^\d+$/.test(r.headers.get("retry-after") ?? ""), `Retry-After ${r.headers.get("retry-after")}`);
    assert(/no-store/.test(r.headers.get("cache-control") ?? ""), `Cache-Control ${r.headers.get("cache-control")}`);
  }
  return key;
}

/** Presents the payment again until the key comes (a 409 payment_in_progress / 202 means: later). */
async function collect(headers, idem, reference, { tries = 12 } = {}) {
  let r;
  for (let i = 0; i < tries; i++) {
    r = await signup(headers);
    const inProgress = (r.status === 409 && r.body?.error?.code === "payment_in_progress") || r.status === 202;
    if (!inProgress) break;
    await sleep(1000 * Math.min(5, Number(r.headers.get("retry-after") ?? 1) || 1));
  }
  assert(r.status === 201 || (r.status === 200 && r.body.replayed === true), `expected 201 (or 200 replayed), got ${brief(r)}`);
  const b = r.body;
  assert(b.key === derivedKey(idem, reference), `the key is not the one derived from the Idempotency-Key and ${reference}: ${brief(r)}`);
  assert(/^k_[0-9a-f]{16}$/.test(b.key_id ?? ""), `key_id ${b.key_id}`);
  assert(b.payment?.rail === "x402", `payment ${show(b.payment)}`);
  assert(!delivered.has(b.key_id) || delivered.get(b.key_id) === b.key, "a key_id delivered twice with different keys");
  const me = await fetch(`${gateway}/v1/me`, { headers: { Authorization: `Bearer ${b.key}` } });
  const meBody = await me.json();
  assert(me.status === 200 && meBody.key_id === b.key_id && meBody.balance_mcents === cfg.balance_mcents, `/v1/me ${me.status} ${show(meBody)}`);
  delivered.set(b.key_id, b.key);
  return r;
}

/** The admin listing's entry for `reference`, waiting until its state is one of `states`. */
async function adminState(reference, states, timeoutMs = 90_000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    const res = await fetch(`${gateway}/v1/admin/payments?state=all&limit=500`, { headers: { "X-Admin-Key": adminKey } });
    const text = await res.text();
    assert(res.status === 200, `GET /v1/admin/payments answered ${res.status} ${text.slice(0, 300)}`);
    const body = JSON.parse(text);
    assert(body.ok === true && Array.isArray(body.payments), `listing ${text.slice(0, 300)}`);
    assert(!KEY_ANYWHERE.test(text), "a key in the admin listing");
    last = body.payments.find((p) => lc(p.reference) === reference);
    if (last && states.includes(last.state)) return last;
    if (Date.now() > deadline) throw new Error(`${reference} did not reach ${states} in ${timeoutMs / 1000} s: ${show(last ?? "not listed")}`);
    await sleep(500);
  }
}

const lostAnswer = (mode) =>
  check(`i. ${mode}: the settled payment answers pending; a retry delivers the key, and the sweep alone delivers another's; paid once each`, async () => {
    const before = await balances(pub, info);
    const pays = [];
    await withFault(mode, async () => {
      for (const name of ["retried", "swept"]) {
        const payload = await client.createPaymentPayload(offer);
        const idem = idemKey();
        const headers = { ...client.encodePaymentSignatureHeader(payload), "Idempotency-Key": idem };
        const t = Date.now();
        const r = await signup(headers);
        expectPending(r, referenceOf(payload), idem);
        pays.push({ name, payload, idem, headers, ms: Date.now() - t });
      }
    });
    const moved = await balances(pub, info);
    assert(moved.payTo - before.payTo === 2n * amount, `the facilitator settled both: payTo rose by ${moved.payTo - before.payTo}, want ${2n * amount}`);
    const [retried, swept] = pays;
    // The payer retries: the key comes, and once more as a replay; nothing moves again.
    const first = await collect(retried.headers, retried.idem, referenceOf(retried.payload));
    const again = await signup(retried.headers);
    assert(again.status === 200 && again.body.replayed === true && again.body.key === first.body.key, `replay ${brief(again)}`);
    // Left alone, the sweep resolves the other one; then its payer collects the key.
    const listed = await adminState(referenceOf(swept.payload), ["done"]);
    assert(/^k_[0-9a-f]{16}$/.test(listed.key_id ?? ""), `listing ${show(listed)}`);
    const got = await collect(swept.headers, swept.idem, referenceOf(swept.payload));
    assert(got.body.key_id === listed.key_id, `collected ${got.body.key_id}, listed ${listed.key_id}`);
    const after = await balances(pub, info);
    assert(after.payTo - before.payTo === 2n * amount && before.payer - after.payer === 2n * amount, `moved ${show({ before, after })}`);
    for (const p of pays) assert((await usedEvents(p.payload)) === 1, `${p.name}: AuthorizationUsed events != 1`);
    console.log(`# ${mode}: pending answers in ${pays.map((p) => p.ms).join(" / ")} ms`);
  });
await lostAnswer("error_after_settle");
await lostAnswer("reset_after_settle");
await lostAnswer("hang_after_settle");

await check("i. no Idempotency-Key, answer lost: the 202 gives one; with it the retry gets the key", async () => {
  const before = await balances(pub, info);
  const payload = await client.createPaymentPayload(offer);
  const headers = client.encodePaymentSignatureHeader(payload);
  const r = await withFault("error_after_settle", () => signup(headers));
  const made = expectPending(r, referenceOf(payload));
  await collect({ ...headers, "Idempotency-Key": made }, made, referenceOf(payload));
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount, `payTo rose by ${after.payTo - before.payTo}`);
});

await check("i. the facilitator fails before settling: pending; the retry settles it once", async () => {
  const before = await balances(pub, info);
  const payload = await client.createPaymentPayload(offer);
  const idem = idemKey();
  const headers = { ...client.encodePaymentSignatureHeader(payload), "Idempotency-Key": idem };
  const r = await withFault("error_before_settle", () => signup(headers));
  expectPending(r, referenceOf(payload), idem);
  await collect(headers, idem, referenceOf(payload));
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount && before.payer - after.payer === amount, `moved ${show({ before, after })}`);
  assert((await usedEvents(payload)) === 1, "AuthorizationUsed events != 1");
});

await check("i. settled, but the facilitator answers success:false: the chain decides → 201, paid once", async () => {
  const before = await balances(pub, info);
  const payload = await client.createPaymentPayload(offer);
  const idem = idemKey();
  const headers = { ...client.encodePaymentSignatureHeader(payload), "Idempotency-Key": idem };
  const r = await withFault("refuse_after_settle", () => signup(headers));
  assert(r.status === 201, `the transfer is on chain: expected 201, got ${brief(r)}`);
  await collect(headers, idem, referenceOf(payload)); // 200 replayed now
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount && before.payer - after.payer === amount, `moved ${show({ before, after })}`);
  assert((await usedEvents(payload)) === 1, "AuthorizationUsed events != 1");
});

await check("i. refused without settling: 402 payment_failed (checked on chain), nothing moved; the same payment then buys a key", async () => {
  const before = await balances(pub, info);
  const payload = await client.createPaymentPayload(offer);
  const idem = idemKey();
  const headers = { ...client.encodePaymentSignatureHeader(payload), "Idempotency-Key": idem };
  const r = await withFault("refuse_before_settle", () => signup(headers));
  expect402(r, "payment_failed");
  await unchanged(before, "refused settlement");
  await collect(headers, idem, referenceOf(payload));
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount, `payTo rose by ${after.payTo - before.payTo}`);
});

await check("i. the facilitator's /verify fails: 502 payment_unavailable, no charge, nothing moved; the same payment then buys a key", async () => {
  const before = await balances(pub, info);
  const payload = await client.createPaymentPayload(offer);
  const idem = idemKey();
  const headers = { ...client.encodePaymentSignatureHeader(payload), "Idempotency-Key": idem };
  const s0 = await control("/stats");
  await control("/fault", { verify: "error" });
  let r;
  try {
    r = await signup(headers);
  } finally {
    await control("/fault", { verify: "none" });
  }
  assert(r.status === 502 && r.body?.error?.code === "payment_unavailable", `expected 502 payment_unavailable, got ${brief(r)}`);
  assert(r.body.note === "no charge applied" && !KEY_ANYWHERE.test(r.text), `502 ${brief(r)}`);
  const s1 = await control("/stats");
  assert(s1.settle === s0.settle, "settled after a failed verification");
  await unchanged(before, "verify outage");
  await collect(headers, idem, referenceOf(payload));
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount, `payTo rose by ${after.payTo - before.payTo}`);
});

await check("i. never settled before validBefore: released, 402, no key, nothing moved", async () => {
  const before = await balances(pub, info);
  const signed = await control("/pay", { accepted: requirement, resource: offer.resource, validBeforeOffset: 12 });
  const validBefore = Number(signed.payload.payload.authorization.validBefore);
  const idem = idemKey();
  const headers = { ...signed.headers, "Idempotency-Key": idem };
  const reference = referenceOf(signed.payload);
  await withFault("error_before_settle", async () => {
    const r = await signup(headers);
    expectPending(r, reference, idem);
    // Keep the facilitator failing until the authorization has expired.
    while (Date.now() / 1000 < validBefore + 2) await sleep(500);
  });
  let r;
  for (let i = 0; i < 10; i++) {
    r = await signup(headers);
    if (!(r.status === 409 && r.body?.error?.code === "payment_in_progress")) break;
    await sleep(1000);
  }
  assert(r.status === 402 && ["payment_failed", "payment_invalid"].includes(r.body?.error?.code), `expected 402 payment_failed, got ${brief(r)}`);
  assert(!KEY_ANYWHERE.test(r.text) && !("key" in r.body), `a key: ${brief(r)}`);
  await unchanged(before, "expired");
  assert((await usedEvents(signed.payload)) === 0, "AuthorizationUsed for an expired authorization");
  const listed = await adminState(reference, ["released"], 30_000);
  assert(listed.key_id == null, `a released payment with a key_id: ${show(listed)}`);
});

// ---- j. the official facilitator's own settlement_pending (anvil automine off) -----------------------
await check("j. automine off: settlement_pending → 202 with the tx; unmined retry → still pending; mined → key, paid once", async () => {
  const before = await balances(pub, info);
  const payload = await client.createPaymentPayload(offer);
  const idem = idemKey();
  const headers = { ...client.encodePaymentSignatureHeader(payload), "Idempotency-Key": idem };
  const reference = referenceOf(payload);
  await control("/automine", { enabled: false });
  let tx;
  try {
    const r = await signup(headers);
    expectPending(r, reference, idem);
    tx = r.body.payment.transaction;
    assert(/^0x[0-9a-f]{64}$/i.test(tx ?? ""), `the pending answer does not carry the facilitator's transaction: ${brief(r)}`);
    const again = await signup(headers);
    const stillPending = (again.status === 409 && again.body?.error?.code === "payment_in_progress") || again.status === 202;
    assert(stillPending, `an unmined payment answered ${brief(again)}`);
    if (again.status === 202) expectPending(again, reference, idem);
    await unchanged(before, "not mined yet");
  } finally {
    await control("/automine", { enabled: true });
    await control("/mine", { blocks: 1 });
  }
  const got = await collect(headers, idem, reference);
  const receipt = await pub.getTransactionReceipt({ hash: tx });
  assert(receipt.status === "success", `receipt ${receipt.status}`);
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount && before.payer - after.payer === amount, `moved ${show({ before, after })}`);
  assert((await usedEvents(payload)) === 1, "AuthorizationUsed events != 1");
  assert(got.body.key, "no key");
});

// ---- k. operators see every payment ----------------------------------------------------------------
await check("k. GET /v1/admin/payments: admin key required, filters by state, never a key or an idempotency key", async () => {
  const none = await fetch(`${gateway}/v1/admin/payments`);
  assert(none.status === 401, `without X-Admin-Key: ${none.status}`);
  const bad = await fetch(`${gateway}/v1/admin/payments?state=nope`, { headers: { "X-Admin-Key": adminKey } });
  assert(bad.status === 400, `state=nope: ${bad.status}`);
  const res = await fetch(`${gateway}/v1/admin/payments?state=done&limit=500`, { headers: { "X-Admin-Key": adminKey } });
  const text = await res.text();
  assert(res.status === 200, `state=done: ${res.status} ${text.slice(0, 300)}`);
  const body = JSON.parse(text);
  assert(body.payments.every((p) => p.state === "done"), `state=done lists ${show(body.payments.map((p) => p.state))}`);
  const ids = new Set(body.payments.map((p) => p.key_id));
  for (const id of delivered.keys()) assert(ids.has(id), `key ${id} has no done payment listed`);
  for (const p of body.payments) {
    for (const k of ["reference", "rail", "state", "created_at", "updated_at"]) assert(k in p, `entry without ${k}: ${show(p)}`);
  }
  assert(!KEY_ANYWHERE.test(text) && !text.includes(idem) && !/[0-9a-f]{130}/i.test(text), "the listing shows a key, an idempotency key or a signature");
});

// ---- l. the money, counted -------------------------------------------------------------------------
await check("l. payTo received exactly price × keys delivered; one AuthorizationUsed per key", async () => {
  const end = await balances(pub, info);
  const endStats = await control("/stats");
  const keys = BigInt(delivered.size);
  assert(end.payTo - start.payTo === amount * keys, `payTo rose by ${end.payTo - start.payTo} for ${keys} keys of ${amount}`);
  assert(start.payer - end.payer === amount * keys, `payer fell by ${start.payer - end.payer} for ${keys} keys`);
  const events = endStats.authorizationUsed - startStats.authorizationUsed;
  assert(BigInt(events) === keys, `${events} authorizations used for ${keys} keys`);
  console.log(`# ${keys} keys delivered, ${end.payTo - start.payTo} base units received`);
});

await control("/reset", {}).catch(() => {});

done();
