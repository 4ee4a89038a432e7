//! Several gateways as one: plugin kv state shared in Redis, and the gateways registering
//! with each other there.
//!
//! [`link`] is the one Redis connection (its own thread, a deadline on every call from a
//! plugin, and whether Redis is reachable); [`store`] is the plugin kv store on it;
//! [`members`] is each instance's lease and heartbeat, `GET /cluster`, and the cluster-wide
//! active connection counts that balancers see.
//!
//! ```toml
//! [cluster]
//! redis = "redis://127.0.0.1:6379/0"
//! instance = "gw-a"          # default: hostname-listen address
//! redis_timeout_ms = 50      # Redis time one hook call may spend in kv calls
//! lease_ms = 3000            # an instance that stops heartbeating leaves after this
//! ```

pub mod link;
pub mod members;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use link::RedisLink;
pub use members::Members;
pub use store::RemoteKv;

/// The `[cluster]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// `redis://host:port/db` (or `redis+unix://`).
    pub redis: Spanned<String>,
    /// This gateway's name in the cluster; default: hostname and listen address.
    pub instance: Option<Spanned<String>>,
    /// The Redis time one hook call may spend on kv calls, all of them together.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: Spanned<u64>,
    /// How long an instance stays listed without a heartbeat; it heartbeats every third.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: Spanned<u64>,
}

fn default_redis_timeout_ms() -> Spanned<u64> {
    Spanned::new(0..0, 50)
}

fn default_lease_ms() -> Spanned<u64> {
    Spanned::new(0..0, 3000)
}

impl ClusterSection {
    /// Checks what serde cannot; the error's span points at the key.
    pub fn validate(&self) -> Result<(), (std::ops::Range<usize>, String)> {
        if let Err(e) = redis::Client::open(self.redis.get_ref().as_str()) {
            return Err((self.redis.span(), format!("not a Redis URL: {e}")));
        }
        if let Some(name) = &self.instance {
            let n = name.get_ref();
            if n.is_empty() || n.len() > 200 || !n.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((name.span(), "instance must be 1 to 200 visible ASCII characters".into()));
            }
        }
        let timeout = *self.redis_timeout_ms.get_ref();
        if !(1..=10_000).contains(&timeout) {
            return Err((self.redis_timeout_ms.span(), "redis_timeout_ms must be 1..=10000".into()));
        }
        let lease = *self.lease_ms.get_ref();
        if !(300..=600_000).contains(&lease) {
            return Err((self.lease_ms.span(), "lease_ms must be 300..=600000".into()));
        }
        Ok(())
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(*self.redis_timeout_ms.get_ref())
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(*self.lease_ms.get_ref())
    }

    /// The configured name, else `hostname-listen address`.
    pub fn instance_name(&self, listen: &str) -> String {
        match &self.instance {
            Some(name) => name.get_ref().clone(),
            None => format!("{}-{listen}", hostname()),
        }
    }
}

/// What a plugin's kv calls do while Redis cannot be reached (down, or past the call's
/// deadline). Keys starting with `local:` never go to Redis and are not affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvUnavailable {
    /// The gateway's in-memory store serves the call, as without a cluster: a limit
    /// becomes per instance rather than vanishing.
    #[default]
    Local,
    /// The call fails the hook call (as a trap does), so the plugin's `on_error` decides:
    /// by default a handshake is refused with 503.
    Deny,
    /// Reads find nothing, writes succeed without effect, `incr` answers `delta` (as for a
    /// new counter): whatever the plugin counts lets everything through.
    Allow,
}

impl KvUnavailable {
    pub fn parse(s: &str) -> Result<KvUnavailable, String> {
        match s {
            "local" => Ok(KvUnavailable::Local),
            "deny" => Ok(KvUnavailable::Deny),
            "allow" => Ok(KvUnavailable::Allow),
            _ => Err("kv_unavailable must be \"local\", \"deny\" or \"allow\"".into()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KvUnavailable::Local => "local",
            KvUnavailable::Deny => "deny",
            KvUnavailable::Allow => "allow",
        }
    }
}

/// The cluster side of one gateway: the Redis link, the kv store on it, and membership.
pub struct Cluster {
    pub link: Arc<RedisLink>,
    pub kv: Arc<RemoteKv>,
    pub members: Arc<Members>,
}

impl Cluster {
    /// Starts the Redis link (which connects in the background: a gateway starts while
    /// Redis is away, its plugins' kv falling back per `kv_unavailable`).
    pub fn start(
        section: &ClusterSection,
        listen: &str,
        metrics: &crate::metrics::Registry,
    ) -> anyhow::Result<Cluster> {
        let instance = section.instance_name(listen);
        let link = RedisLink::start(section.redis.get_ref(), metrics)?;
        let kv = Arc::new(RemoteKv::new(link.clone(), section.redis_timeout()));
        let members = Arc::new(Members::new(link.clone(), instance, section.lease()));
        Ok(Cluster { link, kv, members })
    }

    /// The same link under another instance name (the default name is only known once
    /// the listener is bound).
    pub fn renamed(&self, instance: String) -> Cluster {
        let members = Arc::new(Members::new(self.link.clone(), instance, self.members.lease));
        Cluster { link: self.link.clone(), kv: self.kv.clone(), members }
    }
}

/// `GET /cluster`: the live instances (404 without a `[cluster]`, 503 while Redis is away).
pub async fn admin_status(shared: &crate::gateway::Shared) -> (http::StatusCode, serde_json::Value) {
    let Some(cluster) = &shared.cluster else {
        return (http::StatusCode::NOT_FOUND, serde_json::json!({ "error": "this gateway has no [cluster] section" }));
    };
    match cluster.members.status().await {
        Ok(body) => (http::StatusCode::OK, body),
        Err(error) => (
            http::StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "instance": cluster.members.instance, "error": error }),
        ),
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
    }
}
