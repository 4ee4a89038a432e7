//! Constructors for the contract's records, so hooks read as what they decide:
//! `Accept::default().add_header("x-user", &user).into()`, `Verdict::reject(401, "no token")`.

use crate::{Accept, Candidate, Compression, Header, Reject, Server, Verdict};

impl Verdict {
    /// Accept the connection unchanged.
    pub fn accept() -> Verdict {
        Verdict::Accept(Accept::default())
    }

    /// Refuse the upgrade with `status` (400..=599) and `reason` as the body.
    pub fn reject(status: u16, reason: &str) -> Verdict {
        Verdict::Reject(Reject::new(status, reason))
    }
}

impl From<Accept> for Verdict {
    fn from(accept: Accept) -> Verdict {
        Verdict::Accept(accept)
    }
}

impl From<Reject> for Verdict {
    fn from(reject: Reject) -> Verdict {
        Verdict::Reject(reject)
    }
}

/// Accept with no changes.
impl Default for Accept {
    fn default() -> Accept {
        Accept {
            upstream: None,
            add_headers: Vec::new(),
            remove_headers: Vec::new(),
            rewrite_path: None,
            subprotocol: None,
            compression: None,
        }
    }
}

impl Accept {
    /// Adds (or replaces) a header on the upstream request.
    pub fn add_header(mut self, name: &str, value: &str) -> Accept {
        self.add_headers.push(Header {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Removes a header from the upstream request.
    pub fn remove_header(mut self, name: &str) -> Accept {
        self.remove_headers.push(name.into());
        self
    }

    /// Sends the connection to upstream pool `pool` instead of the route's.
    pub fn upstream(mut self, pool: &str) -> Accept {
        self.upstream = Some(pool.into());
        self
    }

    /// Rewrites the path sent upstream; the query is kept.
    pub fn rewrite_path(mut self, path: &str) -> Accept {
        self.rewrite_path = Some(path.into());
        self
    }

    /// Answers the client with this subprotocol.
    pub fn subprotocol(mut self, protocol: &str) -> Accept {
        self.subprotocol = Some(protocol.into());
        self
    }

    /// Sets this connection's compression instead of the configured default.
    pub fn compression(mut self, compression: Compression) -> Accept {
        self.compression = Some(compression);
        self
    }
}

impl Reject {
    /// A refusal with `status` (400..=599) and `reason` as the body.
    pub fn new(status: u16, reason: &str) -> Reject {
        Reject {
            status,
            reason: reason.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a response header, e.g. `www-authenticate`.
    pub fn header(mut self, name: &str, value: &str) -> Reject {
        self.headers.push(Header {
            name: name.into(),
            value: value.into(),
        });
        self
    }
}

impl Candidate {
    /// Server `server` of its pool, of weight `weight`, idle and with no history; for tests.
    pub fn idle(server: u32, weight: u32) -> Candidate {
        Candidate { server, weight, active: 0, total: 0, ewma_connect_us: 0, recent_failures: 0 }
    }
}

impl Server {
    /// A server of weight 1 with no labels; for tests.
    pub fn new(address: &str) -> Server {
        Server { address: address.into(), weight: 1, labels: Vec::new() }
    }

    /// The value of label `name`, e.g. `label("zone")`.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_fill_the_records() {
        let accept = Accept::default()
            .add_header("x-a", "1")
            .remove_header("cookie")
            .upstream("blue");
        assert_eq!(
            accept.add_headers,
            vec![Header {
                name: "x-a".into(),
                value: "1".into()
            }]
        );
        assert_eq!(accept.remove_headers, vec!["cookie".to_string()]);
        assert_eq!(accept.upstream.as_deref(), Some("blue"));
        let verdict: Verdict = Reject::new(401, "no token")
            .header("www-authenticate", "Bearer")
            .into();
        let Verdict::Reject(reject) = verdict else {
            panic!("not a reject")
        };
        assert_eq!(
            (reject.status, reject.reason.as_str(), reject.headers.len()),
            (401, "no token", 1)
        );
    }

    #[test]
    fn server_labels() {
        let mut s = Server::new("a:1");
        s.labels.push(("zone".into(), "eu".into()));
        assert_eq!(s.label("zone"), Some("eu"));
        assert_eq!(s.label("rack"), None);
    }
}
