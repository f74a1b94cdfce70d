//! `create-mcpay audit URL`: the attack suite against a running gateway (it lives in crate::audit).

use anyhow::Result;

use crate::cli::AuditArgs;

pub fn run(args: &AuditArgs) -> Result<()> {
    crate::audit::run(args)
}
