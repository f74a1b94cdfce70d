//! End to end: the worker target, generated, installed, type-checked and tested in workerd, again
//! after add-endpoint, then served by `wrangler dev`, paid for over HTTP and audited.
//! Needs Node.js >= 20 and npm, and fails (never skips) without them.
//! Run with `cargo test -- --include-ignored` (as .ci/run does).

mod common;

#[test]
#[ignore = "needs Node.js >= 20 and npm; run with --include-ignored"]
fn worker_project_installs_typechecks_and_passes_its_own_tests() {
    common::node::workers_project_end_to_end("worker", true);
}

/// The x402 harness on its own: payments sent straight to its facilitator settle on chain once;
/// bad authorizations and replays are refused (so the signup checks above prove something).
#[test]
#[ignore = "needs Node.js >= 20 and npm; run with --include-ignored"]
fn chain_harness_settles_real_payments_and_refuses_bad_ones() {
    common::chain::run_selftest();
}
