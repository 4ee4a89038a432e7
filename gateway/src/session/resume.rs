//! Finding a moving connection a new server: the pool's balancer ranks the available
//! servers (never the one being left), the upstream WebSocket is opened with the original
//! request (path, headers, subprotocol: the handshake plugins' decisions stand), the session
//! plugins are told (`on-reattach`) and the replay log is read — all within
//! `resume_timeout_ms`, retrying while no server answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::gateway::Shared;
use crate::plugin::{ConnContext, Opcode, PluginSlot, ReattachReason};
use crate::relay::{DataKind, Endpoint, Reattach, Reattached, Stop};
use crate::upstream::{ActiveConnection, CloseSignal, UpstreamRequest};

/// A pause between rounds of connect attempts while no server takes the connection.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// What a move needs from the handshake: where and how the first server was opened.
pub struct Plan {
    pub pool: String,
    pub request: UpstreamRequest,
    /// Handshake plugins edited the request (see `proxy::connect_ranked`).
    pub edited: bool,
    /// The subprotocol the first server chose, which the client was given: a new server
    /// must choose the same. None when a plugin chose it (the servers' answer is not used).
    pub subprotocol: Option<Option<String>>,
}

/// Moves one connection between servers for the relay.
pub struct Resumer {
    plan: Plan,
    conn: Arc<ConnContext>,
    chain: Arc<[Arc<PluginSlot>]>,
    shared: Arc<Shared>,
    /// The server attached now, counted as its connection.
    active: ActiveConnection,
    signal: CloseSignal,
    timeout: Duration,
    /// `resume_buffer_bytes`: what may be read from the client during a move.
    buffer_limit: usize,
}

impl Resumer {
    pub fn new(
        plan: Plan,
        conn: Arc<ConnContext>,
        chain: Arc<[Arc<PluginSlot>]>,
        active: ActiveConnection,
        shared: Arc<Shared>,
    ) -> Resumer {
        let signal = active.close_signal(&shared.shutdown);
        signal.mark_movable();
        let gateway = &shared.config.load().gateway;
        let (timeout, buffer_limit) = (Duration::from_millis(gateway.resume_timeout_ms), gateway.resume_buffer_bytes);
        Resumer { plan, conn, chain, shared, active, signal, timeout, buffer_limit }
    }

    /// The relay's stop: shutdown closes with 1001, a drain with 1012 unless it migrates.
    pub fn stop(&self) -> Stop {
        self.signal.stop()
    }

    fn metrics(&self) -> &crate::metrics::Registry {
        &self.shared.metrics_registry
    }

    fn count_failure(&self, why: &str) {
        self.metrics()
            .counter("wasmgate_session_resume_failures_total", "Connections that could not move to another server, by why.", &[("why", why)])
            .inc();
    }

    /// One round: rank the available servers but the current one and try them.
    async fn attach_once(&self) -> Option<(crate::upstream::UpstreamSocket, ActiveConnection)> {
        let routing = self.shared.routing.load_full();
        let pool = routing.pools.get(&self.plan.pool)?;
        let leaving = self.active.server();
        let errors = &self.shared.metrics.plugin_errors;
        let order: crate::upstream::ServerOrder = crate::proxy::rank_servers(pool, Some(&self.conn), errors, &mut crate::access_log::Trace::default())
            .ok()?
            .into_iter()
            .filter(|&i| !Arc::ptr_eq(&pool.servers[i].state, &leaving.state))
            .collect();
        let (socket, active) =
            crate::proxy::connect_ranked(pool, &order, &self.plan.request, self.plan.edited, &self.shared, &mut crate::access_log::Trace::default()).await.ok()?;
        // The client's link was agreed with the first server: nothing else may change.
        let same_protocol = self.plan.subprotocol.as_ref().is_none_or(|chosen| *chosen == socket.subprotocol);
        if socket.extensions.is_some() || !same_protocol {
            tracing::warn!(server = %active.server().address.authority, "a server answered the replayed handshake differently; not moving there");
            return None;
        }
        Some((socket, active))
    }

    async fn reattach_inner(&mut self, reason: ReattachReason, queued: usize) -> Option<Reattached> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let attached = tokio::time::timeout_at(deadline, async {
            loop {
                if let Some(attached) = self.attach_once().await {
                    return attached;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        })
        .await;
        let Ok((socket, active)) = attached else {
            tracing::info!(conn = self.conn.id, reason = reason.as_str(), "no server took the connection in time");
            self.count_failure("no_server");
            return None;
        };
        let server = active.server().address.authority.clone();
        // Leaving the old server: it no longer counts this connection, the new one does.
        self.active = active;
        self.signal = self.active.close_signal(&self.shared.shutdown);
        self.signal.mark_movable();
        let mut first = Vec::new();
        for slot in self.chain.iter() {
            let plugin = slot.current();
            if !plugin.hooks().session {
                continue;
            }
            match plugin.on_reattach(&self.conn, reason, &server) {
                Ok(outgoing) => first.extend(outgoing.into_iter().map(|o| (kind(o.op), o.payload))),
                Err(e) => {
                    self.shared.metrics.plugin_errors.inc();
                    tracing::warn!(plugin = plugin.name(), error = %e, "on-reattach failed");
                }
            }
        }
        let log = self.conn.session.as_deref();
        let replay = log.map(|l| l.entries()).unwrap_or_default();
        if let (Some(log), false) = (log, replay.is_empty()) {
            log.start_replay(Instant::now() + self.timeout);
        }
        let replayed = replay.len() as u64;
        first.extend(replay.into_iter().map(|e| (kind(e.op), e.payload)));

        let registry = self.metrics();
        let label = [("reason", reason.as_str())];
        registry.counter("wasmgate_session_resumed_total", "Connections moved to another server, by why.", &label).inc();
        registry
            .counter("wasmgate_session_replayed_messages_total", "Session log messages replayed to new servers.", &[] as &[(&str, &str)])
            .add(replayed);
        registry
            .histogram(
                "wasmgate_session_resume_seconds",
                "Time from losing a server to being attached to another.",
                &[] as &[(&str, &str)],
                &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            )
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(conn = self.conn.id, reason = reason.as_str(), %server, replayed, queued, "connection moved");
        let upstream = Endpoint { stream: socket.stream.into_transport(), already_read: socket.already_read };
        Some(Reattached { upstream, first, stop: self.stop() })
    }
}

impl Reattach for Resumer {
    fn moving(&self) -> Option<ReattachReason> {
        self.signal.migration()
    }

    fn reattach(
        &mut self,
        reason: ReattachReason,
        queued: usize,
    ) -> Pin<Box<dyn Future<Output = Option<Reattached>> + Send + '_>> {
        Box::pin(self.reattach_inner(reason, queued))
    }

    fn not_moved(&self, why: &'static str) {
        self.count_failure(why);
    }

    fn buffer_limit(&self) -> usize {
        self.buffer_limit
    }

    fn delivered(&self, held: usize) {
        self.metrics()
            .counter(
                "wasmgate_session_queued_bytes_total",
                "Client bytes held during moves (unsent to the old server, or read during the move) and delivered to the new server.",
                &[] as &[(&str, &str)],
            )
            .add(held as u64);
    }
}

fn kind(op: Opcode) -> DataKind {
    match op {
        Opcode::Text => DataKind::Text,
        Opcode::Binary => DataKind::Binary,
    }
}

