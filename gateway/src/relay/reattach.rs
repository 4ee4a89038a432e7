//! Moving a connection to another server instead of closing its client, on routes whose
//! plugins keep session state.
//!
//! When the upstream goes away without a close the client should see (a reset, an end of
//! stream, a close with 1001/1011/1012) or the gateway asks the connection to move (a drain
//! or rebalance with `mode=migrate`), and the stream toward the client stands at a message
//! boundary, the relay stops relaying while a [`Reattach`] opens another server. What the
//! relay had read from the client and not wholly written to the old server is kept, whole
//! frames only; what the client sends meanwhile is read, unprocessed, into a queue of at
//! most `resume_buffer_bytes` (then the client is not read: TCP flow control holds the
//! rest in its socket; nothing is dropped). Then the new server gets the messages the
//! reattacher gives (the plugins' first messages and the replay log), then the kept input,
//! then the queued bytes, now run through the link and its plugins, and the relay carries
//! on with the same client link (its compression context, its counters). A server that dies in
//! the middle of a message to the client cannot be moved from: the client is closed with
//! 1011 as before; so is one that no server takes in time (the close it would have had).

use std::future::Future;
use std::pin::Pin;

use tokio::time::Instant;

use super::close::code;
use super::{DataKind, Endpoint, Relay, Side, SideState, Stop, StopWatch};
use crate::plugin::ReattachReason;

/// Finds the connection a new server; implemented by `crate::session`.
pub trait Reattach: Send {
    /// Whether the stop signal that fired asks the connection to move (a migrating drain or
    /// rebalance) rather than to close, and why.
    fn moving(&self) -> Option<ReattachReason>;

    /// Opens another server than the current one, with the original handshake, within the
    /// resume timeout. `queued` is how many bytes from the client wait for it. None when no
    /// server took the connection.
    fn reattach(
        &mut self,
        reason: ReattachReason,
        queued: usize,
    ) -> Pin<Box<dyn Future<Output = Option<Reattached>> + Send + '_>>;

