//! create-mcpay: scaffold a pay-per-call gateway for AI agents from one manifest.
//!
//! The pipeline: arguments (+ prompts) → a validated manifest and [`spec::Spec`] → a
//! [`plan::Plan`] of files → written atomically (or printed with --dry-run).

pub mod audit;
pub mod cli;
pub mod commands;
pub mod manifest;
pub mod names;
pub mod plan;
pub mod spec;
pub mod templates;
pub mod ui;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use cli::{Cli, Command};

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let allow_prompts = !(cli.new.yes || cli.new.no_interactive);
    let ui = ui::Ui::new(cli.color, allow_prompts);
    let result = match &cli.command {
        None => commands::new::run(&cli.new, &ui),
        Some(Command::AddEndpoint(args)) => commands::add_endpoint::run(args, &ui),
        Some(Command::Sync(args)) => commands::sync::run(args, &ui),
        Some(Command::Check(args)) => commands::check::run(args, &ui),
        Some(Command::Audit(args)) => audit::run(args),
        Some(Command::Completions { shell }) => {
            clap_complete::generate(*shell, &mut Cli::command(), "create-mcpay", &mut std::io::stdout());
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
