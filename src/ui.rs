//! Terminal output: colors (with --color and NO_COLOR), prompts, and the few message styles used.

use std::io::{IsTerminal, Write as _};

use anyhow::{Result, bail};
use console::style;

use crate::cli::ColorChoice;

pub struct Ui {
    interactive: bool,
}

impl Ui {
    /// `allow_prompts` is false with --yes / --no-interactive; prompts also need a terminal.
    pub fn new(color: ColorChoice, allow_prompts: bool) -> Ui {
        let colors = match color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
            }
        };
        console::set_colors_enabled(colors);
        console::set_colors_enabled_stderr(colors);
        Ui { interactive: allow_prompts && std::io::stdin().is_terminal() && std::io::stderr().is_terminal() }
    }

    pub fn interactive(&self) -> bool {
        self.interactive
    }

    pub fn heading(&self, msg: &str) {
        line(&format!("{}", style(msg).bold()));
    }

    pub fn ok(&self, msg: &str) {
        line(&format!("{} {msg}", style("✔").green()));
    }

    pub fn item(&self, tag: &str, msg: &str) {
        line(&format!("  {} {msg}", style(format!("{tag:<9}")).cyan()));
    }

    pub fn warn(&self, msg: &str) {
        let _ = writeln!(std::io::stderr(), "{} {msg}", style("warning:").yellow().bold());
    }

    pub fn plain(&self, msg: &str) {
        line(msg);
    }

    /// Asks for a line of text until `valid` accepts it; `flag` names what to pass when there is
    /// no terminal.
    pub fn input(
        &self,
        prompt: &str,
        default: &str,
        flag: &str,
        valid: impl Fn(&str) -> Result<(), String>,
    ) -> Result<String> {
        if !self.interactive {
            bail!("{prompt}: no value given and no terminal to ask on; pass {flag}");
        }
        Ok(dialoguer::Input::<String>::new()
            .with_prompt(prompt)
            .default(default.to_string())
            .validate_with(|s: &String| valid(s))
            .interact_text()?)
    }

    /// Asks to pick one of `items` (value, description).
    pub fn select(&self, prompt: &str, items: &[(&str, &str)], flag: &str) -> Result<usize> {
        if !self.interactive {
            bail!("{prompt}: no value given and no terminal to ask on; pass {flag}");
        }
        let labels: Vec<String> = items.iter().map(|(v, d)| format!("{v:<7} {d}")).collect();
        Ok(dialoguer::Select::new().with_prompt(prompt).items(&labels).default(0).interact()?)
    }
}

/// One line on stdout. A closed stdout (`create-mcpay … | head -1`) is not an error: the rest of
/// the output is dropped and the work goes on.
fn line(msg: &str) {
    let _ = writeln!(std::io::stdout(), "{msg}");
}

/// Bytes on stdout, a closed stdout ignored (see [`line`]).
pub fn write_stdout(bytes: &[u8]) {
    let mut out = std::io::stdout();
    let _ = out.write_all(bytes).and_then(|()| out.flush());
}

/// clap's color setting for `--color` (so help and usage errors follow it).
pub fn clap_color(color: ColorChoice) -> clap::ColorChoice {
    if color == ColorChoice::Auto && std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) {
        return clap::ColorChoice::Never;
    }
    color.to_clap()
}

pub fn print_error(err: &anyhow::Error) {
    let mut msg = format!("{err}");
    for cause in err.chain().skip(1) {
        msg.push_str(&format!("\n  caused by: {cause}"));
    }
    let _ = writeln!(std::io::stderr(), "{} {msg}", style("error:").red().bold());
}
