//! Retiring a process: stop accepting at once, move every live connection off at a paced
//! rate (close 1012 "service restart", so clients reconnect — to the successor, the only
//! one accepting now), then shut down.
//!
//! Connections still in their handshake when the retirement starts finish it and are then
//! closed like the rest; the pace is recomputed each pass so the last one closes around
//! `drain` after the start. What is left after `drain` plus `shutdown_grace_secs` is closed
//! with 1001.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::gateway::{AdminError, Shared};
use crate::upstream::drain::SERVICE_RESTART;

/// The longest `drain_secs` `POST /shutdown` takes: a day.
const MAX_DRAIN_SECS: f64 = 86_400.0;

/// Starts retiring over `drain`; returns the live connections it will close, or None when
/// the process is retiring already.
pub fn start(shared: &Arc<Shared>, drain: Duration, cause: &'static str) -> Option<usize> {
    if !shared.upgrade.begin_retiring() {
        return None;
    }
    shared.upgrade.stop_accepting();
    let open = shared.open_connections().len();
    let handed_over = shared.upgrade.handed_over.load(std::sync::atomic::Ordering::SeqCst);
    if !handed_over && !migrates_queued_connections() {
        tracing::warn!(
            "retiring without a handover: connections waiting in this listener's accept queue are reset when it closes \
             (set [gateway] handover, or net.ipv4.tcp_migrate_req = 1)"
        );
    }
    tracing::info!(cause, open, drain_secs = drain.as_secs_f64(), "retiring: no longer accepting; moving connections off");
    tokio::spawn(run(shared.clone(), drain));
    Some(open)
}

/// `POST /shutdown?drain_secs=N` (default `shutdown_drain_secs`).
pub fn admin_shutdown(query: Option<&str>, shared: &Arc<Shared>) -> Result<serde_json::Value, AdminError> {
    let mut values = query.unwrap_or("").split('&').filter_map(|kv| kv.strip_prefix("drain_secs="));
    let drain = match (values.next(), values.next()) {
        (_, Some(_)) => return Err(AdminError::BadRequest("drain_secs is given more than once".into())),
        (None, None) => Duration::from_secs(shared.config.load().gateway.shutdown_drain_secs),
        (Some(v), None) => match v.parse::<f64>() {
            Ok(secs) if (0.0..=MAX_DRAIN_SECS).contains(&secs) => Duration::from_secs_f64(secs),
            _ => return Err(AdminError::BadRequest(format!("drain_secs must be a number of seconds from 0 to {MAX_DRAIN_SECS}"))),
        },
    };
    let closing = start(shared, drain, "admin").ok_or_else(|| AdminError::Conflict("the gateway is retiring already".into()))?;
    Ok(serde_json::json!({ "retiring": true, "closing": closing, "drain_secs": drain.as_secs_f64() }))
}

async fn run(shared: Arc<Shared>, drain: Duration) {
    let moved = shared.metrics_registry.counter(
        "wasmgate_retire_closed_connections_total",
        "Connections closed with 1012 while the process retired (upgrade, SIGUSR2, POST /shutdown)",
        &[] as &[(&str, &str)],
    );
    let grace = Duration::from_secs(shared.config.load().gateway.shutdown_grace_secs);
    let deadline = Instant::now() + drain;
    while !shared.tasks.is_empty() && Instant::now() < deadline + grace {
        let open = shared.open_connections();
        if open.is_empty() {
            // Handshakes under way, or close handshakes: look again shortly.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let pause = deadline.saturating_duration_since(Instant::now()) / open.len() as u32;
        for signal in open {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if signal.close(SERVICE_RESTART) {
                moved.inc();
            }
        }
    }
    shared.close_connections();
    shared.tasks.close();
    if tokio::time::timeout(grace, shared.tasks.wait()).await.is_err() {
        tracing::warn!(left = shared.tasks.len(), "connections still open after the grace period");
    }
    tracing::info!("retired");
    shared.upgrade.retired.cancel();
}


/// Whether the kernel moves a closed `SO_REUSEPORT` listener's queued connections to
/// another listener of its group (`net.ipv4.tcp_migrate_req`, Linux 5.14+).
fn migrates_queued_connections() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|v| v.trim() == "1")
}
