//! The embedded templates and how a spec becomes a plan of files.
//!
//! `templates/shared/` is rendered into every target; `templates/<target>/` mirrors the tree it
//! generates and wins over a shared file at the same path. Naming rules:
//! - `NAME.tera` is rendered with Tera (the spec is the context); every other file is copied as is;
//! - a path part `__endpoint__` is rendered once per endpoint (the endpoint is `endpoint` in the
//!   context) and makes a handler: the user's file, created once, never overwritten;
//! - a path under a `generated/` folder is generated: regenerated whole by `sync`;
//! - a file name starting with one `_` is output with a `.` (`_gitignore` → `.gitignore`), so that
//!   packaging keeps it;
//! - a file under `_partials/` is not output: it is a piece other templates include by its full
//!   name (`{% include "worker/_partials/x.md.tera" %}`), e.g. a README section two targets share.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow};
use include_dir::{Dir, File, include_dir};
use tera::{Context, Kwargs, State, Tera, TeraResult, Value};

use crate::plan::{FileKind, Plan, PlannedFile};
use crate::spec::{GENERATED_HEADER, Spec};

static TEMPLATES: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/templates");

const ENDPOINT_PART: &str = "__endpoint__";
const TERA_SUFFIX: &str = ".tera";
/// Template pieces that are included, not output.
const PARTIALS_DIR: &str = "_partials/";
/// The manifest is written from the edited TOML document, not rendered.
const MANIFEST_TEMPLATE: &str = "shared/mcpay.toml";

/// The default manifest every new project starts from (unless --from names another).
pub fn default_manifest() -> &'static str {
    TEMPLATES
        .get_file(MANIFEST_TEMPLATE)
        .and_then(File::contents_utf8)
        .expect("templates/shared/mcpay.toml is embedded")
}

/// Targets built on another target's tree: the base's files come first and the target's own files
/// override them (the `mpp` gateway is the `worker` gateway plus payments and a sandbox).
const EXTENDS: &[(&str, &str)] = &[("mpp", "worker")];

/// The template folders of a target, base first.
fn layers_of(target: &str) -> Vec<&str> {
    let mut chain = vec![target];
    while let Some((_, base)) = EXTENDS.iter().find(|(t, _)| t == chain.last().unwrap()) {
        chain.push(base);
    }
    chain.reverse();
    chain
}

/// Targets that have templates.
pub fn available_targets() -> Vec<&'static str> {
    TEMPLATES
        .dirs()
        .filter_map(|d| d.path().to_str())
        .filter(|name| *name != "shared")
        .collect()
}

fn all_files<'a>(dir: &'a Dir<'a>, out: &mut Vec<&'a File<'a>>) {
    for f in dir.files() {
        out.push(f);
    }
    for d in dir.dirs() {
        all_files(d, out);
    }
}

