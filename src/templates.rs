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
//! - a file under `shared/_partials/` is not output: it is a piece other templates include by its
//!   full name (`{% include "shared/_partials/x.md.tera" %}`), e.g. a README section two targets
//!   share.
//!
//! A target built on another ([`Target::base`]) gets the base's files first, its own files
//! overriding them, less the base files it drops ([`Target::drops`]). A rendered `Cargo.lock` gets
//! the project's own package moved to its sorted place ([`crate::lockfile`]).

use std::path::PathBuf;

use anyhow::{Context as _, Result, anyhow};
use include_dir::{Dir, File, include_dir};
use tera::{Context, Kwargs, State, Tera, TeraResult, Value};

use crate::plan::{FileKind, Plan, PlannedFile};
use crate::spec::{GENERATED_HEADER, Spec};
use crate::target::Target;

static TEMPLATES: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/templates");

const ENDPOINT_PART: &str = "__endpoint__";
const TERA_SUFFIX: &str = ".tera";
/// Template pieces that are included, not output.
const PARTIALS_DIR: &str = "_partials/";
/// The folder rendered into every target.
const SHARED: &str = "shared";
/// The manifest is written from the edited TOML document, not rendered.
const MANIFEST_TEMPLATE: &str = "shared/mcpay.toml";

/// The default manifest every new project starts from (unless --from names another).
pub fn default_manifest() -> &'static str {
    TEMPLATES
        .get_file(MANIFEST_TEMPLATE)
        .and_then(File::contents_utf8)
        .expect("templates/shared/mcpay.toml is embedded")
}

/// Folders of templates/ that are targets (everything but `shared`).
pub fn template_target_dirs() -> Vec<&'static str> {
    TEMPLATES
        .dirs()
        .filter_map(|d| d.path().to_str())
        .filter(|name| *name != SHARED)
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

