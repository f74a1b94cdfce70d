//! Editing mcpay.toml through toml_edit, so that a user's comments and ordering survive.

use anyhow::{Context as _, Result, bail};
use toml_edit::{DocumentMut, Item, Table, value};

use super::schema::Endpoint;


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

/// Removes every `[endpoints.*]` table (used when `--endpoint` replaces the default example).
pub fn clear_endpoints(doc: &mut DocumentMut) {
    if let Some(t) = doc.get_mut("endpoints").and_then(Item::as_table_mut) {
        t.clear();
    }
}