// The MPP rail of POST /v1/signup, with the official mppx library: intent `charge` with the
// configured methods, one `WWW-Authenticate: Payment` challenge per method, challenge ids
// HMAC-SHA256-bound with MPP_SECRET_KEY and bound to this route (opaque scope "signup"), the
// credential in `Authorization: Payment …`, the receipt in `Payment-Receipt`.
// The credential is checked here (issued by us, our realm and route, not expired, the offered
// amount) BEFORE the replay record is consulted; the method's verification (which, for Tempo,
// takes the payment) runs only after that, through mppx.
import { Challenge, Credential, PaymentRequest, Receipt } from "mppx";
import { Mppx, Transport } from "mppx/server";
import { deepEqual } from "@x402/core/utils";
import { classifyHttp, type PaymentSetup } from "./mpp-methods";

/** The route scope bound into every signup challenge (mppx's opaque `_mppx_scope`). */
export const SIGNUP_SCOPE = "signup";
const PROBLEMS = "https://paymentauth.org/problems/";

export interface MppRail {
  readonly setup: PaymentSetup;
  readonly realm: string;
  readonly ttlSeconds: number;
  readonly priceMcents: number;
  readonly description: string;
}

export type MppFailure = { ok: false; message: string; problem: string };
/** The method's verification failed in a way that does not say whether the payment was taken. */
export type MppUnknown = { ok: false; unknown: true; message: string };

type ChallengeFn = (options: Record<string, unknown>) => Promise<Challenge.Challenge>;
type ComposedHandler = (input: Request) => Promise<
  { status: 402; challenge: unknown } | { status: 200; withReceipt: (response?: unknown) => unknown }
>;

interface MppxServer {
  challenge: Record<string, Record<string, ChallengeFn | undefined> | undefined>;
  compose: (...entries: unknown[]) => ComposedHandler;
}

function mppxFor(rail: MppRail): MppxServer {
  return Mppx.create({
    methods: rail.setup.methods as never,
    secretKey: rail.setup.secretKey,
    realm: rail.realm,
    transport: Transport.http() as never,
  }) as unknown as MppxServer;
}

function entries(rail: MppRail, expires: string): Array<[string, Record<string, unknown>]> {
  return rail.setup
    .offers(rail.priceMcents)
    .map(([key, options]) => [key, { ...options, scope: SIGNUP_SCOPE, expires, description: rail.description }]);
}

function freshExpires(rail: MppRail): string {
  return new Date(Date.now() + rail.ttlSeconds * 1000).toISOString();
}

async function expectedChallenge(mppx: MppxServer, key: string, options: Record<string, unknown>): Promise<Challenge.Challenge> {
  const [name, intent] = key.split("/") as [string, string];
  const fn = mppx.challenge[name]?.[intent];
  if (!fn) throw new Error(`payment method ${key} is not configured`);
  return fn(options);
}

/** One serialized `WWW-Authenticate: Payment …` challenge per offered method. */
export async function mppChallenges(rail: MppRail): Promise<string[]> {
  const mppx = mppxFor(rail);
  const out: string[] = [];
  for (const [key, options] of entries(rail, freshExpires(rail))) out.push(Challenge.serialize(await expectedChallenge(mppx, key, options)));
  return out;
}

function metaOf(c: Challenge.Challenge): Record<string, string> | undefined {
  if (c.meta) return c.meta;
  if (c.opaque === undefined) return undefined;
  return PaymentRequest.deserialize(c.opaque) as Record<string, string>;
}

function norm(v: unknown): string | undefined {
  if (v === undefined || v === null) return undefined;
  const s = String(v);
  return s.startsWith("0x") ? s.toLowerCase() : s;
}

/** The fields of a charge request that carry money: they must be the offered ones. */
const PINNED = ["amount", "currency", "recipient", "chainId"] as const;

function pinned(request: Record<string, unknown>): Record<string, string | undefined> {
  const details = (request.methodDetails ?? {}) as Record<string, unknown>;
  return Object.fromEntries(PINNED.map((k) => [k, norm(request[k] ?? details[k])]));
}

/**
 * Step 6: the credential decodes, was issued by this gateway (HMAC), for this realm and this route,
 * with an offered method, not expired, for the offered amount. Nothing is recorded or paid here.
 */
