//! End to end: the mpp target (the worker gateway plus MPP payments, MCP and a sandbox), generated,
//! installed, type-checked and tested in workerd (its suite drives 402 → pay → 200 + receipt over
//! HTTP and MCP with a deterministic method), again after add-endpoint, then served by
//! `wrangler dev` and audited. Needs Node.js >= 20 and npm; fails (never skips) without them.

mod common;

#[test]
#[ignore = "needs Node.js >= 20 and npm; run with --include-ignored"]
fn mpp_project_installs_typechecks_and_passes_its_own_tests() {
    common::node::workers_project_end_to_end("mpp", false);
}
