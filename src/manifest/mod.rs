//! `mcpay.toml`: the single source of truth for what a generated gateway sells.
//!
//! Reading goes through serde (every problem is reported at once, with the fix, by [`validate`]);
//! writing goes through toml_edit ([`edit`]) so that a user's comments and ordering survive
//! `add-endpoint`. The types and every default live in [`schema`].

mod edit;
mod schema;
mod validate;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use toml_edit::DocumentMut;

pub use edit::{clear_endpoints, insert_endpoint, insert_upstream, set_dotted};
pub use schema::*;

pub const FILE_NAME: &str = "mcpay.toml";

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
#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = include_str!("../../templates/shared/mcpay.toml");

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
            timeout_ms: Some(1_500),
            input: Some([("query".to_string(), "string".to_string())].into_iter().collect()),
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
        assert_eq!(parse_field_type("string"), Some((FieldType::String, true)));
        assert_eq!(parse_field_type("integer?"), Some((FieldType::Integer, false)));
        assert_eq!(parse_field_type("str"), None);
        assert_eq!(FieldType::names(), "string, number, integer, boolean, object, array");
    }

    /// The documented values in the `[mpp]` section a new mpp project gets, and in the default
    /// manifest (its commented-out rails included), are the `Default` values.
    #[test]
    fn documented_values_are_the_defaults() {
        let (_, m) = load(&format!("{BASE}{MPP_SECTION}"));
        assert_eq!(m.mpp, Mpp::default());
        assert_eq!(m.gateway, Gateway::default());
        assert_eq!(m.signup, Signup::default());
        let uncommented: String = BASE
            .lines()
            .map(|l| {
                let rail_line = ["[signup.", "network", "asset", "pay_to", "facilitator_url", "rpc_url", "max_timeout", "methods", "realm", "challenge_ttl"]
                    .iter()
                    .any(|k| l.strip_prefix("# ").is_some_and(|r| r.starts_with(k)));
                if rail_line { l[2..].to_string() } else { l.to_string() }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let (_, m) = load(&uncommented);
        // rpc_url has no usable default (it is the operator's node); the comment shows an example.
        let x402 = SignupX402 { rpc_url: String::new(), ..m.signup.x402.clone().unwrap() };
        assert_eq!(x402, SignupX402::default());
        assert_eq!(m.signup.mpp.clone().unwrap(), SignupMpp::default());
        // The example endpoint states no value that a default would give.
        let ex = &m.endpoints["example"];
        assert!(ex.xp.is_none() || ex.xp != Some(default_xp(ex.price_mcents)), "xp = default: leave it out");
    }

    #[test]
    fn defaults_never_make_valid_input_invalid() {
        // The documented maximum price with no XP given: the default XP is in range.
        let text = BASE.replace("price_mcents = 100\n", &format!("price_mcents = {MAX_PRICE_MCENTS}\n")).replace("xp = 10\n", "");
        let (_, m) = load(&text);
        assert_eq!(m.problems(), Vec::<String>::new());
        assert_eq!(m.endpoints["example"].resolved("example", &m.gateway).xp, MAX_XP);
        assert_eq!(default_xp(1), 1);
        assert_eq!(default_xp(250), 25);
    }

    #[test]
    fn left_out_keys_take_the_defaults_of_one_function() {
        let (_, m) = load("[project]\nname = \"a\"\ntarget = \"worker\"\n[endpoints.tool]\nprice_mcents = 4321\n");
        let r = m.endpoints["tool"].resolved("tool", &m.gateway);
        assert_eq!((r.xp, r.scope.as_str(), r.rate_limit_per_minute), (432, "tool", 60));
        assert_eq!(r.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(r.input, default_input());
        let (_, m) = load("[project]\nname = \"a\"\ntarget = \"worker\"\n[endpoints.tool]\nprice_mcents = 1\ninput = {}\n");
        assert!(m.endpoints["tool"].resolved("tool", &m.gateway).input.is_empty(), "input = {{}} is no fields");
    }

    #[test]
    fn timeout_ms_is_checked_and_resolved() {
        let base = "[project]\nname = \"a\"\ntarget = \"worker\"\n[endpoints.tool]\nprice_mcents = 1\n";
        let (_, m) = load(&format!("{base}timeout_ms = 250\n"));
        assert_eq!(m.problems(), Vec::<String>::new());
        assert_eq!(m.endpoints["tool"].resolved("tool", &m.gateway).timeout_ms, 250);
        for bad in [99u64, 600_001] {
            let (_, m) = load(&format!("{base}timeout_ms = {bad}\n"));
            let p = m.problems().join("\n");
            assert!(p.contains(&format!("endpoints.tool.timeout_ms: {bad} is out of range; use 100 to 600000")), "{p}");
        }
    }

    #[test]
    fn colliding_identifiers_are_refused_naming_both() {
        for (a, b, ident) in [("my_tool", "my__tool", "MyTool"), ("a1", "a_1", "A1")] {
            let text = format!("[project]\nname = \"x\"\ntarget = \"axum\"\n[endpoints.{a}]\nprice_mcents = 1\n[endpoints.{b}]\nprice_mcents = 1\n");
            let (_, m) = load(&text);
            let p = m.problems().join("\n");
            assert!(p.contains(&format!("endpoints.{a} and endpoints.{b} both become the identifier `{ident}`")), "{p}");
        }
        let (_, m) = load("[project]\nname = \"x\"\ntarget = \"mpp\"\n[endpoints.execute__code]\nprice_mcents = 1\n");
        assert!(m.problems().join("\n").contains("the built-in endpoint \"execute_code\" and endpoints.execute__code"), "{:?}", m.problems());
        let (_, m) = load("[project]\nname = \"x\"\ntarget = \"axum\"\n[endpoints.t]\nprice_mcents = 1\ninput = { self = \"string\", self_ = \"string\" }\n");
        assert!(m.problems().join("\n").contains("fields \"self\" and \"self_\" both become the Rust field `self_`"), "{:?}", m.problems());
    }
}
