#!/usr/bin/env node
// Pays a gateway's POST /v1/signup for real over x402 (contract 3.9) on the chain of chain.mjs, with
// the official x402 client, and checks every answer against the chain's balances.
//
//   node signup-x402.mjs --gateway http://127.0.0.1:PORT --chain '<chain.mjs JSON line>' --key-prefix mcp_
//
// The gateway must be generated with `[signup] enabled = true` and `[signup.x402]` set to the chain's
// network, asset, asset_name, asset_version, asset_decimals, pay_to and facilitator_url; price,
// balance and scopes are read from its GET /v1/pricing. Prints `ok - name` / `not ok - name: details`
// per check and exits 1 if any failed.

import { createHmac, randomBytes } from "node:crypto";

import { assert, b64json, balances, handSigned, payerClient, publicClient, reporter, show, unb64json } from "./lib.mjs";

function arg(name, required = true) {
  const i = process.argv.indexOf(`--${name}`);
  if (i >= 0 && process.argv[i + 1] !== undefined) return process.argv[i + 1];
  if (!required) return undefined;
  console.error(`usage: node signup-x402.mjs --gateway URL --chain JSON --key-prefix PREFIX (missing --${name})`);
  process.exit(2);
}
const gateway = arg("gateway").replace(/\/+$/, "");
const info = JSON.parse(arg("chain"));
const keyPrefix = arg("key-prefix");
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
  assert(b.payment?.rail === "x402" && /^0x[0-9a-f]{64}$/i.test(b.payment?.reference ?? ""), `payment ${show(b.payment)}`);
  const settle = client.getPaymentSettleResponse((n) => r.headers.get(n));
  const rawSettle = unb64json(r.headers.get("payment-response"));
  assert(settle.success === true && /^0x[0-9a-f]{64}$/i.test(settle.transaction), `PAYMENT-RESPONSE ${show(rawSettle)}`);
  assert(lc(settle.transaction) === lc(b.payment.reference), "payment.reference is not the settled transaction");
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
});

await check("c. the key is derived from the Idempotency-Key and the payment (contract 3.9)", async () => {
  assert(paid, "no good payment");
  const a = paid.payload.payload.authorization;
  const reference = lc(`x402:${info.network}:${requirement.asset}:${a.from}:${a.nonce}`);
  const want = keyPrefix + createHmac("sha256", idem).update(`mcpay-signup-v1:${reference}`).digest("hex");
  assert(paid.body.key === want, `key is not HMAC(Idempotency-Key, "mcpay-signup-v1:${reference}")`);
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
  const after = await balances(pub, info);
  assert(after.payTo - before.payTo === amount && before.payer - after.payer === amount, `moved ${show({ before, after })}`);
});

done();
