//! `create-mcpay [DIR]`: arguments (+ prompts) → a validated spec → a plan → written atomically.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use toml_edit::DocumentMut;

use super::ensure_target_available;
use crate::cli::{NewArgs, Target};
use crate::manifest::{self, Endpoint};
use crate::names;
use crate::spec::Spec;
use crate::templates;
use crate::ui::Ui;

const DEFAULT_DIR: &str = "my-api";

pub fn run(args: &NewArgs, ui: &Ui) -> Result<()> {
    // 1. Where, and under what name.
    let dir: PathBuf = match &args.dir {
        Some(d) => d.clone(),
        None if args.yes => PathBuf::from(DEFAULT_DIR),
        None => PathBuf::from(ui.input(
            "Project directory",
            DEFAULT_DIR,
            "the directory as the first argument (e.g. `create-mcpay my-api`), or --yes for \"my-api\"",
        )?),
    };
    let name = project_name(&dir)?;

    // 2. The manifest document: --from FILE or the default, then the command line's changes.
    let (mut doc, origin) = match &args.from {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --from {}", path.display()))?;
            (parse_doc(&text, path)?, path.clone())
        }
        None => (parse_doc(templates::default_manifest(), Path::new("mcpay.toml"))?, PathBuf::from("mcpay.toml")),
    };
    let from_target = args.from.as_ref().and_then(|_| {
        doc.get("project").and_then(|p| p.get("target")).and_then(|t| t.as_str()).map(str::to_string)
    });
    let target = match (args.target, from_target) {
        (Some(t), _) => t.as_str().to_string(),
        (None, Some(t)) => t,
        (None, None) if args.yes => Target::Worker.as_str().to_string(),
        (None, None) => {
            let items = [
                ("worker", "Cloudflare Worker (TypeScript, Durable Objects)"),
                ("axum", "Rust axum server (SQLite; Postgres + Redis to scale out)"),
                ("mpp", "MPP/Tempo compute gateway (pay per execution)"),
            ];
            let i = ui.select("Target", &items, "--target worker|axum|mpp (or --yes for worker)")?;
            items[i].0.to_string()
        }
    };
    ensure_target_available(&target)?;

    if target == "mpp" && doc.get("mpp").is_none() {
        doc = parse_doc(&format!("{}{}", doc, manifest::MPP_SECTION), &origin)?;
    }
    manifest::set_dotted(&mut doc, "project.name", &toml_string(&name))?;
    manifest::set_dotted(&mut doc, "project.target", &toml_string(&target))?;
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
        plan.print(ui, &dir);
        return Ok(());
    }

    // 4. Write atomically, then git.
    plan.write_new(&dir, args.force)?;
    ui.ok(&format!("Created {} ({target}, {} files) in {}", name, plan.files.len(), dir.display()));
    if !args.no_git {
        init_git(&dir, ui);
    }
    next_steps(ui, &dir, &target);
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

/// `NAME:PRICE_MCENTS[:SCOPE]`.
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
    Ok((
        name.clone(),
        Endpoint {
            price_mcents: price,
            xp: Some(manifest::default_xp(price)),
            scope: Some(scope.unwrap_or(name)),
            description: None,
            rate_limit_per_minute: None,
            input: [("query".to_string(), "string".to_string())].into_iter().collect(),
        },
    ))
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

fn next_steps(ui: &Ui, dir: &Path, target: &str) {
    let cd = dir.display();
    ui.plain("");
    ui.heading("Next steps:");
    match target {
        "worker" => {
            ui.plain(&format!("  cd {cd}"));
            ui.plain("  npm install");
            ui.plain("  npm test                                 # the gateway's own suite, in workerd");
            ui.plain("  echo 'ADMIN_KEY=dev-admin-key' > .dev.vars && npm run dev");
            ui.plain("  npx wrangler secret put ADMIN_KEY && npm run deploy");
            ui.plain("  create-mcpay add-endpoint mytool --price 250   # sell another endpoint");
        }
        "axum" => {
            ui.plain(&format!("  cd {cd}"));
            ui.plain("  ADMIN_KEY=$(openssl rand -hex 32) cargo run   # SQLite file, nothing else needed");
            ui.plain("  cargo test                               # its own suite (TEST_DATABASE_URL/TEST_REDIS_URL add Postgres + Redis)");
            ui.plain("  create-mcpay add-endpoint mytool --price 250   # sell another endpoint");
        }
        _ => {
            ui.plain(&format!("  cd {cd}"));
            ui.plain("  npm install");
            ui.plain("  npm test                                 # payments over HTTP and MCP, sandbox, prepaid keys, in workerd");
            ui.plain("  cp .dev.vars.example .dev.vars && npm run dev");
            ui.plain("  npx wrangler secret put MPP_SECRET_KEY && npx wrangler secret put TEMPO_RECIPIENT");
            ui.plain("  create-mcpay add-endpoint mytool --price 250   # another paid tool");
        }
    }
}
