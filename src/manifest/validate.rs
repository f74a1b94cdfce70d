//! Validation: every problem of a manifest at once, each naming the key and the fix.

use std::path::Path;

use anyhow::{Result, bail};

use super::schema::*;
use crate::names;

impl Manifest {
    /// Every problem with the manifest, each naming the key and the fix. Empty when valid.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = names::check_project_name(&self.project.name) {
            out.push(format!("project.name: {e}"));
        }
        if self.project.description.len() > 200 {
            out.push("project.description: at most 200 characters".into());
        }
        let g = &self.gateway;
        let prefix_ok = (2..=16).contains(&g.key_prefix.len())
            && g.key_prefix.ends_with('_')
            && g.key_prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && g.key_prefix[..g.key_prefix.len() - 1].chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !prefix_ok {
            out.push(format!(
                "gateway.key_prefix: {:?} must be 1 to 15 lowercase letters or digits followed by '_' (e.g. \"mcp_\")",
                g.key_prefix
            ));
        }
        range(&mut out, "gateway.max_body_bytes", g.max_body_bytes, 256, 10 * 1024 * 1024);
        range(&mut out, "gateway.max_mint_mcents", g.max_mint_mcents, 1, MAX_SAFE_INTEGER);
        range(&mut out, "gateway.mints_per_hour", g.mints_per_hour, 1, 1_000_000);
        range(&mut out, "gateway.refunds_per_key_per_hour", g.refunds_per_key_per_hour, 0, 1_000_000);
        range(&mut out, "gateway.default_rate_limit_per_minute", g.default_rate_limit_per_minute, 1, 1_000_000);
        range(&mut out, "gateway.leaderboard_size", g.leaderboard_size, 1, 1000);

        if self.endpoints.is_empty() {
            out.push("endpoints: a gateway needs at least one paid endpoint; add one with `create-mcpay add-endpoint NAME --price MCENTS` or an [endpoints.NAME] table".into());
        }
        for (name, ep) in &self.endpoints {
            let at = format!("endpoints.{name}");
            if let Err(e) = names::check_endpoint_name(name) {
                out.push(format!("{at}: {e}"));
            }
            self.endpoint_problems(&at, ep, &mut out);
        }
        out.extend(self.identifier_collisions());
        for (name, up) in &self.upstreams {
            self.upstream_problems(name, up, &mut out);
        }
        let scopes = self.scopes();
        let s = &self.signup;
        range(&mut out, "signup.price_mcents", s.price_mcents, 1, MAX_SAFE_INTEGER);
        range(&mut out, "signup.balance_mcents", s.balance_mcents, 1, g.max_mint_mcents.max(1));
        range(&mut out, "signup.signups_per_hour", s.signups_per_hour, 1, 1_000_000);
        for scope in &s.scopes {
            if !scopes.contains(scope) {
                out.push(format!(
                    "signup.scopes: {scope:?} is not the scope of any endpoint; known scopes: {}",
                    scopes.join(", ")
                ));
            }
        }
        if s.enabled && s.scopes.is_empty() {
            out.push("signup.scopes: a signup key needs at least one scope (default deny)".into());
        }
        if s.enabled && s.x402.is_none() && s.mpp.is_none() {
            out.push("signup: a signup needs a payment rail; add a [signup.x402] table, a [signup.mpp] table, or both".into());
        }
        if let Some(x) = &s.x402 {
            let ok_network = x.network.strip_prefix("eip155:").is_some_and(|id| {
                !id.is_empty() && id.len() <= 18 && id.chars().all(|c| c.is_ascii_digit()) && !id.starts_with('0')
            });
            if !ok_network {
                out.push(format!("signup.x402.network: {:?} must be a CAIP-2 EVM network such as \"eip155:8453\" (Base) or \"eip155:84532\" (Base Sepolia)", x.network));
            }
            if !is_evm_address(&x.asset) {
                out.push(format!("signup.x402.asset: {:?} must be the token contract's 0x address (40 hex digits)", x.asset));
            }
            if !x.pay_to.is_empty() && !is_evm_address(&x.pay_to) {
                out.push(format!("signup.x402.pay_to: {:?} must be a 0x address (40 hex digits), or empty to use the X402_PAY_TO secret", x.pay_to));
            }
            for (k, v) in [("asset_name", &x.asset_name), ("asset_version", &x.asset_version)] {
                if v.is_empty() || v.len() > 64 || v.contains(|c: char| c.is_control()) {
                    out.push(format!("signup.x402.{k}: the token's EIP-712 domain {k}, 1 to 64 characters"));
                }
            }
            if !(5..=18).contains(&x.asset_decimals) {
                out.push(format!("signup.x402.asset_decimals: {} is out of range; use 5 to 18 (USDC: 6)", x.asset_decimals));
            }
            if !(x.facilitator_url.starts_with("https://") || x.facilitator_url.starts_with("http://"))
                || x.facilitator_url.contains(char::is_whitespace)
            {
                out.push(format!("signup.x402.facilitator_url: {:?} must be an http(s) URL, e.g. \"https://www.x402.org/facilitator\"", x.facilitator_url));
            }
            if !x.rpc_url.is_empty()
                && (!(x.rpc_url.starts_with("https://") || x.rpc_url.starts_with("http://")) || x.rpc_url.contains(char::is_whitespace))
            {
                out.push(format!("signup.x402.rpc_url: {:?} must be an http(s) JSON-RPC URL of the network, e.g. \"https://sepolia.base.org\", or empty to use the X402_RPC_URL secret", x.rpc_url));
            }
            range(&mut out, "signup.x402.max_timeout_seconds", x.max_timeout_seconds, 10, 3600);
        }
        if let Some(m) = &s.mpp {
            if m.methods.is_empty() {
                out.push(format!("signup.mpp.methods: offer at least one of {}", SIGNUP_MPP_METHODS.join(", ")));
            }
            for meth in &m.methods {
                if !SIGNUP_MPP_METHODS.contains(&meth.as_str()) {
                    out.push(format!("signup.mpp.methods: unknown method {meth:?}; use {}", SIGNUP_MPP_METHODS.join(", ")));
                }
            }
            if m.realm.len() > 253 || m.realm.contains(|c: char| c == '"' || c == '\\' || c.is_control()) {
                out.push("signup.mpp.realm: a host name (at most 253 characters, no quotes or backslashes)".into());
            }
            range(&mut out, "signup.mpp.challenge_ttl_seconds", m.challenge_ttl_seconds, 10, 86_400);
        }
        let p = &self.mpp;
        if p.realm.len() > 253 || p.realm.contains(|c: char| c == '"' || c == '\\' || c.is_control()) {
            out.push("mpp.realm: a host name (at most 253 characters, no quotes or backslashes)".into());
        }
        if p.methods.is_empty() {
            out.push(format!("mpp.methods: offer at least one of {}", MPP_METHODS.join(", ")));
        }
        for m in &p.methods {
            if !MPP_METHODS.contains(&m.as_str()) {
                out.push(format!("mpp.methods: unknown method {m:?}; use {}", MPP_METHODS.join(", ")));
            }
        }
        range(&mut out, "mpp.execute_price_mcents", p.execute_price_mcents, 1, MAX_PRICE_MCENTS);
        range(&mut out, "mpp.max_code_bytes", p.max_code_bytes, 16, 1024 * 1024);
        range(&mut out, "mpp.timeout_ms", p.timeout_ms, 10, 300_000);
        range(&mut out, "mpp.cpu_ms", p.cpu_ms, 1, 300_000);
        range(&mut out, "mpp.challenge_ttl_seconds", p.challenge_ttl_seconds, 10, 86_400);
        out
    }

    fn endpoint_problems(&self, at: &str, ep: &Endpoint, out: &mut Vec<String>) {
        if !(1..=MAX_PRICE_MCENTS).contains(&ep.price_mcents) {
            out.push(format!(
                "{at}.price_mcents: {} is out of range; a price is 1 to {MAX_PRICE_MCENTS} mcents (1 mcent = 1/1000 cent)",
                ep.price_mcents
            ));
        }
        if let Some(xp) = ep.xp {
            range(out, &format!("{at}.xp"), xp, 0, MAX_XP);
        }
        if let Some(scope) = &ep.scope
            && let Err(e) = names::check_scope(scope)
        {
            out.push(format!("{at}.scope: {e}"));
        }
        if let Some(d) = &ep.description
            && (d.len() > 200 || d.contains('\n'))
        {
            out.push(format!("{at}.description: one line of at most 200 characters"));
        }
        if let Some(r) = ep.rate_limit_per_minute {
            range(out, &format!("{at}.rate_limit_per_minute"), r, 1, 1_000_000);
        }
        if let Some(t) = ep.timeout_ms {
            let (lo, hi) = super::schema::TIMEOUT_MS_RANGE;
            range(out, &format!("{at}.timeout_ms"), t, lo, hi);
        }
        let input = ep.input.clone().unwrap_or_else(default_input);
        if input.len() > 64 {
            out.push(format!("{at}.input: at most 64 fields"));
        }
        let mut idents: Vec<(String, &String)> = Vec::new();
        for (field, ty) in &input {
            if let Err(e) = names::check_field_name(field) {
                out.push(format!("{at}.input: {e}"));
                continue;
            }
            if parse_field_type(ty).is_none() {
                out.push(format!(
                    "{at}.input.{field}: unknown type {ty:?}; use one of {} (add '?' for optional)",
                    FieldType::names()
                ));
            }
            let ident = names::rust_field_ident(field);
            if let Some((_, other)) = idents.iter().find(|(i, _)| *i == ident) {
                out.push(format!(
                    "{at}.input: fields {other:?} and {field:?} both become the Rust field `{ident}`; rename one"
                ));
            }
            idents.push((ident, field));
        }
    }

    fn upstream_problems(&self, name: &str, up: &Upstream, out: &mut Vec<String>) {
        let at = format!("upstreams.{name}");
        if let Err(e) = names::check_endpoint_name(name) {
            out.push(format!("{at}: {e}"));
        }
        let builtin = self.project.target.builtin_endpoints().iter().any(|b| b.name == name);
        if self.endpoints.contains_key(name) || builtin {
            out.push(format!(
                "{at}: an endpoint is already named {name:?}; upstreams and endpoints share one namespace, so rename the upstream"
            ));
        }
        match (&up.url, &up.command) {
            (Some(_), Some(_)) => out.push(format!("{at}: set either `url` or `command`, not both")),
            (None, None) => out.push(format!(
                "{at}: set `url = \"https://…/mcp\"` (a Streamable HTTP MCP server) or `command = [\"npx\", \"-y\", \"some-mcp-server\"]` (a stdio server)"
            )),
            (Some(url), None) => {
                let ok = (url.starts_with("https://") || url.starts_with("http://"))
                    && url.len() <= 2048
                    && !url.contains(|c: char| c.is_whitespace() || c.is_control() || c == '"' || c == '\\');
                if !ok {
                    out.push(format!("{at}.url: {url:?} must be an http(s) URL of an MCP server, e.g. \"https://weather.example.com/mcp\" (Streamable HTTP) or \"https://weather.example.com/sse\" with transport = \"sse\""));
                }
            }
            (None, Some(argv)) => {
                if !self.project.target.can_spawn_processes() {
                    out.push(format!(
                        "{at}.command: the {} target cannot start processes (a Cloudflare Worker has none); serve the MCP server over Streamable HTTP somewhere and set `url` instead, or use the axum target",
                        self.project.target.name()
                    ));
                }
                if argv.is_empty() || argv[0].trim().is_empty() {
                    out.push(format!("{at}.command: the program and its arguments, e.g. [\"npx\", \"-y\", \"@acme/weather-mcp\"]"));
                }
                if argv.iter().any(|a| a.contains('\0')) {
                    out.push(format!("{at}.command: arguments cannot contain NUL characters"));
                }
                if up.headers.as_ref().is_some_and(|h| !h.is_empty()) {
                    out.push(format!(
                        "{at}.headers: a stdio server has no HTTP headers; remove `headers` and pass secrets to the command through its environment"
                    ));
                }
            }
        }
        if let Some(t) = &up.transport {
            let names: Vec<&str> = UPSTREAM_TRANSPORTS.iter().map(|(n, _)| *n).collect();
            match UPSTREAM_TRANSPORTS.iter().find(|(n, _)| n == t) {
                None => out.push(format!("{at}.transport: {t:?} is not one of {}", names.join(", "))),
                Some((_, true)) if up.url.is_none() && up.command.is_some() => out.push(format!(
                    "{at}.transport: {t:?} needs a `url`; a `command` upstream speaks stdio (remove `transport` or set it to \"stdio\")"
                )),
                Some((_, false)) if up.url.is_some() && up.command.is_none() => out.push(format!(
                    "{at}.transport: \"stdio\" needs a `command`; a `url` upstream speaks \"http\" (Streamable HTTP, the default) or \"sse\" (legacy HTTP+SSE)"
                )),
                _ => {}
            }
        }
        if !(1..=MAX_PRICE_MCENTS).contains(&up.price_mcents) {
            out.push(format!(
                "{at}.price_mcents: {} is out of range; the default price of a tool call is 1 to {MAX_PRICE_MCENTS} mcents (a free tool is listed in [{at}.tools] with 0)",
                up.price_mcents
            ));
        }
        if let Some(scope) = &up.scope
            && let Err(e) = names::check_scope(scope)
        {
            out.push(format!("{at}.scope: {e}"));
        }
        if let Some(d) = &up.description
            && (d.len() > 200 || d.contains('\n'))
        {
            out.push(format!("{at}.description: one line of at most 200 characters"));
        }
        if let Some(t) = up.timeout_seconds {
            let (lo, hi) = UPSTREAM_TIMEOUT_SECONDS_RANGE;
            range(out, &format!("{at}.timeout_seconds"), t, lo, hi);
        }
        if let Some(r) = up.rate_limit_per_minute {
            range(out, &format!("{at}.rate_limit_per_minute"), r, 1, 1_000_000);
        }
        for (header, value) in up.headers.iter().flatten() {
            let token = !header.is_empty()
                && header.len() <= 64
                && header.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
            if !token {
                out.push(format!("{at}.headers: {header:?} is not an HTTP header name"));
                continue;
            }
            let lower = header.to_ascii_lowercase();
            if FORBIDDEN_UPSTREAM_HEADERS.contains(&lower.as_str()) {
                out.push(format!("{at}.headers.{header}: the gateway sets this header itself; remove it"));
            }
            let var = value.strip_prefix(HEADER_ENV_PREFIX).unwrap_or("");
            let var_ok = !var.is_empty()
                && var.len() <= 64
                && var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !var_ok {
                out.push(format!(
                    "{at}.headers.{header}: write \"env:VAR\" (e.g. \"env:{}_TOKEN\") and put the value in that secret/env var; a header value is never written in the manifest",
                    name.to_ascii_uppercase()
                ));
            }
        }
        if let Some(tools) = &up.tools {
            if tools.len() > 1000 {
                out.push(format!("{at}.tools: at most 1000 tools"));
            }
            for (tool, price) in tools {
                if tool.is_empty() || tool.len() > 128 || tool.contains(|c: char| c.is_control()) {
                    out.push(format!("{at}.tools: {tool:?} is not a tool name (1 to 128 characters, no control characters)"));
                }
                if *price > MAX_PRICE_MCENTS {
                    out.push(format!("{at}.tools.{tool}: {price} is out of range; use 0 (free) to {MAX_PRICE_MCENTS} mcents"));
                }
            }
        }
    }

    /// Endpoints whose generated identifiers collide (`my_tool` and `my__tool` are both `MyTool`),
    /// built-in endpoints of the target included.
    pub fn identifier_collisions(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen: Vec<(String, String)> = Vec::new();
        let builtins = self.project.target.builtin_endpoints().iter().map(|b| (b.name.to_string(), format!("the built-in endpoint {:?}", b.name)));
        let declared = self.endpoints.keys().map(|n| (n.clone(), format!("endpoints.{n}")));
        for (name, label) in builtins.chain(declared) {
            for (other, other_label) in &seen {
                if let Some(ident) = names::colliding_identifier(other, &name) {
                    out.push(format!(
                        "{label}: {other_label} and {label} both become the identifier `{ident}` in the generated code; rename one"
                    ));
                }
            }
            seen.push((name, label));
        }
        out
    }

    /// Fails with every problem listed when the manifest is not valid.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            return Ok(());
        }
        let mut msg = format!("{} is not valid:", origin.display());
        for p in problems {
            msg.push_str("\n  - ");
            msg.push_str(&p);
        }
        bail!(msg)
    }


    /// Every scope in use, endpoints first then upstreams, in manifest order, without repeats.
    pub fn scopes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let endpoints = self.endpoints.iter().map(|(name, ep)| ep.resolved(name, &self.gateway).scope);
        let upstreams = self.upstreams.iter().map(|(name, up)| up.resolved(name, &self.gateway).scope);
        for s in endpoints.chain(upstreams) {
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }
}

