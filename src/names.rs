//! Name rules shared by every target. A name accepted here is valid as a Cloudflare Worker name,
//! a Cargo package name, an npm package name, a URL path segment and (for endpoints) an identifier
//! in TypeScript and Rust.

/// Routes and words the gateway itself uses, so an endpoint cannot shadow them.
pub const RESERVED_ENDPOINTS: &[&str] = &[
    "admin", "health", "pricing", "me", "leaderboard", "signup", "mcp", "execute", "openapi",
    "well_known", "docs", "status", "metrics", "ledger", "keys", "internal", "execute_code", "pay",
];

/// Rust and TypeScript/JavaScript reserved words: endpoint names become module and identifier names.
const KEYWORDS: &[&str] = &[
    // Rust (strict, reserved and weak where they matter)
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
    "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub",
    "ref", "return", "self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use",
    "where", "while", "abstract", "become", "box", "do", "final", "gen", "macro", "override",
    "priv", "try", "typeof", "unsized", "virtual", "yield", "union",
    // JavaScript / TypeScript
    "case", "catch", "class", "debugger", "default", "delete", "export", "extends", "finally",
    "function", "import", "instanceof", "new", "null", "switch", "this", "throw", "var", "void",
    "with", "interface", "let", "package", "private", "protected", "public", "implements",
    "arguments", "eval", "undefined", "constructor", "prototype", "__proto__",
];

/// Names Cargo refuses for packages, and names that make a confusing npm/worker project.
const RESERVED_PROJECTS: &[&str] = &[
    "std", "core", "alloc", "proc_macro", "proc-macro", "test", "build", "deps", "examples",
    "node_modules", "favicon.ico", "con", "prn", "aux", "nul", "src", "target",
];

/// Checks a project name. On error, the message says what is wrong and suggests a name that works.
pub fn check_project_name(name: &str) -> Result<(), String> {
    let problem = if name.is_empty() {
        Some("it is empty".to_string())
    } else if name.len() > 63 {
        Some("it is longer than 63 characters (Cloudflare's limit for a Worker name)".to_string())
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("it must start with a lowercase letter".to_string())
    } else if let Some(c) = name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        Some(format!("it contains {c:?}; use only lowercase letters, digits and '-'"))
    } else if name.ends_with('-') {
        Some("it must not end with '-'".to_string())
    } else if RESERVED_PROJECTS.contains(&name) || KEYWORDS.contains(&name) {
        Some("it is a reserved name for Cargo, npm or Rust".to_string())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(why) => {
            let suggestion = suggest_project_name(name);
            Err(format!(
                "invalid project name {name:?}: {why}. Names must be valid for both wrangler and Cargo{}",
                if suggestion.is_empty() || suggestion == name {
                    String::new()
                } else {
                    format!(" — try {suggestion:?}")
                }
            ))
        }
    }
}

/// A best-effort valid project name derived from anything.
pub fn suggest_project_name(raw: &str) -> String {
    let mut out = slug(raw, '-');
    out.truncate(63);
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        return "my-api".into();
    }
    if RESERVED_PROJECTS.contains(&out.as_str()) || KEYWORDS.contains(&out.as_str()) {
        return format!("{out}-api");
    }
    out
}

/// Checks an endpoint name (served at POST /v1/NAME, used as an identifier in generated code).
pub fn check_endpoint_name(name: &str) -> Result<(), String> {
    let ok_syntax = name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok_syntax {
        return Err(format!(
            "invalid endpoint name {name:?}: use 1 to 32 lowercase letters, digits and '_', starting with a letter (e.g. {:?})",
            suggest_identifier(name)
        ));
    }
    if RESERVED_ENDPOINTS.contains(&name) {
        return Err(format!(
            "endpoint name {name:?} is reserved: the gateway serves /v1/{name} itself; pick another name (e.g. \"{name}_tool\")"
        ));
    }
    if KEYWORDS.contains(&name) {
        return Err(format!(
            "endpoint name {name:?} is a Rust or TypeScript keyword and cannot name a handler; pick another name (e.g. \"{name}_tool\")"
        ));
    }
    Ok(())
}

/// Checks a scope name.
pub fn check_scope(scope: &str) -> Result<(), String> {
    let ok = !scope.is_empty()
        && scope.len() <= 64
        && scope.starts_with(|c: char| c.is_ascii_lowercase())
        && scope
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | ':' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid scope {scope:?}: use 1 to 64 lowercase letters, digits, '_', ':', '.' or '-', starting with a letter"
        ))
    }
}

/// Checks an input field name of an endpoint.
pub fn check_field_name(field: &str) -> Result<(), String> {
    let ok = !field.is_empty()
        && field.len() <= 64
        && field.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && field.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && field != "__proto__"
        && field != "constructor"
        && field != "prototype";
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid input field {field:?}: use lowercase letters, digits and '_', starting with a letter or '_'"
        ))
    }
}

fn suggest_identifier(raw: &str) -> String {
    let out = slug(raw, '_');
    let mut out = if out.is_empty() { "my_tool".to_string() } else { out };
    out.truncate(32);
    out
}

/// Lowercase ASCII letters and digits, every other run of characters one `sep`, no leading digit
/// or separator, no trailing separator.
fn slug(raw: &str, sep: char) -> String {
    let mut out = String::new();
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with(sep) {
            out.push(sep);
        }
    }
    out.trim_start_matches(|c: char| c.is_ascii_digit() || c == sep).trim_end_matches(sep).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names() {
        for ok in ["demo", "my-api", "a1", "search-api-2"] {
            assert!(check_project_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "My API", "1api", "api-", "my_api", "test", "std", "x".repeat(64).as_str(), "café"] {
            assert!(check_project_name(bad).is_err(), "{bad}");
        }
        let err = check_project_name("My API").unwrap_err();
        assert!(err.contains("try \"my-api\""), "{err}");
    }

    #[test]
    fn suggestions_are_valid() {
        for raw in ["My API", "123", "__", "Test", "über-tool!", "std"] {
            let s = suggest_project_name(raw);
            assert!(check_project_name(&s).is_ok(), "{raw} -> {s}");
        }
    }

    #[test]
    fn endpoint_names() {
        for ok in ["example", "mytool", "search_v2"] {
            assert!(check_endpoint_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "My-Tool", "9x", "admin", "health", "type", "delete", "execute_code", "pay", "a".repeat(33).as_str()] {
            assert!(check_endpoint_name(bad).is_err(), "{bad}");
        }
        assert!(check_endpoint_name("My-Tool").unwrap_err().contains("\"my_tool\""));
    }

    #[test]
    fn scopes_and_fields() {
        assert!(check_scope("read:search").is_ok());
        assert!(check_scope("Read").is_err());
        assert!(check_field_name("query").is_ok());
        assert!(check_field_name("__proto__").is_err());
        assert!(check_field_name("Query").is_err());
    }
}
