//! TLS for the `-tls` columns: one ECDSA P-256 certificate, made when the run starts and
//! served by every proxy (wasmgate, nginx, HAProxy), and the client side of the load
//! generator.
//!
//! The client verifies the certificate against the run's CA and never resumes a session, so
//! every new connection is a full TLS 1.3 handshake on every proxy.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::ServerName;
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
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsConnector::from(Arc::new(config)))
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
