//! Name rules shared by every target. A name accepted here is valid as a Cloudflare Worker name,
//! a Cargo package name, an npm package name, a URL path segment and (for endpoints) an identifier
//! in TypeScript and Rust.

/// Routes and words the gateway itself uses, so an endpoint cannot shadow them.
pub const RESERVED_ENDPOINTS: &[&str] = &[
    "admin", "health", "pricing", "me", "leaderboard", "signup", "mcp", "execute", "openapi", "balance", "limits",
    "well_known", "docs", "status", "metrics", "ledger", "keys", "internal", "execute_code", "pay",
];

/// Rust keywords (strict, reserved and the weak ones that matter). A field named after one is
/// written `r#name` in generated Rust, except [`RUST_UNRAW`].
pub const RUST_KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
    "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub",
    "ref", "return", "self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use",
    "where", "while", "abstract", "become", "box", "do", "final", "gen", "macro", "override",
    "priv", "try", "typeof", "unsized", "virtual", "yield", "union",
];

/// Names that cannot be raw identifiers in Rust: a field named so becomes `name_` (serde renames it).
pub const RUST_UNRAW: &[&str] = &["self", "super", "crate", "Self", "_"];

/// JavaScript / TypeScript reserved words.
pub const TS_KEYWORDS: &[&str] = &[
    "case", "catch", "class", "debugger", "default", "delete", "export", "extends", "finally",
    "function", "import", "instanceof", "new", "null", "switch", "this", "throw", "var", "void",
    "with", "interface", "let", "package", "private", "protected", "public", "implements",
    "arguments", "eval", "undefined", "constructor", "prototype", "__proto__",
];

fn is_keyword(name: &str) -> bool {
    RUST_KEYWORDS.contains(&name) || TS_KEYWORDS.contains(&name)
}

/// The Rust identifier of an input field: itself, `r#name` for a keyword, `name_` for the few
/// names that cannot be raw.
pub fn rust_field_ident(field: &str) -> String {
    if RUST_UNRAW.contains(&field) {
        format!("{field}_")
    } else if RUST_KEYWORDS.contains(&field) {
        format!("r#{field}")
    } else {
        field.to_string()
    }
}

/// UpperCamelCase of an endpoint name, for type names (`my_tool` → `MyTool`).
pub fn pascal(name: &str) -> String {
    heck::AsUpperCamelCase(name).to_string()
}

/// Every form of an endpoint name the generated code uses, in any target (the name itself for
/// routes, modules and files; snake_case, lowerCamelCase and UpperCamelCase identifiers).
pub fn identifier_forms(name: &str) -> [String; 4] {
    [
        pascal(name),
        heck::AsLowerCamelCase(name).to_string(),
        heck::AsSnakeCase(name).to_string(),
        name.to_string(),
    ]
}

/// The identifier two endpoint names would share in generated code, if any.
pub fn colliding_identifier(a: &str, b: &str) -> Option<String> {
    let (fa, fb) = (identifier_forms(a), identifier_forms(b));
    fa.into_iter().zip(fb).find(|(x, y)| x == y).map(|(x, _)| x)
}

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
    } else if RESERVED_PROJECTS.contains(&name) || is_keyword(name) {
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
    if RESERVED_PROJECTS.contains(&out.as_str()) || is_keyword(&out) {
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
    if is_keyword(name) {
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
    fn identifiers() {
        assert_eq!(rust_field_ident("type"), "r#type");
        assert_eq!(rust_field_ident("self"), "self_");
        assert_eq!(rust_field_ident("query"), "query");
        assert_eq!(colliding_identifier("my_tool", "my__tool").as_deref(), Some("MyTool"));
        assert_eq!(colliding_identifier("a1", "a_1").as_deref(), Some("A1"));
        assert_eq!(colliding_identifier("search", "summarize"), None);
        assert_eq!(colliding_identifier("search_v2", "search_v3"), None);
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
