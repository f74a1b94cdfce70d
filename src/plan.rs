//! A plan of files, and the two ways it is written: a whole new project (rendered into a temporary
//! directory beside or inside the destination and moved into place, so a failure leaves nothing
//! behind), or
//! an update of an existing project (generated files replaced whole, handlers only created).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

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
    /// Writes a new project at `dest`. With `force`, a non-empty `dest` is emptied first, except
    /// its `.git`. Nothing at `dest` is touched until every file has been written successfully:
    /// the files are staged in a temporary directory beside a new `dest` (then renamed into place)
    /// or, when `dest` already exists, inside it (then moved up), so that creating a project in an
    /// existing directory needs no write access to its parent.
    pub fn write_new(&self, dest: &Path, force: bool) -> Result<()> {
        let occupied = check_destination(dest, force)?;
        if !dest.exists() {
            let parent = match dest.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
            let staging = staging_dir(&parent, 0o777)?;
            self.write_files(staging.path())?;
            let staged = staging.keep();
            return fs::rename(&staged, dest).with_context(|| {
                let _ = fs::remove_dir_all(&staged);
                format!("cannot move the new project into {}", dest.display())
            });
        }
        let staging = staging_dir(dest, 0o700)?;
        self.write_files(staging.path())?;
        // Empty dest (keeping .git), then move the staged entries in.
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

    fn write_files(&self, root: &Path) -> Result<()> {
        for f in &self.files {
            let path = root.join(&f.path);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            fs::write(&path, &f.contents).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }

    /// What an update would do: the manifest and generated files when they differ, handlers only
    /// when missing; scaffold files are the user's.
    pub fn changes(&self, root: &Path) -> Vec<(&PlannedFile, Change)> {
        let mut changes = Vec::new();
        for f in &self.files {
            let current = fs::read(root.join(&f.path)).ok();
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
        changes
    }

    /// Brings an existing project at `root` in line with the plan (see [`Plan::changes`]). A file
    /// keeps its mode; a new file gets the umask's default; a read-only file is refused, not
    /// replaced. Every file is staged before the first rename, so a failure changes nothing.
    pub fn apply_update(&self, root: &Path, dry_run: bool) -> Result<Vec<(PathBuf, Change)>> {
        let changes = self.changes(root);
        let summary = changes.iter().map(|(f, c)| (f.path.clone(), *c)).collect();
        if dry_run {
            return Ok(summary);
        }
        let read_only: Vec<String> = changes
            .iter()
            .filter(|(f, c)| *c == Change::Updated && fs::metadata(root.join(&f.path)).is_ok_and(|m| m.permissions().readonly()))
            .map(|(f, _)| f.path.display().to_string())
            .collect();
        if !read_only.is_empty() {
            bail!(
                "{} read-only, so create-mcpay leaves {} as {} (nothing was written); make {} writable (chmod u+w {}) and run it again",
                if read_only.len() == 1 { format!("{} is", read_only[0]) } else { format!("{} are", read_only.join(", ")) },
                if read_only.len() == 1 { "it" } else { "them" },
                if read_only.len() == 1 { "it is" } else { "they are" },
                if read_only.len() == 1 { "it" } else { "them" },
                read_only.join(" ")
            );
        }
        let mut staged = Vec::new();
        for (f, _) in &changes {
            let path = root.join(&f.path);
            let dir = path.parent().expect("a file has a parent");
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let mut builder = tempfile::Builder::new();
            builder.prefix(".create-mcpay-");
            #[cfg(unix)]
            builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
            let mut tmp = builder.tempfile_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
            std::io::Write::write_all(&mut tmp, &f.contents)?;
            if let Ok(meta) = fs::metadata(&path) {
                fs::set_permissions(tmp.path(), meta.permissions())
                    .with_context(|| format!("cannot keep the mode of {}", path.display()))?;
            }
            staged.push((tmp, path));
        }
        for (tmp, path) in staged {
            tmp.persist(&path).with_context(|| format!("cannot replace {}", path.display()))?;
        }
        Ok(summary)
    }

    /// Generated files (and the manifest's handlers) that differ from what is on disk, with the
    /// expected contents.
    pub fn stale(&self, root: &Path) -> Vec<Stale<'_>> {
        let mut out = Vec::new();
        for f in &self.files {
            let current = fs::read(root.join(&f.path)).ok();
            let why = match (f.kind, &current) {
                (FileKind::Generated, None) => "missing",
                (FileKind::Generated, Some(old)) if *old != f.contents => "differs from mcpay.toml",
                (FileKind::Handler, None) => "missing handler",
                _ => continue,
            };
            out.push(Stale { file: f, why, current });
        }
        out
    }
}

/// A file `check` reports: what the plan has, why, and what is on disk.
pub struct Stale<'a> {
    pub file: &'a PlannedFile,
    pub why: &'static str,
    pub current: Option<Vec<u8>>,
}

/// Refuses a destination that is a file, or a non-empty directory without `force`. Returns the
/// entries of an existing directory. Called before any prompt, and again before writing.
pub fn check_destination(dest: &Path, force: bool) -> Result<Vec<PathBuf>> {
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
    Ok(occupied)
}

fn staging_dir(inside: &Path, mode: u32) -> Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".create-mcpay-");
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(mode));
    #[cfg(not(unix))]
    let _ = mode;
    builder.tempdir_in(inside).with_context(|| {
        format!("cannot create a temporary directory in {} (is it writable?)", inside.display())
    })
}
