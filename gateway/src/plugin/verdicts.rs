//! Handshake verdicts given again without calling the plugin (`wasmgate:plugin/verdicts`).
//!
//! A reconnect storm brings back clients with the requests they made a minute ago. A plugin
//! declares in `init` which parts of a request its kept verdicts depend on (`vary-on`), and
//! marks an accept as reusable during `on-handshake` (`keep`). The host then answers a later
//! handshake on the same route whose parts are byte for byte the same with that accept and
//! the connection metadata the call set, without entering Wasm: a lookup instead of a call
//! (about 5 µs of CPU even for a plugin that only reads a header, more for a language
//! runtime). Refusals are never kept, so an attacker's requests always reach the plugin.
//!
//! The cache belongs to one plugin version and goes with it on reload. It is bounded by
//! entries (`verdict_cache_size`), by bytes (`verdict_cache_max_bytes`: an answer may carry
//! kilobytes of headers, and a plugin that varies on what clients choose would otherwise
//! let them fill memory) and by a longest life (`verdict_cache_max_ttl_ms`); when full,
//! expired entries are swept (at most once a second) and otherwise new verdicts are not
//! kept, so a full cache costs no more than no cache.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::bindings::verdicts;
use super::host::HostState;
use super::types::{Accept, ConnContext, HandshakeInput};
use crate::metrics::{Counter, Gauge, Registry};

/// Parts a plugin may name in `vary-on`.
pub(super) const MAX_PARTS: usize = 8;
/// A key (the route and the parts' values) longer than this is not kept: such a request is
/// not worth the memory.
const MAX_KEY_BYTES: usize = 4096;
/// How often a full cache looks for expired entries to drop.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// What an entry costs beyond its strings: the map's slot, the entry, the vectors.
const ENTRY_OVERHEAD: usize = 160;

/// One part of a request a kept verdict depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Part {
    /// Every value of the header, in order.
    Header(String),
    Path,
    Query,
    Host,
    Scheme,
    ClientIp,
    Sni,
}

impl Part {
    fn parse(name: &str) -> Result<Part, String> {
        Ok(match name {
            ":path" => Part::Path,
            ":query" => Part::Query,
            ":host" => Part::Host,
            ":scheme" => Part::Scheme,
            ":client-ip" => Part::ClientIp,
            ":sni" => Part::Sni,
            _ if is_header_name(name) => Part::Header(name.to_string()),
            _ => {
                return Err(format!(
                    "verdicts.vary-on: {name:?} is neither a lower-case header name nor one of \
                     :path, :query, :host, :scheme, :client-ip, :sni"
                ))
            }
        })
    }
}

/// A token (RFC 9110) in lower case: what the host hands header names over as.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// What `init` declared, checked.
pub(super) fn parse_parts(names: &[String]) -> Result<Vec<Part>, String> {
    if names.is_empty() || names.len() > MAX_PARTS {
        return Err(format!("verdicts.vary-on takes 1 to {MAX_PARTS} parts, not {}", names.len()));
    }
    names.iter().map(|n| Part::parse(n)).collect()
}

/// The cache key of `req` on `route`: the route and each part's value, each preceded by its
/// length so that no two different requests give the same bytes. `None` when it would pass
/// `MAX_KEY_BYTES`. The key lives only in this process's memory, so an address goes in as
/// its octets and a server name as lower case.
fn key(parts: &[Part], route: &str, req: &dyn HandshakeInput) -> Option<Key> {
    // On the stack: a lookup that hits (most, in a storm) allocates nothing for its key.
    let mut key = Key::new();
    let mut push = |bytes: &[u8]| {
        key.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        key.extend_from_slice(bytes);
    };
    push(route.as_bytes());
    for part in parts {
        match part {
            Part::Path => push(req.path().as_bytes()),
            Part::Query => push(req.query().as_bytes()),
            Part::Host => push(req.host().as_bytes()),
            Part::Scheme => push(req.scheme().as_bytes()),
            Part::Sni => {
                let sni = req.sni().unwrap_or("").as_bytes();
                let mut name = [0u8; 256];
                // No name is that long (DNS stops at 253); such a request is not kept.
                let name = name.get_mut(..sni.len())?;
                for (to, from) in name.iter_mut().zip(sni) {
                    *to = from.to_ascii_lowercase();
                }
                push(name)
            }
            Part::ClientIp => match req.client_ip() {
                Some(IpAddr::V4(ip)) => push(&ip.octets()),
                Some(IpAddr::V6(ip)) => push(&ip.octets()),
                None => push(b""),
            },
            Part::Header(name) => {
                // Each value with its own length, and the count after them: "a, b" in one
                // line and "a" and "b" in two are different requests to a plugin.
                let mut count = 0u32;
                req.each_header_value(name, &mut |value| {
                    push(value.as_bytes());
                    count += 1;
                });
                push(&count.to_le_bytes());
            }
        }
    }
    (key.len() <= MAX_KEY_BYTES).then_some(key)
}

