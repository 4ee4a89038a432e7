//! The accept loop: every client socket is admitted against the connection limits
//! ([`crate::limits`]) and gets one task (`proxy::serve`) that answers its upgrade request
//! and then relays until the connection closes; a socket over a limit is answered and
//! closed at once.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::gateway::Shared;
use crate::limits::Limits;
use crate::resources::AcceptBackoff;

pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut backoff = AcceptBackoff::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.upgrade.accepting.cancelled() => break,
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
                shared.tasks.spawn(crate::proxy::serve(stream, client_addr, shared.clone(), permit));
            }
            Err(refused) => shared.admission.refuse(stream, refused, &limits),
        }
    }
    tracing::info!("listener stopped");
}
