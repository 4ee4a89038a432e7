//! Connections that survive their server: on routes whose plugins keep session state (a
//! plugin declaring the `session` hook), a connection whose server dies, drains or is
//! rebalanced (`mode=migrate`) is attached to another server instead of closing its client.
//!
//! [`log`] is the per-connection replay log plugins write from `on-message`; [`resume`]
//! finds a new server and prepares the replay for the relay, which does the move itself
//! (`relay::reattach`: at a message boundary, with the client's unsent input kept).

mod log;
mod resume;

pub use log::{Entry, SessionLog};
pub use resume::{Plan, Resumer};
