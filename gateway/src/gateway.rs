//! The gateway as a library: start it from a `Config`, get a handle with the bound addresses,
//! reload it, shut it down.
//!
//! Everything a configuration decides lives in one immutable `Routing` value behind an
//! `ArcSwap`: a connection loads it once at its handshake, and a reload swaps in a new one
//! without touching live connections. Plugins live in a `PluginRegistry` whose slots survive
//! reloads, so a live connection's next hook call reaches the new version of its plugins.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::limits::Admission;
use crate::metrics::{Counter, Gauge, Registry};
use crate::plugin::{
    Compression, CompressionMode, OnError, PluginRegistry, PluginRuntime, PluginSlot, PluginSpec, ReloadReport, RuntimeOptions,
    StagedPlugins,
};
use crate::relay::RelaySettings;
use crate::resources::ResourceErrors;
use crate::routes::RouteTable;
use crate::upstream::Pool;

/// What one configuration decides, ready for the hot path.
#[derive(Clone)]
pub struct Routing {
    pub routes: RouteTable,
    pub pools: HashMap<String, Arc<Pool>>,
    pub relay: RelaySettings,
    pub handshake_timeout: Duration,
    /// permessage-deflate when no plugin decides.
    pub compression: Compression,
    /// Peers whose forwarding headers and PROXY protocol headers are believed.
    pub trusted_proxies: crate::forwarding::TrustedProxies,
    /// Every client connection opens with a PROXY protocol header.
    pub proxy_protocol: bool,
}

impl Routing {
    /// Builds routing from a validated config on staged plugins, carrying server statistics
    /// over from `previous` (without changing them). Fails when a referenced plugin is not
    /// loaded.
    pub fn build(
        config: &Config,
        previous: Option<&Routing>,
        plugins: &StagedPlugins,
        names: &crate::upstream::resolve::Names,
    ) -> Result<Routing, String> {
        let slot = |name: &str| -> Result<Arc<PluginSlot>, String> {
            plugins.get(name).ok_or_else(|| format!("plugin `{name}` is not loaded"))
        };
        let g = &config.gateway;
        let mut pools = HashMap::new();
        for u in &config.upstreams {
            let old = previous.and_then(|p| p.pools.get(u.name.get_ref())).map(|p| p.as_ref());
            let balancer = u.balancer.as_ref().map(|b| slot(b.get_ref())).transpose()?;
            pools.insert(u.name.get_ref().clone(), Arc::new(Pool::build(u, old, balancer, names)));
        }
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Ok(Routing {
            routes: RouteTable::build(&config.routes, slot)?,
            pools,
            relay: RelaySettings {
                max_message_size: g.max_message_size,
                ping_interval: secs(g.ping_interval_secs),
                pong_timeout: Duration::from_secs(g.pong_timeout_secs.max(1)),
                idle_timeout: secs(g.idle_timeout_secs),
                close_timeout: g.close_timeout(),
                close_upstream_on_client_loss: g.on_client_loss.get_ref() == "close",
                message_assembly_timeout: secs(g.message_assembly_timeout_secs),
            },
            handshake_timeout: g.handshake_timeout(),
            compression: Compression {
                mode: match g.compression.get_ref().as_str() {
                    "off" => CompressionMode::Off,
                    "terminate" => CompressionMode::Terminate,
                    _ => CompressionMode::Passthrough,
                },
                max_window_bits: g.compression_window_bits,
                no_context_takeover: g.compression_no_context_takeover,
            },
            trusted_proxies: g.trusted_proxies(),
            proxy_protocol: g.proxy_protocol(),
        })
    }
}

/// The gateway's own counters on the admin `/metrics` page.
pub struct GatewayMetrics {
    pub connections_active: Gauge,
    pub connections_total: Counter,
    pub handshakes_refused: Counter,
    pub upstream_connect_failures: Counter,
    /// Messages and payload bytes each way, published by relays while they run.
    pub traffic: crate::relay::TrafficCounters,
    /// From a whole request to the 101 or the refusal written: plugins, balancing and the
    /// upstream connect (the client's own pace of sending its request is not counted).
    pub handshake_accepted_seconds: crate::metrics::Histogram,
    pub handshake_refused_seconds: crate::metrics::Histogram,
    pub plugin_errors: Counter,
    pub reloads: Counter,
    pub reload_failures: Counter,
}

