-- Exactly-once signup payments (SQLite). Keep in step with migrations/postgres.
-- States: claimed (verifying) → settling (about to settle: the payment is recorded first) → paid
-- (settled, key not minted yet) → done; or settling → pending (outcome unknown: resolved from the
-- chain by the next request or the sweep) → paid | released. released rows stay (listed, claimable
-- again) and do not count toward the hourly signup budget. A claim is held by `claim_token` until
-- `lease_until` (ms); after that another request or the sweep may take it over.
-- SQLite cannot change a CHECK constraint in place: the table is rebuilt.
CREATE TABLE signup_payments_v3 (
    reference       TEXT    PRIMARY KEY,
    state           TEXT    NOT NULL CHECK (state IN ('claimed', 'settling', 'pending', 'paid', 'done', 'released')),
    rail            TEXT    NOT NULL CHECK (rail IN ('x402', 'mpp')),
    claim_token     TEXT    NOT NULL,          -- request id (or sweep id) holding the claim
    claimed_at      BIGINT  NOT NULL,          -- ms; when the claim was taken
    lease_until     BIGINT  NOT NULL DEFAULT 0, -- ms; the claim may be taken over after this
    created_at      BIGINT  NOT NULL,          -- ms; counts toward [signup] signups_per_hour (unless released)
    updated_at      BIGINT  NOT NULL DEFAULT 0, -- ms; last state change
    settled_ref     TEXT,                      -- the transaction hash / receipt reference, once known
    receipt_key     TEXT    UNIQUE,            -- once paid: rail + settled_ref (one key per payment)
    response_header TEXT,                      -- once paid: PAYMENT-RESPONSE / Payment-Receipt value
    idem_hash       TEXT,                      -- SHA-256 hex of the Idempotency-Key (never the key itself)
    payload         TEXT,                      -- x402: the payment payload (authorization + signature), JSON
    valid_before    BIGINT,                    -- x402: the authorization's validBefore (s)
    from_block      BIGINT,                    -- x402: the chain's block number before settling
    key_id          TEXT,                      -- once done: the key this payment bought
    balance_mcents  BIGINT,
    scopes          TEXT,                      -- JSON array
    name            TEXT,
    done_at         BIGINT
);
INSERT INTO signup_payments_v3 (reference, state, rail, claim_token, claimed_at, lease_until, created_at, updated_at,
    settled_ref, receipt_key, response_header, idem_hash, key_id, balance_mcents, scopes, name, done_at)
SELECT reference,
       CASE WHEN state = 'done' THEN 'done' WHEN settled_ref IS NOT NULL THEN 'paid' ELSE 'claimed' END,
       rail, claim_token, claimed_at, claimed_at + 600000, created_at, COALESCE(done_at, claimed_at),
       settled_ref, receipt_key, response_header, idem_hash, key_id, balance_mcents, scopes, name, done_at
FROM signup_payments;
DROP TABLE signup_payments;
ALTER TABLE signup_payments_v3 RENAME TO signup_payments;
CREATE INDEX signup_payments_created ON signup_payments (created_at);
CREATE INDEX signup_payments_state ON signup_payments (state, lease_until);
CREATE INDEX signup_payments_updated ON signup_payments (updated_at);
