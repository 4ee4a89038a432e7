//! The replay log of one connection: client messages a session plugin marked as session
//! state, by key, oldest first, bounded in bytes. It lives in host memory, created only for
//! connections whose route has a session plugin, and allocates nothing until a message is
//! remembered.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::plugin::Opcode;

/// Bytes charged per entry on top of its key and payload (the entry itself, the vectors).
const ENTRY_OVERHEAD: usize = 64;

pub struct SessionLog {
    limit: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: Vec<Entry>,
    bytes: usize,
    /// Set by a move, cleared by the plugin's `replay-done`; past this instant the replay
    /// counts as over anyway (a plugin that never says so cannot swallow answers for ever).
    replaying_until: Option<Instant>,
}

/// One remembered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub op: Opcode,
    pub payload: Vec<u8>,
}

impl Entry {
    fn cost(&self) -> usize {
        self.key.len() + self.payload.len() + ENTRY_OVERHEAD
    }
}

impl SessionLog {
    /// A log of at most `limit` bytes (keys, payloads and 64 per entry).
    pub fn new(limit: usize) -> SessionLog {
        SessionLog { limit, inner: Mutex::new(Inner::default()) }
    }

    fn locked(&self) -> MutexGuard<'_, Inner> {
        // Every change is complete before anything can panic: a poisoned log is whole.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers `payload` under `key`, replacing (and moving to the end) what was there.
    /// False, changing nothing, when the log would pass its limit.
    pub fn remember(&self, key: &str, op: Opcode, payload: &[u8]) -> bool {
        let entry = Entry { key: key.to_string(), op, payload: payload.to_vec() };
        let mut inner = self.locked();
        let old = inner.entries.iter().position(|e| e.key == key);
        let freed = old.map_or(0, |i| inner.entries[i].cost());
        if inner.bytes - freed + entry.cost() > self.limit {
            return false;
        }
        if let Some(i) = old {
            inner.entries.remove(i);
        }
        inner.bytes = inner.bytes - freed + entry.cost();
        inner.entries.push(entry);
        true
    }

    pub fn forget(&self, key: &str) {
        let mut inner = self.locked();
        if let Some(i) = inner.entries.iter().position(|e| e.key == key) {
            let removed = inner.entries.remove(i);
            inner.bytes -= removed.cost();
        }
        if inner.entries.is_empty() {
            inner.entries = Vec::new();
        }
    }

    pub fn keys(&self) -> Vec<String> {
        self.locked().entries.iter().map(|e| e.key.clone()).collect()
    }

    /// The messages to replay, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        self.locked().entries.clone()
    }

    /// Bytes charged now.
    pub fn bytes(&self) -> usize {
        self.locked().bytes
    }

    /// A replay starts; it counts as over at `until` at the latest.
    pub fn start_replay(&self, until: Instant) {
        self.locked().replaying_until = Some(until);
    }

    pub fn replaying(&self) -> bool {
        self.locked().replaying_until.is_some_and(|until| Instant::now() < until)
    }

    pub fn replay_done(&self) {
        self.locked().replaying_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_replace_forget_and_keep_order() {
        let log = SessionLog::new(1024);
        assert!(log.remember("a", Opcode::Text, b"sub a"));
        assert!(log.remember("b", Opcode::Text, b"sub b"));
        assert!(log.remember("a", Opcode::Binary, b"sub a again"));
        assert_eq!(log.keys(), ["b", "a"]);
        assert_eq!(log.entries()[1].payload, b"sub a again");
        log.forget("b");
        log.forget("missing");
        assert_eq!(log.keys(), ["a"]);
        assert_eq!(log.bytes(), 1 + 11 + ENTRY_OVERHEAD);
    }

    #[test]
    fn the_limit_refuses_and_changes_nothing() {
        let log = SessionLog::new(2 * ENTRY_OVERHEAD + 10);
        assert!(log.remember("a", Opcode::Text, b"1234"));
        assert!(!log.remember("b", Opcode::Text, &[b'x'; 10]), "over the limit");
        assert_eq!(log.keys(), ["a"]);
        // Replacing counts the old entry as freed.
        assert!(log.remember("a", Opcode::Text, b"12345678"));
        assert_eq!(log.keys(), ["a"]);
    }

    #[test]
    fn a_replay_ends_when_the_plugin_says_or_at_its_deadline() {
        let log = SessionLog::new(100);
        assert!(!log.replaying());
        log.start_replay(Instant::now() + std::time::Duration::from_secs(60));
        assert!(log.replaying());
        log.replay_done();
        assert!(!log.replaying());
        log.start_replay(Instant::now());
        assert!(!log.replaying(), "past its deadline");
    }
}
