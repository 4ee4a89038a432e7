//! What a plugin instance's store holds, and the host functions plugins import: `host`
//! (log, clocks, randomness), the `connection` resource, `kv` and `metrics`.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{connection, host, kv, message, metrics, types as wit, upstreams};
use super::epoch::Ticking;
use super::kv::KvError;
use super::shared_kv::{Fallback, KvFailure, PluginKv, RedisBudget, Route};
use super::log_text::{self, Throttle};
use super::plugin_metrics::{Namespace, PendingUpdate, SeriesCache, Value, MAX_UPDATES_PER_CALL};
use super::types::{ConnContext, Opcode, PoolInfo, META_LIMIT_BYTES};
use super::verdicts::Part;
use super::wasi;
use crate::metrics::{Counter, Registry};

/// The representation the host gives every `connection` and `pool` handle: a call has at
/// most one of each, found in `HostState::lent`.
pub(super) const LENT_REP: u32 = 0;

/// Refused kv writes and metric updates are logged at most this often per plugin.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What all instances of one plugin version share.
pub(super) struct PluginEnv {
    pub name: Arc<str>,
    /// This plugin's namespace and share of the local store, and of Redis in a cluster.
    pub kv: PluginKv,
    pub metrics: Arc<Registry>,
    /// Where this plugin's own metrics go; an error when their names are taken.
    metric_names: Result<Namespace, String>,
    /// Origin of `monotonic-ns`.
    pub started: Instant,
    refused: Refused,
    /// The epoch thread, kept running by every plugin; calls count themselves on it.
    pub ticking: Ticking,
    /// The request parts the plugin's kept verdicts depend on, as its `init` declared them.
    pub vary_on: OnceLock<Vec<Part>>,
}

/// Writes the host refused, counted on `/metrics` and logged at most every `WARN_EVERY`.
struct Refused {
    kv: Counter,
    metric: Counter,
    kv_warned: Throttle,
    metric_warned: Throttle,
}

impl PluginEnv {
    pub fn new(
        name: &str,
        kv: PluginKv,
        metrics: Arc<Registry>,
        metric_names: Result<Namespace, String>,
        started: Instant,
        ticking: Ticking,
    ) -> PluginEnv {
        let refused = |what| {
            metrics.counter(
                "wasmgate_plugins_refused_writes_total",
                "kv writes and metric updates of plugins that the host refused (a share full, a limit passed).",
                &[("plugin", name), ("what", what)],
            )
        };
        PluginEnv {
            refused: Refused {
                kv: refused("kv"),
                metric: refused("metric"),
                kv_warned: Throttle::new(WARN_EVERY),
                metric_warned: Throttle::new(WARN_EVERY),
            },
            name: name.into(),
            kv,
            metrics,
            metric_names,
            started,
            ticking,
            vary_on: OnceLock::new(),
        }
    }

    /// Counts a refused kv write (the share full: also logged) and says why to the plugin.
    fn refuse_kv(&self, key: &str, err: KvError) -> kv::KvError {
        self.refuse_kv_failure(key, &err, match err {
            KvError::Full { .. } => KvFailure::Full,
            KvError::NotAnInteger => KvFailure::NotAnInteger,
            KvError::Overflow => KvFailure::Overflow,
        })
    }

    /// Counts a refused kv write (the share full: also logged) and says why to the plugin.
    fn refuse_kv_failure(&self, key: &str, err: &dyn std::fmt::Display, failure: KvFailure) -> kv::KvError {
        match failure {
            KvFailure::Full => {
                self.refused.kv.inc();
                if self.refused.kv_warned.due(self.started) {
                    let key = log_text::printable(key);
                    tracing::warn!(target: "wasmgate::plugin", plugin = &*self.name, %key, "kv write refused: {err}");
                }
                kv::KvError::Full
            }
            KvFailure::NotAnInteger => kv::KvError::NotAnInteger,
            KvFailure::Overflow => kv::KvError::Overflow,
        }
    }

    fn refuse_metric(&self, name: &str, why: &dyn std::fmt::Display) {
        self.refused.metric.inc();
        if self.refused.metric_warned.due(self.started) {
            let name = log_text::printable(name);
            tracing::warn!(target: "wasmgate::plugin", plugin = &*self.name, metric = %name, "metric refused: {why}");
        }
    }

