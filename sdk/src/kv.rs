//! The key-value store shared by all instances of all plugins (namespaced per plugin).
//!
//! This is where state shared across instances goes: counters, rate limits, sessions keyed
//! by [`crate::Conn::id`]. Counters made by [`incr`] read back with [`get`] as decimal text.
//! Off Wasm the store is an in-memory map per thread (so per test), honouring TTLs against
//! [`crate::now_ms`].

#[cfg(target_arch = "wasm32")]
use crate::bindings::wasmgate::plugin::kv as host;

/// The value stored under `key`, if any and not expired.
pub fn get(key: &str) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    return host::get(key);
    #[cfg(not(target_arch = "wasm32"))]
    return native::get(key);
}

/// Stores `value` under `key`; `ttl_ms` none keeps it until deleted.
pub fn set(key: &str, value: &[u8], ttl_ms: Option<u64>) {
    #[cfg(target_arch = "wasm32")]
    host::set(key, value, ttl_ms);
    #[cfg(not(target_arch = "wasm32"))]
    native::set(key, value, ttl_ms);
}

/// Removes `key`.
pub fn delete(key: &str) {
    #[cfg(target_arch = "wasm32")]
    host::delete(key);
    #[cfg(not(target_arch = "wasm32"))]
    native::delete(key);
}

/// Atomically adds `delta` to the counter at `key` (absent counts as 0) and returns the new
/// value. `ttl_ms`, if given, is set when the counter is created. The gateway traps the
/// call if `key` holds anything but a decimal integer, or on overflow.
pub fn incr(key: &str, delta: i64, ttl_ms: Option<u64>) -> i64 {
    #[cfg(target_arch = "wasm32")]
    return host::incr(key, delta, ttl_ms);
    #[cfg(not(target_arch = "wasm32"))]
    return native::incr(key, delta, ttl_ms);
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::cell::RefCell;
    use std::collections::HashMap;

    struct Entry {
        value: Vec<u8>,
        expires_at_ms: Option<u64>,
    }

    thread_local! {
        static STORE: RefCell<HashMap<String, Entry>> = RefCell::new(HashMap::new());
    }

    fn live(entry: &Entry) -> bool {
        entry.expires_at_ms.is_none_or(|at| crate::now_ms() < at)
    }

    fn expiry(ttl_ms: Option<u64>) -> Option<u64> {
        ttl_ms.map(|ttl| crate::now_ms().saturating_add(ttl))
    }

    pub fn get(key: &str) -> Option<Vec<u8>> {
        STORE.with_borrow(|store| store.get(key).filter(|e| live(e)).map(|e| e.value.clone()))
    }

    pub fn set(key: &str, value: &[u8], ttl_ms: Option<u64>) {
        let entry = Entry {
            value: value.to_vec(),
            expires_at_ms: expiry(ttl_ms),
        };
        STORE.with_borrow_mut(|store| store.insert(key.to_string(), entry));
    }

    pub fn delete(key: &str) {
        STORE.with_borrow_mut(|store| store.remove(key));
    }

    pub fn incr(key: &str, delta: i64, ttl_ms: Option<u64>) -> i64 {
        STORE.with_borrow_mut(|store| {
            let current = store.get(key).filter(|e| live(e));
            let (old, expires_at_ms) = match current {
                Some(e) => (parse(key, &e.value), e.expires_at_ms),
                None => (0, expiry(ttl_ms)),
            };
            // Panics where the gateway would trap the plugin.
            let new = old
                .checked_add(delta)
                .unwrap_or_else(|| panic!("kv.incr `{key}`: overflow"));
            store.insert(
                key.to_string(),
                Entry {
                    value: new.to_string().into_bytes(),
                    expires_at_ms,
                },
            );
            new
        })
    }

    fn parse(key: &str, value: &[u8]) -> i64 {
        std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("kv.incr `{key}`: not an integer"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_delete() {
        assert_eq!(get("k"), None);
        set("k", b"v", None);
        assert_eq!(get("k").as_deref(), Some(&b"v"[..]));
        delete("k");
        assert_eq!(get("k"), None);
    }

    #[test]
    fn counters_count_and_read_as_text() {
        assert_eq!(incr("c", 1, None), 1);
        assert_eq!(incr("c", 5, None), 6);
        assert_eq!(incr("c", -2, None), 4);
        assert_eq!(get("c").as_deref(), Some(&b"4"[..]));
    }

    #[test]
    #[should_panic(expected = "not an integer")]
    fn counters_refuse_other_values() {
        set("s", b"text", None);
        incr("s", 1, None);
    }

    #[test]
    fn ttl_expires_and_is_set_only_on_create() {
        set("s", b"v", Some(100));
        assert_eq!(incr("n", 1, Some(100)), 1);
        crate::testing::advance_clock(50);
        assert_eq!(incr("n", 1, Some(10_000)), 2);
        assert!(get("s").is_some());
        crate::testing::advance_clock(50);
        assert_eq!(get("s"), None);
        assert_eq!(incr("n", 1, None), 1);
    }
}
