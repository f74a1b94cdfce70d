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
