//! One connection's life, in order: validate the upgrade, pick the route, run the route's
//! handshake plugins, rank the pool's servers (balancer plugin or round robin), open the
//! upstream WebSocket, answer 101, relay (through message plugins if any read messages),
//! tell close plugins how it ended.
//!
//! The upstream is opened *before* the client gets its 101, so a dead upstream shows up as a
//! 502 the client can see, not as an accepted socket that dies at once.

use std::cell::OnceCell;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt as _;
use http::StatusCode;
use rustls::ServerConfig;
use smallvec::SmallVec;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::access_log::Trace;
use crate::forwarding;
use crate::gateway::Shared;
use crate::limits::{Limits, Permit};
use crate::handshake::{self, ClientUpgrade, ReadError, Refusal, RequestHead};
use crate::metrics::Counter;
use crate::compression::negotiate::{self, DeflatePolicy};
use crate::proxy_protocol;
use crate::plugin::{
    header_lines, panic_text, Accept, Action, Compression, CompressionMode, ConnContext, ConnStats, Direction, HandshakeInput, HandshakeRequest, OnError, Opcode, PluginSlot,
    Verdict,
};
use crate::relay::{self, ClientCompression, DataKind, Endpoint, LinkRules, MessageAction, MessageHook, RelayOutcome, Side};
use crate::tls::ClientStream;
use crate::upstream::{self, ActiveConnection, ConnectError, Pool, ServerOrder, UpstreamRequest, UpstreamSocket};

/// Serves one client socket: answers its upgrade request, then relays, in this one task.
/// `permit` counts the socket against the connection limits until it closes. `tls`: the
/// TLS listener's configuration, for a `wss://` client.
pub async fn serve(
    stream: TcpStream,
    client_addr: SocketAddr,
    shared: Arc<Shared>,
    mut permit: Permit,
    tls: Option<Arc<ServerConfig>>,
) {
    let mut stream = ClientStream::Plain(stream);
    let mut trace = Trace::start(shared.access_log.as_ref(), client_addr);
    // The handshake's state (4 KiB: the upstream connect, plugin decisions) is boxed and
    // freed before the relay starts, and what the relay needs comes boxed too (unboxed, the
    // future kept a second copy of it): a connection's task is 1,840 bytes for its life
    // (relay::size keeps it so). A panic on the way (a bug; plugin calls catch their own)
    // still gets the client an answer instead of a silently dropped socket.
    let answered =
        AssertUnwindSafe(Box::pin(answer(&mut stream, client_addr, &shared, &mut permit, tls, &mut trace))).catch_unwind().await;
    permit.handshake_done();
    match answered {
        Ok(Some(prepared)) => relay_connection(stream, prepared, &shared, &mut trace).await,
        Ok(None) => {}
        Err(panic) => {
            tracing::error!(%client_addr, "the handshake panicked: {}", panic_text(&*panic));
            shared.metrics.handshakes_refused.inc();
            let refusal = Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "the gateway failed while answering this request");
            trace.refused(refusal.status.as_u16(), &refusal.reason);
            // Its drain buffer is on the heap: an array in its future would size every
            // connection's task for its whole life (it once took idle RSS 3.5 -> 6.5 KiB).
            handshake::refuse(&mut stream, refusal).await;
        }
    }
    trace.finish(shared.access_log.as_ref());
}

/// Reads the upgrade request and answers it: with a 101, returning what the relay needs, or
/// with a refusal, after which the socket is done.
async fn answer(
    stream: &mut ClientStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    permit: &mut Permit,
    tls: Option<Arc<ServerConfig>>,
    trace: &mut Trace,
) -> Option<Box<Prepared>> {
    let handshake_time = &shared.metrics;
    let refusal = match read_upgrade(stream, peer, shared, permit, tls).await {
        Ok((head, client_addr)) => {
            // A plain GET on a route that serves files (crate::static_files).
            if let Some(page) = crate::static_files::answer(&head, &shared.routing.load_full().routes).await {
                trace.request(client_addr, &page.path);
                trace.route(&page.route);
                trace.refused(page.status, "static file");
                crate::static_files::send(stream, &page).await;
                return None;
            }
            let started = Instant::now();
            match upgrade(head, client_addr, stream.tls(), shared, trace).await {
                Ok((response, prepared)) => {
                    let written = stream.write_all(&response).await.is_ok();
                    handshake_time.handshake_accepted_seconds.observe(started.elapsed().as_secs_f64());
                    return written.then(|| Box::new(prepared));
                }
                Err(refusal) => {
                    handshake_time.handshake_refused_seconds.observe(started.elapsed().as_secs_f64());
                    refusal
                }
            }
        }
        Err(ReadError::Gone) => return None,
        Err(ReadError::Refused(refusal)) => refusal,
    };
    shared.metrics.handshakes_refused.inc();
    trace.refused(refusal.status.as_u16(), &refusal.reason);
    tracing::debug!(%peer, status = refusal.status.as_u16(), reason = %refusal.reason, "handshake refused");
    handshake::refuse(stream, refusal).await;
    None
}

