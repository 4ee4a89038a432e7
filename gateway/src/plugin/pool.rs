//! The instances of one plugin version, shared by all connections.
//!
//! A call takes an idle instance for its duration and gives it back. An instance whose call
//! failed is dropped, not returned: after a trap its state cannot be trusted.
//!
//! New instances are made by the plugin's own thread (the refiller), never by a call:
//! instantiating and running `init` may take up to `INIT_TIMEOUT`, and a plugin whose later
//! `init`s are slow would otherwise stall the worker thread, and with it every connection on
//! that worker, whatever its route. A call that finds no idle instance asks the refiller for
//! one and waits for it, or for another call to give one back, at most its own deadline,
//! and not at all when making one takes longer than that (a moving average); then it fails
//! as `Unavailable` and the plugin's `on_error` decides. The plugin is loaded with one
//! instance made on the loading
//! thread (its `init` decides the hooks); the refiller then makes one per shard, and a new
//! one whenever a failed call dropped one.
//!
//! A plugin whose instances fail to start (their `init` errs, traps or times out) is not
//! restarted in a loop: the refiller waits 100 ms after the first failure, doubling up to
//! 30 s, and meanwhile calls that find no instance fail at once. A success resets it.
//! `GET /plugins` and `/metrics` show it.
//!
//! Idle instances are kept per thread (a shard for each of the first threads that call, in
//! practice the runtime's workers): a worker gets back the instance it used last, whose
//! store, stack and linear memory are still in its core's caches, and takes no lock another
//! core holds. One shared list made the instance and the list's lock move between cores on
//! almost every call; taking another shard's instance is the rare case.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, InstancePre};
use wasmtime::{Store, Trap};

use super::epoch;
use super::exports::{ExportIndices, Exports};
use super::host::{HostState, Limits, PluginEnv};
use super::types::{HookFlags, PluginError};
use crate::metrics::{Counter, Gauge};

/// Deadline for instantiation plus `init`: language runtimes may do real work there.
const INIT_TIMEOUT: Duration = Duration::from_secs(1);
/// Wait after the first failure to start an instance; doubled after each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub(super) struct Instance {
    pub store: Store<HostState>,
    pub exports: Exports,
}

pub(super) struct Pool {
    inner: Arc<Inner>,
}

/// What the calls and the refiller share.
struct Inner {
    pre: InstancePre<HostState>,
    indices: ExportIndices,
    env: Arc<PluginEnv>,
    config_json: String,
    memory_limit: usize,
    /// Idle instances kept per shard: `max_idle` spread over the shards.
    max_idle_per_shard: usize,
    shards: Box<[Shard]>,
    refill: Mutex<Refill>,
    /// The refiller waits on this for work.
    refill_wanted: Condvar,
    /// Calls without an instance wait on this: the refiller made one or gave up, or a call
    /// gave one back.
    news: Condvar,
    /// Calls waiting on `news`; `put` wakes them only when there are some.
    waiting: AtomicUsize,
    failures_total: Counter,
    backing_off: Gauge,
}

/// One thread's idle instances, on cache lines of their own (128 bytes: x86 prefetches
/// lines in pairs) so that threads using neighbouring shards do not share a line.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Vec<Instance>>);

/// The refiller's state, under `Inner::refill`.
#[derive(Default)]
struct Refill {
    /// Instances asked for and not made yet.
    wanted: usize,
    /// Failures to start an instance in a row, the last one's error, and until when the
    /// refiller rests because of them.
    failures: u32,
    last_error: Option<String>,
    resting_until: Option<Instant>,
    /// How long making an instance takes, a moving average: a call whose deadline is
    /// shorter does not wait for one it would not get in time.
    make_time: Duration,
    /// The plugin version is gone: the refiller ends.
    closed: bool,
}

impl Refill {
    fn resting(&self, now: Instant) -> Option<Duration> {
        self.resting_until.and_then(|t| t.checked_duration_since(now)).filter(|d| !d.is_zero())
    }
}

/// How instance starts are going, for `GET /plugins`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartHealth {
    /// Failures to start an instance in a row.
    pub failures: u32,
    /// How long the refiller still rests before trying again; 0 when it does not.
    pub backoff_ms: u64,
    pub last_error: Option<String>,
}