    /// A move that could not even start (`why`: e.g. the old server stopped mid-message).
    fn not_moved(&self, why: &'static str);

    /// How many bytes the client may send during a move before it stops being read
    /// (`resume_buffer_bytes`).
    fn buffer_limit(&self) -> usize;

    /// A move is done: `held` bytes from the client (unsent to the old server, or read
    /// during the move) go to the new server.
    fn delivered(&self, held: usize);
}

/// A new server, ready for the relay.
pub struct Reattached {
    pub upstream: Endpoint,
    /// Messages for the new server before anything the client sent: on-reattach's, then
    /// the replay log.
    pub first: Vec<(DataKind, Vec<u8>)>,
    /// The new server's stop signal (shutdown, its drains).
    pub stop: Stop,
}

/// A move decided by the relay, done at the top of its loop.
pub(super) struct Move {
    reason: ReattachReason,
    /// The close the client gets if no server takes the connection.
    fallback: (u16, &'static str),
}

impl Relay<'_> {
    /// Decides to move the connection, if it can: a reattacher, the client not closing, and
    /// the stream to the client at a message boundary. The old server is given up (neither
    /// read nor written any more).
    fn try_move(&mut self, reason: ReattachReason, fallback: (u16, &'static str)) -> bool {
        let Some(reattach) = self.reattach.as_deref() else { return false };
        if self.moving.is_some() || self.upstream_state.gone || self.close_deadline.is_some() {
            return false;
        }
        let client = &self.client_state;
        if client.gone || client.reading_done || client.close_sent || self.deferred_close.is_some() {
            return false;
        }
        if self.u2c.assembling() || !self.u2c.delivering() || !self.c2u.delivering() {
            reattach.not_moved("mid_message");
            return false;
        }
        let upstream = &mut self.upstream_state;
        upstream.gone = true;
        upstream.reading_done = true;
        self.moving = Some(Move { reason, fallback });
        true
    }

    /// The upstream's socket ended or failed: move if possible.
    pub(super) fn move_on_loss(&mut self) -> bool {
        self.try_move(ReattachReason::ServerGone, (code::INTERNAL_ERROR, "upstream went away"))
    }

    /// The stop signal fired: move if it asks to and the connection can. A message arriving
    /// from the server is let finish first: the move waits for its end.
    pub(super) fn move_on_stop(&mut self) -> bool {
        let Some(reason) = self.reattach.as_deref().and_then(|r| r.moving()) else { return false };
        if self.u2c.assembling() && self.u2c.delivering() && !self.upstream_state.gone {
            self.move_after_message = Some(reason);
            return true;
        }
        self.try_move(reason, (code::SERVICE_RESTART, "service restart"))
    }

    /// Carries out a move the stop signal asked for once the message it waited for is whole;
    /// if the connection cannot move then, it closes as the signal said.
    pub(super) fn move_when_whole(&mut self) {
        if self.u2c.assembling() && !self.upstream_state.gone {
            return;
        }
        if let Some(reason) = self.move_after_message.take() {
            if !self.try_move(reason, (code::SERVICE_RESTART, "service restart")) && self.close_deadline.is_none() {
                let restart = (code::SERVICE_RESTART, "service restart");
                self.start_close(Some(restart), Some(restart));
            }
        }
    }

    /// The upstream sent a close saying it is going away (kept by the link, not forwarded):
    /// move, or pass it to the client as the link would have.
    pub(super) fn upstream_restarting(&mut self, close: u16) {
        if self.try_move(ReattachReason::ServerGone, (close, "upstream went away")) {
            return;
        }
        self.first_close_code.get_or_insert(close);
        let upstream = &mut self.upstream_state;
        upstream.reading_done = true;
        upstream.close_heard = Some(close);
        // The client's answer goes on to the upstream as the answer to its close.
        self.send_close(Side::Client, close, "");
        self.arm_close_deadline();
    }

    /// Carries out the move decided by `try_move`: waits for a new server while reading what
    /// the client sends into a bounded queue, then queues for the new server the
    /// reattacher's messages, the kept client input and what was read meanwhile. Without a
    /// server, the client gets the close it would have had.
    pub(super) async fn move_upstream(&mut self) {
        let Some(Move { reason, fallback }) = self.moving.take() else { return };
        let kept = self.c2u.take_unsent();
        let reattach = self.reattach.take().expect("a move needs a reattacher");
        let limit = reattach.buffer_limit();
        let (attached, held) = {
            let attach = reattach.reattach(reason, kept.len());
            self.read_client_while(attach, limit).await
        };
        let reattach = self.reattach.insert(reattach);
        match attached {
            Some(Reattached { upstream, first, stop: new_stop }) => {
                reattach.delivered(kept.len() + held);
                let now = Instant::now();
                self.upstream = upstream.stream;
                self.upstream_state = SideState { last_heard: Some(now), ..SideState::default() };
                self.u2c.awaiting_pong = false;
                for (kind, payload) in &first {
                    self.c2u.queue_data(*kind, payload);
                }
                self.c2u.queue_frames(&kept);
                // What the client sent during the move, raw, behind the rest: its frames
                // go through the link (and the plugins) now, in order.
                let client = &mut self.client_state;
                if held > 0 && !client.input_paused {
                    let input = std::mem::take(&mut client.unprocessed);
                    self.take_input(Side::Client, input);
                }
                self.stop = StopWatch::new(new_stop);
                self.last_data = now;
                self.reset_timer();
                if !upstream.already_read.is_empty() {
                    self.take_input(Side::Upstream, upstream.already_read);
                }
            }
            None => {
                let (close, why) = fallback;
                self.send_close(Side::Client, close, why);
                self.arm_close_deadline();
            }
        }
    }
}

impl Relay<'_> {
    /// Runs `attach` to its end while reading the client's bytes, unprocessed, onto its
    /// input: at most `limit` of them, then the client is not read until the move is done
    /// (TCP flow control holds the rest in its socket); nothing is dropped. An end of
    /// stream or an error stops the reading too: the relay meets it again once the move is
    /// done. Returns the move's outcome and how many bytes were read.
    async fn read_client_while<T>(&mut self, attach: impl Future<Output = T>, limit: usize) -> (T, usize) {
        tokio::pin!(attach);
        let client = &self.client;
        let state = &mut self.client_state;
        let start = state.unprocessed.len();
        let mut open = !state.gone && !state.reading_done;
        loop {
            let room = limit.saturating_sub(state.unprocessed.len() - start);
            tokio::select! {
                biased;
                outcome = &mut attach => return (outcome, state.unprocessed.len() - start),
                ready = std::future::poll_fn(|cx| client.poll_read_ready(cx)), if open && room > 0 => {
                    if ready.is_err() {
                        open = false;
                        continue;
                    }
                    // Read no more than there is room for.
                    let mut chunk = Vec::with_capacity(room.min(super::READ_CHUNK));
                    match client.read_once(&mut chunk) {
                        Ok(0) => open = false,
                        Ok(_) => {
                            state.unprocessed.extend_from_slice(&chunk);
                            state.last_heard = Some(Instant::now());
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => open = false,
                    }
                }
            }
        }
    }
}
