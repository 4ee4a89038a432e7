//! The data message a `messages` hook is called for, and what the hook decides.
//!
//! In Wasm the payload stays in the gateway until [`Message::payload`] is called: a hook that
//! decides on direction, opcode or [`Message::len`] alone never copies it. Off Wasm a
//! [`Message`] is a plain value that unit tests build with [`Message::new`].

use std::cell::OnceCell;

use crate::{Direction, Opcode};

/// One whole data message (control frames never reach plugins).
pub struct Message<'a> {
    dir: Direction,
    op: Opcode,
    len: usize,
    #[cfg(target_arch = "wasm32")]
    _call: std::marker::PhantomData<&'a ()>,
    #[cfg(not(target_arch = "wasm32"))]
    bytes: std::borrow::Cow<'a, [u8]>,
    payload: OnceCell<Vec<u8>>,
}

impl<'a> Message<'a> {
    /// The message of the `on-message` call in progress.
    #[cfg(target_arch = "wasm32")]
    pub(crate) fn from_host(dir: Direction, op: Opcode, len: u32) -> Message<'a> {
        Message { dir, op, len: len as usize, _call: std::marker::PhantomData, payload: OnceCell::new() }
    }

    /// A message for unit tests.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(dir: Direction, op: Opcode, payload: impl Into<std::borrow::Cow<'a, [u8]>>) -> Message<'a> {
        let bytes = payload.into();
        Message { dir, op, len: bytes.len(), bytes, payload: OnceCell::new() }
    }

    /// A text message from the client, for unit tests.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn text(payload: &'a str) -> Message<'a> {
        Message::new(Direction::ClientToUpstream, Opcode::Text, payload.as_bytes())
    }

    pub fn direction(&self) -> Direction {
        self.dir
    }

    pub fn opcode(&self) -> Opcode {
        self.op
    }

    /// The payload's size in bytes, without copying it.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload; fetched from the gateway on first use, then kept for this call.
    pub fn payload(&self) -> &[u8] {
        self.payload.get_or_init(|| {
            #[cfg(target_arch = "wasm32")]
            return crate::bindings::wasmgate::plugin::message::payload();
            #[cfg(not(target_arch = "wasm32"))]
            return self.bytes.to_vec();
        })
    }

    /// The payload as text, for a text message (the gateway has checked it is UTF-8).
    pub fn text_payload(&self) -> Option<&str> {
        match self.op {
            Opcode::Text => std::str::from_utf8(self.payload()).ok(),
            Opcode::Binary => None,
        }
    }
}

/// A close frame a hook asks for: code 1000..=1003, 1007..=1014 or 3000..=4999, and a
/// reason of at most 123 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: String,
}

/// What to do with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send it on unchanged.
    Forward,
    /// Send it on unchanged, but without permessage-deflate even on a compressing link
    /// (small or already compressed payloads).
    ForwardUncompressed,
    /// Send this payload instead (same opcode; text must stay valid UTF-8).
    Replace(Vec<u8>),
    /// Do not send it.
    Drop,
    /// Do not send it; send this back to the sender instead (same opcode).
    Reply(Vec<u8>),
    /// Do not send it; send it back to its sender unchanged (without copying it through
    /// the plugin).
    Echo,
    /// Close the connection on both sides.
    Close(CloseFrame),
}

impl Action {
    /// Close both sides with `code` and `reason`.
    pub fn close(code: u16, reason: &str) -> Action {
        Action::Close(CloseFrame { code, reason: reason.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_read_once_and_measured_without_reading() {
        let m = Message::new(Direction::UpstreamToClient, Opcode::Binary, vec![1, 2, 3]);
        assert_eq!((m.len(), m.direction(), m.opcode()), (3, Direction::UpstreamToClient, Opcode::Binary));
        assert_eq!(m.payload(), &[1, 2, 3]);
        assert_eq!(m.text_payload(), None);
        assert_eq!(Message::text("hi").text_payload(), Some("hi"));
    }
}
