//! The request target and `Host` in their normal form (RFC 3986 §6.2.2, §5.2.4), so the
//! route, the plugins and the upstream all see the same path and host.
//!
//! A gateway that routes on one spelling of a path while the upstream reads another lets a
//! request past the plugins of the route it really asks for: `//admin`, `/./admin` or
//! `/%61dmin` would take the `/` route and still be `/admin` upstream. So the gateway
//! routes on the normal form, hands that same form to the plugins and the upstream, and
//! refuses (400) what has no safe normal form. The policy, decided once here:
//!
//! - **Percent-encoding.** Escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded; other escapes are kept, with upper-case hex. An escape that would change the
//!   path's structure or smuggle a byte upstreams treat specially is refused: `%2F` (`/`),
//!   `%5C` (`\`), `%00` and every other control byte. A `%` not followed by two hex digits
//!   is refused.
//! - **Dot segments** (`.`, `..`, and their encoded spellings such as `%2e%2E`, since they
//!   are decoded first) are removed as RFC 3986 §5.2.4 says; a `..` that would climb above
//!   the root is refused rather than silently dropped, as only an attack sends one.
//! - **Doubled slashes are collapsed** (`//a///b` → `/a/b`), as nginx's default
//!   `merge_slashes` does. Refusing them would break sloppy but honest clients that join
//!   paths with a slash too many; collapsing is safe because the upstream gets the
//!   collapsed path, never the one with empty segments.
//! - **`;` is refused in the path.** Servlet containers and others strip `;params` from a
//!   segment before routing (`/admin;x` is `/admin` to them), which the prefix match here
//!   cannot model. An encoded `%3B` is data to everyone and is kept.
//! - **Characters outside RFC 3986's path grammar** (`\`, `"`, `<`, `{`, space, non-ASCII,
//!   ...) and a fragment (`#`) are refused.
//! - **Paths are case-sensitive** (RFC 3986 §6.2.2.1): `/ADMIN` is not `/admin` and is
//!   routed, and sent upstream, as `/ADMIN`. An upstream that folds case (or strips
//!   trailing dots or spaces from segments, as Windows servers do) must be routed with
//!   that in mind: put its auth plugins on `/`.
//! - **The query** is not part of routing; it is passed on as sent (printable ASCII, no
//!   `#`).
//! - **Request-target forms** (RFC 9112 §3.2): origin-form (`/path?query`), and
//!   absolute-form (`http://host/path`, scheme `http`, `https`, `ws` or `wss`, no
//!   userinfo) whose host must be the `Host` header's. Authority-form (`host:443`, for
//!   CONNECT) and asterisk-form (`*`, for OPTIONS) are not WebSocket upgrades: refused.
//! - **Host**: lower-cased, one trailing dot removed (`chat.example.com.` is the same name),
//!   the port kept apart; letters, digits, `-`, `_` and `.` only (no escapes, no empty
//!   label). A name that ends in a number must be a plain dotted-quad IPv4 address: `127.1`,
//!   `0x7f.0.0.1` or `010.0.0.1` mean 127.0.0.1 or 8.0.0.1 to some resolvers and not to
//!   others, so they are refused. IPv6 literals (`[::1]`) are written in RFC 5952's
//!   canonical form; zone identifiers and IPvFuture are refused.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Why a request target or `Host` has no normal form; the text goes into the 400's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unnormalizable(pub String);

impl fmt::Display for Unnormalizable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse<T>(why: impl Into<String>) -> Result<T, Unnormalizable> {
    Err(Unnormalizable(why.into()))
}

/// A request target in normal form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The authority an absolute-form target names, normalised; `None` for origin-form.
    pub authority: Option<Authority>,
    /// The normal path: starts with `/`, no dot segments, no empty segments.
    pub path: String,
    /// The query as sent, without its `?`; "" when there is none.
    pub query: String,
}

/// A host and optional port in normal form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// Lower-case name without trailing dot, dotted-quad IPv4, or canonical IPv6 without
    /// brackets: what routes match on.
    pub host: String,
    pub port: Option<u16>,
}

