//! Storage through sqlx: a SQLite file (WAL) by default, PostgreSQL when the URL says so.
//! Every statement is one SQL string that both backends run (`$1` placeholders); the schema
//! lives in migrations/sqlite and migrations/postgres, embedded and applied at start.
//!
//! Money moves only inside transactions that begin with a write to the key's row, so
//! concurrent requests on one key serialize on that row (PostgreSQL row lock, SQLite write
//! lock): a paid call's hold takes the price only if `balance >= price`, and its capture or
//! release is one conditional update of the hold's state (`held` → `captured` | `released`).
//! Hold, settlement and sweep times come from the database's clock, shared by every instance.

use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

pub type DbResult<T> = Result<T, sqlx::Error>;

const HOUR_MS: i64 = 3_600_000;

#[derive(Clone, Debug)]
pub enum Store {
    /// SQLite has one writer at a time: writes go through a one-connection pool, so they queue
    /// in-process instead of spinning on the file lock; reads use the larger pool (WAL).
    Sqlite { read: SqlitePool, write: SqlitePool },
    Postgres(PgPool),
}

/// Runs the same block for either backend (`$p` is the pool, the body is compiled per backend).
macro_rules! with_pool {
    ($self:expr, $p:ident => $body:expr) => {
        match $self {
            Store::Sqlite { read: $p, .. } => $body,
            Store::Postgres($p) => $body,
        }
    };
}

/// As `with_pool!`, for transactions that write.
macro_rules! with_writer {
    ($self:expr, $p:ident => $body:expr) => {
        match $self {
            Store::Sqlite { write: $p, .. } => $body,
            Store::Postgres($p) => $body,
        }
    };
}

