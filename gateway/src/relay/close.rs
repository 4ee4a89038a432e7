//! Close codes (RFC 6455 §7.4): which may appear on the wire, and close payload validation.

/// Well-known codes the gateway sends itself.
pub mod code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const SERVICE_RESTART: u16 = 1012;
    /// Not sent on the wire: the connection ended without a close frame.
    pub const ABNORMAL: u16 = 1006;
    /// Not sent on the wire: a close frame without a code.
    pub const NO_STATUS: u16 = 1005;
}

/// Whether a received close frame may carry this code.
pub fn is_valid_on_wire(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Checks a close frame's payload. Returns the code (1005 when empty) or the code to fail
/// the connection with.
pub fn validate_payload(payload: &[u8]) -> Result<u16, u16> {
    match payload.len() {
        0 => Ok(code::NO_STATUS),
        1 => Err(code::PROTOCOL_ERROR),
        _ => {
            let c = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_on_wire(c) {
                return Err(code::PROTOCOL_ERROR);
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(code::INVALID_PAYLOAD);
            }
            Ok(c)
        }
    }
}

/// A close payload: the code, then the reason cut to fit a control frame on a char boundary.
/// On the stack: a storm of dropped clients sends one per connection.
pub fn payload(code: u16, reason: &str) -> smallvec::SmallVec<[u8; 125]> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = smallvec::SmallVec::new();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_codes_and_reasons() {
        assert_eq!(validate_payload(&[]), Ok(1005));
        assert_eq!(validate_payload(&[3]), Err(1002));
        assert_eq!(validate_payload(&payload(1000, "bye")), Ok(1000));
        assert_eq!(validate_payload(&payload(1005, "")), Err(1002));
        assert_eq!(validate_payload(&payload(4999, "")), Ok(4999));
        assert_eq!(validate_payload(&[0x03, 0xE8, 0xFF]), Err(1007));
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let p = payload(1000, &"é".repeat(100));
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }
}
