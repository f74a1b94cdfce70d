//! `create-mcpay check`: are the generated files what mcpay.toml gives? Each stale file is named
//! with a diff of what `sync` would write.

use anyhow::{Result, bail};
use similar::TextDiff;

use crate::cli::ProjectArgs;
use crate::plan::Stale;
use crate::project::Project;
use crate::ui::Ui;

/// A diff longer than this many lines is cut (the rest is counted).
const MAX_DIFF_LINES: usize = 80;

pub fn run(args: &ProjectArgs, ui: &Ui) -> Result<()> {
    let project = Project::open(&args.project)?;
    let plan = project.plan()?;
    let stale = plan.stale(&project.root);
    if stale.is_empty() {
        ui.ok(&format!("generated files match {}", project.manifest_path.display()));
        return Ok(());
    }
    let mut msg = format!("{} file(s) are out of date with mcpay.toml:", stale.len());
    for s in &stale {
        msg.push_str(&format!("\n  {}  ({})", s.file.path.display(), s.why));
    }
    for s in &stale {
        if let Some(d) = diff(s) {
            msg.push_str(&format!("\n\n{d}"));
        }
    }
    msg.push_str("\nrun `create-mcpay sync` to regenerate them");
    bail!(msg)
}

/// A unified diff from the file on disk to what `sync` writes (None for a missing file).
fn diff(s: &Stale) -> Option<String> {
    let current = s.current.as_ref()?;
    let (old, new) = (String::from_utf8_lossy(current), String::from_utf8_lossy(&s.file.contents));
    let path = s.file.path.display().to_string();
    let text = TextDiff::from_lines(old.as_ref(), new.as_ref())
        .unified_diff()
        .context_radius(2)
        .header(&format!("a/{path} (on disk)"), &format!("b/{path} (from mcpay.toml)"))
        .to_string();
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= MAX_DIFF_LINES {
        return Some(text.trim_end().to_string());
    }
    Some(format!("{}\n… {} more diff lines", lines[..MAX_DIFF_LINES].join("\n"), lines.len() - MAX_DIFF_LINES))
}
