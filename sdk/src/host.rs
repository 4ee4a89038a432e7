//! Time and randomness from the host.
//!
//! Off Wasm, the clocks are the process's own plus an offset tests can move
//! ([`crate::testing::advance_clock`]), and randomness is a seeded per-thread generator
//! ([`crate::testing::seed_random`]) so balancer tests are repeatable.

#[cfg(target_arch = "wasm32")]
use crate::bindings::wasmgate::plugin::host;

/// Wall-clock time, milliseconds since the Unix epoch.
#[cfg(target_arch = "wasm32")]
pub fn now_ms() -> u64 {
    host::now_ms()
}

/// A monotonic clock in nanoseconds, for measuring intervals.
#[cfg(target_arch = "wasm32")]
pub fn monotonic_ns() -> u64 {
    host::monotonic_ns()
}

/// 64 random bits from the host's generator.
#[cfg(target_arch = "wasm32")]
pub fn random_u64() -> u64 {
    host::random_u64()
}

/// Wall-clock time, milliseconds since the Unix epoch.
#[cfg(not(target_arch = "wasm32"))]
pub fn now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    since_epoch.as_millis() as u64 + native::offset_ms()
}

/// A monotonic clock in nanoseconds, for measuring intervals.
#[cfg(not(target_arch = "wasm32"))]
pub fn monotonic_ns() -> u64 {
    native::START.with(|start| start.elapsed().as_nanos() as u64) + native::offset_ms() * 1_000_000
}

/// 64 random bits from the host's generator.
#[cfg(not(target_arch = "wasm32"))]
pub fn random_u64() -> u64 {
    native::RANDOM.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        crate::hash::mix64(next)
    })
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod native {
    use std::cell::Cell;
    use std::time::Instant;

    thread_local! {
        pub static START: Instant = Instant::now();
        pub static OFFSET_MS: Cell<u64> = const { Cell::new(0) };
        pub static RANDOM: Cell<u64> = const { Cell::new(0) };
    }

    pub fn offset_ms() -> u64 {
        OFFSET_MS.get()
    }
}
