// PaymentDO: durable payment state. One object per name, so unrelated payments never contend:
//   "signup:<payment reference>"   one signup payment (POST /v1/signup): pending → paid → done;
//   "signup-ref:<method>:<ref>"    an MPP receipt reference, linked to the signup payment it paid;
//   "store:<mppx key>"             mppx's atomic store (e.g. Tempo's transaction-hash replay markers),
//                                  updated by compare-and-set.
// Every method is a single synchronous SQLite transaction in a single-threaded object. Nothing here
// holds a key or a key hash: a signup record names the key it bought by its public key_id, and the
// Idempotency-Key only by its SHA-256.
import { DurableObject } from "cloudflare:workers";

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL, version INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS signup (
     id INTEGER PRIMARY KEY CHECK (id = 1),
     state TEXT NOT NULL CHECK (state IN ('pending', 'paid', 'done')),
     token TEXT NOT NULL,
     lease_until INTEGER NOT NULL,
     paid TEXT,
     record TEXT,
     updated_at INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS signup_link (id INTEGER PRIMARY KEY CHECK (id = 1), payment TEXT NOT NULL, linked_at INTEGER NOT NULL)`,
];

/**
 * How long a request may hold a payment (verify + settle + mint) before another request may take
 * it over. Longer than any facilitator or payment-method call is allowed to take.
 */
export const SIGNUP_LEASE_MS = 10 * 60_000;

/** A payment that was taken (settled / verified) but has not minted its key yet. */
export interface SignupPaid {
  rail: "x402" | "mpp";
  /** The on-chain transaction / the payment method's reference, shown as payment.reference. */
  reference: string;
  /** The header the success response carries (PAYMENT-RESPONSE, X-PAYMENT-RESPONSE or Payment-Receipt). */
  header: { name: string; value: string } | null;
}

/** What a signup payment bought. */
export interface SignupRecord extends SignupPaid {
  keyId: string;
  name: string | null;
  balanceMcents: number;
  scopes: string[];
  /** sha256_hex of the Idempotency-Key of the request that minted, or null. */
  idemHash: string | null;
  mintedAt: number;
}

export type SignupBegin =
  | { state: "done"; record: SignupRecord }
  | { state: "busy"; retryAfterMs: number }
  | { state: "claimed"; token: string; paid: SignupPaid | null };

export type SignupState = { state: "none" | "pending" | "paid" } | { state: "done"; record: SignupRecord };

type SignupRow = { state: "pending" | "paid" | "done"; token: string; lease_until: number; paid: string | null; record: string | null };

export class PaymentDO extends DurableObject {
  protected readonly sql: SqlStorage;
  private baseReady = false;

  constructor(ctx: DurableObjectState, env: unknown) {
    super(ctx, env as never);
    this.sql = ctx.storage.sql;
  }

  protected initBase(): void {
    if (this.baseReady) return;
    for (const s of SCHEMA) this.sql.exec(s);
    this.baseReady = true;
  }

  /** After storage.deleteAll(): the tables are recreated on next use. */
  protected resetBase(): void {
    this.baseReady = false;
  }

  /** True while this object holds state that must never be dropped (signup records and links). */
  protected holdsSignupState(): boolean {
    this.initBase();
    const n = this.sql.exec<{ n: number }>("SELECT (SELECT COUNT(*) FROM signup) + (SELECT COUNT(*) FROM signup_link) AS n").one().n;
    return n > 0;
  }

  // ------------------------------------------------------------ signup payments

  private signupRow(): SignupRow | undefined {
    return this.sql.exec<SignupRow>("SELECT state, token, lease_until, paid, record FROM signup WHERE id = 1").toArray()[0];
  }

  /**
   * Claims this payment for one request. A payment that already minted a key answers "done" with
   * its record (never claimable again); a claim held by another request answers "busy"; a claim
   * abandoned for longer than the lease (its request died) is taken over, and if that payment was
   * already taken ("paid"), the new holder only has to mint.
   */
  signupBegin(): SignupBegin {
    this.initBase();
    const now = Date.now();
    return this.ctx.storage.transactionSync((): SignupBegin => {
      const row = this.signupRow();
      if (row?.state === "done") return { state: "done", record: JSON.parse(row.record!) as SignupRecord };
      if (row && row.lease_until > now) return { state: "busy", retryAfterMs: row.lease_until - now };
      const token = crypto.randomUUID();
      if (!row) {
        this.sql.exec(
          "INSERT INTO signup (id, state, token, lease_until, updated_at) VALUES (1, 'pending', ?, ?, ?)",
          token,
          now + SIGNUP_LEASE_MS,
          now,
        );
        return { state: "claimed", token, paid: null };
      }
      this.sql.exec("UPDATE signup SET token = ?, lease_until = ?, updated_at = ? WHERE id = 1", token, now + SIGNUP_LEASE_MS, now);
      return { state: "claimed", token, paid: row.state === "paid" ? (JSON.parse(row.paid!) as SignupPaid) : null };
    });
  }

  /** Gives a pending claim up (the payment was refused or not taken): the payer may try again. */
  signupRelease(token: string): boolean {
    this.initBase();
    return this.ctx.storage.transactionSync(() => {
      const row = this.signupRow();
      // A taken payment is never released: it must still mint its key.
      if (!row || row.token !== token || row.state !== "pending") return false;
      this.sql.exec("DELETE FROM signup WHERE id = 1");
      return true;
    });
  }

  /** Records that the payment was taken, before minting (so a retry can finish without paying again). */
  signupPaid(token: string, paid: SignupPaid): boolean {
    this.initBase();
    const now = Date.now();
    return this.ctx.storage.transactionSync(() => {
      const row = this.signupRow();
      if (!row || row.token !== token || row.state !== "pending") return false;
      this.sql.exec(
        "UPDATE signup SET state = 'paid', paid = ?, lease_until = ?, updated_at = ? WHERE id = 1",
        JSON.stringify(paid),
        now + SIGNUP_LEASE_MS,
        now,
      );
      return true;
    });
  }

  /**
   * Marks the payment as used for good, with what it bought. Returns the record that stands: ours,
   * or (if our claim was taken over after its lease) the one that completed first.
   */
  signupComplete(token: string, record: SignupRecord): SignupRecord {
    this.initBase();
    const now = Date.now();
    return this.ctx.storage.transactionSync(() => {
      const row = this.signupRow();
      if (row?.state === "done") return JSON.parse(row.record!) as SignupRecord;
      if (!row || row.token !== token) {
        // Our claim was released or taken over: the payment was taken by us, so it still counts.
        console.error(JSON.stringify({ msg: "signup completed without holding the claim" }));
      }
      this.sql.exec(
        `INSERT INTO signup (id, state, token, lease_until, paid, record, updated_at) VALUES (1, 'done', ?, 0, NULL, ?, ?)
         ON CONFLICT (id) DO UPDATE SET state = 'done', token = excluded.token, lease_until = 0, record = excluded.record, updated_at = excluded.updated_at`,
        token,
        JSON.stringify(record),
        now,
      );
      return record;
    });
  }

  signupState(): SignupState {
    this.initBase();
    const row = this.signupRow();
    if (!row) return { state: "none" };
    if (row.state === "done") return { state: "done", record: JSON.parse(row.record!) as SignupRecord };
    return { state: row.state };
  }

  /**
   * Links this object (a payment method's receipt reference) to the signup payment it paid. True
   * when the reference was free or already linked to `payment`; false when another payment holds it.
   */
  signupLink(payment: string): { ok: true } | { ok: false; payment: string } {
    this.initBase();
    return this.ctx.storage.transactionSync(() => {
      const row = this.sql.exec<{ payment: string }>("SELECT payment FROM signup_link WHERE id = 1").toArray()[0];
      if (row) return row.payment === payment ? { ok: true as const } : { ok: false as const, payment: row.payment };
      this.sql.exec("INSERT INTO signup_link (id, payment, linked_at) VALUES (1, ?, ?)", payment, Date.now());
      return { ok: true as const };
    });
  }

  /** Removes a link made by `payment` whose payment was then refused (so the reference stays usable). */
  signupUnlink(payment: string): void {
    this.initBase();
    this.sql.exec("DELETE FROM signup_link WHERE id = 1 AND payment = ?", payment);
  }

  // ------------------------------------------------------------ mppx atomic store (CAS)

  kvGet(key: string): { value: string | null; version: number } {
    this.initBase();
    const row = this.sql.exec<{ v: string; version: number }>("SELECT v, version FROM kv WHERE k = ?", key).toArray()[0];
    return row ? { value: row.v, version: row.version } : { value: null, version: 0 };
  }

  /** Sets (or deletes, with null) `key` if its version is still `expected`. */
  kvCompareAndSet(key: string, expected: number, value: string | null): boolean {
    this.initBase();
    return this.ctx.storage.transactionSync(() => {
      const cur = this.kvGet(key);
      if (cur.version !== expected) return false;
      if (value === null) this.sql.exec("DELETE FROM kv WHERE k = ?", key);
      else
        this.sql.exec(
          "INSERT INTO kv (k, v, version) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v, version = excluded.version",
          key,
          value,
          expected + 1,
        );
      return true;
    });
  }

  kvPut(key: string, value: string): void {
    this.initBase();
    const cur = this.kvGet(key);
    this.kvCompareAndSet(key, cur.version, value);
  }

  kvDelete(key: string): void {
    this.initBase();
    this.sql.exec("DELETE FROM kv WHERE k = ?", key);
  }
}
