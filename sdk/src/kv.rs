//! The key-value store shared by all instances of a plugin, in the plugin's own namespace
//! and share of the gateway's store.
//!
//! This is where state shared across instances goes: counters, rate limits, sessions keyed
//! by [`crate::Conn::id`]. Counters made by [`incr`] read back with [`get`] as decimal text.
//!
//! Writes can fail: [`Error::Full`] when the plugin's share (`kv_max_keys` keys,
//! `kv_max_bytes` bytes in the gateway's config) has no room. Nothing was stored then, so a
//! plugin that counts must decide what an uncounted request means (`plugins/rate-limit`
//! refuses it by default).
//!
//! Off Wasm the store is an in-memory map per thread (so per test), honouring TTLs against
//! [`crate::now_ms`], with a share that [`crate::testing::set_kv_share`] can shrink.

#[cfg(target_arch = "wasm32")]
use crate::bindings::wasmgate::plugin::kv as host;

/// Why a write was refused; nothing was changed.
pub use crate::bindings::wasmgate::plugin::kv::KvError as Error;

/// The value stored under `key`, if any and not expired.
pub fn get(key: &str) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    return host::get(key);
    #[cfg(not(target_arch = "wasm32"))]
    return native::get(key);
}

/// Stores `value` under `key`; `ttl_ms` none keeps it until deleted.
pub fn set(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), Error> {
    #[cfg(target_arch = "wasm32")]
    return host::set(key, value, ttl_ms);
    #[cfg(not(target_arch = "wasm32"))]
    return native::set(key, value, ttl_ms);
}

/// Removes `key`.
pub fn delete(key: &str) {
    #[cfg(target_arch = "wasm32")]
    host::delete(key);
    #[cfg(not(target_arch = "wasm32"))]
    native::delete(key);
}

/// Atomically adds `delta` to the counter at `key` (absent counts as 0) and returns the new
/// value. `ttl_ms`, if given, is set when the counter is created. Refused when `key` holds
/// anything but a decimal integer, on overflow, and when a new counter finds the share full.
pub fn incr(key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, Error> {
    #[cfg(target_arch = "wasm32")]
    return host::incr(key, delta, ttl_ms);
    #[cfg(not(target_arch = "wasm32"))]
    return native::incr(key, delta, ttl_ms);
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod native {
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    use super::Error;

    /// Bytes charged per entry on top of its key and value, as the gateway does.
    const ENTRY_OVERHEAD: usize = 64;

    struct Entry {
        value: Vec<u8>,
        expires_at_ms: Option<u64>,
    }

    thread_local! {
        static STORE: RefCell<HashMap<String, Entry>> = RefCell::new(HashMap::new());
        /// (keys, bytes) the share allows; the gateway's defaults.
        pub static SHARE: Cell<(usize, usize)> = const { Cell::new((10_000, 4 << 20)) };
    }

    fn live(entry: &Entry) -> bool {
        entry.expires_at_ms.is_none_or(|at| crate::now_ms() < at)
    }

    fn expiry(ttl_ms: Option<u64>) -> Option<u64> {
        ttl_ms.map(|ttl| crate::now_ms().saturating_add(ttl))
    }

    fn cost(key: &str, value: &[u8]) -> usize {
        key.len() + value.len() + ENTRY_OVERHEAD
    }

    /// Whether storing `value` under `key` fits the share, counting live entries only.
    fn fits(store: &HashMap<String, Entry>, key: &str, value: &[u8]) -> bool {
        let (max_keys, max_bytes) = SHARE.get();
        let others = store.iter().filter(|(k, e)| k.as_str() != key && live(e));
        let (keys, bytes) = others.fold((0, 0), |(n, b), (k, e)| (n + 1, b + cost(k, &e.value)));
        keys < max_keys && bytes + cost(key, value) <= max_bytes
    }

    pub fn get(key: &str) -> Option<Vec<u8>> {
        STORE.with_borrow(|store| store.get(key).filter(|e| live(e)).map(|e| e.value.clone()))
    }

    pub fn set(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), Error> {
        STORE.with_borrow_mut(|store| {
            if !fits(store, key, value) {
                return Err(Error::Full);
            }
            let entry = Entry { value: value.to_vec(), expires_at_ms: expiry(ttl_ms) };
            store.insert(key.to_string(), entry);
            Ok(())
        })
    }

    pub fn delete(key: &str) {
        STORE.with_borrow_mut(|store| store.remove(key));
    }

    pub fn incr(key: &str, delta: i64, ttl_ms: Option<u64>) -> Result<i64, Error> {
        STORE.with_borrow_mut(|store| {
            let current = store.get(key).filter(|e| live(e));
            let (old, expires_at_ms) = match current {
                Some(e) => {
                    let old = std::str::from_utf8(&e.value).ok().and_then(|s| s.parse::<i64>().ok());
                    (old.ok_or(Error::NotAnInteger)?, e.expires_at_ms)
                }
                None => (0, expiry(ttl_ms)),
            };
            let new = old.checked_add(delta).ok_or(Error::Overflow)?;
            let value = new.to_string().into_bytes();
            if !fits(store, key, &value) {
                return Err(Error::Full);
            }
            store.insert(key.to_string(), Entry { value, expires_at_ms });
            Ok(new)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_delete() {
        assert_eq!(get("k"), None);
        set("k", b"v", None).unwrap();
        assert_eq!(get("k").as_deref(), Some(&b"v"[..]));
        delete("k");
        assert_eq!(get("k"), None);
    }

    #[test]
    fn counters_count_and_read_as_text() {
        assert_eq!(incr("c", 1, None), Ok(1));
        assert_eq!(incr("c", 5, None), Ok(6));
        assert_eq!(incr("c", -2, None), Ok(4));
        assert_eq!(get("c").as_deref(), Some(&b"4"[..]));
    }

    #[test]
    fn counters_refuse_other_values_and_overflow() {
        set("s", b"text", None).unwrap();
        assert_eq!(incr("s", 1, None), Err(Error::NotAnInteger));
        set("m", i64::MAX.to_string().as_bytes(), None).unwrap();
        assert_eq!(incr("m", 1, None), Err(Error::Overflow));
    }

    #[test]
    fn a_full_share_refuses_writes() {
        crate::testing::set_kv_share(2, 1 << 20);
        set("a", b"1", None).unwrap();
        assert_eq!(incr("b", 1, None), Ok(1));
        assert_eq!(set("c", b"1", None), Err(Error::Full));
        assert_eq!(incr("d", 1, None), Err(Error::Full));
        // Existing keys can still change.
        assert_eq!(incr("b", 1, None), Ok(2));
        delete("a");
        assert_eq!(incr("d", 1, None), Ok(1));
        crate::testing::set_kv_share(10, 100);
        assert_eq!(set("big", &[0; 100], None), Err(Error::Full));
    }

    #[test]
    fn ttl_expires_and_is_set_only_on_create() {
        set("s", b"v", Some(100)).unwrap();
        assert_eq!(incr("n", 1, Some(100)), Ok(1));
        crate::testing::advance_clock(50);
        assert_eq!(incr("n", 1, Some(10_000)), Ok(2));
        assert!(get("s").is_some());
        crate::testing::advance_clock(50);
        assert_eq!(get("s"), None);
        assert_eq!(incr("n", 1, None), Ok(1));
    }
}
