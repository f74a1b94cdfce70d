//! What create-mcpay can generate. Everything that differs between targets is a method of
//! [`Target`]: its template layers, label, next steps, built-in endpoints, where handlers live and
//! what it cannot do. Nothing else in the crate matches on a target's name.

use serde::{Deserialize, Serialize};

/// One kind of generated project (`[project] target` in mcpay.toml, `--target` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Cloudflare Worker (TypeScript) with Durable Objects.
    Worker,
    /// Rust axum server, SQLite by default, Postgres + Redis to scale out.
    Axum,
    /// MPP/Tempo compute gateway (Cloudflare Worker).
    Mpp,
}

/// An endpoint a target serves itself (its handler is part of the target, not a user file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinEndpoint {
    pub name: &'static str,
    pub description: &'static str,
    /// Module exporting the handler, relative to the generated handler registry.
    pub module: &'static str,
    /// The exported handler's name.
    pub export: &'static str,
    /// The route paying for it directly (without a key), e.g. `/execute`.
    pub pay_path: &'static str,
}

/// The `mpp` target's sandbox, priced by `[mpp] execute_price_mcents`.
pub const EXECUTE_CODE: BuiltinEndpoint = BuiltinEndpoint {
    name: "execute_code",
    description: "Run JavaScript in an isolated sandbox (no network, no secrets, CPU and time limits)",
    module: "../mpp/execute-handler",
    export: "executeHandler",
    pay_path: "/execute",
};

impl Target {
    pub const ALL: &'static [Target] = &[Target::Worker, Target::Axum, Target::Mpp];

    /// The name in mcpay.toml, on the command line and of the template folder.
    pub fn name(self) -> &'static str {
        match self {
            Target::Worker => "worker",
            Target::Axum => "axum",
            Target::Mpp => "mpp",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.iter().copied().find(|t| t.name() == name)
    }

    /// The names of every target, quoted, for messages: `"worker", "axum" or "mpp"`.
    pub fn quoted_list() -> String {
        let names: Vec<String> = Target::ALL.iter().map(|t| format!("{:?}", t.name())).collect();
        match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        }
    }

    /// One line for the interactive picker.
    pub fn label(self) -> &'static str {
        match self {
            Target::Worker => "Cloudflare Worker (TypeScript, Durable Objects)",
            Target::Axum => "Rust axum server (SQLite; Postgres + Redis to scale out)",
            Target::Mpp => "MPP/Tempo compute gateway (pay per execution)",
        }
    }

    /// The target whose templates this one is built on (its files come first, this target's
    /// files override them): the `mpp` gateway is the `worker` gateway plus payments and a sandbox.
    pub fn base(self) -> Option<Target> {
        match self {
            Target::Mpp => Some(Target::Worker),
            Target::Worker | Target::Axum => None,
        }
    }

    /// Template folders, base first (`shared` comes before all of them).
    pub fn layers(self) -> Vec<Target> {
        let mut chain = vec![self];
        while let Some(base) = chain.last().and_then(|t| t.base()) {
            chain.push(base);
        }
        chain.reverse();
        chain
    }

    /// Files of the base layers this target does not ship (template paths inside the layer).
    pub fn drops(self) -> &'static [&'static str] {
        match self {
            Target::Worker | Target::Axum | Target::Mpp => &[],
        }
    }

    /// Where the user's handlers live, and their file extension.
    pub fn handler_location(self) -> (&'static str, &'static str) {
        match self {
            Target::Worker | Target::Mpp => ("src/handlers", ".ts"),
            Target::Axum => ("src/handlers", ".rs"),
        }
    }

    /// Endpoints the target provides itself, after the manifest's own.
    pub fn builtin_endpoints(self) -> &'static [BuiltinEndpoint] {
        match self {
            Target::Mpp => &[EXECUTE_CODE],
            Target::Worker | Target::Axum => &[],
        }
    }

    /// Whether the target can start a local process (an MCP server over stdio) next to the
    /// gateway. A Worker cannot: it has no processes.
    pub fn can_spawn_processes(self) -> bool {
        matches!(self, Target::Axum)
    }

    /// The lines printed after a new project is created (after `cd DIR`).
    pub fn next_steps(self) -> &'static [&'static str] {
        match self {
            Target::Worker => &[
                "npm install",
                "npm test                                 # the gateway's own suite, in workerd",
                "cp .dev.vars.example .dev.vars          # then set ADMIN_KEY in it: openssl rand -hex 32",
                "npm run dev",
                "npx wrangler secret put ADMIN_KEY && npm run deploy   # production: another openssl rand -hex 32",
                "create-mcpay add-endpoint mytool --price 250   # sell another endpoint",
            ],
            Target::Axum => &[
                "ADMIN_KEY=$(openssl rand -hex 32) cargo run   # SQLite file, nothing else needed",
                "cargo test                               # its own suite (TEST_DATABASE_URL/TEST_REDIS_URL add Postgres + Redis)",
                "create-mcpay add-endpoint mytool --price 250   # sell another endpoint",
            ],
            Target::Mpp => &[
                "npm install",
                "npm test                                 # payments over HTTP and MCP, sandbox, prepaid keys, in workerd",
                "cp .dev.vars.example .dev.vars          # then set ADMIN_KEY in it: openssl rand -hex 32",
                "npm run dev",
                "npx wrangler secret put ADMIN_KEY && npx wrangler secret put MPP_SECRET_KEY && npx wrangler secret put TEMPO_RECIPIENT",
                "create-mcpay add-endpoint mytool --price 250   # another paid tool",
            ],
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn names_round_trip_through_serde_clap_and_from_name() {
        for &t in Target::ALL {
            assert_eq!(Target::from_name(t.name()), Some(t));
            assert_eq!(serde_json::to_value(t).unwrap(), serde_json::json!(t.name()));
            assert_eq!(Target::from_str(t.name(), false).unwrap(), t);
        }
        assert_eq!(Target::value_variants().len(), Target::ALL.len());
        assert_eq!(Target::quoted_list(), "\"worker\", \"axum\" or \"mpp\"");
    }

    #[test]
    fn layers() {
        assert_eq!(Target::Worker.layers(), [Target::Worker]);
        assert_eq!(Target::Mpp.layers(), [Target::Worker, Target::Mpp]);
    }
}
