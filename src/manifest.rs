//! `mcpay.toml`: the single source of truth for what a generated gateway sells.
//!
//! Reading goes through serde (every problem is reported at once, with the fix); writing goes
//! through toml_edit so that a user's comments and ordering survive `add-endpoint`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use toml_edit::{DocumentMut, Item, Table, value};

use crate::names;

pub const FILE_NAME: &str = "mcpay.toml";

/// Largest price of one call: 100,000,000 mcents = $1,000.
pub const MAX_PRICE_MCENTS: u64 = 100_000_000;
/// Largest integer every target (JavaScript numbers included) represents exactly.
pub const MAX_SAFE_INTEGER: u64 = 9_007_199_254_740_991;

pub const FIELD_TYPES: &[&str] = &["string", "number", "integer", "boolean", "object", "array"];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub project: Project,
    #[serde(default)]
    pub gateway: Gateway,
    #[serde(default)]
    pub signup: Signup,
    #[serde(default)]
    pub endpoints: IndexMap<String, Endpoint>,
    /// Settings of the `mpp` target (ignored by the others).
    #[serde(default)]
    pub mpp: Mpp,
}

/// Payment methods the `mpp` target can offer, as `method/intent`.
pub const MPP_METHODS: &[&str] = &["tempo/charge", "tempo/session", "stripe/charge"];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mpp {
    /// The MPP realm; empty = the host the gateway is served on.
    pub realm: String,
    /// Methods offered in every 402 (one WWW-Authenticate header each).
    pub methods: Vec<String>,
    /// Price of one `execute_code` run.
    pub execute_price_mcents: u64,
    /// Largest accepted `code`, in bytes.
    pub max_code_bytes: u64,
    /// Wall-clock limit of one run.
    pub timeout_ms: u64,
    /// CPU limit of one run (enforced by Cloudflare in production).
    pub cpu_ms: u64,
    /// How long a challenge stays payable.
    pub challenge_ttl_seconds: u64,
}

impl Default for Mpp {
    fn default() -> Self {
        Mpp {
            realm: String::new(),
            methods: vec!["tempo/charge".into()],
            execute_price_mcents: 1_000,
            max_code_bytes: 65_536,
            timeout_ms: 5_000,
            cpu_ms: 50,
            challenge_ttl_seconds: 300,
        }
    }
}

