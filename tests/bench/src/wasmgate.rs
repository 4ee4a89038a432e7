//! wasmgate's generated config: the plugins a wasmgate column loads, where their components
//! are, and how they are wired in (handshake and message hooks on the route, a balancer on
//! the upstream).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::jwt;

/// The shipped plugins the columns run, configured as a deployment would.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Plugin {
    /// HS256 token check with an audience, `sub` passed upstream as a header; its accepts
    /// kept by the gateway (contract 0.6.1 `verdicts`), so a repeated token is not checked.
    JwtAuth,
    /// The same with the gateway's verdict cache off: a call per handshake.
    JwtAuthCalled,
    /// The same with RS256 tokens (the expensive check), verified tokens cached (the default).
    JwtAuthRs256,
    /// RS256 with the verified-token cache off: every handshake verifies a signature.
    JwtAuthRs256Uncached,
    /// The upstream's balancer: fewest open connections.
    LeastConn,
    /// Adds one header to the upstream request: a handshake hook doing almost nothing.
    HeaderStamp,
    /// A message hook that forwards every message: one Wasm call per message each way.
    NoopMessages,
}

impl Plugin {
    /// Its `[[plugin]]` name, also the name of its crate under plugins/.
    pub fn name(self) -> &'static str {
        match self {
            Plugin::JwtAuth | Plugin::JwtAuthCalled | Plugin::JwtAuthRs256 | Plugin::JwtAuthRs256Uncached => "jwt-auth",
            Plugin::LeastConn => "least-conn",
            Plugin::NoopMessages => "noop-messages",
            Plugin::HeaderStamp => "header-stamp",
        }
    }

    /// How the tokens this plugin checks are signed (HS256 for plugins that check none).
    pub fn token_alg(self) -> jwt::Alg {
        match self {
            Plugin::JwtAuthRs256 | Plugin::JwtAuthRs256Uncached => jwt::Alg::Rs256,
            _ => jwt::Alg::Hs256,
        }
    }

    fn is_balancer(self) -> bool {
        self == Plugin::LeastConn
    }

    /// The `config` table handed to the plugin's `init`, TOML inline.
    fn config(self, extra: &Extra) -> String {
        match self {
            Plugin::JwtAuth | Plugin::JwtAuthCalled => format!(
                r#"{{ secret = "{}", audience = "{}", claims_to_headers = {{ sub = "x-user-id" }}{} }}"#,
                jwt::SECRET,
                jwt::AUDIENCE,
                extra.jwt_leeway_secs.map(|secs| format!(", leeway_secs = {secs}")).unwrap_or_default()
            ),
            Plugin::JwtAuthRs256 | Plugin::JwtAuthRs256Uncached => format!(
                r#"{{ public_key = "${{file:{}}}", audience = "{}", claims_to_headers = {{ sub = "x-user-id" }}{} }}"#,
                jwt::rs256_public_key().display(),
                jwt::AUDIENCE,
                if self == Plugin::JwtAuthRs256Uncached { ", verified_cache_size = 0" } else { "" }
            ),
            Plugin::LeastConn | Plugin::NoopMessages => "{}".into(),
            Plugin::HeaderStamp => r#"{ header = "x-stamp", value = "bench" }"#.into(),
        }
    }

    /// The component built by the plugins' own workspace.
    fn component(self) -> PathBuf {
        // This crate is tests/bench in the repository.
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("tests/bench has two parents");
        let file = format!("{}.wasm", self.name().replace('-', "_"));
        repo.join("plugins/target/wasm32-wasip2/release").join(file)
    }
}

/// Fails, naming the build command, if a component of `plugins` has not been built.
pub fn check_components(plugins: &[Plugin]) -> anyhow::Result<()> {
    let missing: Vec<String> =
        plugins.iter().map(|p| p.component()).filter(|c| !c.exists()).map(|c| c.display().to_string()).collect();
    if !missing.is_empty() {
        bail!(
            "plugin components not found: {}; build them with \
             `cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml`",
            missing.join(", ")
        );
    }
    Ok(())
}

/// What a column runs, for the table header:
/// "3 plugins: jwt-auth + noop-messages on the route, least-conn balancer".
pub fn describe(plugins: &[Plugin]) -> String {
    let route: Vec<&str> = plugins.iter().filter(|p| !p.is_balancer()).map(|p| p.name()).collect();
    let count = match plugins.len() {
        0 => "no plugins".to_string(),
        1 => "1 plugin".to_string(),
        n => format!("{n} plugins"),
    };
    let route = if route.is_empty() { String::new() } else { format!(": {} on the route", route.join(" + ")) };
    let balancing = match plugins.iter().find(|p| p.is_balancer()) {
        Some(balancer) => format!("{} balancer", balancer.name()),
        None => "round robin".to_string(),
    };
    format!("{count}{route}, {balancing}")
}

/// What the soak run sets beyond the benchmark columns' config.
#[derive(Default)]
pub struct Extra {
    /// More `[gateway]` lines, e.g. `watch = false`.
    pub gateway: Vec<String>,
    /// More `[[upstream]]` lines, e.g. health checks.
    pub upstream: Vec<String>,
    /// jwt-auth's `leeway_secs`: a new value makes a reload re-initialise the plugin.
    pub jwt_leeway_secs: Option<u64>,
}

