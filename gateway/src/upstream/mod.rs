//! Upstream pools: the servers behind a name, their live statistics, their health, and the
//! default (round robin) order in which to try them.
//!
//! Statistics, health and the registry of live connections live in a server's
//! `Arc<ServerState>`, which a config reload carries over for servers that stay, so
//! least-connection counts, latency averages, ejections and drains survive reloads.
//! [`health`] decides which servers are offered to new connections; [`drain`] closes chosen
//! connections with 1012 so their clients reconnect elsewhere.

mod connect;
pub mod drain;
pub mod health;
mod request;
pub mod resolve;
pub mod server_metrics;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use smallvec::SmallVec;
use tokio_util::sync::CancellationToken;

pub use connect::{open, ConnectError, UpstreamSocket, UpstreamStream};
pub use request::{HeaderLines, UpstreamRequest};
pub use drain::{CloseSignal, Connections, DrainPace};
pub use health::{Health, HealthSettings, ProbeKind};
pub use tls::UpstreamTls;

/// Servers of a pool by index, in the order to try them. Pools have a handful of servers,
/// mostly: every connection ranks them, and on the stack that costs no allocation.
pub type ServerOrder = SmallVec<[usize; 8]>;

/// Where a server is: host, port and a path prefix for the upstream request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddress {
    /// `host:port`, as used for connecting and for messages.
    pub authority: String,
    /// Path prefix put before the client's path ("" for none).
    pub path_prefix: String,
    /// `wss://`: the connection is TLS, with the pool's [`UpstreamTls`].
    pub tls: bool,
    /// The DNS name this address was resolved from (see [`resolve`]): what the server's
    /// certificate must name, since `authority` then holds an IP address.
    pub resolved_from: Option<String>,
}

impl ServerAddress {
    /// Accepts `host:port`, `ws://host:port[/path]` or `wss://host:port[/path]`.
    pub fn parse(s: &str) -> Result<ServerAddress, String> {
        let (tls, rest) = match s.strip_prefix("wss://") {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix("ws://").unwrap_or(s)),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let port = authority
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()))
            .filter(|(host, port)| !host.is_empty() && port.is_ok());
        if port.is_none() {
            return Err(format!("{s}: expected host:port, ws://host:port/path or wss://host:port/path"));
        }
        Ok(ServerAddress {
            authority: authority.to_string(),
            path_prefix: path.trim_end_matches('/').to_string(),
            tls,
            resolved_from: None,
        })
    }

    /// The host part of the authority (an IPv6 address without its brackets): the name a
    /// server's certificate must hold unless the pool sets `tls.server_name`.
    pub fn host(&self) -> &str {
        let host = self.authority.rsplit_once(':').map_or(self.authority.as_str(), |(host, _)| host);
        host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
    }

    /// The name a `wss://` server's certificate is checked against (unless the pool sets
    /// `tls.server_name`): the configured host name, also for addresses resolved from it.
    pub fn certificate_name(&self) -> &str {
        self.resolved_from.as_deref().unwrap_or_else(|| self.host())
    }
}

/// One upstream server and what the gateway has seen of it.
#[derive(Debug)]
pub struct Server {
    pub address: ServerAddress,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
    /// The pool's TLS settings, for a `wss://` server.
    pub tls: Option<Arc<UpstreamTls>>,
    /// Statistics, health and live connections, shared by every version of this server a
    /// reload makes (a new weight or new labels make a new `Server` with the same state).
    pub state: Arc<ServerState>,
}

/// What the gateway has seen of a server, carried across reloads.
#[derive(Debug, Default)]
pub struct ServerState {
    /// This gateway's connections to the server.
    pub active: AtomicU32,
    /// The other live gateways' connections to it, from the last cluster heartbeat (0
    /// without a `[cluster]`); balancers see `active` plus this.
    pub others_active: AtomicU32,
    pub total: AtomicU64,
    /// Exponentially weighted moving average of connect + handshake time, µs.
    pub ewma_connect_us: AtomicU32,
    /// Connect failures in a row.
    pub recent_failures: AtomicU32,
    pub health: Health,
    /// Live connections, for draining; and whether the server drains.
    pub connections: Connections,
    /// Its series on `/metrics`, registered with its first connection.
    pub metrics: OnceLock<server_metrics::ServerMetrics>,
}