/// The upgrade request and who sent it, within the handshake timeout (the TLS handshake
/// included). Behind a PROXY protocol header (when the listener expects one) the client is
/// the one it names; the header comes before TLS.
async fn read_upgrade(
    stream: &mut ClientStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    permit: &mut Permit,
    tls: Option<Arc<ServerConfig>>,
) -> Result<(RequestHead, SocketAddr), ReadError> {
    let routing = shared.routing.load_full();
    let timeout = routing.handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let (client_addr, mut already_read) = match routing.proxy_protocol {
        true => {
            let tcp = stream.tcp_mut().expect("PROXY protocol comes before TLS");
            let (client, rest) = proxy_protocol::read_header(tcp, peer, &routing.trusted_proxies, deadline).await?;
            // The client the balancer names is the one max_connections_per_ip counts.
            let limits = Limits::from_config(&shared.config.load().gateway, shared.admission.default_connections);
            if let Err(refused) = permit.charge_address(client.ip(), &limits) {
                return Err(ReadError::Refused(shared.admission.refusal_counted(refused, &limits)));
            }
            (client, rest)
        }
        false => (peer, Vec::new()),
    };
    if let Some(config) = tls {
        // A failed or late TLS handshake has no one to answer in HTTP: rustls sent its alert.
        match tokio::time::timeout_at(deadline, stream.accept_tls(config, std::mem::take(&mut already_read))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(%client_addr, error = %e, "TLS handshake failed");
                return Err(ReadError::Gone);
            }
            Err(_) => {
                tracing::debug!(%client_addr, "TLS handshake not done within {timeout:?}");
                return Err(ReadError::Gone);
            }
        }
    }
    let head = handshake::read_request(stream, already_read, deadline, timeout).await?;
    Ok((head, client_addr))
}

