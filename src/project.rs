//! An existing project: the directory holding mcpay.toml, its manifest, and the plan it gives.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use toml_edit::DocumentMut;

use crate::manifest::{self, Manifest};
use crate::plan::Plan;
use crate::spec::Spec;
use crate::templates;

/// An existing project: its root, manifest path, parsed document and manifest.
pub struct Project {
    pub root: PathBuf,
    pub manifest_path: PathBuf,
    pub doc: DocumentMut,
    pub manifest: Manifest,
}

impl Project {
    /// The project around `start`: mcpay.toml is searched upward from there, then validated.
    pub fn open(start: &Path) -> Result<Project> {
        let manifest_path = manifest::find_upward(start)?;
        let root = manifest_path.parent().expect("a file has a parent").to_path_buf();
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("cannot read {}", manifest_path.display()))?;
        let (doc, manifest) = manifest::parse(&text, &manifest_path)?;
        manifest.validate(&manifest_path)?;
        Ok(Project { root, manifest_path, doc, manifest })
    }

    /// The plan this project's manifest gives (with `doc` as the manifest's text).
    pub fn plan(&self) -> Result<Plan> {
        templates::render(&Spec::from_manifest(&self.manifest), &self.doc.to_string())
    }

    /// Handler files on disk with no endpoint in the manifest.
    pub fn orphan_handlers(&self) -> Vec<PathBuf> {
        let (dir, ext) = self.manifest.project.target.handler_location();
        let Ok(entries) = std::fs::read_dir(self.root.join(dir)) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let stem = name.strip_suffix(ext)?;
                (!self.manifest.endpoints.contains_key(stem)).then(|| Path::new(dir).join(&name))
            })
            .collect();
        out.sort();
        out
    }
}
