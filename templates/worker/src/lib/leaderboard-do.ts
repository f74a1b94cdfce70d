// The global XP leaderboard. Off the paid hot path: key objects report their public stats to it
// from an alarm a few seconds after a change (batched), never while a paid request waits.
// It only ever sees public data: key_id, name, xp, level, badges, calls.
import { DurableObject } from "cloudflare:workers";
import type { AppEnv } from "./env";

export interface LeaderboardReport {
  key_id: string;
  name: string | null;
  xp: number;
  level: number;
  badges: string[];
  calls: number;
  /** Monotonic revision from the key object: stale reports never overwrite newer ones. */
  rev: number;
}

export type LeaderboardEntry = Omit<LeaderboardReport, "rev"> & { rank: number };

const KEY_ID = /^k_[0-9a-f]{16}$/;
const MAX_BATCH = 1000;

function validReport(r: LeaderboardReport): boolean {
  return (
    typeof r === "object" &&
    r !== null &&
    typeof r.key_id === "string" &&
    KEY_ID.test(r.key_id) &&
    (r.name === null || (typeof r.name === "string" && r.name.length <= 32)) &&
    [r.xp, r.level, r.calls, r.rev].every((n) => Number.isSafeInteger(n) && n >= 0) &&
    Array.isArray(r.badges) &&
    r.badges.every((b) => typeof b === "string")
  );
}

export class LeaderboardDO extends DurableObject<AppEnv> {
  private readonly sql: SqlStorage;

  constructor(ctx: DurableObjectState, env: AppEnv) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(`CREATE TABLE IF NOT EXISTS entries (
      key_id TEXT PRIMARY KEY,
      name TEXT,
      xp INTEGER NOT NULL,
      level INTEGER NOT NULL,
      badges TEXT NOT NULL,
      calls INTEGER NOT NULL,
      rev INTEGER NOT NULL,
      updated_at INTEGER NOT NULL)`);
    this.sql.exec("CREATE INDEX IF NOT EXISTS entries_rank ON entries (xp DESC, calls DESC, key_id)");
  }

  /** Upserts a batch of reports. Returns how many rows changed. */
  report(batch: LeaderboardReport[]): number {
    if (!Array.isArray(batch)) return 0;
    const now = Date.now();
    let changed = 0;
    this.ctx.storage.transactionSync(() => {
      for (const r of batch.slice(0, MAX_BATCH)) {
        if (!validReport(r)) continue;
        const c = this.sql.exec(
          `INSERT INTO entries (key_id, name, xp, level, badges, calls, rev, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT (key_id) DO UPDATE SET
             name = excluded.name, xp = excluded.xp, level = excluded.level, badges = excluded.badges,
             calls = excluded.calls, rev = excluded.rev, updated_at = excluded.updated_at
           WHERE excluded.rev > entries.rev`,
          r.key_id,
          r.name,
          r.xp,
          r.level,
          JSON.stringify(r.badges),
          r.calls,
          r.rev,
          now,
        );
        changed += c.rowsWritten > 0 ? 1 : 0;
      }
    });
    return changed;
  }

  /** The top `limit` keys by XP (ties: more calls first, then key_id). */
  top(limit: number): LeaderboardEntry[] {
    const n = Math.min(Math.max(1, Math.trunc(limit)), 1000);
    return this.sql
      .exec<{ key_id: string; name: string | null; xp: number; level: number; badges: string; calls: number }>(
        "SELECT key_id, name, xp, level, badges, calls FROM entries ORDER BY xp DESC, calls DESC, key_id ASC LIMIT ?",
        n,
      )
      .toArray()
      .map((r, i) => ({
        rank: i + 1,
        key_id: r.key_id,
        name: r.name,
        xp: r.xp,
        level: r.level,
        badges: JSON.parse(r.badges) as string[],
        calls: r.calls,
      }));
  }
}