/// A cache key as it is built: a route and a bearer token fit inline.
type Key = SmallVec<[u8; 512]>;

/// An accept to give again, and the metadata its call set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Kept {
    pub accept: Accept,
    pub meta: Vec<(String, String)>,
}

impl Kept {
    /// The bytes its strings hold.
    fn bytes(&self) -> usize {
        let a = &self.accept;
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        a.add_headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>()
            + a.remove_headers.iter().map(String::len).sum::<usize>()
            + opt(&a.upstream)
            + opt(&a.rewrite_path)
            + opt(&a.subprotocol)
            + self.meta.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

struct Entry {
    kept: Kept,
    until: Instant,
    bytes: usize,
}

/// One plugin version's kept verdicts.
pub(super) struct VerdictCache {
    parts: Vec<Part>,
    max_entries: usize,
    max_bytes: usize,
    max_ttl: Duration,
    entries: Mutex<Entries>,
    hits: Counter,
    misses: Counter,
    size: Gauge,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Box<[u8]>, Entry>,
    /// The entries' keys, strings and overhead.
    bytes: usize,
    last_sweep: Option<Instant>,
}

impl Entries {
    fn fits(&self, bytes: usize, max_entries: usize, max_bytes: usize) -> bool {
        self.map.len() < max_entries && self.bytes + bytes <= max_bytes
    }

    fn drop_expired(&mut self, now: Instant) {
        self.last_sweep = Some(now);
        let mut freed = 0;
        self.map.retain(|_, e| {
            let live = e.until > now;
            if !live {
                freed += e.bytes;
            }
            live
        });
        self.bytes -= freed;
    }
}

/// A handshake's place in the cache: its key, if it has one.
pub(super) struct Lookup(Option<Box<[u8]>>);

impl VerdictCache {
    pub fn new(parts: Vec<Part>, max_entries: usize, max_bytes: usize, max_ttl: Duration, metrics: &Registry, plugin: &str) -> VerdictCache {
        let counter = |result| {
            metrics.counter(
                "wasmgate_plugins_verdict_cache_total",
                "Handshakes on routes of plugins that keep verdicts: answered from the cache (hit) or by a call (miss).",
                &[("plugin", plugin), ("result", result)],
            )
        };
        VerdictCache {
            parts,
            max_entries,
            max_bytes,
            max_ttl,
            entries: Mutex::new(Entries::default()),
            hits: counter("hit"),
            misses: counter("miss"),
            size: metrics.gauge(
                "wasmgate_plugins_verdict_cache_entries",
                "Handshake verdicts a plugin's current version keeps.",
                &[("plugin", plugin)],
            ),
        }
    }

    /// The kept verdict for `req` on `conn`'s route, with its metadata set on `conn`; or
    /// where to keep the verdict the call is about to give.
    pub fn find(&self, conn: &ConnContext, req: &dyn HandshakeInput) -> Result<Accept, Lookup> {
        let Some(key) = key(&self.parts, &conn.route, req) else {
            self.misses.inc();
            return Err(Lookup(None));
        };
        let now = Instant::now();
        let kept = {
            let entries = self.lock();
            entries.map.get(&key[..]).filter(|e| e.until > now).map(|e| e.kept.clone())
        };
        // Metadata that no longer fits (earlier plugins of the chain set more this time)
        // would have failed the call: the plugin is called, as it would have been.
        match kept.filter(|kept| kept.meta.iter().all(|(k, v)| conn.set_meta(k, v).is_ok())) {
            Some(kept) => {
                self.hits.inc();
                Ok(kept.accept)
            }
            None => {
                self.misses.inc();
                // Its own copy, exactly as long: the entry the call's answer may become.
                Err(Lookup(Some(Box::from(&key[..]))))
            }
        }
    }

    /// Keeps what the call gave for `ttl` (at most the operator's longest).
    pub fn keep(&self, at: Lookup, kept: Kept, ttl: Duration) {
        let Some(key) = at.0 else { return };
        let ttl = ttl.min(self.max_ttl);
        if ttl.is_zero() {
            return;
        }
        let bytes = key.len() + kept.bytes() + ENTRY_OVERHEAD;
        let now = Instant::now();
        let mut entries = self.lock();
        // Another worker may have kept the same answer meanwhile: replace it.
        if let Some(old) = entries.map.remove(&key[..]) {
            entries.bytes -= old.bytes;
        }
        if !entries.fits(bytes, self.max_entries, self.max_bytes) {
            if entries.last_sweep.is_some_and(|t| now.duration_since(t) < SWEEP_EVERY) {
                return self.size.set(entries.map.len() as f64);
            }
            entries.drop_expired(now);
            if !entries.fits(bytes, self.max_entries, self.max_bytes) {
                return self.size.set(entries.map.len() as f64);
            }
        }
        entries.bytes += bytes;
        entries.map.insert(key, Entry { kept, until: now + ttl, bytes });
        self.size.set(entries.map.len() as f64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for VerdictCache {
    fn drop(&mut self) {
        // The gauge outlives this version in the registry; a reload starts from empty.
        self.size.set(0.0);
    }
}

impl verdicts::Host for HostState {
    fn vary_on(&mut self, parts: Vec<String>) -> wasmtime::Result<()> {
        if self.in_hook_call() {
            wasmtime::bail!("verdicts.vary-on may only be called from init");
        }
        let parts = parse_parts(&parts).map_err(wasmtime::Error::msg)?;
        let declared = self.env.vary_on.get_or_init(|| parts.clone());
        if *declared != parts {
            wasmtime::bail!("verdicts.vary-on: every instance must declare the same parts ({declared:?}, now {parts:?})");
        }
        Ok(())
    }

    fn keep(&mut self, ttl_ms: u64) -> wasmtime::Result<()> {
        if self.env.vary_on.get().is_none() {
            wasmtime::bail!("verdicts.keep: init declared no parts with verdicts.vary-on");
        }
        self.keep_for(Duration::from_millis(ttl_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::types::{HandshakeRequest, Header};

    fn request(headers: &str) -> HandshakeRequest {
        HandshakeRequest {
            method: "GET".into(),
            path: "/chat".into(),
            query: "room=1".into(),
            host: "example.test".into(),
            headers: headers.into(),
            client_addr: "[::1]:40000".into(),
            scheme: "ws".into(),
            ..HandshakeRequest::default()
        }
    }

    fn parts(names: &[&str]) -> Vec<Part> {
        parse_parts(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn parts_are_header_names_or_the_named_fields() {
        assert_eq!(parts(&["authorization", ":query", ":client-ip"]), vec![
            Part::Header("authorization".into()),
            Part::Query,
            Part::ClientIp
        ]);
        for bad in ["Authorization", ":method", "", "x y", "a:b"] {
            assert!(parse_parts(&[bad.to_string()]).is_err(), "{bad:?} accepted");
        }
        assert!(parse_parts(&[]).is_err(), "no parts");
        assert!(parse_parts(&vec!["a".to_string(); MAX_PARTS + 1]).is_err(), "too many parts");
    }

    #[test]
    fn keys_differ_exactly_when_a_declared_part_differs() {
        let auth = parts(&["authorization"]);
        let base = request("host: example.test\nauthorization: Bearer abc\n");
        let k = |p: &[Part], route: &str, r: &HandshakeRequest| key(p, route, r).unwrap();
        let same = k(&auth, "/chat", &base);
        // Parts not declared do not matter.
        let mut other_path = request("authorization: Bearer abc\nuser-agent: x\n");
        other_path.path = "/other".into();
        assert_eq!(k(&auth, "/chat", &other_path), same);
        // The route, the value, a second value or a value split differently all do.
        assert_ne!(k(&auth, "/admin", &base), same);
        assert_ne!(k(&auth, "/chat", &request("authorization: Bearer abd\n")), same);
        assert_ne!(k(&auth, "/chat", &request("authorization: Bearer abc\nauthorization: Bearer abc\n")), same);
        assert_ne!(k(&auth, "/chat", &request("")), same);
        assert_ne!(k(&auth, "/chat", &request("authorization: \n")), k(&auth, "/chat", &request("")), "empty is not absent");
        assert_ne!(
            k(&auth, "/chat", &request("authorization: a, b\n")),
            k(&auth, "/chat", &request("authorization: a\nauthorization: b\n"))
        );
        // A header whose name only starts with the declared one is another header.
        assert_eq!(k(&auth, "/chat", &request("authorization-x: Bearer abc\n")), k(&auth, "/chat", &request("")));
        // Lengths keep the route and the values apart.
        assert_ne!(
            k(&auth, "/chat", &request("authorization: x\n")),
            k(&auth, "/chatx", &request("authorization: \n"))
        );
        let ip = parts(&[":client-ip"]);
        let mut from_v4 = base.clone();
        from_v4.client_addr = "127.0.0.1:40000".into();
        let mut other_port = base.clone();
        other_port.client_addr = "[::1]:40001".into();
        assert_eq!(k(&ip, "/chat", &other_port), k(&ip, "/chat", &base), "the port is not the IP");
        assert_ne!(k(&ip, "/chat", &from_v4), k(&ip, "/chat", &base));
    }

    #[test]
    fn a_server_name_is_keyed_in_any_case_and_an_overlong_one_is_not_kept() {
        let sni = parts(&[":sni"]);
        let with_sni = |name: &str| HandshakeRequest {
            tls: Some(crate::plugin::TlsInfo { sni: name.into(), ..Default::default() }),
            ..request("")
        };
        let k = |r: &HandshakeRequest| key(&sni, "/chat", r);
        assert_eq!(k(&with_sni("Chat.Example")), k(&with_sni("chat.example")));
        assert_ne!(k(&with_sni("chat.example")), k(&with_sni("chat.example.")));
        assert!(k(&with_sni(&"a".repeat(256))).is_some());
        assert!(k(&with_sni(&"a".repeat(257))).is_none());
    }

    #[test]
    fn an_oversized_key_is_not_kept() {
        let long = format!("authorization: {}\n", "a".repeat(MAX_KEY_BYTES));
        assert!(key(&parts(&["authorization"]), "/", &request(&long)).is_none());
    }

    fn cache(max_entries: usize) -> VerdictCache {
        VerdictCache::new(parts(&["authorization"]), max_entries, usize::MAX, Duration::from_secs(60), &Registry::default(), "p")
    }

    fn accept(header: &str) -> Kept {
        Kept {
            accept: Accept {
                add_headers: vec![Header { name: "x-user".into(), value: header.into() }],
                ..Accept::default()
            },
            meta: vec![("user".into(), header.into())],
        }
    }

    #[test]
    fn a_kept_verdict_is_given_with_its_metadata_until_it_expires() {
        let cache = cache(10);
        let conn = ConnContext::new(1, "[::1]:40000".parse().unwrap(), "/chat");
        let req = request("authorization: Bearer alice\n");
        let Err(at) = cache.find(&conn, &req) else { panic!("hit in an empty cache") };
        cache.keep(at, accept("alice"), Duration::from_millis(50));
        let again = ConnContext::new(2, "[::1]:40001".parse().unwrap(), "/chat");
        assert_eq!(cache.find(&again, &req).ok(), Some(accept("alice").accept));
        assert_eq!(again.meta("user").as_deref(), Some("alice"));
        // Another route is another key.
        assert!(cache.find(&ConnContext::new(3, "[::1]:1".parse().unwrap(), "/admin"), &req).is_err());
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.find(&again, &req).is_err(), "expired");
    }

    #[test]
    fn a_full_cache_keeps_nothing_new_until_entries_expire() {
        let cache = cache(2);
        let conn = ConnContext::new(1, "[::1]:40000".parse().unwrap(), "/chat");
        let keep = |who: &str, ttl| {
            let req = request(&format!("authorization: Bearer {who}\n"));
            if let Err(at) = cache.find(&conn, &req) {
                cache.keep(at, accept(who), ttl);
            }
            cache.find(&conn, &req).is_ok()
        };
        assert!(keep("a", Duration::from_millis(30)));
        assert!(keep("b", Duration::from_secs(60)));
        assert!(!keep("c", Duration::from_secs(60)), "full");
        std::thread::sleep(Duration::from_millis(40));
        // `a` expired, but the sweep after the refusal of `c` is less than a second ago.
        assert!(!keep("d", Duration::from_secs(60)));
        cache.lock().last_sweep = None;
        assert!(keep("e", Duration::from_secs(60)), "the sweep dropped the expired entry");
        assert!(keep("b", Duration::from_secs(60)), "still there");
    }

    #[test]
    fn the_operator_caps_the_life_of_a_verdict() {
        let cache = VerdictCache::new(parts(&["authorization"]), 10, usize::MAX, Duration::from_millis(20), &Registry::default(), "p");
        let conn = ConnContext::new(1, "[::1]:40000".parse().unwrap(), "/chat");
        let req = request("authorization: Bearer alice\n");
        let Err(at) = cache.find(&conn, &req) else { panic!() };
        cache.keep(at, accept("alice"), Duration::from_secs(3600));
        assert!(cache.find(&conn, &req).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        assert!(cache.find(&conn, &req).is_err());
    }

    #[test]
    fn the_bytes_kept_are_bounded_too() {
        // Room for two small answers, not for one with a 4 KiB header.
        let small = accept("a");
        let one = "authorization: Bearer a\n".len() + small.bytes() + ENTRY_OVERHEAD + 16;
        let cache = VerdictCache::new(parts(&["authorization"]), 100, 2 * one, Duration::from_secs(60), &Registry::default(), "p");
        let conn = ConnContext::new(1, "[::1]:40000".parse().unwrap(), "/chat");
        let keep = |who: &str, kept: Kept| {
            let req = request(&format!("authorization: Bearer {who}\n"));
            if let Err(at) = cache.find(&conn, &req) {
                cache.keep(at, kept, Duration::from_secs(60));
            }
            cache.find(&conn, &req).is_ok()
        };
        assert!(!keep("big", accept(&"x".repeat(4096))), "larger than the budget");
        assert!(keep("a", accept("a")));
        assert!(keep("b", accept("b")));
        assert!(!keep("c", accept("c")), "the budget is spent");
        // Keeping the same answer again replaces it rather than counting it twice.
        let before = cache.lock().bytes;
        let req = request("authorization: Bearer a\n");
        cache.keep(Lookup(key(&cache.parts, "/chat", &req).map(|k| Box::from(&k[..]))), accept("a"), Duration::from_secs(60));
        assert_eq!(cache.lock().map.len(), 2);
        assert_eq!(cache.lock().bytes, before);
    }

    #[test]
    fn metadata_that_no_longer_fits_sends_the_handshake_to_the_plugin() {
        let cache = cache(10);
        let req = request("authorization: Bearer alice\n");
        let Err(at) = cache.find(&ConnContext::new(1, "[::1]:1".parse().unwrap(), "/chat"), &req) else { panic!() };
        cache.keep(at, accept("alice"), Duration::from_secs(60));
        let full = ConnContext::new(2, "[::1]:2".parse().unwrap(), "/chat");
        full.set_meta("earlier", &"x".repeat(crate::plugin::META_LIMIT_BYTES - "earlier".len())).unwrap();
        assert!(cache.find(&full, &req).is_err(), "a miss: the call decides");
        assert!(cache.find(&ConnContext::new(3, "[::1]:3".parse().unwrap(), "/chat"), &req).is_ok());
    }
}
