//! Keeps a connection's subscriptions so that it survives its server: JSON rules from the
//! config say which client messages are session state and under which key, which remove a
//! key, and which of the new server's answers to swallow while the log is replayed.
//!
//! ```toml
//! config = { remember = [{ match = { type = "subscribe" }, key = "channel" }],
//!            forget = [{ match = { type = "unsubscribe" }, key = "channel" }],
//!            swallow = [{ match = { type = "subscribed" }, key = "channel" }] }
//! ```
//!
//! A rule matches a text message that is a JSON object holding every field of `match` with
//! the same value; its key is the value of the field `key` (a string, or a number as
//! written). The log itself is kept by the gateway (see the SDK's `session` module); this
//! plugin only keeps, in the connection's metadata, the keys whose answers it still expects
//! during a replay, so one instance serves every connection.

use serde::Deserialize;
use serde_json::{Map, Value};
use wasmgate_sdk::session::{self, Outgoing, ReattachReason};
use wasmgate_sdk::{metrics, Action, Conn, Direction, Hooks, Message, Opcode, Plugin};

/// Connection metadata: the keys replayed whose answers have not been swallowed yet, as a
/// JSON array.
const PENDING: &str = "session-replay.pending";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(rename = "match")]
    pattern: Map<String, Value>,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    remember: Vec<Rule>,
    #[serde(default)]
    forget: Vec<Rule>,
    #[serde(default)]
    swallow: Vec<Rule>,
}

pub struct SessionReplay {
    config: Config,
}

impl Rule {
    /// The key of `message` if this rule matches it.
    fn key_of(&self, message: &Map<String, Value>) -> Option<String> {
        if !self.pattern.iter().all(|(field, value)| message.get(field) == Some(value)) {
            return None;
        }
        match message.get(&self.key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// The first rule of `rules` that matches, and its key.
fn matching(rules: &[Rule], message: &Map<String, Value>) -> Option<String> {
    rules.iter().find_map(|r| r.key_of(message))
}

fn json_object(msg: &Message) -> Option<Map<String, Value>> {
    match serde_json::from_slice(msg.text_payload()?.as_bytes()).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

fn pending(conn: &Conn) -> Vec<String> {
    conn.get_meta(PENDING).and_then(|v| serde_json::from_str(&v).ok()).unwrap_or_default()
}

impl SessionReplay {
    fn from_client(&self, msg: &Message) {
        if self.config.remember.is_empty() && self.config.forget.is_empty() {
            return;
        }
        let Some(message) = json_object(msg) else { return };
        if let Some(key) = matching(&self.config.remember, &message) {
            if !session::remember(msg, &key) {
                wasmgate_sdk::warn!("session log full: {key:?} will not be replayed on another server");
                metrics::counter_add("log_full", &[], 1);
            }
        } else if let Some(key) = matching(&self.config.forget, &message) {
            session::forget(&key);
        }
    }

    /// During a replay, an answer to a replayed message is dropped, once per key.
    fn from_server(&self, conn: &Conn, msg: &Message) -> Action {
        if self.config.swallow.is_empty() || !session::replaying() {
            return Action::Forward;
        }
        let Some(key) = json_object(msg).and_then(|m| matching(&self.config.swallow, &m)) else {
            return Action::Forward;
        };
        let mut keys = pending(conn);
        let Some(i) = keys.iter().position(|k| *k == key) else { return Action::Forward };
        keys.remove(i);
        if keys.is_empty() {
            session::replay_done();
        }
        conn.set_meta(PENDING, &serde_json::to_string(&keys).unwrap_or_default());
        metrics::counter_add("swallowed", &[], 1);
        Action::Drop
    }
}

impl Plugin for SessionReplay {
    type Config = Config;
    const HOOKS: Hooks = Hooks::MESSAGES.union(Hooks::SESSION);

    fn new(config: Config) -> Result<Self, String> {
        let all = config.remember.iter().chain(&config.forget).chain(&config.swallow);
        if let Some(rule) = all.clone().find(|r| r.pattern.is_empty()) {
            return Err(format!("a rule keyed by {:?} has an empty match: it would match every message", rule.key));
        }
        if config.remember.is_empty() {
            return Err("remember must list at least one rule".into());
        }
        Ok(SessionReplay { config })
    }

    fn on_message(&mut self, conn: &Conn, msg: &Message) -> Action {
        if msg.opcode() != Opcode::Text {
            return Action::Forward;
        }
        match msg.direction() {
            Direction::ClientToUpstream => {
                self.from_client(msg);
                Action::Forward
            }
            Direction::UpstreamToClient => self.from_server(conn, msg),
        }
    }

    fn on_reattach(&mut self, conn: &Conn, reason: ReattachReason, server: &str) -> Vec<Outgoing> {
        let keys = session::remembered();
        wasmgate_sdk::debug!("moved to {server} ({reason:?}); replaying {} messages", keys.len());
        conn.set_meta(PENDING, &serde_json::to_string(&keys).unwrap_or_default());
        if keys.is_empty() || self.config.swallow.is_empty() {
            session::replay_done();
        }
        Vec::new()
    }
}

wasmgate_sdk::export_plugin!(SessionReplay);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_sdk::testing;

    const CONFIG: &str = r#"{
        "remember": [{"match": {"type": "subscribe"}, "key": "channel"}],
        "forget": [{"match": {"type": "unsubscribe"}, "key": "channel"}],
        "swallow": [{"match": {"type": "subscribed"}, "key": "channel"}]
    }"#;

    fn client(text: &str) -> Message<'_> {
        Message::text(text)
    }

    fn server(text: &str) -> Message<'_> {
        Message::new(Direction::UpstreamToClient, Opcode::Text, text.as_bytes())
    }

