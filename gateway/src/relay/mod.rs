//! The relay: moves frames both ways between a client and its upstream until both have
//! closed.
//!
//! One task, one loop, no locks: the loop waits for socket readiness (or a timer, or
//! shutdown), does non-blocking reads and writes, and lets each [`Link`] (one direction)
//! turn the bytes it read into bytes to write. A side is read only when everything read from
//! it before has been written to the other side, so a slow reader slows its writer instead of
//! growing memory. Buffers come from a per-thread pool and go back to it as soon as they are
//! empty, so an idle connection holds no buffer at all.
//!
//! Closing follows RFC 6455 through the gateway: a close frame from one side is forwarded to
//! the other, whose reply comes back the same way. When a side breaks the protocol or
//! vanishes, the gateway closes that side with the matching code and the other side with
//! 1001 ("going away") or 1011, then waits a bounded time for the replies.

pub mod close;
pub mod frame;
pub mod link;
pub(crate) mod pool;
mod reattach;
mod stop;
pub mod traffic;
pub mod transport;
pub mod utf8;

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::compression::{Deflater, Inflater};
use close::code;
use frame::OpCode;
pub use link::{DataKind, Link, LinkEvent, LinkRules, MessageAction, MessageHook, Side};
pub use reattach::{Reattach, Reattached};
pub use stop::{Stop, StopFlag, StopSource};
pub use transport::Transport;
use stop::StopWatch;
pub use traffic::TrafficCounters;

/// How much one read takes at most.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// Relay settings shared by every connection of a gateway.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub max_message_size: u64,
    /// Ping a side that has been silent this long.
    pub ping_interval: Option<Duration>,
    /// A pinged side silent for this long is dead.
    pub pong_timeout: Duration,
    /// Close when no data message went either way for this long.
    pub idle_timeout: Option<Duration>,
    /// How long to wait for close replies once closing started.
    pub close_timeout: Duration,
    /// A vanished client's upstream gets a close frame (1001) and the relay waits for its
    /// reply; false: the upstream's TCP connection is closed once its output is written.
    pub close_upstream_on_client_loss: bool,
    /// A message assembled in memory (for plugins, or to inflate it) must be complete this
    /// long after its first frame, or its sender is closed with 1008: a peer trickling a
    /// large message cannot hold its buffer for ever.
    pub message_assembly_timeout: Option<Duration>,
}

/// One end of the relay: its socket and bytes already read from it during the handshake.
pub struct Endpoint {
    pub stream: Transport,
    pub already_read: Vec<u8>,
}

/// How the connection ended, for logs, metrics and the plugins' `on-close`.
#[derive(Debug, Clone)]
pub struct RelayOutcome {
    /// The first close code seen on the wire (from either side or sent by the gateway),
    /// 1006 when the connection ended without one.
    pub code: u16,
    pub messages_from_client: u64,
    pub messages_from_upstream: u64,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
    /// Who started the end: the side whose close frame or disappearance came first, or the
    /// gateway (its own close: a protocol error, a drain, shutdown, a timeout).
    pub closed_by: Closer,
}

/// Who started a connection's end (for access logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closer {
    Client,
    Upstream,
    Gateway,
}

impl Closer {
    pub fn name(self) -> &'static str {
        match self {
            Closer::Client => "client",
            Closer::Upstream => "upstream",
            Closer::Gateway => "gateway",
        }
    }
}

impl From<Side> for Closer {
    fn from(side: Side) -> Closer {
        match side {
            Side::Client => Closer::Client,
            Side::Upstream => Closer::Upstream,
        }
    }
}

/// What the relay knows about one side's closing.
#[derive(Default)]
struct SideState {
    /// Nothing more is read from this side: it sent a close frame, or broke the protocol.
    reading_done: bool,
    /// The code of the close frame this side sent (1005 for none in the frame).
    close_heard: Option<u16>,
    /// A close frame to this side is queued or written.
    close_sent: bool,
    /// Its socket reached EOF or failed; nothing can be read or written any more.
    gone: bool,
    /// Bytes read from it but not yet processed (a partial frame header or control frame).
    unprocessed: Vec<u8>,
    /// `unprocessed` holds whole frames, held back until the gateway's own frames to this
    /// side are written (see `Link::holds_own_frames`).
    input_paused: bool,
    /// When the message being assembled from this side started.
    assembling_since: Option<Instant>,
    last_heard: Option<Instant>,
    ping_sent_at: Option<Instant>,
}

