//! The manifest's types, their defaults, and the defaults of what an endpoint may leave out —
//! the one place a default lives (the spec and the CLI both read them from here).

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::target::Target;

/// Largest price of one call: 100,000,000 mcents = $1,000.
pub const MAX_PRICE_MCENTS: u64 = 100_000_000;
/// Largest integer every target (JavaScript numbers included) represents exactly.
pub const MAX_SAFE_INTEGER: u64 = 9_007_199_254_740_991;
/// Largest XP award of one call.
pub const MAX_XP: u64 = 1_000_000;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub project: Project,
    #[serde(default)]
    pub gateway: Gateway,
    #[serde(default)]
    pub signup: Signup,
    #[serde(default)]
    pub endpoints: IndexMap<String, Endpoint>,
    /// MCP servers that already exist, metered at `/mcp/NAME` (contract 3.12).
    #[serde(default)]
    pub upstreams: IndexMap<String, Upstream>,
    /// Settings of the `mpp` target (ignored by the others).
    #[serde(default)]
    pub mpp: Mpp,
}

/// Payment methods the `mpp` target can offer, as `method/intent`.
pub const MPP_METHODS: &[&str] = &["tempo/charge", "tempo/session", "stripe/charge"];

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Project {
    pub name: String,
    pub target: Target,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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

pub(super) fn is_evm_address(s: &str) -> bool {
    s.len() == 42 && s.starts_with("0x") && s[2..].chars().all(|c| c.is_ascii_hexdigit())
}

/// Base units of the x402 asset for `mcents` (1 mcent = $0.00001, so 10^(decimals − 5) units).
pub fn x402_amount(mcents: u64, decimals: u32) -> String {
    (u128::from(mcents) * 10u128.pow(decimals.saturating_sub(5))).to_string()
}

/// `[endpoints.NAME]` as written by the user: every key left out takes its default from
/// [`Endpoint::resolved`], so nothing derived from another value is ever written here.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub price_mcents: u64,
    pub xp: Option<u64>,
    pub scope: Option<String>,
    pub description: Option<String>,
    pub rate_limit_per_minute: Option<u64>,
    /// Handler time limit in milliseconds (past it: 504 handler_timeout, the hold is released).
    /// Left out: [`DEFAULT_TIMEOUT_MS`].
    pub timeout_ms: Option<u64>,
    /// The JSON body's fields, `name = "type"` (`"type?"` = optional). Left out: [`default_input`].
    pub input: Option<IndexMap<String, String>>,
}

/// An endpoint with every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedEndpoint {
    pub price_mcents: u64,
    pub xp: u64,
    pub scope: String,
    pub description: String,
    pub rate_limit_per_minute: u64,
    pub timeout_ms: u64,
    /// (field, raw type) pairs, in manifest order.
    pub input: IndexMap<String, String>,
}

/// The default handler time limit of an endpoint, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// The allowed range of an endpoint's `timeout_ms`.
pub const TIMEOUT_MS_RANGE: (u64, u64) = (100, 600_000);

/// The default XP award of an endpoint: a tenth of its price, at least 1 and at most [`MAX_XP`]
/// (so that no valid price gives an invalid default).
pub fn default_xp(price_mcents: u64) -> u64 {
    (price_mcents / 10).clamp(1, MAX_XP)
}

/// The default input of an endpoint that has no `input` key: one required string, `query`.
pub fn default_input() -> IndexMap<String, String> {
    [("query".to_string(), "string".to_string())].into_iter().collect()
}

impl Endpoint {
    /// The endpoint as served: XP, scope, description, rate limit, time limit and input with their defaults.
    pub fn resolved(&self, name: &str, gateway: &Gateway) -> ResolvedEndpoint {
        ResolvedEndpoint {
            price_mcents: self.price_mcents,
            xp: self.xp.unwrap_or_else(|| default_xp(self.price_mcents)),
            scope: self.scope.clone().unwrap_or_else(|| name.to_string()),
            description: self.description.clone().unwrap_or_default(),
            rate_limit_per_minute: self.rate_limit_per_minute.unwrap_or(gateway.default_rate_limit_per_minute),
            timeout_ms: self.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
            input: self.input.clone().unwrap_or_else(default_input),
        }
    }
}

/// `[upstreams.NAME]` as written by the user: an MCP server the gateway meters at `/mcp/NAME`.
/// Keys left out take their defaults in [`Upstream::resolved`].
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// A Streamable HTTP MCP server.
    pub url: Option<String>,
    /// A stdio MCP server the gateway spawns and keeps alive (argv; targets that can spawn processes).
    pub command: Option<Vec<String>>,
    /// How `url` is spoken: `"http"` (Streamable HTTP, the default) or `"sse"` (legacy HTTP+SSE);
    /// `"stdio"` for a `command` (its default). One of [`UPSTREAM_TRANSPORTS`].
    pub transport: Option<String>,
    /// Price of one `tools/call` of a tool not listed in `tools`.
    pub price_mcents: u64,
    pub scope: Option<String>,
    pub description: Option<String>,
    pub timeout_seconds: Option<u64>,
    pub rate_limit_per_minute: Option<u64>,
    /// Header name → `"env:VAR"`: the value is read from the secret/env var VAR at request time.
    pub headers: Option<IndexMap<String, String>>,
    pub enabled: Option<bool>,
    /// Release the charge of a result with `isError: true` (default: charged).
    pub refund_tool_errors: Option<bool>,
    /// Per-tool prices in mcents (0 = free).
    pub tools: Option<IndexMap<String, u64>>,
}

