//! The in-memory key-value store behind the `kv` import: one per gateway, shared by every
//! instance of every plugin, each plugin in its own namespace.
//!
//! Sharded to keep instances on different threads from contending on one lock. Expired
//! entries are dropped when read and by a background sweep, so memory held by entries that
//! nobody reads again comes back. The total size is bounded; a write past it is refused.
//! Counters are stored as decimal text, so `get` on a counter reads naturally.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

const SHARDS: usize = 16;
/// Bytes charged per entry on top of its namespace, key and value: map slots, boxes, TTL.
const ENTRY_OVERHEAD: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The store holds its limit of this many bytes.
    Full(usize),
    NotAnInteger,
    Overflow,
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Full(limit) => write!(f, "the kv store is full ({limit} bytes)"),
            KvError::NotAnInteger => f.write_str("the value is not a decimal integer"),
            KvError::Overflow => f.write_str("the counter would overflow"),
        }
    }
}

impl std::error::Error for KvError {}

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|t| t <= now)
    }
}

/// namespace -> key -> entry. Two levels so lookups borrow `&str` without building a key.
type Shard = HashMap<Box<str>, HashMap<Box<str>, Entry>>;

pub struct Kv {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    bytes: AtomicUsize,
    max_bytes: usize,
}

impl Kv {
    /// A store bounded to `max_bytes`, swept for expired entries every `sweep_every` by a
    /// thread that ends when the store is dropped.
    pub fn new(max_bytes: usize, sweep_every: Duration) -> std::io::Result<Arc<Kv>> {
        let kv = Arc::new(Kv {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::new())).collect(),
            hasher: RandomState::new(),
            bytes: AtomicUsize::new(0),
            max_bytes,
        });
        let weak: Weak<Kv> = Arc::downgrade(&kv);
        std::thread::Builder::new()
            .name("wasmgate-kv-sweep".into())
            .spawn(move || loop {
                std::thread::sleep(sweep_every);
                match weak.upgrade() {
                    Some(kv) => kv.sweep(),
                    None => return,
                }
            })?;
        Ok(kv)
    }

    fn shard(&self, ns: &str, key: &str) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one((ns, key)) as usize % SHARDS]
    }

    pub fn get(&self, ns: &str, key: &str) -> Option<Vec<u8>> {
        let mut shard = self.shard(ns, key).lock().unwrap();
        let map = shard.get_mut(ns)?;
        let entry = map.get(key)?;
        if entry.expired(Instant::now()) {
            self.remove(map, ns, key);
            return None;
        }
        Some(entry.value.clone())
    }

    pub fn set(
        &self,
        ns: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), KvError> {
        let expires = ttl.map(|t| Instant::now() + t);
        let mut shard = self.shard(ns, key).lock().unwrap();
        let map = namespace(&mut shard, ns);
        let old = map.get(key).map_or(0, |e| e.value.len());
        match map.get_mut(key) {
            Some(entry) => {
                self.reserve(value.len(), old)?;
                entry.value.clear();
                entry.value.extend_from_slice(value);
                entry.expires = expires;
            }
            None => {
                self.reserve(cost(ns, key, value.len()), 0)?;
                map.insert(
                    key.into(),
                    Entry {
                        value: value.to_vec(),
                        expires,
                    },
                );
            }
        }
        Ok(())
    }

    pub fn delete(&self, ns: &str, key: &str) {
        let mut shard = self.shard(ns, key).lock().unwrap();
        if let Some(map) = shard.get_mut(ns) {
            self.remove(map, ns, key);
        }
    }

    /// Adds `delta` to the counter at `key` (absent or expired counts as 0). `ttl` applies
    /// only when the counter is created.
    pub fn incr(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, KvError> {
        let now = Instant::now();
        let mut shard = self.shard(ns, key).lock().unwrap();
        let map = namespace(&mut shard, ns);
        if map.get(key).is_some_and(|e| e.expired(now)) {
            self.remove(map, ns, key);
        }
        match map.get_mut(key) {
            Some(entry) => {
                let current: i64 = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(KvError::NotAnInteger)?;
                let new = current.checked_add(delta).ok_or(KvError::Overflow)?;
                let text = new.to_string();
                self.reserve(text.len(), entry.value.len())?;
                entry.value = text.into_bytes();
                Ok(new)
            }
            None => {
                let text = delta.to_string();
                self.reserve(cost(ns, key, text.len()), 0)?;
                let expires = ttl.map(|t| now + t);
                map.insert(
                    key.into(),
                    Entry {
                        value: text.into_bytes(),
                        expires,
                    },
                );
                Ok(delta)
            }
        }
    }

    /// Bytes held now, as charged against the limit.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Drops every expired entry, one shard lock at a time.
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap();
            shard.retain(|ns, map| {
                map.retain(|key, e| {
                    let keep = !e.expired(now);
                    if !keep {
                        self.bytes
                            .fetch_sub(cost(ns, key, e.value.len()), Ordering::Relaxed);
                    }
                    keep
                });
                !map.is_empty()
            });
        }
    }

    /// Charges `new` bytes in place of `old`, or refuses when that passes the limit.
    fn reserve(&self, new: usize, old: usize) -> Result<(), KvError> {
        if new <= old {
            self.bytes.fetch_sub(old - new, Ordering::Relaxed);
            return Ok(());
        }
        let grow = new - old;
        self.bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b + grow <= self.max_bytes).then_some(b + grow)
            })
            .map(|_| ())
            .map_err(|_| KvError::Full(self.max_bytes))
    }

    fn remove(&self, map: &mut HashMap<Box<str>, Entry>, ns: &str, key: &str) {
        if let Some(e) = map.remove(key) {
            self.bytes
                .fetch_sub(cost(ns, key, e.value.len()), Ordering::Relaxed);
        }
    }
}

