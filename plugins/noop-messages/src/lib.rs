//! A message hook that forwards every message unchanged: the cost of one Wasm call per
//! message, measured against a route with no message hook.

use wasmgate_sdk::{Hooks, NoConfig, Plugin};

pub struct NoopMessages;

impl Plugin for NoopMessages {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::MESSAGES;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(NoopMessages)
    }
    // `on_message` keeps the SDK's default: forward.
}

wasmgate_sdk::export_plugin!(NoopMessages);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_sdk::{Action, Conn, Direction, Message, Opcode};

    #[test]
    fn forwards_everything() {
        let mut plugin = NoopMessages::from_json("").unwrap();
        for dir in [Direction::ClientToUpstream, Direction::UpstreamToClient] {
            for op in [Opcode::Text, Opcode::Binary] {
                assert_eq!(
                    plugin.on_message(&Conn::new(1), &Message::new(dir, op, &b"x"[..])),
                    Action::Forward
                );
            }
        }
    }
}
