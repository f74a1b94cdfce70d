//! `create-mcpay add-upstream NAME (--url URL | --command "CMD ARGS…")`: put a price on an MCP
//! server that already exists (contract 3.12). Edits mcpay.toml (comments kept), regenerates, as
//! add-endpoint does; with `--discover` the upstream's tools are listed first with the official MCP
//! client (rmcp) and written one `[upstreams.NAME.tools]` entry each. Any error changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use indexmap::IndexMap;
use toml_edit::DocumentMut;

use crate::cli::AddUpstreamArgs;
use crate::manifest::{self, Manifest, Upstream};
use crate::names;
use crate::project::Project;
use crate::ui::Ui;

pub fn run(args: &AddUpstreamArgs, ui: &Ui) -> Result<()> {
    let mut project = Project::open(&args.project.project)?;
    let name = args.name.as_str();
    names::check_endpoint_name(name).map_err(|e| anyhow!(e.replace("endpoint name", "upstream name")))?;
    if let Some(existing) = project.manifest.upstreams.get(name) {
        let at = match (&existing.url, &existing.command) {
            (Some(url), _) => format!(" ({url})"),
            (None, Some(argv)) => format!(" ({})", shell_words(argv)),
            _ => String::new(),
        };
        bail!(
            "upstream {name:?} already exists in {}{at}; change it there and run `create-mcpay sync`, or pick another name",
            project.manifest_path.display()
        );
    }
    let target = project.manifest.project.target;
    let builtin = target.builtin_endpoints().iter().any(|b| b.name == name);
    if project.manifest.endpoints.contains_key(name) || builtin {
        bail!(
            "{} {name:?} already exists (POST /v1/{name}); endpoints and upstreams share one set of names, so pick another name for the upstream (e.g. \"{name}_mcp\")",
            if builtin { "the built-in endpoint" } else { "endpoint" }
        );
    }
    if !(1..=manifest::MAX_PRICE_MCENTS).contains(&args.price) {
        bail!(
            "--price {}: the default price of a tool call is 1 to {} mcents (1 mcent = 1/1000 cent; 100000 mcents = $1); make a tool free with --tool-price TOOL=0",
            args.price,
            manifest::MAX_PRICE_MCENTS
        );
    }
    let command = match &args.command {
        Some(raw) => Some(split_command(raw)?),
        None => None,
    };
    let tool_prices = parse_tool_prices(&args.tool_prices)?;
    let headers = parse_headers(&args.headers)?;
    let mut upstream = Upstream {
        url: args.url.clone(),
        command,
        transport: args.sse.then(|| "sse".to_string()),
        price_mcents: args.price,
        scope: args.scope.clone(),
        description: args.description.clone(),
        timeout_seconds: args.timeout_seconds,
        headers: (!headers.is_empty()).then_some(headers),
        tools: (!tool_prices.is_empty()).then(|| tool_prices.clone()),
        ..Upstream::default()
    };
    // The whole manifest must be valid with the new upstream before anything is contacted or written.
    let (doc, edited) = edited_manifest(&project, name, &upstream)?;

    if args.discover {
        let served = upstream.resolved(name, &edited.gateway);
        let (tools, legacy) = discover(name, &served)?;
        if legacy {
            ui.plain(&format!("{} speaks the legacy HTTP+SSE transport (MCP 2024-11-05): written as transport = \"sse\"", args.url.as_deref().unwrap_or("")));
            upstream.transport = Some("sse".to_string());
        }
        let mut prices = IndexMap::new();
        for tool in &tools {
            prices.insert(tool.name.clone(), tool_prices.get(&tool.name).copied().unwrap_or(args.price));
        }
        for (tool, price) in &tool_prices {
            if !prices.contains_key(tool) {
                ui.warn(&format!("--tool-price {tool}={price}: the upstream does not list a tool {tool:?}; its price is written all the same"));
                prices.insert(tool.clone(), *price);
            }
        }
        print_tools(ui, name, &tools, &prices);
        upstream.tools = (!prices.is_empty()).then_some(prices);
    }
    let (doc, edited) = if args.discover { edited_manifest(&project, name, &upstream)? } else { (doc, edited) };
    project.doc = doc;
    project.manifest = edited;

    let plan = project.plan()?;
    let changes = plan.apply_update(&project.root, args.dry_run)?;
    super::sync::report(ui, &project, &changes, args.dry_run);
    if !args.dry_run {
        let served = upstream.resolved(name, &project.manifest.gateway);
        let free = served.tools.values().filter(|p| **p == 0).count();
        ui.ok(&format!(
            "/mcp/{name} now meters {}: a tools/call costs {} mcents{} (scope {:?})",
            match &served.transport {
                manifest::UpstreamTransport::Url(url) => url.clone(),
                manifest::UpstreamTransport::Sse(url) => format!("{url} (legacy HTTP+SSE)"),
                manifest::UpstreamTransport::Command(argv) => format!("`{}`", shell_words(argv)),
            },
            served.price_mcents,
            match (served.tools.len(), free) {
                (0, _) => String::new(),
                (n, 0) => format!(", {n} tool(s) priced in [upstreams.{name}.tools]"),
                (n, f) => format!(", {n} tool(s) priced in [upstreams.{name}.tools], {f} free"),
            },
            served.scope
        ));
        for (header, var) in &served.headers {
            ui.plain(&format!("  set the secret/env var {var} on the gateway: it is sent upstream as {header}"));
        }
    }
    Ok(())
}