/// The `[mpp]` table a new mpp project starts with, documented.
pub const MPP_SECTION: &str = r#"
[mpp]
# Machine Payments Protocol settings (https://paymentauth.org): agents pay per call, no account.
# The realm in challenges; empty = the host the gateway is served on.
realm = ""
# Methods offered in every 402, one WWW-Authenticate header each: "tempo/charge", "tempo/session",
# "stripe/charge". Each needs its secrets (see README.md).
methods = ["tempo/charge"]
# Price of one execute_code run (1,000 mcents = 1 cent).
execute_price_mcents = 1_000
# Largest accepted code, in bytes.
max_code_bytes = 65_536
# Wall-clock limit of one run, and its CPU limit (CPU is enforced by Cloudflare in production).
timeout_ms = 5_000
cpu_ms = 50
# How long a challenge stays payable.
challenge_ttl_seconds = 300
"#;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Project {
    pub name: String,
    pub target: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gateway {
    pub key_prefix: String,
    pub max_body_bytes: u64,
    pub max_mint_mcents: u64,
    pub mints_per_hour: u64,
    pub refunds_per_key_per_hour: u64,
    pub default_rate_limit_per_minute: u64,
    pub leaderboard_size: u64,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            key_prefix: "mcp_".into(),
            max_body_bytes: 16_384,
            max_mint_mcents: 100_000_000,
            mints_per_hour: 60,
            refunds_per_key_per_hour: 5,
            default_rate_limit_per_minute: 60,
            leaderboard_size: 50,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Signup {
    pub enabled: bool,
    pub price_mcents: u64,
    pub balance_mcents: u64,
    pub scopes: Vec<String>,
    pub signups_per_hour: u64,
    /// The x402 rail (on when the table exists).
    pub x402: Option<SignupX402>,
    /// The MPP rail (on when the table exists).
    pub mpp: Option<SignupMpp>,
}

impl Default for Signup {
    fn default() -> Self {
        Signup {
            enabled: false,
            price_mcents: 100_000,
            balance_mcents: 100_000,
            scopes: vec![],
            signups_per_hour: 100,
            x402: None,
            mpp: None,
        }
    }
}

/// `[signup.x402]`: x402 `exact` payments on an EVM network (EIP-3009), through a facilitator.
/// The defaults are Base Sepolia's test USDC and the public x402.org test facilitator (no real funds).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignupX402 {
    /// CAIP-2 network id, `eip155:<chain id>`.
    pub network: String,
    /// The EIP-3009 token contract (e.g. USDC).
    pub asset: String,
    /// The token's EIP-712 domain name and version ("USD Coin"/"2" on Base mainnet, "USDC"/"2" on Base Sepolia).
    pub asset_name: String,
    pub asset_version: String,
    /// The token's decimals (USDC: 6); at least 5, so that one mcent is a whole number of base units.
    pub asset_decimals: u32,
    /// Address receiving payments; empty = the `X402_PAY_TO` secret must be set.
    pub pay_to: String,
    /// Facilitator verifying and settling payments (`X402_FACILITATOR_URL` overrides it).
    pub facilitator_url: String,
    /// JSON-RPC endpoint of the network, where pending settlements are looked up (`X402_RPC_URL`
    /// overrides it; one of the two must be set for the rail to be served).
    pub rpc_url: String,
    /// How long a signed authorization may take to settle.
    pub max_timeout_seconds: u64,
}

impl Default for SignupX402 {
    fn default() -> Self {
        SignupX402 {
            network: "eip155:84532".into(),
            asset: "0x036CbD53842c5426634e7929541eC2318f3dCF7e".into(),
            asset_name: "USDC".into(),
            asset_version: "2".into(),
            asset_decimals: 6,
            pay_to: String::new(),
            facilitator_url: "https://www.x402.org/facilitator".into(),
            rpc_url: String::new(),
            max_timeout_seconds: 120,
        }
    }
}

/// Payment methods the signup MPP rail can offer (charge intents only).
pub const SIGNUP_MPP_METHODS: &[&str] = &["tempo/charge", "stripe/charge"];

/// `[signup.mpp]`: Machine Payments Protocol charges (secrets: MPP_SECRET_KEY and the method's).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignupMpp {
    pub methods: Vec<String>,
    /// The realm in challenges; empty = the host the gateway is served on.
    pub realm: String,
    pub challenge_ttl_seconds: u64,
}

impl Default for SignupMpp {
    fn default() -> Self {
        SignupMpp { methods: vec!["tempo/charge".into()], realm: String::new(), challenge_ttl_seconds: 300 }
    }
}

fn is_evm_address(s: &str) -> bool {
    s.len() == 42 && s.starts_with("0x") && s[2..].chars().all(|c| c.is_ascii_hexdigit())
}

/// Base units of the x402 asset for `mcents` (1 mcent = $0.00001, so 10^(decimals − 5) units).
pub fn x402_amount(mcents: u64, decimals: u32) -> String {
    (u128::from(mcents) * 10u128.pow(decimals.saturating_sub(5))).to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub price_mcents: u64,
    pub xp: Option<u64>,
    pub scope: Option<String>,
    pub description: Option<String>,
    pub rate_limit_per_minute: Option<u64>,
    #[serde(default)]
    pub input: IndexMap<String, String>,
}

/// One input field of an endpoint, parsed from `name = "type"` / `name = "type?"`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub required: bool,
}

pub fn parse_field_type(raw: &str) -> Option<(String, bool)> {
    let (ty, required) = match raw.strip_suffix('?') {
        Some(t) => (t, false),
        None => (raw, true),
    };
    FIELD_TYPES.contains(&ty).then(|| (ty.to_string(), required))
}

