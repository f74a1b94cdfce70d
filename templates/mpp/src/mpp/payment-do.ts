// PaymentDO for the mpp target: the worker's payment object (src/lib/payment-do.ts: signup
// payments and mppx's atomic store, e.g. Tempo payment channels and transaction replay markers)
// plus, one object per name:
//   "claim:<challenge id>"   the claim of one charge challenge, taken atomically BEFORE the payment
//                            method's verification runs (which is what takes the money);
//   "credit:<token>"         a one-time credit issued after a gateway-side failure.
// Every method is a single synchronous SQLite transaction in a single-threaded object.
//
// A challenge claim moves through:
//   claimed  a request holds it while the method verifies (a lease of CLAIM_LEASE_MS);
//            a second payment for the challenge is refused before its method runs;
//   (none)   the method refused the payment: the claim is released, the challenge may be paid again;
//   used     the method took the payment: the challenge paid for exactly one run, for good;
//   pending  the method failed without a refusal (outcome unknown): kept, never claimable again,
//            logged with its reference for the operator.
// A claim whose request died (its lease ran out while still `claimed`) may be taken by the next
// payment for the challenge. Rows are kept until the challenge has expired (a minute longer), after
// which the credential is refused by its expiry anyway.
import { PaymentDO as BasePaymentDO } from "../lib/payment-do";

/**
 * How long one request may hold a challenge claim while the payment method verifies. Longer than
 * any method verification takes; a claim older than this whose request died is taken over.
 */
export const CLAIM_LEASE_MS = 60_000;

export type ClaimState = "claimed" | "used" | "pending";