impl Server {
    pub fn new(address: ServerAddress, weight: u32, labels: BTreeMap<String, String>) -> Server {
        Server::with_state(address, weight, labels, None, Arc::default())
    }

    fn with_state(
        address: ServerAddress,
        weight: u32,
        labels: BTreeMap<String, String>,
        tls: Option<Arc<UpstreamTls>>,
        state: Arc<ServerState>,
    ) -> Server {
        Server {
            address,
            weight,
            labels,
            tls,
            state,
        }
    }

    pub fn record_success(&self, connect_time: Duration) {
        let state = &self.state;
        state.recent_failures.store(0, Ordering::Relaxed);
        state.health.clear_ejection();
        let sample = connect_time.as_micros().min(u32::MAX as u128) as u32;
        let old = state.ewma_connect_us.load(Ordering::Relaxed);
        // Weight 1/8 on the new sample; the first sample sets the average.
        let new = if old == 0 { sample } else { old - old / 8 + sample / 8 };
        state.ewma_connect_us.store(new.max(1), Ordering::Relaxed);
    }

    /// The server's series on `/metrics` (see [`server_metrics`]).
    pub fn metrics(&self, registry: &crate::metrics::Registry, pool: &str) -> &server_metrics::ServerMetrics {
        self.state.metrics.get_or_init(|| {
            let name = format!("{}{}", self.address.authority, self.address.path_prefix);
            server_metrics::ServerMetrics::register(registry, pool, &name)
        })
    }

    /// This server, the `index`th of its pool, as a balancer plugin sees it now.
    pub fn candidate(&self, index: usize) -> crate::plugin::Candidate {
        let state = &self.state;
        crate::plugin::Candidate {
            server: index as u32,
            weight: self.weight,
            active: state.active.load(Ordering::Relaxed).saturating_add(state.others_active.load(Ordering::Relaxed)),
            total: state.total.load(Ordering::Relaxed),
            ewma_connect_us: state.ewma_connect_us.load(Ordering::Relaxed),
            recent_failures: state.recent_failures.load(Ordering::Relaxed),
        }
    }

    /// A failed connect; `eject_after` failures in a row eject the server for a while.
    pub fn record_failure(&self, pool: &str, eject_after: u32) {
        let failures = self.state.recent_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(backoff) = self.state.health.connect_failed(failures, eject_after, health::now_ms()) {
            tracing::warn!(%pool, server = %self.address.authority, failures, ?backoff, "server ejected");
        }
    }

    /// Whether new connections may go to this server: healthy, not ejected, not draining.
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.state.health.is_up(now_ms) && !self.state.connections.is_draining()
    }

    pub fn is_draining(&self) -> bool {
        self.state.connections.is_draining()
    }

    /// Applies an active check's result, logging changes. A server the checks find healthy
    /// again is no longer ejected either.
    pub fn apply_probe(&self, pool: &str, result: Result<(), String>, settings: &HealthSettings) {
        let server = &self.address.authority;
        match self.state.health.probe_result(result.is_ok(), settings.rise, settings.fall) {
            Some(true) => {
                self.state.recent_failures.store(0, Ordering::Relaxed);
                self.state.health.clear_ejection();
                tracing::info!(%pool, %server, "server is healthy again");
            }
            Some(false) => {
                let error = result.err().unwrap_or_default();
                tracing::warn!(%pool, %server, %error, "server failed its health checks");
            }
            None => {}
        }
    }

    /// Counts a connection as active until the guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> ActiveConnection {
        let connection = self.connecting();
        connection.established();
        connection
    }

    /// Counts a connection being opened as active already, so that a burst of new
    /// connections does not all see the same counts (least-conn, bounded-load hashing).
    /// Call [`ActiveConnection::established`] once it is open; drop the guard if it fails.
    pub fn connecting(self: &Arc<Self>) -> ActiveConnection {
        self.state.active.fetch_add(1, Ordering::Relaxed);
        ActiveConnection { server: self.clone(), registration: OnceLock::new() }
    }

    /// The server as `GET /upstreams` shows it.
    pub fn status(&self, now_ms: u64) -> ServerStatus {
        let state = &self.state;
        ServerStatus {
            address: self.address.authority.clone(),
            path_prefix: self.address.path_prefix.clone(),
            weight: self.weight,
            labels: self.labels.clone(),
            active: state.active.load(Ordering::Relaxed),
            total: state.total.load(Ordering::Relaxed),
            ewma_connect_us: state.ewma_connect_us.load(Ordering::Relaxed),
            recent_failures: state.recent_failures.load(Ordering::Relaxed),
            healthy: state.health.is_healthy(),
            ejected_for_ms: state.health.ejected_for_ms(now_ms),
            draining: state.connections.is_draining(),
            available: self.is_available(now_ms),
        }
    }
}

