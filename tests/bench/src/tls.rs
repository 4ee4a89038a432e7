//! TLS for the `-tls` columns: one ECDSA P-256 certificate, made when the run starts and
//! served by every proxy (wasmgate, nginx, HAProxy), and the client side of the load
//! generator.
//!
//! The client never resumes a session, so every new connection is a full TLS 1.3 handshake
//! on every proxy. It offers the cipher suites in a browser's order (Chrome and Firefox put
//! `TLS_AES_128_GCM_SHA256` first; rustls's own default puts AES-256 with SHA-384 first):
//! the proxies' clients are browsers.
//!
//! It checks the certificate chain and the server's signature on the first handshake, and
//! after that trusts the same certificate without checking signatures again, as load
//! generators do (h2load and wrk never check). An ECDSA verification costs the client
//! more than the signature costs the server, and the client runs on the same two cores as
//! the proxies: checking every time made the load generator, not the proxy, set the rate.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::sync::Mutex;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CipherSuite, DigitallySignedStruct, SignatureScheme, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The run's certificate files, in the run's directory.
pub struct TlsFiles {
    /// The leaf's PEM certificate (for 127.0.0.1 and localhost, signed by the run's CA).
    pub cert: PathBuf,
    /// Its PKCS#8 key.
    pub key: PathBuf,
    /// Certificate then key in one file, as HAProxy's `crt` takes them.
    pub combined: PathBuf,
}

impl TlsFiles {
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles { cert: dir.join("tls-cert.pem"), key: dir.join("tls-key.pem"), combined: dir.join("tls-combined.pem") }
    }
}

/// The certificate of the run: its files and the CA that signed it.
pub struct BenchCert {
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

impl BenchCert {
    /// Makes a CA and an ECDSA P-256 leaf it signs, written into `dir` (see [`TlsFiles`]).
    pub fn make(dir: &Path) -> anyhow::Result<BenchCert> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "wasmgate bench CA");
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &issuer)?;

        let files = TlsFiles::in_dir(dir);
        std::fs::write(&files.cert, leaf.pem()).context("writing the certificate")?;
        std::fs::write(&files.key, key.serialize_pem()).context("writing the key")?;
        std::fs::write(&files.combined, format!("{}{}", leaf.pem(), key.serialize_pem()))?;
        Ok(BenchCert { ca_der: ca.der().clone() })
    }

    /// A client that trusts the run's CA and does a full handshake every time.
    pub fn connector(&self) -> anyhow::Result<TlsConnector> {
        Ok(TlsConnector::from(Arc::new(client_config(&self.ca_der)?)))
    }

    /// Writes the CA certificate (DER) for the storm's client processes.
    pub fn write_ca(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, &self.ca_der).with_context(|| format!("writing {}", path.display()))
    }
}

/// A client configuration that trusts the CA in `ca_der` and never resumes a session.
pub fn client_config(ca_der: &[u8]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = browser_order(provider.cipher_suites);
    let provider = Arc::new(provider);
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CheckedOnce { webpki, checked: Mutex::new(None) }))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client of its own that resumes its session: it keeps the tickets of its last
/// connection (a shared store keeps only a few tickets per server name, not one per client).
pub fn resuming(config: &rustls::ClientConfig) -> TlsConnector {
    let mut config = config.clone();
    config.resumption = rustls::client::Resumption::store(Arc::new(rustls::client::ClientSessionMemoryCache::new(1)));
    TlsConnector::from(Arc::new(config))
}

/// TLS 1.3's suites as Chrome and Firefox offer them (AES-128 first), then the rest.
fn browser_order(mut suites: Vec<SupportedCipherSuite>) -> Vec<SupportedCipherSuite> {
    let rank = |s: &SupportedCipherSuite| match s.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        _ => 3,
    };
    suites.sort_by_key(rank);
    suites
}

/// Checks the certificate and the signatures of the first handshake in full; afterwards
/// the same certificate is trusted without checking signatures (see the module doc).
#[derive(Debug)]
struct CheckedOnce {
    webpki: Arc<WebPkiServerVerifier>,
    /// The certificate whose first handshake passed every check.
    checked: Mutex<Option<CertificateDer<'static>>>,
}

impl CheckedOnce {
    fn is_checked(&self, cert: &CertificateDer<'_>) -> bool {
        self.checked.lock().unwrap().as_ref().is_some_and(|c| c.as_ref() == cert.as_ref())
    }
}

impl ServerCertVerifier for CheckedOnce {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.is_checked(end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.is_checked(cert) {
            return Ok(HandshakeSignatureValid::assertion());
        }
        // Called after verify_server_cert accepted the chain: with a good signature too,
        // this certificate has passed every check once.
        let valid = self.webpki.verify_tls13_signature(message, cert, dss)?;
        *self.checked.lock().unwrap() = Some(cert.clone().into_owned());
        Ok(valid)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The TLS handshake to `addr`, checking the certificate names its IP address.
pub async fn handshake(connector: &TlsConnector, addr: SocketAddr, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
    connector.connect(ServerName::IpAddress(addr.ip().into()), tcp).await
}

/// What a load-generator client talks over.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(tcp) => tcp,
            ClientStream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// A TLS session resumed from a ticket rather than a full handshake.
    pub fn resumed(&self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls(tls) => tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
