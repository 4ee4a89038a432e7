//! The route table: which upstream and plugin chain serve a request, by host and the longest
//! matching path prefix. Both sides are in normal form (see `normalize`): the request's
//! path and host by the handshake, the routes' by config validation.

use std::sync::Arc;

use crate::config::RouteSection;
use crate::plugin::PluginSlot;
use crate::static_files::StaticDir;

#[derive(Clone)]
pub struct Route {
    /// Exact host (normal form, no port), or any host.
    pub host: Option<String>,
    /// Path prefix, matched on whole segments: "/api" matches "/api" and "/api/x", not "/apix".
    /// Shared: each connection's plugin context names its route.
    pub prefix: Arc<str>,
    pub upstream: String,
    /// Plugin chain, in call order: names (for messages) and the slots that serve them.
    pub plugins: Vec<String>,
    /// Shared, so that a connection holds its chain without copying it.
    pub chain: Arc<[Arc<PluginSlot>]>,
    /// The directory plain GETs on this route are answered from (`files`).
    pub files: Option<StaticDir>,
}

#[derive(Default, Clone)]
pub struct RouteTable {
    /// Host-specific routes first, then by prefix length, longest first.
    routes: Vec<Route>,
}

impl RouteTable {
    /// Builds the table; `plugin` resolves a plugin name to its slot.
    pub fn build(
        sections: &[RouteSection],
        plugin: impl Fn(&str) -> Result<Arc<PluginSlot>, String>,
    ) -> Result<RouteTable, String> {
        let mut routes = Vec::with_capacity(sections.len());
        for r in sections {
            let plugins: Vec<String> = r.plugins.iter().map(|p| p.get_ref().clone()).collect();
            let chain = plugins.iter().map(|name| plugin(name)).collect::<Result<_, _>>()?;
            routes.push(Route {
                host: r.host.as_ref().map(|h| h.get_ref().clone()),
                prefix: r.path.get_ref().as_str().into(),
                upstream: r.upstream.get_ref().clone(),
                plugins,
                chain,
                files: r.files.as_ref().map(|f| StaticDir::open(std::path::Path::new(f.get_ref()))).transpose()?,
            });
        }
        routes.sort_by(|a, b| {
            b.host.is_some().cmp(&a.host.is_some()).then(b.prefix.len().cmp(&a.prefix.len()))
        });
        Ok(RouteTable { routes })
    }

    pub fn find(&self, host: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            r.host.as_deref().is_none_or(|h| h == host) && prefix_matches(&r.prefix, path)
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str, upstream: &str) -> Route {
        Route {
            host: host.map(String::from),
            prefix: prefix.into(),
            upstream: upstream.into(),
            plugins: vec![],
            chain: Arc::new([]),
            files: None,
        }
    }

    #[test]
    fn host_then_longest_prefix_wins() {
        let mut table = RouteTable {
            routes: vec![
                route(None, "/", "root"),
                route(None, "/api", "api"),
                route(Some("chat.example"), "/", "chat"),
            ],
        };
        table.routes.sort_by(|a, b| {
            b.host.is_some().cmp(&a.host.is_some()).then(b.prefix.len().cmp(&a.prefix.len()))
        });
        let pick = |host, path| table.find(host, path).map(|r| r.upstream.as_str());
        assert_eq!(pick("x", "/api/v1"), Some("api"));
        assert_eq!(pick("x", "/api"), Some("api"));
        assert_eq!(pick("x", "/apix"), Some("root"));
        assert_eq!(pick("chat.example", "/api"), Some("chat"));
    }

    #[test]
    fn no_match_without_a_root_route() {
        let table = RouteTable { routes: vec![route(None, "/api", "api")] };
        assert!(table.find("x", "/other").is_none());
    }
}
