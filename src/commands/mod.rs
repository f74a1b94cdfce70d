//! One module per subcommand; each takes its clap arguments and the terminal.

pub mod add_endpoint;
pub mod add_upstream;
pub mod audit;
pub mod check;
mod legacy_sse;
pub mod new;
pub mod sync;

use std::path::Path;

use crate::plan::Plan;
use crate::ui::Ui;

/// Prints a plan (`--dry-run`): every file with its kind and size.
pub fn print_plan(ui: &Ui, plan: &Plan, root: &Path) {
    ui.heading(&format!("Plan for {} ({} files, nothing written):", root.display(), plan.files.len()));
    for f in &plan.files {
        ui.item(f.kind.label(), &format!("{}  ({} bytes)", f.path.display(), f.contents.len()));
    }
}
