//! The host side of WebAssembly plugins: loading components, calling their hooks with
//! deadlines and memory limits, the functions they import, and hot reload.
//!
//! Module map: `engine` (runtime and loading) → `cache` (compiled components on disk) →
//! `exports` (finding and calling hooks) → `pool` (shared instances, made off the calling
//! thread) → `hooks` (a loaded plugin's hook calls) → `registry` (named, swappable plugins).
//! `host`, `wasi`, `kv` (with `shared_kv`: Redis in a cluster), `plugin_metrics` and
//! `verdicts` (handshake answers given again without a call) are what plugins import; `log_text` makes their
//! log text safe to print; `types` the hook arguments and results, `validate` the checks on
//! handshake answers; `watch` the file watcher behind hot reload.

#[cfg(test)]
mod bench;
mod bindings;
mod cache;
mod engine;
mod epoch;
mod exports;
mod hooks;
mod host;
mod kv;
mod log_text;
mod plugin_metrics;
mod pool;
mod registry;
mod session;
mod shared_kv;
mod types;
mod validate;
mod verdicts;
mod wasi;
mod watch;

pub use engine::{PluginRuntime, PluginSpec, RuntimeOptions};
pub use hooks::{panic_text, Plugin, PluginInfo, CALL_BUCKETS};
pub use shared_kv::{KvFailure, LOCAL_PREFIX};
pub use registry::{PluginRegistry, PluginSlot, ReloadEntry, ReloadOutcome, ReloadReport, StagedPlugins};
pub use types::{
    Accept, Action, Candidate, CloseFrame, Compression, CompressionMode, ConnContext, ConnStats,
    Direction, HandshakeInput, HandshakeRequest, Header, Hooks, MetaFull, OnError, Opcode, PluginError, PoolInfo,
    Reject, ServerInfo, Verdict, META_LIMIT_BYTES, TlsInfo, ClientCertificate, header_lines,
};
pub use session::{Outgoing, ReattachReason};
pub use watch::{watch, WatchGuard};
