//! Draining and rebalancing: closing chosen live connections with 1012 ("service restart")
//! so their clients reconnect, and the balancer places them elsewhere.
//!
//! Each proxied connection registers a [`CloseSignal`] on its server's [`Connections`]
//! (the [`ActiveConnection`](super::ActiveConnection) guard owns the registration and
//! removes it on drop, O(1) both ways). The relay watches the signal's token: cancelled by the
//! gateway's shutdown it closes both sides with 1001; cancelled by [`CloseSignal::close`] it
//! closes them with the code given there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Pool, Server};
use crate::metrics::Counter;

/// 1012: the server is going away for a while; reconnect.
pub const SERVICE_RESTART: u16 = 1012;
/// 1001: the gateway is shutting down.
pub const GOING_AWAY: u16 = 1001;

/// What a relay watches besides its sockets: when the token is cancelled, close both sides
/// with [`CloseSignal::frame`].
#[derive(Debug, Clone)]
pub struct CloseSignal {
    inner: Arc<SignalInner>,
}

#[derive(Debug)]
struct SignalInner {
    token: CancellationToken,
    /// The code `close` asked for; 0 when the token was cancelled by its parent (shutdown).
    code: AtomicU16,
}

impl CloseSignal {
    /// A signal also cancelled when `parent` is (the gateway's shutdown token).
    pub fn child_of(parent: &CancellationToken) -> CloseSignal {
        CloseSignal { inner: Arc::new(SignalInner { token: parent.child_token(), code: AtomicU16::new(0) }) }
    }

    /// Cancelled when the connection should close.
    pub fn token(&self) -> &CancellationToken {
        &self.inner.token
    }

    /// Asks the relay to close both sides with `code`. Returns false when the connection was
    /// already asked to close (by this or by shutdown).
    pub fn close(&self, code: u16) -> bool {
        if self.inner.token.is_cancelled() {
            return false;
        }
        let first = self.inner.code.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire).is_ok();
        self.inner.token.cancel();
        first
    }

    pub fn is_closing(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// The close code and reason for both sides, once the token is cancelled.
    pub fn frame(&self) -> (u16, &'static str) {
        match self.inner.code.load(Ordering::Acquire) {
            0 | GOING_AWAY => (GOING_AWAY, "gateway shutting down"),
            SERVICE_RESTART => (SERVICE_RESTART, "service restart"),
            code => (code, ""),
        }
    }
}

/// The live connections of one server, and whether it is draining.
#[derive(Debug, Default)]
pub struct Connections {
    draining: AtomicBool,
    /// A drain task is running (one at a time per server).
    drain_running: AtomicBool,
    registry: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    live: HashMap<u64, CloseSignal>,
}

impl Connections {
    /// Adds a connection. A connection that arrives while the server drains is asked to
    /// close at once (it raced with the drain's start).
    pub fn register(&self, signal: CloseSignal) -> u64 {
        let mut registry = self.registry.lock().unwrap();
        let id = registry.next_id;
        registry.next_id += 1;
        // Checked under the lock: a drain sets the flag, then takes its list under the lock,
        // so it either sees this connection or this check sees the flag.
        if self.draining.load(Ordering::SeqCst) {
            signal.close(SERVICE_RESTART);
        }
        registry.live.insert(id, signal);
        id
    }

    pub fn unregister(&self, id: u64) {
        self.registry.lock().unwrap().live.remove(&id);
    }

    /// Registered connections not yet asked to close.
    pub fn open(&self) -> usize {
        self.registry.lock().unwrap().live.values().filter(|s| !s.is_closing()).count()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops new connections and returns those to close. None when a drain already runs.
    fn begin_drain(&self) -> Option<Vec<CloseSignal>> {
        self.draining.store(true, Ordering::SeqCst);
        if self.drain_running.swap(true, Ordering::SeqCst) {
            return None;
        }
        let registry = self.registry.lock().unwrap();
        let mut live: Vec<(u64, CloseSignal)> =
            registry.live.iter().filter(|(_, s)| !s.is_closing()).map(|(&id, s)| (id, s.clone())).collect();
        // Oldest first.
        live.sort_unstable_by_key(|(id, _)| *id);
        Some(live.into_iter().map(|(_, s)| s).collect())
    }

    /// Takes the server out of draining: it gets new connections again and a running drain
    /// stops closing.
    pub fn undrain(&self) {
        self.draining.store(false, Ordering::SeqCst);
    }

    /// The oldest connection not yet asked to close.
    fn oldest_open(&self) -> Option<CloseSignal> {
        let registry = self.registry.lock().unwrap();
        registry.live.iter().filter(|(_, s)| !s.is_closing()).min_by_key(|(&id, _)| id).map(|(_, s)| s.clone())
    }
}

/// How fast to drain: `rate` connections per second, or all of them spread over `spread`
/// (at once when it is zero).
#[derive(Debug, Clone, Copy)]
pub struct DrainPace {
    pub rate: Option<f64>,
    pub spread: Duration,
}

impl DrainPace {
    /// Connections per second for `n` connections; infinite = all at once.
    fn per_second(&self, n: usize) -> f64 {
        match self.rate {
            Some(rate) if rate > 0.0 => rate,
            _ if self.spread.is_zero() || n == 0 => f64::INFINITY,
            _ => n as f64 / self.spread.as_secs_f64(),
        }
    }
}

/// Marks `server` draining (no new connections) and starts closing its connections with
/// 1012 at `pace`, counting each in `moved`. Returns how many connections it will close, or
/// None when a drain of this server already runs.
pub fn start_drain(server: Arc<Server>, pace: DrainPace, moved: Counter, stop: CancellationToken) -> Option<usize> {
    let targets = server.state.connections.begin_drain()?;
    let n = targets.len();
    let per_second = pace.per_second(n);
    tokio::spawn(async move {
        let started = Instant::now();
        for (k, signal) in targets.into_iter().enumerate() {
            if per_second.is_finite() {
                let due = started + Duration::from_secs_f64(k as f64 / per_second);
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stop.cancelled() => break,
                }
            }
            if !server.state.connections.is_draining() {
                break;
            }
            if signal.close(SERVICE_RESTART) {
                moved.inc();
            }
        }
        server.state.connections.drain_running.store(false, Ordering::SeqCst);
        tracing::info!(server = %server.address.authority, "drain finished");
    });
    Some(n)
}

