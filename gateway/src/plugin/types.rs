//! The gateway's types for hook arguments and results.
//!
//! They mirror the records and variants of `wasmgate:plugin/types` and derive the canonical
//! ABI traits themselves, so they are handed to and read from Wasm directly, with no
//! conversion step: wasmtime checks at load time that each one matches the WIT type.
//! Payloads, close reasons and pool details travel through the `message` and `upstreams`
//! resources instead (see `host.rs`), so hook arguments and answers stay flat.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use wasmtime::component::{ComponentType, Lift, Lower};

/// Host-side state of one connection; plugins see it through the `connection` resource.
/// It is the only per-connection cost of plugins: instances are shared.
pub struct ConnContext {
    pub id: u64,
    /// Written out only when a plugin asks for it.
    pub client_addr: SocketAddr,
    /// The route's prefix, shared with the route table.
    pub route: Arc<str>,
    meta: Mutex<Meta>,
    /// The replay log, only on routes with a session plugin (`with_session`).
    pub session: Option<Box<crate::session::SessionLog>>,
}

#[derive(Default)]
struct Meta {
    // `HashMap::new` does not allocate, so connections whose plugins set no metadata pay
    // nothing beyond the struct.
    map: HashMap<String, String>,
    bytes: usize,
}

/// Most metadata (keys plus values, in bytes) one connection may hold.
pub const META_LIMIT_BYTES: usize = 16 * 1024;

/// `set_meta` would pass [`META_LIMIT_BYTES`].
#[derive(Debug)]
pub struct MetaFull;

impl ConnContext {
    pub fn new(id: u64, client_addr: SocketAddr, route: impl Into<Arc<str>>) -> ConnContext {
        ConnContext {
            id,
            client_addr,
            route: route.into(),
            meta: Mutex::new(Meta::default()),
            session: None,
        }
    }

    /// Gives the connection a replay log of at most `limit` bytes.
    pub fn with_session(mut self, limit: usize) -> ConnContext {
        self.session = Some(Box::new(crate::session::SessionLog::new(limit)));
        self
    }

    /// The metadata map; a panic while it was held leaves it whole (every change is one
    /// insert after the checks), so a poisoned lock is used as it is.
    fn locked_meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn meta(&self, key: &str) -> Option<String> {
        self.locked_meta().map.get(key).cloned()
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), MetaFull> {
        let mut meta = self.locked_meta();
        let old = meta.map.get(key).map_or(0, |v| key.len() + v.len());
        let bytes = meta.bytes - old + key.len() + value.len();
        if bytes > META_LIMIT_BYTES {
            return Err(MetaFull);
        }
        meta.bytes = bytes;
        match meta.map.get_mut(key) {
            Some(v) => value.clone_into(v),
            None => {
                meta.map.insert(key.to_string(), value.to_string());
            }
        }
        Ok(())
    }
}

/// The hooks a loaded plugin implements: exported by the component and declared by `init`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Hooks {
    pub handshake: bool,
    pub balancer: bool,
    pub messages: bool,
    pub close: bool,
    /// Keeps session state: the route's connections may move to another server.
    pub session: bool,
}

// The WIT `hooks` flags as `init` returns them.
wasmtime::component::flags! {
    HookFlags {
        #[component(name = "handshake")]
        const HANDSHAKE;
        #[component(name = "balancer")]
        const BALANCER;
        #[component(name = "messages")]
        const MESSAGES;
        #[component(name = "close")]
        const CLOSE;
        #[component(name = "session")]
        const SESSION;
    }
}

/// What a failing call means for the connection. Without an `on_error` setting, the hooks
/// that can refuse fail closed (handshake 503, messages close 1011) and the balancer falls
/// back to round robin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum OnError {
    Deny,
    Allow,
}

/// One HTTP header; names are lower-case.
#[derive(ComponentType, Lower, Lift, Clone, Debug, PartialEq, Eq)]
#[component(record)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// The client's upgrade request (WIT `request`).
#[derive(ComponentType, Lower, Clone, Debug, Default, PartialEq, Eq)]
#[component(record)]
pub struct HandshakeRequest {
    pub method: String,
    /// Without the query string.
    pub path: String,
    /// Without the leading '?', "" when absent.
    pub query: String,
    pub host: String,
    /// Every header, a line "name: value\n" each (see [`header_lines`]).
    pub headers: String,
    #[component(name = "client-addr")]
    pub client_addr: String,
    pub subprotocols: Vec<String>,
    /// "ws" or "wss".
    pub scheme: String,
    pub tls: Option<TlsInfo>,
}

