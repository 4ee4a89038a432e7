//! Test fixture: spins forever in `on_handshake` and `on_message`, so the gateway's
//! time limit (epoch interruption) must stop it.

use wasmgate_sdk::{Action, Conn, Hooks, Message, NoConfig, Plugin, Request, Verdict};

pub struct HostileLoop;

impl Plugin for HostileLoop {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::HANDSHAKE.union(Hooks::MESSAGES);

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(HostileLoop)
    }

    fn on_handshake(&mut self, _: &Conn, _: &Request) -> Verdict {
        spin()
    }

    fn on_message(&mut self, _: &Conn, _: &Message) -> Action {
        spin()
    }
}

fn spin() -> ! {
    let mut n = 0u64;
    loop {
        // Real work each turn, so the loop cannot be optimised into something else.
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

wasmgate_sdk::export_plugin!(HostileLoop);
