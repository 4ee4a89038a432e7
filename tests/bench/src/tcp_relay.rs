//! `wasmgate-bench tcp-relay`: the least a tokio proxy can do, for the `tokio-tcp` column.
//! Each accepted client gets a task that connects to the next backend (round robin) and
//! copies bytes both ways (`tokio::io::copy_bidirectional`) until either side ends. It
//! parses nothing: not the HTTP upgrade, not a frame.
//!
//! It runs on the runtime the gateway uses (multi-threaded, one worker per core, 32 I/O
//! events per tick) with the same socket options (listen backlog 4,096, `TCP_NODELAY` on
//! both sides). Against `haproxy-tcp`, the same relay in C, it shows what tokio's runtime
//! costs a connection; against wasmgate, what the gateway's own work costs above that.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::{TcpSocket, TcpStream};

/// The gateway's `IO_EVENTS_PER_TICK` (gateway/src/main.rs) and default `listen_backlog`.
const IO_EVENTS_PER_TICK: usize = 32;
const BACKLOG: u32 = 4096;
/// Each direction's buffer (tokio's default is 8 KiB); the handshakes and messages measured
/// are far smaller.
const COPY_BUFFER: usize = 4096;

#[derive(clap::Args, Clone)]
pub struct Options {
    /// Address to accept clients on.
    #[arg(long)]
    listen: SocketAddr,
    /// Backends, comma separated, taken in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    upstream: Vec<SocketAddr>,
}

/// Runs the relay on its own runtime until the process is stopped.
pub fn run(options: Options) -> anyhow::Result<()> {
    crate::procs::raise_nofile_limit()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_io_events_per_tick(IO_EVENTS_PER_TICK)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(serve(options))
}

async fn serve(options: Options) -> anyhow::Result<()> {
    if options.upstream.is_empty() {
        bail!("--upstream names no backend");
    }
    let socket = if options.listen.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(options.listen).with_context(|| format!("binding {}", options.listen))?;
    let listener = socket.listen(BACKLOG)?;
    let upstreams = Arc::new(options.upstream);
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let (client, _) = match listener.accept().await {
            Ok(pair) => pair,
            // Out of descriptors and the like: the storm's clients retry.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let upstream = upstreams[next.fetch_add(1, Ordering::Relaxed) % upstreams.len()];
        tokio::spawn(relay(client, upstream));
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) {
    let _ = client.set_nodelay(true);
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, COPY_BUFFER, COPY_BUFFER).await;
}