/// Held for a connection's life; keeps the server's active count right and, once the relay
/// asked for it, the connection's [`CloseSignal`] registered for draining.
#[derive(Debug)]
pub struct ActiveConnection {
    server: Arc<Server>,
    registration: OnceLock<(u64, CloseSignal)>,
}

impl ActiveConnection {
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The connection is open: it counts in the server's total.
    pub fn established(&self) {
        self.server.state.total.fetch_add(1, Ordering::Relaxed);
    }

    /// The signal the relay watches: closed on shutdown (with 1001) or when the server is
    /// drained or rebalanced (1012). Registered on the server on first call; closed at once
    /// if `shutdown` is already cancelled.
    pub fn close_signal(&self, shutdown: &CancellationToken) -> CloseSignal {
        let (_, signal) = self.registration.get_or_init(|| {
            let signal = CloseSignal::default();
            (self.server.state.connections.register(signal.clone(), shutdown), signal)
        });
        signal.clone()
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        if let Some((id, _)) = self.registration.get() {
            self.server.state.connections.unregister(*id);
        }
        self.server.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Versions of pools' server lists, unique in the process so a plugin's cache keyed by
/// (pool, version) can never see a stale list under a reused number.
fn next_pool_version() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A named group of servers.
pub struct Pool {
    pub name: String,
    pub servers: Vec<Arc<Server>>,
    /// The pool as balancer plugins see it; its version moves when `servers` change.
    pub plugin_view: crate::plugin::PoolInfo,
    /// The balancer plugin (name and slot); round robin when none.
    pub balancer: Option<(String, Arc<crate::plugin::PluginSlot>)>,
    pub connect_timeout: Duration,
    pub max_attempts: u32,
    /// Active health checks, when configured.
    pub health: Option<Arc<HealthSettings>>,
    /// Connect failures in a row that eject a server; 0 = never.
    pub eject_after: u32,
    /// A drain without a rate closes the server's connections spread over this long.
    pub drain_spread: Duration,
    next: AtomicUsize,
}

impl Pool {
    /// Builds a pool, reusing `Server` objects (and their statistics) from `previous`; a
    /// server entry that names a host stands for each address in `names` (see [`resolve`]).
    pub fn build(
        section: &crate::config::UpstreamSection,
        previous: Option<&Pool>,
        balancer: Option<Arc<crate::plugin::PluginSlot>>,
        names: &resolve::Names,
    ) -> Pool {
        let old: HashMap<&ServerAddress, &Arc<Server>> = previous
            .map(|p| p.servers.iter().map(|s| (&s.address, s)).collect())
            .unwrap_or_default();
        let servers = section
            .servers
            .iter()
            .flat_map(|entry| {
                let weight = entry.get_ref().weight();
                resolve::expand(entry.get_ref(), names).into_iter().map(move |(address, labels)| (address, weight, labels))
            })
            .map(|(address, weight, labels)| {
                let tls = if address.tls { section.tls_client.clone() } else { None };
                match old.get(&address) {
                    Some(s) if s.weight == weight && s.labels == labels && s.tls == tls => Arc::clone(s),
                    // Same server, new weight, labels or TLS settings: same counters, health
                    // and connections.
                    Some(s) => Arc::new(Server::with_state(address, weight, labels, tls, s.state.clone())),
                    None => Arc::new(Server::with_state(address, weight, labels, tls, Arc::default())),
                }
            })
            .collect::<Vec<_>>();
        let name = section.name.get_ref().clone();
        let unchanged = previous.is_some_and(|p| {
            p.servers.len() == servers.len() && p.servers.iter().zip(&servers).all(|(a, b)| Arc::ptr_eq(a, b))
        });
        let version = match previous {
            Some(p) if unchanged => p.plugin_view.version,
            _ => next_pool_version(),
        };
        Pool {
            plugin_view: crate::plugin::PoolInfo {
                name: name.clone(),
                version,
                servers: servers
                    .iter()
                    .map(|s| crate::plugin::ServerInfo {
                        address: s.address.authority.as_str().into(),
                        weight: s.weight,
                        labels: s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    })
                    .collect(),
                max_attempts: section.max_attempts,
            },
            name,
            servers,
            balancer: section.balancer.as_ref().map(|b| b.get_ref().clone()).zip(balancer),
            connect_timeout: Duration::from_millis(section.connect_timeout_ms),
            max_attempts: section.max_attempts,
            health: section.health.as_ref().map(|h| Arc::new(HealthSettings::from_config(h.get_ref()))),
            eject_after: section.eject_after,
            drain_spread: Duration::from_secs(section.drain_secs),
            next: AtomicUsize::new(previous.map_or(0, |p| p.next.load(Ordering::Relaxed))),
        }
    }

    /// Indexes of the servers that may get new connections now, in configured order.
    pub fn available(&self) -> ServerOrder {
        let now = health::now_ms();
        (0..self.servers.len()).filter(|&i| self.servers[i].is_available(now)).collect()
    }

    /// Why no server is available, for the client's 503.
    pub fn unavailable_reason(&self) -> String {
        let now = health::now_ms();
        let count = |f: &dyn Fn(&Server) -> bool| self.servers.iter().filter(|s| f(s)).count();
        let unhealthy = count(&|s| !s.state.health.is_healthy());
        let ejected = count(&|s| s.state.health.ejected_for_ms(now) > 0);
        let draining = count(&|s| s.is_draining());
        format!(
            "all servers of pool {} are down ({} servers: {unhealthy} failing health checks, {ejected} ejected after connect failures, {draining} draining)",
            self.name,
            self.servers.len()
        )
    }

    /// `available` (indexes into `servers`), starting from the next one in round-robin order
    /// (rotated in place: this is every plain connection's path).
    pub fn round_robin_order(&self, mut available: ServerOrder) -> ServerOrder {
        if !available.is_empty() {
            let start = self.next.fetch_add(1, Ordering::Relaxed) % available.len();
            available.rotate_left(start);
        }
        available
    }

    /// Finds a server by `host:port`, or `host:port/prefix` when several share an authority.
    pub fn find_server(&self, address: &str) -> Option<&Arc<Server>> {
        self.servers
            .iter()
            .find(|s| format!("{}{}", s.address.authority, s.address.path_prefix) == address)
            .or_else(|| self.servers.iter().find(|s| s.address.authority == address))
    }

    /// The pool as `GET /upstreams` shows it.
    pub fn status(&self) -> PoolStatus {
        let now = health::now_ms();
        PoolStatus {
            name: self.name.clone(),
            balancer: self.balancer.as_ref().map(|(name, _)| name.clone()),
            health: self.health.as_ref().map(|h| HealthStatus {
                kind: match h.kind {
                    ProbeKind::Tcp => "tcp",
                    ProbeKind::WebSocket { .. } => "websocket",
                },
                path: match &h.kind {
                    ProbeKind::Tcp => None,
                    ProbeKind::WebSocket { path } => Some(path.clone()),
                },
                interval_ms: h.interval.as_millis() as u64,
                timeout_ms: h.timeout.as_millis() as u64,
                rise: h.rise,
                fall: h.fall,
            }),
            eject_after: self.eject_after,
            drain_secs: self.drain_spread.as_secs(),
            available: self.servers.iter().filter(|s| s.is_available(now)).count(),
            servers: self.servers.iter().map(|s| s.status(now)).collect(),
        }
    }
}

/// One server in `GET /upstreams`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerStatus {
    pub address: String,
    pub path_prefix: String,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
    /// Connections open now.
    pub active: u32,
    pub total: u64,
    pub ewma_connect_us: u32,
    pub recent_failures: u32,
    /// The active checks' verdict (true when the pool has none).
    pub healthy: bool,
    /// Time left of a passive ejection, 0 when not ejected.
    pub ejected_for_ms: u64,
    pub draining: bool,
    /// Healthy, not ejected and not draining: offered to new connections.
    pub available: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthStatus {
    pub kind: &'static str,
    pub path: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

/// One pool in `GET /upstreams`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub balancer: Option<String>,
    pub health: Option<HealthStatus>,
    pub eject_after: u32,
    pub drain_secs: u64,
    /// Servers offered to new connections now.
    pub available: usize,
    pub servers: Vec<ServerStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_addresses() {
        let a = ServerAddress::parse("127.0.0.1:9001").unwrap();
        assert_eq!((a.authority.as_str(), a.path_prefix.as_str()), ("127.0.0.1:9001", ""));
        let b = ServerAddress::parse("ws://localhost:80/base/").unwrap();
        assert_eq!((b.authority.as_str(), b.path_prefix.as_str()), ("localhost:80", "/base"));
        assert!(ServerAddress::parse("localhost").is_err());
        assert!(!a.tls && !b.tls);
        let c = ServerAddress::parse("wss://backend.internal:8443/ws").unwrap();
        assert_eq!((c.authority.as_str(), c.path_prefix.as_str(), c.tls), ("backend.internal:8443", "/ws", true));
        assert_eq!(c.host(), "backend.internal");
        assert_eq!(ServerAddress::parse("wss://[::1]:443").unwrap().host(), "::1");
        assert_ne!(ServerAddress::parse("wss://x:1").unwrap(), ServerAddress::parse("ws://x:1").unwrap());
        assert!(ServerAddress::parse("wss://x").is_err());
    }

    /// A pool `p` of `servers` (a TOML array), built as a reload would from `previous`.
    pub(super) fn pool(servers: &str, previous: Option<&Pool>) -> Pool {
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nname = \"p\"\nservers = {servers}\n[[route]]\nupstream = \"p\"\n"
        );
        let config = crate::config::Config::parse(&text, "t.toml", Default::default()).unwrap();
        Pool::build(&config.upstreams[0], previous, None, &resolve::Names::none())
    }

    #[test]
    fn unavailable_servers_are_skipped_and_state_survives_reloads() {
        let p = pool(r#"["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]"#, None);
        let open = p.servers[0].connection_opened();
        assert_eq!(p.servers[1].state.health.probe_result(false, 2, 1), Some(false));
        assert_eq!(p.available()[..], [0, 2]);
        let firsts: Vec<usize> = (0..4).map(|_| p.round_robin_order(p.available())[0]).collect();
        assert_eq!(firsts, [0, 2, 0, 2], "round robin over the available servers only");
        assert_eq!(p.find_server("127.0.0.1:3").map(|s| s.address.authority.as_str()), Some("127.0.0.1:3"));

        // A new weight makes a new Server with the same state; the live guard still counts.
        let q = pool(r#"[{ address = "127.0.0.1:1", weight = 5 }, "127.0.0.1:2"]"#, Some(&p));
        assert!(Arc::ptr_eq(&q.servers[0].state, &p.servers[0].state));
        assert_eq!((q.servers[0].weight, q.servers[0].candidate(0).active), (5, 1));
        assert!(!q.servers[1].state.health.is_healthy(), "health carried over");
        drop(open);
        assert_eq!(q.servers[0].candidate(0).active, 0);

        q.servers[0].state.health.connect_failed(3, 3, health::now_ms());
        assert!(q.available().is_empty());
        let reason = q.unavailable_reason();
        assert!(reason.starts_with("all servers of pool p are down"), "{reason}");
        assert!(reason.contains("1 failing health checks, 1 ejected"), "{reason}");
    }

    #[test]
    fn the_pool_version_moves_only_when_its_servers_change() {
        let p = pool(r#"["127.0.0.1:1", "127.0.0.1:2"]"#, None);
        let same = pool(r#"["127.0.0.1:1", "127.0.0.1:2"]"#, Some(&p));
        assert_eq!(same.plugin_view.version, p.plugin_view.version);
        let reweighted = pool(r#"[{ address = "127.0.0.1:1", weight = 5 }, "127.0.0.1:2"]"#, Some(&same));
        assert_ne!(reweighted.plugin_view.version, same.plugin_view.version);
        assert_eq!(reweighted.plugin_view.servers[0].weight, 5);
        let other = pool(r#"["127.0.0.1:1", "127.0.0.1:2"]"#, None);
        assert_ne!(other.plugin_view.version, p.plugin_view.version, "versions never repeat");
        assert_eq!(&*p.plugin_view.servers[1].address, "127.0.0.1:2");
    }
}
