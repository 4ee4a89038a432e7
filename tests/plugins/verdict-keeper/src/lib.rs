//! Test fixture for the gateway's verdict cache (`wasmgate:plugin/verdicts`).
//!
//! `init` declares `vary` with `verdicts.vary-on`. `on_handshake` counts its calls (in the
//! kv store, key `calls`, so the count is shared by all instances). Then it refuses a
//! request carrying `x-deny`, and otherwise accepts. An accept adds `x-call: N` (the count)
//! and `x-user: <x-user>`, sets the metadata `user`, and calls `verdicts.keep(keep_ms)`.
//! So a client that sees an older `x-call` got a kept answer.
//!
//! With `keep_in_close`, `on_close` calls `verdicts.keep` as well, which the gateway must
//! refuse. Config: `{ "vary": ["x-user"], "keep_ms": 60000, "keep_in_close": false }`.

use std::time::Duration;

use serde::Deserialize;
use wasmgate_sdk::{Accept, ConnectionStats, Conn, Hooks, Plugin, Reject, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    vary: Vec<String>,
    keep_ms: u64,
    #[serde(default)]
    keep_in_close: bool,
}

pub struct VerdictKeeper {
    keep: Duration,
    keep_in_close: bool,
}

impl Plugin for VerdictKeeper {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(c: Config) -> Result<Self, String> {
        let parts: Vec<&str> = c.vary.iter().map(String::as_str).collect();
        wasmgate_sdk::verdicts::vary_on(&parts);
        Ok(VerdictKeeper { keep: Duration::from_millis(c.keep_ms), keep_in_close: c.keep_in_close })
    }

    fn hooks(&self) -> Hooks {
        if self.keep_in_close {
            Hooks::HANDSHAKE.union(Hooks::CLOSE)
        } else {
            Hooks::HANDSHAKE
        }
    }

    fn on_handshake(&mut self, conn: &Conn, req: &Request) -> Verdict {
        let calls = wasmgate_sdk::kv::incr("calls", 1, None).unwrap_or(-1);
        if req.header("x-deny").is_some() {
            return Verdict::Reject(Reject::new(403, &format!("denied by call {calls}")));
        }
        let user = req.header("x-user").unwrap_or("nobody").to_string();
        conn.set_meta("user", &user);
        wasmgate_sdk::verdicts::keep(self.keep);
        Accept::default()
            .add_header("x-call", &calls.to_string())
            .add_header("x-user", &user)
            .into()
    }

    fn on_close(&mut self, _: &Conn, _: u16, _: &ConnectionStats) {
        wasmgate_sdk::verdicts::keep(self.keep);
    }
}

wasmgate_sdk::export_plugin!(VerdictKeeper);
