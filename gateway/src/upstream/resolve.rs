//! Upstream servers by name: `servers = ["chat-backend:9000", "ws://chat.internal:9000/ws"]`,
//! as Docker Compose services and Kubernetes headless services are found.
//!
//! Names are resolved off the connection path — at start, on reload for names not seen
//! before, and by a background task every `resolve_interval_secs` — into a table of the last
//! good answer per name. Pools are built from that table: every address a name resolves to
//! is a server of its own (`ip:port`, with the label `host` = the name), so balancers,
//! health checks and draining work per address. When an answer changes, the pools are
//! rebuilt on the running configuration: servers that appear join, servers that disappear
//! are drained like servers a reload removed. A failed lookup — an error, a timeout, or an
//! answer with no address — keeps the last good set, so a DNS outage never empties a pool.
//!
//! `[gateway] resolvers = ["ip:port"]` sends the queries to those DNS servers (UDP, then TCP)
//! instead of the system's (`/etc/resolv.conf`); `/etc/hosts` is read first either way.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ServerAddress;
use crate::config::{Config, GatewaySection, ServerEntry, UpstreamSection};

/// How long one lookup may take in all (attempts included).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// The label that names the host a server was resolved from.
pub const HOST_LABEL: &str = "host";

/// The last good addresses of every upstream server name.
pub struct Names {
    resolver: Option<TokioResolver>,
    table: ArcSwap<HashMap<String, Arc<[IpAddr]>>>,
}

impl Names {
    /// A resolver for `[gateway] resolvers`, or the system's configuration.
    pub fn new(g: &GatewaySection) -> Names {
        let resolver = build_resolver(g).map_err(|e| tracing::error!("no DNS resolver, upstream names stay unresolved: {e}")).ok();
        Names { resolver, table: ArcSwap::from_pointee(HashMap::new()) }
    }

    /// No resolver and no names (`wasmgate check`: pools are built without named servers).
    pub fn none() -> Names {
        Names { resolver: None, table: ArcSwap::from_pointee(HashMap::new()) }
    }

    /// The last good addresses of `host`, sorted.
    pub fn addresses(&self, host: &str) -> Option<Arc<[IpAddr]>> {
        self.table.load().get(host).cloned()
    }

    /// Resolves the names of `config` that have no answer yet (start, reload).
    pub async fn resolve_missing(&self, config: &Config) {
        let table = self.table.load();
        let missing: Vec<String> = names_of(config).into_keys().filter(|h| !table.contains_key(h)).collect();
        drop(table);
        self.refresh(&missing).await;
    }

    /// Resolves `hosts` again, keeping the last good answer of a lookup that fails; returns
    /// whether any host's addresses changed.
    pub async fn refresh(&self, hosts: &[String]) -> bool {
        let Some(resolver) = &self.resolver else { return false };
        if hosts.is_empty() {
            return false;
        }
        let lookups = hosts.iter().map(|host| async move { (host, lookup(resolver, host).await) });
        let answers = futures_util::future::join_all(lookups).await;
        let mut table = (**self.table.load()).clone();
        let mut changed = false;
        for (host, answer) in answers {
            match answer {
                Ok(addresses) => {
                    if table.get(host).is_none_or(|old| **old != *addresses) {
                        tracing::info!(%host, ?addresses, "upstream name resolved");
                        table.insert(host.clone(), addresses.into());
                        changed = true;
                    }
                }
                Err(e) => match table.get(host) {
                    Some(kept) => tracing::warn!(%host, ?kept, "lookup failed, keeping the last answer: {e}"),
                    None => tracing::warn!(%host, "lookup failed; the name has no servers yet: {e}"),
                },
            }
        }
        if changed {
            self.table.store(Arc::new(table));
        }
        changed
    }
}

