// One Durable Object per API key, addressed by KEYS.idFromName(sha256hex(key)).
// It owns the key's balance, scopes, stats, rate-limit windows, refund counter and ledger.
// Every mutation is a single synchronous SQLite transaction inside a single-threaded object,
// so concurrent charges on one key can never overdraw it, and keys never contend with each other.
// Prices, XP awards, scopes and rate limits are read from the generated manifest HERE: callers
// only name the endpoint, they never pass an amount.
import { DurableObject } from "cloudflare:workers";
import { GATEWAY, PRICE_MCENTS, RATE_LIMIT_PER_MINUTE, SCOPE_FOR, XP_AWARD } from "../generated/manifest";
import type { AppEnv } from "./env";
import { badgesFor, levelFor } from "./levels";
import { isCallType, isScope } from "./manifest-util";
import type { LeaderboardReport } from "./leaderboard-do";

const MINUTE_MS = 60_000;
const HOUR_MS = 3_600_000;
/** Delay between the first change and the (batched) leaderboard report. */
export const REPORT_DELAY_MS = 5_000;

export interface InitArgs {
  keyId: string;
  name: string | null;
  balanceMcents: number;
  scopes: string[];
  requestId: string;
}

export type ChargeResult =
  | { ok: true; keyId: string; chargedMcents: number; balanceMcents: number }
  | { ok: false; code: "invalid_key" | "unknown_endpoint" | "scope_denied" }
  | { ok: false; code: "rate_limited"; retryAfterSeconds: number }
  | { ok: false; code: "insufficient_balance"; priceMcents: number; balanceMcents: number };

export interface SettleResult {
  refunded: boolean;
  refundedMcents: number;
  balanceMcents: number;
}

export interface KeyStats {
  keyId: string;
  name: string | null;
  balanceMcents: number;
  scopes: string[];
  xp: number;
  level: number;
  badges: string[];
  calls: number;
  spentMcents: number;
  refundedMcents: number;
}

export interface LedgerEntry {
  seq: number;
  ts: number;
  kind: "mint" | "charge" | "refund";
  endpoint: string | null;
  amount_mcents: number;
  balance_after: number;
  request_id: string;
}

