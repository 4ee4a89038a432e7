//! Session state the gateway keeps for a connection, so that the connection can move to
//! another server when its own dies, drains or is rebalanced (a plugin declaring
//! [`crate::Hooks::SESSION`]).
//!
//! From [`crate::Plugin::on_message`], [`remember`] a client message (a subscribe, a join,
//! an auth) under a key; a later message under the same key replaces it, [`forget`] removes
//! it. The log lives in the gateway's memory, not the plugin's, bounded by
//! `session_log_bytes`. When the connection moves, the gateway calls
//! [`crate::Plugin::on_reattach`], replays the log in order to the new server, and
//! [`replaying`] is true until [`replay_done`]: the new server's answers to the replay can be
//! recognised and dropped, so the client never sees them twice.
//!
//! Off Wasm the log is in memory per thread (so per test); [`crate::testing`] can read it and
//! start a replay.

use crate::Message;
#[cfg(target_arch = "wasm32")]
use crate::bindings::wasmgate::plugin::session as host;

pub use crate::bindings::exports::wasmgate::plugin::resume::{Outgoing, ReattachReason};

/// Remembers `msg` (the client message of the `on_message` call in progress, as this
/// plugin received it) under `key`, replacing what was remembered under it. False, and
/// nothing remembered, when the log would pass `session_log_bytes` or `msg` came from the
/// upstream.
pub fn remember(msg: &Message, key: &str) -> bool {
    #[cfg(target_arch = "wasm32")]
    {
        let _ = msg;
        host::remember(key)
    }
    #[cfg(not(target_arch = "wasm32"))]
    native::remember(msg, key)
}

/// Removes what is remembered under `key`, if anything.
pub fn forget(key: &str) {
    #[cfg(target_arch = "wasm32")]
    host::forget(key);
    #[cfg(not(target_arch = "wasm32"))]
    native::forget(key);
}

/// The keys remembered, oldest first.
pub fn remembered() -> Vec<String> {
    #[cfg(target_arch = "wasm32")]
    return host::remembered();
    #[cfg(not(target_arch = "wasm32"))]
    return native::with(|s| s.log.iter().map(|(k, _)| k.clone()).collect());
}

/// True while the new server's answers to a replay are arriving.
pub fn replaying() -> bool {
    #[cfg(target_arch = "wasm32")]
    return host::replaying();
    #[cfg(not(target_arch = "wasm32"))]
    return native::with(|s| s.replaying);
}

/// Every replayed message was answered: [`replaying`] is false from now on.
pub fn replay_done() {
    #[cfg(target_arch = "wasm32")]
    host::replay_done();
    #[cfg(not(target_arch = "wasm32"))]
    native::with(|s| s.replaying = false);
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod native {
    use std::cell::RefCell;

    use crate::{Direction, Message};

    #[derive(Default)]
    pub struct State {
        pub log: Vec<(String, Vec<u8>)>,
        pub replaying: bool,
    }

    thread_local! {
        static STATE: RefCell<State> = RefCell::new(State::default());
    }

    pub fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
        STATE.with_borrow_mut(f)
    }

    pub fn remember(msg: &Message, key: &str) -> bool {
        if msg.direction() != Direction::ClientToUpstream {
            return false;
        }
        forget(key);
        let payload = msg.payload().to_vec();
        with(|s| s.log.push((key.to_string(), payload)));
        true
    }

    pub fn forget(key: &str) {
        with(|s| s.log.retain(|(k, _)| k != key));
    }
}
