//! The instances of one plugin version, shared by all connections.
//!
//! A call takes an idle instance for its duration and gives it back; when none is idle a
//! fresh one is made (instantiated from the pre-linked component, then `init`), so a burst
//! costs instantiations, never waiting. At most `max_idle` are kept. An instance whose call
//! failed is dropped, not returned: after a trap its state cannot be trusted.

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
    max_idle: usize,
    idle: Mutex<Vec<Instance>>,
}

impl Pool {
    pub fn new(
        pre: InstancePre<HostState>,
        indices: ExportIndices,
        env: Arc<PluginEnv>,
        config_json: String,
        memory_limit: usize,
        max_idle: usize,
    ) -> Pool {
        Pool {
            pre,
            indices,
            env,
            config_json,
            memory_limit,
            max_idle,
            idle: Mutex::new(Vec::with_capacity(max_idle)),
        }
    }

    pub fn component(&self) -> &Component {
        self.pre.component()
    }

    pub fn indices(&self) -> &ExportIndices {
        &self.indices
    }

    /// An idle instance, or a fresh one.
    pub fn take(&self) -> Result<Instance, PluginError> {
        if let Some(instance) = self.idle.lock().unwrap().pop() {
            return Ok(instance);
        }
        self.make()
            .map(|(instance, _)| instance)
            .map_err(PluginError::Unavailable)
    }

    /// Returns an instance after a successful call.
    pub fn put(&self, instance: Instance) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < self.max_idle {
            idle.push(instance);
        }
    }

    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap().len()
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
        Ok((Instance { store, exports }, hooks))
    }
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
