//! permessage-deflate (RFC 7692): negotiation ([`negotiate`]) and the per-message codec
//! ([`codec`]). Nothing here does I/O; the relay drives it.
//!
//! # Handshake
//!
//! The connection's [`DeflatePolicy`] (window bits 8..=15, no_context_takeover) comes from
//! a plugin's `accept.compression` or the configuration, with a mode:
//!
//! - **off**: drop the client's `Sec-WebSocket-Extensions`; RSV1 stays forbidden both ways.
//! - **terminate, client side** (gateway as server):
//!   `negotiate::accept(client_values, &policy)` → `Some(Accepted { header, config, .. })`:
//!   put `header` in the 101; `config.inflater(max_message_size)` reads the client's
//!   messages and `config.deflater()` compresses those sent to it. `None`: no compression.
//! - **terminate, upstream side** (gateway as client, optional): send
//!   `negotiate::client_offer(&policy)` upstream, then
//!   `negotiate::validate_response(&negotiate::client_offers(&policy), upstream_values)`
//!   → `Ok(Some((params, config)))` as above, `Ok(None)` for plain frames, `Err` → 502.
//! - **passthrough**: forward the client's header values verbatim, then
//!   `negotiate::validate_passthrough(client_values, upstream_values)`: `Ok(Some(_))` →
//!   forward the upstream's header to the client and allow RSV1 on both links (frames are
//!   not touched); `Ok(None)` → no extension; `Err(e)` → 502 with `e` as the reason, since
//!   the client would fail the connection on that answer anyway.
//!
//! # Per message (terminate)
//!
//! One [`Inflater`] per receiving direction, one [`Deflater`] per sending direction, both
//! lazy: no zlib memory until the first compressed message.
//!
//! Receiving, a message whose first frame has RSV1 set (RSV1 on a continuation frame is a
//! 1002; RSV1 clear means an uncompressed message, delivered as is):
//! - whole message: unmask and join its frames' payloads, then
//!   `inflater.decompress(&payload, &mut plain)`;
//! - streaming: per frame, `inflater.decompress_part(chunk, fin_of_message, &mut out,
//!   budget)` and, on `Inflated::OutputFull { consumed }`, write `out` on and call again
//!   with `chunk[consumed..]` — memory stays at `budget` however large the message.
//! - `Err(e)`: fail the sender's connection with `e.close_code()` (`TooBig` → 1009,
//!   `Corrupt` → 1007). The size limit counts *inflated* bytes of the whole message, so
//!   the relay's own check of the compressed length stays as it is. Validate text as UTF-8
//!   on the inflated bytes.
//!
//! Sending: `deflater.compress(&message, &mut payload)`, then one frame with RSV1 set and
//! `payload` (or `compress_part` per fragment, RSV1 on the first frame only). A message
//! may also go uncompressed (RSV1 clear), e.g. under a size threshold (metadata
//! `compression-min-size` from the compression plugin) — this does not disturb the
//! context. Control frames are never compressed.
//!
//! Idle: `release()` frees the zlib state between messages when no_context_takeover
//! allows it (about 190–310 KiB for a deflater, 19 KiB for an inflater, resident;
//! `benches/deflate.rs` measures them). Re-allocating costs about as much as compressing
//! a small message (level 1, 15 bits, 300-byte JSON: ~8 µs with a release after each
//! message, ~4 µs without, ~1.4 µs with context takeover), so call it when a connection
//! has been quiet for a while (e.g. from the relay's timer), not after every message.

pub mod codec;
pub mod negotiate;

/// Connection metadata a handshake plugin sets (`plugins/compression` does) so that
/// messages to the client shorter than this many bytes go uncompressed.
pub const MIN_SIZE_META: &str = "compression-min-size";

pub use codec::{Deflater, InflateError, Inflated, Inflater};
pub use negotiate::{Accepted, CodecParams, DeflateConfig, DeflateParams, DeflatePolicy, NegotiationError};