struct Relay<'a> {
    client: Transport,
    /// Owned, so that a connection can move to another server (see `reattach`).
    upstream: Transport,
    /// Frames from the client toward the upstream.
    c2u: Link,
    /// Frames from the upstream toward the client.
    u2c: Link,
    client_state: SideState,
    upstream_state: SideState,
    hook: Option<&'a dyn MessageHook>,
    settings: &'a RelaySettings,
    first_close_code: Option<u16>,
    /// Who started closing; set with the first close seen, sent or a side gone.
    first_closer: Option<Closer>,
    /// The close owed to a side that broke the protocol, sent once the other side answered
    /// the close the gateway sent it: what that side had sent before reaches the failed
    /// side first (RFC 6455 §7.1.7 lets an endpoint finish what it was sending).
    deferred_close: Option<(Side, u16, &'static str)>,
    /// Set when closing started: after it, everything is dropped.
    close_deadline: Option<Instant>,
    last_data: Instant,
    timer: Pin<Box<Sleep>>,
    /// The timer's deadline, kept here (hot) so a wake need not poll the timer (cold) to
    /// learn it has not fired.
    timer_deadline: Instant,
    /// The timer was reset and must be polled to register the task's waker again.
    timer_needs_poll: bool,
    stop: StopWatch,
    /// Publishes the links' counts to shared counters while the connection lives.
    traffic: traffic::Reporter<'a>,
    /// Moves the connection to another server when its own goes away (session routes).
    reattach: Option<&'a mut (dyn Reattach + 'static)>,
    /// A move decided and not yet done: why, and the client's close should it fail.
    moving: Option<reattach::Move>,
    /// A move asked for while a message from the server was arriving, done at its end.
    move_after_message: Option<crate::plugin::ReattachReason>,
}

enum Wake {
    Read(Side),
    Write(Side),
    Timer,
    Shutdown,
}

/// permessage-deflate terminated at the gateway on the client link.
pub struct ClientCompression {
    /// For compressed messages from the client.
    pub inflater: Box<Inflater>,
    /// For messages to the client.
    pub deflater: Box<Deflater>,
    /// Messages to the client shorter than this go uncompressed.
    pub min_size: usize,
}

/// Relays until both sides have closed, or the close deadline passed. Messages and bytes
/// relayed are added to each of `traffic` as they go (at most once a second).
///
/// Not an `async fn`: its arguments would stay in the future for the connection's life
/// next to the relay they were moved into; the future is the relay alone.
#[allow(clippy::too_many_arguments)]
pub fn run<'a>(
    client: Endpoint,
    upstream: Endpoint,
    settings: &'a RelaySettings,
    rules: (LinkRules, LinkRules),
    hook: Option<&'a dyn MessageHook>,
    compression: Option<ClientCompression>,
    stop: Stop,
    traffic: &'a [&'a TrafficCounters],
    reattach: Option<&'a mut (dyn Reattach + 'static)>,
) -> impl Future<Output = RelayOutcome> + 'a {
    let now = Instant::now();
    let (inflater, deflater, min_size) = match compression {
        Some(c) => (Some(c.inflater), Some(c.deflater), c.min_size),
        None => (None, None, 0),
    };
    let mut relay = Relay {
        client: client.stream,
        upstream: upstream.stream,
        c2u: Link::new(Side::Client, rules.0, hook.is_some()).with_compression(inflater, None),
        u2c: Link::new(Side::Upstream, rules.1, hook.is_some())
            .with_compression(None, deflater)
            .compress_from(min_size)
            .keep_restart_closes(reattach.is_some()),
        client_state: SideState { unprocessed: client.already_read, last_heard: Some(now), ..Default::default() },
        upstream_state: SideState { unprocessed: upstream.already_read, last_heard: Some(now), ..Default::default() },
        hook,
        settings,
        first_close_code: None,
        first_closer: None,
        deferred_close: None,
        close_deadline: None,
        last_data: now,
        timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        timer_deadline: now,
        timer_needs_poll: true,
        stop: StopWatch::new(stop),
        traffic: traffic::Reporter::new(traffic, now),
        reattach,
        moving: None,
        move_after_message: None,
    };
    relay.reset_timer();
    // The block uses the relay where it was captured; an `async fn` taking it by value
    // would keep a second copy of it (rust-lang/rust#62958).
    async move { relay.drive().await }
}