impl fmt::Display for Authority {
    /// The `Host` header value: IPv6 in brackets, the port when there is one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

impl Authority {
    /// Whether `text` is this authority as [`Display`](fmt::Display) writes it: the usual
    /// case of a client that sent the normal form, found without formatting anything.
    pub fn is_spelled(&self, text: &str) -> bool {
        let rest = match self.host.contains(':') {
            true => text.strip_prefix('[').and_then(|t| t.strip_prefix(self.host.as_str())).and_then(|t| t.strip_prefix(']')),
            false => text.strip_prefix(self.host.as_str()),
        };
        match (rest, self.port) {
            (Some(""), None) => true,
            (Some(rest), Some(port)) => rest.strip_prefix(':').is_some_and(|digits| {
                // The port's one spelling: digits, no leading zero (but "0" itself).
                let canonical = !digits.is_empty() && (digits == "0" || !digits.starts_with('0'));
                canonical && digits.bytes().all(|b| b.is_ascii_digit()) && digits.parse::<u16>() == Ok(port)
            }),
            _ => false,
        }
    }
}

/// Normalises a request target as it came on the request line.
pub fn target(raw: &str) -> Result<Target, Unnormalizable> {
    if raw.contains('#') {
        return refuse("the request target carries a fragment (#)");
    }
    let (authority, path_and_query) = if raw.starts_with('/') {
        (None, raw)
    } else if raw == "*" {
        return refuse("asterisk-form (*) is not a WebSocket upgrade target");
    } else if let Some((scheme, rest)) = raw.split_once("://") {
        if !["http", "https", "ws", "wss"].iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
            return refuse(format!("the request target's scheme {scheme:?} is not http(s) or ws(s)"));
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path_and_query) = rest.split_at(end);
        if authority.contains('@') {
            return refuse("the request target carries userinfo (@)");
        }
        (Some(self::authority(authority)?), path_and_query)
    } else {
        return refuse("the request target must be a path (/...) or an absolute http(s) or ws(s) URL");
    };
    let (raw_path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    if let Some(bad) = query.bytes().find(|b| !(0x21..=0x7E).contains(b)) {
        return refuse(format!("byte {bad:#04x} is not allowed in the query"));
    }
    // An absolute-form target may have an empty path: it means "/" (RFC 3986 §6.2.3).
    let path = if raw_path.is_empty() { "/".to_string() } else { path(raw_path)? };
    Ok(Target { authority, path, query: query.to_string() })
}

/// Normalises an absolute path (it must start with `/`); see the module comment for the
/// policy.
pub fn path(raw: &str) -> Result<String, Unnormalizable> {
    if !raw.starts_with('/') {
        return refuse("the path must start with /");
    }
    let bytes = raw.as_bytes();
    // Each segment is built with its escapes normalised, then dot segments resolved.
    let mut segments: Vec<String> = Vec::new();
    let mut current = String::new();
    // Whether the path names a "directory": ends in `/`, `/.` or `/..`.
    let mut trailing_slash;
    let mut i = 1;
    loop {
        let at_end = i == bytes.len();
        if at_end || bytes[i] == b'/' {
            trailing_slash = match current.as_str() {
                "" | "." => true,
                ".." => {
                    if segments.pop().is_none() {
                        return refuse("the path climbs above the root (..)");
                    }
                    true
                }
                _ => {
                    segments.push(std::mem::take(&mut current));
                    false
                }
            };
            current.clear();
            if at_end {
                break;
            }
            i += 1;
            continue;
        }
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let Some(value) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                    return refuse("the path has a % that is not followed by two hex digits");
                };
                if is_unreserved(value) {
                    current.push(value as char);
                } else if value == b'/' || value == b'\\' {
                    return refuse(format!("an encoded {:?} (%{value:02X}) in the path", value as char));
                } else if value < 0x20 || value == 0x7F {
                    return refuse(format!("an encoded control byte (%{value:02X}) in the path"));
                } else {
                    current.push_str(&format!("%{value:02X}"));
                }
                i += 3;
            }
            b';' => return refuse("';' (path parameters) is not allowed in the path"),
            b if is_unreserved(b) || is_path_delimiter(b) => {
                current.push(b as char);
                i += 1;
            }
            b => {
                return match b {
                    0x21..=0x7E => refuse(format!("{:?} is not allowed in a path", b as char)),
                    _ => refuse(format!("byte {b:#04x} is not allowed in a path")),
                }
            }
        }
    }
    let mut normal = String::with_capacity(raw.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        normal.push('/');
    }
    Ok(normal)
}

