//! Configuration from the environment.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::generated::PROJECT_NAME;

#[derive(Clone)]
pub struct Config {
    /// ADMIN_KEY: enables POST /v1/admin/mint. Unset or empty: the admin API answers 503.
    pub admin_key: Option<String>,
    /// DATABASE_URL: `sqlite:PATH` (default `sqlite:<project>.db`, created on first run) or
    /// `postgres://user:pass@host/db`.
    pub database_url: String,
    /// REDIS_URL: share rate limits between instances. Unset: in-process limits.
    pub redis_url: Option<String>,
    /// REDIS_PREFIX: namespace of this gateway's Redis keys (default `mcpay:<project>:`).
    pub redis_prefix: String,
    /// BODY_READ_TIMEOUT_MS: how long a request body may take to arrive, from the moment its
    /// headers were read (default 10000, 100..=600000). Past it: 408 request_timeout, no charge.
    pub body_read_timeout: Duration,
    /// BIND (host, or host:port) and PORT. Default 127.0.0.1:8080.
    pub bind: SocketAddr,
    /// MCP_ALLOWED_HOSTS: comma-separated `Host` values /mcp accepts (e.g. `api.example.com`);
    /// unset or empty: any host (see README.md, "Connect an MCP client").
    pub mcp_allowed_hosts: Vec<String>,
    /// Secrets and settings of the signup payment rails (POST /v1/signup).
    pub signup: SignupSettings,
}

/// The environment of the signup rails ([signup] in mcpay.toml). A configured rail whose
/// settings are missing makes POST /v1/signup answer 503 signup_unavailable, naming them.
#[derive(Clone, Default)]
pub struct SignupSettings {
    /// SIGNUP_SECRET: the server secret of derived signup keys (HMAC-SHA256), at least 32 bytes.
    /// Required whenever signup is enabled.
    pub signup_secret: Option<String>,
    /// X402_RPC_URL: overrides `[signup.x402] rpc_url`, the chain's JSON-RPC endpoint used to
    /// resolve settlements whose outcome is unknown (required for the x402 rail).
    pub x402_rpc_url: Option<String>,
    /// X402_FACILITATOR_TIMEOUT_MS: the bound of one facilitator call (default 60000).
    pub x402_facilitator_timeout_ms: Option<String>,
    /// SIGNUP_SWEEP_INTERVAL_MS: the period of the pending-payment sweep (1000..300000, default 30000).
    pub signup_sweep_interval_ms: Option<String>,
    /// X402_FACILITATOR_URL: overrides `[signup.x402] facilitator_url`.
    pub x402_facilitator_url: Option<String>,
    /// X402_PAY_TO: overrides `[signup.x402] pay_to` (required when that is empty).
    pub x402_pay_to: Option<String>,
    /// X402_FACILITATOR_AUTHORIZATION: sent as `Authorization` to the facilitator's /verify and
    /// /settle (for a facilitator that takes a static credential, e.g. `Bearer …`).
    pub x402_facilitator_authorization: Option<String>,
    /// MPP_SECRET_KEY: binds MPP challenge ids (HMAC-SHA256), at least 32 bytes.
    pub mpp_secret_key: Option<String>,
    /// TEMPO_RECIPIENT (required for tempo/charge), TEMPO_CURRENCY and TEMPO_RPC_URL (optional).
    pub tempo_recipient: Option<String>,
    pub tempo_currency: Option<String>,
    pub tempo_rpc_url: Option<String>,
    /// STRIPE_SECRET_KEY and STRIPE_NETWORK_ID (required for stripe/charge).
    pub stripe_secret_key: Option<String>,
    pub stripe_network_id: Option<String>,
}

