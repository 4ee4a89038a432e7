//! The TOML configuration: its schema, its defaults, and errors that point at the file, line
//! and key that are wrong.
//!
//! Parsing happens in two steps. serde checks the shape (unknown keys are errors, thanks to
//! `deny_unknown_fields`); then `validate` checks what serde cannot (references between
//! tables, addresses, ranges). Fields that such checks need to point at are `Spanned`, so
//! every error can name a line.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A configuration error, already formatted as `file:line:column: key `k`: what is wrong`.
#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewaySection,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamSection>,
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginSection>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteSection>,
    /// Several gateways as one: plugin kv state in Redis, and the instances' registry.
    pub cluster: Option<crate::cluster::ClusterSection>,
    /// The directory relative paths (plugin files) are resolved against: the config file's.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Where the configuration came from, for messages and reloads.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Client-facing address of plain `ws://`; optional when `[gateway.tls]` is set.
    pub listen: Option<Spanned<String>>,
    /// `wss://`: the TLS listener and its certificates.
    pub tls: Option<TlsSection>,
    /// Admin address (health, metrics, plugins); off when absent.
    pub admin: Option<Spanned<String>>,
    /// Bearer token of the admin API (`${env:NAME}` and `${file:PATH}` are expanded). Without
    /// one, only `/healthz` (and `/metrics` with `metrics_public`) answer; an admin address
    /// that is not loopback requires one.
    pub admin_token: Option<Spanned<String>>,
    /// Names the admin API answers to besides its own address (`Host` checked against
    /// DNS rebinding): "gw.internal" matches that name on any port.
    #[serde(default)]
    pub admin_hosts: Vec<Spanned<String>>,
    /// Serve `/metrics` without the admin token.
    #[serde(default)]
    pub metrics_public: bool,
    /// Serve the dashboard's data (`/events`) without the admin token; its actions still
    /// need it. The dashboard page itself holds no data and is always served.
    #[serde(default)]
    pub dashboard_public: bool,
    /// One line per connection when it ends: "off" (default), "stdout", or a file path
    /// (relative to the config file), reopened on SIGUSR1. Set on start only.
    pub access_log: Option<Spanned<String>>,
    /// The access log's lines: "json" (default) or "text" (logfmt).
    pub log_format: Option<Spanned<String>>,
    /// Client sockets held at once, from accept to close, handshakes included; more are
    /// answered 503. Default: half the open-file limit, less a reserve (each connection
    /// holds a client and an upstream socket).
    pub max_connections: Option<Spanned<u64>>,
    /// Client sockets held at once per client address (IPv6: per /64); more are answered
    /// 429. 0 = no per-address limit.
    #[serde(default)]
    pub max_connections_per_ip: u64,
    /// Connections the kernel queues for the client listener before they are accepted
    /// (`listen(2)`'s backlog, capped by `net.core.somaxconn`). A reconnect storm arrives
    /// faster than any accept loop: a full queue drops SYNs, and each dropped client waits a
    /// second for its retransmit. nginx's default is 511; Rust's standard library's is 128.
    #[serde(default = "defaults::listen_backlog")]
    pub listen_backlog: u32,
    /// Client sockets still in their handshake (request, plugins, upstream connect); more
    /// wait in the accept queue (see `max_handshakes_wait_ms`), then are answered 503.
    #[serde(default = "defaults::max_handshakes")]
    pub max_handshakes: Spanned<u64>,
    /// With `max_handshakes` reached, how long the accept loop waits for one of them to
    /// finish before answering 503 (and answering at once until one does); up to ten times
    /// that while the runtime is busy with those handshakes (crate::limits); 0 = answer at once.
    #[serde(default = "defaults::max_handshakes_wait_ms")]
    pub max_handshakes_wait_ms: u64,
    /// Client connections served by this many single-threaded workers, each with its own
    /// `SO_REUSEPORT` listener (crate::workers); 0 = on the main multi-threaded runtime.
    #[serde(default)]
    pub workers: usize,
    /// Largest message accepted in either direction, in bytes; larger ones close with 1009.
    #[serde(default = "defaults::max_message_size")]
    pub max_message_size: u64,
    /// Close a connection after this long with no data message either way; 0 = never.
    #[serde(default)]
    pub idle_timeout_secs: u64,
    /// Ping a silent peer after this long; 0 = no keepalive pings.
    #[serde(default = "defaults::ping_interval_secs")]
    pub ping_interval_secs: u64,
    /// A peer that sends nothing for this long after a keepalive ping is considered dead.
    #[serde(default = "defaults::pong_timeout_secs")]
    pub pong_timeout_secs: u64,
    /// A message assembled in memory (for plugins or permessage-deflate) must arrive whole
    /// within this long of its first frame, or its sender is closed with 1008; 0 = no limit.
    #[serde(default = "defaults::message_assembly_timeout_secs")]
    pub message_assembly_timeout_secs: u64,
    /// How long to wait for the other side's close frame once a close has started.
    #[serde(default = "defaults::close_timeout_secs")]
    pub close_timeout_secs: u64,
    /// What the upstream hears when a client vanishes (a reset, or an end of stream without a
    /// close frame): "close", a close frame with 1001 and a wait for its reply; or
    /// "disconnect", its TCP connection closed once what the client sent is written, as
    /// nginx and HAProxy do, at half the CPU per dropped client (BENCHMARKS.md, twelfth round).
    #[serde(default = "defaults::on_client_loss")]
    pub on_client_loss: Spanned<String>,
    /// Limit for the client's upgrade request headers and the upstream's answer.
    #[serde(default = "defaults::handshake_timeout_secs")]
    pub handshake_timeout_secs: u64,
    /// On shutdown, how long live connections get to finish their close handshakes.
    #[serde(default = "defaults::shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// Where compiled plugins are cached; relative to the config file.
    pub plugin_cache: Option<String>,
    /// Watch the config file and plugin files and reload on change.
    #[serde(default)]
    pub watch: bool,
    /// permessage-deflate when no plugin decides: "off", "passthrough" (negotiated end to
    /// end, frames untouched) or "terminate" (the gateway inflates and deflates).
    #[serde(default = "defaults::compression")]
    pub compression: Spanned<String>,
    /// The gateway's deflate window in terminate mode, 8..=15; smaller saves memory.
    #[serde(default = "defaults::compression_window_bits")]
    pub compression_window_bits: u8,
    /// Reset compression contexts after every message, so idle connections free them.
    #[serde(default)]
    pub compression_no_context_takeover: bool,

    // The edge: whose word about the client's address is taken (see `forwarding` and
    // `proxy_protocol`).
    /// Peers (CIDRs or addresses) whose `X-Forwarded-*` / `Forwarded` headers are kept and
    /// extended, and who may send PROXY protocol headers. Empty (default): nobody.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// Every client connection opens with a PROXY protocol v1 or v2 header, from a peer in
    /// `trusted_proxies`; its client address replaces the socket's. Default false.
    pub proxy_protocol: Option<Spanned<bool>>,
    /// Unix socket through which a new gateway process takes over this one's listening
    /// sockets for an upgrade that refuses nothing (see `upgrade`); relative to the config
    /// file; off when absent.
    pub handover: Option<String>,
    /// When this process retires (SIGUSR2, a handover), its live connections are closed with
    /// 1012 spread over this long; then it exits.
    #[serde(default = "defaults::shutdown_drain_secs")]
    pub shutdown_drain_secs: u64,
    /// DNS servers (`ip:port`) that resolve upstream server names; default: the system's.
    #[serde(default)]
    pub resolvers: Vec<Spanned<String>>,
    /// How often upstream server names are resolved again (an upstream may say otherwise).
    #[serde(default = "defaults::resolve_interval_secs")]
    pub resolve_interval_secs: Spanned<u64>,
    /// Session routes (a plugin declaring the `session` hook): most bytes of client messages
    /// remembered per connection for replay on another server.
    #[serde(default = "defaults::session_log_bytes")]
    pub session_log_bytes: usize,
    /// Session routes: how long a connection whose server went away may wait for another
    /// before its client gets the close it would have had.
    #[serde(default = "defaults::resume_timeout_ms")]
    pub resume_timeout_ms: u64,
    /// Session routes: what the client sends while its connection moves is read into a
    /// queue of at most this many bytes (then reading stops until the move is done) and
    /// delivered to the new server after the replay.
    #[serde(default = "defaults::resume_buffer_bytes")]
    pub resume_buffer_bytes: usize,
    /// `admin_token` expanded, made by `validate`.
    #[serde(skip)]
    pub admin_secret: Option<crate::admin::AdminToken>,
}

