//! Test fixture: calls one WASI interface from a hook, chosen by config, so the tests can
//! show that every interface Rust's std links ends as an error the plugin sees, or as a
//! trap that follows `on_error`, and never as a panic or a wait on the gateway's side.
//!
//! Config: `{ "op": "<op>", "hook": "handshake" | "message", "target": "ip:port" }`.
//! - In `on_handshake`: an error is answered with a 418 whose reason is `<op>: <error>`; a
//!   result is an accept with the header `x-observed: <result>`.
//! - In `on_message` (messages from the client): an error closes with 4418 and the error as
//!   reason; a result is replied to the sender.
//!
//! A trap (sleep, exit, abort, ...) is the gateway's to handle. `on_close` counts closed
//! connections in the metric `closes_total`, so a test can check that every connection the
//! plugin saw was closed and reported.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use wasmgate_sdk::{Action, Conn, ConnectionStats, Hooks, Message, Plugin, Reject, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    op: String,
    #[serde(default = "handshake")]
    hook: String,
    /// Where the network operations aim (a live loopback listener in the tests).
    #[serde(default = "loopback")]
    target: String,
}

fn handshake() -> String {
    "handshake".into()
}

fn loopback() -> String {
    "127.0.0.1:9".into()
}

pub struct HostileWasi {
    op: String,
    on_messages: bool,
    target: String,
}

impl Plugin for HostileWasi {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE.union(Hooks::MESSAGES).union(Hooks::CLOSE);

    fn new(c: Config) -> Result<Self, String> {
        if !OPS.contains(&c.op.as_str()) {
            return Err(format!("bad config: op {:?} is not one of {OPS:?}", c.op));
        }
        let on_messages = match c.hook.as_str() {
            "handshake" => false,
            "message" => true,
            other => return Err(format!("bad config: hook {other:?}")),
        };
        Ok(HostileWasi { op: c.op, on_messages, target: c.target })
    }

    fn hooks(&self) -> Hooks {
        if self.on_messages {
            Hooks::MESSAGES.union(Hooks::CLOSE)
        } else {
            Hooks::HANDSHAKE.union(Hooks::CLOSE)
        }
    }

    fn on_close(&mut self, _: &Conn, _: u16, _: &ConnectionStats) {
        wasmgate_sdk::metrics::counter_add("closes_total", &[], 1);
    }

    fn on_handshake(&mut self, _: &Conn, _: &Request) -> Verdict {
        match self.run() {
            Ok(seen) => wasmgate_sdk::Accept::default().add_header("x-observed", &seen).into(),
            Err(e) => Reject::new(418, &format!("{}: {e}", self.op)).into(),
        }
    }

    fn on_message(&mut self, _: &Conn, _: &Message) -> Action {
        match self.run() {
            Ok(seen) => Action::Reply(seen.into_bytes()),
            Err(e) => {
                let mut reason = format!("{}: {e}", self.op);
                reason.truncate(100);
                Action::close(4418, &reason)
            }
        }
    }
}

/// Every operation the config may name.
const OPS: &[&str] = &[
    "fs-read", "fs-write", "fs-list", "cwd", "env", "args", "stdin", "stdout-flood", "tcp-connect",
    "tcp-listen", "udp-bind", "udp-send", "dns", "sleep", "clock", "random", "exit", "abort",
];

impl HostileWasi {
    /// What the operation saw, or the error it got.
    fn run(&self) -> Result<String, String> {
        let e = |e: std::io::Error| e.to_string();
        match self.op.as_str() {
            "fs-read" => std::fs::read_to_string("/etc/passwd").map(|s| format!("{} bytes", s.len())).map_err(e),
            "fs-write" => std::fs::write("/tmp/wasmgate-hostile-wasi", b"x").map(|()| "written".into()).map_err(e),
            "fs-list" => std::fs::read_dir("/").map(|d| format!("{} entries", d.count())).map_err(e),
            "cwd" => std::env::current_dir().map(|p| p.display().to_string()).map_err(e),
            "env" => Ok(format!("{} variables", std::env::vars_os().count())),
            "args" => Ok(format!("{} arguments", std::env::args_os().count())),
            "stdin" => {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf).map(|n| format!("{n} bytes from stdin")).map_err(e)
            }
            "stdout-flood" => {
                // A megabyte without a newline, then ten thousand short lines.
                let mut out = std::io::stdout();
                out.write_all(&vec![b'x'; 1 << 20]).map_err(e)?;
                for i in 0..10_000 {
                    writeln!(out, "line {i}\x1b[2J").map_err(e)?;
                }
                out.flush().map_err(e)?;
                Ok("flooded".into())
            }
            "tcp-connect" => TcpStream::connect(&self.target).map(|_| "connected".into()).map_err(e),
            "tcp-listen" => TcpListener::bind("127.0.0.1:0").map(|_| "listening".into()).map_err(e),
            "udp-bind" => UdpSocket::bind("127.0.0.1:0").map(|_| "bound".into()).map_err(e),
            "udp-send" => {
                let socket = UdpSocket::bind("0.0.0.0:0").map_err(e)?;
                socket.send_to(b"hello", &self.target).map(|n| format!("sent {n}")).map_err(e)
            }
            "dns" => ("localhost", 80).to_socket_addrs().map(|a| format!("{} addresses", a.count())).map_err(e),
            // Waiting: the gateway traps it.
            "sleep" => {
                std::thread::sleep(Duration::from_millis(10));
                Ok("slept".into())
            }
            "clock" => {
                let start = Instant::now();
                let wall = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_err(|e| e.to_string())?;
                Ok(format!("{}s {:?}", wall.as_secs(), start.elapsed() < Duration::from_secs(1)))
            }
            "random" => {
                // std seeds its hash maps from wasi:random.
                let state = std::collections::hash_map::RandomState::new();
                Ok(format!("{}", std::hash::BuildHasher::hash_one(&state, 1u8) != 0))
            }
            "exit" => std::process::exit(7),
            "abort" => std::process::abort(),
            _ => unreachable!("checked in new"),
        }
    }
}

wasmgate_sdk::export_plugin!(HostileWasi);
