//! Who the client is, as the upstream is told: `X-Forwarded-For`, `Forwarded` (RFC 7239)
//! and `X-Forwarded-Proto`, and whose word the gateway takes for it.
//!
//! Any client can send `X-Forwarded-For: 10.0.0.1`. An upstream (or a plugin) that trusts
//! it lets the client choose its own address for rate limits, allow lists and logs. So
//! the forwarding headers a client sends are believed only from a peer in
//! `[gateway] trusted_proxies` (a proxy of the operator's own in front of the gateway);
//! from anyone else they are dropped before the plugins run, and the upstream learns only
//! the address the gateway saw. "The peer" is the address the connection came from: the
//! socket's, or the one a trusted proxy named in a PROXY protocol header.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;

use crate::upstream::HeaderLines;

/// The networks whose forwarding headers (and PROXY protocol headers) are believed.
/// Empty, the default, trusts nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(networks: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(networks)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is in one of the networks. An IPv4 client of a dual-stack listener
    /// (`::ffff:10.0.0.1`) is matched as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// Parses one `trusted_proxies` entry: a CIDR (`10.0.0.0/8`, `::1/128`) or a single
/// address (`127.0.0.1`, meaning /32 or /128). A CIDR with host bits set (`10.0.0.1/8`)
/// is refused: whether the operator meant the network or the host is not clear.
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = text
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR like \"10.0.0.0/8\" or \"::1/128\", nor an address"))?;
    if net.trunc() != net {
        return Err(format!("{text:?} has host bits set: write the network, {}", net.trunc()));
    }
    Ok(net)
}

/// Whether a request header is one a client uses to claim an address, host or scheme on
/// behalf of someone else: `Forwarded`, the whole `X-Forwarded-*` family, and nginx's
/// `X-Real-IP`.
pub fn is_forwarding_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    name == "forwarded" || name == "x-real-ip" || name.starts_with("x-forwarded-")
}

/// Removes the forwarding headers of a client whose word is not taken.
pub fn drop_client_claims(headers: &mut HeaderMap) {
    let claimed: Vec<HeaderName> = headers.keys().filter(|n| is_forwarding_header(n)).cloned().collect();
    for name in claimed {
        headers.remove(name);
    }
}

/// Writes the forwarding headers for the upstream: the client's (only left by a trusted
/// peer) with this hop appended. `X-Forwarded-For` lists every earlier value, in order,
/// then `client_ip`; `Forwarded` likewise gets this hop's element (`for`, `proto`, and the
/// normalised `host`); `X-Forwarded-Proto` is the trusted proxy's when it sent one, else
/// this hop's `proto` (`http`, or `https` on the TLS listener). Other `X-Forwarded-*`
/// headers a trusted proxy sent go on as they are, with the client's other headers.
/// Written in place: every connection pays for these, and formatting them into strings of
/// their own took a dozen allocations.
///
/// Each is written only if `keep` accepts its name (a plugin may replace one).
pub fn write_forwarding_headers(
    out: &mut HeaderLines,
    client: &HeaderMap,
    client_ip: IpAddr,
    host: &str,
    proto: &str,
    keep: impl Fn(&str) -> bool,
) {
    let client_ip = client_ip.to_canonical();
    let earlier = |name: &'static str| {
        client.get_all(name).into_iter().filter_map(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
    };
    if keep("x-forwarded-for") {
        out.push_with("x-forwarded-for", |value| {
            for hop in earlier("x-forwarded-for") {
                value.push_str(hop);
                value.push_str(", ");
            }
            push_ip(value, client_ip);
        });
    }
    if keep("forwarded") {
        out.push_with("forwarded", |value| {
            for element in earlier("forwarded") {
                value.push_str(element);
                value.push_str(", ");
            }
            // RFC 7239 §6: an IPv6 node is bracketed, and then must be quoted.
            match client_ip {
                IpAddr::V4(_) => {
                    value.push_str("for=");
                    push_ip(value, client_ip);
                }
                IpAddr::V6(v6) => {
                    let _ = write!(value, "for=\"[{v6}]\"");
                }
            }
            value.push_str(";proto=");
            value.push_str(proto);
            if is_quotable(host) {
                value.push_str(";host=");
                push_quoted(value, host);
            }
        });
    }
    if !client.contains_key("x-forwarded-proto") && keep("x-forwarded-proto") {
        out.push("x-forwarded-proto", proto);
    }
}

