//! Every scenario, one file per area. A scenario states what a gateway that follows
//! docs/contract.md must do (crate::audit::scenario), and its check uses the shared ones in
//! crate::audit::checks.

macro_rules! scenario {
    ($name:expr, $expect:expr, $body:expr) => {
        Scenario { name: $name, expect: $expect, run: $body }
    };
}

mod admin;
mod auth;
mod body;
mod charge;
mod headers;
mod idempotency;
mod leak;
mod ledger;
mod mcp;
mod proxy;
mod rate;
mod route;
mod scope;
mod signup;
mod timeout;
mod validate;

/// What every area's file uses.
mod prelude {
    pub use crate::audit::checks::*;
    pub use crate::audit::client::{Client, Endpoint, Key, Reply};
    pub use crate::audit::scenario::{Options, Outcome, Scenario};
}

use crate::audit::scenario::Scenario;

/// Every scenario, in run order: the signup ones (which never pay) before the last, which spends
/// the hourly mint allowance.
pub fn all() -> Vec<Scenario> {
    let mut all = Vec::new();
    all.extend(route::scenarios());
    all.extend(auth::scenarios());
    all.extend(admin::scenarios());
    all.extend(scope::scenarios());
    all.extend(validate::scenarios());
    all.extend(body::scenarios());
    all.extend(charge::scenarios());
    all.extend(idempotency::scenarios());
    all.extend(timeout::scenarios());
    all.extend(ledger::scenarios());
    all.extend(rate::scenarios());
    all.extend(leak::scenarios());
    all.extend(headers::scenarios());
    all.extend(signup::scenarios());
    all.extend(mcp::scenarios());
    all.extend(proxy::scenarios());
    all.push(admin::hourly_limit());
    all
}