/// A handshake as `on-handshake` takes it. A kept verdict (`verdicts`) is found by a few
/// parts of the request, so the gateway hands the parsed request over and writes the
/// contract's `request` record only when a plugin is actually called: in a reconnect storm
/// most handshakes are answered without one.
pub trait HandshakeInput {
    /// The `request` record a call hands over.
    fn record(&self) -> &HandshakeRequest;
    fn path(&self) -> &str;
    fn query(&self) -> &str;
    fn host(&self) -> &str;
    /// "ws" or "wss".
    fn scheme(&self) -> &str;
    /// The name the `wss://` client asked for, in any case; `None` over plain TCP.
    fn sni(&self) -> Option<&str>;
    fn client_ip(&self) -> Option<IpAddr>;
    /// Each value of header `name` (lower case) that the record carries, in order.
    fn each_header_value(&self, name: &str, each: &mut dyn FnMut(&str));
}

/// A record is its own input (tests, `plugin::bench`, and requests built elsewhere).
impl HandshakeInput for HandshakeRequest {
    fn record(&self) -> &HandshakeRequest {
        self
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn query(&self) -> &str {
        &self.query
    }
    fn host(&self) -> &str {
        &self.host
    }
    fn scheme(&self) -> &str {
        &self.scheme
    }
    fn sni(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.sni.as_str())
    }
    fn client_ip(&self) -> Option<IpAddr> {
        self.client_addr.parse::<SocketAddr>().ok().map(|a| a.ip())
    }
    fn each_header_value(&self, name: &str, each: &mut dyn FnMut(&str)) {
        for line in self.headers.lines() {
            if let Some(value) = line.strip_prefix(name).and_then(|rest| rest.strip_prefix(": ")) {
                each(value);
            }
        }
    }
}

/// Headers as the `request` record carries them: one text, a line "name: value\n" each.
/// Plugins get one string to allocate instead of two per header.
pub fn header_lines<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    // A browser's upgrade request has 300-600 bytes of headers: one allocation, mostly.
    let mut lines = String::with_capacity(512);
    for (name, value) in headers {
        lines.push_str(name);
        lines.push_str(": ");
        lines.push_str(value);
        lines.push('\n');
    }
    lines
}

/// What the TLS listener saw of a `wss://` client (WIT `tls-info`).
#[derive(ComponentType, Lower, Clone, Debug, Default, PartialEq, Eq)]
#[component(record)]
pub struct TlsInfo {
    pub sni: String,
    pub version: String,
    #[component(name = "client-certificate")]
    pub client_certificate: Option<ClientCertificate>,
}

/// A verified client certificate (WIT `client-certificate`).
#[derive(ComponentType, Lower, Clone, Debug, Default, PartialEq, Eq)]
#[component(record)]
pub struct ClientCertificate {
    pub subject: String,
    pub sans: Vec<String>,
    pub sha256: String,
}

#[derive(ComponentType, Lift, Clone, Copy, Debug, PartialEq, Eq)]
#[component(enum)]
#[repr(u8)]
pub enum CompressionMode {
    #[component(name = "off")]
    Off,
    #[component(name = "passthrough")]
    Passthrough,
    #[component(name = "terminate")]
    Terminate,
}

#[derive(ComponentType, Lift, Clone, Copy, Debug, PartialEq, Eq)]
#[component(record)]
pub struct Compression {
    pub mode: CompressionMode,
    /// 8..=15, checked.
    #[component(name = "max-window-bits")]
    pub max_window_bits: u8,
    #[component(name = "no-context-takeover")]
    pub no_context_takeover: bool,
}

/// Let the connection proceed; `Accept::default()` changes nothing.
#[derive(ComponentType, Lift, Clone, Debug, Default, PartialEq, Eq)]
#[component(record)]
pub struct Accept {
    pub upstream: Option<String>,
    /// Checked, as everything here: see `validate.rs`.
    #[component(name = "add-headers")]
    pub add_headers: Vec<Header>,
    #[component(name = "remove-headers")]
    pub remove_headers: Vec<String>,
    #[component(name = "rewrite-path")]
    pub rewrite_path: Option<String>,
    pub subprotocol: Option<String>,
    pub compression: Option<Compression>,
}

