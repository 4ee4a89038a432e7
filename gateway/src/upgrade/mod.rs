//! Restarts and upgrades that refuse nothing: a new gateway process takes over the port
//! while the old one moves its live connections off and exits.
//!
//! The client listener is bound with `SO_REUSEPORT`, so a second process (a new binary or a
//! new config) can always bind the same address while the first still runs. That alone is
//! not enough: the kernel hashes new connections across every socket of the group, and a
//! socket that is closed resets the connections still waiting in its accept queue (unless
//! `net.ipv4.tcp_migrate_req = 1`, Linux 5.14+, a per-host switch an operator may not have).
//! So the upgrade path passes the listening socket itself: with `[gateway] handover = PATH`
//! each gateway offers its listening sockets on a Unix socket ([`handover`]); a new process
//! started with the same `handover` receives them (`SCM_RIGHTS`, as nginx, HAProxy and
//! Envoy's hot restart do), starts accepting on the very same socket — same accept queue, no
//! second socket for the kernel to hash to — and tells the old one it is ready. Only then
//! does the old one retire ([`retire`]): it stops accepting at once, closes its connections
//! with 1012 at a paced rate, and exits. No connection attempt meets a closed socket at any
//! point, on any kernel, without privileges.
//!
//! SIGUSR2 and `POST /shutdown?drain_secs=N` retire a process the same way without a
//! handover (a new process bound its own socket with `SO_REUSEPORT`); then connections
//! queued on the old socket when it closes are reset unless `tcp_migrate_req` is on, which
//! the retiring process checks and warns about.

pub mod handover;
pub mod retire;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The listening sockets a gateway serves on, whether bound here or taken over.
pub struct Bound {
    /// The plain `ws://` listener, the `wss://` one and the admin one, as configured.
    pub sockets: handover::Sockets<TcpListener>,
    /// The process whose sockets these are, waiting for our "ready" to retire.
    pub predecessor: Option<handover::Predecessor>,
    /// Copies of the listening sockets, offered to the next process.
    pub offered: handover::Offered,
}

/// Binds (or takes over, see [`handover`]) the client listeners (`ws://`, `wss://`) and the
/// admin listener of `config`.
pub async fn bind(config: &Config) -> anyhow::Result<Bound> {
    let g = &config.gateway;
    let wanted = handover::Sockets { listen: g.listen_addr(), tls: g.tls_listen_addr(), admin: g.admin_addr() };
    let taken = match handover_path(config) {
        Some(path) => tokio::task::spawn_blocking(move || handover::take_over(&path, wanted)).await?,
        None => None,
    };
    let (taken, predecessor) = match taken {
        Some(t) => (t.sockets, Some(t.predecessor)),
        None => (handover::Sockets { listen: None, tls: None, admin: None }, None),
    };
    let client = |taken: Option<std::net::TcpListener>, addr: Option<std::net::SocketAddr>| -> anyhow::Result<Option<TcpListener>> {
        match (taken, addr) {
            (Some(l), _) => Ok(Some(TcpListener::from_std(l)?)),
            (None, Some(addr)) => Ok(Some(
                crate::listener::bind(addr, g.listen_backlog).map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?,
            )),
            (None, None) => Ok(None),
        }
    };
    let listen = client(taken.listen, wanted.listen)?;
    let tls = client(taken.tls, wanted.tls)?;
    let admin = match (taken.admin, wanted.admin) {
        (Some(l), _) => Some(TcpListener::from_std(l)?),
        (None, Some(addr)) => Some(
            TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on admin address {addr}: {e}"))?,
        ),
        (None, None) => None,
    };
    let sockets = handover::Sockets { listen, tls, admin };
    let offered = handover::Offered::new(handover::Sockets { listen: sockets.listen.as_ref(), tls: sockets.tls.as_ref(), admin: sockets.admin.as_ref() })?;
    Ok(Bound { sockets, predecessor, offered })
}

/// `[gateway] handover`, resolved against the config file's directory.
pub fn handover_path(config: &Config) -> Option<PathBuf> {
    config.gateway.handover.as_ref().map(|p| config.base_dir.join(p))
}

/// A process's part in upgrades: whether it still accepts, the sockets it offers to a
/// successor, and its retirement.
pub struct Upgrade {
    /// Cancelled when this process stops accepting (it retires or shuts down): the client
    /// and admin accept loops end.
    pub accepting: CancellationToken,
    /// Cancelled once a retirement has closed every connection.
    pub retired: CancellationToken,
    retiring: AtomicBool,
    offered: Mutex<Option<handover::Offered>>,
    /// The handover socket this process serves, removed when it retires.
    serving: Mutex<Option<handover::Serving>>,
    /// A successor took our sockets (so closing ours resets nothing).
    handed_over: AtomicBool,
}

impl Upgrade {
    pub fn new(shutdown: &CancellationToken, offered: handover::Offered) -> Upgrade {
        Upgrade {
            accepting: shutdown.child_token(),
            retired: CancellationToken::new(),
            retiring: AtomicBool::new(false),
            offered: Mutex::new(Some(offered)),
            serving: Mutex::new(None),
            handed_over: AtomicBool::new(false),
        }
    }

    pub fn is_retiring(&self) -> bool {
        self.retiring.load(Ordering::SeqCst)
    }

    /// Starts retiring; false when it had started already.
    fn begin_retiring(&self) -> bool {
        !self.retiring.swap(true, Ordering::SeqCst)
    }

    /// Stops accepting and lets go of everything that would lead a client or a successor
    /// here: the offered socket copies and the handover socket's path. After a handover
    /// the path is left to the successor, which is binding its own socket there at this
    /// very moment: checking that the file is still ours and then removing it could remove
    /// the successor's between the two steps, and fail its start (seen in CI).
    fn stop_accepting(&self) {
        self.accepting.cancel();
        self.offered.lock().unwrap().take();
        let serving = self.serving.lock().unwrap().take();
        if let Some(serving) = serving.filter(|_| !self.handed_over.load(Ordering::SeqCst)) {
            serving.remove();
        }
    }
}

/// Starts serving the handover socket of `config`, if it has one.
pub fn serve_handover(config: &Config, shared: &Arc<crate::gateway::Shared>) -> anyhow::Result<()> {
    let Some(path) = handover_path(config) else { return Ok(()) };
    let (serving, listener) = handover::Serving::bind(&path)?;
    *shared.upgrade.serving.lock().unwrap() = Some(serving);
    tokio::spawn(handover::serve(listener, shared.clone()));
    tracing::info!(path = %path.display(), "offering the listening sockets for handover");
    Ok(())
}
