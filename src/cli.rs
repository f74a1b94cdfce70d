//! Every clap type of the command line lives here; nothing else in the crate depends on clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::target::Target;

/// Scaffold a pay-per-call API gateway for AI agents from one manifest (mcpay.toml).
#[derive(Debug, Parser)]
#[command(
    name = "create-mcpay",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  create-mcpay my-api -y\n  create-mcpay my-api -t worker --endpoint search:250:read --endpoint summarize:1200\n  create-mcpay my-api --from examples/search-api.toml --no-git\n  create-mcpay add-endpoint mytool --price 250\n  create-mcpay add-upstream weather --url https://weather.example.com/mcp --discover"
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
    /// Put a price on an MCP server that already exists: served at /mcp/NAME, billed per tools/call.
    #[command(name = "add-upstream")]
    AddUpstream(AddUpstreamArgs),
    /// Regenerate the generated files after a hand edit of mcpay.toml.
    Sync(SyncArgs),
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
    #[arg(long, conflicts_with = "no_git")]
    pub git: bool,

    /// Do not initialise a git repository.
    #[arg(long)]
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
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub project: ProjectArgs,

    /// Print what would change and write nothing.
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

    /// Scope a key needs to call it (default: the endpoint name; only a given scope is written).
    #[arg(long)]
    pub scope: Option<String>,

    /// XP awarded per call (default: price / 10, at least 1, at most 1000000; only a given value is
    /// written to mcpay.toml).
    #[arg(long)]
    pub xp: Option<u64>,

    /// One line saying what it does (shown in /v1/pricing).
    #[arg(long)]
    pub description: Option<String>,

    /// An input field, FIELD=TYPE (string, number, integer, boolean, object, array; a trailing ? makes
    /// it optional). Repeatable. Default: query=string (not written to mcpay.toml).
    #[arg(long = "input", value_name = "FIELD=TYPE")]
    pub inputs: Vec<String>,

    /// Requests per minute per key for this endpoint (default: gateway.default_rate_limit_per_minute).
    #[arg(long)]
    pub rate_limit: Option<u32>,

    #[command(flatten)]
    pub project: ProjectArgs,

    /// Print what would change and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  create-mcpay add-upstream weather --url https://weather.example.com/mcp --discover\n  create-mcpay add-upstream files --command \"npx -y @acme/files-mcp\" --price 250 --tool-price read=0\n  create-mcpay add-upstream search --url https://search.example.com/mcp --header Authorization=env:SEARCH_TOKEN")]
pub struct AddUpstreamArgs {
    /// Upstream name: lowercase letters, digits and _, starting with a letter (served at /mcp/NAME;
    /// endpoints and upstreams share their names).
    pub name: String,

    /// The URL of an MCP server, Streamable HTTP unless --sse (overridden at run time by
    /// UPSTREAM_<NAME>_URL).
    #[arg(long, value_name = "URL", required_unless_present = "command", conflicts_with = "command")]
    pub url: Option<String>,

    /// The URL is a legacy HTTP+SSE MCP server (protocol 2024-11-05, e.g. https://host/sse): written
    /// as transport = "sse". --discover finds this out by itself.
    #[arg(long, conflicts_with = "command")]
    pub sse: bool,

    /// A stdio MCP server the gateway starts and keeps alive, split like a shell would, e.g.
    /// "npx -y @acme/weather-mcp" (axum target only: a Worker cannot start processes).
    #[arg(long, value_name = "CMD ARGS…")]
    pub command: Option<String>,

    /// Price of one tools/call of a tool without a --tool-price, in mcents (1 mcent = 1/1000 cent).
    #[arg(long, value_name = "MCENTS", default_value_t = crate::manifest::DEFAULT_UPSTREAM_PRICE_MCENTS)]
    pub price: u64,

    /// The price of one tool, TOOL=MCENTS (0 = free). Repeatable.
    #[arg(long = "tool-price", value_name = "TOOL=MCENTS")]
    pub tool_prices: Vec<String>,

    /// Scope a key needs to use it (default: the upstream's name; only a given scope is written).
    #[arg(long)]
    pub scope: Option<String>,

    /// Time limit of one request to the upstream, 1 to 600 (default: 30; only a given value is written).
    #[arg(long, value_name = "N")]
    pub timeout_seconds: Option<u64>,

    /// A header sent to the upstream, NAME=env:VAR: its value is read from the secret/env var VAR at
    /// run time (and by --discover), never written to mcpay.toml. Repeatable.
    #[arg(long = "header", value_name = "NAME=env:VAR")]
    pub headers: Vec<String>,

    /// One line saying what it is (shown in /v1/pricing).
    #[arg(long)]
    pub description: Option<String>,

