//! Checks on what a handshake plugin asks the gateway to send: the headers it adds toward
//! the upstream or sets on a refusal, the headers it removes, the rewritten path, the
//! subprotocol, the pool name. Everything is checked before a byte is sent, and a violation
//! fails the plugin's call (`PluginError::InvalidResult`), so its `on_error` decides.
//!
//! The grammar is RFC 9110's (§5.1 field names are tokens, §5.5 field values are visible
//! characters with inner spaces and tabs; the obsolete `obs-text` is refused) and RFC 9112
//! §3.2.1's origin form for the path. On top of the grammar:
//! - headers that describe the hop, frame the message or belong to the WebSocket handshake
//!   are the gateway's alone ([`RESERVED`]): a plugin setting `content-length`, a second
//!   `sec-websocket-key` or `connection` would make a request the upstream reads another way
//!   than the gateway does, or one it resets;
//! - sizes and counts are capped per answer, so the upstream request stays within what
//!   servers accept (8 KiB header lines are common) and a plugin cannot make the gateway
//!   build megabyte requests.

use super::types::{Accept, Header, Reject, Verdict};

/// Headers one answer may add (or set on a refusal), and remove.
pub const MAX_HEADERS: usize = 32;
/// Bytes of one header value.
pub const MAX_VALUE_BYTES: usize = 4096;
/// Bytes of the names and values one answer adds, all together.
pub const MAX_HEADER_BYTES: usize = 8192;
/// Bytes of a rewritten path (before the query, which is the client's).
pub const MAX_PATH_BYTES: usize = 4096;
/// Bytes of a refusal's reason (the response body).
pub const MAX_REASON_BYTES: usize = 4096;
/// Bytes of a subprotocol or a pool name.
pub const MAX_NAME_BYTES: usize = 256;

/// Headers only the gateway writes: hop-by-hop (RFC 9110 §7.6.1), framing (§8.6, RFC 9112
/// §6.1), the target (`host`), `expect`, and the WebSocket handshake's own (RFC 6455
/// §11.3), except the subprotocol offer, which a plugin may change. Plus every `proxy-*`.
pub const RESERVED: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "expect",
    "http2-settings",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-accept",
    "sec-websocket-extensions",
];

/// On a refusal the gateway also writes the body's type.
const RESERVED_ON_REFUSAL: &[&str] = &["content-type"];

/// Checks a handshake answer; the error says what is wrong, for the plugin's author.
pub fn verdict(v: &Verdict) -> Result<(), String> {
    match v {
        Verdict::Accept(a) => accept(a),
        Verdict::Reject(r) => reject(r),
    }
}

fn accept(a: &Accept) -> Result<(), String> {
    added_headers(&a.add_headers, &[]).map_err(|e| format!("add-headers: {e}"))?;
    if a.remove_headers.len() > MAX_HEADERS {
        return Err(format!("remove-headers: {} names, more than {MAX_HEADERS}", a.remove_headers.len()));
    }
    for name in &a.remove_headers {
        field_name(name, &[]).map_err(|e| format!("remove-headers: {e}"))?;
    }
    if let Some(path) = &a.rewrite_path {
        origin_path(path).map_err(|e| format!("rewrite-path: {e}"))?;
    }
    if let Some(p) = &a.subprotocol {
        if p.len() > MAX_NAME_BYTES || !is_token(p) {
            return Err(format!("subprotocol {:?} is not a token of at most {MAX_NAME_BYTES} bytes", cut(p)));
        }
    }
    if let Some(pool) = &a.upstream {
        if pool.len() > MAX_NAME_BYTES {
            return Err(format!("upstream: a pool name of {} bytes", pool.len()));
        }
    }
    match a.compression {
        Some(c) if !(8..=15).contains(&c.max_window_bits) => {
            Err(format!("compression max-window-bits {} is not in 8..=15", c.max_window_bits))
        }
        _ => Ok(()),
    }
}

fn reject(r: &Reject) -> Result<(), String> {
    if !(400..=599).contains(&r.status) {
        return Err(format!("reject status {} is not in 400..=599", r.status));
    }
    if r.reason.len() > MAX_REASON_BYTES {
        return Err(format!("reject reason of {} bytes, more than {MAX_REASON_BYTES}", r.reason.len()));
    }
    added_headers(&r.headers, RESERVED_ON_REFUSAL).map_err(|e| format!("reject headers: {e}"))
}

/// Headers to send: valid, not reserved, within the caps.
fn added_headers(headers: &[Header], also_reserved: &[&str]) -> Result<(), String> {
    if headers.len() > MAX_HEADERS {
        return Err(format!("{} headers, more than {MAX_HEADERS}", headers.len()));
    }
    let mut total = 0;
    for h in headers {
        field_name(&h.name, also_reserved)?;
        field_value(&h.name, &h.value)?;
        total += h.name.len() + h.value.len();
    }
    if total > MAX_HEADER_BYTES {
        return Err(format!("{total} bytes of headers, more than {MAX_HEADER_BYTES}"));
    }
    Ok(())
}