/// The project's manifest with `[upstreams.NAME]` inserted, re-read and validated as a whole.
fn edited_manifest(project: &Project, name: &str, upstream: &Upstream) -> Result<(DocumentMut, Manifest)> {
    let mut doc = project.doc.clone();
    manifest::insert_upstream(&mut doc, name, upstream);
    let (doc, edited) = manifest::parse(&doc.to_string(), &project.manifest_path)?;
    let problems = edited.problems();
    if !problems.is_empty() {
        bail!(
            "with [upstreams.{name}] added, {} would not be valid (nothing was written):\n  - {}",
            project.manifest_path.display(),
            problems.join("\n  - ")
        );
    }
    Ok((doc, edited))
}

/// `--command "npx -y @acme/weather-mcp"` → its argv, split as a POSIX shell would (quotes kept
/// together, no expansion).
pub fn split_command(raw: &str) -> Result<Vec<String>> {
    let Some(argv) = shlex::split(raw) else {
        bail!("--command {raw:?}: unbalanced quotes or a trailing backslash; quote it as you would in a shell");
    };
    if argv.is_empty() || argv[0].is_empty() {
        bail!("--command {raw:?}: give the program and its arguments, e.g. --command \"npx -y @acme/weather-mcp\"");
    }
    Ok(argv)
}

/// An argv as one would type it in a shell.
fn shell_words(argv: &[String]) -> String {
    shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_else(|_| argv.join(" "))
}

/// `--tool-price TOOL=MCENTS`, repeatable; the prices are checked here, tool names by validation.
pub fn parse_tool_prices(raw: &[String]) -> Result<IndexMap<String, u64>> {
    let mut out = IndexMap::new();
    for r in raw {
        let Some((tool, price)) = r.rsplit_once('=') else {
            bail!("--tool-price {r:?}: expected TOOL=MCENTS, e.g. --tool-price forecast=250 (0 = free)");
        };
        if tool.is_empty() {
            bail!("--tool-price {r:?}: the tool name is missing; expected TOOL=MCENTS, e.g. --tool-price forecast=250");
        }
        let price: u64 = price.trim().parse().map_err(|_| {
            anyhow!("--tool-price {r:?}: {price:?} is not a price; use a whole number of mcents from 0 (free) to {}", manifest::MAX_PRICE_MCENTS)
        })?;
        if price > manifest::MAX_PRICE_MCENTS {
            bail!("--tool-price {r:?}: a tool's price is 0 (free) to {} mcents", manifest::MAX_PRICE_MCENTS);
        }
        if out.insert(tool.to_string(), price).is_some() {
            bail!("--tool-price {r:?}: tool {tool:?} is given twice");
        }
    }
    Ok(out)
}

