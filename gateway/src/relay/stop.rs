//! Closing a relay from outside (gateway shutdown, a server drain) without paying for the
//! watch on every wake.
//!
//! Polling a cancellation future takes the token's mutex and its notify list's, and with a
//! thousand connections those are cold cache lines: a profile at 1,000 echoing connections
//! had that poll at ~2% of the gateway's CPU, done once per message per connection. Here the
//! future is polled with a waker of its own that leaves a mark before waking the task, so a
//! wake costs one atomic load unless the token actually fired.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Tells a relay to close both sides before they do: when `token` is cancelled (shutdown,
/// a drain), both get a close frame with the code and reason `frame` gives.
pub struct Stop {
    pub token: CancellationToken,
    pub frame: Box<dyn Fn() -> (u16, &'static str) + Send + Sync>,
}

/// Watches a [`Stop`]'s token for the relay.
pub(super) struct StopWatch {
    /// `None` once the token fired and the relay was told.
    wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    waker: Arc<MarkingWaker>,
    registered: bool,
}

/// Marks that the token's future wants a poll, then wakes the relay's task.
struct MarkingWaker {
    marked: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for MarkingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.marked.store(true, Ordering::Release);
        if let Some(task) = &*self.task.lock().unwrap() {
            task.wake_by_ref();
        }
    }
}

impl StopWatch {
    pub(super) fn new(token: CancellationToken) -> StopWatch {
        StopWatch {
            wait: Some(Box::pin(token.cancelled_owned())),
            waker: Arc::new(MarkingWaker { marked: AtomicBool::new(false), task: Mutex::new(None) }),
            registered: false,
        }
    }

    /// Ready once, when the token has been cancelled.
    ///
    /// The task's waker is taken on the first poll and kept: the relay is polled by the one
    /// task it was spawned as, whose waker does not change.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(wait) = &mut self.wait else { return Poll::Pending };
        if self.registered && !self.waker.marked.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        if !self.registered {
            *self.waker.task.lock().unwrap() = Some(cx.waker().clone());
            self.registered = true;
        }
        self.waker.marked.store(false, Ordering::Relaxed);
        let own = Waker::from(self.waker.clone());
        match wait.as_mut().poll(&mut Context::from_waker(&own)) {
            Poll::Ready(()) => {
                self.wait = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn fires_once_after_the_token_is_cancelled_and_wakes_the_task() {
        let token = CancellationToken::new();
        let mut watch = StopWatch::new(token.clone());
        let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(watch.poll(&mut cx).is_pending());
        assert!(watch.poll(&mut cx).is_pending(), "no mark, no poll of the token");
        token.cancel();
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "the task was woken");
        assert!(watch.poll(&mut cx).is_ready());
        assert!(watch.poll(&mut cx).is_pending(), "told once");
    }

    #[test]
    fn a_token_cancelled_before_the_first_poll_is_seen() {
        let token = CancellationToken::new();
        token.cancel();
        let mut watch = StopWatch::new(token);
        let waker = Waker::from(Arc::new(CountingWaker(AtomicUsize::new(0))));
        assert!(watch.poll(&mut Context::from_waker(&waker)).is_ready());
    }
}
