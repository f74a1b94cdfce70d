// One Durable Object per API key, addressed by KEYS.idFromName(sha256hex(key)).
// It owns the key's balance, scopes, stats, rate-limit windows, refund counter, ledger, the holds
// of its paid calls and its Idempotency-Key records (contract 3.8).
// Every mutation is a single synchronous SQLite transaction inside a single-threaded object,
// so concurrent charges on one key can never overdraw it, and keys never contend with each other.
// Prices, XP awards, scopes and rate limits of the manifest's endpoints are read from the generated
// manifest HERE: callers only name the endpoint, they never pass an amount. A proxied upstream tool
// (`<NAME>/<tool>`, contract 3.12) is held on explicit terms that the gateway takes from its
// upstream table (never from a request); they can never stand for a manifest endpoint.
import { DurableObject } from "cloudflare:workers";
import { GATEWAY, PRICE_MCENTS, RATE_LIMIT_PER_MINUTE, SCOPE_FOR, TIMEOUT_MS, XP_AWARD } from "../generated/manifest";
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

/** A paid call's stored answer (Idempotency-Key replays). `body` null: too large, not stored. */
export interface StoredResponse {
  status: number;
  headers: [string, string][];
  body: ArrayBuffer | null;
}

export interface HoldOptions {
  /** The caller's Idempotency-Key (already syntax-checked) and the SHA-256 hex of the body. */
  idempotencyKey?: string;
  bodyHash?: string;
  /** The terms of a proxied upstream tool (endpoint `<NAME>/<tool>`); refused for a manifest endpoint. */
  terms?: HoldTerms;
}

/** What one hold costs and needs, for an endpoint that is not in the manifest (an upstream's tool). */
export interface HoldTerms {
  priceMcents: number;
  scope: string;
  /** The per-key rate-limit window the hold counts in (an upstream: `/mcp/<NAME>`, one window for all its tools). */
  rateKey: string;
  /** Holds per rolling minute in that window (0 = unlimited). */
  rateLimitPerMinute: number;
  /** The call's time limit; the alarm releases the hold after it + HOLD_MARGIN_MS. */
  timeoutMs: number;
}

interface ResolvedTerms extends HoldTerms {
  xp: number;
}

/** The manifest's terms for its endpoints, the given terms for an upstream tool; null when neither applies. */
function resolveTerms(endpoint: string, terms: HoldTerms | undefined): ResolvedTerms | null {
  if (isCallType(endpoint)) {
    if (terms !== undefined) return null;
    return {
      priceMcents: PRICE_MCENTS[endpoint],
      scope: SCOPE_FOR[endpoint],
      rateKey: endpoint,
      rateLimitPerMinute: RATE_LIMIT_PER_MINUTE[endpoint],
      timeoutMs: TIMEOUT_MS[endpoint],
      xp: XP_AWARD[endpoint],
    };
  }
  if (terms === undefined || !endpoint.includes("/")) return null;
  const ok =
    Number.isSafeInteger(terms.priceMcents) && terms.priceMcents >= 1 &&
    typeof terms.scope === "string" && terms.scope !== "" &&
    typeof terms.rateKey === "string" && terms.rateKey !== "" && !isCallType(terms.rateKey) &&
    Number.isSafeInteger(terms.rateLimitPerMinute) && terms.rateLimitPerMinute >= 0 &&
    Number.isSafeInteger(terms.timeoutMs) && terms.timeoutMs >= 1;
  return ok ? { ...terms, xp: 0 } : null;
}

export type HoldResult =
  | { ok: true; keyId: string; chargedMcents: number; balanceMcents: number; deadline: number }
  | { ok: false; code: "invalid_key" | "unknown_endpoint" | "scope_denied" | "idempotency_mismatch" }
  | { ok: false; code: "rate_limited" | "idempotency_in_progress"; retryAfterSeconds: number }
  | { ok: false; code: "insufficient_balance"; priceMcents: number; balanceMcents: number }
  | { ok: false; code: "replay"; originalRequestId: string; response: StoredResponse | null };

export type CaptureResult =
  | { ok: true; balanceMcents: number }
  | { ok: false; state: "released" | "unknown"; balanceMcents: number };