/// Refuse the upgrade.
#[derive(ComponentType, Lift, Clone, Debug, PartialEq, Eq)]
#[component(record)]
pub struct Reject {
    /// Checked (`validate.rs`): 400..=599.
    pub status: u16,
    pub reason: String,
    /// Checked like `Accept::add_headers`, and the body's type is the gateway's.
    pub headers: Vec<Header>,
}

#[derive(ComponentType, Lift, Clone, Debug, PartialEq, Eq)]
#[component(variant)]
pub enum Verdict {
    #[component(name = "accept")]
    Accept(Accept),
    #[component(name = "reject")]
    Reject(Reject),
}

/// One server of a pool as balancer plugins read it (`upstreams.pool.servers`). Built once
/// per pool version, sharing the strings the pool already holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    pub address: Arc<str>,
    pub weight: u32,
    pub labels: Arc<[(String, String)]>,
}

/// An upstream pool as a `select` call lends it to the plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolInfo {
    pub name: String,
    /// Changes whenever `servers` changes; plugins cache what they derive from it.
    pub version: u64,
    pub servers: Vec<ServerInfo>,
    /// Servers of a ranking the host tries at most.
    pub max_attempts: u32,
}

/// A server a balancer may choose now, with its live statistics. Only numbers, so a list of
/// them is lowered into Wasm memory in one piece, with no allocation call per candidate
/// (see `candidate_abi`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Index into the pool's `servers`.
    pub server: u32,
    pub weight: u32,
    pub active: u32,
    pub total: u64,
    pub ewma_connect_us: u32,
    pub recent_failures: u32,
}

/// How `Candidate` crosses into Wasm.
///
/// wasmtime's derived lowering stores a list of records field by field, looking the guest's
/// memory up again for every field: 600 lookups for 100 candidates, most of a `select`
/// call's cost. `Candidate` therefore implements the canonical ABI traits itself: type
/// checks and single values go through a derived twin (`Wire`), and a list is encoded
/// into one buffer and copied into guest memory at once.
mod candidate_abi {
    use std::mem::MaybeUninit;

    use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext};
    use wasmtime::component::{ComponentType, Lower};

    use super::Candidate;

    /// The WIT `candidate` record, field for field. Public only because `Candidate`'s
    /// `Lower` associated type names it.
    #[derive(ComponentType, Lower, Clone, Copy)]
    #[component(record)]
    #[doc(hidden)]
    pub struct Wire {
        server: u32,
        weight: u32,
        active: u32,
        total: u64,
        #[component(name = "ewma-connect-us")]
        ewma_connect_us: u32,
        #[component(name = "recent-failures")]
        recent_failures: u32,
    }

    /// The canonical ABI layout of `Wire`: u32 fields at 0, 4 and 8, the u64 aligned to
    /// 16, then two u32 at 24 and 28; 32 bytes in all.
    const SIZE: usize = 32;
    const _: () = assert!(<Wire as ComponentType>::ABI.size32 as usize == SIZE);

    impl Candidate {
        fn wire(&self) -> Wire {
            Wire {
                server: self.server,
                weight: self.weight,
                active: self.active,
                total: self.total,
                ewma_connect_us: self.ewma_connect_us,
                recent_failures: self.recent_failures,
            }
        }

        /// The bytes `Wire` is stored as.
        pub(super) fn encode(&self) -> [u8; SIZE] {
            let mut b = [0u8; SIZE];
            b[0..4].copy_from_slice(&self.server.to_le_bytes());
            b[4..8].copy_from_slice(&self.weight.to_le_bytes());
            b[8..12].copy_from_slice(&self.active.to_le_bytes());
            b[16..24].copy_from_slice(&self.total.to_le_bytes());
            b[24..28].copy_from_slice(&self.ewma_connect_us.to_le_bytes());
            b[28..32].copy_from_slice(&self.recent_failures.to_le_bytes());
            b
        }
    }

    // SAFETY: every item delegates to `Wire`, whose derived implementation upholds the
    // traits' contracts; `Lower` for `Candidate` is `Wire`'s.
    unsafe impl ComponentType for Candidate {
        type Lower = <Wire as ComponentType>::Lower;
        const ABI: CanonicalAbiInfo = <Wire as ComponentType>::ABI;
        const MAY_REQUIRE_REALLOC: bool = false;

        fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
            <Wire as ComponentType>::typecheck(ty, types)
        }
    }

    // SAFETY: single values are lowered by `Wire`; a list is written to the bytes the
    // caller reserved (`offset`, checked in bounds and aligned, `items.len() * SIZE` long)
    // in the layout `Wire` has, which `encode` and the `candidates_encode_as_the_abi_lays_out`
    // test pin down.
    unsafe impl Lower for Candidate {
        fn linear_lower_to_flat<T>(
            &self,
            cx: &mut LowerContext<'_, T>,
            ty: InterfaceType,
            dst: &mut MaybeUninit<Self::Lower>,
        ) -> wasmtime::Result<()> {
            self.wire().linear_lower_to_flat(cx, ty, dst)
        }

        fn linear_lower_to_memory<T>(
            &self,
            cx: &mut LowerContext<'_, T>,
            ty: InterfaceType,
            offset: usize,
        ) -> wasmtime::Result<()> {
            self.wire().linear_lower_to_memory(cx, ty, offset)
        }

        fn linear_store_list_to_memory<T>(
            cx: &mut LowerContext<'_, T>,
            _ty: InterfaceType,
            offset: usize,
            items: &[Self],
        ) -> wasmtime::Result<()> {
            let memory = &mut cx.as_slice_mut()[offset..][..items.len() * SIZE];
            for (to, item) in memory.chunks_exact_mut(SIZE).zip(items) {
                to.copy_from_slice(&item.encode());
            }
            Ok(())
        }
    }
}

