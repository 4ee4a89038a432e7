//! The permessage-deflate payload transform (RFC 7692 §7.2), one [`Deflater`] and one
//! [`Inflater`] per direction of a connection.
//!
//! - Compressing a message: raw DEFLATE, then a sync flush, whose trailing empty stored
//!   block `00 00 ff ff` is stripped (§7.2.1).
//! - Decompressing: the payload, then `00 00 ff ff` appended, inflated (§7.2.2), with a
//!   hard limit on the *inflated* size, so a small payload cannot make the gateway
//!   allocate gigabytes (the limit is checked as output is produced, never after).
//!
//! zlib state is big (the deflater's is ~200–370 KiB with zlib-rs, the inflater's ~40 KiB),
//! so it is allocated on the first message, not when the connection opens, and
//! [`Deflater::release`] / [`Inflater::release`] free it between messages when
//! no_context_takeover makes it disposable.
//!
//! Window bits 8: neither zlib nor zlib-rs compresses raw deflate with a 256-byte window,
//! so an agreed 8 compresses with 9. zlib never emits a match distance over
//! `window - MIN_LOOKAHEAD` (512 - 262 = 250), so the stream is valid for a peer that
//! inflates with 256 bytes. This is what Node's zlib binding does; a test checks it with C
//! zlib's inflater at 8 bits (through `tests/python/deflate_interop.py`). Inflating, 8 is
//! read with 9, which accepts all that 8 does. (zlib-rs's inflater keeps a 32 KiB window
//! whatever the bits, so it accepts distances beyond the agreed window: lenient, harmless.)

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::negotiate::CodecParams;

/// What §7.2.1 strips and §7.2.2 appends: the empty stored block a sync flush ends with.
pub const TRAILER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The default compression level: 1 is zlib's fastest; see `benches/deflate.rs` for what
/// higher levels cost and save on JSON.
pub const DEFAULT_LEVEL: u32 = 1;

/// Output is produced in steps of at most this many bytes.
const STEP: usize = 64 * 1024;

/// zlib's window bits for an agreed value: 8 is done with 9 (see the module docs).
fn zlib_window_bits(agreed: u8) -> u8 {
    agreed.clamp(9, 15)
}

/// Compresses the messages of one direction.
pub struct Deflater {
    params: CodecParams,
    level: Compression,
    /// Allocated on the first message.
    state: Option<Compress>,
    /// A message is in progress (parts given without `fin`).
    in_message: bool,
    /// no_context_takeover: the state holds a finished message and must be reset before
    /// the next one.
    stale: bool,
}

impl Deflater {
    /// A deflater at [`DEFAULT_LEVEL`]; allocates nothing until the first message.
    pub fn new(params: CodecParams) -> Deflater {
        Deflater::with_level(params, DEFAULT_LEVEL)
    }

    /// A deflater at zlib level `level` (0..=9; 0 stores without compressing).
    pub fn with_level(params: CodecParams, level: u32) -> Deflater {
        Deflater { params, level: Compression::new(level.min(9)), state: None, in_message: false, stale: false }
    }

    pub fn params(&self) -> CodecParams {
        self.params
    }

    /// Compresses a whole message: appends the payload to send (with RSV1 on its first
    /// frame) to `out`.
    pub fn compress(&mut self, message: &[u8], out: &mut Vec<u8>) {
        self.compress_part(message, true, out);
    }