fn field_name(name: &str, also_reserved: &[&str]) -> Result<(), String> {
    if name.len() > MAX_NAME_BYTES || !is_token(name) {
        return Err(format!("{:?} is not a header name (an RFC 9110 token)", cut(name)));
    }
    let reserved = RESERVED.iter().chain(also_reserved).any(|r| r.eq_ignore_ascii_case(name))
        || name.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("proxy-"));
    if reserved {
        return Err(format!("{name} is the gateway's to write"));
    }
    Ok(())
}

/// RFC 9110 §5.5: `field-vchar [ 1*( SP / HTAB / field-vchar ) field-vchar ]`, visible ASCII.
fn field_value(name: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!("{name}: a value of {} bytes, more than {MAX_VALUE_BYTES}", value.len()));
    }
    if let Some(b) = value.bytes().find(|&b| !(b.is_ascii_graphic() || b == b' ' || b == b'\t')) {
        return Err(format!("{name}: the value holds byte {b:#04x}; only visible ASCII, spaces and tabs"));
    }
    if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
        return Err(format!("{name}: the value starts or ends with whitespace"));
    }
    Ok(())
}

/// RFC 9112 §3.2.1 origin form without the query (the client's is kept): `/` then segments
/// of `pchar`s (RFC 3986 §3.3). Stricter than the grammar: no `//` start (read as an
/// authority by some parsers), and no `.` or `..` segment, encoded or not (an upstream
/// that resolves them would serve another path than the one the plugin named).
fn origin_path(path: &str) -> Result<(), String> {
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("{} bytes, more than {MAX_PATH_BYTES}", path.len()));
    }
    if !path.starts_with('/') || path.starts_with("//") {
        return Err(format!("{:?} does not start with a single '/'", cut(path)));
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                if hex.is_none() {
                    return Err(format!("{:?}: '%' is not followed by two hex digits", cut(path)));
                }
                i += 3;
                continue;
            }
            b if b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b) => {}
            b => return Err(format!("{:?}: byte {b:#04x} is not allowed in a path", cut(path))),
        }
        i += 1;
    }
    let dot = |s: &str| s.eq_ignore_ascii_case(".") || s.eq_ignore_ascii_case("%2e");
    if path.split('/').any(|seg| {
        dot(seg) || seg == ".." || ["%2e%2e", "%2e.", ".%2e"].iter().any(|d| seg.eq_ignore_ascii_case(d))
    }) {
        return Err(format!("{:?} has a '.' or '..' segment", cut(path)));
    }
    Ok(())
}

