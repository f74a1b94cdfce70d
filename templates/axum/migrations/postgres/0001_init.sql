-- Keys, their ledger and the admin mint log (PostgreSQL). Keep in step with migrations/sqlite.
CREATE TABLE api_keys (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_hash    TEXT    NOT NULL UNIQUE,      -- SHA-256 hex of the key; the key itself is never stored
    key_id      TEXT    NOT NULL UNIQUE,      -- public id, "k_" + 16 hex
    name        TEXT,
    balance     BIGINT  NOT NULL CHECK (balance >= 0),
    scopes      TEXT    NOT NULL,             -- JSON array of scope names
    xp          BIGINT  NOT NULL DEFAULT 0,
    calls       BIGINT  NOT NULL DEFAULT 0,
    spent       BIGINT  NOT NULL DEFAULT 0,
    refunded    BIGINT  NOT NULL DEFAULT 0,
    active      BIGINT  NOT NULL DEFAULT 0,   -- 1 once the key has been charged (leaderboard)
    created_at  BIGINT  NOT NULL
);
CREATE INDEX api_keys_rank ON api_keys (xp DESC, calls DESC, key_id);

CREATE TABLE ledger (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_ref       BIGINT  NOT NULL REFERENCES api_keys (id),
    ts            BIGINT  NOT NULL,           -- milliseconds since the Unix epoch
    kind          TEXT    NOT NULL CHECK (kind IN ('mint', 'charge', 'refund')),
    endpoint      TEXT,
    amount_mcents BIGINT  NOT NULL,           -- signed: charges are negative
    balance_after BIGINT  NOT NULL,
    request_id    TEXT    NOT NULL
);
CREATE INDEX ledger_key_seq ON ledger (key_ref, seq);
CREATE INDEX ledger_key_kind_ts ON ledger (key_ref, kind, ts);
CREATE INDEX ledger_key_request ON ledger (key_ref, request_id);

-- One row per settled (failed) call: a call is settled at most once, whichever instance tries.
CREATE TABLE settlements (
    key_ref    BIGINT NOT NULL REFERENCES api_keys (id),
    request_id TEXT   NOT NULL,
    PRIMARY KEY (key_ref, request_id)
);

CREATE TABLE admin_mints (ts BIGINT NOT NULL);
CREATE INDEX admin_mints_ts ON admin_mints (ts);

-- One row, updated first by every admin mint: serializes mints across instances.
CREATE TABLE gateway_lock (id INTEGER PRIMARY KEY CHECK (id = 1), mints BIGINT NOT NULL);
INSERT INTO gateway_lock (id, mints) VALUES (1, 0);