/// `[gateway.tls]`: the client-facing TLS listener (see [`crate::tls`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Address of the `wss://` listener.
    pub listen: Spanned<String>,
    /// Certificate chains with their keys (PEM, relative to the config file); the one for a
    /// handshake is picked by SNI, else the first.
    pub certs: Spanned<Vec<CertEntry>>,
    /// CA certificates (PEM) that client certificates must chain to: with it, clients
    /// without a valid certificate are refused (mutual TLS).
    pub client_ca: Option<Spanned<String>>,
    /// The files above, read and checked by `validate`.
    #[serde(skip)]
    pub loaded: Option<std::sync::Arc<crate::tls::LoadedTls>>,
}

/// `{ cert = "certs/chat.pem", key = "certs/chat.key" }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertEntry {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub name: Spanned<String>,
    pub servers: Vec<Spanned<ServerEntry>>,
    /// Name of a `[[plugin]]` that exports the balancer hook; round robin when absent.
    pub balancer: Option<Spanned<String>>,
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How many servers to try before giving the client a 502.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Active health checks; none when absent.
    pub health: Option<Spanned<HealthTable>>,
    /// Connect failures in a row that eject a server (for 1 s, doubling up to 30 s while it
    /// keeps failing); 0 = never eject.
    #[serde(default = "defaults::eject_after")]
    pub eject_after: u32,
    /// A drained server's connections are closed (1012) spread over this long, unless the
    /// drain request gives a rate; 0 = all at once.
    #[serde(default = "defaults::drain_secs")]
    pub drain_secs: u64,
    /// How often this pool's server names are resolved again; default: the gateway's.
    pub resolve_interval_secs: Option<Spanned<u64>>,
    /// TLS toward the `wss://` servers: `{ ca, server_name, cert, key }`, each optional.
    pub tls: Option<Spanned<crate::upstream::tls::TlsTable>>,
    /// Made by `validate` when the pool has a `wss://` server.
    #[serde(skip)]
    pub tls_client: Option<std::sync::Arc<crate::upstream::UpstreamTls>>,
}