impl GatewayMetrics {
    fn new(r: &Registry) -> GatewayMetrics {
        let none: &[(&str, &str)] = &[];
        GatewayMetrics {
            connections_active: r.gauge("wasmgate_connections_active", "Proxied connections open now", none),
            connections_total: r.counter("wasmgate_connections_total", "Proxied connections opened", none),
            handshakes_refused: r.counter("wasmgate_handshakes_refused_total", "Upgrade requests answered with an error status", none),
            upstream_connect_failures: r.counter("wasmgate_upstream_connect_failures_total", "Failed upstream connection attempts", none),
            traffic: crate::relay::TrafficCounters::register(r, "", none),
            handshake_accepted_seconds: handshake_seconds(r, "accepted"),
            handshake_refused_seconds: handshake_seconds(r, "refused"),
            plugin_errors: r.counter("wasmgate_plugin_call_failures_total", "Hook calls that trapped, timed out or broke the contract", none),
            reloads: r.counter("wasmgate_reloads_total", "Configuration reloads applied", none),
            reload_failures: r.counter("wasmgate_reload_failures_total", "Configuration reloads rejected or partly failed", none),
        }
    }
}

fn handshake_seconds(r: &Registry, result: &str) -> crate::metrics::Histogram {
    r.histogram(
        "wasmgate_handshake_seconds",
        "From a client's whole upgrade request to the gateway's answer (plugins, balancing, upstream connect)",
        &[("result", result)],
        crate::upstream::server_metrics::CONNECT_BUCKETS,
    )
}

/// State shared by the listener, every connection and the admin API.
pub struct Shared {
    pub routing: ArcSwap<Routing>,
    pub config: ArcSwap<Config>,
    pub plugins: Arc<PluginRegistry>,
    pub metrics_registry: Arc<Registry>,
    pub metrics: GatewayMetrics,
    /// Client sockets held, against `max_connections`, `max_connections_per_ip` and
    /// `max_handshakes`.
    pub admission: Arc<Admission>,
    /// The gateway's own shortages (descriptors, ports), counted and logged.
    pub resources: Arc<ResourceErrors>,
    /// Cancelled on shutdown: the listener stops and relays close with 1001.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// One line per connection when it ends, when `access_log` is on.
    pub access_log: Option<crate::access_log::AccessLog>,
    /// The `wss://` listener's certificates, when there is one.
    pub tls: Option<Arc<crate::tls::Terminator>>,
    next_connection_id: AtomicU64,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// Per pool with health checks, the token that stops its check task (a child of
    /// `shutdown`, cancelled when the pool or its checks go away on reload).
    pool_tasks: std::sync::Mutex<HashMap<String, CancellationToken>>,
    /// Servers a reload removed while they still had connections: drained, listed by
    /// `GET /upstreams` until their last connection closes.
    retired: std::sync::Mutex<Vec<(String, Arc<crate::upstream::Server>)>>,
    /// Accepting, handing the listeners over, retiring (see [`crate::upgrade`]).
    pub upgrade: crate::upgrade::Upgrade,
    /// The last good addresses of upstream server names.
    pub names: crate::upstream::resolve::Names,
    /// Redis and the other instances, with a `[cluster]`; fixed at start.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Shared {
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Servers a reload removed that still have connections.
    pub fn retired_servers(&self) -> Vec<Arc<crate::upstream::Server>> {
        self.retired.lock().unwrap().iter().map(|(_, s)| s.clone()).collect()
    }

    /// Every relayed connection not yet asked to close, over all pools and removed servers.
    pub fn open_connections(&self) -> Vec<crate::upstream::CloseSignal> {
        let routing = self.routing.load();
        let servers = routing.pools.values().flat_map(|p| p.servers.iter().cloned()).chain(self.retired_servers());
        servers.flat_map(|s| s.state.connections.open_signals()).collect()
    }