impl<'a> Relay<'a> {
    async fn drive(&mut self) -> RelayOutcome {
        let relay = self;
        // Bytes that came with the handshakes are processed before any read.
        for side in [Side::Client, Side::Upstream] {
            if !relay.state(side).unprocessed.is_empty() {
                let input = std::mem::take(&mut relay.state_mut(side).unprocessed);
                relay.take_input(side, input);
            }
        }
        relay.flush_all();
        while !relay.finished() {
            if relay.move_after_message.is_some() {
                relay.move_when_whole();
            }
            if relay.moving.is_some() {
                // Boxed: inline, the move's futures (reading the client while another
                // server is found) would size every connection's task for its whole life.
                Box::pin(relay.move_upstream()).await;
                relay.flush_all();
                continue;
            }
            let wake = poll_fn(|cx| relay.poll_wake(cx)).await;
            match wake {
                Wake::Read(side) => relay.read(side),
                Wake::Write(side) => relay.write(side),
                Wake::Timer => relay.on_timer(),
                Wake::Shutdown if relay.move_on_stop() => {}
                Wake::Shutdown => {
                    let (code, reason) = relay.stop.frame();
                    relay.start_close(Some((code, reason)), Some((code, reason)));
                }
            }
            relay.flush_all();
            while relay.resume_paused_input() {
                relay.flush_all();
            }
        }
        relay.finish();
        let totals = relay.totals();
        relay.traffic.publish(totals);
        RelayOutcome {
            code: relay.first_close_code.unwrap_or(code::ABNORMAL),
            messages_from_client: relay.c2u.messages,
            messages_from_upstream: relay.u2c.messages,
            bytes_from_client: relay.c2u.bytes,
            bytes_from_upstream: relay.u2c.bytes,
            closed_by: relay.first_closer.unwrap_or(Closer::Gateway),
        }
    }
}

impl<'a> Relay<'a> {
    /// Messages from the client and the upstream, then bytes likewise.
    fn totals(&self) -> [u64; 4] {
        [self.c2u.messages, self.u2c.messages, self.c2u.bytes, self.u2c.bytes]
    }

    fn stream(&self, side: Side) -> &Transport {
        match side {
            Side::Client => &self.client,
            Side::Upstream => &self.upstream,
        }
    }

    fn state(&self, side: Side) -> &SideState {
        match side {
            Side::Client => &self.client_state,
            Side::Upstream => &self.upstream_state,
        }
    }

    fn state_mut(&mut self, side: Side) -> &mut SideState {
        match side {
            Side::Client => &mut self.client_state,
            Side::Upstream => &mut self.upstream_state,
        }
    }

    /// The link reading from `side`, and the link writing to it.
    fn links(&mut self, from: Side) -> (&mut Link, &mut Link) {
        match from {
            Side::Client => (&mut self.c2u, &mut self.u2c),
            Side::Upstream => (&mut self.u2c, &mut self.c2u),
        }
    }

    /// The link whose output goes to `side`.
    fn link_to(&mut self, side: Side) -> &mut Link {
        self.links(side.other()).0
    }

    fn wants_read(&self, side: Side) -> bool {
        let state = self.state(side);
        let (from, toward) = match side {
            Side::Client => (&self.c2u, &self.u2c),
            Side::Upstream => (&self.u2c, &self.c2u),
        };
        // Backpressure: read more only when what was read before has been written, and
        // when what the gateway itself answered this side (pongs, replies) has reached it.
        !state.gone && !state.reading_done && !from.has_output() && !toward.holds_own_frames()
    }

