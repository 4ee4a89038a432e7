//! Least connections: the server with the fewest open connections per unit of weight first.
//!
//! The ranking holds as many servers as the gateway will try (`max_attempts`), so it fails
//! over to the next least loaded without ranking servers it would never reach. Ties are
//! broken at random (one host random number per connection), or a burst of new connections
//! to an idle pool would all go to its first server.

use wasmgate_sdk::hash::mix64;
use wasmgate_sdk::{random_u64, Candidate, Conn, Hooks, NoConfig, Plugin, Pool};

pub struct LeastConn;

impl Plugin for LeastConn {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::BALANCER;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(LeastConn)
    }

    fn select(&mut self, _: &Conn, pool: &Pool, candidates: &[Candidate]) -> Vec<u32> {
        rank(candidates, random_u64(), pool.max_attempts())
    }
}

/// The `best` least loaded candidates by `active / weight` ascending, equal loads in an
/// order drawn from `seed`. The host tries no more than `best`, so the rest stay unsorted
/// and unlisted: a pool of 100 costs one linear partition, not a full sort.
///
/// Each candidate becomes one integer (load, then tie-breaker, then index) so the work is
/// plain integer comparisons.
fn rank(candidates: &[Candidate], seed: u64, best: usize) -> Vec<u32> {
    let mut keys: Vec<u128> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let tie = mix64(seed ^ i as u64) as u32;
            ((load(c) as u128) << 64) | ((tie as u128) << 32) | i as u128
        })
        .collect();
    let best = best.clamp(1, keys.len().max(1));
    if best < keys.len() {
        keys.select_nth_unstable(best - 1);
        keys.truncate(best);
    }
    keys.sort_unstable();
    keys.into_iter().map(|k| k as u32).collect()
}

/// `active / weight` in 32.32 fixed point; weight 0 means last resort. Exact for any two
/// servers whose loads differ by more than 2^-32 (weights up to 65,536 always do).
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
