//! One direction of a relayed connection: bytes read from one side, checked frame by frame,
//! and queued for the other side.
//!
//! Frames are streamed, not assembled: a header is checked before any of its frame is sent
//! on, then payload bytes go out as they arrive. So a 16 MiB message costs no 16 MiB buffer,
//! and the bytes leave exactly as they came (masks included) — unless a plugin reads
//! messages on this route, in which case messages are assembled, handed to the plugin chain
//! and re-framed.
//!
//! Nothing here does I/O: `process` turns input bytes into output bytes and events, so it is
//! tested without sockets.

use super::close::{self, code};
use super::frame::{apply_mask, write_frame, FrameHeader, OpCode};
use super::utf8::Utf8Validator;
use crate::compression::{Deflater, Inflater};

/// The two ends of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// A data message kind as plugins see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    Text,
    Binary,
}

/// What a message hook decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageAction {
    /// Send it on; `payload` replaces the original when set. `compress: false` sends it
    /// without permessage-deflate even toward a destination that negotiated it.
    Send { payload: Option<Vec<u8>>, compress: bool },
    Drop,
    Reply(Vec<u8>),
    Close(u16, String),
}

impl MessageAction {
    /// Send it on unchanged.
    pub const FORWARD: MessageAction = MessageAction::Send { payload: None, compress: true };
}

/// The per-message plugin chain, as the relay sees it.
pub trait MessageHook: Sync {
    fn on_message(&self, from: Side, kind: DataKind, payload: &[u8]) -> MessageAction;
}

/// Something the relay must act on; `process` stops at each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A valid close frame arrived (and was queued for the other side when delivering).
    Closed { code: u16 },
    /// The sender broke the protocol; fail its connection with this code.
    Failed { code: u16, reason: &'static str },
    /// A message hook asked to close both sides.
    HookClose { code: u16, reason: String },
}

/// Settings that differ per direction.
#[derive(Debug, Clone, Copy)]
pub struct LinkRules {
    /// Client frames must be masked, server frames must not be.
    pub expect_masked: bool,
    /// Check text as UTF-8 (done for the untrusted client side).
    pub validate_utf8: bool,
    /// permessage-deflate was negotiated end to end: RSV1 may be set on a message's first frame.
    pub allow_rsv1: bool,
    pub max_message_size: u64,
}

pub struct Link {
    pub from: Side,
    rules: LinkRules,
    /// Bytes of the current frame's payload still to come.
    remaining: u64,
    mask: Option<[u8; 4]>,
    payload_offset: usize,
    frame_fin: bool,
    /// Inside a fragmented message: continuation frames expected.
    in_message: bool,
    message_kind: DataKind,
    message_len: u64,
    /// RSV1 on the first frame: the payload is compressed and cannot be read as text.
    message_compressed: bool,
    utf8: Utf8Validator,
    /// The assembled message, when a hook reads messages.
    message: Vec<u8>,
    /// Whether frames are sent on; false once the other side is gone or closed by us.
    delivering: bool,
    /// Stop delivering at the next frame boundary (the stream must not be cut mid-frame).
    stop_at_boundary: bool,
    /// Messages are assembled and re-framed, never streamed: a plugin reads them, or the
    /// gateway terminates permessage-deflate on this link.
    reads_messages: bool,
    /// Inflates compressed messages from the source (permessage-deflate terminated here).
    /// Boxed, like `deflater`: most connections have neither, and an idle connection's
    /// relay should not carry their ~340 bytes inline.
    inflater: Option<Box<Inflater>>,
    /// Compresses messages toward the destination.
    deflater: Option<Box<Deflater>>,
    /// Messages shorter than this go to the destination uncompressed even with a deflater:
    /// deflate's framing makes tiny messages bigger and costs CPU for nothing.
    compress_min: usize,
    /// Bytes waiting to be written to the other side, and how many are written already.
    pub out: Vec<u8>,
    pub out_written: usize,
    /// The gateway's own frames for the other side, queued until `out` is at a frame boundary.
    pub pending: Vec<u8>,
    /// Frames the gateway made itself (pongs, pings, replies, closes) are in `out` or
    /// `pending`: the relay reads no more from this link's destination until they are
    /// written, so a peer that provokes them without reading cannot grow them.
    own_frames_queued: bool,
    /// A close frame from the source is not forwarded: the relay answers the destination
    /// with a close of its own (it failed the destination and waits for this side's close).
    hold_close: bool,
    /// Close frames from the source with 1001, 1011 or 1012 are not forwarded: the relay
    /// may move the connection to another server instead (see `relay::reattach`).
    keep_restart_closes: bool,
    /// A keepalive ping was sent to this link's source and no pong has come yet.
    pub awaiting_pong: bool,
    pub messages: u64,
    pub bytes: u64,
}

