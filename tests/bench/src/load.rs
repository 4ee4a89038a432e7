//! The load generator: WebSocket clients and the scenarios they run.
//!
//! Every network wait is bounded (`IO_LIMIT` per step, and a hard stop `IO_LIMIT` after each
//! scenario's end), so a broken proxy produces an error, never a hang.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use futures_util::{stream, SinkExt, StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;

use crate::table::thousands;
use crate::tls::{self, ClientStream};

const IO_LIMIT: Duration = Duration::from_secs(5);
/// Connections being opened at once when a scenario sets up many.
const OPEN_CONCURRENCY: usize = 100;
const CONNECT_CLIENTS: usize = 16;
/// A connect loop gives up after this many failures instead of hammering a broken proxy.
const CONNECT_MAX_ERRORS: u64 = 100;
const IDLE_STEPS: [usize; 2] = [5_000, 9_000];
const SMALL: usize = 64;

type Ws = WebSocketStream<ClientStream>;

/// What a scenario can measure of the processes under test.
pub trait Probe {
    fn rss_kib(&self) -> anyhow::Result<u64>;
    fn cpu_secs(&self) -> anyhow::Result<f64>;
}

/// How long the timed scenarios run.
#[derive(Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scenario {
    /// Closed loop: each connection sends a binary message and waits for its echo.
    Echo { size: usize, conns: usize },
    /// Clients looping handshake, one echo, close.
    Connect,
    /// Proxy memory per idle connection.
    IdleRss,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Echo { size: SMALL, conns: 50 },
        Scenario::Echo { size: SMALL, conns: 1_000 },
        Scenario::Echo { size: 16 << 10, conns: 50 },
        Scenario::Echo { size: 16 << 10, conns: 1_000 },
        Scenario::Connect,
        Scenario::IdleRss,
    ];

    /// The name `--scenario` selects it by.
    pub fn name(&self) -> String {
        match self {
            Scenario::Echo { size, conns } => format!("echo-{}-{conns}", size_name(*size)),
            Scenario::Connect => "connect".into(),
            Scenario::IdleRss => "rss".into(),
        }
    }

    /// The table rows this scenario fills, in the order `run` returns their values.
    pub fn metrics(&self) -> Vec<Metric> {
        match self {
            Scenario::Echo { size, conns } => {
                let what = format!("echo {} × {conns} conns", size_name(*size));
                vec![
                    Metric::new(format!("{what}: msgs/s"), Unit::Rate),
                    Metric::new(format!("{what}: p50 µs"), Unit::Micros),
                    Metric::new(format!("{what}: p99 µs"), Unit::Micros),
                    Metric::new(format!("{what}: p99.9 µs"), Unit::Micros),
                    Metric::new(format!("{what}: CPU µs per msg"), Unit::Micros),
                ]
            }
            Scenario::Connect => vec![
                Metric::new(format!("new conns/s ({CONNECT_CLIENTS} clients: handshake, echo, close)"), Unit::Rate),
                Metric::new("new conns: cycle p99 µs".into(), Unit::Micros),
                Metric::new("new conns: CPU µs per conn".into(), Unit::Micros),
            ],
            Scenario::IdleRss => IDLE_STEPS
                .iter()
                .map(|n| Metric::new(format!("RSS per idle conn, {} conns: KiB", thousands(*n as f64)), Unit::KiB))
                .collect(),
        }
    }

    /// Runs against `entry` (round robin over its addresses), every handshake carrying
    /// `authorization`, over TLS with `tls` if given; `probe` measures the processes under
    /// test.
    pub async fn run(
        &self,
        entry: &[SocketAddr],
        authorization: &HeaderValue,
        tls: Option<&TlsConnector>,
        probe: &dyn Probe,
        timing: Timing,
    ) -> anyhow::Result<Outcome> {
        match *self {
            Scenario::Echo { size, conns } => echo(entry, authorization, tls, size, conns, probe, timing).await,
            Scenario::Connect => connect_rate(entry, authorization, tls, probe, timing).await,
            Scenario::IdleRss => idle_rss(entry, authorization, tls, probe).await,
        }
    }
}

/// One table row.
pub struct Metric {
    pub label: String,
    pub unit: Unit,
}

impl Metric {
    pub fn new(label: String, unit: Unit) -> Metric {
        Metric { label, unit }
    }
}

