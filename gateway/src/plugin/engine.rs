//! The plugin runtime: one wasmtime engine per gateway with its linker, compile cache, shared
//! kv store and the thread that drives epoch deadlines; and loading a plugin from a spec.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::Imports;
use super::cache::{sha256_hex, CompileCache};
use super::epoch::Ticking;
use super::exports::ExportIndices;
use super::hooks::Plugin;
use super::host::{HostState, PluginEnv};
use super::kv::Kv;
use super::shared_kv::{PluginKv, SharedKv};
use super::plugin_metrics::Namespaces;
use super::types::OnError;
use super::wasi;
use crate::metrics::Registry;

/// Engine-wide limits. The pooling allocator reserves address space (not memory) for
/// `max_instances` instances up front.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// Where compiled plugins are cached; `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// Instances alive at once, all plugins together (idle, busy, and being replaced).
    pub max_instances: u32,
    /// Ceiling for any plugin's `memory_limit`.
    pub max_memory_size: usize,
    /// Elements per table; interpreted languages' components have large function tables.
    pub max_table_elements: usize,
    /// The kv store in Redis, when the gateway is in a `[cluster]`.
    pub shared_kv: Option<Arc<crate::cluster::RemoteKv>>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            cache_dir: None,
            max_instances: 1000,
            max_memory_size: 1 << 30,
            max_table_elements: 100_000,
            shared_kv: None,
        }
    }
}

/// One plugin as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginSpec {
    pub name: String,
    pub wasm_path: PathBuf,
    /// Handed to `init`.
    pub config_json: String,
    /// `None`: per-hook default (handshake and messages deny, balancer fallback).
    pub on_error: Option<OnError>,
    /// Deadline of each handshake, select and close call.
    pub handshake_timeout: Duration,
    /// Deadline of each on-message call.
    pub message_timeout: Duration,
    /// Linear memory cap per instance, in bytes.
    pub memory_limit: usize,
    /// Idle instances kept; more are made when all are busy, and dropped when returned.
    pub max_instances: usize,
    /// Series the plugin's own metrics may have on `/metrics`.
    pub max_metric_series: usize,
    /// The plugin's share of the kv store: keys, and bytes (keys, values and 64 per entry).
    pub kv_max_keys: usize,
    pub kv_max_bytes: usize,
    /// With a cluster, what kv calls do while Redis is away.
    pub kv_unavailable: crate::cluster::KvUnavailable,
    /// Handshake verdicts kept for the plugin (`verdicts`), 0 for none, and for how long
    /// at most.
    pub verdict_cache_size: usize,
    pub verdict_cache_max_bytes: usize,
    pub verdict_cache_max_ttl: Duration,
}

impl PluginSpec {
    /// A spec with the defaults `config.rs` uses.
    pub fn new(name: impl Into<String>, wasm_path: impl Into<PathBuf>) -> PluginSpec {
        PluginSpec {
            name: name.into(),
            wasm_path: wasm_path.into(),
            config_json: "{}".to_string(),
            on_error: None,
            handshake_timeout: Duration::from_millis(20),
            message_timeout: Duration::from_millis(5),
            memory_limit: 64 << 20,
            max_instances: 4,
            max_metric_series: 256,
            kv_max_keys: 10_000,
            kv_max_bytes: 4 << 20,
            kv_unavailable: crate::cluster::KvUnavailable::Local,
            verdict_cache_size: 50_000,
            verdict_cache_max_bytes: 32 << 20,
            verdict_cache_max_ttl: Duration::from_secs(300),
        }
    }
}

pub struct PluginRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    cache: CompileCache,
    kv: Arc<Kv>,
    metrics: Arc<Registry>,
    /// Which plugin owns each metric name prefix; kept across reloads.
    metric_names: Namespaces,
    opts: RuntimeOptions,
    started: Instant,
    /// Started with the first plugin: a gateway without plugins has no epoch thread.
    ticking: std::sync::OnceLock<Ticking>,
}

impl PluginRuntime {
    pub fn new(opts: RuntimeOptions, metrics: Arc<Registry>) -> anyhow::Result<Arc<PluginRuntime>> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(opts.max_instances)
            // A Rust component has a few core instances; a Python one a dozen or more.
            .total_core_instances(opts.max_instances.saturating_mul(8))
            .max_core_instances_per_component(64)
            .total_memories(opts.max_instances.saturating_mul(2))
            .max_memories_per_component(8)
            .total_tables(opts.max_instances.saturating_mul(4))
            .max_tables_per_component(16)
            .max_memory_size(opts.max_memory_size)
            .table_elements(opts.max_table_elements);
        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            // Hooks are plain synchronous calls. Without the component-model-async feature
            // this is already the default; saying so keeps a feature turned on elsewhere in
            // the dependency graph from adding its per-call bookkeeping.
            .concurrency_support(false);
        let engine = Engine::new(&config).map_err(wasm_error)?;

