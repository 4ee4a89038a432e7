//! Closing a relay from outside (gateway shutdown, a server drain) without paying for the
//! watch on every wake, or for more than one allocation per connection.
//!
//! A connection's stop is a flag and the waker of the task that watches it, both in the one
//! object its owner already allocates (the server's registration of the connection,
//! [`crate::upstream::CloseSignal`]). Firing it sets the flag and wakes the task; the relay
//! checks the flag with one atomic load per wake. An earlier version watched a child
//! cancellation token of the gateway's shutdown: each connection then allocated the token,
//! its boxed future and a waker of its own, and took the shutdown token's mutex on the way
//! in and out, about 4% of a new connection's user time (BENCHMARKS.md, tenth round). Shutdown
//! now fires every registered connection's flag instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// Set once, from any thread; wakes the task that watches it.
#[derive(Debug, Default)]
pub struct StopFlag {
    fired: AtomicBool,
    waker: AtomicWaker,
}

impl StopFlag {
    /// Sets the flag and wakes the watching task. False if it was set already.
    pub fn fire(&self) -> bool {
        let first = !self.fired.swap(true, Ordering::AcqRel);
        if first {
            self.waker.wake();
        }
        first
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

/// What a [`Stop`] is made of: the flag, and the close frame to send once it fired.
pub trait StopSource: Send + Sync {
    fn flag(&self) -> &StopFlag;
    /// The close code and reason for both sides.
    fn frame(&self) -> (u16, &'static str);
}

/// Tells a relay to close both sides before they do: when the source's flag fires
/// (shutdown, a drain), both get a close frame with the code and reason it gives.
#[derive(Clone)]
pub struct Stop(pub Arc<dyn StopSource>);

/// Watches a [`Stop`] for the relay.
pub(super) struct StopWatch {
    source: Arc<dyn StopSource>,
    /// The task's waker is on the flag. It is taken on the first poll and kept: the relay is
    /// polled by the one task it was spawned as, whose waker does not change.
    registered: bool,
    /// The flag fired and the relay was told.
    told: bool,
}

impl StopWatch {
    pub(super) fn new(stop: Stop) -> StopWatch {
        StopWatch { source: stop.0, registered: false, told: false }
    }

    /// The close code and reason for both sides, once the stop fired.
    pub(super) fn frame(&self) -> (u16, &'static str) {
        self.source.frame()
    }

    /// Ready once, when the flag has fired.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.told {
            return Poll::Pending;
        }
        let flag = self.source.flag();
        if !self.registered {
            flag.waker.register(cx.waker());
            self.registered = true;
        }
        // Checked after registering: a fire in between has the waker, or is seen here.
        if flag.is_fired() {
            self.told = true;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// A stop for tests: fired by hand, closing with 1001.
#[cfg(test)]
#[derive(Default)]
pub(super) struct Source(pub StopFlag);

#[cfg(test)]
impl StopSource for Source {
    fn flag(&self) -> &StopFlag {
        &self.0
    }
    fn frame(&self) -> (u16, &'static str) {
        (1001, "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn fires_once_and_wakes_the_task() {
        let source = Arc::new(Source::default());
        let mut watch = StopWatch::new(Stop(source.clone()));
        let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(watch.poll(&mut cx).is_pending());
        assert!(watch.poll(&mut cx).is_pending());
        assert!(source.0.fire());
        assert!(!source.0.fire(), "fired once");
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "the task was woken once");
        assert!(watch.poll(&mut cx).is_ready());
        assert!(watch.poll(&mut cx).is_pending(), "told once");
    }

    #[test]
    fn a_flag_fired_before_the_first_poll_is_seen() {
        let source = Arc::new(Source::default());
        source.0.fire();
        let mut watch = StopWatch::new(Stop(source));
        let waker = Waker::from(Arc::new(CountingWaker(AtomicUsize::new(0))));
        assert!(watch.poll(&mut Context::from_waker(&waker)).is_ready());
    }

    /// A fire from another thread while the task polls is never lost.
    #[test]
    fn a_fire_racing_the_first_poll_is_seen_or_wakes() {
        for _ in 0..200 {
            let source = Arc::new(Source::default());
            let mut watch = StopWatch::new(Stop(source.clone()));
            let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
            let waker = Waker::from(task.clone());
            let firing = std::thread::spawn(move || source.0.fire());
            let first = watch.poll(&mut Context::from_waker(&waker)).is_ready();
            firing.join().unwrap();
            assert!(first || task.0.load(Ordering::Relaxed) == 1);
            assert!(first || watch.poll(&mut Context::from_waker(&waker)).is_ready());
        }
    }
}
