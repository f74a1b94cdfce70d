// PaymentDO for the mpp target: the worker's payment object (src/lib/payment-do.ts: signup
// payments and mppx's atomic store, e.g. Tempo payment channels and transaction replay markers)
// plus, one object per name:
//   "claim:<challenge id>"   a charge credential is consumed here, atomically, before any work runs;
//   "credit:<token>"         a one-time credit issued after a gateway-side failure.
// Every method is a single synchronous SQLite transaction in a single-threaded object.
import { PaymentDO as BasePaymentDO } from "../lib/payment-do";

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS claims (k TEXT PRIMARY KEY, expires_at INTEGER NOT NULL, claimed_at INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS credits (token TEXT PRIMARY KEY, tool TEXT NOT NULL, expires_at INTEGER NOT NULL, redeemed_at INTEGER)`,
];

export class PaymentDO extends BasePaymentDO {
  private ready = false;

  private init(): void {
    if (this.ready) return;
    this.initBase();
    for (const s of SCHEMA) this.sql.exec(s);
    this.ready = true;
  }

  /**
   * Marks `key` as used until `expiresAt` (Unix ms). True exactly once per key: a second claim,
   * concurrent or later, gets false. Rows are kept at least until the challenge has expired
   * (after that the credential is refused by its expiry anyway).
   */
  claim(key: string, expiresAt: number): boolean {
    this.init();
    const now = Date.now();
    return this.ctx.storage.transactionSync(() => {
      const existing = this.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM claims WHERE k = ?", key).one();
      if (existing.n > 0) return false;
      this.sql.exec("INSERT INTO claims (k, expires_at, claimed_at) VALUES (?, ?, ?)", key, Math.max(expiresAt, now), now);
      this.scheduleCleanup(Math.max(expiresAt, now));
      return true;
    });
  }

  private scheduleCleanup(at: number): void {
    void this.ctx.storage.getAlarm().then((current) => {
      if (current === null || current > at) return this.ctx.storage.setAlarm(at);
    });
  }

  /**
   * Forgets claims and credits once they have expired: an expired challenge is refused by its
   * expiry anyway (claims are kept a minute longer than the challenge), an expired credit is void.
   * Signup records and mppx's store are never dropped.
   */
  override async alarm(): Promise<void> {
    this.init();
    const now = Date.now();
    this.sql.exec("DELETE FROM claims WHERE expires_at <= ?", now);
    this.sql.exec("DELETE FROM credits WHERE expires_at <= ?", now);
    const next = this.sql
      .exec<{ t: number | null }>("SELECT MIN(t) AS t FROM (SELECT MIN(expires_at) AS t FROM claims UNION ALL SELECT MIN(expires_at) FROM credits)")
      .one().t;
    const kv = this.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM kv").one().n;
    if (next !== null) await this.ctx.storage.setAlarm(next);
    else if (kv === 0 && !this.holdsSignupState()) {
      await this.ctx.storage.deleteAll();
      this.ready = false;
      this.resetBase();
    }
  }

  isClaimed(key: string): boolean {
    this.init();
    return this.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM claims WHERE k = ?", key).one().n > 0;
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
