//! Admission of client sockets: how many the gateway holds (`max_connections`), how many
//! per client address (`max_connections_per_ip`), and how many are still in their handshake
//! (`max_handshakes`). A socket is counted from accept to close; one over a limit is
//! answered at once, before its request is read — 503, or 429 when its own address is over
//! — and closed, so a flood costs the gateway a write per socket.
//!
//! `max_handshakes` is a bound on what slow clients can hold (a slow-loris attack sends its
//! request a byte at a time), not a rate limit: a reconnect storm brings thousands of fast
//! handshakes at once, and refusing those past the limit made every client retry (6,000
//! clients: 6,200 refusals, 1.5x nginx's time until 99% were back). So at the limit the accept
//! loop first waits, up to `max_handshakes_wait_ms`, for a handshake to finish, leaving the
//! rest in the kernel's accept queue; only when none finishes in that time (the slots are
//! held by slow clients) is the socket refused, and the next ones at once, until a slot
//! frees. The number of sockets in their handshake stays bounded either way.
//!
//! "None finished" alone does not tell slow clients from busy handshakes: 7,000 TLS
//! handshakes arriving at once go through their ClientHellos in lockstep, and on a loaded
//! machine the first may finish only after more than a second, all of it spent working
//! (20,000-client `wss` storm: ~2,000 refusals per gateway instance, each a client's retry).
//! So a wait that ends without a free slot looks at the runtime: if its workers were busy
//! for most of the wait, the slots are doing work and the socket waits another round, up to
//! `BUSY_ROUNDS`; slow clients leave the workers idle, and are refused as before.
//!
//! The limits are read from the running configuration at each accept, so a reload changes
//! them for new sockets. The per-address count covers sockets accepted while that limit was
//! on; IPv6 clients are counted per /64, the block one subscriber usually holds.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::GatewaySection;
use crate::handshake::Refusal;
use crate::metrics::{Counter, Gauge, Registry};
use crate::resources::Throttle;

/// The limits in force, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    /// 0 = no per-address limit.
    pub per_address: usize,
    pub handshakes: usize,
    /// How long a socket over `handshakes` waits for a slot; zero = refused at once.
    pub handshake_wait: Duration,
}

impl Limits {
    /// `default_connections` applies when the config sets no `max_connections`.
    pub fn from_config(g: &GatewaySection, default_connections: usize) -> Limits {
        let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Limits {
            connections: g.max_connections.as_ref().map_or(default_connections, |v| clamp(*v.get_ref())),
            per_address: clamp(g.max_connections_per_ip),
            handshakes: clamp(*g.max_handshakes.get_ref()),
            handshake_wait: Duration::from_millis(g.max_handshakes_wait_ms),
        }
    }
}

/// Which limit a socket was refused by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Connections,
    PerAddress,
    Handshakes,
}

impl Refused {
    const ALL: [Refused; 3] = [Refused::Connections, Refused::PerAddress, Refused::Handshakes];

    /// The metric's `reason` label: the config key that refused.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Connections => "max_connections",
            Refused::PerAddress => "max_connections_per_ip",
            Refused::Handshakes => "max_handshakes",
        }
    }

    fn refusal(self, limits: &Limits) -> Refusal {
        let (status, reason) = match self {
            Refused::Connections => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the gateway holds its limit of {} connections; try again later", limits.connections),
            ),
            Refused::PerAddress => (
                StatusCode::TOO_MANY_REQUESTS,
                format!("your address holds its limit of {} connections", limits.per_address),
            ),
            Refused::Handshakes => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the gateway has its limit of {} handshakes in progress; try again later", limits.handshakes),
            ),
        };
        let mut refusal = Refusal::new(status, reason);
        refusal.headers.push(("retry-after".into(), "1".into()));
        refusal
    }
}

/// Client addresses as counted: IPv4 (IPv4-mapped IPv6 included) per address, IPv6 per /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AddressKey(IpAddr);