#[derive(Clone, Copy)]
pub enum Unit {
    /// Per second; higher is better.
    Rate,
    /// Latency; lower is better.
    Micros,
    /// Memory; lower is better.
    KiB,
}

/// A scenario's values (one per metric) and, if some connections failed without sinking
/// the whole run, what went wrong.
pub struct Outcome {
    pub values: Vec<f64>,
    pub trouble: Option<String>,
}

/// Each metric's median over the rounds that succeeded; troubles and failed rounds are
/// kept as the cell's trouble. All rounds failing is the first round's error.
pub fn median(rounds: Vec<anyhow::Result<Outcome>>) -> anyhow::Result<Outcome> {
    let total = rounds.len();
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    let mut troubles = Vec::new();
    for (n, round) in rounds.into_iter().enumerate() {
        match round {
            Ok(outcome) => {
                if let Some(trouble) = &outcome.trouble {
                    troubles.push(format!("round {}: {trouble}", n + 1));
                }
                ok.push(outcome)
            }
            Err(e) => errors.push(e),
        }
    }
    if ok.is_empty() {
        return Err(errors.into_iter().next().unwrap_or_else(|| anyhow::anyhow!("no rounds")));
    }
    if total == 1 {
        return Ok(ok.pop().expect("one outcome"));
    }
    let values = (0..ok[0].values.len())
        .map(|i| {
            let mut column: Vec<f64> = ok.iter().map(|o| o.values[i]).collect();
            column.sort_by(f64::total_cmp);
            let mid = column.len() / 2;
            if column.len() % 2 == 1 { column[mid] } else { (column[mid - 1] + column[mid]) / 2.0 }
        })
        .collect();
    if !errors.is_empty() {
        troubles.push(format!("{} of {total} rounds failed ({:#})", errors.len(), errors[0]));
    }
    let trouble = (!troubles.is_empty()).then(|| troubles.join("; "));
    Ok(Outcome { values, trouble })
}

fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{}k", size >> 10)
    } else {
        format!("{size}")
    }
}

/// Small buffers keep 9,000 idle clients cheap; the read buffer still fits a whole 16 KiB
/// message so large echoes do not cost the client extra reads. Nothing is held back on write.
fn client_config(size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size((size + 64).next_power_of_two().clamp(4096, 64 << 10))
        .write_buffer_size(0)
}

async fn open(addr: SocketAddr, authorization: &HeaderValue, tls: Option<&TlsConnector>, size: usize) -> anyhow::Result<Ws> {
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let mut request = format!("{scheme}://{addr}/").into_client_request()?;
    request.headers_mut().insert(AUTHORIZATION, authorization.clone());
    let tcp = timeout(IO_LIMIT, TcpStream::connect(addr)).await.map_err(|_| anyhow!("connect timed out"))??;
    tcp.set_nodelay(true)?;
    let stream = match tls {
        None => ClientStream::Plain(tcp),
        Some(connector) => {
            let tls = timeout(IO_LIMIT, tls::handshake(connector, addr, tcp)).await.map_err(|_| anyhow!("TLS handshake timed out"))??;
            ClientStream::Tls(Box::new(tls))
        }
    };
    let handshake = tokio_tungstenite::client_async_with_config(request, stream, Some(client_config(size)));
    let (ws, _) = timeout(IO_LIMIT, handshake).await.map_err(|_| anyhow!("handshake timed out"))??;
    Ok(ws)
}

/// Sends `payload` and waits for it to come back. Callers bound the wait.
async fn echo_once(ws: &mut Ws, payload: &Bytes) -> anyhow::Result<()> {
    ws.send(Message::Binary(payload.clone())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.len() == payload.len() => return Ok(()),
            // tungstenite answers pings by itself (wasmgate pings silent peers).
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => bail!("unexpected reply: {}", describe(&other)),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection closed"),
        }
    }
}

fn describe(msg: &Message) -> String {
    match msg {
        Message::Binary(b) => format!("binary of {} bytes", b.len()),
        Message::Text(t) => format!("text of {} bytes", t.len()),
        Message::Close(frame) => format!("close {frame:?}"),
        other => format!("{other:?}"),
    }
}