export type ClaimResult = { ok: true; token: string } | { ok: false; state: ClaimState; retryAfterMs: number };

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS challenge_claims (
     k TEXT PRIMARY KEY,
     state TEXT NOT NULL CHECK (state IN ('claimed', 'used', 'pending')),
     token TEXT NOT NULL,
     lease_until INTEGER NOT NULL,
     expires_at INTEGER NOT NULL,
     reference TEXT,
     updated_at INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS credits (token TEXT PRIMARY KEY, tool TEXT NOT NULL, expires_at INTEGER NOT NULL, redeemed_at INTEGER)`,
];

type ClaimRow = { state: ClaimState; token: string; lease_until: number; expires_at: number; reference: string | null };

export class PaymentDO extends BasePaymentDO {
  private ready = false;

  private init(): void {
    if (this.ready) return;
    this.initBase();
    for (const s of SCHEMA) this.sql.exec(s);
    this.ready = true;
  }

  private claimRow(key: string): ClaimRow | undefined {
    return this.sql
      .exec<ClaimRow>("SELECT state, token, lease_until, expires_at, reference FROM challenge_claims WHERE k = ?", key)
      .toArray()[0];
  }

  /**
   * Claims challenge `key` for one request until the method has verified, kept at least until
   * `expiresAt` (Unix ms). Exactly one request holds a claim at a time: a second claim, concurrent
   * or later, is refused while the first is live, and for good once the challenge was used or its
   * outcome is pending. A `claimed` row whose lease ran out (its request died) is taken over.
   */
  claimChallenge(key: string, expiresAt: number): ClaimResult {
    this.init();
    const now = Date.now();
    return this.ctx.storage.transactionSync((): ClaimResult => {
      const row = this.claimRow(key);
      if (row && (row.state !== "claimed" || row.lease_until > now)) {
        return { ok: false, state: row.state, retryAfterMs: row.state === "claimed" ? row.lease_until - now : 0 };
      }
      const token = crypto.randomUUID();
      const keep = Math.max(expiresAt, now + CLAIM_LEASE_MS);
      this.sql.exec(
        `INSERT INTO challenge_claims (k, state, token, lease_until, expires_at, updated_at) VALUES (?, 'claimed', ?, ?, ?, ?)
         ON CONFLICT (k) DO UPDATE SET state = 'claimed', token = excluded.token, lease_until = excluded.lease_until,
           expires_at = MAX(expires_at, excluded.expires_at), updated_at = excluded.updated_at`,
        key,
        token,
        now + CLAIM_LEASE_MS,
        keep,
        now,
      );
      this.scheduleCleanup(keep);
      return { ok: true, token };
    });
  }

  /** The method refused the payment: the holder gives its claim up, the challenge may be paid again. */
  releaseChallenge(key: string, token: string): boolean {
    this.init();
    return this.ctx.storage.transactionSync(() => {
      const row = this.claimRow(key);
      if (!row || row.state !== "claimed" || row.token !== token) return false;
      this.sql.exec("DELETE FROM challenge_claims WHERE k = ?", key);
      return true;
    });
  }

  /**
   * The method took the payment (`used`) or failed without a refusal (`pending`: the outcome is
   * unknown). Both are final: the challenge is never claimable again. False when the claim is not
   * held by `token` any more (its lease ran out and another request took it).
   */
  settleChallenge(key: string, token: string, state: "used" | "pending", reference: string | null): boolean {
    this.init();
    return this.ctx.storage.transactionSync(() => {
      const row = this.claimRow(key);
      if (!row || row.state !== "claimed" || row.token !== token) return false;
      this.sql.exec("UPDATE challenge_claims SET state = ?, reference = ?, updated_at = ? WHERE k = ?", state, reference, Date.now(), key);
      return true;
    });
  }

  /** The claim's state (null: never claimed, or released). */
  challengeState(key: string): { state: ClaimState; reference: string | null } | null {
    this.init();
    const row = this.claimRow(key);
    return row ? { state: row.state, reference: row.reference } : null;
  }

  private scheduleCleanup(at: number): void {
    void this.ctx.storage.getAlarm().then((current) => {
      if (current === null || current > at) return this.ctx.storage.setAlarm(at);
    });
  }

  /**
   * Forgets claims and credits once they have expired: an expired challenge is refused by its
   * expiry anyway (claims are kept a minute longer than the challenge), an expired credit is void.
   * Signup records and mppx's store are never dropped (the base object's own alarm runs first).
   */
  override async alarm(): Promise<void> {
    await super.alarm();
    this.init();
    const now = Date.now();
    this.sql.exec("DELETE FROM challenge_claims WHERE expires_at <= ?", now);
    this.sql.exec("DELETE FROM credits WHERE expires_at <= ?", now);
    const next = this.sql
      .exec<{ t: number | null }>(
        "SELECT MIN(t) AS t FROM (SELECT MIN(expires_at) AS t FROM challenge_claims UNION ALL SELECT MIN(expires_at) FROM credits)",
      )
      .one().t;
    const kv = this.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM kv").one().n;
    if (next !== null) {
      const current = await this.ctx.storage.getAlarm();
      if (current === null || current > next) await this.ctx.storage.setAlarm(next);
    } else if (kv === 0 && !this.holdsSignupState() && (await this.ctx.storage.getAlarm()) === null) {
      await this.ctx.storage.deleteAll();
      this.ready = false;
      this.resetBase();
    }
  }

  /** Records a one-time credit for `tool`. */
  issueCredit(token: string, tool: string, expiresAt: number): void {
    this.init();
    this.sql.exec("INSERT OR IGNORE INTO credits (token, tool, expires_at) VALUES (?, ?, ?)", token, tool, expiresAt);
    this.scheduleCleanup(expiresAt);
  }

  /** Redeems a credit once: true only for an unexpired, unredeemed credit issued for `tool`. */
  redeemCredit(token: string, tool: string): boolean {
    this.init();
    const now = Date.now();
    return this.ctx.storage.transactionSync(() => {
      const row = this.sql
        .exec<{ tool: string; expires_at: number; redeemed_at: number | null }>(
          "SELECT tool, expires_at, redeemed_at FROM credits WHERE token = ?",
          token,
        )
        .toArray()[0];
      if (!row || row.redeemed_at !== null || row.expires_at < now || row.tool !== tool) return false;
      this.sql.exec("UPDATE credits SET redeemed_at = ? WHERE token = ?", now, token);
      return true;
    });
  }
}
