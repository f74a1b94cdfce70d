-- Paid calls as holds (contract 3.8, PostgreSQL). Keep in step with migrations/sqlite.
-- A paid call takes a hold (ledger 'hold', -price), then ends in exactly one 'capture' (amount 0:
-- the price is kept) or one 'release' (+price). 'charge' and 'refund' rows stay valid: they are
-- the ledgers written before holds existed. Times in `holds` and `idempotency`, and the ts of
-- hold/capture/release rows, come from the database's clock, so that every instance agrees.
ALTER TABLE ledger DROP CONSTRAINT IF EXISTS ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('mint', 'hold', 'capture', 'release', 'charge', 'refund'));

-- Replaced by `holds` (each call settles once through its hold's state).
DROP TABLE settlements;

-- One row per paid call, keyed by the gateway's call id (the X-Request-Id of the paid call).
-- held → captured | released, by one conditional update on state = 'held'. A hold still held at
-- its deadline (hold time + the endpoint's timeout_ms + 60 s) is released by the sweeper.
CREATE TABLE holds (
    key_ref    BIGINT  NOT NULL REFERENCES api_keys (id),
    request_id TEXT    NOT NULL,             -- the gateway's call id
    endpoint   TEXT    NOT NULL,
    price      BIGINT  NOT NULL,             -- mcents held
    xp         BIGINT  NOT NULL,             -- XP awarded by the hold (taken back by a failure)
    state      TEXT    NOT NULL CHECK (state IN ('held', 'captured', 'released')),
    reason     TEXT,                         -- once settled: success | kept | caller | timeout | ours | expired
    deadline   BIGINT  NOT NULL,             -- ms, database clock
    created_at BIGINT  NOT NULL,             -- ms, database clock
    settled_at BIGINT,                       -- ms, database clock
    idem_key   TEXT,                         -- the call's Idempotency-Key, if any
    PRIMARY KEY (key_ref, request_id)
);
CREATE INDEX holds_state_deadline ON holds (state, deadline);
-- Caller-failure releases of a key in the last hour (the refund cap).
CREATE INDEX holds_key_reason_settled ON holds (key_ref, reason, settled_at);
CREATE INDEX holds_settled ON holds (settled_at);

-- Idempotency-Key records, per key (another key's identical Idempotency-Key never collides).
-- running while the call is held; done once captured, with its answer (body NULL: larger than
-- 65536 bytes, not stored). A failed call's record is deleted with its settlement. Forgotten by
-- the sweeper at expires_at (24 h after the hold).
CREATE TABLE idempotency (
    key_ref     BIGINT  NOT NULL REFERENCES api_keys (id),
    idem_key    TEXT    NOT NULL,
    endpoint    TEXT    NOT NULL,
    body_sha256 TEXT    NOT NULL,            -- lowercase hex SHA-256 of the request body bytes
    request_id  TEXT    NOT NULL,            -- the call id of the call that holds it
    state       TEXT    NOT NULL CHECK (state IN ('running', 'done')),
    status      BIGINT,                      -- once done: the answer's status
    headers     TEXT,                        -- once done: JSON [[name, value], …]
    body        BYTEA,                       -- once done: the answer's body; NULL when not stored
    created_at  BIGINT  NOT NULL,            -- ms, database clock
    expires_at  BIGINT  NOT NULL,            -- ms, database clock
    PRIMARY KEY (key_ref, idem_key)
);
CREATE INDEX idempotency_expires ON idempotency (expires_at);
CREATE INDEX idempotency_request ON idempotency (key_ref, request_id);