/// Normalises an authority: the `Host` header's value, or an absolute-form target's.
pub fn authority(raw: &str) -> Result<Authority, Unnormalizable> {
    let (host, port) = if let Some(inside) = raw.strip_prefix('[') {
        let Some((literal, after)) = inside.split_once(']') else {
            return refuse("an IPv6 host without its closing ]");
        };
        let Ok(addr) = literal.parse::<Ipv6Addr>() else {
            return refuse(format!("[{literal}] is not an IPv6 address (zone ids and IPvFuture are not accepted)"));
        };
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| Unnormalizable(format!("text after [{literal}]")))?),
        };
        (addr.to_string(), port)
    } else {
        let (name, port) = match raw.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (raw, None),
        };
        (host_name(name)?, port)
    };
    let port = match port {
        // An empty port is the same as none (RFC 3986 §6.2.3).
        None | Some("") => None,
        Some(p) if p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
            Ok(port) => Some(port),
            Err(_) => return refuse(format!("port {p} is out of range")),
        },
        Some(p) => return refuse(format!("port {p:?} is not a number")),
    };
    Ok(Authority { host, port })
}

/// Normalises a host without port: a registered name or IPv4 address, or an IPv6 address
/// with or without brackets (as a route's `host` may be written).
pub fn host(raw: &str) -> Result<String, Unnormalizable> {
    let inside = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(raw);
    match inside.parse::<Ipv6Addr>() {
        Ok(addr) => Ok(addr.to_string()),
        Err(_) => host_name(raw),
    }
}

