//! Incremental UTF-8 validation across frame boundaries, so an invalid text message fails
//! at the first bad byte (Autobahn's "fail fast") without buffering the message.

#[derive(Debug, Default)]
pub struct Utf8Validator {
    /// The start of a code point cut by a frame boundary (at most 3 bytes).
    pending: [u8; 4],
    pending_len: u8,
}

impl Utf8Validator {
    /// Feeds the next chunk of a text message; `last` marks its final chunk. Returns false
    /// as soon as the bytes seen so far cannot be valid UTF-8.
    pub fn feed(&mut self, mut chunk: &[u8], last: bool) -> bool {
        // Complete a code point left over from the previous chunk first.
        while self.pending_len > 0 {
            let Some((&b, rest)) = chunk.split_first() else {
                return !last;
            };
            self.pending[self.pending_len as usize] = b;
            self.pending_len += 1;
            chunk = rest;
            match std::str::from_utf8(&self.pending[..self.pending_len as usize]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_some() => return false,
                Err(_) if self.pending_len == 4 => return false,
                Err(_) => {}
            }
        }
        match std::str::from_utf8(chunk) {
            Ok(_) => true,
            Err(e) if e.error_len().is_some() => false,
            Err(e) => {
                // A truncated code point at the end: keep it for the next chunk.
                let tail = &chunk[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                !last
            }
        }
    }

    pub fn reset(&mut self) {
        self.pending_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_split_code_points_in_any_place() {
        let text = "κόσμε € 𝄞 ok".as_bytes();
        for cut in 0..text.len() {
            let mut v = Utf8Validator::default();
            assert!(v.feed(&text[..cut], false));
            assert!(v.feed(&text[cut..], true), "cut at {cut}");
        }
    }

    #[test]
    fn fails_fast_and_at_the_end() {
        let mut v = Utf8Validator::default();
        assert!(!v.feed(&[0xCE, 0xBA, 0xFF], false));
        let mut v = Utf8Validator::default();
        assert!(v.feed(&[0xF0, 0x9D], false));
        assert!(!v.feed(&[], true));
        let mut v = Utf8Validator::default();
        assert!(!v.feed(&[0xED, 0xA0, 0x80], false), "surrogates are invalid");
    }
}