#[derive(ComponentType, Lower, Clone, Copy, Debug, PartialEq, Eq)]
#[component(enum)]
#[repr(u8)]
pub enum Direction {
    #[component(name = "client-to-upstream")]
    ClientToUpstream,
    #[component(name = "upstream-to-client")]
    UpstreamToClient,
}

#[derive(ComponentType, Lower, Lift, Clone, Copy, Debug, PartialEq, Eq)]
#[component(enum)]
#[repr(u8)]
pub enum Opcode {
    #[component(name = "text")]
    Text,
    #[component(name = "binary")]
    Binary,
}

/// A close frame's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: String,
}

/// The WIT `action` as a hook returns it; payloads and close reasons arrive through the
/// `message` resource and are joined to it in [`Action`].
#[derive(ComponentType, Lift, Clone, Copy, Debug, PartialEq, Eq)]
#[component(variant)]
pub enum WireAction {
    #[component(name = "forward")]
    Forward,
    #[component(name = "forward-uncompressed")]
    ForwardUncompressed,
    #[component(name = "drop")]
    Drop,
    #[component(name = "reply")]
    Reply,
    #[component(name = "close")]
    Close(u16),
}

/// What a `messages` hook decided about one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send it on; `payload` replaces the original when set. `compress: false` sends it
    /// without permessage-deflate even on a link that negotiated it.
    Forward { payload: Option<Vec<u8>>, compress: bool },
    Drop,
    /// Send this back to the sender instead.
    Reply(Vec<u8>),
    Close(CloseFrame),
}

impl Action {
    /// Send it on unchanged.
    pub const FORWARD: Action = Action::Forward { payload: None, compress: true };

    /// Joins a hook's answer with what it set on the message during the call. `original`
    /// is the payload the hook saw (a `reply` without a payload echoes it).
    pub(super) fn from_wire(
        wire: WireAction,
        new_payload: Option<Vec<u8>>,
        close_reason: Option<String>,
        original: &[u8],
    ) -> Action {
        match wire {
            WireAction::Forward => Action::Forward { payload: new_payload, compress: true },
            WireAction::ForwardUncompressed => Action::Forward { payload: new_payload, compress: false },
            WireAction::Drop => Action::Drop,
            WireAction::Reply => Action::Reply(new_payload.unwrap_or_else(|| original.to_vec())),
            WireAction::Close(code) => Action::Close(CloseFrame { code, reason: close_reason.unwrap_or_default() }),
        }
    }
}

/// Totals for a connection, handed to `on-close`.
#[derive(ComponentType, Lower, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[component(record)]
pub struct ConnStats {
    #[component(name = "messages-from-client")]
    pub messages_from_client: u64,
    #[component(name = "messages-from-upstream")]
    pub messages_from_upstream: u64,
    #[component(name = "bytes-from-client")]
    pub bytes_from_client: u64,
    #[component(name = "bytes-from-upstream")]
    pub bytes_from_upstream: u64,
    #[component(name = "duration-ms")]
    pub duration_ms: u64,
}