impl AddressKey {
    fn of(ip: IpAddr) -> AddressKey {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey(IpAddr::V4(v4)),
                None => AddressKey(IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1)))),
            },
            v4 => AddressKey(v4),
        }
    }
}

/// Rounds of `max_handshakes_wait_ms` a socket may wait while the runtime is busy with the
/// handshakes that hold the slots (see the module doc).
const BUSY_ROUNDS: u32 = 10;
/// The share of a wait the runtime's workers must have been busy for it to count as busy.
const BUSY_SHARE: f64 = 0.5;

/// Refusals being answered at once; beyond this a refused socket gets its answer written
/// and is closed without waiting for the client to finish sending.
const MAX_ANSWERING: usize = 256;

/// The counts behind the limits, shared by the accept loop and every connection.
pub struct Admission {
    open: AtomicUsize,
    handshakes: AtomicUsize,
    /// Accept loops waiting for a handshake slot, and their wake-up.
    waiting: AtomicUsize,
    slot_freed: Notify,
    /// A wait for a slot timed out and no slot has been free since: the slots are held by
    /// slow clients, and sockets over the limit are refused without waiting.
    stalled: AtomicBool,
    per_address: Mutex<HashMap<AddressKey, usize>>,
    /// Refused sockets whose answer is being written.
    answering: AtomicUsize,
    /// `max_connections` when the config does not set it.
    pub default_connections: usize,
    open_gauge: Gauge,
    handshakes_gauge: Gauge,
    refused: [Counter; 3],
    log: Throttle,
}

impl Admission {
    pub fn new(registry: &Registry, default_connections: usize) -> Arc<Admission> {
        let none: &[(&str, &str)] = &[];
        let refused = |r: Refused| {
            registry.counter(
                "wasmgate_connections_refused_total",
                "Client sockets answered and closed at once because a limit was reached",
                &[("reason", r.label())],
            )
        };
        Arc::new(Admission {
            open: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            slot_freed: Notify::new(),
            stalled: AtomicBool::new(false),
            per_address: Mutex::new(HashMap::new()),
            answering: AtomicUsize::new(0),
            default_connections,
            open_gauge: registry.gauge(
                "wasmgate_connections_open",
                "Client sockets held, from accept to close, handshakes included",
                none,
            ),
            handshakes_gauge: registry.gauge("wasmgate_handshakes_in_progress", "Client sockets still in their handshake", none),
            refused: Refused::ALL.map(refused),
            log: Throttle::default(),
        })
    }