    /// Keys and bytes this plugin holds in the kv store.
    pub fn kv_used(&self) -> (usize, usize) {
        self.kv.share.used()
    }

    /// Series this plugin's metrics use, and the most allowed.
    pub fn metric_series(&self) -> (usize, usize) {
        self.metric_names.as_ref().map_or((0, 0), Namespace::usage)
    }
}

/// Store data of one plugin instance.
pub(super) struct HostState {
    pub env: Arc<PluginEnv>,
    pub limits: Limits,
    lent: Lent,
    /// What the hook set on the message during the call; taken by `ConnGuard::take_edits`.
    edits: MessageEdits,
    /// Metric updates of the call in progress, applied by `commit_metrics` if it succeeds.
    metric_updates: Vec<PendingUpdate>,
    /// The series this instance's updates went to before.
    series_cache: SeriesCache,
    /// The call in progress's Redis budget and wait (see `shared_kv`).
    pub redis: RedisBudget,
    /// The call in progress is `on-message`: kv stays local.
    in_message: bool,
    /// Epoch advances the call in progress may still see (see `epoch`).
    pub ticks_left: u32,
    wasi: WasiCtx,
    table: ResourceTable,
}

/// What the call in progress was lent: its connection, and the pool (`select`) or the
/// message (`on-message`).
///
/// Pointers rather than references or `Arc`s because the store outlives every call and hooks
/// take borrowed arguments. `ConnGuard` sets them for exactly one call and clears them even
/// when the call unwinds; host functions only run inside that call, so the pointees are alive
/// whenever they are read.
#[derive(Default)]
struct Lent {
    conn: Option<NonNull<ConnContext>>,
    pool: Option<NonNull<PoolInfo>>,
    message: Option<NonNull<[u8]>>,
    /// Whether the lent message came from the client, and its opcode.
    message_from: Option<(bool, Opcode)>,
    /// The call is `on-handshake`: what it asked to keep (see `verdicts`).
    handshake: Option<HandshakeRecord>,
}

/// What an `on-handshake` call asked the verdict cache to keep, when the plugin has one.
#[derive(Default)]
pub(super) struct HandshakeRecord {
    /// The plugin keeps verdicts: `keep` and the metadata set are recorded.
    recording: bool,
    pub keep: Option<Duration>,
    pub meta: Vec<(String, String)>,
}

// SAFETY: the pointers are only dereferenced during the call that set them, on the thread
// making that call, and their pointees are `Sync`.
unsafe impl Send for Lent {}

/// A message hook's edits: the payload to send instead, and the reason for a close.
#[derive(Default)]
pub(super) struct MessageEdits {
    pub payload: Option<Vec<u8>>,
    pub close_reason: Option<String>,
}

impl HostState {
    pub fn new(env: Arc<PluginEnv>, memory_limit: usize) -> HostState {
        // `init` gets a Redis budget of its own.
        let redis = RedisBudget { left: env.kv.shared.as_ref().map_or(Duration::ZERO, |s| s.call_budget()), waited: false };
        HostState {
            wasi: wasi::deny_all_ctx(&env.name),
            env,
            limits: Limits {
                memory: memory_limit,
                memory_exceeded: false,
            },
            lent: Lent::default(),
            edits: MessageEdits::default(),
            metric_updates: Vec::new(),
            series_cache: SeriesCache::default(),
            redis,
            in_message: false,
            ticks_left: 0,
            table: ResourceTable::new(),
        }
    }

    /// Makes `conn` the connection that `connection` handles refer to until the guard drops.
    pub fn enter<'s, 'l>(
        store: &'s mut wasmtime::Store<HostState>,
        conn: &'l ConnContext,
    ) -> ConnGuard<'s, 'l> {
        let state = store.data_mut();
        state.lent = Lent { conn: Some(NonNull::from(conn)), ..Lent::default() };
        state.edits = MessageEdits::default();
        state.metric_updates.clear();
        state.redis = RedisBudget {
            left: state.env.kv.shared.as_ref().map_or(Duration::ZERO, |s| s.call_budget()),
            waited: false,
        };
        state.in_message = false;
        // A refusal a guest survived in an earlier call must not explain this call's trap.
        state.limits.memory_exceeded = false;
        ConnGuard { store, lent: PhantomData }
    }