    fn wants_write(&self, side: Side) -> bool {
        let link = match side {
            Side::Client => &self.u2c,
            Side::Upstream => &self.c2u,
        };
        !self.state(side).gone && (link.has_output() || self.stream(side).has_pending_output())
    }

    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        for side in [Side::Client, Side::Upstream] {
            if self.wants_write(side) && self.stream(side).poll_write_ready(cx).is_ready() {
                return Poll::Ready(Wake::Write(side));
            }
        }
        // The upstream first: a server that went away is noticed before the client's next
        // message is read and written to its dead socket (a connection that can move would
        // lose that message).
        for side in [Side::Upstream, Side::Client] {
            if self.wants_read(side) && self.stream(side).poll_read_ready(cx).is_ready() {
                return Poll::Ready(Wake::Read(side));
            }
        }
        // A polled timer keeps the task's waker until it fires, so it needs a poll only
        // after a reset or once its deadline passed.
        if self.timer_needs_poll || Instant::now() >= self.timer_deadline {
            self.timer_needs_poll = false;
            if self.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
        }
        if self.stop.poll(cx).is_ready() {
            return Poll::Ready(Wake::Shutdown);
        }
        Poll::Pending
    }

    fn read(&mut self, side: Side) {
        let mut buf = pool::take();
        // Keep bytes left from the last read in front of the new ones.
        buf.extend_from_slice(&self.state(side).unprocessed);
        buf.reserve(READ_CHUNK);
        match self.stream(side).read_once(&mut buf) {
            Ok(0) => {
                pool::give(buf);
                self.side_gone(side);
            }
            Ok(_) => {
                self.state_mut(side).unprocessed.clear();
                let now = Instant::now();
                let state = self.state_mut(side);
                state.last_heard = Some(now);
                state.ping_sent_at = None;
                self.take_input(side, buf);
                let (c2u, u2c) = (&self.c2u, &self.u2c);
                self.traffic.tick(now, || [c2u.messages, u2c.messages, c2u.bytes, u2c.bytes]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => pool::give(buf),
            Err(e) => {
                tracing::debug!(?side, error = %e, "read failed");
                pool::give(buf);
                self.side_gone(side);
            }
        }
    }

    /// Runs input from `side` through its link, handling each event the link stops at.
    fn take_input(&mut self, side: Side, mut input: Vec<u8>) {
        let hook = self.hook;
        let mut pos = 0;
        while pos < input.len() {
            let (link, toward_source) = self.links(side);
            let before = link.messages;
            let (used, event) = link.process(&mut input[pos..], hook, toward_source);
            if link.messages != before {
                self.last_data = Instant::now();
            }
            pos += used;
            match event {
                None => break,
                Some(event) => self.on_event(side, event),
            }
            if self.state(side).reading_done {
                // Nothing may follow a close frame; ignore whatever did.
                pos = input.len();
            }
        }
        let assembling = self.links(side).0.assembling();
        match (assembling, self.state(side).assembling_since) {
            (true, None) => {
                self.state_mut(side).assembling_since = Some(Instant::now());
                self.arm_assembly_deadline();
            }
            (false, Some(_)) => self.state_mut(side).assembling_since = None,
            _ => {}
        }
        let paused = pos < input.len() && self.link_to(side).holds_own_frames();
        let rest = &input[pos..];
        let state = self.state_mut(side);
        state.input_paused = paused;
        state.unprocessed.clear();
        state.unprocessed.extend_from_slice(rest);
        if state.unprocessed.capacity() > 256 && state.unprocessed.is_empty() {
            state.unprocessed = Vec::new();
        }
        pool::give(input);
    }

    fn on_event(&mut self, from: Side, event: LinkEvent) {
        match event {
            LinkEvent::Closed { code } if from == Side::Upstream && self.u2c.keeps_close(code) => {
                self.upstream_restarting(code);
            }
            LinkEvent::Closed { code } => {
                self.first_close_code.get_or_insert(code);
                self.first_closer.get_or_insert(from.into());
                let state = self.state_mut(from);
                state.reading_done = true;
                state.close_heard = Some(code);
                if self.send_deferred_close(from.other()) {
                    // The side we failed gets its close now, after what `from` sent before.
                } else if self.links(from).0.delivering() {
                    // Forwarded: the other side's reply is this close's answer and comes
                    // back the same way. Answering too would send `from` two close frames.
                    self.state_mut(from.other()).close_sent = true;
                } else {
                    // The other side is gone or was closed by us: answer this close ourselves.
                    self.answer_close(from);
                }
                self.arm_close_deadline();
            }
            LinkEvent::Failed { code, reason } => {
                tracing::debug!(side = ?from, code, reason, "failing connection");
                // The stream from this side cannot be parsed any further.
                self.state_mut(from).reading_done = true;
                if from == Side::Client && self.deferred_close.is_none() && self.can_defer_close() {
                    // Close the upstream first and relay its answers to the client's earlier
                    // messages; the client's close follows the upstream's.
                    self.deferred_close = Some((Side::Client, code, reason));
                    self.c2u.stop_delivering();
                    self.u2c.hold_close();
                    self.send_close(Side::Upstream, code::GOING_AWAY, "client protocol error");
                    self.arm_close_deadline();
                    return;
                }
                let (to_client, to_upstream) = match from {
                    Side::Client => ((code, reason), (code::GOING_AWAY, "client protocol error")),
                    Side::Upstream => ((code::INTERNAL_ERROR, "upstream protocol error"), (code, reason)),
                };
                self.start_close(Some(to_client), Some(to_upstream));
            }
            LinkEvent::HookClose { code, reason } => {
                self.start_close(Some((code, &reason)), Some((code, &reason)));
            }
        }
    }

    /// Takes up input held back for the gateway's own frames once they are written; true if
    /// there was some. Such input is already off the socket: no readiness event would bring
    /// it back.
    fn resume_paused_input(&mut self) -> bool {
        let mut resumed = false;
        for side in [Side::Client, Side::Upstream] {
            if self.state(side).input_paused && self.wants_read(side) {
                self.state_mut(side).input_paused = false;
                let input = std::mem::take(&mut self.state_mut(side).unprocessed);
                self.take_input(side, input);
                resumed = true;
            }
        }
        resumed
    }

    /// Starts the gateway's own close toward each side given; frames from a side we close
    /// are no longer delivered to the other.
    fn start_close(&mut self, to_client: Option<(u16, &str)>, to_upstream: Option<(u16, &str)>) {
        for (side, close) in [(Side::Client, to_client), (Side::Upstream, to_upstream)] {
            if let Some((code, reason)) = close {
                self.links(side).0.stop_delivering();
                self.send_close(side, code, reason);
            }
        }
        self.arm_close_deadline();
    }

    /// Queues a close frame to `side` unless one was sent already; a side cut mid-frame
    /// cannot take one and will just be disconnected.
    fn send_close(&mut self, side: Side, code: u16, reason: &str) {
        if self.state(side).close_sent || self.state(side).gone {
            return;
        }
        self.first_close_code.get_or_insert(code);
        self.first_closer.get_or_insert(Closer::Gateway);
        self.state_mut(side).close_sent = true;
        let feeder = self.state(side.other());
        let feeder_stopped = feeder.gone || feeder.reading_done;
        let link = self.link_to(side);
        if link.mid_frame() && feeder_stopped {
            // The frame being streamed to this side will never be completed.
            self.abort(side);
            return;
        }
        link.queue_frame(OpCode::Close, &close::payload(code, reason));
    }

    /// Ends a side's connection at once, without a close frame.
    fn abort(&mut self, side: Side) {
        tracing::debug!(?side, "aborting: a frame to it was cut off");
        self.state_mut(side).gone = true;
        self.stream(side).abort();
    }

    fn side_gone(&mut self, side: Side) {
        if side == Side::Upstream && self.move_on_loss() {
            return;
        }
        let state = self.state_mut(side);
        if state.gone {
            return;
        }
        state.gone = true;
        if state.reading_done && state.close_sent {
            return;
        }
        tracing::debug!(?side, "peer went away without a close");
        self.first_closer.get_or_insert(side.into());
        let other = side.other();
        self.links(side).0.stop_delivering();
        if self.send_deferred_close(other) {
            // The failed side gets the close it was owed.
        } else if self.state(other).close_heard.is_some() {
            // `other` started closing and its answer will never come: answer it as the
            // peer would have, so a clean close stays clean.
            self.answer_close(other);
        } else if side == Side::Client && !self.settings.close_upstream_on_client_loss {
            // `on_client_loss = "disconnect"`: read nothing more from the upstream; the relay
            // ends, closing its socket, once what the client sent before is written to it.
            let upstream = self.state_mut(other);
            upstream.reading_done = true;
            upstream.close_sent = true;
            self.links(other).0.stop_delivering();
        } else {
            let (code, reason) = match side {
                Side::Client => (code::GOING_AWAY, "client went away"),
                Side::Upstream => (code::INTERNAL_ERROR, "upstream went away"),
            };
            self.send_close(other, code, reason);
        }
        self.arm_close_deadline();
    }

    /// The upstream may still be talking to the client: it has not closed or gone, and it is
    /// not cut mid-frame toward the client.
    fn can_defer_close(&self) -> bool {
        let up = &self.upstream_state;
        !up.gone && !up.reading_done && !up.close_sent && self.u2c.delivering() && !self.c2u.mid_frame()
    }

    /// Sends `side` the close deferred for it, if any; true when there was one.
    fn send_deferred_close(&mut self, side: Side) -> bool {
        match self.deferred_close {
            Some((owed, code, reason)) if owed == side => {
                self.deferred_close = None;
                self.links(side.other()).0.stop_delivering();
                self.send_close(side, code, reason);
                true
            }
            _ => false,
        }
    }

    /// Answers the close frame `side` sent with its own code (RFC 6455 §5.5.1), unless a
    /// close frame went to `side` already.
    fn answer_close(&mut self, side: Side) {
        if let Some(code) = self.state(side).close_heard {
            let echo = if code == code::NO_STATUS { code::NORMAL } else { code };
            self.send_close(side, echo, "");
        }
    }

    fn write(&mut self, to: Side) {
        loop {
            let (stream, link) = match to {
                Side::Client => (&self.client, &mut self.u2c),
                Side::Upstream => (&self.upstream, &mut self.c2u),
            };
            let written = match link.has_output() {
                true => stream.try_write(&link.out[link.out_written..]),
                // What the transport still holds (TLS records the socket did not take).
                false => stream.flush().map(|()| 0),
            };
            match written {
                Ok(0) if !link.has_output() => break,
                Ok(n) => {
                    if link.written(n) {
                        link.flush_pending();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(side = ?to, error = %e, "write failed");
                    // What was not written goes to the next server, if the connection moves.
                    if to == Side::Upstream && self.move_on_loss() {
                        break;
                    }
                    let link = self.link_to(to);
                    link.out.clear();
                    link.out_written = 0;
                    self.side_gone(to);
                    break;
                }
            }
        }
    }

    /// Tries every write that has output right away: most succeed without waiting.
    fn flush_all(&mut self) {
        for side in [Side::Client, Side::Upstream] {
            if self.wants_write(side) {
                self.write(side);
            }
        }
        if !self.c2u.has_output() && !self.u2c.has_output() {
            self.c2u.shrink_when_idle();
            self.u2c.shrink_when_idle();
        }
    }

    fn finished(&self) -> bool {
        let side_done = |s: &SideState| s.gone || (s.reading_done && s.close_sent);
        let outputs_done = !self.wants_write(Side::Client) && !self.wants_write(Side::Upstream);
        let deadline_passed = self.close_deadline.is_some_and(|d| Instant::now() >= d);
        (side_done(&self.client_state) && side_done(&self.upstream_state) && outputs_done)
            || deadline_passed
    }

    fn arm_close_deadline(&mut self) {
        if self.close_deadline.is_none() {
            self.close_deadline = Some(Instant::now() + self.settings.close_timeout);
            self.reset_timer();
        }
    }

    /// The next moment something is due: a close deadline, a keepalive ping or pong check,
    /// or the idle timeout. Activity only moves these later, so the timer is reset lazily
    /// when it fires rather than on every frame.
    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut next = self.close_deadline.unwrap_or(far);
        if self.close_deadline.is_none() {
            if let Some(interval) = self.settings.ping_interval {
                for state in [&self.client_state, &self.upstream_state] {
                    let due = match (state.ping_sent_at, state.last_heard) {
                        (Some(sent), _) => sent + self.settings.pong_timeout,
                        (None, Some(heard)) => heard + interval,
                        (None, None) => far,
                    };
                    next = next.min(due);
                }
            }
            if let Some(idle) = self.settings.idle_timeout {
                next = next.min(self.last_data + idle);
            }
            if let Some(limit) = self.settings.message_assembly_timeout {
                for state in [&self.client_state, &self.upstream_state] {
                    if let Some(since) = state.assembling_since {
                        next = next.min(since + limit);
                    }
                }
            }
        }
        next
    }

    /// Brings the timer forward if a new message assembly ends before its deadline.
    fn arm_assembly_deadline(&mut self) {
        if self.settings.message_assembly_timeout.is_some() && self.next_deadline() < self.timer_deadline {
            self.reset_timer();
        }
    }

    fn reset_timer(&mut self) {
        let next = self.next_deadline();
        self.timer.as_mut().reset(next);
        self.timer_deadline = next;
        self.timer_needs_poll = true;
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        self.c2u.release_codecs();
        self.u2c.release_codecs();
        if self.close_deadline.is_none() {
            if let Some(interval) = self.settings.ping_interval {
                for side in [Side::Client, Side::Upstream] {
                    let state = self.state(side);
                    match (state.ping_sent_at, state.last_heard) {
                        (Some(sent), _) if now >= sent + self.settings.pong_timeout => {
                            tracing::debug!(?side, "no answer to keepalive ping: peer is dead");
                            self.side_gone(side);
                        }
                        (None, Some(heard)) if now >= heard + interval => {
                            self.state_mut(side).ping_sent_at = Some(now);
                            let (from_side, toward_side) = self.links(side);
                            from_side.ping_source(toward_side);
                        }
                        _ => {}
                    }
                }
            }
            if let Some(limit) = self.settings.message_assembly_timeout {
                for side in [Side::Client, Side::Upstream] {
                    let late = self.state(side).assembling_since.is_some_and(|since| now >= since + limit);
                    if late && self.close_deadline.is_none() {
                        tracing::debug!(?side, "a message took too long to arrive");
                        self.state_mut(side).assembling_since = None;
                        self.state_mut(side).reading_done = true;
                        let reason = "message took too long to arrive";
                        let (to_client, to_upstream) = match side {
                            Side::Client => ((code::POLICY_VIOLATION, reason), (code::GOING_AWAY, "client too slow")),
                            Side::Upstream => ((code::INTERNAL_ERROR, "upstream too slow"), (code::POLICY_VIOLATION, reason)),
                        };
                        self.start_close(Some(to_client), Some(to_upstream));
                    }
                }
            }
            if let Some(idle) = self.settings.idle_timeout {
                if now >= self.last_data + idle {
                    self.start_close(
                        Some((code::GOING_AWAY, "idle timeout")),
                        Some((code::GOING_AWAY, "idle timeout")),
                    );
                }
            }
        }
        self.reset_timer();
    }

    /// Ends both connections after everything written: TLS ones with close_notify and a
    /// FIN now; plain ones when the relay drops them, which it does right after this, since
    /// `close` sends the same FIN after the same bytes (a `shutdown` first was two
    /// more syscalls per connection).
    fn finish(&mut self) {
        // A close whose forwarded copy the other side never answered (the close deadline
        // passed) still gets an answer, written if the socket takes it now; so does a
        // deferred one.
        for side in [Side::Client, Side::Upstream] {
            if !self.send_deferred_close(side) {
                self.answer_close(side);
            }
        }
        self.flush_all();
        for side in [Side::Client, Side::Upstream] {
            if !self.state(side).gone && !self.stream(side).is_plain() {
                let _ = self.stream(side).shutdown_write();
            }
        }
    }
}

#[cfg(test)]
mod size {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    async fn endpoint(listener: &TcpListener) -> Endpoint {
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        Endpoint { stream: Transport::Plain(tcp), already_read: Vec::new() }
    }

    /// Every idle connection pays for its relay's future: it must hold the relay once, not
    /// the relay and a second copy of what it was made from, nor a move's futures.
    #[tokio::test]
    async fn the_relay_future_is_the_relay_and_little_more() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, upstream) = (endpoint(&listener).await, endpoint(&listener).await);
        let settings = RelaySettings {
            max_message_size: 1 << 20,
            ping_interval: None,
            pong_timeout: Duration::from_secs(10),
            idle_timeout: None,
            close_timeout: Duration::from_secs(1),
            close_upstream_on_client_loss: true,
            message_assembly_timeout: None,
        };
        let rules = LinkRules { expect_masked: true, validate_utf8: true, allow_rsv1: false, max_message_size: 1 << 20 };
        let stop = Stop(std::sync::Arc::new(stop::Source::default()));
        let relay = run(client, upstream, &settings, (rules, rules), None, None, stop, &[], None);
        let (future, relay_alone) = (std::mem::size_of_val(&relay), std::mem::size_of::<Relay>());
        assert!(future <= relay_alone + 160, "the relay's future is {future} bytes, the relay {relay_alone}");
    }
}
