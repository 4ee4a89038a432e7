//! Finding a plugin's hook exports and calling them with the gateway's types.
//!
//! Only `lifecycle` is required; `handshake`, `balancer` and `messages` are looked up and
//! used when present, so components of any of the WIT worlds load. Each export is
//! type-checked once per instance against the signatures below; calls then go through
//! unchecked typed functions, as wasmtime's generated bindings do.

use wasmtime::component::{Component, ComponentExportIndex, Func, Instance, Resource, TypedFunc};
use wasmtime::Store;

use super::bindings::connection::Connection;
use super::bindings::upstreams::Pool;
use super::host::{HostState, LENT_REP};
use super::session::{Outgoing, ReattachReason};
use super::types::{
    Candidate, ConnStats, Direction, HandshakeRequest, HookFlags, Opcode, Verdict, WireAction,
};

/// The contract's package, `wasmgate:plugin@VERSION` in `sdk/wit/plugin.wit`.
pub(super) const CONTRACT_VERSION: &str = "0.6.1";
/// Versions whose components load, newest first: 0.6.1 only added an import (`verdicts`),
/// so a component built for 0.6.0 exports the same hooks under its own version, and
/// wasmtime's linker gives its 0.6.0 imports the 0.6.1 functions (semver-compatible).
const COMPATIBLE_VERSIONS: [&str; 2] = [CONTRACT_VERSION, "0.6.0"];
const LIFECYCLE: &str = "lifecycle";
const HANDSHAKE: &str = "handshake";
const BALANCER: &str = "balancer";
const MESSAGES: &str = "messages";
const RESUME: &str = "resume";

type Conn = Resource<Connection>;
type InitFn<'a> = TypedFunc<(&'a str,), (Result<HookFlags, String>,)>;
type OnCloseFn = TypedFunc<(Conn, u16, ConnStats), ()>;
type OnHandshakeFn<'a> = TypedFunc<(Conn, &'a HandshakeRequest), (Verdict,)>;
type SelectFn<'a> = TypedFunc<(Conn, Resource<Pool>, &'a [Candidate]), (Vec<u32>,)>;
type OnMessageFn = TypedFunc<(Conn, Direction, Opcode, u32), (WireAction,)>;
type OnReattachFn<'a> = TypedFunc<(Conn, ReattachReason, &'a str), (Vec<Outgoing>,)>;
/// Type-checks a function against one of the signatures above.
type TypeCheck = fn(Func, &mut Store<HostState>) -> wasmtime::Result<()>;

/// Where a component's hook functions are, found once per plugin version.
#[derive(Clone)]
pub(super) struct ExportIndices {
    init: ComponentExportIndex,
    on_close: ComponentExportIndex,
    on_handshake: Option<ComponentExportIndex>,
    select: Option<ComponentExportIndex>,
    on_message: Option<ComponentExportIndex>,
    on_reattach: Option<ComponentExportIndex>,
}

impl ExportIndices {
    pub fn find(component: &Component) -> anyhow::Result<ExportIndices> {
        let func = |interface: &str, name: &str| {
            let instance = COMPATIBLE_VERSIONS
                .iter()
                .find_map(|v| component.get_export_index(None, format!("wasmgate:plugin/{interface}@{v}")))?;
            component.get_export_index(Some(&instance), name)
        };
        let required = |name: &str| {
            func(LIFECYCLE, name).ok_or_else(|| match other_contract_version(component) {
                Some(v) => anyhow::anyhow!(
                    "the component was built for wasmgate:plugin@{v}; this gateway speaks \
                     @{CONTRACT_VERSION}: rebuild it against sdk/wit/plugin.wit"
                ),
                None => {
                    anyhow::anyhow!("the component does not export `wasmgate:plugin/{LIFECYCLE}@{CONTRACT_VERSION}` with `{name}`")
                }
            })
        };
        Ok(ExportIndices {
            init: required("init")?,
            on_close: required("on-close")?,
            on_handshake: func(HANDSHAKE, "on-handshake"),
            select: func(BALANCER, "select"),
            on_message: func(MESSAGES, "on-message"),
            on_reattach: func(RESUME, "on-reattach"),
        })
    }

    pub fn has_handshake(&self) -> bool {
        self.on_handshake.is_some()
    }

    pub fn has_balancer(&self) -> bool {
        self.select.is_some()
    }

    pub fn has_messages(&self) -> bool {
        self.on_message.is_some()
    }

    pub fn has_resume(&self) -> bool {
        self.on_reattach.is_some()
    }
}