    /// Connect to the upstream with the official MCP client, list its tools and write one
    /// [upstreams.NAME.tools] entry per tool (at --price unless given a --tool-price), printed to review.
    #[arg(long)]
    pub discover: bool,

    #[command(flatten)]
    pub project: ProjectArgs,

    /// Print what would change and write nothing.
    #[arg(long)]
    pub dry_run: bool,
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

    /// ENDPOINT=JSON: a call the gateway's handler takes longer than the endpoint's timeout_ms on
    /// (for the 504 handler_timeout scenario).
    #[arg(long, value_name = "ENDPOINT=JSON")]
    pub slow_call: Option<String>,

    /// A deployment of the same gateway with no ADMIN_KEY set (for the 503 scenario).
    #[arg(long, value_name = "URL")]
    pub unconfigured_url: Option<String>,

    /// The control URL of a tests/chain x402 harness whose facilitator the gateway uses (for the
    /// scenarios that pay for real while the facilitator's answers are lost).
    #[arg(long, value_name = "CONTROL_URL")]
    pub x402_harness: Option<String>,

    /// The name of an [upstreams.NAME] the gateway meters at /mcp/NAME (for the proxy.* scenarios;
    /// without it they are n/a). Its terms are read from /v1/pricing.
    #[arg(long, value_name = "NAME")]
    pub upstream: Option<String>,

    /// The base URL of the test upstream behind --upstream (tests/upstream/server.mjs's control
    /// endpoints), so the audit can count what reached it and make it fail.
    #[arg(long, value_name = "URL", requires = "upstream")]
    pub upstream_control: Option<String>,

    /// TOOL=JSON: a call the upstream answers after its timeout_seconds (for the 504 upstream_timeout
    /// scenario), e.g. 'slow={"ms":4000}'.
    #[arg(long, value_name = "TOOL=JSON", requires = "upstream")]
    pub upstream_slow_call: Option<String>,

    /// NAME=VALUE: a header the gateway sends the upstream (its `headers`) and the value it should
    /// carry, checked with the test upstream's whoami tool.
    #[arg(long, value_name = "NAME=VALUE", requires = "upstream")]
    pub upstream_header: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    pub fn to_clap(self) -> clap::ColorChoice {
        match self {
            ColorChoice::Auto => clap::ColorChoice::Auto,
            ColorChoice::Always => clap::ColorChoice::Always,
            ColorChoice::Never => clap::ColorChoice::Never,
        }
    }

    /// Takes every valid `--color VALUE` / `--color=VALUE` out of the raw arguments, before clap
    /// parses them: so that clap's own help and errors follow it, and so that `--color never
    /// check` still runs `check` (given before a subcommand, a top-level option would otherwise
    /// make clap read the subcommand as the project DIR). The last one wins; an invalid value is
    /// left for clap to refuse.
    pub fn take_from_args(args: &[std::ffi::OsString]) -> (Option<ColorChoice>, Vec<std::ffi::OsString>) {
        let mut found = None;
        let mut rest = Vec::with_capacity(args.len());
        let mut i = 0;
        while i < args.len() {
            let arg = args[i].to_string_lossy();
            if i == 0 || arg == "--" {
                if arg == "--" && i > 0 {
                    rest.extend(args[i..].iter().cloned());
                    break;
                }
                rest.push(args[i].clone());
                i += 1;
                continue;
            }
            let (value, width) = if arg == "--color" {
                (args.get(i + 1).map(|v| v.to_string_lossy().into_owned()), 2)
            } else {
                (arg.strip_prefix("--color=").map(str::to_string), 1)
            };
            match value.as_deref().and_then(|v| ColorChoice::from_str(v, false).ok()) {
                Some(c) => {
                    found = Some(c);
                    i += width;
                }
                None => {
                    rest.push(args[i].clone());
                    i += 1;
                }
            }
        }
        (found, rest)
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

    #[test]
    fn color_is_taken_out_before_clap_parses() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let (c, rest) = ColorChoice::take_from_args(&args(&["x", "--color", "never", "check"]));
        assert_eq!((c, rest), (Some(ColorChoice::Never), args(&["x", "check"])));
        let (c, rest) = ColorChoice::take_from_args(&args(&["x", "--color=always", "a", "--color", "auto"]));
        assert_eq!((c, rest), (Some(ColorChoice::Auto), args(&["x", "a"])));
        let (c, rest) = ColorChoice::take_from_args(&args(&["x", "--color", "purple"]));
        assert_eq!((c, rest), (None, args(&["x", "--color", "purple"])));
        let (c, rest) = ColorChoice::take_from_args(&args(&["x", "--", "--color", "never"]));
        assert_eq!((c, rest), (None, args(&["x", "--", "--color", "never"])));
    }
}