const KEEPALIVE_PAYLOAD: &[u8] = b"wasmgate-keepalive";

impl Link {
    pub fn new(from: Side, rules: LinkRules, reads_messages: bool) -> Link {
        Link {
            from,
            rules,
            stop_at_boundary: false,
            reads_messages,
            inflater: None,
            deflater: None,
            compress_min: 0,
            remaining: 0,
            mask: None,
            payload_offset: 0,
            frame_fin: false,
            in_message: false,
            message_kind: DataKind::Binary,
            message_len: 0,
            message_compressed: false,
            utf8: Utf8Validator::default(),
            message: Vec::new(),
            delivering: true,
            out: Vec::new(),
            out_written: 0,
            pending: Vec::new(),
            own_frames_queued: false,
            hold_close: false,
            keep_restart_closes: false,
            awaiting_pong: false,
            messages: 0,
            bytes: 0,
        }
    }

    /// Terminates permessage-deflate on this link: `inflater` for compressed messages from
    /// the source, `deflater` for messages to the destination. Either makes the link
    /// assemble messages.
    pub fn with_compression(mut self, inflater: Option<Box<Inflater>>, deflater: Option<Box<Deflater>>) -> Link {
        self.reads_messages |= inflater.is_some() || deflater.is_some();
        self.inflater = inflater;
        self.deflater = deflater;
        self
    }

    /// Sends messages shorter than `bytes` uncompressed even when the destination
    /// negotiated compression.
    pub fn compress_from(mut self, bytes: usize) -> Link {
        self.compress_min = bytes;
        self
    }

    /// Keeps close frames from the source that say "server going away" (1001, 1011, 1012)
    /// for the relay to act on instead of forwarding them.
    pub fn keep_restart_closes(mut self, keep: bool) -> Link {
        self.keep_restart_closes = keep;
        self
    }

    /// Whether a close with `code` from the source was kept, not forwarded.
    pub fn keeps_close(&self, code: u16) -> bool {
        self.keep_restart_closes && matches!(code, code::GOING_AWAY | code::INTERNAL_ERROR | code::SERVICE_RESTART)
    }

    /// Takes what was queued for the destination and not wholly written, from the start of
    /// the frame being written, and forgets the gateway's own frames for it: the destination
    /// is being replaced, and a frame it got only part of goes whole to the next one.
    pub fn take_unsent(&mut self) -> Vec<u8> {
        let mut start = 0;
        while start < self.out.len() {
            let end = match FrameHeader::parse(&self.out[start..], true) {
                Ok(Some(h)) => start + h.header_len + h.payload_len as usize,
                _ => break,
            };
            if end > self.out_written {
                break;
            }
            start = end;
        }
        let unsent = self.out[start.min(self.out.len())..].to_vec();
        self.out.clear();
        self.out_written = 0;
        self.pending.clear();
        self.own_frames_queued = false;
        unsent
    }

