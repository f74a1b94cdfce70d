//! create-mcpay: scaffold a pay-per-call gateway for AI agents from one manifest.
//!
//! The pipeline: arguments (+ prompts) → a validated manifest and [`spec::Spec`] → a
//! [`plan::Plan`] of files → written atomically (or printed with --dry-run). Everything that
//! differs between targets is on [`target::Target`].

pub mod audit;
pub mod cli;
pub mod commands;
pub mod lockfile;
pub mod manifest;
pub mod names;
pub mod plan;
pub mod project;
pub mod spec;
pub mod target;
pub mod templates;
pub mod ui;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use cli::{Cli, ColorChoice, Command};

pub fn run() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // --color also governs clap's own help and errors, and may come before a subcommand: it is
    // taken out before clap parses (see ColorChoice::take_from_args).
    let (color, args) = ColorChoice::take_from_args(&args);
    let command = Cli::command().color(ui::clap_color(color.unwrap_or(ColorChoice::Auto)));
    let cli = match command.try_get_matches_from(&args).and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(mut cli) => {
            if let Some(c) = color {
                cli.color = c;
            }
            cli
        }
        Err(err) => {
            // Help and version are printed here too; a closed stdout is not an error.
            let _ = err.print();
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2));
        }
    };
    let allow_prompts = !(cli.new.yes || cli.new.no_interactive);
    let ui = ui::Ui::new(cli.color, allow_prompts);
    let result = match &cli.command {
        None => commands::new::run(&cli.new, &ui),
        Some(Command::AddEndpoint(args)) => commands::add_endpoint::run(args, &ui),
        Some(Command::AddUpstream(args)) => commands::add_upstream::run(args, &ui),
        Some(Command::Sync(args)) => commands::sync::run(args, &ui),
        Some(Command::Check(args)) => commands::check::run(args, &ui),
        Some(Command::Audit(args)) => commands::audit::run(args),
        Some(Command::Completions { shell }) => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "create-mcpay", &mut script);
            ui::write_stdout(&script);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            ui::print_error(&err);
            ExitCode::FAILURE
        }
    }
}