    /// Counts a new client socket from `ip` against `limits`: a permit held for the socket's
    /// life, or the limit it is over.
    /// Admits a socket from `ip`; `ip` is None when the client is not known yet (behind a
    /// PROXY header, [`Permit::charge_address`] counts it once it is).
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>, limits: &Limits) -> Result<Permit, Refused> {
        // What is counted so far is uncounted by the permit's drop if a later check fails.
        let mut permit =
            Permit { admission: self.clone(), address: None, counted: false, in_handshake: false, admitted: false };
        // The address first: a client over its own limit hears that it is, not that the
        // gateway is full.
        if let Some(ip) = ip {
            permit.charge_address(ip, limits)?;
        }
        permit.counted = true;
        if self.open.fetch_add(1, Ordering::Relaxed) >= limits.connections {
            return Err(Refused::Connections);
        }
        permit.in_handshake = true;
        // SeqCst with `waiting` (see `admit_or_wait`): a waiter that finds no slot is woken.
        if self.handshakes.fetch_add(1, Ordering::SeqCst) >= limits.handshakes {
            return Err(Refused::Handshakes);
        }
        self.open_gauge.inc();
        self.handshakes_gauge.inc();
        permit.admitted = true;
        Ok(permit)
    }

    /// As [`Admission::admit`], but a socket over `max_handshakes` waits up to
    /// `limits.handshake_wait` for a handshake to finish; the accept loop waits with it, so
    /// the clients behind it wait in the kernel's accept queue. A wait during which the
    /// runtime was busy goes on, up to `BUSY_ROUNDS`; once one has timed out otherwise,
    /// sockets over the limit are refused at once until a slot is free again.
    pub async fn admit_or_wait(self: &Arc<Self>, ip: Option<IpAddr>, limits: &Limits) -> Result<Permit, Refused> {
        let first = self.admit(ip, limits);
        match first {
            Ok(_) => {
                if self.stalled.load(Ordering::Relaxed) {
                    self.stalled.store(false, Ordering::Relaxed);
                }
                return first;
            }
            Err(Refused::Handshakes) if !limits.handshake_wait.is_zero() && !self.stalled.load(Ordering::Relaxed) => {}
            Err(_) => return first,
        }
        let mut deadline = tokio::time::Instant::now() + limits.handshake_wait;
        let mut busy_since = RuntimeBusy::now();
        let mut rounds = 1;
        let _waiting = Waiting::new(self);
        loop {
            let freed = self.slot_freed.notified();
            tokio::pin!(freed);
            // Registered before the count is read again, so a slot freed in between wakes it.
            freed.as_mut().enable();
            match self.admit(ip, limits) {
                Err(Refused::Handshakes) => {}
                other => return other,
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                let busy = RuntimeBusy::now();
                if rounds < BUSY_ROUNDS && busy.share_since(&busy_since, limits.handshake_wait) >= BUSY_SHARE {
                    // The slots' handshakes are working, not waiting on slow clients.
                    rounds += 1;
                    deadline = tokio::time::Instant::now() + limits.handshake_wait;
                    busy_since = busy;
                    continue;
                }
                self.stalled.store(true, Ordering::Relaxed);
                return self.admit(ip, limits);
            }
        }
    }

    /// Answers a refused socket (status, reason, `Retry-After: 1`) and closes it, off the
    /// accept loop.
    /// Counts and logs a refusal; returns the answer to send.
    pub fn refusal_counted(&self, why: Refused, limits: &Limits) -> Refusal {
        self.refused[why as usize].inc();
        if let Some(held_back) = self.log.ready() {
            tracing::warn!(limit = why.label(), ?limits, refused_since_last_log = held_back, "refusing client sockets");
        }
        why.refusal(limits)
    }

    pub fn refuse(self: &Arc<Self>, mut stream: TcpStream, why: Refused, limits: &Limits) {
        let refusal = self.refusal_counted(why, limits);
        if self.answering.fetch_add(1, Ordering::Relaxed) >= MAX_ANSWERING {
            self.answering.fetch_sub(1, Ordering::Relaxed);
            // Too many answers under way: the answer fits the empty send buffer.
            let _ = stream.try_write(&refusal.encode());
            return;
        }
        let admission = self.clone();
        tokio::spawn(async move {
            crate::handshake::refuse(&mut stream, refusal).await;
            admission.answering.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Client sockets held now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Client sockets in their handshake now.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }
}

/// How long the current runtime's workers have been busy (not parked), summed.
struct RuntimeBusy {
    total: Duration,
    workers: usize,
}

impl RuntimeBusy {
    fn now() -> RuntimeBusy {
        let metrics = tokio::runtime::Handle::current().metrics();
        let workers = metrics.num_workers();
        RuntimeBusy { total: (0..workers).map(|w| metrics.worker_total_busy_duration(w)).sum(), workers }
    }

    /// The share of `window` the workers were busy since `earlier`, on average.
    fn share_since(&self, earlier: &RuntimeBusy, window: Duration) -> f64 {
        let busy = self.total.saturating_sub(earlier.total).as_secs_f64();
        busy / (window.as_secs_f64() * self.workers.max(1) as f64).max(f64::MIN_POSITIVE)
    }
}

/// An accept loop waiting for a handshake slot, counted while it waits (also when the wait
/// is dropped, at shutdown).
struct Waiting<'a>(&'a Admission);