    /// Shutdown's part in closing connections: cancels `shutdown` (the background tasks stop,
    /// and a connection that registers from now on is closed as it registers), then asks
    /// every open connection to close with 1001.
    pub fn close_connections(&self) {
        self.shutdown.cancel();
        for signal in self.open_connections() {
            signal.close(crate::upstream::drain::GOING_AWAY);
        }
    }

    /// Applies `config` as one transaction: changed plugins are compiled and initialised and
    /// routing is built on them, then all of it is swapped in at once. Plugins that fail keep
    /// their previous version; if a plugin the config needs has no version at all, the whole
    /// config is refused and nothing changes, plugin versions and their config included.
    pub async fn reload(self: &Arc<Self>, config: Config) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.reloading.lock().await;
        let old = self.config.load();
        if old.gateway.listen_addr() != config.gateway.listen_addr() || old.gateway.tls_listen_addr() != config.gateway.tls_listen_addr() {
            tracing::warn!("listen addresses change only on restart; keeping the old ones");
        }
        if crate::access_log::configured(&old) != crate::access_log::configured(&config) {
            tracing::warn!("access_log and log_format change only on restart; keeping the old ones");
        }
        if old.gateway.admin.as_ref().map(|a| a.get_ref()) != config.gateway.admin.as_ref().map(|a| a.get_ref()) {
            tracing::warn!("the admin address changes only on restart; keeping the old one");
        }
        if old.cluster.as_ref().map(|c| format!("{c:?}")) != config.cluster.as_ref().map(|c| format!("{c:?}")) {
            tracing::warn!("[cluster] changes only on restart; keeping the old one");
        }
        let staged = self.stage_plugins(&config).await;
        self.names.resolve_missing(&config).await;
        let previous = self.routing.load_full();
        let refused = |e: String, staged: &StagedPlugins| {
            self.metrics.reload_failures.inc();
            format!("reload refused, the running configuration stays: {e}; {}", failures(staged.report()))
        };
        let routing = match Routing::build(&config, Some(&previous), &staged, &self.names) {
            Ok(routing) => Arc::new(routing),
            Err(e) => return Err(refused(e, &staged)),
        };
        // Certificates were read and checked with the config; a client CA that makes no
        // verifier is the last thing that can refuse the reload.
        let tls = match (&self.tls, config.gateway.tls.as_ref().and_then(|t| t.loaded.as_ref())) {
            (Some(terminator), Some(loaded)) => match terminator.stage(loaded) {
                Ok(staged_tls) => Some((terminator, staged_tls)),
                Err(e) => return Err(refused(e, &staged)),
            },
            _ => None,
        };
        // Plugins, routing and config go in together. (A commit is refused only when another
        // came in between, which the reload lock rules out.)
        let report = self.plugins.commit(staged)?;
        if let Some((terminator, staged_tls)) = tls {
            terminator.commit(staged_tls);
        }
        self.routing.store(routing.clone());
        self.config.store(Arc::new(config));
        self.retire_removed_servers(&previous, &routing);
        self.sync_pool_tasks();
        self.metrics.reloads.inc();
        if report.is_ok() {
            tracing::info!("configuration reloaded");
        } else {
            self.metrics.reload_failures.inc();
            tracing::error!("configuration reloaded; previous versions keep serving for: {}", failures(&report));
        }
        Ok(report)
    }

    /// New answers for upstream server names: the pools are rebuilt on the running
    /// configuration; servers that appeared join, those that went are drained.
    pub async fn apply_resolved(self: &Arc<Self>) {
        let _one_at_a_time = self.reloading.lock().await;
        let config = self.config.load_full();
        let previous = self.routing.load_full();
        let mut routing = (*previous).clone();
        for u in &config.upstreams {
            let name = u.name.get_ref();
            let Some(old) = previous.pools.get(name) else { continue };
            let balancer = old.balancer.as_ref().map(|(_, slot)| slot.clone());
            routing.pools.insert(name.clone(), Arc::new(Pool::build(u, Some(old), balancer, &self.names)));
        }
        let routing = Arc::new(routing);
        self.routing.store(routing.clone());
        self.retire_removed_servers(&previous, &routing);
        self.sync_pool_tasks();
    }

    /// Re-reads the configuration file the gateway was started from and reloads it.
    pub async fn reload_from_source(self: &Arc<Self>) -> Result<ReloadReport, String> {
        let source = self.config.load().source.clone().ok_or("the configuration did not come from a file")?;
        let config = Config::load(&source).map_err(|e| e.to_string())?;
        self.reload(config).await
    }

    /// Starts health-check tasks for pools that have checks and none running; stops those of
    /// pools that are gone or lost their checks. A task reads its pool afresh each round.
    fn sync_pool_tasks(self: &Arc<Self>) {
        let routing = self.routing.load();
        let mut tasks = self.pool_tasks.lock().unwrap();
        tasks.retain(|name, stop| {
            let keep = !stop.is_cancelled() && routing.pools.get(name).is_some_and(|p| p.health.is_some());
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (name, pool) in &routing.pools {
            if pool.health.is_none() || tasks.contains_key(name) {
                continue;
            }
            let stop = self.shutdown.child_token();
            tasks.insert(name.clone(), stop.clone());
            let shared = Arc::downgrade(self);
            let pool_name = name.clone();
            let current = move || shared.upgrade()?.routing.load().pools.get(&pool_name).cloned();
            let resources = self.resources.clone();
            tokio::spawn(crate::upstream::health::run_checks(name.clone(), current, resources, stop));
        }
    }

    /// Drains the servers `previous` had and `current` no longer has (per pool), at their
    /// pool's `drain_secs` pace.
    fn retire_removed_servers(&self, previous: &Routing, current: &Routing) {
        let mut retired = self.retired.lock().unwrap();
        retired.retain(|(_, server)| server.state.active.load(Ordering::Relaxed) > 0);
        for (name, pool) in &previous.pools {
            let kept = current.pools.get(name);
            for server in &pool.servers {
                if kept.is_some_and(|p| p.servers.iter().any(|s| s.address == server.address)) {
                    continue;
                }
                let pace = crate::upstream::DrainPace { rate: None, spread: pool.drain_spread };
                let closing = self.start_drain(name, server.clone(), pace, false, "removed");
                tracing::info!(pool = %name, server = %server.address.authority, ?closing, "server removed; draining");
                if server.state.active.load(Ordering::Relaxed) > 0 {
                    retired.push((name.clone(), server.clone()));
                }
            }
        }
    }

    /// Starts draining `server` (see [`crate::upstream::drain`]); `cause` labels the metric.
    /// Returns how many connections it will close, or None when it drains already.
    fn start_drain(
        &self,
        pool: &str,
        server: Arc<crate::upstream::Server>,
        pace: crate::upstream::DrainPace,
        migrate: bool,
        cause: &str,
    ) -> Option<usize> {
        let moved = self.drained_counter(pool, cause);
        crate::upstream::drain::start_drain(server, pace, migrate, moved, self.shutdown.child_token())
    }

    fn drained_counter(&self, pool: &str, cause: &str) -> Counter {
        self.metrics_registry.counter(
            "wasmgate_upstream_drained_connections_total",
            "Connections closed with 1012 to move them off a server (drain, removal, rebalance)",
            &[("pool", pool), ("cause", cause)],
        )
    }

    /// `POST /upstreams/{pool}/servers/{addr}/drain`: stop new connections to the server and
    /// close its connections with 1012 at `rate` per second (default: spread over the pool's
    /// `drain_secs`).
    /// With `migrate`, connections whose route keeps session state move to another server.
    pub fn drain_server(
        &self,
        pool: &str,
        address: &str,
        rate: Option<f64>,
        migrate: bool,
    ) -> Result<serde_json::Value, AdminError> {
        let routing = self.routing.load();
        let pool = routing.pools.get(pool).ok_or_else(|| AdminError::NotFound(format!("no upstream {pool}")))?;
        let server = pool
            .find_server(address)
            .ok_or_else(|| AdminError::NotFound(format!("upstream {} has no server {address}", pool.name)))?;
        let pace = crate::upstream::DrainPace { rate, spread: pool.drain_spread };
        let closing = self
            .start_drain(&pool.name, server.clone(), pace, migrate, "drain")
            .ok_or_else(|| AdminError::Conflict(format!("{address} of {} is draining already", pool.name)))?;
        tracing::info!(pool = %pool.name, server = %address, closing, ?rate, "draining");
        Ok(serde_json::json!({
            "pool": pool.name,
            "server": server.address.authority,
            "closing": closing,
            "rate": rate,
            "spread_secs": pool.drain_spread.as_secs(),
            "mode": if migrate { "migrate" } else { "close" },
        }))
    }

    /// `POST /upstreams/{pool}/servers/{addr}/undrain`: the server takes new connections again.
    pub fn undrain_server(&self, pool: &str, address: &str) -> Result<serde_json::Value, AdminError> {
        let routing = self.routing.load();
        let pool = routing.pools.get(pool).ok_or_else(|| AdminError::NotFound(format!("no upstream {pool}")))?;
        let server = pool
            .find_server(address)
            .ok_or_else(|| AdminError::NotFound(format!("upstream {} has no server {address}", pool.name)))?;
        server.state.connections.undrain();
        Ok(serde_json::json!({ "pool": pool.name, "server": server.address.authority, "draining": false }))
    }

    /// `POST /upstreams/{pool}/rebalance`: after servers were added, move connections off the
    /// most loaded servers, `rate` per second, until max/min load ≤ `target`. Runs in the
    /// background; each move counts in `wasmgate_upstream_drained_connections_total`.
    /// With `migrate`, connections whose route keeps session state move instead of closing.
    pub fn rebalance(&self, pool: &str, rate: f64, target: f64, migrate: bool) -> Result<serde_json::Value, AdminError> {
        let valid = rate > 0.0 && rate.is_finite() && target >= 1.0 && target.is_finite();
        if !valid {
            return Err(AdminError::BadRequest("rate must be above 0 and target at least 1".into()));
        }
        let routing = self.routing.load();
        let pool = routing.pools.get(pool).ok_or_else(|| AdminError::NotFound(format!("no upstream {pool}")))?.clone();
        let open: u64 = pool.servers.iter().map(|s| s.state.connections.open() as u64).sum();
        let moved = self.drained_counter(&pool.name, "rebalance");
        let name = pool.name.clone();
        let stop = self.shutdown.child_token();
        tokio::spawn(async move {
            let pool_name = pool.name.clone();
            let report = crate::upstream::drain::rebalance(pool, rate, target, open, migrate, moved, stop).await;
            tracing::info!(pool = %pool_name, moved = report.moved, ratio = report.final_ratio, "rebalance finished");
        });
        let mode = if migrate { "migrate" } else { "close" };
        Ok(serde_json::json!({ "pool": name, "rate": rate, "target": target, "open_connections": open, "mode": mode }))
    }

    /// `GET /upstreams`: every pool with its servers' load, health and draining state, and
    /// removed servers that still have connections.
    pub fn upstreams_status(&self) -> serde_json::Value {
        let routing = self.routing.load();
        let mut pools: Vec<_> = routing.pools.values().map(|p| p.status()).collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        let now = crate::upstream::health::now_ms();
        let removed: Vec<_> = self
            .retired
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| s.state.active.load(Ordering::Relaxed) > 0)
            .map(|(pool, s)| serde_json::json!({ "pool": pool, "server": s.status(now) }))
            .collect();
        serde_json::json!({ "pools": pools, "removed": removed })
    }

    async fn stage_plugins(&self, config: &Config) -> StagedPlugins {
        let specs = plugin_specs(config);
        let plugins = self.plugins.clone();
        tokio::task::spawn_blocking(move || plugins.stage(&specs)).await.expect("staging does not panic")
    }
}