    /// Queues whole frames (from `take_unsent`) or a data message for the destination, in
    /// order, behind what is queued.
    pub fn queue_frames(&mut self, frames: &[u8]) {
        self.ensure_out();
        self.out.extend_from_slice(frames);
    }

    /// Queues a data message for the destination as one frame (a replayed message).
    pub fn queue_data(&mut self, kind: DataKind, payload: &[u8]) {
        let opcode = if kind == DataKind::Text { OpCode::Text } else { OpCode::Binary };
        let mask = self.dest_mask();
        self.ensure_out();
        write_frame(&mut self.out, opcode, true, payload, mask);
    }

    /// True while the output stands between a frame's header and its last payload byte:
    /// nothing may be inserted there.
    pub fn mid_frame(&self) -> bool {
        self.delivering && !self.reads_messages && self.remaining > 0
    }

    pub fn delivering(&self) -> bool {
        self.delivering
    }

    /// Stops sending frames on, at once or at the end of the frame being streamed.
    pub fn stop_delivering(&mut self) {
        if self.mid_frame() {
            self.stop_at_boundary = true;
        } else {
            self.delivering = false;
        }
    }

    pub fn has_output(&self) -> bool {
        self.out_written < self.out.len()
    }

    /// Gateway-made frames toward the destination are not all written yet. Frames still
    /// waiting for a frame boundary count only past a few KiB: a keepalive ping behind a
    /// large streamed frame must not stop the destination from being read (its peer may be
    /// blocked writing to us until we read it).
    pub fn holds_own_frames(&self) -> bool {
        const PENDING_ALLOWANCE: usize = 4096;
        self.own_frames_queued || self.pending.len() > PENDING_ALLOWANCE
    }

    /// Keeps a close frame from the source from being forwarded (see `hold_close`).
    pub fn hold_close(&mut self) {
        self.hold_close = true;
    }

    /// A message is being assembled (for plugins or deflate): its bytes are held in memory
    /// until its last frame arrives.
    pub fn assembling(&self) -> bool {
        self.reads_messages && self.in_message
    }

    /// Moves queued gateway frames into `out` if the stream is at a frame boundary.
    pub fn flush_pending(&mut self) {
        if !self.pending.is_empty() && !self.mid_frame() {
            self.own_frames_queued = true;
            self.ensure_out();
            self.out.extend_from_slice(&self.pending);
            self.pending.clear();
        }
    }

