//! The accept loop: every client socket is admitted against the connection limits
//! ([`crate::limits`]) and gets one task (`proxy::serve`) that answers its upgrade request
//! and then relays until the connection closes; a socket over a limit is answered and
//! closed at once.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};

use crate::gateway::Shared;
use crate::limits::Limits;
use crate::resources::AcceptBackoff;
use crate::tls::Terminator;

/// A client listener, with `backlog` queued connections (tokio's `TcpListener::bind`
/// asks for 128, which a reconnect storm overflows: measured with 600 clients reconnecting
/// at once, half of them waited a second for a SYN retransmit). `SO_REUSEPORT` lets another
/// process of the same user bind the address too (see [`crate::upgrade`]); the admin
/// listener is not shared this way: an admin request must reach the process it names.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// `tls`: this is the `wss://` listener; each connection starts with a TLS handshake with
/// the certificates in force when it was accepted.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<Arc<Terminator>>) {
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
        // Over max_handshakes this waits for a slot (crate::limits), and so does accepting.
        // Not cut short when the process starts retiring: this socket is accepted, so only
        // this process can answer it (dropping it reset the client), and the wait is bounded
        // (a 503 at its end). The loop stops at the next accept.
        let admitted = shared.admission.admit_or_wait(known_client, &limits).await;
        match admitted {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpStream;

    /// Connections the kernel completes while nobody accepts: what a reconnect storm meets
    /// when the accept loop is behind. Past the backlog, SYNs are dropped and their clients
    /// wait a second for the retransmit (here: give up after 300 ms).
    async fn queued_without_accepting(backlog: u32, clients: usize) -> usize {
        let listener = super::bind("127.0.0.1:0".parse().unwrap(), backlog).unwrap();
        let addr = listener.local_addr().unwrap();
        let attempts = (0..clients).map(|_| tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)));
        let held: Vec<TcpStream> =
            futures_util::future::join_all(attempts).await.into_iter().filter_map(|r| r.ok()?.ok()).collect();
        held.len()
    }

    #[tokio::test]
    async fn the_accept_queue_holds_the_configured_backlog() {
        assert_eq!(queued_without_accepting(512, 400).await, 400);
        // The same burst against std's and tokio's default: most of it is dropped.
        assert!(queued_without_accepting(128, 400).await < 200);
    }
}