export async function checkCredential(
  rail: MppRail,
  request: Request,
): Promise<{ ok: true; credential: Credential.Credential; reference: string } | MppFailure> {
  let credential: Credential.Credential;
  try {
    credential = Credential.fromRequest(request);
  } catch {
    return { ok: false, message: "The Payment credential could not be decoded.", problem: `${PROBLEMS}malformed-credential` };
  }
  const c = credential.challenge;
  const invalid = (message: string): MppFailure => ({ ok: false, message, problem: `${PROBLEMS}invalid-challenge` });
  if (!Challenge.verify(c, { secretKey: rail.setup.secretKey })) return invalid("The challenge was not issued by this gateway.");
  if (c.realm !== rail.realm) return invalid("The challenge was issued for another realm.");
  const key = `${c.method}/${c.intent}`;
  const offer = entries(rail, c.expires ?? freshExpires(rail)).find(([k]) => k === key);
  if (!offer) return invalid(`Payment method ${key.slice(0, 64)} is not offered for signup.`);
  const expected = await expectedChallenge(mppxFor(rail), offer[0], offer[1]);
  if (!deepEqual(metaOf(c) ?? null, metaOf(expected) ?? null)) return invalid("The challenge was issued for another route.");
  const expires = c.expires === undefined ? NaN : Date.parse(c.expires);
  if (!Number.isFinite(expires) || expires <= Date.now()) {
    return { ok: false, message: "The challenge has expired; pay a fresh one.", problem: `${PROBLEMS}payment-expired` };
  }
  if (!deepEqual(pinned(c.request), pinned(expected.request))) return invalid("The challenge is not for the offered amount.");
  return { ok: true, credential, reference: `mpp:${c.id}` };
}

/**
 * Step 10: the method's own verification through mppx (HMAC, route binding and expiry again, then
 * e.g. Tempo's transaction check and broadcast). Success only with a receipt whose status is success.
 * A refusal (a PaymentError such as VerificationFailedError) took nothing; an error that is not a
 * refusal (mppx reports any other throw of the method as internal-payment-error: a network error, a
 * 5xx) leaves the outcome unknown.
 */
export async function verifyPayment(
  rail: MppRail,
  request: Request,
): Promise<{ ok: true; receipt: Receipt.Receipt; header: { name: string; value: string } } | MppFailure | MppUnknown> {
  const handler = mppxFor(rail).compose(...entries(rail, freshExpires(rail)));
  // The body has been read already; mppx needs the URL, the method and the credential header.
  let result: Awaited<ReturnType<ComposedHandler>>;
  try {
    result = await handler(new Request(request.url, { method: "POST", headers: request.headers }));
  } catch (err) {
    console.error(JSON.stringify({ msg: "mpp signup verification threw", error: String(err).slice(0, 500) }));
    return { ok: false, unknown: true, message: "The payment method failed while verifying the payment." };
  }
  if (result.status === 402) {
    const res = result.challenge as Response;
    let problem = `${PROBLEMS}verification-failed`;
    let message = "The payment could not be verified.";
    try {
      const body = (await res.json()) as { type?: unknown; detail?: unknown; title?: unknown };
      if (typeof body.type === "string") problem = body.type;
      const text = typeof body.detail === "string" ? body.detail : typeof body.title === "string" ? body.title : null;
      if (text) message = `Payment refused: ${text.slice(0, 300)}`;
    } catch {
      // keep the defaults
    }
    if (problem === `${PROBLEMS}internal-payment-error`) return { ok: false, unknown: true, message: "The payment method failed while verifying the payment." };
    return { ok: false, message, problem };
  }
  const paid = classifyHttp(result.withReceipt);
  if (paid.kind !== "paid") {
    // No receipt means not paid (and a charge method has no management exchanges).
    if (paid.kind === "management") await paid.response.body?.cancel();
    return { ok: false, message: "The payment could not be confirmed.", problem: `${PROBLEMS}verification-failed` };
  }
  return { ok: true, receipt: paid.receipt, header: { name: "Payment-Receipt", value: Receipt.serialize(paid.receipt) } };
}
