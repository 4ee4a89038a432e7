//! The one trait a plugin implements.
//!
//! One value of the plugin type serves every connection an instance sees, so its fields
//! hold policy state (counters, caches, parsed config). State that belongs to a single
//! connection goes in [`Conn`] metadata or in [`crate::kv`] keyed by [`Conn::id`].

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::session::{Outgoing, ReattachReason};
use crate::{Action, Candidate, Conn, ConnectionStats, Hooks, Message, Pool, Request, Verdict};

/// A wasmgate plugin. Implement the hooks named in [`Plugin::HOOKS`]; the others keep
/// their defaults and are never called by the host.
pub trait Plugin: Sized + 'static {
    /// The plugin's `config` table, deserialized from JSON. Use [`NoConfig`] for none.
    type Config: DeserializeOwned;

    /// The hooks this plugin implements, e.g. `Hooks::HANDSHAKE.union(Hooks::CLOSE)`.
    const HOOKS: Hooks;

    /// Builds the plugin from its config; an error rejects this version of the plugin.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// The hooks this instance implements, as `init` returns them; asked once, right after
    /// [`Plugin::new`]. Default: [`Plugin::HOOKS`]. Override it when the config decides, e.g.
    /// a `messages` hook only when an option needs it (so routes without it relay frames
    /// with no Wasm call); return a subset of `HOOKS`, which lists every hook the type has.
    fn hooks(&self) -> Hooks {
        Self::HOOKS
    }

    /// Decides on a client's upgrade request. Default: accept unchanged.
    fn on_handshake(&mut self, conn: &Conn, req: &Request) -> Verdict {
        let _ = (conn, req);
        Verdict::accept()
    }

    /// Ranks `candidates` (the servers of `pool` available now), best first, as indexes
    /// into `candidates`. The host tries them in order; an empty list means no server.
    /// A candidate's address and labels are `pool.server(candidate)`. Default: the order
    /// given.
    fn select(&mut self, conn: &Conn, pool: &Pool, candidates: &[Candidate]) -> Vec<u32> {
        let _ = (conn, pool);
        (0..candidates.len() as u32).collect()
    }

    /// Sees one data message. Reading `msg.payload()` copies it into the plugin; a hook
    /// that decides by `msg.len()`, direction or opcode does not pay for that. Default:
    /// forward it unchanged.
    fn on_message(&mut self, conn: &Conn, msg: &Message) -> Action {
        let _ = (conn, msg);
        Action::Forward
    }

    /// The connection was attached to `server` ("host:port") because its server went away,
    /// was drained or rebalanced (needs [`Hooks::SESSION`]). Returns messages to send to
    /// the new server before the gateway replays the session log (see [`crate::session`]).
    /// Default: none.
    fn on_reattach(&mut self, conn: &Conn, reason: ReattachReason, server: &str) -> Vec<Outgoing> {
        let _ = (conn, reason, server);
        Vec::new()
    }

    /// The connection closed with `code` (1006 when there was no close frame).
    fn on_close(&mut self, conn: &Conn, code: u16, stats: &ConnectionStats) {
        let _ = (conn, code, stats);
    }

    /// Parses `config` as the host passes it to `init` and builds the plugin. Tests call
    /// this to build a plugin exactly as the gateway would.
    fn from_json(config: &str) -> Result<Self, String> {
        // An absent config table may arrive as nothing at all or as null.
        let json = match config.trim() {
            "" | "null" => "{}",
            json => json,
        };
        let config = serde_json::from_str(json).map_err(|e| format!("bad config: {e}"))?;
        Self::new(config)
    }
}

/// The config of a plugin that takes none; any key given is an error, to catch typos.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Named(String);

    #[derive(Deserialize)]
    struct NameConfig {
        name: String,
    }

    impl Plugin for Named {
        type Config = NameConfig;
        const HOOKS: Hooks = Hooks::empty();

        fn new(config: NameConfig) -> Result<Self, String> {
            if config.name.is_empty() {
                return Err("name must not be empty".into());
            }
            Ok(Named(config.name))
        }
    }

    struct Nothing;

    impl Plugin for Nothing {
        type Config = NoConfig;
        const HOOKS: Hooks = Hooks::empty();

        fn new(_: NoConfig) -> Result<Self, String> {
            Ok(Nothing)
        }
    }

    #[test]
    fn config_is_parsed_and_checked() {
        assert_eq!(Named::from_json(r#"{"name":"a"}"#).unwrap().0, "a");
        assert!(Named::from_json(r#"{}"#)
            .unwrap_err()
            .starts_with("bad config: missing field"));
        assert_eq!(
            Named::from_json(r#"{"name":""}"#).err().unwrap(),
            "name must not be empty"
        );
    }

    #[test]
    fn no_config_accepts_absence_and_refuses_keys() {
        for absent in ["", " ", "null", "{}"] {
            assert!(Nothing::from_json(absent).is_ok(), "{absent:?}");
        }
        assert!(Nothing::from_json(r#"{"typo":1}"#).is_err());
    }

    #[test]
    fn defaults_accept_keep_order_and_forward() {
        let conn = Conn::new(1);
        let mut p = Nothing;
        assert_eq!(p.hooks(), Nothing::HOOKS);
        assert_eq!(p.on_handshake(&conn, &Request::new("/")), Verdict::accept());
        let pool = crate::NativePool::new("pool", &["a:1", "b:1"]);
        assert_eq!(p.select(&conn, &pool.view(), &pool.candidates()), vec![0, 1]);
        assert_eq!(p.on_message(&conn, &Message::text("x")), Action::Forward);
    }
}
