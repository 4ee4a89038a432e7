//! Test fixture: a text message names the action the hook answers with, so a test can
//! drive every case of the contract's `action` through the gateway.
//!
//! From the client: `drop` → drop; `close` → close 4000 "asked to close"; `echo` → reply
//! with the message itself (no payload set); `reply:X` → reply X; `upper:…` → replace with
//! the upper-cased message; `raw:…` → forward uncompressed; `big:N` → reply with N bytes;
//! `grow:N` → replace with N bytes; anything else → forward.
//!
//! From the upstream: messages of 1,000 bytes or more are forwarded on their length alone,
//! without reading the payload; shorter ones starting with `raw:` go uncompressed.

use wasmgate_sdk::{Action, Conn, Direction, Hooks, Message, NoConfig, Plugin};

pub struct MessageActions;

impl Plugin for MessageActions {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::MESSAGES;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(MessageActions)
    }

    fn on_message(&mut self, _: &Conn, msg: &Message) -> Action {
        if msg.direction() == Direction::UpstreamToClient && msg.len() >= 1000 {
            return Action::Forward;
        }
        let Some(text) = msg.text_payload() else {
            return Action::Forward;
        };
        if text.starts_with("raw:") {
            return Action::ForwardUncompressed;
        }
        if msg.direction() == Direction::UpstreamToClient {
            return Action::Forward;
        }
        match text {
            "drop" => Action::Drop,
            "close" => Action::close(4000, "asked to close"),
            "echo" => Action::Echo,
            t if t.starts_with("upper:") => Action::Replace(t.to_uppercase().into_bytes()),
            t if t.starts_with("big:") => Action::Reply(vec![b'x'; size(&t[4..])]),
            t if t.starts_with("grow:") => Action::Replace(vec![b'x'; size(&t[5..])]),
            t => match t.strip_prefix("reply:") {
                Some(reply) => Action::Reply(reply.as_bytes().to_vec()),
                None => Action::Forward,
            },
        }
    }
}

fn size(digits: &str) -> usize {
    digits.parse().unwrap_or(0)
}

wasmgate_sdk::export_plugin!(MessageActions);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_sdk::Opcode;

    #[test]
    fn upstream_messages_are_judged_by_length_or_prefix() {
        let mut p = MessageActions;
        let from_upstream = |p: &mut MessageActions, text: &str| {
            p.on_message(&Conn::new(1), &Message::new(Direction::UpstreamToClient, Opcode::Text, text.as_bytes()))
        };
        assert_eq!(from_upstream(&mut p, "drop"), Action::Forward);
        assert_eq!(from_upstream(&mut p, "raw:x"), Action::ForwardUncompressed);
        assert_eq!(from_upstream(&mut p, &format!("raw:{}", "x".repeat(1000))), Action::Forward);
        assert_eq!(p.on_message(&Conn::new(1), &Message::text("drop")), Action::Drop);
    }
}
