//! Stamps the upstream request with a configured header, and passes connection metadata
//! along the plugin chain: it can set a metadata key, and copy one set by an earlier plugin
//! into a header the upstream can see. Tests use it to check handshake hooks end to end.

use serde::Deserialize;
use wasmgate_sdk::{Accept, Conn, Hooks, Plugin, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    header: String,
    value: String,
    /// Also store `value` in this connection metadata key.
    set_meta: Option<String>,
    /// Forward this metadata key, when set, as header `x-meta-<key>`.
    copy_meta: Option<String>,
}

pub struct HeaderStamp {
    header: String,
    value: String,
    set_meta: Option<String>,
    copy_meta: Option<(String, String)>,
}

impl Plugin for HeaderStamp {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(config: Config) -> Result<Self, String> {
        if !is_token(&config.header) {
            return Err(format!(
                "bad config: header {:?} is not a valid header name",
                config.header
            ));
        }
        Ok(HeaderStamp {
            header: config.header.to_ascii_lowercase(),
            value: config.value,
            set_meta: config.set_meta,
            copy_meta: config
                .copy_meta
                .map(|key| (format!("x-meta-{}", key.to_ascii_lowercase()), key)),
        })
    }

    fn on_handshake(&mut self, conn: &Conn, _: &Request) -> Verdict {
        let mut accept = Accept::default().add_header(&self.header, &self.value);
        if let Some(key) = &self.set_meta {
            conn.set_meta(key, &self.value);
        }
        if let Some((header, key)) = &self.copy_meta {
            if let Some(value) = conn.get_meta(key) {
                accept = accept.add_header(header, &value);
            }
        }
        accept.into()
    }
}

/// An HTTP token (RFC 9110): what a header name may be made of.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

wasmgate_sdk::export_plugin!(HeaderStamp);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_header() {
        let mut plugin = HeaderStamp::from_json(r#"{"header":"X-Stamp","value":"v1"}"#).unwrap();
        let verdict = plugin.on_handshake(&Conn::new(1), &Request::new("/"));
        assert_eq!(
            verdict,
            Accept::default().add_header("x-stamp", "v1").into()
        );
    }

    #[test]
    fn passes_metadata_down_the_chain() {
        let first = r#"{"header":"x-first","value":"ann","set_meta":"user"}"#;
        let second = r#"{"header":"x-second","value":"2","copy_meta":"user"}"#;
        let (mut first, mut second) = (
            HeaderStamp::from_json(first).unwrap(),
            HeaderStamp::from_json(second).unwrap(),
        );
        let conn = Conn::new(1);
        let req = Request::new("/");
        assert_eq!(
            second.on_handshake(&conn, &req),
            Accept::default().add_header("x-second", "2").into()
        );
        first.on_handshake(&conn, &req);
        assert_eq!(conn.get_meta("user").as_deref(), Some("ann"));
        let expected = Accept::default()
            .add_header("x-second", "2")
            .add_header("x-meta-user", "ann");
        assert_eq!(second.on_handshake(&conn, &req), expected.into());
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(HeaderStamp::from_json(r#"{"header":"x stamp","value":"v"}"#).is_err());
        assert!(HeaderStamp::from_json(r#"{"header":"x"}"#).is_err());
        assert!(HeaderStamp::from_json(r#"{"header":"x","value":"v","extra":1}"#).is_err());
    }
}