/// `health = { interval_ms = 1000, timeout_ms = 500, rise = 2, fall = 3, path = "/probe" }`,
/// or `kind = "tcp"` for a plain TCP connect.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthTable {
    #[serde(default = "defaults::health_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "defaults::health_timeout_ms")]
    pub timeout_ms: u64,
    /// Successful probes in a row that make an unhealthy server healthy again.
    #[serde(default = "defaults::health_rise")]
    pub rise: u32,
    /// Failed probes in a row that make a healthy server unhealthy.
    #[serde(default = "defaults::health_fall")]
    pub fall: u32,
    /// "websocket" (default: open a WebSocket to `path`, then close it with 1000) or "tcp".
    pub kind: Option<Spanned<String>>,
    /// Path of the WebSocket probe, after the server's path prefix; default "/".
    pub path: Option<Spanned<String>>,
}

/// A server is either a plain address string or a table with weight and labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ServerEntry {
    Address(String),
    Detailed(ServerTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTable {
    pub address: String,
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    pub name: Spanned<String>,
    /// Path to the component, relative to the config file.
    pub wasm: Spanned<String>,
    /// Handed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    /// What a failing call means: "deny" refuses, "allow" carries on as if the plugin was not
    /// there. Default: "deny" for the hooks that can refuse (handshake: 503, messages: close
    /// 1011); a balancer falls back to round robin unless "deny" is given.
    pub on_error: Option<Spanned<String>>,
    /// Running time a handshake, select or close call may take (see `plugin::epoch`).
    #[serde(default = "defaults::plugin_timeout_ms")]
    pub timeout_ms: u64,
    /// Running time one on-message call may take.
    #[serde(default = "defaults::plugin_message_timeout_ms")]
    pub message_timeout_ms: u64,
    /// Linear memory cap per instance.
    #[serde(default = "defaults::plugin_memory_limit_mb")]
    pub memory_limit_mb: u64,
    /// Instances kept per plugin; they are shared by all connections.
    #[serde(default = "defaults::plugin_instances")]
    pub instances: usize,
    /// Series the plugin's own metrics may have on `/metrics`.
    #[serde(default = "defaults::plugin_max_metric_series")]
    pub max_metric_series: usize,
    /// The plugin's share of the kv store: keys it may hold...
    #[serde(default = "defaults::plugin_kv_max_keys")]
    pub kv_max_keys: usize,
    /// ...and bytes (keys, values and 64 per entry). A write past either is refused.
    #[serde(default = "defaults::plugin_kv_max_bytes")]
    pub kv_max_bytes: usize,
    /// With `[cluster]`, what kv calls do while Redis is away: "local" (default), "deny" or
    /// "allow" (see `cluster`).
    pub kv_unavailable: Option<Spanned<String>>,
    /// Handshake verdicts the plugin marks as reusable (`verdicts.keep`) that the gateway
    /// keeps and gives again without calling it; 0 calls the plugin for every handshake.
    #[serde(default = "defaults::plugin_verdict_cache_size")]
    pub verdict_cache_size: usize,
    /// ...and the bytes they may take (keys, answers, metadata, 160 per entry).
    #[serde(default = "defaults::plugin_verdict_cache_max_bytes")]
    pub verdict_cache_max_bytes: usize,
    /// The longest a kept verdict is given again, whatever the plugin asked.
    #[serde(default = "defaults::plugin_verdict_cache_max_ttl_ms")]
    pub verdict_cache_max_ttl_ms: u64,
    /// `config` as JSON with `${env:NAME}` and `${file:PATH}` expanded, made by `validate`.
    #[serde(skip)]
    pub config_json: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Path prefix; the longest matching prefix wins.
    #[serde(default = "defaults::route_path")]
    pub path: Spanned<String>,
    /// Exact host (without port) this route is for; any host when absent. Normalised by
    /// `validate` (lower case, no trailing dot, canonical IPv6).
    pub host: Option<Spanned<String>>,
    pub upstream: Spanned<String>,
    /// Plugin chain, in call order.
    #[serde(default)]
    pub plugins: Vec<Spanned<String>>,
    /// A directory whose files answer plain GET and HEAD requests on this route (relative to
    /// the config file); upgrades still go upstream. See `static_files`.
    pub files: Option<Spanned<String>>,
}

mod defaults {
    pub fn session_log_bytes() -> usize {
        64 << 10
    }
    pub fn resume_timeout_ms() -> u64 {
        5_000
    }
    pub fn resume_buffer_bytes() -> usize {
        64 << 10
    }
    pub fn max_message_size() -> u64 {
        16 << 20
    }
    pub fn ping_interval_secs() -> u64 {
        30
    }
    pub fn pong_timeout_secs() -> u64 {
        20
    }
    pub fn close_timeout_secs() -> u64 {
        5
    }
    pub fn message_assembly_timeout_secs() -> u64 {
        60
    }
    pub fn handshake_timeout_secs() -> u64 {
        10
    }
    pub fn shutdown_grace_secs() -> u64 {
        5
    }
    pub fn shutdown_drain_secs() -> u64 {
        10
    }
    pub fn resolve_interval_secs() -> toml::Spanned<u64> {
        toml::Spanned::new(0..0, 30)
    }
    pub fn connect_timeout_ms() -> u64 {
        3000
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn eject_after() -> u32 {
        3
    }
    pub fn drain_secs() -> u64 {
        10
    }
    pub fn health_interval_ms() -> u64 {
        1000
    }
    pub fn health_timeout_ms() -> u64 {
        500
    }
    pub fn health_rise() -> u32 {
        2
    }
    pub fn health_fall() -> u32 {
        3
    }
    pub fn plugin_timeout_ms() -> u64 {
        20
    }
    pub fn plugin_message_timeout_ms() -> u64 {
        5
    }
    pub fn plugin_max_metric_series() -> usize {
        256
    }
    pub fn plugin_kv_max_keys() -> usize {
        10_000
    }
    pub fn plugin_kv_max_bytes() -> usize {
        4 << 20
    }
    /// A 20,000-client storm's tokens fit, at a few hundred bytes each.
    pub fn plugin_verdict_cache_size() -> usize {
        50_000
    }
    /// 50,000 answers of a JWT's size (about 650 bytes with the key).
    pub fn plugin_verdict_cache_max_bytes() -> usize {
        32 << 20
    }
    pub fn plugin_verdict_cache_max_ttl_ms() -> u64 {
        5 * 60 * 1000
    }
    pub fn plugin_memory_limit_mb() -> u64 {
        64
    }
    pub fn plugin_instances() -> usize {
        4
    }
    pub fn on_client_loss() -> toml::Spanned<String> {
        toml::Spanned::new(0..0, "close".to_string())
    }
    pub fn compression() -> toml::Spanned<String> {
        toml::Spanned::new(0..0, "passthrough".to_string())
    }
    pub fn compression_window_bits() -> u8 {
        15
    }
    pub fn listen_backlog() -> u32 {
        4096
    }
    pub fn max_handshakes() -> toml::Spanned<u64> {
        toml::Spanned::new(0..0, 1024)
    }
    pub fn max_handshakes_wait_ms() -> u64 {
        1000
    }
    pub fn route_path() -> toml::Spanned<String> {
        toml::Spanned::new(0..0, "/".to_string())
    }
}

impl ServerEntry {
    pub fn address(&self) -> &str {
        match self {
            ServerEntry::Address(a) => a,
            ServerEntry::Detailed(t) => &t.address,
        }
    }
    pub fn weight(&self) -> u32 {
        match self {
            ServerEntry::Address(_) => 1,
            ServerEntry::Detailed(t) => t.weight,
        }
    }
    pub fn labels(&self) -> BTreeMap<String, String> {
        match self {
            ServerEntry::Address(_) => BTreeMap::new(),
            ServerEntry::Detailed(t) => t.labels.clone(),
        }
    }
}

impl GatewaySection {
    /// The plain `ws://` address, if any.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.as_ref().map(|l| l.get_ref().parse().expect("validated"))
    }
    /// The client address as configured: the plain one, else the `wss://` one (validation
    /// requires one of them).
    pub fn client_listen(&self) -> &str {
        match (&self.listen, &self.tls) {
            (Some(listen), _) => listen.get_ref(),
            (None, Some(tls)) => tls.listen.get_ref(),
            (None, None) => "",
        }
    }
    /// The `wss://` address, if any.
    pub fn tls_listen_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|t| t.listen.get_ref().parse().expect("validated"))
    }
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.get_ref().parse().expect("validated"))
    }
    pub fn close_timeout(&self) -> Duration {
        Duration::from_secs(self.close_timeout_secs)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    pub fn trusted_proxies(&self) -> crate::forwarding::TrustedProxies {
        let networks = self.trusted_proxies.iter().map(|t| crate::forwarding::parse_network(t.get_ref()).expect("validated"));
        crate::forwarding::TrustedProxies::new(networks.collect())
    }
    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol.as_ref().is_some_and(|p| *p.get_ref())
    }
}