/// A registered name or dotted-quad IPv4 address, lower-cased, trailing dot removed.
fn host_name(raw: &str) -> Result<String, Unnormalizable> {
    let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    if name.is_empty() {
        return refuse("the host is empty");
    }
    if name.len() > 253 {
        return refuse("the host name is longer than 253 characters");
    }
    if let Some(bad) = name.bytes().find(|&b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')) {
        return match bad {
            0x21..=0x7E => refuse(format!("{:?} is not allowed in a host name", bad as char)),
            _ => refuse(format!("byte {bad:#04x} is not allowed in a host name")),
        };
    }
    if name.split('.').any(str::is_empty) {
        return refuse(format!("the host {raw:?} has an empty label"));
    }
    // WHATWG's "ends in a number": resolvers read such names as IPv4 in several notations.
    let last = name.rsplit('.').next().expect("split yields a piece");
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last.strip_prefix("0x").is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        // std's parser takes only the dotted-quad spelling (no leading zeros, octal or hex),
        // so what it accepts is already that address's one spelling.
        if name.parse::<Ipv4Addr>().is_err() {
            return refuse(format!("the host {raw:?} ends in a number but is not a dotted-quad IPv4 address"));
        }
    }
    Ok(name)
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The sub-delims, `:` and `@` that a path segment may hold raw (RFC 3986 §3.3); `;` is
/// dealt with before this.
fn is_path_delimiter(b: u8) -> bool {
    matches!(b, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@')
}

/// Whether `path` is already in normal form and uses only unreserved characters and `/`:
/// what a route's `path` must be, so that no spelling of a request can match it in the
/// upstream's eyes and miss it in the router's (an escape of a sub-delimiter, kept encoded
/// here, would be decoded by many upstreams).
pub fn is_plain_route_path(path: &str) -> bool {
    path.bytes().all(|b| b == b'/' || is_unreserved(b)) && self::path(path).is_ok_and(|p| p == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `value` displays as exactly `text`, found without writing it anywhere.
    fn displays_as(value: &impl std::fmt::Display, text: &str) -> bool {
        /// Checks each piece written against what is left of `text`.
        struct Compare<'a>(&'a str);
        impl std::fmt::Write for Compare<'_> {
            fn write_str(&mut self, piece: &str) -> std::fmt::Result {
                self.0 = self.0.strip_prefix(piece).ok_or(std::fmt::Error)?;
                Ok(())
            }
        }
        let mut rest = Compare(text);
        std::fmt::write(&mut rest, format_args!("{value}")).is_ok() && rest.0.is_empty()
    }

    #[test]
    fn displays_as_compares_the_whole_text() {
        assert!(displays_as(&"a.example:80", "a.example:80"));
        assert!(!displays_as(&"a.example:80", "a.example:8"));
        assert!(!displays_as(&"a.example:8", "a.example:80"));
        assert!(displays_as(&format_args!("{}:{}", "a", 1), "a:1"));
        assert!(!displays_as(&"A.example", "a.example"));
    }

    /// `is_spelled` is `displays_as` without the formatting: both must agree on every
    /// spelling of every authority.
    #[test]
    fn is_spelled_agrees_with_the_display() {
        let spellings = [
            "chat.example.com", "chat.example.com:80", "chat.example.com:080", "chat.example.com:0", "chat.example.com:00",
            "chat.example.com:", "Chat.example.com", "chat.example.com.", "chat.example.com.:80", "127.0.0.1",
            "127.0.0.1:8080", "127.0.0.1:08080", "127.0.0.1:+80", "[::1]", "[::1]:443", "[::1]:0443", "[0:0::1]",
            "[::1]:", "[::FFFF:1.2.3.4]", "[::ffff:1.2.3.4]:65535", "a:65535", "a:65536", "a:1:2",
        ];
        for raw in spellings {
            let Ok(parsed) = authority(raw) else { continue };
            for text in spellings.iter().copied().chain([raw, "", "[", ":"]) {
                assert_eq!(parsed.is_spelled(text), displays_as(&parsed, text), "{parsed} against {text:?}");
            }
            assert!(parsed.is_spelled(&parsed.to_string()), "{parsed}");
        }
    }


    fn ok(raw: &str) -> String {
        path(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    #[test]
    fn removes_dot_segments_and_doubled_slashes() {
        for (raw, normal) in [
            ("/", "/"),
            ("/admin", "/admin"),
            ("//admin", "/admin"),
            ("/./admin", "/admin"),
            ("/admin/.", "/admin/"),
            ("/admin/", "/admin/"),
            ("/admin//", "/admin/"),
            ("///a//b///", "/a/b/"),
            ("/admin/../admin", "/admin"),
            ("/a/b/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/./b/./", "/a/b/"),
            ("/.", "/"),
            ("/./", "/"),
            ("/a/..", "/"),
            ("/...", "/..."),
            ("/a..b/.c/", "/a..b/.c/"),
        ] {
            assert_eq!(ok(raw), normal, "{raw}");
        }
    }

    #[test]
    fn decodes_unreserved_escapes_and_uppercases_the_rest() {
        for (raw, normal) in [
            ("/%61dmin", "/admin"),
            ("/ADM%49N", "/ADMIN"),
            ("/%2e/admin", "/admin"),
            ("/x/%2E%2e", "/"),
            ("/a/%2e%2e/admin", "/admin"),
            ("/a/.%2E/x", "/x"),
            ("/%7e%5F%2D", "/~_-"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb%3b%25", "/a%3Fb%3B%25"),
            ("/%c3%a4", "/%C3%A4"),
            ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
        ] {
            assert_eq!(ok(raw), normal, "{raw}");
        }
    }

    #[test]
    fn refuses_what_has_no_safe_normal_form() {
        for raw in [
            "/..",
            "/../admin",
            "/%2e%2e/admin",
            "/a/../../admin",
            "/admin%2fx",
            "/%2Fadmin",
            "/admin%5c",
            "/admin\\x",
            "/admin%00",
            "/admin%0a",
            "/admin%7f",
            "/admin%",
            "/admin%2",
            "/admin%zz",
            "/admin%+1",
            "/admin;x=1",
            "/admin;/",
            "/a b",
            "/a\"b",
            "/a<b>",
            "/a{b}",
            "/a|b",
            "/a^b",
            "/a`b",
            "/a\u{e4}",
            "/a\tb",
            "admin",
            "",
        ] {
            assert!(path(raw).is_err(), "{raw:?} should be refused, got {:?}", path(raw));
        }
    }

    #[test]
    fn paths_are_case_sensitive() {
        assert_eq!(ok("/ADMIN"), "/ADMIN");
        assert_ne!(ok("/ADMIN"), ok("/admin"));
        assert_eq!(ok("/%41dmin"), "/Admin");
    }

    #[test]
    fn targets_of_every_form() {
        let t = target("/chat?room=1&x=/../").unwrap();
        assert_eq!((t.path.as_str(), t.query.as_str(), t.authority), ("/chat", "room=1&x=/../", None));
        let t = target("HTTP://Chat.Example.com.:8080/%61dmin?q").unwrap();
        assert_eq!(t.authority, Some(Authority { host: "chat.example.com".into(), port: Some(8080) }));
        assert_eq!((t.path.as_str(), t.query.as_str()), ("/admin", "q"));
        assert_eq!(target("ws://example.com").unwrap().path, "/");
        assert_eq!(target("wss://example.com?x").unwrap().query, "x");
        for bad in [
            "*",
            "example.com:443",
            "ftp://example.com/",
            "http://user@example.com/",
            "http://:pass@example.com/",
            "http://exa mple.com/",
            "http:///admin",
            "/admin#frag",
            "/a?b#c",
            "/a?b c",
            "/a?\u{e4}",
            "//admin;x",
            "?x",
        ] {
            assert!(target(bad).is_err(), "{bad:?} should be refused, got {:?}", target(bad));
        }
    }

    #[test]
    fn hosts_and_ports() {
        let a = |raw: &str| authority(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
        let host_port = |raw: &str| {
            let x = a(raw);
            (x.host, x.port)
        };
        assert_eq!(host_port("chat.example.com"), ("chat.example.com".into(), None));
        assert_eq!(host_port("CHAT.example.COM:8080"), ("chat.example.com".into(), Some(8080)));
        assert_eq!(host_port("chat.example.com.:80"), ("chat.example.com".into(), Some(80)));
        assert_eq!(host_port("chat.example.com:"), ("chat.example.com".into(), None));
        assert_eq!(host_port("localhost."), ("localhost".into(), None));
        assert_eq!(host_port("my_host-1"), ("my_host-1".into(), None));
        assert_eq!(host_port("127.0.0.1:9"), ("127.0.0.1".into(), Some(9)));
        assert_eq!(host_port("[::1]:8080"), ("::1".into(), Some(8080)));
        assert_eq!(host_port("[0:0:0:0:0:0:0:1]"), ("::1".into(), None));
        assert_eq!(host_port("[2001:DB8::A]"), ("2001:db8::a".into(), None));
        assert_eq!(a("[2001:DB8::A]:443").to_string(), "[2001:db8::a]:443");
        assert_eq!(a("Chat.Example.com.:80").to_string(), "chat.example.com:80");
        for bad in [
            "",
            ".",
            "chat.example.com..",
            "chat..example.com",
            ".chat.example.com",
            "chat.example.com:http",
            "chat.example.com:65536",
            "chat.example.com:8080:1",
            "chat.example.com:-1",
            "chat.example.com:+80",
            "ch%61t.example.com",
            "chat example.com",
            "chat.example.com/x",
            "chat\u{e4}.example.com",
            "user@chat.example.com",
            "127.1",
            "0x7f.0.0.1",
            "127.0.0.0x1",
            "2130706433",
            "010.0.0.1",
            "127.0.0.01",
            "256.0.0.1",
            "1.2.3.4.5",
            "[::1",
            "[::1]x",
            "[::1]:x",
            "[fe80::1%25eth0]",
            "[v1.fe]",
            "[127.0.0.1]",
            "::1",
        ] {
            assert!(authority(bad).is_err(), "{bad:?} should be refused, got {:?}", authority(bad));
        }
        // A name that merely starts with digits is a name.
        assert_eq!(host_port("1password.example"), ("1password.example".into(), None));
        assert_eq!(host_port("a.0xfg"), ("a.0xfg".into(), None));
    }

    #[test]
    fn route_hosts_and_paths() {
        assert_eq!(host("Chat.Example.com.").unwrap(), "chat.example.com");
        assert_eq!(host("[::1]").unwrap(), "::1");
        assert_eq!(host("0:0::1").unwrap(), "::1");
        assert!(host("chat.example.com:80").is_err());
        assert!(is_plain_route_path("/"));
        assert!(is_plain_route_path("/admin/v1.2/~x/"));
        for bad in ["/admin//x", "/./admin", "/%61dmin", "/a:b", "/a%20b", "admin", "/a/..", "/a;b"] {
            assert!(!is_plain_route_path(bad), "{bad}");
        }
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// Paths made of the pieces attacks are made of, and of any characters at all.
        fn paths() -> impl Strategy<Value = String> {
            let piece = prop::sample::select(vec![
                "/", "/", ".", "..", "%2e", "%2E", "%2f", "%5c", "%", "%0", "%zz", "a", "A", "admin", "%61", "%41",
                "%7e", "%7E", "~", ";", "\\", "%00", "%25", "%3b", ":", "@", "//", "\u{e4}", "%C3%A4", "?", "#", " ",
            ]);
            let pieces = prop::collection::vec(piece, 0..16).prop_map(|p| format!("/{}", p.concat()));
            let chars = prop::collection::vec(any::<char>(), 0..24).prop_map(|c| c.into_iter().collect::<String>());
            prop_oneof![pieces, chars.prop_map(|c| format!("/{c}")), prop::collection::vec(any::<char>(), 0..24).prop_map(|c| c.into_iter().collect())]
        }

        fn authorities() -> impl Strategy<Value = String> {
            let piece = prop::sample::select(vec![
                "chat", "Chat", "example", "com", ".", "..", ":", "80", "8080", "65536", "[", "]", "::1", "0x7f", "127",
                "1", "0", "-", "_", "%2e", "@", " ", "\u{e4}", "fe80::1%25eth0", "v1.x",
            ]);
            let pieces = prop::collection::vec(piece, 0..10).prop_map(|p| p.concat());
            let chars = prop::collection::vec(any::<char>(), 0..20).prop_map(|c| c.into_iter().collect::<String>());
            prop_oneof![pieces, chars]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]

            #[test]
            fn normal_paths_are_fixed_points(raw in paths()) {
                if let Ok(normal) = path(&raw) {
                    prop_assert_eq!(path(&normal), Ok(normal.clone()), "not idempotent for {:?}", raw);
                    prop_assert!(normal.starts_with('/'));
                    for bad in ["//", "/./", "/../", ";", "\\"] {
                        prop_assert!(!normal.contains(bad), "{:?} in {:?} from {:?}", bad, normal, raw);
                    }
                    prop_assert!(!normal.ends_with("/.") && !normal.ends_with("/.."), "{:?}", normal);
                    let bytes = normal.as_bytes();
                    for (i, _) in normal.match_indices('%') {
                        let hex = &normal[i + 1..i + 3];
                        prop_assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)), "{:?}", normal);
                        let value = u8::from_str_radix(hex, 16).unwrap();
                        prop_assert!(!is_unreserved(value) && value != b'/' && value != b'\\' && value >= 0x20, "{:?}", normal);
                    }
                    prop_assert!(bytes.iter().all(|&b| (0x21..0x7F).contains(&b)), "{:?}", normal);
                }
            }

            #[test]
            fn targets_never_panic_and_normalise_once(raw in paths()) {
                if let Ok(t) = target(&raw) {
                    prop_assert_eq!(path(&t.path), Ok(t.path.clone()));
                }
            }

            #[test]
            fn normal_authorities_are_fixed_points(raw in authorities()) {
                if let Ok(a) = authority(&raw) {
                    prop_assert_eq!(authority(&a.to_string()), Ok(a.clone()), "from {:?}", raw);
                    prop_assert_eq!(host(&a.host), Ok(a.host.clone()));
                    prop_assert!(!a.host.is_empty() && !a.host.ends_with('.'));
                    prop_assert_eq!(a.host.to_ascii_lowercase(), a.host.clone());
                }
            }
        }
    }
}
