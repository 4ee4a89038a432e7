//! Who a mutual-TLS client is, for the route and for the upstream.
//!
//! The gateway's `[gateway.tls] client_ca` makes clients present a certificate it verifies;
//! this plugin decides which of those verified clients a route lets in (by subject, subject
//! alternative name or SHA-256 fingerprint) and tells the upstream who the client is, in
//! headers, as nginx's `$ssl_client_s_dn` or Envoy's `x-forwarded-client-cert` do.
//!
//! The identity headers are always removed from what the client sent first, so a client
//! cannot claim an identity by sending them itself (over plain `ws://` too).

use serde::Deserialize;
use wasmgate_sdk::{Accept, ClientCertificate, Conn, Hooks, Plugin, Reject, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Refuse clients without a verified certificate (plain `ws://` clients included).
    /// Default true: this plugin on a route means the route wants to know who connects.
    #[serde(default = "yes")]
    require_client_certificate: bool,
    /// When any allow list is given, the certificate must match an entry of one of them.
    #[serde(default)]
    allow_subjects: Vec<String>,
    /// Entries as the host gives them: "DNS:name", "IP:addr", "email:addr", "URI:uri".
    #[serde(default)]
    allow_sans: Vec<String>,
    /// Lower- or upper-case hex, with or without colons.
    #[serde(default)]
    allow_sha256: Vec<String>,
    /// Identity headers for the upstream: `<prefix>subject`, `<prefix>sans`,
    /// `<prefix>sha256`, plus `<prefix>tls-version` and `<prefix>sni` for any `wss` client.
    #[serde(default = "default_prefix")]
    header_prefix: String,
}

fn yes() -> bool {
    true
}

fn default_prefix() -> String {
    "x-client-cert-".into()
}

pub struct TlsIdentity {
    require: bool,
    allow_subjects: Vec<String>,
    allow_sans: Vec<String>,
    allow_sha256: Vec<String>,
    prefix: String,
}

impl Plugin for TlsIdentity {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(config: Config) -> Result<Self, String> {
        let prefix = config.header_prefix.to_ascii_lowercase();
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!(
                "bad config: header_prefix {:?} must be letters, digits and '-'",
                config.header_prefix
            ));
        }
        let mut allow_sha256 = Vec::new();
        for fingerprint in &config.allow_sha256 {
            let hex: String = fingerprint
                .chars()
                .filter(|c| *c != ':')
                .collect::<String>()
                .to_ascii_lowercase();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "bad config: allow_sha256 entry {fingerprint:?} is not a SHA-256 fingerprint (64 hex digits)"
                ));
            }
            allow_sha256.push(hex);
        }
        Ok(TlsIdentity {
            require: config.require_client_certificate,
            allow_subjects: config.allow_subjects,
            allow_sans: config.allow_sans,
            allow_sha256,
            prefix,
        })
    }

    fn on_handshake(&mut self, conn: &Conn, req: &Request) -> Verdict {
        let header = |name: &str| format!("{}{name}", self.prefix);
        let mut accept = Accept::default();
        for name in ["subject", "sans", "sha256", "tls-version", "sni"] {
            accept = accept.remove_header(&header(name));
        }
        let certificate = req.tls.as_ref().and_then(|tls| tls.client_certificate.as_ref());
        match certificate {
            None if self.require => {
                let why = if req.tls.is_some() {
                    "a client certificate is required"
                } else {
                    "a TLS client certificate is required (connect with wss://)"
                };
                return Reject::new(403, why).into();
            }
            Some(cert) if !self.allows(cert) => {
                return Reject::new(403, "this client certificate is not allowed here").into();
            }
            _ => {}
        }
        if let Some(tls) = &req.tls {
            accept = accept.add_header(&header("tls-version"), &tls.version);
            if !tls.sni.is_empty() {
                accept = accept.add_header(&header("sni"), &tls.sni);
            }
        }
        if let Some(cert) = certificate {
            conn.set_meta("client_subject", &cert.subject);
            accept = accept
                .add_header(&header("subject"), &cert.subject)
                .add_header(&header("sans"), &cert.sans.join(", "))
                .add_header(&header("sha256"), &cert.sha256);
        }
        accept.into()
    }
}

impl TlsIdentity {
    fn allows(&self, cert: &ClientCertificate) -> bool {
        let no_lists =
            self.allow_subjects.is_empty() && self.allow_sans.is_empty() && self.allow_sha256.is_empty();
        no_lists
            || self.allow_subjects.iter().any(|s| *s == cert.subject)
            || cert.sans.iter().any(|san| self.allow_sans.contains(san))
            || self.allow_sha256.iter().any(|f| f.eq_ignore_ascii_case(&cert.sha256))
    }
}

