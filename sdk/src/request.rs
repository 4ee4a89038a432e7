//! Reading the client's upgrade request: headers, query parameters, cookies, path segments.

use crate::Request;

impl Request {
    /// A GET request for `target` ("/path?query") from 127.0.0.1:40000 with no headers;
    /// for tests, and for plugins that build requests.
    pub fn new(target: &str) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: "GET".into(),
            path: path.into(),
            query: query.into(),
            host: String::new(),
            headers: String::new(),
            client_addr: "127.0.0.1:40000".into(),
            subprotocols: Vec::new(),
            scheme: "ws".into(),
            tls: None,
        }
    }

    /// Adds a header (its name lower-cased, as the host hands them over). A line break in
    /// either would split the header in two, so it panics on one.
    pub fn with_header(mut self, name: &str, value: &str) -> Request {
        assert!(
            !name.contains(['\n', '\r', ':']) && !value.contains(['\n', '\r']),
            "a header name or value with a line break (or a name with ':'): {name:?}: {value:?}"
        );
        self.headers.push_str(&name.to_ascii_lowercase());
        self.headers.push_str(": ");
        self.headers.push_str(value);
        self.headers.push('\n');
        self
    }

    /// As if the client came over TLS (`wss`), with what the listener saw.
    pub fn with_tls(mut self, tls: crate::TlsInfo) -> Request {
        self.scheme = "wss".into();
        self.tls = Some(tls);
        self
    }

    pub fn with_client_addr(mut self, addr: &str) -> Request {
        self.client_addr = addr.into();
        self
    }

    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers_named(name).next()
    }

    /// Every header called `name` (any case), in order.
    pub fn headers_named<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.headers()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    /// Every header as (name, value), names lower-case, in the order received. The host
    /// hands them over as one text, a line "name: value" each; this splits it, copying
    /// nothing.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.split_terminator('\n').filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name, value.strip_prefix(' ').unwrap_or(value)))
        })
    }

    /// The first query parameter called `name`, percent- and `+`-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(key, _)| decode(key) == name)
            .map(|(_, value)| decode(value))
    }

    /// The value of cookie `name` from the `cookie` headers, without surrounding quotes.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.headers_named("cookie")
            .flat_map(|header| header.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.trim_matches('"'))
    }

    /// The `n`th non-empty segment of the path, from 0: in "/chat/room1", 1 is "room1".
    pub fn path_segment(&self, n: usize) -> Option<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).nth(n)
    }

    /// The client's IP address without the port ("::1" for "[::1]:5000").
    pub fn client_ip(&self) -> &str {
        let addr = self.client_addr.as_str();
        match addr.rsplit_once(':') {
            Some((ip, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                ip.trim_start_matches('[').trim_end_matches(']')
            }
            _ => addr,
        }
    }
}

/// Decodes `%XX` escapes and `+` (a space in form encoding); malformed escapes stay as is.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match bytes.get(i + 1..i + 3).and_then(|h| hex_pair(h[0], h[1])) {
                Some(decoded) => {
                    out.push(decoded);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_pair(hi: u8, lo: u8) -> Option<u8> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    Some(digit(hi)? << 4 | digit(lo)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_match_any_case() {
        let req = Request::new("/")
            .with_header("X-Token", "a")
            .with_header("x-token", "b");
        assert_eq!(req.header("x-token"), Some("a"));
        assert_eq!(req.header("X-TOKEN"), Some("a"));
        assert_eq!(req.headers_named("x-token").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(req.header("absent"), None);
    }

    #[test]
    fn headers_split_as_the_host_joins_them() {
        // As the gateway writes them: empty values and colons inside values included.
        let req = Request {
            headers: "host: a:8080\nx-empty: \nauthorization: Bearer t.k.n\n".into(),
            ..Request::new("/")
        };
        assert_eq!(
            req.headers().collect::<Vec<_>>(),
            [("host", "a:8080"), ("x-empty", ""), ("authorization", "Bearer t.k.n")]
        );
        assert_eq!(Request::new("/").headers().count(), 0);
        let built = Request::new("/").with_header("X-A", "1").with_header("x-b", "");
        assert_eq!(built.headers().collect::<Vec<_>>(), [("x-a", "1"), ("x-b", "")]);
    }

    #[test]
    #[should_panic(expected = "line break")]
    fn a_value_with_a_line_break_is_refused() {
        let _ = Request::new("/").with_header("x-a", "1\nx-admin: yes");
    }

    #[test]
    fn query_params_are_decoded() {
        let req = Request::new("/chat?room=a%20b&flag&name=x+y&bad=%zz&last=%41");
        assert_eq!(req.path, "/chat");
        assert_eq!(req.query_param("room").as_deref(), Some("a b"));
        assert_eq!(req.query_param("flag").as_deref(), Some(""));
        assert_eq!(req.query_param("name").as_deref(), Some("x y"));
        assert_eq!(req.query_param("bad").as_deref(), Some("%zz"));
        assert_eq!(req.query_param("last").as_deref(), Some("A"));
        assert_eq!(req.query_param("missing"), None);
        assert_eq!(Request::new("/").query_param("x"), None);
    }

    #[test]
    fn cookies_across_headers() {
        let req = Request::new("/")
            .with_header("cookie", "a=1; session=\"s1\"")
            .with_header("cookie", "b=2");
        assert_eq!(req.cookie("session"), Some("s1"));
        assert_eq!(req.cookie("b"), Some("2"));
        assert_eq!(req.cookie("c"), None);
    }

    #[test]
    fn path_segments_and_client_ip() {
        let req = Request::new("/chat//room1/").with_client_addr("[::1]:5000");
        assert_eq!(req.path_segment(0), Some("chat"));
        assert_eq!(req.path_segment(1), Some("room1"));
        assert_eq!(req.path_segment(2), None);
        assert_eq!(req.client_ip(), "::1");
        assert_eq!(
            Request::new("/")
                .with_client_addr("10.0.0.1:80")
                .client_ip(),
            "10.0.0.1"
        );
    }
}
