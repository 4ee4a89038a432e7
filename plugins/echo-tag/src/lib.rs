//! Prefixes every text message from the client with a configured tag before it goes
//! upstream. Behind an echo server the tag comes back, so a test can tell which version of
//! the plugin handled a message, e.g. across a hot reload.

use serde::Deserialize;
use wasmgate_sdk::{Action, Conn, Direction, Hooks, Message, Opcode, Plugin};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    prefix: String,
}

pub struct EchoTag {
    prefix: Vec<u8>,
}

impl Plugin for EchoTag {
    type Config = Config;
    const HOOKS: Hooks = Hooks::MESSAGES;

    fn new(config: Config) -> Result<Self, String> {
        Ok(EchoTag {
            prefix: config.prefix.into_bytes(),
        })
    }

    fn on_message(&mut self, _: &Conn, msg: &Message) -> Action {
        match (msg.direction(), msg.opcode()) {
            (Direction::ClientToUpstream, Opcode::Text) => {
                Action::Replace([&self.prefix[..], msg.payload()].concat())
            }
            _ => Action::Forward,
        }
    }
}

wasmgate_sdk::export_plugin!(EchoTag);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_client_text_only() {
        let mut plugin = EchoTag::from_json(r#"{"prefix":"v1:"}"#).unwrap();
        let conn = Conn::new(1);
        let mut call = |dir, op| plugin.on_message(&conn, &Message::new(dir, op, &b"hi"[..]));
        assert_eq!(
            call(Direction::ClientToUpstream, Opcode::Text),
            Action::Replace(b"v1:hi".to_vec())
        );
        assert_eq!(
            call(Direction::ClientToUpstream, Opcode::Binary),
            Action::Forward
        );
        assert_eq!(
            call(Direction::UpstreamToClient, Opcode::Text),
            Action::Forward
        );
    }

    #[test]
    fn prefix_is_required() {
        assert!(EchoTag::from_json("{}").err().unwrap().contains("prefix"));
    }
}
