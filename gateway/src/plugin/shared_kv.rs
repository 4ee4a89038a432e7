//! Where a plugin's kv call goes: the gateway's in-memory store, or Redis when the gateway
//! is in a `[cluster]`.
//!
//! With a cluster, a call goes to Redis unless:
//! - its key starts with `local:` (the plugin keeps that key in this gateway only);
//! - it is made from `on-message` (Redis stays off the per-frame path: message hooks use
//!   the local store for every key);
//! - Redis is away, or the hook call has spent its Redis budget (`redis_timeout_ms`, for
//!   all its kv calls together): then the plugin's `kv_unavailable` decides (see
//!   [`KvUnavailable`]), and the call is counted in
//!   `wasmgate_cluster_kv_unavailable_total{plugin, mode}`.
//!
//! Time a call waits on Redis is not the plugin's: the epoch advance the call sees after a
//! wait is not charged to it (see `epoch`), so a plugin keeps its whole `timeout_ms` of Wasm
//! time and a handshake waits on Redis at most `redis_timeout_ms` more.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::kv::{Kv, KvError, Share};
use crate::cluster::link::Unreachable;
use crate::cluster::{KvUnavailable, RemoteKv};
use crate::metrics::{Counter, Registry};

/// Keys with this prefix stay in the gateway's own store, cluster or not.
pub const LOCAL_PREFIX: &str = "local:";

/// A kv error, wherever the call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFailure {
    Full,
    NotAnInteger,
    Overflow,
}

/// One hook call's use of Redis: what is left of its budget, and whether it waited since it
/// last saw an epoch advance (that advance is then not charged to it).
#[derive(Debug, Default)]
pub struct RedisBudget {
    pub left: Duration,
    pub waited: bool,
}

/// A plugin's Redis-backed store: its namespace there and what to do when Redis is away.
pub struct SharedKv {
    remote: Arc<RemoteKv>,
    plugin: Box<str>,
    mode: KvUnavailable,
    max_bytes: usize,
    unavailable: Counter,
}

impl SharedKv {
    pub fn new(remote: Arc<RemoteKv>, plugin: &str, mode: KvUnavailable, max_bytes: usize, metrics: &Registry) -> SharedKv {
        SharedKv {
            unavailable: metrics.counter(
                "wasmgate_cluster_kv_unavailable_total",
                "Plugin kv calls made while Redis was away or past the call's deadline, by what kv_unavailable made of them.",
                &[("plugin", plugin), ("mode", mode.as_str())],
            ),
            remote,
            plugin: plugin.into(),
            mode,
            max_bytes,
        }
    }

    pub fn call_budget(&self) -> Duration {
        self.remote.call_budget
    }
}

/// How a kv call is served.
pub enum Route<'a> {
    Local,
    Remote(&'a SharedKv),
}

/// What a kv operation came to when Redis could not serve it.
pub enum Fallback {
    /// Serve it from the local store.
    Local,
    /// Fail the hook call with this message.
    Deny(String),
    /// Answer as if the store were empty and writes had no effect.
    Allow,
}

/// The store a plugin's calls use: local always, Redis when configured.
pub struct PluginKv {
    pub local: Arc<Kv>,
    pub share: Arc<Share>,
    pub shared: Option<SharedKv>,
}

impl PluginKv {
    /// Where a call with `key` goes; `in_message` is true inside `on-message`.
    pub fn route(&self, key: &str, in_message: bool) -> Route<'_> {
        match &self.shared {
            Some(shared) if !in_message && !key.starts_with(LOCAL_PREFIX) => Route::Remote(shared),
            _ => Route::Local,
        }
    }

    pub fn local_get(&self, key: &str) -> Option<Vec<u8>> {
        self.local.get(&self.share, key)
    }

    pub fn local_set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), KvError> {
        self.local.set(&self.share, key, value, ttl)
    }

    pub fn local_delete(&self, key: &str) {
        self.local.delete(&self.share, key)
    }

    pub fn local_incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, KvError> {
        self.local.incr(&self.share, key, delta, ttl)
    }
}

impl SharedKv {
    /// Runs `op` against Redis within what is left of `budget`, charging the wait to it;
    /// `None` when Redis could not serve it (away, or the budget spent).
    pub fn attempt<T>(
        &self,
        budget: &mut RedisBudget,
        op: impl FnOnce(&RemoteKv, String, Duration) -> Result<T, Unreachable>,
        key: &str,
    ) -> Option<T> {
        if budget.left.is_zero() || !self.remote.link.is_up() {
            return None;
        }
        let started = Instant::now();
        let answer = op(&self.remote, RemoteKv::key(&self.plugin, key), budget.left);
        let waited = started.elapsed();
        budget.waited = true;
        budget.left = budget.left.saturating_sub(waited);
        answer.ok()
    }

    /// A value too large for the plugin's share, refused before Redis is asked.
    pub fn too_large(&self, key: &str, value_len: usize) -> bool {
        key.len() + value_len + super::kv::ENTRY_OVERHEAD > self.max_bytes
    }

    /// What to do with a call Redis could not serve; counted.
    pub fn fallback(&self) -> Fallback {
        self.unavailable.inc();
        match self.mode {
            KvUnavailable::Local => Fallback::Local,
            KvUnavailable::Allow => Fallback::Allow,
            KvUnavailable::Deny => Fallback::Deny(format!(
                "kv store unavailable: Redis is away or past its deadline (plugin `{}`, kv_unavailable = \"deny\")",
                self.plugin
            )),
        }
    }
}