/// `--header NAME=env:VAR`, repeatable; the value's form is checked by validation (it must name a
/// secret/env var, never hold the header's value).
pub fn parse_headers(raw: &[String]) -> Result<IndexMap<String, String>> {
    let mut out: IndexMap<String, String> = IndexMap::new();
    for r in raw {
        let Some((header, value)) = r.split_once('=') else {
            bail!("--header {r:?}: expected NAME=env:VAR, e.g. --header Authorization=env:WEATHER_TOKEN");
        };
        if !value.starts_with(manifest::HEADER_ENV_PREFIX) {
            bail!(
                "--header {header}=…: a header's value is never written to mcpay.toml; put it in a secret/env var and pass --header {header}=env:VAR"
            );
        }
        if out.keys().any(|h| h.eq_ignore_ascii_case(header)) {
            bail!("--header {r:?}: header {header:?} is given twice");
        }
        out.insert(header.to_string(), value.to_string());
    }
    Ok(out)
}

/// One tool an upstream lists.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredTool {
    pub name: String,
    /// The first line of its description.
    pub summary: String,
}

/// Connects to the upstream with the official MCP client, `initialize`s, lists every tool
/// (following `tools/list` cursors) and closes; the upstream's timeout bounds all of it. A URL
/// that refuses Streamable HTTP is tried as a legacy HTTP+SSE server (MCP's backwards
/// compatibility rule); the flag says whether that is what answered.
pub fn discover(name: &str, up: &manifest::ResolvedUpstream) -> Result<(Vec<DiscoveredTool>, bool)> {
    let what = match &up.transport {
        manifest::UpstreamTransport::Url(url) | manifest::UpstreamTransport::Sse(url) => format!("could not reach {url}"),
        manifest::UpstreamTransport::Command(argv) => format!("could not list the tools of `{}`", shell_words(argv)),
    };
    let hint = match &up.transport {
        manifest::UpstreamTransport::Url(_) | manifest::UpstreamTransport::Sse(_) => "check the URL or run without --discover",
        manifest::UpstreamTransport::Command(_) => "check the command or run without --discover",
    };
    let mut headers = Vec::new();
    if !matches!(&up.transport, manifest::UpstreamTransport::Command(_)) {
        for (header, var) in &up.headers {
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => headers.push((header.clone(), v)),
                _ => bail!(
                    "--discover sends the header {header} from the env var {var}, which is not set; export {var}=… and run it again, or run without --discover"
                ),
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime for --discover")?;
    let timeout = Duration::from_millis(up.timeout_ms);
    let listed = runtime
        .block_on(async {
            tokio::time::timeout(timeout, async {
                match (&up.transport, list_tools(&up.transport, &headers, timeout).await) {
                    (manifest::UpstreamTransport::Url(url), Err(e)) => {
                        // Refused as Streamable HTTP: perhaps a legacy HTTP+SSE server.
                        let legacy = manifest::UpstreamTransport::Sse(url.clone());
                        list_tools(&legacy, &headers, timeout).await.map(|t| (t, true)).map_err(|_| e)
                    }
                    (_, listed) => listed.map(|t| (t, matches!(up.transport, manifest::UpstreamTransport::Sse(_)))),
                }
            })
            .await
        })
        .map_err(|_| {
            anyhow!(
                "{what}: no answer within {} s (upstreams.{name}.timeout_seconds, --timeout-seconds); {hint}",
                up.timeout_ms / 1000
            )
        })?
        .map_err(|e| anyhow!("{what}: {e:#}; {hint}"))?;
    let (tools, legacy) = listed;
    // Dropping the runtime ends what the client left running (and kills a stdio server).
    drop(runtime);
    let mut out: Vec<DiscoveredTool> = Vec::new();
    for t in tools {
        if out.iter().any(|o| o.name == t.name) {
            continue;
        }
        out.push(t);
    }
    Ok((out, legacy))
}

async fn list_tools(
    transport: &manifest::UpstreamTransport,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<Vec<DiscoveredTool>> {
    use rmcp::ServiceExt as _;
    let header_map = || -> Result<reqwest::header::HeaderMap> {
        let mut map = reqwest::header::HeaderMap::new();
        for (h, v) in headers {
            let name = reqwest::header::HeaderName::from_bytes(h.as_bytes()).with_context(|| format!("{h:?} is not an HTTP header name"))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .with_context(|| format!("the value of header {h} is not a valid HTTP header value"))?;
            map.insert(name, value);
        }
        Ok(map)
    };
    let tools = match transport {
        manifest::UpstreamTransport::Url(url) => {
            use rmcp::transport::StreamableHttpClientTransport;
            use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
            let custom: HashMap<_, _> = header_map()?.into_iter().filter_map(|(n, v)| Some((n?, v))).collect();
            let config = StreamableHttpClientTransportConfig::with_uri(url.as_str()).custom_headers(custom);
            list_over(StreamableHttpClientTransport::with_client(http_client(timeout)?, config)).await?
        }
        manifest::UpstreamTransport::Sse(url) => {
            list_over(super::legacy_sse::LegacySse::connect(http_client(timeout)?, url, header_map()?).await?).await?
        }
        manifest::UpstreamTransport::Command(argv) => {
            use rmcp::transport::TokioChildProcess;
            let mut cmd = tokio::process::Command::new(&argv[0]);
            cmd.args(&argv[1..]).kill_on_drop(true);
            let (process, stderr) = TokioChildProcess::builder(cmd)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| anyhow!("cannot start {:?}: {e}", argv[0]))?;
            // The server's stderr, kept (the last 4 KiB) to explain a failure.
            let log = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
            if let Some(mut stderr) = stderr {
                let log = log.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt as _;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stderr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let mut l = log.lock().unwrap();
                        l.extend_from_slice(&buf[..n]);
                        let excess = l.len().saturating_sub(4096);
                        l.drain(..excess);
                    }
                });
            }
            let with_log = |e: String| {
                let l = log.lock().unwrap();
                let tail = String::from_utf8_lossy(&l).trim().to_string();
                if tail.is_empty() { anyhow!(e) } else { anyhow!("{e} (its stderr: {tail})") }
            };
            let mut client = match ().serve(process).await {
                Ok(c) => c,
                Err(e) => {
                    // Give the process a moment to print why it stopped.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Err(with_log(init_error(&e)));
                }
            };
            let listed = client.list_all_tools().await.map_err(|e| with_log(format!("tools/list failed: {}", chain(&e))));
            let _ = client.close().await;
            listed?
        }
    };
    Ok(tools
        .into_iter()
        .map(|t| DiscoveredTool {
            name: t.name.to_string(),
            summary: t.description.as_deref().unwrap_or("").lines().next().unwrap_or("").trim().to_string(),
        })
        .collect())
}

