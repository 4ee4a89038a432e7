//! The instances of one plugin version, shared by all connections.
//!
//! A call takes an idle instance for its duration and gives it back; when none is idle a
//! fresh one is made (instantiated from the pre-linked component, then `init`), so a burst
//! costs instantiations, never waiting. At most `max_idle` are kept. An instance whose call
//! failed is dropped, not returned: after a trap its state cannot be trusted.
//!
//! Idle instances are kept per thread (a shard for each of the first threads that call, in
//! practice the runtime's workers): a worker gets back the instance it used last, whose
//! store, stack and linear memory are still in its core's caches, and takes no lock another
//! core holds. One shared list made the instance and the list's lock move between cores on
//! almost every call; taking another shard's instance (before making one) is the rare case.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, InstancePre};
use wasmtime::{Store, Trap};

use super::engine::deadline_ticks;
use super::exports::{ExportIndices, Exports};
use super::host::{HostState, Limits, PluginEnv};
use super::types::{HookFlags, PluginError};

/// Deadline for instantiation plus `init`: language runtimes may do real work there.
const INIT_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) struct Instance {
    pub store: Store<HostState>,
    pub exports: Exports,
}

pub(super) struct Pool {
    pre: InstancePre<HostState>,
    indices: ExportIndices,
    env: Arc<PluginEnv>,
    config_json: String,
    memory_limit: usize,
    /// Idle instances kept per shard: `max_idle` spread over the shards.
    max_idle_per_shard: usize,
    shards: Box<[Shard]>,
}

/// One thread's idle instances, on cache lines of their own (128 bytes: x86 prefetches
/// lines in pairs) so that threads using neighbouring shards do not share a line.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Vec<Instance>>);

impl Pool {
    pub fn new(
        pre: InstancePre<HostState>,
        indices: ExportIndices,
        env: Arc<PluginEnv>,
        config_json: String,
        memory_limit: usize,
        max_idle: usize,
    ) -> Pool {
        // A shard per runtime worker (there are as many as cores by default), but no more
        // shards than instances may idle, so that each keeps at least one.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = cores.min(max_idle).max(1);
        Pool {
            pre,
            indices,
            env,
            config_json,
            memory_limit,
            max_idle_per_shard: (max_idle / shards).max(1),
            shards: (0..shards).map(|_| Shard::default()).collect(),
        }
    }

    pub fn component(&self) -> &Component {
        self.pre.component()
    }

    pub fn indices(&self) -> &ExportIndices {
        &self.indices
    }

    pub fn env(&self) -> &PluginEnv {
        &self.env
    }

    /// An idle instance, this thread's own first, or a fresh one.
    pub fn take(&self) -> Result<Instance, PluginError> {
        let home = self.home_shard();
        let n = self.shards.len();
        for i in 0..n {
            if let Some(instance) = self.shards[(home + i) % n].0.lock().unwrap().pop() {
                return Ok(instance);
            }
        }
        self.make()
            .map(|(instance, _)| instance)
            .map_err(PluginError::Unavailable)
    }

    /// Keeps the instance made at load (on a blocking thread, which must not be numbered:
    /// numbers are for the threads that make calls).
    pub fn put_first(&self, instance: Instance) {
        self.shards[0].0.lock().unwrap().push(instance);
    }

    /// Returns an instance after a successful call, to this thread's shard.
    pub fn put(&self, instance: Instance) {
        let mut idle = self.shards[self.home_shard()].0.lock().unwrap();
        if idle.len() < self.max_idle_per_shard {
            idle.push(instance);
        }
    }

    pub fn idle(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().unwrap().len()).sum()
    }

    fn home_shard(&self) -> usize {
        thread_number() % self.shards.len()
    }

    /// Instantiates and calls `init`; the hooks it declared, or why it failed.
    pub fn make(&self) -> Result<(Instance, HookFlags), String> {
        let state = HostState::new(self.env.clone(), self.memory_limit);
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(deadline_ticks(INIT_TIMEOUT));
        let instance = self.pre.instantiate(&mut store).map_err(|e| {
            format!(
                "instantiation failed: {}",
                classify(e, &store.data().limits, INIT_TIMEOUT)
            )
        })?;
        let exports = Exports::load(&self.indices, &mut store, &instance)
            .map_err(|e| format!("its hooks do not match the wasmgate:plugin WIT: {e:#}"))?;
        let hooks = exports
            .init(&mut store, &self.config_json)
            .map_err(|e| {
                format!(
                    "init failed: {}",
                    classify(e, &store.data().limits, INIT_TIMEOUT)
                )
            })?
            .map_err(|refusal| format!("init refused the configuration: {refusal}"))?;
        store.data_mut().commit_metrics();
        Ok((Instance { store, exports }, hooks))
    }
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