    fn conn(&self, handle: &Resource<connection::Connection>) -> wasmtime::Result<&ConnContext> {
        match self.lent.conn {
            // SAFETY: see `Lent`.
            Some(p) if handle.rep() == LENT_REP => Ok(unsafe { p.as_ref() }),
            _ => wasmtime::bail!("connection handle used outside the hook call it was given to"),
        }
    }

    fn pool(&self, handle: &Resource<upstreams::Pool>) -> wasmtime::Result<&PoolInfo> {
        match self.lent.pool {
            // SAFETY: see `Lent`.
            Some(p) if handle.rep() == LENT_REP => Ok(unsafe { p.as_ref() }),
            _ => wasmtime::bail!("pool handle used outside the select call it was given to"),
        }
    }

    /// A hook call is in progress (not `init`).
    pub(super) fn in_hook_call(&self) -> bool {
        self.lent.conn.is_some()
    }

    /// `verdicts.keep` from the call in progress: only `on-handshake` may.
    pub(super) fn keep_for(&mut self, ttl: Duration) -> wasmtime::Result<()> {
        match &mut self.lent.handshake {
            Some(record) => {
                if record.recording {
                    record.keep = Some(ttl);
                }
                Ok(())
            }
            None => wasmtime::bail!("verdicts.keep may only be called from on-handshake"),
        }
    }

    /// The connection of the call in progress.
    pub(super) fn lent_conn(&self) -> wasmtime::Result<&ConnContext> {
        match self.lent.conn {
            // SAFETY: see `Lent`.
            Some(p) => Ok(unsafe { p.as_ref() }),
            None => wasmtime::bail!("called outside a hook call"),
        }
    }

    /// The message of the `on-message` call in progress, whether the client sent it, and
    /// its opcode.
    pub(super) fn lent_message(&self) -> wasmtime::Result<(&[u8], bool, Opcode)> {
        let payload = self.message()?;
        let (from_client, op) = self.lent.message_from.unwrap_or((false, Opcode::Binary));
        Ok((payload, from_client, op))
    }

    fn message(&self) -> wasmtime::Result<&[u8]> {
        match self.lent.message {
            // SAFETY: see `Lent`.
            Some(p) => Ok(unsafe { p.as_ref() }),
            None => wasmtime::bail!("the message interface was used outside on-message"),
        }
    }

    /// Keeps a metric update for `commit_metrics`, or refuses it.
    fn queue_metric(&mut self, name: String, labels: Vec<(String, String)>, value: Value) {
        if let Err(e) = &self.env.metric_names {
            self.env.refuse_metric(&name, e);
        } else if self.metric_updates.len() >= MAX_UPDATES_PER_CALL {
            let why = format!("more than {MAX_UPDATES_PER_CALL} metric updates in one call");
            self.env.refuse_metric(&name, &why);
        } else {
            self.metric_updates.push(PendingUpdate { name, labels, value });
        }
    }

    /// Applies the metric updates of a call that succeeded. A refused one is the plugin's
    /// bug but not worth failing the hook over: it is counted and logged.
    pub fn commit_metrics(&mut self) {
        let Ok(names) = &self.env.metric_names else { return };
        for update in self.metric_updates.drain(..) {
            if let Err((name, e)) = names.apply(&self.env.metrics, &mut self.series_cache, update) {
                self.env.refuse_metric(&name, &e);
            }
        }
    }
}

/// Holds the store while a call runs with a connection (and a pool or message) lent to it;
/// clears them on drop.
/// `'l` is how long what was lent lives.
pub(super) struct ConnGuard<'s, 'l> {
    pub store: &'s mut wasmtime::Store<HostState>,
    lent: PhantomData<&'l ()>,
}

impl<'l> ConnGuard<'_, 'l> {
    /// Lends `pool` to the call as well, for `upstreams.pool` handles.
    pub fn with_pool(self, pool: &'l PoolInfo) -> Self {
        self.store.data_mut().lent.pool = Some(NonNull::from(pool));
        self
    }

    /// Lends `payload` to the call as well, for the `message` functions.
    pub fn with_message(self, payload: &'l [u8], from_client: bool, op: Opcode) -> Self {
        let state = self.store.data_mut();
        state.lent.message = Some(NonNull::from(payload));
        state.lent.message_from = Some((from_client, op));
        state.in_message = true;
        self
    }

    /// Marks the call as `on-handshake`; with `recording`, its `verdicts.keep` and the
    /// metadata it sets are recorded for the verdict cache.
    pub fn for_handshake(self, recording: bool) -> Self {
        self.store.data_mut().lent.handshake = Some(HandshakeRecord { recording, ..HandshakeRecord::default() });
        self
    }

    /// What the `on-handshake` call asked to keep.
    pub fn take_handshake_record(&mut self) -> HandshakeRecord {
        self.store.data_mut().lent.handshake.take().unwrap_or_default()
    }

    /// What the hook set on the message.
    pub fn take_edits(&mut self) -> MessageEdits {
        std::mem::take(&mut self.store.data_mut().edits)
    }
}

