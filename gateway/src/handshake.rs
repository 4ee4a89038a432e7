//! The client's upgrade request: RFC 6455 §4.2.1 validation, the 101 answer, and the
//! headers that go on to the upstream.
//!
//! Every refusal is an HTTP response with a status and a body that says what was wrong, so
//! a client (or the person debugging it) never faces a silently dropped socket.

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use http_body_util::Full;
use sha1::{Digest, Sha1};

/// The RFC 6455 accept value for a client key.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A validated upgrade request, with what the rest of the connection's life needs from it.
#[derive(Debug, Clone)]
pub struct ClientUpgrade {
    pub key: String,
    pub path: String,
    pub query: String,
    /// Host without port, lower-cased; "" when absent.
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

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut body = self.reason;
        body.push('\n');
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        for (name, value) in self.headers {
            if let (Ok(name), Ok(value)) =
                (header::HeaderName::try_from(name), HeaderValue::try_from(value))
            {
                headers.append(name, value);
            }
        }
        response
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

/// Checks an upgrade request against RFC 6455 §4.2.1.
pub fn validate(method: &Method, version: Version, uri: &http::Uri, headers: &HeaderMap) -> Result<ClientUpgrade, Refusal> {
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
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "Upgrade header must name websocket"));
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "Connection header must include upgrade"));
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
            base64::engine::general_purpose::STANDARD.decode(k).is_ok_and(|raw| raw.len() == 16)
        })
        .ok_or_else(|| {
            Refusal::new(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key must be 16 bytes in base64")
        })?
        .to_string();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or(uri.host())
        .ok_or_else(|| Refusal::new(StatusCode::BAD_REQUEST, "Host header missing"))?;
    let host = strip_port(host).to_ascii_lowercase();
    let subprotocols = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    Ok(ClientUpgrade {
        key,
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        host,
        subprotocols,
        headers: headers.clone(),
    })
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [::1]:8080
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
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
/// Authorization, subprotocol offer, ...) plus the X-Forwarded-* / Forwarded family.
pub fn upstream_headers(upgrade: &ClientUpgrade, client_ip: std::net::IpAddr) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(upgrade.headers.len() + 4);
    let mut forwarded_for = None;
    let mut forwarded = None;
    for (name, value) in &upgrade.headers {
        let name = name.as_str();
        let Ok(value) = value.to_str() else { continue };
        match name {
            "x-forwarded-for" => forwarded_for = Some(value.to_string()),
            "forwarded" => forwarded = Some(value.to_string()),
            n if HOP_BY_HOP.contains(&n) => {}
            _ => out.push((name.to_string(), value.to_string())),
        }
    }
    let ip = client_ip.to_string();
    out.push((
        "x-forwarded-for".into(),
        forwarded_for.map_or_else(|| ip.clone(), |prev| format!("{prev}, {ip}")),
    ));
    let node = if client_ip.is_ipv6() { format!("\"[{ip}]\"") } else { ip };
    let mut element = format!("for={node};proto=http");
    if let Some(host) = upgrade.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        element.push_str(&format!(";host=\"{host}\""));
    }
    out.push(("forwarded".into(), forwarded.map_or_else(|| element.clone(), |prev| format!("{prev}, {element}"))));
    out.push(("x-forwarded-proto".into(), "http".into()));
    out
}

/// The 101 answer to the client.
pub fn switching_protocols(key: &str, subprotocol: Option<&str>, extensions: Option<&str>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::try_from(accept_key(key)).expect("base64 is a valid header value"),
    );
    if let Some(p) = subprotocol.and_then(|p| HeaderValue::try_from(p).ok()) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    if let Some(e) = extensions.and_then(|e| HeaderValue::try_from(e).ok()) {
        headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, e);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
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
        validate(&Method::GET, Version::HTTP_11, &"/chat?x=1".parse().unwrap(), &headers)
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
}