/// The template files of a target: (path inside the target's tree, file), shared first, then
/// each layer overriding the files before it; partials included, dropped base files left out.
fn target_files(target: Target) -> Result<Vec<(String, &'static File<'static>)>> {
    let mut layers = vec![TEMPLATES.get_dir(SHARED).expect("shared templates")];
    for layer in target.layers() {
        layers.push(TEMPLATES.get_dir(layer.name()).ok_or_else(|| anyhow!("no templates for target {layer}"))?);
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
    for dropped in target.drops() {
        if !files.iter().any(|(p, _)| p == dropped) {
            return Err(anyhow!("target {target} drops {dropped}, which no layer below it has"));
        }
        files.retain(|(p, _)| p != dropped);
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
    if let Some(last) = parts.last_mut()
        && last.starts_with('_')
        && !last.starts_with("__")
    {
        *last = format!(".{}", &last[1..]);
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
    let templates = target_files(spec.project.target)?;
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
            for ep in spec.endpoints.iter().filter(|ep| !ep.is_builtin) {
                let mut ctx = base.clone();
                ctx.insert("endpoint", ep);
                files.push(PlannedFile {
                    path: PathBuf::from(out.replace(ENDPOINT_PART, &ep.name)),
                    contents: render_one(&tera, file, &ctx)?,
                    kind,
                });
            }
        } else {
            let mut contents = render_one(&tera, file, &base)?;
            if out == crate::lockfile::FILE_NAME {
                let text = String::from_utf8(contents).map_err(|_| anyhow!("{rel} renders to invalid UTF-8"))?;
                contents = crate::lockfile::place_own_package(&text, &spec.project.name)
                    .map_err(|e| anyhow!("{rel}: {e}"))?
                    .into_bytes();
            }
            if kind == FileKind::Generated && !String::from_utf8_lossy(&contents).contains(GENERATED_HEADER) {
                return Err(anyhow!("template {rel} is generated but its output lacks the @generated header"));
            }
            files.push(PlannedFile { path: PathBuf::from(out), contents, kind });
        }
    }
    let mut paths: Vec<&PathBuf> = files.iter().map(|f| &f.path).collect();
    paths.sort();
    if let Some(w) = paths.windows(2).find(|w| w[0] == w[1]) {
        return Err(anyhow!("two templates of target {} render to {} (e.g. NAME and NAME.tera); keep one", spec.project.target, w[0].display()));
    }
    Ok(Plan { files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;
    use std::path::Path;

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
            for target in template_target_dirs() {
                let mut doc: toml_edit::DocumentMut = text.parse().unwrap();
                manifest::set_dotted(&mut doc, "project.target", &format!("{target:?}")).unwrap();
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
        for target in template_target_dirs() {
            let mut doc: toml_edit::DocumentMut = default_manifest().parse().unwrap();
            manifest::set_dotted(&mut doc, "project.target", &format!("{target:?}")).unwrap();
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

    /// The `Target` enum and the folders of templates/ agree: one folder per target, each target's
    /// handler template where `Target::handler_location` says, built-in handlers and dropped
    /// files present.
    #[test]
    fn the_target_enum_and_templates_agree() {
        let mut dirs = template_target_dirs();
        dirs.sort();
        let mut names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
        names.sort();
        assert_eq!(dirs, names);
        for &t in Target::ALL {
            let files = target_files(t).unwrap();
            let handlers: Vec<String> =
                files.iter().filter(|(r, _)| r.contains(ENDPOINT_PART)).map(|(r, _)| output_path(r)).collect();
            let (dir, ext) = t.handler_location();
            assert_eq!(handlers, [format!("{dir}/{ENDPOINT_PART}{ext}")], "{t}");
            for b in t.builtin_endpoints() {
                let module = format!("src/{}.ts", b.module.trim_start_matches("../"));
                assert!(files.iter().any(|(r, _)| *r == module), "{t}: no {module}");
            }
            for d in t.drops() {
                assert!(!files.iter().any(|(r, _)| r == d), "{t} still ships {d}");
            }
            for (rel, f) in &files {
                if rel.contains(PARTIALS_DIR) {
                    assert!(f.path().starts_with("shared/_partials"), "{t}: {} — partials live in shared/_partials/", f.path().display());
                }
            }
        }
    }

    /// Deep-merges JSON objects (non-null values win), so one object shows every key any of them has.
    fn merged(values: impl IntoIterator<Item = serde_json::Value>) -> serde_json::Value {
        let mut out = serde_json::Value::Null;
        for v in values {
            out = match (out, v) {
                (serde_json::Value::Object(mut a), serde_json::Value::Object(b)) => {
                    for (k, bv) in b {
                        let av = a.remove(&k).unwrap_or(serde_json::Value::Null);
                        a.insert(k, merged([av, bv]));
                    }
                    serde_json::Value::Object(a)
                }
                (a, serde_json::Value::Null) => a,
                (_, b) => b,
            };
        }
        out
    }

    /// Tera treats a missing attribute as false in `{% if %}`, so a misspelt field would pass
    /// silently (cargo-dist makes undefined variables errors). Every dotted name a template uses
    /// (`endpoint.example_field.rust_ident`, `signup.x402.network`, …) must exist in the spec of
    /// a manifest that has every optional part.
    #[test]
    fn templates_use_only_fields_the_spec_has() {
        let text = format!(
            "{}{}",
            default_manifest()
                .replace("target = \"worker\"", "target = \"mpp\"")
                .replace("enabled = false", "enabled = true")
                .replace("scopes = []", "scopes = [\"example\"]")
                .replace("# [signup.x402]", "[signup.x402]")
                .replace("# [signup.mpp]", "[signup.mpp]"),
            manifest::MPP_SECTION
        );
        let (_, m) = manifest::parse(&text, Path::new("mcpay.toml")).unwrap();
        m.validate(Path::new("mcpay.toml")).unwrap();
        let spec = serde_json::to_value(Spec::from_manifest(&m)).unwrap();
        let endpoints: Vec<serde_json::Value> = spec["endpoints"].as_array().unwrap().clone();
        let ep = merged(endpoints.clone());
        let fields = merged(endpoints.iter().flat_map(|e| {
            e["input"].as_array().unwrap().clone().into_iter().chain(std::iter::once(e["example_field"].clone()))
        }));
        let roots: Vec<(&str, serde_json::Value)> = vec![
            ("project", spec["project"].clone()),
            ("gateway", spec["gateway"].clone()),
            ("signup", spec["signup"].clone()),
            ("mpp", spec["mpp"].clone()),
            ("ep", ep.clone()),
            ("endpoint", ep),
            ("f", fields),
            ("t", spec["field_types"][0].clone()),
        ];
        assert!(!spec["signup"]["x402"].is_null() && !spec["signup"]["mpp"].is_null());
        let mut files = Vec::new();
        all_files(&TEMPLATES, &mut files);
        let mut unknown = Vec::new();
        for f in files.iter().filter(|f| f.path().to_string_lossy().ends_with(TERA_SUFFIX)) {
            let text = f.contents_utf8().unwrap();
            let mut rest = text;
            while let Some(start) = rest.find("{{").into_iter().chain(rest.find("{%")).min() {
                let close = if rest[start..].starts_with("{{") { "}}" } else { "%}" };
                let end = rest[start..].find(close).map_or(rest.len(), |e| start + e);
                let tag = &rest[start + 2..end];
                // Names outside string literals.
                let mut in_str = false;
                let mut token = String::new();
                for c in tag.chars().chain(std::iter::once(' ')) {
                    if c == '"' {
                        in_str = !in_str;
                        token.clear();
                    } else if !in_str && (c.is_ascii_alphanumeric() || c == '_' || c == '.') {
                        token.push(c);
                    } else {
                        let first = token.split('.').next().unwrap_or("");
                        if let Some((_, root)) = roots.iter().find(|(r, _)| *r == first) {
                            let mut at = root;
                            for part in token.split('.').skip(1) {
                                match at.get(part) {
                                    Some(v) => at = v,
                                    None if at.is_object() || at.is_null() => {
                                        unknown.push(format!("{}: {token}", f.path().display()));
                                        break;
                                    }
                                    None => break,
                                }
                            }
                        }
                        token.clear();
                    }
                }
                rest = &rest[end.min(rest.len())..];
                if rest.len() >= 2 {
                    rest = &rest[2..];
                } else {
                    break;
                }
            }
        }
        assert_eq!(unknown, Vec::<String>::new(), "templates use fields the spec does not have");
    }

    /// Templates are embedded byte for byte: LF only (`.gitattributes` keeps checkouts so).
    #[test]
    fn templates_have_lf_line_endings() {
        let mut files = Vec::new();
        all_files(&TEMPLATES, &mut files);
        for f in files {
            assert!(!f.contents().contains(&b'\r'), "{} has CR line endings", f.path().display());
        }
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
