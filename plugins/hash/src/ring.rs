//! A consistent-hash ring with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018).
//!
//! Each server owns many points on a 64-bit ring (virtual nodes), so load splits evenly and
//! adding or removing a server moves only about 1/n of the keys. A key goes to the first
//! server clockwise from its hash whose load is under the bound
//! `ceil((1 + ε) · (total_active + 1) / n)`; a popular key spills over to the next servers
//! on the ring instead of overloading one.

use wasmgate_sdk::hash::hash64;
use wasmgate_sdk::Candidate;

pub struct Ring {
    /// The candidates' addresses, in the order the ring was built from.
    addresses: Vec<String>,
    /// (point, index into `addresses`), sorted.
    points: Vec<(u64, u32)>,
}

impl Ring {
    pub fn new(candidates: &[Candidate], virtual_nodes: u32) -> Ring {
        let mut points: Vec<(u64, u32)> = candidates
            .iter()
            .enumerate()
            .flat_map(|(i, c)| {
                (0..virtual_nodes)
                    .map(move |v| (hash64(format!("{}#{v}", c.address).as_bytes()), i as u32))
            })
            .collect();
        points.sort_unstable();
        Ring {
            addresses: candidates.iter().map(|c| c.address.clone()).collect(),
            points,
        }
    }

    /// Whether the ring was built from exactly these candidates, in this order.
    pub fn serves(&self, candidates: &[Candidate]) -> bool {
        self.addresses.len() == candidates.len()
            && self
                .addresses
                .iter()
                .zip(candidates)
                .all(|(a, c)| *a == c.address)
    }

    /// Every server once, clockwise from `point`: the key's preference order.
    fn walk(&self, point: u64) -> Vec<u32> {
        let n = self.addresses.len();
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

    /// All servers, best first: those under the load bound in ring order from `point`,
    /// then those at or over it, also in ring order, as a last resort.
    pub fn rank(&self, candidates: &[Candidate], point: u64, balance_factor: f64) -> Vec<u32> {
        let bound = load_bound(candidates, balance_factor);
        let (mut under, over): (Vec<u32>, Vec<u32>) = self
            .walk(point)
            .into_iter()
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

    fn servers(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate::new(&format!("10.0.0.{i}:9000")))
            .collect()
    }

    fn first(ring: &Ring, candidates: &[Candidate], key: &str) -> String {
        candidates[ring.rank(candidates, hash64(key.as_bytes()), 0.25)[0] as usize]
            .address
            .clone()
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
            counts[ring.rank(&pool, hash64(format!("k{key}").as_bytes()), 0.25)[0] as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (1_900..=3_100).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn bounded_load_is_never_exceeded() {
        let mut pool = servers(5);
        let ring = Ring::new(&pool, 160);
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
        let mut pool = servers(3);
        let ring = Ring::new(&pool, 100);
        let point = hash64(b"key");
        let preferred = ring.walk(point)[0];
        pool[preferred as usize].active = 10;
        let ranked = ring.rank(&pool, point, 0.25);
        assert_eq!(ranked.len(), 3);
        assert_eq!(*ranked.last().unwrap(), preferred);
    }
}