/// How a rebalance went.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RebalanceReport {
    pub moved: u64,
    /// Highest / lowest connections per unit of weight among available servers at the end.
    pub final_ratio: f64,
}

/// Moves connections off the most loaded available servers of `pool`, one every
/// `1 / per_second` seconds, until the most loaded has at most `target` times the load of the
/// least loaded (per unit of weight) or is within one connection of it. Closed connections
/// reconnect and the pool's balancer places them (least-conn puts them on the least loaded).
/// Stops after `max_moves`, or when `stop` is cancelled.
pub async fn rebalance(
    pool: Arc<Pool>,
    per_second: f64,
    target: f64,
    max_moves: u64,
    moved: Counter,
    stop: CancellationToken,
) -> RebalanceReport {
    let pause = Duration::from_secs_f64(1.0 / per_second.max(0.001));
    let mut report = RebalanceReport::default();
    loop {
        let loads: Vec<(usize, f64, usize)> = pool
            .available()
            .into_iter()
            .filter(|&i| pool.servers[i].weight > 0)
            .map(|i| {
                let server = &pool.servers[i];
                let open = server.state.connections.open();
                (i, open as f64 / server.weight as f64, open)
            })
            .collect();
        let (Some(max), Some(min)) = (
            loads.iter().max_by(|a, b| a.1.total_cmp(&b.1)),
            loads.iter().min_by(|a, b| a.1.total_cmp(&b.1)),
        ) else {
            break;
        };
        report.final_ratio = if min.1 > 0.0 { max.1 / min.1 } else if max.1 > 0.0 { f64::INFINITY } else { 1.0 };
        let max_weight = pool.servers[max.0].weight as f64;
        if report.final_ratio <= target || (max.1 - min.1) * max_weight <= 1.0 || report.moved >= max_moves {
            break;
        }
        let Some(signal) = pool.servers[max.0].state.connections.oldest_open() else { break };
        if signal.close(SERVICE_RESTART) {
            moved.inc();
            report.moved += 1;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => break,
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_signals_carry_their_code() {
        let shutdown = CancellationToken::new();
        let drained = CloseSignal::child_of(&shutdown);
        assert!(drained.close(SERVICE_RESTART));
        assert!(!drained.close(4000), "the first close wins");
        assert!(drained.token().is_cancelled());
        assert_eq!(drained.frame(), (1012, "service restart"));
        let plain = CloseSignal::child_of(&shutdown);
        shutdown.cancel();
        assert!(plain.token().is_cancelled());
        assert_eq!(plain.frame(), (1001, "gateway shutting down"));
        assert!(!plain.close(SERVICE_RESTART), "already closing for shutdown");
    }

    #[test]
    fn registry_adds_removes_and_closes_latecomers_while_draining() {
        let c = Connections::default();
        let shutdown = CancellationToken::new();
        let signals: Vec<_> = (0..3).map(|_| CloseSignal::child_of(&shutdown)).collect();
        let ids: Vec<_> = signals.iter().map(|s| c.register(s.clone())).collect();
        c.unregister(ids[1]);
        assert_eq!(c.open(), 2);
        let targets = c.begin_drain().unwrap();
        assert_eq!(targets.len(), 2);
        assert!(c.begin_drain().is_none(), "one drain at a time");
        let late = CloseSignal::child_of(&shutdown);
        c.register(late.clone());
        assert_eq!(late.frame(), (1012, "service restart"));
        assert!(late.is_closing());
        c.undrain();
        let after = CloseSignal::child_of(&shutdown);
        c.register(after.clone());
        assert!(!after.is_closing());
    }

    #[test]
    fn pace_spreads_or_uses_the_rate() {
        let spread = DrainPace { rate: None, spread: Duration::from_secs(10) };
        assert_eq!(spread.per_second(50), 5.0);
        assert_eq!(DrainPace { rate: Some(7.0), ..spread }.per_second(50), 7.0);
        assert!(DrainPace { rate: None, spread: Duration::ZERO }.per_second(50).is_infinite());
    }
}