    /// Compresses part of a message, for messages streamed in pieces; `fin` marks the last
    /// part. Appends the compressed bytes ready so far (often none before `fin`: zlib
    /// buffers up to a block); each call's output may go out as one frame's payload.
    pub fn compress_part(&mut self, input: &[u8], fin: bool, out: &mut Vec<u8>) {
        let (level, bits) = (self.level, zlib_window_bits(self.params.window_bits));
        let state = self.state.get_or_insert_with(|| Compress::new_with_window_bits(level, false, bits));
        if !self.in_message && self.stale {
            state.reset();
            self.stale = false;
        }
        self.in_message = !fin;
        let flush = if fin { FlushCompress::Sync } else { FlushCompress::None };
        let start = out.len();
        let mut pos = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve((input.len() - pos) / 2 + 256);
            }
            let before = state.total_in();
            let status = state
                .compress_vec(&input[pos..], out, flush)
                .expect("deflate cannot fail with valid parameters");
            pos += (state.total_in() - before) as usize;
            let out_full = out.len() == out.capacity();
            if pos == input.len() && (!out_full || status == Status::BufError) {
                break;
            }
        }
        if fin {
            // A sync flush ends with the empty stored block, written whole by this call.
            if out[start..].ends_with(&TRAILER) {
                out.truncate(out.len() - TRAILER.len());
            } else {
                // Nothing new to flush (an empty message right after another): zlib writes
                // nothing. The stream is byte-aligned, so the RFC's empty message `00` (an
                // empty stored block once the trailer is appended) fits.
                debug_assert_eq!(out.len(), start, "a sync flush ends with 00 00 ff ff");
                out.push(0x00);
            }
            if self.params.no_context_takeover {
                self.stale = true;
            }
        }
    }

    /// Frees the zlib state if the next message does not need it: between messages, with
    /// no_context_takeover (with context takeover the state *is* the shared window).
    /// The next message allocates it again. Returns whether memory was freed.
    pub fn release(&mut self) -> bool {
        if self.state.is_some() && !self.in_message && self.params.no_context_takeover {
            self.state = None;
            self.stale = false;
            return true;
        }
        false
    }

    /// Whether the zlib state is allocated.
    pub fn is_allocated(&self) -> bool {
        self.state.is_some()
    }
}

/// Why a compressed message cannot be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// The message inflates past the size limit: close with 1009.
    TooBig,
    /// Not a valid DEFLATE stream (or a distance beyond the agreed window): close with
    /// 1007, as Node's `ws` does.
    Corrupt,
}

impl InflateError {
    /// The close code to fail the sender's connection with.
    pub fn close_code(self) -> u16 {
        match self {
            InflateError::TooBig => 1009,
            InflateError::Corrupt => 1007,
        }
    }
}

impl std::fmt::Display for InflateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InflateError::TooBig => "message too big once inflated",
            InflateError::Corrupt => "invalid compressed data",
        })
    }
}

impl std::error::Error for InflateError {}

/// How far [`Inflater::decompress_part`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inflated {
    /// All the input is inflated; with `fin`, the message is complete.
    Done,
    /// The output budget is used up: drain `out`, then call again with
    /// `input[consumed..]` (possibly empty) and the same `fin`.
    OutputFull { consumed: usize },
}

/// Decompresses the messages of one direction.
pub struct Inflater {
    params: CodecParams,
    max_message_size: u64,
    /// Allocated on the first message.
    state: Option<Decompress>,
    /// Bytes inflated so far for the message in progress.
    produced: u64,
    /// Bytes of [`TRAILER`] fed after the message's last byte.
    trailer_fed: usize,
    /// The message in progress had compressed bytes.
    had_input: bool,
    in_message: bool,
    /// no_context_takeover: reset before the next message.
    stale: bool,
}

impl Inflater {
    /// An inflater refusing messages that inflate past `max_message_size` bytes;
    /// allocates nothing until the first message.
    pub fn new(params: CodecParams, max_message_size: u64) -> Inflater {
        Inflater {
            params,
            max_message_size,
            state: None,
            produced: 0,
            trailer_fed: 0,
            had_input: false,
            in_message: false,
            stale: false,
        }
    }

    pub fn params(&self) -> CodecParams {
        self.params
    }

    /// Decompresses a whole message's payload (its frames' payloads, unmasked, joined),
    /// appending the message to `out`.
    pub fn decompress(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), InflateError> {
        match self.decompress_part(payload, true, out, usize::MAX)? {
            Inflated::Done => Ok(()),
            Inflated::OutputFull { .. } => unreachable!("no budget was set"),
        }
    }

