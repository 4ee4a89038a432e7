//! Rate limits: new connections per client (by IP, or a header, query parameter or
//! metadata key) per time window, refused with 429 and `Retry-After`; and data messages
//! per connection per second as a token bucket, over which the connection is closed with
//! 1008. A connection the kv store cannot count (the plugin's share full) is refused with
//! 503 unless `uncounted = "allow"`: a limit that stops counting must not stop limiting.
//! See README.md for the config.

use serde::Deserialize;
use wasmgate_sdk::{
    kv, Action, CloseFrame, Conn, Direction, Hooks, Message, Plugin, Reject, Request, Verdict,
};

/// Connection metadata holding a connection's message bucket: "tokens,last_ms".
pub const BUCKET_META: &str = "rate-limit-bucket";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    connections_per_window: Option<u64>,
    #[serde(default = "defaults::window_secs")]
    window_secs: u64,
    #[serde(default = "defaults::key")]
    key: String,
    messages_per_sec: Option<f64>,
    burst: Option<f64>,
    #[serde(default = "defaults::count")]
    count: String,
    #[serde(default = "defaults::close_code")]
    close_code: u16,
    #[serde(default = "defaults::uncounted")]
    uncounted: String,
}

mod defaults {
    pub fn window_secs() -> u64 {
        60
    }
    pub fn key() -> String {
        "ip".into()
    }
    pub fn count() -> String {
        "client".into()
    }
    pub fn close_code() -> u16 {
        1008
    }
    pub fn uncounted() -> String {
        "refuse".into()
    }
}

/// What identifies a client for the connection limit.
#[derive(Debug, PartialEq)]
enum Key {
    Ip,
    Header(String),
    Query(String),
    Meta(String),
}

pub struct RateLimit {
    connections: Option<u64>,
    window_ms: u64,
    key: Key,
    /// Tokens per millisecond and bucket size.
    messages: Option<(f64, f64)>,
    count_both: bool,
    close_code: u16,
    /// Let a connection through when the store cannot count it.
    allow_uncounted: bool,
}

/// Why `admit` turned a connection away.
#[derive(Debug, PartialEq)]
enum Turned {
    /// Over the limit; retry in this many seconds.
    Limited(u64),
    /// The store refused to count it.
    Uncounted(kv::Error),
}

impl Plugin for RateLimit {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE.union(Hooks::MESSAGES);

    fn new(c: Config) -> Result<Self, String> {
        if c.connections_per_window.is_none() && c.messages_per_sec.is_none() {
            return Err("bad config: give connections_per_window, messages_per_sec or both".into());
        }
        if c.connections_per_window == Some(0) {
            return Err("bad config: connections_per_window must be at least 1".into());
        }
        if c.window_secs == 0 || c.window_secs > 86_400 {
            return Err("bad config: window_secs must be 1..=86400".into());
        }
        let key = match c.key.split_once(':') {
            None if c.key == "ip" => Key::Ip,
            Some(("header", name)) if !name.is_empty() => Key::Header(name.to_ascii_lowercase()),
            Some(("query", name)) if !name.is_empty() => Key::Query(name.into()),
            Some(("meta", name)) if !name.is_empty() => Key::Meta(name.into()),
            _ => {
                return Err(format!(
                    "bad config: key {:?} is not \"ip\", \"header:NAME\", \"query:NAME\" or \"meta:NAME\"",
                    c.key
                ))
            }
        };
        let messages = match c.messages_per_sec {
            None if c.burst.is_some() => {
                return Err("bad config: burst needs messages_per_sec".into())
            }
            None => None,
            Some(rate) if !(rate > 0.0 && rate.is_finite()) => {
                return Err("bad config: messages_per_sec must be above 0".into())
            }
            Some(rate) => {
                let burst = c.burst.unwrap_or(rate.max(1.0));
                if !(burst >= 1.0 && burst.is_finite()) {
                    return Err("bad config: burst must be at least 1".into());
                }
                Some((rate / 1000.0, burst))
            }
        };
        let count_both = match c.count.as_str() {
            "client" => false,
            "both" => true,
            other => {
                return Err(format!(
                    "bad config: count {other:?} is not \"client\" or \"both\""
                ))
            }
        };
        if !matches!(c.close_code, 1008 | 1013 | 3000..=4999) {
            return Err("bad config: close_code must be 1008, 1013 or 3000..=4999".into());
        }
        let allow_uncounted = match c.uncounted.as_str() {
            "refuse" => false,
            "allow" => true,
            other => return Err(format!("bad config: uncounted {other:?} is not \"refuse\" or \"allow\"")),
        };
        Ok(RateLimit {
            connections: c.connections_per_window,
            window_ms: c.window_secs * 1000,
            key,
            messages,
            count_both,
            close_code: c.close_code,
            allow_uncounted,
        })
    }

