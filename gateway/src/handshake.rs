//! The client's upgrade request: reading it off the socket, RFC 6455 §4.2.1 validation,
//! the answer (101 or a refusal), and the headers that go on to the upstream.
//!
//! The socket only ever carries this one HTTP request, so it is parsed with `httparse`
//! directly rather than through a general HTTP/1 server: no keep-alive, bodies or
//! pipelining to support, and no second task per connection waiting for the upgrade.
//!
//! Every refusal is an HTTP response with a status and a body that says what was wrong, so
//! a client (or the person debugging it) never faces a silently dropped socket.

use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::forwarding;
use crate::normalize;
use crate::upstream::HeaderLines;

/// Largest request head accepted (request line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Most headers accepted in one request.
const MAX_HEADERS: usize = 100;

/// The client's request line and headers, and whatever followed them on the socket.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub version: Version,
    /// The request target as sent; [`validate`] normalises it.
    pub target: String,
    pub headers: HeaderMap,
    /// Bytes after the head: frames a client sent without waiting for the 101.
    pub rest: Vec<u8>,
}

/// Why no request head came.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed (or reset) before sending a whole head: there is no one to answer.
    Gone,
    /// The head is malformed, too large, or too slow: answer with this.
    Refused(Refusal),
}

/// Reads one request head before `deadline` (`timeout` is how long that was, for the
/// message); `already_read` holds bytes of it that came off the socket before (behind a
/// PROXY protocol header).
pub async fn read_request(
    stream: &mut (impl AsyncRead + Unpin),
    already_read: Vec<u8>,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<RequestHead, ReadError> {
    match tokio::time::timeout_at(deadline, read_head(stream, already_read)).await {
        Ok(result) => result,
        Err(_) => Err(ReadError::Refused(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the upgrade request did not arrive within {timeout:?}"),
        ))),
    }
}

async fn read_head(stream: &mut (impl AsyncRead + Unpin), already_read: Vec<u8>) -> Result<RequestHead, ReadError> {
    let mut buf = BytesMut::with_capacity(already_read.len().max(2048));
    buf.extend_from_slice(&already_read);
    loop {
        // Bytes read before this call may hold the whole head already.
        if !buf.is_empty() {
            if let Some(head) = take_head(&mut buf).map_err(ReadError::Refused)? {
                return Ok(head);
            }
            if buf.len() >= MAX_HEAD {
                return Err(ReadError::Refused(Refusal::new(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!("the request head is larger than {MAX_HEAD} bytes"),
                )));
            }
            buf.reserve(buf.len()); // grow geometrically; read_buf fills the spare capacity
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Gone),
            Ok(_) => {}
        }
    }
}

/// Takes a complete head, and whatever follows it, out of `buf`; `None`, leaving `buf` as
/// it is, while the head is incomplete. The header values are slices of one shared copy of
/// the head rather than a copy each: a head is parsed once per connection, and its values
/// were a quarter of a plain connection's allocations.
fn take_head(buf: &mut BytesMut) -> Result<Option<RequestHead>, Refusal> {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let head_len = match httparse::Request::new(&mut []).parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(parse_error(e)),
    };
    let head = buf.split_to(head_len).freeze();
    let rest = std::mem::take(buf).to_vec();
    parse_complete_head(&head, rest).map(Some)
}

fn parse_error(e: httparse::Error) -> Refusal {
    match e {
        httparse::Error::TooManyHeaders => {
            Refusal::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, format!("more than {MAX_HEADERS} headers"))
        }
        e => Refusal::new(StatusCode::BAD_REQUEST, format!("malformed HTTP request: {e}")),
    }
}

/// Parses `head`, which [`take_head`] found complete.
fn parse_complete_head(head: &Bytes, rest: Vec<u8>) -> Result<RequestHead, Refusal> {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    request.parse_with_uninit_headers(head, &mut slots).map_err(parse_error)?;
    let bad = |what: &str| Refusal::new(StatusCode::BAD_REQUEST, format!("malformed HTTP request: {what}"));
    let method = Method::from_bytes(request.method.unwrap_or("").as_bytes()).map_err(|_| bad("method"))?;
    let target = request.path.unwrap_or("").to_string();
    let version = if request.version == Some(1) { Version::HTTP_11 } else { Version::HTTP_10 };
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    for h in request.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value)).map_err(|_| bad("header value"))?;
        headers.append(name, value);
    }
    // A GET upgrade has no body; one announced here would be read as WebSocket frames.
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes().trim_ascii() != b"0");
    if has_body && method == Method::GET {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "a WebSocket upgrade request has no body"));
    }
    Ok(RequestHead { method, version, target, headers, rest })
}

