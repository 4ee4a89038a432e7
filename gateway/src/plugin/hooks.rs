//! A loaded plugin version and its hook calls.
//!
//! A call runs on the caller's thread: take an instance, lend it the connection, set the
//! deadline, call, check the answer, give the instance back. Failures are counted per kind
//! and returned for the caller to apply the plugin's `on_error`.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use wasmtime::component::{Component, InstancePre};

use super::engine::PluginSpec;
use super::epoch;
use super::exports::{ExportIndices, Exports};
use super::host::{ConnGuard, HostState, PluginEnv};
use super::pool::{classify, Pool};
use super::session::{Outgoing, ReattachReason};
use super::validate;
use super::verdicts::{Kept, VerdictCache};
use super::types::{
    Accept, Action, Candidate, ConnContext, ConnStats, Direction, HandshakeInput, HookFlags,
    Hooks, OnError, Opcode, PluginError, PoolInfo, Verdict,
};
use crate::metrics::{Counter, Histogram, Registry};

pub struct Plugin {
    spec: PluginSpec,
    hash: String,
    loaded_at: SystemTime,
    hooks: Hooks,
    /// The component exports `resume.on-reattach`.
    has_resume: bool,
    pub(super) pool: Pool,
    stats: Stats,
    /// Handshake verdicts kept to be given again without a call, when the plugin declared
    /// what they depend on and the operator left room for them.
    verdicts: Option<VerdictCache>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.spec.name)
            .field("hash", &self.hash)
            .field("hooks", &self.hooks)
            .finish_non_exhaustive()
    }
}

/// Counters of one plugin, in the metrics registry so they survive reloads of the plugin.
struct Stats {
    handshake: Counter,
    select: Counter,
    message: Counter,
    reattach: Counter,
    close: Counter,
    trap: Counter,
    timeout: Counter,
    memory: Counter,
    unavailable: Counter,
    invalid: Counter,
    /// Call time by hook: handshake, select, message, close, reattach.
    call_seconds: [Histogram; 5],
}

/// Upper bounds (seconds) of plugin call times: a few microseconds for a small hook, up to
/// the default deadlines (5 ms for messages, 20 ms for the rest) and past them.
pub const CALL_BUCKETS: &[f64] =
    &[0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05];

/// Indexes of `Stats::call_seconds`.
const HANDSHAKE: usize = 0;
const SELECT: usize = 1;
const MESSAGE: usize = 2;
const CLOSE: usize = 3;
const REATTACH: usize = 4;

impl Stats {
    fn new(metrics: &Registry, plugin: &str) -> Stats {
        let calls = |hook| {
            metrics.counter(
                "wasmgate_plugins_calls_total",
                "Hook calls into plugins.",
                &[("plugin", plugin), ("hook", hook)],
            )
        };
        let errors = |kind| {
            metrics.counter(
                "wasmgate_plugins_errors_total",
                "Hook calls that failed, by why.",
                &[("plugin", plugin), ("kind", kind)],
            )
        };
        let time = |hook| {
            metrics.histogram(
                "wasmgate_plugin_call_seconds",
                "Time of hook calls into plugins, waiting for an instance included",
                &[("plugin", plugin), ("hook", hook)],
                CALL_BUCKETS,
            )
        };
        Stats {
            call_seconds: [time("handshake"), time("select"), time("message"), time("close"), time("reattach")],
            handshake: calls("handshake"),
            select: calls("select"),
            message: calls("message"),
            reattach: calls("reattach"),
            close: calls("close"),
            trap: errors("trap"),
            timeout: errors("timeout"),
            memory: errors("memory"),
            unavailable: errors("unavailable"),
            invalid: errors("invalid"),
        }
    }

    fn count_error(&self, e: &PluginError) {
        match e {
            PluginError::Trap(_) => self.trap.inc(),
            PluginError::Timeout(_) => self.timeout.inc(),
            PluginError::MemoryLimit(_) => self.memory.inc(),
            PluginError::Unavailable(_) => self.unavailable.inc(),
            PluginError::InvalidResult(_) => self.invalid.inc(),
            PluginError::NotImplemented(_) => {}
        }
    }
}

