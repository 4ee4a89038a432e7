//! When the gateway itself runs short: of file descriptors (EMFILE, ENFILE), of local ports
//! (EADDRNOTAVAIL on connect) or of socket memory (ENOBUFS, ENOMEM).
//!
//! Such an error says nothing about the peer. Blaming it would turn a local shortage into an
//! outage: upstream servers ejected or marked unhealthy because the gateway could not open a
//! socket to them. So a shortage is recognised by its error code, counted in
//! `wasmgate_resource_errors_total{kind}`, logged at most once a second, and answered with a
//! 503 that says the gateway is out of resources; accept loops back off instead of spinning
//! on a listener that stays readable.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::{Counter, Registry};

/// What ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// The process's (EMFILE) or the system's (ENFILE) open-file table is full.
    Descriptors,
    /// No local port left for an outgoing connection (EADDRNOTAVAIL).
    Ports,
    /// The kernel could not allocate socket memory (ENOBUFS, ENOMEM).
    Memory,
}

impl Shortage {
    const ALL: [Shortage; 3] = [Shortage::Descriptors, Shortage::Ports, Shortage::Memory];

    /// The shortage `error` reports, if it reports one.
    pub fn of(error: &io::Error) -> Option<Shortage> {
        match error.raw_os_error()? {
            libc::EMFILE | libc::ENFILE => Some(Shortage::Descriptors),
            libc::EADDRNOTAVAIL => Some(Shortage::Ports),
            libc::ENOBUFS | libc::ENOMEM => Some(Shortage::Memory),
            _ => None,
        }
    }

    /// The metric's `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            Shortage::Descriptors => "descriptors",
            Shortage::Ports => "ports",
            Shortage::Memory => "memory",
        }
    }

    /// For the 503 a client gets.
    pub fn describe(self) -> &'static str {
        match self {
            Shortage::Descriptors => "open files",
            Shortage::Ports => "local ports",
            Shortage::Memory => "socket memory",
        }
    }
}

impl fmt::Display for Shortage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Counts shortages and logs them, at most once a second.
pub struct ResourceErrors {
    counters: [Counter; 3],
    log: Throttle,
}

impl ResourceErrors {
    pub fn new(registry: &Registry) -> ResourceErrors {
        let counter = |s: Shortage| {
            registry.counter(
                "wasmgate_resource_errors_total",
                "Operations that failed because the gateway ran out of a resource (not a peer's fault)",
                &[("kind", s.label())],
            )
        };
        ResourceErrors { counters: Shortage::ALL.map(counter), log: Throttle::default() }
    }

    /// Counts and logs `shortage`, met while doing `during` ("accept", "upstream connect").
    pub fn record(&self, shortage: Shortage, during: &str, error: &dyn fmt::Display) {
        self.counters[shortage as usize].inc();
        if let Some(suppressed) = self.log.ready() {
            tracing::error!(
                kind = shortage.label(),
                %during,
                %error,
                similar_errors_not_logged = suppressed,
                "the gateway is out of {shortage}; clients are refused until it recovers (raise the open-file limit or lower max_connections)"
            );
        }
    }

    /// Records `error` if it reports a shortage; returns the shortage.
    pub fn check(&self, during: &str, error: &io::Error) -> Option<Shortage> {
        let shortage = Shortage::of(error)?;
        self.record(shortage, during, error);
        Some(shortage)
    }

    pub fn count(&self, shortage: Shortage) -> u64 {
        self.counters[shortage as usize].get()
    }
}

/// Lets one event through per second and counts the others.
#[derive(Default)]
pub struct Throttle {
    /// When the last event went through, ms on the process clock (0: never).
    last_ms: AtomicU64,
    held_back: AtomicU64,
}

