//! Test fixture: `init` always fails, so the gateway must refuse to load (or to swap in)
//! this plugin and report why.

use wasmgate_sdk::{Hooks, NoConfig, Plugin};

pub struct FailInit;

impl Plugin for FailInit {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(_: NoConfig) -> Result<Self, String> {
        Err("bad config: fail-init never accepts a config".into())
    }
}

wasmgate_sdk::export_plugin!(FailInit);
