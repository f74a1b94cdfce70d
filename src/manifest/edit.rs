//! Editing mcpay.toml through toml_edit, so that a user's comments and ordering survive.

use anyhow::{Context as _, Result, bail};
use toml_edit::{DocumentMut, Item, Table, value};

use super::schema::{Endpoint, Upstream};


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
    // Only what was given: every key left out keeps its default (see `Endpoint::resolved`).
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
    if let Some(ms) = ep.timeout_ms {
        t.insert("timeout_ms", value(ms as i64));
    }
    if let Some(fields) = &ep.input {
        let mut input = toml_edit::InlineTable::new();
        for (k, v) in fields {
            input.insert(k, v.as_str().into());
        }
        t.insert("input", value(input));
    }
    endpoints.insert(name, Item::Table(t));
}

/// Inserts `[upstreams.NAME]` (and `[upstreams.NAME.tools]` when it has tool prices) at the end of the
/// upstreams, leaving everything else as it was. Only the keys that are set are written.
pub fn insert_upstream(doc: &mut DocumentMut, name: &str, up: &Upstream) {
    let upstreams = doc
        .as_table_mut()
        .entry("upstreams")
        .or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        })
        .as_table_mut()
        .expect("upstreams is a table (checked by parsing)");
    let mut t = Table::new();
    if let Some(url) = &up.url {
        t.insert("url", value(url.as_str()));
    }
    if let Some(argv) = &up.command {
        t.insert("command", value(argv.iter().map(String::as_str).collect::<toml_edit::Array>()));
    }
    if let Some(transport) = &up.transport {
        t.insert("transport", value(transport.as_str()));
    }
    t.insert("price_mcents", value(up.price_mcents as i64));
    if let Some(scope) = &up.scope {
        t.insert("scope", value(scope.as_str()));
    }
    if let Some(d) = &up.description {
        t.insert("description", value(d.as_str()));
    }
    if let Some(s) = up.timeout_seconds {
        t.insert("timeout_seconds", value(s as i64));
    }
    if let Some(r) = up.rate_limit_per_minute {
        t.insert("rate_limit_per_minute", value(r as i64));
    }
    if let Some(headers) = up.headers.as_ref().filter(|h| !h.is_empty()) {
        let mut inline = toml_edit::InlineTable::new();
        for (h, v) in headers {
            inline.insert(h, v.as_str().into());
        }
        t.insert("headers", value(inline));
    }
    if let Some(enabled) = up.enabled {
        t.insert("enabled", value(enabled));
    }
    if let Some(refund) = up.refund_tool_errors {
        t.insert("refund_tool_errors", value(refund));
    }
    if let Some(tools) = up.tools.as_ref().filter(|t| !t.is_empty()) {
        let mut prices = Table::new();
        for (tool, price) in tools {
            prices.insert(tool, value(*price as i64));
        }
        t.insert("tools", Item::Table(prices));
    }
    upstreams.insert(name, Item::Table(t));
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
    use crate::manifest::parse;
    use std::path::Path;

    const BASE: &str = include_str!("../../templates/shared/mcpay.toml");

    #[test]
    fn insert_upstream_keeps_comments_and_round_trips() {
        let mut doc: DocumentMut = BASE.parse().unwrap();
        let up = Upstream {
            url: Some("https://weather.example.com/mcp".into()),
            price_mcents: 100,
            scope: Some("weather".into()),
            description: Some("Weather".into()),
            timeout_seconds: Some(20),
            rate_limit_per_minute: Some(30),
            headers: Some([("Authorization".to_string(), "env:WEATHER_TOKEN".to_string())].into_iter().collect()),
            enabled: Some(false),
            refund_tool_errors: Some(true),
            tools: Some([("forecast".to_string(), 250), ("get alerts".to_string(), 0)].into_iter().collect()),
            ..Upstream::default()
        };
        insert_upstream(&mut doc, "weather", &up);
        let out = doc.to_string();
        assert!(out.starts_with(BASE.trim_end()), "existing text changed:\n{out}");
        assert!(out.ends_with(
            "[upstreams.weather]\nurl = \"https://weather.example.com/mcp\"\nprice_mcents = 100\nscope = \"weather\"\ndescription = \"Weather\"\ntimeout_seconds = 20\nrate_limit_per_minute = 30\nheaders = { Authorization = \"env:WEATHER_TOKEN\" }\nenabled = false\nrefund_tool_errors = true\n\n[upstreams.weather.tools]\nforecast = 250\n\"get alerts\" = 0\n"
        ), "{out}");
        let (_, m) = parse(&out, Path::new("mcpay.toml")).unwrap();
        assert_eq!(m.upstreams["weather"], up);
        assert_eq!(m.problems(), Vec::<String>::new());
    }

    #[test]
    fn a_second_upstream_follows_the_first_and_later_tables_stay() {
        let text = format!(
            "{BASE}\n# my upstream\n[upstreams.a]\nurl = \"https://a/mcp\" # A\nprice_mcents = 1\n[upstreams.a.tools]\nx = 0\n\n[mpp]\n# realm comment\nrealm = \"\"\n"
        );
        let mut doc: DocumentMut = text.parse().unwrap();
        let b = Upstream { command: Some(vec!["node".into(), "my server.mjs".into()]), price_mcents: 7, ..Upstream::default() };
        insert_upstream(&mut doc, "b", &b);
        let out = doc.to_string();
        assert!(out.contains("# my upstream\n[upstreams.a]\nurl = \"https://a/mcp\" # A\n") && out.contains("# realm comment\nrealm = \"\"\n"), "{out}");
        assert!(out.contains("[upstreams.b]\ncommand = [\"node\", \"my server.mjs\"]\nprice_mcents = 7\n"), "{out}");
        assert!(!out.contains("[upstreams.b.tools]"), "no tools table without tool prices:\n{out}");
        let (_, m) = parse(&out, Path::new("mcpay.toml")).unwrap();
        assert_eq!(m.upstreams.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(m.upstreams["b"], b);
        assert_eq!(m.upstreams["a"].tools.as_ref().unwrap()["x"], 0);
    }
}
