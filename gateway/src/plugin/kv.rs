//! The in-memory key-value store behind the `kv` import: one per gateway, shared by every
//! instance of every plugin, each plugin in its own namespace with its own share.
//!
//! A share ([`Share`]) bounds a plugin's keys and bytes. A write past it is refused with
//! [`KvError::Full`], which the plugin sees, so a plugin that counts (a rate limit) knows it
//! could not count instead of being told a number that was never stored. Shares are kept
//! by plugin name and outlive reloads, as the entries do; a reload may change the limits.
//! There is no store-wide limit besides: the store holds at most the sum of the shares, and
//! no plugin can use up another's.
//!
//! Sharded to keep instances on different threads from contending on one lock. Expired
//! entries are dropped when read and by a background sweep, so memory held by entries that
//! nobody reads again comes back. Counters are stored as decimal text, so `get` on a
//! counter reads naturally.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

const SHARDS: usize = 16;
/// Bytes charged per entry on top of its key and value: map slots, boxes, TTL.
pub const ENTRY_OVERHEAD: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The plugin's share holds its limit: (keys, bytes).
    Full { max_keys: usize, max_bytes: usize },
    NotAnInteger,
    Overflow,
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Full { max_keys, max_bytes } => {
                write!(f, "the plugin's kv share is full ({max_keys} keys, {max_bytes} bytes)")
            }
            KvError::NotAnInteger => f.write_str("the value is not a decimal integer"),
            KvError::Overflow => f.write_str("the counter would overflow"),
        }
    }
}

impl std::error::Error for KvError {}

/// One plugin's part of the store: its namespace, its limits and what it holds.
#[derive(Debug)]
pub struct Share {
    namespace: Box<str>,
    max_keys: AtomicUsize,
    max_bytes: AtomicUsize,
    keys: AtomicUsize,
    bytes: AtomicUsize,
}

impl Share {
    /// Keys and bytes held now, as charged against the limits.
    pub fn used(&self) -> (usize, usize) {
        (self.keys.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }

    fn full(&self) -> KvError {
        KvError::Full {
            max_keys: self.max_keys.load(Ordering::Relaxed),
            max_bytes: self.max_bytes.load(Ordering::Relaxed),
        }
    }

    /// Charges `new` bytes in place of `old` (and one more key when `adds_key`), or refuses
    /// when that passes a limit, changing nothing.
    fn reserve(&self, new: usize, old: usize, adds_key: bool) -> Result<(), KvError> {
        if adds_key {
            let max = self.max_keys.load(Ordering::Relaxed);
            self.keys
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |k| (k < max).then_some(k + 1))
                .map_err(|_| self.full())?;
        }
        if new <= old {
            self.bytes.fetch_sub(old - new, Ordering::Relaxed);
            return Ok(());
        }
        let (grow, max) = (new - old, self.max_bytes.load(Ordering::Relaxed));
        let charged = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| (b + grow <= max).then_some(b + grow));
        if charged.is_err() {
            if adds_key {
                self.keys.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(self.full());
        }
        Ok(())
    }

    fn release(&self, key: &str, e: &Entry) {
        self.keys.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(cost(key, e.value.len()), Ordering::Relaxed);
    }
}

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|t| t <= now)
    }
}

/// A namespace's entries in one shard, with the share they are charged to.
struct Space {
    share: Arc<Share>,
    entries: HashMap<Box<str>, Entry>,
}

/// namespace -> its entries. Two levels so lookups borrow `&str` without building a key.
type Shard = HashMap<Box<str>, Space>;

pub struct Kv {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    shares: Mutex<HashMap<Box<str>, Arc<Share>>>,
}