/// How long a refused client may keep sending before the socket closes anyway.
const LINGER: Duration = Duration::from_secs(2);

/// Sends a refusal and closes the socket. Like nginx's lingering close, it half-closes and
/// reads what the client still sends (a body, early frames) for a moment: closing a socket
/// with unread data resets it, and the reset can destroy the answer before the client
/// reads it.
pub async fn refuse(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), refusal: Refusal) {
    if stream.write_all(&refusal.encode()).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        // On the heap: an array here would size every handshake's future (`proxy::answer`
        // awaits this) by 4 KiB more, for the few that are refused.
        let mut sink = vec![0u8; 4096];
        let mut drained = 0;
        while drained < MAX_HEAD {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// The RFC 6455 accept value for a client key, in base64 (a SHA-1 digest is always 28
/// bytes in base64, so no allocation).
pub fn accept_key_bytes(key: &str) -> [u8; 28] {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let mut out = [0u8; 28];
    base64::engine::general_purpose::STANDARD
        .encode_slice(sha.finalize(), &mut out)
        .expect("20 bytes are 28 in base64");
    out
}

/// A validated upgrade request, with what the rest of the connection's life needs from it.
#[derive(Debug, Clone)]
pub struct ClientUpgrade {
    pub key: String,
    /// The normal path (see [`normalize`]): what routes match, plugins see and the
    /// upstream gets.
    pub path: String,
    pub query: String,
    /// The normal host, without port: what host routes match.
    pub host: String,
    pub subprotocols: Vec<String>,
    pub headers: HeaderMap,
}

/// A refusal: status, reason (the body) and extra headers.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal { status, reason: reason.into(), headers: Vec::new() }
    }

    fn with_header(mut self, name: &str, value: &str) -> Refusal {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The response on the wire: status, the extra headers, and the reason as a text body.
    /// The connection closes after it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.reason.len());
        status_line(&mut out, self.status);
        out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n");
        out.extend_from_slice(format!("content-length: {}\r\n", self.reason.len() + 1).as_bytes());
        for (name, value) in &self.headers {
            // Plugin-supplied headers: only well-formed ones, and never framing ones.
            let framing = ["content-length", "transfer-encoding", "connection"].iter().any(|f| f.eq_ignore_ascii_case(name));
            if !framing && HeaderName::try_from(name.as_str()).is_ok() && HeaderValue::try_from(value.as_str()).is_ok() {
                push_header(&mut out, name, value);
            }
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.reason.as_bytes());
        out.push(b'\n');
        out
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Checks an upgrade request against RFC 6455 §4.2.1, and normalises its target and
/// `Host` (refusing those that have no normal form). The `Host` header in the result is
/// the normal one, so plugins and the upstream see what the router saw.
pub fn validate(method: &Method, version: Version, target: &str, mut headers: HeaderMap) -> Result<ClientUpgrade, Refusal> {
    if !headers.contains_key(header::UPGRADE) {
        return Err(Refusal::new(
            StatusCode::UPGRADE_REQUIRED,
            "this is a WebSocket endpoint: send a GET with Upgrade: websocket",
        )
        .with_header("upgrade", "websocket")
        .with_header("connection", "upgrade"));
    }
    if method != Method::GET {
        return Err(Refusal::new(StatusCode::METHOD_NOT_ALLOWED, "a WebSocket upgrade must be a GET")
            .with_header("allow", "GET"));
    }
    if version < Version::HTTP_11 {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "a WebSocket upgrade needs HTTP/1.1"));
    }
    if !has_token(&headers, header::UPGRADE, "websocket") {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "Upgrade header must name websocket"));
    }
    if !has_token(&headers, header::CONNECTION, "upgrade") {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "Connection header must include upgrade"));
    }
    // Two of these would leave it to each hop which one counts: the route and the plugins
    // could read one Host and the upstream the other (RFC 9112 §3.2, RFC 6455 §11.3).
    for name in [header::HOST, header::SEC_WEBSOCKET_KEY, header::SEC_WEBSOCKET_VERSION] {
        if headers.get_all(&name).iter().nth(1).is_some() {
            return Err(Refusal::new(StatusCode::BAD_REQUEST, format!("more than one {name} header")));
        }
    }
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"13");
    if !version_ok {
        return Err(Refusal::new(StatusCode::UPGRADE_REQUIRED, "unsupported Sec-WebSocket-Version; use 13")
            .with_header("sec-websocket-version", "13"));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| {
            let mut raw = [0u8; 18];
            base64::engine::general_purpose::STANDARD.decode_slice(k, &mut raw) == Ok(16)
        })
        .ok_or_else(|| {
            Refusal::new(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key must be 16 bytes in base64")
        })?
        .to_string();
    let host_header = match headers.get(header::HOST) {
        Some(h) => h.to_str().map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "Host: not ASCII"))?,
        None => return Err(Refusal::new(StatusCode::BAD_REQUEST, "Host header missing")),
    };
    let authority = normalize::authority(host_header)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("Host: {e}")))?;
    let target = normalize::target(target)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("request target: {e}")))?;
    // An absolute request target names the host itself (RFC 9112 §3.2.2); one that
    // disagrees with Host is refused rather than routed by one and forwarded with the other.
    if let Some(named) = target.authority.as_ref().filter(|named| named.host != authority.host) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the request target names host {} but the Host header {}", named.host, authority.host),
        ));
    }
    // Most clients send the normal form already; their value is kept as it is.
    if !authority.is_spelled(host_header) {
        let normal_host = HeaderValue::try_from(authority.to_string()).expect("a normal authority is a header value");
        headers.insert(header::HOST, normal_host);
    }
    let subprotocols = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    Ok(ClientUpgrade { key, path: target.path, query: target.query, host: authority.host, subprotocols, headers })
}

