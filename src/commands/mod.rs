pub mod add_endpoint;
pub mod check;
pub mod new;
pub mod sync;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use toml_edit::DocumentMut;

use crate::manifest::{self, Manifest};
use crate::plan::Plan;
use crate::spec::Spec;
use crate::templates;

/// Targets whose templates have landed. The others are accepted by the parser but refused here
/// with a clear message until their templates arrive.
pub fn ensure_target_available(target: &str) -> Result<()> {
    if templates::available_targets().contains(&target) {
        return Ok(());
    }
    bail!(
        "the {target:?} target is not yet available in create-mcpay {}; available now: {}",
        env!("CARGO_PKG_VERSION"),
        templates::available_targets().join(", ")
    )
}

/// An existing project: its root, manifest text, parsed document and manifest.
pub struct Project {
    pub root: PathBuf,
    pub manifest_path: PathBuf,
    pub doc: DocumentMut,
    pub manifest: Manifest,
}

impl Project {
    pub fn open(start: &Path) -> Result<Project> {
        let manifest_path = manifest::find_upward(start)?;
        let root = manifest_path.parent().expect("a file has a parent").to_path_buf();
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("cannot read {}", manifest_path.display()))?;
        let (doc, manifest) = manifest::parse(&text, &manifest_path)?;
        manifest.validate(&manifest_path)?;
        ensure_target_available(&manifest.project.target)?;
        Ok(Project { root, manifest_path, doc, manifest })
    }

    /// The plan this project's manifest gives (with `doc` as the manifest's text).
    pub fn plan(&self) -> Result<Plan> {
        templates::render(&Spec::from_manifest(&self.manifest), &self.doc.to_string())
    }

    /// Handler files on disk with no endpoint in the manifest.
    pub fn orphan_handlers(&self) -> Vec<PathBuf> {
        let Some((dir, ext)) = templates::handler_location(&self.manifest.project.target) else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(self.root.join(&dir)) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let stem = name.strip_suffix(&ext)?;
                (!self.manifest.endpoints.contains_key(stem)).then(|| dir.join(&name))
            })
            .collect();
        out.sort();
        out
    }
}
