//! The RFC 6455 frame header: parse, validate and write. Nothing here touches a socket, so
//! it is tested alone.

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1 (permessage-deflate's "compressed" bit).
    pub rsv1: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header took on the wire.
    pub header_len: usize,
}

/// Why a header is not acceptable; all of these fail the connection with 1002.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    ReservedBits,
    UnknownOpcode(u8),
    FragmentedControl,
    ControlTooLong,
    NonMinimalLength,
    LengthTooLarge,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::ReservedBits => f.write_str("reserved bits set"),
            HeaderError::UnknownOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            HeaderError::FragmentedControl => f.write_str("fragmented control frame"),
            HeaderError::ControlTooLong => f.write_str("control frame payload over 125 bytes"),
            HeaderError::NonMinimalLength => f.write_str("payload length not minimally encoded"),
            HeaderError::LengthTooLarge => f.write_str("payload length has the top bit set"),
        }
    }
}

impl FrameHeader {
    /// Parses a header from the start of `buf`. `Ok(None)` means more bytes are needed.
    /// `allow_rsv1` is true when permessage-deflate was negotiated on this link.
    pub fn parse(buf: &[u8], allow_rsv1: bool) -> Result<Option<FrameHeader>, HeaderError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        if b0 & 0x30 != 0 || (rsv1 && !allow_rsv1) {
            return Err(HeaderError::ReservedBits);
        }
        let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(HeaderError::UnknownOpcode(b0 & 0x0F))?;
        let masked = b1 & 0x80 != 0;
        let (payload_len, mut header_len) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                let len = u16::from_be_bytes([buf[2], buf[3]]) as u64;
                if len < 126 {
                    return Err(HeaderError::NonMinimalLength);
                }
                (len, 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let len = u64::from_be_bytes(buf[2..10].try_into().unwrap());
                if len >> 63 != 0 {
                    return Err(HeaderError::LengthTooLarge);
                }
                if len <= 0xFFFF {
                    return Err(HeaderError::NonMinimalLength);
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        if opcode.is_control() {
            if !fin {
                return Err(HeaderError::FragmentedControl);
            }
            if payload_len > 125 {
                return Err(HeaderError::ControlTooLong);
            }
            if rsv1 {
                return Err(HeaderError::ReservedBits);
            }
        }
        let mask = if masked {
            if buf.len() < header_len + 4 {
                return Ok(None);
            }
            let key = buf[header_len..header_len + 4].try_into().unwrap();
            header_len += 4;
            Some(key)
        } else {
            None
        };
        Ok(Some(FrameHeader { fin, rsv1, opcode, mask, payload_len, header_len }))
    }

    /// Appends this header's wire form to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        let b0 = (self.fin as u8) << 7 | (self.rsv1 as u8) << 6 | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        match self.payload_len {
            n if n < 126 => out.extend_from_slice(&[b0, mask_bit | n as u8]),
            n if n <= 0xFFFF => {
                out.extend_from_slice(&[b0, mask_bit | 126]);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.extend_from_slice(&[b0, mask_bit | 127]);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
        if let Some(key) = self.mask {
            out.extend_from_slice(&key);
        }
    }
}

/// XORs `data` with the mask, `offset` bytes into the payload. Masking and unmasking are the
/// same operation.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    let mut key = key;
    key.rotate_left(offset % 4);
    let word = u32::from_ne_bytes(key);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes((&*chunk).try_into().unwrap()) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i];
    }
}

