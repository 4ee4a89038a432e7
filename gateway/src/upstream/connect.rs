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
        match read_answer(&buf, key)? {
            Answer::Partial => continue,
            Answer::Switching { head_len, subprotocol, extensions } => {
                return Ok(UpstreamSocket { stream, already_read: buf.split_off(head_len), subprotocol, extensions });
            }
            Answer::Refused { status, headers, head_len, body_len } => {
                let body = read_body(&mut stream, buf.split_off(head_len), body_len.min(4096)).await;
                return Err(ConnectError::Refused { status, headers, body });
            }
        }
    }
}

/// What the upstream's answer head says, with what the caller needs of it copied out.
enum Answer {
    /// The head is not complete yet.
    Partial,
    /// A valid 101 for our key; the head is `head_len` bytes.
    Switching { head_len: usize, subprotocol: Option<String>, extensions: Option<String> },
    /// A 4xx, which the client should see: its headers and the body length it announced.
    Refused { status: u16, headers: Vec<(String, String)>, head_len: usize, body_len: usize },
}

/// Parses the answer head in `buf` to the request sent with `key`. A plain function, so
/// httparse's 64 header slots (2 KiB, all written on every parse) live on the thread's
/// stack: in `open_inner` they were part of every handshake's future, heap memory that is
/// cold when thousands of handshakes are in flight.
fn read_answer(buf: &[u8], key: &str) -> Result<Answer, ConnectError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Answer::Partial),
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
            let body_len = find("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            return Ok(Answer::Refused { status, headers, head_len, body_len });
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
    Ok(Answer::Switching { head_len, subprotocol, extensions })
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

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn answer(head: &str) -> Result<Answer, ConnectError> {
        read_answer(head.as_bytes(), KEY)
    }

    #[test]
    fn a_valid_101_gives_its_length_and_negotiated_headers() {
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: keep-alive, upgrade\r\n\
                    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n";
        let with_frame = format!("{head}\u{81}\u{0}");
        match read_answer(with_frame.as_bytes(), KEY) {
            Ok(Answer::Switching { head_len, subprotocol, extensions }) => {
                assert_eq!(head_len, head.len());
                assert_eq!(subprotocol.as_deref(), Some("chat"));
                assert_eq!(extensions, None);
            }
            _ => panic!("a valid 101 was not accepted"),
        }
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        assert!(matches!(answer("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"), Ok(Answer::Partial)));
    }

    #[test]
    fn a_101_that_does_not_answer_the_key_is_a_bad_handshake() {
        let wrong_accept = "HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n";
        let no_upgrade = "HTTP/1.1 101 OK\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        for head in [wrong_accept, no_upgrade] {
            assert!(matches!(answer(head), Err(ConnectError::BadHandshake(_))), "{head:?}");
        }
    }

    #[test]
    fn a_4xx_is_passed_on_without_its_framing_headers_and_other_statuses_are_failures() {
        match answer("HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\nX-Reason: token\r\nConnection: close\r\n\r\nno way!") {
            Ok(Answer::Refused { status, headers, body_len, .. }) => {
                assert_eq!((status, body_len), (403, 7));
                assert_eq!(headers, vec![("X-Reason".to_string(), "token".to_string())]);
            }
            _ => panic!("a 403 was not passed on"),
        }
        for head in ["HTTP/1.1 503 Busy\r\n\r\n", "HTTP/1.1 200 OK\r\n\r\n", "nonsense\r\n\r\n"] {
            assert!(matches!(answer(head), Err(ConnectError::BadHandshake(_))), "{head:?}");
        }
    }

    /// Each handshake in flight holds this future in heap memory that a storm keeps cold:
    /// scratch space (httparse's header slots) belongs on the stack, in `read_answer`.
    #[test]
    fn opening_an_upstream_keeps_no_scratch_space_in_its_future() {
        let server = ServerAddress::parse("127.0.0.1:9").unwrap();
        let request = UpstreamRequest { path_and_query: "/".into(), headers: Default::default() };
        let opening = open_inner(&server, None, &request);
        let size = std::mem::size_of_val(&opening);
        // The largest state is the TLS connect (rustls' connector future, about 1.2 KiB).
        assert!(size <= 1536, "open_inner's future is {size} bytes");
    }
}
