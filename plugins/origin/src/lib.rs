//! An Origin allowlist for WebSocket upgrades: browsers send the page's origin with every
//! handshake, so checking it stops other sites' pages from opening connections with the
//! user's cookies (cross-site WebSocket hijacking). See README.md for the config.

use serde::Deserialize;
use wasmgate_sdk::{Conn, Hooks, Plugin, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    allow: Vec<String>,
    #[serde(default)]
    allow_missing: bool,
}

pub struct Origin {
    allow: Vec<String>,
    allow_missing: bool,
}

impl Plugin for Origin {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(config: Config) -> Result<Self, String> {
        let mut allow = Vec::new();
        for pattern in config.allow {
            let pattern = pattern.trim().to_ascii_lowercase();
            if pattern != "null" && !pattern.contains("://") {
                return Err(format!(
                    "bad config: allow: {pattern:?} is not an origin (scheme://host[:port], or \"null\")"
                ));
            }
            if pattern.ends_with('/') || pattern.contains("**") {
                return Err(format!(
                    "bad config: allow: {pattern:?}: no trailing slash or `**`"
                ));
            }
            allow.push(pattern);
        }
        Ok(Origin {
            allow,
            allow_missing: config.allow_missing,
        })
    }

    fn on_handshake(&mut self, _: &Conn, req: &Request) -> Verdict {
        let Some(origin) = req.header("origin").map(str::trim) else {
            if self.allow_missing {
                return Verdict::accept();
            }
            wasmgate_sdk::metrics::counter_add("origin_refused_total", &[("why", "missing")], 1);
            return Verdict::reject(403, "missing Origin header");
        };
        let origin = origin.to_ascii_lowercase();
        if self
            .allow
            .iter()
            .any(|pattern| matches(pattern.as_bytes(), origin.as_bytes()))
        {
            return Verdict::accept();
        }
        wasmgate_sdk::metrics::counter_add("origin_refused_total", &[("why", "not-allowed")], 1);
        wasmgate_sdk::debug!("origin {origin:?} refused for {}", req.client_ip());
        Verdict::reject(403, &format!("origin {origin} is not allowed"))
    }
}

/// Whether `origin` fits `pattern`, where `*` stands for one or more host or port
/// characters (letters, digits, `.` and `-`): `https://*.example.com` matches
/// `https://a.example.com` and `https://a.b.example.com`, not `https://example.com` or
/// `https://evil.com/.example.com`; `http://localhost:*` matches any port.
fn matches(pattern: &[u8], origin: &[u8]) -> bool {
    match pattern.split_first() {
        None => origin.is_empty(),
        Some((b'*', rest)) => {
            let run = origin
                .iter()
                .take_while(|&&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                .count();
            (1..=run).any(|n| matches(rest, &origin[n..]))
        }
        Some((&p, rest)) => origin.first() == Some(&p) && matches(rest, &origin[1..]),
    }
}

wasmgate_sdk::export_plugin!(Origin);

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: &mut Origin, origin: Option<&str>) -> Verdict {
        let mut req = Request::new("/");
        if let Some(o) = origin {
            req = req.with_header("Origin", o);
        }
        p.on_handshake(&Conn::new(1), &req)
    }

    #[test]
    fn exact_and_wildcard_origins() {
        let mut p = Origin::from_json(
            r#"{"allow":["https://app.example.com","https://*.example.org","http://localhost:*"]}"#,
        )
        .unwrap();
        for ok in [
            "https://app.example.com",
            "HTTPS://App.Example.com",
            "https://a.example.org",
            "https://a.b-c.example.org",
            "http://localhost:3000",
        ] {
            assert_eq!(check(&mut p, Some(ok)), Verdict::accept(), "{ok}");
        }
        for bad in [
            "https://app.example.com:8443",
            "http://app.example.com",
            "https://example.org",
            "https://.example.org",
            "https://evil.com/.example.org",
            "https://evil.com?.example.org",
            "https://a.example.org.evil.com",
            "http://localhost",
            "null",
        ] {
            assert_eq!(
                check(&mut p, Some(bad)),
                Verdict::reject(
                    403,
                    &format!("origin {} is not allowed", bad.to_ascii_lowercase())
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn missing_origin() {
        let mut strict = Origin::from_json(r#"{"allow":["https://a.example"]}"#).unwrap();
        assert_eq!(
            check(&mut strict, None),
            Verdict::reject(403, "missing Origin header")
        );
        let mut lax =
            Origin::from_json(r#"{"allow":["https://a.example"],"allow_missing":true}"#).unwrap();
        assert_eq!(check(&mut lax, None), Verdict::accept());
        assert_eq!(
            check(&mut lax, Some("https://b.example")).clone(),
            Verdict::reject(403, "origin https://b.example is not allowed")
        );
        let mut null = Origin::from_json(r#"{"allow":["null"]}"#).unwrap();
        assert_eq!(check(&mut null, Some("null")), Verdict::accept());
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(Origin::from_json(r#"{"allow":["app.example.com"]}"#).is_err());
        assert!(Origin::from_json(r#"{"allow":["https://a.example/"]}"#).is_err());
        assert!(Origin::from_json(r#"{}"#).is_err());
        assert!(Origin::from_json(r#"{"allow":[],"typo":true}"#).is_err());
    }
}
