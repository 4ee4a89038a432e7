//! Chooses the upstream pool for a connection from rules over its host, path, headers,
//! query parameters and subprotocol offer, and rewrites the path sent upstream. Rules are
//! tried in order and the first that matches wins. See README.md for the config.

use std::collections::BTreeMap;

use serde::Deserialize;
use wasmgate_sdk::{Accept, Conn, Hooks, Plugin, Request, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    rules: Vec<RuleConfig>,
    #[serde(default)]
    reject_unmatched: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    name: Option<String>,
    host: Option<String>,
    path_prefix: Option<String>,
    path: Option<String>,
    #[serde(default)]
    header: BTreeMap<String, String>,
    #[serde(default)]
    query: BTreeMap<String, String>,
    subprotocol: Option<String>,
    upstream: Option<String>,
    #[serde(default)]
    strip_prefix: bool,
    rewrite: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

struct Rule {
    name: String,
    host: Option<String>,
    path_prefix: Option<String>,
    path: Option<String>,
    header: Vec<(String, String)>,
    query: Vec<(String, String)>,
    subprotocol: Option<String>,
    upstream: Option<String>,
    /// What replaces the matched prefix (or the whole path without `path_prefix`).
    rewrite: Option<String>,
    headers: Vec<(String, String)>,
}

pub struct Router {
    rules: Vec<Rule>,
    reject_unmatched: bool,
}

impl Plugin for Router {
    type Config = Config;
    const HOOKS: Hooks = Hooks::HANDSHAKE;

    fn new(config: Config) -> Result<Self, String> {
        let mut rules = Vec::new();
        for (i, r) in config.rules.into_iter().enumerate() {
            let bad = |why: &str| format!("bad config: rules[{i}]: {why}");
            if r.path_prefix.is_some() && r.path.is_some() {
                return Err(bad("give `path_prefix` or `path`, not both"));
            }
            if let Some(p) = r
                .path_prefix
                .iter()
                .chain(&r.path)
                .find(|p| !p.starts_with('/'))
            {
                return Err(bad(&format!("{p:?} must start with /")));
            }
            if r.strip_prefix && r.rewrite.is_some() {
                return Err(bad("give `strip_prefix` or `rewrite`, not both"));
            }
            if r.strip_prefix && r.path_prefix.is_none() {
                return Err(bad("`strip_prefix` needs `path_prefix`"));
            }
            if let Some(p) = r.rewrite.as_ref().filter(|p| !p.starts_with('/')) {
                return Err(bad(&format!("rewrite {p:?} must start with /")));
            }
            if let Some(h) = r
                .header
                .keys()
                .chain(r.headers.keys())
                .find(|h| !is_token(h))
            {
                return Err(bad(&format!("{h:?} is not a header name")));
            }
            if r.upstream.as_deref() == Some("") {
                return Err(bad("upstream must not be empty"));
            }
            let lower = |m: BTreeMap<String, String>| {
                m.into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect()
            };
            rules.push(Rule {
                name: r.name.unwrap_or_else(|| i.to_string()),
                host: r.host.map(|h| h.to_ascii_lowercase()),
                path_prefix: r.path_prefix.map(|p| match p.trim_end_matches('/') {
                    "" => "/".to_string(),
                    p => p.to_string(),
                }),
                path: r.path,
                header: lower(r.header),
                query: r.query.into_iter().collect(),
                subprotocol: r.subprotocol,
                upstream: r.upstream,
                rewrite: if r.strip_prefix {
                    Some(String::new())
                } else {
                    r.rewrite
                },
                headers: lower(r.headers),
            });
        }
        Ok(Router {
            rules,
            reject_unmatched: config.reject_unmatched,
        })
    }

    fn on_handshake(&mut self, conn: &Conn, req: &Request) -> Verdict {
        let host = req
            .host
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()));
        let host = host
            .map_or(req.host.as_str(), |(h, _)| h)
            .to_ascii_lowercase();
        for rule in &self.rules {
            let Some(rest) = rule.matches(req, &host) else {
                continue;
            };
            wasmgate_sdk::metrics::counter_add("router_matches_total", &[("rule", &rule.name)], 1);
            conn.set_meta("router-rule", &rule.name);
            let mut accept = Accept::default();
            if let Some(pool) = &rule.upstream {
                accept = accept.upstream(pool);
            }
            if let Some(replacement) = &rule.rewrite {
                let path = format!("{replacement}{rest}");
                let path = if path.starts_with('/') {
                    path
                } else {
                    format!("/{path}")
                };
                accept = accept.rewrite_path(&path);
            }
            for (name, value) in &rule.headers {
                accept = accept.add_header(name, value);
            }
            return accept.into();
        }
        if self.reject_unmatched {
            return Verdict::reject(404, "no route for this request");
        }
        Verdict::accept()
    }
}