impl Drop for ConnGuard<'_, '_> {
    fn drop(&mut self) {
        self.store.data_mut().lent = Lent::default();
    }
}

/// Linear memory cap of one instance. A refused growth is remembered so the trap that
/// usually follows (a Rust guest aborts on allocation failure) is reported as a memory limit.
pub(super) struct Limits {
    pub memory: usize,
    pub memory_exceeded: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.memory_exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The pooling allocator's `table_elements` already bounds every table.
        Ok(true)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: host::Level, message: String) -> wasmtime::Result<()> {
        let plugin = &*self.env.name;
        let message = super::log_text::printable(&message);
        match level {
            host::Level::Trace => tracing::trace!(target: "wasmgate::plugin", plugin, "{message}"),
            host::Level::Debug => tracing::debug!(target: "wasmgate::plugin", plugin, "{message}"),
            host::Level::Info => tracing::info!(target: "wasmgate::plugin", plugin, "{message}"),
            host::Level::Warn => tracing::warn!(target: "wasmgate::plugin", plugin, "{message}"),
            host::Level::Error => tracing::error!(target: "wasmgate::plugin", plugin, "{message}"),
        }
        Ok(())
    }

    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64))
    }

    fn monotonic_ns(&mut self) -> wasmtime::Result<u64> {
        Ok(self.env.started.elapsed().as_nanos() as u64)
    }

    fn random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(rand::random())
    }
}

impl connection::Host for HostState {}

impl connection::HostConnection for HostState {
    fn id(&mut self, c: Resource<connection::Connection>) -> wasmtime::Result<u64> {
        Ok(self.conn(&c)?.id)
    }

    fn client_addr(&mut self, c: Resource<connection::Connection>) -> wasmtime::Result<String> {
        Ok(self.conn(&c)?.client_addr.to_string())
    }

    fn route(&mut self, c: Resource<connection::Connection>) -> wasmtime::Result<String> {
        Ok(self.conn(&c)?.route.to_string())
    }

    fn get_meta(
        &mut self,
        c: Resource<connection::Connection>,
        key: String,
    ) -> wasmtime::Result<Option<String>> {
        Ok(self.conn(&c)?.meta(&key))
    }

    fn set_meta(
        &mut self,
        c: Resource<connection::Connection>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        self.conn(&c)?.set_meta(&key, &value).map_err(|_| {
            wasmtime::format_err!(
                "connection metadata would pass its limit of {META_LIMIT_BYTES} bytes"
            )
        })?;
        if let Some(record) = self.lent.handshake.as_mut().filter(|r| r.recording) {
            record.meta.push((key, value));
        }
        Ok(())
    }

    fn drop(&mut self, _: Resource<connection::Connection>) -> wasmtime::Result<()> {
        // The host only lends borrows; an owned handle never exists.
        Ok(())
    }
}

impl wit::Host for HostState {}

impl upstreams::Host for HostState {}

impl upstreams::HostPool for HostState {
    fn name(&mut self, p: Resource<upstreams::Pool>) -> wasmtime::Result<String> {
        Ok(self.pool(&p)?.name.clone())
    }

    fn version(&mut self, p: Resource<upstreams::Pool>) -> wasmtime::Result<u64> {
        Ok(self.pool(&p)?.version)
    }

    fn servers(&mut self, p: Resource<upstreams::Pool>) -> wasmtime::Result<Vec<wit::Server>> {
        Ok(self
            .pool(&p)?
            .servers
            .iter()
            .map(|s| wit::Server {
                address: s.address.to_string(),
                weight: s.weight,
                labels: s.labels.to_vec(),
            })
            .collect())
    }

    fn max_attempts(&mut self, p: Resource<upstreams::Pool>) -> wasmtime::Result<u32> {
        Ok(self.pool(&p)?.max_attempts)
    }

