//! The server certificates and the choice among them by SNI.
//!
//! A certificate is picked by the name the client asked for (SNI): a certificate naming it
//! exactly first, then one with a wildcard for it (`*.example.com` covers one label,
//! `chat.example.com` but not `a.b.example.com`), else the first configured certificate.
//! The set sits behind an `ArcSwap`, so a reload swaps it for the next handshake while
//! handshakes under way keep the set they started with.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::pem;

/// One certificate chain with its key, checked and ready to serve.
#[derive(Debug)]
pub struct ServerCert {
    pub key: Arc<CertifiedKey>,
    /// The DNS names the leaf is for (its SANs; its subject CN when it has none), lower case.
    pub names: Vec<String>,
}

impl ServerCert {
    /// Loads a chain and its key. Refused, naming the file at fault: a file that cannot be
    /// read or holds no PEM certificate or key, a key that does not belong to the leaf, a
    /// certificate of the chain that has expired or is not valid yet.
    pub fn load(cert_path: &Path, key_path: &Path, provider: &CryptoProvider) -> Result<ServerCert, String> {
        let chain = pem::load_certs(cert_path)?;
        let key_der = pem::load_key(key_path)?;
        let key = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| format!("{}: unusable private key: {e}", key_path.display()))?;
        let names = check_chain(&chain).map_err(|e| format!("{}: {e}", cert_path.display()))?;
        let certified = CertifiedKey::new(chain, key);
        certified.keys_match().map_err(|e| {
            format!("{}: the key does not belong to the certificate in {} ({e})", key_path.display(), cert_path.display())
        })?;
        Ok(ServerCert { key: Arc::new(certified), names })
    }
}

/// Checks every certificate of the chain is in its validity period now; returns the leaf's
/// DNS names.
fn check_chain(chain: &[CertificateDer<'_>]) -> Result<Vec<String>, String> {
    let now = x509_parser::time::ASN1Time::now();
    let mut names = Vec::new();
    for (i, der) in chain.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("certificate {} is not valid X.509: {e}", i + 1))?;
        let validity = cert.validity();
        let which = if i == 0 { "the certificate".to_string() } else { format!("certificate {} of the chain", i + 1) };
        if now > validity.not_after {
            return Err(format!("{which} ({}) expired on {}", cert.subject(), validity.not_after));
        }
        if now < validity.not_before {
            return Err(format!("{which} ({}) is not valid before {}", cert.subject(), validity.not_before));
        }
        if i == 0 {
            names = dns_names(&cert);
        }
    }
    Ok(names)
}

/// The DNS names of a certificate: its SANs, or its subject's common name when it has no
/// DNS SAN (old style), lower case.
fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_ascii_lowercase));
    }
    names
}

/// The configured certificates, indexed for the choice by SNI.
#[derive(Debug, Default)]
pub struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    first: Option<Arc<CertifiedKey>>,
}

impl CertSet {
    /// Indexes certificates in config order; an earlier certificate keeps a name a later one
    /// repeats.
    pub fn new(certs: &[ServerCert]) -> CertSet {
        let mut set = CertSet { first: certs.first().map(|c| c.key.clone()), ..CertSet::default() };
        for cert in certs {
            for name in &cert.names {
                let table = match name.strip_prefix("*.") {
                    Some(parent) => set.wildcard.entry(parent.to_string()),
                    None => set.exact.entry(name.clone()),
                };
                table.or_insert_with(|| cert.key.clone());
            }
        }
        set
    }

    /// The certificate for a client that asked for `server_name` (none: no SNI).
    pub fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let chosen = server_name.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&name).or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent)
            })
        });
        chosen.or(self.first.as_ref()).cloned()
    }
}

/// rustls asks this for a certificate at every handshake.
#[derive(Debug)]
pub struct SniResolver {
    pub certs: ArcSwap<CertSet>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        super::unbuffered::note_sni(hello.server_name());
        self.certs.load().choose(hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Arc<CertifiedKey> {
        // Only identity matters here: a certificate that is one byte.
        struct NoKey;
        impl std::fmt::Debug for NoKey {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("NoKey")
            }
        }
        impl rustls::sign::SigningKey for NoKey {
            fn choose_scheme(&self, _: &[rustls::SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
                None
            }
            fn algorithm(&self) -> rustls::SignatureAlgorithm {
                rustls::SignatureAlgorithm::ECDSA
            }
        }
        Arc::new(CertifiedKey::new(vec![CertificateDer::from(vec![n])], Arc::new(NoKey)))
    }

    fn cert(n: u8, names: &[&str]) -> ServerCert {
        ServerCert { key: key(n), names: names.iter().map(|s| s.to_string()).collect() }
    }

    fn chosen(set: &CertSet, sni: Option<&str>) -> u8 {
        set.choose(sni).unwrap().cert[0].as_ref()[0]
    }

    #[test]
    fn exact_then_wildcard_then_first() {
        let set = CertSet::new(&[
            cert(1, &["chat.example.com"]),
            cert(2, &["*.example.com"]),
            cert(3, &["api.example.com", "*.example.com"]),
        ]);
        assert_eq!(chosen(&set, Some("chat.example.com")), 1);
        assert_eq!(chosen(&set, Some("CHAT.example.com.")), 1);
        assert_eq!(chosen(&set, Some("api.example.com")), 3, "exact beats an earlier wildcard");
        assert_eq!(chosen(&set, Some("other.example.com")), 2, "the first wildcard for a name wins");
        assert_eq!(chosen(&set, Some("a.b.example.com")), 1, "a wildcard covers one label only");
        assert_eq!(chosen(&set, Some("example.com")), 1);
        assert_eq!(chosen(&set, None), 1);
        assert!(CertSet::new(&[]).choose(Some("x")).is_none());
    }
}
