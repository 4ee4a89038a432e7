//! The connection a hook is called for.
//!
//! In Wasm, [`Conn`] is the host's `connection` resource: metadata lives in the gateway and
//! is shared by every plugin in the chain. Off Wasm it is a plain in-memory value that unit
//! tests build with [`Conn::new`].

/// The connection a hook is called for; keep per-connection state in its metadata.
#[cfg(target_arch = "wasm32")]
#[repr(transparent)]
pub struct Conn(crate::bindings::wasmgate::plugin::connection::Connection);

#[cfg(target_arch = "wasm32")]
impl Conn {
    pub(crate) fn from_host(
        conn: &crate::bindings::wasmgate::plugin::connection::Connection,
    ) -> &Conn {
        // SAFETY: `Conn` is a `repr(transparent)` wrapper of `Connection`.
        unsafe { &*(conn as *const _ as *const Conn) }
    }

    /// Unique for the gateway process's lifetime.
    pub fn id(&self) -> u64 {
        self.0.id()
    }

    /// The client's address, "ip:port".
    pub fn client_addr(&self) -> String {
        self.0.client_addr()
    }

    /// The path prefix of the route that matched.
    pub fn route(&self) -> String {
        self.0.route()
    }

    /// Metadata set by this or an earlier plugin in the chain.
    pub fn get_meta(&self, key: &str) -> Option<String> {
        self.0.get_meta(key)
    }

    /// Sets metadata that later hooks and plugins of this connection can read.
    pub fn set_meta(&self, key: &str, value: &str) {
        self.0.set_meta(key, value)
    }
}

/// The connection a hook is called for; keep per-connection state in its metadata.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug)]
pub struct Conn {
    id: u64,
    client_addr: String,
    route: String,
    meta: std::cell::RefCell<std::collections::HashMap<String, String>>,
}

#[cfg(not(target_arch = "wasm32"))]
impl Conn {
    /// A test connection from 127.0.0.1:40000 on route "/" with no metadata.
    pub fn new(id: u64) -> Conn {
        Conn {
            id,
            client_addr: "127.0.0.1:40000".into(),
            route: "/".into(),
            meta: Default::default(),
        }
    }

    pub fn with_client_addr(mut self, addr: &str) -> Conn {
        self.client_addr = addr.into();
        self
    }

    pub fn with_route(mut self, route: &str) -> Conn {
        self.route = route.into();
        self
    }

    pub fn with_meta(self, key: &str, value: &str) -> Conn {
        self.set_meta(key, value);
        self
    }

    /// Unique for the gateway process's lifetime.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The client's address, "ip:port".
    pub fn client_addr(&self) -> String {
        self.client_addr.clone()
    }

    /// The path prefix of the route that matched.
    pub fn route(&self) -> String {
        self.route.clone()
    }

    /// Metadata set by this or an earlier plugin in the chain.
    pub fn get_meta(&self, key: &str) -> Option<String> {
        self.meta.borrow().get(key).cloned()
    }

    /// Sets metadata that later hooks and plugins of this connection can read.
    pub fn set_meta(&self, key: &str, value: &str) {
        self.meta.borrow_mut().insert(key.into(), value.into());
    }
}