/// `initialize`, every `tools/list` page, close — over an HTTP transport.
async fn list_over<T, E, A>(transport: T) -> Result<Vec<rmcp::model::Tool>>
where
    T: rmcp::transport::IntoTransport<rmcp::RoleClient, E, A>,
    E: std::error::Error + Send + Sync + 'static,
{
    use rmcp::ServiceExt as _;
    let mut client = ().serve(transport).await.map_err(|e| anyhow!(init_error(&e)))?;
    let listed = client.list_all_tools().await.map_err(|e| anyhow!("tools/list failed: {}", chain(&e)));
    let _ = client.close().await;
    listed
}

/// Why `initialize` failed, without the transport's type names: for HTTP, reqwest's chain of
/// causes (e.g. "… tcp connect error: Connection refused").
fn init_error(e: &rmcp::service::ClientInitializeError) -> String {
    use rmcp::transport::streamable_http_client::StreamableHttpError;
    match e {
        rmcp::service::ClientInitializeError::TransportError { error, .. } => {
            let inner: &(dyn std::error::Error + 'static) = error.error.as_ref();
            match inner.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
                Some(StreamableHttpError::Client(re)) => chain(re),
                _ => chain(inner),
            }
        }
        other => chain(other),
    }
}

/// An error and its causes, "a: b: c" (a cause already in the text before it is left out).
pub(super) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// An HTTPS client on rustls + ring with Mozilla's root certificates (no system store needed).
fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(timeout)
        .build()
        .context("cannot build the HTTP client")
}

