//! Instances know each other: each gateway holds a lease in Redis and renews it with a
//! heartbeat every third of it; `GET /cluster` lists the instances whose lease holds; and
//! each heartbeat publishes this instance's active connections per upstream server and sums
//! the other live instances' into the servers' `others_active`, which balancers see added
//! to `active` (see `Server::candidate`).
//!
//! Redis keys (the lease in Redis's own clock, so instances' clocks do not matter):
//! - `wasmgate:instance:<name>`: this instance as JSON, `PX lease`;
//! - `wasmgate:active:<name>`: hash `<pool>/<server address>` → active connections, same lease;
//! - `wasmgate:instances`: the set of names, pruned of those whose lease ended.
//!
//! An instance killed without a word leaves with its lease, its counts with it. One that
//! shuts down deletes its keys (only if they are still its own: a successor may have taken
//! the name).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::link::RedisLink;
use crate::gateway::Shared;

const INSTANCES: &str = "wasmgate:instances";
/// Deadline of one heartbeat's Redis work, and of `GET /cluster`'s.
const ROUND_TIMEOUT: Duration = Duration::from_secs(1);

/// One instance as it publishes itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub instance: String,
    pub version: String,
    /// SHA-256 (hex, first 16 digits) of the configuration file as last loaded.
    pub config_hash: String,
    /// Proxied connections open now.
    pub connections: u64,
    pub listen: String,
    pub pid: u32,
    pub started_ms: u64,
    pub heartbeat_ms: u64,
}

/// What `GET /cluster` shows of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    #[serde(flatten)]
    pub info: InstanceInfo,
    /// Since its last heartbeat, by this instance's clock.
    pub heartbeat_age_ms: i64,
    /// Active connections per `pool/server`.
    pub servers: HashMap<String, u32>,
    /// This is the instance answering.
    #[serde(rename = "self")]
    pub is_self: bool,
}

pub struct Members {
    link: Arc<RedisLink>,
    pub instance: String,
    pub lease: Duration,
    started_ms: u64,
    /// (config pointer, its hash): the hash is computed when the config changes.
    config_hash: Mutex<(usize, String)>,
    /// The JSON last published, for deleting only our own keys on shutdown.
    published: Mutex<Option<String>>,
}

impl Members {
    pub fn new(link: Arc<RedisLink>, instance: String, lease: Duration) -> Members {
        Members {
            link,
            instance,
            lease,
            started_ms: now_ms(),
            config_hash: Mutex::new((0, String::new())),
            published: Mutex::new(None),
        }
    }

    /// Heartbeats every third of the lease until shutdown, then leaves.
    pub async fn run(self: Arc<Self>, shared: Weak<Shared>) {
        let Some(stop) = shared.upgrade().map(|s| s.shutdown.clone()) else { return };
        let mut tick = tokio::time::interval(self.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_view = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let Some(shared) = shared.upgrade() else { return };
            match self.heartbeat(&shared).await {
                Ok(()) => last_view = Instant::now(),
                Err(e) => {
                    tracing::debug!("cluster heartbeat failed: {e}");
                    // Counts nobody renewed are as dead as their instances.
                    if last_view.elapsed() > self.lease {
                        apply_others(&shared, &HashMap::new());
                    }
                }
            }
        }
        self.leave().await;
    }

    /// Publishes this instance and its counts, then reads the others' counts.
    async fn heartbeat(&self, shared: &Shared) -> Result<(), String> {
        let (info, counts) = self.snapshot(shared);
        let json = serde_json::to_string(&info).map_err(|e| e.to_string())?;
        let conn = self.link.connection().ok_or("not connected to Redis")?;
        let (name, lease) = (self.instance.clone(), millis(self.lease));
        let published = json.clone();
        let listing = self
            .link
            .run(async move {
                tokio::time::timeout(ROUND_TIMEOUT, publish_and_list(conn, name, published, counts, lease)).await
            })
            .await
            .ok_or("the Redis thread is gone")?
            .map_err(|_| format!("no answer within {ROUND_TIMEOUT:?}"))?;
        let listing = self.link.judge(listing).map_err(|e| format!("{e:?}"))?.map_err(|e| e.0)?;
        *self.published.lock().unwrap() = Some(json);
        let mut others: HashMap<String, u32> = HashMap::new();
        for member in listing.iter().filter(|m| m.info.instance != self.instance) {
            for (server, n) in &member.servers {
                *others.entry(server.clone()).or_default() += n;
            }
        }
        apply_others(shared, &others);
        Ok(())
    }

    /// `GET /cluster`: the live instances, read from Redis now.
    pub async fn status(&self) -> Result<serde_json::Value, String> {
        let conn = self.link.connection().ok_or("not connected to Redis")?;
        let listing = self
            .link
            .run(async move { tokio::time::timeout(ROUND_TIMEOUT, list(conn)).await })
            .await
            .ok_or("the Redis thread is gone")?
            .map_err(|_| format!("Redis gave no answer within {ROUND_TIMEOUT:?}"))?;
        let mut members = self.link.judge(listing).map_err(|e| format!("Redis is unreachable: {e:?}"))?.map_err(|e| e.0)?;
        let now = now_ms() as i64;
        for m in &mut members {
            m.heartbeat_age_ms = now - m.info.heartbeat_ms as i64;
            m.is_self = m.info.instance == self.instance;
        }
        members.sort_by(|a, b| a.info.instance.cmp(&b.info.instance));
        Ok(serde_json::json!({
            "instance": self.instance,
            "lease_ms": millis(self.lease),
            "redis_up": self.link.is_up(),
            "instances": members,
        }))
    }

