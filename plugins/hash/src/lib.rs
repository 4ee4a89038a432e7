//! Consistent hashing with bounded loads: the same key goes to the same server while that
//! server is not overloaded.
//!
//! `select` is not given the request, so `on_handshake` computes the key and leaves it in
//! the connection's metadata ("hash-key") for `select` to read. Rings are cached per pool
//! in the instance's memory and rebuilt when the pool's servers change.

mod key;
mod ring;

use std::collections::BTreeMap;

use serde::Deserialize;
use wasmgate_sdk::hash::hash64;
use wasmgate_sdk::{random_u64, Candidate, Conn, Hooks, Plugin, Request, Verdict};

use key::KeySource;
use ring::Ring;

/// The connection metadata key that carries the hash key from handshake to select.
const META_KEY: &str = "hash-key";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_key")]
    key: String,
    /// ε: a server takes new keys while under (1 + ε) times the average load.
    #[serde(default = "default_balance_factor")]
    balance_factor: f64,
    #[serde(default = "default_virtual_nodes")]
    virtual_nodes: u32,
}

fn default_key() -> String {
    "ip".into()
}

fn default_balance_factor() -> f64 {
    0.25
}

fn default_virtual_nodes() -> u32 {
    160
}

pub struct Hash {
    key: KeySource,
    balance_factor: f64,
    virtual_nodes: u32,
    rings: BTreeMap<String, Ring>,
}

impl Plugin for Hash {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE.union(Hooks::BALANCER);

    fn new(config: Config) -> Result<Self, String> {
        if !(config.balance_factor > 0.0 && config.balance_factor.is_finite()) {
            return Err(format!(
                "bad config: balance_factor must be above 0, not {}",
                config.balance_factor
            ));
        }
        if !(1..=10_000).contains(&config.virtual_nodes) {
            return Err(format!(
                "bad config: virtual_nodes must be 1..=10000, not {}",
                config.virtual_nodes
            ));
        }
        Ok(Hash {
            key: KeySource::parse(&config.key)?,
            balance_factor: config.balance_factor,
            virtual_nodes: config.virtual_nodes,
            rings: BTreeMap::new(),
        })
    }

    fn on_handshake(&mut self, conn: &Conn, req: &Request) -> Verdict {
        if let Some(key) = self.key.extract(req) {
            conn.set_meta(META_KEY, &key);
        }
        Verdict::accept()
    }

    fn select(&mut self, conn: &Conn, pool: &str, candidates: &[Candidate]) -> Vec<u32> {
        if candidates.is_empty() {
            return Vec::new();
        }
        // A connection without a key is spread at random rather than all sent to one server.
        let point = conn
            .get_meta(META_KEY)
            .map_or_else(random_u64, |key| hash64(key.as_bytes()));
        let ring = match self.rings.get(pool) {
            Some(ring) if ring.serves(candidates) => ring,
            _ => {
                let ring = Ring::new(candidates, self.virtual_nodes);
                self.rings.insert(pool.to_string(), ring);
                &self.rings[pool]
            }
        };
        ring.rank(candidates, point, self.balance_factor)
    }
}

wasmgate_sdk::export_plugin!(Hash);

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate::new(&format!("10.0.0.{i}:9000")))
            .collect()
    }

    fn connect(plugin: &mut Hash, req: &Request, candidates: &[Candidate]) -> u32 {
        let conn = Conn::new(1);
        assert_eq!(plugin.on_handshake(&conn, req), Verdict::accept());
        plugin.select(&conn, "p", candidates)[0]
    }

    #[test]
    fn config_defaults_and_errors() {
        let plugin = Hash::from_json("{}").unwrap();
        assert_eq!(
            (plugin.key, plugin.balance_factor, plugin.virtual_nodes),
            (KeySource::Ip, 0.25, 160)
        );
        assert!(Hash::from_json(r#"{"key":"nope"}"#).is_err());
        assert!(Hash::from_json(r#"{"balance_factor":0}"#).is_err());
        assert!(Hash::from_json(r#"{"virtual_nodes":0}"#).is_err());
        assert!(Hash::from_json(r#"{"balance":1}"#).is_err());
    }

    #[test]
    fn handshake_leaves_the_key_for_select() {
        let mut plugin = Hash::from_json(r#"{"key":"query:room"}"#).unwrap();
        let conn = Conn::new(1);
        plugin.on_handshake(&conn, &Request::new("/chat?room=blue"));
        assert_eq!(conn.get_meta(META_KEY).as_deref(), Some("blue"));
        let without = Conn::new(2);
        plugin.on_handshake(&without, &Request::new("/chat"));
        assert_eq!(without.get_meta(META_KEY), None);
    }

    #[test]
    fn same_key_same_server_and_all_ranked() {
        let mut plugin = Hash::from_json(r#"{"key":"header:x-user"}"#).unwrap();
        let pool = servers(4);
        for user in 0..200 {
            let req = Request::new("/").with_header("x-user", &format!("u{user}"));
            let first = connect(&mut plugin, &req, &pool);
            assert_eq!(connect(&mut plugin, &req, &pool), first);
            let mut fresh = Hash::from_json(r#"{"key":"header:x-user"}"#).unwrap();
            assert_eq!(connect(&mut fresh, &req, &pool), first);
        }
        let conn = Conn::new(9).with_meta(META_KEY, "k");
        let mut ranked = plugin.select(&conn, "p", &pool);
        ranked.sort();
        assert_eq!(ranked, [0, 1, 2, 3]);
    }

    #[test]
    fn ring_follows_pool_changes() {
        let mut plugin = Hash::from_json("{}").unwrap();
        let conn = Conn::new(1).with_meta(META_KEY, "k");
        assert_eq!(plugin.select(&conn, "p", &servers(3)).len(), 3);
        assert_eq!(plugin.select(&conn, "p", &servers(5)).len(), 5);
        assert!(plugin.select(&conn, "p", &[]).is_empty());
    }

    #[test]
    fn keyless_connections_spread_out() {
        let mut plugin = Hash::from_json(r#"{"key":"cookie:sid"}"#).unwrap();
        let pool = servers(4);
        let mut counts = [0; 4];
        for _ in 0..400 {
            counts[connect(&mut plugin, &Request::new("/"), &pool) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }
}