fn namespace<'a>(shard: &'a mut Shard, ns: &str) -> &'a mut HashMap<Box<str>, Entry> {
    if !shard.contains_key(ns) {
        shard.insert(ns.into(), HashMap::new());
    }
    shard.get_mut(ns).expect("inserted above")
}

fn cost(ns: &str, key: &str, value_len: usize) -> usize {
    ns.len() + key.len() + value_len + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(max: usize) -> Arc<Kv> {
        Kv::new(max, Duration::from_secs(3600)).unwrap()
    }

    #[test]
    fn namespaces_are_separate() {
        let kv = kv(1 << 20);
        kv.set("a", "k", b"1", None).unwrap();
        assert_eq!(kv.get("a", "k").as_deref(), Some(&b"1"[..]));
        assert_eq!(kv.get("b", "k"), None);
        kv.delete("a", "k");
        assert_eq!(kv.get("a", "k"), None);
        assert_eq!(kv.bytes(), 0);
    }

    #[test]
    fn incr_counts_and_refuses_non_integers() {
        let kv = kv(1 << 20);
        assert_eq!(kv.incr("p", "c", 5, None), Ok(5));
        assert_eq!(kv.incr("p", "c", -7, None), Ok(-2));
        assert_eq!(kv.get("p", "c").as_deref(), Some(&b"-2"[..]));
        kv.set("p", "s", b"text", None).unwrap();
        assert_eq!(kv.incr("p", "s", 1, None), Err(KvError::NotAnInteger));
        kv.set("p", "m", i64::MAX.to_string().as_bytes(), None)
            .unwrap();
        assert_eq!(kv.incr("p", "m", 1, None), Err(KvError::Overflow));
    }

    #[test]
    fn ttl_expires_on_read_and_on_sweep() {
        let kv = kv(1 << 20);
        kv.set("p", "a", b"x", Some(Duration::from_millis(1)))
            .unwrap();
        kv.set("p", "b", b"y", Some(Duration::from_millis(1)))
            .unwrap();
        kv.incr("p", "c", 1, Some(Duration::from_millis(1)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(kv.get("p", "a"), None);
        // An expired counter starts again from 0.
        assert_eq!(kv.incr("p", "c", 1, None), Ok(1));
        kv.sweep();
        assert_eq!(kv.get("p", "b"), None);
        assert_eq!(kv.bytes(), cost("p", "c", 1));
    }

    #[test]
    fn size_is_bounded() {
        let kv = kv(1000);
        kv.set("p", "a", &[0; 500], None).unwrap();
        assert_eq!(kv.set("p", "b", &[0; 500], None), Err(KvError::Full(1000)));
        // Shrinking an entry frees room.
        kv.set("p", "a", &[0; 10], None).unwrap();
        kv.set("p", "b", &[0; 500], None).unwrap();
    }
}
