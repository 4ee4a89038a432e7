//! Attacks on the edge, over real sockets to a real gateway with real plugins: requests
//! that try to reach a route without its plugins (path and host spellings), forged
//! forwarding headers, and PROXY protocol headers from trusted and untrusted peers. Each
//! test asserts the refusal (the plugin's, or a 400) and that the gateway goes on serving
//! honest clients afterwards.
//!
//! Different source addresses come from binding the client socket to other loopback
//! addresses (127.0.0.2, 127.0.0.3) before connecting.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// SHA-256 (hex) of the API key "key-a" (`printf %s key-a | sha256sum`).
const KEY_A_SHA256: &str = "f10f781241e2246678b6b45c857069208152a53863e47fac33f607ab405006f4";

/// A `[[plugin]]` table for a crate of `plugins/` with an inline `config` table.
fn plugin(name: &str, krate: &str, config: &str) -> String {
    format!("[[plugin]]\nname = \"{name}\"\nwasm = \"{}\"\nconfig = {config}\n\n", plugin_wasm(krate).display())
}

fn upstream(backends: &[EchoServer]) -> String {
    format!("[[upstream]]\nname = \"echo\"\nservers = {}\nconnect_timeout_ms = 1000\n\n", server_list(backends))
}

/// An upgrade request for `target` with `Host: host` and extra header lines.
fn upgrade(target: &str, host: &str, headers: &[(&str, &str)]) -> String {
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// A TCP connection to `to` from the loopback address `from` (any port).
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// What came back for a request: the status and, for a 101, the upstream's view of the
/// request (the echo backend's answer to `headers`: header lines and `path: ...`), else the
/// whole refusal.
#[derive(Debug)]
struct Answer {
    status: u16,
    text: String,
}

/// Sends `bytes` on `stream` and reads the answer; on a 101, asks the echo backend what it
/// saw and closes.
async fn exchange(mut stream: TcpStream, bytes: &[u8]) -> Answer {
    stream.write_all(bytes).await.unwrap();
    read_answer(stream).await
}

async fn read_answer(mut stream: TcpStream) -> Answer {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let complete = tokio::time::timeout(Duration::from_secs(10), async {
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    })
    .await
    .expect("an answer within 10 s");
    let mut text = String::from_utf8_lossy(&head).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    if !complete {
        return Answer { status: 0, text };
    }
    if status == 101 {
        stream.write_all(&client_text("headers")).await.unwrap();
        let (_, opcode, payload) = server_frame(&mut stream).await;
        assert_eq!(opcode, 1, "the echo backend answers with text");
        return Answer { status, text: String::from_utf8(payload).unwrap() };
    }
    // A refusal: its body, then the gateway closes.
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut body)).await;
    text.push_str(&String::from_utf8_lossy(&body));
    Answer { status, text }
}

/// The value of `name` in the echo backend's header lines (the first one).
fn seen(view: &str, name: &str) -> Option<String> {
    view.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
}

/// An honest client still gets through: a WebSocket echo on `path` with `headers`.
async fn still_serves(gw: &Gateway, path: &str, headers: &[(&str, &str)]) {
    let mut ws = connect_with(gw, path, headers).await;
    assert_eq!(roundtrip(&mut ws, Message::text("still here")).await, Message::text("still here"));
    ws.close(None).await.unwrap();
}

/// `/admin` guarded by `api-key` (then a `router` rule that tells the upstream which path
/// the plugins saw), `/` open to all, and a host route for chat.example.com guarded too;
/// its host is written unnormalised in the config on purpose.
fn guarded_routes(backends: &[EchoServer]) -> String {
    let keys = format!("{{ keys = [{{ name = \"team-a\", sha256 = \"{KEY_A_SHA256}\" }}] }}");
    let saw = "{ rules = [{ name = \"exact\", path = \"/admin\", headers = { \"x-plugin-saw\" = \"/admin\" } }] }";
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{}{}{}\
         [[route]]\npath = \"/admin\"\nupstream = \"echo\"\nplugins = [\"keys\", \"saw\"]\n\n\
         [[route]]\npath = \"/\"\nupstream = \"echo\"\n\n\
         [[route]]\nhost = \"CHAT.Example.com.\"\npath = \"/\"\nupstream = \"echo\"\nplugins = [\"keys\"]\n",
        upstream(backends),
        plugin("keys", "api-key", &keys),
        plugin("saw", "router", saw),
    )
}

