//! What plugins learn of a `wss://` client's TLS connection (WIT `tls-info`): the SNI name,
//! the protocol version and, with mutual TLS, the client certificate's subject, SANs and
//! SHA-256 fingerprint. Made only when a handshake plugin is about to be called.

use super::ServerTls;
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::plugin::{ClientCertificate, TlsInfo};

pub fn describe(tls: &ServerTls) -> TlsInfo {
    let conn = tls.common();
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    };
    TlsInfo {
        sni: tls.server_name().unwrap_or("").to_ascii_lowercase(),
        version,
        client_certificate: conn.peer_certificates().and_then(|chain| chain.first()).map(|leaf| certificate(leaf)),
    }
}

/// The leaf the client presented (rustls has verified it against `client_ca`).
fn certificate(der: &[u8]) -> ClientCertificate {
    let sha256 = Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect();
    match X509Certificate::from_der(der) {
        Ok((_, cert)) => ClientCertificate { subject: cert.subject().to_string(), sans: sans(&cert), sha256 },
        // Verified certificates parse; keep the fingerprint if one ever does not.
        Err(_) => ClientCertificate { subject: String::new(), sans: Vec::new(), sha256 },
    }
}

fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(extension)) = cert.subject_alternative_name() else { return Vec::new() };
    extension
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(format!("DNS:{dns}")),
            GeneralName::RFC822Name(email) => Some(format!("email:{email}")),
            GeneralName::URI(uri) => Some(format!("URI:{uri}")),
            GeneralName::IPAddress(bytes) => ip(bytes).map(|ip| format!("IP:{ip}")),
            _ => None,
        })
        .collect()
}

fn ip(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}