/// Appends `ip` as its Display writes it. IPv4, the common case, digit by digit: through
/// `fmt` it was 1% of a new connection's user time (BENCHMARKS.md, tenth round).
fn push_ip(out: &mut String, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

/// Names of the forwarding headers [`write_forwarding_headers`] writes itself (merging in
/// the client's, when they were kept).
pub fn is_rewritten(name: &str) -> bool {
    matches!(name, "x-forwarded-for" | "forwarded")
}

/// Whether `value` can be an RFC 7230 quoted-string: not if it holds a control character,
/// which no quoting makes safe.
fn is_quotable(value: &str) -> bool {
    !value.chars().any(|c| c.is_control() && c != '\t')
}

/// Appends `value` as a quoted-string, `"` and `\` escaped.
fn push_quoted(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies::new(list.iter().map(|s| parse_network(s).unwrap()).collect())
    }

    #[test]
    fn networks_parse_and_match() {
        let t = trusted(&["10.0.0.0/8", "127.0.0.1/32", "::1/128", "192.0.2.7"]);
        for yes in ["10.1.2.3", "127.0.0.1", "::1", "::ffff:10.9.9.9", "192.0.2.7"] {
            assert!(t.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in ["11.0.0.1", "127.0.0.2", "::2", "192.0.2.8", "::ffff:127.0.0.2"] {
            assert!(!t.contains(no.parse().unwrap()), "{no}");
        }
        assert!(!TrustedProxies::default().contains("127.0.0.1".parse().unwrap()), "empty trusts nobody");
        for bad in ["10.0.0.0/33", "10.0.0/8", "localhost", "", "10.0.0.1/8", "::1/129", "fe80::1/10"] {
            assert!(parse_network(bad).is_err(), "{bad}");
        }
        assert!(parse_network("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
    }

    fn forwarding_headers(client: &HeaderMap, client_ip: IpAddr, host: &str, proto: &str) -> Vec<(String, String)> {
        let mut out = HeaderLines::default();
        write_forwarding_headers(&mut out, client, client_ip, host, proto, |_| true);
        out.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn quoted_string(value: &str) -> Option<String> {
        let mut out = String::new();
        is_quotable(value).then(|| push_quoted(&mut out, value)).map(|()| out)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn untrusted_claims_are_dropped() {
        let mut map = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-prefix", "/admin"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwardedness", "kept: not of the family"),
            ("origin", "http://app"),
        ]);
        drop_client_claims(&mut map);
        let mut left: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["origin", "x-forwardedness"]);
        let out = forwarding_headers(&map, "192.0.2.1".parse().unwrap(), "chat.example.com:8080", "http");
        assert_eq!(
            out,
            [
                ("x-forwarded-for".into(), "192.0.2.1".into()),
                ("forwarded".into(), "for=192.0.2.1;proto=http;host=\"chat.example.com:8080\"".into()),
                ("x-forwarded-proto".into(), "http".into()),
            ]
        );
    }

    #[test]
    fn trusted_chains_are_kept_in_order() {
        let map = headers(&[
            ("x-forwarded-for", "203.0.113.9, 10.0.0.5"),
            ("x-forwarded-for", "10.0.0.6"),
            ("forwarded", "for=203.0.113.9;proto=https"),
            ("x-forwarded-proto", "https"),
        ]);
        let out = forwarding_headers(&map, "::ffff:10.0.0.7".parse().unwrap(), "[::1]:80", "http");
        assert_eq!(out[0].1, "203.0.113.9, 10.0.0.5, 10.0.0.6, 10.0.0.7");
        assert_eq!(out[1].1, "for=203.0.113.9;proto=https, for=10.0.0.7;proto=http;host=\"[::1]:80\"");
        assert_eq!(out.len(), 2, "the trusted proxy's X-Forwarded-Proto stands");
        let v6 = forwarding_headers(&HeaderMap::new(), "2001:db8::1".parse().unwrap(), "h", "http");
        assert_eq!(v6[1].1, "for=\"[2001:db8::1]\";proto=http;host=\"h\"");
    }

    #[test]
    fn addresses_are_written_as_displayed() {
        let mut ips: Vec<IpAddr> = ["0.0.0.0", "255.255.255.255", "10.0.0.9", "100.20.3.199", "::1", "2001:db8::7"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        ips.extend((0..=255u8).map(|b| IpAddr::from([b, b.wrapping_mul(7), 255 - b, b / 3])));
        for ip in ips {
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn the_tls_listener_says_https() {
        let out = forwarding_headers(&HeaderMap::new(), "192.0.2.1".parse().unwrap(), "h", "https");
        assert_eq!(out[1].1, "for=192.0.2.1;proto=https;host=\"h\"");
        assert_eq!(out[2], ("x-forwarded-proto".into(), "https".into()));
    }

    #[test]
    fn quoting_escapes_and_refuses_controls() {
        assert_eq!(quoted_string("a\"b\\c").unwrap(), r#""a\"b\\c""#);
        assert_eq!(quoted_string("a\tb").unwrap(), "\"a\tb\"");
        assert_eq!(quoted_string("a\r\nb"), None);
        assert_eq!(quoted_string("a\u{7f}"), None);
        let out = forwarding_headers(&HeaderMap::new(), "192.0.2.1".parse().unwrap(), "a\"b;for=1.2.3.4", "http");
        assert_eq!(out[1].1, r#"for=192.0.2.1;proto=http;host="a\"b;for=1.2.3.4""#);
    }
}
