//! `create-mcpay [DIR]`: arguments (+ prompts) → a validated spec → a plan → written atomically.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::CommandFactory;
use toml_edit::DocumentMut;

use crate::cli::{Cli, NewArgs, Target};
use crate::manifest::{self, Endpoint};
use crate::names;
use crate::plan;
use crate::spec::Spec;
use crate::templates;
use crate::ui::Ui;

const DEFAULT_DIR: &str = "my-api";

pub fn run(args: &NewArgs, ui: &Ui) -> Result<()> {
    if let Some(dir) = &args.dir {
        refuse_mistyped_subcommand(dir)?;
    }
    // 1. Where, and under what name (asked again until the name is valid).
    let dir: PathBuf = match &args.dir {
        Some(d) => d.clone(),
        None if args.yes => PathBuf::from(DEFAULT_DIR),
        None => PathBuf::from(ui.input(
            "Project directory",
            DEFAULT_DIR,
            "the directory as the first argument (e.g. `create-mcpay my-api`), or --yes for \"my-api\"",
            |d| project_name(Path::new(d)).map(|_| ()).map_err(|e| e.to_string()),
        )?),
    };
    let name = project_name(&dir)?;
    // A non-empty directory is refused before any question is asked.
    plan::check_destination(&dir, args.force)?;

    // 2. The manifest document: --from FILE or the default, then the command line's changes.
    let (mut doc, origin) = match &args.from {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --from {}", path.display()))?;
            (parse_doc(&text, path)?, path.clone())
        }
        None => (parse_doc(templates::default_manifest(), Path::new("mcpay.toml"))?, PathBuf::from("mcpay.toml")),
    };
    for define in &args.defines {
        let key = define.split_once('=').map_or(define.as_str(), |(k, _)| k).trim();
        match key {
            "project.target" => bail!("-d {define}: choose the target with --target (-t), e.g. -t axum"),
            "project.name" => bail!("-d {define}: the project name is the directory's last component; name the directory instead"),
            _ => {}
        }
    }
    let from_target = args.from.as_ref().and_then(|_| {
        doc.get("project").and_then(|p| p.get("target")).and_then(|t| t.as_str()).map(str::to_string)
    });
    let target = match (args.target, from_target) {
        (Some(t), _) => t,
        (None, Some(t)) => Target::from_name(&t).with_context(|| {
            format!("{}: project.target {t:?} is not a target; use {} (or pass --target)", origin.display(), Target::quoted_list())
        })?,
        (None, None) if args.yes => Target::Worker,
        (None, None) => {
            let items: Vec<(&str, &str)> = Target::ALL.iter().map(|t| (t.name(), t.label())).collect();
            let names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
            let i = ui.select("Target", &items, &format!("--target {} (or --yes for worker)", names.join("|")))?;
            Target::ALL[i]
        }
    };

    if target == Target::Mpp && doc.get("mpp").is_none() {
        doc = parse_doc(&format!("{}{}", doc, manifest::MPP_SECTION), &origin)?;
    }
    manifest::set_dotted(&mut doc, "project.name", &toml_string(&name))?;
    manifest::set_dotted(&mut doc, "project.target", &toml_string(target.name()))?;
    for define in &args.defines {
        let (key, value) = define
            .split_once('=')
            .with_context(|| format!("-d {define:?}: expected KEY=VALUE, e.g. -d gateway.key_prefix=acme_"))?;
        manifest::set_dotted(&mut doc, key.trim(), value)?;
    }
    if !args.endpoints.is_empty() {
        if args.from.is_none() {
            manifest::clear_endpoints(&mut doc);
        }
        let existing = manifest::parse(&doc.to_string(), &origin)?.1.endpoints;
        for raw in &args.endpoints {
            let (ep_name, ep) = parse_endpoint_flag(raw)?;
            if existing.contains_key(&ep_name) || doc["endpoints"].get(&ep_name).is_some() {
                bail!("--endpoint {raw}: an endpoint named {ep_name:?} is already defined; use another name");
            }
            manifest::insert_endpoint(&mut doc, &ep_name, &ep);
        }
    }

    // 3. Validate, then plan.
    let text = doc.to_string();
    let (_, m) = manifest::parse(&text, &origin)?;
    m.validate(&origin)?;
    let plan = templates::render(&Spec::from_manifest(&m), &text)?;

    if args.dry_run {
        super::print_plan(ui, &plan, &dir);
        return Ok(());
    }

    // 4. Write atomically, then git.
    plan.write_new(&dir, args.force)?;
    ui.ok(&format!("Created {} ({target}, {} files) in {}", name, plan.files.len(), dir.display()));
    if !args.no_git {
        init_git(&dir, ui);
    }
    ui.plain("");
    ui.heading("Next steps:");
    ui.plain(&format!("  cd {}", dir.display()));
    for step in target.next_steps() {
        ui.plain(&format!("  {step}"));
    }
    Ok(())
}