        let mut linker = Linker::new(&engine);
        wasi::add_to_linker(&mut linker).map_err(wasm_error)?;
        Imports::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(wasm_error)?;

        let cache = CompileCache::new(&engine, opts.cache_dir.clone())?;
        let kv = Kv::new(Duration::from_secs(1))?;
        Ok(Arc::new(PluginRuntime {
            engine,
            linker,
            cache,
            kv,
            metrics,
            metric_names: Namespaces::default(),
            opts,
            started: Instant::now(),
            ticking: std::sync::OnceLock::new(),
        }))
    }

    /// Compiles (or loads from the cache), links, and makes one ready instance by calling
    /// `init`. Blocking, and seconds for a large component: call from `spawn_blocking`.
    pub fn load(&self, spec: &PluginSpec) -> anyhow::Result<Arc<Plugin>> {
        let bytes = std::fs::read(&spec.wasm_path).with_context(|| {
            format!(
                "plugin `{}`: cannot read {}",
                spec.name,
                spec.wasm_path.display()
            )
        })?;
        let hash = sha256_hex(&bytes);
        let component = self.compile(spec, &bytes, &hash)?;
        self.load_compiled(spec, component, hash)
    }

    /// The compiled component for `bytes`, whose hex SHA-256 is `hash`.
    pub(super) fn compile(
        &self,
        spec: &PluginSpec,
        bytes: &[u8],
        hash: &str,
    ) -> anyhow::Result<Component> {
        self.cache
            .load(&self.engine, bytes, hash)
            .with_context(|| format!("{}: not a valid WebAssembly component", describe(spec)))
    }

    /// Links `component` and makes the plugin's first instance.
    pub(super) fn load_compiled(
        &self,
        spec: &PluginSpec,
        component: Component,
        hash: String,
    ) -> anyhow::Result<Arc<Plugin>> {
        let what = || describe(spec);
        if spec.memory_limit > self.opts.max_memory_size {
            anyhow::bail!(
                "{}: memory limit {} MiB is above the runtime's maximum of {} MiB",
                what(),
                spec.memory_limit >> 20,
                self.opts.max_memory_size >> 20
            );
        }
        let exports = ExportIndices::find(&component).with_context(what)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wasm_error)
            .with_context(|| {
                format!("{}: imports something the gateway does not provide", what())
            })?;
        let metric_names = self.metric_names.claim(&spec.name, spec.max_metric_series);
        if let Err(e) = &metric_names {
            tracing::warn!(target: "wasmgate::plugin", plugin = %spec.name, "metrics refused: {e}");
        }
        let kv = PluginKv {
            local: self.kv.clone(),
            share: self.kv.share(&spec.name, spec.kv_max_keys, spec.kv_max_bytes),
            shared: self.opts.shared_kv.as_ref().map(|remote| {
                SharedKv::new(remote.clone(), &spec.name, spec.kv_unavailable, spec.kv_max_bytes, &self.metrics)
            }),
        };
        let env = PluginEnv::new(
            &spec.name,
            kv,
            self.metrics.clone(),
            metric_names,
            self.started,
            self.ticking()?,
        );
        env.ticking.cover(spec.handshake_timeout.min(spec.message_timeout));
        Plugin::new(
            spec.clone(),
            hash,
            pre,
            exports,
            Arc::new(env),
            &self.metrics,
        )
        .with_context(what)
    }
}

impl PluginRuntime {
    /// The epoch thread, started on first use.
    fn ticking(&self) -> anyhow::Result<Ticking> {
        if let Some(t) = self.ticking.get() {
            return Ok(t.clone());
        }
        let started = Ticking::start(self.engine.clone()).context("cannot start the epoch thread")?;
        // A concurrent first load may have won; its thread is the one kept, this one stops.
        Ok(self.ticking.get_or_init(|| started).clone())
    }
}

fn describe(spec: &PluginSpec) -> String {
    format!("plugin `{}` ({})", spec.name, spec.wasm_path.display())
}

/// wasmtime's error type into anyhow's, keeping the chain of causes.
pub(super) fn wasm_error(e: wasmtime::Error) -> anyhow::Error {
    anyhow::Error::from_boxed(e.into_boxed_dyn_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_thread_starts_with_the_first_plugin() {
        let rt = PluginRuntime::new(RuntimeOptions::default(), Arc::new(Registry::new())).unwrap();
        assert!(rt.ticking.get().is_none(), "no plugin, no thread");
        let wasm = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../plugins/target/wasm32-wasip2/release/noop_messages.wasm");
        rt.load(&PluginSpec::new("noop", wasm)).unwrap();
        assert!(rt.ticking.get().is_some());
    }
}
