//! Draining and rebalancing: closing chosen live connections with 1012 ("service restart")
//! so their clients reconnect, and the balancer places them elsewhere.
//!
//! Each proxied connection registers a [`CloseSignal`] on its server's [`Connections`]
//! (the [`ActiveConnection`](super::ActiveConnection) guard owns the registration and
//! removes it on drop, O(1) both ways). The relay watches the signal: closed by the gateway's
//! shutdown ([`crate::gateway::Shared::close_connections`]) it closes both sides with 1001,
//! by a drain with the code given to [`CloseSignal::close`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Pool, Server};
use crate::relay::{Stop, StopFlag, StopSource};
use crate::metrics::Counter;

/// 1012: the server is going away for a while; reconnect.
pub const SERVICE_RESTART: u16 = 1012;
/// 1001: the gateway is shutting down.
pub const GOING_AWAY: u16 = 1001;
/// Asks a connection to move to another server because its server drains
/// (`mode=migrate`); one whose route keeps no session state closes with 1012 instead.
pub const MIGRATE_DRAIN: u16 = 1;
/// As [`MIGRATE_DRAIN`], for a rebalance.
pub const MIGRATE_REBALANCE: u16 = 2;
/// Asks a connection that can move (see [`CloseSignal::mark_movable`]) to leave a server
/// that failed its health checks.
pub const MIGRATE_UNHEALTHY: u16 = 3;

/// What a relay watches besides its sockets: once [`CloseSignal::close`] is called, close
/// both sides with [`CloseSignal::frame`]. One allocation per connection, the relay's stop
/// included (see [`crate::relay::Stop`]).
#[derive(Debug, Clone, Default)]
pub struct CloseSignal {
    inner: Arc<SignalInner>,
}

#[derive(Debug, Default)]
struct SignalInner {
    /// The code `close` asked for; 0 until then.
    code: AtomicU16,
    /// Fired by `close`, watched by the relay.
    stop: StopFlag,
    /// The connection can move to another server (its route keeps session state).
    movable: AtomicBool,
}

impl StopSource for SignalInner {
    fn flag(&self) -> &StopFlag {
        &self.stop
    }

    fn frame(&self) -> (u16, &'static str) {
        match self.code.load(Ordering::Acquire) {
            0 | GOING_AWAY => (GOING_AWAY, "gateway shutting down"),
            SERVICE_RESTART | MIGRATE_DRAIN | MIGRATE_REBALANCE | MIGRATE_UNHEALTHY => (SERVICE_RESTART, "service restart"),
            code => (code, ""),
        }
    }
}

impl CloseSignal {
    /// Asks the relay to close both sides with `code` (not 0). Returns false when the
    /// connection was already asked to close (by this or by shutdown): the first close wins.
    pub fn close(&self, code: u16) -> bool {
        debug_assert_ne!(code, 0);
        if self.inner.code.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        self.inner.stop.fire();
        true
    }

    pub fn is_closing(&self) -> bool {
        self.inner.code.load(Ordering::Acquire) != 0
    }

    /// The close code and reason for both sides, once closed.
    pub fn frame(&self) -> (u16, &'static str) {
        self.inner.frame()
    }

    /// What the relay watches.
    pub fn stop(&self) -> Stop {
        Stop(self.inner.clone())
    }
}

impl CloseSignal {
    /// Why the connection is asked to move to another server, when it is (a migrating drain
    /// or rebalance) rather than to close.
    pub fn migration(&self) -> Option<crate::plugin::ReattachReason> {
        match self.inner.code.load(Ordering::Acquire) {
            MIGRATE_DRAIN => Some(crate::plugin::ReattachReason::Drained),
            MIGRATE_REBALANCE => Some(crate::plugin::ReattachReason::Rebalanced),
            // The contract has no reason of its own for it: to the plugin the server is gone.
            MIGRATE_UNHEALTHY => Some(crate::plugin::ReattachReason::ServerGone),
            _ => None,
        }
    }