impl<'a> Waiting<'a> {
    fn new(admission: &'a Admission) -> Waiting<'a> {
        admission.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(admission)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One admitted client socket; uncounts it when dropped.
pub struct Permit {
    admission: Arc<Admission>,
    address: Option<AddressKey>,
    /// Counted in `open`.
    counted: bool,
    /// Counted in `handshakes`.
    in_handshake: bool,
    /// Passed every limit, and so shown in the gauges (a permit dropped part-way was not).
    admitted: bool,
}

impl Permit {
    /// Counts the socket against `max_connections_per_ip` for `ip`.
    pub fn charge_address(&mut self, ip: IpAddr, limits: &Limits) -> Result<(), Refused> {
        if limits.per_address == 0 || self.address.is_some() {
            return Ok(());
        }
        let key = AddressKey::of(ip);
        let mut counts = self.admission.per_address.lock().unwrap();
        let count = counts.entry(key).or_insert(0);
        if *count >= limits.per_address {
            return Err(Refused::PerAddress);
        }
        *count += 1;
        self.address = Some(key);
        Ok(())
    }

    /// The handshake is over (answered with a 101 or refused): the socket no longer counts
    /// against `max_handshakes`.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.in_handshake) {
            self.admission.handshakes.fetch_sub(1, Ordering::SeqCst);
            // A permit refused by a limit held no real slot: its drop frees none.
            if self.admitted && self.admission.waiting.load(Ordering::SeqCst) > 0 {
                self.admission.slot_freed.notify_one();
            }
            if self.admitted {
                self.admission.handshakes_gauge.dec();
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.handshake_done();
        let admission = &self.admission;
        if self.counted {
            admission.open.fetch_sub(1, Ordering::Relaxed);
            if self.admitted {
                admission.open_gauge.dec();
            }
        }
        if let Some(key) = self.address {
            let mut counts = admission.per_address.lock().unwrap();
            if let Some(count) = counts.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: usize, per_address: usize, handshakes: usize) -> Limits {
        Limits { connections, per_address, handshakes, handshake_wait: Duration::ZERO }
    }

    #[test]
    fn each_limit_refuses_and_dropping_gives_back() {
        let registry = Registry::new();
        let admission = Admission::new(&registry, 100);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let l = limits(3, 2, 10);
        let a1 = admission.admit(Some(ip("10.0.0.1")), &l).unwrap();
        let a2 = admission.admit(Some(ip("::ffff:10.0.0.1")), &l).unwrap();
        assert_eq!(admission.admit(Some(ip("10.0.0.1")), &l).err(), Some(Refused::PerAddress), "mapped IPv4 is the same address");
        let b1 = admission.admit(Some(ip("2001:db8:0:1::1")), &l).unwrap();
        assert_eq!(admission.admit(Some(ip("10.0.0.2")), &l).err(), Some(Refused::Connections));
        assert_eq!(admission.open(), 3);
        drop(a1);
        let b2 = admission.admit(Some(ip("2001:db8:0:1:ffff::2")), &l).unwrap();
        assert_eq!(admission.admit(Some(ip("2001:db8:0:1::3")), &l).err(), Some(Refused::PerAddress), "one /64");
        drop((a2, b1, b2));
        assert_eq!((admission.open(), admission.handshakes()), (0, 0));
        assert!(admission.per_address.lock().unwrap().is_empty(), "no address left behind");
        let text = registry.render();
        assert!(text.contains("wasmgate_connections_open 0") && text.contains("wasmgate_handshakes_in_progress 0"), "{text}");
    }

    #[test]
    fn handshakes_count_until_done() {
        let registry = Registry::new();
        let admission = Admission::new(&registry, 100);
        let l = limits(10, 0, 2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut first = admission.admit(Some(ip), &l).unwrap();
        let _second = admission.admit(Some(ip), &l).unwrap();
        assert_eq!(admission.admit(Some(ip), &l).err(), Some(Refused::Handshakes));
        first.handshake_done();
        first.handshake_done();
        let _third = admission.admit(Some(ip), &l).unwrap();
        assert_eq!((admission.open(), admission.handshakes()), (3, 2));
        assert!(registry.render().contains("wasmgate_connections_open 3"));
        assert!(registry.render().contains("wasmgate_handshakes_in_progress 2"));
        drop(first);
        assert_eq!((admission.open(), admission.handshakes()), (2, 2));
    }

    #[tokio::test]
    async fn over_the_handshake_limit_a_socket_waits_for_a_slot_then_is_refused() {
        let registry = Registry::new();
        let admission = Admission::new(&registry, 100);
        let l = Limits { handshake_wait: Duration::from_secs(5), ..limits(10, 0, 2) };
        let ip: Option<IpAddr> = Some("127.0.0.1".parse().unwrap());
        let mut first = admission.admit_or_wait(ip, &l).await.unwrap();
        let _second = admission.admit_or_wait(ip, &l).await.unwrap();
        // A handshake that finishes while the third waits gives it its slot.
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit_or_wait(ip, &l).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "waits while the slots are taken");
        first.handshake_done();
        let waited = tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("woken by the freed slot").unwrap();
        assert_eq!(waited, Ok(()));
        // Slots held longer than the wait (slow clients): refused after the wait, then at once.
        let l = Limits { handshake_wait: Duration::from_millis(100), ..l };
        let _third = admission.admit(ip, &l).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(admission.admit_or_wait(ip, &l).await.err(), Some(Refused::Handshakes));
        assert!(started.elapsed() >= Duration::from_millis(100));
        let started = std::time::Instant::now();
        assert_eq!(admission.admit_or_wait(ip, &l).await.err(), Some(Refused::Handshakes));
        assert!(started.elapsed() < Duration::from_millis(50), "no second wait while stalled");
        assert_eq!(admission.handshakes(), 2, "refused sockets hold no slot");
        assert_eq!(admission.waiting.load(Ordering::SeqCst), 0);
        drop(_third);
        assert!(admission.admit_or_wait(ip, &l).await.is_ok(), "a free slot ends the stall");
        assert!(!admission.stalled.load(Ordering::Relaxed));
    }

    /// Slots held past the wait by handshakes that keep the runtime busy (a storm's
    /// lockstep, not slow clients): the socket waits on and gets the slot that frees.
    #[tokio::test]
    async fn a_busy_runtime_is_not_taken_for_slow_clients() {
        let registry = Registry::new();
        let admission = Admission::new(&registry, 100);
        let l = Limits { handshake_wait: Duration::from_millis(100), ..limits(10, 0, 1) };
        let ip: Option<IpAddr> = Some("127.0.0.1".parse().unwrap());
        let held = admission.admit_or_wait(ip, &l).await.unwrap();
        // The slot's handshake works for 3 rounds of the wait, yielding as tasks do.
        let worker = tokio::spawn(async move {
            let mut held = held;
            let until = std::time::Instant::now() + Duration::from_millis(300);
            while std::time::Instant::now() < until {
                let spin = std::time::Instant::now() + Duration::from_micros(500);
                while std::time::Instant::now() < spin {
                    std::hint::spin_loop();
                }
                tokio::task::yield_now().await;
            }
            held.handshake_done();
            held
        });
        let started = std::time::Instant::now();
        let waited = admission.admit_or_wait(ip, &l).await;
        assert!(waited.is_ok(), "refused after {:?} although the runtime was busy", started.elapsed());
        assert!(started.elapsed() >= Duration::from_millis(250), "got a slot only once it freed");
        assert!(!admission.stalled.load(Ordering::Relaxed));
        drop(worker.await.unwrap());
    }
}