wasmgate_sdk::export_plugin!(TlsIdentity);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_sdk::TlsInfo;

    const ALICE_SHA: &str = "aa11223344556677889900aabbccddeeff00112233445566778899aabbccddee";

    fn alice() -> Request {
        Request::new("/").with_tls(TlsInfo {
            sni: "chat.test".into(),
            version: "TLSv1.3".into(),
            client_certificate: Some(ClientCertificate {
                subject: "CN=alice,O=Example".into(),
                sans: vec!["DNS:alice.example".into(), "email:alice@example.com".into()],
                sha256: ALICE_SHA.into(),
            }),
        })
    }

    fn verdict(config: &str, req: &Request) -> Verdict {
        let mut plugin = TlsIdentity::from_json(config).unwrap();
        plugin.on_handshake(&Conn::new(1), req)
    }

    fn status(v: &Verdict) -> Option<u16> {
        match v {
            Verdict::Reject(r) => Some(r.status),
            Verdict::Accept(_) => None,
        }
    }

    fn added<'a>(v: &'a Verdict, name: &str) -> Option<&'a str> {
        let Verdict::Accept(a) = v else { panic!("rejected") };
        a.add_headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_str())
    }

    #[test]
    fn plain_clients_and_clients_without_a_certificate_are_refused_by_default() {
        assert_eq!(status(&verdict("{}", &Request::new("/"))), Some(403));
        let no_cert = Request::new("/").with_tls(TlsInfo {
            sni: "chat.test".into(),
            version: "TLSv1.3".into(),
            client_certificate: None,
        });
        assert_eq!(status(&verdict("{}", &no_cert)), Some(403));
        let optional = r#"{"require_client_certificate": false}"#;
        assert_eq!(status(&verdict(optional, &no_cert)), None);
        assert_eq!(added(&verdict(optional, &no_cert), "x-client-cert-subject"), None);
    }

    #[test]
    fn the_identity_goes_upstream_and_claims_from_the_client_are_removed() {
        let forged = alice().with_header("x-client-cert-subject", "CN=admin");
        let v = verdict("{}", &forged);
        assert_eq!(added(&v, "x-client-cert-subject"), Some("CN=alice,O=Example"));
        assert_eq!(
            added(&v, "x-client-cert-sans"),
            Some("DNS:alice.example, email:alice@example.com")
        );
        assert_eq!(added(&v, "x-client-cert-sha256"), Some(ALICE_SHA));
        assert_eq!(added(&v, "x-client-cert-tls-version"), Some("TLSv1.3"));
        let Verdict::Accept(a) = &v else { unreachable!() };
        assert!(a.remove_headers.iter().any(|h| h == "x-client-cert-subject"));
        // A plain client's forged header is removed too.
        let plain = verdict(
            r#"{"require_client_certificate": false}"#,
            &Request::new("/").with_header("x-client-cert-sha256", ALICE_SHA),
        );
        let Verdict::Accept(a) = &plain else { panic!() };
        assert!(a.remove_headers.iter().any(|h| h == "x-client-cert-sha256"));
        assert!(a.add_headers.is_empty());
    }

    #[test]
    fn allow_lists_match_subject_san_or_fingerprint() {
        let req = alice();
        assert_eq!(status(&verdict(r#"{"allow_subjects": ["CN=alice,O=Example"]}"#, &req)), None);
        assert_eq!(status(&verdict(r#"{"allow_subjects": ["CN=bob,O=Example"]}"#, &req)), Some(403));
        assert_eq!(status(&verdict(r#"{"allow_sans": ["email:alice@example.com"]}"#, &req)), None);
        assert_eq!(status(&verdict(r#"{"allow_sans": ["DNS:bob.example"]}"#, &req)), Some(403));
        let colons: String = ALICE_SHA
            .to_ascii_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(status(&verdict(&format!(r#"{{"allow_sha256": ["{colons}"]}}"#), &req)), None);
        // A subject that only contains the allowed one is not it.
        assert_eq!(status(&verdict(r#"{"allow_subjects": ["CN=alice"]}"#, &req)), Some(403));
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(TlsIdentity::from_json(r#"{"allow_sha256": ["abc"]}"#).is_err());
        assert!(TlsIdentity::from_json(r#"{"header_prefix": "x client"}"#).is_err());
        assert!(TlsIdentity::from_json(r#"{"allow": []}"#).is_err());
    }
}
