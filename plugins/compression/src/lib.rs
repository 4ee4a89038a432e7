//! Chooses how permessage-deflate (RFC 7692) is handled for each connection: off,
//! passthrough (negotiated end to end) or terminate (the gateway inflates and deflates),
//! with the window and context-takeover settings, by rules over the route's path prefix,
//! the client's User-Agent and its subprotocol offer. See README.md for the config.
//!
//! The answer goes in `accept.compression`; the host negotiates within it only when the
//! client offered permessage-deflate. The size below which the gateway sends a message
//! uncompressed has no WIT field yet: it is set as connection metadata
//! [`MIN_SIZE_META`], which the host reads after the handshake chain.

use serde::Deserialize;
use wasmgate_sdk::{Accept, Compression, CompressionMode, Conn, Hooks, Plugin, Request, Verdict};

/// Connection metadata read by the host: messages shorter than this many bytes are sent
/// uncompressed (RSV1 clear), in decimal.
pub const MIN_SIZE_META: &str = "compression-min-size";

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Off,
    Passthrough,
    Terminate,
}

/// Settings a rule may change; absent ones come from `default`.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct Settings {
    mode: Option<Mode>,
    max_window_bits: Option<u8>,
    no_context_takeover: Option<bool>,
    min_size: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    default: Settings,
    #[serde(default)]
    rules: Vec<RuleConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    name: Option<String>,
    path_prefix: Option<String>,
    user_agent: Option<String>,
    subprotocol: Option<String>,
    #[serde(flatten)]
    settings: Settings,
}

/// Everything decided for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Choice {
    mode: Mode,
    max_window_bits: u8,
    no_context_takeover: bool,
    min_size: u32,
}

impl Choice {
    fn with(self, s: &Settings) -> Choice {
        Choice {
            mode: s.mode.unwrap_or(self.mode),
            max_window_bits: s.max_window_bits.unwrap_or(self.max_window_bits),
            no_context_takeover: s.no_context_takeover.unwrap_or(self.no_context_takeover),
            min_size: s.min_size.unwrap_or(self.min_size),
        }
    }
}

/// Built-in defaults: terminate with a 4 KiB window, context kept, everything compressed.
const BUILT_IN: Choice = Choice { mode: Mode::Terminate, max_window_bits: 12, no_context_takeover: false, min_size: 0 };

struct Rule {
    name: String,
    path_prefix: Option<String>,
    /// Lower-cased; matched case-insensitively as a substring.
    user_agent: Option<String>,
    subprotocol: Option<String>,
    choice: Choice,
}

impl Rule {
    fn matches(&self, req: &Request) -> bool {
        if let Some(prefix) = &self.path_prefix {
            if !covers_segments(&req.path, prefix) {
                return false;
            }
        }
        if let Some(needle) = &self.user_agent {
            let ua = req.header("user-agent").unwrap_or("").to_ascii_lowercase();
            if !ua.contains(needle.as_str()) {
                return false;
            }
        }
        if let Some(protocol) = &self.subprotocol {
            if !req.subprotocols.iter().any(|p| p == protocol) {
                return false;
            }
        }
        true
    }
}

pub struct CompressionPolicy {
    default: Choice,
    rules: Vec<Rule>,
}

fn check(choice: &Choice, at: &str) -> Result<(), String> {
    if !(8..=15).contains(&choice.max_window_bits) {
        return Err(format!("bad config: {at}: max_window_bits {} is not in 8..=15", choice.max_window_bits));
    }
    Ok(())
}

impl Plugin for CompressionPolicy {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(config: Config) -> Result<Self, String> {
        let default = BUILT_IN.with(&config.default);
        check(&default, "default")?;
        let mut rules = Vec::new();
        for (i, r) in config.rules.into_iter().enumerate() {
            let at = format!("rules[{i}]");
            if r.path_prefix.is_none() && r.user_agent.is_none() && r.subprotocol.is_none() {
                return Err(format!(
                    "bad config: {at}: give at least one of `path_prefix`, `user_agent`, `subprotocol`"
                ));
            }
            if let Some(p) = r.path_prefix.as_ref().filter(|p| !p.starts_with('/')) {
                return Err(format!("bad config: {at}: path_prefix {p:?} must start with /"));
            }
            if r.user_agent.as_ref().is_some_and(|u| u.is_empty()) {
                return Err(format!("bad config: {at}: user_agent must not be empty"));
            }
            let s = r.settings;
            if s.mode.is_none() && s.max_window_bits.is_none() && s.no_context_takeover.is_none() && s.min_size.is_none() {
                return Err(format!(
                    "bad config: {at}: set at least one of `mode`, `max_window_bits`, `no_context_takeover`, `min_size`"
                ));
            }
            let choice = default.with(&s);
            check(&choice, &at)?;
            rules.push(Rule {
                name: r.name.unwrap_or(at),
                path_prefix: r.path_prefix.map(|p| if p.len() > 1 { p.trim_end_matches('/').to_string() } else { p }),
                user_agent: r.user_agent.map(|u| u.to_ascii_lowercase()),
                subprotocol: r.subprotocol,
                choice,
            });
        }
        Ok(CompressionPolicy { default, rules })
    }

