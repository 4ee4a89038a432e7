//! Shared-nothing accept workers (`[gateway] workers = N`, an experiment of #18): N threads,
//! each a single-threaded tokio runtime with its own `SO_REUSEPORT` listener on the client
//! address, as nginx's worker processes have. The kernel spreads new connections over the
//! listeners; a connection lives on the worker that accepted it, so its task is never stolen
//! by another thread nor woken across cores. The admin API, health checks and reloads stay
//! on the main runtime; the state behind them (`Shared`) is one for all workers.
//!
//! 0 (the default) serves every connection on the main multi-threaded runtime.
//! BENCHMARKS.md ("Shared-nothing workers") has what each costs.
//!
//! Only the plain (`ws://`) listener is served by the workers; a `[gateway.tls]` listener
//! stays on the main runtime. The workers' extra listeners are not handed over to a
//! successor process (`crate::upgrade` hands over the first): connections still in their
//! accept queues when the gateway retires are reset.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::gateway::Shared;

/// Starts accepting on `listener`: on the current runtime when `workers` is 0, else on that
/// many worker threads, the first taking `listener` and the others binding their own.
pub fn serve(listener: TcpListener, shared: Arc<Shared>, workers: usize) -> io::Result<()> {
    if workers == 0 {
        tokio::spawn(crate::listener::accept_loop(listener, shared, None));
        return Ok(());
    }
    let addr = listener.local_addr()?;
    let backlog = shared.config.load().gateway.listen_backlog;
    let mut listeners = vec![listener.into_std()?];
    for _ in 1..workers {
        listeners.push(crate::listener::bind(addr, backlog)?.into_std()?);
    }
    for (n, listener) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name(format!("wg-worker-{n}")).spawn(move || {
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(worker = n, "cannot register the listener: {e}"),
                };
                crate::listener::accept_loop(listener, shared, None).await;
                // Accepting has stopped (shutdown, retirement): the connections this worker
                // holds still need its runtime until they close.
                let metrics = tokio::runtime::Handle::current().metrics();
                while metrics.num_alive_tasks() > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        })?;
    }
    Ok(())
}
