//! Test fixture: a handshake plugin whose answer would corrupt or bloat what the gateway
//! sends, chosen by config `{ "op": "<op>" }`. Every answer but `ok` and `poison` breaks the
//! rules of `gateway/src/plugin/validate.rs`:
//! - headers added upstream: `framing` (content-length), `chunked` (transfer-encoding),
//!   `connection`, `upgrade`, `second-key` (sec-websocket-key), `host`, `crlf` (a value
//!   with CR LF and an injected header), `control` (an escape byte), `non-ascii`,
//!   `huge-value` (1 MiB), `many` (10,000 headers), `bad-name`;
//! - `remove-host`, `remove-key`: removing what the handshake needs;
//! - rewritten paths: `path-huge` (1 MiB), `path-authority` (`//evil/x`), `path-fragment`,
//!   `path-dots`, `path-space`, `path-non-ascii`, `path-relative`;
//! - `subprotocol-bad`, `reject-framing` (a 403 carrying content-length),
//!   `reject-huge-reason`, `pool-huge`;
//! - `poison`: a valid header, `x-poison: 1`, that a test backend answers by resetting;
//! - `ok`: a valid header, `x-fine: 1`.

use serde::Deserialize;
use wasmgate_sdk::{Accept, Conn, Hooks, Plugin, Reject, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    op: String,
}

pub struct HostileHeaders {
    op: String,
}

const OPS: &[&str] = &[
    "framing", "chunked", "connection", "upgrade", "second-key", "host", "crlf", "control", "non-ascii",
    "huge-value", "many", "bad-name", "remove-host", "remove-key", "path-huge", "path-authority",
    "path-fragment", "path-dots", "path-space", "path-non-ascii", "path-relative", "subprotocol-bad",
    "reject-framing", "reject-huge-reason", "pool-huge", "poison", "ok",
];

impl Plugin for HostileHeaders {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(c: Config) -> Result<Self, String> {
        if !OPS.contains(&c.op.as_str()) {
            return Err(format!("bad config: op {:?} is not one of {OPS:?}", c.op));
        }
        Ok(HostileHeaders { op: c.op })
    }

    fn on_handshake(&mut self, _: &Conn, _: &Request) -> Verdict {
        let add = |name: &str, value: &str| Accept::default().add_header(name, value).into();
        let path = |p: &str| Accept::default().rewrite_path(p).into();
        match self.op.as_str() {
            "framing" => add("content-length", "5"),
            "chunked" => add("transfer-encoding", "chunked"),
            "connection" => add("connection", "close"),
            "upgrade" => add("upgrade", "h2c"),
            "second-key" => add("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            "host" => add("host", "admin.internal"),
            "crlf" => add("x-a", "1\r\nx-injected: yes"),
            "control" => add("x-a", "\x1b[2J"),
            "non-ascii" => add("x-a", "caf\u{e9}"),
            "huge-value" => add("x-a", &"v".repeat(1 << 20)),
            "many" => (0..10_000).fold(Accept::default(), |a, i| a.add_header(&format!("x-{i}"), "1")).into(),
            "bad-name" => add("x a", "1"),
            "remove-host" => Accept::default().remove_header("host").into(),
            "remove-key" => Accept::default().remove_header("sec-websocket-key").into(),
            "path-huge" => path(&format!("/{}", "p".repeat(1 << 20))),
            "path-authority" => path("//evil.example/x"),
            "path-fragment" => path("/a#b"),
            "path-dots" => path("/public/../admin"),
            "path-space" => path("/a b HTTP/1.1\r\nx: y"),
            "path-non-ascii" => path("/caf\u{e9}"),
            "path-relative" => path("admin"),
            "subprotocol-bad" => Accept::default().subprotocol("a b").into(),
            "reject-framing" => Reject::new(403, "no").header("content-length", "0").into(),
            "reject-huge-reason" => Reject::new(403, &"r".repeat(1 << 20)).into(),
            "pool-huge" => Accept::default().upstream(&"p".repeat(1 << 20)).into(),
            "poison" => add("x-poison", "1"),
            "ok" => add("x-fine", "1"),
            _ => unreachable!("checked in new"),
        }
    }
}

wasmgate_sdk::export_plugin!(HostileHeaders);
