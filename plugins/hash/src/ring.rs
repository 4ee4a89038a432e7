//! A consistent-hash ring with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018).
//!
//! Each server owns many points on a 64-bit ring (virtual nodes), so load splits evenly and
//! adding or removing a server moves only about 1/n of the keys. A key goes to the first
//! server clockwise from its hash whose load is under the bound
//! `ceil((1 + ε) · (total_active + 1) / n)`; a popular key spills over to the next servers
//! on the ring instead of overloading one.

use wasmgate_sdk::hash::hash64;
use wasmgate_sdk::{Candidate, Server};

/// A ring over every server of one pool version. Servers that are down keep their points,
/// so their keys come back to them when they do.
pub struct Ring {
    servers: usize,
    /// (point, index into the pool's servers), sorted.
    points: Vec<(u64, u32)>,
}

impl Ring {
    pub fn new(servers: &[Server], virtual_nodes: u32) -> Ring {
        let mut points: Vec<(u64, u32)> = servers
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                (0..virtual_nodes)
                    .map(move |v| (hash64(format!("{}#{v}", s.address).as_bytes()), i as u32))
            })
            .collect();
        points.sort_unstable();
        Ring { servers: servers.len(), points }
    }

    /// Every server once, clockwise from `point`: the key's preference order.
    fn walk(&self, point: u64) -> Vec<u32> {
        let n = self.servers;
        let start = self.points.partition_point(|&(p, _)| p < point);
        let mut seen = vec![false; n];
        let mut order = Vec::with_capacity(n);
        for &(_, server) in self.points[start..].iter().chain(&self.points[..start]) {
            if !std::mem::replace(&mut seen[server as usize], true) {
                order.push(server);
                if order.len() == n {
                    break;
                }
            }
        }
        order
    }

    /// Every candidate (an available server), best first, as indexes into `candidates`:
    /// those under the load bound in ring order from `point`, then those at or over it,
    /// also in ring order, as a last resort.
    pub fn rank(&self, candidates: &[Candidate], point: u64, balance_factor: f64) -> Vec<u32> {
        let mut candidate_of = vec![None; self.servers];
        for (i, c) in candidates.iter().enumerate() {
            if let Some(slot) = candidate_of.get_mut(c.server as usize) {
                *slot = Some(i as u32);
            }
        }
        let bound = load_bound(candidates, balance_factor);
        let (mut under, over): (Vec<u32>, Vec<u32>) = self
            .walk(point)
            .into_iter()
            .filter_map(|server| candidate_of[server as usize])
            .partition(|&i| (candidates[i as usize].active as u64) < bound);
        under.extend(over);
        under
    }
}

/// The most connections a server may hold before new keys skip it.
fn load_bound(candidates: &[Candidate], balance_factor: f64) -> u64 {
    let total: u64 = candidates.iter().map(|c| c.active as u64).sum();
    ((1.0 + balance_factor) * (total + 1) as f64 / candidates.len() as f64).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: usize) -> Vec<Server> {
        (0..n).map(|i| Server::new(&format!("10.0.0.{i}:9000"))).collect()
    }

    /// Every server as an idle candidate.
    fn all(servers: &[Server]) -> Vec<Candidate> {
        (0..servers.len() as u32).map(|i| Candidate::idle(i, 1)).collect()
    }

    fn first(ring: &Ring, servers: &[Server], key: &str) -> String {
        let candidates = all(servers);
        let chosen = ring.rank(&candidates, hash64(key.as_bytes()), 0.25)[0] as usize;
        servers[candidates[chosen].server as usize].address.clone()
    }

    #[test]
    fn walk_lists_every_server_once() {
        let pool = servers(5);
        let ring = Ring::new(&pool, 100);
        for key in 0..100u64 {
            let mut order = ring.walk(hash64(&key.to_le_bytes()));
            order.sort();
            assert_eq!(order, [0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn same_key_same_server_across_rings() {
        let pool = servers(4);
        let (a, b) = (Ring::new(&pool, 160), Ring::new(&pool, 160));
        for key in 0..1000 {
            let key = format!("user-{key}");
            assert_eq!(first(&a, &pool, &key), first(&b, &pool, &key));
        }
    }

    #[test]
    fn adding_a_fifth_server_moves_about_a_fifth_of_keys() {
        let (four, five) = (servers(4), servers(5));
        let (before, after) = (Ring::new(&four, 160), Ring::new(&five, 160));
        let mut moved = 0;
        for key in 0..10_000 {
            let key = format!("user-{key}");
            let (old, new) = (first(&before, &four, &key), first(&after, &five, &key));
            if old != new {
                // Consistent hashing moves keys only onto the new server.
                assert_eq!(new, five[4].address);
                moved += 1;
            }
        }
        assert!(
            (1_000..=3_000).contains(&moved),
            "{moved} of 10000 keys moved"
        );
    }

    #[test]
    fn keys_spread_evenly() {
        let pool = servers(4);
        let ring = Ring::new(&pool, 160);
        let mut counts = [0; 4];
        for key in 0..10_000 {
            counts[ring.rank(&all(&pool), hash64(format!("k{key}").as_bytes()), 0.25)[0] as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (1_900..=3_100).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn bounded_load_is_never_exceeded() {
        let ring = Ring::new(&servers(5), 160);
        let mut pool = all(&servers(5));
        let epsilon = 0.25;
        // A skewed key stream: half the connections share one key.
        for conn in 0..5_000u64 {
            let key = if conn % 2 == 0 {
                "hot".to_string()
            } else {
                format!("k{conn}")
            };
            let bound = load_bound(&pool, epsilon);
            let chosen = ring.rank(&pool, hash64(key.as_bytes()), epsilon)[0] as usize;
            assert!(
                (pool[chosen].active as u64) < bound,
                "server over its bound chosen"
            );
            pool[chosen].active += 1;
            let total: u64 = pool.iter().map(|c| c.active as u64).sum();
            let max = pool.iter().map(|c| c.active as u64).max().unwrap();
            assert!(
                max as f64 <= ((1.0 + epsilon) * total as f64 / 5.0).ceil(),
                "{max} of {total}"
            );
        }
    }

    #[test]
    fn full_servers_are_ranked_last() {
        let ring = Ring::new(&servers(3), 100);
        let mut pool = all(&servers(3));
        let point = hash64(b"key");
        let preferred = ring.walk(point)[0];
        pool[preferred as usize].active = 10;
        let ranked = ring.rank(&pool, point, 0.25);
        assert_eq!(ranked.len(), 3);
        assert_eq!(*ranked.last().unwrap(), preferred);
    }

    #[test]
    fn servers_that_are_down_are_skipped_and_keep_their_keys() {
        let pool = servers(4);
        let ring = Ring::new(&pool, 160);
        let point = hash64(b"key");
        let preferred = ring.walk(point)[0];
        // The preferred server is down: it is not a candidate, the next on the ring wins.
        let up: Vec<Candidate> = all(&pool).into_iter().filter(|c| c.server != preferred).collect();
        let ranked = ring.rank(&up, point, 0.25);
        assert_eq!(ranked.len(), 3);
        assert_eq!(up[ranked[0] as usize].server, ring.walk(point)[1]);
        // Back up: the key returns to it.
        assert_eq!(ring.rank(&all(&pool), point, 0.25)[0], preferred);
    }
}
