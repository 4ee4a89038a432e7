//! The gateway as a library: start it from a `Config`, get a handle with the bound addresses,
//! reload it, shut it down.
//!
//! Everything a configuration decides lives in one immutable `Routing` value behind an
//! `ArcSwap`: a connection loads it once at its handshake, and a reload swaps in a new one
//! without touching live connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
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
    /// Builds routing from a validated config, carrying server statistics over from `previous`.
    pub fn build(config: &Config, previous: Option<&Routing>) -> Routing {
        let g = &config.gateway;
        let pools = config
            .upstreams
            .iter()
            .map(|u| {
                let old = previous.and_then(|p| p.pools.get(u.name.get_ref())).map(|p| p.as_ref());
                (u.name.get_ref().clone(), Arc::new(Pool::build(u, old)))
            })
            .collect();
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Routing {
            routes: RouteTable::build(&config.routes),
            pools,
            relay: RelaySettings {
                max_message_size: g.max_message_size,
                ping_interval: secs(g.ping_interval_secs),
                pong_timeout: Duration::from_secs(g.pong_timeout_secs.max(1)),
                idle_timeout: secs(g.idle_timeout_secs),
                close_timeout: g.close_timeout(),
            },
            handshake_timeout: g.handshake_timeout(),
        }
    }
}

/// State shared by the listener, every connection and the admin API.
pub struct Shared {
    pub routing: ArcSwap<Routing>,
    /// Cancelled on shutdown: the listener stops and relays close with 1001.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    next_connection_id: AtomicU64,
    pub config: ArcSwap<Config>,
}

impl Shared {
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A running gateway.
pub struct Gateway {
    pub listen_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
}

impl Gateway {
    /// Binds the listener (and admin address) and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
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
        let shared = Arc::new(Shared {
            routing: ArcSwap::from_pointee(Routing::build(&config, None)),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            next_connection_id: AtomicU64::new(1),
            config: ArcSwap::from_pointee(config),
        });
        tokio::spawn(crate::listener::accept_loop(listener, shared.clone()));
        if let Some(admin) = admin_listener {
            tokio::spawn(crate::admin::serve(admin, shared.clone()));
        }
        tracing::info!(%listen_addr, ?admin_addr, "wasmgate listening");
        Ok(Gateway { listen_addr, admin_addr, shared })
    }

    /// Applies a new configuration. Live connections keep going; new ones use it.
    pub fn reload(&self, config: Config) -> anyhow::Result<()> {
        reload(&self.shared, config)
    }

    /// Connections being served right now.
    pub fn active_connections(&self) -> usize {
        self.shared.tasks.len()
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

/// Swaps in routing built from `config`.
pub fn reload(shared: &Shared, config: Config) -> anyhow::Result<()> {
    let old = shared.config.load();
    if old.gateway.listen.get_ref() != config.gateway.listen.get_ref()
        || old.gateway.admin.as_ref().map(|a| a.get_ref()) != config.gateway.admin.as_ref().map(|a| a.get_ref())
    {
        tracing::warn!("listen and admin addresses change only on restart; keeping the old ones");
    }
    let routing = Routing::build(&config, Some(&shared.routing.load()));
    shared.routing.store(Arc::new(routing));
    shared.config.store(Arc::new(config));
    tracing::info!("configuration reloaded");
    Ok(())
}