fn build_resolver(g: &GatewaySection) -> anyhow::Result<TokioResolver> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if g.resolvers.is_empty() {
        TokioResolver::builder(provider)?
    } else {
        let servers = g
            .resolvers
            .iter()
            .map(|r| {
                let addr: SocketAddr = r.get_ref().parse().expect("validated");
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        TokioResolver::builder_with_config(ResolverConfig::from_parts(None, vec![], servers), provider)
    };
    let options: &mut ResolverOpts = builder.options_mut();
    // Answers are kept by this module, not by a cache: each round asks the DNS server.
    options.cache_size = 0;
    options.timeout = Duration::from_secs(1);
    options.attempts = 2;
    Ok(builder.build()?)
}

async fn lookup(resolver: &TokioResolver, host: &str) -> Result<Vec<IpAddr>, String> {
    // A fully qualified name: no search domains appended.
    let fqdn = format!("{}.", host.trim_end_matches('.'));
    let answer = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(fqdn.as_str()))
        .await
        .map_err(|_| format!("timed out after {LOOKUP_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let mut addresses: Vec<IpAddr> = answer.iter().collect();
    addresses.sort();
    addresses.dedup();
    if addresses.is_empty() {
        return Err("no addresses in the answer".into());
    }
    Ok(addresses)
}

/// The host of `host:port` when it is a name rather than an IP literal.
pub fn host_name(authority: &str) -> Option<&str> {
    let (host, _) = authority.rsplit_once(':')?;
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    literal.parse::<IpAddr>().is_err().then_some(host)
}

/// Every server name of `config`, with the shortest re-resolve interval of the pools that
/// name it.
fn names_of(config: &Config) -> HashMap<String, Duration> {
    let mut names = HashMap::new();
    for u in &config.upstreams {
        let every = Duration::from_secs(interval_secs(u, &config.gateway));
        for s in &u.servers {
            let address = ServerAddress::parse(s.get_ref().address()).expect("validated");
            if let Some(host) = host_name(&address.authority) {
                let e = names.entry(host.to_string()).or_insert(every);
                *e = (*e).min(every);
            }
        }
    }
    names
}

fn interval_secs(u: &UpstreamSection, g: &GatewaySection) -> u64 {
    *u.resolve_interval_secs.as_ref().unwrap_or(&g.resolve_interval_secs).get_ref()
}

/// The servers a config entry stands for: itself when it names an IP; one per address its
/// name resolves to now (none before the first answer), each labelled with the name.
pub fn expand(entry: &ServerEntry, names: &Names) -> Vec<(ServerAddress, BTreeMap<String, String>)> {
    let address = ServerAddress::parse(entry.address()).expect("validated");
    let Some(host) = host_name(&address.authority) else {
        return vec![(address, entry.labels())];
    };
    let port = address.authority.rsplit_once(':').map(|(_, p)| p).expect("validated");
    let resolved = names.addresses(host).unwrap_or_else(|| Arc::from([]));
    resolved
        .iter()
        .map(|ip| {
            let authority = SocketAddr::new(*ip, port.parse().expect("validated")).to_string();
            let mut labels = entry.labels();
            labels.insert(HOST_LABEL.to_string(), host.to_string());
            let address = ServerAddress { authority, resolved_from: Some(host.to_string()), ..address.clone() };
            (address, labels)
        })
        .collect()
}

/// Resolves the running configuration's names again as they fall due, and rebuilds the
/// pools when an answer changed. Ends when the gateway goes away or `stop` is cancelled.
pub async fn run(shared: Weak<crate::gateway::Shared>, stop: CancellationToken) {
    // The names of the first config were resolved at start.
    let mut due: HashMap<String, Instant> = match shared.upgrade() {
        Some(s) => names_of(&s.config.load()).into_iter().map(|(host, every)| (host, Instant::now() + every)).collect(),
        None => return,
    };
    loop {
        let Some(strong) = shared.upgrade() else { return };
        let names = names_of(&strong.config.load());
        let now = Instant::now();
        due.retain(|host, _| names.contains_key(host));
        let ripe: Vec<String> =
            names.keys().filter(|h| due.get(*h).is_none_or(|at| *at <= now)).cloned().collect();
        for host in &ripe {
            due.insert(host.clone(), now + names[host]);
        }
        if strong.names.refresh(&ripe).await {
            strong.apply_resolved().await;
        }
        drop(strong);
        // Wake for the next name due, and at least every few seconds to see reloads.
        let next = due.values().min().copied().unwrap_or(now + Duration::from_secs(5));
        let wake = next.min(Instant::now() + Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_told_from_ip_literals() {
        assert_eq!(host_name("chat-backend:9000"), Some("chat-backend"));
        assert_eq!(host_name("chat.internal:80"), Some("chat.internal"));
        assert_eq!(host_name("127.0.0.1:9000"), None);
        assert_eq!(host_name("[::1]:9000"), None);
    }

    #[test]
    fn a_name_stands_for_each_of_its_addresses() {
        let names = Names::none();
        let entry = ServerEntry::Address("ws://chat.internal:9000/ws".into());
        assert!(expand(&entry, &names).is_empty(), "no servers before the first answer");
        let ips: Vec<IpAddr> = vec!["127.0.0.2".parse().unwrap(), "::1".parse().unwrap()];
        names.table.store(Arc::new(HashMap::from([("chat.internal".to_string(), ips.into())])));
        let servers = expand(&entry, &names);
        let got: Vec<(&str, &str, Option<&String>)> =
            servers.iter().map(|(a, l)| (a.authority.as_str(), a.path_prefix.as_str(), l.get(HOST_LABEL))).collect();
        let host = "chat.internal".to_string();
        assert_eq!(got, [("127.0.0.2:9000", "/ws", Some(&host)), ("[::1]:9000", "/ws", Some(&host))]);
        let literal = ServerEntry::Address("127.0.0.1:9001".into());
        assert_eq!(expand(&literal, &names)[0].0.authority, "127.0.0.1:9001");
    }
}
