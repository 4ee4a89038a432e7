//! Smooth weighted round robin, as nginx does it.
//!
//! Each server carries a running score. On every pick all scores grow by their server's
//! weight, the highest score wins and pays back the total weight. Over any window a server
//! wins in proportion to its weight, and wins are interleaved (5:1:1 gives a a b a c a a,
//! not a a a a a b c).
//!
//! Scores are policy state, not per-connection state, so they live in the instance's memory,
//! per pool and server address. Each instance of the plugin runs its own sequence; together
//! they still converge on the weights.

use std::collections::BTreeMap;

use wasmgate_sdk::{Candidate, Conn, Hooks, NoConfig, Plugin, Pool};

#[derive(Default)]
pub struct WeightedRoundRobin {
    /// Running scores by pool, then by server address.
    scores: BTreeMap<String, BTreeMap<String, i64>>,
}

impl Plugin for WeightedRoundRobin {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::BALANCER;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(WeightedRoundRobin::default())
    }

    fn select(&mut self, _: &Conn, pool: &Pool, candidates: &[Candidate]) -> Vec<u32> {
        let scores = self.scores.entry(pool.name()).or_default();
        let address = |c: &Candidate| pool.server(c).address.as_str();
        // Forget servers that left the pool so the map cannot grow without bound.
        scores.retain(|addr, _| candidates.iter().any(|c| address(c) == addr));
        pick(scores, candidates, address)
    }
}

/// One step of smooth weighted round robin over `candidates`: the winner first, then the
/// others by score (the order the next picks would take), servers of weight 0 last.
fn pick<'a>(
    scores: &mut BTreeMap<String, i64>,
    candidates: &[Candidate],
    address: impl Fn(&Candidate) -> &'a str,
) -> Vec<u32> {
    let total: i64 = candidates.iter().map(|c| c.weight as i64).sum();
    let mut current: Vec<i64> = candidates
        .iter()
        .map(|c| {
            let score = scores.entry(address(c).to_string()).or_default();
            *score += c.weight as i64;
            *score
        })
        .collect();
    let mut order: Vec<u32> = (0..candidates.len() as u32).collect();
    // Highest score first; a stable sort keeps list order among equals, as nginx does.
    order.sort_by_key(|&i| {
        (
            candidates[i as usize].weight == 0,
            std::cmp::Reverse(current[i as usize]),
        )
    });
    if let Some(&winner) = order
        .first()
        .filter(|&&i| candidates[i as usize].weight > 0)
    {
        let winner = winner as usize;
        current[winner] -= total;
        scores.insert(address(&candidates[winner]).to_string(), current[winner]);
    }
    order
}

wasmgate_sdk::export_plugin!(WeightedRoundRobin);

#[cfg(test)]
mod tests {
    use super::*;

    use wasmgate_sdk::{NativePool, Server};

    fn pool(weights: &[u32]) -> NativePool {
        let servers = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Server { weight, ..Server::new(&format!("10.0.0.{i}:80")) })
            .collect();
        NativePool::new("p", &[]).with_servers(servers)
    }

    fn select(wrr: &mut WeightedRoundRobin, pool: &NativePool, candidates: &[Candidate]) -> Vec<u32> {
        wrr.select(&Conn::new(1), &pool.view(), candidates)
    }

    fn firsts(wrr: &mut WeightedRoundRobin, pool: &NativePool, picks: usize) -> Vec<usize> {
        let candidates = pool.candidates();
        let mut counts = vec![0; candidates.len()];
        for _ in 0..picks {
            let ranked = select(wrr, pool, &candidates);
            assert_eq!(ranked.len(), candidates.len());
            counts[ranked[0] as usize] += 1;
        }
        counts
    }

    #[test]
    fn sequence_is_smooth() {
        let mut wrr = WeightedRoundRobin::from_json("").unwrap();
        let servers = pool(&[5, 1, 1]);
        let seq: Vec<u32> = (0..7)
            .map(|_| select(&mut wrr, &servers, &servers.candidates())[0])
            .collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn picks_follow_weights_within_two_percent() {
        let mut wrr = WeightedRoundRobin::from_json("").unwrap();
        let weights = [7, 3, 1, 9, 5];
        let servers = pool(&weights);
        let picks = 100_000;
        let counts = firsts(&mut wrr, &servers, picks);
        let total: u32 = weights.iter().sum();
        for (count, weight) in counts.iter().zip(weights) {
            let expected = picks as f64 * weight as f64 / total as f64;
            assert!(
                (*count as f64 - expected).abs() <= 0.02 * expected,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn weight_zero_is_last_and_never_first() {
        let mut wrr = WeightedRoundRobin::from_json("").unwrap();
        let servers = pool(&[0, 1, 2]);
        for _ in 0..10 {
            let ranked = select(&mut wrr, &servers, &servers.candidates());
            assert_eq!(ranked[2], 0);
        }
        assert_eq!(firsts(&mut wrr, &servers, 30), [0, 10, 20]);
    }

    #[test]
    fn servers_leaving_are_forgotten() {
        let mut wrr = WeightedRoundRobin::from_json("").unwrap();
        let servers = pool(&[1, 1, 1]);
        let candidates = servers.candidates();
        select(&mut wrr, &servers, &candidates);
        select(&mut wrr, &servers, &candidates[1..]);
        assert_eq!(wrr.scores["p"].len(), 2);
        assert!(!wrr.scores["p"].contains_key("10.0.0.0:80"));
    }
}