    /// Decompresses part of a message (e.g. one frame's payload, unmasked) and appends at
    /// most `budget` bytes to `out`; `fin` marks the message's last part. This lets the
    /// relay stream a compressed message without holding it inflated whole.
    ///
    /// On an error the stream cannot go on: fail the connection with
    /// [`InflateError::close_code`].
    pub fn decompress_part(
        &mut self,
        input: &[u8],
        fin: bool,
        out: &mut Vec<u8>,
        budget: usize,
    ) -> Result<Inflated, InflateError> {
        let bits = zlib_window_bits(self.params.window_bits);
        let state = self.state.get_or_insert_with(|| Decompress::new_with_window_bits(false, bits));
        if !self.in_message && self.stale {
            state.reset(false);
            self.stale = false;
        }
        self.in_message = true;
        self.had_input |= !input.is_empty();
        if fin && !self.had_input {
            // An empty payload is not a DEFLATE stream even with the trailer (a stored
            // block's header needs one more byte): take it as the empty message it is meant
            // to be, and leave the stream where it was.
            self.end_message();
            return Ok(Inflated::Done);
        }
        let mut pos = 0;
        let mut written_here = 0usize;
        loop {
            let (src, is_trailer): (&[u8], bool) = if pos < input.len() {
                (&input[pos..], false)
            } else if fin && self.trailer_fed < TRAILER.len() {
                (&TRAILER[self.trailer_fed..], true)
            } else {
                (&[], false)
            };
            // One byte over the limit is allowed out, to tell "exactly the limit" from "over".
            let allowed = (self.max_message_size + 1).saturating_sub(self.produced);
            let room = (budget - written_here).min(STEP).min(allowed.try_into().unwrap_or(usize::MAX));
            if room == 0 {
                return Ok(Inflated::OutputFull { consumed: pos });
            }
            let old = out.len();
            out.resize(old + room, 0);
            let (in_before, out_before) = (state.total_in(), state.total_out());
            let flush = if is_trailer { FlushDecompress::Sync } else { FlushDecompress::None };
            let status = state.decompress(src, &mut out[old..], flush);
            let consumed = (state.total_in() - in_before) as usize;
            let written = (state.total_out() - out_before) as usize;
            out.truncate(old + written);
            let status = status.map_err(|_| InflateError::Corrupt)?;
            if is_trailer {
                self.trailer_fed += consumed;
            } else {
                pos += consumed;
            }
            written_here += written;
            self.produced += written as u64;
            if self.produced > self.max_message_size {
                return Err(InflateError::TooBig);
            }
            if status == Status::StreamEnd {
                // A block with BFINAL set (§7.2.3.4): what follows starts a new stream, as
                // in Chromium and WebKit. The window is lost; a sender that sets BFINAL
                // cannot rely on it.
                state.reset(false);
                continue;
            }
            let out_full = written == room;
            if out_full {
                continue;
            }
            if consumed < src.len() {
                // Room left and input left, yet no progress: zlib is stuck.
                if consumed == 0 && written == 0 {
                    return Err(InflateError::Corrupt);
                }
                continue;
            }
            if pos < input.len() || (fin && self.trailer_fed < TRAILER.len()) {
                continue;
            }
            if fin {
                self.end_message();
            }
            return Ok(Inflated::Done);
        }
    }

    fn end_message(&mut self) {
        self.in_message = false;
        self.produced = 0;
        self.trailer_fed = 0;
        self.had_input = false;
        if self.params.no_context_takeover {
            self.stale = true;
        }
    }

    /// Frees the zlib state if the next message does not need it: between messages, with
    /// no_context_takeover. Returns whether memory was freed.
    pub fn release(&mut self) -> bool {
        if self.state.is_some() && !self.in_message && self.params.no_context_takeover {
            self.state = None;
            self.stale = false;
            return true;
        }
        false
    }

    /// Whether the zlib state is allocated.
    pub fn is_allocated(&self) -> bool {
        self.state.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(window_bits: u8, no_context_takeover: bool) -> CodecParams {
        CodecParams { window_bits, no_context_takeover }
    }

    /// Text-like data with repeats at every distance, and a stretch of noise.
    fn sample(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 4 {
                0 => out.extend_from_slice(b"{\"symbol\":\"BTC-USD\",\"price\":"),
                1 => out.extend_from_slice(format!("{}", x % 100_000).as_bytes()),
                2 => out.push((x >> 8) as u8),
                _ => {
                    let back = (x >> 16) as usize % out.len().max(1);
                    let len = ((x >> 40) as usize % 40).min(out.len() - back);
                    let start = out.len() - back - 1;
                    let piece = out[start.min(out.len())..(start + len).min(out.len())].to_vec();
                    out.extend_from_slice(&piece);
                }
            }
        }
        out.truncate(n);
        out
    }

    #[test]
    fn roundtrips_every_window_and_takeover_mode() {
        let messages: Vec<Vec<u8>> = vec![
            b"Hello".to_vec(),
            Vec::new(),
            sample(3000, 1),
            sample(3000, 1),
            Vec::new(),
            sample(200_000, 2),
            vec![0u8; 70_000],
            sample(10, 3),
        ];
        for bits in 8..=15 {
            for nct in [false, true] {
                let mut deflater = Deflater::new(params(bits, nct));
                let mut inflater = Inflater::new(params(bits, nct), 1 << 20);
                for (i, message) in messages.iter().enumerate() {
                    let mut wire = Vec::new();
                    deflater.compress(message, &mut wire);
                    let mut back = Vec::new();
                    inflater.decompress(&wire, &mut back).unwrap_or_else(|e| panic!("{bits} {nct} #{i}: {e}"));
                    assert_eq!(&back, message, "bits {bits} nct {nct} message {i}");
                }
            }
        }
    }