/// Headers that describe one hop and are never forwarded; the gateway writes its own.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
];

/// The headers to send upstream: the client's end-to-end headers (Origin, cookies,
/// Authorization, subprotocol offer, ...; Host in its normal form) plus this hop's
/// `X-Forwarded-For` / `Forwarded` / `X-Forwarded-Proto` (see [`forwarding`]). Forwarding
/// headers left in `upgrade.headers` are a trusted proxy's, and are extended. Only headers
/// whose (lower-case) name `keep` accepts are written: plugins' removals cost no second pass.
pub fn upstream_headers(upgrade: &ClientUpgrade, client_ip: std::net::IpAddr, proto: &str, keep: impl Fn(&str) -> bool) -> HeaderLines {
    let mut out = HeaderLines::with_capacity(512);
    for (name, value) in &upgrade.headers {
        let name = name.as_str();
        let Ok(value) = value.to_str() else { continue };
        if !HOP_BY_HOP.contains(&name) && !forwarding::is_rewritten(name) && keep(name) {
            out.push(name, value);
        }
    }
    let host = upgrade.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(&upgrade.host);
    forwarding::write_forwarding_headers(&mut out, &upgrade.headers, client_ip, host, proto, keep);
    out
}

/// The 101 answer to the client, on the wire.
pub fn switching_protocols(key: &str, subprotocol: Option<&str>, extensions: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    status_line(&mut out, StatusCode::SWITCHING_PROTOCOLS);
    out.extend_from_slice(b"upgrade: websocket\r\nconnection: Upgrade\r\n");
    out.extend_from_slice(b"sec-websocket-accept: ");
    out.extend_from_slice(&accept_key_bytes(key));
    out.extend_from_slice(b"\r\n");
    // Both values come from checked header values (the upstream's answer or a plugin's
    // choice that must match the client's offer); a stray CR/LF is still never written.
    let clean = |v: &&str| HeaderValue::try_from(*v).is_ok();
    if let Some(p) = subprotocol.filter(clean) {
        push_header(&mut out, "sec-websocket-protocol", p);
    }
    if let Some(e) = extensions.filter(clean) {
        push_header(&mut out, "sec-websocket-extensions", e);
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(&accept_key_bytes("dGhlIHNhbXBsZSBub25jZQ=="), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    fn request(extra: &[(&'static str, &'static str)], skip: &[&str]) -> Result<ClientUpgrade, Refusal> {
        let mut headers = HeaderMap::new();
        let base = [
            ("host", "example.com:8080"),
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        for (k, v) in base.iter().chain(extra) {
            if !skip.contains(k) {
                headers.insert(header::HeaderName::from_static(k), HeaderValue::from_static(v));
            }
        }
        validate(&Method::GET, Version::HTTP_11, "/chat?x=1", headers)
    }

    #[test]
    fn validates_requests() {
        let ok = request(&[("sec-websocket-protocol", "a, b")], &[]).unwrap();
        assert_eq!((ok.host.as_str(), ok.path.as_str(), ok.query.as_str()), ("example.com", "/chat", "x=1"));
        assert_eq!(ok.subprotocols, ["a", "b"]);
        assert_eq!(request(&[], &["upgrade"]).unwrap_err().status, 426);
        assert_eq!(request(&[], &["sec-websocket-key"]).unwrap_err().status, 400);
        assert_eq!(request(&[("sec-websocket-key", "c2hvcnQ=")], &[]).unwrap_err().status, 400);
        assert_eq!(request(&[("sec-websocket-version", "8")], &[]).unwrap_err().status, 426);
        assert_eq!(request(&[], &["connection"]).unwrap_err().status, 400);
    }

    #[test]
    fn refuses_doubled_headers_and_a_target_that_names_another_host() {
        for name in ["host", "sec-websocket-key", "sec-websocket-version"] {
            let mut extra = HeaderMap::new();
            extra.append(header::HeaderName::from_static(name), HeaderValue::from_static("x"));
            let refusal = request_with("/", extra).unwrap_err();
            assert_eq!(refusal.status, 400);
            assert_eq!(refusal.reason, format!("more than one {name} header"));
        }
        let absolute = |target: &str| request_with(target, HeaderMap::new());
        assert_eq!(absolute("http://Example.com/chat").unwrap().host, "example.com");
        assert_eq!(absolute("http://other.example/chat").unwrap_err().status, 400);
    }

    /// The base request, as `request` builds it, with `extra` appended and `target` as its
    /// request target.
    fn request_with(target: &str, extra: HeaderMap) -> Result<ClientUpgrade, Refusal> {
        let mut headers = request(&[], &[]).unwrap().headers;
        for (name, value) in &extra {
            headers.append(name, value.clone());
        }
        validate(&Method::GET, Version::HTTP_11, target, headers)
    }

    fn parse(bytes: &[u8]) -> Result<Option<RequestHead>, Refusal> {
        parse_head(bytes)
    }

    /// [`take_head`] on a copy of `bytes`.
    pub(super) fn parse_head(bytes: &[u8]) -> Result<Option<RequestHead>, Refusal> {
        take_head(&mut BytesMut::from(bytes))
    }

    #[test]
    fn parses_heads_and_keeps_what_follows() {
        let head = b"GET /chat?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nX-A: 1\r\nx-a: 2\r\n\r\n";
        assert!(parse(&head[..head.len() - 2]).unwrap().is_none(), "an unfinished head waits for more");
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(b"\x81\x80early");
        let parsed = parse(&bytes).unwrap().unwrap();
        assert_eq!((parsed.method, parsed.version), (Method::GET, Version::HTTP_11));
        assert_eq!(parsed.target, "/chat?x=1");
        assert_eq!(parsed.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(parsed.rest, b"\x81\x80early");
    }

    #[test]
    fn bad_heads_are_refused_with_a_status() {
        assert_eq!(parse(b"HELLO THERE\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(parse(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n").unwrap_err().status, 400);
        let body = b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse(body).unwrap_err().status, 400);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many).unwrap_err().status, 431);
    }

    #[test]
    fn answers_are_well_formed() {
        let ok = String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", Some("chat"), Some("bad\r\nx: y"))).unwrap();
        assert!(ok.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{ok}");
        assert!(ok.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{ok}");
        assert!(ok.contains("sec-websocket-protocol: chat\r\n") && !ok.contains("x: y"), "{ok}");
        assert!(ok.ends_with("\r\n\r\n"));
        let refusal = Refusal::new(StatusCode::UNAUTHORIZED, "no token")
            .with_header("www-authenticate", "Bearer")
            .with_header("content-length", "99");
        let text = String::from_utf8(refusal.encode()).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
        assert!(text.contains("www-authenticate: Bearer\r\n") && text.contains("content-length: 9\r\n"), "{text}");
        assert!(!text.contains("99") && text.ends_with("\r\n\r\nno token\n"), "{text}");
    }

    #[test]
    fn routes_see_the_normal_target_and_host() {
        let mut headers = request(&[], &[]).unwrap().headers;
        headers.insert(header::HOST, HeaderValue::from_static("CHAT.Example.com.:8080"));
        let ok = validate(&Method::GET, Version::HTTP_11, "//a/./b/../%61dmin?x=%2e", headers.clone()).unwrap();
        assert_eq!((ok.host.as_str(), ok.path.as_str(), ok.query.as_str()), ("chat.example.com", "/a/admin", "x=%2e"));
        assert_eq!(ok.headers.get(header::HOST).unwrap(), "chat.example.com:8080", "upstream and plugins see it too");
        let refused = |target: &str, headers: HeaderMap| validate(&Method::GET, Version::HTTP_11, target, headers).unwrap_err();
        for target in ["/../admin", "/admin%2f", "/admin;x", "*", "example.com:443", "http://u@chat.example.com/"] {
            let refusal = refused(target, headers.clone());
            assert_eq!(refusal.status, 400, "{target}");
            assert!(refusal.reason.starts_with("request target: "), "{target}: {}", refusal.reason);
        }
        headers.insert(header::HOST, HeaderValue::from_static("chat.example.com.."));
        assert!(refused("/", headers.clone()).reason.starts_with("Host: "));
        headers.remove(header::HOST);
        assert_eq!(refused("/", headers).reason, "Host header missing");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const GOOD: &[u8] = b"GET /chat?x=1 HTTP/1.1\r\nHost: example.com:8080\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

        /// Bytes that matter to an HTTP head: separators, header names, dot segments.
        const INTERESTING: &[&[u8]] = &[
            b"\r\n", b"\n", b"\r", b":", b" ", b"\t", b"\0", b"/", b"%", b"..", b"%2e", b"//", b";", b"?", b"#",
            b"Host: a\r\n", b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n", b"Sec-WebSocket-Version: 8\r\n",
            b"Content-Length: 1\r\n", b"Transfer-Encoding: chunked\r\n", b"\xff", b"http://", b"[::1]",
        ];

        /// An edit of a valid head: overwrite, insert an interesting piece, or delete a range.
        #[derive(Debug, Clone)]
        enum Edit {
            Set(usize, u8),
            Insert(usize, usize),
            Delete(usize, usize),
        }

        fn edits() -> impl Strategy<Value = Vec<Edit>> {
            let edit = prop_oneof![
                (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Set(at, b)),
                (any::<usize>(), 0..INTERESTING.len()).prop_map(|(at, i)| Edit::Insert(at, i)),
                (any::<usize>(), 1..8usize).prop_map(|(at, n)| Edit::Delete(at, n)),
            ];
            prop::collection::vec(edit, 1..6)
        }

        fn mutate(edits: &[Edit]) -> Vec<u8> {
            let mut head = GOOD.to_vec();
            for edit in edits {
                let len = head.len().max(1);
                match *edit {
                    Edit::Set(at, b) => {
                        if !head.is_empty() {
                            head[at % len] = b;
                        }
                    }
                    Edit::Insert(at, i) => {
                        let at = at % (head.len() + 1);
                        head.splice(at..at, INTERESTING[i].iter().copied());
                    }
                    Edit::Delete(at, n) => {
                        let at = at % len;
                        let end = (at + n).min(head.len());
                        head.drain(at.min(end)..end);
                    }
                }
            }
            head
        }

        /// What anything `validate` accepts must satisfy (RFC 6455 §4.2.1, and the
        /// normal forms routing relies on).
        fn check_accepted(buf: &[u8]) -> Result<(), TestCaseError> {
            let Ok(Some(head)) = parse_head(buf) else { return Ok(()) };
            let Ok(upgrade) = validate(&head.method, head.version, &head.target, head.headers) else { return Ok(()) };
            let raw_key = base64::engine::general_purpose::STANDARD.decode(&upgrade.key);
            prop_assert_eq!(raw_key.map(|k| k.len()).ok(), Some(16));
            for name in [header::HOST, header::SEC_WEBSOCKET_KEY, header::SEC_WEBSOCKET_VERSION] {
                prop_assert_eq!(upgrade.headers.get_all(&name).iter().count(), 1, "{}", name);
            }
            prop_assert_eq!(upgrade.headers.get(header::SEC_WEBSOCKET_VERSION).unwrap().as_bytes().trim_ascii(), b"13");
            let host = upgrade.headers.get(header::HOST).unwrap().to_str().unwrap();
            let authority = normalize::authority(host).unwrap();
            prop_assert_eq!(&authority.host, &upgrade.host);
            prop_assert_eq!(authority.to_string(), host);
            prop_assert_eq!(normalize::path(&upgrade.path), Ok(upgrade.path.clone()));
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]

            #[test]
            fn random_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..300)) {
                check_accepted(&buf)?;
            }

            #[test]
            fn mutated_heads_never_panic_and_what_passes_is_valid(edits in edits()) {
                check_accepted(&mutate(&edits))?;
            }
        }

        #[test]
        fn the_unmutated_head_is_accepted() {
            let head = parse_head(GOOD).unwrap().unwrap();
            assert!(validate(&head.method, head.version, &head.target, head.headers).is_ok());
        }
    }

    /// `proxy::answer` awaits a refusal, so the refusal's future sizes every handshake's
    /// future: its drain buffer must not be in it.
    #[test]
    fn a_refusal_keeps_its_drain_buffer_off_its_future() {
        let (mut stream, _peer) = tokio::io::duplex(64);
        let refusing = refuse(&mut stream, Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "busy"));
        let size = std::mem::size_of_val(&refusing);
        assert!(size <= 512, "refuse's future is {size} bytes");
    }
}