    /// Queues a frame the gateway itself sends to this link's destination.
    pub fn queue_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let mask = self.dest_mask();
        write_frame(self.own_frame_buffer(), opcode, true, payload, mask);
        self.flush_pending();
    }

    /// Where a frame of the gateway's own goes: straight into `out` at a frame boundary
    /// (most of the time: no buffer of its own to allocate), else into `pending` until one.
    fn own_frame_buffer(&mut self) -> &mut Vec<u8> {
        if self.pending.is_empty() && !self.mid_frame() {
            self.own_frames_queued = true;
            self.ensure_out();
            &mut self.out
        } else {
            &mut self.pending
        }
    }

    /// Queues a data message the gateway sends to this link's destination (a plugin's
    /// reply), compressed when the destination negotiated compression.
    pub fn queue_message(&mut self, opcode: OpCode, payload: &[u8]) {
        let mask = self.dest_mask();
        let compressed = self.deflater.as_mut().map(|deflater| {
            let mut compressed = Vec::with_capacity(payload.len() / 2 + 16);
            deflater.compress(payload, &mut compressed);
            compressed
        });
        match compressed {
            Some(compressed) => write_compressed_frame(self.own_frame_buffer(), opcode, &compressed, mask),
            None => write_frame(self.own_frame_buffer(), opcode, true, payload, mask),
        }
        self.flush_pending();
    }

    /// Queues a keepalive ping for this link's *source*, via `toward_source` (the other link).
    pub fn ping_source(&mut self, toward_source: &mut Link) {
        self.awaiting_pong = true;
        toward_source.queue_frame(OpCode::Ping, KEEPALIVE_PAYLOAD);
    }

    /// Frames toward the upstream are masked (we are its client); frames to the client are not.
    fn dest_mask(&self) -> Option<[u8; 4]> {
        (self.from == Side::Client).then(rand::random)
    }

    /// Processes `input` from the start. Returns how many bytes were consumed and the event
    /// that stopped processing, if any. Unconsumed bytes (a partial header or control frame,
    /// or input held back while `toward_source` holds the gateway's own frames) must be
    /// offered again, with more data behind them or once those frames are written.
    pub fn process(
        &mut self,
        input: &mut [u8],
        hook: Option<&dyn MessageHook>,
        toward_source: &mut Link,
    ) -> (usize, Option<LinkEvent>) {
        let mut pos = 0;
        while pos < input.len() {
            if self.remaining > 0 {
                let take = (self.remaining as usize).min(input.len() - pos);
                let last = take as u64 == self.remaining && self.frame_fin;
                let chunk = &mut input[pos..pos + take];
                if let Some(event) = self.payload_chunk(chunk, last, hook, toward_source) {
                    return (pos + take, Some(event));
                }
                pos += take;
                continue;
            }
            if toward_source.holds_own_frames() {
                // What the gateway answered the source (a reply, pongs) must reach it before
                // more of its input is taken: the relay resumes this input once written.
                break;
            }
            let header = match FrameHeader::parse(&input[pos..], self.rules.allow_rsv1) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(side = ?self.from, error = %e, "bad frame header");
                    return (pos, Some(self.fail(code::PROTOCOL_ERROR, "bad frame header")));
                }
            };
            if header.mask.is_some() != self.rules.expect_masked {
                return (pos, Some(self.fail(code::PROTOCOL_ERROR, "wrong masking")));
            }
            if header.opcode.is_control() {
                let total = header.header_len + header.payload_len as usize;
                if input.len() - pos < total {
                    break;
                }
                let frame = &mut input[pos..pos + total];
                let event = self.control_frame(header, frame, toward_source);
                pos += total;
                if event.is_some() {
                    return (pos, event);
                }
                continue;
            }
            if let Err(event) = self.data_header(&header) {
                return (pos, Some(event));
            }
            if self.delivering && !self.reads_messages {
                self.ensure_out();
                self.out.extend_from_slice(&input[pos..pos + header.header_len]);
            }
            pos += header.header_len;
            if header.payload_len == 0 {
                if let Some(event) = self.payload_chunk(&mut [], header.fin, hook, toward_source) {
                    return (pos, Some(event));
                }
            }
        }
        (pos, None)
    }

    /// Checks a data frame's header against the message in progress.
    fn data_header(&mut self, h: &FrameHeader) -> Result<(), LinkEvent> {
        match (h.opcode, self.in_message) {
            (OpCode::Continuation, false) => {
                return Err(self.fail(code::PROTOCOL_ERROR, "continuation without a message"))
            }
            (OpCode::Continuation, true) => {
                if h.rsv1 {
                    return Err(self.fail(code::PROTOCOL_ERROR, "RSV1 on a continuation frame"));
                }
            }
            (_, true) => return Err(self.fail(code::PROTOCOL_ERROR, "new message inside a fragmented one")),
            (_, false) if h.rsv1 && self.reads_messages && self.inflater.is_none() => {
                return Err(self.fail(code::PROTOCOL_ERROR, "compressed message without permessage-deflate"))
            }
            (op, false) => {
                self.in_message = true;
                self.message_kind = if op == OpCode::Text { DataKind::Text } else { DataKind::Binary };
                self.message_len = 0;
                self.message_compressed = h.rsv1;
                self.utf8.reset();
            }
        }
        self.message_len += h.payload_len;
        if self.message_len > self.rules.max_message_size {
            return Err(self.fail(code::TOO_BIG, "message too big"));
        }
        self.remaining = h.payload_len;
        self.mask = h.mask;
        self.payload_offset = 0;
        self.frame_fin = h.fin;
        self.bytes += h.payload_len;
        Ok(())
    }

    /// Handles payload bytes of the current data frame; `last` marks the message's end.
    fn payload_chunk(
        &mut self,
        chunk: &mut [u8],
        last: bool,
        hook: Option<&dyn MessageHook>,
        toward_source: &mut Link,
    ) -> Option<LinkEvent> {
        // Compressed text is checked once inflated, in `finish_message`.
        let check_text = self.rules.validate_utf8
            && self.message_kind == DataKind::Text
            && !self.message_compressed;
        if check_text || self.reads_messages {
            if let Some(key) = self.mask {
                apply_mask(chunk, key, self.payload_offset);
            }
            if check_text && !self.utf8.feed(chunk, last) {
                return Some(self.fail(code::INVALID_PAYLOAD, "invalid UTF-8 in a text message"));
            }
            if self.reads_messages {
                if self.message.capacity() == 0 {
                    self.message = super::pool::take();
                }
                self.message.extend_from_slice(chunk);
            } else if let Some(key) = self.mask {
                // Restore the sender's masking: the bytes go on exactly as they came.
                apply_mask(chunk, key, self.payload_offset);
            }
        }
        if self.delivering && !self.reads_messages {
            self.ensure_out();
            self.out.extend_from_slice(chunk);
        }
        self.payload_offset += chunk.len();
        self.remaining -= chunk.len() as u64;
        if self.remaining == 0 && self.frame_fin {
            self.in_message = false;
            self.messages += 1;
            if self.reads_messages {
                return self.finish_message(hook, toward_source);
            }
        }
        if self.remaining == 0 {
            if self.stop_at_boundary {
                self.delivering = false;
            }
            self.flush_pending();
        }
        None
    }

    /// A whole message is assembled: inflate it if it came compressed, hand it to the
    /// plugin chain (if any), and carry out the decision.
    fn finish_message(&mut self, hook: Option<&dyn MessageHook>, toward_source: &mut Link) -> Option<LinkEvent> {
        let mut payload = std::mem::take(&mut self.message);
        if self.message_compressed {
            let inflater = self.inflater.as_mut().expect("RSV1 is accepted only with an inflater");
            let mut plain = Vec::with_capacity(payload.len() * 2);
            if let Err(e) = inflater.decompress(&payload, &mut plain) {
                return Some(self.fail(e.close_code(), "permessage-deflate: message too big or corrupt"));
            }
            if self.message_kind == DataKind::Text && std::str::from_utf8(&plain).is_err() {
                return Some(self.fail(code::INVALID_PAYLOAD, "invalid UTF-8 in a text message"));
            }
            payload = plain;
        }
        let opcode = if self.message_kind == DataKind::Text { OpCode::Text } else { OpCode::Binary };
        let action = match hook {
            _ if !self.delivering => MessageAction::Drop,
            Some(hook) => hook.on_message(self.from, self.message_kind, &payload),
            None => MessageAction::FORWARD,
        };
        let event = match action {
            MessageAction::Send { payload: replaced, compress } => {
                self.emit(opcode, replaced.as_deref().unwrap_or(&payload), compress);
                None
            }
            MessageAction::Drop => None,
            MessageAction::Reply(reply) => {
                toward_source.queue_message(opcode, &reply);
                None
            }
            MessageAction::Close(code, reason) => Some(LinkEvent::HookClose { code, reason }),
        };
        // Keep the buffer's capacity for the next message only if it is small.
        self.message = payload;
        self.message.clear();
        if self.message.capacity() > 64 << 10 {
            self.message = Vec::new();
        }
        self.flush_pending();
        event
    }

    /// Writes a whole data message toward the destination as one frame, compressed when
    /// the destination negotiated compression, `compress` allows it and it is big enough.
    /// An uncompressed message (RSV1 clear) leaves the deflate context as it was.
    fn emit(&mut self, opcode: OpCode, payload: &[u8], compress: bool) {
        let mask = self.dest_mask();
        self.ensure_out();
        match &mut self.deflater {
            Some(deflater) if compress && payload.len() >= self.compress_min => {
                let mut compressed = Vec::with_capacity(payload.len() / 2 + 16);
                deflater.compress(payload, &mut compressed);
                write_compressed_frame(&mut self.out, opcode, &compressed, mask);
            }
            _ => write_frame(&mut self.out, opcode, true, payload, mask),
        }
    }

    fn control_frame(
        &mut self,
        h: FrameHeader,
        frame: &mut [u8],
        toward_source: &mut Link,
    ) -> Option<LinkEvent> {
        let (head, payload) = frame.split_at_mut(h.header_len);
        if let Some(key) = h.mask {
            apply_mask(payload, key, 0);
        }
        match h.opcode {
            OpCode::Close => {
                let code = match close::validate_payload(payload) {
                    Ok(code) => code,
                    Err(code) => return Some(self.fail(code, "invalid close frame")),
                };
                if self.delivering && !self.hold_close && !self.keeps_close(code) {
                    self.forward_control(h, head, payload);
                }
                Some(LinkEvent::Closed { code })
            }
            OpCode::Ping => {
                if self.delivering {
                    self.forward_control(h, head, payload);
                } else {
                    // Nobody behind us to answer: answer ourselves.
                    toward_source.queue_frame(OpCode::Pong, payload);
                }
                None
            }
            OpCode::Pong => {
                // Our keepalive's answer stops here; any other pong goes on.
                if self.awaiting_pong && payload == KEEPALIVE_PAYLOAD {
                    self.awaiting_pong = false;
                } else if self.delivering {
                    self.forward_control(h, head, payload);
                }
                None
            }
            _ => unreachable!("data opcodes are not control frames"),
        }
    }

    /// Sends a control frame on as it came (restoring its mask).
    fn forward_control(&mut self, h: FrameHeader, head: &[u8], payload: &mut [u8]) {
        if let Some(key) = h.mask {
            apply_mask(payload, key, 0);
        }
        self.ensure_out();
        self.out.extend_from_slice(head);
        self.out.extend_from_slice(payload);
    }

    fn fail(&self, code: u16, reason: &'static str) -> LinkEvent {
        LinkEvent::Failed { code, reason }
    }

    /// Drops written output; returns true when everything queued has been written.
    pub fn written(&mut self, n: usize) -> bool {
        self.out_written += n;
        if self.out_written >= self.out.len() {
            self.out.clear();
            self.out_written = 0;
            self.own_frames_queued = !self.pending.is_empty();
            if self.out.capacity() > super::READ_CHUNK * 2 {
                self.out = Vec::new();
            }
            return true;
        }
        false
    }

    /// Frees compression state a quiet connection does not need (only possible without
    /// context takeover). Called from the relay's timer, not per message: rebuilding the
    /// state costs more than the message itself.
    pub fn release_codecs(&mut self) {
        if !self.in_message {
            if let Some(inflater) = &mut self.inflater {
                inflater.release();
            }
        }
        if let Some(deflater) = &mut self.deflater {
            deflater.release();
        }
    }

    /// Output goes into a buffer from the per-thread pool, taken when there is something to
    /// write and given back once it is written: no allocation per message, and none held
    /// while idle. Messages assembled for plugins use the pool the same way.
    fn ensure_out(&mut self) {
        if self.out.capacity() == 0 {
            self.out = super::pool::take();
        }
    }

    /// Releases buffers an idle connection does not need.
    pub fn shrink_when_idle(&mut self) {
        if self.out.is_empty() && self.out.capacity() > 0 {
            super::pool::give(std::mem::take(&mut self.out));
        }
        if self.message.is_empty() && self.message.capacity() > 0 && !self.in_message {
            super::pool::give(std::mem::take(&mut self.message));
        }
    }
}