/// What a request must get: the guarded route's plugin (its 401), or a 400.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Guarded,
    BadRequest,
}

#[tokio::test]
async fn route_bypass_spellings_meet_the_routes_plugins_or_a_400() {
    use Outcome::*;
    let backends = echo_backends(1).await;
    let gw = start_gateway(&guarded_routes(&backends)).await;
    let cases: &[(&str, Outcome)] = &[
        // Spellings of /admin: normalised, then routed to /admin and its plugins.
        ("/admin", Guarded),
        ("//admin", Guarded),
        ("///admin", Guarded),
        ("/./admin", Guarded),
        ("/././admin", Guarded),
        ("/%2e/admin", Guarded),
        ("/%2E/admin", Guarded),
        ("/admin/../admin", Guarded),
        ("/x/../admin", Guarded),
        ("/x/y/../../admin", Guarded),
        ("/x/%2e%2e/admin", Guarded),
        ("/x/.%2E/admin", Guarded),
        ("/%61dmin", Guarded),
        ("/%61%64%6D%69%6E", Guarded),
        ("/adm%69n", Guarded),
        ("/admin/", Guarded),
        ("/admin/.", Guarded),
        ("/admin//", Guarded),
        ("/admin/x/..", Guarded),
        ("/admin/sub", Guarded),
        ("//admin//sub/", Guarded),
        ("/admin?x=/../", Guarded),
        ("/admin?next=%2F..%2F", Guarded),
        ("http://localhost/admin", Guarded),
        ("HTTP://LOCALHOST./%61dmin", Guarded),
        ("ws://localhost:80//admin", Guarded),
        // No safe normal form: refused before routing.
        ("/..", BadRequest),
        ("/../admin", BadRequest),
        ("/%2e%2e/admin", BadRequest),
        ("/%2E%2E/admin", BadRequest),
        ("/.%2e/admin", BadRequest),
        ("/x/../../admin", BadRequest),
        ("/admin%2f", BadRequest),
        ("/admin%2Fsub", BadRequest),
        ("/%2fadmin", BadRequest),
        ("/x%2F..%2Fadmin", BadRequest),
        ("/admin%5c", BadRequest),
        ("/admin\\sub", BadRequest),
        ("/\\admin", BadRequest),
        ("/admin%00", BadRequest),
        ("/admin%0d%0a", BadRequest),
        ("/admin%09", BadRequest),
        ("/admin;", BadRequest),
        ("/admin;jsessionid=1", BadRequest),
        ("/admin;/x", BadRequest),
        ("/admin%", BadRequest),
        ("/admin%2", BadRequest),
        ("/admin%g0", BadRequest),
        ("/admin#x", BadRequest),
        ("/admin\u{e4}", BadRequest),
        ("/admin|x", BadRequest),
        ("admin", BadRequest),
        ("*", BadRequest),
        ("localhost:80", BadRequest),
        ("http://other.example/admin", BadRequest),
        ("http://user@localhost/admin", BadRequest),
        ("ftp://localhost/admin", BadRequest),
        ("http:///admin", BadRequest),
    ];
    let mut failures = Vec::new();
    for &(target, expected) in cases {
        let answer = exchange(TcpStream::connect(gw.listen_addr).await.unwrap(), upgrade(target, "localhost", &[]).as_bytes()).await;
        let ok = match expected {
            Guarded => answer.status == 401 && answer.text.contains("missing API key"),
            BadRequest => answer.status == 400,
        };
        if !ok {
            failures.push(format!("{target:?}: wanted {expected:?}, got {} {:?}", answer.status, answer.text));
        }
    }
    assert!(failures.is_empty(), "{} of {} spellings went wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));

    // With the key, the plugins and the upstream see the normal path the router used; the
    // query goes on as sent.
    for (target, path) in [("/./%61dmin", "/admin"), ("//admin/sub/..?x=%2e%2E", "/admin/?x=%2e%2E"), ("/x/../adm%69n", "/admin")] {
        let request = upgrade(target, "localhost", &[("x-api-key", "key-a")]);
        let answer = exchange(TcpStream::connect(gw.listen_addr).await.unwrap(), request.as_bytes()).await;
        assert_eq!(answer.status, 101, "{target}: {}", answer.text);
        assert_eq!(seen(&answer.text, "path").as_deref(), Some(path), "{target}: {}", answer.text);
        let plugin_saw = if path == "/admin" { Some("/admin") } else { None };
        assert_eq!(seen(&answer.text, "x-plugin-saw").as_deref(), plugin_saw, "{target}: {}", answer.text);
    }

    // Paths are case-sensitive, and an escape of a reserved character is data: these are
    // other paths, routed to `/` and sent upstream as the very path that was routed, so
    // the upstream never reads them as /admin.
    for (target, path) in [("/ADMIN", "/ADMIN"), ("/Admin", "/Admin"), ("/admin%3b", "/admin%3B"), ("/admin%20", "/admin%20"), ("/adminx", "/adminx")] {
        let answer = exchange(TcpStream::connect(gw.listen_addr).await.unwrap(), upgrade(target, "localhost", &[]).as_bytes()).await;
        assert_eq!(answer.status, 101, "{target}: {}", answer.text);
        assert_eq!(seen(&answer.text, "path").as_deref(), Some(path), "{target}: {}", answer.text);
    }

    still_serves(&gw, "/", &[]).await;
    still_serves(&gw, "/admin", &[("x-api-key", "key-a")]).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn host_spellings_meet_the_host_routes_plugins_or_a_400() {
    use Outcome::*;
    let backends = echo_backends(1).await;
    let gw = start_gateway(&guarded_routes(&backends)).await;
    let cases: &[(&str, &str, Outcome)] = &[
        ("/", "chat.example.com", Guarded),
        ("/", "CHAT.example.com", Guarded),
        ("/", "chat.example.com.", Guarded),
        ("/", "Chat.Example.Com.", Guarded),
        ("/", "CHAT.example.com:8080", Guarded),
        ("/", "chat.example.com.:80", Guarded),
        ("/", "chat.example.com:", Guarded),
        ("//x/../", "chat.example.com", Guarded),
        ("http://CHAT.EXAMPLE.COM./", "chat.example.com", Guarded),
        ("http://chat.example.com/", "chat.example.com.:443", Guarded),
        ("/", "chat.example.com..", BadRequest),
        ("/", ".chat.example.com", BadRequest),
        ("/", "chat%2eexample.com", BadRequest),
        ("/", "chat.example.com:80:80", BadRequest),
        ("/", "chat.example.com:http", BadRequest),
        ("/", "chat.example.com, localhost", BadRequest),
        ("/", "chat.example.com\";for=1.2.3.4", BadRequest),
        ("/", "user@chat.example.com", BadRequest),
        ("/", "", BadRequest),
        ("/", "127.1", BadRequest),
        ("/", "0x7f.0.0.1", BadRequest),
        ("/", "[::1", BadRequest),
        ("/", "[fe80::1%25lo]", BadRequest),
        ("http://localhost/", "chat.example.com", BadRequest),
        ("http://chat.example.com/", "localhost", BadRequest),
    ];
    let mut failures = Vec::new();
    for &(target, host, expected) in cases {
        let answer = exchange(TcpStream::connect(gw.listen_addr).await.unwrap(), upgrade(target, host, &[]).as_bytes()).await;
        let ok = match expected {
            Guarded => answer.status == 401 && answer.text.contains("missing API key"),
            BadRequest => answer.status == 400,
        };
        if !ok {
            failures.push(format!("{target:?} Host {host:?}: wanted {expected:?}, got {} {:?}", answer.status, answer.text));
        }
    }
    assert!(failures.is_empty(), "{} of {} went wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));

    // Past the plugin, the upstream gets the normal Host; other hosts, IPv6 literals
    // included, take the open route.
    let request = upgrade("/", "CHAT.Example.com.:8080", &[("x-api-key", "key-a")]);
    let answer = exchange(TcpStream::connect(gw.listen_addr).await.unwrap(), request.as_bytes()).await;
    assert_eq!(answer.status, 101, "{}", answer.text);
    assert_eq!(seen(&answer.text, "host").as_deref(), Some("chat.example.com:8080"), "{}", answer.text);
    for (host, normal) in [("[0:0::1]:80", "[::1]:80"), ("LOCALHOST.", "localhost"), ("127.0.0.1:9", "127.0.0.1:9")] {
        let answer = exchange(TcpStream::connect(gw.listen_addr).await.unwrap(), upgrade("/", host, &[]).as_bytes()).await;
        assert_eq!(answer.status, 101, "{host}: {}", answer.text);
        assert_eq!(seen(&answer.text, "host").as_deref(), Some(normal), "{host}: {}", answer.text);
    }

    still_serves(&gw, "/", &[]).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn forwarding_headers_from_untrusted_clients_are_dropped() {
    let backends = echo_backends(1).await;
    // `hash` puts the X-Forwarded-For it sees in metadata, `header-stamp` sends that
    // upstream: what the plugins were told.
    let toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.2/32\", \"::1/128\"]\n\n{}{}{}\
         [[route]]\npath = \"/\"\nupstream = \"echo\"\nplugins = [\"xff\", \"stamp\"]\n",
        upstream(&backends),
        plugin("xff", "hash", "{ key = \"header:x-forwarded-for\" }"),
        plugin("stamp", "header-stamp", "{ header = \"x-stamp\", value = \"1\", copy_meta = \"hash-key\" }"),
    );
    let gw = start_gateway(&toml).await;
    let forged = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-For", "7.7.7.7"),
        ("Forwarded", "for=6.6.6.6;host=evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Prefix", "/admin"),
        ("X-Real-IP", "6.6.6.6"),
    ];
    // From 127.0.0.1, not trusted: every claim is dropped; the upstream learns the peer.
    let stream = connect_from("127.0.0.1".parse().unwrap(), gw.listen_addr).await;
    let view = exchange(stream, upgrade("/", "Localhost.", &forged).as_bytes()).await;
    assert_eq!(view.status, 101, "{}", view.text);
    assert_eq!(view.text.matches("x-forwarded-for: ").count(), 1, "{}", view.text);
    assert_eq!(seen(&view.text, "x-forwarded-for").as_deref(), Some("127.0.0.1"), "{}", view.text);
    assert_eq!(seen(&view.text, "forwarded").as_deref(), Some("for=127.0.0.1;proto=http;host=\"localhost\""), "{}", view.text);
    assert_eq!(seen(&view.text, "x-forwarded-proto").as_deref(), Some("http"), "{}", view.text);
    for gone in ["6.6.6.6", "7.7.7.7", "evil", "x-forwarded-port", "x-forwarded-prefix", "x-real-ip", "x-meta-hash-key"] {
        assert!(!view.text.contains(gone), "{gone} reached the upstream or the plugins:\n{}", view.text);
    }

    // From 127.0.0.2, trusted: its chain is kept in order and extended with the peer.
    let trusted = [
        ("X-Forwarded-For", "203.0.113.9, 10.0.0.5"),
        ("X-Forwarded-For", "10.0.0.6"),
        ("Forwarded", "for=203.0.113.9;proto=https"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "chat.example.com"),
    ];
    let stream = connect_from("127.0.0.2".parse().unwrap(), gw.listen_addr).await;
    let view = exchange(stream, upgrade("/", "localhost", &trusted).as_bytes()).await;
    assert_eq!(view.status, 101, "{}", view.text);
    assert_eq!(
        seen(&view.text, "x-forwarded-for").as_deref(),
        Some("203.0.113.9, 10.0.0.5, 10.0.0.6, 127.0.0.2"),
        "{}",
        view.text
    );
    assert_eq!(
        seen(&view.text, "forwarded").as_deref(),
        Some("for=203.0.113.9;proto=https, for=127.0.0.2;proto=http;host=\"localhost\""),
        "{}",
        view.text
    );
    assert_eq!(seen(&view.text, "x-forwarded-proto").as_deref(), Some("https"), "{}", view.text);
    assert_eq!(seen(&view.text, "x-forwarded-host").as_deref(), Some("chat.example.com"), "{}", view.text);
    assert!(seen(&view.text, "x-meta-hash-key").is_some_and(|k| k.contains("203.0.113.9")), "{}", view.text);

    // A Host that tries to break out of Forwarded's quoting never gets that far, and a
    // PROXY header is not HTTP on a listener that does not expect one.
    let stream = TcpStream::connect(gw.listen_addr).await.unwrap();
    assert_eq!(exchange(stream, upgrade("/", "a\";for=6.6.6.6", &[]).as_bytes()).await.status, 400);
    let stream = TcpStream::connect(gw.listen_addr).await.unwrap();
    let proxied = format!("PROXY TCP4 6.6.6.6 127.0.0.1 1 2\r\n{}", upgrade("/", "localhost", &[]));
    assert_eq!(exchange(stream, proxied.as_bytes()).await.status, 400);

    still_serves(&gw, "/", &[]).await;
    gw.shutdown().await;
}

/// A PROXY protocol v2 header: command (0 LOCAL, 1 PROXY), family/protocol byte, and the
/// address block.
fn proxy_v2(command: u8, family_protocol: u8, addresses: &[u8]) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.push(0x20 | command);
    out.push(family_protocol);
    out.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    out.extend_from_slice(addresses);
    out
}

fn proxy_v2_tcp6(source: &str, port: u16) -> Vec<u8> {
    let mut addresses = source.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
    addresses.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    addresses.extend_from_slice(&port.to_be_bytes());
    addresses.extend_from_slice(&443u16.to_be_bytes());
    proxy_v2(1, 0x21, &addresses)
}

fn proxy_v1(source: &str) -> String {
    format!("PROXY TCP4 {source} 127.0.0.1 51234 80\r\n")
}

#[tokio::test]
async fn proxy_protocol_names_the_client_only_for_trusted_peers() {
    let backends = echo_backends(1).await;
    // One connection per client address per minute (rate-limit, keyed by IP), and `hash`
    // keyed by IP with `header-stamp` telling the upstream which address the plugins saw.
    let toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nhandshake_timeout_secs = 1\n\
         proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n\n{}{}{}{}\
         [[route]]\npath = \"/\"\nupstream = \"echo\"\nplugins = [\"limits\", \"by-ip\", \"stamp\"]\n",
        upstream(&backends),
        plugin("limits", "rate-limit", "{ connections_per_window = 1, window_secs = 60 }"),
        plugin("by-ip", "hash", "{ key = \"ip\" }"),
        plugin("stamp", "header-stamp", "{ header = \"x-stamp\", value = \"1\", copy_meta = \"hash-key\" }"),
    );
    let gw = start_gateway(&toml).await;
    let request = upgrade("/", "localhost", &[]);
    let from_trusted = || TcpStream::connect(gw.listen_addr);

    // v1, header and request in one write.
    let view = exchange(from_trusted().await.unwrap(), format!("{}{request}", proxy_v1("203.0.113.7")).as_bytes()).await;
    assert_eq!(view.status, 101, "{}", view.text);
    assert_eq!(seen(&view.text, "x-forwarded-for").as_deref(), Some("203.0.113.7"), "{}", view.text);
    assert_eq!(seen(&view.text, "x-meta-hash-key").as_deref(), Some("203.0.113.7"), "plugins see it: {}", view.text);
    assert_eq!(seen(&view.text, "forwarded").as_deref(), Some("for=203.0.113.7;proto=http;host=\"localhost\""));

    // v1 dribbled in pieces, the request behind it in another write.
    let mut stream = from_trusted().await.unwrap();
    for piece in ["PRO", "XY TCP4 203.0.1", "13.8 127.0.0.1 1 80\r", "\n"] {
        stream.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let view = exchange(stream, request.as_bytes()).await;
    assert_eq!(view.status, 101, "{}", view.text);
    assert_eq!(seen(&view.text, "x-forwarded-for").as_deref(), Some("203.0.113.8"), "{}", view.text);

    // v2 over IPv6.
    let mut bytes = proxy_v2_tcp6("2001:db8::7", 40000);
    bytes.extend_from_slice(request.as_bytes());
    let view = exchange(from_trusted().await.unwrap(), &bytes).await;
    assert_eq!(view.status, 101, "{}", view.text);
    assert_eq!(seen(&view.text, "x-forwarded-for").as_deref(), Some("2001:db8::7"), "{}", view.text);
    assert_eq!(seen(&view.text, "x-meta-hash-key").as_deref(), Some("2001:db8::7"), "{}", view.text);
    assert_eq!(seen(&view.text, "forwarded").as_deref(), Some("for=\"[2001:db8::7]\";proto=http;host=\"localhost\""));

    // v2 LOCAL (the balancer's own check): the socket's address stands.
    let mut bytes = proxy_v2(0, 0x00, &[]);
    bytes.extend_from_slice(request.as_bytes());
    let view = exchange(from_trusted().await.unwrap(), &bytes).await;
    assert_eq!(view.status, 101, "{}", view.text);
    assert_eq!(seen(&view.text, "x-forwarded-for").as_deref(), Some("127.0.0.1"), "{}", view.text);

    // The real client is not a trusted proxy: what it claims in headers is dropped.
    let forged = upgrade("/", "localhost", &[("X-Forwarded-For", "6.6.6.6"), ("X-Real-IP", "6.6.6.6")]);
    let view = exchange(from_trusted().await.unwrap(), format!("{}{forged}", proxy_v1("203.0.113.9")).as_bytes()).await;
    assert_eq!(view.status, 101, "{}", view.text);
    assert_eq!(seen(&view.text, "x-forwarded-for").as_deref(), Some("203.0.113.9"), "{}", view.text);
    assert!(!view.text.contains("6.6.6.6"), "{}", view.text);

    // Rate limits count the real client: a second connection from 203.0.113.7 is over its
    // limit (all of these came from one socket address, 127.0.0.1).
    let again = exchange(from_trusted().await.unwrap(), format!("{}{request}", proxy_v1("203.0.113.7")).as_bytes()).await;
    assert_eq!(again.status, 429, "{}", again.text);

    // Refused: a valid header from a peer that is not a trusted proxy (127.0.0.3), ...
    let untrusted = connect_from("127.0.0.3".parse().unwrap(), gw.listen_addr).await;
    let answer = exchange(untrusted, format!("{}{request}", proxy_v1("203.0.113.10")).as_bytes()).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert!(answer.text.contains("trusted proxy"), "{}", answer.text);
    // ... no header at all, ...
    let answer = exchange(from_trusted().await.unwrap(), request.as_bytes()).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert!(answer.text.contains("does not start with a PROXY protocol header"), "{}", answer.text);
    // ... headers that are not valid, ...
    let mut too_long = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
    too_long.extend_from_slice(&[0; 64]);
    let mut v2_udp = proxy_v2(1, 0x12, &[203, 0, 113, 11, 127, 0, 0, 1, 0, 1, 0, 80]);
    v2_udp.extend_from_slice(request.as_bytes());
    for bad in [
        format!("PROXY TCP4 203.0.113.11 127.0.0.1 99999 80\r\n{request}").into_bytes(),
        format!("PROXY TCP6 203.0.113.11 127.0.0.1 1 80\r\n{request}").into_bytes(),
        format!("PROXY TCP4 203.0.113.11 127.0.0.1 1 80\n{request}").into_bytes(),
        format!("PROXY UNKNOWN {}\r\n{request}", "x".repeat(120)).into_bytes(),
        too_long,
        v2_udp,
    ] {
        let answer = exchange(from_trusted().await.unwrap(), &bad).await;
        assert_eq!(answer.status, 400, "{:?}: {}", String::from_utf8_lossy(&bad), answer.text);
    }
    // ... and one that never finishes, cut off at the handshake timeout.
    let mut stalled = from_trusted().await.unwrap();
    stalled.write_all(b"PROXY TCP4 203.0.113.12").await.unwrap();
    let started = Instant::now();
    let answer = read_answer(stalled).await;
    assert_eq!(answer.status, 408, "{}", answer.text);
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

    // Honest clients behind the balancer still get through.
    let mut stream = from_trusted().await.unwrap();
    stream.write_all(format!("{}{request}", proxy_v1("198.51.100.1")).as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    stream.write_all(&client_text("still here")).await.unwrap();
    assert_eq!(server_frame(&mut stream).await.2, b"still here");
    gw.shutdown().await;
}

#[tokio::test]
async fn edge_config_errors_name_file_line_and_key() {
    let base = "[gateway]\nlisten = \"127.0.0.1:0\"\n{extra}\n[[upstream]]\nname = \"echo\"\nservers = [\"127.0.0.1:9\"]\n\n[[route]]\npath = \"/\"\nupstream = \"echo\"\n";
    for (extra, line, key, why) in [
        ("trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.1/8\"]", 3, "trusted_proxies", "host bits"),
        ("trusted_proxies = [\"localhost\"]", 3, "trusted_proxies", "not a CIDR"),
        ("proxy_protocol = true", 3, "proxy_protocol", "needs trusted_proxies"),
    ] {
        let err = Config::parse(&base.replace("{extra}", extra), "gw.toml", repo_root()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("gw.toml:{line}:")), "{err}");
        assert!(err.contains(&format!("key `{key}`")) && err.contains(why), "{err}");
    }
    let route = |path: &str| base.replace("{extra}", "").replace("path = \"/\"", &format!("path = \"{path}\""));
    for path in ["/./admin", "//admin", "/%61dmin", "/a;b"] {
        let err = Config::parse(&route(path), "gw.toml", repo_root()).unwrap_err().to_string();
        assert!(err.starts_with("gw.toml:9:") && err.contains("normal form"), "{path}: {err}");
    }
    let host = base.replace("{extra}", "").replace("[[route]]\n", "[[route]]\nhost = \"chat..example\"\n");
    let err = Config::parse(&host, "gw.toml", repo_root()).unwrap_err().to_string();
    assert!(err.starts_with("gw.toml:9:") && err.contains("key `host`"), "{err}");
}

/// Behind an L4 balancer every socket comes from the balancer: `max_connections_per_ip`
/// must count the client each PROXY header names, or one busy balancer would be refused.
#[tokio::test]
async fn per_address_limit_counts_the_client_a_proxy_header_names() {
    let backends = echo_backends(1).await;
    let toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
         max_connections_per_ip = 1\n\n{}[[route]]\npath = \"/\"\nupstream = \"echo\"\n",
        upstream(&backends),
    );
    let gw = start_gateway(&toml).await;
    let request = upgrade("/", "localhost", &[]);
    // Two clients through the same balancer address, each holding a connection.
    let mut held = Vec::new();
    for client in ["203.0.113.1", "203.0.113.2"] {
        let mut stream = TcpStream::connect(gw.listen_addr).await.unwrap();
        stream.write_all(format!("{}{request}", proxy_v1(client)).as_bytes()).await.unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{client}: {head}");
        held.push(stream);
    }
    // The first client's second connection is over its own limit.
    let stream = TcpStream::connect(gw.listen_addr).await.unwrap();
    let answer = exchange(stream, format!("{}{request}", proxy_v1("203.0.113.1")).as_bytes()).await;
    assert_eq!(answer.status, 429, "{}", answer.text);
    drop(held);
    gw.shutdown().await;
}
