//! Host-side bindings for what plugins import (`host`, `connection`, `upstreams`,
//! `message`, `kv`, `metrics`, `session`, `verdicts`).
//!
//! Exports are not generated here: the hooks are called through typed functions over the
//! gateway's own types (see `types.rs` and `exports.rs`), so arguments need no conversion.
//! Every import is trappable so a host function can end a misbehaving call.

wasmtime::component::bindgen!({
    path: "../sdk/wit",
    world: "imports",
    imports: { default: trappable },
});

pub use wasmgate::plugin::{connection, host, kv, message, metrics, session, types, upstreams, verdicts};
