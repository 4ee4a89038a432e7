//! `wasmgate-bench storm`: a reconnect storm. Many idle clients are connected through the
//! proxy; then every one of them drops its connection and reconnects at once, with its own
//! token, as after a failover or a network blip. What decides an outage is how long until
//! they are all back: the table gives the time until 99% and 100% are connected again (each
//! reconnect is a handshake and one echo through the proxy), the attempts that failed and
//! were retried, and the proxy's CPU time per reconnect.
//!
//! The clients live in several child processes of this binary (`storm-client`), each with
//! its own loopback source address: one process may hold only 20,000 open files here, and a
//! source address only ~28,000 ports. For the same reason a proxy process holds at most
//! ~9,900 proxied connections (two sockets each), so every proxy runs as several instances
//! on their own addresses (`--per-instance` clients each) and the clients spread over them:
//! wasmgate and HAProxy as separate processes, nginx as separate masters of one worker.
//!
//! A client that fails (refused, reset, timed out, a 5xx) waits 100–300 ms and tries again,
//! as client libraries with jittered backoff do; nothing gives up before `STORM_LIMIT`.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{ChildStdin, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

use crate::jwt;
use crate::load::{Metric, Outcome, Probe, Unit};
use crate::procs::{self, TempDir};
use crate::proxies::{self, Binaries, Running, Target};
use crate::table::Results;
use crate::tls::ClientStream;
use tokio_rustls::TlsConnector;

/// Everything of a storm (the reconnects and their retries) must be over by then.
const STORM_LIMIT: Duration = Duration::from_secs(120);
/// One attempt: connect, handshake, one echo.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);
/// Connections a client process opens at once while setting up (not during the storm).
const SETUP_CONCURRENCY: usize = 200;

#[derive(clap::Args)]
pub struct Options {
    /// Idle clients connected before the storm; all of them reconnect at once.
    #[arg(long, default_value_t = 20_000)]
    clients: usize,
    /// Child processes the clients are spread over (each its own source address).
    #[arg(long, default_value_t = 4)]
    client_processes: usize,
    /// Clients per proxy process: the proxy runs ceil(clients / this) instances.
    #[arg(long, default_value_t = 7_000)]
    per_instance: usize,
    /// Proxies to storm, comma separated (not `direct`).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "wasmgate,wasmgate-auth,wasmgate-rs256,wasmgate-rs256-nocache,nginx,haproxy"
    )]
    only: Vec<Target>,
    /// Storm every proxy this many times (a fresh proxy each time); medians are reported.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// For the `-tls` proxies: clients resume their TLS session from the ticket of the
    /// connection they dropped, instead of a full handshake.
    #[arg(long)]
    resume: bool,
    /// Also write the table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The clients of one child process (run by the harness, not by hand).
#[derive(clap::Args)]
pub struct ClientOptions {
    /// Proxy addresses; client i uses entry[i % len].
    #[arg(long, value_delimiter = ',')]
    entry: Vec<SocketAddr>,
    /// The first client's number (its token's `sub` is `client-N`).
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
    /// Local address the clients connect from.
    #[arg(long)]
    source: IpAddr,
    /// Sign tokens with RS256 instead of HS256.
    #[arg(long)]
    rs256: bool,
    /// Speak `wss://`, trusting the CA certificate (DER) in this file.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// With `--ca`: each client resumes its TLS session when it reconnects.
    #[arg(long)]
    resume: bool,
}

