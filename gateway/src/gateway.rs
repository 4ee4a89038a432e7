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
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::{Counter, Gauge, Registry};
use crate::plugin::{
    OnError, PluginRegistry, PluginRuntime, PluginSlot, PluginSpec, ReloadReport, RuntimeOptions,
};
use crate::relay::RelaySettings;
use crate::routes::RouteTable;
use crate::upstream::Pool;

/// What one configuration decides, ready for the hot path.
pub struct Routing {
    pub routes: RouteTable,
    pub pools: HashMap<String, Arc<Pool>>,
    pub relay: RelaySettings,
    pub handshake_timeout: Duration,
}

impl Routing {
    /// Builds routing from a validated config, carrying server statistics over from
    /// `previous`. Fails when a referenced plugin is not loaded.
    pub fn build(config: &Config, previous: Option<&Routing>, plugins: &PluginRegistry) -> Result<Routing, String> {
        let slot = |name: &str| -> Result<Arc<PluginSlot>, String> {
            plugins.get(name).ok_or_else(|| format!("plugin `{name}` is not loaded"))
        };
        let g = &config.gateway;
        let mut pools = HashMap::new();
        for u in &config.upstreams {
            let old = previous.and_then(|p| p.pools.get(u.name.get_ref())).map(|p| p.as_ref());
            let balancer = u.balancer.as_ref().map(|b| slot(b.get_ref())).transpose()?;
            pools.insert(u.name.get_ref().clone(), Arc::new(Pool::build(u, old, balancer)));
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
            },
            handshake_timeout: g.handshake_timeout(),
        })
    }
}

/// The gateway's own counters on the admin `/metrics` page.
pub struct GatewayMetrics {
    pub connections_active: Gauge,
    pub connections_total: Counter,
    pub handshakes_refused: Counter,
    pub upstream_connect_failures: Counter,
    pub messages_from_client: Counter,
    pub messages_from_upstream: Counter,
    pub bytes_from_client: Counter,
    pub bytes_from_upstream: Counter,
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
            messages_from_client: r.counter("wasmgate_messages_total", "Data messages relayed", &[("from", "client")]),
            messages_from_upstream: r.counter("wasmgate_messages_total", "Data messages relayed", &[("from", "upstream")]),
            bytes_from_client: r.counter("wasmgate_payload_bytes_total", "Payload bytes relayed", &[("from", "client")]),
            bytes_from_upstream: r.counter("wasmgate_payload_bytes_total", "Payload bytes relayed", &[("from", "upstream")]),
            plugin_errors: r.counter("wasmgate_plugin_call_failures_total", "Hook calls that trapped, timed out or broke the contract", none),
            reloads: r.counter("wasmgate_reloads_total", "Configuration reloads applied", none),
            reload_failures: r.counter("wasmgate_reload_failures_total", "Configuration reloads rejected or partly failed", none),
        }
    }
}

/// State shared by the listener, every connection and the admin API.
pub struct Shared {
    pub routing: ArcSwap<Routing>,
    pub config: ArcSwap<Config>,
    pub plugins: Arc<PluginRegistry>,
    pub metrics_registry: Arc<Registry>,
    pub metrics: GatewayMetrics,
    /// Cancelled on shutdown: the listener stops and relays close with 1001.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    next_connection_id: AtomicU64,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl Shared {
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Loads changed plugins and swaps in routing built from `config`. Plugins that fail keep
    /// their previous version; if a plugin the config needs has no version at all, the whole
    /// config is refused and the running one stays.
    pub async fn reload(self: &Arc<Self>, config: Config) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.reloading.lock().await;
        let old = self.config.load();
        if old.gateway.listen.get_ref() != config.gateway.listen.get_ref() {
            tracing::warn!("the listen address changes only on restart; keeping the old one");
        }
        let report = self.load_plugins(&config).await;
        let routing = match Routing::build(&config, Some(&self.routing.load()), &self.plugins) {
            Ok(routing) => routing,
            Err(e) => {
                self.metrics.reload_failures.inc();
                return Err(format!("reload refused, the running configuration stays: {e}; {}", failures(&report)));
            }
        };
        self.routing.store(Arc::new(routing));
        self.config.store(Arc::new(config));
        self.metrics.reloads.inc();
        if report.is_ok() {
            tracing::info!("configuration reloaded");
        } else {
            self.metrics.reload_failures.inc();
            tracing::error!("configuration reloaded; previous versions keep serving for: {}", failures(&report));
        }
        Ok(report)
    }

    /// Re-reads the configuration file the gateway was started from and reloads it.
    pub async fn reload_from_source(self: &Arc<Self>) -> Result<ReloadReport, String> {
        let source = self.config.load().source.clone().ok_or("the configuration did not come from a file")?;
        let config = Config::load(&source).map_err(|e| e.to_string())?;
        self.reload(config).await
    }

    async fn load_plugins(&self, config: &Config) -> ReloadReport {
        let specs = plugin_specs(config);
        let plugins = self.plugins.clone();
        tokio::task::spawn_blocking(move || plugins.reconcile(&specs)).await.expect("reconcile does not panic")
    }
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

