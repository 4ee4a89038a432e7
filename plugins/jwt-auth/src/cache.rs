//! Tokens whose signature already verified, so a client reconnecting with the token it used
//! a minute ago costs a lookup instead of a signature check. In a reconnect storm (every
//! client of a restarted gateway or backend coming back at once) RS256 verification is the
//! most expensive thing a handshake does; this makes it a one-time cost per token.
//!
//! What is kept is only the signature's verdict and the claims it vouches for, parsed once:
//! everything that depends on the time or the route — `exp`, `nbf`, issuer, audience,
//! required claims — is checked again on every handshake. An entry is keyed by the whole
//! token and found by comparing it byte for byte, so a token that differs in any byte
//! (another payload with a copied signature, say) misses and is verified in full. (Keying by
//! a SHA-256 of the token cost about as much as the HMAC it saved for HS256 tokens.)
//!
//! Each plugin instance has its own cache (instances are shared by connections, a few per
//! plugin), in the instance's memory, bounded by `verified_cache_size` entries of tokens of
//! at most `MAX_CACHED_TOKEN_BYTES`; a config reload makes new instances, so a changed key
//! never meets a verdict of the old one. Verdicts on RS256 and ES256 tokens are also shared
//! between instances through the kv store, under a prefix that fingerprints the public keys
//! (`shared_prefix`) and the token's SHA-256, with the token's remaining lifetime as TTL and
//! the plugin's kv share as the bound.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Tokens longer than this are verified every time and never kept: a cache entry holds the
/// token and its claims, and a bounded count of entries must mean bounded memory.
pub const MAX_CACHED_TOKEN_BYTES: usize = 4096;

/// How long a token without `exp` (allowed with `require_exp = false`) is kept.
pub const NO_EXP_KEEP_SECS: f64 = 300.0;

/// A verified token's claims, shared by the cache and the handshakes that found them there.
pub type Claims = Arc<Map<String, Value>>;

pub struct VerifiedTokens {
    capacity: usize,
    entries: HashMap<Arc<str>, Entry>,
    /// Tokens in insertion order, for evicting the oldest when full. A token may be here
    /// after its entry is gone (expired and removed on lookup); eviction skips those.
    order: VecDeque<Arc<str>>,
    hits: u64,
    misses: u64,
}

struct Entry {
    claims: Claims,
    /// Seconds since the epoch after which the entry is useless (the token's `exp` plus the
    /// leeway): it is dropped, not served.
    keep_until: f64,
}

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

/// The kv key of one token's shared verdict: the token's SHA-256, not the token, which
/// would be a bearer credential readable by anything that lists the store.
pub fn shared_key(prefix: &str, token: &str) -> String {
    format!("{prefix}{}", hex(&Sha256::digest(token.as_bytes())))
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

    /// Whether `token` may be kept (caching is on and the token is not too long).
    pub fn keeps(&self, token: &str) -> bool {
        self.capacity > 0 && token.len() <= MAX_CACHED_TOKEN_BYTES
    }

    /// The claims of a token that verified before and is still within its time.
    pub fn get(&mut self, token: &str, now: f64) -> Option<Claims> {
        let fresh = match self.entries.get(token) {
            Some(entry) => entry.keep_until > now,
            None => {
                self.misses += 1;
                return None;
            }
        };
        if !fresh {
            self.entries.remove(token);
            self.misses += 1;
            return None;
        }
        self.hits += 1;
        self.entries.get(token).map(|e| e.claims.clone())
    }

    /// Remembers that `token` verified, with its claims.
    pub fn insert(&mut self, token: &str, claims: Claims, keep_until: f64, now: f64) {
        if !self.keeps(token) || keep_until <= now {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.make_room(now);
        }
        let token: Arc<str> = token.into();
        if self.entries.insert(token.clone(), Entry { claims, keep_until }).is_none() {
            self.order.push_back(token);
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

    fn claims(n: u64) -> Claims {
        let mut map = Map::new();
        map.insert("n".into(), n.into());
        Arc::new(map)
    }

    #[test]
    fn a_kept_token_is_served_until_its_time_then_dropped() {
        let mut cache = VerifiedTokens::new(4);
        assert!(cache.get("a.b.c", 100.0).is_none());
        cache.insert("a.b.c", claims(1), 200.0, 100.0);
        assert_eq!(cache.get("a.b.c", 150.0), Some(claims(1)));
        assert!(cache.get("a.b.c", 200.0).is_none(), "served at its keep-until time");
        assert_eq!(cache.len(), 0, "an expired entry is removed when met");
        assert_eq!(cache.counts(), (1, 2));
    }

    #[test]
    fn tokens_differing_in_one_byte_are_different_entries() {
        let mut cache = VerifiedTokens::new(4);
        cache.insert("h.p.sig", claims(1), 200.0, 100.0);
        assert!(cache.get("h.q.sig", 150.0).is_none());
        assert!(cache.get("h.p.siG", 150.0).is_none());
        assert!(cache.get("h.p.sig ", 150.0).is_none());
        assert!(cache.get("h.p.si", 150.0).is_none());
        assert_eq!(cache.get("h.p.sig", 150.0), Some(claims(1)));
        assert_ne!(shared_key("p:", "h.p.sig"), shared_key("p:", "h.q.sig"));
        assert!(!shared_key("p:", "h.p.sig").contains("h.p.sig"), "the kv key does not hold the token");
    }

    #[test]
    fn the_count_is_bounded_expired_entries_go_first_then_the_oldest() {
        let mut cache = VerifiedTokens::new(3);
        let tokens: Vec<String> = (0..5).map(|i| format!("t{i}")).collect();
        cache.insert(&tokens[0], claims(0), 1000.0, 0.0);
        cache.insert(&tokens[1], claims(1), 10.0, 0.0); // expires first
        cache.insert(&tokens[2], claims(2), 1000.0, 0.0);
        cache.insert(&tokens[3], claims(3), 1000.0, 20.0); // full: the expired one goes
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&tokens[0], 20.0).is_some());
        assert!(cache.get(&tokens[1], 20.0).is_none());
        cache.insert(&tokens[4], claims(4), 1000.0, 20.0); // full, none expired: the oldest goes
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&tokens[0], 20.0).is_none());
        for t in &tokens[2..] {
            assert!(cache.get(t, 20.0).is_some());
        }
    }

    #[test]
    fn capacity_zero_and_long_tokens_are_not_kept() {
        let mut off = VerifiedTokens::new(0);
        assert!(!off.keeps("a.b.c"));
        off.insert("a.b.c", claims(0), 200.0, 100.0);
        assert_eq!(off.len(), 0);
        let mut on = VerifiedTokens::new(8);
        let long = "x".repeat(MAX_CACHED_TOKEN_BYTES + 1);
        assert!(!on.keeps(&long));
        on.insert(&long, claims(0), 200.0, 100.0);
        assert_eq!(on.len(), 0);
    }

    #[test]
    fn an_entry_already_past_its_time_is_not_inserted() {
        let mut cache = VerifiedTokens::new(2);
        cache.insert("t", claims(0), 5.0, 10.0);
        assert_eq!(cache.len(), 0);
    }
}