    fn log_keys() -> Vec<String> {
        testing::session_log().into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn subscribes_are_remembered_by_key_and_unsubscribes_forget() {
        let mut p = SessionReplay::from_json(CONFIG).unwrap();
        let conn = Conn::new(1);
        let sub_a = r#"{"type":"subscribe","channel":"a"}"#;
        for text in [sub_a, r#"{"type":"subscribe","channel":"b"}"#, r#"{"type":"publish","channel":"a","text":"hi"}"#] {
            assert_eq!(p.on_message(&conn, &client(text)), Action::Forward);
        }
        assert_eq!(log_keys(), ["a", "b"]);
        assert_eq!(testing::session_log()[0].1, sub_a.as_bytes());
        p.on_message(&conn, &client(r#"{"type":"unsubscribe","channel":"a"}"#));
        assert_eq!(log_keys(), ["b"]);
        // Not JSON, not an object, binary, or the key missing: nothing remembered.
        for text in ["subscribe a", "[1]", r#"{"type":"subscribe"}"#] {
            p.on_message(&conn, &client(text));
        }
        let binary = Message::new(Direction::ClientToUpstream, Opcode::Binary, &br#"{"type":"subscribe","channel":"c"}"#[..]);
        p.on_message(&conn, &binary);
        assert_eq!(log_keys(), ["b"]);
        // A number key counts as written.
        p.on_message(&conn, &client(r#"{"type":"subscribe","channel":7}"#));
        assert_eq!(log_keys(), ["b", "7"]);
    }

    #[test]
    fn answers_to_a_replay_are_swallowed_once_per_key_and_only_while_replaying() {
        let mut p = SessionReplay::from_json(CONFIG).unwrap();
        let conn = Conn::new(1);
        let subscribed_a = r#"{"type":"subscribed","channel":"a"}"#;
        p.on_message(&conn, &client(r#"{"type":"subscribe","channel":"a"}"#));
        p.on_message(&conn, &client(r#"{"type":"subscribe","channel":"b"}"#));
        // Outside a replay, answers go to the client.
        assert_eq!(p.on_message(&conn, &server(subscribed_a)), Action::Forward);

        testing::set_replaying(true);
        assert!(p.on_reattach(&conn, ReattachReason::ServerGone, "127.0.0.1:9").is_empty());
        assert_eq!(p.on_message(&conn, &server(subscribed_a)), Action::Drop);
        assert_eq!(p.on_message(&conn, &server(subscribed_a)), Action::Forward, "once per key");
        let message = r#"{"type":"message","channel":"b","offset":3,"text":"x"}"#;
        assert_eq!(p.on_message(&conn, &server(message)), Action::Forward);
        assert!(session::replaying());
        assert_eq!(p.on_message(&conn, &server(r#"{"type":"subscribed","channel":"b"}"#)), Action::Drop);
        assert!(!session::replaying(), "every answer seen: the replay is done");
        assert_eq!(testing::counter("swallowed", &[]), 2);
    }

    #[test]
    fn a_move_with_nothing_to_replay_ends_the_replay_at_once() {
        let mut p = SessionReplay::from_json(CONFIG).unwrap();
        let conn = Conn::new(1);
        testing::set_replaying(true);
        p.on_reattach(&conn, ReattachReason::Drained, "127.0.0.1:9");
        assert!(!session::replaying());
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(SessionReplay::from_json("{}").err().unwrap().contains("remember"));
        let empty_match = r#"{"remember": [{"match": {}, "key": "channel"}]}"#;
        assert!(SessionReplay::from_json(empty_match).err().unwrap().contains("empty match"));
        let typo = r#"{"remember": [{"match": {"type": "s"}, "key": "c", "keys": 1}]}"#;
        assert!(SessionReplay::from_json(typo).err().unwrap().starts_with("bad config"));
    }
}