/// Appends one ledger row inside the transaction `$tx` (kind: 'mint', 'hold', 'capture' or 'release').
macro_rules! insert_ledger {
    ($tx:ident, $key_ref:expr, $now:expr, $kind:expr, $endpoint:expr, $amount:expr, $balance:expr, $request_id:expr) => {
        sqlx::query(
            "INSERT INTO ledger (key_ref, ts, kind, endpoint, amount_mcents, balance_after, request_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind($key_ref)
        .bind($now)
        .bind($kind)
        .bind($endpoint)
        .bind($amount)
        .bind($balance)
        .bind($request_id)
        .execute(&mut *$tx)
        .await?
    };
}

/// Inserts a key and its 'mint' ledger row inside the transaction `$tx`.
macro_rules! insert_key {
    ($tx:ident, $k:expr, $now:expr) => {{
        let k = $k;
        let scopes = serde_json::to_string(k.scopes).unwrap_or_else(|_| "[]".into());
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO api_keys (key_hash, key_id, name, balance, scopes, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(k.key_hash)
        .bind(k.key_id)
        .bind(k.name)
        .bind(k.balance_mcents)
        .bind(scopes)
        .bind($now)
        .fetch_one(&mut *$tx)
        .await?;
        insert_ledger!($tx, id, $now, "mint", None::<&str>, k.balance_mcents, k.balance_mcents, k.request_id);
    }};
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRow {
    pub id: i64,
    pub key_id: String,
    pub name: Option<String>,
    pub balance: i64,
    pub scopes: String,
    pub xp: i64,
    pub calls: i64,
    pub spent: i64,
    pub refunded: i64,
}

impl KeyRow {
    pub fn scope_list(&self) -> Vec<String> {
        serde_json::from_str(&self.scopes).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct LedgerEntry {
    pub seq: i64,
    pub ts: i64,
    pub kind: String,
    pub endpoint: Option<String>,
    pub amount_mcents: i64,
    pub balance_after: i64,
    pub request_id: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RankRow {
    pub key_id: String,
    pub name: Option<String>,
    pub xp: i64,
    pub calls: i64,
    pub spent: i64,
}

/// A key to create (the hash of its secret, never the secret).
#[derive(Debug, Clone)]
pub struct NewKey<'a> {
    pub key_hash: &'a str,
    pub key_id: &'a str,
    pub name: Option<&'a str>,
    pub balance_mcents: i64,
    pub scopes: &'a [String],
    pub request_id: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MintOutcome {
    Created,
    /// The hourly admin mint budget is spent; retry after this many seconds.
    Limited { retry_after_seconds: u64 },
}

/// A hold not settled by its request is released by the sweeper once this long past the
/// endpoint's `timeout_ms` (contract 3.8: the hold's deadline = hold time + timeout_ms + margin).
pub const HOLD_MARGIN_MS: i64 = 60_000;
/// How long an `Idempotency-Key` record is kept after its hold.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * HOUR_MS;
/// Settled holds are kept this long (settling stays idempotent per call id meanwhile); their
/// ledger rows stay forever.
const SETTLED_HOLD_TTL_MS: i64 = 24 * HOUR_MS;
/// `Retry-After` of `409 idempotency_in_progress` is at most this (contract: 1–5 s).
const IN_PROGRESS_RETRY_MAX_MS: i64 = 5_000;

/// The database's clock in Unix milliseconds, as an SQL expression per backend.
macro_rules! db_now {
    (sqlite) => {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    };
    (postgres) => {
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    };
}

/// The answer of a captured call, kept for `Idempotency-Key` replays: status, headers (in
/// order, without X-Request-Id and CORS headers) and body (None: larger than the limit, not stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// A paid call's `Idempotency-Key` and the lowercase hex SHA-256 of its body bytes.
#[derive(Debug, Clone, Copy)]
pub struct IdemRequest<'a> {
    pub key: &'a str,
    pub body_sha256: &'a str,
}

/// The hold of one paid call (see [`Store::hold`]).
#[derive(Debug, Clone, Copy)]
pub struct HoldRequest<'a> {
    pub key_ref: i64,
    pub endpoint: &'a str,
    pub price: i64,
    pub xp: i64,
    /// The gateway's call id (the X-Request-Id of the paid call); never a client-supplied id.
    pub request_id: &'a str,
    /// The handler's time limit: the hold's deadline is this + [`HOLD_MARGIN_MS`] after the hold.
    pub timeout_ms: i64,
    pub idem: Option<IdemRequest<'a>>,
}

/// What an `Idempotency-Key` already recorded for the key answers instead of a new call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdemFound {
    /// Recorded with another endpoint or body: 422 idempotency_mismatch.
    Mismatch,
    /// Its call is still held (running): 409 idempotency_in_progress.
    InProgress { retry_after_seconds: u64 },
    /// Its call was captured: the stored answer (None: too large, not stored).
    Replay { original_request_id: String, response: Option<StoredResponse> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    Held { balance_mcents: i64, deadline: i64 },
    Insufficient { balance_mcents: i64 },
    UnknownKey,
    Idempotent(IdemFound),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureOutcome {
    Captured { balance_mcents: i64 },
    /// Released before the capture (past its deadline): nothing is charged.
    Released { balance_mcents: i64 },
    /// No such hold.
    Unknown { balance_mcents: i64 },
}

/// Why a hold is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The handler failed (error, panic, status ≥ 500): released while the key had fewer than
    /// `cap` caller-failure releases in the last rolling hour, else captured.
    Caller { cap: u32 },
    /// The handler did not finish within its time limit: always released, never counted.
    Timeout,
    /// The gateway's own failure: always released, never counted.
    Ours,
    /// A metered upstream MCP server failed the call (unreachable, 5xx, timeout, JSON-RPC error;
    /// an `isError` result with `refund_tool_errors`): always released, never counted (contract 3.12).
    Upstream,
    /// Swept past its deadline (see [`Store::release_expired`]).
    Expired,
}

impl ReleaseReason {
    fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::Caller { .. } => "caller",
            ReleaseReason::Timeout => "timeout",
            ReleaseReason::Ours => "ours",
            ReleaseReason::Upstream => "upstream",
            ReleaseReason::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    Held,
    Captured,
    Released,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseOutcome {
    /// The price was given back (now or earlier).
    pub refunded: bool,
    pub balance_mcents: i64,
    /// The hold's state after this call.
    pub state: HoldState,
    /// This call settled the hold (false: it was settled already, or not due).
    pub settled_now: bool,
}

impl ReleaseOutcome {
    fn standing(state: HoldState, balance_mcents: i64) -> Self {
        ReleaseOutcome { refunded: state == HoldState::Released, balance_mcents, state, settled_now: false }
    }
}

/// A hold past its deadline (see [`Store::due_holds`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueHold {
    pub key_ref: i64,
    pub request_id: String,
    pub endpoint: String,
    pub price: i64,
    pub deadline: i64,
}

/// An `Idempotency-Key` record (unexpired) with the deadline of its call's hold.
#[derive(Debug, Clone, sqlx::FromRow)]
struct IdemRow {
    endpoint: String,
    body_sha256: String,
    request_id: String,
    state: String,
    status: Option<i64>,
    headers: Option<String>,
    body: Option<Vec<u8>>,
    deadline: Option<i64>,
}

const IDEM_SELECT: &str = "SELECT i.endpoint, i.body_sha256, i.request_id, i.state, i.status, i.headers, i.body, h.deadline \
     FROM idempotency i LEFT JOIN holds h ON h.key_ref = i.key_ref AND h.request_id = i.request_id \
     WHERE i.key_ref = $1 AND i.idem_key = $2 AND i.expires_at > $3";

impl IdemRow {
    fn found(self, endpoint: &str, body_sha256: &str, now: i64) -> IdemFound {
        if self.endpoint != endpoint || self.body_sha256 != body_sha256 {
            return IdemFound::Mismatch;
        }
        if self.state == "running" {
            let wait_ms = (self.deadline.unwrap_or(now) - now).min(IN_PROGRESS_RETRY_MAX_MS);
            return IdemFound::InProgress { retry_after_seconds: ceil_seconds(wait_ms) };
        }
        let response = match (self.status, self.body) {
            (Some(status), Some(body)) => Some(StoredResponse {
                status: u16::try_from(status).unwrap_or(500),
                headers: self.headers.as_deref().and_then(|h| serde_json::from_str(h).ok()).unwrap_or_default(),
                body: Some(body),
            }),
            _ => None,
        };
        IdemFound::Replay { original_request_id: self.request_id, response }
    }
}

/// A payment a signup request wants to use (see [`Store::claim_signup`]).
#[derive(Debug, Clone, Copy)]
pub struct SignupClaim<'a> {
    /// x402 "x402:<network>:<asset>:<from>:<nonce>" or MPP "mpp:<challenge id>".
    pub reference: &'a str,
    /// "x402" or "mpp".
    pub rail: &'a str,
    /// The request id of the request that claims it.
    pub token: &'a str,
    /// SHA-256 hex of the request's Idempotency-Key (its own, or the one the gateway made).
    pub idem_hash: &'a str,
    /// The key name asked for.
    pub name: Option<&'a str>,
    /// How long the claim is held before another request or the sweep may take it over.
    pub lease_ms: i64,
}

/// A payment that already bought a key: what a replay needs to answer the same body again.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SignupRecord {
    pub rail: String,
    pub key_id: String,
    pub idem_hash: Option<String>,
    pub settled_ref: String,
    pub response_header: Option<String>,
    pub balance_mcents: i64,
    pub scopes: String,
    pub name: Option<String>,
    /// x402: the recorded payment payload (JSON), to compare with a presented one.
    pub payload: Option<String>,
}

impl SignupRecord {
    pub fn scope_list(&self) -> Vec<String> {
        serde_json::from_str(&self.scopes).unwrap_or_default()
    }
}

/// A payment record taken over to be resolved: a `pending` one, a `settling` or `paid` one whose
/// request is gone (lease expired), or (sweep only) a `claimed` one whose request is gone.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SignupJob {
    pub reference: String,
    pub rail: String,
    /// The state it was in when taken.
    pub state: String,
    pub settled_ref: Option<String>,
    pub response_header: Option<String>,
    pub idem_hash: Option<String>,
    pub name: Option<String>,
    pub payload: Option<String>,
    pub valid_before: Option<i64>,
    pub from_block: Option<i64>,
}

#[derive(Debug, Clone)]
pub enum ClaimOutcome {
    /// The payment is now this request's to verify, settle and mint with.
    Claimed,
    /// This request took over a payment whose outcome must be resolved (money may have moved):
    /// resolve it, never verify or pay it as new.
    Resolve(SignupJob),
    /// The payment already bought a key.
    Done(SignupRecord),
    /// Another request holds the claim.
    InProgress,
    /// The hourly signup budget is spent; retry after this many seconds.
    Limited { retry_after_seconds: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleRecordOutcome {
    Recorded,
    /// The settled payment (same transaction / receipt) already belongs to another claim:
    /// the key it bought, if minted yet.
    AlreadyUsed { key_id: Option<String> },
    /// The claim is no longer this request's.
    Lost,
}

/// The key a signup mints.
#[derive(Debug, Clone)]
pub struct SignupMint<'a> {
    pub key: NewKey<'a>,
}

/// What `x402` needs recorded before `/settle` (state `settling`).
#[derive(Debug, Clone, Copy)]
pub struct SettlingRecord<'a> {
    /// The payment payload (authorization + signature), JSON.
    pub payload: Option<&'a str>,
    /// The authorization's validBefore (seconds).
    pub valid_before: Option<i64>,
    /// The chain's block number before settling.
    pub from_block: Option<i64>,
}

/// One row of GET /v1/admin/payments.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PaymentRow {
    pub reference: String,
    pub rail: String,
    pub state: String,
    #[sqlx(rename = "settled_ref")]
    pub transaction: Option<String>,
    pub key_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The states of a signup payment record.
pub const SIGNUP_STATES: [&str; 6] = ["claimed", "settling", "pending", "paid", "done", "released"];

/// A legacy default lease (ms), used when a caller has none of its own.
pub const SIGNUP_LEASE_MS: i64 = 10 * 60 * 1000;

/// The columns of a [`SignupJob`].
const SIGNUP_JOB_SELECT: &str = "SELECT reference, rail, state, settled_ref, response_header, idem_hash, name, payload, \
     valid_before, from_block FROM signup_payments WHERE reference = $1";

/// The condition of a record the sweep resolves now (`$1`: now, ms): an x402 `pending` one (free: its lease is 0),
/// or any open one whose lease expired. MPP `pending` records wait for the operator.
macro_rules! signup_due {
    () => {
        "state IN ('claimed', 'settling', 'pending', 'paid') AND lease_until <= $1 AND NOT (rail = 'mpp' AND state = 'pending')"
    };
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.is_unique_violation())
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// How often the background task checkpoints a SQLite WAL (PASSIVE: it never blocks the writer).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// The WAL size (pages) at which the writer checkpoints by itself: only when the background
/// task falls far behind (SQLite's default is 1000, reached every ~40 paid calls).
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 20_000;

/// Checkpoints the WAL every [`CHECKPOINT_EVERY`] on a connection of `pool` until it is closed.
fn spawn_checkpointer(pool: SqlitePool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                break;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                if pool.is_closed() {
                    break;
                }
                tracing::warn!(error = %e, "WAL checkpoint failed (retried)");
            }
        }
    });
}