/// Why a hook call produced no usable answer. The caller applies the plugin's `on_error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginError {
    /// The guest trapped: a panic, `unreachable`, or a host function refusing a request.
    Trap(String),
    /// The call ran past its deadline and was interrupted.
    Timeout(Duration),
    /// The instance tried to grow its memory past this many bytes.
    MemoryLimit(usize),
    /// No instance was ready and making one failed (instantiation or its `init`).
    Unavailable(String),
    /// The answer breaks the contract (e.g. a reject status of 200, a header with CRLF).
    InvalidResult(String),
    /// The plugin has no such hook; only `select` reports this, the others have a neutral
    /// answer.
    NotImplemented(&'static str),
}

impl PluginError {
    /// A short name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Trap(_) => "trap",
            PluginError::Timeout(_) => "timeout",
            PluginError::MemoryLimit(_) => "memory",
            PluginError::Unavailable(_) => "unavailable",
            PluginError::InvalidResult(_) => "invalid",
            PluginError::NotImplemented(_) => "not_implemented",
        }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginError::Trap(m) => write!(f, "trapped: {m}"),
            PluginError::Timeout(d) => write!(f, "timed out after {d:?}"),
            PluginError::MemoryLimit(b) => {
                write!(f, "exceeded its memory limit of {} MiB", b / (1024 * 1024))
            }
            PluginError::Unavailable(m) => write!(f, "no instance available: {m}"),
            PluginError::InvalidResult(m) => write!(f, "invalid result: {m}"),
            PluginError::NotImplemented(hook) => write!(f, "does not implement {hook}"),
        }
    }
}

impl std::error::Error for PluginError {}

impl Action {
    pub(super) fn check(&self, op: Opcode) -> Result<(), String> {
        match self {
            Action::Forward { payload: Some(p), .. } | Action::Reply(p)
                if op == Opcode::Text && std::str::from_utf8(p).is_err() =>
            {
                Err("text payload is not valid UTF-8".to_string())
            }
            Action::Close(c) => {
                let valid = matches!(c.code, 1000..=1003 | 1007..=1014 | 3000..=4999);
                if !valid {
                    Err(format!("close code {} is not valid on the wire", c.code))
                } else if c.reason.len() > 123 {
                    Err("close reason is longer than 123 bytes".to_string())
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_is_bounded_per_connection() {
        let c = ConnContext::new(1, "1.2.3.4:5".parse().unwrap(), "/");
        c.set_meta("user", "alice").unwrap();
        c.set_meta("user", "bob").unwrap();
        assert_eq!(c.meta("user").as_deref(), Some("bob"));
        let big = "x".repeat(META_LIMIT_BYTES);
        assert!(c.set_meta("big", &big).is_err());
        // Replacing a value frees its old size.
        c.set_meta("user", &"y".repeat(META_LIMIT_BYTES - 4))
            .unwrap();
        c.set_meta("user", "z").unwrap();
        c.set_meta("k", &"y".repeat(1000)).unwrap();
    }

    #[test]
    fn candidates_encode_as_the_abi_lays_out() {
        let c = Candidate {
            server: 1,
            weight: 2,
            active: 3,
            total: 0x0506_0708_090a_0b0c,
            ewma_connect_us: 13,
            recent_failures: 14,
        };
        let b = c.encode();
        assert_eq!(&b[0..12], &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&b[12..16], &[0; 4], "padding before the u64");
        assert_eq!(&b[16..24], &0x0506_0708_090a_0b0cu64.to_le_bytes());
        assert_eq!(&b[24..32], &[13, 0, 0, 0, 14, 0, 0, 0]);
    }

    #[test]
    fn actions_are_checked_against_the_wire_rules() {
        let close = |code| {
            Action::Close(CloseFrame {
                code,
                reason: String::new(),
            })
        };
        assert!(close(4000).check(Opcode::Binary).is_ok());
        assert!(close(1005).check(Opcode::Binary).is_err());
        let replace = |p: &[u8]| Action::Forward { payload: Some(p.to_vec()), compress: true };
        assert!(replace(&[0xff]).check(Opcode::Text).is_err());
        assert!(replace(&[0xff]).check(Opcode::Binary).is_ok());
        assert!(Action::Reply(vec![0xff]).check(Opcode::Text).is_err());
    }
}