/// One instance's hook functions, type-checked.
pub(super) struct Exports {
    init: Func,
    on_close: Func,
    on_handshake: Option<Func>,
    select: Option<Func>,
    on_message: Option<Func>,
    on_reattach: Option<Func>,
}

impl Exports {
    pub fn load(
        idx: &ExportIndices,
        store: &mut Store<HostState>,
        instance: &Instance,
    ) -> wasmtime::Result<Exports> {
        let mut get = |i: &ComponentExportIndex, check: TypeCheck| -> wasmtime::Result<Func> {
            let f = instance
                .get_func(&mut *store, i)
                .ok_or_else(|| wasmtime::format_err!("an export is missing from its instance"))?;
            check(f, store)?;
            Ok(f)
        };
        Ok(Exports {
            init: get(&idx.init, |f, s| f.typed(s).map(|_: InitFn<'_>| ()))?,
            on_close: get(&idx.on_close, |f, s| f.typed(s).map(|_: OnCloseFn| ()))?,
            on_handshake: idx
                .on_handshake
                .as_ref()
                .map(|i| get(i, |f, s| f.typed(s).map(|_: OnHandshakeFn<'_>| ())))
                .transpose()?,
            select: idx
                .select
                .as_ref()
                .map(|i| get(i, |f, s| f.typed(s).map(|_: SelectFn<'_>| ())))
                .transpose()?,
            on_message: idx
                .on_message
                .as_ref()
                .map(|i| get(i, |f, s| f.typed(s).map(|_: OnMessageFn| ())))
                .transpose()?,
            on_reattach: idx
                .on_reattach
                .as_ref()
                .map(|i| get(i, |f, s| f.typed(s).map(|_: OnReattachFn<'_>| ())))
                .transpose()?,
        })
    }

    // SAFETY (every `new_unchecked` below): `load` type-checked the same function against
    // the same signature; lifetimes do not change a component type.

    pub fn init(
        &self,
        store: &mut Store<HostState>,
        config: &str,
    ) -> wasmtime::Result<Result<HookFlags, String>> {
        let f = unsafe { InitFn::new_unchecked(self.init) };
        Ok(f.call(store, (config,))?.0)
    }

    pub fn on_close(
        &self,
        store: &mut Store<HostState>,
        code: u16,
        stats: ConnStats,
    ) -> wasmtime::Result<()> {
        let f = unsafe { OnCloseFn::new_unchecked(self.on_close) };
        f.call(store, (conn(), code, stats))
    }

    /// `None` when the component does not export the hook.
    pub fn on_handshake(
        &self,
        store: &mut Store<HostState>,
        req: &HandshakeRequest,
    ) -> Option<wasmtime::Result<Verdict>> {
        let f = unsafe { OnHandshakeFn::new_unchecked(self.on_handshake?) };
        Some(f.call(store, (conn(), req)).map(|r| r.0))
    }

    /// The pool itself must have been lent to the call (`ConnGuard::with_pool`).
    pub fn select(
        &self,
        store: &mut Store<HostState>,
        candidates: &[Candidate],
    ) -> Option<wasmtime::Result<Vec<u32>>> {
        let f = unsafe { SelectFn::new_unchecked(self.select?) };
        Some(f.call(store, (conn(), Resource::new_borrow(LENT_REP), candidates)).map(|r| r.0))
    }

    /// The payload must have been lent to the call (`ConnGuard::with_message`).
    pub fn on_message(
        &self,
        store: &mut Store<HostState>,
        dir: Direction,
        op: Opcode,
        len: u32,
    ) -> Option<wasmtime::Result<WireAction>> {
        let f = unsafe { OnMessageFn::new_unchecked(self.on_message?) };
        Some(f.call(store, (conn(), dir, op, len)).map(|r| r.0))
    }
}

impl Exports {
    /// `None` when the component does not export the hook.
    pub fn on_reattach(
        &self,
        store: &mut Store<HostState>,
        reason: ReattachReason,
        server: &str,
    ) -> Option<wasmtime::Result<Vec<Outgoing>>> {
        let f = unsafe { OnReattachFn::new_unchecked(self.on_reattach?) };
        Some(f.call(store, (conn(), reason, server)).map(|r| r.0))
    }
}

/// The borrowed handle every hook receives; see `HostState::lent`.
fn conn() -> Conn {
    Resource::new_borrow(LENT_REP)
}

/// The version of a `wasmgate:plugin` lifecycle export other than ours, if the component
/// has one: a plugin built against an older or newer contract.
fn other_contract_version(component: &Component) -> Option<String> {
    let engine = component.engine();
    component
        .component_type()
        .exports(engine)
        .find_map(|(name, _)| name.strip_prefix("wasmgate:plugin/lifecycle@").map(str::to_string))
}
