//! A plan of files, and the two ways it is written: a whole new project (rendered into a temporary
//! directory beside the destination and moved into place, so a failure leaves nothing behind), or
//! an update of an existing project (generated files replaced whole, handlers only created).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::ui::Ui;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// mcpay.toml itself.
    Manifest,
    /// Rendered from the manifest, regenerated whole by `sync`; carries the @generated header.
    Generated,
    /// The user's handler for one endpoint: created once, never overwritten.
    Handler,
    /// Everything else: written when the project is created, then the user's.
    Scaffold,
}

impl FileKind {
    pub fn label(self) -> &'static str {
        match self {
            FileKind::Manifest => "manifest",
            FileKind::Generated => "generated",
            FileKind::Handler => "handler",
            FileKind::Scaffold => "scaffold",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PlannedFile {
    /// Relative to the project root.
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub kind: FileKind,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub files: Vec<PlannedFile>,
}

/// What an update did (or would do) to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
}

impl Plan {
    pub fn print(&self, ui: &Ui, root: &Path) {
        ui.heading(&format!("Plan for {} ({} files, nothing written):", root.display(), self.files.len()));
        for f in &self.files {
            ui.item(f.kind.label(), &format!("{}  ({} bytes)", f.path.display(), f.contents.len()));
        }
    }

    /// Writes a new project at `dest`. With `force`, a non-empty `dest` is emptied first, except
    /// its `.git`. Nothing at `dest` is touched until every file has been written successfully.
    pub fn write_new(&self, dest: &Path, force: bool) -> Result<()> {
        if dest.exists() && !dest.is_dir() {
            bail!("{} exists and is not a directory; choose another path", dest.display());
        }
        let occupied: Vec<PathBuf> = if dest.is_dir() {
            fs::read_dir(dest)
                .with_context(|| format!("cannot read {}", dest.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        if !occupied.is_empty() && !force {
            bail!(
                "{} is not empty; pass --force to empty it (its .git is kept) or choose another directory",
                dest.display()
            );
        }
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let staging = tempfile::Builder::new()
            .prefix(".create-mcpay-")
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a temporary directory in {}", parent.display()))?;
        for f in &self.files {
            let path = staging.path().join(&f.path);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            fs::write(&path, &f.contents).with_context(|| format!("cannot write {}", path.display()))?;
        }
        if !dest.exists() {
            let staged = staging.keep();
            fs::rename(&staged, dest).with_context(|| {
                let _ = fs::remove_dir_all(&staged);
                format!("cannot move the new project into {}", dest.display())
            })?;
            return Ok(());
        }
        // dest is an existing directory: empty it (keeping .git), then move the entries in.
        for path in occupied {
            if path.file_name().is_some_and(|n| n == ".git") {
                continue;
            }
            if path.is_dir() && !path.is_symlink() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            }
            .with_context(|| format!("cannot remove {}", path.display()))?;
        }
        for entry in fs::read_dir(staging.path())? {
            let entry = entry?;
            let to = dest.join(entry.file_name());
            fs::rename(entry.path(), &to).with_context(|| format!("cannot move {} into place", to.display()))?;
        }
        Ok(())
    }

    /// Brings an existing project at `root` in line with the plan: the manifest and generated files
    /// are written when they differ; handlers are created only when missing; scaffold files are
    /// left alone. Every file is staged before the first rename, so a failure changes nothing.
    pub fn apply_update(&self, root: &Path, dry_run: bool) -> Result<Vec<(PathBuf, Change)>> {
        let mut changes = Vec::new();
        for f in &self.files {
            let path = root.join(&f.path);
            let current = fs::read(&path).ok();
            let change = match (f.kind, &current) {
                (FileKind::Scaffold, _) => None,
                (FileKind::Handler, Some(_)) => None,
                (_, None) => Some(Change::Created),
                (_, Some(old)) if *old != f.contents => Some(Change::Updated),
                _ => None,
            };
            if let Some(c) = change {
                changes.push((f, c));
            }
        }
        if dry_run {
            return Ok(changes.into_iter().map(|(f, c)| (f.path.clone(), c)).collect());
        }
        let mut staged = Vec::new();
        for (f, _) in &changes {
            let path = root.join(&f.path);
            let dir = path.parent().expect("a file has a parent");
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let mut tmp = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("cannot write in {}", dir.display()))?;
            std::io::Write::write_all(&mut tmp, &f.contents)?;
            staged.push((tmp, path));
        }
        for (tmp, path) in staged {
            tmp.persist(&path).with_context(|| format!("cannot replace {}", path.display()))?;
        }
        Ok(changes.into_iter().map(|(f, c)| (f.path.clone(), c)).collect())
    }

    /// Generated files (and the manifest's handlers) that differ from what is on disk.
    pub fn stale(&self, root: &Path) -> Vec<(PathBuf, &'static str)> {
        let mut out = Vec::new();
        for f in &self.files {
            let current = fs::read(root.join(&f.path)).ok();
            match (f.kind, current) {
                (FileKind::Generated, None) => out.push((f.path.clone(), "missing")),
                (FileKind::Generated, Some(old)) if old != f.contents => out.push((f.path.clone(), "differs from mcpay.toml")),
                (FileKind::Handler, None) => out.push((f.path.clone(), "missing handler")),
                _ => {}
            }
        }
        out
    }
}