impl PluginSection {
    pub fn wasm_path(&self, base_dir: &Path) -> PathBuf {
        base_dir.join(self.wasm.get_ref())
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut config = Config::parse(&text, &path.display().to_string(), base_dir)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, base_dir: PathBuf) -> Result<Config, ConfigError> {
        let at = Locator { text, origin };
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (msg, span) = (e.message().trim_end().to_string(), e.span());
            match span {
                Some(span) => at.error(span, &msg),
                None => ConfigError(format!("{origin}: {msg}")),
            }
        })?;
        config.base_dir = base_dir;
        config.validate(&at)?;
        Ok(config)
    }

    fn validate(&mut self, at: &Locator) -> Result<(), ConfigError> {
        let base_dir = self.base_dir.clone();
        for p in &mut self.plugins {
            let mut value = toml::Value::Table(p.config.clone());
            expand(&mut value, &base_dir, "config")
                .map_err(|e| at.error(p.name.span(), &format!("plugin `{}`: {e}", p.name.get_ref())))?;
            p.config_json = serde_json::to_string(&value).expect("TOML values are JSON values");
        }
        self.validate_admin(at)?;
        self.validate_tls(at)?;
        let g = &self.gateway;
        if let Some(listen) = &g.listen {
            parse_addr(at, listen)?;
        }
        for (value, key) in [(g.max_connections.as_ref(), "max_connections"), (Some(&g.max_handshakes), "max_handshakes")] {
            if let Some(v) = value.filter(|v| *v.get_ref() == 0) {
                return Err(at.error(v.span(), &format!("{key} must be at least 1")));
            }
        }
        if !matches!(g.on_client_loss.get_ref().as_str(), "close" | "disconnect") {
            return Err(at.error(g.on_client_loss.span(), "on_client_loss must be \"close\" or \"disconnect\""));
        }
        if !matches!(g.compression.get_ref().as_str(), "off" | "passthrough" | "terminate") {
            return Err(at.error(g.compression.span(), "compression must be \"off\", \"passthrough\" or \"terminate\""));
        }
        if !(8..=15).contains(&g.compression_window_bits) {
            return Err(ConfigError(format!("{}: compression_window_bits must be 8..=15", at.origin)));
        }
        if let Some(format) = g.log_format.as_ref().filter(|f| !matches!(f.get_ref().as_str(), "json" | "text")) {
            return Err(at.error(format.span(), "log_format must be \"json\" or \"text\""));
        }
        if let Some(log) = g.access_log.as_ref().filter(|l| l.get_ref().trim().is_empty()) {
            return Err(at.error(log.span(), "access_log must be \"off\", \"stdout\" or a file path"));
        }
        validate_edge(at, g)?;
        for r in &g.resolvers {
            r.get_ref().parse::<SocketAddr>().map_err(|_| at.error(r.span(), "resolvers entries must be ip:port, like \"127.0.0.1:53\""))?;
        }
        let intervals = self.upstreams.iter().filter_map(|u| u.resolve_interval_secs.as_ref());
        if let Some(zero) = std::iter::once(&g.resolve_interval_secs).chain(intervals).find(|i| *i.get_ref() == 0) {
            return Err(at.error(zero.span(), "resolve_interval_secs must be at least 1"));
        }
        let plugin_names = unique_names(at, self.plugins.iter().map(|p| &p.name), "plugin")?;
        let upstream_names = unique_names(at, self.upstreams.iter().map(|u| &u.name), "upstream")?;
        for p in &self.plugins {
            if let Some(on_error) = &p.on_error {
                if !matches!(on_error.get_ref().as_str(), "deny" | "allow") {
                    return Err(at.error(on_error.span(), "on_error must be \"deny\" or \"allow\""));
                }
            }
            if let Some(mode) = &p.kv_unavailable {
                crate::cluster::KvUnavailable::parse(mode.get_ref()).map_err(|e| at.error(mode.span(), &e))?;
            }
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate().map_err(|(span, e)| at.error(span, &e))?;
        }
        let mut tls_clients = Vec::with_capacity(self.upstreams.len());
        for u in &self.upstreams {
            if u.servers.is_empty() {
                return Err(at.error(u.name.span(), "upstream has no servers"));
            }
            let mut any_wss = false;
            for s in &u.servers {
                let address = crate::upstream::ServerAddress::parse(s.get_ref().address())
                    .map_err(|e| at.error(s.span(), &e))?;
                any_wss |= address.tls;
            }
            let tls_client = crate::upstream::tls::for_pool(u.tls.as_ref(), any_wss, &base_dir)
                .map_err(|(span, e)| at.error(if span.is_empty() { u.name.span() } else { span }, &e))?;
            tls_clients.push(tls_client);
            if let Some(b) = &u.balancer {
                if !plugin_names.contains(b.get_ref().as_str()) {
                    return Err(at.error(b.span(), "balancer names no [[plugin]]"));
                }
            }
            if u.max_attempts == 0 {
                return Err(at.error(u.name.span(), "max_attempts must be at least 1"));
            }
            if let Some(h) = &u.health {
                validate_health(at, h)?;
            }
        }
        let mut seen_routes = HashSet::new();
        for r in &mut self.routes {
            if !r.path.get_ref().starts_with('/') {
                return Err(at.error(r.path.span(), "route path must start with '/'"));
            }
            // Requests are routed on their normal form (see `normalize`); a route written
            // otherwise could never match, or could be missed by another spelling.
            if !crate::normalize::is_plain_route_path(r.path.get_ref()) {
                return Err(at.error(
                    r.path.span(),
                    "route path must be in normal form: letters, digits, '-', '.', '_', '~' and single '/', \
                     no '.' or '..' segments",
                ));
            }
            if let Some(host) = &mut r.host {
                let normal = crate::normalize::host(host.get_ref())
                    .map_err(|e| at.error(host.span(), &format!("route host: {e}")))?;
                *host = Spanned::new(host.span(), normal);
            }
            let host = r.host.as_ref().map(|h| h.get_ref().clone());
            if !seen_routes.insert((host, r.path.get_ref().clone())) {
                return Err(at.error(r.path.span(), "duplicate route (same host and path)"));
            }
            if !upstream_names.contains(r.upstream.get_ref().as_str()) {
                return Err(at.error(r.upstream.span(), "upstream names no [[upstream]]"));
            }
            for p in &r.plugins {
                if !plugin_names.contains(p.get_ref().as_str()) {
                    return Err(at.error(p.span(), "plugins names no [[plugin]]"));
                }
            }
            if let Some(files) = &mut r.files {
                let dir = self.base_dir.join(files.get_ref());
                if !dir.is_dir() {
                    return Err(at.error(files.span(), &format!("files: {} is not a directory", dir.display())));
                }
                *files = Spanned::new(files.span(), dir.display().to_string());
            }
        }
        if self.routes.is_empty() {
            return Err(ConfigError(format!("{}: no [[route]]: nothing would be served", at.origin)));
        }
        for (u, tls_client) in self.upstreams.iter_mut().zip(tls_clients) {
            u.tls_client = tls_client;
        }
        Ok(())
    }
}