    fn hooks(&self) -> Hooks {
        let mut hooks = Hooks::empty();
        if self.connections.is_some() {
            hooks |= Hooks::HANDSHAKE;
        }
        if self.messages.is_some() {
            hooks |= Hooks::MESSAGES;
        }
        hooks
    }

    fn on_handshake(&mut self, conn: &Conn, req: &Request) -> Verdict {
        let Some(limit) = self.connections else {
            return Verdict::accept();
        };
        let client = match &self.key {
            Key::Ip => Some(req.client_ip().to_string()),
            Key::Header(name) => req.header(name).map(str::to_string),
            Key::Query(name) => req.query_param(name),
            Key::Meta(name) => conn.get_meta(name),
        };
        // A request without the key is counted under "" (one shared budget), so leaving
        // the header out does not escape the limit.
        let client = client.unwrap_or_default();
        match self.admit(&client, limit) {
            Ok(()) => Verdict::accept(),
            Err(Turned::Uncounted(e)) => {
                wasmgate_sdk::metrics::counter_add("rate_limit_uncounted_total", &[], 1);
                if self.allow_uncounted {
                    return Verdict::accept();
                }
                wasmgate_sdk::warn!("connection not counted (kv: {}): refused", e.name());
                wasmgate_sdk::metrics::counter_add("rate_limit_refused_total", &[("what", "uncounted")], 1);
                Reject::new(503, "the rate limit cannot count connections now; retry in 1 s")
                    .header("retry-after", "1")
                    .into()
            }
            Err(Turned::Limited(retry_secs)) => {
                wasmgate_sdk::metrics::counter_add(
                    "rate_limit_refused_total",
                    &[("what", "connection")],
                    1,
                );
                Reject::new(
                    429,
                    &format!("too many connections; retry in {retry_secs} s"),
                )
                .header("retry-after", &retry_secs.to_string())
                .into()
            }
        }
    }

    fn on_message(&mut self, conn: &Conn, msg: &Message) -> Action {
        let Some((per_ms, burst)) = self.messages else {
            return Action::Forward;
        };
        if msg.direction() == Direction::UpstreamToClient && !self.count_both {
            return Action::Forward;
        }
        let now = wasmgate_sdk::monotonic_ns() as f64 / 1e6;
        let (tokens, last) = conn
            .get_meta(BUCKET_META)
            .and_then(|s| {
                let (t, l) = s.split_once(',')?;
                Some((t.parse::<f64>().ok()?, l.parse::<f64>().ok()?))
            })
            .unwrap_or((burst, now));
        let tokens = (tokens + (now - last).max(0.0) * per_ms).min(burst);
        if tokens < 1.0 {
            conn.set_meta(BUCKET_META, &format!("{tokens},{now}"));
            wasmgate_sdk::metrics::counter_add(
                "rate_limit_refused_total",
                &[("what", "message")],
                1,
            );
            return Action::Close(CloseFrame {
                code: self.close_code,
                reason: "message rate limit exceeded".into(),
            });
        }
        conn.set_meta(BUCKET_META, &format!("{},{now}", tokens - 1.0));
        Action::Forward
    }
}

impl RateLimit {
    /// Counts a new connection of `client` against a sliding window (the current fixed
    /// window's count plus the previous one's, weighted by how much of it still overlaps).
    /// Refused attempts are not counted.
    fn admit(&self, client: &str, limit: u64) -> Result<(), Turned> {
        let now = wasmgate_sdk::now_ms();
        let w = self.window_ms;
        let (index, elapsed) = (now / w, now % w);
        let current = format!("c:{w}:{index}:{client}");
        let count = kv::incr(&current, 1, Some(2 * w)).map_err(Turned::Uncounted)? as f64;
        let previous = kv::get(&format!("c:{w}:{}:{client}", index.wrapping_sub(1)))
            .and_then(|v| String::from_utf8(v).ok()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        let (w, elapsed, limit) = (w as f64, elapsed as f64, limit as f64);
        let estimate = previous * (w - elapsed) / w + count;
        if estimate <= limit {
            return Ok(());
        }
        // Taking back an increment never needs room.
        let _ = kv::incr(&current, -1, None);
        let before = count - 1.0;
        // When would one more fit? Later in this window, as the previous one slides out...
        let wait_ms = if before + 1.0 <= limit && previous > 0.0 {
            let at = w - (limit - before - 1.0) * w / previous;
            at - elapsed
        } else {
            // ...or in the next one, as this one slides out.
            let at = if before > 0.0 {
                (w - (limit - 1.0) * w / before).max(0.0)
            } else {
                0.0
            };
            w - elapsed + at
        };
        Err(Turned::Limited(((wait_ms / 1000.0).ceil() as u64).max(1)))
    }
}

wasmgate_sdk::export_plugin!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_sdk::testing::advance_clock;
    use wasmgate_sdk::Opcode;

