//! Test fixture: allocates and touches memory without end in `on_handshake`, so the
//! gateway's memory limit must stop it (the failed allocation aborts: a trap).

use wasmgate_sdk::{Conn, Hooks, NoConfig, Plugin, Request, Verdict};

pub struct HostileMemory;

impl Plugin for HostileMemory {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(HostileMemory)
    }

    fn on_handshake(&mut self, _: &Conn, _: &Request) -> Verdict {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // 1 MiB of written (so really committed) bytes per turn, kept alive.
            hoard.push(vec![0xa5; 1 << 20]);
            std::hint::black_box(&mut hoard);
        }
    }
}

wasmgate_sdk::export_plugin!(HostileMemory);
