//! What the dashboard shows, taken at one instant: totals since start, which the page turns
//! into rates by comparing two snapshots. Counters are read from the same series `/metrics`
//! renders, so the two always agree.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::gateway::Shared;
use crate::plugin::Hooks;
use crate::upstream::{HealthStatus, ServerStatus};

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub time_ms: u64,
    pub gateway: Totals,
    pub pools: Vec<PoolView>,
    pub plugins: Vec<PluginView>,
    pub routes: Vec<RouteView>,
}

#[derive(Debug, Serialize)]
pub struct Totals {
    pub connections_active: u64,
    pub connections_total: u64,
    pub handshakes_refused: u64,
    pub messages_from_client: u64,
    pub messages_from_upstream: u64,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
}

#[derive(Debug, Serialize)]
pub struct PoolView {
    pub name: String,
    pub balancer: Option<String>,
    pub health: Option<HealthStatus>,
    pub available: usize,
    pub servers: Vec<ServerView>,
}

#[derive(Debug, Serialize)]
pub struct ServerView {
    /// `host:port` plus the path prefix: what `/upstreams/{pool}/servers/{key}/drain` takes.
    pub key: String,
    #[serde(flatten)]
    pub status: ServerStatus,
    /// Connections relayed now (`active` also counts those still connecting).
    pub relayed_now: u64,
    pub messages_from_client: u64,
    pub messages_from_upstream: u64,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
}

#[derive(Debug, Serialize)]
pub struct PluginView {
    pub name: String,
    pub hooks: Hooks,
    /// Calls by hook.
    pub calls: BTreeMap<&'static str, u64>,
    /// Failed calls by why.
    pub errors: BTreeMap<&'static str, u64>,
    /// Call-time histogram: upper bounds (seconds) and per-hook bucket counts.
    pub call_time_bounds: Vec<f64>,
    pub call_time_counts: BTreeMap<&'static str, Vec<u64>>,
    pub idle_instances: usize,
    pub instance_failures: u32,
}

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub host: Option<String>,
    pub path: String,
    pub upstream: String,
    pub plugins: Vec<String>,
}

const HOOKS: [&str; 4] = ["handshake", "select", "message", "close"];
const ERROR_KINDS: [&str; 5] = ["trap", "timeout", "memory", "unavailable", "invalid"];

pub fn take(shared: &Shared) -> Snapshot {
    let m = &shared.metrics;
    let gateway = Totals {
        connections_active: m.connections_active.get().max(0.0) as u64,
        connections_total: m.connections_total.get(),
        handshakes_refused: m.handshakes_refused.get(),
        messages_from_client: m.traffic.messages_from_client.get(),
        messages_from_upstream: m.traffic.messages_from_upstream.get(),
        bytes_from_client: m.traffic.bytes_from_client.get(),
        bytes_from_upstream: m.traffic.bytes_from_upstream.get(),
    };
    let routing = shared.routing.load();
    let now = crate::upstream::health::now_ms();
    let mut pools: Vec<PoolView> = routing
        .pools
        .values()
        .map(|pool| {
            let status = pool.status();
            let servers = pool
                .servers
                .iter()
                .map(|server| {
                    let metrics = server.state.metrics.get();
                    let count = |f: fn(&crate::upstream::server_metrics::ServerMetrics) -> u64| metrics.map_or(0, f);
                    ServerView {
                        key: format!("{}{}", server.address.authority, server.address.path_prefix),
                        status: server.status(now),
                        relayed_now: count(|m| m.connections_active.get().max(0.0) as u64),
                        messages_from_client: count(|m| m.traffic.messages_from_client.get()),
                        messages_from_upstream: count(|m| m.traffic.messages_from_upstream.get()),
                        bytes_from_client: count(|m| m.traffic.bytes_from_client.get()),
                        bytes_from_upstream: count(|m| m.traffic.bytes_from_upstream.get()),
                    }
                })
                .collect();
            PoolView { name: status.name, balancer: status.balancer, health: status.health, available: status.available, servers }
        })
        .collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));

    let registry = &shared.metrics_registry;
    let plugins = shared
        .plugins
        .list()
        .into_iter()
        .map(|info| {
            let name = info.name.as_str();
            let calls = HOOKS
                .iter()
                .map(|&hook| (hook, registry.counter("wasmgate_plugins_calls_total", "", &[("plugin", name), ("hook", hook)]).get()))
                .collect();
            let errors = ERROR_KINDS
                .iter()
                .map(|&kind| (kind, registry.counter("wasmgate_plugins_errors_total", "", &[("plugin", name), ("kind", kind)]).get()))
                .collect();
            let mut bounds = Vec::new();
            let call_time_counts = HOOKS
                .iter()
                .map(|&hook| {
                    let histogram = registry.histogram(
                        "wasmgate_plugin_call_seconds",
                        "",
                        &[("plugin", name), ("hook", hook)],
                        crate::plugin::CALL_BUCKETS,
                    );
                    let (b, counts) = histogram.buckets();
                    bounds = b.to_vec();
                    (hook, counts)
                })
                .collect();
            PluginView {
                name: info.name.clone(),
                hooks: info.hooks,
                calls,
                errors,
                call_time_bounds: bounds,
                call_time_counts,
                idle_instances: info.idle_instances,
                instance_failures: info.instance_failures,
            }
        })
        .collect();

    let config = shared.config.load();
    let routes = config
        .routes
        .iter()
        .map(|r| RouteView {
            host: r.host.as_ref().map(|h| h.get_ref().clone()),
            path: r.path.get_ref().clone(),
            upstream: r.upstream.get_ref().clone(),
            plugins: r.plugins.iter().map(|p| p.get_ref().clone()).collect(),
        })
        .collect();
    let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    Snapshot { time_ms, gateway, pools, plugins, routes }
}
