//! Test fixture: `on_handshake` computes for about `work_ms` of running time, then accepts.
//!
//! The amount is a count of loop turns, measured once in `init` (turns per millisecond of
//! the monotonic clock over `CALIBRATE_MS`), so a call that is descheduled takes longer on
//! the clock but does the same work, as a real plugin's would.
//!
//! Config: `{ "work_ms": 5 }`.

use serde::Deserialize;
use wasmgate_sdk::{Conn, Hooks, Plugin, Request, Verdict};

/// How long `init` spins to measure the loop's speed.
const CALIBRATE_MS: u64 = 20;
/// Turns between looks at the clock while calibrating.
const CHUNK: u64 = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    work_ms: u64,
}

pub struct SteadyWork {
    turns: u64,
}

impl Plugin for SteadyWork {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(c: Config) -> Result<Self, String> {
        let started = wasmgate_sdk::monotonic_ns();
        let mut turns = 0;
        while wasmgate_sdk::monotonic_ns() - started < CALIBRATE_MS * 1_000_000 {
            spin(CHUNK);
            turns += CHUNK;
        }
        let per_ms = turns / CALIBRATE_MS;
        Ok(SteadyWork { turns: per_ms * c.work_ms })
    }

    fn on_handshake(&mut self, _: &Conn, _: &Request) -> Verdict {
        spin(self.turns);
        Verdict::accept()
    }
}

fn spin(turns: u64) {
    let mut n = 0u64;
    for _ in 0..turns {
        // Real work each turn, so the loop cannot be optimised away.
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

wasmgate_sdk::export_plugin!(SteadyWork);
