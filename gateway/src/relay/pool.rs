//! A per-thread pool of read buffers.
//!
//! A connection borrows a buffer for one read and gives it back as soon as its bytes are
//! processed, so thousands of idle connections share a handful of buffers instead of each
//! holding its own.

use std::cell::RefCell;

use super::READ_CHUNK;

/// Buffers kept per thread; more than this are freed.
const KEEP: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least one read.
pub fn take() -> Vec<u8> {
    FREE.with(|free| free.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(READ_CHUNK + 256))
}

/// Returns a buffer to this thread's pool.
pub fn give(mut buf: Vec<u8>) {
    if buf.capacity() < READ_CHUNK || buf.capacity() > READ_CHUNK * 2 {
        return;
    }
    buf.clear();
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEEP {
            free.push(buf);
        }
    });
}