/// Why an admin action on upstreams was refused.
#[derive(Debug)]
pub enum AdminError {
    NotFound(String),
    Conflict(String),
    BadRequest(String),
}

fn failures(report: &ReloadReport) -> String {
    let list: Vec<String> = report.failures().map(|(name, error)| format!("{name}: {error}")).collect();
    list.join("; ")
}

/// What the plugin runtime needs to know of each `[[plugin]]`.
fn plugin_specs(config: &Config) -> Vec<PluginSpec> {
    config
        .plugins
        .iter()
        .map(|p| {
            let mut spec = PluginSpec::new(p.name.get_ref().clone(), p.wasm_path(&config.base_dir));
            spec.config_json = p.config_json.clone();
            spec.on_error = p.on_error.as_ref().map(|e| match e.get_ref().as_str() {
                "allow" => OnError::Allow,
                _ => OnError::Deny,
            });
            spec.handshake_timeout = Duration::from_millis(p.timeout_ms.max(1));
            spec.message_timeout = Duration::from_millis(p.message_timeout_ms.max(1));
            spec.memory_limit = (p.memory_limit_mb as usize) << 20;
            spec.max_instances = p.instances.max(1);
            spec.max_metric_series = p.max_metric_series;
            spec.kv_max_keys = p.kv_max_keys;
            spec.kv_max_bytes = p.kv_max_bytes;
            spec.verdict_cache_size = p.verdict_cache_size;
            spec.verdict_cache_max_bytes = p.verdict_cache_max_bytes;
            spec.verdict_cache_max_ttl = Duration::from_millis(p.verdict_cache_max_ttl_ms);
            spec.kv_unavailable = p.kv_unavailable.as_ref().map_or_else(Default::default, |m| {
                crate::cluster::KvUnavailable::parse(m.get_ref()).expect("validated")
            });
            spec
        })
        .collect()
}