/// Opens `count` connections round robin over `entry`, each verified with one small echo.
/// `first` offsets the round robin so successive batches keep alternating.
async fn open_many(
    entry: &[SocketAddr],
    authorization: &HeaderValue,
    tls: Option<&TlsConnector>,
    count: usize,
    first: usize,
    size: usize,
) -> anyhow::Result<Vec<Ws>> {
    let payload = Bytes::from(vec![0x5a; SMALL]);
    stream::iter(first..first + count)
        .map(|i| {
            let addr = entry[i % entry.len()];
            let payload = payload.clone();
            async move {
                let mut ws = open(addr, authorization, tls, size).await?;
                timeout(IO_LIMIT, echo_once(&mut ws, &payload)).await.map_err(|_| anyhow!("echo timed out"))??;
                anyhow::Ok(ws)
            }
        })
        .buffer_unordered(OPEN_CONCURRENCY)
        .try_collect()
        .await
        .map_err(|e| e.context(format!("opening {count} connections")))
}

/// Microseconds up to a minute at 1% precision: each of 1,000 clients has one, so they stay
/// small (about 20 KiB).
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

/// CPU seconds the probed processes use between `from` and `to`, sampled while the clients
/// run, so it covers the measured window only.
async fn cpu_between(probe: &dyn Probe, from: Instant, to: Instant) -> anyhow::Result<f64> {
    sleep_until(from).await;
    let before = probe.cpu_secs()?;
    sleep_until(to).await;
    Ok(probe.cpu_secs()? - before)
}

/// CPU microseconds per unit of work.
fn per_unit(cpu_secs: f64, done: u64) -> f64 {
    cpu_secs * 1e6 / done.max(1) as f64
}

/// What one client task measured.
struct Tally {
    done: u64,
    latency: Histogram<u64>,
    errors: u64,
    first_error: Option<anyhow::Error>,
}

impl Tally {
    fn new() -> Tally {
        Tally { done: 0, latency: histogram(), errors: 0, first_error: None }
    }

    fn failed(&mut self, e: anyhow::Error) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// Sums the tasks' tallies into the total done, the latencies and a note on errors; fails
/// only if nothing at all succeeded.
async fn gather(mut tasks: JoinSet<Tally>) -> anyhow::Result<(u64, Histogram<u64>, Option<String>)> {
    let mut sum = Tally::new();
    while let Some(tally) = tasks.join_next().await {
        let tally = tally?;
        sum.done += tally.done;
        sum.latency.add(&tally.latency)?;
        sum.errors += tally.errors;
        if let Some(e) = tally.first_error {
            sum.first_error.get_or_insert(e);
        }
    }
    match sum.first_error {
        Some(e) if sum.done == 0 => Err(e.context(format!("{} errors, nothing completed", sum.errors))),
        Some(e) => Ok((sum.done, sum.latency, Some(format!("{} errors; first: {e:#}", sum.errors)))),
        None => Ok((sum.done, sum.latency, None)),
    }
}

async fn echo(
    entry: &[SocketAddr],
    authorization: &HeaderValue,
    tls: Option<&TlsConnector>,
    size: usize,
    conns: usize,
    probe: &dyn Probe,
    timing: Timing,
) -> anyhow::Result<Outcome> {
    let clients = open_many(entry, authorization, tls, conns, 0, size).await?;
    let payload = Bytes::from(vec![0xa5; size]);
    let measure_from = Instant::now() + timing.warmup;
    let end = measure_from + timing.duration;
    let mut tasks = JoinSet::new();
    for mut ws in clients {
        let payload = payload.clone();
        tasks.spawn(async move {
            let mut tally = Tally::new();
            let run = async {
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        return Ok(());
                    }
                    echo_once(&mut ws, &payload).await?;
                    if sent >= measure_from {
                        tally.latency.saturating_record(sent.elapsed().as_micros() as u64);
                        tally.done += 1;
                    }
                }
            };
            match timeout_at(end + IO_LIMIT, run).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tally.failed(e),
                Err(_) => tally.failed(anyhow!("no echo within {IO_LIMIT:?}")),
            }
            tally
        });
    }
    let cpu = cpu_between(probe, measure_from, end).await?;
    let (done, latency, trouble) = gather(tasks).await?;
    let rate = done as f64 / timing.duration.as_secs_f64();
    let values =
        vec![rate, quantile(&latency, 0.5), quantile(&latency, 0.99), quantile(&latency, 0.999), per_unit(cpu, done)];
    Ok(Outcome { values, trouble })
}

