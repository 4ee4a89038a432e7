//! Test fixture: the first instance's `init` is fast, so the plugin loads; every later one
//! spins for `slow_ms` (past the gateway's 1 s init deadline if asked) or, with `fail`,
//! refuses. With `trap`, `on_handshake` panics on every call, so each call costs the plugin
//! its instance and the gateway must make another. Instances are counted in kv (`inits`).
//!
//! Config: `{ "slow_ms": 0, "fail": false, "trap": false }`.

use serde::Deserialize;
use wasmgate_sdk::{kv, Conn, Hooks, Plugin, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    slow_ms: u64,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    trap: bool,
}

pub struct HostileSlowInit {
    trap: bool,
}

impl Plugin for HostileSlowInit {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(c: Config) -> Result<Self, String> {
        let nth = kv::incr("inits", 1, None).unwrap_or(i64::MAX);
        if nth > 1 {
            if c.fail {
                return Err(format!("init number {nth} fails on purpose"));
            }
            let until = wasmgate_sdk::monotonic_ns() + c.slow_ms * 1_000_000;
            while wasmgate_sdk::monotonic_ns() < until {}
        }
        Ok(HostileSlowInit { trap: c.trap })
    }

    fn on_handshake(&mut self, _: &Conn, _: &Request) -> Verdict {
        if self.trap {
            panic!("hostile-slow-init: costing the plugin its instance on purpose");
        }
        Verdict::accept()
    }
}

wasmgate_sdk::export_plugin!(HostileSlowInit);