impl Throttle {
    /// Some(events held back since the last one) when this event may go through.
    pub fn ready(&self) -> Option<u64> {
        let now = crate::upstream::health::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now >= last + 1000;
        if due && self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// The pause after a failed accept: 5 ms, doubling up to 1 s while accepts keep failing,
/// back to 5 ms after one succeeds. The listener stays readable while the backlog holds
/// connections, so retrying at once would spin a core and starve the tasks that would free
/// descriptors.
pub struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> AcceptBackoff {
        AcceptBackoff { next: Self::FIRST }
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// Sleeps the current pause and doubles the next one; false when `stop` was cancelled.
    pub async fn pause(&mut self, stop: &CancellationToken) -> bool {
        let pause = self.advance();
        tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = stop.cancelled() => false,
        }
    }
}

impl AcceptBackoff {
    /// The pause to take now; the next one is twice as long, up to `MAX`.
    fn advance(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        pause
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff::new()
    }
}

/// A failed accept: counted if it is a shortage, logged (throttled) either way. Errors that
/// concern one connection only (it was reset before it was accepted) need no pause; the
/// others get one. Returns whether to pause.
pub fn accept_failed(errors: &ResourceErrors, during: &str, error: &io::Error) -> bool {
    if errors.check(during, error).is_some() {
        return true;
    }
    match error.raw_os_error() {
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM) => {
            tracing::debug!(%during, %error, "accept failed for one connection");
            false
        }
        _ => {
            tracing::warn!(%during, %error, "accept failed");
            true
        }
    }
}

/// The process's soft limit on open files.
pub fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes to the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

/// Raises the soft open-file limit to the hard one (each connection holds two sockets, and
/// the soft limit is often 1,024); returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    open_file_limit()
}

/// `max_connections` when the config does not say: each connection holds a client and an
/// upstream socket, and a reserve stays for listeners, health checks, refusals being
/// answered, plugin files and logs.
pub fn default_max_connections(open_file_limit: u64) -> usize {
    let reserve = (open_file_limit / 4).min(256);
    ((open_file_limit - reserve) / 2).max(1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortages_are_told_from_peer_errors() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(Shortage::of(&os(libc::EMFILE)), Some(Shortage::Descriptors));
        assert_eq!(Shortage::of(&os(libc::ENFILE)), Some(Shortage::Descriptors));
        assert_eq!(Shortage::of(&os(libc::EADDRNOTAVAIL)), Some(Shortage::Ports));
        assert_eq!(Shortage::of(&os(libc::ENOBUFS)), Some(Shortage::Memory));
        for peer in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH, libc::ECONNRESET] {
            assert_eq!(Shortage::of(&os(peer)), None);
        }
        assert_eq!(Shortage::of(&io::Error::other("no code")), None);
    }

    #[test]
    fn counted_by_kind_and_logged_once_a_second() {
        let registry = Registry::new();
        let errors = ResourceErrors::new(&registry);
        for _ in 0..3 {
            assert_eq!(errors.check("accept", &io::Error::from_raw_os_error(libc::EMFILE)), Some(Shortage::Descriptors));
        }
        assert_eq!(errors.check("connect", &io::Error::from_raw_os_error(libc::ECONNREFUSED)), None);
        assert_eq!(errors.count(Shortage::Descriptors), 3);
        assert!(registry.render().contains("wasmgate_resource_errors_total{kind=\"descriptors\"} 3"));
        let throttle = Throttle::default();
        assert_eq!(throttle.ready(), Some(0));
        assert_eq!(throttle.ready(), None);
        assert_eq!(throttle.ready(), None);
    }

    #[tokio::test]
    async fn accept_backoff_doubles_up_to_a_second() {
        let mut backoff = AcceptBackoff::new();
        let pauses: Vec<u128> = (0..10).map(|_| backoff.advance().as_millis()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.advance().as_millis(), 5);
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(!backoff.pause(&stop).await, "shutdown ends the pause");
    }

    #[test]
    fn default_connections_leave_a_reserve() {
        assert_eq!(default_max_connections(1024), (1024 - 256) / 2);
        assert_eq!(default_max_connections(64), (64 - 16) / 2);
        assert_eq!(default_max_connections(1), 1);
        assert_eq!(default_max_connections(1 << 20), ((1 << 20) - 256) / 2);
    }
}