/// Everything up to the 101: its bytes, and what the relay needs.
/// `tls`: the client's TLS connection, for a `wss://` client.
async fn upgrade(
    head: RequestHead,
    client_addr: SocketAddr,
    tls: Option<&crate::tls::ServerTls>,
    shared: &Arc<Shared>,
    trace: &mut Trace,
) -> Result<(Vec<u8>, Prepared), Refusal> {
    let routing = shared.routing.load_full();
    let RequestHead { method, version, target, headers, rest: client_already_read } = head;
    let mut upgrade = handshake::validate(&method, version, &target, headers)?;
    trace.request(client_addr, &upgrade.path);
    // Forwarding headers are believed from trusted proxies only, plugins included.
    if !routing.trusted_proxies.contains(client_addr.ip()) {
        forwarding::drop_client_claims(&mut upgrade.headers);
    }
    let route = routing
        .routes
        .find(&upgrade.host, &upgrade.path)
        .ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, format!("no route for {}", upgrade.path)))?;
    trace.route(&route.prefix);
    let chain = route.chain.clone();
    // Routes with a session plugin keep a replay log per connection (crate::session).
    let session = chain.iter().any(|slot| slot.current().hooks().session);
    let log_bytes = shared.config.load().gateway.session_log_bytes;
    // Plugins see the connection through a host-side context; connections without plugins
    // skip it.
    let new_context = || {
        let context = ConnContext::new(shared.next_connection_id(), client_addr, route.prefix.clone());
        Arc::new(if session { context.with_session(log_bytes) } else { context })
    };
    let mut conn = (!chain.is_empty()).then(new_context);
    let errors = &shared.metrics.plugin_errors;
    let decision = match &conn {
        Some(conn) => run_handshake_chain(&chain, conn, &upgrade, tls, errors, trace)?,
        None => Accept::default(),
    };

    let pool_name = decision.upstream.as_deref().unwrap_or(&route.upstream);
    trace.pool(pool_name);
    let pool = routing.pools.get(pool_name).cloned().ok_or_else(|| {
        Refusal::new(StatusCode::BAD_GATEWAY, format!("a plugin chose upstream {pool_name:?}, which is not configured"))
    })?;
    let mut request = upstream_request(&upgrade, client_addr, tls.is_some(), &decision);
    // Plugins that read messages need plain payloads, and a connection that may move to
    // another server cannot keep a deflate context agreed with this one: passthrough
    // becomes terminate.
    let reads_messages = chain.iter().any(|slot| slot.current().hooks().messages);
    let wanted = decision.compression.unwrap_or(routing.compression);
    let mode = match wanted.mode {
        CompressionMode::Passthrough if reads_messages || session => CompressionMode::Terminate,
        mode => mode,
    };
    let client_offers: Vec<&str> = upgrade
        .headers
        .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if mode == CompressionMode::Passthrough && !client_offers.is_empty() {
        request.headers.push_with("sec-websocket-extensions", |value| {
            for (i, offer) in client_offers.iter().enumerate() {
                if i > 0 {
                    value.push_str(", ");
                }
                value.push_str(offer);
            }
        });
    }
    if conn.is_none() && pool.balancer.is_some() {
        conn = Some(new_context());
    }
    let order = rank_servers(&pool, conn.as_deref(), errors, trace)?;
    let edited = decision.rewrite_path.is_some() || !decision.add_headers.is_empty() || !decision.remove_headers.is_empty();
    let (socket, active) = connect_ranked(&pool, &order, &request, edited, shared, trace).await?;

    let subprotocol = decision.subprotocol.clone().or_else(|| socket.subprotocol.clone());
    if let Some(chosen) = &subprotocol {
        // The client must get one of the subprotocols it offered, or none.
        if !upgrade.subprotocols.iter().any(|p| p == chosen) {
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                format!("subprotocol {chosen:?} was chosen, but the client did not offer it"),
            ));
        }
    }
    // A plugin (plugins/compression) may ask for small messages to go uncompressed.
    let min_size = conn.as_deref().and_then(|c| c.meta(crate::compression::MIN_SIZE_META)).and_then(|v| v.parse().ok());
    let mut compression =
        negotiate_compression(mode, &wanted, &client_offers, &socket, routing.relay.max_message_size)?;
    if let (Some(c), Some(min_size)) = (&mut compression.terminate, min_size) {
        c.min_size = min_size;
    }
    let response =
        handshake::switching_protocols(&upgrade.key, subprotocol.as_deref(), compression.header.as_deref());
    let agreed = match (&compression.terminate, compression.header.is_some()) {
        (Some(_), _) => Some("terminate"),
        (None, true) => Some("passthrough"),
        (None, false) => None,
    };
    trace.negotiated(subprotocol.as_deref(), agreed);
    let settings = routing.relay.clone();
    let session = session.then(|| crate::session::Plan {
        pool: pool.name.clone(),
        request,
        edited,
        subprotocol: decision.subprotocol.is_none().then(|| socket.subprotocol.clone()),
    });
    // The message hook follows the decision the compression mode was based on.
    let chain = Chain { slots: chain, conn, reads_messages };
    Ok((response, Prepared { client_already_read, upstream: socket, active, chain, compression, settings, session }))
}

/// Calls each handshake plugin of the chain in order. A reject ends the chain; accepts
/// accumulate (a later plugin's choice of upstream, path or subprotocol wins).
fn run_handshake_chain(
    chain: &[Arc<PluginSlot>],
    conn: &ConnContext,
    upgrade: &ClientUpgrade,
    tls: Option<&crate::tls::ServerTls>,
    errors: &Counter,
    trace: &mut Trace,
) -> Result<Accept, Refusal> {
    let mut decision: Option<Accept> = None;
    let request = PluginRequest { upgrade, client_addr: conn.client_addr, tls, record: OnceCell::new() };
    for slot in chain.iter() {
        let plugin = slot.current();
        if !plugin.hooks().handshake {
            continue;
        }
        match plugin.on_handshake(conn, &request) {
            Ok(Verdict::Accept(accept)) => {
                decision = Some(match decision {
                    Some(mut earlier) => {
                        merge(&mut earlier, accept);
                        earlier
                    }
                    None => accept,
                })
            }
            Ok(Verdict::Reject(reject)) => {
                trace.refused_by(plugin.name());
                let status = StatusCode::from_u16(reject.status).unwrap_or(StatusCode::FORBIDDEN);
                let mut refusal = Refusal::new(status, reject.reason);
                refusal.headers = reject.headers.into_iter().map(|h| (h.name, h.value)).collect();
                return Err(refusal);
            }
            Err(e) => {
                errors.inc();
                tracing::warn!(plugin = plugin.name(), error = %e, "handshake hook failed");
                if plugin.on_error() != Some(OnError::Allow) {
                    trace.refused_by(plugin.name());
                    return Err(Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("plugin {} failed: {}", plugin.name(), e.kind()),
                    ));
                }
            }
        }
    }
    Ok(decision.unwrap_or_default())
}

