//! The PROXY protocol (HAProxy's, v1 text and v2 binary) on the client listener, for a
//! gateway behind an L4 load balancer: the balancer opens each connection with a header
//! naming the real client, and that address stands in for the socket's everywhere
//! (plugins' `client_addr`, `X-Forwarded-For`, rate limits, hashing by IP).
//!
//! With `[gateway] proxy_protocol = true`, every connection must come from a peer in
//! `trusted_proxies` and start with a valid header; anything else is refused with a 400
//! and closed, before a byte of it is taken as HTTP. A client that could reach the
//! listener directly could otherwise name any address it likes. The header is read
//! within the handshake timeout, bounded in size (v1: 107 bytes as the spec says; v2:
//! 16 bytes plus at most [`MAX_V2_PAYLOAD`] of addresses and TLVs), and whatever the peer
//! sent after it is handed to the HTTP parser.
//!
//! Parsing is the `ppp` crate's (no I/O, both versions, maintained since 2020); this module
//! decides what a header means for the connection:
//! - v1 `TCP4`/`TCP6`, v2 `PROXY` over IPv4/IPv6 stream: the source address is the client;
//! - v1 `UNKNOWN`, v2 `LOCAL` (the balancer's own health check), v2 `UNSPEC` family: the
//!   socket's address stays, as the spec requires;
//! - v2 over UNIX sockets or datagrams: refused, as they cannot describe a TCP client.

use std::net::SocketAddr;

use http::StatusCode;
use ppp::v2;
use ppp::PartialResult;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::forwarding::TrustedProxies;
use crate::handshake::{ReadError, Refusal};

/// The longest v1 header, CRLF included (the spec's figure).
const MAX_V1: usize = 107;
/// The v2 signature, fixed part length, and the most address and TLV bytes accepted after
/// it. The wire format allows 64 KiB; balancers send tens of bytes (AWS and GCP add one
/// small TLV), so 4 KiB leaves room and keeps a hostile peer's cost small.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;
pub const MAX_V2_PAYLOAD: usize = 4096 - V2_FIXED;
const V1_PREFIX: &[u8] = b"PROXY ";

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The real client, or `None` to keep the socket's address.
    pub client: Option<SocketAddr>,
    /// Bytes the header took; what follows is the client's.
    pub len: usize,
}

