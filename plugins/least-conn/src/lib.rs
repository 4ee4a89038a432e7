//! Least connections: the server with the fewest open connections per unit of weight first.
//!
//! The ranking holds as many servers as the gateway will try (`max_attempts`), so it fails
//! over to the next least loaded without ranking servers it would never reach. Ties are
//! broken at random (one host random number per connection), or a burst of new connections
//! to an idle pool would all go to its first server.

use wasmgate_sdk::hash::mix64;
use wasmgate_sdk::{random_u64, Candidate, Conn, Hooks, NoConfig, Plugin, Pool};

pub struct LeastConn {
    /// Seed for this call's tie-break order: a SplitMix64 sequence started from the host's
    /// randomness once, because a host call per `select` costs more (~100 ns) than the
    /// ranking of ten candidates.
    ties: u64,
}

impl Plugin for LeastConn {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::BALANCER;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(LeastConn { ties: random_u64() })
    }

    fn select(&mut self, _: &Conn, pool: &Pool, candidates: &[Candidate]) -> Vec<u32> {
        self.ties = self.ties.wrapping_add(0x9e37_79b9_7f4a_7c15);
        rank(candidates, mix64(self.ties), pool.max_attempts())
    }
}

/// The `best` least loaded candidates by `active / weight` ascending, equal loads in an
/// order drawn from `seed`. The host tries no more than `best` (3 by default), so one pass
/// keeps just those, sorted, and the rest are never sorted or listed.
///
/// Each candidate becomes one integer (load, then tie-breaker, then index) so the work is
/// plain integer comparisons.
fn rank(candidates: &[Candidate], seed: u64, best: usize) -> Vec<u32> {
    let best = best.clamp(1, candidates.len().max(1));
    let mut kept: Vec<u128> = Vec::with_capacity(best + 1);
    for (i, c) in candidates.iter().enumerate() {
        let load = load(c);
        if kept.len() == best && load as u128 > kept[best - 1] >> 64 {
            continue; // more loaded than all kept: no need for its tie-breaker
        }
        let tie = mix64(seed ^ i as u64) as u32;
        let key = ((load as u128) << 64) | ((tie as u128) << 32) | i as u128;
        if kept.len() == best && key >= kept[best - 1] {
            continue;
        }
        let at = kept.partition_point(|k| *k < key);
        kept.insert(at, key);
        kept.truncate(best);
    }
    kept.into_iter().map(|k| k as u32).collect()
}

fn load(c: &Candidate) -> u64 {
    match c.weight {
        0 => u64::MAX,
        w => ((c.active as u64) << 32) / w as u64,
    }
}

wasmgate_sdk::export_plugin!(LeastConn);

#[cfg(test)]
mod tests {
    use super::*;

    fn server(active: u32, weight: u32) -> Candidate {
        Candidate {
            active,
            ..Candidate::idle(0, weight)
        }
    }

    #[test]
    fn fewest_connections_first_and_all_ranked() {
        let pool = [server(5, 1), server(2, 1), server(9, 1), server(3, 1)];
        assert_eq!(rank(&pool, 42, 10), [1, 3, 0, 2]);
    }

    #[test]
    fn load_is_per_unit_of_weight() {
        // 6/3 = 2 beats 3/1 = 3; weight 0 goes last even when idle.
        let pool = [server(3, 1), server(6, 3), server(0, 0)];
        assert_eq!(rank(&pool, 1, 10), [1, 0, 2]);
    }

    #[test]
    fn ties_are_broken_at_random() {
        let pool = [server(1, 1), server(0, 1), server(0, 1), server(0, 1)];
        let mut firsts = [0; 4];
        for seed in 0..3000 {
            let ranked = rank(&pool, random_u64() ^ seed, 10);
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
        let pool = wasmgate_sdk::NativePool::new("p", &["a:1", "b:1", "c:1", "d:1"]);
        let candidates = [server(4, 1), server(7, 2), server(1, 1), server(2, 1)];
        assert_eq!(lc.select(&Conn::new(1), &pool.view(), &candidates)[0], 2);
        assert!(lc.select(&Conn::new(1), &pool.view(), &[]).is_empty());
    }

    #[test]
    fn only_as_many_as_the_host_tries() {
        let pool: Vec<Candidate> = (0..100).map(|i| server((i * 37) % 100, 1)).collect();
        // active = (i * 37) % 100: the three least loaded are i = 0, 73, 46 (0, 1, 2).
        assert_eq!(rank(&pool, 5, 3), [0, 73, 46]);
        assert_eq!(rank(&pool, 5, 100).len(), 100);
        assert_eq!(rank(&pool[..2], 5, 3).len(), 2);
    }
}