/// A link's buffers go back to this thread's pool when it is dropped, written or not: a
/// connection that ends with output it can no longer deliver (its client reset) would
/// otherwise free a pool buffer, and the next connection's read allocate one.
impl Drop for Link {
    fn drop(&mut self) {
        for buf in [std::mem::take(&mut self.out), std::mem::take(&mut self.message)] {
            if buf.capacity() > 0 {
                super::pool::give(buf);
            }
        }
    }
}

/// A single-frame compressed message: RSV1 set on its (only) frame.
fn write_compressed_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
    let header = FrameHeader { fin: true, rsv1: true, opcode, mask, payload_len: payload.len() as u64, header_len: 0 };
    header.write(out);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> LinkRules {
        LinkRules { expect_masked: true, validate_utf8: true, allow_rsv1: false, max_message_size: 1000 }
    }

    fn masked(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, opcode, fin, payload, Some([1, 2, 3, 4]));
        v
    }

    fn run(link: &mut Link, other: &mut Link, mut bytes: Vec<u8>) -> (usize, Option<LinkEvent>) {
        link.process(&mut bytes, None, other)
    }

    #[test]
    fn frames_pass_byte_for_byte_even_when_split() {
        let mut wire = masked(OpCode::Text, false, "héllo ".as_bytes());
        wire.extend(masked(OpCode::Ping, true, b"p"));
        wire.extend(masked(OpCode::Continuation, true, "wörld".as_bytes()));
        for cut in 0..wire.len() {
            let mut link = Link::new(Side::Client, rules(), false);
            let mut other = Link::new(Side::Upstream, rules(), false);
            let mut first = wire[..cut].to_vec();
            let (used, ev) = link.process(&mut first, None, &mut other);
            assert_eq!(ev, None);
            let mut rest = wire[used..].to_vec();
            let (used2, ev) = link.process(&mut rest, None, &mut other);
            assert_eq!((used2, ev), (wire.len() - used, None), "cut {cut}");
            assert_eq!(link.out, wire, "cut {cut}");
        }
    }

    #[test]
    fn protocol_errors_have_the_right_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (masked(OpCode::Continuation, true, b"x"), 1002),
            (masked(OpCode::Text, true, &[0xFF]), 1007),
            (masked(OpCode::Binary, true, &[0; 1001]), 1009),
            (masked(OpCode::Close, true, &[0x03]), 1002),
            ({
                let mut v = Vec::new();
                write_frame(&mut v, OpCode::Text, true, b"unmasked", None);
                v
            }, 1002),
        ];
        for (wire, expected) in cases {
            let mut link = Link::new(Side::Client, rules(), false);
            let mut other = Link::new(Side::Upstream, rules(), false);
            let (_, ev) = run(&mut link, &mut other, wire);
            assert!(matches!(ev, Some(LinkEvent::Failed { code, .. }) if code == expected), "{ev:?}");
        }
    }

    #[test]
    fn keepalive_pong_is_swallowed() {
        let mut link = Link::new(Side::Client, rules(), false);
        let mut other = Link::new(Side::Upstream, rules(), false);
        link.ping_source(&mut other);
        assert!(!other.out.is_empty(), "ping queued toward the client");
        let queued = other.out.len();
        other.written(queued);
        let (_, ev) = run(&mut link, &mut other, masked(OpCode::Pong, true, KEEPALIVE_PAYLOAD));
        assert_eq!(ev, None);
        assert!(!link.awaiting_pong);
        assert!(link.out.is_empty());
    }

    struct ReplyBig;
    impl MessageHook for ReplyBig {
        fn on_message(&self, _: Side, _: DataKind, _: &[u8]) -> MessageAction {
            MessageAction::Reply(vec![b'x'; 1 << 20])
        }
    }

    #[test]
    fn input_waits_while_the_gateways_own_frames_to_its_source_are_unwritten() {
        let mut link = Link::new(Side::Client, rules(), true);
        let mut other = Link::new(Side::Upstream, rules(), false);
        let mut wire = masked(OpCode::Text, true, b"a");
        wire.extend(masked(OpCode::Text, true, b"b"));
        let one = wire.len() / 2;
        // The first message's reply is queued; the second waits for it to be written.
        let (used, ev) = link.process(&mut wire, Some(&ReplyBig), &mut other);
        assert_eq!((used, ev), (one, None));
        assert!(other.holds_own_frames());
        let queued = other.out.len();
        assert!(!other.written(queued - 1) && other.holds_own_frames(), "partly written still holds");
        assert!(other.written(1) && !other.holds_own_frames());
        let (used, ev) = link.process(&mut wire[one..], Some(&ReplyBig), &mut other);
        assert_eq!((used, ev), (one, None));
    }

    struct Upper;
    impl MessageHook for Upper {
        fn on_message(&self, _: Side, _: DataKind, payload: &[u8]) -> MessageAction {
            MessageAction::Send { payload: Some(payload.to_ascii_uppercase()), compress: true }
        }
    }

    #[test]
    fn hooks_see_whole_unmasked_messages() {
        let mut link = Link::new(Side::Upstream, LinkRules { expect_masked: false, ..rules() }, true);
        let mut other = Link::new(Side::Client, rules(), false);
        let mut wire = Vec::new();
        write_frame(&mut wire, OpCode::Text, false, b"ab", None);
        write_frame(&mut wire, OpCode::Continuation, true, b"cd", None);
        let (used, ev) = link.process(&mut wire, Some(&Upper), &mut other);
        assert_eq!((used, ev), (wire.len(), None));
        let mut expected = Vec::new();
        write_frame(&mut expected, OpCode::Text, true, b"ABCD", None);
        assert_eq!(link.out, expected);
    }

    #[test]
    fn the_gateways_own_frames_wait_for_the_frame_being_streamed() {
        let mut link = Link::new(Side::Client, rules(), false);
        let mut other = Link::new(Side::Upstream, rules(), false);
        // Part of a data frame is on its way to the upstream...
        let wire = masked(OpCode::Binary, true, &[9; 100]);
        let (used, ev) = run(&mut link, &mut other, wire[..40].to_vec());
        assert_eq!((used, ev), (40, None));
        // ...so a close of the gateway's waits for the rest of it,
        link.queue_frame(OpCode::Close, &close::payload(code::GOING_AWAY, "bye"));
        assert_eq!(link.out.len(), 40, "nothing is inserted into a frame");
        run(&mut link, &mut other, wire[40..].to_vec());
        assert_eq!(&link.out[..wire.len()], &wire[..]);
        let close = FrameHeader::parse(&link.out[wire.len()..], true).unwrap().unwrap();
        assert_eq!((close.opcode, close.payload_len), (OpCode::Close, 5));
        // and at a frame boundary, one goes straight behind what is queued.
        let queued = link.out.len();
        link.queue_frame(OpCode::Ping, b"p");
        assert!(link.pending.is_empty() && link.out.len() > queued && link.holds_own_frames());
    }

    #[test]
    fn a_dropped_links_unwritten_output_goes_back_to_the_pool() {
        let mut link = Link::new(Side::Client, rules(), false);
        link.queue_frame(OpCode::Close, &close::payload(code::GOING_AWAY, "client went away"));
        let buffer = link.out.as_ptr();
        // Its destination is gone: the close is never written.
        drop(link);
        // Had it been freed, the allocator would hand its block to this one.
        let same_size = std::hint::black_box(Vec::<u8>::with_capacity(super::super::READ_CHUNK + 256));
        let again = super::super::pool::take();
        assert_eq!(again.as_ptr(), buffer);
        drop(same_size);
    }
}
