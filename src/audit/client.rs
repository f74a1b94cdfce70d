//! The audit's view of a gateway: plain HTTP calls, key minting and the helpers scenarios share.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};
use ureq::Agent;
use ureq::http::{self, Method};

/// One HTTP exchange, as the scenarios see it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or("").to_string()
    }
    /// `401 invalid_key` — short evidence for a report line (for no answer at all, why not).
    pub fn brief(&self) -> String {
        if self.status == 0 {
            return self.body.clone();
        }
        let code = self.code();
        let mut body: String = self.body.chars().take(160).collect();
        if self.body.len() > 160 {
            body.push('…');
        }
        if code.is_empty() { format!("{} {body}", self.status) } else { format!("{} {code}", self.status) }
    }
}

/// A paid endpoint as /v1/pricing describes it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub price: u64,
    pub xp: u64,
    pub scope: String,
    pub rate_limit: u64,
    pub input: Vec<(String, String, bool)>,
}

impl Endpoint {
    pub fn path(&self) -> String {
        format!("/v1/{}", self.name)
    }
    /// A body that passes the input shape.
    pub fn sample(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (name, ty, required) in &self.input {
            if *required {
                m.insert(name.clone(), crate::spec::sample_value(ty));
            }
        }
        Value::Object(m)
    }
}

/// A minted key with what the audit knows of it.
#[derive(Debug, Clone)]
pub struct Key {
    pub key: String,
    pub key_id: String,
}

impl Key {
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.key)
    }
}

pub struct Client {
    pub base: String,
    pub admin_key: Option<String>,
    pub agent: Agent,
    pub endpoints: Vec<Endpoint>,
    pub key_prefix: Option<String>,
    pub mints: u64,
    /// `/v1/pricing`'s `signup` field: `null` when the gateway sells no signup.
    pub signup: Value,
    /// One well-funded key per endpoint, shared by the scenarios that only compare a balance before
    /// and after (so an audit stays well inside a gateway's hourly mint limit).
    shared: std::collections::HashMap<String, Key>,
}