/// How the gateway reaches an upstream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "value")]
pub enum UpstreamTransport {
    /// A Streamable HTTP MCP server.
    Url(String),
    /// A legacy HTTP+SSE MCP server (MCP 2024-11-05): the URL of its event stream.
    Sse(String),
    Command(Vec<String>),
}

/// The values of an upstream's `transport`, as `/v1/pricing` lists them: (name, needs a `url`).
pub const UPSTREAM_TRANSPORTS: &[(&str, bool)] = &[("http", true), ("sse", true), ("stdio", false)];

impl UpstreamTransport {
    /// The name `/v1/pricing` and the manifest's `transport` use.
    pub fn name(&self) -> &'static str {
        match self {
            UpstreamTransport::Url(_) => "http",
            UpstreamTransport::Sse(_) => "sse",
            UpstreamTransport::Command(_) => "stdio",
        }
    }
}

/// An upstream with every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedUpstream {
    pub transport: UpstreamTransport,
    pub price_mcents: u64,
    pub scope: String,
    pub description: String,
    pub timeout_ms: u64,
    pub rate_limit_per_minute: u64,
    /// (header name, env var name) pairs, in manifest order.
    pub headers: Vec<(String, String)>,
    pub enabled: bool,
    pub refund_tool_errors: bool,
    pub tools: IndexMap<String, u64>,
}

/// The price of one `tools/call` that `create-mcpay add-upstream` writes when `--price` is not given
/// (the manifest's `price_mcents` itself is required).
pub const DEFAULT_UPSTREAM_PRICE_MCENTS: u64 = 100;
/// The default time limit of one proxied request, in seconds.
pub const DEFAULT_UPSTREAM_TIMEOUT_SECONDS: u64 = 30;
/// The allowed range of an upstream's `timeout_seconds`.
pub const UPSTREAM_TIMEOUT_SECONDS_RANGE: (u64, u64) = (1, 600);
/// How a header value names its secret: `"env:VAR"`.
pub const HEADER_ENV_PREFIX: &str = "env:";

/// The env var / secret that overrides an upstream's URL at run time (`UPSTREAM_<NAME>_URL`).
pub fn upstream_url_env(name: &str) -> String {
    format!("UPSTREAM_{}_URL", name.to_ascii_uppercase())
}

impl Upstream {
    /// The upstream as served; the manifest must be valid (exactly one of `url` / `command`).
    pub fn resolved(&self, name: &str, gateway: &Gateway) -> ResolvedUpstream {
        let transport = match (&self.url, &self.command) {
            (_, Some(argv)) => UpstreamTransport::Command(argv.clone()),
            (url, None) if self.transport.as_deref() == Some("sse") => UpstreamTransport::Sse(url.clone().unwrap_or_default()),
            (url, None) => UpstreamTransport::Url(url.clone().unwrap_or_default()),
        };
        ResolvedUpstream {
            transport,
            price_mcents: self.price_mcents,
            scope: self.scope.clone().unwrap_or_else(|| name.to_string()),
            description: self.description.clone().unwrap_or_default(),
            timeout_ms: self.timeout_seconds.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_SECONDS) * 1000,
            rate_limit_per_minute: self.rate_limit_per_minute.unwrap_or(gateway.default_rate_limit_per_minute),
            headers: self
                .headers
                .iter()
                .flatten()
                .map(|(h, v)| (h.clone(), v.strip_prefix(HEADER_ENV_PREFIX).unwrap_or(v).to_string()))
                .collect(),
            enabled: self.enabled.unwrap_or(true),
            refund_tool_errors: self.refund_tool_errors.unwrap_or(false),
            tools: self.tools.clone().unwrap_or_default(),
        }
    }
}

/// The type of one input field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
}

impl FieldType {
    pub const ALL: &'static [FieldType] =
        &[FieldType::String, FieldType::Number, FieldType::Integer, FieldType::Boolean, FieldType::Object, FieldType::Array];

    /// The name in mcpay.toml.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Integer => "integer",
            FieldType::Boolean => "boolean",
            FieldType::Object => "object",
            FieldType::Array => "array",
        }
    }

    /// The variant of the generated code's own `FieldType` (Rust `shape::FieldType`).
    pub fn variant(self) -> &'static str {
        match self {
            FieldType::String => "String",
            FieldType::Number => "Number",
            FieldType::Integer => "Integer",
            FieldType::Boolean => "Boolean",
            FieldType::Object => "Object",
            FieldType::Array => "Array",
        }
    }

    pub fn ts_type(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number | FieldType::Integer => "number",
            FieldType::Boolean => "boolean",
            FieldType::Object => "Record<string, unknown>",
            FieldType::Array => "unknown[]",
        }
    }

    pub fn rust_type(self) -> &'static str {
        match self {
            FieldType::String => "String",
            FieldType::Number => "f64",
            FieldType::Integer => "i64",
            FieldType::Boolean => "bool",
            FieldType::Object => "serde_json::Map<String, serde_json::Value>",
            FieldType::Array => "Vec<serde_json::Value>",
        }
    }

    /// The names, for messages: `string, number, …`.
    pub fn names() -> String {
        FieldType::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
    }
}

/// Parses `"type"` / `"type?"` (optional): the type and whether the field is required.
pub fn parse_field_type(raw: &str) -> Option<(FieldType, bool)> {
    let (ty, required) = match raw.strip_suffix('?') {
        Some(t) => (t, false),
        None => (raw, true),
    };
    FieldType::ALL.iter().copied().find(|t| t.name() == ty).map(|t| (t, required))
}