    fn plugin(config: &str) -> RateLimit {
        RateLimit::from_json(config).unwrap()
    }

    fn from(ip: &str) -> Request {
        Request::new("/").with_client_addr(&format!("{ip}:5000"))
    }

    fn retry_after(v: &Verdict) -> Option<u64> {
        match v {
            Verdict::Reject(r) if r.status == 429 => r
                .headers
                .iter()
                .find(|h| h.name == "retry-after")
                .map(|h| h.value.parse().unwrap()),
            _ => None,
        }
    }

    /// Moves the clock to the start of a window so tests do not straddle a boundary.
    fn align(window_ms: u64) {
        advance_clock(window_ms - wasmgate_sdk::now_ms() % window_ms);
    }

    #[test]
    fn connections_per_window_per_ip() {
        let mut p = plugin(r#"{"connections_per_window":3,"window_secs":10}"#);
        assert_eq!(p.hooks(), Hooks::HANDSHAKE);
        align(10_000);
        let conn = Conn::new(1);
        for _ in 0..3 {
            assert_eq!(p.on_handshake(&conn, &from("10.0.0.1")), Verdict::accept());
        }
        let refused = p.on_handshake(&conn, &from("10.0.0.1"));
        // Three in this window: one more fits 3⅓ s into the next, when 3·(1-f) + 1 ≤ 3.
        assert_eq!(retry_after(&refused), Some(14));
        let Verdict::Reject(r) = &refused else {
            panic!()
        };
        assert_eq!(r.reason, "too many connections; retry in 14 s");
        // Another client has its own budget.
        assert_eq!(p.on_handshake(&conn, &from("10.0.0.2")), Verdict::accept());
        // Refused attempts do not count: the next window allows one as soon as it starts.
        advance_clock(10_000);
        assert!(retry_after(&p.on_handshake(&conn, &from("10.0.0.1"))).is_some());
        advance_clock(4_000);
        assert_eq!(p.on_handshake(&conn, &from("10.0.0.1")), Verdict::accept());
        assert!(retry_after(&p.on_handshake(&conn, &from("10.0.0.1"))).is_some());
        advance_clock(20_000);
        for _ in 0..3 {
            assert_eq!(p.on_handshake(&conn, &from("10.0.0.1")), Verdict::accept());
        }
        assert_eq!(
            wasmgate_sdk::testing::counter("rate_limit_refused_total", &[("what", "connection")]),
            3
        );
    }

    #[test]
    fn retry_after_says_when_one_more_fits() {
        let mut p = plugin(r#"{"connections_per_window":2,"window_secs":10}"#);
        align(10_000);
        let conn = Conn::new(1);
        for _ in 0..2 {
            assert_eq!(p.on_handshake(&conn, &from("10.0.0.1")), Verdict::accept());
        }
        // Next window: previous count 2, weight falls 1 → 0; one fits when 2·(1-f) ≤ 1.
        advance_clock(10_000);
        let wait = retry_after(&p.on_handshake(&conn, &from("10.0.0.1"))).unwrap();
        assert_eq!(wait, 5);
        advance_clock(wait * 1000);
        assert_eq!(p.on_handshake(&conn, &from("10.0.0.1")), Verdict::accept());
    }

    #[test]
    fn other_keys() {
        let mut p = plugin(r#"{"connections_per_window":1,"key":"header:X-User"}"#);
        let conn = Conn::new(1);
        let user = |u: &str| Request::new("/").with_header("x-user", u);
        assert_eq!(p.on_handshake(&conn, &user("a")), Verdict::accept());
        assert!(retry_after(&p.on_handshake(&conn, &user("a"))).is_some());
        assert_eq!(p.on_handshake(&conn, &user("b")), Verdict::accept());
        assert_eq!(p.on_handshake(&conn, &Request::new("/")), Verdict::accept());
        assert!(retry_after(&p.on_handshake(&conn, &Request::new("/"))).is_some());
        let mut by_meta = plugin(r#"{"connections_per_window":1,"key":"meta:api-key-name"}"#);
        let team = Conn::new(2).with_meta("api-key-name", "team-a");
        assert_eq!(
            by_meta.on_handshake(&team, &Request::new("/")),
            Verdict::accept()
        );
        assert!(retry_after(&by_meta.on_handshake(&team, &Request::new("/"))).is_some());
    }

    #[test]
    fn message_bucket_closes_with_1008_and_refills() {
        let mut p = plugin(r#"{"messages_per_sec":10,"burst":3}"#);
        assert_eq!(p.hooks(), Hooks::MESSAGES);
        let conn = Conn::new(1);
        let send = |p: &mut RateLimit, dir| p.on_message(&conn, &Message::new(dir, Opcode::Text, &b"x"[..]));
        for _ in 0..3 {
            assert_eq!(send(&mut p, Direction::ClientToUpstream), Action::Forward);
        }
        // Upstream messages are not counted by default.
        assert_eq!(send(&mut p, Direction::UpstreamToClient), Action::Forward);
        advance_clock(100);
        assert_eq!(send(&mut p, Direction::ClientToUpstream), Action::Forward);
        let close = Action::Close(CloseFrame {
            code: 1008,
            reason: "message rate limit exceeded".into(),
        });
        assert_eq!(send(&mut p, Direction::ClientToUpstream), close);
        // Another connection has its own bucket.
        assert_eq!(
            p.on_message(
                &Conn::new(2),
                &Message::new(Direction::ClientToUpstream, Opcode::Binary, vec![])
            ),
            Action::Forward
        );
        advance_clock(1000);
        for _ in 0..3 {
            assert_eq!(send(&mut p, Direction::ClientToUpstream), Action::Forward);
        }
        assert_eq!(send(&mut p, Direction::ClientToUpstream), close);
    }

    #[test]
    fn both_directions_and_both_limits() {
        let mut p = plugin(
            r#"{"messages_per_sec":1,"count":"both","close_code":4029,"connections_per_window":5}"#,
        );
        assert_eq!(p.hooks(), Hooks::HANDSHAKE | Hooks::MESSAGES);
        let conn = Conn::new(1);
        assert_eq!(
            p.on_message(&conn, &Message::new(Direction::UpstreamToClient, Opcode::Text, vec![])),
            Action::Forward
        );
        assert_eq!(
            p.on_message(&conn, &Message::new(Direction::ClientToUpstream, Opcode::Text, vec![])),
            Action::Close(CloseFrame {
                code: 4029,
                reason: "message rate limit exceeded".into()
            })
        );
    }

    #[test]
    fn connections_the_store_cannot_count_are_refused_unless_allowed() {
        let uncounted = |v: &Verdict| match v {
            Verdict::Reject(r) => (r.status, r.headers.iter().find(|h| h.name == "retry-after").map(|h| h.value.clone())),
            _ => (101, None),
        };
        let conn = Conn::new(1);
        let mut strict = plugin(r#"{"connections_per_window":100}"#);
        assert_eq!(strict.on_handshake(&conn, &from("10.0.0.1")), Verdict::accept());
        // The share is full: a client already counted can still be counted...
        wasmgate_sdk::testing::set_kv_share(1, 1 << 20);
        assert_eq!(strict.on_handshake(&conn, &from("10.0.0.1")), Verdict::accept());
        // ...a new one cannot, and is refused.
        let refused = strict.on_handshake(&conn, &from("10.0.0.2"));
        assert_eq!(uncounted(&refused), (503, Some("1".into())));
        assert_eq!(wasmgate_sdk::testing::counter("rate_limit_refused_total", &[("what", "uncounted")]), 1);
        let mut lenient = plugin(r#"{"connections_per_window":100,"uncounted":"allow"}"#);
        assert_eq!(lenient.on_handshake(&conn, &from("10.0.0.3")), Verdict::accept());
        assert_eq!(wasmgate_sdk::testing::counter("rate_limit_uncounted_total", &[]), 2);
    }

    #[test]
    fn bad_config_is_refused() {
        for bad in [
            r#"{}"#,
            r#"{"connections_per_window":0}"#,
            r#"{"connections_per_window":1,"window_secs":0}"#,
            r#"{"connections_per_window":1,"key":"cookie:a"}"#,
            r#"{"messages_per_sec":0}"#,
            r#"{"messages_per_sec":1,"burst":0.5}"#,
            r#"{"connections_per_window":1,"burst":2}"#,
            r#"{"messages_per_sec":1,"count":"upstream"}"#,
            r#"{"messages_per_sec":1,"close_code":1000}"#,
            r#"{"messages_per_sec":1,"typo":1}"#,
            r#"{"connections_per_window":1,"uncounted":"maybe"}"#,
        ] {
            assert!(RateLimit::from_json(bad).is_err(), "{bad}");
        }
    }
}