impl SignupSettings {
    pub fn from_env() -> SignupSettings {
        SignupSettings {
            signup_secret: std::env::var("SIGNUP_SECRET").ok().filter(|k| !k.is_empty()),
            x402_rpc_url: non_empty("X402_RPC_URL"),
            x402_facilitator_timeout_ms: non_empty("X402_FACILITATOR_TIMEOUT_MS"),
            signup_sweep_interval_ms: non_empty("SIGNUP_SWEEP_INTERVAL_MS"),
            x402_facilitator_url: non_empty("X402_FACILITATOR_URL"),
            x402_pay_to: non_empty("X402_PAY_TO"),
            x402_facilitator_authorization: non_empty("X402_FACILITATOR_AUTHORIZATION"),
            mpp_secret_key: std::env::var("MPP_SECRET_KEY").ok().filter(|k| !k.is_empty()),
            tempo_recipient: non_empty("TEMPO_RECIPIENT"),
            tempo_currency: non_empty("TEMPO_CURRENCY"),
            tempo_rpc_url: non_empty("TEMPO_RPC_URL"),
            stripe_secret_key: non_empty("STRIPE_SECRET_KEY"),
            stripe_network_id: non_empty("STRIPE_NETWORK_ID"),
        }
    }
}

impl std::fmt::Debug for SignupSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: &Option<String>| if v.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("SignupSettings")
            .field("signup_secret", &set(&self.signup_secret))
            .field("x402_rpc_url", &self.x402_rpc_url.as_deref().map(redact_rpc_url))
            .field("x402_facilitator_timeout_ms", &self.x402_facilitator_timeout_ms)
            .field("signup_sweep_interval_ms", &self.signup_sweep_interval_ms)
            .field("x402_facilitator_url", &self.x402_facilitator_url)
            .field("x402_pay_to", &self.x402_pay_to)
            .field("x402_facilitator_authorization", &set(&self.x402_facilitator_authorization))
            .field("mpp_secret_key", &set(&self.mpp_secret_key))
            .field("tempo_recipient", &self.tempo_recipient)
            .field("tempo_currency", &self.tempo_currency)
            .field("tempo_rpc_url", &self.tempo_rpc_url.as_deref().map(redact_url))
            .field("stripe_secret_key", &set(&self.stripe_secret_key))
            .field("stripe_network_id", &self.stripe_network_id)
            .finish()
    }
}

// Never print secrets: Debug shows whether they are set, not their values.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("admin_key", &self.admin_key.as_ref().map(|_| "<set>"))
            .field("database", &redact_url(&self.database_url))
            .field("redis", &self.redis_url.as_deref().map(redact_url))
            .field("body_read_timeout", &self.body_read_timeout)
            .field("bind", &self.bind)
            .field("mcp_allowed_hosts", &self.mcp_allowed_hosts)
            .field("signup", &self.signup)
            .finish()
    }
}

/// `scheme://user:password@host/db` → `scheme://host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// A JSON-RPC URL for logs: no credentials, and no path or query (hosted RPC providers put the
/// API key there, e.g. `https://base-sepolia.g.alchemy.com/v2/<key>`).
pub fn redact_rpc_url(url: &str) -> String {
    let url = redact_url(url);
    match url.find("://") {
        Some(s) => match url[s + 3..].find(['/', '?']) {
            Some(end) => format!("{}/…", &url[..s + 3 + end]),
            None => url,
        },
        None => "<set>".into(),
    }
}

/// The default of BODY_READ_TIMEOUT_MS.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// BODY_READ_TIMEOUT_MS: an integer number of milliseconds, 100..=600000.
pub fn parse_body_read_timeout(v: &str) -> Result<Duration, String> {
    match v.parse::<u64>() {
        Ok(ms) if (100..=600_000).contains(&ms) && v.bytes().all(|b| b.is_ascii_digit()) => Ok(Duration::from_millis(ms)),
        _ => Err(format!("BODY_READ_TIMEOUT_MS={v:?} must be a whole number of milliseconds from 100 to 600000 (default 10000).")),
    }
}