impl Config {
    /// The admin API's keys: an address that is not loopback needs a token; the token is
    /// expanded and must be usable as a Bearer credential.
    fn validate_admin(&mut self, at: &Locator) -> Result<(), ConfigError> {
        let g = &mut self.gateway;
        if let Some(token) = &g.admin_token {
            let value = expand_str(token.get_ref(), &self.base_dir, "admin_token").map_err(|e| at.error(token.span(), &e))?;
            if value.len() < MIN_ADMIN_TOKEN_LEN {
                return Err(at.error(token.span(), &format!("admin_token must be at least {MIN_ADMIN_TOKEN_LEN} characters")));
            }
            // RFC 6750 §2.1: a Bearer credential is visible ASCII without spaces.
            if !value.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(at.error(token.span(), "admin_token must be visible ASCII without spaces"));
            }
            g.admin_secret = Some(crate::admin::AdminToken::new(&value));
        }
        for host in &g.admin_hosts {
            let h = host.get_ref();
            if h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(at.error(host.span(), "admin_hosts entries must be host names like \"gw.internal\""));
            }
        }
        if let Some(admin) = &g.admin {
            let addr = parse_addr(at, admin)?;
            if !addr.ip().is_loopback() && g.admin_token.is_none() {
                return Err(at.error(
                    admin.span(),
                    "the admin address is not loopback and there is no admin_token: anyone who reaches it could drain servers and reload",
                ));
            }
        }
        Ok(())
    }
}

