//! Round robin: each connection starts one server further along the pool's list.
//!
//! The turn is a counter in the shared kv store, not in the instance's memory, so the
//! rotation stays exact however many instances of the plugin the gateway runs.

use wasmgate_sdk::{kv, Candidate, Conn, Hooks, NoConfig, Plugin, Pool};

pub struct RoundRobin;

impl Plugin for RoundRobin {
    type Config = NoConfig;
    const HOOKS: Hooks = Hooks::BALANCER;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(RoundRobin)
    }

    fn select(&mut self, _: &Conn, pool: &Pool, candidates: &[Candidate]) -> Vec<u32> {
        // A store with no room for the counter (a new pool, the share full) still spreads
        // connections: a random start, the rotation after it.
        let turn = kv::incr(&format!("turn:{}", pool.name()), 1, None)
            .map_or_else(|_| wasmgate_sdk::random_u64() as i64, |t| t - 1);
        rotation(turn, candidates.len())
    }
}

/// All `n` indexes, starting at `turn` modulo `n` and wrapping, so failover goes on in turn.
fn rotation(turn: i64, n: usize) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    let start = turn.rem_euclid(n as i64) as usize;
    (start..start + n).map(|i| (i % n) as u32).collect()
}

wasmgate_sdk::export_plugin!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;

    use wasmgate_sdk::NativePool;

    fn pool(name: &str, n: usize) -> NativePool {
        let addresses: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}:80")).collect();
        NativePool::new(name, &addresses.iter().map(String::as_str).collect::<Vec<_>>())
    }

    #[test]
    fn rotation_wraps_and_lists_everyone() {
        assert_eq!(rotation(0, 3), [0, 1, 2]);
        assert_eq!(rotation(4, 3), [1, 2, 0]);
        assert_eq!(rotation(-1, 3), [2, 0, 1]);
        assert!(rotation(5, 0).is_empty());
    }

    /// How often each of 4 servers came first in 4,000 selections.
    fn first_picks(rr: &mut RoundRobin) -> [u32; 4] {
        let (conn, chat) = (Conn::new(1), pool("chat", 4));
        let mut firsts = [0; 4];
        for _ in 0..4000 {
            let ranked = rr.select(&conn, &chat.view(), &chat.candidates());
            assert_eq!(ranked.len(), 4);
            firsts[ranked[0] as usize] += 1;
        }
        firsts
    }

    #[test]
    fn picks_are_even() {
        let mut rr = RoundRobin::from_json("").unwrap();
        assert_eq!(first_picks(&mut rr), [1000; 4]);
    }

    #[test]
    fn a_full_store_still_spreads_connections() {
        wasmgate_sdk::testing::set_kv_share(0, 0);
        let mut rr = RoundRobin::from_json("{}").unwrap();
        let firsts = first_picks(&mut rr);
        assert!(firsts.iter().all(|&n| (800..1200).contains(&n)), "{firsts:?}");
    }

    #[test]
    fn pools_turn_independently() {
        let mut rr = RoundRobin::from_json("{}").unwrap();
        let (conn, a, b) = (Conn::new(1), pool("a", 2), pool("b", 2));
        let mut first = |p: &NativePool| rr.select(&conn, &p.view(), &p.candidates())[0];
        assert_eq!(first(&a), 0);
        assert_eq!(first(&a), 1);
        assert_eq!(first(&b), 0);
    }
}
