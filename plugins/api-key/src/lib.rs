//! API-key authentication for WebSocket upgrades. The config holds only SHA-256 hashes of
//! the keys, each with a name; a client presents its key in a header or a query parameter,
//! and the key's name goes into the connection's metadata (and optionally a header) for the
//! upstream and later plugins. See README.md for the config.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use wasmgate_sdk::{Accept, Conn, Hooks, Plugin, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    keys: Vec<KeyConfig>,
    #[serde(default = "defaults::header")]
    header: String,
    query: Option<String>,
    #[serde(default = "defaults::meta_key")]
    meta_key: String,
    name_header: Option<String>,
    #[serde(default = "defaults::yes")]
    strip_key: bool,
}

mod defaults {
    pub fn header() -> String {
        "x-api-key".into()
    }
    pub fn meta_key() -> String {
        "api-key-name".into()
    }
    pub fn yes() -> bool {
        true
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyConfig {
    name: String,
    sha256: String,
}

pub struct ApiKey {
    keys: Vec<(String, [u8; 32])>,
    header: String,
    query: Option<String>,
    meta_key: String,
    name_header: Option<String>,
    strip_key: bool,
}

impl Plugin for ApiKey {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(config: Config) -> Result<Self, String> {
        let mut keys: Vec<(String, [u8; 32])> = Vec::new();
        for (i, k) in config.keys.into_iter().enumerate() {
            let hash = parse_hex(&k.sha256).ok_or_else(|| {
                format!("bad config: keys[{i}]: sha256 must be 64 hex digits (e.g. `printf %s KEY | sha256sum`)")
            })?;
            if k.name.is_empty() || k.name.bytes().any(|b| b.is_ascii_control()) {
                return Err(format!(
                    "bad config: keys[{i}]: name must be non-empty printable text"
                ));
            }
            if keys.iter().any(|(name, h)| *name == k.name || *h == hash) {
                return Err(format!("bad config: keys[{i}]: name or hash given twice"));
            }
            keys.push((k.name, hash));
        }
        if keys.is_empty() {
            return Err("bad config: keys must list at least one key".into());
        }
        for name in std::iter::once(&config.header).chain(&config.name_header) {
            if !is_token(name) {
                return Err(format!("bad config: {name:?} is not a header name"));
            }
        }
        Ok(ApiKey {
            keys,
            header: config.header.to_ascii_lowercase(),
            query: config.query,
            meta_key: config.meta_key,
            name_header: config.name_header.map(|h| h.to_ascii_lowercase()),
            strip_key: config.strip_key,
        })
    }

    fn on_handshake(&mut self, conn: &Conn, req: &Request) -> Verdict {
        let presented = req
            .header(&self.header)
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .or_else(|| {
                self.query
                    .as_deref()
                    .and_then(|q| req.query_param(q))
                    .filter(|k| !k.is_empty())
            });
        let Some(presented) = presented else {
            wasmgate_sdk::metrics::counter_add("api_key_total", &[("result", "missing")], 1);
            return Verdict::reject(401, "missing API key");
        };
        let Some(name) = self.lookup(&presented) else {
            wasmgate_sdk::metrics::counter_add("api_key_total", &[("result", "unknown")], 1);
            wasmgate_sdk::debug!("unknown API key from {}", req.client_ip());
            return Verdict::reject(401, "unknown API key");
        };
        wasmgate_sdk::metrics::counter_add(
            "api_key_total",
            &[("result", "accepted"), ("name", name)],
            1,
        );
        conn.set_meta(&self.meta_key, name);
        let mut accept = Accept::default();
        if self.strip_key {
            accept = accept.remove_header(&self.header);
        }
        if let Some(header) = &self.name_header {
            accept = accept.add_header(header, name);
        }
        accept.into()
    }
}

impl ApiKey {
    /// The name of the key whose hash is `key`'s; every hash is compared in full, so the
    /// time taken says nothing about how close a guess was.
    fn lookup(&self, key: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (name, hash) in &self.keys {
            let diff = hash
                .iter()
                .zip(&digest)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(name.as_str());
            }
        }
        found
    }
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// An HTTP token (RFC 9110): what a header name may be made of.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

wasmgate_sdk::export_plugin!(ApiKey);

#[cfg(test)]
mod tests {
    use super::*;

    // sha256("key-a") and sha256("key-b").
    fn hash(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn plugin(extra: &str) -> ApiKey {
        let config = format!(
            r#"{{"keys":[{{"name":"team-a","sha256":"{}"}},{{"name":"team-b","sha256":"{}"}}]{extra}}}"#,
            hash("key-a"),
            hash("key-b").to_uppercase()
        );
        ApiKey::from_json(&config).unwrap()
    }

    #[test]
    fn known_keys_are_named() {
        let mut p = plugin("");
        let conn = Conn::new(1);
        let v = p.on_handshake(&conn, &Request::new("/").with_header("X-Api-Key", "key-b"));
        assert_eq!(v, Accept::default().remove_header("x-api-key").into());
        assert_eq!(conn.get_meta("api-key-name").as_deref(), Some("team-b"));
        assert_eq!(
            wasmgate_sdk::testing::counter(
                "api_key_total",
                &[("result", "accepted"), ("name", "team-b")]
            ),
            1
        );
    }

    #[test]
    fn missing_and_unknown_keys_are_401() {
        let mut p = plugin("");
        let conn = Conn::new(1);
        assert_eq!(
            p.on_handshake(&conn, &Request::new("/")),
            Verdict::reject(401, "missing API key")
        );
        let wrong = Request::new("/").with_header("x-api-key", "key-c");
        assert_eq!(
            p.on_handshake(&conn, &wrong),
            Verdict::reject(401, "unknown API key")
        );
        // The query parameter is not looked at unless configured.
        assert_eq!(
            p.on_handshake(&conn, &Request::new("/?api_key=key-a")),
            Verdict::reject(401, "missing API key")
        );
        assert_eq!(conn.get_meta("api-key-name"), None);
    }

    #[test]
    fn query_parameter_name_header_and_options() {
        let mut p = plugin(
            r#","query":"api_key","name_header":"X-Client","meta_key":"client","strip_key":false"#,
        );
        let conn = Conn::new(1);
        let v = p.on_handshake(&conn, &Request::new("/ws?api_key=key-a"));
        assert_eq!(v, Accept::default().add_header("x-client", "team-a").into());
        assert_eq!(conn.get_meta("client").as_deref(), Some("team-a"));
        // The header wins over the query parameter.
        let both = Request::new("/ws?api_key=key-a").with_header("x-api-key", "nope");
        assert_eq!(
            p.on_handshake(&conn, &both),
            Verdict::reject(401, "unknown API key")
        );
    }

    #[test]
    fn bad_config_is_refused() {
        let err = |c: &str| ApiKey::from_json(c).err().unwrap();
        assert!(err(r#"{"keys":[]}"#).contains("at least one key"));
        assert!(err(r#"{"keys":[{"name":"a","sha256":"abc"}]}"#).contains("64 hex digits"));
        let h = hash("k");
        assert!(err(&format!(
            r#"{{"keys":[{{"name":"a","sha256":"{h}"}},{{"name":"a","sha256":"{}"}}]}}"#,
            hash("j")
        ))
        .contains("twice"));
        assert!(err(&format!(
            r#"{{"keys":[{{"name":"a","sha256":"{h}"}}],"header":"x y"}}"#
        ))
        .contains("not a header name"));
        assert!(err(&format!(
            r#"{{"keys":[{{"name":"a","sha256":"{h}"}}],"typo":1}}"#
        ))
        .contains("unknown field"));
    }
}
