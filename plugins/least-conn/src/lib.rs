//! Least connections: the server with the fewest open connections per unit of weight first.
//!
//! Every server is ranked, so the gateway fails over to the next least loaded. Ties are
//! broken at random (one host random number per connection), or a burst of new connections
//! to an idle pool would all go to its first server.

use std::cmp::Ordering;

use wasmgate_sdk::hash::mix64;
use wasmgate_sdk::{random_u64, Candidate, Conn, Hooks, NoConfig, Plugin};

pub struct LeastConn;

impl Plugin for LeastConn {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::BALANCER;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(LeastConn)
    }

    fn select(&mut self, _: &Conn, _: &str, candidates: &[Candidate]) -> Vec<u32> {
        rank(candidates, random_u64())
    }
}

/// All indexes by `active / weight` ascending; equal loads in an order drawn from `seed`.
fn rank(candidates: &[Candidate], seed: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..candidates.len() as u32).collect();
    order.sort_by(|&a, &b| {
        load(&candidates[a as usize], &candidates[b as usize])
            .then_with(|| mix64(seed ^ a as u64).cmp(&mix64(seed ^ b as u64)))
    });
    order
}

/// Compares `active / weight` exactly (cross-multiplied); weight 0 means last resort.
fn load(a: &Candidate, b: &Candidate) -> Ordering {
    match (a.weight, b.weight) {
        (0, 0) => a.active.cmp(&b.active),
        (0, _) => Ordering::Greater,
        (_, 0) => Ordering::Less,
        (wa, wb) => (a.active as u64 * wb as u64).cmp(&(b.active as u64 * wa as u64)),
    }
}

wasmgate_sdk::export_plugin!(LeastConn);

#[cfg(test)]
mod tests {
    use super::*;

    fn server(active: u32, weight: u32) -> Candidate {
        Candidate {
            active,
            weight,
            ..Candidate::new(&format!("10.0.0.{active}:{weight}"))
        }
    }

    #[test]
    fn fewest_connections_first_and_all_ranked() {
        let pool = [server(5, 1), server(2, 1), server(9, 1), server(3, 1)];
        assert_eq!(rank(&pool, 42), [1, 3, 0, 2]);
    }

    #[test]
    fn load_is_per_unit_of_weight() {
        // 6/3 = 2 beats 3/1 = 3; weight 0 goes last even when idle.
        let pool = [server(3, 1), server(6, 3), server(0, 0)];
        assert_eq!(rank(&pool, 1), [1, 0, 2]);
    }

    #[test]
    fn ties_are_broken_at_random() {
        let pool = [server(1, 1), server(0, 1), server(0, 1), server(0, 1)];
        let mut firsts = [0; 4];
        for seed in 0..3000 {
            let ranked = rank(&pool, random_u64() ^ seed);
            assert_eq!(ranked.len(), 4);
            assert_eq!(ranked[3], 0);
            firsts[ranked[0] as usize] += 1;
        }
        assert_eq!(firsts[0], 0);
        assert!(
            firsts[1..].iter().all(|&n| (850..1150).contains(&n)),
            "{firsts:?}"
        );
    }

    #[test]
    fn plugin_picks_the_minimum() {
        let mut lc = LeastConn::from_json("{}").unwrap();
        let pool = [server(4, 1), server(7, 2), server(1, 1), server(2, 1)];
        assert_eq!(lc.select(&Conn::new(1), "p", &pool)[0], 2);
        assert!(lc.select(&Conn::new(1), "p", &[]).is_empty());
    }
}
