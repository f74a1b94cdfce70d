// PaymentDO: durable payment state. One object per name, so unrelated payments never contend:
//   "claim:<challenge id>"   a charge credential is consumed here, atomically, before any work runs;
//   "credit:<token>"         a one-time credit issued after a gateway-side failure;
//   "store:<mppx key>"       mppx's atomic store (Tempo payment channels: accepted cumulative amount
//                            and spent, transaction-hash replay markers, ...), one object per key, so
//                            all updates of one channel are handled serially, by compare-and-set.
// Every method is a single synchronous SQLite transaction in a single-threaded object.
import { DurableObject } from "cloudflare:workers";

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS claims (k TEXT PRIMARY KEY, expires_at INTEGER NOT NULL, claimed_at INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS credits (token TEXT PRIMARY KEY, tool TEXT NOT NULL, expires_at INTEGER NOT NULL, redeemed_at INTEGER)`,
  `CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL, version INTEGER NOT NULL)`,
];

export class PaymentDO extends DurableObject {
  private readonly sql: SqlStorage;
  private ready = false;

  constructor(ctx: DurableObjectState, env: unknown) {
    super(ctx, env as never);
    this.sql = ctx.storage.sql;
  }

  private init(): void {
    if (this.ready) return;
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
    else if (kv === 0) {
      await this.ctx.storage.deleteAll();
      this.ready = false;
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

  // ------------------------------------------------------------ mppx atomic store (CAS)

  kvGet(key: string): { value: string | null; version: number } {
    this.init();
    const row = this.sql.exec<{ v: string; version: number }>("SELECT v, version FROM kv WHERE k = ?", key).toArray()[0];
    return row ? { value: row.v, version: row.version } : { value: null, version: 0 };
  }

  /** Sets (or deletes, with null) `key` if its version is still `expected`. */
  kvCompareAndSet(key: string, expected: number, value: string | null): boolean {
    this.init();
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
    this.init();
    const cur = this.kvGet(key);
    this.kvCompareAndSet(key, cur.version, value);
  }

  kvDelete(key: string): void {
    this.init();
    this.sql.exec("DELETE FROM kv WHERE k = ?", key);
  }
}