impl Kv {
    /// An empty store, swept for expired entries every `sweep_every` by a thread that ends
    /// when the store is dropped.
    pub fn new(sweep_every: Duration) -> std::io::Result<Arc<Kv>> {
        let kv = Arc::new(Kv {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::new())).collect(),
            hasher: RandomState::new(),
            shares: Mutex::new(HashMap::new()),
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

    /// The share of the plugin `namespace`, with these limits from now on (a reload may
    /// lower them below what it holds: then its writes that grow are refused until entries
    /// go).
    pub fn share(&self, namespace: &str, max_keys: usize, max_bytes: usize) -> Arc<Share> {
        let share = lock(&self.shares)
            .entry(namespace.into())
            .or_insert_with(|| {
                Arc::new(Share {
                    namespace: namespace.into(),
                    max_keys: AtomicUsize::new(max_keys),
                    max_bytes: AtomicUsize::new(max_bytes),
                    keys: AtomicUsize::new(0),
                    bytes: AtomicUsize::new(0),
                })
            })
            .clone();
        share.max_keys.store(max_keys, Ordering::Relaxed);
        share.max_bytes.store(max_bytes, Ordering::Relaxed);
        share
    }

    fn shard(&self, share: &Share, key: &str) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.hasher.hash_one((&*share.namespace, key)) as usize % SHARDS])
    }

    pub fn get(&self, share: &Share, key: &str) -> Option<Vec<u8>> {
        let mut shard = self.shard(share, key);
        let space = shard.get_mut(&*share.namespace)?;
        let entry = space.entries.get(key)?;
        if entry.expired(Instant::now()) {
            remove(space, key);
            return None;
        }
        Some(entry.value.clone())
    }

    pub fn set(&self, share: &Arc<Share>, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), KvError> {
        let now = Instant::now();
        let expires = ttl.map(|t| now + t);
        let mut shard = self.shard(share, key);
        let space = space(&mut shard, share);
        drop_expired(space, key, now);
        match space.entries.get_mut(key) {
            Some(entry) => {
                share.reserve(value.len(), entry.value.len(), false)?;
                entry.value.clear();
                entry.value.extend_from_slice(value);
                entry.expires = expires;
            }
            None => {
                share.reserve(cost(key, value.len()), 0, true)?;
                space.entries.insert(key.into(), Entry { value: value.to_vec(), expires });
            }
        }
        Ok(())
    }

    pub fn delete(&self, share: &Share, key: &str) {
        let mut shard = self.shard(share, key);
        if let Some(space) = shard.get_mut(&*share.namespace) {
            remove(space, key);
        }
    }

    /// Adds `delta` to the counter at `key` (absent or expired counts as 0). `ttl` applies
    /// only when the counter is created.
    pub fn incr(&self, share: &Arc<Share>, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, KvError> {
        let now = Instant::now();
        let mut shard = self.shard(share, key);
        let space = space(&mut shard, share);
        drop_expired(space, key, now);
        match space.entries.get_mut(key) {
            Some(entry) => {
                let current: i64 = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(KvError::NotAnInteger)?;
                let new = current.checked_add(delta).ok_or(KvError::Overflow)?;
                let text = new.to_string();
                share.reserve(text.len(), entry.value.len(), false)?;
                entry.value = text.into_bytes();
                Ok(new)
            }
            None => {
                let text = delta.to_string();
                share.reserve(cost(key, text.len()), 0, true)?;
                let expires = ttl.map(|t| now + t);
                space.entries.insert(key.into(), Entry { value: text.into_bytes(), expires });
                Ok(delta)
            }
        }
    }

    /// Drops every expired entry, one shard lock at a time.
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            lock(shard).retain(|_, space| {
                let share = &space.share;
                space.entries.retain(|key, e| {
                    let keep = !e.expired(now);
                    if !keep {
                        share.release(key, e);
                    }
                    keep
                });
                !space.entries.is_empty()
            });
        }
    }
}

/// The store's locks guard maps that a panic cannot leave half-changed (every change is one
/// map call after the checks), so a poisoned lock is taken as it is rather than taking every
/// later plugin call down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn space<'a>(shard: &'a mut Shard, share: &Arc<Share>) -> &'a mut Space {
    if !shard.contains_key(&*share.namespace) {
        shard.insert(share.namespace.clone(), Space { share: share.clone(), entries: HashMap::new() });
    }
    shard.get_mut(&*share.namespace).expect("inserted above")
}

fn drop_expired(space: &mut Space, key: &str, now: Instant) {
    if space.entries.get(key).is_some_and(|e| e.expired(now)) {
        remove(space, key);
    }
}

fn remove(space: &mut Space, key: &str) {
    if let Some(e) = space.entries.remove(key) {
        space.share.release(key, &e);
    }
}