    fn drop(&mut self, _: Resource<upstreams::Pool>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl message::Host for HostState {
    fn payload(&mut self) -> wasmtime::Result<Vec<u8>> {
        Ok(self.message()?.to_vec())
    }

    fn set_payload(&mut self, payload: Vec<u8>) -> wasmtime::Result<()> {
        self.message()?;
        self.edits.payload = Some(payload);
        Ok(())
    }

    fn set_close_reason(&mut self, reason: String) -> wasmtime::Result<()> {
        self.message()?;
        self.edits.close_reason = Some(reason);
        Ok(())
    }
}

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let env = self.env.clone();
        let Route::Remote(shared) = env.kv.route(&key, self.in_message) else {
            return Ok(env.kv.local_get(&key));
        };
        if let Some(answer) = shared.attempt(&mut self.redis, |r, k, d| r.get(k, d), &key) {
            return Ok(answer.unwrap_or(None));
        }
        match shared.fallback() {
            Fallback::Local => Ok(env.kv.local_get(&key)),
            Fallback::Allow => Ok(None),
            Fallback::Deny(why) => Err(wasmtime::format_err!("{why}")),
        }
    }

    fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Result<(), kv::KvError>> {
        let ttl = ttl_ms.map(Duration::from_millis);
        let env = self.env.clone();
        let local = |key: &str, value: &[u8]| env.kv.local_set(key, value, ttl).map_err(|e| env.refuse_kv(key, e));
        let Route::Remote(shared) = env.kv.route(&key, self.in_message) else {
            return Ok(local(&key, &value));
        };
        if shared.too_large(&key, value.len()) {
            let why = "the value is larger than the plugin's kv_max_bytes";
            return Ok(Err(env.refuse_kv_failure(&key, &why, KvFailure::Full)));
        }
        let sent = value.clone();
        if let Some(answer) = shared.attempt(&mut self.redis, move |r, k, d| r.set(k, sent, ttl, d), &key) {
            return Ok(answer.map_err(|f| env.refuse_kv_failure(&key, &"Redis refused the write", f)));
        }
        match shared.fallback() {
            Fallback::Local => Ok(local(&key, &value)),
            Fallback::Allow => Ok(Ok(())),
            Fallback::Deny(why) => Err(wasmtime::format_err!("{why}")),
        }
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        let env = self.env.clone();
        let Route::Remote(shared) = env.kv.route(&key, self.in_message) else {
            env.kv.local_delete(&key);
            return Ok(());
        };
        if shared.attempt(&mut self.redis, |r, k, d| r.delete(k, d), &key).is_some() {
            return Ok(());
        }
        match shared.fallback() {
            Fallback::Local => env.kv.local_delete(&key),
            Fallback::Allow => {}
            Fallback::Deny(why) => return Err(wasmtime::format_err!("{why}")),
        }
        Ok(())
    }

    fn incr(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Result<i64, kv::KvError>> {
        let ttl = ttl_ms.map(Duration::from_millis);
        let env = self.env.clone();
        let local = |key: &str| env.kv.local_incr(key, delta, ttl).map_err(|e| env.refuse_kv(key, e));
        let Route::Remote(shared) = env.kv.route(&key, self.in_message) else {
            return Ok(local(&key));
        };
        if let Some(answer) = shared.attempt(&mut self.redis, |r, k, d| r.incr(k, delta, ttl, d), &key) {
            return Ok(answer.map_err(|f| env.refuse_kv_failure(&key, &"Redis refused the increment", f)));
        }
        match shared.fallback() {
            Fallback::Local => Ok(local(&key)),
            Fallback::Allow => Ok(Ok(delta)),
            Fallback::Deny(why) => Err(wasmtime::format_err!("{why}")),
        }
    }
}

impl metrics::Host for HostState {
    fn counter_add(
        &mut self,
        name: String,
        labels: Vec<(String, String)>,
        value: u64,
    ) -> wasmtime::Result<()> {
        self.queue_metric(name, labels, Value::CounterAdd(value));
        Ok(())
    }

    fn gauge_set(
        &mut self,
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    ) -> wasmtime::Result<()> {
        self.queue_metric(name, labels, Value::GaugeSet(value));
        Ok(())
    }

    fn histogram_observe(
        &mut self,
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    ) -> wasmtime::Result<()> {
        self.queue_metric(name, labels, Value::HistogramObserve(value));
        Ok(())
    }
}
