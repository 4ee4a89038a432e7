//! Handshake verdicts the gateway may give again without calling the plugin.
//!
//! A plugin whose accept depends only on a few parts of the request (a token header, say)
//! names them from [`Plugin::new`](crate::Plugin::new) with [`vary_on`], and marks each
//! accept that may be reused with [`keep`] from `on_handshake`. The gateway then answers a
//! later handshake on the same route whose parts are byte for byte the same with that accept
//! (and the connection metadata the call set), without calling the plugin, for up to the
//! time given (the operator caps it). Refusals are never kept. Metrics, logs and kv writes
//! of the call are not done again for a kept answer.
//!
//! Off Wasm both are recorded per thread for tests ([`crate::testing::vary_on`],
//! [`crate::testing::kept_for`]).

use std::time::Duration;

/// Names the parts of a request this plugin's kept verdicts depend on, besides the route:
/// lower-case header names, or ":path", ":query", ":host", ":scheme", ":client-ip", ":sni".
/// One to eight of them; anything else fails `init`. Call it from `Plugin::new`.
pub fn vary_on(parts: &[&str]) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::wasmgate::plugin::verdicts::vary_on(parts);
    #[cfg(not(target_arch = "wasm32"))]
    native::VARY_ON.with_borrow_mut(|v| *v = Some(parts.iter().map(|p| p.to_string()).collect()));
}

/// From `on_handshake`: if it accepts, the gateway may give the same answer to requests
/// with the same [`vary_on`] parts on this route for up to `ttl`. Only after `vary_on`.
pub fn keep(ttl: Duration) {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    #[cfg(target_arch = "wasm32")]
    crate::bindings::wasmgate::plugin::verdicts::keep(ms);
    #[cfg(not(target_arch = "wasm32"))]
    native::KEPT_MS.set(Some(ms));
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod native {
    use std::cell::{Cell, RefCell};

    thread_local! {
        pub static VARY_ON: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
        pub static KEPT_MS: Cell<Option<u64>> = const { Cell::new(None) };
    }
}
