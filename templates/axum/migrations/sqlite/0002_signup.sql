-- Pay-to-mint signup (POST /v1/signup, SQLite). Keep in step with migrations/postgres.
-- One row per payment, by its reference: x402 "x402:<network>:<asset>:<from>:<nonce>", MPP
-- "mpp:<challenge id>". The primary key makes a payment mint at most one key, whichever instance
-- sees it; rows are kept (replay protection) and rows of the last hour count toward the signup
-- limit. A failed verification or settlement deletes its pending row, so the payer can retry.
CREATE TABLE signup_payments (
    reference       TEXT    PRIMARY KEY,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'done')),
    rail            TEXT    NOT NULL CHECK (rail IN ('x402', 'mpp')),
    claim_token     TEXT    NOT NULL,          -- request id of the request that holds the claim
    claimed_at      BIGINT  NOT NULL,          -- ms; a pending claim past its lease can be taken over
    created_at      BIGINT  NOT NULL,          -- ms; counts toward [signup] signups_per_hour
    settled_ref     TEXT,                      -- once settled: the transaction hash / receipt reference
    receipt_key     TEXT    UNIQUE,            -- once settled: rail + method + settled_ref (one key per payment)
    response_header TEXT,                      -- once settled: PAYMENT-RESPONSE / Payment-Receipt value
    idem_hash       TEXT,                      -- SHA-256 hex of the Idempotency-Key (never the key itself)
    key_id          TEXT,                      -- once done: the key this payment bought
    balance_mcents  BIGINT,
    scopes          TEXT,                      -- JSON array
    name            TEXT,
    done_at         BIGINT
);
CREATE INDEX signup_payments_created ON signup_payments (created_at);

-- One row, updated first by every signup claim: serializes claims (and the hourly count) across instances.
CREATE TABLE signup_lock (id INTEGER PRIMARY KEY CHECK (id = 1), claims BIGINT NOT NULL);
INSERT INTO signup_lock (id, claims) VALUES (1, 0);