/// The discovered tools with the prices that will be written, to review.
fn print_tools(ui: &Ui, name: &str, tools: &[DiscoveredTool], prices: &IndexMap<String, u64>) {
    ui.heading(&format!("{} tool(s) listed by upstream {name} — prices in [upstreams.{name}.tools] (mcents; 0 = free):", tools.len()));
    let width = prices.keys().map(|t| t.chars().count()).max().unwrap_or(4).clamp(4, 40);
    ui.plain(&format!("  {:<width$}  {:>9}  DESCRIPTION", "TOOL", "PRICE"));
    for (tool, price) in prices {
        let summary = tools.iter().find(|t| &t.name == tool).map(|t| t.summary.as_str()).unwrap_or("(not listed by the upstream)");
        let summary: String = if summary.chars().count() > 70 { format!("{}…", summary.chars().take(69).collect::<String>()) } else { summary.to_string() };
        ui.plain(&format!("  {tool:<width$}  {price:>9}  {summary}"));
    }
    if tools.is_empty() {
        ui.plain("  (the upstream lists no tools; every tools/call will cost the default price)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_split_like_a_shell() {
        assert_eq!(split_command("npx -y @acme/weather-mcp").unwrap(), ["npx", "-y", "@acme/weather-mcp"]);
        assert_eq!(split_command(r#"node "my server.mjs" --flag='a b'"#).unwrap(), ["node", "my server.mjs", "--flag=a b"]);
        assert!(split_command("node 'unterminated").unwrap_err().to_string().contains("unbalanced quotes"));
        assert!(split_command("   ").unwrap_err().to_string().contains("give the program"));
    }

    #[test]
    fn tool_prices_are_parsed_with_fixes() {
        let ok = parse_tool_prices(&["forecast=250".into(), "alerts=0".into()]).unwrap();
        assert_eq!(ok.into_iter().collect::<Vec<_>>(), [("forecast".to_string(), 250), ("alerts".to_string(), 0)]);
        for (raw, needle) in [
            ("forecast", "expected TOOL=MCENTS"),
            ("=5", "the tool name is missing"),
            ("forecast=cheap", "\"cheap\" is not a price"),
            ("forecast=-1", "is not a price"),
            ("forecast=100000001", "0 (free) to 100000000"),
        ] {
            let e = parse_tool_prices(&[raw.into()]).unwrap_err().to_string();
            assert!(e.contains(needle), "{raw}: {e}");
        }
        let e = parse_tool_prices(&["a=1".into(), "a=2".into()]).unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn headers_must_name_an_env_var() {
        let ok = parse_headers(&["Authorization=env:WEATHER_TOKEN".into()]).unwrap();
        assert_eq!(ok["Authorization"], "env:WEATHER_TOKEN");
        let e = parse_headers(&["Authorization=Bearer abc".into()]).unwrap_err().to_string();
        assert!(e.contains("never written to mcpay.toml") && !e.contains("abc"), "{e}");
        assert!(parse_headers(&["Authorization".into()]).unwrap_err().to_string().contains("NAME=env:VAR"));
        let e = parse_headers(&["X-A=env:A".into(), "x-a=env:B".into()]).unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
    }
}