/// The default XP award of an endpoint: a tenth of its price, at least 1.
pub fn default_xp(price_mcents: u64) -> u64 {
    (price_mcents / 10).max(1)
}

/// Reads and parses a manifest, without validating it.
pub fn parse(text: &str, origin: &Path) -> Result<(DocumentMut, Manifest)> {
    let doc: DocumentMut = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", origin.display()))?;
    let manifest: Manifest = toml_edit::de::from_document(doc.clone()).map_err(|e| {
        anyhow::anyhow!("{}: {}", origin.display(), e.to_string().trim_end())
    })?;
    Ok((doc, manifest))
}

impl Manifest {
    /// Every problem with the manifest, each naming the key and the fix. Empty when valid.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = names::check_project_name(&self.project.name) {
            out.push(format!("project.name: {e}"));
        }
        if !["worker", "axum", "mpp"].contains(&self.project.target.as_str()) {
            out.push(format!(
                "project.target: unknown target {:?}; use \"worker\", \"axum\" or \"mpp\"",
                self.project.target
            ));
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
            range(out, &format!("{at}.xp"), xp, 0, 1_000_000);
        }
        if let Some(scope) = &ep.scope {
            if let Err(e) = names::check_scope(scope) {
                out.push(format!("{at}.scope: {e}"));
            }
        }
        if let Some(d) = &ep.description {
            if d.len() > 200 || d.contains('\n') {
                out.push(format!("{at}.description: one line of at most 200 characters"));
            }
        }
        if let Some(r) = ep.rate_limit_per_minute {
            range(out, &format!("{at}.rate_limit_per_minute"), r, 1, 1_000_000);
        }
        if ep.input.len() > 64 {
            out.push(format!("{at}.input: at most 64 fields"));
        }
        for (field, ty) in &ep.input {
            if let Err(e) = names::check_field_name(field) {
                out.push(format!("{at}.input: {e}"));
            }
            if parse_field_type(ty).is_none() {
                out.push(format!(
                    "{at}.input.{field}: unknown type {ty:?}; use one of {} (add '?' for optional)",
                    FIELD_TYPES.join(", ")
                ));
            }
        }
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

    /// The scope an endpoint needs (default: its own name).
    pub fn scope_of(name: &str, ep: &Endpoint) -> String {
        ep.scope.clone().unwrap_or_else(|| name.to_string())
    }

    /// Every scope in use, in endpoint order, without repeats.
    pub fn scopes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (name, ep) in &self.endpoints {
            let s = Self::scope_of(name, ep);
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }
}

fn range(out: &mut Vec<String>, key: &str, v: u64, lo: u64, hi: u64) {
    if !(lo..=hi).contains(&v) {
        out.push(format!("{key}: {v} is out of range; use {lo} to {hi}"));
    }
}

/// Finds mcpay.toml in `start` or the nearest directory above it.
pub fn find_upward(start: &Path) -> Result<PathBuf> {
    let start = start
        .canonicalize()
        .with_context(|| format!("cannot read directory {}", start.display()))?;
    for dir in start.ancestors() {
        let candidate = dir.join(FILE_NAME);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no {FILE_NAME} found in {} or any directory above it; run this inside a project made by create-mcpay (or pass --project DIR)",
        start.display()
    )
}

/// Sets `dotted.key = value` in the document, parsing `raw` as a TOML value when it is one
/// (numbers, booleans, arrays, quoted strings) and as a plain string otherwise.
pub fn set_dotted(doc: &mut DocumentMut, key: &str, raw: &str) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("-d {key}=…: the key must be a dotted path such as gateway.key_prefix");
    }
    let parsed: toml_edit::Value = raw
        .parse::<toml_edit::Value>()
        .unwrap_or_else(|_| toml_edit::Value::from(raw));
    let mut table: &mut Table = doc.as_table_mut();
    for part in &parts[..parts.len() - 1] {
        let entry = table.entry(part).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = entry
            .as_table_mut()
            .with_context(|| format!("-d {key}=…: {part} is not a table in mcpay.toml"))?;
    }
    let last = parts[parts.len() - 1];
    match table.get_mut(last) {
        Some(item) if item.is_value() => {
            // Keep the key's comments and spacing.
            let decor = item.as_value().map(|v| v.decor().clone());
            let mut v = parsed;
            if let Some(d) = decor {
                *v.decor_mut() = d;
            }
            *item = Item::Value(v);
        }
        Some(_) => bail!("-d {key}=…: {key} is a table; set one of its keys instead"),
        None => {
            table.insert(last, Item::Value(parsed));
        }
    }
    Ok(())
}