impl Rule {
    /// When every condition holds: the part of the path after the matched `path_prefix`,
    /// which `rewrite` keeps; "" without `path_prefix`, so `rewrite` replaces the whole path.
    fn matches<'r>(&self, req: &'r Request, host: &str) -> Option<&'r str> {
        if let Some(pattern) = &self.host {
            if !glob(pattern.as_bytes(), host.as_bytes(), b'.') {
                return None;
            }
        }
        let mut rest = "";
        if let Some(prefix) = &self.path_prefix {
            rest = strip_segments(&req.path, prefix)?;
        }
        if let Some(pattern) = &self.path {
            if !glob(pattern.as_bytes(), req.path.as_bytes(), b'/') {
                return None;
            }
        }
        for (name, pattern) in &self.header {
            if !req
                .headers_named(name)
                .any(|v| glob(pattern.as_bytes(), v.trim().as_bytes(), 0))
            {
                return None;
            }
        }
        for (name, pattern) in &self.query {
            if !req
                .query_param(name)
                .is_some_and(|v| glob(pattern.as_bytes(), v.as_bytes(), 0))
            {
                return None;
            }
        }
        if let Some(pattern) = &self.subprotocol {
            if !req
                .subprotocols
                .iter()
                .any(|p| glob(pattern.as_bytes(), p.as_bytes(), 0))
            {
                return None;
            }
        }
        Some(rest)
    }
}

/// `path` without `prefix` when the prefix covers whole segments ("/api" fits "/api" and
/// "/api/x", not "/apix"); the rest keeps its leading slash.
fn strip_segments<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    if prefix == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// Glob matching: `*` is any run of characters other than `sep` (any run at all when
/// `sep` is 0), `**` any run including `sep`, `?` one character. Case-sensitive.
fn glob(pattern: &[u8], text: &[u8], sep: u8) -> bool {
    match pattern {
        [] => text.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=text.len()).any(|n| glob(rest, &text[n..], sep)),
        [b'*', rest @ ..] => {
            let run = text.iter().take_while(|&&b| sep == 0 || b != sep).count();
            (0..=run).any(|n| glob(rest, &text[n..], sep))
        }
        [b'?', rest @ ..] => {
            !text.is_empty() && (sep == 0 || text[0] != sep) && glob(rest, &text[1..], sep)
        }
        [p, rest @ ..] => text.first() == Some(p) && glob(rest, &text[1..], sep),
    }
}

/// An HTTP token (RFC 9110): what a header name may be made of.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

wasmgate_sdk::export_plugin!(Router);

#[cfg(test)]
mod tests {
    use super::*;

