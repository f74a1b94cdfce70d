//! Every clap type of the command line lives here; nothing else in the crate depends on clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Scaffold a pay-per-call API gateway for AI agents from one manifest (mcpay.toml).
#[derive(Debug, Parser)]
#[command(
    name = "create-mcpay",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  create-mcpay my-api -y\n  create-mcpay my-api -t worker --endpoint search:250:read --endpoint summarize:1200\n  create-mcpay my-api --from examples/search-api.toml --no-git\n  create-mcpay add-endpoint mytool --price 250"
)]
pub struct Cli {
    #[command(flatten)]
    pub new: NewArgs,

    /// When to use colors (NO_COLOR in the environment also turns them off).
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, global = true)]
    pub color: ColorChoice,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add a paid endpoint to the project around the current directory.
    #[command(name = "add-endpoint")]
    AddEndpoint(AddEndpointArgs),
    /// Regenerate the generated files after a hand edit of mcpay.toml.
    Sync(ProjectArgs),
    /// Exit non-zero, naming the files, when generated files differ from what mcpay.toml gives.
    Check(ProjectArgs),
    /// Run the attack suite against a running gateway that speaks docs/contract.md.
    Audit(AuditArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// Directory to create; its last component is the project name.
    pub dir: Option<PathBuf>,

    /// What to generate.
    #[arg(short, long, value_enum)]
    pub target: Option<Target>,

    /// A paid endpoint, NAME:PRICE_MCENTS[:SCOPE] (repeatable; 1 mcent = 1/1000 cent).
    #[arg(long = "endpoint", value_name = "NAME:PRICE[:SCOPE]")]
    pub endpoints: Vec<String>,

    /// Start from this manifest (for example one in examples/).
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,

    /// Accept the defaults for everything not given on the command line.
    #[arg(short = 'y', long)]
    pub yes: bool,

    /// Never prompt, even on a terminal.
    #[arg(long)]
    pub no_interactive: bool,

    /// Empty a non-empty directory first (its .git is kept).
    #[arg(long)]
    pub force: bool,

    /// Print the plan of files and write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Initialise a git repository (the default).
    #[arg(long, overrides_with = "no_git")]
    pub git: bool,

    /// Do not initialise a git repository.
    #[arg(long, overrides_with = "git")]
    pub no_git: bool,

    /// Set a manifest value, e.g. -d gateway.key_prefix=acme_ or -d project.description="Search API".
    #[arg(short = 'd', long = "define", value_name = "KEY=VALUE")]
    pub defines: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ProjectArgs {
    /// Where to look for mcpay.toml (it is searched upward from here).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub project: PathBuf,

    /// With sync: print what would change and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct AddEndpointArgs {
    /// Endpoint name: lowercase letters, digits and _, starting with a letter (served at POST /v1/NAME).
    pub name: String,

    /// Price per call in mcents (1 mcent = 1/1000 cent).
    #[arg(long, value_name = "MCENTS")]
    pub price: u64,

    /// Scope a key needs to call it (default: the endpoint name).
    #[arg(long)]
    pub scope: Option<String>,

    /// XP awarded per call (default: price / 10, at least 1).
    #[arg(long)]
    pub xp: Option<u64>,

    /// One line saying what it does (shown in /v1/pricing).
    #[arg(long)]
    pub description: Option<String>,

    /// An input field, FIELD=TYPE (string, number, integer, boolean, object, array; a trailing ? makes
    /// it optional). Repeatable. Default: query=string.
    #[arg(long = "input", value_name = "FIELD=TYPE")]
    pub inputs: Vec<String>,

    /// Requests per minute per key for this endpoint (default: gateway.default_rate_limit_per_minute).
    #[arg(long)]
    pub rate_limit: Option<u32>,

    #[command(flatten)]
    pub project: ProjectArgs,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The gateway's base URL, e.g. http://127.0.0.1:8787 or https://my-api.example.workers.dev.
    #[arg(required_unless_present = "list")]
    pub url: Option<String>,

    /// The gateway's ADMIN_KEY (scenarios mint the keys they need with it).
    #[arg(long, env = "MCPAY_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,

    /// Print the scenarios and exit.
    #[arg(long)]
    pub list: bool,

    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,

    /// Run only the scenarios whose name contains PATTERN (`*` is a wildcard), e.g. --only 'admin.*'.
    #[arg(long, value_name = "PATTERN")]
    pub only: Option<String>,

    /// ENDPOINT=JSON: a call the gateway's handler fails on (for the refund scenarios).
    #[arg(long, value_name = "ENDPOINT=JSON")]
    pub failing_call: Option<String>,

    /// A deployment of the same gateway with no ADMIN_KEY set (for the 503 scenario).
    #[arg(long, value_name = "URL")]
    pub unconfigured_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Cloudflare Worker (TypeScript) with Durable Objects.
    Worker,
    /// Rust axum server, SQLite by default, Postgres + Redis to scale out.
    Axum,
    /// MPP/Tempo compute gateway (Cloudflare Worker).
    Mpp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Worker => "worker",
            Target::Axum => "axum",
            Target::Mpp => "mpp",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
