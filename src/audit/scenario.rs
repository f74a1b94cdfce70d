//! What a scenario is: a name, what a gateway that follows docs/contract.md must do, and the check
//! that runs it against the live gateway and returns the evidence. A scenario that cannot apply to
//! the gateway under audit says so (NotApplicable) instead of passing.

use anyhow::Result;

use super::client::Client;

pub enum Outcome {
    Pass(String),
    NotApplicable(String),
}

#[derive(Default)]
pub struct Options {
    /// `ENDPOINT=JSON`: a call whose handler fails on our side, for the refund scenarios.
    pub failing_call: Option<(String, String)>,
    /// `ENDPOINT=JSON`: a call whose handler runs past the endpoint's `timeout_ms`.
    pub slow_call: Option<(String, String)>,
    /// A second deployment of the same gateway with no ADMIN_KEY configured.
    pub unconfigured_url: Option<String>,
    /// The control URL of a tests/chain x402 harness (chain.mjs) whose facilitator the gateway uses.
    pub x402_harness: Option<String>,
    /// The `[upstreams.NAME]` of the gateway the proxy.* scenarios meter (contract 3.12).
    pub upstream: Option<String>,
    /// The base URL of the test upstream (tests/upstream/server.mjs) behind it: its control endpoints.
    pub upstream_control: Option<String>,
    /// `TOOL=JSON`: a call the upstream answers after the upstream's `timeout_seconds`.
    pub upstream_slow_call: Option<(String, String)>,
    /// `NAME=VALUE`: a header the gateway is configured to send upstream, and its value.
    pub upstream_header: Option<(String, String)>,
}

pub type Run = fn(&mut Client, &Options) -> Result<Outcome>;

pub struct Scenario {
    pub name: &'static str,
    pub expect: &'static str,
    pub run: Run,
}