/// A running gateway.
pub struct Gateway {
    pub listen_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    _watch: Option<crate::plugin::WatchGuard>,
}

impl Gateway {
    /// Loads the plugins, binds the listener (and admin address) and starts serving. Fails
    /// when an address is taken or a plugin does not load.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let metrics_registry = Arc::new(Registry::new());
        let options = RuntimeOptions { cache_dir: cache_dir(&config), ..RuntimeOptions::default() };
        let runtime = PluginRuntime::new(options, metrics_registry.clone())?;
        let plugins = Arc::new(PluginRegistry::new(runtime));
        let specs = plugin_specs(&config);
        let loading = plugins.clone();
        let report = tokio::task::spawn_blocking(move || loading.reconcile(&specs)).await?;
        if !report.is_ok() {
            anyhow::bail!("plugins failed to load: {}", failures(&report));
        }
        let routing = Routing::build(&config, None, &plugins).map_err(anyhow::Error::msg)?;

        let listener = TcpListener::bind(config.gateway.listen_addr()).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {}: {e}", config.gateway.listen.get_ref())
        })?;
        let listen_addr = listener.local_addr()?;
        let admin_listener = match config.gateway.admin_addr() {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on admin address {addr}: {e}"))?,
            ),
            None => None,
        };
        let admin_addr = admin_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let watch_paths = config.gateway.watch.then(|| watched_paths(&config));
        let shared = Arc::new(Shared {
            routing: ArcSwap::from_pointee(routing),
            config: ArcSwap::from_pointee(config),
            plugins,
            metrics: GatewayMetrics::new(&metrics_registry),
            metrics_registry,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            next_connection_id: AtomicU64::new(1),
            reloading: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(crate::listener::accept_loop(listener, shared.clone()));
        if let Some(admin) = admin_listener {
            tokio::spawn(crate::admin::serve(admin, shared.clone()));
        }
        let watch = match watch_paths {
            Some(paths) => Some(start_watch(paths, &shared)?),
            None => None,
        };
        tracing::info!(%listen_addr, ?admin_addr, "wasmgate listening");
        Ok(Gateway { listen_addr, admin_addr, shared, _watch: watch })
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

    /// Proxied connections open right now.
    pub fn active_connections(&self) -> u64 {
        self.shared.metrics.connections_active.get() as u64
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics_registry.render()
    }

    /// Stops accepting, closes live connections with 1001 and waits for them (at most
    /// `shutdown_grace_secs`).
    pub async fn shutdown(self) {
        let grace = Duration::from_secs(self.shared.config.load().gateway.shutdown_grace_secs);
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(grace, self.shared.tasks.wait()).await.is_err() {
            tracing::warn!(left = self.shared.tasks.len(), "connections still open after the grace period");
        }
    }
}

/// The config file and every plugin file: a change to any reloads.
fn watched_paths(config: &Config) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = config.source.iter().cloned().collect();
    paths.extend(config.plugins.iter().map(|p| p.wasm_path(&config.base_dir)));
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
