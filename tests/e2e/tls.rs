//! `wss://` at the gateway: certificates made here with rcgen (a test CA signs them), real
//! TLS clients (rustls, Python `websockets`), certificate choice by SNI, reload under
//! traffic, mutual TLS, PROXY protocol in front of TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use wasmgate_tests::*;

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A certificate authority of the test's own.
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        TestCa { cert: params.self_signed(&key).unwrap(), key }
    }

    /// A leaf for `names` (DNS names or IP addresses) with common name `cn`.
    fn issue(&self, cn: &str, names: &[&str]) -> Leaf {
        self.issue_with(cn, names, |_| {})
    }

    fn issue_with(&self, cn: &str, names: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        edit(&mut params);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf { cert, key }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }
}

struct Leaf {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Leaf {
    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Writes `NAME.pem` and `NAME.key` into `dir`.
    fn write(&self, dir: &Path, name: &str) {
        std::fs::write(dir.join(format!("{name}.pem")), self.cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), self.key.serialize_pem()).unwrap();
    }

    fn client_auth(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (vec![self.der()], PrivateKeyDer::try_from(self.key.serialize_der()).unwrap())
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = wasmgate_tests::scratch_dir(&format!("tls-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A gateway config file in `dir` serving only `wss://`, with `certs` (names of files
/// written by [`Leaf::write`]) and `tls_extra` in `[gateway.tls]`.
fn write_tls_config(dir: &Path, backends: &[EchoServer], certs: &[&str], gateway_extra: &str, tls_extra: &str) -> PathBuf {
    let certs: Vec<String> = certs.iter().map(|c| format!("{{ cert = \"{c}.pem\", key = \"{c}.key\" }}")).collect();
    let text = format!(
        r#"
[gateway]
admin = "127.0.0.1:0"
admin_token = "{ADMIN_TOKEN}"
{gateway_extra}

[gateway.tls]
listen = "127.0.0.1:0"
certs = [{}]
{tls_extra}

[[upstream]]
name = "echo"
servers = {}

[[route]]
path = "/"
upstream = "echo"
"#,
        certs.join(", "),
        server_list(backends)
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn start_from(path: &Path) -> Gateway {
    Gateway::start(Config::load(path).expect("config loads")).await.expect("gateway starts")
}

fn client_config(ca: &TestCa, client_cert: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client_cert {
        Some(leaf) => {
            let (chain, key) = leaf.client_auth();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// A TLS connection to `addr` asking for `server_name` (an IP address sends no SNI).
async fn tls_connect(addr: SocketAddr, server_name: &str, config: Arc<ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tls_over(tcp, server_name, config).await
}

async fn tls_over(tcp: TcpStream, server_name: &str, config: Arc<ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), TlsConnector::from(config).connect(name, tcp)).await?
}

/// A WebSocket over TLS, and the certificate the server showed.
async fn wss(addr: SocketAddr, server_name: &str, config: Arc<ClientConfig>) -> (Wss, CertificateDer<'static>) {
    let tls = tls_connect(addr, server_name, config).await.expect("TLS handshake");
    let (_, session) = tls.get_ref();
    let leaf = session.peer_certificates().expect("the server showed a certificate")[0].clone();
    assert_eq!(session.alpn_protocol(), None, "the client offered no ALPN");
    let (ws, response) = tokio_tungstenite::client_async(format!("wss://{server_name}/"), tls).await.expect("upgrade");
    assert_eq!(response.status(), 101);
    (ws, leaf)
}

async fn echo(ws: &mut Wss, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("echo in time").expect("open").expect("frame");
    assert_eq!(reply, Message::text(text));
}

/// The upgrade request's headers as the echo backend saw them.
async fn upstream_headers(ws: &mut Wss) -> String {
    ws.send(Message::text("headers")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap() {
        Message::Text(t) => t.to_string(),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_echo_with_a_test_ca_and_https_forwarded_upstream() {
    let dir = tempdir("basic");
    let ca = TestCa::new("wasmgate test CA");
    ca.issue("localhost", &["localhost", "127.0.0.1"]).write(&dir, "localhost");
    let backends = echo_backends(1).await;
    let gw = start_from(&write_tls_config(&dir, &backends, &["localhost"], "", "")).await;
    let addr = gw.tls_addr.expect("a TLS listener");
    assert_eq!(gw.listen_addr, addr, "no plain listener: listen_addr is the TLS one");

    let (mut ws, _) = wss(addr, "localhost", client_config(&ca, None)).await;
    echo(&mut ws, "hello over TLS").await;
    // A TLS 1.3 key update from the client, asking for the gateway's: messages still flow
    // both ways under the new keys.
    ws.get_mut().get_mut().1.refresh_traffic_keys().expect("key update");
    echo(&mut ws, "after a key update").await;
    let big = "x".repeat(200_000);
    echo(&mut ws, &big).await;
    let headers = upstream_headers(&mut ws).await;
    assert!(headers.contains("x-forwarded-proto: https\n"), "{headers}");
    assert!(headers.contains("forwarded: for=127.0.0.1;proto=https;host=\"localhost\"\n"), "{headers}");
    ws.close(None).await.unwrap();

    // The ALPN offer of a browser gets http/1.1.
    let mut config = (*client_config(&ca, None)).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = tls_connect(addr, "localhost", Arc::new(config)).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    // A third-party client: Python websockets, trusting the test CA only.
    let mut command = std::process::Command::new(python());
    command
        .arg(repo_root().join("tests/python/websockets_client.py"))
        .arg(format!("wss://localhost:{}/", addr.port()))
        .env("SSL_CERT_FILE", dir.join("ca.pem"));
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "websockets over wss failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_exact_then_wildcard_then_the_first() {
    let dir = tempdir("sni");
    let ca = TestCa::new("wasmgate test CA");
    let first = ca.issue("default", &["localhost", "127.0.0.1"]);
    let chat = ca.issue("chat", &["chat.example.com"]);
    let star = ca.issue("star", &["*.example.com"]);
    first.write(&dir, "first");
    star.write(&dir, "star");
    chat.write(&dir, "chat");
    let backends = echo_backends(1).await;
    // The wildcard comes before the exact name: exact still wins.
    let gw = start_from(&write_tls_config(&dir, &backends, &["first", "star", "chat"], "", "")).await;
    let addr = gw.tls_addr.unwrap();
    let config = client_config(&ca, None);

    for (name, expected, which) in [
        ("chat.example.com", chat.der(), "exact"),
        ("CHAT.Example.com", chat.der(), "exact, any case"),
        ("api.example.com", star.der(), "wildcard"),
        ("localhost", first.der(), "no match: the first"),
        ("127.0.0.1", first.der(), "no SNI: the first"),
    ] {
        let (mut ws, leaf) = wss(addr, name, config.clone()).await;
        assert!(leaf == expected, "{name}: expected the {which} certificate");
        echo(&mut ws, name).await;
    }
    // A wildcard covers one label: a.b.example.com gets the first certificate, which the
    // client rightly refuses.
    let err = tls_connect(addr, "a.b.example.com", config).await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_comes_before_the_client_hello() {
    let dir = tempdir("proxy");
    let ca = TestCa::new("wasmgate test CA");
    ca.issue("localhost", &["localhost"]).write(&dir, "localhost");
    let backends = echo_backends(1).await;
    let extra = "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]";
    let gw = start_from(&write_tls_config(&dir, &backends, &["localhost"], extra, "")).await;
    let mut tcp = TcpStream::connect(gw.tls_addr.unwrap()).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 443\r\n").await.unwrap();
    let tls = tls_over(tcp, "localhost", client_config(&ca, None)).await.expect("TLS after the PROXY header");
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/", tls).await.unwrap();
    let headers = upstream_headers(&mut ws).await;
    assert!(headers.contains("x-forwarded-for: 203.0.113.7\n"), "{headers}");
    assert!(headers.contains("forwarded: for=203.0.113.7;proto=https;"), "{headers}");
    gw.shutdown().await;
}

/// Config errors name the file at fault (and the config's line and key).
#[tokio::test]
async fn broken_certificate_files_are_refused_naming_the_file() {
    let dir = tempdir("broken");
    let ca = TestCa::new("wasmgate test CA");
    let good = ca.issue("good", &["localhost"]);
    good.write(&dir, "good");
    let other = ca.issue("other", &["localhost"]);
    // good.pem with other's key: a key that is not the certificate's.
    std::fs::write(dir.join("mismatch.pem"), good.cert.pem()).unwrap();
    std::fs::write(dir.join("mismatch.key"), other.key.serialize_pem()).unwrap();
    ca.issue_with("expired", &["localhost"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    })
    .write(&dir, "expired");
    let backends = echo_backends(1).await;
    for (cert, expect) in [
        ("missing", "missing.pem: cannot read"),
        ("mismatch", "mismatch.key: the key does not belong to the certificate in"),
        ("expired", "expired.pem: the certificate (CN=expired) expired on"),
    ] {
        let path = write_tls_config(&dir, &backends, &["good", cert], "", "");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("gateway.toml:9:") && err.contains("key `certs`"), "{err}");
        assert!(err.contains(expect), "{cert}: {err}");
    }
    let path = write_tls_config(&dir, &backends, &["good"], "", "client_ca = \"no-ca.pem\"");
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("key `client_ca`") && err.contains("no-ca.pem: cannot read"), "{err}");

    // Neither listener: refused.
    let text = std::fs::read_to_string(write_tls_config(&dir, &backends, &["good"], "", "")).unwrap();
    let no_listener = text.split("[gateway.tls]").next().unwrap().to_string() + "[[route]]\nupstream = \"echo\"\n";
    let err = Config::parse(&no_listener, "x.toml", dir.clone()).unwrap_err().to_string();
    assert!(err.contains("needs `listen`, or a [gateway.tls]"), "{err}");
}

/// Keys as PKCS#8, SEC1 ("EC PRIVATE KEY") and PKCS#1 ("RSA PRIVATE KEY", an RSA
/// certificate), the last two made by the openssl command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_pkcs8_sec1_and_pkcs1() {
    let dir = tempdir("keys");
    let ca = TestCa::new("wasmgate test CA");
    let ec = ca.issue("ec", &["ec.test"]);
    ec.write(&dir, "ec");
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(&dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&["ec", "-in", "ec.key", "-out", "sec1.key"]);
    std::fs::copy(dir.join("ec.pem"), dir.join("sec1.pem")).unwrap();
    assert!(std::fs::read_to_string(dir.join("sec1.key")).unwrap().contains("BEGIN EC PRIVATE KEY"));
    // An RSA key in PKCS#1, its certificate signed by the test CA.
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    std::fs::write(dir.join("ca.key"), ca.key.serialize_pem()).unwrap();
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:rsa.test\n").unwrap();
    openssl(&["genrsa", "-traditional", "-out", "rsa.key", "2048"]);
    openssl(&["req", "-new", "-key", "rsa.key", "-subj", "/CN=rsa.test", "-out", "rsa.csr"]);
    openssl(&["x509", "-req", "-in", "rsa.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-days", "2", "-extfile", "san.ext", "-out", "rsa.pem"]);
    assert!(std::fs::read_to_string(dir.join("rsa.key")).unwrap().contains("BEGIN RSA PRIVATE KEY"));

    let backends = echo_backends(1).await;
    let gw = start_from(&write_tls_config(&dir, &backends, &["ec", "sec1", "rsa"], "", "")).await;
    let config = client_config(&ca, None);
    let (mut ws, _) = wss(gw.tls_addr.unwrap(), "rsa.test", config.clone()).await;
    echo(&mut ws, "rsa").await;
    let (mut ws, _) = wss(gw.tls_addr.unwrap(), "ec.test", config).await;
    echo(&mut ws, "ec").await;
    gw.shutdown().await;
}

/// 100 live `wss` connections keep echoing while the certificate is replaced; new
/// connections get the new one; a broken replacement is refused, naming the file, and the
/// certificate in force keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_under_traffic() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempdir("reload");
    let ca = TestCa::new("wasmgate test CA");
    let old = ca.issue("old", &["localhost"]);
    old.write(&dir, "site");
    let backends = echo_backends(1).await;
    let gw = start_from(&write_tls_config(&dir, &backends, &["site"], "", "")).await;
    let addr = gw.tls_addr.unwrap();
    let config = client_config(&ca, None);

    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(AtomicU64::new(0));
    let mut live = Vec::new();
    for i in 0..100 {
        let (mut ws, leaf) = wss(addr, "localhost", config.clone()).await;
        assert!(leaf == old.der());
        let (stop, echoes) = (stop.clone(), echoes.clone());
        live.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                echo(&mut ws, &format!("conn {i} message {n}")).await;
                n += 1;
                echoes.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ws.close(None).await.unwrap();
        }));
    }
    let traffic_goes_on = |echoes: Arc<AtomicU64>| async move {
        let before = echoes.load(Ordering::Relaxed);
        assert!(eventually(Duration::from_secs(10), || echoes.load(Ordering::Relaxed) >= before + 500).await, "echoes stalled");
    };
    traffic_goes_on(echoes.clone()).await;

    let new = ca.issue("new", &["localhost"]);
    new.write(&dir, "site");
    gw.reload_from_source().await.expect("the new certificate is taken");
    let (mut ws, leaf) = wss(addr, "localhost", config.clone()).await;
    assert!(leaf == new.der(), "a new connection gets the new certificate");
    echo(&mut ws, "new").await;
    traffic_goes_on(echoes.clone()).await;

    // A key that is not the certificate's: refused, the new certificate stays.
    std::fs::write(dir.join("site.key"), ca.issue("stray", &["localhost"]).key.serialize_pem()).unwrap();
    let err = gw.reload_from_source().await.unwrap_err();
    assert!(err.contains("site.key: the key does not belong to the certificate in"), "{err}");
    let (mut ws, leaf) = wss(addr, "localhost", config.clone()).await;
    assert!(leaf == new.der(), "the certificate in force keeps serving");
    echo(&mut ws, "still").await;
    // A missing file: the same.
    std::fs::remove_file(dir.join("site.pem")).unwrap();
    let err = gw.reload_from_source().await.unwrap_err();
    assert!(err.contains("site.pem: cannot read"), "{err}");
    traffic_goes_on(echoes.clone()).await;

    stop.store(true, Ordering::Relaxed);
    for task in live {
        task.await.expect("a live connection kept echoing through the reloads");
    }
    gw.shutdown().await;
}

/// A WebSocket over TLS, and whether its TLS session was resumed from a ticket.
async fn wss_resuming(addr: SocketAddr, config: Arc<ClientConfig>) -> (Wss, bool) {
    let tls = tls_connect(addr, "localhost", config).await.expect("TLS handshake");
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let (mut ws, response) = tokio_tungstenite::client_async("wss://localhost/", tls).await.expect("upgrade");
    assert_eq!(response.status(), 101);
    // The session ticket comes with the 101; an echo makes sure the client has read it.
    echo(&mut ws, "ticket?").await;
    (ws, resumed)
}

/// Sessions resume from stateless tickets: a client's every reconnection skips the
/// certificate (one ticket per connection is enough, as each brings a fresh one), and so do
/// more clients than a session cache holds (rustls's default cache keeps 256). After a
/// certificate reload nobody resumes a session made under the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_from_tickets_until_a_reload() {
    let dir = tempdir("resume");
    let ca = TestCa::new("wasmgate test CA");
    ca.issue("old", &["localhost"]).write(&dir, "site");
    let backends = echo_backends(1).await;
    let gw = start_from(&write_tls_config(&dir, &backends, &["site"], "", "")).await;
    let addr = gw.tls_addr.unwrap();

    let one = client_config(&ca, None);
    let (ws, resumed) = wss_resuming(addr, one.clone()).await;
    assert!(!resumed, "the first connection is a full handshake");
    drop(ws);
    for i in 0..4 {
        let (ws, resumed) = wss_resuming(addr, one.clone()).await;
        assert!(resumed, "reconnection {i} resumed");
        drop(ws);
    }

    // 400 clients, each with its own session store: all come back resumed.
    let clients: Vec<_> = (0..400).map(|_| client_config(&ca, None)).collect();
    for config in &clients {
        let (ws, resumed) = wss_resuming(addr, config.clone()).await;
        assert!(!resumed);
        drop(ws);
    }
    let mut again = 0;
    for config in &clients {
        let (ws, resumed) = wss_resuming(addr, config.clone()).await;
        again += resumed as usize;
        drop(ws);
    }
    assert_eq!(again, clients.len(), "every client resumed its session");

    let new = ca.issue("new", &["localhost"]);
    new.write(&dir, "site");
    gw.reload_from_source().await.expect("the new certificate is taken");
    let tls = tls_connect(addr, "localhost", one.clone()).await.expect("TLS handshake");
    let session = tls.get_ref().1;
    assert_eq!(session.handshake_kind(), Some(rustls::HandshakeKind::Full), "no resumption across a reload");
    assert!(session.peer_certificates().unwrap()[0] == new.der(), "the new certificate was checked");
    gw.shutdown().await;
}

/// With `client_ca`, a client without a certificate, or with one from another CA, is
/// refused in the TLS handshake; one with a certificate the CA signed gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate() {
    let dir = tempdir("mtls");
    let ca = TestCa::new("wasmgate test CA");
    ca.issue("localhost", &["localhost"]).write(&dir, "localhost");
    let clients = TestCa::new("wasmgate client CA");
    std::fs::write(dir.join("clients.pem"), clients.cert.pem()).unwrap();
    let client_leaf = |issuer: &TestCa, cn: &str| {
        issuer.issue_with(cn, &["alice.example.com"], |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        })
    };
    let backends = echo_backends(1).await;
    let gw = start_from(&write_tls_config(&dir, &backends, &["localhost"], "", "client_ca = \"clients.pem\"")).await;
    let addr = gw.tls_addr.unwrap();

    let upgrade = |config: Arc<ClientConfig>| async move {
        let tls = tls_connect(addr, "localhost", config).await?;
        tokio_tungstenite::client_async("wss://localhost/", tls).await.map_err(std::io::Error::other)
    };
    let err = upgrade(client_config(&ca, None)).await.err().expect("no certificate: refused");
    assert!(format!("{err:?}").contains("CertificateRequired"), "{err:?}");
    let stranger = TestCa::new("someone else's CA");
    let err = upgrade(client_config(&ca, Some(&client_leaf(&stranger, "mallory")))).await.err().expect("unknown CA: refused");
    assert!(format!("{err:?}").contains("UnknownCA"), "{err:?}");

    let (mut ws, _) = upgrade(client_config(&ca, Some(&client_leaf(&clients, "alice")))).await.expect("a certificate of the CA gets through");
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    gw.shutdown().await;
}

/// Plugins see TLS (contract 0.5.0 and later): the shipped tls-identity plugin lets in the client
/// certificate its allow list names and tells the upstream its subject, SANs, fingerprint,
/// SNI name and TLS version; another certificate of the same CA gets 403, and a client's own
/// identity headers never reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_the_client_certificate() {
    let dir = tempdir("tls-identity");
    let ca = TestCa::new("wasmgate test CA");
    ca.issue("chat.test", &["chat.test"]).write(&dir, "chat");
    let clients = TestCa::new("wasmgate client CA");
    std::fs::write(dir.join("clients.pem"), clients.cert.pem()).unwrap();
    let client = |cn: &str, san: &str| {
        clients.issue_with(cn, &[san], |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        })
    };
    let backends = echo_backends(1).await;
    let text = format!(
        r#"
[gateway.tls]
listen = "127.0.0.1:0"
certs = [{{ cert = "chat.pem", key = "chat.key" }}]
client_ca = "clients.pem"

[[upstream]]
name = "echo"
servers = {}

[[plugin]]
name = "identity"
wasm = "{}"
config = {{ allow_sans = ["DNS:kiosk-7.devices.test"] }}

[[route]]
path = "/"
upstream = "echo"
plugins = ["identity"]
"#,
        server_list(&backends),
        plugin_wasm("tls-identity").display()
    );
    std::fs::write(dir.join("gateway.toml"), text).unwrap();
    let gw = start_from(&dir.join("gateway.toml")).await;
    let addr = gw.tls_addr.unwrap();

    let kiosk = client("kiosk 7", "kiosk-7.devices.test");
    let kiosk_sha256: String = {
        use sha2::Digest;
        sha2::Sha256::digest(kiosk.der().as_ref()).iter().map(|b| format!("{b:02x}")).collect()
    };
    let tls = tls_connect(addr, "chat.test", client_config(&ca, Some(&kiosk))).await.expect("TLS handshake");
    let mut request = "wss://chat.test/".into_client_request().unwrap();
    request.headers_mut().insert("x-client-cert-subject", "CN=admin".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::client_async(request, tls).await.expect("the allowed certificate gets through");
    assert_eq!(response.status(), 101);
    let seen = upstream_headers(&mut ws).await.to_ascii_lowercase();
    assert!(seen.contains("x-client-cert-subject: cn=kiosk 7"), "{seen}");
    assert!(!seen.contains("cn=admin"), "the client's own claim was forwarded: {seen}");
    assert!(seen.contains("x-client-cert-sans: dns:kiosk-7.devices.test"), "{seen}");
    assert!(seen.contains(&format!("x-client-cert-sha256: {kiosk_sha256}")), "{seen}");
    assert!(seen.contains("x-client-cert-sni: chat.test"), "{seen}");
    assert!(seen.contains("x-client-cert-tls-version: tlsv1.3"), "{seen}");
    echo(&mut ws, "still a WebSocket").await;

    // Same CA, a SAN the allow list does not name: the TLS handshake passes, the plugin
    // refuses the upgrade with a status.
    let other = client("kiosk 8", "kiosk-8.devices.test");
    let tls = tls_connect(addr, "chat.test", client_config(&ca, Some(&other))).await.expect("TLS handshake");
    match tokio_tungstenite::client_async("wss://chat.test/", tls).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    gw.shutdown().await;
}

