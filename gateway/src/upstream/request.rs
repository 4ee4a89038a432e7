//! What the gateway asks an upstream server for: the path, and the header lines already
//! written as they go on the wire.
//!
//! The lines are one text rather than a list of name and value pairs: every connection
//! builds them (the client's end-to-end headers, then the forwarding headers), and a list
//! cost two allocations per header and a few more per forwarding header, about 20 of a
//! plain connection's 60 (BENCHMARKS.md, "Reconnect cost, eighth round"). Headers that
//! plugins remove or set are left out as the text is written (`handshake::upstream_headers`),
//! and what they set is appended.

/// What to ask the upstream for.
#[derive(Debug, Clone, Default)]
pub struct UpstreamRequest {
    /// Path and query as the upstream should see them (before the server's path prefix).
    pub path_and_query: String,
    /// End-to-end headers to send, already filtered of hop-by-hop ones.
    pub headers: HeaderLines,
}

/// Header lines, each `name: value\r\n`. Values are written as given: callers pass header
/// values that were checked (the client's, parsed; plugins', validated), never raw input
/// with CR or LF in it.
#[derive(Debug, Clone, Default)]
pub struct HeaderLines {
    text: String,
    has_host: bool,
}

impl HeaderLines {
    pub fn with_capacity(bytes: usize) -> HeaderLines {
        HeaderLines { text: String::with_capacity(bytes), has_host: false }
    }

    pub fn push(&mut self, name: &str, value: &str) {
        self.push_with(name, |text| text.push_str(value));
    }

    /// A line whose value `write` appends in place, so a value made of parts (a list, an
    /// address) needs no buffer of its own.
    pub fn push_with(&mut self, name: &str, write: impl FnOnce(&mut String)) {
        self.has_host |= name.eq_ignore_ascii_case("host");
        self.text.push_str(name);
        self.text.push_str(": ");
        write(&mut self.text);
        self.text.push_str("\r\n");
    }

    /// Each line's name and value.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.text.split_terminator("\r\n").filter_map(|line| line.split_once(": "))
    }

    pub fn has_host(&self) -> bool {
        self.has_host
    }

    /// The lines as they go on the wire.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for HeaderLines {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(pairs: I) -> HeaderLines {
        let mut lines = HeaderLines::default();
        for (name, value) in pairs {
            lines.push(name, value);
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_written_and_read_back() {
        let mut lines: HeaderLines = [("Origin", "https://a.example"), ("x-user", "alice")].into_iter().collect();
        lines.push_with("x-forwarded-for", |v| v.push_str("10.0.0.1, 192.0.2.1"));
        assert_eq!(
            lines.as_str(),
            "Origin: https://a.example\r\nx-user: alice\r\nx-forwarded-for: 10.0.0.1, 192.0.2.1\r\n"
        );
        assert!(!lines.has_host());
        assert_eq!(
            lines.iter().collect::<Vec<_>>(),
            [("Origin", "https://a.example"), ("x-user", "alice"), ("x-forwarded-for", "10.0.0.1, 192.0.2.1")]
        );
    }

    #[test]
    fn host_is_noticed_in_any_case() {
        let lines: HeaderLines = [("HoSt", "a.example")].into_iter().collect();
        assert!(lines.has_host());
        assert!(!HeaderLines::default().has_host());
    }

    #[test]
    fn a_value_with_colons_and_spaces_reads_back_whole() {
        let lines: HeaderLines = [("forwarded", "for=\"[2001:db8::1]\";host=\"a: b\"")].into_iter().collect();
        assert_eq!(lines.iter().collect::<Vec<_>>(), [("forwarded", "for=\"[2001:db8::1]\";host=\"a: b\"")]);
    }
}
