//! Test fixture: tries to fill the kv store from `on_handshake`, then accepts with a header
//! saying how far it got. Config `{ "op": "<op>" }`:
//! - `fill`: 1 KiB values under new keys until the store refuses one (`x-kv: stored N, full`);
//! - `huge`: one 16 MiB value (`x-kv: <error>` or `x-kv: stored`);
//! - `counters`: new counters until the store refuses one.

use serde::Deserialize;
use wasmgate_sdk::{kv, Accept, Conn, Hooks, Plugin, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    op: String,
}

pub struct HostileKv {
    op: String,
}

impl Plugin for HostileKv {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(c: Config) -> Result<Self, String> {
        if !["fill", "huge", "counters"].contains(&c.op.as_str()) {
            return Err(format!("bad config: op {:?}", c.op));
        }
        Ok(HostileKv { op: c.op })
    }

    fn on_handshake(&mut self, conn: &Conn, _: &Request) -> Verdict {
        let report = match self.op.as_str() {
            "huge" => match kv::set("huge", &vec![7; 16 << 20], None) {
                Ok(()) => "stored".to_string(),
                Err(e) => e.name().to_string(),
            },
            op => {
                let value = [b'v'; 1024];
                let mut stored = 0u64;
                let err = loop {
                    let key = format!("{}-{}", conn.id(), stored);
                    let result = match op {
                        "fill" => kv::set(&key, &value, None),
                        _ => kv::incr(&key, 1, None).map(|_| ()),
                    };
                    match result {
                        Ok(()) => stored += 1,
                        Err(e) => break e,
                    }
                };
                format!("stored {stored}, {}", err.name())
            }
        };
        Accept::default().add_header("x-kv", &report).into()
    }
}

wasmgate_sdk::export_plugin!(HostileKv);
