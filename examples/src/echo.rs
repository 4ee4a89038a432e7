//! An echo WebSocket server on tokio-tungstenite.
//!
//! Every text or binary message comes back unchanged; a close is answered with the same code.
//! Two extra behaviours let tests see what the gateway did:
//! - a text message `whoami` is answered with this server's name, so a test can tell which
//!   backend a connection landed on;
//! - a text message `headers` is answered with the upgrade request's headers as JSON-ish
//!   `name: value` lines, so a test can check what the gateway forwarded;
//! - a text message `close:CODE:REASON` makes the server close with that code, so a test can
//!   check close-code propagation from the upstream side.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use anyhow::Context as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

/// A running echo server.
pub struct EchoServer {
    pub addr: SocketAddr,
    /// Close codes this server received from its clients (1006 for a connection that ended
    /// without a close frame), so tests can check what the gateway sent upstream.
    pub closes: Arc<Mutex<Vec<u16>>>,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Binds `addr` (use port 0 for an ephemeral port) and serves until dropped.
    pub async fn start(addr: &str, name: &str) -> anyhow::Result<Self> {
        // A deep accept queue, as the gateway's: benchmarks storm the backends with
        // reconnects, and std's 128 would drop SYNs there instead of in the proxy under test.
        let addr: SocketAddr = tokio::net::lookup_host(addr).await?.next().context("no address")?;
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let name = name.to_string();
        let closes = Arc::new(Mutex::new(Vec::new()));
        let seen = closes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, name.clone(), seen.clone()));
            }
        });
        Ok(Self { addr, closes, task })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config() -> WebSocketConfig {
    // Large enough for the 16 MiB test message, small buffers for idle connections.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

async fn serve_connection(stream: TcpStream, name: String, closes: Arc<Mutex<Vec<u16>>>) {
    let mut request_headers = String::new();
    // The callback's signature (its large error type included) is tungstenite's.
    #[allow(clippy::result_large_err)]
    let capture = |req: &Request, resp: Response| {
        for (k, v) in req.headers() {
            request_headers.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        request_headers.push_str(&format!("path: {}\n", req.uri()));
        let mut resp = resp;
        // Choose the first offered subprotocol, as many real servers do.
        if let Some(offer) = req.headers().get("sec-websocket-protocol") {
            if let Some(first) = offer.to_str().ok().and_then(|s| s.split(',').next()) {
                resp.headers_mut()
                    .insert("sec-websocket-protocol", first.trim().parse().unwrap());
            }
        }
        Ok(resp)
    };
    let ws = match tokio_tungstenite::accept_hdr_async_with_config(stream, capture, Some(config()))
        .await
    {
        Ok(ws) => ws,
        Err(_) => return,
    };
    let (mut tx, mut rx) = ws.split();
    let mut close_code = 1006;
    while let Some(Ok(msg)) = rx.next().await {
        let reply = match msg {
            Message::Text(t) if t.as_str() == "whoami" => Message::text(name.clone()),
            Message::Text(t) if t.as_str() == "headers" => Message::text(request_headers.clone()),
            Message::Text(t) if t.as_str().starts_with("close:") => {
                let mut parts = t.as_str().splitn(3, ':').skip(1);
                let code: u16 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(1000);
                let reason = parts.next().unwrap_or("").to_string();
                Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() }))
            }
            Message::Text(_) | Message::Binary(_) => msg,
            // tungstenite answers pings and close frames itself.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Close(frame) => {
                close_code = frame.map_or(1005, |f| u16::from(f.code));
                break;
            }
        };
        if tx.send(reply).await.is_err() {
            break;
        }
    }
    // Flush the close reply tungstenite queued.
    let _ = tx.close().await;
    closes.lock().unwrap().push(close_code);
}
