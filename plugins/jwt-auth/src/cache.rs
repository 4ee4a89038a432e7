//! Tokens whose signature already verified, so a client reconnecting with the token it used
//! a minute ago costs a hash and a lookup instead of a signature check. In a reconnect storm
//! (every client of a restarted gateway or backend coming back at once) RS256 verification is
//! the most expensive thing a handshake does; this makes it a one-time cost per token.
//!
//! What is kept is only the signature's verdict: the token's claims (its decoded payload) are
//! stored and parsed again on a hit, and everything that depends on the time or the route —
//! `exp`, `nbf`, issuer, audience, required claims — is checked again on every handshake.
//! An entry is keyed by the SHA-256 of the whole token, so a token that differs in any byte
//! (another payload with a copied signature, say) misses and is verified in full.
//!
//! Each plugin instance has its own cache (instances are shared by connections, a few per
//! plugin), in the instance's memory, bounded by `verified_cache_size` entries; a config
//! reload makes new instances, so a changed key never meets a verdict of the old one.
//! Verdicts on RS256 and ES256 tokens are also shared between instances through the kv
//! store, under a prefix that fingerprints the public keys (`shared_prefix`), with the
//! token's remaining lifetime as TTL and the plugin's kv share as the bound.

use std::collections::{HashMap, VecDeque};

use sha2::{Digest, Sha256};

/// Tokens longer than this are verified every time and never kept: a cache entry holds the
/// payload, and a bounded count of entries must mean bounded memory.
pub const MAX_CACHED_TOKEN_BYTES: usize = 4096;

/// How long a token without `exp` (allowed with `require_exp = false`) is kept.
pub const NO_EXP_KEEP_SECS: f64 = 300.0;

pub struct VerifiedTokens {
    capacity: usize,
    entries: HashMap<[u8; 32], Entry>,
    /// Keys in insertion order, for evicting the oldest when full. A key may be here after
    /// its entry is gone (expired and removed on lookup); eviction skips those.
    order: VecDeque<[u8; 32]>,
    hits: u64,
    misses: u64,
}

struct Entry {
    /// The decoded JSON payload of the token.
    payload: Vec<u8>,
    /// Seconds since the epoch after which the entry is useless (the token's `exp` plus the
    /// leeway): it is dropped, not served.
    keep_until: f64,
}

/// A token's cache key.
pub type TokenKey = [u8; 32];

/// The kv prefix under which instances share verdicts on tokens signed with the public keys
/// among `keys`, or none when there are none. Instances are per worker thread, so a client
/// reconnecting lands on another instance about half the time; sharing RS256 and ES256
/// verdicts through the host's kv store makes those hits too. A verdict on an HMAC token is
/// never shared: the check costs less than the lookup, and a secret cannot be fingerprinted
/// here without keeping it.
pub fn shared_prefix(keys: &[crate::keys::Key]) -> Option<String> {
    let mut hasher = Sha256::new();
    let mut any = false;
    for key in keys.iter().filter(|k| k.alg() != crate::keys::Alg::Hs256) {
        key.identify_public(&mut hasher);
        any = true;
    }
    any.then(|| format!("verified:{}:", hex(&hasher.finalize()[..12])))
}

/// The kv key of one token's shared verdict.
pub fn shared_key(prefix: &str, key: &TokenKey) -> String {
    format!("{prefix}{}", hex(key))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl VerifiedTokens {
    /// A cache of at most `capacity` tokens; 0 turns caching off.
    pub fn new(capacity: usize) -> VerifiedTokens {
        VerifiedTokens {
            capacity,
            entries: HashMap::new(),
            order: VecDeque::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// The key under which `token` is kept, or none when it is not cacheable.
    pub fn key(&self, token: &str) -> Option<TokenKey> {
        (self.capacity > 0 && token.len() <= MAX_CACHED_TOKEN_BYTES)
            .then(|| Sha256::digest(token.as_bytes()).into())
    }

    /// The payload of a token that verified before and is still within its time.
    pub fn get(&mut self, key: &TokenKey, now: f64) -> Option<&[u8]> {
        let fresh = match self.entries.get(key) {
            Some(entry) => entry.keep_until > now,
            None => {
                self.misses += 1;
                return None;
            }
        };
        if !fresh {
            self.entries.remove(key);
            self.misses += 1;
            return None;
        }
        self.hits += 1;
        self.entries.get(key).map(|e| e.payload.as_slice())
    }

    /// Remembers that the token under `key` verified, with its decoded payload.
    pub fn insert(&mut self, key: TokenKey, payload: Vec<u8>, keep_until: f64, now: f64) {
        if self.capacity == 0 || keep_until <= now {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.make_room(now);
        }
        if self.entries.insert(key, Entry { payload, keep_until }).is_none() {
            self.order.push_back(key);
        }
    }

    /// Frees at least one slot: expired entries first, then the oldest.
    fn make_room(&mut self, now: f64) {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.keep_until > now);
        if self.entries.len() < before {
            let entries = &self.entries;
            self.order.retain(|k| entries.contains_key(k));
            return;
        }
        while let Some(oldest) = self.order.pop_front() {
            if self.entries.remove(&oldest).is_some() {
                break;
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// (hits, misses) since the instance started.
    #[cfg(test)]
    pub fn counts(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_token_is_served_until_its_time_then_dropped() {
        let mut cache = VerifiedTokens::new(4);
        let key = cache.key("a.b.c").unwrap();
        assert!(cache.get(&key, 100.0).is_none());
        cache.insert(key, b"{}".to_vec(), 200.0, 100.0);
        assert_eq!(cache.get(&key, 150.0), Some(&b"{}"[..]));
        assert!(cache.get(&key, 200.0).is_none(), "served at its keep-until time");
        assert_eq!(cache.len(), 0, "an expired entry is removed when met");
        assert_eq!(cache.counts(), (1, 2));
    }

    #[test]
    fn tokens_differing_in_one_byte_have_different_keys() {
        let cache = VerifiedTokens::new(4);
        assert_ne!(cache.key("h.p.sig"), cache.key("h.q.sig"));
    }

    #[test]
    fn the_count_is_bounded_expired_entries_go_first_then_the_oldest() {
        let mut cache = VerifiedTokens::new(3);
        let keys: Vec<TokenKey> = (0..5).map(|i| cache.key(&format!("t{i}")).unwrap()).collect();
        cache.insert(keys[0], vec![0], 1000.0, 0.0);
        cache.insert(keys[1], vec![1], 10.0, 0.0); // expires first
        cache.insert(keys[2], vec![2], 1000.0, 0.0);
        cache.insert(keys[3], vec![3], 1000.0, 20.0); // full: the expired one goes
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&keys[0], 20.0).is_some());
        assert!(cache.get(&keys[1], 20.0).is_none());
        cache.insert(keys[4], vec![4], 1000.0, 20.0); // full, none expired: the oldest goes
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&keys[0], 20.0).is_none());
        for k in &keys[2..] {
            assert!(cache.get(k, 20.0).is_some());
        }
    }

    #[test]
    fn capacity_zero_and_long_tokens_are_not_kept() {
        let off = VerifiedTokens::new(0);
        assert!(off.key("a.b.c").is_none());
        let on = VerifiedTokens::new(8);
        assert!(on.key(&"x".repeat(MAX_CACHED_TOKEN_BYTES + 1)).is_none());
    }

    #[test]
    fn an_entry_already_past_its_time_is_not_inserted() {
        let mut cache = VerifiedTokens::new(2);
        let key = cache.key("t").unwrap();
        cache.insert(key, vec![], 5.0, 10.0);
        assert_eq!(cache.len(), 0);
    }
}
