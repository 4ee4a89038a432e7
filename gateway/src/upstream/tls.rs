//! TLS toward upstream servers: the client side of `wss://` servers.
//!
//! Every pool with a `wss://` server gets one [`UpstreamTls`], built when the config is
//! loaded (so a missing or broken file is a config error naming it, and a reload that fails
//! to read one changes nothing). Certificates are verified, always: against the system's
//! roots by default, or against the pool's own `ca`. A certificate that fails verification
//! fails the connect like a refused TCP connection, with rustls's reason in the message.
//!
//! The system roots come from `rustls-native-certs` (the OS trust store, e.g.
//! /etc/ssl/certs on Debian, or `SSL_CERT_FILE`): an operator's own CA added with
//! `update-ca-certificates` is trusted, and a root the distribution withdraws is withdrawn
//! here too, without a rebuild. A compiled-in bundle (webpki-roots) would do neither.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use toml::Spanned;

/// A pool's `tls = { ca = "...", server_name = "...", cert = "...", key = "..." }`; every key
/// is optional. Paths are relative to the config file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsTable {
    /// PEM file of the CA certificates that may sign the servers' certificates; the
    /// system's roots when absent.
    pub ca: Option<Spanned<String>>,
    /// The name sent as SNI and required in the servers' certificates; default: the host of
    /// each server's address (a name or an IP address).
    pub server_name: Option<Spanned<String>>,
    /// PEM certificate chain the gateway presents to servers that ask for one...
    pub cert: Option<Spanned<String>>,
    /// ...and its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<Spanned<String>>,
}

/// A config error in a pool's TLS settings: where (a byte span of the config text) and what.
pub type TlsConfigError = (Range<usize>, String);

/// How the gateway opens TLS to one pool's `wss://` servers.
pub struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
    /// Digest of the settings and of the files' contents: two loads of unchanged files are
    /// equal, so a reload keeps the servers (and their pool version) as they were.
    fingerprint: [u8; 32],
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl UpstreamTls {
    /// Builds the client configuration of a pool: `table` is its `tls` key (the span points
    /// errors at it), `None` for a pool that has `wss://` servers and no `tls` key.
    pub fn load(table: Option<&Spanned<TlsTable>>, base_dir: &Path) -> Result<UpstreamTls, TlsConfigError> {
        let default = TlsTable::default();
        let (span, t) = match table {
            Some(t) => (t.span(), t.get_ref()),
            None => (0..0, &default),
        };
        let fail = |what: String| (span.clone(), what);
        let mut digest = Sha256::new();
        let read = |digest: &mut Sha256, key: &str, path: &Spanned<String>| -> Result<(PathBuf, Vec<u8>), TlsConfigError> {
            let path = base_dir.join(path.get_ref());
            let bytes = std::fs::read(&path).map_err(|e| fail(format!("tls.{key}: cannot read {}: {e}", path.display())))?;
            digest.update(key.as_bytes());
            digest.update((bytes.len() as u64).to_le_bytes());
            digest.update(&bytes);
            Ok((path, bytes))
        };

        let mut roots = rustls::RootCertStore::empty();
        match &t.ca {
            Some(ca) => {
                let (path, pem) = read(&mut digest, "ca", ca)?;
                let certs = certificates(&path, &pem).map_err(|e| fail(format!("tls.ca: {e}")))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| fail(format!("tls.ca: {}: not a usable CA certificate: {e}", path.display())))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
                    return Err(fail(format!(
                        "wss:// servers are verified against the system's root certificates, and none were found{why}: \
                         install ca-certificates, or set tls = {{ ca = \"...\" }} on this upstream"
                    )));
                }
                digest.update(b"system roots");
            }
        }

        let server_name = match &t.server_name {
            Some(name) => {
                digest.update(b"server_name");
                digest.update(name.get_ref().as_bytes());
                let parsed = ServerName::try_from(name.get_ref().clone())
                    .map_err(|e| fail(format!("tls.server_name {:?}: {e}", name.get_ref())))?;
                Some(parsed)
            }
            None => None,
        };

        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(format!("tls: {e}")))?
            .with_root_certificates(roots);
        let mut config = match (&t.cert, &t.key) {
            (Some(cert), Some(key)) => {
                let (cert_path, cert_pem) = read(&mut digest, "cert", cert)?;
                let (key_path, key_pem) = read(&mut digest, "key", key)?;
                let chain = certificates(&cert_path, &cert_pem).map_err(|e| fail(format!("tls.cert: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    fail(format!("tls.key: {}: no PKCS#8, PKCS#1 or SEC1 private key: {e}", key_path.display()))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    fail(format!("tls.cert/tls.key: {} and {} do not make a client certificate: {e}", cert_path.display(), key_path.display()))
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(fail("tls: cert and key go together: give both or neither".into())),
        };
        // The WebSocket handshake is HTTP/1.1; servers that look at ALPN must not pick h2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(UpstreamTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
            fingerprint: digest.finalize().into(),
        })
    }

    /// The TLS handshake over `tcp` to a server whose address names `host` (a DNS name or an
    /// IP address), verified against the pool's roots and `server_name` if set, else `host`.
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> Result<TlsStream<TcpStream>, String> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_string())
                .map_err(|e| format!("{host:?} cannot be checked against a certificate ({e}): set tls.server_name"))?,
        };
        self.connector.connect(name, tcp).await.map_err(|e| format!("TLS handshake failed: {e}"))
    }
}

/// The provider the client-side listener uses too (aws-lc-rs), named explicitly: with a
/// second provider anywhere in the dependency graph, rustls's implicit choice panics.
fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// Every certificate of a PEM file; none at all is an error.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: unreadable PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE in it", path.display()));
    }
    Ok(certs)
}

/// A pool's TLS client, made when it has a `wss://` server; `tls` on a pool without one is
/// an error (it would silently protect nothing).
pub fn for_pool(
    table: Option<&Spanned<TlsTable>>,
    any_wss: bool,
    base_dir: &Path,
) -> Result<Option<Arc<UpstreamTls>>, TlsConfigError> {
    match (table, any_wss) {
        (_, true) => UpstreamTls::load(table, base_dir).map(|tls| Some(Arc::new(tls))),
        (Some(t), false) => Err((t.span(), "tls is set but no server is wss://: write the servers as wss://host:port".into())),
        (None, false) => Ok(None),
    }
}
