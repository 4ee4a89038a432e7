//! Upstream pools: the servers behind a name, their live statistics, and the default
//! (round robin) order in which to try them.
//!
//! Statistics live in `Arc<Server>` objects that a config reload carries over for servers
//! that stay, so least-connection counts and latency averages survive reloads.

mod connect;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use connect::{open, ConnectError, UpstreamRequest, UpstreamSocket};

/// Where a server is: host, port and a path prefix for the upstream request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddress {
    /// `host:port`, as used for connecting and for messages.
    pub authority: String,
    /// Path prefix put before the client's path ("" for none).
    pub path_prefix: String,
}

impl ServerAddress {
    /// Accepts `host:port` or `ws://host:port[/path]`.
    pub fn parse(s: &str) -> Result<ServerAddress, String> {
        if s.starts_with("wss://") {
            return Err(format!("{s}: wss:// upstreams are not supported yet; use ws://"));
        }
        let rest = s.strip_prefix("ws://").unwrap_or(s);
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let port = authority
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()))
            .filter(|(host, port)| !host.is_empty() && port.is_ok());
        if port.is_none() {
            return Err(format!("{s}: expected host:port or ws://host:port/path"));
        }
        Ok(ServerAddress {
            authority: authority.to_string(),
            path_prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// One upstream server and what the gateway has seen of it.
#[derive(Debug)]
pub struct Server {
    pub address: ServerAddress,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
    /// The address and labels as balancer plugins get them, shared rather than copied per call.
    plugin_address: Arc<str>,
    plugin_labels: Arc<[(String, String)]>,
    pub active: AtomicU32,
    pub total: AtomicU64,
    /// Exponentially weighted moving average of connect + handshake time, µs.
    pub ewma_connect_us: AtomicU32,
    /// Connect failures in a row.
    pub recent_failures: AtomicU32,
}

impl Server {
    pub fn new(address: ServerAddress, weight: u32, labels: BTreeMap<String, String>) -> Server {
        Server {
            plugin_address: Arc::from(address.authority.as_str()),
            plugin_labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            address,
            weight,
            labels,
            active: AtomicU32::new(0),
            total: AtomicU64::new(0),
            ewma_connect_us: AtomicU32::new(0),
            recent_failures: AtomicU32::new(0),
        }
    }

    pub fn record_success(&self, connect_time: Duration) {
        self.recent_failures.store(0, Ordering::Relaxed);
        let sample = connect_time.as_micros().min(u32::MAX as u128) as u32;
        let old = self.ewma_connect_us.load(Ordering::Relaxed);
        // Weight 1/8 on the new sample; the first sample sets the average.
        let new = if old == 0 { sample } else { old - old / 8 + sample / 8 };
        self.ewma_connect_us.store(new.max(1), Ordering::Relaxed);
    }

    /// This server as a balancer plugin sees it, with its live statistics.
    pub fn candidate(&self) -> crate::plugin::Candidate {
        crate::plugin::Candidate {
            address: self.plugin_address.clone(),
            weight: self.weight,
            labels: self.plugin_labels.clone(),
            active: self.active.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            ewma_connect_us: self.ewma_connect_us.load(Ordering::Relaxed),
            recent_failures: self.recent_failures.load(Ordering::Relaxed),
        }
    }

    pub fn record_failure(&self) {
        self.recent_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection as active until the guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> ActiveConnection {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        ActiveConnection(self.clone())
    }
}

/// Held for a connection's life; keeps the server's active count right.
#[derive(Debug)]
pub struct ActiveConnection(pub Arc<Server>);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A named group of servers.
pub struct Pool {
    pub name: String,
    pub servers: Vec<Arc<Server>>,
    /// The balancer plugin (name and slot); round robin when none.
    pub balancer: Option<(String, Arc<crate::plugin::PluginSlot>)>,
    pub connect_timeout: Duration,
    pub max_attempts: u32,
    next: AtomicUsize,
}

impl Pool {
    /// Builds a pool, reusing `Server` objects (and their statistics) from `previous`.
    pub fn build(
        section: &crate::config::UpstreamSection,
        previous: Option<&Pool>,
        balancer: Option<Arc<crate::plugin::PluginSlot>>,
    ) -> Pool {
        let old: HashMap<&ServerAddress, &Arc<Server>> = previous
            .map(|p| p.servers.iter().map(|s| (&s.address, s)).collect())
            .unwrap_or_default();
        let servers = section
            .servers
            .iter()
            .map(|entry| {
                let entry = entry.get_ref();
                let address = ServerAddress::parse(entry.address()).expect("validated");
                match old.get(&address) {
                    Some(s) if s.weight == entry.weight() && s.labels == entry.labels() => Arc::clone(s),
                    Some(s) => {
                        // Same server, new weight or labels: keep its counters.
                        let fresh = Server::new(address, entry.weight(), entry.labels());
                        fresh.active.store(s.active.load(Ordering::Relaxed), Ordering::Relaxed);
                        fresh.total.store(s.total.load(Ordering::Relaxed), Ordering::Relaxed);
                        Arc::new(fresh)
                    }
                    None => Arc::new(Server::new(address, entry.weight(), entry.labels())),
                }
            })
            .collect();
        Pool {
            name: section.name.get_ref().clone(),
            servers,
            balancer: section.balancer.as_ref().map(|b| b.get_ref().clone()).zip(balancer),
            connect_timeout: Duration::from_millis(section.connect_timeout_ms),
            max_attempts: section.max_attempts,
            next: AtomicUsize::new(previous.map_or(0, |p| p.next.load(Ordering::Relaxed))),
        }
    }

    /// All servers, starting from the next one in round-robin order.
    pub fn round_robin_order(&self) -> Vec<usize> {
        let n = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(|i| (start + i) % n).collect()
    }
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
        assert!(ServerAddress::parse("wss://x:1").is_err());
    }
}