/// An RFC 9110 token.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The start of a long string, for error messages.
fn cut(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::types::{Compression, CompressionMode};

    fn header(name: &str, value: &str) -> Header {
        Header { name: name.into(), value: value.into() }
    }

    fn adding(headers: Vec<Header>) -> Result<(), String> {
        verdict(&Verdict::Accept(Accept { add_headers: headers, ..Accept::default() }))
    }

    fn rewriting(path: &str) -> Result<(), String> {
        verdict(&Verdict::Accept(Accept { rewrite_path: Some(path.into()), ..Accept::default() }))
    }

    #[test]
    fn ordinary_answers_pass() {
        assert!(verdict(&Verdict::Accept(Accept::default())).is_ok());
        let a = Accept {
            add_headers: vec![header("x-user", "alice"), header("Authorization", "Bearer a.b-c_d~e+f/g=")],
            remove_headers: vec!["cookie".into()],
            rewrite_path: Some("/v2/rooms/a%20b;x=1/@me:1".into()),
            subprotocol: Some("chat.v2".into()),
            upstream: Some("blue".into()),
            compression: Some(Compression { mode: CompressionMode::Terminate, max_window_bits: 10, no_context_takeover: true }),
        };
        assert_eq!(verdict(&Verdict::Accept(a)), Ok(()));
        let r = Reject { status: 401, reason: "no token".into(), headers: vec![header("www-authenticate", "Bearer realm=\"x\"")] };
        assert_eq!(verdict(&Verdict::Reject(r)), Ok(()));
    }

    #[test]
    fn reserved_headers_are_refused_whatever_their_case() {
        for name in [
            "Content-Length", "transfer-encoding", "CONNECTION", "upgrade", "keep-alive", "te", "trailer", "host",
            "sec-websocket-key", "Sec-WebSocket-Version", "sec-websocket-accept", "sec-websocket-extensions",
            "proxy-authorization", "Proxy-Connection", "proxy-anything", "expect",
        ] {
            let err = adding(vec![header(name, "1")]).unwrap_err();
            assert!(err.contains("the gateway's to write"), "{name}: {err}");
            let removing = Accept { remove_headers: vec![name.into()], ..Accept::default() };
            assert!(verdict(&Verdict::Accept(removing)).is_err(), "removing {name}");
            let on_refusal = Reject { status: 403, reason: String::new(), headers: vec![header(name, "1")] };
            assert!(verdict(&Verdict::Reject(on_refusal)).is_err(), "refusal with {name}");
        }
        // The subprotocol offer is the plugin's to change; the body's type is not on a refusal.
        assert!(adding(vec![header("sec-websocket-protocol", "chat")]).is_ok());
        assert!(adding(vec![header("content-type", "x")]).is_ok());
        let typed = Reject { status: 403, reason: String::new(), headers: vec![header("content-type", "text/html")] };
        assert!(verdict(&Verdict::Reject(typed)).is_err());
    }

    #[test]
    fn names_and_values_follow_rfc_9110() {
        for bad in ["", "x y", "x:y", "x\r\nevil: 1", "é", "a\0", "(x)"] {
            assert!(adding(vec![header(bad, "v")]).is_err(), "name {bad:?}");
        }
        for bad in ["a\r\nx-evil: 1", "a\nb", "a\rb", "\0", "é", "a\x7f", " lead", "trail\t", "\x1b[2J"] {
            assert!(adding(vec![header("x-v", bad)]).is_err(), "value {bad:?}");
        }
        assert!(adding(vec![header("x-v", "")]).is_ok(), "an empty value is valid");
        assert!(adding(vec![header("x-v", "a \tb")]).is_ok(), "inner whitespace is valid");
    }

    #[test]
    fn sizes_and_counts_are_capped() {
        assert!(adding(vec![header("x-big", &"v".repeat(MAX_VALUE_BYTES))]).is_ok());
        assert!(adding(vec![header("x-big", &"v".repeat(MAX_VALUE_BYTES + 1))]).is_err());
        assert!(adding(vec![header("x-big", &"v".repeat(1 << 20))]).is_err(), "1 MiB value");
        let many = |n: usize| (0..n).map(|i| header(&format!("x-{i}"), "1")).collect::<Vec<_>>();
        assert!(adding(many(MAX_HEADERS)).is_ok());
        assert!(adding(many(MAX_HEADERS + 1)).is_err());
        assert!(adding(many(10_000)).is_err(), "10,000 headers");
        let wide = (0..3).map(|i| header(&format!("x-{i}"), &"v".repeat(3000))).collect();
        assert!(adding(wide).unwrap_err().contains("bytes of headers"));
        let reason = Reject { status: 429, reason: "r".repeat(MAX_REASON_BYTES + 1), headers: vec![] };
        assert!(verdict(&Verdict::Reject(reason)).is_err());
        let long_pool = Accept { upstream: Some("p".repeat(1 << 20)), ..Accept::default() };
        assert!(verdict(&Verdict::Accept(long_pool)).is_err());
    }

    #[test]
    fn rewritten_paths_are_origin_form() {
        for good in ["/", "/a/b", "/a/", "/%41%2f", "/a.b/..c/c..", "/~user/!$&'()*+,;=:@-._"] {
            assert_eq!(rewriting(good), Ok(()), "{good}");
        }
        for bad in [
            "", "a/b", "//evil.example/x", "/a#frag", "/a?b", "/a b", "/a\tb", "/é", "/a\r\nHost: x", "/%zz", "/%4",
            "/a/../admin", "/./a", "/a/.", "/%2e%2E/admin", "/.%2e/x", "/%2e/x", "/a\\b", "/\"", "/<x>", "/a\0",
        ] {
            assert!(rewriting(bad).is_err(), "{bad:?}");
        }
        assert!(rewriting(&format!("/{}", "a".repeat(MAX_PATH_BYTES))).is_err(), "over the cap");
        assert!(rewriting(&format!("/{}", "a".repeat(1 << 20))).is_err(), "1 MiB path");
    }

    #[test]
    fn statuses_subprotocols_and_compression() {
        let status = |s| verdict(&Verdict::Reject(Reject { status: s, reason: String::new(), headers: vec![] }));
        assert!(status(403).is_ok() && status(599).is_ok());
        assert!(status(200).is_err() && status(399).is_err() && status(600).is_err());
        let sub = |p: &str| verdict(&Verdict::Accept(Accept { subprotocol: Some(p.into()), ..Accept::default() }));
        assert!(sub("a b").is_err() && sub("").is_err() && sub(&"x".repeat(300)).is_err());
        let bits = |b| {
            let c = Compression { mode: CompressionMode::Terminate, max_window_bits: b, no_context_takeover: false };
            verdict(&Verdict::Accept(Accept { compression: Some(c), ..Accept::default() }))
        };
        assert!(bits(8).is_ok() && bits(15).is_ok() && bits(7).is_err() && bits(16).is_err());
    }
}