/// Headers the gateway sets or refuses to forward itself (contract 3.12); a manifest cannot configure them.
const FORBIDDEN_UPSTREAM_HEADERS: &[&str] = &[
    "host", "content-type", "content-length", "accept", "mcp-session-id", "mcp-protocol-version", "last-event-id",
    "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization", "cookie",
];

pub(super) fn range(out: &mut Vec<String>, key: &str, v: u64, lo: u64, hi: u64) {
    if !(lo..=hi).contains(&v) {
        out.push(format!("{key}: {v} is out of range; use {lo} to {hi}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(target: &str, upstreams: &str) -> Manifest {
        let text = format!("[project]\nname = \"a\"\ntarget = \"{target}\"\n[endpoints.tool]\nprice_mcents = 1\n{upstreams}");
        crate::manifest::parse(&text, Path::new("mcpay.toml")).unwrap().1
    }

    fn problems(target: &str, upstreams: &str) -> String {
        manifest(target, upstreams).problems().join("\n")
    }

    const WEATHER: &str = "[upstreams.weather]\nurl = \"https://weather.example.com/mcp\"\nprice_mcents = 100\n";

    #[test]
    fn a_url_upstream_is_valid_on_every_target_with_its_defaults() {
        for target in ["worker", "axum", "mpp"] {
            assert_eq!(problems(target, WEATHER), "", "{target}");
        }
        let m = manifest("worker", WEATHER);
        let r = m.upstreams["weather"].resolved("weather", &m.gateway);
        assert_eq!(r.transport, UpstreamTransport::Url("https://weather.example.com/mcp".into()));
        assert_eq!((r.scope.as_str(), r.timeout_ms, r.rate_limit_per_minute), ("weather", 30_000, 60));
        assert_eq!((r.enabled, r.refund_tool_errors, r.description.as_str()), (true, false, ""));
        assert!(r.headers.is_empty() && r.tools.is_empty());
        assert_eq!(upstream_url_env("weather"), "UPSTREAM_WEATHER_URL");
    }

    #[test]
    fn exactly_one_of_url_and_command() {
        let both = "[upstreams.w]\nurl = \"https://x/mcp\"\ncommand = [\"node\", \"s.mjs\"]\nprice_mcents = 1\n";
        assert!(problems("axum", both).contains("upstreams.w: set either `url` or `command`, not both"), "{}", problems("axum", both));
        let neither = "[upstreams.w]\nprice_mcents = 1\n";
        let p = problems("axum", neither);
        assert!(p.contains("upstreams.w: set `url = ") && p.contains("or `command = ["), "{p}");
        let p = problems("axum", "[upstreams.w]\nurl = \"ftp://x/mcp\"\nprice_mcents = 1\n");
        assert!(p.contains("upstreams.w.url: \"ftp://x/mcp\" must be an http(s) URL"), "{p}");
        let p = problems("axum", "[upstreams.w]\ncommand = []\nprice_mcents = 1\n");
        assert!(p.contains("upstreams.w.command: the program and its arguments"), "{p}");
    }

    #[test]
    fn transport_names_how_a_url_is_spoken_and_must_fit_it() {
        let sse = "[upstreams.w]\nurl = \"https://x/sse\"\ntransport = \"sse\"\nprice_mcents = 1\n";
        for target in ["worker", "axum", "mpp"] {
            assert_eq!(problems(target, sse), "", "{target}");
        }
        let m = manifest("worker", sse);
        assert_eq!(m.upstreams["w"].resolved("w", &m.gateway).transport, UpstreamTransport::Sse("https://x/sse".into()));
        assert_eq!(UpstreamTransport::Sse(String::new()).name(), "sse");
        assert_eq!(problems("axum", "[upstreams.w]\nurl = \"https://x/mcp\"\ntransport = \"http\"\nprice_mcents = 1\n"), "");
        assert_eq!(problems("axum", "[upstreams.w]\ncommand = [\"node\"]\ntransport = \"stdio\"\nprice_mcents = 1\n"), "");
        let p = problems("axum", "[upstreams.w]\nurl = \"https://x/mcp\"\ntransport = \"ws\"\nprice_mcents = 1\n");
        assert!(p.contains("upstreams.w.transport: \"ws\" is not one of http, sse, stdio"), "{p}");
        let p = problems("axum", "[upstreams.w]\nurl = \"https://x/mcp\"\ntransport = \"stdio\"\nprice_mcents = 1\n");
        assert!(p.contains("\"stdio\" needs a `command`"), "{p}");
        let p = problems("axum", "[upstreams.w]\ncommand = [\"node\"]\ntransport = \"sse\"\nprice_mcents = 1\n");
        assert!(p.contains("\"sse\" needs a `url`"), "{p}");
    }

    #[test]
    fn a_command_is_refused_where_no_process_can_start_with_the_reason() {
        let cmd = "[upstreams.w]\ncommand = [\"npx\", \"-y\", \"@acme/weather-mcp\"]\nprice_mcents = 1\n";
        assert_eq!(problems("axum", cmd), "");
        let m = manifest("axum", cmd);
        assert_eq!(
            m.upstreams["w"].resolved("w", &m.gateway).transport,
            UpstreamTransport::Command(vec!["npx".into(), "-y".into(), "@acme/weather-mcp".into()])
        );
        for target in ["worker", "mpp"] {
            let p = problems(target, cmd);
            assert!(
                p.contains(&format!("upstreams.w.command: the {target} target cannot start processes"))
                    && p.contains("set `url` instead, or use the axum target"),
                "{target}: {p}"
            );
        }
    }

    #[test]
    fn headers_name_a_secret_and_cannot_be_the_gateways_own() {
        let ok = format!("{WEATHER}headers = {{ Authorization = \"env:WEATHER_TOKEN\", X-Api-Key = \"env:_K2\" }}\n");
        assert_eq!(problems("worker", &ok), "");
        let m = manifest("worker", &ok);
        let r = m.upstreams["weather"].resolved("weather", &m.gateway);
        assert_eq!(r.headers, [("Authorization".to_string(), "WEATHER_TOKEN".to_string()), ("X-Api-Key".into(), "_K2".into())]);
        for value in ["Bearer abc", "env:", "env:1BAD", "env:A-B", "ENV:A"] {
            let p = problems("worker", &format!("{WEATHER}headers = {{ Authorization = \"{value}\" }}\n"));
            assert!(p.contains("upstreams.weather.headers.Authorization: write \"env:VAR\" (e.g. \"env:WEATHER_TOKEN\")"), "{value}: {p}");
            assert!(!p.contains("abc"), "a header value is never echoed: {p}");
        }
        for header in ["Host", "content-type", "Mcp-Session-Id", "Cookie", "Transfer-Encoding", "Proxy-Authorization"] {
            let p = problems("worker", &format!("{WEATHER}headers = {{ {header} = \"env:X\" }}\n"));
            assert!(p.contains(&format!("upstreams.weather.headers.{header}: the gateway sets this header itself")), "{header}: {p}");
        }
        let p = problems("worker", &format!("{WEATHER}headers = {{ \"Bad Header\" = \"env:X\" }}\n"));
        assert!(p.contains("\"Bad Header\" is not an HTTP header name"), "{p}");
    }

    #[test]
    fn upstreams_and_endpoints_share_one_namespace() {
        let p = problems("worker", "[upstreams.tool]\nurl = \"https://x/mcp\"\nprice_mcents = 1\n");
        assert!(p.contains("upstreams.tool: an endpoint is already named \"tool\""), "{p}");
        let p = problems("mpp", "[upstreams.execute_code]\nurl = \"https://x/mcp\"\nprice_mcents = 1\n");
        assert!(p.contains("upstreams.execute_code: an endpoint is already named"), "{p}");
        for bad in ["Weather", "admin", "match"] {
            let p = problems("worker", &format!("[upstreams.{bad}]\nurl = \"https://x/mcp\"\nprice_mcents = 1\n"));
            assert!(p.contains(&format!("upstreams.{bad}: ")), "{bad}: {p}");
        }
    }

    #[test]
    fn prices_ranges_and_tools() {
        let p = problems("worker", &WEATHER.replace("price_mcents = 100", "price_mcents = 0"));
        assert!(p.contains("upstreams.weather.price_mcents: 0 is out of range") && p.contains("listed in [upstreams.weather.tools] with 0"), "{p}");
        let p = problems("worker", &WEATHER.replace("price_mcents = 100", &format!("price_mcents = {}", MAX_PRICE_MCENTS + 1)));
        assert!(p.contains("upstreams.weather.price_mcents"), "{p}");
        let tools = format!("{WEATHER}[upstreams.weather.tools]\nforecast = 250\nalerts = 0\n\"odd name\" = {MAX_PRICE_MCENTS}\n");
        assert_eq!(problems("worker", &tools), "", "a free tool (0) and the maximum price are fine");
        let m = manifest("worker", &tools);
        assert_eq!(m.upstreams["weather"].resolved("weather", &m.gateway).tools.into_iter().collect::<Vec<_>>(), [
            ("forecast".to_string(), 250),
            ("alerts".to_string(), 0),
            ("odd name".to_string(), MAX_PRICE_MCENTS)
        ]);
        let p = problems("worker", &format!("{WEATHER}[upstreams.weather.tools]\nforecast = {}\n\"\" = 1\n", MAX_PRICE_MCENTS + 1));
        assert!(p.contains("upstreams.weather.tools.forecast: 100000001 is out of range; use 0 (free)"), "{p}");
        assert!(p.contains("upstreams.weather.tools: \"\" is not a tool name"), "{p}");
        for (key, bad, needle) in [
            ("timeout_seconds", "0", "upstreams.weather.timeout_seconds: 0 is out of range; use 1 to 600"),
            ("timeout_seconds", "601", "upstreams.weather.timeout_seconds: 601 is out of range; use 1 to 600"),
            ("rate_limit_per_minute", "0", "upstreams.weather.rate_limit_per_minute: 0 is out of range"),
            ("scope", "\"Bad\"", "upstreams.weather.scope: "),
            ("description", "\"two\\nlines\"", "upstreams.weather.description: one line"),
        ] {
            let p = problems("worker", &format!("{WEATHER}{key} = {bad}\n"));
            assert!(p.contains(needle), "{key} = {bad}: {p}");
        }
        let m = manifest("worker", &format!("{WEATHER}timeout_seconds = 600\nrate_limit_per_minute = 5\n"));
        assert_eq!(m.problems(), Vec::<String>::new());
        let r = m.upstreams["weather"].resolved("weather", &m.gateway);
        assert_eq!((r.timeout_ms, r.rate_limit_per_minute), (600_000, 5));
    }

    #[test]
    fn unknown_upstream_keys_are_refused() {
        let text = format!("[project]\nname = \"a\"\ntarget = \"worker\"\n[endpoints.tool]\nprice_mcents = 1\n{WEATHER}prise_mcents = 1\n");
        let err = crate::manifest::parse(&text, Path::new("mcpay.toml")).unwrap_err().to_string();
        assert!(err.contains("prise_mcents"), "{err}");
    }

    #[test]
    fn scopes_include_upstream_scopes_after_the_endpoints_without_repeats() {
        let m = manifest(
            "worker",
            &format!("{WEATHER}[upstreams.files]\nurl = \"https://f/mcp\"\nprice_mcents = 1\nscope = \"tool\"\n[upstreams.maps]\nurl = \"https://m/mcp\"\nprice_mcents = 1\nscope = \"geo\"\n"),
        );
        assert_eq!(m.problems(), Vec::<String>::new());
        assert_eq!(m.scopes(), ["tool", "weather", "geo"]);
    }
}