fn metrics() -> Vec<Metric> {
    vec![
        Metric::new("storm: 99% reconnected, ms".into(), Unit::Micros),
        Metric::new("storm: 100% reconnected, ms".into(), Unit::Micros),
        Metric::new("storm: failed attempts (retried)".into(), Unit::Micros),
        Metric::new("storm: proxy CPU µs per reconnect".into(), Unit::Micros),
        Metric::new("set-up ramp: new conns/s".into(), Unit::Rate),
        Metric::new("storm: TLS sessions resumed".into(), Unit::Rate),
        Metric::new("storm: SYNs dropped, accept queue full".into(), Unit::Micros),
        Metric::new("storm: SYNs sent again (1 s, 2 s... backoff)".into(), Unit::Micros),
    ]
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let mut targets = options.only.clone();
    if targets.contains(&Target::Direct) {
        bail!("the storm goes through a proxy; `direct` has none");
    }
    targets.sort_by_key(|t| *t as u8);
    targets.dedup();
    if options.clients == 0 || options.client_processes == 0 || options.per_instance == 0 {
        bail!("--clients, --client-processes and --per-instance must be positive");
    }
    if options.clients / options.client_processes > 15_000 {
        bail!("more than 15,000 clients per process would pass the open-file limit: add --client-processes");
    }
    proxies::ensure_installed(&targets)?;
    let nofile = procs::raise_nofile_limit()?;
    let bins = Binaries::locate(&targets)?;
    let dir = TempDir::new()?;
    let instances = options.clients.div_ceil(options.per_instance);

    let mut results = Results::new(&targets);
    let outcomes = crate::table::rounds_over("storm", &targets, options.rounds, &dir.0, |target, cell| {
        let (bins, options) = (&bins, &options);
        async move { storm(target, bins, &cell, instances, options).await }
    })
    .await?;
    for (target, rounds) in targets.iter().zip(outcomes) {
        results.record("storm", metrics(), *target, &crate::load::median(rounds));
    }
    results.note(format!(
        "{} clients in {} processes; each proxy as {instances} instances of at most {} clients; every client \
         drops its connection (RST) at the same moment and reconnects at once with its own token \
         (handshake + one 64 B echo); a failed attempt is retried after 100–300 ms.",
        options.clients, options.client_processes, options.per_instance
    ));
    results.note(
        "CPU per reconnect: user plus system time of all proxy processes from the drop until the last client \
         is back, over the number of clients (it includes tearing down the dropped connections)."
            .into(),
    );
    if targets.iter().any(|t| t.is_tls()) {
        results.note(if options.resume {
            "The -tls columns: every reconnect resumes the TLS session from the ticket its dropped connection got \
             (TLS 1.3 PSK with a fresh X25519 exchange, no certificate); the ratios are to nginx-tls."
                .into()
        } else {
            "The -tls columns: every reconnect is a full TLS 1.3 handshake (ECDSA P-256 certificate, X25519), \
             the clients resume no session; the ratios are to nginx-tls."
                .into()
        });
    }
    results.note(
        "SYNs dropped and sent again: the kernel's ListenOverflows and TCPSynRetrans over the storm. A client \
         whose SYN met a full accept queue waits 1 s before its next one, then 2 s, then 4 s: where these are \
         not zero, the 99% and 100% times are set by how many backoff steps the last clients needed."
            .into(),
    );
    results.note(format!("open-file limit {nofile}; load average at the end: {}", crate::machine::load_average()));
    results.publish("Reconnect storm", &bins, &targets, options.out.as_deref())
}

/// A child process holding clients, spoken to over its stdin and stdout.
struct ClientProcess {
    proc: procs::Proc,
    stdin: ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl ClientProcess {
    /// The next line it prints. Every wait of the child is bounded (`STORM_LIMIT`), after
    /// which it reports or exits, so this ends.
    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("client process exited: {}", self.proc.log_tail());
        }
        Ok(line.trim_end().to_string())
    }
}

