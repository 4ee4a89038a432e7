//! Upstreams over `wss://`: the gateway verifies each backend's certificate against a private
//! CA named in the pool's `tls` key (or the system's roots), presents a client certificate
//! when the pool has one, and probes health over the same TLS.
//!
//! The certificates are made by the tests (rcgen): a private CA signs the backends' and the
//! gateway's client certificate. The backends are small wss echo servers (tokio-rustls and
//! tokio-tungstenite) that answer `peer` with what they know of the gateway's certificate.
//!
//! The gateway answers the client's upgrade only once the upstream WebSocket is open, so a
//! 101 shows the TLS connection to the backend was made and verified.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// A private CA and the files it signs, in a directory of their own.
struct Pki {
    dir: PathBuf,
    ca: Certificate,
    ca_key: KeyPair,
}

/// A certificate and its key, as PEM files.
#[derive(Clone)]
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    /// A new CA; its certificate is `ca.pem` in `dir()`.
    fn new(name: &str) -> Pki {
        let dir = wasmgate_tests::scratch_dir(&format!("tls-upstream-{name}"));
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("wasmgate test CA {name}"));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        Pki { dir, ca: cert, ca_key: key }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `names` (DNS names or IP addresses) with common name `cn`, signed
    /// by this CA, written as `file.pem` and `file.key`.
    fn issue(&self, file: &str, cn: &str, names: &[&str]) -> CertFiles {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let files = CertFiles { cert: self.dir.join(format!("{file}.pem")), key: self.dir.join(format!("{file}.key")) };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A wss echo backend: text and binary messages come back; `peer` is answered with the
/// subject of the client certificate the gateway presented, or "no client certificate".
struct TlsEchoBackend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsEchoBackend {
    /// Serves `cert` on `addr` (port 0 for any); with `client_ca`, a client certificate
    /// signed by it is required.
    async fn start(addr: &str, cert: &CertFiles, client_ca: Option<&Path>) -> TlsEchoBackend {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&cert.cert).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).unwrap() {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let peer = match tls.get_ref().1.peer_certificates() {
                        Some([leaf, ..]) => format!("client certificate {}", subject_cn(leaf)),
                        _ => "no client certificate".to_string(),
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else { return };
                    while let Some(Ok(msg)) = ws.next().await {
                        let reply = match msg {
                            Message::Text(t) if t.as_str() == "peer" => Message::text(peer.clone()),
                            m @ (Message::Text(_) | Message::Binary(_)) => m,
                            Message::Close(_) => break,
                            _ => continue,
                        };
                        if ws.send(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        TlsEchoBackend { addr, task }
    }
}

impl Drop for TlsEchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The common name in a DER certificate, found by its OID (2.5.4.3) followed by a string.
fn subject_cn(der: &[u8]) -> String {
    let oid = [0x06, 0x03, 0x55, 0x04, 0x03];
    let positions: Vec<usize> = (0..der.len().saturating_sub(oid.len())).filter(|&i| der[i..].starts_with(&oid)).collect();
    // The issuer's name comes first in the certificate, the subject's after it.
    let Some(&at) = positions.last() else { return "?".into() };
    let value = &der[at + oid.len()..];
    let len = value[1] as usize;
    String::from_utf8_lossy(&value[2..2 + len]).into_owned()
}

/// A gateway config whose upstream `echo` has `servers` and `tls`, with `upstream_extra`.
fn config(servers: &str, tls: &str, upstream_extra: &str) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\n\
         [[upstream]]\nname = \"echo\"\nservers = {servers}\nconnect_timeout_ms = 2000\n{tls}\n{upstream_extra}\n\n\
         [[route]]\npath = \"/\"\nupstream = \"echo\"\n"
    )
}

fn tls_key(ca: &Path, server_name: &str) -> String {
    format!("tls = {{ ca = \"{}\", server_name = \"{server_name}\" }}", ca.display())
}

/// The status of a WebSocket upgrade to `gw` (101 once the upstream WebSocket is open).
async fn status_of_upgrade(gw: &Gateway) -> (u16, String) {
    let request = upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
    raw_http(gw.listen_addr, &request).await
}

#[tokio::test]
async fn messages_echo_through_a_wss_upstream_verified_by_a_private_ca() {
    let pki = Pki::new("echo");
    let backend = TlsEchoBackend::start("127.0.0.1:0", &pki.issue("backend", "backend", &["backend.internal"]), None).await;
    let servers = format!("[\"wss://{}/\"]", backend.addr);
    let gw = start_gateway(&config(&servers, &tls_key(&pki.ca(), "backend.internal"), "")).await;

    let mut ws = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("over tls")).await, Message::text("over tls"));
    assert_eq!(roundtrip(&mut ws, Message::text("peer")).await, Message::text("no client certificate"));
    // Larger than a TLS record (16 KiB) both ways, and many small ones in a burst.
    let big = Message::binary(vec![0x5a; 1 << 20]);
    assert_eq!(roundtrip(&mut ws, big.clone()).await, big);
    for i in 0..200 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    for i in 0..200 {
        assert_eq!(next_data(&mut ws).await, Message::text(format!("m{i}")));
    }
    // The backend's answer comes back through TLS (tungstenite answers an empty close with 1000).
    ws.send(Message::Close(None)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1000);
}