    fn on_handshake(&mut self, conn: &Conn, req: &Request) -> Verdict {
        let (choice, rule) = match self.rules.iter().find(|r| r.matches(req)) {
            Some(rule) => (rule.choice, Some(rule.name.as_str())),
            None => (self.default, None),
        };
        if let Some(name) = rule {
            wasmgate_sdk::debug!("compression rule {name} for {}", req.path);
        }
        if choice.mode != Mode::Off && choice.min_size > 0 {
            conn.set_meta(MIN_SIZE_META, &choice.min_size.to_string());
        }
        Accept::default()
            .compression(Compression {
                mode: match choice.mode {
                    Mode::Off => CompressionMode::Off,
                    Mode::Passthrough => CompressionMode::Passthrough,
                    Mode::Terminate => CompressionMode::Terminate,
                },
                max_window_bits: choice.max_window_bits,
                no_context_takeover: choice.no_context_takeover,
            })
            .into()
    }
}

/// Whether `prefix` covers whole segments of `path` ("/feed" covers "/feed" and
/// "/feed/x", not "/feeds").
fn covers_segments(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

wasmgate_sdk::export_plugin!(CompressionPolicy);

#[cfg(test)]
mod tests {
    use super::*;

    fn compression(mode: CompressionMode, bits: u8, nct: bool) -> Verdict {
        Accept::default()
            .compression(Compression { mode, max_window_bits: bits, no_context_takeover: nct })
            .into()
    }

    fn plugin(config: serde_json::Value) -> CompressionPolicy {
        CompressionPolicy::from_json(&config.to_string()).unwrap()
    }

    #[test]
    fn defaults_to_terminate_with_a_4k_window() {
        let mut p = CompressionPolicy::from_json("").unwrap();
        let conn = Conn::new(1);
        assert_eq!(p.on_handshake(&conn, &Request::new("/x")), compression(CompressionMode::Terminate, 12, false));
        assert_eq!(conn.get_meta(MIN_SIZE_META), None);
    }

    #[test]
    fn first_matching_rule_wins_over_the_default() {
        let mut p = plugin(serde_json::json!({
            "default": { "mode": "terminate", "max_window_bits": 12, "min_size": 64 },
            "rules": [
                { "path_prefix": "/feed/", "max_window_bits": 15 },
                { "user_agent": "OkHttp", "mode": "off" },
                { "subprotocol": "graphql-ws", "no_context_takeover": true, "max_window_bits": 9 },
                { "path_prefix": "/raw", "mode": "passthrough" },
            ]
        }));
        let conn = Conn::new(1);
        let req = |target: &str| Request::new(target);
        assert_eq!(p.on_handshake(&conn, &req("/feed")), compression(CompressionMode::Terminate, 15, false));
        assert_eq!(conn.get_meta(MIN_SIZE_META).as_deref(), Some("64"));
        assert_eq!(p.on_handshake(&conn, &req("/feed/btc")), compression(CompressionMode::Terminate, 15, false));
        assert_eq!(p.on_handshake(&conn, &req("/feeds")), compression(CompressionMode::Terminate, 12, false));
        let android = req("/feed").with_header("User-Agent", "okhttp/4.12.0");
        assert_eq!(p.on_handshake(&conn, &android), compression(CompressionMode::Terminate, 15, false), "first rule wins");
        let android = req("/chat").with_header("User-Agent", "okhttp/4.12.0");
        let conn2 = Conn::new(2);
        assert_eq!(p.on_handshake(&conn2, &android), compression(CompressionMode::Off, 12, false));
        assert_eq!(conn2.get_meta(MIN_SIZE_META), None, "no threshold when off");
        let mut gql = req("/chat");
        gql.subprotocols = vec!["chat".into(), "graphql-ws".into()];
        assert_eq!(p.on_handshake(&conn, &gql), compression(CompressionMode::Terminate, 9, true));
        assert_eq!(p.on_handshake(&conn, &req("/raw/x")), compression(CompressionMode::Passthrough, 12, false));
    }

    #[test]
    fn rules_can_combine_matchers() {
        let mut p = plugin(serde_json::json!({
            "rules": [{ "path_prefix": "/api", "user_agent": "bot", "mode": "off" }]
        }));
        let conn = Conn::new(1);
        let bot = Request::new("/api/v1").with_header("user-agent", "SearchBot/2");
        assert_eq!(p.on_handshake(&conn, &bot), compression(CompressionMode::Off, 12, false));
        let human = Request::new("/api/v1").with_header("user-agent", "Mozilla/5.0");
        assert_eq!(p.on_handshake(&conn, &human), compression(CompressionMode::Terminate, 12, false));
    }

    #[test]
    fn bad_config_is_refused() {
        for bad in [
            r#"{"default": {"max_window_bits": 7}}"#,
            r#"{"default": {"max_window_bits": 16}}"#,
            r#"{"default": {"mode": "gzip"}}"#,
            r#"{"default": {"level": 9}}"#,
            r#"{"rules": [{"mode": "off"}]}"#,
            r#"{"rules": [{"path_prefix": "/x"}]}"#,
            r#"{"rules": [{"path_prefix": "x", "mode": "off"}]}"#,
            r#"{"rules": [{"user_agent": "", "mode": "off"}]}"#,
            r#"{"rules": [{"path_prefix": "/x", "max_window_bits": 20}]}"#,
            r#"{"rules": [{"path_prefix": "/x", "mode": "off", "extra": 1}]}"#,
            r#"{"extra": 1}"#,
        ] {
            assert!(CompressionPolicy::from_json(bad).is_err(), "{bad}");
        }
    }
}
