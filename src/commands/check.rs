//! `create-mcpay check`: are the generated files what mcpay.toml gives?

use anyhow::{Result, bail};

use super::Project;
use crate::cli::ProjectArgs;
use crate::ui::Ui;

pub fn run(args: &ProjectArgs, ui: &Ui) -> Result<()> {
    let project = Project::open(&args.project)?;
    let stale = project.plan()?.stale(&project.root);
    if stale.is_empty() {
        ui.ok(&format!("generated files match {}", project.manifest_path.display()));
        return Ok(());
    }
    let mut msg = format!("{} file(s) are out of date with mcpay.toml:", stale.len());
    for (path, why) in &stale {
        msg.push_str(&format!("\n  {}  ({why})", path.display()));
    }
    msg.push_str("\nrun `create-mcpay sync` to regenerate them");
    bail!(msg)
}