/**
 * Why a hold is released: the caller's failure (subject to the refund cap), or ours (never capped):
 * a timeout, the gateway, or a proxied upstream's failure (contract 3.12).
 */
export type ReleaseReason = "caller" | "timeout" | "ours" | "upstream";

export interface SettleResult {
  refunded: boolean;
  refundedMcents: number;
  balanceMcents: number;
  /** The hold's final state: released, captured (kept past the refund cap), or unknown call id. */
  state: "released" | "captured" | "unknown";
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
  /** `charge` and `refund` only appear in ledgers written before holds existed. */
  kind: "mint" | "hold" | "capture" | "release" | "charge" | "refund";
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

/** A hold not settled by its request within the endpoint's timeout + this margin is released by the alarm. */
export const HOLD_MARGIN_MS = 60_000;
/** How long an Idempotency-Key is remembered. */
export const IDEMPOTENCY_TTL_MS = 24 * HOUR_MS;
/** Settled holds are kept this long (settlement stays idempotent per call id meanwhile). */
const SETTLED_HOLD_TTL_MS = 24 * HOUR_MS;

const LEDGER_DDL = `CREATE TABLE IF NOT EXISTS ledger (
     seq INTEGER PRIMARY KEY AUTOINCREMENT,
     ts INTEGER NOT NULL,
     kind TEXT NOT NULL CHECK (kind IN ('mint', 'hold', 'capture', 'release', 'charge', 'refund')),
     endpoint TEXT,
     amount_mcents INTEGER NOT NULL,
     balance_after INTEGER NOT NULL,
     request_id TEXT NOT NULL,
     xp_delta INTEGER NOT NULL DEFAULT 0)`;

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
  LEDGER_DDL,
  `CREATE INDEX IF NOT EXISTS ledger_request ON ledger (request_id)`,
  `CREATE INDEX IF NOT EXISTS ledger_kind_ts ON ledger (kind, ts)`,
  `CREATE TABLE IF NOT EXISTS rate_events (endpoint TEXT NOT NULL, ts INTEGER NOT NULL)`,
  `CREATE INDEX IF NOT EXISTS rate_events_ep_ts ON rate_events (endpoint, ts)`,
  `CREATE TABLE IF NOT EXISTS failures (request_id TEXT PRIMARY KEY)`,
  // One row per paid call: held → captured | released, keyed by the gateway's call id.
  `CREATE TABLE IF NOT EXISTS holds (
     call_id TEXT PRIMARY KEY,
     endpoint TEXT NOT NULL,
     amount INTEGER NOT NULL,
     xp INTEGER NOT NULL,
     state TEXT NOT NULL CHECK (state IN ('held', 'captured', 'released')),
     reason TEXT,
     created_at INTEGER NOT NULL,
     deadline INTEGER NOT NULL,
     settled_at INTEGER)`,
  `CREATE INDEX IF NOT EXISTS holds_state_deadline ON holds (state, deadline)`,
  `CREATE INDEX IF NOT EXISTS holds_settled ON holds (state, reason, settled_at)`,
  // Idempotency-Key records, scoped to this key by construction (one object per key).
  `CREATE TABLE IF NOT EXISTS idempotency (
     idem_key TEXT PRIMARY KEY,
     endpoint TEXT NOT NULL,
     body_hash TEXT NOT NULL,
     call_id TEXT NOT NULL,
     state TEXT NOT NULL CHECK (state IN ('running', 'done')),
     expires_at INTEGER NOT NULL,
     status INTEGER,
     headers TEXT,
     body BLOB,
     stored INTEGER NOT NULL DEFAULT 0)`,
  `CREATE INDEX IF NOT EXISTS idempotency_call ON idempotency (call_id)`,
  `CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires_at)`,
];

type HoldRow = { call_id: string; endpoint: string; amount: number; xp: number; state: string; deadline: number };
type IdemRow = {
  endpoint: string;
  body_hash: string;
  call_id: string;
  state: string;
  expires_at: number;
  status: number | null;
  headers: string | null;
  body: ArrayBuffer | null;
  stored: number;
};

