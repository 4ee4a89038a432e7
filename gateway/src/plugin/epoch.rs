//! Deadlines of plugin calls: a thread advances the engine's epoch, and at each advance a
//! running call compares the clock with its deadline (`HostState::deadline`).
//!
//! The thread ticks every `EPOCH_TICK` only while some call runs. With none running it
//! sleeps longer (`IDLE_TICK`, or the shortest deadline a plugin has, if shorter), so a call
//! that starts meanwhile is looked at before its deadline passes, and from then on every
//! millisecond: a call is stopped within `EPOCH_TICK` after its deadline either way. On a
//! gateway busy with short calls, a wake-up every millisecond took a worker's core from it a
//! thousand times a second, about 4 µs of each new connection on a plugin route
//! (BENCHMARKS.md, "Reconnect cost, fourth round").

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

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

/// Gives the call about to start on `store` until `deadline`; the epoch callback
/// (`on_epoch`) checks it at every advance.
pub(super) fn set_deadline(store: &mut wasmtime::Store<HostState>, deadline: Instant) {
    store.data_mut().deadline = deadline;
    store.set_epoch_deadline(1);
}

/// At an epoch advance during a call: go on until the next one, or stop the call when its
/// deadline has passed. Time the call waited on Redis is not the plugin's: the deadline moves
/// by that much first.
pub(super) fn on_epoch(mut ctx: StoreContextMut<'_, HostState>) -> wasmtime::Result<UpdateDeadline> {
    let state = ctx.data_mut();
    state.deadline += std::mem::take(&mut state.redis.waited);
    Ok(match Instant::now() < state.deadline {
        true => UpdateDeadline::Continue(1),
        false => UpdateDeadline::Interrupt,
    })
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
