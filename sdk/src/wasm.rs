//! The generated export traits, implemented once for every [`Plugin`].
//!
//! `init` builds the plugin value, asks it for its hooks, and keeps it in a global for the
//! instance's lifetime; each hook borrows it. Wasm instances run one call at a time and a
//! host function never calls back into the guest, so the borrow is never contended.

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;

use crate::bindings::exports::wasmgate::plugin::{balancer, handshake, lifecycle, messages, resume};
use crate::bindings::wasmgate::plugin::connection::Connection;
use crate::bindings::wasmgate::plugin::message as host_message;
use crate::bindings::wasmgate::plugin::types::Action as WireAction;
use crate::bindings::wasmgate::plugin::upstreams::Pool as HostPool;
use crate::{
    Action, Candidate, Conn, ConnectionStats, Direction, Hooks, Message, Opcode, Plugin, Pool,
    Request, Verdict,
};

thread_local! {
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Binds a [`Plugin`] type to the component's exports; used by [`crate::export_plugin!`].
pub struct Exports<P>(PhantomData<P>);

fn with_plugin<P: Plugin, R>(hook: impl FnOnce(&mut P) -> R) -> R {
    INSTANCE.with_borrow_mut(|slot| {
        let plugin = slot
            .as_mut()
            .and_then(|p| p.downcast_mut::<P>())
            .expect("wasmgate called a hook before a successful init");
        hook(plugin)
    })
}

impl<P: Plugin> lifecycle::Guest for Exports<P> {
    fn init(config: String) -> Result<Hooks, String> {
        let plugin = P::from_json(&config)?;
        let hooks = plugin.hooks();
        INSTANCE.set(Some(Box::new(plugin)));
        Ok(hooks)
    }

    fn on_close(conn: &Connection, code: u16, stats: ConnectionStats) {
        with_plugin(|p: &mut P| p.on_close(Conn::from_host(conn), code, &stats))
    }
}

impl<P: Plugin> handshake::Guest for Exports<P> {
    fn on_handshake(conn: &Connection, req: Request) -> Verdict {
        with_plugin(|p: &mut P| p.on_handshake(Conn::from_host(conn), &req))
    }
}

impl<P: Plugin> balancer::Guest for Exports<P> {
    fn select(conn: &Connection, pool: &HostPool, candidates: Vec<Candidate>) -> Vec<u32> {
        with_plugin(|p: &mut P| p.select(Conn::from_host(conn), &Pool::from_host(pool), &candidates))
    }
}

impl<P: Plugin> messages::Guest for Exports<P> {
    fn on_message(conn: &Connection, dir: Direction, op: Opcode, len: u32) -> WireAction {
        let action = with_plugin(|p: &mut P| p.on_message(Conn::from_host(conn), &Message::from_host(dir, op, len)));
        // Payloads and reasons go through the message interface; the answer stays a
        // plain value so `forward` costs no allocation.
        match action {
            Action::Forward => WireAction::Forward,
            Action::ForwardUncompressed => WireAction::ForwardUncompressed,
            Action::Replace(payload) => {
                host_message::set_payload(&payload);
                WireAction::Forward
            }
            Action::Drop => WireAction::Drop,
            Action::Reply(payload) => {
                host_message::set_payload(&payload);
                WireAction::Reply
            }
            Action::Echo => WireAction::Reply,
            Action::Close(frame) => {
                if !frame.reason.is_empty() {
                    host_message::set_close_reason(&frame.reason);
                }
                WireAction::Close(frame.code)
            }
        }
    }
}

impl<P: Plugin> resume::Guest for Exports<P> {
    fn on_reattach(conn: &Connection, reason: resume::ReattachReason, server: String) -> Vec<resume::Outgoing> {
        with_plugin(|p: &mut P| p.on_reattach(Conn::from_host(conn), reason, &server))
    }
}
