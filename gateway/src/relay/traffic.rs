//! Live traffic counters: messages and payload bytes each way, on `/metrics` and the
//! dashboard while connections are open, not only once they end.
//!
//! The relay counts in plain fields of its links (no atomics per frame) and adds what
//! changed to the shared counters at most once a second, on a read it does anyway (the
//! read already takes the time), and once more when the connection ends. An idle connection
//! is never woken for it.

use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::{Counter, Registry};

/// How often a busy connection publishes its counts.
const EVERY: Duration = Duration::from_secs(1);

/// Messages and bytes relayed each way, for one scope (the gateway, a server).
#[derive(Debug, Clone)]
pub struct TrafficCounters {
    pub messages_from_client: Counter,
    pub messages_from_upstream: Counter,
    pub bytes_from_client: Counter,
    pub bytes_from_upstream: Counter,
}

impl TrafficCounters {
    /// `wasmgate_{prefix}messages_total{from}` and `wasmgate_{prefix}payload_bytes_total{from}`
    /// with `labels` added.
    pub fn register(r: &Registry, prefix: &str, labels: &[(&str, &str)]) -> TrafficCounters {
        let series = |what: &str, help: &str, from: &str| {
            let mut all = labels.to_vec();
            all.push(("from", from));
            r.counter(&format!("wasmgate_{prefix}{what}"), help, &all)
        };
        let messages = "Data messages relayed";
        let bytes = "Payload bytes relayed";
        TrafficCounters {
            messages_from_client: series("messages_total", messages, "client"),
            messages_from_upstream: series("messages_total", messages, "upstream"),
            bytes_from_client: series("payload_bytes_total", bytes, "client"),
            bytes_from_upstream: series("payload_bytes_total", bytes, "upstream"),
        }
    }

    fn add(&self, delta: [u64; 4]) {
        let counters = [&self.messages_from_client, &self.messages_from_upstream, &self.bytes_from_client, &self.bytes_from_upstream];
        for (counter, n) in counters.into_iter().zip(delta) {
            if n > 0 {
                counter.add(n);
            }
        }
    }
}

/// What one relay has published so far, and when it publishes next.
pub(super) struct Reporter<'a> {
    to: &'a [&'a TrafficCounters],
    reported: [u64; 4],
    next: Instant,
}

impl<'a> Reporter<'a> {
    pub(super) fn new(to: &'a [&'a TrafficCounters], now: Instant) -> Reporter<'a> {
        Reporter { to, reported: [0; 4], next: now + EVERY }
    }

    /// Publishes `totals` (messages from client, from upstream, bytes likewise) if a second
    /// has passed since the last time.
    #[inline]
    pub(super) fn tick(&mut self, now: Instant, totals: impl FnOnce() -> [u64; 4]) {
        if now >= self.next {
            self.next = now + EVERY;
            self.publish(totals());
        }
    }

    pub(super) fn publish(&mut self, totals: [u64; 4]) {
        let mut delta = [0; 4];
        for i in 0..4 {
            delta[i] = totals[i].saturating_sub(self.reported[i]);
        }
        self.reported = totals;
        for counters in self.to {
            counters.add(delta);
        }
    }
}
