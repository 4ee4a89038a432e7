//! `wss://`: the gateway terminates TLS for clients (rustls).
//!
//! [`LoadedTls`] is what `[gateway.tls]` names, read and checked when the configuration is
//! (so `wasmgate check` and a reload refuse a missing file, a key that is not the
//! certificate's or an expired chain, naming the file). A [`Terminator`] serves it: its
//! certificates sit behind an `ArcSwap` in the SNI resolver ([`certs`]), so a reload changes
//! what new handshakes get while live connections keep the session they have.
//!
//! The crypto provider is aws-lc-rs, installed as the process default (see [`provider`]).

pub mod certs;
pub mod info;
pub mod pem;
pub mod stream;
pub mod unbuffered;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use certs::{CertSet, ServerCert, SniResolver};
pub use stream::ClientStream;
pub use unbuffered::ServerTls;

/// The crypto provider every TLS config of the gateway uses: aws-lc-rs, installed as the
/// process default on first use (rustls refuses to guess when more than one provider is
/// compiled in, which a dependency's default features can cause). Every `wss` handshake,
/// resumed or not, does an X25519 exchange, and AWS-LC's takes half of ring's time here
/// (BENCHMARKS.md, #18); it builds with a C compiler alone, as ring does.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(installed) = CryptoProvider::get_default() {
        return installed.clone();
    }
    // Losing a race to install is fine: whoever won installed a provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    CryptoProvider::get_default().expect("a provider was just installed").clone()
}

/// The files of `[gateway.tls]`, read and checked.
#[derive(Debug)]
pub struct LoadedTls {
    pub certs: Vec<ServerCert>,
    /// The CAs client certificates must chain to (mutual TLS), and the file they came from.
    pub client_ca: Option<(PathBuf, Arc<RootCertStore>)>,
}

impl LoadedTls {
    /// Reads every `(cert, key)` pair and the client CA file. The error names the file, and
    /// says whether it was the client CA (`true`) or a certificate entry.
    pub fn load(certs: &[(PathBuf, PathBuf)], client_ca: Option<&Path>) -> Result<LoadedTls, (String, bool)> {
        let provider = provider();
        let certs = certs
            .iter()
            .map(|(cert, key)| ServerCert::load(cert, key, &provider))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (e, false))?;
        let client_ca = client_ca.map(|path| load_roots(path).map(|roots| (path.to_path_buf(), roots))).transpose().map_err(|e| (e, true))?;
        Ok(LoadedTls { certs, client_ca })
    }
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in pem::load_certs(path)? {
        roots.add(cert).map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// Serves the TLS listener's handshakes.
pub struct Terminator {
    resolver: Arc<SniResolver>,
    config: ArcSwap<ServerConfig>,
}

impl Terminator {
    pub fn new(loaded: &LoadedTls) -> Result<Terminator, String> {
        let resolver = Arc::new(SniResolver { certs: ArcSwap::from_pointee(CertSet::new(&loaded.certs)) });
        let config = server_config(&resolver, loaded)?;
        Ok(Terminator { resolver, config: ArcSwap::from_pointee(config) })
    }

    /// Builds what a reload to `loaded` installs, changing nothing yet. Fails when the
    /// client CA cannot make a verifier.
    pub fn stage(&self, loaded: &LoadedTls) -> Result<StagedTls, String> {
        let config = server_config(&self.resolver, loaded)?;
        Ok(StagedTls { certs: CertSet::new(&loaded.certs), config })
    }

    /// New handshakes use the staged certificates from now on; live connections keep the
    /// session they have.
    pub fn commit(&self, staged: StagedTls) {
        self.resolver.certs.store(Arc::new(staged.certs));
        self.config.store(Arc::new(staged.config));
    }

    /// The configuration for one handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }
}

/// A reload's certificates and configuration, built and not yet in use.
pub struct StagedTls {
    certs: CertSet,
    config: ServerConfig,
}

/// TLS 1.3 and 1.2, ALPN `http/1.1`, client certificates as `loaded` says.
///
/// Sessions resume from stateless tickets (encrypted with keys rustls rotates every six
/// hours), so a reconnect storm of any size can skip the certificate's signature, which a
/// session cache of a few hundred entries could not. One ticket per connection, as Go
/// sends: a WebSocket client reconnects one connection at a time, and each new connection
/// brings a fresh ticket. Each configuration has its own ticket keys and session cache:
/// after a reload no client resumes a session made with the certificates (or client CA)
/// replaced, so every new connection is authenticated by what is in force.
fn server_config(resolver: &Arc<SniResolver>, loaded: &LoadedTls) -> Result<ServerConfig, String> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?;
    let builder = match &loaded.client_ca {
        None => builder.with_no_client_auth(),
        Some((path, roots)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                .build()
                .map_err(|e| format!("{}: cannot verify client certificates with it: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| format!("TLS session tickets: {e}"))?;
    config.send_tls13_tickets = 1;
    Ok(config)
}
