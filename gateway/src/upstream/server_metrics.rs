//! Per-server series on `/metrics`, labelled `pool` and `server`, so users can graph which
//! server holds how many connections and carries how much traffic. Servers come from the
//! configuration, so the label sets stay bounded; a server's series stay after it is
//! removed (the registry never drops series), like its counters' meaning.

use crate::metrics::{Counter, Gauge, Histogram, Registry};
use crate::relay::TrafficCounters;

/// Upper bounds (seconds) for the time to open a connection: local backends answer in
/// tens of microseconds, remote ones in milliseconds, a struggling one in seconds.
pub const CONNECT_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

#[derive(Debug, Clone)]
pub struct ServerMetrics {
    /// Connections relayed to the server since the gateway started.
    pub connections_total: Counter,
    /// Connections relayed to it now.
    pub connections_active: Gauge,
    /// TCP connect plus the upstream WebSocket handshake, successful ones.
    pub connect_seconds: Histogram,
    pub traffic: TrafficCounters,
}

impl ServerMetrics {
    pub fn register(r: &Registry, pool: &str, server: &str) -> ServerMetrics {
        let labels = [("pool", pool), ("server", server)];
        ServerMetrics {
            connections_total: r.counter(
                "wasmgate_upstream_connections_total",
                "Connections relayed to each upstream server",
                &labels,
            ),
            connections_active: r.gauge("wasmgate_upstream_connections_active", "Connections relayed to each upstream server now", &labels),
            connect_seconds: r.histogram(
                "wasmgate_upstream_connect_seconds",
                "Time to open an upstream WebSocket (TCP connect and handshake), successful attempts",
                &labels,
                CONNECT_BUCKETS,
            ),
            traffic: TrafficCounters::register(r, "upstream_", &labels),
        }
    }
}
