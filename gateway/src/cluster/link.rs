//! The gateway's one connection to Redis, and whether Redis can be reached now.
//!
//! The connection is the `redis` crate's `ConnectionManager` (multiplexed, reconnecting on
//! its own), driven by a runtime on a thread of its own. Plugins call kv synchronously, from
//! inside Wasm, on the gateway's worker threads: a call hands its command to that thread and
//! waits at most its deadline for the answer. Were the connection driven by the workers'
//! own runtime, workers waiting on Redis could starve the task that would answer them.
//!
//! A call that fails to reach Redis (refused, dropped, past its deadline) marks Redis away:
//! from then on calls do not wait at all (their plugin's `kv_unavailable` decides) until the
//! link's probe, a PING every `PROBE_EVERY`, is answered again. Each change is logged once
//! and shown by the `wasmgate_cluster_redis_up` gauge.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Counter, Gauge, Registry};

/// How often an unreachable Redis is asked whether it is back.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Deadline of a probe, and of each connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a call got no answer from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreachable {
    /// Known to be away before the call: it did not wait.
    Away,
    /// Failed now (and Redis is now marked away): refused, dropped, or past the deadline.
    Failed(String),
}

/// A Redis answer that is an error reply (the command was wrong for the data), as opposed
/// to Redis being unreachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply(pub String);

pub struct RedisLink {
    /// The link's own runtime, which drives the connection.
    runtime: tokio::runtime::Handle,
    conn: ArcSwapOption<ConnectionManager>,
    up: AtomicBool,
    up_gauge: Gauge,
    lost: Counter,
    /// The URL without a password, for logs.
    shown_url: String,
    stop: CancellationToken,
}

impl RedisLink {
    /// Starts the link's thread, which connects (and keeps trying) in the background.
    pub fn start(url: &str, metrics: &Registry) -> anyhow::Result<Arc<RedisLink>> {
        let client = redis::Client::open(url)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let none: &[(&str, &str)] = &[];
        let link = Arc::new(RedisLink {
            runtime: runtime.handle().clone(),
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            up_gauge: metrics.gauge("wasmgate_cluster_redis_up", "1 while Redis answers, 0 while it is away.", none),
            lost: metrics.counter("wasmgate_cluster_redis_lost_total", "Times Redis became unreachable.", none),
            shown_url: shown(url),
            stop: CancellationToken::new(),
        });
        let weak = Arc::downgrade(&link);
        let stop = link.stop.clone();
        std::thread::Builder::new().name("wasmgate-redis".into()).spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = keep_connected(client, weak) => {}
                }
            })
        })?;
        Ok(link)
    }

    /// Whether calls go to Redis now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The connection, for async callers (heartbeats); `None` while there is none yet.
    pub fn connection(&self) -> Option<ConnectionManager> {
        self.conn.load_full().map(|c| (*c).clone())
    }

    /// Runs `work` on the link's thread (async callers: heartbeats, `GET /cluster`), so
    /// everything touching the connection runs where it is driven.
    pub async fn run<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> Option<T> {
        self.runtime.spawn(work).await.ok()
    }

    /// Runs `command` on the link's thread and waits for it at most `deadline`, blocking
    /// this thread meanwhile. Does not wait at all while Redis is away.
    pub fn call_blocking<T, F, Fut>(&self, deadline: Duration, command: F) -> Result<Result<T, Reply>, Unreachable>
    where
        T: Send + 'static,
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
    {
        if !self.is_up() {
            return Err(Unreachable::Away);
        }
        let Some(conn) = self.connection() else { return Err(Unreachable::Away) };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let running = command(conn);
        self.runtime.spawn(async move {
            let _ = tx.send(tokio::time::timeout(deadline, running).await);
        });
        // The spawned task gives up at the deadline; the margin covers handing its answer over.
        let answer = match rx.recv_timeout(deadline + Duration::from_millis(2)) {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) | Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {deadline:?}"),
            ))),
        };
        self.judge(answer)
    }

    /// Sorts an answer into a value, an error reply, or Redis being unreachable (which
    /// marks it away).
    pub fn judge<T>(&self, answer: redis::RedisResult<T>) -> Result<Result<T, Reply>, Unreachable> {
        match answer {
            Ok(v) => Ok(Ok(v)),
            Err(e) if is_reply(&e) => Ok(Err(Reply(e.to_string()))),
            Err(e) => {
                let why = e.to_string();
                self.mark_away(&why);
                Err(Unreachable::Failed(why))
            }
        }
    }

    fn mark_away(&self, why: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            self.up_gauge.set(0.0);
            self.lost.inc();
            tracing::warn!(redis = %self.shown_url, "Redis is unreachable ({why}); plugin kv falls back per kv_unavailable until it answers again");
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.up_gauge.set(1.0);
            tracing::info!(redis = %self.shown_url, "Redis answers; plugin kv is shared again");
        }
    }
}

impl Drop for RedisLink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Connects (retrying until it works), then probes while Redis is away; ends when the
/// link is dropped.
async fn keep_connected(client: redis::Client, link: std::sync::Weak<RedisLink>) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let mut told = false;
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, client.get_connection_manager_with_config(config.clone())).await {
            Ok(Ok(conn)) => {
                let Some(link) = link.upgrade() else { return };
                link.conn.store(Some(Arc::new(conn)));
                break;
            }
            Ok(Err(e)) if !told => {
                told = true;
                let Some(link) = link.upgrade() else { return };
                tracing::warn!(redis = %link.shown_url, "cannot connect to Redis ({e}); plugin kv falls back per kv_unavailable until it answers; retrying");
            }
            _ => {}
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
    loop {
        let Some(link) = link.upgrade() else { return };
        if !link.is_up() {
            if let Some(mut conn) = link.connection() {
                let ping = redis::cmd("PING");
                let pong = tokio::time::timeout(CONNECT_TIMEOUT, ping.query_async::<String>(&mut conn)).await;
                if matches!(pong, Ok(Ok(_))) {
                    link.mark_up();
                }
            }
        }
        drop(link);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// An error reply about the command or the data (not an integer, out of memory, ...), as
/// opposed to Redis being unreachable or not serving (loading, read-only replica, ...).
fn is_reply(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    match e.kind() {
        ErrorKind::Server(kind) => matches!(kind, S::ResponseError | S::ExecAbort | S::NoScript | S::CrossSlot | S::NoPerm),
        ErrorKind::Extension | ErrorKind::UnexpectedReturnType | ErrorKind::Parse => true,
        _ => false,
    }
}

/// `url` with its password replaced by `***`.
fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(super::shown("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
        assert_eq!(super::shown("redis://u:secret@127.0.0.1:6379/0"), "redis://u:***@127.0.0.1:6379/0");
    }
}