/// The template files of a target: (path inside the target's tree, file), target files overriding
/// shared ones; partials included.
fn target_files(target: &str) -> Result<Vec<(String, &'static File<'static>)>> {
    let mut layers = vec![TEMPLATES.get_dir("shared").expect("shared templates")];
    for name in layers_of(target) {
        layers.push(TEMPLATES.get_dir(name).ok_or_else(|| anyhow!("no templates for target {name:?}"))?);
    }
    let mut files: Vec<(String, &'static File<'static>)> = Vec::new();
    for base in layers {
        let mut found = Vec::new();
        all_files(base, &mut found);
        for f in found {
            let full = f.path().to_str().expect("template paths are UTF-8");
            if full == MANIFEST_TEMPLATE {
                continue;
            }
            let rel = full.strip_prefix(base.path().to_str().unwrap()).unwrap().trim_start_matches('/');
            files.retain(|(p, _)| p != rel);
            files.push((rel.to_string(), f));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

fn json_filter(v: Value, _: Kwargs, _: &State) -> TeraResult<String> {
    serde_json::to_string(&v).map_err(|e| tera::Error::message(e.to_string()))
}

/// A Rust string literal (Debug formatting escapes exactly as Rust source needs).
fn rust_filter(v: Value, _: Kwargs, _: &State) -> TeraResult<String> {
    match v.as_str() {
        Some(s) => Ok(format!("{s:?}")),
        None => Err(tera::Error::message(format!("the rust filter takes a string, not {}", v.name()))),
    }
}

/// A Tera instance holding every `.tera` template of all targets (parsed by the tests).
pub fn engine() -> Result<Tera> {
    let mut files = Vec::new();
    all_files(&TEMPLATES, &mut files);
    engine_with(files)
}

/// A Tera instance holding the `.tera` templates among `files`, autoescape off.
fn engine_with<'a>(files: impl IntoIterator<Item = &'a File<'a>>) -> Result<Tera> {
    let mut tera = Tera::new();
    tera.autoescape_on(Vec::<&str>::new());
    tera.register_filter("json", json_filter);
    tera.register_filter("rust", rust_filter);
    let mut sources = Vec::new();
    for f in files {
        let name = f.path().to_str().expect("template paths are UTF-8");
        if name.ends_with(TERA_SUFFIX) {
            let text = f.contents_utf8().with_context(|| format!("template {name} is not UTF-8"))?;
            sources.push((name, text));
        }
    }
    // One batch: a template may include a partial that sorts after it.
    tera.add_raw_templates(sources).map_err(|e| anyhow!("a template does not parse: {e}"))?;
    Ok(tera)
}

/// Output path of a template path (without endpoint substitution).
fn output_path(rel: &str) -> String {
    let rel = rel.strip_suffix(TERA_SUFFIX).unwrap_or(rel);
    let mut parts: Vec<String> = rel.split('/').map(str::to_string).collect();
    if let Some(last) = parts.last_mut() {
        if last.starts_with('_') && !last.starts_with("__") {
            *last = format!(".{}", &last[1..]);
        }
    }
    parts.join("/")
}

fn kind_of(rel: &str) -> FileKind {
    if rel.contains(ENDPOINT_PART) {
        FileKind::Handler
    } else if rel.split('/').any(|p| p == "generated") {
        FileKind::Generated
    } else {
        FileKind::Scaffold
    }
}

fn render_one(tera: &Tera, file: &File, ctx: &Context) -> Result<Vec<u8>> {
    let name = file.path().to_str().unwrap();
    if name.ends_with(TERA_SUFFIX) {
        let out = tera
            .render(name, ctx)
            .map_err(|e| anyhow!("rendering {name} failed: {e}"))?;
        Ok(out.into_bytes())
    } else {
        Ok(file.contents().to_vec())
    }
}

/// Renders the whole project of `spec`, plus `mcpay.toml` with the given text.
pub fn render(spec: &Spec, manifest_text: &str) -> Result<Plan> {
    let templates = target_files(&spec.project.target)?;
    // Parse only this target's templates (a project renders in milliseconds).
    let tera = engine_with(templates.iter().map(|(_, f)| *f))?;
    let base = Context::from_serialize(spec).map_err(|e| anyhow!("template context: {e}"))?;
    let mut files = vec![PlannedFile {
        path: PathBuf::from(crate::manifest::FILE_NAME),
        contents: manifest_text.as_bytes().to_vec(),
        kind: FileKind::Manifest,
    }];
    for (rel, file) in templates {
        if rel.starts_with(PARTIALS_DIR) {
            continue;
        }
        let kind = kind_of(&rel);
        let out = output_path(&rel);
        if kind == FileKind::Handler {
            for ep in spec.endpoints.iter().filter(|ep| ep.builtin.is_none()) {
                let mut ctx = base.clone();
                ctx.insert("endpoint", ep);
                files.push(PlannedFile {
                    path: PathBuf::from(out.replace(ENDPOINT_PART, &ep.name)),
                    contents: render_one(&tera, file, &ctx)?,
                    kind,
                });
            }
        } else {
            let contents = render_one(&tera, file, &base)?;
            if kind == FileKind::Generated && !String::from_utf8_lossy(&contents).contains(GENERATED_HEADER) {
                return Err(anyhow!("template {rel} is generated but its output lacks the @generated header"));
            }
            files.push(PlannedFile { path: PathBuf::from(out), contents, kind });
        }
    }
    Ok(Plan { files })
}

/// Where the handlers of a target live and their file extension, for spotting orphaned handlers.
pub fn handler_location(target: &str) -> Option<(PathBuf, String)> {
    let files = target_files(target).ok()?;
    let (rel, _) = files.iter().find(|(rel, _)| rel.contains(ENDPOINT_PART))?;
    let out = output_path(rel);
    let path = Path::new(&out);
    let file_name = path.file_name()?.to_str()?;
    let ext = file_name.strip_prefix(ENDPOINT_PART)?.to_string();
    Some((path.parent()?.to_path_buf(), ext))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;

    #[test]
    fn every_template_parses() {
        engine().unwrap();
    }

    fn example_manifests() -> Vec<(PathBuf, String)> {
        let mut out = vec![(PathBuf::from("templates/shared/mcpay.toml"), default_manifest().to_string())];
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                out.push((path.clone(), std::fs::read_to_string(&path).unwrap()));
            }
        }
        out
    }

    /// Every template of every available target renders against every example manifest.
    #[test]
    fn every_template_renders_against_every_example() {
        for (path, text) in example_manifests() {
            for target in available_targets() {
                let mut doc: toml_edit::DocumentMut = text.parse().unwrap();
                manifest::set_dotted(&mut doc, "project.target", target).unwrap();
                let (_, m) = manifest::parse(&doc.to_string(), &path).unwrap();
                m.validate(&path).unwrap();
                let spec = Spec::from_manifest(&m);
                let plan = render(&spec, &doc.to_string())
                    .unwrap_or_else(|e| panic!("{} with target {target}: {e:#}", path.display()));
                let handlers = plan.files.iter().filter(|f| f.kind == FileKind::Handler).count();
                assert!(spec.endpoints.len() >= m.endpoints.len());
                assert_eq!(handlers, m.endpoints.len(), "one handler per endpoint");
                for f in &plan.files {
                    let text = String::from_utf8_lossy(&f.contents);
                    assert!(!text.contains("{{") || !f.path.to_string_lossy().ends_with(".ts") || f.kind == FileKind::Scaffold,
                        "{} looks unrendered", f.path.display());
                    assert!(!text.contains(ENDPOINT_PART), "{} mentions {ENDPOINT_PART}", f.path.display());
                }
            }
        }
    }

    /// The same manifest always gives the same bytes (`check` depends on it): maps keep their order.
    #[test]
    fn rendering_is_deterministic() {
        for target in available_targets() {
            let mut doc: toml_edit::DocumentMut = default_manifest().parse().unwrap();
            manifest::set_dotted(&mut doc, "project.target", target).unwrap();
            let (_, m) = manifest::parse(&doc.to_string(), Path::new("mcpay.toml")).unwrap();
            let spec = Spec::from_manifest(&m);
            let first = render(&spec, &doc.to_string()).unwrap();
            for _ in 0..20 {
                let again = render(&spec, &doc.to_string()).unwrap();
                for (a, b) in first.files.iter().zip(&again.files) {
                    assert!(a.contents == b.contents, "{target}: {} renders differently", a.path.display());
                }
            }
        }
    }

    #[test]
    fn layers() {
        assert_eq!(layers_of("worker"), ["worker"]);
        assert_eq!(layers_of("mpp"), ["worker", "mpp"]);
    }

    #[test]
    fn output_names() {
        assert_eq!(output_path("_gitignore"), ".gitignore");
        assert_eq!(output_path("src/__endpoint__.ts.tera"), "src/__endpoint__.ts");
        assert_eq!(output_path("Cargo.toml.tera"), "Cargo.toml");
        assert_eq!(kind_of("src/generated/manifest.ts.tera"), FileKind::Generated);
        assert_eq!(kind_of("src/handlers/__endpoint__.ts.tera"), FileKind::Handler);
        assert_eq!(kind_of("src/index.ts"), FileKind::Scaffold);
    }
}
