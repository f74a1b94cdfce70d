// A single small object holding the admin mint rate limit (GATEWAY.mintsPerHour, rolling hour).
import { DurableObject } from "cloudflare:workers";
import { GATEWAY } from "../generated/manifest";
import type { AppEnv } from "./env";

const HOUR_MS = 3_600_000;

export type MintPermit = { ok: true } | { ok: false; retryAfterSeconds: number };

export class AdminDO extends DurableObject<AppEnv> {
  private readonly sql: SqlStorage;

  constructor(ctx: DurableObjectState, env: AppEnv) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec("CREATE TABLE IF NOT EXISTS mints (ts INTEGER NOT NULL)");
    this.sql.exec("CREATE INDEX IF NOT EXISTS mints_ts ON mints (ts)");
  }

  /** Consumes one mint from the hourly budget, or says how long to wait. */
  acquireMint(): MintPermit {
    const now = Date.now();
    return this.ctx.storage.transactionSync((): MintPermit => {
      this.sql.exec("DELETE FROM mints WHERE ts <= ?", now - HOUR_MS);
      const w = this.sql
        .exec<{ n: number; oldest: number | null }>("SELECT COUNT(*) AS n, MIN(ts) AS oldest FROM mints")
        .one();
      if (w.n >= GATEWAY.mintsPerHour) {
        const waitMs = (w.oldest ?? now) + HOUR_MS - now;
        return { ok: false, retryAfterSeconds: Math.max(1, Math.ceil(waitMs / 1000)) };
      }
      this.sql.exec("INSERT INTO mints (ts) VALUES (?)", now);
      return { ok: true };
    });
  }
}
