//! The `session` imports (the replay log a session plugin writes from `on-message`) and the
//! types of the `resume.on-reattach` export.

use wasmtime::component::{ComponentType, Lift, Lower};

use super::bindings::session;
use super::host::HostState;
use super::types::{ConnContext, Opcode};
use crate::session::SessionLog;

/// Why a connection moved (WIT `resume.reattach-reason`).
#[derive(ComponentType, Lower, Clone, Copy, Debug, PartialEq, Eq)]
#[component(enum)]
#[repr(u8)]
pub enum ReattachReason {
    #[component(name = "server-gone")]
    ServerGone,
    #[component(name = "drained")]
    Drained,
    #[component(name = "rebalanced")]
    Rebalanced,
}

impl ReattachReason {
    /// The label of metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ReattachReason::ServerGone => "server_gone",
            ReattachReason::Drained => "drained",
            ReattachReason::Rebalanced => "rebalanced",
        }
    }
}

/// A message `on-reattach` asks to send to the new server first (WIT `resume.outgoing`).
#[derive(ComponentType, Lift, Clone, Debug, PartialEq, Eq)]
#[component(record)]
pub struct Outgoing {
    pub op: Opcode,
    pub payload: Vec<u8>,
}

fn log(conn: &ConnContext) -> wasmtime::Result<&SessionLog> {
    match &conn.session {
        Some(log) => Ok(log),
        None => wasmtime::bail!("the session interface was used on a route whose plugins declare no session hook"),
    }
}

impl session::Host for HostState {
    fn remember(&mut self, key: String) -> wasmtime::Result<bool> {
        let (payload, from_client, op) = self.lent_message()?;
        let log = log(self.lent_conn()?)?;
        Ok(from_client && log.remember(&key, op, payload))
    }

    fn forget(&mut self, key: String) -> wasmtime::Result<()> {
        log(self.lent_conn()?)?.forget(&key);
        Ok(())
    }

    fn remembered(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(log(self.lent_conn()?)?.keys())
    }

    fn replaying(&mut self) -> wasmtime::Result<bool> {
        Ok(log(self.lent_conn()?)?.replaying())
    }

    fn replay_done(&mut self) -> wasmtime::Result<()> {
        log(self.lent_conn()?)?.replay_done();
        Ok(())
    }
}