/// Where compiled plugins are cached: the config's `plugin_cache`, else the user's cache dir.
fn cache_dir(config: &Config) -> Option<PathBuf> {
    if let Some(dir) = &config.gateway.plugin_cache {
        return Some(config.base_dir.join(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wasmgate"))
}

/// Loads every plugin of `config` as `run` would (compile or read the compile cache,
/// instantiate, `init` with its config) and checks the routing built on them, without
/// binding anything. Returns how many plugins loaded.
pub fn check_plugins(config: &Config) -> anyhow::Result<usize> {
    let options = RuntimeOptions { cache_dir: cache_dir(config), ..RuntimeOptions::default() };
    let plugins = PluginRegistry::new(PluginRuntime::new(options, Arc::new(Registry::new()))?);
    let specs = plugin_specs(config);
    let staged = plugins.stage(&specs);
    if !staged.report().is_ok() {
        anyhow::bail!("plugins failed to load: {}", failures(staged.report()));
    }
    Routing::build(config, None, &staged, &crate::upstream::resolve::Names::none()).map_err(anyhow::Error::msg)?;
    Ok(specs.len())
}

/// A running gateway.
pub struct Gateway {
    /// The plain `ws://` listener's address; the `wss://` one's when there is no plain one.
    pub listen_addr: SocketAddr,
    /// The `wss://` listener's address.
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    _watch: Option<crate::plugin::WatchGuard>,
}

impl Gateway {
    /// Loads the plugins, binds the listener (and admin address) and starts serving. Fails
    /// when an address is taken or a plugin does not load.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        if let Some(admin) = config.gateway.admin_addr().filter(|a| !a.ip().is_loopback()) {
            // Config::parse refuses this; a Config made by other means must not slip by.
            if config.gateway.admin_secret.is_none() {
                anyhow::bail!("the admin address {admin} is not loopback and there is no admin_token");
            }
        }
        let metrics_registry = Arc::new(Registry::new());
        let cluster = match &config.cluster {
            Some(section) => Some(Arc::new(crate::cluster::Cluster::start(section, config.gateway.client_listen(), &metrics_registry)?)),
            None => None,
        };
        let options = RuntimeOptions {
            cache_dir: cache_dir(&config),
            shared_kv: cluster.as_ref().map(|c| c.kv.clone()),
            ..RuntimeOptions::default()
        };
        let runtime = PluginRuntime::new(options, metrics_registry.clone())?;
        let plugins = Arc::new(PluginRegistry::new(runtime));
        let specs = plugin_specs(&config);
        let loading = plugins.clone();
        let staged = tokio::task::spawn_blocking(move || loading.stage(&specs)).await?;
        if !staged.report().is_ok() {
            anyhow::bail!("plugins failed to load: {}", failures(staged.report()));
        }
        let names = crate::upstream::resolve::Names::new(&config.gateway);
        names.resolve_missing(&config).await;
        let routing = Routing::build(&config, None, &staged, &names).map_err(anyhow::Error::msg)?;
        plugins.commit(staged).map_err(anyhow::Error::msg)?;

        // SO_REUSEPORT, or the sockets of the gateway this one takes over from.
        let crate::upgrade::Bound { sockets, predecessor, offered } = crate::upgrade::bind(&config).await?;
        let crate::upgrade::handover::Sockets { listen: listener, tls: tls_listener, admin: admin_listener } = sockets;
        let tls = match (config.gateway.tls.as_ref(), tls_listener) {
            (Some(section), Some(tls_listener)) => {
                let loaded = section.loaded.as_ref().ok_or_else(|| anyhow::anyhow!("[gateway.tls] was not validated"))?;
                let terminator = crate::tls::Terminator::new(loaded).map_err(anyhow::Error::msg)?;
                Some((tls_listener, Arc::new(terminator)))
            }
            _ => None,
        };
        let tls_addr = tls.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
        let listen_addr = match &listener {
            Some(listener) => listener.local_addr()?,
            None => tls_addr.ok_or_else(|| anyhow::anyhow!("no listen address"))?,
        };
        // The default instance name says where this gateway listens, port 0 resolved.
        let cluster = match (cluster, &config.cluster) {
            (Some(c), Some(section)) if section.instance.is_none() => {
                Some(Arc::new(c.renamed(section.instance_name(&listen_addr.to_string()))))
            }
            (c, _) => c,
        };
        let admin_addr = admin_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let watch_paths = config.gateway.watch.then(|| watched_paths(&config));
        let access_log = match crate::access_log::configured(&config) {
            Some((target, format)) => Some(crate::access_log::AccessLog::start(target, format, &metrics_registry)?),
            None => None,
        };
        let open_files = crate::resources::open_file_limit();
        let default_connections = crate::resources::default_max_connections(open_files);
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            routing: ArcSwap::from_pointee(routing),
            config: ArcSwap::from_pointee(config),
            plugins,
            metrics: GatewayMetrics::new(&metrics_registry),
            admission: Admission::new(&metrics_registry, default_connections),
            resources: Arc::new(ResourceErrors::new(&metrics_registry)),
            metrics_registry,
            upgrade: crate::upgrade::Upgrade::new(&shutdown, offered),
            shutdown,
            tasks: TaskTracker::new(),
            access_log,
            tls: tls.as_ref().map(|(_, terminator)| terminator.clone()),
            next_connection_id: AtomicU64::new(1),
            reloading: tokio::sync::Mutex::new(()),
            pool_tasks: std::sync::Mutex::new(HashMap::new()),
            retired: std::sync::Mutex::new(Vec::new()),
            names,
            cluster,
        });
        shared.sync_pool_tasks();
        tokio::spawn(crate::upstream::resolve::run(Arc::downgrade(&shared), shared.shutdown.child_token()));
        if let Some(cluster) = &shared.cluster {
            tokio::spawn(cluster.members.clone().run(Arc::downgrade(&shared)));
        }
        if let Some(listener) = listener {
            let workers = shared.config.load().gateway.workers;
            crate::workers::serve(listener, shared.clone(), workers)?;
        }
        if let Some((tls_listener, terminator)) = tls {
            tokio::spawn(crate::listener::accept_loop(tls_listener, shared.clone(), Some(terminator)));
        }
        if let Some(admin) = admin_listener {
            tokio::spawn(crate::admin::serve(admin, shared.clone()));
        }
        if let Some(predecessor) = predecessor {
            predecessor.ready();
        }
        crate::upgrade::serve_handover(&shared.config.load(), &shared)?;
        let watch = match watch_paths {
            Some(paths) => Some(start_watch(paths, &shared)?),
            None => None,
        };
        let limits = crate::limits::Limits::from_config(&shared.config.load().gateway, default_connections);
        tracing::info!(%listen_addr, ?tls_addr, ?admin_addr, open_files, ?limits, "wasmgate listening");
        Ok(Gateway { listen_addr, tls_addr, admin_addr, shared, _watch: watch })
    }

    /// Applies a new configuration: changed plugins are loaded off the hot path and swapped
    /// in; live connections keep going; new connections use the new routing.
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, String> {
        self.shared.reload(config).await
    }

    /// Re-reads the configuration file and reloads it (what SIGHUP does).
    pub async fn reload_from_source(&self) -> Result<ReloadReport, String> {
        self.shared.reload_from_source().await
    }

    /// Retires this gateway (what SIGUSR2 does): stops accepting, closes live connections
    /// with 1012 spread over `shutdown_drain_secs`, then shuts down; [`Gateway::retired`]
    /// completes when it is done. False when it is retiring already.
    pub fn retire(&self) -> bool {
        let drain = Duration::from_secs(self.shared.config.load().gateway.shutdown_drain_secs);
        crate::upgrade::retire::start(&self.shared, drain, "signal").is_some()
    }

    /// Completes once a retirement (SIGUSR2, `POST /shutdown`, a successor's handover) has
    /// closed every connection.
    pub async fn retired(&self) {
        self.shared.upgrade.retired.cancelled().await
    }

    /// Reopens the access log file at its path (after logrotate renamed it; SIGUSR1).
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.shared.access_log {
            log.reopen();
        }
    }

    /// Proxied connections open right now.
    pub fn active_connections(&self) -> u64 {
        self.shared.metrics.connections_active.get() as u64
    }

    /// Client sockets held right now, handshakes included (what `max_connections` counts).
    pub fn open_sockets(&self) -> usize {
        self.shared.admission.open()
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics_registry.render()
    }

    /// Stops accepting, closes live connections with 1001 and waits for them (at most
    /// `shutdown_grace_secs`).
    pub async fn shutdown(self) {
        let grace = Duration::from_secs(self.shared.config.load().gateway.shutdown_grace_secs);
        self.shared.close_connections();
        self.shared.tasks.close();
        if tokio::time::timeout(grace, self.shared.tasks.wait()).await.is_err() {
            tracing::warn!(left = self.shared.tasks.len(), "connections still open after the grace period");
        }
    }
}

/// The config file, every plugin file and every TLS file: a change to any reloads.
fn watched_paths(config: &Config) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = config.source.iter().cloned().collect();
    paths.extend(config.plugins.iter().map(|p| p.wasm_path(&config.base_dir)));
    if let Some(tls) = &config.gateway.tls {
        paths.extend(tls.certs.get_ref().iter().flat_map(|c| [config.base_dir.join(&c.cert), config.base_dir.join(&c.key)]));
        paths.extend(tls.client_ca.iter().map(|ca| config.base_dir.join(ca.get_ref())));
    }
    paths
}

fn start_watch(paths: Vec<PathBuf>, shared: &Arc<Shared>) -> anyhow::Result<crate::plugin::WatchGuard> {
    let shared = Arc::downgrade(shared);
    let handle = tokio::runtime::Handle::current();
    crate::plugin::watch(paths, move || {
        let Some(shared) = shared.upgrade() else { return };
        handle.spawn(async move {
            match shared.reload_from_source().await {
                Ok(report) => tracing::info!(?report, "reloaded after a file change"),
                Err(e) => tracing::error!("{e}"),
            }
        });
    })
}