fn cost(key: &str, value_len: usize) -> usize {
    key.len() + value_len + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv() -> Arc<Kv> {
        Kv::new(Duration::from_secs(3600)).unwrap()
    }

    #[test]
    fn namespaces_are_separate() {
        let kv = kv();
        let (a, b) = (kv.share("a", 100, 1 << 20), kv.share("b", 100, 1 << 20));
        kv.set(&a, "k", b"1", None).unwrap();
        assert_eq!(kv.get(&a, "k").as_deref(), Some(&b"1"[..]));
        assert_eq!(kv.get(&b, "k"), None);
        kv.delete(&a, "k");
        assert_eq!(kv.get(&a, "k"), None);
        assert_eq!(a.used(), (0, 0));
    }

    #[test]
    fn incr_counts_and_refuses_non_integers() {
        let kv = kv();
        let p = kv.share("p", 100, 1 << 20);
        assert_eq!(kv.incr(&p, "c", 5, None), Ok(5));
        assert_eq!(kv.incr(&p, "c", -7, None), Ok(-2));
        assert_eq!(kv.get(&p, "c").as_deref(), Some(&b"-2"[..]));
        kv.set(&p, "s", b"text", None).unwrap();
        assert_eq!(kv.incr(&p, "s", 1, None), Err(KvError::NotAnInteger));
        kv.set(&p, "m", i64::MAX.to_string().as_bytes(), None).unwrap();
        assert_eq!(kv.incr(&p, "m", 1, None), Err(KvError::Overflow));
    }

    #[test]
    fn ttl_expires_on_read_on_write_and_on_sweep() {
        let kv = kv();
        let p = kv.share("p", 100, 1 << 20);
        let short = Some(Duration::from_millis(1));
        kv.set(&p, "a", b"x", short).unwrap();
        kv.set(&p, "b", b"y", short).unwrap();
        kv.set(&p, "d", b"z", short).unwrap();
        kv.incr(&p, "c", 1, short).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(kv.get(&p, "a"), None);
        // An expired counter starts again from 0, with the TTL given now.
        assert_eq!(kv.incr(&p, "c", 1, None), Ok(1));
        // An expired value is replaced as if absent.
        kv.set(&p, "d", b"w", None).unwrap();
        kv.sweep();
        assert_eq!(kv.get(&p, "b"), None);
        assert_eq!(p.used(), (2, cost("c", 1) + cost("d", 1)));
    }

    #[test]
    fn a_full_share_refuses_and_changes_nothing() {
        let kv = kv();
        let p = kv.share("p", 3, 1000);
        let full = KvError::Full { max_keys: 3, max_bytes: 1000 };
        kv.set(&p, "a", &[0; 500], None).unwrap();
        assert_eq!(kv.set(&p, "b", &[0; 500], None), Err(full.clone()));
        assert_eq!(kv.get(&p, "b"), None);
        // Growing an entry past the bytes is refused; the old value stays.
        assert_eq!(kv.set(&p, "a", &[1; 1000], None), Err(full.clone()));
        assert_eq!(kv.get(&p, "a").unwrap(), vec![0; 500]);
        // Shrinking one frees room.
        kv.set(&p, "a", &[0; 10], None).unwrap();
        kv.set(&p, "b", &[0; 500], None).unwrap();
        // Keys are bounded too, for counters as for values.
        kv.incr(&p, "c", 1, None).unwrap();
        assert_eq!(kv.incr(&p, "d", 1, None), Err(full.clone()));
        assert_eq!(kv.set(&p, "d", b"", None), Err(full));
        assert_eq!(p.used().0, 3);
        // Updating a key that exists needs no new key.
        assert_eq!(kv.incr(&p, "c", 1, None), Ok(2));
        kv.delete(&p, "b");
        assert_eq!(kv.incr(&p, "d", 1, None), Ok(1));
    }

    #[test]
    fn one_plugin_filling_its_share_leaves_the_others_room() {
        let kv = kv();
        let (greedy, fair) = (kv.share("greedy", 1000, 64 << 10), kv.share("fair", 1000, 64 << 10));
        let mut i = 0;
        while kv.set(&greedy, &format!("k{i}"), &[0; 100], None).is_ok() {
            i += 1;
        }
        assert!(i > 100, "{i}");
        for n in 1..=100 {
            assert_eq!(kv.incr(&fair, "count", 1, None), Ok(n));
        }
        // A reload with a bigger share lets the greedy one grow again; its entries stayed.
        let greedy = kv.share("greedy", 1000, 128 << 10);
        assert_eq!(kv.get(&greedy, "k0").as_deref(), Some(&[0; 100][..]));
        assert!(kv.set(&greedy, "more", &[0; 100], None).is_ok());
    }
}