impl Client {
    pub fn connect(base: &str, admin_key: Option<String>) -> Result<Client> {
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .max_idle_connections_per_host(64)
            .build()
            .into();
        let mut c = Client {
            base: base.trim_end_matches('/').to_string(),
            admin_key,
            agent,
            endpoints: Vec::new(),
            key_prefix: None,
            mints: 0,
            signup: Value::Null,
            shared: Default::default(),
        };
        let pricing = c.get("/v1/pricing", &[]);
        if pricing.status == 0 {
            bail!("could not reach {}/v1/pricing: {}; is the gateway running there?", c.base, pricing.body);
        }
        if pricing.status != 200 {
            bail!("{}/v1/pricing answered {}; is this a gateway that speaks docs/contract.md?", c.base, pricing.brief());
        }
        let v = pricing.json();
        c.signup = v.get("signup").cloned().unwrap_or(Value::Null);
        let list = v["endpoints"].as_array().context("/v1/pricing has no endpoints array")?;
        for e in list {
            let input = e["input"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, f)| {
                            (k.clone(), f["type"].as_str().unwrap_or("string").to_string(), f["required"].as_bool().unwrap_or(true))
                        })
                        .collect()
                })
                .unwrap_or_default();
            c.endpoints.push(Endpoint {
                name: e["name"].as_str().context("endpoint without a name")?.to_string(),
                price: e["price_mcents"].as_u64().context("endpoint without an integer price_mcents")?,
                xp: e["xp"].as_u64().unwrap_or(0),
                scope: e["scope"].as_str().unwrap_or("").to_string(),
                rate_limit: e["rate_limit_per_minute"].as_u64().unwrap_or(60),
                input,
            });
        }
        if c.endpoints.is_empty() {
            bail!("{}/v1/pricing lists no paid endpoints", c.base);
        }
        Ok(c)
    }

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
        self.request_url(method, &format!("{}{}", self.base, path), headers, body)
    }

    /// A request to an absolute URL (another server than the gateway, e.g. a test harness). A
    /// request that cannot be built (a bad URL or header) is answered as status 0, never a panic.
    pub fn request_url(&self, method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
        let Ok(method) = Method::from_bytes(method.as_bytes()) else { return unsendable(url, "bad method") };
        let mut b = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let request = match body {
            Some(bytes) => b.body(bytes.to_vec()).map(|r| self.agent.run(r)),
            None => b.body(()).map(|r| self.agent.run(r)),
        };
        match request {
            Ok(result) => to_reply(result),
            Err(e) => unsendable(url, &e.to_string()),
        }
    }

    /// A request whose answer is read line by line as it arrives (an SSE stream): the reply (its
    /// body is the whole text) and, for each line, the milliseconds from sending to its arrival.
    pub fn request_timed(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> (Reply, Vec<(u128, String)>) {
        use std::io::BufRead as _;
        let url = format!("{}{}", self.base, path);
        let Ok(method) = Method::from_bytes(method.as_bytes()) else { return (unsendable(&url, "bad method"), Vec::new()) };
        let mut b = http::Request::builder().method(method).uri(&url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let started = std::time::Instant::now();
        let result = match b.body(body.unwrap_or_default().to_vec()) {
            Ok(r) => self.agent.run(r),
            Err(e) => return (unsendable(&url, &e.to_string()), Vec::new()),
        };
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => return (to_reply(Err(e)), Vec::new()),
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
        let (mut text, mut lines) = (String::new(), Vec::new());
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    text.push_str(&line);
                    lines.push((started.elapsed().as_millis(), line.trim_end_matches(['\r', '\n']).to_string()));
                }
            }
            if text.len() > 16 * 1024 * 1024 {
                break;
            }
        }
        (Reply { status, headers, body: text }, lines)
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.request("GET", path, headers, None)
    }

    /// POST with a JSON content type.
    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
        h.extend_from_slice(headers);
        self.request("POST", path, &h, Some(body.as_bytes()))
    }

    /// POST a body with no Content-Length (chunked transfer encoding).
    pub fn post_chunked(&self, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
        let mut b = http::Request::builder().method(Method::POST).uri(format!("{}{}", self.base, path));
        b = b.header("Content-Type", "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut reader = std::io::Cursor::new(body);
        let send = ureq::SendBody::from_reader(&mut reader);
        match b.body(send) {
            Ok(req) => to_reply(self.agent.run(req)),
            Err(e) => unsendable(&format!("{}{path}", self.base), &e.to_string()),
        }
    }

    /// POST /v1/admin/mint with the admin key; `mints` counts the keys actually minted (201s).
    pub fn mint_raw(&mut self, body: &str) -> Reply {
        let admin = self.admin_key.clone().unwrap_or_default();
        let r = self.post("/v1/admin/mint", &[("X-Admin-Key", &admin)], body);
        if r.status == 201 {
            self.mints += 1;
        }
        r
    }

    /// Mints a key or fails with the gateway's answer.
    pub fn mint(&mut self, balance: u64, scopes: &[&str]) -> Result<Key> {
        if self.admin_key.is_none() {
            bail!("needs --admin-key to mint keys");
        }
        let r = self.mint_raw(&json!({"balance_mcents": balance, "scopes": scopes, "name": "audit"}).to_string());
        if r.status != 201 {
            bail!("mint answered {}", r.brief());
        }
        let v = r.json();
        let key = v["key"].as_str().ok_or_else(|| anyhow!("mint answer has no key"))?.to_string();
        if self.key_prefix.is_none() {
            self.key_prefix = key.find('_').map(|i| key[..=i].to_string());
        }
        Ok(Key { key, key_id: v["key_id"].as_str().unwrap_or("").to_string() })
    }

    /// Mints a key for `ep` with room for `calls` calls.
    pub fn key_for(&mut self, ep: &Endpoint, calls: u64) -> Result<Key> {
        self.mint(ep.price * calls, &[ep.scope.as_str()])
    }

    /// The shared key of `ep` (minted on first use with room for 1000 calls) and its balance now.
    pub fn shared_key(&mut self, ep: &Endpoint) -> Result<(Key, u64)> {
        let key = match self.shared.get(&ep.name) {
            Some(k) => k.clone(),
            None => {
                let k = self.key_for(ep, 1000)?;
                self.shared.insert(ep.name.clone(), k.clone());
                k
            }
        };
        let bal = self.balance(&key)?;
        Ok((key, bal))
    }

    pub fn call(&self, ep: &Endpoint, key: &Key, body: &str) -> Reply {
        self.post(&ep.path(), &[("Authorization", &key.bearer())], body)
    }

    pub fn call_sample(&self, ep: &Endpoint, key: &Key) -> Reply {
        self.call(ep, key, &ep.sample().to_string())
    }

    /// A paid call with the key and more headers (e.g. `Idempotency-Key`).
    pub fn call_with(&self, ep: &Endpoint, key: &Key, headers: &[(&str, &str)], body: &str) -> Reply {
        let bearer = key.bearer();
        let mut h: Vec<(&str, &str)> = vec![("Authorization", bearer.as_str())];
        h.extend_from_slice(headers);
        self.post(&ep.path(), &h, body)
    }

    pub fn me(&self, key: &Key) -> Value {
        self.get("/v1/me", &[("Authorization", &key.bearer())]).json()
    }

    pub fn balance(&self, key: &Key) -> Result<u64> {
        let me = self.me(key);
        me["balance_mcents"].as_u64().ok_or_else(|| anyhow!("/v1/me gave no balance_mcents: {me}"))
    }

    /// One page of the key's ledger (contract 3.5): the newest 500 rows, or those before `before`.
    pub fn ledger(&self, key: &Key, before: Option<u64>) -> Value {
        let path = match before {
            Some(seq) => format!("/v1/me/ledger?limit=500&before={seq}"),
            None => "/v1/me/ledger?limit=500".to_string(),
        };
        self.get(&path, &[("Authorization", &key.bearer())]).json()
    }

    /// `GET /v1/me/ledger` with the query as given (`limit=2&before=7`), answered as is.
    pub fn ledger_query(&self, key: &Key, query: &str) -> Reply {
        self.get(&format!("/v1/me/ledger?{query}"), &[("Authorization", &key.bearer())])
    }

    pub fn first(&self) -> Endpoint {
        self.endpoints[0].clone()
    }

    /// An endpoint whose scope differs from `ep`'s, if the gateway has one.
    pub fn other_scope(&self, ep: &Endpoint) -> Option<Endpoint> {
        self.endpoints.iter().find(|e| e.scope != ep.scope).cloned()
    }

    pub fn prefix(&self) -> String {
        self.key_prefix.clone().unwrap_or_else(|| "mcp_".into())
    }
}

