// A single small object holding the gateway-wide hourly budgets (rolling hour), each in its own
// table so they never share a budget:
//   mints    admin mints (POST /v1/admin/mint), GATEWAY.mintsPerHour;
//   signups  pay-to-mint signups (POST /v1/signup), [signup] signups_per_hour.
// It also keeps the index of signup payments for GET /v1/admin/payments: each PaymentDO upserts its
// row on every state change (reference, rail, state, transaction, key_id, times; never a key, key
// hash, Idempotency-Key or signature).
import { DurableObject } from "cloudflare:workers";
import { GATEWAY } from "../generated/manifest";
import type { AppEnv } from "./env";
import type { PaymentIndexRow, PaymentState } from "./payment-do";

const HOUR_MS = 3_600_000;

export type MintPermit = { ok: true } | { ok: false; retryAfterSeconds: number };
/** A signup permit names its slot in the budget, so a signup whose payment then fails gives it back. */
export type SignupPermit = { ok: true; permit: number } | { ok: false; retryAfterSeconds: number };

type Bucket = "mints" | "signups";

export class AdminDO extends DurableObject<AppEnv> {
  private readonly sql: SqlStorage;

  constructor(ctx: DurableObjectState, env: AppEnv) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec("CREATE TABLE IF NOT EXISTS mints (ts INTEGER NOT NULL)");
    this.sql.exec("CREATE INDEX IF NOT EXISTS mints_ts ON mints (ts)");
    this.sql.exec("CREATE TABLE IF NOT EXISTS signups (id INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL)");
    this.sql.exec("CREATE INDEX IF NOT EXISTS signups_ts ON signups (ts)");
    this.sql.exec(`CREATE TABLE IF NOT EXISTS payments (
      reference TEXT PRIMARY KEY, rail TEXT NOT NULL, state TEXT NOT NULL, tx TEXT, key_id TEXT,
      created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, seq INTEGER NOT NULL)`);
    this.sql.exec("CREATE INDEX IF NOT EXISTS payments_updated ON payments (updated_at)");
    this.sql.exec("CREATE INDEX IF NOT EXISTS payments_state ON payments (state, updated_at)");
  }

  /** A signup payment's row, newer (by its object's sequence number) than the one held. */
  upsertPayment(row: PaymentIndexRow): void {
    this.sql.exec(
      `INSERT INTO payments (reference, rail, state, tx, key_id, created_at, updated_at, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (reference) DO UPDATE SET rail = excluded.rail, state = excluded.state, tx = excluded.tx, key_id = excluded.key_id,
         created_at = excluded.created_at, updated_at = excluded.updated_at, seq = excluded.seq
       WHERE excluded.seq > payments.seq`,
      row.reference,
      row.rail,
      row.state,
      row.transaction,
      row.key_id,
      row.created_at,
      row.updated_at,
      row.seq,
    );
  }

  /** The newest `limit` signup payments (in `state`, or all), newest update first. */
  listPayments(state: PaymentState | "all", limit: number): Array<Omit<PaymentIndexRow, "seq">> {
    type R = { reference: string; rail: PaymentIndexRow["rail"]; state: PaymentState; tx: string | null; key_id: string | null; created_at: number; updated_at: number };
    const q = "SELECT reference, rail, state, tx, key_id, created_at, updated_at FROM payments";
    const rows =
      state === "all"
        ? this.sql.exec<R>(`${q} ORDER BY updated_at DESC, reference LIMIT ?`, limit).toArray()
        : this.sql.exec<R>(`${q} WHERE state = ? ORDER BY updated_at DESC, reference LIMIT ?`, state, limit).toArray();
    return rows.map((r) => ({
      reference: r.reference,
      rail: r.rail,
      state: r.state,
      transaction: r.tx,
      key_id: r.key_id,
      created_at: r.created_at,
      updated_at: r.updated_at,
    }));
  }

  /** Takes one slot of `bucket` (at most `limit` per rolling hour): the new row id, or how long to wait. */
  private acquire(bucket: Bucket, limit: number): { ok: true; id: number } | { ok: false; retryAfterSeconds: number } {
    const now = Date.now();
    return this.ctx.storage.transactionSync(() => {
      this.sql.exec(`DELETE FROM ${bucket} WHERE ts <= ?`, now - HOUR_MS);
      const w = this.sql
        .exec<{ n: number; oldest: number | null }>(`SELECT COUNT(*) AS n, MIN(ts) AS oldest FROM ${bucket}`)
        .one();
      if (w.n >= limit) {
        const waitMs = (w.oldest ?? now) + HOUR_MS - now;
        return { ok: false as const, retryAfterSeconds: Math.max(1, Math.ceil(waitMs / 1000)) };
      }
      const id = this.sql.exec<{ id: number }>(`INSERT INTO ${bucket} (ts) VALUES (?) RETURNING rowid AS id`, now).one().id;
      return { ok: true as const, id };
    });
  }

  /** Consumes one mint from the hourly budget, or says how long to wait. */
  acquireMint(): MintPermit {
    const r = this.acquire("mints", GATEWAY.mintsPerHour);
    return r.ok ? { ok: true } : r;
  }

  /** Consumes one signup from its own hourly budget (`limit` = [signup] signups_per_hour). */
  acquireSignup(limit: number): SignupPermit {
    const r = this.acquire("signups", limit);
    return r.ok ? { ok: true, permit: r.id } : r;
  }

  /** Gives a signup slot back: its payment was refused, so no signup happened. */
  releaseSignup(permit: number): void {
    this.sql.exec("DELETE FROM signups WHERE id = ?", permit);
  }
}