/// Parses a PROXY header at the start of `buf`: `Ok(None)` while more bytes are needed,
/// `Err` with the reason when it is not a valid header (or not one at all).
pub fn parse(buf: &[u8]) -> Result<Option<Header>, String> {
    let prefix_of = |signature: &[u8]| buf.len() < signature.len() && signature.starts_with(buf);
    if buf.starts_with(V2_SIGNATURE) || prefix_of(V2_SIGNATURE) {
        parse_v2(buf)
    } else if buf.starts_with(V1_PREFIX) || prefix_of(V1_PREFIX) {
        parse_v1(buf)
    } else {
        Err("the connection does not start with a PROXY protocol header".into())
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, String> {
    // v1 is one line: wait for all of it, then parse it whole (`ppp` misreads some lines
    // cut short, e.g. one that ends in the space before the last port).
    let line_end = match buf.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(lf) if buf[lf] == b'\n' => return Err("PROXY v1 header ends in LF instead of CRLF".into()),
        Some(cr) if cr + 2 > MAX_V1 => return Err(format!("PROXY v1 header longer than {MAX_V1} bytes")),
        Some(cr) => match buf.get(cr + 1) {
            Some(b'\n') => cr + 2,
            Some(_) => return Err("PROXY v1 header with a CR not followed by LF".into()),
            None => return Ok(None),
        },
        None if buf.len() >= MAX_V1 => return Err(format!("PROXY v1 header longer than {MAX_V1} bytes")),
        None => return Ok(None),
    };
    let header = ppp::v1::Header::try_from(&buf[..line_end]).map_err(|e| format!("bad PROXY v1 header: {e}"))?;
    let client = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    };
    Ok(Some(Header { client, len: line_end }))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, String> {
    if buf.len() >= V2_FIXED {
        let payload = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if payload > MAX_V2_PAYLOAD {
            return Err(format!("PROXY v2 header of {payload} bytes after its fixed part; at most {MAX_V2_PAYLOAD}"));
        }
    }
    let header = match v2::Header::try_from(buf) {
        Ok(header) => header,
        Err(e) if e.is_incomplete() => return Ok(None),
        Err(e) => return Err(format!("bad PROXY v2 header: {e}")),
    };
    let client = match (header.command, header.addresses, header.protocol) {
        (v2::Command::Local, _, _) | (v2::Command::Proxy, v2::Addresses::Unspecified, _) => None,
        (v2::Command::Proxy, v2::Addresses::IPv4(a), v2::Protocol::Stream) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (v2::Command::Proxy, v2::Addresses::IPv6(a), v2::Protocol::Stream) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (v2::Command::Proxy, addresses, protocol) => {
            return Err(format!(
                "PROXY v2 header for {:?} over {protocol:?}: only TCP over IPv4 or IPv6",
                addresses.address_family()
            ))
        }
    };
    Ok(Some(Header { client, len: header.len() }))
}

/// Reads the PROXY header that must open a connection from `peer`, before `deadline`.
/// Returns the client's address and the bytes read past the header.
pub async fn read_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &TrustedProxies,
    deadline: Instant,
) -> Result<(SocketAddr, Vec<u8>), ReadError> {
    let bad_request = |why: String| ReadError::Refused(Refusal::new(StatusCode::BAD_REQUEST, why));
    if !trusted.contains(peer.ip()) {
        return Err(bad_request(format!(
            "this listener takes connections through a trusted proxy only (PROXY protocol); {} is not one",
            peer.ip()
        )));
    }
    let mut buf = Vec::with_capacity(512);
    let read = async {
        loop {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(ReadError::Gone),
                Ok(_) => {}
            }
            // `parse` decides within the size bounds, so `buf` stays within one read of
            // the largest header.
            match parse(&buf) {
                Ok(Some(header)) => return Ok(header),
                Ok(None) => {}
                Err(why) => return Err(bad_request(why)),
            }
        }
    };
    let header = match tokio::time::timeout_at(deadline, read).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(ReadError::Refused(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "the PROXY protocol header did not arrive within the handshake timeout",
            )))
        }
    };
    buf.drain(..header.len);
    Ok((header.client.unwrap_or(peer), buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family_protocol: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family_protocol);
        out.extend_from_slice(&((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        out.extend_from_slice(addresses);
        out.extend_from_slice(tlvs);
        out
    }

    fn client(buf: &[u8]) -> Option<SocketAddr> {
        parse(buf).unwrap().unwrap().client
    }

    #[test]
    fn v1_headers() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        let header = parse(line).unwrap().unwrap();
        assert_eq!(header.client, Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(&line[header.len..], b"GET / HTTP/1.1\r\n");
        assert_eq!(client(b"PROXY TCP6 2001:db8::7 ::1 1 2\r\n"), Some("[2001:db8::7]:1".parse().unwrap()));
        assert_eq!(client(b"PROXY UNKNOWN\r\n"), None);
        assert_eq!(client(b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n"), None);
        // Every proper prefix asks for more, wherever the line is cut.
        for cut in 0..line.len() - 16 {
            assert_eq!(parse(&line[..cut]), Ok(None), "{cut}");
        }
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n"[..],
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY \r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // No CRLF within 107 bytes.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1, b'x');
        assert!(parse(&long).is_err());
    }

    #[test]
    fn v2_headers() {
        let addrs4 = [203, 0, 113, 7, 10, 0, 0, 1, 0xC8, 0x22, 0x01, 0xBB];
        let mut wire = v2(1, 0x11, &addrs4, &[]);
        wire.extend_from_slice(b"GET");
        let header = parse(&wire).unwrap().unwrap();
        assert_eq!(header.client, Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(&wire[header.len..], b"GET");
        for cut in 0..wire.len() - 3 {
            assert_eq!(parse(&wire[..cut]), Ok(None), "{cut}");
        }
        // TLVs are skipped.
        let with_tlv = v2(1, 0x11, &addrs4, &[0x04, 0, 3, 0, 0, 0]);
        assert_eq!(parse(&with_tlv).unwrap().unwrap().len, with_tlv.len());
        let mut addrs6 = [0u8; 36];
        addrs6[..16].copy_from_slice(&"2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
        addrs6[32..34].copy_from_slice(&443u16.to_be_bytes());
        assert_eq!(client(&v2(1, 0x21, &addrs6, &[])), Some("[2001:db8::7]:443".parse().unwrap()));
        // LOCAL and UNSPEC keep the socket's address.
        assert_eq!(client(&v2(0, 0x11, &addrs4, &[])), None);
        assert_eq!(client(&v2(0, 0x00, &[], &[])), None);
        assert_eq!(client(&v2(1, 0x00, &[], &[])), None);
        // Datagrams, UNIX sockets, bad versions, commands, families, short addresses.
        for bad in [
            v2(1, 0x12, &addrs4, &[]),
            v2(1, 0x31, &[0; 216], &[]),
            v2(2, 0x11, &addrs4, &[]),
            v2(1, 0x41, &addrs4, &[]),
            v2(1, 0x11, &addrs4[..8], &[]),
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
        let mut version1 = v2(1, 0x11, &addrs4, &[]);
        version1[12] = 0x11;
        assert!(parse(&version1).is_err());
        // Bounded: a huge announced length is refused before it is read.
        let mut huge = v2(1, 0x11, &addrs4, &[]);
        huge[14..16].copy_from_slice(&(MAX_V2_PAYLOAD as u16 + 1).to_be_bytes());
        assert!(parse(&huge[..16]).unwrap_err().contains("at most"));
    }

    #[test]
    fn anything_else_is_refused() {
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
        assert!(parse(b"\r\n\r\n\0\r\nQUIX").is_err());
        assert!(parse(b"\x16\x03\x01").is_err(), "a TLS hello");
        assert_eq!(parse(b""), Ok(None));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

        /// A valid header naming `source`, v1 or v2, and the address it names.
        fn headers() -> impl Strategy<Value = (Vec<u8>, SocketAddr)> {
            let ip = prop_oneof![
                any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
                any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
            ];
            (ip, any::<u16>(), any::<bool>(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(ip, port, text, tlvs)| {
                let source = SocketAddr::new(ip, port);
                let wire = if text {
                    let (family, dest) = if ip.is_ipv4() { ("TCP4", "127.0.0.1") } else { ("TCP6", "::1") };
                    format!("PROXY {family} {ip} {dest} {port} 443\r\n").into_bytes()
                } else {
                    let mut addresses = match ip {
                        IpAddr::V4(v4) => [v4.octets().to_vec(), vec![127, 0, 0, 1]].concat(),
                        IpAddr::V6(v6) => [v6.octets().to_vec(), Ipv6Addr::LOCALHOST.octets().to_vec()].concat(),
                    };
                    addresses.extend_from_slice(&port.to_be_bytes());
                    addresses.extend_from_slice(&443u16.to_be_bytes());
                    let family = if ip.is_ipv4() { 0x11 } else { 0x21 };
                    v2(1, family, &addresses, &tlvs)
                };
                (wire, source)
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            #[test]
            fn valid_headers_parse_whole_and_wait_when_cut((wire, source) in headers(), tail in prop::collection::vec(any::<u8>(), 0..20)) {
                for cut in 0..wire.len() {
                    prop_assert_eq!(parse(&wire[..cut]), Ok(None), "cut at {}", cut);
                }
                let mut buf = wire.clone();
                buf.extend_from_slice(&tail);
                let header = parse(&buf).unwrap().unwrap();
                prop_assert_eq!(header.client, Some(source));
                prop_assert_eq!(header.len, wire.len());
            }

            #[test]
            fn random_and_mutated_bytes_never_panic(
                (wire, _) in headers(),
                noise in prop::collection::vec(any::<u8>(), 0..200),
                flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            ) {
                let _ = parse(&noise);
                let mut mutated = wire;
                for (at, b) in flips {
                    let i = at % mutated.len();
                    mutated[i] = b;
                }
                if let Ok(Some(header)) = parse(&mutated) {
                    prop_assert!(header.len <= mutated.len());
                }
            }
        }
    }
}
