//! Whether a server should get new connections.
//!
//! Two signals, both kept on the server's shared state so they survive reloads:
//! - active checks (optional, per pool): every `interval` each server is probed with a
//!   WebSocket handshake to a path (then closed with 1000) or a plain TCP connect (for a
//!   `wss://` server either one includes the TLS handshake, verified as connections are); `fall`
//!   failed probes in a row make a healthy server unhealthy, `rise` successful ones make it
//!   healthy again;
//! - passive ejection: `eject_after` connect failures in a row take a server out for a
//!   backoff of 1 s, doubling up to 30 s each time it is ejected again without a success in
//!   between. When the backoff ends the server is offered again; one success resets it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{ConnectError, Pool, ServerAddress, UpstreamRequest, UpstreamTls};
use crate::resources::{ResourceErrors, Shortage};

/// The first ejection's length; each further one doubles it, up to `MAX_EJECTION`.
pub const FIRST_EJECTION: Duration = Duration::from_secs(1);
pub const MAX_EJECTION: Duration = Duration::from_secs(30);

/// Milliseconds on a process-wide monotonic clock, never 0 (0 means "not ejected").
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The health of one server.
#[derive(Debug)]
pub struct Health {
    /// The active checks' verdict; true until they say otherwise (and without checks).
    healthy: AtomicBool,
    probe_successes: AtomicU32,
    probe_failures: AtomicU32,
    /// End of the current passive ejection, on the `now_ms` clock; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    /// Ejections since the last success, for the backoff.
    ejections: AtomicU32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            healthy: AtomicBool::new(true),
            probe_successes: AtomicU32::new(0),
            probe_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// How long the current passive ejection still lasts (0 when not ejected).
    pub fn ejected_for_ms(&self, now: u64) -> u64 {
        self.ejected_until_ms.load(Ordering::Relaxed).saturating_sub(now)
    }

    /// Whether the server may be offered new connections (draining aside).
    pub fn is_up(&self, now: u64) -> bool {
        self.is_healthy() && self.ejected_until_ms.load(Ordering::Relaxed) <= now
    }

