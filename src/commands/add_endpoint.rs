//! `create-mcpay add-endpoint NAME --price MCENTS`: edit mcpay.toml (comments kept), regenerate,
//! and create the one new handler. Only what was given is written to mcpay.toml; any validation
//! error changes nothing.

use anyhow::{Result, bail};
use indexmap::IndexMap;

use crate::cli::AddEndpointArgs;
use crate::manifest::{self, Endpoint};
use crate::names;
use crate::project::Project;
use crate::ui::Ui;

pub fn run(args: &AddEndpointArgs, ui: &Ui) -> Result<()> {
    let mut project = Project::open(&args.project.project)?;
    names::check_endpoint_name(&args.name).map_err(anyhow::Error::msg)?;
    if let Some(existing) = project.manifest.endpoints.get(&args.name) {
        bail!(
            "endpoint {:?} already exists in {} (price {} mcents); change it there and run `create-mcpay sync`, or pick another name",
            args.name,
            project.manifest_path.display(),
            existing.price_mcents
        );
    }
    let target = project.manifest.project.target;
    let taken = target.builtin_endpoints().iter().map(|b| (b.name, "the built-in endpoint"));
    let declared = project.manifest.endpoints.keys().map(|n| (n.as_str(), "the endpoint"));
    for (other, what) in taken.chain(declared) {
        if let Some(ident) = names::colliding_identifier(other, &args.name) {
            bail!(
                "endpoint {:?} would collide with {what} {other:?}: both become `{ident}` in the generated code; pick another name",
                args.name
            );
        }
    }
    if !(1..=manifest::MAX_PRICE_MCENTS).contains(&args.price) {
        bail!(
            "--price {}: a price is 1 to {} mcents per call (1 mcent = 1/1000 cent; 100000 mcents = $1)",
            args.price,
            manifest::MAX_PRICE_MCENTS
        );
    }
    let mut input = IndexMap::new();
    for raw in &args.inputs {
        let Some((field, ty)) = raw.split_once('=') else {
            bail!("--input {raw:?}: expected FIELD=TYPE, e.g. --input query=string");
        };
        if input.insert(field.to_string(), ty.to_string()).is_some() {
            bail!("--input {raw:?}: field {field:?} is given twice");
        }
    }
    let endpoint = Endpoint {
        price_mcents: args.price,
        xp: args.xp,
        scope: args.scope.clone(),
        description: args.description.clone(),
        rate_limit_per_minute: args.rate_limit.map(u64::from),
        timeout_ms: None,
        input: (!input.is_empty()).then_some(input),
    };
    manifest::insert_endpoint(&mut project.doc, &args.name, &endpoint);
    // Re-read the edited manifest: the whole of it must still be valid before anything is written.
    let (doc, manifest) = manifest::parse(&project.doc.to_string(), &project.manifest_path)?;
    manifest.validate(&project.manifest_path)?;
    project.doc = doc;
    project.manifest = manifest;

    let plan = project.plan()?;
    let changes = plan.apply_update(&project.root, args.dry_run)?;
    super::sync::report(ui, &project, &changes, args.dry_run);
    if !args.dry_run {
        let served = endpoint.resolved(&args.name, &project.manifest.gateway);
        ui.ok(&format!(
            "POST /v1/{} now costs {} mcents (scope {:?}); write its logic in the handler file above",
            args.name, served.price_mcents, served.scope
        ));
    }
    Ok(())
}
