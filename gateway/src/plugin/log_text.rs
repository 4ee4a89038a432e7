//! What a plugin writes to the gateway's log (`host.log`, stdout, stderr), made safe to
//! print: one record per line whatever the plugin sent, and a bounded size.
//!
//! A plugin's text goes into the log between the gateway's own fields. Raw newlines would
//! let it forge log records, terminal escapes would let it rewrite what an operator sees,
//! and a megabyte-long message per call would fill the disk at the attacker's pace.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Most bytes of a plugin's text kept in one log record; the rest is cut and counted.
pub const MAX_RECORD: usize = 4096;

/// `text` with control and invisible formatting characters escaped (`\n`, `\u{1b}`, ...)
/// and cut to about [`MAX_RECORD`] bytes, saying how much was cut. Borrows when nothing
/// needs changing, which is the common case.
pub fn printable(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_RECORD && !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(MAX_RECORD) + 32);
    let mut kept = 0;
    for c in text.chars() {
        if out.len() >= MAX_RECORD {
            break;
        }
        if needs_escape(c) {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
        kept += c.len_utf8();
    }
    if kept < text.len() {
        let _ = write!(out, "… ({} more bytes cut)", text.len() - kept);
    }
    Cow::Owned(out)
}

/// Characters that could break a record or hide text: C0/C1 controls (newlines, escapes),
/// line and paragraph separators, and bidirectional and zero-width formatting marks.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// Lets one warning of a kind through per interval, so a plugin that fails the same way on
/// every call (a full kv share, a metric over its limits) cannot flood the log.
pub struct Throttle {
    every: Duration,
    /// Milliseconds after `origin` of the last warning let through, plus one; 0 for none.
    last: AtomicU64,
}

impl Throttle {
    pub const fn new(every: Duration) -> Throttle {
        Throttle { every, last: AtomicU64::new(0) }
    }

    /// Whether a warning may go out now (`origin` is any fixed instant).
    pub fn due(&self, origin: Instant) -> bool {
        let now = origin.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.every.as_millis() as u64;
        due && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_through_per_interval() {
        let origin = Instant::now();
        let t = Throttle::new(Duration::from_secs(3600));
        assert!(t.due(origin));
        assert!(!t.due(origin));
        let never = Throttle::new(Duration::ZERO);
        assert!(never.due(origin) && never.due(origin));
    }

    #[test]
    fn plain_text_is_borrowed() {
        assert!(matches!(printable("user alice logged in"), Cow::Borrowed(_)));
    }

    #[test]
    fn newlines_and_escapes_cannot_forge_records() {
        let forged = printable("ok\n2025-01-01T00:00:00Z ERROR wasmgate: admin token leaked\r\x1b[2J");
        assert!(!forged.contains('\n') && !forged.contains('\r') && !forged.contains('\x1b'));
        assert!(forged.starts_with("ok\\n2025"), "{forged}");
        assert!(forged.ends_with("\\r\\u{1b}[2J"), "{forged}");
        // Bidirectional overrides could make a line read differently than it is.
        assert_eq!(printable("a\u{202E}b"), "a\\u{202e}b");
    }

    #[test]
    fn long_records_are_cut_and_say_so() {
        let huge = "x".repeat(1 << 20);
        let cut = printable(&huge);
        assert!(cut.len() < MAX_RECORD + 64, "{}", cut.len());
        assert!(cut.ends_with(&format!("… ({} more bytes cut)", (1 << 20) - MAX_RECORD)), "{}", &cut[MAX_RECORD - 8..]);
        // Escapes count towards the cap: a line of newlines is cut too.
        let newlines = "\n".repeat(100_000);
        assert!(printable(&newlines).len() < MAX_RECORD + 64);
        // A cut never splits a character.
        let wide = "é".repeat(MAX_RECORD);
        assert!(printable(&wide).is_char_boundary(MAX_RECORD));
    }
}
