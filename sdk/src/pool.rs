//! The upstream pool a `select` call is for.
//!
//! Candidates carry only numbers; a server's address and labels are in [`Pool::servers`],
//! which the SDK fetches from the gateway once per pool version (a reload that changes the
//! servers moves the version) and keeps between calls, so most calls never copy them.

use std::cell::OnceCell;
#[cfg(target_arch = "wasm32")]
use std::cell::RefCell;
use std::rc::Rc;

use crate::{Candidate, Server};

/// Pool versions whose server lists this instance keeps; more only after several reloads
/// or with one balancer serving many pools, and then the oldest is fetched again.
#[cfg(target_arch = "wasm32")]
const CACHED_VERSIONS: usize = 8;

#[cfg(target_arch = "wasm32")]
thread_local! {
    static SERVERS: RefCell<Vec<(u64, Rc<[Server]>)>> = const { RefCell::new(Vec::new()) };
}

/// An upstream pool: its name, version and servers.
pub struct Pool<'a> {
    #[cfg(target_arch = "wasm32")]
    handle: &'a crate::bindings::wasmgate::plugin::upstreams::Pool,
    #[cfg(not(target_arch = "wasm32"))]
    native: &'a NativePool,
    version: OnceCell<u64>,
    servers: OnceCell<Rc<[Server]>>,
}

impl<'a> Pool<'a> {
    #[cfg(target_arch = "wasm32")]
    pub(crate) fn from_host(handle: &'a crate::bindings::wasmgate::plugin::upstreams::Pool) -> Pool<'a> {
        Pool { handle, version: OnceCell::new(), servers: OnceCell::new() }
    }

    /// The pool's name as configured.
    pub fn name(&self) -> String {
        #[cfg(target_arch = "wasm32")]
        return self.handle.name();
        #[cfg(not(target_arch = "wasm32"))]
        return self.native.name.clone();
    }

    /// Moves whenever the servers change; never repeats, across pools too. Key caches of
    /// what you derive from [`Pool::servers`] by it.
    pub fn version(&self) -> u64 {
        *self.version.get_or_init(|| {
            #[cfg(target_arch = "wasm32")]
            return self.handle.version();
            #[cfg(not(target_arch = "wasm32"))]
            return self.native.version;
        })
    }

    /// Every server of the pool in configured order; [`Candidate::server`] indexes it.
    pub fn servers(&self) -> &[Server] {
        self.servers.get_or_init(|| {
            #[cfg(target_arch = "wasm32")]
            return cached_servers(self.version(), || self.handle.servers());
            // Test pools are plain values: nothing to save by caching.
            #[cfg(not(target_arch = "wasm32"))]
            return self.native.servers.clone().into();
        })
    }

    /// How many servers of a ranking the host tries at most; a ranking may stop there.
    pub fn max_attempts(&self) -> usize {
        #[cfg(target_arch = "wasm32")]
        return self.handle.max_attempts() as usize;
        #[cfg(not(target_arch = "wasm32"))]
        return self.native.max_attempts;
    }

    /// The server a candidate stands for.
    pub fn server(&self, candidate: &Candidate) -> &Server {
        &self.servers()[candidate.server as usize]
    }
}

/// The servers of pool version `version`, fetched with `fetch` unless this instance has them.
#[cfg(target_arch = "wasm32")]
fn cached_servers(version: u64, fetch: impl FnOnce() -> Vec<Server>) -> Rc<[Server]> {
    SERVERS.with_borrow_mut(|cache| {
        if let Some((_, servers)) = cache.iter().find(|(v, _)| *v == version) {
            return servers.clone();
        }
        let servers: Rc<[Server]> = fetch().into();
        if cache.len() == CACHED_VERSIONS {
            cache.remove(0);
        }
        cache.push((version, servers.clone()));
        servers
    })
}

/// A pool for unit tests: servers with weight 1 and no labels unless changed.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Clone, Debug)]
pub struct NativePool {
    pub name: String,
    pub version: u64,
    pub servers: Vec<Server>,
    pub max_attempts: usize,
}

#[cfg(not(target_arch = "wasm32"))]
impl NativePool {
    /// A pool of `addresses`, version 1, where the host tries up to 3 servers.
    pub fn new(name: &str, addresses: &[&str]) -> NativePool {
        NativePool {
            name: name.into(),
            version: 1,
            servers: addresses.iter().map(|a| Server::new(a)).collect(),
            max_attempts: 3,
        }
    }

    /// The same pool after a reload changed its servers: a new version.
    pub fn with_servers(&self, servers: Vec<Server>) -> NativePool {
        NativePool { servers, version: self.version + 1, ..self.clone() }
    }

    /// Every server as an idle candidate, as the host offers them when all are available.
    pub fn candidates(&self) -> Vec<Candidate> {
        (0..self.servers.len())
            .map(|i| Candidate::idle(i as u32, self.servers[i].weight))
            .collect()
    }

    /// The view a hook gets.
    pub fn view(&self) -> Pool<'_> {
        Pool { native: self, version: OnceCell::new(), servers: OnceCell::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_indexed_by_candidates() {
        let pool = NativePool::new("p", &["a:1", "b:1"]);
        let view = pool.view();
        assert_eq!(view.servers().len(), 2);
        assert_eq!(view.server(&pool.candidates()[1]).address, "b:1");
        let bigger = pool.with_servers(vec![Server::new("a:1"), Server::new("b:1"), Server::new("c:1")]);
        assert_eq!((bigger.view().servers().len(), bigger.view().version()), (3, 2));
    }
}