    fn router(rules: &str) -> Router {
        Router::from_json(&format!(r#"{{"rules":{rules}}}"#)).unwrap()
    }

    fn route(r: &mut Router, req: Request) -> Verdict {
        r.on_handshake(&Conn::new(1), &req)
    }

    fn host(target: &str, host: &str) -> Request {
        let mut req = Request::new(target);
        req.host = host.into();
        req
    }

    #[test]
    fn first_matching_rule_wins() {
        let mut r = router(
            r#"[
            {"name":"eu","host":"*.eu.example.com","upstream":"eu"},
            {"path_prefix":"/v2/","upstream":"v2","strip_prefix":true},
            {"path_prefix":"/api","upstream":"api","rewrite":"/internal"},
            {"path":"/rooms/*/admin","upstream":"admin"},
            {"header":{"X-Backend":"canary"},"upstream":"canary","headers":{"x-routed":"canary"}},
            {"query":{"version":"3*"},"upstream":"v3"},
            {"subprotocol":"mqtt*","upstream":"mqtt"},
            {"upstream":"fallback"}
        ]"#,
        );
        let conn = Conn::new(1);
        assert_eq!(
            r.on_handshake(&conn, &host("/v2/x", "a.eu.example.com:443")),
            Accept::default().upstream("eu").into()
        );
        assert_eq!(conn.get_meta("router-rule").as_deref(), Some("eu"));
        assert_eq!(
            route(&mut r, host("/v2/chat", "us.example.com")),
            Accept::default()
                .upstream("v2")
                .rewrite_path("/chat")
                .into()
        );
        assert_eq!(
            route(&mut r, Request::new("/v2")),
            Accept::default().upstream("v2").rewrite_path("/").into()
        );
        assert_eq!(
            route(&mut r, Request::new("/api/a/b")),
            Accept::default()
                .upstream("api")
                .rewrite_path("/internal/a/b")
                .into()
        );
        // Prefixes match whole segments.
        assert_eq!(
            route(&mut r, Request::new("/apix")),
            Accept::default().upstream("fallback").into()
        );
        assert_eq!(
            route(&mut r, Request::new("/rooms/r1/admin")),
            Accept::default().upstream("admin").into()
        );
        assert_eq!(
            route(&mut r, Request::new("/rooms/r1/r2/admin")),
            Accept::default().upstream("fallback").into()
        );
        assert_eq!(
            route(&mut r, Request::new("/").with_header("x-backend", "canary")),
            Accept::default()
                .upstream("canary")
                .add_header("x-routed", "canary")
                .into()
        );
        assert_eq!(
            route(&mut r, Request::new("/?version=3.1")),
            Accept::default().upstream("v3").into()
        );
        let mut mqtt = Request::new("/");
        mqtt.subprotocols = vec!["chat".into(), "mqttv5".into()];
        assert_eq!(
            route(&mut r, mqtt),
            Accept::default().upstream("mqtt").into()
        );
    }

    #[test]
    fn all_conditions_of_a_rule_must_hold() {
        let mut r = router(
            r#"[{"host":"chat.example.com","path_prefix":"/ws","header":{"x-tier":"*"},"upstream":"gold"}]"#,
        );
        assert_eq!(
            route(
                &mut r,
                host("/ws", "Chat.Example.com").with_header("x-tier", "x")
            ),
            Accept::default().upstream("gold").into()
        );
        assert_eq!(
            route(&mut r, host("/ws", "chat.example.com")),
            Verdict::accept()
        );
        assert_eq!(
            route(
                &mut r,
                host("/other", "chat.example.com").with_header("x-tier", "x")
            ),
            Verdict::accept()
        );
        let mut strict = Router::from_json(
            r#"{"rules":[{"path_prefix":"/a","upstream":"a"}],"reject_unmatched":true}"#,
        )
        .unwrap();
        assert_eq!(
            route(&mut strict, Request::new("/b")),
            Verdict::reject(404, "no route for this request")
        );
    }

    #[test]
    fn rewrite_without_prefix_replaces_the_path() {
        let mut r = router(
            r#"[{"path":"/old/**","rewrite":"/new"}, {"path_prefix":"/","rewrite":"/base"}]"#,
        );
        assert_eq!(
            route(&mut r, Request::new("/old/a/b")),
            Accept::default().rewrite_path("/new").into()
        );
        assert_eq!(
            route(&mut r, Request::new("/x/y")),
            Accept::default().rewrite_path("/base/x/y").into()
        );
    }

    #[test]
    fn globs() {
        assert!(glob(b"*.example.com", b"a.example.com", b'.'));
        assert!(!glob(b"*.example.com", b"a.b.example.com", b'.'));
        assert!(glob(b"**.example.com", b"a.b.example.com", b'.'));
        assert!(glob(b"/a/**", b"/a/b/c", b'/'));
        assert!(glob(b"v?", b"v2", 0));
        assert!(!glob(b"v?", b"v", 0));
        assert!(glob(b"*", b"", 0));
    }

    #[test]
    fn bad_config_is_refused() {
        let err = |rules: &str| {
            Router::from_json(&format!(r#"{{"rules":{rules}}}"#))
                .err()
                .unwrap()
        };
        assert!(err(r#"[{"path":"/a","path_prefix":"/a"}]"#).contains("not both"));
        assert!(err(r#"[{"path_prefix":"a"}]"#).contains("must start with /"));
        assert!(
            err(r#"[{"path_prefix":"/a","strip_prefix":true,"rewrite":"/b"}]"#)
                .contains("not both")
        );
        assert!(err(r#"[{"strip_prefix":true}]"#).contains("needs `path_prefix`"));
        assert!(err(r#"[{"header":{"a b":"c"}}]"#).contains("not a header name"));
        assert!(err(r#"[{"upstream":"a","typo":1}]"#).contains("unknown field"));
    }
}