fn merge(decision: &mut Accept, accept: Accept) {
    decision.upstream = accept.upstream.or(decision.upstream.take());
    decision.rewrite_path = accept.rewrite_path.or(decision.rewrite_path.take());
    decision.subprotocol = accept.subprotocol.or(decision.subprotocol.take());
    decision.compression = accept.compression.or(decision.compression.take());
    decision.add_headers.extend(accept.add_headers);
    decision.remove_headers.extend(accept.remove_headers);
}

/// The request as plugins see it, read from the parsed upgrade. The `request` record is
/// written only for the first plugin actually called: a verdict the gateway kept needs a
/// few of the request's parts, not a copy of it.
struct PluginRequest<'a> {
    upgrade: &'a ClientUpgrade,
    client_addr: SocketAddr,
    tls: Option<&'a crate::tls::ServerTls>,
    record: OnceCell<HandshakeRequest>,
}

impl HandshakeInput for PluginRequest<'_> {
    fn record(&self) -> &HandshakeRequest {
        self.record.get_or_init(|| {
            let upgrade = self.upgrade;
            HandshakeRequest {
                method: "GET".into(),
                path: upgrade.path.clone(),
                query: upgrade.query.clone(),
                host: upgrade.host.clone(),
                // Values that are not visible ASCII (obs-text) are left out: plugins get text.
                headers: header_lines(upgrade.headers.iter().filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?)))),
                client_addr: address_text(self.client_addr),
                subprotocols: upgrade.subprotocols.clone(),
                scheme: self.scheme().into(),
                tls: self.tls.map(crate::tls::info::describe),
            }
        })
    }
    fn path(&self) -> &str {
        &self.upgrade.path
    }
    fn query(&self) -> &str {
        &self.upgrade.query
    }
    fn host(&self) -> &str {
        &self.upgrade.host
    }
    fn scheme(&self) -> &str {
        if self.tls.is_some() { "wss" } else { "ws" }
    }
    fn sni(&self) -> Option<&str> {
        self.tls.map(|tls| tls.server_name().unwrap_or(""))
    }
    fn client_ip(&self) -> Option<std::net::IpAddr> {
        Some(self.client_addr.ip())
    }
    fn each_header_value(&self, name: &str, each: &mut dyn FnMut(&str)) {
        // The record's filter: values that are not text are not there.
        self.upgrade.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).for_each(each);
    }
}

/// `addr` as text, written into a string that has room for any address (`to_string`
/// grows its string twice on the way).
fn address_text(addr: SocketAddr) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(48);
    let _ = write!(text, "{addr}");
    text
}

/// Path and headers for the upstream, with the plugins' edits applied.
fn upstream_request(upgrade: &ClientUpgrade, client_addr: SocketAddr, secure: bool, decision: &Accept) -> UpstreamRequest {
    let mut path_and_query = decision.rewrite_path.clone().unwrap_or_else(|| upgrade.path.clone());
    if !upgrade.query.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&upgrade.query);
    }
    // What plugins remove or set is left out of the client's headers as they are written.
    let edits = !decision.remove_headers.is_empty() || !decision.add_headers.is_empty();
    let keep = |name: &str| {
        let named = |n: &String| n.eq_ignore_ascii_case(name);
        !edits || !(decision.remove_headers.iter().any(named) || decision.add_headers.iter().any(|h| named(&h.name)))
    };
    let mut headers = handshake::upstream_headers(upgrade, client_addr.ip(), if secure { "https" } else { "http" }, keep);
    for added in &decision.add_headers {
        headers.push(&added.name, &added.value);
    }
    UpstreamRequest { path_and_query, headers }
}