/// Shortest admin token accepted: 16 characters keep guessing out of reach.
const MIN_ADMIN_TOKEN_LEN: usize = 16;

impl Config {
    /// Needs a listener; reads and checks the TLS files, naming the file at fault.
    fn validate_tls(&mut self, at: &Locator) -> Result<(), ConfigError> {
        let base_dir = self.base_dir.clone();
        let g = &mut self.gateway;
        let Some(tls) = &mut g.tls else {
            return match g.listen {
                Some(_) => Ok(()),
                None => Err(ConfigError(format!("{}: [gateway] needs `listen`, or a [gateway.tls] section", at.origin))),
            };
        };
        parse_addr(at, &tls.listen)?;
        if tls.certs.get_ref().is_empty() {
            return Err(at.error(tls.certs.span(), "certs needs at least one { cert = \"...\", key = \"...\" }"));
        }
        let certs: Vec<(PathBuf, PathBuf)> =
            tls.certs.get_ref().iter().map(|c| (base_dir.join(&c.cert), base_dir.join(&c.key))).collect();
        let loaded = crate::tls::LoadedTls::load(&certs, tls.client_ca.as_ref().map(|ca| base_dir.join(ca.get_ref())).as_deref())
            .map_err(|(e, in_client_ca)| {
                let span = match (&tls.client_ca, in_client_ca) {
                    (Some(ca), true) => ca.span(),
                    _ => tls.certs.span(),
                };
                at.error(span, &e)
            })?;
        tls.loaded = Some(std::sync::Arc::new(loaded));
        Ok(())
    }
}

/// Replaces `${env:NAME}` and `${file:PATH}` in every string of a plugin's config, so
/// secrets stay out of the config file. Plugins themselves cannot read the environment or
/// files (their WASI context denies both).
fn expand(value: &mut toml::Value, base_dir: &Path, key: &str) -> Result<(), String> {
    match value {
        toml::Value::String(s) => {
            *s = expand_str(s, base_dir, key)?;
            Ok(())
        }
        toml::Value::Array(items) => items.iter_mut().try_for_each(|v| expand(v, base_dir, key)),
        toml::Value::Table(table) => {
            table.iter_mut().try_for_each(|(k, v)| expand(v, base_dir, &format!("{key}.{k}")))
        }
        _ => Ok(()),
    }
}

/// `trusted_proxies` must be CIDRs; `proxy_protocol` needs someone to trust.
fn validate_edge(at: &Locator, g: &GatewaySection) -> Result<(), ConfigError> {
    for entry in &g.trusted_proxies {
        crate::forwarding::parse_network(entry.get_ref())
            .map_err(|e| at.error(entry.span(), &format!("trusted_proxies: {e}")))?;
    }
    if let Some(p) = &g.proxy_protocol {
        if *p.get_ref() && g.trusted_proxies.is_empty() {
            return Err(at.error(
                p.span(),
                "proxy_protocol = true needs trusted_proxies: PROXY headers are taken only from them, \
                 so every connection would be refused",
            ));
        }
    }
    Ok(())
}

