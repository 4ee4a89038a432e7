//! Opening the upstream WebSocket: TCP connect, TLS for `wss://` servers, the client side of
//! the RFC 6455 handshake, and a clear classification of what went wrong, so the caller
//! knows whether to try the next server (unreachable, TLS refused, broken handshake, 5xx)
//! or to pass the answer on (4xx).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{ServerAddress, UpstreamRequest, UpstreamTls};
use crate::handshake::accept_key_bytes;
use crate::resources::Shortage;

/// The connection to an upstream server: plain TCP, or TLS over it for `wss://`.
#[derive(Debug)]
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// An open upstream WebSocket.
#[derive(Debug)]
pub struct UpstreamSocket {
    pub stream: UpstreamStream,
    /// Bytes the upstream sent right after its 101 (frames already on their way).
    pub already_read: Vec<u8>,
    /// The upstream's `Sec-WebSocket-Protocol` answer.
    pub subprotocol: Option<String>,
    /// The upstream's `Sec-WebSocket-Extensions` answer.
    pub extensions: Option<String>,
}

#[derive(Debug)]
pub enum ConnectError {
    /// No TCP connection (refused, unreachable, timed out): try another server.
    Unreachable(String),
    /// The TLS handshake failed, most often because the server's certificate did not pass
    /// verification (the message says why): try another server.
    Tls(String),
    /// Connected, but the answer was not a valid WebSocket upgrade or was a 5xx.
    BadHandshake(String),
    /// The upstream refused with a 4xx: the client should see that answer.
    Refused { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// The gateway could not open a socket (out of descriptors or local ports): nothing is
    /// known about the server, which must not be blamed.
    OutOfResources(Shortage, std::io::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Unreachable(e) => write!(f, "unreachable: {e}"),
            ConnectError::Tls(e) => f.write_str(e),
            ConnectError::BadHandshake(e) => write!(f, "bad handshake: {e}"),
            ConnectError::Refused { status, .. } => write!(f, "refused with {status}"),
            ConnectError::OutOfResources(shortage, e) => write!(f, "the gateway is out of {shortage}: {e}"),
        }
    }
}

/// Largest upstream handshake answer accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Connects to `server` (with TLS for a `wss://` one, using `tls`) and performs the
/// WebSocket handshake, all within `timeout`.
pub async fn open(
    server: &ServerAddress,
    tls: Option<&UpstreamTls>,
    request: &UpstreamRequest,
    timeout: Duration,
) -> Result<UpstreamSocket, ConnectError> {
    tokio::time::timeout(timeout, open_inner(server, tls, request))
        .await
        .unwrap_or_else(|_| Err(ConnectError::Unreachable(format!("timed out after {timeout:?}"))))
}

async fn open_inner(
    server: &ServerAddress,
    tls: Option<&UpstreamTls>,
    request: &UpstreamRequest,
) -> Result<UpstreamSocket, ConnectError> {
    let tcp = TcpStream::connect(&server.authority).await.map_err(|e| match Shortage::of(&e) {
        Some(shortage) => ConnectError::OutOfResources(shortage, e),
        None => ConnectError::Unreachable(e.to_string()),
    })?;
    let _ = tcp.set_nodelay(true);
    let mut stream = match (server.tls, tls) {
        (false, _) => UpstreamStream::Plain(tcp),
        (true, Some(tls)) => UpstreamStream::Tls(Box::new(tls.connect(tcp, server.certificate_name()).await.map_err(ConnectError::Tls)?)),
        (true, None) => return Err(ConnectError::Tls("a wss:// server without TLS settings".into())),
    };

    let mut key = [0u8; 24];
    let key = encode_key(&mut key);
    let lines = request.headers.as_str();
    let mut head = String::with_capacity(160 + server.path_prefix.len() + request.path_and_query.len() + lines.len());
    head.push_str("GET ");
    head.push_str(&server.path_prefix);
    head.push_str(&request.path_and_query);
    head.push_str(" HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n");
    head.push_str("Sec-WebSocket-Key: ");
    head.push_str(key);
    head.push_str("\r\n");
    head.push_str(lines);
    if !request.headers.has_host() {
        head.push_str("Host: ");
        head.push_str(&server.authority);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    // TLS holds written bytes until flushed; for TCP the flush is free.
    let sent = async {
        stream.write_all(head.as_bytes()).await?;
        stream.flush().await
    };
    sent.await.map_err(|e| ConnectError::Unreachable(e.to_string()))?;

    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(ConnectError::BadHandshake("response headers too large".into()));
        }
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| ConnectError::BadHandshake(e.to_string()))?;
        if n == 0 {
            return Err(ConnectError::BadHandshake("connection closed during the handshake".into()));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(ConnectError::BadHandshake(format!("unparsable response: {e}"))),
        };
        let status = response.code.unwrap_or(0);
        let find = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::trim)
        };
        if status != 101 {
            if (400..500).contains(&status) {
                let headers = response
                    .headers
                    .iter()
                    .filter(|h| !is_framing_header(h.name))
                    .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                let body_len: usize = find("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                let body = read_body(&mut stream, buf.split_off(head_len), body_len.min(4096)).await;
                return Err(ConnectError::Refused { status, headers, body });
            }
            return Err(ConnectError::BadHandshake(format!("answered {status} instead of 101")));
        }
        // RFC 6455 §4.1: Upgrade names websocket, Connection holds the upgrade token (a
        // comma-separated list), and the accept answers our key.
        let upgrade_ok = find("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let connection_ok = response
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        let accept_ok = find("sec-websocket-accept").is_some_and(|v| v.as_bytes() == accept_key_bytes(key).as_slice());
        if !upgrade_ok || !connection_ok || !accept_ok {
            return Err(ConnectError::BadHandshake("101 without a valid WebSocket accept".into()));
        }
        let subprotocol = find("sec-websocket-protocol").map(str::to_string);
        let extensions = find("sec-websocket-extensions").map(str::to_string);
        return Ok(UpstreamSocket { stream, already_read: buf.split_off(head_len), subprotocol, extensions });
    }
}

/// A fresh random `Sec-WebSocket-Key`, in base64 in `buf`.
fn encode_key(buf: &mut [u8; 24]) -> &str {
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(rand::random::<[u8; 16]>(), buf)
        .expect("16 bytes are 24 in base64");
    std::str::from_utf8(&buf[..written]).expect("base64 is ASCII")
}

fn is_framing_header(name: &str) -> bool {
    ["content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

async fn read_body(stream: &mut UpstreamStream, mut body: Vec<u8>, len: usize) -> Vec<u8> {
    let deadline = Duration::from_millis(500);
    while body.len() < len {
        match tokio::time::timeout(deadline, stream.read_buf(&mut body)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    body.truncate(len);
    body
}

impl UpstreamStream {
    /// For the relay, once the WebSocket is open: the TLS connection moves with whatever
    /// plaintext rustls read past the 101.
    pub fn into_transport(self) -> crate::relay::Transport {
        match self {
            UpstreamStream::Plain(tcp) => crate::relay::Transport::Plain(tcp),
            UpstreamStream::Tls(tls) => {
                let (tcp, conn) = tls.into_inner();
                crate::relay::Transport::tls(tcp, conn)
            }
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