/// The order to try servers in: the balancer plugin's ranking, or round robin. A failing
/// balancer falls back to round robin unless its `on_error` is "deny". Only available servers
/// (healthy, not ejected, not draining) are offered to the plugin, as `candidates` whose
/// indexes map back to the pool's list; none available is a 503.
pub(crate) fn rank_servers(pool: &Pool, conn: Option<&ConnContext>, errors: &Counter, trace: &mut Trace) -> Result<ServerOrder, Refusal> {
    let available = pool.available();
    if available.is_empty() {
        return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, pool.unavailable_reason()));
    }
    let Some(((_, slot), conn)) = pool.balancer.as_ref().zip(conn) else {
        return Ok(pool.round_robin_order(available));
    };
    let plugin = slot.current();
    if !plugin.hooks().balancer {
        return Ok(pool.round_robin_order(available));
    }
    // A pool has a handful of servers, mostly: no allocation for the call's bookkeeping.
    let candidates: SmallVec<[_; 16]> = available.iter().map(|&i| pool.servers[i].candidate(i)).collect();
    match plugin.select(conn, &pool.plugin_view, &candidates) {
        Ok(ranked) => {
            let mut order = ServerOrder::with_capacity(ranked.len());
            let mut seen: SmallVec<[bool; 64]> = smallvec::smallvec![false; candidates.len()];
            for i in ranked.into_iter().map(|i| i as usize) {
                if i < candidates.len() && !std::mem::replace(&mut seen[i], true) {
                    order.push(available[i]);
                }
            }
            if order.is_empty() {
                trace.refused_by(plugin.name());
                return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, format!("balancer {} chose no server", plugin.name())));
            }
            Ok(order)
        }
        Err(e) => {
            errors.inc();
            tracing::warn!(plugin = plugin.name(), error = %e, "balancer failed");
            if plugin.on_error() == Some(OnError::Deny) {
                trace.refused_by(plugin.name());
                return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, format!("balancer {} failed", plugin.name())));
            }
            Ok(pool.round_robin_order(available))
        }
    }
}

/// Tries servers in `order`, at most `max_attempts` of them. Failures count towards the
/// server's passive ejection, except a broken handshake on a request that handshake plugins
/// `edited`: the server was reached and may only have refused what a plugin made of the
/// request, and ejecting it would turn one plugin's mistake into 503s on every route that
/// shares the pool. Unreachable servers still count. A server that started draining
/// meanwhile is passed over. The gateway running out of descriptors or ports is no server's
/// failure: the client gets a 503 that says so, and no server is blamed or tried further.
pub(crate) async fn connect_ranked(
    pool: &Pool,
    order: &[usize],
    request: &UpstreamRequest,
    edited: bool,
    shared: &Shared,
    trace: &mut Trace,
) -> Result<(UpstreamSocket, ActiveConnection), Refusal> {
    let failures = &shared.metrics.upstream_connect_failures;
    let mut last_error = None;
    for &index in order.iter().take(pool.max_attempts as usize) {
        let server = &pool.servers[index];
        trace.server(&server.address.authority);
        let started = Instant::now();
        // Counted as active while it connects, so concurrent balancer calls see it.
        let active = server.connecting();
        match upstream::open(&server.address, server.tls.as_deref(), request, pool.connect_timeout).await {
            Ok(_) if server.is_draining() => {
                last_error = Some(format!("{}: draining", server.address.authority));
            }
            Ok(socket) => {
                let took = started.elapsed();
                server.record_success(took);
                server.metrics(&shared.metrics_registry, &pool.name).connect_seconds.observe(took.as_secs_f64());
                active.established();
                return Ok((socket, active));
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
            Err(ConnectError::OutOfResources(shortage, error)) => {
                shared.resources.record(shortage, "upstream connect", &error);
                return Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the gateway is out of {shortage}; try again later"),
                ));
            }
            Err(e) => {
                if !(edited && matches!(e, ConnectError::BadHandshake(_))) {
                    server.record_failure(&pool.name, pool.eject_after);
                }
                failures.inc();
                tracing::warn!(pool = %pool.name, server = %server.address.authority, error = %e, "upstream connect failed");
                last_error = Some(format!("{}: {e}", server.address.authority));
            }
        }
    }
    Err(Refusal::new(StatusCode::BAD_GATEWAY, format!("no upstream server of {} answered ({})", pool.name, last_error.as_deref().unwrap_or("no servers"))))
}

/// A connection's plugins: the route's chain, the host-side context they share, and
/// whether any reads messages (decided once, at the handshake).
struct Chain {
    slots: Arc<[Arc<PluginSlot>]>,
    conn: Option<Arc<ConnContext>>,
    reads_messages: bool,
}

/// permessage-deflate as agreed for one connection.
struct NegotiatedCompression {
    /// The 101's `Sec-WebSocket-Extensions`, if any.
    header: Option<String>,
    /// Frames from the client may carry RSV1 (compressed messages).
    client_rsv1: bool,
    /// Frames from the upstream may carry RSV1.
    upstream_rsv1: bool,
    /// The gateway inflates and deflates on the client link (terminate mode).
    terminate: Option<ClientCompression>,
}