    /// The connection can move to another server: a server failing its health checks asks
    /// it to (others stay where they are, as without session state).
    pub fn mark_movable(&self) {
        self.inner.movable.store(true, Ordering::Release);
    }

    fn is_movable(&self) -> bool {
        self.inner.movable.load(Ordering::Acquire)
    }
}

/// The slowest pace a drain or rebalance takes: one connection per 1,000 s. Slower rates
/// (or a `drain_secs` long enough to imply one) are raised to it, so every pause is a time
/// the clock can represent.
pub const MIN_RATE: f64 = 0.001;

/// The live connections of one server, and whether it is draining.
#[derive(Debug, Default)]
pub struct Connections {
    draining: AtomicBool,
    registry: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    live: HashMap<u64, CloseSignal>,
    /// Bumped by each drain; a drain task stops when it is no longer the latest (the server
    /// was undrained and drained again while it slept).
    drain_generation: u64,
    /// The latest drain's task is still closing connections.
    drain_running: bool,
}

impl Connections {
    /// Adds a connection. A connection that arrives while the gateway shuts down (`shutdown`
    /// is cancelled) or the server drains is asked to close at once: it raced with the
    /// shutdown's or the drain's start.
    pub fn register(&self, signal: CloseSignal, shutdown: &CancellationToken) -> u64 {
        let mut registry = self.registry.lock().unwrap();
        let id = registry.next_id;
        registry.next_id += 1;
        // Checked under the lock: shutdown cancels its token and a drain sets its flag, then
        // each takes its list under the lock, so it either sees this connection or this check
        // sees the token or flag.
        if shutdown.is_cancelled() {
            signal.close(GOING_AWAY);
        } else if self.draining.load(Ordering::SeqCst) {
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

    /// Registered connections asked to close that have not finished closing.
    fn closing(&self) -> usize {
        self.registry.lock().unwrap().live.values().filter(|s| s.is_closing()).count()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops new connections and returns the drain's generation and the connections to
    /// close. None, and nothing changed, while a drain of the draining server is still
    /// closing connections. (A finished drain may be asked again; an undrain ends a drain.)
    fn begin_drain(&self) -> Option<(u64, Vec<CloseSignal>)> {
        // Checked and set under the lock, so a refused drain touches nothing.
        let mut registry = self.registry.lock().unwrap();
        if registry.drain_running && self.is_draining() {
            return None;
        }
        self.draining.store(true, Ordering::SeqCst);
        registry.drain_generation += 1;
        registry.drain_running = true;
        let generation = registry.drain_generation;
        let mut live: Vec<(u64, CloseSignal)> =
            registry.live.iter().filter(|(_, s)| !s.is_closing()).map(|(&id, s)| (id, s.clone())).collect();
        // Oldest first.
        live.sort_unstable_by_key(|(id, _)| *id);
        Some((generation, live.into_iter().map(|(_, s)| s).collect()))
    }

    /// Whether the drain of `generation` should go on closing connections.
    fn drain_goes_on(&self, generation: u64) -> bool {
        self.is_draining() && self.registry.lock().unwrap().drain_generation == generation
    }

    /// The drain of `generation` is done closing connections.
    fn drain_finished(&self, generation: u64) {
        let mut registry = self.registry.lock().unwrap();
        if registry.drain_generation == generation {
            registry.drain_running = false;
        }
    }

    /// Takes the server out of draining: it gets new connections again and a running drain
    /// stops closing.
    pub fn undrain(&self) {
        self.draining.store(false, Ordering::SeqCst);
    }

    /// The connections not yet asked to close, oldest first (a retiring gateway closes them
    /// all).
    pub fn open_signals(&self) -> Vec<CloseSignal> {
        let registry = self.registry.lock().unwrap();
        let mut open: Vec<(u64, CloseSignal)> =
            registry.live.iter().filter(|(_, s)| !s.is_closing()).map(|(&id, s)| (id, s.clone())).collect();
        open.sort_unstable_by_key(|(id, _)| *id);
        open.into_iter().map(|(_, s)| s).collect()
    }

    /// Asks every connection that can move, and is not closing, to leave the server
    /// (it failed its health checks); how many were asked.
    pub fn move_movable(&self) -> usize {
        let movable: Vec<CloseSignal> =
            self.registry.lock().unwrap().live.values().filter(|s| s.is_movable() && !s.is_closing()).cloned().collect();
        movable.iter().filter(|s| s.close(MIGRATE_UNHEALTHY)).count()
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
            Some(rate) => rate.max(MIN_RATE),
            _ if self.spread.is_zero() || n == 0 => f64::INFINITY,
            _ => (n as f64 / self.spread.as_secs_f64()).max(MIN_RATE),
        }
    }
}

/// Marks `server` draining (no new connections) and starts closing its connections with
/// 1012 at `pace` (or, with `migrate`, moving those that can move), counting each in
/// `moved`. Returns how many connections it will close, or None, changing nothing, when the
/// server is draining already.
pub fn start_drain(
    server: Arc<Server>,
    pace: DrainPace,
    migrate: bool,
    moved: Counter,
    stop: CancellationToken,
) -> Option<usize> {
    let code = if migrate { MIGRATE_DRAIN } else { SERVICE_RESTART };
    let (generation, targets) = server.state.connections.begin_drain()?;
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
            if !server.state.connections.drain_goes_on(generation) {
                break;
            }
            if signal.close(code) {
                moved.inc();
            }
        }
        server.state.connections.drain_finished(generation);
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

/// How long a rebalance watches a pool that looks balanced before it ends. Clients it closed
/// are still reconnecting when the counts first look right; where they land decides whether
/// the pool is balanced, so the goal must hold for this long, with nothing left closing.
const REBALANCE_SETTLE: Duration = Duration::from_millis(500);
/// How often a rebalance looks again while it waits for the pool to settle.
const REBALANCE_POLL: Duration = Duration::from_millis(50);

/// Moves connections off the most loaded available servers of `pool`, one every
/// `1 / per_second` seconds, until the most loaded has at most `target` times the load of the
/// least loaded (per unit of weight) or is within one connection of it, and stays so for
/// [`REBALANCE_SETTLE`]. Closed connections reconnect and the pool's balancer places them
/// (least-conn puts them on the least loaded). Stops after `max_moves`, or when `stop` is
/// cancelled. With `migrate`, connections that can move to another server do so instead of
/// closing.
pub async fn rebalance(
    pool: Arc<Pool>,
    per_second: f64,
    target: f64,
    max_moves: u64,
    migrate: bool,
    moved: Counter,
    stop: CancellationToken,
) -> RebalanceReport {
    let code = if migrate { MIGRATE_REBALANCE } else { SERVICE_RESTART };
    let pause = Duration::from_secs_f64(1.0 / per_second.max(0.001));
    let mut report = RebalanceReport::default();
    let mut balanced_since: Option<Instant> = None;
    while let Some(loads) = PoolLoads::measure(&pool) {
        report.final_ratio = loads.ratio();
        let next = if loads.meets(target) {
            let since = *balanced_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= REBALANCE_SETTLE && !loads.closing {
                break;
            }
            REBALANCE_POLL
        } else {
            balanced_since = None;
            if report.moved >= max_moves {
                break;
            }
            let Some(signal) = pool.servers[loads.most_loaded].state.connections.oldest_open() else { break };
            if signal.close(code) {
                moved.inc();
                report.moved += 1;
            }
            pause
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = stop.cancelled() => break,
        }
    }
    report
}

/// The available servers' loads as a rebalance sees them.
struct PoolLoads {
    most_loaded: usize,
    /// Connections per unit of weight of the most and the least loaded.
    max: f64,
    min: f64,
    max_weight: f64,
    /// Some connection asked to close is still closing: its client has not reconnected yet.
    closing: bool,
}

impl PoolLoads {
    /// A server's load is its connections that stay: open ones and ones still in their
    /// handshake (which the balancer placed there), not ones closing. None without an
    /// available server of non-zero weight.
    fn measure(pool: &Pool) -> Option<PoolLoads> {
        let mut loads: Option<PoolLoads> = None;
        let mut closing_anywhere = false;
        for i in pool.available() {
            let server = &pool.servers[i];
            let closing = server.state.connections.closing();
            closing_anywhere |= closing > 0;
            if server.weight == 0 {
                continue;
            }
            let staying = (server.state.active.load(Ordering::Relaxed) as usize).saturating_sub(closing);
            let load = staying as f64 / server.weight as f64;
            let loads = loads.get_or_insert(PoolLoads { most_loaded: i, max: load, min: load, max_weight: server.weight as f64, closing: false });
            if load > loads.max {
                (loads.most_loaded, loads.max, loads.max_weight) = (i, load, server.weight as f64);
            }
            loads.min = loads.min.min(load);
        }
        loads.map(|loads| PoolLoads { closing: closing_anywhere, ..loads })
    }

    fn ratio(&self) -> f64 {
        if self.min > 0.0 {
            self.max / self.min
        } else if self.max > 0.0 {
            f64::INFINITY
        } else {
            1.0
        }
    }

    /// At most `target` times the least loaded, or within one connection of it.
    fn meets(&self, target: f64) -> bool {
        self.ratio() <= target || (self.max - self.min) * self.max_weight <= 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_signals_carry_their_code() {
        let drained = CloseSignal::default();
        assert!(!drained.is_closing() && !drained.stop().0.flag().is_fired());
        assert!(drained.close(SERVICE_RESTART));
        assert!(!drained.close(4000), "the first close wins");
        assert!(drained.is_closing() && drained.stop().0.flag().is_fired());
        assert_eq!(drained.frame(), (1012, "service restart"));
        assert_eq!(drained.stop().0.frame(), (1012, "service restart"));
        let plain = CloseSignal::default();
        assert!(plain.close(GOING_AWAY));
        assert_eq!(plain.frame(), (1001, "gateway shutting down"));
        assert!(!plain.close(SERVICE_RESTART), "already closing for shutdown");
        let custom = CloseSignal::default();
        custom.close(4001);
        assert_eq!(custom.frame(), (4001, ""));
    }

    #[test]
    fn a_rebalance_counts_handshakes_and_not_connections_leaving() {
        let pool = super::super::tests::pool(r#"["127.0.0.1:1", "127.0.0.1:2"]"#, None);
        let shutdown = CancellationToken::new();
        let open = |server: usize| {
            let guard = pool.servers[server].connection_opened();
            guard.close_signal(&shutdown);
            guard
        };
        let on_a: Vec<_> = (0..3).map(|_| open(0)).collect();
        let _on_b = open(1);
        let _handshake_on_b = pool.servers[1].connecting();
        let loads = PoolLoads::measure(&pool).unwrap();
        assert_eq!((loads.max, loads.min, loads.most_loaded, loads.closing), (3.0, 2.0, 0, false));
        assert!(loads.meets(1.2), "within one connection");

        // Asked to close, a connection no longer counts, but the pool is not settled until
        // it is gone.
        assert!(on_a[0].close_signal(&shutdown).close(SERVICE_RESTART));
        let loads = PoolLoads::measure(&pool).unwrap();
        assert_eq!((loads.max, loads.min, loads.closing), (2.0, 2.0, true));
        drop(on_a);
        let loads = PoolLoads::measure(&pool).unwrap();
        assert_eq!((loads.max, loads.min, loads.closing), (2.0, 0.0, false));
        assert!(!loads.meets(1.2) && loads.ratio().is_infinite());
    }

    #[test]
    fn registry_adds_removes_and_closes_latecomers_while_draining() {
        let c = Connections::default();
        let shutdown = CancellationToken::new();
        let signals: Vec<_> = (0..3).map(|_| CloseSignal::default()).collect();
        let ids: Vec<_> = signals.iter().map(|s| c.register(s.clone(), &shutdown)).collect();
        c.unregister(ids[1]);
        assert_eq!(c.open(), 2);
        let (first, targets) = c.begin_drain().unwrap();
        assert_eq!(targets.len(), 2);
        assert!(c.begin_drain().is_none(), "one drain at a time");
        assert!(c.drain_goes_on(first));
        let late = CloseSignal::default();
        c.register(late.clone(), &shutdown);
        assert_eq!(late.frame(), (1012, "service restart"));
        assert!(late.is_closing());
        c.undrain();
        assert!(!c.drain_goes_on(first), "undrain stops the drain");
        let after = CloseSignal::default();
        c.register(after.clone(), &shutdown);
        assert!(!after.is_closing());
        // Once the gateway shuts down, a newcomer closes with 1001, drain or not.
        shutdown.cancel();
        let last = CloseSignal::default();
        c.register(last.clone(), &shutdown);
        assert_eq!(last.frame(), (1001, "gateway shutting down"));
        // Drained again while the first drain task still sleeps: only the new one goes on.
        let (second, _) = c.begin_drain().unwrap();
        assert!(c.drain_goes_on(second) && !c.drain_goes_on(first));
    }

    #[test]
    fn an_unhealthy_server_moves_only_movable_connections() {
        let c = Connections::default();
        let shutdown = CancellationToken::new();
        let (plain, session, closing) =
            (CloseSignal::default(), CloseSignal::default(), CloseSignal::default());
        session.mark_movable();
        closing.mark_movable();
        for s in [&plain, &session, &closing] {
            c.register(s.clone(), &shutdown);
        }
        assert!(closing.close(SERVICE_RESTART));
        assert_eq!(c.move_movable(), 1, "the closing one is not asked again");
        assert!(!plain.is_closing(), "a connection that cannot move stays");
        assert_eq!(session.migration(), Some(crate::plugin::ReattachReason::ServerGone));
        assert_eq!(session.frame(), (1012, "service restart"), "what it gets should the move fail");
        assert_eq!(closing.migration(), None);
    }

    #[test]
    fn a_refused_drain_changes_nothing() {
        let c = Connections::default();
        let (first, _) = c.begin_drain().unwrap();
        c.undrain();
        let (second, _) = c.begin_drain().unwrap();
        assert!(c.begin_drain().is_none());
        assert!(c.is_draining() && c.drain_goes_on(second), "the running drain is untouched");
        c.drain_finished(first);
        assert!(c.begin_drain().is_none(), "the end of an older drain does not count");
        c.drain_finished(second);
        let (third, _) = c.begin_drain().unwrap();
        assert!(c.drain_goes_on(third), "a finished drain may be asked again");
        c.undrain();
        assert!(!c.is_draining());
    }

    #[test]
    fn pace_spreads_or_uses_the_rate() {
        let spread = DrainPace { rate: None, spread: Duration::from_secs(10) };
        assert_eq!(spread.per_second(50), 5.0);
        assert_eq!(DrainPace { rate: Some(7.0), ..spread }.per_second(50), 7.0);
        assert!(DrainPace { rate: None, spread: Duration::ZERO }.per_second(50).is_infinite());
        // Paces so slow their pauses would overflow the clock are raised to MIN_RATE.
        assert_eq!(DrainPace { rate: Some(1e-300), ..spread }.per_second(50), MIN_RATE);
        assert_eq!(DrainPace { rate: None, spread: Duration::from_secs(u64::MAX) }.per_second(2), MIN_RATE);
    }
}