/// A plugin as the admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub wasm_path: PathBuf,
    /// Hex SHA-256 of the wasm file.
    pub hash: String,
    /// When this version was loaded, ms since the Unix epoch.
    pub loaded_at_ms: u64,
    pub hooks: Hooks,
    /// Since the gateway started, over all versions of the plugin.
    pub calls: u64,
    pub errors: u64,
    pub traps: u64,
    pub timeouts: u64,
    pub memory_limit_hits: u64,
    /// Ready instances waiting for a call.
    pub idle_instances: usize,
    /// Instances that failed to start in a row; while it is not 0, new instances wait
    /// `instance_backoff_ms` (100 ms doubling to 30 s) and calls that find no idle one fail.
    pub instance_failures: u32,
    pub instance_backoff_ms: u64,
    pub last_instance_error: Option<String>,
    /// Series of the plugin's own metrics on `/metrics`, and the most it may have.
    pub metric_series: usize,
    pub max_metric_series: usize,
    /// Keys and bytes the plugin holds in the kv store, and its share.
    pub kv_keys: usize,
    pub kv_bytes: usize,
    pub kv_max_keys: usize,
    pub kv_max_bytes: usize,
}

impl Plugin {
    pub(super) fn new(
        spec: PluginSpec,
        hash: String,
        pre: InstancePre<HostState>,
        indices: ExportIndices,
        env: Arc<PluginEnv>,
        metrics: &Registry,
    ) -> anyhow::Result<Arc<Plugin>> {
        let hooks_found = indices.clone();
        let (pool, flags) = Pool::new(
            pre,
            indices,
            env,
            spec.config_json.clone(),
            spec.memory_limit,
            spec.max_instances.max(1),
        )
        .map_err(anyhow::Error::msg)?;
        let hooks = effective_hooks(&spec.name, &hooks_found, flags);
        let has_resume = hooks_found.has_resume();
        let verdicts = match pool.env().vary_on.get() {
            Some(parts) if spec.verdict_cache_size > 0 && hooks.handshake => Some(VerdictCache::new(
                parts.clone(),
                spec.verdict_cache_size,
                spec.verdict_cache_max_bytes,
                spec.verdict_cache_max_ttl,
                metrics,
                &spec.name,
            )),
            _ => None,
        };
        Ok(Arc::new(Plugin {
            verdicts,
            stats: Stats::new(metrics, &spec.name),
            spec,
            hash,
            loaded_at: SystemTime::now(),
            hooks,
            has_resume,
            pool,
        }))
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Hex SHA-256 of the wasm file this version was loaded from.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn spec(&self) -> &PluginSpec {
        &self.spec
    }

    pub(super) fn component(&self) -> &Component {
        self.pool.component()
    }

    /// The hooks worth calling: exported by the component and declared by `init`. A hook
    /// outside these is answered without entering Wasm (see each method).
    pub fn hooks(&self) -> Hooks {
        self.hooks
    }

    pub fn on_error(&self) -> Option<OnError> {
        self.spec.on_error
    }

    /// Without the hook: `Accept` with no changes.
    pub fn on_handshake(
        &self,
        conn: &ConnContext,
        req: &dyn HandshakeInput,
    ) -> Result<Verdict, PluginError> {
        if !self.hooks.handshake {
            return Ok(Verdict::Accept(Accept::default()));
        }
        let lookup = match &self.verdicts {
            Some(cache) => match cache.find(conn, req) {
                Ok(kept) => return Ok(Verdict::Accept(kept)),
                Err(at) => Some(at),
            },
            None => None,
        };
        self.stats.handshake.inc();
        let (verdict, record) = self.call(
            HANDSHAKE,
            conn,
            self.spec.handshake_timeout,
            |guard, exports| {
                let mut guard = guard.for_handshake(lookup.is_some());
                let verdict = exports.on_handshake(guard.store, req.record())?;
                Some(verdict.map(|v| (v, guard.take_handshake_record())))
            },
        )?;
        let verdict = self.checked(validate::verdict(&verdict).map(|()| verdict))?;
        if let (Verdict::Accept(accept), Some(cache), Some(at), Some(ttl)) = (&verdict, &self.verdicts, lookup, record.keep) {
            cache.keep(at, Kept { accept: accept.clone(), meta: record.meta }, ttl);
        }
        Ok(verdict)
    }

    /// Indexes into `candidates` (servers of `pool`), best first. Without the hook:
    /// `NotImplemented`, so the caller uses its own balancing.
    pub fn select(
        &self,
        conn: &ConnContext,
        pool: &PoolInfo,
        candidates: &[Candidate],
    ) -> Result<Vec<u32>, PluginError> {
        if !self.hooks.balancer {
            return Err(PluginError::NotImplemented("select"));
        }
        self.stats.select.inc();
        let order = self.call(
            SELECT,
            conn,
            self.spec.handshake_timeout,
            |guard, exports| exports.select(guard.with_pool(pool).store, candidates),
        )?;
        let checked = match order.iter().find(|&&i| i as usize >= candidates.len()) {
            Some(i) => Err(format!(
                "select returned index {i} for {} candidates",
                candidates.len()
            )),
            None => Ok(order),
        };
        self.checked(checked)
    }

    /// Without the hook: forward unchanged.
    pub fn on_message(
        &self,
        conn: &ConnContext,
        dir: Direction,
        op: Opcode,
        payload: &[u8],
    ) -> Result<Action, PluginError> {
        if !self.hooks.messages {
            return Ok(Action::FORWARD);
        }
        self.stats.message.inc();
        let action = self.call(
            MESSAGE,
            conn,
            self.spec.message_timeout,
            |guard, exports| {
                let mut guard = guard.with_message(payload, dir == Direction::ClientToUpstream, op);
                let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
                let wire = exports.on_message(guard.store, dir, op, len)?;
                let edits = guard.take_edits();
                Some(wire.map(|w| Action::from_wire(w, edits.payload, edits.close_reason, payload)))
            },
        )?;
        self.checked(action.check(op).map(|()| action))
    }

    /// The connection moved to `server`: messages to send it before the replay. Without the
    /// hook (or its export): none.
    pub fn on_reattach(&self, conn: &ConnContext, reason: ReattachReason, server: &str) -> Result<Vec<Outgoing>, PluginError> {
        if !self.hooks.session || !self.has_resume {
            return Ok(Vec::new());
        }
        self.stats.reattach.inc();
        let outgoing = self.call(REATTACH, conn, self.spec.handshake_timeout, |guard, exports| {
            exports.on_reattach(guard.store, reason, server)
        })?;
        let bad = outgoing.iter().find(|o| o.op == Opcode::Text && std::str::from_utf8(&o.payload).is_err());
        self.checked(match bad {
            Some(_) => Err("on-reattach returned a text message that is not UTF-8".to_string()),
            None => Ok(outgoing),
        })
    }

    /// Failures are counted and logged; there is nothing left to decide.
    pub fn on_close(&self, conn: &ConnContext, code: u16, stats: ConnStats) {
        if !self.hooks.close {
            return;
        }
        self.stats.close.inc();
        let done = self.call(
            CLOSE,
            conn,
            self.spec.handshake_timeout,
            |guard, exports| Some(exports.on_close(guard.store, code, stats)),
        );
        if let Err(e) = done {
            tracing::warn!(target: "wasmgate::plugin", plugin = self.name(), conn = conn.id, "on-close {e}");
        }
    }

    pub fn info(&self) -> PluginInfo {
        let s = &self.stats;
        let errors = [&s.trap, &s.timeout, &s.memory, &s.unavailable, &s.invalid];
        let (metric_series, max_metric_series) = self.pool.env().metric_series();
        let (kv_keys, kv_bytes) = self.pool.env().kv_used();
        let starts = self.pool.start_health();
        PluginInfo {
            name: self.spec.name.clone(),
            wasm_path: self.spec.wasm_path.clone(),
            hash: self.hash.clone(),
            loaded_at_ms: self
                .loaded_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            hooks: self.hooks,
            calls: [&s.handshake, &s.select, &s.message, &s.reattach, &s.close]
                .iter()
                .map(|c| c.get())
                .sum(),
            errors: errors.iter().map(|c| c.get()).sum(),
            traps: s.trap.get(),
            timeouts: s.timeout.get(),
            memory_limit_hits: s.memory.get(),
            idle_instances: self.pool.idle(),
            instance_failures: starts.failures,
            instance_backoff_ms: starts.backoff_ms,
            last_instance_error: starts.last_error,
            metric_series,
            max_metric_series,
            kv_keys,
            kv_bytes,
            kv_max_keys: self.spec.kv_max_keys,
            kv_max_bytes: self.spec.kv_max_bytes,
        }
    }

    /// Runs one export on a pooled instance with `conn` lent to it, within `timeout` (which
    /// also bounds the wait for an instance); `f` may lend more through the guard. `f`
    /// answers `None` when the export is missing, which `hooks` rules out.
    fn call<'l, R>(
        &self,
        hook: usize,
        conn: &'l ConnContext,
        timeout: Duration,
        f: impl FnOnce(ConnGuard<'_, 'l>, &Exports) -> Option<wasmtime::Result<R>>,
    ) -> Result<R, PluginError> {
        let started = Instant::now();
        let result = self.call_timed(conn, timeout, f);
        self.stats.call_seconds[hook].observe(started.elapsed().as_secs_f64());
        result
    }

