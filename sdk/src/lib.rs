//! Write wasmgate plugins in Rust.
//!
//! A plugin is one type implementing [`Plugin`], exported with [`export_plugin!`]:
//!
//! ```
//! use wasmgate_sdk::{Candidate, Conn, Hooks, NoConfig, Plugin, Pool};
//!
//! struct First;
//!
//! impl Plugin for First {
//!     type Config = NoConfig;
//!     const HOOKS: Hooks = Hooks::BALANCER;
//!
//!     fn new(_: NoConfig) -> Result<Self, String> {
//!         Ok(First)
//!     }
//!
//!     fn select(&mut self, _: &Conn, _: &Pool, candidates: &[Candidate]) -> Vec<u32> {
//!         (0..candidates.len() as u32).collect()
//!     }
//! }
//!
//! wasmgate_sdk::export_plugin!(First);
//! ```
//!
//! The bindings are generated from `wit/plugin.wit`, the same file the host binds to, for
//! the world `plugin` (every hook exported); `init` returns [`Plugin::hooks`] (by default
//! [`Plugin::HOOKS`]) so the host calls only the hooks the plugin really has.
//!
//! Everything also builds for the host target so plugin logic can be unit-tested with plain
//! `cargo test`: off Wasm, [`Conn`], [`kv`], [`metrics`] and the clock and random functions
//! run in memory (see [`testing`]).

mod conn;
pub mod hash;
mod host;
pub mod kv;
pub mod log;
mod message;
pub mod metrics;
mod plugin;
mod pool;
mod request;
pub mod session;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
mod types;
pub mod verdicts;
#[cfg(target_arch = "wasm32")]
mod wasm;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "wit",
        // Records compare in plugin unit tests (`assert_eq!(verdict, ...)`).
        additional_derives: [PartialEq, Eq],
        // Imports take borrowed lists: metric labels go to the host without being copied
        // into owned strings first (three guest allocations per update).
        ownership: Borrowing { duplicate_if_necessary: true },
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "wasmgate_sdk::bindings",
    });
}

pub use bindings::wasmgate::plugin::types::{
    Accept, Candidate, ClientCertificate, Compression, CompressionMode, ConnectionStats, Direction,
    Header, Hooks, Opcode, Reject, Request, Server, TlsInfo, Verdict,
};
pub use conn::Conn;
pub use message::{Action, CloseFrame, Message};
#[cfg(not(target_arch = "wasm32"))]
pub use pool::NativePool;
pub use pool::Pool;
pub use host::{monotonic_ns, now_ms, random_u64};
pub use plugin::{NoConfig, Plugin};
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub use wasm::Exports;

/// Exports a [`Plugin`] type as the component's `lifecycle`, `handshake`, `balancer` and
/// `messages` interfaces. Use it once, in the plugin crate's `lib.rs`.
#[cfg(target_arch = "wasm32")]
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            // The generated export macro takes a plain identifier.
            type WasmgateExports = $crate::Exports<$plugin>;
            $crate::bindings::__export_plugin_world!(WasmgateExports with_types_in $crate::bindings);
        };
    };
}

/// Off Wasm there is nothing to export; this only checks that the type is a [`Plugin`], so
/// a plugin crate compiles unchanged for its native unit tests.
#[cfg(not(target_arch = "wasm32"))]
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            fn is_plugin<P: $crate::Plugin>() {}
            let _ = is_plugin::<$plugin>;
        };
    };
}