/// Agrees permessage-deflate for the client link: `off`; `passthrough` (the client's offer
/// went upstream, the upstream's answer is checked against it and forwarded); or
/// `terminate` (the gateway answers the client's offer under `wanted`'s policy and the
/// upstream link stays uncompressed). An upstream answer the gateway cannot accept is a 502.
fn negotiate_compression(
    mode: CompressionMode,
    wanted: &Compression,
    client_offers: &[&str],
    socket: &UpstreamSocket,
    max_message_size: u64,
) -> Result<NegotiatedCompression, Refusal> {
    let plain = NegotiatedCompression { header: None, client_rsv1: false, upstream_rsv1: false, terminate: None };
    let answer: Vec<&str> = socket.extensions.iter().map(String::as_str).collect();
    let bad_answer = |e: negotiate::NegotiationError| {
        Refusal::new(StatusCode::BAD_GATEWAY, format!("the upstream's Sec-WebSocket-Extensions cannot be accepted: {e}"))
    };
    match mode {
        CompressionMode::Passthrough => {
            match negotiate::validate_passthrough(client_offers.iter().copied(), answer).map_err(bad_answer)? {
                Some(_) => Ok(NegotiatedCompression {
                    header: socket.extensions.clone(),
                    client_rsv1: true,
                    upstream_rsv1: true,
                    terminate: None,
                }),
                None => Ok(plain),
            }
        }
        CompressionMode::Off | CompressionMode::Terminate => {
            // Nothing was offered upstream: any extension in its answer is an error.
            negotiate::validate_passthrough(std::iter::empty::<&str>(), answer).map_err(bad_answer)?;
            if mode == CompressionMode::Off {
                return Ok(plain);
            }
            let policy = DeflatePolicy::new(wanted.max_window_bits, wanted.no_context_takeover);
            match negotiate::accept(client_offers.iter().copied(), &policy) {
                Some(accepted) => Ok(NegotiatedCompression {
                    header: Some(accepted.header),
                    client_rsv1: true,
                    upstream_rsv1: false,
                    terminate: Some(ClientCompression {
                        inflater: Box::new(accepted.config.inflater(max_message_size)),
                        deflater: Box::new(accepted.config.deflater()),
                        min_size: 0,
                    }),
                }),
                None => Ok(plain),
            }
        }
    }
}

/// What the relay needs once the client's 101 is out.
struct Prepared {
    /// Frames the client sent right behind its request.
    client_already_read: Vec<u8>,
    upstream: UpstreamSocket,
    settings: relay::RelaySettings,
    active: ActiveConnection,
    chain: Chain,
    compression: NegotiatedCompression,
    /// How to open another server, on routes whose connections may move.
    session: Option<crate::session::Plan>,
}

async fn relay_connection(client: ClientStream, prepared: Box<Prepared>, shared: &Arc<Shared>, trace: &mut Trace) {
    let Prepared { client_already_read, upstream, settings, active, chain, compression, session } = *prepared;
    let client = Endpoint { stream: client.into_transport(), already_read: client_already_read };
    let started = Instant::now();
    let metrics = &shared.metrics;
    metrics.connections_active.inc();
    metrics.connections_total.inc();
    // On a session route the connection may move to other servers; its traffic stays
    // counted under the first one.
    let server = active.server().state.metrics.get().cloned();
    let server = server.as_ref();
    if let Some(server) = server {
        server.connections_active.inc();
        server.connections_total.inc();
    }
    // The gateway's and the server's counters follow the relay while it runs.
    let (gateway_only, with_server);
    let traffic: &[&relay::TrafficCounters] = match server {
        Some(server) => {
            with_server = [&metrics.traffic, &server.traffic];
            &with_server
        }
        None => {
            gateway_only = [&metrics.traffic];
            &gateway_only
        }
    };
    let upstream = Endpoint { stream: upstream.stream.into_transport(), already_read: upstream.already_read };
    let max = settings.max_message_size;
    let rules = (
        LinkRules { expect_masked: true, validate_utf8: true, allow_rsv1: compression.client_rsv1, max_message_size: max },
        LinkRules {
            expect_masked: false,
            validate_utf8: false,
            allow_rsv1: compression.upstream_rsv1,
            max_message_size: max,
        },
    );
    // Only routes whose plugins read messages pay for assembling them and calling Wasm.
    let Chain { slots: chain, conn, reads_messages } = chain;
    // Shutdown closes with 1001, a drain of this server with 1012; on a session route the
    // resumer holds the server and may move the connection instead.
    let (mut resumer, active, stop) = match (session, &conn) {
        (Some(plan), Some(conn)) => {
            // Boxed: only session routes have one, and inline it would size every
            // connection's task.
            let resumer = Box::new(crate::session::Resumer::new(plan, conn.clone(), chain.clone(), active, shared.clone()));
            let stop = resumer.stop();
            (Some(resumer), None, stop)
        }
        _ => {
            let stop = active.close_signal(&shared.shutdown).stop();
            (None, Some(active), stop)
        }
    };
    let hook = match (&conn, reads_messages) {
        (Some(conn), true) => {
            Some(ChainHook {
                conn: conn.clone(),
                chain: chain.clone(),
                errors: metrics.plugin_errors.clone(),
                max_message_size: settings.max_message_size,
            })
        }
        _ => None,
    };
    let relayed = AssertUnwindSafe(relay::run(
        client,
        upstream,
        &settings,
        rules,
        hook.as_ref().map(|h| h as &dyn MessageHook),
        compression.terminate,
        stop,
        traffic,
        resumer.as_deref_mut().map(|r| r as &mut dyn relay::Reattach),
    ))
    .catch_unwind()
    .await;
    // After a panic both sockets are gone (dropped with the relay); the connection is still
    // counted as closed and its plugins still hear of it.
    let outcome = relayed.unwrap_or_else(|panic| {
        tracing::error!(conn = conn.as_ref().map(|c| c.id), "the relay panicked: {}", panic_text(&*panic));
        RelayOutcome {
            code: relay::close::code::ABNORMAL,
            messages_from_client: 0,
            messages_from_upstream: 0,
            bytes_from_client: 0,
            bytes_from_upstream: 0,
            closed_by: relay::Closer::Gateway,
        }
    });
    trace.relayed(&outcome);
    metrics.connections_active.dec();
    if let Some(server) = server {
        server.connections_active.dec();
    }
    drop(active);
    drop(resumer);
    if let Some(conn) = &conn {
        notify_close(&chain, conn, &outcome, started);
    }
}

