//! The host side of WebAssembly plugins: loading components, calling their hooks with
//! deadlines and memory limits, the functions they import, and hot reload.
//!
//! Module map: `engine` (runtime and loading) → `cache` (compiled components on disk) →
//! `exports` (finding and calling hooks) → `pool` (shared instances) → `hooks` (a loaded
//! plugin's hook calls) → `registry` (named, swappable plugins). `host`, `wasi` and `kv`
//! are what plugins import; `types` the hook arguments and results; `watch` the file
//! watcher behind hot reload.

#[cfg(test)]
mod bench;
mod bindings;
mod cache;
mod engine;
mod exports;
mod hooks;
mod host;
mod kv;
mod log_text;
mod plugin_metrics;
mod pool;
mod registry;
mod types;
mod validate;
mod wasi;
mod watch;

pub use engine::{PluginRuntime, PluginSpec, RuntimeOptions};
pub use hooks::{panic_text, Plugin, PluginInfo};
pub use registry::{PluginRegistry, PluginSlot, ReloadEntry, ReloadOutcome, ReloadReport};
pub use types::{
    Accept, Action, Candidate, CloseFrame, Compression, CompressionMode, ConnContext, ConnStats,
    Direction, HandshakeRequest, Header, Hooks, MetaFull, OnError, Opcode, PluginError, PoolInfo,
    Reject, ServerInfo, Verdict, META_LIMIT_BYTES,
};
pub use watch::{watch, WatchGuard};
