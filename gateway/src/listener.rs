//! The accept loop: every client socket is admitted against the connection limits
//! ([`crate::limits`]) and gets one task (`proxy::serve`) that answers its upgrade request
//! and then relays until the connection closes; a socket over a limit is answered and
//! closed at once.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::gateway::Shared;
use crate::limits::Limits;
use crate::resources::AcceptBackoff;
use crate::tls::Terminator;

/// `tls`: this is the `wss://` listener; each connection starts with a TLS handshake with
/// the certificates in force when it was accepted.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<Arc<Terminator>>) {
    let mut backoff = AcceptBackoff::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.shutdown.cancelled() => break,
        };
        let (stream, client_addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                if crate::resources::accept_failed(&shared.resources, "accept", &e) && !backoff.pause(&shared.shutdown).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        let limits = Limits::from_config(&shared.config.load().gateway, shared.admission.default_connections);
        // Behind PROXY protocol the peer is the balancer: the client it names is charged
        // against max_connections_per_ip once its header is read (proxy::read_upgrade).
        let known_client = (!shared.routing.load().proxy_protocol).then(|| client_addr.ip());
        match shared.admission.admit(known_client, &limits) {
            Ok(permit) => {
                let _ = stream.set_nodelay(true);
                let tls = tls.as_ref().map(|t| t.config());
                shared.tasks.spawn(crate::proxy::serve(stream, client_addr, shared.clone(), permit, tls));
            }
            Err(refused) => shared.admission.refuse(stream, refused, &limits),
        }
    }
    tracing::info!("listener stopped");
}
