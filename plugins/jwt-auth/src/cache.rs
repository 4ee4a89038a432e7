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
//! plugin), in the instance's memory, bounded by `verified_cache_size` entries and by
//! `MAX_CACHED_BYTES` (estimated: parsed claims can take several times their JSON's size,
//! and the instance's memory limit must hold whatever shape of token arrives); a config
//! reload makes new instances, so a changed key never meets a verdict of the old one. Verdicts on RS256 and ES256 tokens are also shared
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

/// The most memory one instance's cache may hold, by [`entry_cost`]'s estimate: a quarter of
/// a plugin's default memory limit (64 MiB). 10,000 typical tokens (a few hundred bytes,
/// a handful of claims) take about a third of it.
pub const MAX_CACHED_BYTES: usize = 16 << 20;

/// How long a token without `exp` (allowed with `require_exp = false`) is kept.
pub const NO_EXP_KEEP_SECS: f64 = 300.0;

/// A verified token's claims, shared by the cache and the handshakes that found them there.
pub type Claims = Arc<Map<String, Value>>;

pub struct VerifiedTokens {
    capacity: usize,
    /// Estimated bytes held, at most `MAX_CACHED_BYTES`.
    bytes: usize,
    entries: HashMap<Arc<str>, Entry>,
    /// Tokens in insertion order, for evicting the oldest when full. A token may be here
    /// after its entry is gone (expired and removed on lookup); eviction skips those.
    order: VecDeque<Arc<str>>,
    hits: u64,
    misses: u64,
}

struct Entry {
    claims: Claims,
    /// Its estimated size ([`entry_cost`]).
    cost: usize,
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
            bytes: 0,
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
            self.remove(token);
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
        let cost = entry_cost(token, &claims);
        if cost > MAX_CACHED_BYTES {
            return;
        }
        self.remove(token);
        if self.entries.len() >= self.capacity || self.bytes + cost > MAX_CACHED_BYTES {
            self.drop_expired(now);
        }
        while self.entries.len() >= self.capacity || self.bytes + cost > MAX_CACHED_BYTES {
            let Some(oldest) = self.order.pop_front() else { break };
            self.remove(&oldest);
        }
        let token: Arc<str> = token.into();
        self.bytes += cost;
        self.entries.insert(token.clone(), Entry { claims, cost, keep_until });
        self.order.push_back(token);
        if self.order.len() > 2 * self.entries.len() + 64 {
            self.compact_order();
        }
    }

    /// Rebuilds the insertion order from the live entries, each at its latest place: a token
    /// that expired (dropped on lookup) and verified again would otherwise stay in the
    /// queue twice, and a queue that only grows is a leak.
    fn compact_order(&mut self) {
        let mut seen = std::collections::HashSet::new();
        let mut kept: VecDeque<Arc<str>> = VecDeque::with_capacity(self.entries.len());
        for token in self.order.drain(..).rev() {
            if self.entries.contains_key(&token) && seen.insert(token.clone()) {
                kept.push_front(token);
            }
        }
        self.order = kept;
    }

    fn remove(&mut self, token: &str) {
        if let Some(entry) = self.entries.remove(token) {
            self.bytes -= entry.cost;
        }
    }

    /// Drops every entry past its time.
    fn drop_expired(&mut self, now: f64) {
        let before = self.entries.len();
        let mut freed = 0;
        self.entries.retain(|_, e| {
            let keep = e.keep_until > now;
            if !keep {
                freed += e.cost;
            }
            keep
        });
        self.bytes -= freed;
        if self.entries.len() < before {
            self.compact_order();
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// (hits, misses) since the instance started.
    #[cfg(test)]
    pub fn counts(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

/// An over-estimate of the memory an entry holds: the token, the claims as parsed (each key
/// and value with its allocation and its slot in the map), and the map and queue slots.
pub fn entry_cost(token: &str, claims: &Map<String, Value>) -> usize {
    fn value(v: &Value) -> usize {
        32 + match v {
            Value::String(s) => s.len() + 16,
            Value::Array(items) => 16 + items.iter().map(value).sum::<usize>(),
            Value::Object(map) => object(map),
            _ => 0,
        }
    }
    fn object(map: &Map<String, Value>) -> usize {
        64 + map.iter().map(|(k, v)| 64 + k.len() + value(v)).sum::<usize>()
    }
    128 + token.len() + object(claims)
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
    fn memory_is_bounded_whatever_the_claims_look_like() {
        // Tokens of many tiny claims: the parsed map is several times the JSON's size.
        let wide = |n: usize| -> Claims {
            let mut map = Map::new();
            for i in 0..300 {
                map.insert(format!("c{n}_{i}"), Value::from(i));
            }
            Arc::new(map)
        };
        let mut cache = VerifiedTokens::new(usize::MAX);
        let each = entry_cost(&"t".repeat(4000), &wide(0));
        assert!(each > 4000 + 300 * 64, "an entry's estimate counts its claims: {each}");
        let fits = MAX_CACHED_BYTES / each;
        for n in 0..fits + 50 {
            cache.insert(&format!("{n:04000}"), wide(n), 1000.0, 0.0);
            assert!(cache.bytes() <= MAX_CACHED_BYTES);
        }
        // Later entries' keys are a digit or two longer, so slightly fewer fit.
        assert!(cache.len() <= fits && cache.len() >= fits * 9 / 10, "{} of {fits}", cache.len());
        // The oldest went first; the newest is there.
        assert!(cache.get(&format!("{:04000}", 0), 1.0).is_none());
        assert!(cache.get(&format!("{:04000}", fits + 49), 1.0).is_some());
        // A token inserted again is counted once; an expired one met by a lookup gives its
        // bytes back.
        let (again, newest) = (format!("{:04000}", fits + 48), format!("{:04000}", fits + 49));
        let before = cache.bytes();
        cache.insert(&again, wide(fits + 48), 1000.0, 0.0);
        assert_eq!(cache.bytes(), before);
        assert!(cache.get(&newest, 2000.0).is_none());
        assert_eq!(cache.bytes(), before - entry_cost(&newest, &wide(fits + 49)));
    }

    #[test]
    fn a_token_that_expires_and_comes_back_does_not_grow_the_queue() {
        let mut cache = VerifiedTokens::new(100);
        for round in 0..1000 {
            let now = round as f64 * 10.0;
            assert!(cache.get("t", now).is_none(), "expired at the start of each round");
            cache.insert("t", claims(round), now + 5.0, now);
            cache.insert(&format!("other{}", round % 3), claims(0), 1e9, now);
        }
        assert_eq!(cache.len(), 4);
        assert!(cache.order.len() <= 2 * 4 + 64 + 1, "{}", cache.order.len());
        assert_eq!(cache.get("t", 9990.0 + 1.0), Some(claims(999)));
    }

    #[test]
    fn an_entry_already_past_its_time_is_not_inserted() {
        let mut cache = VerifiedTokens::new(2);
        cache.insert("t", claims(0), 5.0, 10.0);
        assert_eq!(cache.len(), 0);
    }
}