impl Store {
    /// Connects to `url` (`sqlite:PATH` / `sqlite://PATH`, or `postgres://…`) and applies the
    /// embedded migrations. A SQLite file is created on first run.
    pub async fn connect(url: &str) -> Result<Store, sqlx::Error> {
        if is_postgres_url(url) {
            Store::connect_postgres(PgConnectOptions::from_str(url)?, 16).await
        } else if url.starts_with("sqlite:") {
            Store::connect_sqlite(SqliteConnectOptions::from_str(url)?, 8).await
        } else {
            Err(sqlx::Error::Configuration(
                "DATABASE_URL must start with sqlite: or postgres:// (or postgresql://)".into(),
            ))
        }
    }

    pub async fn connect_sqlite(opts: SqliteConnectOptions, max_connections: u32) -> Result<Store, sqlx::Error> {
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // The writer does not checkpoint the WAL on commit (a checkpoint copies and syncs pages: a
        // paid call that triggered one waited ~10 ms); a task does it in the background instead,
        // and the writer's own checkpoint only bounds the WAL should that task fall behind.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts.clone().pragma("wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES.to_string()))
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        spawn_checkpointer(read.clone());
        Ok(Store::Sqlite { read, write })
    }

    pub async fn connect_postgres(opts: PgConnectOptions, max_connections: u32) -> Result<Store, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Store::Postgres(pool))
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite { .. } => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    pub async fn close(&self) {
        with_pool!(self, p => p.close().await);
        with_writer!(self, p => p.close().await);
    }

    /// Creates a key with its 'mint' ledger row. No admin mint limit (see [`Store::admin_mint`]).
    pub async fn create_key(&self, k: &NewKey<'_>) -> DbResult<()> {
        with_writer!(self, p => {
            let mut tx = p.begin().await?;
            insert_key!(tx, k, now_ms());
            tx.commit().await
        })
    }

    /// The admin mint: checks the hourly budget (shared by every instance on this database) and
    /// creates the key, in one transaction.
    pub async fn admin_mint(&self, k: &NewKey<'_>, mints_per_hour: u32) -> DbResult<MintOutcome> {
        let now = now_ms();
        with_writer!(self, p => {
            let mut tx = p.begin().await?;
            // Write first: takes the lock that serializes mints.
            sqlx::query("UPDATE gateway_lock SET mints = mints + 1 WHERE id = 1").execute(&mut *tx).await?;
            sqlx::query("DELETE FROM admin_mints WHERE ts <= $1").bind(now - HOUR_MS).execute(&mut *tx).await?;
            let (n, oldest): (i64, Option<i64>) =
                sqlx::query_as("SELECT COUNT(*), MIN(ts) FROM admin_mints").fetch_one(&mut *tx).await?;
            if n >= i64::from(mints_per_hour) {
                tx.rollback().await?;
                let wait_ms = oldest.unwrap_or(now) + HOUR_MS - now;
                return Ok(MintOutcome::Limited { retry_after_seconds: ceil_seconds(wait_ms) });
            }
            sqlx::query("INSERT INTO admin_mints (ts) VALUES ($1)").bind(now).execute(&mut *tx).await?;
            insert_key!(tx, k, now);
            tx.commit().await?;
            Ok(MintOutcome::Created)
        })
    }

    pub async fn find_key(&self, key_hash: &str) -> DbResult<Option<KeyRow>> {
        with_pool!(self, p => {
            sqlx::query_as::<_, KeyRow>(
                "SELECT id, key_id, name, balance, scopes, xp, calls, spent, refunded FROM api_keys WHERE key_hash = $1",
            )
            .bind(key_hash)
            .fetch_optional(p)
            .await
        })
    }

    /// The database's clock, in Unix milliseconds (every instance of a gateway agrees on it).
    pub async fn db_now(&self) -> DbResult<i64> {
        let sql = self.sql_now();
        with_pool!(self, p => sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await)
    }

    fn sql_now(&self) -> &'static str {
        match self {
            Store::Sqlite { .. } => concat!("SELECT ", db_now!(sqlite)),
            Store::Postgres(_) => concat!("SELECT ", db_now!(postgres)),
        }
    }

    /// The first statement of every transaction that moves a key's money: a write to the key's
    /// row, so that concurrent transactions on one key serialize (PostgreSQL row lock, SQLite
    /// write lock), returning its balance and the database's clock.
    fn sql_lock_key(&self) -> &'static str {
        match self {
            Store::Sqlite { .. } => {
                concat!("UPDATE api_keys SET balance = balance WHERE id = $1 RETURNING balance, ", db_now!(sqlite))
            }
            Store::Postgres(_) => {
                concat!("UPDATE api_keys SET balance = balance WHERE id = $1 RETURNING balance, ", db_now!(postgres))
            }
        }
    }

    /// What an `Idempotency-Key` already recorded for this key says about a new request with it
    /// (None: not recorded, or expired). Read-only; [`Store::hold`] checks it again atomically.
    pub async fn find_idempotency(&self, key_ref: i64, idem: &IdemRequest<'_>, endpoint: &str) -> DbResult<Option<IdemFound>> {
        let now_sql = self.sql_now();
        with_pool!(self, p => {
            let now: i64 = sqlx::query_scalar(now_sql).fetch_one(p).await?;
            let row = sqlx::query_as::<_, IdemRow>(IDEM_SELECT)
                .bind(key_ref)
                .bind(idem.key)
                .bind(now)
                .fetch_optional(p)
                .await?;
            Ok(row.map(|r| r.found(endpoint, idem.body_sha256, now)))
        })
    }

    /// Steps 9b–10 of a paid call, in one transaction: an `Idempotency-Key` already recorded
    /// answers instead (nothing written); else balance ≥ price, then the hold: balance −= price,
    /// XP and calls += the call's, a `hold` ledger row, the `holds` row (deadline = now +
    /// `timeout_ms` + [`HOLD_MARGIN_MS`], on the database's clock) and the `Idempotency-Key`
    /// record (running). The key's existence and scope were checked by the caller; a key that
    /// vanished is `UnknownKey`. A call id holds at most once (a reused one is an error).
    pub async fn hold(&self, h: &HoldRequest<'_>) -> DbResult<HoldOutcome> {
        let lock = self.sql_lock_key();
        with_writer!(self, p => {
            let mut tx = p.begin().await?;
            let Some((balance, now)) = sqlx::query_as::<_, (i64, i64)>(lock).bind(h.key_ref).fetch_optional(&mut *tx).await? else {
                tx.rollback().await?;
                return Ok(HoldOutcome::UnknownKey);
            };
            if let Some(idem) = &h.idem {
                let row = sqlx::query_as::<_, IdemRow>(IDEM_SELECT)
                    .bind(h.key_ref)
                    .bind(idem.key)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(row) = row {
                    tx.rollback().await?;
                    return Ok(HoldOutcome::Idempotent(row.found(h.endpoint, idem.body_sha256, now)));
                }
                // An expired record of this Idempotency-Key (not swept yet) gives way to the new call.
                sqlx::query("DELETE FROM idempotency WHERE key_ref = $1 AND idem_key = $2")
                    .bind(h.key_ref)
                    .bind(idem.key)
                    .execute(&mut *tx)
                    .await?;
            }
            if balance < h.price {
                tx.rollback().await?;
                return Ok(HoldOutcome::Insufficient { balance_mcents: balance });
            }
            let balance: i64 = sqlx::query_scalar(
                "UPDATE api_keys SET balance = balance - $1, xp = xp + $2, calls = calls + 1, spent = spent + $1, active = 1 \
                 WHERE id = $3 AND balance >= $1 RETURNING balance",
            )
            .bind(h.price)
            .bind(h.xp)
            .bind(h.key_ref)
            .fetch_one(&mut *tx)
            .await?;
            insert_ledger!(tx, h.key_ref, now, "hold", Some(h.endpoint), -h.price, balance, h.request_id);
            let deadline = now + h.timeout_ms.max(0) + HOLD_MARGIN_MS;
            sqlx::query(
                "INSERT INTO holds (key_ref, request_id, endpoint, price, xp, state, deadline, created_at, idem_key) \
                 VALUES ($1, $2, $3, $4, $5, 'held', $6, $7, $8)",
            )
            .bind(h.key_ref)
            .bind(h.request_id)
            .bind(h.endpoint)
            .bind(h.price)
            .bind(h.xp)
            .bind(deadline)
            .bind(now)
            .bind(h.idem.as_ref().map(|i| i.key))
            .execute(&mut *tx)
            .await?;
            if let Some(idem) = &h.idem {
                sqlx::query(
                    "INSERT INTO idempotency (key_ref, idem_key, endpoint, body_sha256, request_id, state, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, 'running', $6, $7)",
                )
                .bind(h.key_ref)
                .bind(idem.key)
                .bind(h.endpoint)
                .bind(idem.body_sha256)
                .bind(h.request_id)
                .bind(now)
                .bind(now + IDEMPOTENCY_TTL_MS)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(HoldOutcome::Held { balance_mcents: balance, deadline })
        })
    }

    /// Step 11, success: the hold of call `request_id` becomes final (a `capture` ledger row,
    /// amount 0, balance_after = the balance now) and, when the call has an Idempotency-Key, its
    /// answer is stored with it (`answer.body` None: too large, not stored). One conditional
    /// update on state = 'held': capturing again changes nothing; a hold already released (by
    /// the sweeper, past its deadline) stays released and is reported so.
    pub async fn capture(&self, key_ref: i64, request_id: &str, answer: Option<&StoredResponse>) -> DbResult<CaptureOutcome> {
        let lock = self.sql_lock_key();
        let headers = answer.map(|a| serde_json::to_string(&a.headers).unwrap_or_else(|_| "[]".into()));
        with_writer!(self, p => {
            let mut tx = p.begin().await?;
            let Some((balance, now)) = sqlx::query_as::<_, (i64, i64)>(lock).bind(key_ref).fetch_optional(&mut *tx).await? else {
                tx.rollback().await?;
                return Ok(CaptureOutcome::Unknown { balance_mcents: 0 });
            };
            let taken: Option<(String, Option<String>)> = sqlx::query_as(
                "UPDATE holds SET state = 'captured', reason = 'success', settled_at = $1 \
                 WHERE key_ref = $2 AND request_id = $3 AND state = 'held' RETURNING endpoint, idem_key",
            )
            .bind(now)
            .bind(key_ref)
            .bind(request_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((endpoint, idem_key)) = taken else {
                let state: Option<String> = sqlx::query_scalar("SELECT state FROM holds WHERE key_ref = $1 AND request_id = $2")
                    .bind(key_ref)
                    .bind(request_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                tx.rollback().await?;
                return Ok(match state.as_deref() {
                    Some("captured") => CaptureOutcome::Captured { balance_mcents: balance },
                    Some("released") => CaptureOutcome::Released { balance_mcents: balance },
                    _ => CaptureOutcome::Unknown { balance_mcents: balance },
                });
            };
            insert_ledger!(tx, key_ref, now, "capture", Some(endpoint.as_str()), 0i64, balance, request_id);
            if idem_key.is_some() {
                sqlx::query(
                    "UPDATE idempotency SET state = 'done', status = $1, headers = $2, body = $3 \
                     WHERE key_ref = $4 AND request_id = $5",
                )
                .bind(answer.map(|a| i64::from(a.status)))
                .bind(headers.as_deref())
                .bind(answer.and_then(|a| a.body.as_deref()))
                .bind(key_ref)
                .bind(request_id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(CaptureOutcome::Captured { balance_mcents: balance })
        })
    }

    /// Step 11, failure: gives the held price of call `request_id` back (a `release` ledger row,
    /// +price; XP and calls taken back; refunded += price, spent −= price) and forgets its
    /// Idempotency-Key, so a retry runs again. A caller failure past the refund cap (`cap`
    /// caller-failure releases of this key in the last rolling hour, counted on the database's
    /// clock, old `refund` rows included) is captured instead: the price is kept, XP and calls
    /// are still taken back. Timeouts and our failures are never capped nor counted.
    /// One conditional update on state = 'held': settling again changes nothing and reports the
    /// standing outcome.
    pub async fn release(&self, key_ref: i64, request_id: &str, reason: ReleaseReason) -> DbResult<ReleaseOutcome> {
        self.settle_failed(key_ref, request_id, reason, false).await
    }

    /// The holds past their deadline (on the database's clock), oldest first: their requests
    /// died or never settled them. See [`Store::release_expired`].
    pub async fn due_holds(&self, limit: i64) -> DbResult<Vec<DueHold>> {
        let now_sql = self.sql_now();
        with_pool!(self, p => {
            let now: i64 = sqlx::query_scalar(now_sql).fetch_one(p).await?;
            sqlx::query_as::<_, DueHold>(
                "SELECT key_ref, request_id, endpoint, price, deadline FROM holds \
                 WHERE state = 'held' AND deadline < $1 ORDER BY deadline ASC LIMIT $2",
            )
            .bind(now)
            .bind(limit)
            .fetch_all(p)
            .await
        })
    }

    /// The sweeper's release of one hold still held past its deadline: in full, never capped nor
    /// counted. Safe with several instances: only the one whose conditional update (state =
    /// 'held' AND deadline < the database's now) changes the row releases it (`settled_now`).
    pub async fn release_expired(&self, key_ref: i64, request_id: &str) -> DbResult<ReleaseOutcome> {
        self.settle_failed(key_ref, request_id, ReleaseReason::Expired, true).await
    }

    /// Forgets `Idempotency-Key` records past their 24 h and holds settled more than 24 h ago
    /// (their ledger rows stay). Returns how many of each were deleted.
    pub async fn forget_expired(&self) -> DbResult<(u64, u64)> {
        let now_sql = self.sql_now();
        with_writer!(self, p => {
            let now: i64 = sqlx::query_scalar(now_sql).fetch_one(p).await?;
            let idem = sqlx::query("DELETE FROM idempotency WHERE expires_at <= $1").bind(now).execute(p).await?.rows_affected();
            let holds = sqlx::query("DELETE FROM holds WHERE state <> 'held' AND settled_at <= $1")
                .bind(now - SETTLED_HOLD_TTL_MS)
                .execute(p)
                .await?
                .rows_affected();
            Ok((idem, holds))
        })
    }

    async fn settle_failed(&self, key_ref: i64, request_id: &str, reason: ReleaseReason, expired_only: bool) -> DbResult<ReleaseOutcome> {
        let lock = self.sql_lock_key();
        with_writer!(self, p => {
            let mut tx = p.begin().await?;
            let Some((balance, now)) = sqlx::query_as::<_, (i64, i64)>(lock).bind(key_ref).fetch_optional(&mut *tx).await? else {
                tx.rollback().await?;
                return Ok(ReleaseOutcome::standing(HoldState::Unknown, 0));
            };
            let held: Option<(String, i64)> = sqlx::query_as(
                "SELECT state, deadline FROM holds WHERE key_ref = $1 AND request_id = $2",
            )
            .bind(key_ref)
            .bind(request_id)
            .fetch_optional(&mut *tx)
            .await?;
            let due = match &held {
                Some((state, deadline)) => state == "held" && (!expired_only || *deadline < now),
                None => false,
            };
            if !due {
                tx.rollback().await?;
                let state = match held.as_ref().map(|(s, _)| s.as_str()) {
                    Some("held") => HoldState::Held,
                    Some("captured") => HoldState::Captured,
                    Some("released") => HoldState::Released,
                    _ => HoldState::Unknown,
                };
                return Ok(ReleaseOutcome::standing(state, balance));
            }
            let keep = match reason {
                ReleaseReason::Caller { cap } => {
                    let recent: i64 = sqlx::query_scalar(
                        "SELECT (SELECT COUNT(*) FROM holds WHERE key_ref = $1 AND reason = 'caller' AND settled_at > $2) \
                         + (SELECT COUNT(*) FROM ledger WHERE key_ref = $1 AND kind = 'refund' AND ts > $2)",
                    )
                    .bind(key_ref)
                    .bind(now - HOUR_MS)
                    .fetch_one(&mut *tx)
                    .await?;
                    recent >= i64::from(cap)
                }
                _ => false,
            };
            let (state, why) = if keep { ("captured", "kept") } else { ("released", reason.as_str()) };
            let settled: Option<(String, i64, i64)> = sqlx::query_as(
                "UPDATE holds SET state = $1, reason = $2, settled_at = $3 \
                 WHERE key_ref = $4 AND request_id = $5 AND state = 'held' AND ($6 = 0 OR deadline < $3) \
                 RETURNING endpoint, price, xp",
            )
            .bind(state)
            .bind(why)
            .bind(now)
            .bind(key_ref)
            .bind(request_id)
            .bind(i64::from(expired_only))
            .fetch_optional(&mut *tx)
            .await?;
            let Some((endpoint, price, xp)) = settled else {
                // Serialized on the key's row, so this does not happen; fail closed regardless.
                tx.rollback().await?;
                return Ok(ReleaseOutcome::standing(HoldState::Unknown, balance));
            };
            // A failed call's Idempotency-Key is forgotten: a retry with it runs again.
            sqlx::query("DELETE FROM idempotency WHERE key_ref = $1 AND request_id = $2")
                .bind(key_ref)
                .bind(request_id)
                .execute(&mut *tx)
                .await?;
            let give_back = if keep { 0 } else { price };
            let balance: i64 = sqlx::query_scalar(
                "UPDATE api_keys SET balance = balance + $1, refunded = refunded + $1, spent = spent - $1, \
                 xp = CASE WHEN xp >= $2 THEN xp - $2 ELSE 0 END, calls = CASE WHEN calls >= 1 THEN calls - 1 ELSE 0 END \
                 WHERE id = $3 RETURNING balance",
            )
            .bind(give_back)
            .bind(xp)
            .bind(key_ref)
            .fetch_one(&mut *tx)
            .await?;
            let kind = if keep { "capture" } else { "release" };
            insert_ledger!(tx, key_ref, now, kind, Some(endpoint.as_str()), give_back, balance, request_id);
            tx.commit().await?;
            Ok(ReleaseOutcome {
                refunded: !keep,
                balance_mcents: balance,
                state: if keep { HoldState::Captured } else { HoldState::Released },
                settled_now: true,
            })
        })
    }

    /// Claims a payment for a signup, in one transaction serialized across instances (every claim
    /// first writes `signup_lock`): a payment that already bought a key is reported (replay or
    /// refusal); one held by a live claim is in progress; one whose outcome is open (`pending`,
    /// or `settling` / `paid` left by a request that is gone) is taken over to be resolved; a new
    /// claim (no record, or `released`) takes one slot of the hourly signup budget (`per_hour`).
    pub async fn claim_signup(&self, c: SignupClaim<'_>, per_hour: u32) -> DbResult<ClaimOutcome> {
        let now = now_ms();
        let lease_until = now + c.lease_ms.max(1);
        with_writer!(self, p => {
            let mut tx = p.begin().await?;
            // Write first: takes the lock that serializes claims.
            sqlx::query("UPDATE signup_lock SET claims = claims + 1 WHERE id = 1").execute(&mut *tx).await?;
            let existing: Option<(String, i64)> =
                sqlx::query_as("SELECT state, lease_until FROM signup_payments WHERE reference = $1")
                    .bind(c.reference)
                    .fetch_optional(&mut *tx)
                    .await?;
            match existing {
                Some((state, _)) if state == "done" => {
                    let record = sqlx::query_as::<_, SignupRecord>(
                        "SELECT rail, key_id, idem_hash, settled_ref, response_header, balance_mcents, scopes, name, payload \
                         FROM signup_payments WHERE reference = $1",
                    )
                    .bind(c.reference)
                    .fetch_one(&mut *tx)
                    .await?;
                    tx.rollback().await?;
                    Ok(ClaimOutcome::Done(record))
                }
                Some((state, lease)) if state != "released" => {
                    if lease > now {
                        tx.rollback().await?;
                        return Ok(ClaimOutcome::InProgress);
                    }
                    // Free (pending) or left behind by a request that is gone: take it over.
                    let taken = sqlx::query(
                        "UPDATE signup_payments SET claim_token = $1, claimed_at = $2, lease_until = $3 \
                         WHERE reference = $4 AND state = $5 AND lease_until = $6",
                    )
                    .bind(c.token)
                    .bind(now)
                    .bind(lease_until)
                    .bind(c.reference)
                    .bind(&state)
                    .bind(lease)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if taken != 1 {
                        tx.rollback().await?;
                        return Ok(ClaimOutcome::InProgress);
                    }
                    if state == "claimed" {
                        // Its request died while verifying (no money moves there): a fresh claim.
                        sqlx::query("UPDATE signup_payments SET idem_hash = $1, name = $2, updated_at = $3 WHERE reference = $4")
                            .bind(c.idem_hash)
                            .bind(c.name)
                            .bind(now)
                            .bind(c.reference)
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        return Ok(ClaimOutcome::Claimed);
                    }
                    let job = sqlx::query_as::<_, SignupJob>(SIGNUP_JOB_SELECT).bind(c.reference).fetch_one(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(ClaimOutcome::Resolve(job))
                }
                released => {
                    let (n, oldest): (i64, Option<i64>) = sqlx::query_as(
                        "SELECT COUNT(*), MIN(created_at) FROM signup_payments WHERE created_at > $1 AND state <> 'released'",
                    )
                    .bind(now - HOUR_MS)
                    .fetch_one(&mut *tx)
                    .await?;
                    if n >= i64::from(per_hour) {
                        tx.rollback().await?;
                        let wait_ms = oldest.unwrap_or(now) + HOUR_MS - now;
                        return Ok(ClaimOutcome::Limited { retry_after_seconds: ceil_seconds(wait_ms) });
                    }
                    let written = if released.is_some() {
                        sqlx::query(
                            "UPDATE signup_payments SET state = 'claimed', claim_token = $1, claimed_at = $2, lease_until = $3, \
                             created_at = $2, updated_at = $2, idem_hash = $4, name = $5, settled_ref = NULL, payload = NULL, \
                             valid_before = NULL, from_block = NULL, response_header = NULL \
                             WHERE reference = $6 AND state = 'released'",
                        )
                        .bind(c.token)
                        .bind(now)
                        .bind(lease_until)
                        .bind(c.idem_hash)
                        .bind(c.name)
                        .bind(c.reference)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                    } else {
                        sqlx::query(
                            "INSERT INTO signup_payments (reference, state, rail, claim_token, claimed_at, lease_until, created_at, \
                             updated_at, idem_hash, name) VALUES ($1, 'claimed', $2, $3, $4, $5, $4, $4, $6, $7) ON CONFLICT DO NOTHING",
                        )
                        .bind(c.reference)
                        .bind(c.rail)
                        .bind(c.token)
                        .bind(now)
                        .bind(lease_until)
                        .bind(c.idem_hash)
                        .bind(c.name)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                    };
                    if written != 1 {
                        tx.rollback().await?;
                        return Ok(ClaimOutcome::InProgress);
                    }
                    tx.commit().await?;
                    Ok(ClaimOutcome::Claimed)
                }
            }
        })
    }

    /// `claimed` → `settling`: what resolving the payment later needs is recorded durably before
    /// any money can move. False when the claim is no longer this holder's.
    pub async fn signup_settling(&self, reference: &str, token: &str, r: SettlingRecord<'_>, lease_ms: i64) -> DbResult<bool> {
        let now = now_ms();
        with_writer!(self, p => {
            let n = sqlx::query(
                "UPDATE signup_payments SET state = 'settling', payload = $1, valid_before = $2, from_block = $3, \
                 lease_until = $4, updated_at = $5 WHERE reference = $6 AND claim_token = $7 AND state = 'claimed'",
            )
            .bind(r.payload)
            .bind(r.valid_before)
            .bind(r.from_block)
            .bind(now + lease_ms.max(1))
            .bind(now)
            .bind(reference)
            .bind(token)
            .execute(p)
            .await?
            .rows_affected();
            Ok(n == 1)
        })
    }

    /// `settling` / `pending` → `pending`: the outcome is unknown. The claim is let go (anyone
    /// presenting the payment, or the sweep, may resolve it); the transaction hash is kept if known.
    pub async fn signup_pending(&self, reference: &str, token: &str, transaction: Option<&str>) -> DbResult<bool> {
        let now = now_ms();
        with_writer!(self, p => {
            let n = sqlx::query(
                "UPDATE signup_payments SET state = 'pending', settled_ref = COALESCE($1, settled_ref), lease_until = 0, \
                 updated_at = $2 WHERE reference = $3 AND claim_token = $4 AND state IN ('settling', 'pending')",
            )
            .bind(transaction)
            .bind(now)
            .bind(reference)
            .bind(token)
            .execute(p)
            .await?
            .rows_affected();
            Ok(n == 1)
        })
    }

    /// → `released`: no money moved and none can (verification refused, or the chain shows the
    /// authorization expired / cancelled unused). The record stays; its budget slot is free again
    /// and the payment may be claimed again. A paid record is never released.
    pub async fn release_signup(&self, reference: &str, token: &str) -> DbResult<bool> {
        let now = now_ms();
        with_writer!(self, p => {
            let n = sqlx::query(
                "UPDATE signup_payments SET state = 'released', lease_until = 0, updated_at = $1 \
                 WHERE reference = $2 AND claim_token = $3 AND state IN ('claimed', 'settling', 'pending')",
            )
            .bind(now)
            .bind(reference)
            .bind(token)
            .execute(p)
            .await?
            .rows_affected();
            Ok(n == 1)
        })
    }

    /// Lets go of a claim without changing its state (the sweep or another request may take it).
    pub async fn unlease_signup(&self, reference: &str, token: &str) -> DbResult<()> {
        with_writer!(self, p => {
            sqlx::query(
                "UPDATE signup_payments SET lease_until = 0 WHERE reference = $1 AND claim_token = $2 \
                 AND state IN ('claimed', 'settling', 'pending', 'paid')",
            )
            .bind(reference)
            .bind(token)
            .execute(p)
            .await?;
            Ok(())
        })
    }

    /// `settling` / `pending` → `paid` (`receipt_key`: rail-qualified transaction or receipt
    /// reference, unique across payments), before the key is minted.
    pub async fn record_signup_settled(
        &self,
        reference: &str,
        token: &str,
        receipt_key: &str,
        settled_ref: &str,
        response_header: Option<&str>,
    ) -> DbResult<SettleRecordOutcome> {
        let now = now_ms();
        let result: DbResult<u64> = with_writer!(self, p => {
            sqlx::query(
                "UPDATE signup_payments SET state = 'paid', settled_ref = $1, receipt_key = $2, response_header = $3, updated_at = $4 \
                 WHERE reference = $5 AND claim_token = $6 AND state IN ('settling', 'pending')",
            )
            .bind(settled_ref)
            .bind(receipt_key)
            .bind(response_header)
            .bind(now)
            .bind(reference)
            .bind(token)
            .execute(p)
            .await
            .map(|r| r.rows_affected())
        });
        match result {
            Ok(1) => Ok(SettleRecordOutcome::Recorded),
            Ok(_) => Ok(SettleRecordOutcome::Lost),
            Err(e) if is_unique_violation(&e) => {
                let key_id: Option<Option<String>> = with_writer!(self, p => {
                    sqlx::query_scalar("SELECT key_id FROM signup_payments WHERE receipt_key = $1")
                        .bind(receipt_key)
                        .fetch_optional(p)
                        .await?
                });
                // This claim's payment is another claim's: this claim bought nothing.
                self.release_signup(reference, token).await?;
                Ok(SettleRecordOutcome::AlreadyUsed { key_id: key_id.flatten() })
            }
            Err(e) => Err(e),
        }
    }

    /// `paid` → `done`: mints the key the payment bought and marks the payment used, in one
    /// transaction. Returns false (nothing written) when the claim is no longer this holder's.
    pub async fn finish_signup(&self, reference: &str, token: &str, m: &SignupMint<'_>) -> DbResult<bool> {
        let now = now_ms();
        let scopes = serde_json::to_string(m.key.scopes).unwrap_or_else(|_| "[]".into());
        with_writer!(self, p => {
            let mut tx = p.begin().await?;
            let done = sqlx::query(
                "UPDATE signup_payments SET state = 'done', key_id = $1, balance_mcents = $2, scopes = $3, name = $4, \
                 done_at = $5, updated_at = $5, lease_until = 0 \
                 WHERE reference = $6 AND claim_token = $7 AND state = 'paid' AND settled_ref IS NOT NULL",
            )
            .bind(m.key.key_id)
            .bind(m.key.balance_mcents)
            .bind(&scopes)
            .bind(m.key.name)
            .bind(now)
            .bind(reference)
            .bind(token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
            insert_key!(tx, &m.key, now);
            tx.commit().await?;
            Ok(true)
        })
    }

    /// The records the sweep must resolve now: `pending` x402 payments, and `claimed`,
    /// `settling` or `paid` records whose lease expired (their request is gone). Oldest first.
    pub async fn due_signups(&self, limit: i64) -> DbResult<Vec<String>> {
        let now = now_ms();
        with_pool!(self, p => {
            sqlx::query_scalar(concat!(
                "SELECT reference FROM signup_payments WHERE ",
                signup_due!(),
                " ORDER BY updated_at ASC LIMIT $2"
            ))
            .bind(now)
            .bind(limit)
            .fetch_all(p)
            .await
        })
    }

    /// Takes the claim of a due record (see [`Store::due_signups`]) for `lease_ms`; None when it
    /// is no longer due (another instance took it, or it was resolved).
    pub async fn take_signup(&self, reference: &str, token: &str, lease_ms: i64) -> DbResult<Option<SignupJob>> {
        let now = now_ms();
        with_writer!(self, p => {
            let mut tx = p.begin().await?;
            let taken = sqlx::query(concat!(
                "UPDATE signup_payments SET claim_token = $3, claimed_at = $1, lease_until = $4 WHERE reference = $2 AND ",
                signup_due!()
            ))
            .bind(now)
            .bind(reference)
            .bind(token)
            .bind(now + lease_ms.max(1))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if taken != 1 {
                tx.rollback().await?;
                return Ok(None);
            }
            let job = sqlx::query_as::<_, SignupJob>(SIGNUP_JOB_SELECT).bind(reference).fetch_one(&mut *tx).await?;
            tx.commit().await?;
            Ok(Some(job))
        })
    }

    /// GET /v1/admin/payments: records in `state` (all when None), last changed first.
    pub async fn list_signup_payments(&self, state: Option<&str>, limit: i64) -> DbResult<Vec<PaymentRow>> {
        with_pool!(self, p => {
            sqlx::query_as::<_, PaymentRow>(
                "SELECT reference, rail, state, settled_ref, key_id, created_at, updated_at FROM signup_payments \
                 WHERE ($1 IS NULL OR state = $1) ORDER BY updated_at DESC, reference ASC LIMIT $2",
            )
            .bind(state)
            .bind(limit)
            .fetch_all(p)
            .await
        })
    }

    /// Newest first.
    /// Newest-first ledger entries of a key with `seq < before` (all when `before` is None), at most
    /// `limit`, and the cursor of the next page: the last entry's seq when older entries exist.
    pub async fn ledger(&self, key_ref: i64, limit: i64, before: Option<i64>) -> DbResult<(Vec<LedgerEntry>, Option<i64>)> {
        let mut rows = with_pool!(self, p => {
            sqlx::query_as::<_, LedgerEntry>(
                "SELECT seq, ts, kind, endpoint, amount_mcents, balance_after, request_id FROM ledger \
                 WHERE key_ref = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
            )
            .bind(key_ref)
            .bind(before.unwrap_or(i64::MAX))
            // One more row than asked tells whether an older page exists.
            .bind(limit + 1)
            .fetch_all(p)
            .await
        })?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit.max(0) as usize);
        let next_before = if more { rows.last().map(|e| e.seq) } else { None };
        Ok((rows, next_before))
    }

    /// Keys that have been charged at least once, by XP (ties: more calls, then key_id).
    pub async fn leaderboard(&self, limit: i64) -> DbResult<Vec<RankRow>> {
        with_pool!(self, p => {
            sqlx::query_as::<_, RankRow>(
                "SELECT key_id, name, xp, calls, spent FROM api_keys WHERE active = 1 \
                 ORDER BY xp DESC, calls DESC, key_id ASC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(p)
            .await
        })
    }

    /// Sum of a key's ledger amounts (equals its balance when the books are right).
    pub async fn ledger_sum(&self, key_ref: i64) -> DbResult<i64> {
        with_pool!(self, p => {
            let s: Option<i64> = sqlx::query_scalar("SELECT CAST(SUM(amount_mcents) AS BIGINT) FROM ledger WHERE key_ref = $1")
                .bind(key_ref)
                .fetch_one(p)
                .await?;
            Ok(s.unwrap_or(0))
        })
    }
}

fn ceil_seconds(ms: i64) -> u64 {
    (((ms.max(0) + 999) / 1000).max(1)) as u64
}