/// One route to an upstream of `servers`; `plugins` split into the route's chain (in order)
/// and the upstream's balancer; `extra` settings added. Compiled components are cached in
/// `cache` (the run's own directory), so only the first start of a run compiles them.
pub fn config_with(
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    servers: &[SocketAddr],
    plugins: &[Plugin],
    cache: &Path,
    extra: &Extra,
) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let mut text = format!("[gateway]\nlisten = \"{listen}\"\nplugin_cache = \"{}\"\n", cache.display());
    if let Some(admin) = admin {
        // Only /metrics is read (no token needed for it).
        let _ = writeln!(text, "admin = \"{admin}\"\nmetrics_public = true");
    }
    for line in &extra.gateway {
        let _ = writeln!(text, "{line}");
    }
    let _ = write!(text, "\n[[upstream]]\nname = \"echo\"\nservers = [{}]\n", servers.join(", "));
    if let Some(balancer) = plugins.iter().find(|p| p.is_balancer()) {
        let _ = writeln!(text, "balancer = \"{}\"", balancer.name());
    }
    for line in &extra.upstream {
        let _ = writeln!(text, "{line}");
    }
    for p in plugins {
        let _ = write!(
            text,
            "\n[[plugin]]\nname = \"{}\"\nwasm = \"{}\"\nconfig = {}\n",
            p.name(),
            p.component().display(),
            p.config(extra)
        );
        if *p == Plugin::JwtAuthCalled {
            text.push_str("verdict_cache_size = 0\n");
        }
    }
    let chain: Vec<String> = plugins.iter().filter(|p| !p.is_balancer()).map(|p| format!("\"{}\"", p.name())).collect();
    let _ = write!(text, "\n[[route]]\npath = \"/\"\nupstream = \"echo\"\nplugins = [{}]\n", chain.join(", "));
    text
}

/// Failed plugin calls so far, from /metrics on the gateway's admin address: None when
/// there were none, else the count and which plugin failed how (see `failures_in`).
pub fn failed_plugin_calls(admin: SocketAddr) -> anyhow::Result<Option<String>> {
    let text = admin_request(admin, "GET", "/metrics", None)?;
    failures_in(&text).with_context(|| format!("reading {admin}/metrics"))
}

/// One request to the admin API at `admin`, with `token` as a Bearer token if given: the
/// response body, or an error naming the status if it is not 2xx. `Host` is the admin
/// address itself, a name the admin API accepts without configuration.
pub fn admin_request(admin: SocketAddr, method: &str, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    let limit = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&admin, limit)?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    let authorization = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    // HTTP/1.0: the server closes the connection after the response, which ends the read.
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {admin}\r\n{authorization}Content-Length: 0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: no HTTP status in {head:?}"))?;
    if !(200..300).contains(&status) {
        bail!("{method} {path}: {status} {}", body.trim());
    }
    Ok(body.to_string())
}

/// From Prometheus text: "3 (noop-messages: 3 timeout)", or None when no call failed.
fn failures_in(metrics: &str) -> anyhow::Result<Option<String>> {
    const TOTAL: &str = "wasmgate_plugin_call_failures_total";
    const BY_KIND: &str = "wasmgate_plugins_errors_total{";
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
    let total = metrics
        .lines()
        .find(|l| l.strip_prefix(TOTAL).is_some_and(|rest| rest.starts_with(' ')))
        .map(value)
        .with_context(|| format!("no {TOTAL}"))?;
    if total == 0 {
        return Ok(None);
    }
    // Lines like: wasmgate_plugins_errors_total{kind="timeout",plugin="noop-messages"} 3
    let label = |labels: &str, name: &str| {
        labels
            .split(',')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\"")?.strip_suffix('"'))
            .unwrap_or("?")
            .to_string()
    };
    let detail: Vec<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(BY_KIND))
        .filter(|l| value(l) > 0)
        .filter_map(|l| {
            let labels = l.split_once('}')?.0;
            Some(format!("{}: {} {}", label(labels, "plugin"), value(l), label(labels, "kind")))
        })
        .collect();
    Ok(Some(format!("{total} ({})", detail.join(", "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_plugin_and_kind() {
        let metrics = "# HELP x\nwasmgate_plugin_call_failures_total 3\n\
            wasmgate_plugins_errors_total{kind=\"timeout\",plugin=\"noop-messages\"} 2\n\
            wasmgate_plugins_errors_total{kind=\"trap\",plugin=\"noop-messages\"} 0\n\
            wasmgate_plugins_errors_total{kind=\"trap\",plugin=\"jwt-auth\"} 1\n";
        let summary = failures_in(metrics).unwrap();
        assert_eq!(summary.as_deref(), Some("3 (noop-messages: 2 timeout, jwt-auth: 1 trap)"));
        assert_eq!(failures_in("wasmgate_plugin_call_failures_total 0\n").unwrap(), None);
        assert!(failures_in("other_metric 1\n").is_err());
    }

    #[test]
    fn route_chain_and_balancer_are_split() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let plugins = [Plugin::JwtAuth, Plugin::NoopMessages, Plugin::LeastConn];
        let text = config_with(addr, None, &[addr], &plugins, Path::new("/c"), &Extra::default());
        assert!(text.contains("balancer = \"least-conn\""));
        assert!(text.contains("plugins = [\"jwt-auth\", \"noop-messages\"]"));
        assert!(!text.contains("admin"));
    }
}
