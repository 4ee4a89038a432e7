//! The accept loop: every client socket gets one task (`proxy::serve`) that answers its
//! upgrade request and then relays until the connection closes.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::gateway::Shared;

pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.shutdown.cancelled() => break,
        };
        let (stream, client_addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shared.tasks.spawn(crate::proxy::serve(stream, client_addr, shared.clone()));
    }
    tracing::info!("listener stopped");
}