/// `create-mcpay snyc` is a typo of `sync`, not a project named "snyc": refuse it, as cargo does,
/// before anything is created. `./snyc` names the directory without doubt.
fn refuse_mistyped_subcommand(dir: &Path) -> Result<()> {
    let Some(raw) = dir.to_str() else { return Ok(()) };
    if raw.contains(std::path::MAIN_SEPARATOR) || raw.contains('/') || raw.len() < 3 || dir.exists() {
        return Ok(());
    }
    let cmd = Cli::command();
    let best = cmd
        .get_subcommands()
        .flat_map(|c| std::iter::once(c.get_name()).chain(c.get_all_aliases()))
        .filter(|name| *name != "help")
        .map(|name| (strsim::osa_distance(raw, name), name))
        .filter(|(d, name)| *d > 0 && *d <= 2.min(name.len() / 3 + 1))
        .min();
    if let Some((_, name)) = best {
        bail!(
            "unrecognized subcommand {raw:?}; did you mean `create-mcpay {name}`? (To create a project in a directory named {raw:?}, pass ./{raw}.) Nothing was created."
        );
    }
    Ok(())
}

fn parse_doc(text: &str, origin: &Path) -> Result<DocumentMut> {
    text.parse().with_context(|| format!("{} is not valid TOML", origin.display()))
}

fn toml_string(s: &str) -> String {
    toml_edit::Value::from(s).to_string()
}

/// The project name is the directory's last component.
fn project_name(dir: &Path) -> Result<String> {
    let base = if dir.as_os_str() == "." {
        std::env::current_dir()?
    } else {
        dir.to_path_buf()
    };
    let name = base
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("cannot take a project name from {}", dir.display()))?
        .to_string();
    names::check_project_name(&name).map_err(|e| anyhow::anyhow!("{e} (the name is the directory's last component)"))?;
    Ok(name)
}

/// `NAME:PRICE_MCENTS[:SCOPE]`: only what is given goes into mcpay.toml (defaults stay defaults).
pub fn parse_endpoint_flag(raw: &str) -> Result<(String, Endpoint)> {
    let parts: Vec<&str> = raw.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        bail!("--endpoint {raw:?}: expected NAME:PRICE_MCENTS[:SCOPE], e.g. --endpoint search:250:read");
    }
    let name = parts[0].to_string();
    names::check_endpoint_name(&name).map_err(|e| anyhow::anyhow!("--endpoint {raw:?}: {e}"))?;
    let price: u64 = parts[1]
        .parse()
        .map_err(|_| anyhow::anyhow!("--endpoint {raw:?}: the price {:?} is not a whole number of mcents", parts[1]))?;
    let scope = parts.get(2).map(|s| s.to_string());
    Ok((name, Endpoint { price_mcents: price, scope, ..Endpoint::default() }))
}

fn init_git(dir: &Path, ui: &Ui) {
    if dir.join(".git").exists() {
        return;
    }
    match Command::new("git").arg("init").arg("-q").arg(dir).status() {
        Ok(s) if s.success() => ui.ok("Initialised a git repository"),
        Ok(s) => ui.warn(&format!("`git init` failed ({s}); the project is written, run it yourself or pass --no-git")),
        Err(_) => ui.warn("git is not installed; the project is written without a repository (pass --no-git to skip this step)"),
    }
}