impl Pool {
    /// Makes the first instance on this thread (its `init` says which hooks the plugin
    /// has, and a failing one rejects the load), then starts the refiller, which makes one
    /// more instance per shard.
    pub fn new(
        pre: InstancePre<HostState>,
        indices: ExportIndices,
        env: Arc<PluginEnv>,
        config_json: String,
        memory_limit: usize,
        max_idle: usize,
    ) -> Result<(Pool, HookFlags), String> {
        // A shard per runtime worker (there are as many as cores by default), but no more
        // shards than instances may idle, so that each keeps at least one.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = cores.min(max_idle).max(1);
        let plugin = env.name.to_string();
        let labels = [("plugin", plugin.as_str())];
        let inner = Arc::new(Inner {
            failures_total: env.metrics.counter(
                "wasmgate_plugins_instance_failures_total",
                "Plugin instances that failed to start (instantiation or init).",
                &labels,
            ),
            backing_off: env.metrics.gauge(
                "wasmgate_plugins_backing_off",
                "1 while a plugin's instances keep failing to start and new ones wait.",
                &labels,
            ),
            pre,
            indices,
            env,
            config_json,
            memory_limit,
            max_idle_per_shard: (max_idle / shards).max(1),
            shards: (0..shards).map(|_| Shard::default()).collect(),
            refill: Mutex::new(Refill { wanted: shards - 1, ..Refill::default() }),
            refill_wanted: Condvar::new(),
            news: Condvar::new(),
            waiting: AtomicUsize::new(0),
        });
        let started = Instant::now();
        let (first, flags) = inner.make()?;
        lock(&inner.refill).make_time = started.elapsed();
        lock(&inner.shards[0].0).push(first);
        inner.backing_off.set(0.0);
        let refiller = inner.clone();
        std::thread::Builder::new()
            .name(format!("wasmgate-instances-{plugin}"))
            .spawn(move || refiller.run_refiller())
            .map_err(|e| format!("cannot start the thread that makes instances: {e}"))?;
        Ok((Pool { inner }, flags))
    }

    pub fn component(&self) -> &Component {
        self.inner.pre.component()
    }

    pub fn env(&self) -> &PluginEnv {
        &self.inner.env
    }