async fn storm(
    target: Target,
    bins: &Binaries,
    dir: &std::path::Path,
    instances: usize,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let ca = if target.is_tls() {
        let cert = crate::tls::BenchCert::make(dir)?;
        let ca = dir.join("tls-ca.der");
        cert.write_ca(&ca)?;
        Some(ca)
    } else {
        None
    };
    let running = Running::start_instances(target, bins, dir, instances)?;
    let entry: Vec<String> = running.entry.iter().map(SocketAddr::to_string).collect();
    let exe = std::env::current_exe()?;
    let per_process = options.clients.div_ceil(options.client_processes);
    let mut children = Vec::new();
    for k in 0..options.client_processes {
        let first = k * per_process;
        let count = per_process.min(options.clients.saturating_sub(first));
        if count == 0 {
            break;
        }
        let mut cmd = Command::new(&exe);
        cmd.arg("storm-client")
            .arg("--entry")
            .arg(entry.join(","))
            .arg("--first")
            .arg(first.to_string())
            .arg("--count")
            .arg(count.to_string())
            .arg("--source")
            .arg(Ipv4Addr::new(127, 0, 1, 1 + k as u8).to_string());
        if target.token_alg() == jwt::Alg::Rs256 {
            cmd.arg("--rs256");
        }
        if let Some(ca) = &ca {
            cmd.arg("--ca").arg(ca);
            if options.resume {
                cmd.arg("--resume");
            }
        }
        let (proc, stdin, stdout) = procs::Proc::spawn_piped(&format!("clients-{k}"), cmd, dir)?;
        children.push(ClientProcess { proc, stdin, stdout: BufReader::new(stdout) });
    }
    // Blocking reads: the children answer within their own limits, or exit (EOF).
    let children = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<ClientProcess>, f64)> {
        let mut children = children;
        let mut slowest = 0f64;
        for child in &mut children {
            let line = child.line()?;
            let secs = line.strip_prefix("ready ").and_then(|s| s.parse::<f64>().ok());
            slowest = slowest.max(secs.with_context(|| format!("client process: {line}"))?);
        }
        Ok((children, slowest))
    })
    .await??;
    let (children, set_up_secs) = children;
    // The processes ramp up together, so the slowest one's time is the ramp's.
    let ramp_rate = options.clients as f64 / set_up_secs;
    // Let the proxies settle (finish logging, freeing handshake buffers) before the storm.
    sleep(Duration::from_secs(1)).await;

    let cpu_before = running.cpu_secs()?;
    let kernel_before = crate::machine::ListenCounters::read();
    let (children, reports) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<ClientProcess>, Vec<String>)> {
        let mut children = children;
        for child in &mut children {
            writeln!(child.stdin, "storm")?;
            child.stdin.flush()?;
        }
        let mut reports = Vec::new();
        for child in &mut children {
            reports.push(child.line()?);
        }
        Ok((children, reports))
    })
    .await??;
    let cpu = running.cpu_secs()? - cpu_before;
    let kernel = crate::machine::ListenCounters::read().since(kernel_before);
    drop(children);

    let mut times = Vec::new();
    let mut failed = 0u64;
    let mut gave_up = 0u64;
    let mut resumed = 0u64;
    for report in reports {
        let mut words = report.split_whitespace();
        if words.next() != Some("done") {
            bail!("client process: {report}");
        }
        let mut number = || words.next().and_then(|w| w.parse::<u64>().ok()).ok_or_else(|| anyhow!("bad report"));
        failed += number()?;
        gave_up += number()?;
        resumed += number()?;
        times.extend(words.filter_map(|w| w.parse::<f64>().ok()));
    }
    if times.is_empty() {
        bail!("no client reconnected");
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((q * options.clients as f64).ceil() as usize).clamp(1, times.len()) - 1];
    eprint!("(p10 {:.0} p50 {:.0} p90 {:.0} ms) ", at(0.1), at(0.5), at(0.9));
    let trouble = (gave_up > 0).then(|| format!("{gave_up} clients not back within {STORM_LIMIT:?}"));
    Ok(Outcome {
        values: vec![
            at(0.99),
            if gave_up > 0 { f64::NAN } else { *times.last().expect("not empty") },
            failed as f64,
            cpu * 1e6 / options.clients as f64,
            ramp_rate,
            resumed as f64,
            kernel.listen_overflows as f64,
            kernel.syn_retransmits as f64,
        ],
        trouble,
    })
}

type Ws = WebSocketStream<ClientStream>;