fn quantile(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

async fn connect_rate(
    entry: &[SocketAddr],
    authorization: &HeaderValue,
    tls: Option<&TlsConnector>,
    probe: &dyn Probe,
    timing: Timing,
) -> anyhow::Result<Outcome> {
    let payload = Bytes::from(vec![0x5a; SMALL]);
    let next = Arc::new(AtomicUsize::new(0));
    let entry: Arc<[SocketAddr]> = entry.into();
    let measure_from = Instant::now() + timing.warmup;
    let end = measure_from + timing.duration;
    let mut tasks = JoinSet::new();
    for _ in 0..CONNECT_CLIENTS {
        let (payload, next, entry, authorization, tls) =
            (payload.clone(), next.clone(), entry.clone(), authorization.clone(), tls.cloned());
        tasks.spawn(async move {
            let mut tally = Tally::new();
            while Instant::now() < end && tally.errors < CONNECT_MAX_ERRORS {
                let started = Instant::now();
                let addr = entry[next.fetch_add(1, Ordering::Relaxed) % entry.len()];
                let cycle = async {
                    let mut ws = open(addr, &authorization, tls.as_ref(), SMALL).await?;
                    echo_once(&mut ws, &payload).await?;
                    ws.close(None).await?;
                    // Wait for the close reply so the cycle includes a clean close handshake.
                    while let Some(Ok(_)) = ws.next().await {}
                    anyhow::Ok(())
                };
                match timeout(IO_LIMIT, cycle).await.unwrap_or_else(|_| Err(anyhow!("cycle timed out"))) {
                    Ok(()) if started >= measure_from => {
                        tally.latency.saturating_record(started.elapsed().as_micros() as u64);
                        tally.done += 1;
                    }
                    Ok(()) => {}
                    Err(e) => tally.failed(e),
                }
            }
            tally
        });
    }
    let cpu = cpu_between(probe, measure_from, end).await?;
    let (done, latency, trouble) = gather(tasks).await?;
    let values = vec![done as f64 / timing.duration.as_secs_f64(), quantile(&latency, 0.99), per_unit(cpu, done)];
    Ok(Outcome { values, trouble })
}

async fn idle_rss(
    entry: &[SocketAddr],
    authorization: &HeaderValue,
    tls: Option<&TlsConnector>,
    probe: &dyn Probe,
) -> anyhow::Result<Outcome> {
    let before = probe.rss_kib()?;
    let mut held = Vec::new();
    let mut values = Vec::new();
    for target in IDLE_STEPS {
        let more = open_many(entry, authorization, tls, target - held.len(), held.len(), SMALL).await?;
        held.extend(more);
        // Let the proxy finish whatever the handshakes left behind before sampling.
        sleep(Duration::from_secs(1)).await;
        values.push((probe.rss_kib()? as f64 - before as f64) / target as f64);
    }
    Ok(Outcome { values, trouble: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(values: &[f64], trouble: Option<&str>) -> anyhow::Result<Outcome> {
        Ok(Outcome { values: values.to_vec(), trouble: trouble.map(str::to_string) })
    }

    #[test]
    fn median_is_per_metric_and_keeps_troubles() {
        let m = median(vec![ok(&[3.0, 10.0], None), ok(&[1.0, 30.0], Some("x")), ok(&[2.0, 20.0], None)]).unwrap();
        assert_eq!(m.values, [2.0, 20.0]);
        assert_eq!(m.trouble.as_deref(), Some("round 2: x"));
        let even = median(vec![ok(&[1.0], None), ok(&[4.0], None)]).unwrap();
        assert_eq!(even.values, [2.5]);
    }

    #[test]
    fn failed_rounds_are_reported_not_averaged() {
        let m = median(vec![ok(&[5.0], None), Err(anyhow!("refused"))]).unwrap();
        assert_eq!(m.values, [5.0]);
        assert!(m.trouble.unwrap().contains("1 of 2 rounds failed (refused)"));
        assert!(median(vec![Err(anyhow!("a")), Err(anyhow!("b"))]).is_err());
    }
}