    #[test]
    fn streams_in_parts_with_small_output_budgets() {
        let message = sample(100_000, 7);
        for nct in [false, true] {
            let mut deflater = Deflater::new(params(12, nct));
            let mut inflater = Inflater::new(params(12, nct), 1 << 20);
            for _ in 0..3 {
                // Compress in 1000-byte parts, as frames.
                let frames: Vec<Vec<u8>> = message
                    .chunks(1000)
                    .enumerate()
                    .map(|(i, part)| {
                        let mut f = Vec::new();
                        deflater.compress_part(part, (i + 1) * 1000 >= message.len(), &mut f);
                        f
                    })
                    .collect();
                // Inflate frame by frame, 777 bytes of output at a time.
                let mut back = Vec::new();
                for (i, frame) in frames.iter().enumerate() {
                    let fin = i + 1 == frames.len();
                    let mut rest: &[u8] = frame;
                    loop {
                        let before = back.len();
                        match inflater.decompress_part(rest, fin, &mut back, 777).unwrap() {
                            Inflated::Done => break,
                            Inflated::OutputFull { consumed } => {
                                assert!(back.len() - before <= 777);
                                rest = &rest[consumed..];
                            }
                        }
                    }
                }
                assert_eq!(back, message);
            }
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
    }

    #[test]
    fn decodes_the_rfc_7692_examples() {
        let decode = |nct: bool, payloads: &[&str]| -> Vec<Vec<u8>> {
            let mut inflater = Inflater::new(params(15, nct), 1000);
            payloads
                .iter()
                .map(|p| {
                    let mut out = Vec::new();
                    inflater.decompress(&hex(p), &mut out).unwrap();
                    out
                })
                .collect()
        };
        // §7.2.3.1, and the same split over two frames.
        assert_eq!(decode(false, &["f2 48 cd c9 c9 07 00"]), [b"Hello"]);
        let mut inflater = Inflater::new(params(15, false), 1000);
        let mut out = Vec::new();
        assert_eq!(inflater.decompress_part(&hex("f2 48 cd"), false, &mut out, 1000), Ok(Inflated::Done));
        assert_eq!(inflater.decompress_part(&hex("c9 c9 07 00"), true, &mut out, 1000), Ok(Inflated::Done));
        assert_eq!(out, b"Hello");
        // §7.2.3.2: the second message refers to the first.
        assert_eq!(decode(false, &["f2 48 cd c9 c9 07 00", "f2 00 11 00 00"]), [b"Hello", b"Hello"]);
        // §7.2.3.3: a stored block; §7.2.3.4: BFINAL set, then more messages.
        assert_eq!(decode(false, &["00 05 00 fa ff 48 65 6c 6c 6f 00"]), [b"Hello"]);
        assert_eq!(
            decode(false, &["f3 48 cd c9 c9 07 00 00", "f2 48 cd c9 c9 07 00"]),
            [b"Hello", b"Hello"]
        );
        // §7.2.3.5: two blocks in one message.
        assert_eq!(decode(false, &["f2 48 05 00 00 00 ff ff ca c9 c9 07 00"]), [b"Hello"]);
        // An empty message: `00` (what zlib and the gateway send) or no payload at all,
        // which leaves the stream as it was.
        assert_eq!(
            decode(false, &["00", "", "f2 48 cd c9 c9 07 00", "", "f2 00 11 00 00"]),
            [&b""[..], b"", b"Hello", b"", b"Hello"]
        );
        // With no context takeover the shared-window form cannot be read.
        let mut inflater = Inflater::new(params(15, true), 1000);
        let mut out = Vec::new();
        inflater.decompress(&hex("f2 48 cd c9 c9 07 00"), &mut out).unwrap();
        assert!(inflater.decompress(&hex("f2 00 11 00 00"), &mut Vec::new()).is_err());
    }

    #[test]
    fn compresses_like_the_rfc_7692_examples() {
        let mut out = Vec::new();
        Deflater::new(params(15, false)).compress(b"Hello", &mut out);
        assert_eq!(out, hex("f2 48 cd c9 c9 07 00"));
        // The second message uses the window: much shorter (zlib writes exactly the RFC's
        // f2 00 11 00 00; any back-reference form is fine).
        let mut deflater = Deflater::new(params(15, false));
        deflater.compress(b"Hello", &mut Vec::new());
        let mut second = Vec::new();
        deflater.compress(b"Hello", &mut second);
        assert!(second.len() <= 5, "{second:02x?}");
        let mut inflater = Inflater::new(params(15, false), 100);
        inflater.decompress(&hex("f2 48 cd c9 c9 07 00"), &mut Vec::new()).unwrap();
        let mut back = Vec::new();
        inflater.decompress(&second, &mut back).unwrap();
        assert_eq!(back, b"Hello");
        // Without takeover the second message is the first one again.
        let mut deflater = Deflater::new(params(15, true));
        for _ in 0..2 {
            let mut out = Vec::new();
            deflater.compress(b"Hello", &mut out);
            assert_eq!(out, hex("f2 48 cd c9 c9 07 00"));
        }
    }

    /// Interop with Python websockets' PerMessageDeflate (tests/python/deflate_interop.py),
    /// both ways, every window and takeover mode, plus C zlib's strict inflater at the
    /// agreed window: the window-8 output (made with 9) must fit a 256-byte window. Skipped
    /// when the venv is missing (tests/setup.sh makes it).
    #[test]
    fn interoperates_with_python_websockets() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let python = root.join(".venv/bin/python");
        if !python.exists() {
            eprintln!("skipped: no {} (run tests/setup.sh)", python.display());
            return;
        }
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let unhex = |s: &str| (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect::<Vec<u8>>();
        let messages: Vec<Vec<u8>> =
            vec![b"Hello".to_vec(), Vec::new(), sample(3000, 1), sample(3000, 1), sample(40_000, 2), vec![0; 5000]];
        let mut cases = Vec::new();
        let mut expected_strict_ok = Vec::new();
        for bits in 8..=15u8 {
            for nct in [false, true] {
                let mut deflater = Deflater::new(params(bits, nct));
                let payloads: Vec<String> = messages
                    .iter()
                    .map(|m| {
                        let mut out = Vec::new();
                        deflater.compress(m, &mut out);
                        hex(&out)
                    })
                    .collect();
                cases.push(serde_json::json!({
                    "gateway_window": bits, "gateway_nct": nct,
                    "python_window": bits.max(9), "python_nct": nct,
                    "from_gateway": payloads,
                    "to_gateway": messages.iter().map(|m| hex(m)).collect::<Vec<_>>(),
                }));
                expected_strict_ok.push(true);
            }
        }
        // The strict check bites: 15-bit output claimed as 8 bits is refused.
        let mut wide = Vec::new();
        Deflater::new(params(15, false)).compress(&sample(40_000, 2), &mut wide);
        cases.push(serde_json::json!({
            "gateway_window": 8, "gateway_nct": false, "python_window": 9, "python_nct": false,
            "from_gateway": [hex(&wide)], "to_gateway": [],
        }));
        expected_strict_ok.push(false);

        let mut child = std::process::Command::new(&python)
            .arg(root.join("tests/python/deflate_interop.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let request = serde_json::json!({ "cases": cases }).to_string();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), request.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "helper failed");
        let reply: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        for (i, (case, result)) in cases.iter().zip(reply["cases"].as_array().unwrap()).enumerate() {
            let bits = case["gateway_window"].as_u64().unwrap() as u8;
            let nct = case["gateway_nct"].as_bool().unwrap();
            let to_gateway: Vec<Vec<u8>> = case["to_gateway"].as_array().unwrap().iter().map(|m| unhex(m.as_str().unwrap())).collect();
            if expected_strict_ok[i] {
                let decoded: Vec<Vec<u8>> = result["decoded"].as_array().unwrap().iter().map(|m| unhex(m.as_str().unwrap())).collect();
                assert_eq!(decoded, messages, "websockets decodes ours: bits {bits} nct {nct}");
                let strict: Vec<Vec<u8>> = result["strict"].as_array().unwrap_or_else(|| panic!("strict {bits} {nct}: {}", result["strict"]))
                    .iter().map(|m| unhex(m.as_str().unwrap())).collect();
                assert_eq!(strict, messages, "C zlib at {bits} bits decodes ours");
            } else {
                assert!(result["strict"].as_str().is_some_and(|e| e.contains("too far back")), "{}", result["strict"]);
            }
            // Ours decodes websockets' (which compresses with at least 9 bits).
            let mut inflater = Inflater::new(params(case["python_window"].as_u64().unwrap() as u8, nct), 1 << 20);
            for (payload, message) in result["encoded"].as_array().unwrap().iter().zip(&to_gateway) {
                let mut back = Vec::new();
                inflater.decompress(&unhex(payload.as_str().unwrap()), &mut back).unwrap();
                assert_eq!(&back, message, "ours decodes websockets': bits {bits} nct {nct}");
            }
        }
    }

    #[test]
    fn garbage_is_corrupt() {
        // A reserved block type; a stored block whose length check fails; a distance before
        // the start of the stream.
        for garbage in [&[0xff, 0xff, 0xff][..], &[0x07; 32], &hex("00 05 00 05 00 48 65 6c 6c 6f"), &hex("f2 00 11 00 00")] {
            let mut inflater = Inflater::new(params(15, false), 1000);
            assert_eq!(inflater.decompress(garbage, &mut Vec::new()), Err(InflateError::Corrupt), "{garbage:02x?}");
        }
    }

    #[test]
    fn bombs_stop_at_the_limit() {
        // 16 MiB of zeros compress to ~16 KiB.
        let zeros = vec![0u8; 16 << 20];
        let mut bomb = Vec::new();
        Deflater::with_level(params(15, false), 9).compress(&zeros, &mut bomb);
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        let limit = 1 << 20;
        let mut inflater = Inflater::new(params(15, false), limit);
        let mut out = Vec::new();
        assert_eq!(inflater.decompress(&bomb, &mut out), Err(InflateError::TooBig));
        assert!(out.len() as u64 <= limit + 1, "{}", out.len());
        assert!(out.capacity() <= (limit as usize + STEP) * 2, "memory stays bounded: {}", out.capacity());
        // Exactly at the limit is fine.
        let mut exact = Vec::new();
        Deflater::new(params(15, false)).compress(&zeros[..limit as usize], &mut exact);
        let mut out = Vec::new();
        Inflater::new(params(15, false), limit).decompress(&exact, &mut out).unwrap();
        assert_eq!(out.len() as u64, limit);
        // Streamed frame by frame under an output budget, the limit counts the whole
        // message, not one call.
        let mut inflater = Inflater::new(params(15, false), limit);
        let parts: Vec<&[u8]> = bomb.chunks(1000).collect();
        let mut result = Ok(Inflated::Done);
        let mut total = 0;
        'frames: for (i, part) in parts.iter().enumerate() {
            let mut rest: &[u8] = part;
            loop {
                let mut chunk = Vec::new();
                let step = inflater.decompress_part(rest, i + 1 == parts.len(), &mut chunk, 100_000);
                assert!(chunk.len() <= 100_000);
                total += chunk.len();
                match step {
                    Ok(Inflated::Done) => break,
                    Ok(Inflated::OutputFull { consumed }) => rest = &rest[consumed..],
                    Err(e) => {
                        result = Err(e);
                        break 'frames;
                    }
                }
            }
        }
        assert!(total as u64 <= limit + 1);
        assert_eq!(result, Err(InflateError::TooBig));
    }

    #[test]
    fn state_is_lazy_and_freed_with_no_context_takeover() {
        for nct in [false, true] {
            let mut deflater = Deflater::new(params(12, nct));
            let mut inflater = Inflater::new(params(12, nct), 1000);
            assert!(!deflater.is_allocated() && !inflater.is_allocated());
            let mut wire = Vec::new();
            deflater.compress(b"Hello Hello", &mut wire);
            inflater.decompress(&wire, &mut Vec::new()).unwrap();
            assert!(deflater.is_allocated() && inflater.is_allocated());
            assert_eq!(deflater.release(), nct);
            assert_eq!(inflater.release(), nct);
            assert_eq!(deflater.is_allocated(), !nct);
            // Works again after a release.
            let mut wire = Vec::new();
            deflater.compress(b"Hello again", &mut wire);
            let mut back = Vec::new();
            inflater.decompress(&wire, &mut back).unwrap();
            assert_eq!(back, b"Hello again");
        }
        // Never mid-message.
        let mut deflater = Deflater::new(params(12, true));
        deflater.compress_part(b"part", false, &mut Vec::new());
        assert!(!deflater.release());
        let mut inflater = Inflater::new(params(12, true), 100);
        inflater.decompress_part(&hex("f2 48"), false, &mut Vec::new(), 100).unwrap();
        assert!(!inflater.release());
    }
}
