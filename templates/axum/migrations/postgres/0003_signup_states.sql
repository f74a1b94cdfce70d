-- Exactly-once signup payments (PostgreSQL). Keep in step with migrations/sqlite.
-- States: claimed (verifying) → settling (about to settle: the payment is recorded first) → paid
-- (settled, key not minted yet) → done; or settling → pending (outcome unknown: resolved from the
-- chain by the next request or the sweep) → paid | released. released rows stay (listed, claimable
-- again) and do not count toward the hourly signup budget. A claim is held by `claim_token` until
-- `lease_until` (ms); after that another request or the sweep may take it over.
ALTER TABLE signup_payments DROP CONSTRAINT IF EXISTS signup_payments_state_check;
ALTER TABLE signup_payments ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0;
ALTER TABLE signup_payments ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE signup_payments ADD COLUMN payload TEXT;
ALTER TABLE signup_payments ADD COLUMN valid_before BIGINT;
ALTER TABLE signup_payments ADD COLUMN from_block BIGINT;
UPDATE signup_payments SET
    state = CASE WHEN state = 'done' THEN 'done' WHEN settled_ref IS NOT NULL THEN 'paid' ELSE 'claimed' END,
    lease_until = claimed_at + 600000,
    updated_at = COALESCE(done_at, claimed_at);
ALTER TABLE signup_payments ADD CONSTRAINT signup_payments_state_check
    CHECK (state IN ('claimed', 'settling', 'pending', 'paid', 'done', 'released'));
CREATE INDEX signup_payments_state ON signup_payments (state, lease_until);
CREATE INDEX signup_payments_updated ON signup_payments (updated_at);