fn to_reply(result: Result<http::Response<ureq::Body>, ureq::Error>) -> Reply {
    match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.into_body().with_config().limit(16 * 1024 * 1024).read_to_string().unwrap_or_default();
            Reply { status, headers, body }
        }
        // The connection was refused or cut: report it as status 0 so scenarios can tell.
        Err(e) => Reply { status: 0, headers: http::HeaderMap::new(), body: format!("no HTTP answer ({e})") },
    }
}

/// A request that could not even be built: status 0, like a transport failure.
fn unsendable(url: &str, why: &str) -> Reply {
    Reply { status: 0, headers: http::HeaderMap::new(), body: format!("no HTTP answer (the request to {url} could not be built: {why})") }
}

/// 64 random lowercase hex characters (for well-formed keys nobody minted).
pub fn random_hex64() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    while out.len() < 64 {
        let mut h = RandomState::new().build_hasher();
        h.write_usize(out.len());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(64);
    out
}

/// A fresh `Idempotency-Key` (contract 3.8: 32-128 of `A-Za-z0-9_-`): 40 random hex characters.
pub fn random_idempotency_key() -> String {
    random_hex64()[..40].to_string()
}

/// A gateway's base URL from the command line, checked before any request: `http://` or
/// `https://`, a host, a port that fits, no query or fragment. A bare `host:port` (no scheme, as
/// wrangler prints it) is read as `http://host:port`. `what` names the flag in errors.
pub fn base_url(raw: &str, what: &str) -> Result<String> {
    let trimmed = raw.trim();
    let example = "e.g. http://127.0.0.1:8787 or https://my-api.example.workers.dev";
    if trimmed.is_empty() {
        bail!("{what} is empty: give the gateway's URL, {example}");
    }
    let full = if trimmed.contains("://") { trimmed.to_string() } else { format!("http://{trimmed}") };
    let uri: http::Uri = full.parse().map_err(|e| anyhow!("{what} {raw:?} is not a URL ({e}); {example}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => bail!("{what} {raw:?}: the scheme {other}:// is not HTTP; use http:// or https://, {example}"),
        None => bail!("{what} {raw:?} has no scheme; {example}"),
    }
    let Some(authority) = uri.authority() else { bail!("{what} {raw:?} has no host; {example}") };
    if authority.host().is_empty() || authority.host() == "[]" {
        bail!("{what} {raw:?} has no host; {example}");
    }
    if authority.as_str().contains('@') {
        bail!("{what} {raw:?}: credentials in the URL are not supported (the admin key goes in --admin-key)");
    }
    let hostport = authority.as_str();
    if let Some(i) = hostport.rfind(':').filter(|&i| !hostport[i..].contains(']')) {
        let port = &hostport[i + 1..];
        if port.is_empty() {
            bail!("{what} {raw:?}: a ':' without a port number; {example}");
        }
        if !port.parse::<u16>().is_ok_and(|p| p >= 1) {
            bail!("{what} {raw:?}: the port {port} is not a TCP port (1-65535); {example}");
        }
    }
    if uri.query().is_some() || full.contains('#') {
        bail!("{what} {raw:?}: a base URL has no query string or fragment; {example}");
    }
    Ok(full.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The duplicate-header scenarios (two `Authorization`, two `Idempotency-Key`) mean something
    /// only if both headers reach the gateway: the raw request must carry each one.
    #[test]
    fn repeated_headers_are_all_sent() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}/v1/x", listener.local_addr().unwrap().port());
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                head.push(line.trim().to_ascii_lowercase());
            }
            let mut out = stream;
            let _ = out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
            head
        });
        let agent: Agent = Agent::config_builder().http_status_as_error(false).build().into();
        let c = Client { base: String::new(), admin_key: None, agent, endpoints: Vec::new(), key_prefix: None, mints: 0, signup: Value::Null, shared: Default::default() };
        let r = c.request_url("GET", &url, &[("Authorization", "Bearer a"), ("Authorization", "Bearer b"), ("Idempotency-Key", "x"), ("Idempotency-Key", "y")], None);
        assert_eq!(r.status, 200, "{}", r.body);
        let head = server.join().unwrap();
        assert!(head.contains(&"authorization: bearer a".into()) && head.contains(&"authorization: bearer b".into()), "{head:?}");
        assert!(head.contains(&"idempotency-key: x".into()) && head.contains(&"idempotency-key: y".into()), "{head:?}");
    }

    #[test]
    fn base_urls_are_checked_and_a_bare_host_port_is_http() {
        assert_eq!(base_url("127.0.0.1:8787", "URL").unwrap(), "http://127.0.0.1:8787");
        assert_eq!(base_url("localhost:8787/", "URL").unwrap(), "http://localhost:8787");
        assert_eq!(base_url("https://api.example.workers.dev/", "URL").unwrap(), "https://api.example.workers.dev");
        assert_eq!(base_url("http://[::1]:8787", "URL").unwrap(), "http://[::1]:8787");
        assert_eq!(base_url("http://h/prefix", "URL").unwrap(), "http://h/prefix");
        for bad in ["", "http://", "http://[::1", "http://a b", ":8787", "localhost:abc", "http://h:99999", "http://h:0", "http://h:", "ftp://h", "http://u:p@h", "http://h/?q=1", "http://h/#f"] {
            let e = base_url(bad, "the gateway URL").expect_err(bad).to_string();
            assert!(e.contains("the gateway URL"), "{bad}: {e}");
        }
    }
}