/// ADMIN_KEY is compared with the X-Admin-Key header, whose surrounding whitespace HTTP strips:
/// a key that starts or ends with whitespace could never match, so it is refused at start-up
/// (not trimmed: the Worker target compares ADMIN_KEY as set, too).
pub fn check_admin_key(key: &str) -> Result<(), String> {
    if key.trim() != key {
        return Err("ADMIN_KEY starts or ends with whitespace (a space, tab or newline), so no X-Admin-Key header could ever match it. Remove the whitespace from ADMIN_KEY (e.g. generate it with `openssl rand -hex 32`) and start again.".into());
    }
    Ok(())
}

fn non_empty(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

impl Config {
    pub fn from_env() -> Result<Config, String> {
        let port: u16 = match non_empty("PORT") {
            Some(p) => p.parse().map_err(|_| format!("PORT={p:?} is not a port number"))?,
            None => 8080,
        };
        let bind = match non_empty("BIND") {
            None => SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port),
            Some(b) => match b.parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(_) => {
                    let ip: IpAddr = b.trim_matches(['[', ']']).parse().map_err(|_| {
                        format!("BIND={b:?} is neither an IP address nor IP:PORT (e.g. 0.0.0.0 or 0.0.0.0:8080)")
                    })?;
                    SocketAddr::new(ip, port)
                }
            },
        };
        let admin_key = std::env::var("ADMIN_KEY").ok().filter(|k| !k.is_empty());
        if let Some(k) = &admin_key {
            check_admin_key(k)?;
        }
        let body_read_timeout = match non_empty("BODY_READ_TIMEOUT_MS") {
            Some(v) => parse_body_read_timeout(&v)?,
            None => DEFAULT_BODY_READ_TIMEOUT,
        };
        Ok(Config {
            admin_key,
            body_read_timeout,
            database_url: non_empty("DATABASE_URL").unwrap_or_else(|| format!("sqlite:{PROJECT_NAME}.db")),
            redis_url: non_empty("REDIS_URL"),
            redis_prefix: non_empty("REDIS_PREFIX").unwrap_or_else(|| format!("mcpay:{PROJECT_NAME}:")),
            bind,
            mcp_allowed_hosts: non_empty("MCP_ALLOWED_HOSTS")
                .map(|v| v.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_string).collect())
                .unwrap_or_default(),
            signup: SignupSettings::from_env(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret() {
        let settings = SignupSettings {
            signup_secret: Some("signup-secret-0123456789abcdef-0123456789".into()),
            x402_rpc_url: Some("https://user:rpc-password@base.example/v2/rpc-api-key?token=rpc-token".into()),
            x402_facilitator_timeout_ms: Some("2500".into()),
            mpp_secret_key: Some("mpp-secret-0123456789abcdef-0123456789".into()),
            ..Default::default()
        };
        let shown = format!("{settings:?}");
        for secret in ["signup-secret", "rpc-password", "rpc-api-key", "rpc-token", "mpp-secret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("base.example") && shown.contains("2500"), "{shown}");
        assert_eq!(redact_rpc_url("http://127.0.0.1:8545"), "http://127.0.0.1:8545");
    }

    #[test]
    fn admin_key_with_surrounding_whitespace_is_refused() {
        assert!(check_admin_key("s3cret-admin-key").is_ok());
        assert!(check_admin_key("inner space ok").is_ok());
        for bad in [" s3cret", "s3cret ", "s3cret\n", "\ts3cret", " "] {
            let e = check_admin_key(bad).unwrap_err();
            assert!(e.contains("ADMIN_KEY") && e.contains("Remove the whitespace"), "{e}");
        }
    }

    #[test]
    fn body_read_timeout_bounds() {
        assert_eq!(parse_body_read_timeout("100"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_body_read_timeout("600000"), Ok(Duration::from_secs(600)));
        for bad in ["99", "600001", "-5", "1e3", "+500", "10s", ""] {
            let e = parse_body_read_timeout(bad).unwrap_err();
            assert!(e.contains("BODY_READ_TIMEOUT_MS"), "{e}");
        }
    }
}