fn notify_close(chain: &[Arc<PluginSlot>], conn: &ConnContext, outcome: &RelayOutcome, started: Instant) {
    let stats = ConnStats {
        messages_from_client: outcome.messages_from_client,
        messages_from_upstream: outcome.messages_from_upstream,
        bytes_from_client: outcome.bytes_from_client,
        bytes_from_upstream: outcome.bytes_from_upstream,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    for slot in chain {
        let plugin = slot.current();
        if plugin.hooks().close {
            plugin.on_close(conn, outcome.code, stats);
        }
    }
}

/// The route's plugin chain as the relay's message hook. Each plugin sees the payload as the
/// plugins before it left it; drop, reply and close end the chain.
struct ChainHook {
    conn: Arc<ConnContext>,
    chain: Arc<[Arc<PluginSlot>]>,
    errors: Counter,
    /// What a plugin makes (a new payload, a reply) obeys the limit relayed messages do.
    max_message_size: u64,
}

impl MessageHook for ChainHook {
    fn on_message(&self, from: Side, kind: DataKind, payload: &[u8]) -> MessageAction {
        let dir = match from {
            Side::Client => Direction::ClientToUpstream,
            Side::Upstream => Direction::UpstreamToClient,
        };
        let op = match kind {
            DataKind::Text => Opcode::Text,
            DataKind::Binary => Opcode::Binary,
        };
        let mut replaced: Option<Vec<u8>> = None;
        let mut compress = true;
        for slot in self.chain.iter() {
            let plugin = slot.current();
            if !plugin.hooks().messages {
                continue;
            }
            let current = replaced.as_deref().unwrap_or(payload);
            let too_big = |bytes: &[u8]| bytes.len() as u64 > self.max_message_size;
            let result = match plugin.on_message(&self.conn, dir, op, current) {
                Ok(Action::Forward { payload: Some(p), .. } | Action::Reply(p)) if too_big(&p) => Err(format!(
                    "its message of {} bytes is over max_message_size ({})",
                    p.len(),
                    self.max_message_size
                )),
                Ok(action) => Ok(action),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(Action::Forward { payload, compress: c }) => {
                    // One plugin asking for an uncompressed message is enough.
                    compress &= c;
                    if payload.is_some() {
                        replaced = payload;
                    }
                }
                Ok(Action::Drop) => return MessageAction::Drop,
                Ok(Action::Reply(reply)) => return MessageAction::Reply(reply),
                Ok(Action::Close(frame)) => return MessageAction::Close(frame.code, frame.reason),
                Err(e) => {
                    // The plugin's failure: the message goes on as the plugins before it
                    // left it, or the connection closes, as its on_error says.
                    self.errors.inc();
                    tracing::warn!(plugin = plugin.name(), error = %e, "message hook failed");
                    // Fail closed unless the operator chose "allow": a failure an attacker
                    // can provoke must not let through what the plugin would have stopped.
                    if plugin.on_error() != Some(OnError::Allow) {
                        return MessageAction::Close(relay::close::code::INTERNAL_ERROR, "plugin failed".into());
                    }
                }
            }
        }
        MessageAction::Send { payload: replaced, compress }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::Header;
    use http::{HeaderMap, HeaderName, HeaderValue};

    fn upgrade(headers: &[(&str, &[u8])]) -> ClientUpgrade {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_bytes(value).unwrap());
        }
        ClientUpgrade {
            key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
            path: "/chat/room".into(),
            query: "a=1&b=%20".into(),
            host: "chat.example".into(),
            subprotocols: vec!["v2.chat".into()],
            headers: map,
        }
    }

    fn values(input: &dyn HandshakeInput, name: &str) -> Vec<String> {
        let mut all = Vec::new();
        input.each_header_value(name, &mut |v| all.push(v.to_string()));
        all
    }

    /// Kept verdicts are found by the parts read from the parsed upgrade; a call sees the
    /// record. Both must give the same values, or a kept answer would be given to a request
    /// the plugin never judged.
    #[test]
    fn a_plugin_request_reads_its_parts_as_its_record_carries_them() {
        let cases: &[&[(&str, &[u8])]] = &[
            &[],
            &[("authorization", b"Bearer a.b.c")],
            &[("authorization", b"a"), ("x-authorization", b"z"), ("authorization", b"b, c")],
            // obs-text is left out of the record, so it must be left out of the parts.
            &[("x-token", b"caf\xe9"), ("x-token", b"ok"), ("x-token", b"")],
            &[("cookie", b"a=1; b=2"), ("cookie", b"c=3"), ("x-empty", b""), ("authorization-x", b"y")],
        ];
        let names = ["authorization", "x-authorization", "x-token", "cookie", "x-empty", "authorization-x", "absent"];
        for (i, headers) in cases.iter().enumerate() {
            let upgrade = upgrade(headers);
            for addr in ["192.0.2.7:40000", "[2001:db8::1]:443", "[::ffff:10.0.0.1]:1"] {
                let lazy = PluginRequest { upgrade: &upgrade, client_addr: addr.parse().unwrap(), tls: None, record: OnceCell::new() };
                let record = lazy.record().clone();
                for name in names {
                    assert_eq!(values(&lazy, name), values(&record, name), "case {i}, header {name}");
                }
                assert_eq!(
                    (lazy.path(), lazy.query(), lazy.host(), lazy.scheme(), lazy.sni(), lazy.client_ip()),
                    (record.path(), record.query(), record.host(), record.scheme(), record.sni(), record.client_ip()),
                    "case {i}, {addr}"
                );
            }
        }
    }

    /// A plugin's edits: what it removes or sets is gone from the client's headers and from
    /// the forwarding headers, in any case; what it sets follows once; the rest is untouched.
    #[test]
    fn the_upstream_gets_the_clients_headers_with_the_plugins_edits() {
        let upgrade = upgrade(&[
            ("origin", b"https://chat.example"),
            ("x-user-id", b"root"),
            ("x-user-id", b"admin"),
            ("cookie", b"a=1"),
            ("x-trace", b"t1"),
        ]);
        let client = "192.0.2.7:40000".parse().unwrap();
        let lines = |decision: &Accept| {
            let request = upstream_request(&upgrade, client, false, decision);
            request.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect::<Vec<_>>()
        };
        let untouched = lines(&Accept::default());
        assert_eq!(untouched, [
            "origin: https://chat.example",
            "x-user-id: root",
            "x-user-id: admin",
            "cookie: a=1",
            "x-trace: t1",
            "x-forwarded-for: 192.0.2.7",
            "forwarded: for=192.0.2.7;proto=http;host=\"chat.example\"",
            "x-forwarded-proto: http",
        ]);
        let edited = Accept {
            add_headers: vec![Header { name: "X-User-Id".into(), value: "ann".into() }],
            remove_headers: vec!["COOKIE".into(), "x-forwarded-for".into(), "absent".into()],
            ..Accept::default()
        };
        assert_eq!(lines(&edited), [
            "origin: https://chat.example",
            "x-trace: t1",
            "forwarded: for=192.0.2.7;proto=http;host=\"chat.example\"",
            "x-forwarded-proto: http",
            "X-User-Id: ann",
        ]);
    }
}
