//! Controls for the in-memory host used by native unit tests (not built for Wasm).
//!
//! All of it is per thread, and the test harness runs each test on its own thread, so tests
//! start from an empty store, a zero clock offset and the same random sequence.

use crate::host::native;

/// Moves [`crate::now_ms`] and [`crate::monotonic_ns`] forward, e.g. to expire kv TTLs.
pub fn advance_clock(ms: u64) {
    native::OFFSET_MS.set(native::OFFSET_MS.get() + ms);
}

/// Restarts [`crate::random_u64`]'s sequence from `seed`.
pub fn seed_random(seed: u64) {
    native::RANDOM.set(seed);
}

/// Shrinks (or grows) this thread's kv share to `max_keys` keys and `max_bytes` bytes (keys,
/// values and 64 per entry, as the gateway charges), to test what a plugin does when the
/// store refuses its writes. The default is the gateway's: 10,000 keys, 4 MiB.
pub fn set_kv_share(max_keys: usize, max_bytes: usize) {
    crate::kv::native::SHARE.set((max_keys, max_bytes));
}

/// The sum of everything added to a counter.
pub fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    crate::metrics::native::read(name, labels).counter
}

/// The last value a gauge was set to.
pub fn gauge(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    crate::metrics::native::read(name, labels).gauge
}

/// Every observation of a histogram, in order.
pub fn observations(name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    crate::metrics::native::read(name, labels).observations
}

/// The session log as [`crate::session::remember`] left it: keys and payloads, oldest first.
pub fn session_log() -> Vec<(String, Vec<u8>)> {
    crate::session::native::with(|s| s.log.clone())
}

/// Starts (or ends) a replay, as the gateway does when it moves the connection.
pub fn set_replaying(replaying: bool) {
    crate::session::native::with(|s| s.replaying = replaying);
}

/// The parts [`crate::verdicts::vary_on`] named last on this thread, if it was called.
pub fn vary_on() -> Option<Vec<String>> {
    crate::verdicts::native::VARY_ON.with_borrow(Clone::clone)
}

/// What [`crate::verdicts::keep`] asked for since the last call of this function, and
/// forgets it: call it before a handshake to clear, and after it to read.
pub fn kept_for() -> Option<std::time::Duration> {
    crate::verdicts::native::KEPT_MS.take().map(std::time::Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics;

    #[test]
    fn metrics_are_recorded() {
        metrics::counter_add("hits", &[("route", "/a")], 2);
        metrics::counter_add("hits", &[("route", "/a")], 3);
        metrics::gauge_set("load", &[], 0.5);
        metrics::histogram_observe("latency", &[], 1.0);
        metrics::histogram_observe("latency", &[], 2.0);
        assert_eq!(counter("hits", &[("route", "/a")]), 5);
        assert_eq!(counter("hits", &[("route", "/b")]), 0);
        assert_eq!(gauge("load", &[]), Some(0.5));
        assert_eq!(observations("latency", &[]), vec![1.0, 2.0]);
    }

    #[test]
    fn random_is_repeatable_from_a_seed() {
        seed_random(7);
        let first: Vec<u64> = (0..4).map(|_| crate::random_u64()).collect();
        seed_random(7);
        let again: Vec<u64> = (0..4).map(|_| crate::random_u64()).collect();
        assert_eq!(first, again);
        assert_ne!(first[0], first[1]);
    }

    #[test]
    fn clock_advances() {
        let before = crate::now_ms();
        advance_clock(60_000);
        assert!(crate::now_ms() >= before + 60_000);
    }
}
