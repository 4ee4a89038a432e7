//! Deadlines of plugin calls, in running time: a thread advances the engine's epoch every
//! `EPOCH_TICK` while some call runs, and a running call is charged one tick each time it
//! sees an advance (`on_epoch`). It is stopped when its ticks reach its timeout.
//!
//! Only a call that runs sees advances: while its worker is descheduled (a machine busy with
//! a reconnect storm, a VM's stolen time) or it waits in a host function, the epoch moves
//! on, but the call sees that as one advance when it runs again. So a call is charged at
//! most one tick for each time it was off the CPU, and healthy calls are not failed because
//! the machine was busy. Measured against the clock, as before, a storm on two cores timed
//! out about one handshake call in 4,000 (each costing the plugin its instance and with it
//! jwt-auth's cache of verified tokens), and a process stopped for 80 ms failed every call
//! in progress (`containment.rs`, `deadlines_count_running_time_not_time_descheduled`).
//!
//! The thread ticks every `EPOCH_TICK` only while some call runs. With none running it
//! sleeps longer (`IDLE_TICK`, or the shortest deadline a plugin has, if shorter), so a call
//! that starts meanwhile sees its first advance up to that much later, and from then on
//! every millisecond: a call that computes without pause is stopped between its timeout and
//! its timeout plus the idle tick. On a gateway busy with short calls, a wake-up every
//! millisecond took a worker's core from it a thousand times a second, about 4 µs of each
//! new connection on a plugin route (BENCHMARKS.md, "Reconnect cost, fourth round").

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use wasmtime::{Engine, StoreContextMut, UpdateDeadline};

use super::host::HostState;

/// How often the epoch advances while a call runs: how late past its deadline a call may be
/// stopped.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How often it advances at most while no call runs.
const IDLE_TICK: Duration = Duration::from_millis(5);

/// Keeps the epoch thread running while the runtime or any plugin loaded from it is alive:
/// without it no deadline would ever pass.
#[derive(Clone)]
pub(super) struct Ticking {
    state: Arc<TickState>,
}

struct TickState {
    running: Running,
    /// The idle tick in nanoseconds: `IDLE_TICK`, or the shortest deadline covered.
    idle_tick_ns: AtomicU64,
}

/// Calls running now, on a cache line of its own: every call on every worker counts itself.
#[repr(align(128))]
struct Running(AtomicUsize);

impl Ticking {
    pub(super) fn start(engine: Engine) -> std::io::Result<Ticking> {
        let state = Arc::new(TickState {
            running: Running(AtomicUsize::new(0)),
            idle_tick_ns: AtomicU64::new(IDLE_TICK.as_nanos() as u64),
        });
        let weak: Weak<TickState> = Arc::downgrade(&state);
        std::thread::Builder::new().name("wasmgate-epoch".into()).spawn(move || {
            while let Some(state) = weak.upgrade() {
                let tick = match state.running.0.load(Ordering::Relaxed) {
                    0 => Duration::from_nanos(state.idle_tick_ns.load(Ordering::Relaxed)),
                    _ => EPOCH_TICK,
                };
                drop(state);
                std::thread::sleep(tick);
                engine.increment_epoch();
            }
        })?;
        Ok(Ticking { state })
    }

    /// Makes the idle tick no longer than `deadline`, so that a call with that deadline is
    /// looked at before it passes.
    pub(super) fn cover(&self, deadline: Duration) {
        let ns = deadline.max(EPOCH_TICK).as_nanos().min(u64::MAX as u128) as u64;
        self.state.idle_tick_ns.fetch_min(ns, Ordering::Relaxed);
    }

    /// Counts a call as running until the guard is dropped.
    pub(super) fn running(&self) -> RunningCall<'_> {
        self.state.running.0.fetch_add(1, Ordering::Relaxed);
        RunningCall(&self.state.running.0)
    }

    #[cfg(test)]
    fn idle_tick(&self) -> Duration {
        Duration::from_nanos(self.state.idle_tick_ns.load(Ordering::Relaxed))
    }
}

pub(super) struct RunningCall<'a>(&'a AtomicUsize);

impl Drop for RunningCall<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Gives the call about to start on `store` a budget of `timeout` of running time; the epoch
/// callback (`on_epoch`) charges it.
pub(super) fn set_budget(store: &mut wasmtime::Store<HostState>, timeout: Duration) {
    store.data_mut().ticks_left = ticks_for(timeout);
    store.set_epoch_deadline(1);
}

/// The ticks a call of `timeout` may see. One more than the timeout's whole ticks: the first
/// advance a call sees may come at once after it started, and a call must have had at least
/// its timeout before it is stopped.
fn ticks_for(timeout: Duration) -> u32 {
    let whole = timeout.as_nanos().div_ceil(EPOCH_TICK.as_nanos());
    (whole + 1).min(u32::MAX as u128) as u32
}

/// At an epoch advance the running call sees: charge it a tick, and stop it when it has none
/// left. An advance seen after a wait on Redis is not charged: the wait is not the plugin's
/// time, and it is why the call saw the advance.
pub(super) fn on_epoch(mut ctx: StoreContextMut<'_, HostState>) -> wasmtime::Result<UpdateDeadline> {
    let state = ctx.data_mut();
    let waited = std::mem::take(&mut state.redis.waited);
    Ok(charge(&mut state.ticks_left, waited))
}

fn charge(ticks_left: &mut u32, waited: bool) -> UpdateDeadline {
    if !waited {
        *ticks_left = ticks_left.saturating_sub(1);
    }
    match *ticks_left {
        0 => UpdateDeadline::Interrupt,
        _ => UpdateDeadline::Continue(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_tick_covers_the_shortest_deadline() {
        let ticking = Ticking::start(Engine::default()).unwrap();
        assert_eq!(ticking.idle_tick(), IDLE_TICK);
        ticking.cover(Duration::from_millis(20));
        assert_eq!(ticking.idle_tick(), IDLE_TICK);
        ticking.cover(Duration::from_millis(2));
        assert_eq!(ticking.idle_tick(), Duration::from_millis(2));
        ticking.cover(Duration::ZERO);
        assert_eq!(ticking.idle_tick(), EPOCH_TICK, "never shorter than the busy tick");
    }

    #[test]
    fn a_call_may_see_one_tick_more_than_its_timeout() {
        assert_eq!(ticks_for(Duration::from_millis(20)), 21);
        assert_eq!(ticks_for(Duration::from_micros(2500)), 4);
        assert_eq!(ticks_for(Duration::ZERO), 1);
        assert_eq!(ticks_for(Duration::MAX), u32::MAX);
    }

    #[test]
    fn each_advance_seen_costs_a_tick_unless_it_follows_a_redis_wait() {
        let mut left = ticks_for(Duration::from_millis(2));
        assert!(matches!(charge(&mut left, false), UpdateDeadline::Continue(1)));
        assert!(matches!(charge(&mut left, true), UpdateDeadline::Continue(1)), "a wait is free");
        assert!(matches!(charge(&mut left, false), UpdateDeadline::Continue(1)));
        assert!(matches!(charge(&mut left, false), UpdateDeadline::Interrupt));
        assert!(matches!(charge(&mut left, false), UpdateDeadline::Interrupt), "and stays stopped");
    }

    #[test]
    fn calls_count_while_they_run() {
        let ticking = Ticking::start(Engine::default()).unwrap();
        let count = || ticking.state.running.0.load(Ordering::Relaxed);
        let a = ticking.running();
        let b = ticking.running();
        assert_eq!(count(), 2);
        drop(a);
        drop(b);
        assert_eq!(count(), 0);
    }
}