/// `s` with each `${env:NAME}` and `${file:PATH}` replaced, in one pass: what a variable or
/// file holds is never expanded again (a secret may contain `${`).
fn expand_str(s: &str, base_dir: &Path, key: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("`{key}`: unclosed ${{"))?;
        let inner = &after[..end];
        let replacement = match inner.split_once(':') {
            Some(("env", name)) => {
                std::env::var(name).map_err(|_| format!("`{key}`: environment variable {name} is not set"))?
            }
            Some(("file", path)) => {
                let path = base_dir.join(path);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("`{key}`: cannot read {}: {e}", path.display()))?;
                text.trim_end().to_string()
            }
            _ => return Err(format!("`{key}`: expected ${{env:NAME}} or ${{file:PATH}}, found ${{{inner}}}")),
        };
        out.push_str(&replacement);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn validate_health(at: &Locator, health: &Spanned<HealthTable>) -> Result<(), ConfigError> {
    let h = health.get_ref();
    if h.interval_ms < 10 {
        return Err(at.error(health.span(), "health: interval_ms must be at least 10"));
    }
    if h.timeout_ms == 0 {
        return Err(at.error(health.span(), "health: timeout_ms must be at least 1"));
    }
    if h.rise == 0 || h.fall == 0 {
        return Err(at.error(health.span(), "health: rise and fall must be at least 1"));
    }
    let tcp = match &h.kind {
        None => false,
        Some(k) if k.get_ref() == "websocket" => false,
        Some(k) if k.get_ref() == "tcp" => true,
        Some(k) => return Err(at.error(k.span(), "health: kind must be \"websocket\" or \"tcp\"")),
    };
    if let Some(path) = &h.path {
        if tcp {
            return Err(at.error(path.span(), "health: a tcp check has no path"));
        }
        if !path.get_ref().starts_with('/') {
            return Err(at.error(path.span(), "health: path must start with '/'"));
        }
    }
    Ok(())
}

fn parse_addr(at: &Locator, s: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
    s.get_ref()
        .parse()
        .map_err(|_| at.error(s.span(), "expected an address like \"127.0.0.1:8080\""))
}

fn unique_names<'a>(
    at: &Locator,
    names: impl Iterator<Item = &'a Spanned<String>>,
    what: &str,
) -> Result<HashSet<&'a str>, ConfigError> {
    let mut set = HashSet::new();
    for n in names {
        if !set.insert(n.get_ref().as_str()) {
            return Err(at.error(n.span(), &format!("duplicate {what} name")));
        }
    }
    Ok(set)
}

/// Turns byte spans into `file:line:column: key `k`: message`.
struct Locator<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Locator<'_> {
    fn error(&self, span: std::ops::Range<usize>, msg: &str) -> ConfigError {
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_no = self.text[..start].matches('\n').count() + 1;
        let column = start - line_start + 1;
        let line = self.text[line_start..].lines().next().unwrap_or("");
        // The key is what stands before '=' on the line the span starts on.
        let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| !k.is_empty());
        match key {
            Some(key) => ConfigError(format!("{}:{line_no}:{column}: key `{key}`: {msg}", self.origin)),
            None => ConfigError(format!("{}:{line_no}:{column}: {msg} (in `{}`)", self.origin, line.trim())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "gw.toml", PathBuf::new())
    }

    const GOOD: &str = r#"
[gateway]
listen = "127.0.0.1:8080"

[[upstream]]
name = "echo"
servers = ["127.0.0.1:9001", { address = "ws://127.0.0.1:9002/base", weight = 3, labels = { zone = "a" } }]