    /// This instance now, and its active connections per `pool/server`.
    fn snapshot(&self, shared: &Shared) -> (InstanceInfo, Vec<(String, u32)>) {
        let config = shared.config.load();
        let config_hash = {
            let mut cached = self.config_hash.lock().unwrap();
            let ptr = Arc::as_ptr(&*config) as usize;
            if cached.0 != ptr {
                *cached = (ptr, config_hash(&config));
            }
            cached.1.clone()
        };
        let routing = shared.routing.load();
        let mut counts = Vec::new();
        for (name, pool) in &routing.pools {
            for server in &pool.servers {
                counts.push((server_key(name, server), server.state.active.load(Ordering::Relaxed)));
            }
        }
        let info = InstanceInfo {
            instance: self.instance.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_hash,
            connections: shared.metrics.connections_active.get() as u64,
            listen: config.gateway.client_listen().to_string(),
            pid: std::process::id(),
            started_ms: self.started_ms,
            heartbeat_ms: now_ms(),
        };
        (info, counts)
    }

    /// Deletes this instance's keys if they are still its own.
    async fn leave(&self) {
        let Some(published) = self.published.lock().unwrap().take() else { return };
        let Some(conn) = self.link.connection() else { return };
        let name = self.instance.clone();
        let gone = self.link.run(async move { tokio::time::timeout(ROUND_TIMEOUT, delete_own(conn, name, published)).await });
        if !matches!(gone.await, Some(Ok(Ok(())))) {
            tracing::debug!("could not leave the cluster registry; the lease will end it");
        }
    }
}

/// The key a server's count is published under: the same in every instance with the same
/// upstreams.
fn server_key(pool: &str, server: &crate::upstream::Server) -> String {
    format!("{pool}/{}{}", server.address.authority, server.address.path_prefix)
}

/// Sets every server's `others_active` from `others` (0 for servers no one else counts).
fn apply_others(shared: &Shared, others: &HashMap<String, u32>) {
    let routing = shared.routing.load();
    for (name, pool) in &routing.pools {
        for server in &pool.servers {
            let n = others.get(&server_key(name, server)).copied().unwrap_or(0);
            server.state.others_active.store(n, Ordering::Relaxed);
        }
    }
}

async fn publish_and_list(
    mut conn: ConnectionManager,
    name: String,
    json: String,
    counts: Vec<(String, u32)>,
    lease_ms: u64,
) -> redis::RedisResult<Vec<MemberStatus>> {
    let active = format!("wasmgate:active:{name}");
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("SET").arg(format!("wasmgate:instance:{name}")).arg(&json).arg("PX").arg(lease_ms).ignore()
        .cmd("SADD").arg(INSTANCES).arg(&name).ignore()
        .cmd("DEL").arg(&active).ignore();
    if !counts.is_empty() {
        pipe.cmd("HSET").arg(&active).arg(counts).ignore().cmd("PEXPIRE").arg(&active).arg(lease_ms).ignore();
    }
    pipe.query_async::<()>(&mut conn).await?;
    list(conn).await
}

/// The instances whose lease holds, with their counts; prunes the others from the set.
async fn list(mut conn: ConnectionManager) -> redis::RedisResult<Vec<MemberStatus>> {
    let names: Vec<String> = redis::cmd("SMEMBERS").arg(INSTANCES).query_async(&mut conn).await?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for name in &names {
        pipe.cmd("GET").arg(format!("wasmgate:instance:{name}"));
        pipe.cmd("HGETALL").arg(format!("wasmgate:active:{name}"));
    }
    let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    let mut members = Vec::new();
    let mut dead = Vec::new();
    for (name, pair) in names.iter().zip(replies.chunks(2)) {
        let info: Option<String> = redis::from_redis_value(pair[0].clone()).unwrap_or(None);
        let Some(info) = info.and_then(|text| serde_json::from_str::<InstanceInfo>(&text).ok()) else {
            dead.push(name.clone());
            continue;
        };
        let servers: HashMap<String, u32> = redis::from_redis_value(pair[1].clone()).unwrap_or_default();
        members.push(MemberStatus { info, heartbeat_age_ms: 0, servers, is_self: false });
    }
    if !dead.is_empty() {
        redis::cmd("SREM").arg(INSTANCES).arg(dead).query_async::<()>(&mut conn).await?;
    }
    Ok(members)
}

/// Deletes the instance's keys when its record is still `json`.
async fn delete_own(mut conn: ConnectionManager, name: String, json: String) -> redis::RedisResult<()> {
    const SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
        redis.call('DEL', KEYS[1], KEYS[2]); redis.call('SREM', KEYS[3], ARGV[2]) end return 0";
    redis::cmd("EVAL")
        .arg(SCRIPT)
        .arg(3)
        .arg(format!("wasmgate:instance:{name}"))
        .arg(format!("wasmgate:active:{name}"))
        .arg(INSTANCES)
        .arg(json)
        .arg(name)
        .query_async::<()>(&mut conn)
        .await
}

/// SHA-256 of the configuration file (first 16 hex digits); of its parsed form when it did
/// not come from a file.
fn config_hash(config: &crate::config::Config) -> String {
    use sha2::{Digest, Sha256};
    let bytes = config
        .source
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .unwrap_or_else(|| format!("{config:?}").into_bytes());
    let digest = Sha256::digest(&bytes);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}