    /// After a failed connect; `failures` counts those in a row, this one included. Returns
    /// the ejection's length when this failure ejected the server.
    pub fn connect_failed(&self, failures: u32, eject_after: u32, now: u64) -> Option<Duration> {
        if eject_after == 0 || failures < eject_after {
            return None;
        }
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until > now {
            // Already out: connects that were under way when it was ejected do not double
            // the backoff.
            return None;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = FIRST_EJECTION.saturating_mul(1 << n).min(MAX_EJECTION);
        let new_until = now + backoff.as_millis() as u64;
        // One of racing failures ejects.
        self.ejected_until_ms
            .compare_exchange(until, new_until, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|_| backoff)
    }

    /// After a successful connect (or a recovery seen by the active checks): no ejection.
    pub fn clear_ejection(&self) {
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Applies one probe's outcome. Returns the new verdict when it changed.
    pub fn probe_result(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.probe_failures.store(0, Ordering::Relaxed);
            let successes = self.probe_successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.is_healthy() && successes >= rise {
                self.healthy.store(true, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.probe_successes.store(0, Ordering::Relaxed);
            let failures = self.probe_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if self.is_healthy() && failures >= fall {
                self.healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }
}

/// What an active check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// Connect only.
    Tcp,
    /// Open a WebSocket to this path (after the server's path prefix), then close with 1000.
    WebSocket { path: String },
}

/// A pool's active health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub kind: ProbeKind,
}

impl HealthSettings {
    pub fn from_config(table: &crate::config::HealthTable) -> HealthSettings {
        let kind = match table.kind.as_ref().map(|k| k.get_ref().as_str()) {
            Some("tcp") => ProbeKind::Tcp,
            _ => ProbeKind::WebSocket {
                path: table.path.as_ref().map_or_else(|| "/".to_string(), |p| p.get_ref().clone()),
            },
        };
        HealthSettings {
            interval: Duration::from_millis(table.interval_ms),
            timeout: Duration::from_millis(table.timeout_ms),
            rise: table.rise,
            fall: table.fall,
            kind,
        }
    }
}

/// Why a probe failed.
#[derive(Debug)]
pub enum ProbeError {
    /// The server did not answer as it should.
    Server(String),
    /// The gateway could not open a socket: the probe says nothing about the server.
    Local(Shortage, std::io::Error),
}

impl From<ConnectError> for ProbeError {
    fn from(e: ConnectError) -> ProbeError {
        match e {
            ConnectError::OutOfResources(shortage, error) => ProbeError::Local(shortage, error),
            other => ProbeError::Server(other.to_string()),
        }
    }
}

/// One probe of one server; `tls` is its pool's, for a `wss://` server.
pub async fn probe(address: &ServerAddress, tls: Option<&UpstreamTls>, settings: &HealthSettings) -> Result<(), ProbeError> {
    match &settings.kind {
        ProbeKind::Tcp => match tokio::time::timeout(settings.timeout, connect_only(address, tls)).await {
            Ok(result) => result,
            Err(_) => Err(ProbeError::Server(format!("no connection within {:?}", settings.timeout))),
        },
        ProbeKind::WebSocket { path } => {
            let request = UpstreamRequest {
                path_and_query: path.clone(),
                headers: [("User-Agent", "wasmgate-health-check")].into_iter().collect(),
            };
            let mut socket = super::open(address, tls, &request, settings.timeout).await?;
            // A client's close frame is masked: FIN + close, masked, 2 bytes of code 1000.
            let mask: [u8; 4] = rand::random();
            let code = 1000u16.to_be_bytes();
            let frame = [0x88, 0x82, mask[0], mask[1], mask[2], mask[3], code[0] ^ mask[0], code[1] ^ mask[1]];
            if socket.stream.write_all(&frame).await.is_ok() && socket.stream.flush().await.is_ok() {
                // Give the server a moment to answer the close; the probe has passed anyway.
                let mut reply = [0u8; 64];
                let wait = settings.timeout.min(Duration::from_millis(200));
                let _ = tokio::time::timeout(wait, socket.stream.read(&mut reply)).await;
            }
            Ok(())
        }
    }
}

/// A TCP connect, and for a `wss://` server the TLS handshake on it.
async fn connect_only(address: &ServerAddress, tls: Option<&UpstreamTls>) -> Result<(), ProbeError> {
    let tcp = TcpStream::connect(&address.authority).await.map_err(|e| match Shortage::of(&e) {
        Some(shortage) => ProbeError::Local(shortage, e),
        None => ProbeError::Server(e.to_string()),
    })?;
    match (address.tls, tls) {
        (false, _) => Ok(()),
        (true, Some(tls)) => tls.connect(tcp, address.certificate_name()).await.map(drop).map_err(ProbeError::Server),
        (true, None) => Err(ProbeError::Server("a wss:// server without TLS settings".into())),
    }
}

/// Probes every server of a pool each interval until `stop` is cancelled or `current`
/// returns no pool with health checks (it was removed, or its checks were). The pool is read
/// afresh each round, so reloads (new servers, new settings) apply at the next round. A
/// probe the gateway could not make (out of descriptors or ports) counts in `resources`,
/// not against the server.
pub async fn run_checks(
    pool_name: String,
    current: impl Fn() -> Option<Arc<Pool>> + Send + 'static,
    resources: Arc<ResourceErrors>,
    stop: CancellationToken,
) {
    loop {
        let Some(pool) = current() else { break };
        let Some(settings) = pool.health.clone() else { break };
        let round = tokio::time::Instant::now();
        let mut probes = JoinSet::new();
        for server in pool.servers.iter().cloned() {
            let settings = settings.clone();
            probes.spawn(async move {
                let result = probe(&server.address, server.tls.as_deref(), &settings).await;
                (server, result)
            });
        }
        drop(pool);
        loop {
            let next = tokio::select! {
                next = probes.join_next() => next,
                _ = stop.cancelled() => return,
            };
            let Some(joined) = next else { break };
            let Ok((server, result)) = joined else { continue };
            match result {
                Ok(()) => server.apply_probe(&pool_name, Ok(()), &settings),
                Err(ProbeError::Server(error)) => {
                    let was_healthy = server.state.health.is_healthy();
                    server.apply_probe(&pool_name, Err(error), &settings);
                    if was_healthy && !server.state.health.is_healthy() {
                        move_sessions_off(&pool_name, &server, current().as_deref());
                    }
                }
                Err(ProbeError::Local(shortage, error)) => resources.record(shortage, "health check", &error),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(round + settings.interval) => {}
            _ = stop.cancelled() => return,
        }
    }
    tracing::debug!(pool = %pool_name, "health checks stopped");
}

/// A server just failed its health checks: its connections that can move (session routes)
/// are asked to, as for a dead socket, when another server of the pool can take them.
/// Without one they stay (moving would only close them when no server answers); other
/// connections stay too, as they always did.
fn move_sessions_off(pool_name: &str, server: &super::Server, pool: Option<&Pool>) {
    let Some(pool) = pool else { return };
    let elsewhere = pool.available().into_iter().any(|i| !Arc::ptr_eq(&pool.servers[i].state, &server.state));
    if !elsewhere {
        tracing::warn!(pool = %pool_name, server = %server.address.authority, "no other server is up: its session connections stay");
        return;
    }
    let moving = server.state.connections.move_movable();
    if moving > 0 {
        tracing::info!(pool = %pool_name, server = %server.address.authority, moving, "moving session connections off an unhealthy server");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_backs_off_and_a_success_resets_it() {
        let h = Health::default();
        let t = 1000;
        assert_eq!(h.connect_failed(2, 3, t), None, "below eject_after");
        assert_eq!(h.connect_failed(3, 3, t), Some(Duration::from_secs(1)));
        assert!(!h.is_up(t) && h.ejected_for_ms(t) == 1000);
        assert_eq!(h.connect_failed(4, 3, t + 10), None, "already out");
        assert!(h.is_up(t + 1000));
        // Back, fails again: twice as long, and so on up to 30 s.
        let mut now = t + 1000;
        for expected in [2, 4, 8, 16, 30, 30] {
            assert_eq!(h.connect_failed(9, 3, now), Some(Duration::from_secs(expected)));
            now += expected * 1000;
        }
        h.clear_ejection();
        assert!(h.is_up(now));
        assert_eq!(h.connect_failed(3, 3, now), Some(Duration::from_secs(1)));
        assert_eq!(Health::default().connect_failed(100, 0, t), None, "0 never ejects");
    }

    #[test]
    fn probes_rise_and_fall() {
        let h = Health::default();
        assert_eq!(h.probe_result(false, 2, 3), None);
        assert_eq!(h.probe_result(false, 2, 3), None);
        assert_eq!(h.probe_result(true, 2, 3), None, "a success resets the failures");
        assert_eq!(h.probe_result(false, 2, 3), None);
        assert_eq!(h.probe_result(false, 2, 3), None);
        assert_eq!(h.probe_result(false, 2, 3), Some(false));
        assert!(!h.is_up(1));
        assert_eq!(h.probe_result(false, 2, 3), None);
        assert_eq!(h.probe_result(true, 2, 3), None);
        assert_eq!(h.probe_result(true, 2, 3), Some(true));
        assert!(h.is_up(1));
    }
}
