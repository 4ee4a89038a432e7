//! Consistent hashing with bounded loads: the same key goes to the same server while that
//! server is not overloaded.
//!
//! `select` is not given the request, so `on_handshake` computes the key and leaves it in
//! the connection's metadata ("hash-key") for `select` to read. A ring is built over all
//! servers of a pool version and cached in the instance's memory; a reload that changes the
//! servers makes a new version and so a new ring.

mod key;
mod ring;

use serde::Deserialize;
use wasmgate_sdk::hash::hash64;
use wasmgate_sdk::{random_u64, Candidate, Conn, Hooks, Plugin, Pool, Request, Verdict};

use key::KeySource;
use ring::Ring;

/// The connection metadata key that carries the hash key from handshake to select.
const META_KEY: &str = "hash-key";

/// Rings kept per instance: one per pool version in use, and a few left over by reloads.
const CACHED_RINGS: usize = 8;

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
    /// (pool version, ring), oldest first.
    rings: Vec<(u64, Ring)>,
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
            rings: Vec::new(),
        })
    }

    fn on_handshake(&mut self, conn: &Conn, req: &Request) -> Verdict {
        if let Some(key) = self.key.extract(req) {
            conn.set_meta(META_KEY, &key);
        }
        Verdict::accept()
    }

    fn select(&mut self, conn: &Conn, pool: &Pool, candidates: &[Candidate]) -> Vec<u32> {
        if candidates.is_empty() {
            return Vec::new();
        }
        // A connection without a key is spread at random rather than all sent to one server.
        let point = conn
            .get_meta(META_KEY)
            .map_or_else(random_u64, |key| hash64(key.as_bytes()));
        let balance_factor = self.balance_factor;
        self.ring(pool).rank(candidates, point, balance_factor)
    }
}

impl Hash {
    fn ring(&mut self, pool: &Pool) -> &Ring {
        let version = pool.version();
        let i = match self.rings.iter().position(|(v, _)| *v == version) {
            Some(i) => i,
            None => {
                if self.rings.len() == CACHED_RINGS {
                    self.rings.remove(0);
                }
                self.rings.push((version, Ring::new(pool.servers(), self.virtual_nodes)));
                self.rings.len() - 1
            }
        };
        &self.rings[i].1
    }
}

wasmgate_sdk::export_plugin!(Hash);

#[cfg(test)]
mod tests {
    use super::*;

    use wasmgate_sdk::{NativePool, Server};

    fn servers(n: usize) -> NativePool {
        let pool = NativePool::new("p", &[]);
        pool.with_servers((0..n).map(|i| Server::new(&format!("10.0.0.{i}:9000"))).collect())
    }

    fn connect(plugin: &mut Hash, req: &Request, pool: &NativePool) -> u32 {
        let conn = Conn::new(1);
        assert_eq!(plugin.on_handshake(&conn, req), Verdict::accept());
        plugin.select(&conn, &pool.view(), &pool.candidates())[0]
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
        let mut ranked = plugin.select(&conn, &pool.view(), &pool.candidates());
        ranked.sort();
        assert_eq!(ranked, [0, 1, 2, 3]);
    }

    #[test]
    fn ring_follows_pool_changes() {
        let mut plugin = Hash::from_json("{}").unwrap();
        let conn = Conn::new(1).with_meta(META_KEY, "k");
        let (three, five) = (servers(3), servers(3).with_servers(servers(5).servers));
        assert_eq!(plugin.select(&conn, &three.view(), &three.candidates()).len(), 3);
        assert_eq!(plugin.select(&conn, &five.view(), &five.candidates()).len(), 5);
        assert!(plugin.select(&conn, &five.view(), &[]).is_empty());
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