/// The `storm-client` child: signs its clients' tokens, connects them, prints `ready SECS`
/// (the seconds connecting took, signing not counted); on `storm` drops them
/// all and reconnects them at once, then prints `done FAILED GAVE_UP RESUMED MS MS ...`
/// (RESUMED: reconnects that resumed their TLS session; then each client's time from the
/// drop until its echo came back).
pub async fn client(options: ClientOptions) -> anyhow::Result<()> {
    procs::raise_nofile_limit()?;
    if options.entry.is_empty() {
        bail!("--entry names no address");
    }
    let alg = if options.rs256 { jwt::Alg::Rs256 } else { jwt::Alg::Hs256 };
    let tokens: Arc<Vec<HeaderValue>> =
        Arc::new((0..options.count).map(|i| jwt::bearer_for(alg, &format!("client-{}", options.first + i))).collect());
    // One connector for all, or with --resume one per client: each keeps its own ticket.
    let connectors: Arc<Vec<TlsConnector>> = Arc::new(match &options.ca {
        None => Vec::new(),
        Some(ca) => {
            let ca = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            let config = crate::tls::client_config(&ca)?;
            match options.resume {
                true => (0..options.count).map(|_| crate::tls::resuming(&config)).collect(),
                false => vec![TlsConnector::from(Arc::new(config))],
            }
        }
    });
    let options = Arc::new(options);
    let failed = Arc::new(AtomicU64::new(0));

    // Set up: every client connected and echoed once, retrying as in the storm.
    let started = Instant::now();
    let mut held: Vec<Option<Ws>> = Vec::with_capacity(options.count);
    let mut pending = futures_util::stream::iter(0..options.count)
        .map(|i| {
            let (options, tokens, failed, connectors) = (options.clone(), tokens.clone(), failed.clone(), connectors.clone());
            async move { (i, reconnect(&options, i, &tokens[i], &connectors, &failed, Instant::now() + STORM_LIMIT).await) }
        })
        .buffer_unordered(SETUP_CONCURRENCY);
    held.resize_with(options.count, || None);
    while let Some((i, result)) = pending.next().await {
        let (ws, _) = result.with_context(|| format!("setting up client {}", options.first + i))?;
        held[i] = Some(ws);
    }
    drop(pending);
    println!("ready {:.3}", started.elapsed().as_secs_f64());

    let mut command = String::new();
    tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut command).map(|_| command)).await??;
    failed.store(0, Ordering::Relaxed);

    // The storm: every connection reset at once, then every client back at once.
    for ws in held.iter_mut().filter_map(Option::take) {
        let _ = ws.get_ref().tcp().set_zero_linger();
        drop(ws);
    }
    let dropped = Instant::now();
    let deadline = dropped + STORM_LIMIT;
    let mut tasks = JoinSet::new();
    for i in 0..options.count {
        let (options, tokens, failed, connectors) = (options.clone(), tokens.clone(), failed.clone(), connectors.clone());
        tasks.spawn(async move { reconnect(&options, i, &tokens[i], &connectors, &failed, deadline).await.ok() });
    }
    let mut times = Vec::with_capacity(options.count);
    let mut back = Vec::with_capacity(options.count);
    let mut gave_up = 0u64;
    let mut resumed = 0u64;
    while let Some(done) = tasks.join_next().await {
        match done? {
            Some((ws, at)) => {
                resumed += ws.get_ref().resumed() as u64;
                times.push(at.duration_since(dropped).as_secs_f64() * 1000.0);
                back.push(ws);
            }
            None => gave_up += 1,
        }
    }
    let times: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
    println!("done {} {gave_up} {resumed} {}", failed.load(Ordering::Relaxed), times.join(" "));
    // Hold the connections until the harness has read the report and stops this process.
    let mut rest = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut rest)).await;
    drop(back);
    Ok(())
}

/// Connects client `i` (handshake and one echo), retrying after 100–300 ms until
/// `deadline`; returns the connection and when its echo came back.
async fn reconnect(
    options: &ClientOptions,
    i: usize,
    token: &HeaderValue,
    connectors: &[TlsConnector],
    failed: &AtomicU64,
    deadline: Instant,
) -> anyhow::Result<(Ws, Instant)> {
    let addr = options.entry[(options.first + i) % options.entry.len()];
    // None for plain ws://; one shared connector, or each client its own (--resume).
    let tls = (!connectors.is_empty()).then(|| &connectors[i % connectors.len()]);
    let mut attempt = 0u64;
    loop {
        match timeout(ATTEMPT_LIMIT, connect_once(addr, options.source, token, tls)).await {
            Ok(Ok(ws)) => return Ok((ws, Instant::now())),
            Ok(Err(_)) | Err(_) => {
                failed.fetch_add(1, Ordering::Relaxed);
                attempt += 1;
                // Jitter from the client's number and attempt, so retries do not march in step.
                let jitter = (options.first as u64 + i as u64).wrapping_mul(2654435761).wrapping_add(attempt * 97) % 200;
                let wait = Duration::from_millis(100 + jitter);
                if Instant::now() + wait >= deadline {
                    bail!("gave up after {attempt} attempts");
                }
                sleep(wait).await;
            }
        }
    }
}

/// One client: connect from `source`, handshake with `token`, one echo.
pub(crate) async fn connect_once(addr: SocketAddr, source: IpAddr, token: &HeaderValue, tls: Option<&TlsConnector>) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tcp = match tls {
        Some(connector) => ClientStream::Tls(Box::new(crate::tls::handshake(connector, addr, tcp).await?)),
        None => ClientStream::Plain(tcp),
    };
    let mut request = format!("ws://{addr}/").into_client_request()?;
    request.headers_mut().insert(AUTHORIZATION, token.clone());
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await?;
    let payload = Bytes::from_static(&[0x5a; 64]);
    ws.send(Message::Binary(payload.clone())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b == payload => return Ok(ws),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => bail!("unexpected reply: {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before the echo"),
        }
    }
}