/// The Autobahn TestSuite cases (kosoku) through the TLS listener. kosoku speaks plain
/// WebSocket only, so stunnel (client mode) puts TLS in front of it: kosoku -> stunnel ->
/// wss -> gateway -> echo backend. No case may FAIL; the compression cases must be OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_through_the_tls_listener_finds_no_failure() {
    let dir = tempdir("autobahn");
    let ca = TestCa::new("wasmgate test CA");
    ca.issue("localhost", &["localhost"]).write(&dir, "localhost");
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    let backends = echo_backends(1).await;
    let extra = "max_message_size = 67108864\ncompression = \"terminate\"";
    let gw = start_from(&write_tls_config(&dir, &backends, &["localhost"], extra, "")).await;

    let tunnel_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = format!(
        "foreground = yes\npid =\n[wss]\nclient = yes\naccept = 127.0.0.1:{tunnel_port}\nconnect = {}\n\
         sni = localhost\nverifyChain = yes\ncheckHost = localhost\nCAfile = {}\n",
        gw.tls_addr.unwrap(),
        dir.join("ca.pem").display()
    );
    std::fs::write(dir.join("stunnel.conf"), conf).unwrap();
    let _stunnel = KillOnDrop(
        std::process::Command::new("stunnel4")
            .arg(dir.join("stunnel.conf"))
            .stderr(std::fs::File::create(dir.join("stunnel.log")).unwrap())
            .spawn()
            .expect("stunnel4 runs (Debian package stunnel4)"),
    );
    let tunnel: SocketAddr = format!("127.0.0.1:{tunnel_port}").parse().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(tunnel).is_ok()).await,
        "stunnel did not listen: {}",
        std::fs::read_to_string(dir.join("stunnel.log")).unwrap_or_default()
    );

    let outdir = dir.join("report");
    std::fs::create_dir_all(&outdir).unwrap();
    let mut command = std::process::Command::new(python().parent().unwrap().join("kosoku"));
    command.args(["-m", "fuzzingclient", &tunnel.to_string(), "-p", "4", "-o"]).arg(&outdir);
    let out = tokio::task::spawn_blocking(move || command.output().expect("kosoku runs")).await.unwrap();
    let report = autobahn_report(&outdir, &out.stderr);
    println!("Autobahn through stunnel and the TLS listener: {:?}", report.counts);
    assert_eq!(report.cases, 517, "all cases ran");
    assert!(report.failed.is_empty(), "FAILED, or compression cases not OK: {:?}", report.failed);
    gw.shutdown().await;
}