export class KeyDO extends DurableObject<AppEnv> {
  private readonly sql: SqlStorage;
  /** False for an object that was never minted: such objects never write storage. */
  private initialized: boolean;
  /** When the leaderboard report is due (null: nothing to report). */
  private reportAt: number | null = null;
  /** The alarm time this object last set (null: none set). */
  private alarmAt: number | null = null;

  constructor(ctx: DurableObjectState, env: AppEnv) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.initialized =
      this.sql.exec("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'account'").toArray().length > 0;
    if (this.initialized) {
      this.migrate();
      void ctx.blockConcurrencyWhile(async () => {
        this.alarmAt = await ctx.storage.getAlarm();
        // An alarm set by an earlier instance may carry a report: report again (harmless, rev-ordered).
        if (this.alarmAt !== null) this.reportAt = this.alarmAt;
      });
    }
  }

  /** Brings an object created by an older version to the current schema (holds, idempotency, ledger kinds). */
  private migrate(): void {
    const ledger = this.sql
      .exec<{ sql: string }>("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ledger'")
      .toArray()[0];
    this.ctx.storage.transactionSync(() => {
      if (ledger && !ledger.sql.includes("'hold'")) {
        this.sql.exec("DROP INDEX IF EXISTS ledger_request");
        this.sql.exec("DROP INDEX IF EXISTS ledger_kind_ts");
        this.sql.exec("ALTER TABLE ledger RENAME TO ledger_v1");
        this.sql.exec(LEDGER_DDL);
        this.sql.exec(
          "INSERT INTO ledger (seq, ts, kind, endpoint, amount_mcents, balance_after, request_id, xp_delta) SELECT seq, ts, kind, endpoint, amount_mcents, balance_after, request_id, xp_delta FROM ledger_v1",
        );
        this.sql.exec("DROP TABLE ledger_v1");
      }
      for (const stmt of SCHEMA) this.sql.exec(stmt);
    });
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
   * Atomically checks and holds the price of one call to `endpoint` under the gateway's call id.
   * Order: key exists → known endpoint → scope → Idempotency-Key (mismatch / in progress / replay)
   * → per-minute rate limit → balance. Nothing is written unless the hold is taken. The hold must
   * then be captured or released; the alarm releases it after the time limit + HOLD_MARGIN_MS.
   * A manifest endpoint's terms come from the manifest; an upstream tool's from `opts.terms`.
   */
  hold(endpoint: string, callId: string, opts: HoldOptions = {}): HoldResult {
    if (!this.initialized) return { ok: false, code: "invalid_key" };
    const terms = resolveTerms(endpoint, opts.terms);
    if (terms === null) return { ok: false, code: "unknown_endpoint" };
    const idemKey = opts.idempotencyKey;
    const bodyHash = opts.bodyHash ?? "";
    const now = Date.now();
    const deadline = now + terms.timeoutMs + HOLD_MARGIN_MS;
    const result = this.ctx.storage.transactionSync((): HoldResult => {
      const acct = this.account();
      if (!acct) return { ok: false, code: "invalid_key" };
      const scopes = JSON.parse(acct.scopes) as string[];
      if (!scopes.includes(terms.scope)) return { ok: false, code: "scope_denied" };

      if (idemKey !== undefined) {
        this.sql.exec("DELETE FROM idempotency WHERE idem_key = ? AND expires_at <= ?", idemKey, now);
        const prior = this.sql.exec<IdemRow>("SELECT * FROM idempotency WHERE idem_key = ?", idemKey).toArray()[0];
        if (prior) {
          if (prior.endpoint !== endpoint || prior.body_hash !== bodyHash) return { ok: false, code: "idempotency_mismatch" };
          if (prior.state === "running") {
            const h = this.sql.exec<{ deadline: number }>("SELECT deadline FROM holds WHERE call_id = ?", prior.call_id).toArray()[0];
            const waitMs = Math.min(5_000, (h?.deadline ?? now) - now);
            return { ok: false, code: "idempotency_in_progress", retryAfterSeconds: Math.max(1, Math.ceil(waitMs / 1000)) };
          }
          const response: StoredResponse | null =
            prior.stored === 1 && prior.status !== null
              ? { status: prior.status, headers: JSON.parse(prior.headers ?? "[]") as [string, string][], body: prior.body }
              : null;
          return { ok: false, code: "replay", originalRequestId: prior.call_id, response };
        }
      }

      const limit = terms.rateLimitPerMinute;
      if (limit > 0) {
        this.sql.exec("DELETE FROM rate_events WHERE endpoint = ? AND ts <= ?", terms.rateKey, now - MINUTE_MS);
        const w = this.sql
          .exec<{ n: number; oldest: number | null }>(
            "SELECT COUNT(*) AS n, MIN(ts) AS oldest FROM rate_events WHERE endpoint = ?",
            terms.rateKey,
          )
          .one();
        if (w.n >= limit) {
          const waitMs = (w.oldest ?? now) + MINUTE_MS - now;
          return { ok: false, code: "rate_limited", retryAfterSeconds: Math.max(1, Math.ceil(waitMs / 1000)) };
        }
      }

      const price = terms.priceMcents;
      if (acct.balance < price) {
        return { ok: false, code: "insufficient_balance", priceMcents: price, balanceMcents: acct.balance };
      }
      // A call id holds at most once (fail closed on a reused id).
      if (this.sql.exec("SELECT 1 FROM holds WHERE call_id = ?", callId).toArray().length > 0) {
        throw new Error("hold: call id already used");
      }
      const balance = acct.balance - price;
      const xp = terms.xp;
      this.sql.exec(
        "UPDATE account SET balance = ?, xp = xp + ?, calls = calls + 1, spent = spent + ?, rev = rev + 1 WHERE id = 1",
        balance,
        xp,
        price,
      );
      this.sql.exec(
        "INSERT INTO ledger (ts, kind, endpoint, amount_mcents, balance_after, request_id, xp_delta) VALUES (?, 'hold', ?, ?, ?, ?, ?)",
        now,
        endpoint,
        -price,
        balance,
        callId,
        xp,
      );
      this.sql.exec(
        "INSERT INTO holds (call_id, endpoint, amount, xp, state, created_at, deadline) VALUES (?, ?, ?, ?, 'held', ?, ?)",
        callId,
        endpoint,
        price,
        xp,
        now,
        deadline,
      );
      if (idemKey !== undefined) {
        this.sql.exec(
          "INSERT INTO idempotency (idem_key, endpoint, body_hash, call_id, state, expires_at) VALUES (?, ?, ?, ?, 'running', ?)",
          idemKey,
          endpoint,
          bodyHash,
          callId,
          now + IDEMPOTENCY_TTL_MS,
        );
      }
      if (limit > 0) this.sql.exec("INSERT INTO rate_events (endpoint, ts) VALUES (?, ?)", terms.rateKey, now);
      return { ok: true, keyId: acct.key_id, chargedMcents: price, balanceMcents: balance, deadline };
    });
    if (result.ok) {
      this.arm(deadline);
      this.scheduleReport();
    }
    return result;
  }

  /**
   * The call succeeded: its hold becomes final (a `capture` ledger row, amount 0) and, when the
   * call carried an Idempotency-Key, its answer is stored in the same transaction.
   * Idempotent per call id; a hold already released (past its deadline) stays released.
   */
  capture(callId: string, response?: StoredResponse): CaptureResult {
    if (!this.initialized) return { ok: false, state: "unknown", balanceMcents: 0 };
    const now = Date.now();
    const result = this.ctx.storage.transactionSync((): CaptureResult => {
      const acct = this.account();
      const balance = acct?.balance ?? 0;
      const h = this.sql.exec<HoldRow>("SELECT * FROM holds WHERE call_id = ?", callId).toArray()[0];
      if (!acct || !h) return { ok: false, state: "unknown", balanceMcents: balance };
      if (h.state === "captured") return { ok: true, balanceMcents: balance };
      if (h.state === "released") return { ok: false, state: "released", balanceMcents: balance };
      this.sql.exec("UPDATE holds SET state = 'captured', reason = 'success', settled_at = ? WHERE call_id = ?", now, callId);
      this.sql.exec(
        "INSERT INTO ledger (ts, kind, endpoint, amount_mcents, balance_after, request_id) VALUES (?, 'capture', ?, 0, ?, ?)",
        now,
        h.endpoint,
        balance,
        callId,
      );
      if (response !== undefined) {
        const stored = response.body !== null;
        this.sql.exec(
          "UPDATE idempotency SET state = 'done', status = ?, headers = ?, body = ?, stored = ? WHERE call_id = ?",
          stored ? response.status : null,
          stored ? JSON.stringify(response.headers) : null,
          response.body,
          stored ? 1 : 0,
          callId,
        );
      } else {
        // No answer to keep: the Idempotency-Key (if any) is done without a stored body.
        this.sql.exec("UPDATE idempotency SET state = 'done', stored = 0 WHERE call_id = ?", callId);
      }
      return { ok: true, balanceMcents: balance };
    });
    // Stored answers are forgotten by the alarm once they expire.
    const expiry = this.nextIdempotencyExpiry();
    if (result.ok && expiry !== null) this.arm(expiry);
    return result;
  }

  /**
   * The call failed: its XP and call count are taken back and its hold is released (a `release`
   * ledger row, +price). A `caller` failure is released only while the key had fewer than
   * GATEWAY.refundsPerKeyPerHour caller-failure releases in the last rolling hour; past that the
   * hold is captured (the charge stands). `timeout`, `ours` and `upstream` are always released and not counted.
   * The Idempotency-Key of a failed call is freed (a retry runs again). Idempotent per call id.
   */
  release(callId: string, reason: ReleaseReason): SettleResult {
    if (!this.initialized) return { refunded: false, refundedMcents: 0, balanceMcents: 0, state: "unknown" };
    const result = this.ctx.storage.transactionSync(() => this.releaseTx(callId, reason, Date.now()));
    this.scheduleReport();
    return result;
  }

  private releaseTx(callId: string, reason: ReleaseReason | "expired", now: number): SettleResult {
    const acct = this.account();
    const h = this.sql.exec<HoldRow>("SELECT * FROM holds WHERE call_id = ?", callId).toArray()[0];
    if (!acct || !h) return { refunded: false, refundedMcents: 0, balanceMcents: acct?.balance ?? 0, state: "unknown" };
    if (h.state === "captured") return { refunded: false, refundedMcents: 0, balanceMcents: acct.balance, state: "captured" };
    if (h.state === "released") return { refunded: true, refundedMcents: h.amount, balanceMcents: acct.balance, state: "released" };
    this.sql.exec("DELETE FROM idempotency WHERE call_id = ?", callId);
    this.sql.exec(
      "UPDATE account SET xp = MAX(0, xp - ?), calls = MAX(0, calls - 1), rev = rev + 1 WHERE id = 1",
      h.xp,
    );
    if (reason === "caller") {
      const recent =
        this.sql
          .exec<{ n: number }>(
            "SELECT COUNT(*) AS n FROM holds WHERE state = 'released' AND reason = 'caller' AND settled_at > ?",
            now - HOUR_MS,
          )
          .one().n +
        this.sql.exec<{ n: number }>("SELECT COUNT(*) AS n FROM ledger WHERE kind = 'refund' AND ts > ?", now - HOUR_MS).one().n;
      if (recent >= GATEWAY.refundsPerKeyPerHour) {
        this.sql.exec("UPDATE holds SET state = 'captured', reason = 'kept', settled_at = ? WHERE call_id = ?", now, callId);
        this.sql.exec(
          "INSERT INTO ledger (ts, kind, endpoint, amount_mcents, balance_after, request_id) VALUES (?, 'capture', ?, 0, ?, ?)",
          now,
          h.endpoint,
          acct.balance,
          callId,
        );
        return { refunded: false, refundedMcents: 0, balanceMcents: acct.balance, state: "captured" };
      }
    }
    const balance = acct.balance + h.amount;
    this.sql.exec(
      "UPDATE account SET balance = ?, refunded = refunded + ?, spent = spent - ? WHERE id = 1",
      balance,
      h.amount,
      h.amount,
    );
    this.sql.exec("UPDATE holds SET state = 'released', reason = ?, settled_at = ? WHERE call_id = ?", reason, now, callId);
    this.sql.exec(
      "INSERT INTO ledger (ts, kind, endpoint, amount_mcents, balance_after, request_id) VALUES (?, 'release', ?, ?, ?, ?)",
      now,
      h.endpoint,
      h.amount,
      balance,
      callId,
    );
    return { refunded: true, refundedMcents: h.amount, balanceMcents: balance, state: "released" };
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

  /**
   * Newest-first ledger entries with `seq < before` (all when `before` is null), at most `limit`
   * (1..500), and the cursor of the next page (null when there is none). Null if this object holds no key.
   */
  ledgerPage(limit: number, before: number | null = null): { entries: LedgerEntry[]; nextBefore: number | null } | null {
    if (!this.initialized) return null;
    const n = Math.min(Math.max(1, Math.trunc(limit)), 500);
    const cursor = before === null ? Number.MAX_SAFE_INTEGER : before;
    const rows = this.sql
      .exec<{ [K in keyof LedgerEntry]: LedgerEntry[K] }>(
        "SELECT seq, ts, kind, endpoint, amount_mcents, balance_after, request_id FROM ledger WHERE seq < ? ORDER BY seq DESC LIMIT ?",
        cursor,
        n + 1,
      )
      .toArray();
    const more = rows.length > n;
    const entries = rows.slice(0, n);
    return { entries, nextBefore: more ? entries[entries.length - 1]!.seq : null };
  }

  /** Newest-first ledger entries (the first page), or null if this object holds no key. */
  ledger(limit: number): LedgerEntry[] | null {
    return this.ledgerPage(limit)?.entries ?? null;
  }

  private nextIdempotencyExpiry(): number | null {
    return this.sql.exec<{ t: number | null }>("SELECT MIN(expires_at) AS t FROM idempotency").one().t;
  }

  /** Makes sure the alarm fires no later than `at`. */
  private arm(at: number): void {
    if (this.alarmAt !== null && this.alarmAt <= at) return;
    this.alarmAt = at;
    // Not awaited: the write is ordered by the output gate.
    void this.ctx.storage.setAlarm(at);
  }

  private scheduleReport(): void {
    if (this.reportAt !== null) return;
    this.reportAt = Date.now() + REPORT_DELAY_MS;
    this.arm(this.reportAt);
  }

  /**
   * The sweeper: releases every hold past its deadline (its request died or never settled it; in
   * full, never capped), forgets expired Idempotency-Keys and old settled holds, then reports this
   * key's public stats to the leaderboard (batching all changes since the last report) and sets
   * the next alarm.
   */
  override async alarm(): Promise<void> {
    this.alarmAt = null;
    if (!this.initialized) return;
    const now = Date.now();
    const expired = this.sql
      .exec<{ call_id: string }>("SELECT call_id FROM holds WHERE state = 'held' AND deadline <= ?", now)
      .toArray();
    this.ctx.storage.transactionSync(() => {
      for (const h of expired) this.releaseTx(h.call_id, "expired", now);
      this.sql.exec("DELETE FROM idempotency WHERE expires_at <= ?", now);
      this.sql.exec("DELETE FROM holds WHERE state != 'held' AND settled_at <= ?", now - SETTLED_HOLD_TTL_MS);
    });
    if (expired.length > 0) {
      console.error(JSON.stringify({ msg: "released expired holds", count: expired.length }));
      if (this.reportAt === null) this.reportAt = now;
    }
    // Any alarm run reports pending changes (an early report is harmless: reports are rev-ordered).
    if (this.reportAt !== null) {
      const a = this.account();
      this.reportAt = null;
      if (a) {
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
          console.error(JSON.stringify({ msg: "leaderboard report failed", error: String(err) }));
          if (this.reportAt === null) this.reportAt = Date.now() + REPORT_DELAY_MS;
        }
      }
    }
    const next = [
      this.reportAt,
      this.sql.exec<{ t: number | null }>("SELECT MIN(deadline) AS t FROM holds WHERE state = 'held'").one().t,
      this.nextIdempotencyExpiry(),
    ].filter((t): t is number => t !== null);
    if (next.length > 0) this.arm(Math.max(Math.min(...next), Date.now() + 1));
  }
}
