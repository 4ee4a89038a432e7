//! Test fixture: executes Wasm's `unreachable` in `on_handshake`, a trap with no panic
//! message, so the gateway must survive a plugin that traps. Wasm only.
#![cfg(target_arch = "wasm32")]

use wasmgate_sdk::{Conn, Hooks, NoConfig, Plugin, Request, Verdict};

pub struct HostileTrap;

impl Plugin for HostileTrap {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(HostileTrap)
    }

    fn on_handshake(&mut self, _: &Conn, _: &Request) -> Verdict {
        core::arch::wasm32::unreachable()
    }
}

wasmgate_sdk::export_plugin!(HostileTrap);
