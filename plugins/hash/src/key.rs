//! Where the hash key comes from, as named in the `key` config option.

use wasmgate_sdk::Request;

/// A part of the upgrade request to hash on.
#[derive(Debug, PartialEq)]
pub enum KeySource {
    /// The client's IP address, without the port.
    Ip,
    Header(String),
    Cookie(String),
    Query(String),
    /// The Nth non-empty path segment, from 0.
    PathSegment(usize),
}

impl KeySource {
    /// Parses "ip", "header:NAME", "cookie:NAME", "query:NAME" or "path-segment:N".
    pub fn parse(spec: &str) -> Result<KeySource, String> {
        let named = |name: &str| {
            if name.is_empty() {
                Err(format!("bad config: key {spec:?} needs a name after ':'"))
            } else {
                Ok(name.to_string())
            }
        };
        match spec.split_once(':') {
            None if spec == "ip" => Ok(KeySource::Ip),
            Some(("header", name)) => Ok(KeySource::Header(named(name)?)),
            Some(("cookie", name)) => Ok(KeySource::Cookie(named(name)?)),
            Some(("query", name)) => Ok(KeySource::Query(named(name)?)),
            Some(("path-segment", n)) => n
                .parse()
                .map(KeySource::PathSegment)
                .map_err(|_| format!("bad config: key {spec:?} needs a segment number")),
            _ => Err(format!(
                "bad config: key {spec:?} is not ip, header:NAME, cookie:NAME, query:NAME or path-segment:N"
            )),
        }
    }

    /// The key for `req`, or none when the request lacks that part.
    pub fn extract(&self, req: &Request) -> Option<String> {
        match self {
            KeySource::Ip => Some(req.client_ip().to_string()),
            KeySource::Header(name) => req.header(name).map(str::to_string),
            KeySource::Cookie(name) => req.cookie(name).map(str::to_string),
            KeySource::Query(name) => req.query_param(name),
            KeySource::PathSegment(n) => req.path_segment(*n).map(str::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(KeySource::parse("ip"), Ok(KeySource::Ip));
        assert_eq!(
            KeySource::parse("header:X-User"),
            Ok(KeySource::Header("X-User".into()))
        );
        assert_eq!(
            KeySource::parse("cookie:sid"),
            Ok(KeySource::Cookie("sid".into()))
        );
        assert_eq!(
            KeySource::parse("query:room"),
            Ok(KeySource::Query("room".into()))
        );
        assert_eq!(
            KeySource::parse("path-segment:1"),
            Ok(KeySource::PathSegment(1))
        );
        for bad in ["", "ip:1", "header:", "path-segment:x", "body:a", "IP"] {
            assert!(
                KeySource::parse(bad).unwrap_err().starts_with("bad config"),
                "{bad}"
            );
        }
    }

    #[test]
    fn extracts_from_the_request() {
        let req = Request::new("/chat/room7?room=r1")
            .with_header("x-user", "ann")
            .with_header("cookie", "sid=s9")
            .with_client_addr("192.0.2.4:5555");
        let key = |spec| KeySource::parse(spec).unwrap().extract(&req);
        assert_eq!(key("ip").as_deref(), Some("192.0.2.4"));
        assert_eq!(key("header:x-user").as_deref(), Some("ann"));
        assert_eq!(key("cookie:sid").as_deref(), Some("s9"));
        assert_eq!(key("query:room").as_deref(), Some("r1"));
        assert_eq!(key("path-segment:1").as_deref(), Some("room7"));
        assert_eq!(key("header:absent"), None);
    }
}