[[route]]
path = "/"
upstream = "echo"
"#;

    #[test]
    fn accepts_a_good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.upstreams[0].servers[1].get_ref().weight(), 3);
        assert_eq!(c.gateway.max_message_size, 16 << 20);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = GOOD.replace("listen = ", "lisen = \"x\"\nlisten = ");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("gw.toml:3:"), "{err}");
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let text = GOOD.replace("[gateway]\n", "[gateway]\nmax_message_size = \"big\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("gw.toml:3:"), "{err}");
        assert!(err.contains("key `max_message_size`"), "{err}");
    }

    #[test]
    fn what_a_vanished_client_leaves_its_upstream_is_one_of_two_choices() {
        assert_eq!(parse(GOOD).unwrap().gateway.on_client_loss.get_ref(), "close");
        let text = GOOD.replace("[gateway]\n", "[gateway]\non_client_loss = \"disconnect\"\n");
        assert_eq!(parse(&text).unwrap().gateway.on_client_loss.get_ref(), "disconnect");
        let text = GOOD.replace("[gateway]\n", "[gateway]\non_client_loss = \"reset\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("gw.toml:3:"), "{err}");
        assert!(err.contains("on_client_loss must be"), "{err}");
    }

    #[test]
    fn dangling_reference_names_line_and_key() {
        let text = GOOD.replace("upstream = \"echo\"", "upstream = \"nope\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("gw.toml:11:"), "{err}");
        assert!(err.contains("key `upstream`"), "{err}");
    }

    #[test]
    fn plugin_config_expands_env_and_files() {
        std::env::set_var("WASMGATE_TEST_SECRET", "s3cret");
        let text = format!(
            "{GOOD}\n[[plugin]]\nname = \"auth\"\nwasm = \"a.wasm\"\nconfig = {{ secret = \"${{env:WASMGATE_TEST_SECRET}}\", n = 3 }}\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.plugins[0].config_json, r#"{"n":3,"secret":"s3cret"}"#);
        let missing = text.replace("WASMGATE_TEST_SECRET", "WASMGATE_TEST_UNSET");
        let err = parse(&missing).unwrap_err().to_string();
        assert!(err.contains("WASMGATE_TEST_UNSET is not set") && err.contains("config.secret"), "{err}");
    }

    #[test]
    fn expansion_is_one_pass() {
        // A value that holds `${...}` is a value, never a reference to follow.
        std::env::set_var("WASMGATE_TEST_OUTER", "a${env:WASMGATE_TEST_INNER}b${file:/etc/hostname}");
        std::env::set_var("WASMGATE_TEST_INNER", "leaked");
        let dir = std::env::temp_dir().join(format!("wasmgate-expand-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), "${env:WASMGATE_TEST_INNER}\n").unwrap();
        let base = dir.clone();
        let text = format!(
            "{GOOD}\n[[plugin]]\nname = \"p\"\nwasm = \"p.wasm\"\nconfig = {{ e = \"<${{env:WASMGATE_TEST_OUTER}}>\", f = \"${{file:secret}}${{env:WASMGATE_TEST_INNER}}\" }}\n"
        );
        let c = Config::parse(&text, "gw.toml", base).unwrap();
        let json: serde_json::Value = serde_json::from_str(&c.plugins[0].config_json).unwrap();
        assert_eq!(json["e"], "<a${env:WASMGATE_TEST_INNER}b${file:/etc/hostname}>");
        assert_eq!(json["f"], "${env:WASMGATE_TEST_INNER}leaked");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn admin_token_is_expanded_and_checked() {
        let with = |gateway: &str| GOOD.replace("[gateway]\n", &format!("[gateway]\n{gateway}\n"));
        std::env::set_var("WASMGATE_TEST_ADMIN", "0123456789abcdef-token");
        let c = parse(&with("admin = \"127.0.0.1:9090\"\nadmin_token = \"${env:WASMGATE_TEST_ADMIN}\"")).unwrap();
        let token = c.gateway.admin_secret.as_ref().unwrap();
        assert!(token.matches(b"0123456789abcdef-token"));
        assert!(!token.matches(b"${env:WASMGATE_TEST_ADMIN}") && !token.matches(b"0123456789abcdef-toke"));
        assert_eq!(format!("{token:?}"), "AdminToken(..)", "Debug never shows it");

        // Loopback without a token starts (its API is locked); anything else needs one.
        assert!(parse(&with("admin = \"127.0.0.1:9090\"")).is_ok());
        assert!(parse(&with("admin = \"[::1]:9090\"")).is_ok());
        for (gateway, why, key) in [
            ("admin = \"0.0.0.0:9090\"", "not loopback", "admin"),
            ("admin = \"[::]:9090\"", "not loopback", "admin"),
            ("admin = \"[::ffff:127.0.0.1]:9090\"", "not loopback", "admin"),
            ("admin = \"192.168.1.2:9090\"", "not loopback", "admin"),
            ("admin = \"0.0.0.0:9090\"\nadmin_token = \"short\"", "at least 16", "admin_token"),
            ("admin_token = \"sixteen chars or more\"", "visible ASCII", "admin_token"),
            ("admin_token = \"${env:WASMGATE_TEST_UNSET_TOKEN}\"", "is not set", "admin_token"),
            ("admin_hosts = [\"\"]", "host names", "admin_hosts"),
            ("max_connections = 0", "at least 1", "max_connections"),
            ("max_handshakes = 0", "at least 1", "max_handshakes"),
        ] {
            let err = parse(&with(gateway)).unwrap_err().to_string();
            assert!(err.starts_with("gw.toml:3:") || err.starts_with("gw.toml:4:"), "{gateway}: {err}");
            assert!(err.contains(&format!("key `{key}`")) && err.contains(why), "{gateway}: {err}");
        }
        let c = parse(&with("max_connections = 5\nmax_connections_per_ip = 2\nmax_handshakes = 3")).unwrap();
        let limits = crate::limits::Limits::from_config(&c.gateway, 100);
        assert_eq!((limits.connections, limits.per_address, limits.handshakes), (5, 2, 3));
        let limits = crate::limits::Limits::from_config(&parse(GOOD).unwrap().gateway, 100);
        assert_eq!((limits.connections, limits.per_address, limits.handshakes), (100, 0, 1024));
    }

    #[test]
    fn health_checks_parse_and_validate() {
        let with = |health: &str| GOOD.replace("[[route]]", &format!("health = {health}\n\n[[route]]"));
        let c = parse(&with("{ interval_ms = 200, fall = 2, path = \"/probe\" }")).unwrap();
        let h = c.upstreams[0].health.as_ref().unwrap().get_ref();
        assert_eq!((h.interval_ms, h.timeout_ms, h.rise, h.fall), (200, 500, 2, 2));
        assert_eq!(h.path.as_ref().unwrap().get_ref(), "/probe");
        assert_eq!((c.upstreams[0].eject_after, c.upstreams[0].drain_secs), (3, 10));
        assert!(parse(&with("{ kind = \"tcp\" }")).is_ok());
        for (bad, why) in [
            ("{ kind = \"udp\" }", "kind must be"),
            ("{ kind = \"tcp\", path = \"/x\" }", "no path"),
            ("{ path = \"x\" }", "must start with"),
            ("{ rise = 0 }", "at least 1"),
            ("{ interval_ms = 1 }", "at least 10"),
        ] {
            let text = with(bad);
            let line = text.lines().position(|l| l.starts_with("health =")).unwrap() + 1;
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("gw.toml:{line}:")), "{err}");
            assert!(err.contains("key `health`") && err.contains(why), "{err}");
        }
        let err = parse(&with("{ intervl_ms = 5 }")).unwrap_err().to_string();
        assert!(err.contains("intervl_ms"), "{err}");
    }

    #[test]
    fn bad_server_address_is_rejected() {
        let text = GOOD.replace("127.0.0.1:9001", "localhost");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("gw.toml:7:"), "{err}");
    }
}