/// Inserts `[endpoints.NAME]` at the end of the endpoints, leaving everything else as it was.
pub fn insert_endpoint(doc: &mut DocumentMut, name: &str, ep: &Endpoint) {
    let endpoints = doc
        .as_table_mut()
        .entry("endpoints")
        .or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        })
        .as_table_mut()
        .expect("endpoints is a table (checked by parsing)");
    let mut t = Table::new();
    t.insert("price_mcents", value(ep.price_mcents as i64));
    if let Some(xp) = ep.xp {
        t.insert("xp", value(xp as i64));
    }
    if let Some(scope) = &ep.scope {
        t.insert("scope", value(scope.as_str()));
    }
    if let Some(d) = &ep.description {
        t.insert("description", value(d.as_str()));
    }
    if let Some(r) = ep.rate_limit_per_minute {
        t.insert("rate_limit_per_minute", value(r as i64));
    }
    let mut input = toml_edit::InlineTable::new();
    for (k, v) in &ep.input {
        input.insert(k, v.as_str().into());
    }
    t.insert("input", value(input));
    endpoints.insert(name, Item::Table(t));
}

/// Removes every `[endpoints.*]` table (used when `--endpoint` replaces the default example).
pub fn clear_endpoints(doc: &mut DocumentMut) {
    if let Some(t) = doc.get_mut("endpoints").and_then(Item::as_table_mut) {
        t.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = include_str!("../templates/shared/mcpay.toml");

    fn load(text: &str) -> (DocumentMut, Manifest) {
        parse(text, Path::new("mcpay.toml")).unwrap()
    }

    #[test]
    fn the_default_manifest_is_valid() {
        let (_, m) = load(BASE);
        assert_eq!(m.problems(), Vec::<String>::new());
        assert_eq!(m.endpoints.len(), 1);
    }

    #[test]
    fn every_example_manifest_is_valid() {
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let (_, m) = parse(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
                assert_eq!(m.problems(), Vec::<String>::new(), "{}", path.display());
            }
        }
    }

    #[test]
    fn signup_rails_are_validated_with_fixes() {
        let on = BASE.replace("enabled = false", "enabled = true").replace("scopes = []", "scopes = [\"example\"]");
        let (_, m) = load(&on);
        assert_eq!(m.problems(), vec!["signup: a signup needs a payment rail; add a [signup.x402] table, a [signup.mpp] table, or both".to_string()]);

        let bad = format!("{on}\n[signup.x402]\nnetwork = \"base\"\nasset = \"0x12\"\npay_to = \"nope\"\nasset_decimals = 4\nfacilitator_url = \"ftp://x\"\nrpc_url = \"localhost:8545\"\n[signup.mpp]\nmethods = [\"tempo/session\"]\n");
        let (_, m) = load(&bad);
        let p = m.problems().join("\n");
        for needle in [
            "signup.x402.network: \"base\" must be a CAIP-2 EVM network such as \"eip155:8453\"",
            "signup.x402.asset: \"0x12\" must be the token contract's 0x address",
            "signup.x402.pay_to: \"nope\" must be a 0x address (40 hex digits), or empty to use the X402_PAY_TO secret",
            "signup.x402.asset_decimals: 4 is out of range; use 5 to 18 (USDC: 6)",
            "signup.x402.facilitator_url: \"ftp://x\" must be an http(s) URL",
            "signup.x402.rpc_url: \"localhost:8545\" must be an http(s) JSON-RPC URL",
            "signup.mpp.methods: unknown method \"tempo/session\"; use tempo/charge, stripe/charge",
        ] {
            assert!(p.contains(needle), "missing {needle:?} in:\n{p}");
        }

        // The commented-out rail tables of the default manifest are valid as written.
        let uncommented: String = on
            .lines()
            .map(|l| if l.starts_with("# [signup.") || l.starts_with("# network") || l.starts_with("# asset") || l.starts_with("# pay_to") || l.starts_with("# facilitator_url") || l.starts_with("# rpc_url") || l.starts_with("# max_timeout") || l.starts_with("# methods") || l.starts_with("# realm") || l.starts_with("# challenge_ttl") { l[2..].to_string() } else { l.to_string() })
            .collect::<Vec<_>>()
            .join("\n");
        let (_, m) = load(&uncommented);
        assert_eq!(m.problems(), Vec::<String>::new(), "{uncommented}");
        assert!(m.signup.x402.is_some() && m.signup.mpp.is_some());
    }

    #[test]
    fn x402_amounts_are_exact_base_units() {
        assert_eq!(x402_amount(100_000, 6), "1000000"); // $1.00 of USDC
        assert_eq!(x402_amount(1, 6), "10");
        assert_eq!(x402_amount(1, 5), "1");
        assert_eq!(x402_amount(MAX_SAFE_INTEGER, 18), "90071992547409910000000000000");
    }

    #[test]
    fn all_problems_are_reported_with_fixes() {
        let text = BASE
            .replace("price_mcents = 100\n", "price_mcents = 0\n")
            .replace("key_prefix = \"mcp_\"", "key_prefix = \"MCP\"");
        let (_, m) = load(&text);
        let p = m.problems().join("\n");
        assert!(p.contains("gateway.key_prefix"), "{p}");
        assert!(p.contains("price_mcents: 0 is out of range"), "{p}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = BASE.replace("[gateway]", "[gateway]\nkey_prefx = \"x_\"");
        let err = parse(&text, Path::new("mcpay.toml")).unwrap_err().to_string();
        assert!(err.contains("key_prefx"), "{err}");
    }

    #[test]
    fn insert_endpoint_keeps_comments_and_order() {
        let (mut doc, _) = load(BASE);
        let ep = Endpoint {
            price_mcents: 250,
            xp: None,
            scope: None,
            description: Some("My tool".into()),
            rate_limit_per_minute: None,
            input: [("query".to_string(), "string".to_string())].into_iter().collect(),
        };
        insert_endpoint(&mut doc, "mytool", &ep);
        let out = doc.to_string();
        assert!(out.starts_with(BASE.trim_end()), "existing text changed:\n{out}");
        let (_, m) = load(&out);
        assert_eq!(m.endpoints.keys().collect::<Vec<_>>(), ["example", "mytool"]);
        assert_eq!(m.endpoints["mytool"], ep);
    }

    #[test]
    fn set_dotted_parses_values_and_keeps_comments() {
        let (mut doc, _) = load(BASE);
        set_dotted(&mut doc, "gateway.key_prefix", "acme_").unwrap();
        set_dotted(&mut doc, "gateway.max_body_bytes", "4096").unwrap();
        set_dotted(&mut doc, "project.description", "Search for agents").unwrap();
        let (_, m) = load(&doc.to_string());
        assert_eq!(m.gateway.key_prefix, "acme_");
        assert_eq!(m.gateway.max_body_bytes, 4096);
        assert_eq!(m.project.description, "Search for agents");
        assert!(doc.to_string().contains("# Prefix of every API key"));
        assert!(set_dotted(&mut doc, "endpoints", "1").is_err());
    }

    #[test]
    fn field_types() {
        assert_eq!(parse_field_type("string"), Some(("string".into(), true)));
        assert_eq!(parse_field_type("integer?"), Some(("integer".into(), false)));
        assert_eq!(parse_field_type("str"), None);
    }
}
