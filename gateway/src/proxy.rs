//! One connection's life, in order: validate the upgrade, pick the route, open the upstream
//! WebSocket (trying servers in ranked order), answer 101, relay, close.
//!
//! The upstream is opened *before* the client gets its 101, so a dead upstream shows up as a
//! 502 the client can see, not as an accepted socket that dies at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::gateway::{Routing, Shared};
use crate::handshake::{self, ClientUpgrade, Refusal};
use crate::relay::{self, Endpoint, LinkRules};
use crate::upstream::{self, ActiveConnection, ConnectError, Pool, UpstreamRequest, UpstreamSocket};

pub async fn handle(
    mut req: Request<Incoming>,
    client_addr: SocketAddr,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let routing = shared.routing.load_full();
    let upgrade = match handshake::validate(req.method(), req.version(), req.uri(), req.headers()) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    let Some(route) = routing.routes.find(&upgrade.host, &upgrade.path) else {
        return Ok(Refusal::new(StatusCode::NOT_FOUND, format!("no route for {}", upgrade.path)).into_response());
    };
    let Some(pool) = routing.pools.get(&route.upstream).cloned() else {
        return Ok(Refusal::new(StatusCode::BAD_GATEWAY, "route names an unknown upstream").into_response());
    };

    let mut path_and_query = upgrade.path.clone();
    if !upgrade.query.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&upgrade.query);
    }
    let request = UpstreamRequest {
        path_and_query,
        headers: handshake::upstream_headers(&upgrade, client_addr.ip()),
    };
    let (socket, active) = match connect_ranked(&pool, &request).await {
        Ok(pair) => pair,
        Err(refusal) => return Ok(refusal.into_response()),
    };
    // The upstream must pick one of the subprotocols the client offered, or none.
    if let Some(chosen) = &socket.subprotocol {
        if !upgrade.subprotocols.iter().any(|p| p == chosen) {
            return Ok(Refusal::new(
                StatusCode::BAD_GATEWAY,
                format!("upstream chose subprotocol {chosen:?}, which the client did not offer"),
            )
            .into_response());
        }
    }
    let response = handshake::switching_protocols(&upgrade.key, socket.subprotocol.as_deref(), None);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let shared2 = shared.clone();
    shared.tasks.spawn(async move {
        let client = match on_upgrade.await {
            Ok(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => Endpoint { stream: parts.io.into_inner(), already_read: parts.read_buf.to_vec() },
                Err(_) => unreachable!("the listener serves TokioIo<TcpStream>"),
            },
            Err(e) => {
                tracing::debug!(%client_addr, error = %e, "client upgrade failed");
                return;
            }
        };
        relay_connection(client, socket, active, &routing, &upgrade, client_addr, &shared2).await;
    });
    Ok(response)
}

/// Tries the pool's servers in ranked order, at most `max_attempts` of them.
async fn connect_ranked(
    pool: &Pool,
    request: &UpstreamRequest,
) -> Result<(UpstreamSocket, ActiveConnection), Refusal> {
    let order = pool.round_robin_order();
    let mut last_error = String::from("no servers");
    for index in order.into_iter().take(pool.max_attempts as usize) {
        let server = &pool.servers[index];
        let started = Instant::now();
        match upstream::open(&server.address, request, pool.connect_timeout).await {
            Ok(socket) => {
                server.record_success(started.elapsed());
                return Ok((socket, server.connection_opened()));
            }
            Err(ConnectError::Refused { status, headers, body }) => {
                // An answer, not a failure: the client should see it.
                let mut refusal = Refusal::new(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    String::from_utf8_lossy(&body).trim_end().to_string(),
                );
                refusal.headers = headers;
                return Err(refusal);
            }
            Err(e) => {
                server.record_failure();
                tracing::warn!(pool = %pool.name, server = %server.address.authority, error = %e, "upstream connect failed");
                last_error = format!("{}: {e}", server.address.authority);
            }
        }
    }
    Err(Refusal::new(StatusCode::BAD_GATEWAY, format!("no upstream server of {} answered ({last_error})", pool.name)))
}

async fn relay_connection(
    client: Endpoint,
    upstream: UpstreamSocket,
    active: ActiveConnection,
    routing: &Routing,
    _upgrade: &ClientUpgrade,
    client_addr: SocketAddr,
    shared: &Shared,
) {
    let id = shared.next_connection_id();
    let upstream = Endpoint { stream: upstream.stream, already_read: upstream.already_read };
    let max = routing.relay.max_message_size;
    let rules = (
        LinkRules { expect_masked: true, validate_utf8: true, allow_rsv1: false, max_message_size: max },
        LinkRules { expect_masked: false, validate_utf8: false, allow_rsv1: false, max_message_size: max },
    );
    tracing::debug!(id, %client_addr, server = %active.0.address.authority, "relaying");
    let outcome = relay::run(client, upstream, &routing.relay, rules, None, shared.shutdown.clone()).await;
    tracing::debug!(id, code = outcome.code, "connection closed");
    drop(active);
}
