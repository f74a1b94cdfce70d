// PaymentDO: durable payment state. One object per name, so unrelated payments never contend:
//   "signup:<payment reference>"   one signup payment (POST /v1/signup), see below;
//   "signup-ref:<method>:<ref>"    an MPP receipt reference, linked to the signup payment it paid;
//   "store:<mppx key>"             mppx's atomic store (e.g. Tempo's transaction-hash replay markers),
//                                  updated by compare-and-set.
// A signup payment moves through the states of docs/contract.md 3.9:
//   claimed (verifying) → settling → paid → done,  or  → pending → (paid → done) | released.
// `settling` is recorded (with everything needed to ask the chain later) BEFORE the money may
// move; an outcome the gateway did not learn is `pending`, never "not charged". The object's alarm
// (every 30 s while settling or pending) resolves such a payment from the chain and mints its key
// with no client; every state change is logged and copied to the admin object's payment index.
// Every state change is a single synchronous SQLite transaction in a single-threaded object.
// Nothing here holds a key, a key hash or an Idempotency-Key: a record names the key it bought by
// its public key_id and the Idempotency-Key only by its SHA-256.
import { DurableObject } from "cloudflare:workers";
import type { AppEnv } from "./env";
import { sweepSignup } from "./signup-sweep";

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL, version INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS signup_payment (
     id INTEGER PRIMARY KEY CHECK (id = 1),
     state TEXT NOT NULL CHECK (state IN ('claimed', 'settling', 'pending', 'paid', 'done', 'released')),
     rail TEXT NOT NULL,
     reference TEXT NOT NULL,
     token TEXT NOT NULL,
     lease_until INTEGER NOT NULL,
     idem_hash TEXT,
     purchase TEXT,
     x402 TEXT,
     valid_before INTEGER,
     tx TEXT,
     paid TEXT,
     record TEXT,
     permit INTEGER,
     seq INTEGER NOT NULL,
     index_dirty INTEGER NOT NULL DEFAULT 1,
     created_at INTEGER NOT NULL,
     updated_at INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS signup_link (id INTEGER PRIMARY KEY CHECK (id = 1), payment TEXT NOT NULL, linked_at INTEGER NOT NULL)`,
];

/** How often the alarm looks at a settling / pending payment (SIGNUP_SWEEP_INTERVAL_MS overrides it). */
export const SWEEP_INTERVAL_MS = 30_000;

/** The sweep interval: SIGNUP_SWEEP_INTERVAL_MS when it is an integer in 1000..300000, else 30 s. */
export function sweepIntervalMs(env: { SIGNUP_SWEEP_INTERVAL_MS?: string }): number {
  const v = Number((env.SIGNUP_SWEEP_INTERVAL_MS ?? "").trim());
  return Number.isInteger(v) && v >= 1000 && v <= 300_000 ? v : SWEEP_INTERVAL_MS;
}

/** How long a request may hold a payment (verify + settle + mint) before another may take it over. */
export const SIGNUP_LEASE_MS = 5 * 60_000;

export type PaymentState = "claimed" | "settling" | "pending" | "paid" | "done" | "released";
export type SignupRail = "x402" | "mpp";

/** What a signup buys, fixed when its payment starts to settle (the sweep mints it without a client). */
export interface SignupPurchase {
  name: string | null;
  balanceMcents: number;
  scopes: string[];
}

/** An x402 payment as recorded before /settle: enough to settle it again and to ask the chain. */
export interface X402Settlement {
  /** The v2 PaymentPayload sent to the facilitator (authorization + signature). */
  payload: Record<string, unknown>;
  requirement: Record<string, unknown>;
  version: 1 | 2;
  clientNetwork: string;
  authorization: { from: string; to: string; value: string; validAfter: string; validBefore: string; nonce: string };
  facilitatorUrl: string;
  rpcUrl: string;
  /** The chain's block number when settling started (decimal). */
  fromBlock: string;
}

export interface SignupSettling {
  idemHash: string;
  /** The slot this signup took in the hourly signup budget (given back if the payment is released). */
  permit: number | null;
  purchase: SignupPurchase;
  x402: X402Settlement | null;
}

/** A payment that was taken (settled / verified) but has not minted its key yet. */
export interface SignupPaid {
  rail: SignupRail;
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
  /** sha256_hex of the Idempotency-Key the key was derived from (the client's or the gateway's). */
  idemHash: string | null;
  mintedAt: number;
  /** "v1": minted before SIGNUP_SECRET (key = HMAC(Idempotency-Key, "mcpay-signup-v1:" + reference)). */
  derivation?: "v1";
}

/** A signup payment's record as its holder needs it. */
export interface SignupSnapshot {
  state: PaymentState;
  rail: SignupRail;
  /** The payment reference (x402:… / mpp:…), also this object's name after "signup:". */
  reference: string;
  idemHash: string | null;
  purchase: SignupPurchase | null;
  x402: X402Settlement | null;
  transaction: string | null;
  paid: SignupPaid | null;
}

export type SignupBegin =
  | { state: "done"; record: SignupRecord; x402: X402Settlement | null }
  | { state: "busy"; retryAfterMs: number }
  /** A new claim: this request verifies and settles. */
  | { state: "claimed"; token: string }
  /** A payment whose outcome is unknown (or taken but not minted): this request resolves it. */
  | { state: "resolve"; token: string; snapshot: SignupSnapshot }
  /** An MPP payment whose outcome is unknown: nothing can resolve it automatically. */
  | { state: "unresolved"; snapshot: SignupSnapshot };

export type SignupStateView = { state: "none" | Exclude<PaymentState, "done"> } | { state: "done"; record: SignupRecord };

/** A row of the admin payment index (GET /v1/admin/payments). */
export interface PaymentIndexRow {
  reference: string;
  rail: SignupRail;
  state: PaymentState;
  transaction: string | null;
  key_id: string | null;
  created_at: number;
  updated_at: number;
  seq: number;
}

type Row = {
  state: PaymentState;
  rail: SignupRail;
  reference: string;
  token: string;
  lease_until: number;
  idem_hash: string | null;
  purchase: string | null;
  x402: string | null;
  valid_before: number | null;
  tx: string | null;
  paid: string | null;
  record: string | null;
  permit: number | null;
  seq: number;
  index_dirty: number;
  created_at: number;
  updated_at: number;
};

/** The parts of PaymentDO the signup flow drives (a stub from a request, the object itself from its alarm). */
export interface SignupStore {
  signupPending(token: string, transaction: string | null): Promise<boolean>;
  signupPaid(token: string, paid: SignupPaid): Promise<boolean>;
  signupRelease(token: string, why: string): Promise<boolean>;
  signupComplete(token: string, record: SignupRecord): Promise<SignupRecord>;
}

export class PaymentDO extends DurableObject<AppEnv> implements SignupStore {
  protected readonly sql: SqlStorage;
  private baseReady = false;

  constructor(ctx: DurableObjectState, env: AppEnv) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
  }

  protected initBase(): void {
    if (this.baseReady) return;
    for (const s of SCHEMA) this.sql.exec(s);
    this.migrateV1();
    this.baseReady = true;
  }

  /** Records of the first schema (table `signup`: pending = claimed, paid, done) move to signup_payment. */
  private migrateV1(): void {
    const old = this.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'signup'").one().n;
    if (old === 0) return;
    this.ctx.storage.transactionSync(() => {
      const row = this.sql
        .exec<{ state: string; token: string; lease_until: number; paid: string | null; record: string | null; updated_at: number }>(
          "SELECT state, token, lease_until, paid, record, updated_at FROM signup WHERE id = 1",
        )
        .toArray()[0];
      if (row && (row.state === "paid" || row.state === "done")) {
        const p = JSON.parse((row.state === "done" ? row.record : row.paid)!) as SignupPaid & { idemHash?: string | null; keyId?: string };
        // Keys of these records were derived by the first formula (HMAC keyed by the Idempotency-Key).
        const record = row.record ? JSON.stringify({ ...(JSON.parse(row.record) as object), derivation: "v1" }) : null;
        // The object does not know its own name: migrated records stay out of the admin index.
        this.sql.exec(
          `INSERT OR IGNORE INTO signup_payment (id, state, rail, reference, token, lease_until, idem_hash, tx, paid, record, seq, index_dirty, created_at, updated_at)
           VALUES (1, ?, ?, ?, ?, 0, ?, ?, ?, ?, 1, 0, ?, ?)`,
          row.state,
          p.rail,
          "",
          row.token,
          p.idemHash ?? null,
          p.rail === "x402" ? p.reference : null,
          row.paid,
          record,
          row.updated_at,
          row.updated_at,
        );
      }
      this.sql.exec("DROP TABLE signup");
    });
  }

  /** After storage.deleteAll(): the tables are recreated on next use. */
  protected resetBase(): void {
    this.baseReady = false;
  }

  /** True while this object holds state that must never be dropped (signup records and links). */
  protected holdsSignupState(): boolean {
    this.initBase();
    const n = this.sql.exec<{ n: number }>("SELECT (SELECT COUNT(*) FROM signup_payment) + (SELECT COUNT(*) FROM signup_link) AS n").one().n;
    return n > 0;
  }

  // ------------------------------------------------------------ signup payments

  private row(): Row | undefined {
    return this.sql.exec<Row>("SELECT * FROM signup_payment WHERE id = 1").toArray()[0];
  }

  private snapshot(r: Row): SignupSnapshot {
    return {
      state: r.state,
      rail: r.rail,
      reference: r.reference,
      idemHash: r.idem_hash,
      purchase: r.purchase ? (JSON.parse(r.purchase) as SignupPurchase) : null,
      x402: r.x402 ? (JSON.parse(r.x402) as X402Settlement) : null,
      transaction: r.tx,
      paid: r.paid ? (JSON.parse(r.paid) as SignupPaid) : null,
    };
  }

  private indexRow(r: Row): PaymentIndexRow {
    const record = r.record ? (JSON.parse(r.record) as SignupRecord) : null;
    return {
      reference: r.reference,
      rail: r.rail,
      state: r.state,
      transaction: r.tx,
      key_id: record?.keyId ?? null,
      created_at: r.created_at,
      updated_at: r.updated_at,
      seq: r.seq,
    };
  }

  /** Logs the state change and copies it to the admin index (the alarm retries a failed copy). */
  private async changed(): Promise<void> {
    const r = this.row();
    if (!r) return;
    console.log(JSON.stringify({ msg: "signup payment", reference: r.reference, rail: r.rail, state: r.state, transaction: r.tx }));
    await this.syncIndex();
  }

  private async syncIndex(): Promise<void> {
    const r = this.row();
    if (!r || r.index_dirty === 0) return;
    try {
      const admin = this.env.ADMIN.get(this.env.ADMIN.idFromName("global"));
      await admin.upsertPayment(this.indexRow(r));
      this.sql.exec("UPDATE signup_payment SET index_dirty = 0 WHERE id = 1 AND seq = ?", r.seq);
    } catch (err) {
      console.error(JSON.stringify({ msg: "signup payment index update failed", reference: r.reference, error: String(err).slice(0, 300) }));
      await this.armSweep();
    }
  }

  private async armSweep(): Promise<void> {
    const at = Date.now() + sweepIntervalMs(this.env);
    const current = await this.ctx.storage.getAlarm();
    if (current === null || current > at) await this.ctx.storage.setAlarm(at);
  }

  /** Updates the row in one transaction if `token` holds it and its state is one of `from`. */
  private transition(token: string | null, from: readonly PaymentState[], set: Record<string, unknown>): boolean {
    const now = Date.now();
    return this.ctx.storage.transactionSync(() => {
      const r = this.row();
      if (!r || (token !== null && r.token !== token) || !from.includes(r.state)) return false;
      const cols = Object.keys(set);
      this.sql.exec(
        `UPDATE signup_payment SET ${cols.map((c) => `${c} = ?`).join(", ")}, seq = seq + 1, index_dirty = 1, updated_at = ? WHERE id = 1`,
        ...cols.map((c) => set[c]),
        now,
      );
      return true;
    });
  }

  /**
   * Step 8: this payment's record for a request whose credential is genuine.
   * done → the record; held by a live request → busy; pending / settling or paid whose holder died
   * → this request takes it over to resolve it; none / released / claimed whose holder died (no
   * money moved while claimed) → a new claim.
   */
  async signupBegin(input: { rail: SignupRail; reference: string; leaseMs?: number }): Promise<SignupBegin> {
    this.initBase();
    const now = Date.now();
    const lease = now + (input.leaseMs ?? SIGNUP_LEASE_MS);
    const out = this.ctx.storage.transactionSync((): SignupBegin => {
      const r = this.row();
      if (r?.state === "done") return { state: "done", record: JSON.parse(r.record!) as SignupRecord, x402: r.x402 ? (JSON.parse(r.x402) as X402Settlement) : null };
      if (r && r.state !== "released" && r.lease_until > now) return { state: "busy", retryAfterMs: r.lease_until - now };
      const token = crypto.randomUUID();
      if (!r || r.state === "released" || r.state === "claimed") {
        this.sql.exec(
          `INSERT INTO signup_payment (id, state, rail, reference, token, lease_until, seq, created_at, updated_at) VALUES (1, 'claimed', ?, ?, ?, ?, 1, ?, ?)
           ON CONFLICT (id) DO UPDATE SET state = 'claimed', rail = excluded.rail, reference = excluded.reference, token = excluded.token,
             lease_until = excluded.lease_until, idem_hash = NULL, purchase = NULL, x402 = NULL, valid_before = NULL, tx = NULL, paid = NULL,
             record = NULL, permit = NULL, seq = signup_payment.seq + 1, index_dirty = 1, updated_at = excluded.updated_at`,
          input.rail,
          input.reference,
          token,
          lease,
          now,
          now,
        );
        return { state: "claimed", token };
      }
      if (r.rail === "mpp" && r.state !== "paid") {
        // The method's verification is the payment and mppx cannot look a payment up: it stays pending.
        if (r.state !== "pending") {
          this.sql.exec("UPDATE signup_payment SET state = 'pending', lease_until = 0, seq = seq + 1, index_dirty = 1, updated_at = ? WHERE id = 1", now);
        }
        return { state: "unresolved", snapshot: this.snapshot(this.row()!) };
      }
      this.sql.exec("UPDATE signup_payment SET token = ?, lease_until = ? WHERE id = 1", token, lease);
      return { state: "resolve", token, snapshot: this.snapshot(this.row()!) };
    });
    if (out.state === "claimed" || (out.state === "unresolved" && this.row()?.index_dirty === 1)) await this.changed();
    return out;
  }

  /** Step 11: the payment is about to be settled (MPP: verified); recorded before any money may move. */
  async signupSettling(token: string, data: SignupSettling): Promise<boolean> {
    this.initBase();
    const ok = this.transition(token, ["claimed"], {
      state: "settling",
      idem_hash: data.idemHash,
      permit: data.permit,
      purchase: JSON.stringify(data.purchase),
      x402: data.x402 ? JSON.stringify(data.x402) : null,
      valid_before: data.x402 ? Number(data.x402.authorization.validBefore) : null,
    });
    if (ok) {
      await this.armSweep();
      await this.changed();
    }
    return ok;
  }

  /** The outcome is unknown: pending (the lease is let go; a retry or the sweep resolves it). */
  async signupPending(token: string, transaction: string | null): Promise<boolean> {
    this.initBase();
    const set: Record<string, unknown> = { state: "pending", lease_until: 0 };
    if (transaction !== null) set.tx = transaction;
    const ok = this.transition(token, ["settling", "pending"], set);
    if (ok) {
      await this.armSweep();
      await this.changed();
    }
    return ok;
  }

  /** The money moved: recorded before minting (so a retry or the sweep can finish without paying again). */
  async signupPaid(token: string, paid: SignupPaid): Promise<boolean> {
    this.initBase();
    const ok = this.transition(token, ["settling", "pending", "paid"], {
      state: "paid",
      paid: JSON.stringify(paid),
      tx: paid.rail === "x402" ? paid.reference : null,
      lease_until: Date.now() + SIGNUP_LEASE_MS,
    });
    if (ok) {
      await this.armSweep();
      await this.changed();
    }
    return ok;
  }

  /** No money moved (refused, or shown on chain never to move): the payer may try again. */
  async signupRelease(token: string, why: string): Promise<boolean> {
    this.initBase();
    // A taken payment is never released: it must still mint its key.
    const permit = this.row()?.permit ?? null;
    const ok = this.transition(token, ["claimed", "settling", "pending"], { state: "released", lease_until: 0, permit: null });
    if (ok) {
      console.log(JSON.stringify({ msg: "signup payment released", reference: this.row()?.reference, why: why.slice(0, 300) }));
      if (permit !== null) {
        // Its slot in the hourly signup budget is given back: no signup happened.
        await this.env.ADMIN.get(this.env.ADMIN.idFromName("global"))
          .releaseSignup(permit)
          .catch((e: unknown) => console.error(JSON.stringify({ msg: "signup permit release failed", error: String(e).slice(0, 300) })));
      }
      await this.changed();
    }
    return ok;
  }

  /** Gives the lease up without changing the state (the request did not touch the payment). */
  signupLetGo(token: string): void {
    this.initBase();
    this.sql.exec("UPDATE signup_payment SET lease_until = 0 WHERE id = 1 AND token = ? AND state IN ('pending', 'paid', 'settling')", token);
  }

  /**
   * Marks the payment as used for good, with what it bought. Returns the record that stands: ours,
   * or (if our claim was taken over after its lease) the one that completed first.
   */
  async signupComplete(token: string, record: SignupRecord): Promise<SignupRecord> {
    this.initBase();
    const now = Date.now();
    const out = this.ctx.storage.transactionSync(() => {
      const r = this.row();
      if (r?.state === "done") return { record: JSON.parse(r.record!) as SignupRecord, changed: false };
      if (!r || r.token !== token) console.error(JSON.stringify({ msg: "signup completed without holding the claim", reference: r?.reference }));
      this.sql.exec(
        "UPDATE signup_payment SET state = 'done', lease_until = 0, record = ?, seq = seq + 1, index_dirty = 1, updated_at = ? WHERE id = 1",
        JSON.stringify(record),
        now,
      );
      return { record, changed: true };
    });
    if (out.changed) await this.changed();
    return out.record;
  }

  signupState(): SignupStateView {
    this.initBase();
    const r = this.row();
    if (!r) return { state: "none" };
    if (r.state === "done") return { state: "done", record: JSON.parse(r.record!) as SignupRecord };
    return { state: r.state };
  }

  /** The record for operators and tests (no key material is ever in it). */
  signupSnapshot(): SignupSnapshot | null {
    this.initBase();
    const r = this.row();
    return r ? this.snapshot(r) : null;
  }

  /**
   * The sweep: a payment settling past its lease (its request died), pending, or paid but not
   * minted is resolved here with no client; while one stays unresolved the alarm fires again in
   * 30 s. A failed index copy is retried too.
   */
  protected async signupSweep(): Promise<void> {
    this.initBase();
    const r = this.row();
    if (!r) return;
    const now = Date.now();
    const open = r.state === "settling" || r.state === "pending" || r.state === "paid";
    if (open && r.lease_until > now) {
      await this.armSweep();
    } else if (open && (r.rail === "x402" || r.state === "paid")) {
      const token = crypto.randomUUID();
      this.sql.exec("UPDATE signup_payment SET token = ?, lease_until = ? WHERE id = 1", token, now + SIGNUP_LEASE_MS);
      try {
        await sweepSignup(this, this.env, token, this.snapshot(this.row()!));
      } catch (err) {
        console.error(JSON.stringify({ msg: "signup sweep failed", reference: r.reference, error: String(err).slice(0, 500) }));
      } finally {
        this.signupLetGo(token);
      }
      const after = this.row()!.state;
      if (after === "settling" || after === "pending" || after === "paid") await this.armSweep();
    } else if (r.state === "settling") {
      // An MPP payment whose request died: no lookup exists for it, it stays pending for the operator.
      if (this.transition(null, ["settling"], { state: "pending", lease_until: 0 })) await this.changed();
    }
    await this.syncIndex();
  }

  /** The alarm: the signup sweep (subclasses that override alarm() must call super.alarm()). */
  override async alarm(): Promise<void> {
    await this.signupSweep();
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
