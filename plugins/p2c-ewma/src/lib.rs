//! Power of two random choices, scored by load × latency.
//!
//! Two distinct servers are drawn at random and the one with the lower cost
//! `(active + 1) × ewma_connect_us` goes first, the other second, then the rest by cost.
//! Comparing only two random servers avoids the herd that "always the cheapest" causes
//! when many decisions are made from the same slightly stale statistics, while still
//! steering away from slow or busy servers (Mitzenmacher; Finagle's and Linkerd's P2C).

use wasmgate_sdk::{random_u64, Candidate, Conn, Hooks, NoConfig, Plugin, Pool};

pub struct P2cEwma;

impl Plugin for P2cEwma {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::BALANCER;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(P2cEwma)
    }

    fn select(&mut self, _: &Conn, _: &Pool, candidates: &[Candidate]) -> Vec<u32> {
        rank(candidates, random_u64())
    }
}

/// The two servers drawn from `random`, cheaper first, then the others by cost.
fn rank(candidates: &[Candidate], random: u64) -> Vec<u32> {
    let n = candidates.len() as u32;
    if n < 2 {
        return (0..n).collect();
    }
    // Two distinct indexes from the two halves of one random number.
    let a = random as u32 % n;
    let b = (a + 1 + (random >> 32) as u32 % (n - 1)) % n;
    let cost = costs(candidates);
    let (first, second) = if cost[b as usize] < cost[a as usize] {
        (b, a)
    } else {
        (a, b)
    };
    let mut rest: Vec<u32> = (0..n).filter(|&i| i != a && i != b).collect();
    rest.sort_by_key(|&i| cost[i as usize]);
    [first, second].into_iter().chain(rest).collect()
}

/// `(active + 1) × ewma_connect_us` per candidate. A server not yet measured (ewma 0) is
/// taken to be as fast as the measured average, so it is neither flooded nor starved.
fn costs(candidates: &[Candidate]) -> Vec<u64> {
    let measured: Vec<u64> = candidates
        .iter()
        .map(|c| c.ewma_connect_us as u64)
        .filter(|&e| e > 0)
        .collect();
    let unmeasured = measured
        .iter()
        .sum::<u64>()
        .checked_div(measured.len() as u64)
        .unwrap_or(1)
        .max(1);
    candidates
        .iter()
        .map(|c| {
            let ewma = if c.ewma_connect_us == 0 {
                unmeasured
            } else {
                c.ewma_connect_us as u64
            };
            (c.active as u64 + 1) * ewma
        })
        .collect()
}

wasmgate_sdk::export_plugin!(P2cEwma);

#[cfg(test)]
mod tests {
    use super::*;

    fn server(active: u32, ewma_connect_us: u32) -> Candidate {
        Candidate {
            active,
            ewma_connect_us,
            ..Candidate::idle(0, 1)
        }
    }

    #[test]
    fn cheaper_of_the_two_first_then_the_other_then_the_rest() {
        let pool = [
            server(0, 100),
            server(9, 100),
            server(1, 100),
            server(3, 100),
        ];
        // Low half 1 draws index 1; high half 0 draws the next one, index 2.
        assert_eq!(rank(&pool, 1), [2, 1, 0, 3]);
    }

    #[test]
    fn the_two_choices_are_distinct_and_everyone_is_ranked() {
        let pool: Vec<Candidate> = (0..5).map(|i| server(i, 100)).collect();
        for _ in 0..1000 {
            let ranked = rank(&pool, random_u64());
            assert_ne!(ranked[0], ranked[1]);
            let mut sorted = ranked.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn cost_is_load_times_latency() {
        // 1 × 1000 loses to 4 × 200; an unmeasured server costs the measured average.
        let pool = [server(0, 1000), server(3, 200), server(0, 0)];
        assert_eq!(costs(&pool), [1000, 800, 600]);
        assert_eq!(costs(&[server(2, 0)]), [3]);
    }

    #[test]
    fn slow_servers_get_less_traffic() {
        let mut plugin = P2cEwma::from_json("").unwrap();
        let pool = [
            server(0, 5000),
            server(0, 100),
            server(0, 100),
            server(0, 100),
        ];
        let servers = wasmgate_sdk::NativePool::new("p", &["a:1", "b:1", "c:1", "d:1"]);
        let mut firsts = [0; 4];
        for _ in 0..4000 {
            firsts[plugin.select(&Conn::new(1), &servers.view(), &pool)[0] as usize] += 1;
        }
        // The slow server wins only when it is drawn against itself, which cannot happen.
        assert_eq!(firsts[0], 0, "{firsts:?}");
        assert!(firsts[1..].iter().all(|&n| n > 1100), "{firsts:?}");
    }

    #[test]
    fn small_pools() {
        assert!(rank(&[], 7).is_empty());
        assert_eq!(rank(&[server(1, 1)], 7), [0]);
    }
}