    /// An idle instance, this thread's own first. When there is none, asks the refiller for
    /// one and waits at most `wait` for it or for another call to give one back; not at all
    /// while instances keep failing to start.
    pub fn take(&self, wait: Duration) -> Result<Instance, PluginError> {
        let inner = &*self.inner;
        if let Some(instance) = inner.pop() {
            return Ok(instance);
        }
        let deadline = Instant::now() + wait;
        let mut refill = lock(&inner.refill);
        // Counted before looking again, under the lock `put` takes to wake us: an instance
        // given back after our look wakes us, one given back before it is found by it.
        let _waiting = Waiting::register(&inner.waiting);
        inner.want_one(&mut refill);
        loop {
            if let Some(instance) = inner.pop() {
                return Ok(instance);
            }
            let now = Instant::now();
            if let Some(rest) = refill.resting(now) {
                let why = refill.last_error.as_deref().unwrap_or("unknown");
                return Err(PluginError::Unavailable(format!(
                    "its instances keep failing to start ({why}); next try in {} ms",
                    rest.as_millis()
                )));
            }
            if refill.make_time > wait {
                return Err(PluginError::Unavailable(format!(
                    "no instance is ready, and making one takes about {} ms, more than the call's {wait:?}",
                    refill.make_time.as_millis()
                )));
            }
            let Some(left) = deadline.checked_duration_since(now) else {
                return Err(PluginError::Unavailable(format!("no instance was ready within {wait:?}")));
            };
            refill = inner.news.wait_timeout(refill, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Returns an instance after a successful call, to this thread's shard, and wakes the
    /// calls waiting for one (only the refiller's news would wake them otherwise, and it
    /// makes none while enough idle).
    pub fn put(&self, instance: Instance) {
        let inner = &*self.inner;
        {
            let mut idle = lock(&inner.shards[inner.home_shard()].0);
            if idle.len() < inner.max_idle_per_shard {
                idle.push(instance);
            }
        }
        if inner.waiting.load(Ordering::SeqCst) > 0 {
            let _refill = lock(&inner.refill);
            inner.news.notify_all();
        }
    }

    /// After a failed call dropped its instance: the refiller makes another, so the next
    /// call does not have to wait for it.
    pub fn replace_dropped(&self) {
        let inner = &*self.inner;
        inner.want_one(&mut lock(&inner.refill));
    }

    pub fn idle(&self) -> usize {
        self.inner.idle()
    }

    pub fn start_health(&self) -> StartHealth {
        let refill = lock(&self.inner.refill);
        StartHealth {
            failures: refill.failures,
            backoff_ms: refill.resting(Instant::now()).map_or(0, |d| d.as_millis() as u64),
            last_error: refill.last_error.clone(),
        }
    }

    /// Instantiates and calls `init` on this thread (benchmarks).
    #[cfg(test)]
    pub fn make(&self) -> Result<(Instance, HookFlags), String> {
        self.inner.make()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        lock(&self.inner.refill).closed = true;
        self.inner.refill_wanted.notify_one();
    }
}

impl Inner {
    /// Instances that may idle in all shards together.
    fn room(&self) -> usize {
        self.shards.len() * self.max_idle_per_shard
    }

    /// Asks the refiller for one more instance (never more than may idle).
    fn want_one(&self, refill: &mut Refill) {
        refill.wanted = (refill.wanted + 1).min(self.room());
        self.refill_wanted.notify_one();
    }

    fn pop(&self) -> Option<Instance> {
        let home = self.home_shard();
        let n = self.shards.len();
        (0..n).find_map(|i| lock(&self.shards[(home + i) % n].0).pop())
    }

    fn idle(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).len()).sum()
    }

    fn home_shard(&self) -> usize {
        thread_number() % self.shards.len()
    }

    /// The refiller: makes the instances asked for, resting after failures, until the
    /// plugin version is dropped.
    fn run_refiller(&self) {
        let mut refill = lock(&self.refill);
        loop {
            if refill.closed {
                return;
            }
            let now = Instant::now();
            if let Some(rest) = refill.resting(now) {
                refill = self.refill_wanted.wait_timeout(refill, rest).unwrap_or_else(|e| e.into_inner()).0;
                continue;
            }
            if refill.wanted == 0 || self.idle() >= self.room() {
                refill.wanted = 0;
                refill = self.refill_wanted.wait(refill).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            drop(refill);
            let started = Instant::now();
            let made = self.make();
            let took = started.elapsed();
            refill = lock(&self.refill);
            // Weight 1/4 on the new sample: a plugin whose starts turn slow is noticed in a
            // few, and one slow start does not condemn a fast plugin.
            refill.make_time = (refill.make_time * 3 + took) / 4;
            match made {
                Ok((instance, _)) => {
                    self.store_made(instance);
                    refill.wanted = refill.wanted.saturating_sub(1);
                    refill.failures = 0;
                    refill.resting_until = None;
                    self.backing_off.set(0.0);
                }
                Err(e) => {
                    refill.failures += 1;
                    let rest = FIRST_BACKOFF.saturating_mul(1 << (refill.failures - 1).min(16)).min(MAX_BACKOFF);
                    let plugin = &*self.env.name;
                    tracing::error!(target: "wasmgate::plugin", plugin, failures = refill.failures, ?rest, "an instance failed to start: {e}");
                    refill.last_error = Some(e);
                    refill.resting_until = Some(Instant::now() + rest);
                    self.failures_total.inc();
                    self.backing_off.set(1.0);
                }
            }
            // Waiting calls: an instance to take, or a failure to give up on.
            self.news.notify_all();
        }
    }

    /// Puts a new instance in the shard with the fewest idle.
    fn store_made(&self, instance: Instance) {
        let emptiest = self.shards.iter().min_by_key(|s| lock(&s.0).len()).expect("at least one shard");
        lock(&emptiest.0).push(instance);
    }

    /// Instantiates and calls `init`; the hooks it declared, or why it failed. A panic on
    /// the host side while doing so is a failure like a trap.
    fn make(&self) -> Result<(Instance, HookFlags), String> {
        catch_unwind(AssertUnwindSafe(|| self.make_inner())).unwrap_or_else(|panic| {
            Err(format!("the host panicked while starting an instance: {}", super::hooks::panic_text(&*panic)))
        })
    }

    fn make_inner(&self) -> Result<(Instance, HookFlags), String> {
        let state = HostState::new(self.env.clone(), self.memory_limit);
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(epoch::on_epoch);
        let _running = self.env.ticking.running();
        epoch::set_budget(&mut store, INIT_TIMEOUT);
        let instance = self.pre.instantiate(&mut store).map_err(|e| {
            format!("instantiation failed: {}", classify(e, &store.data().limits, INIT_TIMEOUT))
        })?;
        let exports = Exports::load(&self.indices, &mut store, &instance)
            .map_err(|e| format!("its hooks do not match the wasmgate:plugin WIT: {e:#}"))?;
        let hooks = exports
            .init(&mut store, &self.config_json)
            .map_err(|e| format!("init failed: {}", classify(e, &store.data().limits, INIT_TIMEOUT)))?
            .map_err(|refusal| format!("init refused the configuration: {refusal}"))?;
        store.data_mut().commit_metrics();
        Ok((Instance { store, exports }, hooks))
    }
}

/// A call counted in `Inner::waiting` for as long as it waits, whichever way it returns.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn register(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The pool's locks guard plain lists and counters that a panic cannot leave half-changed,
/// so a poisoned lock is taken as it is rather than failing every later call.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Threads numbered in the order they first call a plugin, so the first few (the
/// runtime's workers) land on different shards.
fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed));
    NUMBER.with(|n| *n)
}

/// What a failed call's error means for the caller.
pub(super) fn classify(err: wasmtime::Error, limits: &Limits, timeout: Duration) -> PluginError {
    if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return PluginError::Timeout(timeout);
    }
    if limits.memory_exceeded {
        return PluginError::MemoryLimit(limits.memory);
    }
    // The root cause is the trap or the host function's message; the context around it is
    // a wasm backtrace, which the log gets at debug level.
    tracing::debug!(target: "wasmgate::plugin", "plugin call failed: {err:?}");
    PluginError::Trap(err.root_cause().to_string())
}