#[tokio::test]
async fn an_ip_address_is_verified_against_the_certificate_without_server_name() {
    let pki = Pki::new("ip");
    let backend = TlsEchoBackend::start("127.0.0.1:0", &pki.issue("backend", "backend", &["127.0.0.1"]), None).await;
    let servers = format!("[\"wss://{}/\"]", backend.addr);
    let tls = format!("tls = {{ ca = \"{}\" }}", pki.ca().display());
    let gw = start_gateway(&config(&servers, &tls, "")).await;
    let (status, text) = status_of_upgrade(&gw).await;
    assert_eq!(status, 101, "{text}");
    // The same certificate for another address fails.
    let tls = format!("tls = {{ ca = \"{}\", server_name = \"127.0.0.2\" }}", pki.ca().display());
    let gw = start_gateway(&config(&servers, &tls, "")).await;
    let (status, text) = status_of_upgrade(&gw).await;
    assert!(status == 502 && text.contains("not valid for name"), "{text}");
}

/// Certificates that fail verification: each is a 502 whose reason names the failure, and
/// the gateway logs the reason. The gateway binary runs here so its log can be read.
#[tokio::test]
async fn a_certificate_that_fails_verification_is_a_502_and_logged_with_the_reason() {
    let pki = Pki::new("reject");
    let other_pki = Pki::new("other");
    let wrong_name = TlsEchoBackend::start("127.0.0.1:0", &pki.issue("wrong", "wrong", &["other.internal"]), None).await;
    let unknown_ca = TlsEchoBackend::start("127.0.0.1:0", &other_pki.issue("stranger", "s", &["backend.internal"]), None).await;

    for (backend, tls, why) in [
        (&wrong_name, tls_key(&pki.ca(), "backend.internal"), "certificate not valid for name"),
        (&unknown_ca, tls_key(&pki.ca(), "backend.internal"), "UnknownIssuer"),
        // No `tls` key: the system's roots, which know nothing of a private CA.
        (&wrong_name, String::new(), "UnknownIssuer"),
    ] {
        let servers = format!("[\"wss://{}/\"]", backend.addr);
        let path = write_config("tls-reject.toml", &config(&servers, &tls, ""));
        let log = path.with_extension("log");
        let mut child = std::process::Command::new(gateway_binary())
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let child = KillOnDrop(child);
        let addr: SocketAddr = line.trim().rsplit("ws://").next().unwrap().parse().unwrap();

        let request = upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
        let (status, text) = raw_http(addr, &request).await;
        assert_eq!(status, 502, "{text}");
        assert!(text.contains("TLS handshake failed") && text.contains(why), "{why}: {text}");
        let logged = eventually(Duration::from_secs(5), || {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            log.lines().any(|l| l.contains("upstream connect failed") && l.contains(why))
        })
        .await;
        drop(child);
        assert!(logged, "no log line with {why:?}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }
}

/// A server whose certificate fails is passed over for the next one: every client reaches
/// the good server.
#[tokio::test]
async fn a_failing_certificate_moves_on_to_the_next_server() {
    let pki = Pki::new("next");
    let bad = TlsEchoBackend::start("127.0.0.1:0", &pki.issue("bad", "bad", &["other.internal"]), None).await;
    let good = TlsEchoBackend::start("127.0.0.1:0", &pki.issue("good", "good", &["backend.internal"]), None).await;
    let servers = format!("[\"wss://{}/\", \"wss://{}/\"]", bad.addr, good.addr);
    let gw = start_gateway(&config(&servers, &tls_key(&pki.ca(), "backend.internal"), "eject_after = 0")).await;
    // Round robin starts every other connection at the bad server.
    for _ in 0..4 {
        let (status, text) = status_of_upgrade(&gw).await;
        assert_eq!(status, 101, "{text}");
    }
}

#[tokio::test]
async fn a_client_certificate_is_presented_to_a_backend_that_requires_one() {
    let pki = Pki::new("mtls");
    let backend_cert = pki.issue("backend", "backend", &["backend.internal"]);
    let backend = TlsEchoBackend::start("127.0.0.1:0", &backend_cert, Some(&pki.ca())).await;
    let client = pki.issue("gateway", "wasmgate gateway", &["gateway.internal"]);
    let servers = format!("[\"wss://{}/\"]", backend.addr);

    let with_cert = format!(
        "tls = {{ ca = \"{}\", server_name = \"backend.internal\", cert = \"{}\", key = \"{}\" }}",
        pki.ca().display(),
        client.cert.display(),
        client.key.display()
    );
    let gw = start_gateway(&config(&servers, &with_cert, "")).await;
    let (status, text) = status_of_upgrade(&gw).await;
    assert_eq!(status, 101, "{text}");

    // The same backend without a client certificate in the pool: refused, a 502.
    let without = start_gateway(&config(&servers, &tls_key(&pki.ca(), "backend.internal"), "")).await;
    let (status, text) = status_of_upgrade(&without).await;
    assert_eq!(status, 502, "{text}");
}

/// The backend sees the gateway's client certificate.
#[tokio::test]
async fn the_backend_sees_the_gateways_client_certificate() {
    let pki = Pki::new("mtls-peer");
    let backend = TlsEchoBackend::start("127.0.0.1:0", &pki.issue("backend", "backend", &["backend.internal"]), Some(&pki.ca())).await;
    let client = pki.issue("gateway", "wasmgate gateway", &["gateway.internal"]);
    let tls = format!(
        "tls = {{ ca = \"{}\", server_name = \"backend.internal\", cert = \"{}\", key = \"{}\" }}",
        pki.ca().display(),
        client.cert.display(),
        client.key.display()
    );
    let gw = start_gateway(&config(&format!("[\"wss://{}/\"]", backend.addr), &tls, "")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("peer")).await, Message::text("client certificate wasmgate gateway"));
    assert_eq!(roundtrip(&mut ws, Message::text("hello")).await, Message::text("hello"));
}

/// `GET /upstreams` health of each server of pool `echo`, by address.
async fn healthy(gw: &Gateway) -> std::collections::BTreeMap<String, bool> {
    let (status, text) = admin_request(gw, "GET", "/upstreams").await;
    assert_eq!(status, 200, "{text}");
    let body: serde_json::Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    let pool = body["pools"].as_array().unwrap().iter().find(|p| p["name"] == "echo").unwrap().clone();
    pool["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["address"].as_str().unwrap().to_string(), s["healthy"].as_bool().unwrap()))
        .collect()
}

async fn wait_health(gw: &Gateway, expected: &[(SocketAddr, bool)]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = healthy(gw).await;
        if expected.iter().all(|(addr, up)| now.get(&addr.to_string()) == Some(up)) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "expected {expected:?}, have {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Health probes speak TLS and verify like connections do: a backend whose certificate fails
/// is marked down (both probe kinds); a good one goes down when it stops and up again when it
/// is back.
#[tokio::test]
async fn health_probes_over_tls_mark_backends_up_and_down() {
    let pki = Pki::new("health");
    let good_cert = pki.issue("good", "good", &["backend.internal"]);
    let good = TlsEchoBackend::start("127.0.0.1:0", &good_cert, None).await;
    let bad = TlsEchoBackend::start("127.0.0.1:0", &pki.issue("bad", "bad", &["other.internal"]), None).await;
    let servers = format!("[\"wss://{}/\", \"wss://{}/\"]", good.addr, bad.addr);
    let tls = tls_key(&pki.ca(), "backend.internal");
    for kind in ["websocket", "tcp"] {
        let health = format!("health = {{ kind = \"{kind}\", interval_ms = 50, timeout_ms = 500, rise = 2, fall = 2 }}");
        let gw = start_gateway(&config(&servers, &tls, &health)).await;
        wait_health(&gw, &[(good.addr, true), (bad.addr, false)]).await;
    }

    let health = "health = { interval_ms = 50, timeout_ms = 500, rise = 2, fall = 2, path = \"/probe\" }";
    let gw = start_gateway(&config(&servers, &tls, health)).await;
    wait_health(&gw, &[(good.addr, true), (bad.addr, false)]).await;
    let addr = good.addr;
    drop(good);
    wait_health(&gw, &[(addr, false)]).await;
    let good = TlsEchoBackend::start(&addr.to_string(), &good_cert, None).await;
    wait_health(&gw, &[(good.addr, true), (bad.addr, false)]).await;
}

/// Config errors name the file, line and key: a `tls` key without a wss:// server, a CA file
/// that is missing, a certificate without its key.
#[tokio::test]
async fn bad_tls_settings_are_config_errors() {
    let pki = Pki::new("config");
    let client = pki.issue("client", "client", &["client.internal"]);
    for (servers, tls, why) in [
        ("[\"127.0.0.1:1\"]", tls_key(&pki.ca(), "x"), "no server is wss://"),
        ("[\"wss://127.0.0.1:1/\"]", tls_key(&pki.dir.join("missing.pem"), "x"), "missing.pem"),
        ("[\"wss://127.0.0.1:1/\"]", format!("tls = {{ ca = \"{}\" }}", client.key.display()), "no CERTIFICATE"),
        (
            "[\"wss://127.0.0.1:1/\"]",
            format!("tls = {{ ca = \"{}\", cert = \"{}\" }}", pki.ca().display(), client.cert.display()),
            "cert and key go together",
        ),
        ("[\"wss://127.0.0.1:1/\"]", "tls = { verify = false }".to_string(), "unknown field `verify`"),
    ] {
        let text = config(servers, &tls, "");
        let line = text.lines().position(|l| l.starts_with("tls =")).unwrap() + 1;
        let err = Config::parse(&text, "gw.toml", repo_root()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("gw.toml:{line}:")) && err.contains("key `tls`"), "{err}");
        assert!(err.contains(why), "{why}: {err}");
    }
}
