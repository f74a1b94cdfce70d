//! `create-mcpay sync`: regenerate the generated files after a hand edit of mcpay.toml.

use anyhow::Result;

use crate::cli::SyncArgs;
use crate::plan::Change;
use crate::project::Project;
use crate::ui::Ui;

pub fn run(args: &SyncArgs, ui: &Ui) -> Result<()> {
    let project = Project::open(&args.project.project)?;
    let plan = project.plan()?;
    let changes = plan.apply_update(&project.root, args.dry_run)?;
    report(ui, &project, &changes, args.dry_run);
    Ok(())
}

pub fn report(ui: &Ui, project: &Project, changes: &[(std::path::PathBuf, Change)], dry_run: bool) {
    if changes.is_empty() {
        ui.ok(&format!("{} is up to date with mcpay.toml", project.root.display()));
    } else {
        ui.heading(if dry_run { "Would write (dry run, nothing written):" } else { "Wrote:" });
        for (path, change) in changes {
            let tag = match change {
                Change::Created => "created",
                Change::Updated => "updated",
            };
            ui.item(tag, &path.display().to_string());
        }
    }
    for orphan in project.orphan_handlers() {
        ui.warn(&format!(
            "{} has no endpoint in mcpay.toml any more; delete it if you no longer need it (it is yours, so create-mcpay leaves it)",
            orphan.display()
        ));
    }
}