type AccountRow = {
  key_id: string;
  name: string | null;
  balance: number;
  scopes: string;
  xp: number;
  calls: number;
  spent: number;
  refunded: number;
  rev: number;
};

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS account (
     id INTEGER PRIMARY KEY CHECK (id = 1),
     key_id TEXT NOT NULL,
     name TEXT,
     balance INTEGER NOT NULL CHECK (balance >= 0),
     scopes TEXT NOT NULL,
     xp INTEGER NOT NULL DEFAULT 0,
     calls INTEGER NOT NULL DEFAULT 0,
     spent INTEGER NOT NULL DEFAULT 0,
     refunded INTEGER NOT NULL DEFAULT 0,
     rev INTEGER NOT NULL DEFAULT 0,
     created_at INTEGER NOT NULL)`,
  `CREATE TABLE IF NOT EXISTS ledger (
     seq INTEGER PRIMARY KEY AUTOINCREMENT,
     ts INTEGER NOT NULL,
     kind TEXT NOT NULL CHECK (kind IN ('mint', 'charge', 'refund')),
     endpoint TEXT,
     amount_mcents INTEGER NOT NULL,
     balance_after INTEGER NOT NULL,
     request_id TEXT NOT NULL,
     xp_delta INTEGER NOT NULL DEFAULT 0)`,
  `CREATE INDEX IF NOT EXISTS ledger_request ON ledger (request_id)`,
  `CREATE INDEX IF NOT EXISTS ledger_kind_ts ON ledger (kind, ts)`,
  `CREATE TABLE IF NOT EXISTS rate_events (endpoint TEXT NOT NULL, ts INTEGER NOT NULL)`,
  `CREATE INDEX IF NOT EXISTS rate_events_ep_ts ON rate_events (endpoint, ts)`,
  `CREATE TABLE IF NOT EXISTS failures (request_id TEXT PRIMARY KEY)`,
];

export class KeyDO extends DurableObject<AppEnv> {
  private readonly sql: SqlStorage;
  /** False for an object that was never minted: such objects never write storage. */
  private initialized: boolean;
  private reportPending = false;

  constructor(ctx: DurableObjectState, env: AppEnv) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.initialized =
      this.sql.exec("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'account'").toArray().length > 0;
    if (this.initialized) {
      void ctx.blockConcurrencyWhile(async () => {
        this.reportPending = (await ctx.storage.getAlarm()) !== null;
      });
    }
  }

  private account(): AccountRow | null {
    const rows = this.sql
      .exec<AccountRow>("SELECT key_id, name, balance, scopes, xp, calls, spent, refunded, rev FROM account WHERE id = 1")
      .toArray();
    return rows[0] ?? null;
  }

  /** Creates the key. Fails if this object already holds a key (never overwrites). */
  init(args: InitArgs): { ok: boolean } {
    if (this.initialized) return { ok: false };
    const balance = args.balanceMcents;
    if (!Number.isSafeInteger(balance) || balance < 0 || !args.scopes.every(isScope)) return { ok: false };
    const now = Date.now();
    this.ctx.storage.transactionSync(() => {
      for (const stmt of SCHEMA) this.sql.exec(stmt);
      this.sql.exec(
        "INSERT INTO account (id, key_id, name, balance, scopes, created_at) VALUES (1, ?, ?, ?, ?, ?)",
        args.keyId,
        args.name,
        balance,
        JSON.stringify(args.scopes),
        now,
      );
      this.sql.exec(
        "INSERT INTO ledger (ts, kind, endpoint, amount_mcents, balance_after, request_id) VALUES (?, 'mint', NULL, ?, ?, ?)",
        now,
        balance,
        balance,
        args.requestId,
      );
    });
    this.initialized = true;
    return { ok: true };
  }

  /**
   * Creates the key once: minting into an object that already holds a key (a signup retried with
   * the same derived key) returns the existing key's public record and credits nothing.
   * Null when the arguments are refused.
   */
  initOnce(args: InitArgs): { created: boolean; keyId: string; name: string | null } | null {
    if (this.initialized) {
      const a = this.account();
      return a ? { created: false, keyId: a.key_id, name: a.name } : null;
    }
    return this.init(args).ok ? { created: true, keyId: args.keyId, name: args.name } : null;
  }

  /**
   * Atomically checks and charges one call to `endpoint`. Order: key exists → known endpoint →
   * scope → per-minute rate limit → balance. Nothing is written unless the charge succeeds.
   */
  charge(endpoint: string, requestId: string): ChargeResult {
    if (!this.initialized) return { ok: false, code: "invalid_key" };
    if (!isCallType(endpoint)) return { ok: false, code: "unknown_endpoint" };
    const now = Date.now();
    const result = this.ctx.storage.transactionSync((): ChargeResult => {
      const acct = this.account();
      if (!acct) return { ok: false, code: "invalid_key" };
      const scopes = JSON.parse(acct.scopes) as string[];
      if (!scopes.includes(SCOPE_FOR[endpoint])) return { ok: false, code: "scope_denied" };

      const limit = RATE_LIMIT_PER_MINUTE[endpoint];
      if (limit > 0) {
        this.sql.exec("DELETE FROM rate_events WHERE endpoint = ? AND ts <= ?", endpoint, now - MINUTE_MS);
        const w = this.sql
          .exec<{ n: number; oldest: number | null }>(
            "SELECT COUNT(*) AS n, MIN(ts) AS oldest FROM rate_events WHERE endpoint = ?",
            endpoint,
          )
          .one();
        if (w.n >= limit) {
          const waitMs = (w.oldest ?? now) + MINUTE_MS - now;
          return { ok: false, code: "rate_limited", retryAfterSeconds: Math.max(1, Math.ceil(waitMs / 1000)) };
        }
      }

      const price = PRICE_MCENTS[endpoint];
      if (acct.balance < price) {
        return { ok: false, code: "insufficient_balance", priceMcents: price, balanceMcents: acct.balance };
      }
      const balance = acct.balance - price;
      const xp = XP_AWARD[endpoint];
      this.sql.exec(
        "UPDATE account SET balance = ?, xp = xp + ?, calls = calls + 1, spent = spent + ?, rev = rev + 1 WHERE id = 1",
        balance,
        xp,
        price,
      );
      this.sql.exec(
        "INSERT INTO ledger (ts, kind, endpoint, amount_mcents, balance_after, request_id, xp_delta) VALUES (?, 'charge', ?, ?, ?, ?, ?)",
        now,
        endpoint,
        -price,
        balance,
        requestId,
        xp,
      );
      if (limit > 0) this.sql.exec("INSERT INTO rate_events (endpoint, ts) VALUES (?, ?)", endpoint, now);
      return { ok: true, keyId: acct.key_id, chargedMcents: price, balanceMcents: balance };
    });
    if (result.ok) this.scheduleReport();
    return result;
  }

  /**
   * Called when the handler of a charged call failed. The call's XP and call count are taken
   * back; its charge is refunded unless the key already had GATEWAY.refundsPerKeyPerHour
   * refunds in the last rolling hour. The amount comes from this key's own ledger.
   * Idempotent per request id.
   */
  settleFailure(requestId: string): SettleResult {
    if (!this.initialized) return { refunded: false, refundedMcents: 0, balanceMcents: 0 };
    const now = Date.now();
    const result = this.ctx.storage.transactionSync((): SettleResult => {
      const acct = this.account();
      if (!acct) return { refunded: false, refundedMcents: 0, balanceMcents: 0 };
      const charges = this.sql
        .exec<{ endpoint: string; amount_mcents: number; xp_delta: number }>(
          "SELECT endpoint, amount_mcents, xp_delta FROM ledger WHERE request_id = ? AND kind = 'charge'",
          requestId,
        )
        .toArray();
      // Exactly one charge per settlement id; anything else is not ours to refund (fail closed).
      const charge = charges.length === 1 ? charges[0] : undefined;
      const settled =
        this.sql.exec("SELECT 1 FROM failures WHERE request_id = ?", requestId).toArray().length > 0;
      if (!charge || settled) return { refunded: false, refundedMcents: 0, balanceMcents: acct.balance };
      this.sql.exec("INSERT INTO failures (request_id) VALUES (?)", requestId);
      this.sql.exec(
        "UPDATE account SET xp = MAX(0, xp - ?), calls = MAX(0, calls - 1), rev = rev + 1 WHERE id = 1",
        charge.xp_delta,
      );
      const amount = -charge.amount_mcents;
      const recent = this.sql
        .exec<{ n: number }>("SELECT COUNT(*) AS n FROM ledger WHERE kind = 'refund' AND ts > ?", now - HOUR_MS)
        .one().n;
      if (amount <= 0 || recent >= GATEWAY.refundsPerKeyPerHour) {
        return { refunded: false, refundedMcents: 0, balanceMcents: acct.balance };
      }
      const balance = acct.balance + amount;
      this.sql.exec(
        "UPDATE account SET balance = ?, refunded = refunded + ?, spent = spent - ? WHERE id = 1",
        balance,
        amount,
        amount,
      );
      this.sql.exec(
        "INSERT INTO ledger (ts, kind, endpoint, amount_mcents, balance_after, request_id) VALUES (?, 'refund', ?, ?, ?, ?)",
        now,
        charge.endpoint,
        amount,
        balance,
        requestId,
      );
      return { refunded: true, refundedMcents: amount, balanceMcents: balance };
    });
    this.scheduleReport();
    return result;
  }

  /** The key's public stats, or null if this object holds no key. */
  stats(): KeyStats | null {
    if (!this.initialized) return null;
    const a = this.account();
    if (!a) return null;
    return {
      keyId: a.key_id,
      name: a.name,
      balanceMcents: a.balance,
      scopes: JSON.parse(a.scopes) as string[],
      xp: a.xp,
      level: levelFor(a.xp),
      badges: badgesFor({ calls: a.calls, spentMcents: a.spent }),
      calls: a.calls,
      spentMcents: a.spent,
      refundedMcents: a.refunded,
    };
  }

  /** Newest-first ledger entries, or null if this object holds no key. */
  ledger(limit: number): LedgerEntry[] | null {
    if (!this.initialized) return null;
    const n = Math.min(Math.max(1, Math.trunc(limit)), 500);
    return this.sql
      .exec<{ [K in keyof LedgerEntry]: LedgerEntry[K] }>(
        "SELECT seq, ts, kind, endpoint, amount_mcents, balance_after, request_id FROM ledger ORDER BY seq DESC LIMIT ?",
        n,
      )
      .toArray();
  }

  private scheduleReport(): void {
    if (this.reportPending) return;
    this.reportPending = true;
    // Not awaited by the paid request: the write is ordered by the output gate.
    void this.ctx.storage.setAlarm(Date.now() + REPORT_DELAY_MS);
  }

  /** Reports this key's public stats to the leaderboard, batching all changes since the last report. */
  override async alarm(): Promise<void> {
    this.reportPending = false;
    const a = this.account();
    if (!a) return;
    const report: LeaderboardReport = {
      key_id: a.key_id,
      name: a.name,
      xp: a.xp,
      level: levelFor(a.xp),
      badges: badgesFor({ calls: a.calls, spentMcents: a.spent }),
      calls: a.calls,
      rev: a.rev,
    };
    try {
      const lb = this.env.LEADERBOARD.get(this.env.LEADERBOARD.idFromName("global"));
      await lb.report([report]);
    } catch (err) {
      this.reportPending = true; // the runtime retries a failed alarm
      throw err;
    }
  }
}