/// Appends a whole frame (header and payload) to `out`, masking it when `mask` is given.
pub fn write_frame(out: &mut Vec<u8>, opcode: OpCode, fin: bool, payload: &[u8], mask: Option<[u8; 4]>) {
    let header =
        FrameHeader { fin, rsv1: false, opcode, mask, payload_len: payload.len() as u64, header_len: 0 };
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

    #[test]
    fn roundtrips_every_length_class() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![7u8; len];
            let mut wire = Vec::new();
            write_frame(&mut wire, OpCode::Binary, true, &payload, Some([1, 2, 3, 4]));
            let h = FrameHeader::parse(&wire, false).unwrap().unwrap();
            assert_eq!(h.payload_len, len as u64);
            assert_eq!(h.mask, Some([1, 2, 3, 4]));
            let mut body = wire[h.header_len..].to_vec();
            apply_mask(&mut body, [1, 2, 3, 4], 0);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn partial_headers_ask_for_more() {
        let mut wire = Vec::new();
        write_frame(&mut wire, OpCode::Text, true, &[0; 300], Some([9; 4]));
        for cut in 0..8 {
            assert_eq!(FrameHeader::parse(&wire[..cut], false), Ok(None));
        }
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(FrameHeader::parse(&[0x83, 0], false), Err(HeaderError::UnknownOpcode(3)));
        assert_eq!(FrameHeader::parse(&[0xC1, 0], false), Err(HeaderError::ReservedBits));
        assert!(FrameHeader::parse(&[0xC1, 0], true).unwrap().is_some());
        assert_eq!(FrameHeader::parse(&[0x09, 0], false), Err(HeaderError::FragmentedControl));
        assert_eq!(FrameHeader::parse(&[0x89, 126, 0, 126], false), Err(HeaderError::ControlTooLong));
        assert_eq!(FrameHeader::parse(&[0x82, 126, 0, 5], false), Err(HeaderError::NonMinimalLength));
    }

    #[test]
    fn mask_with_offset_matches_whole_mask() {
        let key = [0xA, 0xB, 0xC, 0xD];
        let data: Vec<u8> = (0..23).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        let mut split = data.clone();
        let (a, b) = split.split_at_mut(7);
        apply_mask(a, key, 0);
        apply_mask(b, key, 7);
        assert_eq!(whole, split);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// RFC 6455 §5.2 invariants of an accepted header, and that the header is read
        /// exactly: no more bytes, no fewer, and the same bytes written back.
        fn check(buf: &[u8], allow_rsv1: bool) -> Result<(), TestCaseError> {
            let Ok(Some(h)) = FrameHeader::parse(buf, allow_rsv1) else { return Ok(()) };
            prop_assert!(buf[0] & 0x30 == 0, "RSV2/RSV3 accepted");
            prop_assert!(allow_rsv1 || !h.rsv1, "RSV1 accepted without permessage-deflate");
            if h.opcode.is_control() {
                prop_assert!(h.fin && h.payload_len <= 125 && !h.rsv1, "bad control frame {:?}", h);
            }
            prop_assert!(h.payload_len >> 63 == 0);
            let length_bytes = match h.payload_len {
                0..=125 => 0,
                126..=0xFFFF => 2,
                _ => 8,
            };
            prop_assert_eq!(h.header_len, 2 + length_bytes + if h.mask.is_some() { 4 } else { 0 }, "not minimal: {:?}", h);
            prop_assert!(h.header_len <= buf.len());
            let mut written = Vec::new();
            h.write(&mut written);
            prop_assert_eq!(&written[..], &buf[..h.header_len]);
            for cut in 0..h.header_len {
                prop_assert_eq!(FrameHeader::parse(&buf[..cut], allow_rsv1), Ok(None), "a prefix of {} bytes", cut);
            }
            Ok(())
        }

        /// Headers near the edges: every first byte, every length marker, lengths around
        /// the encoding boundaries, masked or not.
        fn near_valid() -> impl Strategy<Value = Vec<u8>> {
            let len = prop_oneof![Just(0u64), Just(125), Just(126), Just(127), Just(0xFFFF), Just(0x10000), Just(1 << 63), any::<u64>()];
            (any::<u8>(), any::<bool>(), prop::sample::select(vec![0u8, 1, 125, 126, 127]), len, any::<[u8; 4]>()).prop_map(
                |(b0, masked, marker, len, key)| {
                    let mut out = vec![b0, (masked as u8) << 7 | marker];
                    match marker {
                        126 => out.extend_from_slice(&(len as u16).to_be_bytes()),
                        127 => out.extend_from_slice(&len.to_be_bytes()),
                        _ => {}
                    }
                    if masked {
                        out.extend_from_slice(&key);
                    }
                    out
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]

            #[test]
            fn random_headers_never_panic(buf in prop::collection::vec(any::<u8>(), 0..20), rsv1 in any::<bool>()) {
                check(&buf, rsv1)?;
            }

            #[test]
            fn edge_headers_obey_rfc_6455(buf in near_valid(), rsv1 in any::<bool>()) {
                check(&buf, rsv1)?;
            }
        }
    }
}
