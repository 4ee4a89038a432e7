//! Test fixture: panics in `on_handshake` (the panic message goes to stderr, then the
//! instance traps), so the gateway must survive a plugin that panics.

use wasmgate_sdk::{Conn, Hooks, NoConfig, Plugin, Request, Verdict};

pub struct HostilePanic;

impl Plugin for HostilePanic {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(HostilePanic)
    }

    fn on_handshake(&mut self, _: &Conn, req: &Request) -> Verdict {
        panic!("hostile-panic: refusing {} on purpose", req.path)
    }
}

wasmgate_sdk::export_plugin!(HostilePanic);