    fn call_timed<'l, R>(
        &self,
        conn: &'l ConnContext,
        timeout: Duration,
        f: impl FnOnce(ConnGuard<'_, 'l>, &Exports) -> Option<wasmtime::Result<R>>,
    ) -> Result<R, PluginError> {
        let mut instance = self
            .pool
            .take(timeout)
            .inspect_err(|e| self.stats.count_error(e))?;
        // The wait for an instance is not the plugin's time: its budget starts now.
        let _running = self.pool.env().ticking.running();
        epoch::set_budget(&mut instance.store, timeout);
        // A panic on the host side of the call (in a host function or in wasmtime itself)
        // fails this call like a trap; the instance it left in an unknown state is dropped.
        let called = catch_unwind(AssertUnwindSafe(|| {
            f(HostState::enter(&mut instance.store, conn), &instance.exports)
        }));
        let result = match called {
            Ok(result) => result.expect("hooks() only lists exported hooks"),
            Err(panic) => {
                let err = PluginError::Trap(format!("the host panicked during the call: {}", panic_text(&*panic)));
                tracing::error!(target: "wasmgate::plugin", plugin = self.name(), conn = conn.id, "{err}");
                self.stats.count_error(&err);
                self.pool.replace_dropped();
                return Err(err);
            }
        };
        match result {
            Ok(r) => {
                instance.store.data_mut().commit_metrics();
                self.pool.put(instance);
                Ok(r)
            }
            Err(e) => {
                let err = classify(e, &instance.store.data().limits, timeout);
                self.stats.count_error(&err);
                drop(instance);
                self.pool.replace_dropped();
                Err(err)
            }
        }
    }

    /// Counts an answer that breaks the contract. The instance went back to the pool: its
    /// state is fine, only its answer is not.
    fn checked<T>(&self, answer: Result<T, String>) -> Result<T, PluginError> {
        answer.map_err(|m| {
            let e = PluginError::InvalidResult(m);
            self.stats.count_error(&e);
            e
        })
    }
}

/// The message a panic carried, when it is text.
pub fn panic_text(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Declared hooks whose interface the component does not export are ignored, with a warning.
fn effective_hooks(name: &str, idx: &ExportIndices, flags: HookFlags) -> Hooks {
    let declared = |flag| flags & flag == flag;
    let usable = |flag, exported: bool, interface: &str| {
        if declared(flag) && !exported {
            tracing::warn!(target: "wasmgate::plugin", plugin = name, "init declares the {interface} hook but the component does not export it");
        }
        declared(flag) && exported
    };
    Hooks {
        handshake: usable(HookFlags::HANDSHAKE, idx.has_handshake(), "handshake"),
        balancer: usable(HookFlags::BALANCER, idx.has_balancer(), "balancer"),
        messages: usable(HookFlags::MESSAGES, idx.has_messages(), "messages"),
        close: declared(HookFlags::CLOSE),
        session: declared(HookFlags::SESSION),
    }
}
