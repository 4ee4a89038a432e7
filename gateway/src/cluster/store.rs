//! The plugin kv store in Redis: the contract's `get`, `set` with TTL, `delete` and atomic
//! `incr`, each a call with a deadline on the [`RedisLink`].
//!
//! A plugin's keys are `wasmgate:kv:<length of its name>:<its name>:<key>` (the length keeps
//! `a` + `b:c` apart from `a:b` + `c`), so gateways that give a plugin the same name share
//! its state. Counters are decimal text, as in the local store. `incr` with a TTL is one
//! MULTI/EXEC: `SET key 0 NX PX ttl` (the TTL only when it creates the counter) then
//! `INCRBY`.
//!
//! Limits: a key and value larger than the plugin's `kv_max_bytes` (with the 64 bytes of
//! overhead the local store charges) are refused `full`, and so is a write Redis refuses
//! for its `maxmemory`; how many keys a plugin holds is not counted in Redis (that would
//! take a script on every write and still miss expiries), so Redis's own `maxmemory` bounds
//! the total.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::link::{RedisLink, Reply, Unreachable};
use crate::plugin::KvFailure;

pub struct RemoteKv {
    pub link: Arc<RedisLink>,
    /// The Redis time one hook call may spend on kv calls, all of them together.
    pub call_budget: Duration,
}

impl std::fmt::Debug for RemoteKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKv").field("call_budget", &self.call_budget).finish_non_exhaustive()
    }
}

/// What a kv call in Redis came to.
pub type Answer<T> = Result<Result<T, KvFailure>, Unreachable>;

impl RemoteKv {
    pub fn new(link: Arc<RedisLink>, call_budget: Duration) -> RemoteKv {
        RemoteKv { link, call_budget }
    }

    /// The Redis key of `key` in `plugin`'s namespace.
    pub fn key(plugin: &str, key: &str) -> String {
        format!("wasmgate:kv:{}:{plugin}:{key}", plugin.len())
    }

    pub fn get(&self, rkey: String, deadline: Duration) -> Answer<Option<Vec<u8>>> {
        self.call(deadline, move |mut c: ConnectionManager| async move {
            redis::cmd("GET").arg(rkey).query_async::<Option<Vec<u8>>>(&mut c).await
        })
    }

    pub fn set(&self, rkey: String, value: Vec<u8>, ttl: Option<Duration>, deadline: Duration) -> Answer<()> {
        self.call(deadline, move |mut c: ConnectionManager| async move {
            match ttl {
                // Expired as soon as written: what the local store does with a 0 TTL.
                Some(t) if t.is_zero() => redis::cmd("DEL").arg(rkey).query_async::<()>(&mut c).await,
                Some(t) => redis::cmd("SET").arg(rkey).arg(value).arg("PX").arg(millis(t)).query_async::<()>(&mut c).await,
                None => redis::cmd("SET").arg(rkey).arg(value).query_async::<()>(&mut c).await,
            }
        })
    }

    pub fn delete(&self, rkey: String, deadline: Duration) -> Answer<()> {
        self.call(deadline, move |mut c: ConnectionManager| async move {
            redis::cmd("DEL").arg(rkey).query_async::<()>(&mut c).await
        })
    }

    pub fn incr(&self, rkey: String, delta: i64, ttl: Option<Duration>, deadline: Duration) -> Answer<i64> {
        self.call(deadline, move |mut c: ConnectionManager| async move {
            let mut pipe = redis::pipe();
            pipe.atomic();
            if let Some(t) = ttl {
                pipe.cmd("SET").arg(&rkey).arg(0).arg("NX").arg("PX").arg(millis(t).max(1)).ignore();
            }
            pipe.cmd("INCRBY").arg(&rkey).arg(delta);
            let (value,): (i64,) = pipe.query_async(&mut c).await?;
            Ok(value)
        })
    }

    fn call<T, F, Fut>(&self, deadline: Duration, command: F) -> Answer<T>
    where
        T: Send + 'static,
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>> + Send + 'static,
    {
        Ok(self.link.call_blocking(deadline, command)?.map_err(failure))
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// An error reply as the contract's kv error.
fn failure(reply: Reply) -> KvFailure {
    let text = reply.0.to_ascii_lowercase();
    if text.contains("overflow") {
        KvFailure::Overflow
    } else if text.contains("not an integer") {
        KvFailure::NotAnInteger
    } else {
        // OOM (maxmemory), or anything else Redis refuses to store.
        KvFailure::Full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_plugins_never_collide() {
        assert_ne!(RemoteKv::key("a", "b:c"), RemoteKv::key("a:b", "c"));
        assert_eq!(RemoteKv::key("rate-limit", "c:1"), "wasmgate:kv:10:rate-limit:c:1");
    }

    #[test]
    fn error_replies_map_to_the_contract() {
        let f = |s: &str| failure(Reply(s.into()));
        assert_eq!(f("ERR value is not an integer or out of range"), KvFailure::NotAnInteger);
        assert_eq!(f("ERR increment or decrement would overflow"), KvFailure::Overflow);
        assert_eq!(f("OOM command not allowed when used memory > 'maxmemory'"), KvFailure::Full);
    }
}
