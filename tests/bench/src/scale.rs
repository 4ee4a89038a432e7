//! `wasmgate-bench scale`: how many idle proxied connections one machine holds with several
//! gateway processes sharing one port (`SO_REUSEPORT`), and what stops it.
//!
//! The open-file limit (20,000 here) caps one gateway at about 9,900 proxied connections (a
//! client socket and an upstream socket each), so the run starts `--gateways` `wasmgate`
//! processes on one address, `--backends` `echo-backend` processes, and `--clients` client
//! processes (this binary's hidden `scale-client` mode), each client process connecting from
//! its own source address in 127.0.0.0/8 so the 28,000 ephemeral ports of one address are
//! not the limit. Clients complete the WebSocket handshake over raw TCP and then hold the
//! socket without a byte more (keepalive pings are off in the gateways' config).
//!
//! Reported: connections held, failed attempts by reason, the handshake rate during the ramp
//! (overall and the best second), resident memory per connection of the gateways (the sum
//! over all of them, after minus before), of the backends and of the clients, and how the
//! kernel spread connections over the gateways (their descriptors).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::machine;
use crate::procs::{self, free_addr, Proc, TempDir};
use crate::proxies::Binaries;

#[derive(clap::Args)]
pub struct Options {
    /// Idle proxied connections to open.
    #[arg(long, default_value_t = 100_000)]
    connections: usize,
    /// Gateway processes sharing the listening port.
    #[arg(long, default_value_t = 12)]
    gateways: usize,
    /// Backend processes (the gateways spread connections over them round robin).
    #[arg(long, default_value_t = 8)]
    backends: usize,
    /// Client processes, each from its own source address.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Handshakes in flight per client process.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Also write the report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One client process: `count` connections from `source` to `target`, held until killed.
#[derive(clap::Args)]
pub struct ClientOptions {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    source: IpAddr,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    concurrency: usize,
}

/// How long the ramp may go without a new connection before it counts as stopped.
const STALL: Duration = Duration::from_secs(20);

pub async fn run(o: Options) -> anyhow::Result<()> {
    if o.gateways == 0 || o.backends == 0 || o.clients == 0 || o.concurrency == 0 {
        bail!("--gateways, --backends, --clients and --concurrency must be at least 1");
    }
    let nofile = procs::raise_nofile_limit()?;
    let per_client = o.connections.div_ceil(o.clients);
    let per_backend = o.connections.div_ceil(o.backends);
    if per_client as u64 + 100 > nofile || per_backend as u64 + 100 > nofile {
        bail!("{per_client} sockets per client process or {per_backend} per backend exceed the open-file limit {nofile}: add processes");
    }
    let bins = Binaries::locate(&[])?;
    let dir = TempDir::new()?;
    let started_at = machine::describe();

    let mut backends = Vec::new();
    for i in 0..o.backends {
        let addr = free_addr()?;
        let mut cmd = Command::new(bins.echo_backend());
        cmd.args(["--listen", &addr.to_string(), "--name", &format!("b{i}")]);
        let mut proc = Proc::spawn(&format!("backend-{i}"), cmd, &dir.0)?;
        proc.wait_listening(addr, Duration::from_secs(10))?;
        backends.push((proc, addr));
    }
    let listen = free_addr()?;
    // Each connection holds two descriptors in a gateway; keep a reserve for the rest.
    let max_connections = (nofile.saturating_sub(200)) / 2;
    let servers: Vec<String> = backends.iter().map(|(_, a)| format!("\"{a}\"")).collect();
    let config = format!(
        "[gateway]\nlisten = \"{listen}\"\nmax_connections = {max_connections}\nmax_handshakes = 4096\nping_interval_secs = 0\n\
         plugin_cache = \"cache\"\n\n[[upstream]]\nname = \"echo\"\nservers = [{}]\n\n[[route]]\npath = \"/\"\nupstream = \"echo\"\n",
        servers.join(", ")
    );
    let config_path = dir.0.join("scale.toml");
    std::fs::write(&config_path, config)?;
    let mut gateways = Vec::new();
    for i in 0..o.gateways {
        let mut cmd = Command::new(bins.wasmgate());
        cmd.args(["run", "--config"]).arg(&config_path).env("RUST_LOG", "warn");
        let name = format!("gateway-{i}");
        let proc = Proc::spawn(&name, cmd, &dir.0)?;
        wait_for_line(&dir.0.join(format!("{name}.log")), "listening on", &proc)?;
        gateways.push(proc);
    }
    std::thread::sleep(Duration::from_millis(500));
    let sum_rss = |procs: &mut dyn Iterator<Item = &Proc>| -> anyhow::Result<u64> {
        procs.map(|p| p.rss_kib()).sum::<anyhow::Result<u64>>()
    };
    let gateway_rss_before = sum_rss(&mut gateways.iter())?;
    let backend_rss_before = sum_rss(&mut backends.iter().map(|(p, _)| p))?;

    let exe = std::env::current_exe()?;
    let mut clients = Vec::new();
    for k in 0..o.clients {
        let count = per_client.min(o.connections - (k * per_client).min(o.connections));
        let source = IpAddr::from([127, 0, 1 + (k / 250) as u8, 1 + (k % 250) as u8]);
        let mut cmd = Command::new(&exe);
        cmd.args(["scale-client", "--target", &listen.to_string(), "--source", &source.to_string()])
            .args(["--count", &count.to_string(), "--concurrency", &o.concurrency.to_string()]);
        clients.push(Proc::spawn(&format!("client-{k}"), cmd, &dir.0)?);
    }

    // The ramp: sample the clients' progress every second until all are done or it stalls.
    let ramp_start = Instant::now();
    let mut samples: Vec<(f64, usize)> = vec![(0.0, 0)];
    let mut last_gain = Instant::now();
    let (held, failed, reasons) = loop {
        std::thread::sleep(Duration::from_secs(1));
        let progress: Vec<Progress> = (0..o.clients).map(|k| Progress::read(&dir.0.join(format!("client-{k}.log")))).collect();
        let held: usize = progress.iter().map(|p| p.connected).sum();
        let failed: usize = progress.iter().map(|p| p.failed).sum();
        if held > samples.last().unwrap().1 {
            last_gain = Instant::now();
        }
        samples.push((ramp_start.elapsed().as_secs_f64(), held));
        eprintln!("{:>5.0} s  {held:>7} held  {failed:>6} failed", ramp_start.elapsed().as_secs_f64());
        let done = progress.iter().all(|p| p.done.is_some());
        if done || last_gain.elapsed() > STALL {
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            for p in &progress {
                for (reason, n) in &p.reasons {
                    *reasons.entry(reason.clone()).or_default() += n;
                }
            }
            break (held, failed, reasons);
        }
    };
    // The ramp ends at the last second that gained connections.
    let ramp_secs = samples.iter().rev().find(|(_, h)| *h == held).map_or(0.0, |(t, _)| *t);
    let best_second = samples.windows(2).map(|w| w[1].1.saturating_sub(w[0].1)).max().unwrap_or(0);
    std::thread::sleep(Duration::from_secs(5));
    let gateway_rss = sum_rss(&mut gateways.iter())?;
    let backend_rss = sum_rss(&mut backends.iter().map(|(p, _)| p))?;
    let client_rss = sum_rss(&mut clients.iter())?;
    let fds: Vec<usize> = gateways.iter().map(|g| g.open_fds()).collect::<anyhow::Result<_>>()?;
    let alive = gateways.iter().filter(|g| g.open_fds().is_ok()).count();
    let per_conn = |after: u64, before: u64| if held == 0 { 0.0 } else { after.saturating_sub(before) as f64 / held as f64 };

    let mut report = String::new();
    writeln!(report, "## Scale: idle proxied connections on one machine\n")?;
    writeln!(report, "{started_at}; open-file limit {nofile} per process.\n")?;
    writeln!(
        report,
        "{} wasmgate processes sharing {listen} (SO_REUSEPORT; max_connections {max_connections} each, keepalive pings off), \
         {} echo-backend processes, {} client processes from 127.0.1.x source addresses, {} handshakes in flight each; \
         clients hold raw sockets after the 101.\n",
        o.gateways, o.backends, o.clients, o.concurrency
    )?;
    writeln!(report, "| | |\n|---|---|")?;
    writeln!(report, "| connections asked for | {} |", o.connections)?;
    writeln!(report, "| connections held (highest count reached) | {held} |")?;
    writeln!(report, "| failed attempts | {failed} |")?;
    for (reason, n) in &reasons {
        writeln!(report, "| — {reason} | {n} |")?;
    }
    writeln!(report, "| ramp | {ramp_secs:.0} s: {:.0} handshakes/s overall, {best_second} in the best second |", held as f64 / ramp_secs.max(1.0))?;
    for mark in [50_000, 100_000, 150_000] {
        if let Some((t, _)) = samples.iter().find(|(_, h)| *h >= mark) {
            writeln!(report, "| — {mark} held after | {t:.0} s |")?;
        }
    }
    writeln!(
        report,
        "| gateway RSS | {:.0} MiB before, {:.0} MiB after, all {} processes: **{:.2} KiB per connection** |",
        gateway_rss_before as f64 / 1024.0,
        gateway_rss as f64 / 1024.0,
        o.gateways,
        per_conn(gateway_rss, gateway_rss_before)
    )?;
    writeln!(report, "| backend RSS | {:.2} KiB per connection |", per_conn(backend_rss, backend_rss_before))?;
    writeln!(report, "| client RSS | {:.2} KiB per connection |", per_conn(client_rss, 0))?;
    writeln!(
        report,
        "| gateway descriptors | min {}, max {} ({alive} of {} gateways alive) |",
        fds.iter().min().unwrap_or(&0),
        fds.iter().max().unwrap_or(&0),
        o.gateways
    )?;
    writeln!(report, "\nload average at the end: {}", machine::load_average())?;
    println!("{report}");
    if let Some(out) = &o.out {
        std::fs::write(out, &report)?;
    }
    drop(clients);
    drop(gateways);
    Ok(())
}

/// A client process's last progress line (`progress CONNECTED FAILED`), its failures by
/// reason so far (`reasons {json}`), and whether it is done (`done {json}`).
#[derive(Default)]
struct Progress {
    connected: usize,
    failed: usize,
    reasons: BTreeMap<String, usize>,
    done: Option<BTreeMap<String, usize>>,
}

impl Progress {
    fn read(log: &std::path::Path) -> Progress {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let mut p = Progress::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("progress ") {
                let mut n = rest.split_whitespace().map(|v| v.parse().unwrap_or(0));
                p.connected = n.next().unwrap_or(0);
                p.failed = n.next().unwrap_or(0);
            } else if let Some(json) = line.strip_prefix("reasons ") {
                p.reasons = serde_json::from_str(json).unwrap_or_default();
            } else if let Some(json) = line.strip_prefix("done ") {
                p.done = Some(serde_json::from_str(json).unwrap_or_default());
                p.reasons = p.done.clone().unwrap_or_default();
            }
        }
        p
    }
}

fn wait_for_line(log: &std::path::Path, needle: &str, proc: &Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(log).unwrap_or_default().contains(needle) {
        if Instant::now() > deadline {
            bail!("no {needle:?} in {}: {}", log.display(), proc.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The `scale-client` process: opens its connections, reports progress every 500 ms, then
/// holds them until killed.
pub async fn client(o: ClientOptions) -> anyhow::Result<()> {
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let reasons = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let held = Arc::new(Mutex::new(Vec::with_capacity(o.count)));
    let report = {
        let (connected, failed, reasons) = (connected.clone(), failed.clone(), reasons.clone());
        tokio::spawn(async move {
            loop {
                println!("progress {} {}", connected.load(Relaxed), failed.load(Relaxed));
                let so_far = serde_json::to_string(&*reasons.lock().unwrap()).unwrap_or_default();
                println!("reasons {so_far}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(o.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..o.count {
        let slot = slots.clone().acquire_owned().await?;
        let (connected, failed, reasons, held) = (connected.clone(), failed.clone(), reasons.clone(), held.clone());
        tasks.spawn(async move {
            match open(o.target, o.source).await {
                Ok(stream) => {
                    held.lock().unwrap().push(stream);
                    connected.fetch_add(1, Relaxed);
                }
                Err(reason) => {
                    *reasons.lock().unwrap().entry(reason).or_default() += 1;
                    failed.fetch_add(1, Relaxed);
                }
            }
            drop(slot);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    report.abort();
    println!("progress {} {}", connected.load(Relaxed), failed.load(Relaxed));
    println!("done {}", serde_json::to_string(&*reasons.lock().unwrap())?);
    std::future::pending::<()>().await;
    Ok(())
}

/// One WebSocket handshake over raw TCP from `source`; the socket, or why not.
async fn open(target: SocketAddr, source: IpAddr) -> Result<TcpStream, String> {
    let attempt = async {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        socket.bind(SocketAddr::new(source, 0)).map_err(|e| format!("bind: {e}"))?;
        let mut stream = socket.connect(target).await.map_err(|e| format!("connect: {e}"))?;
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut head = Vec::with_capacity(256);
        let mut byte = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(0) => return Err("closed before answering".to_string()),
                Ok(n) => head.extend_from_slice(&byte[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        let status = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_string();
        if !status.starts_with("HTTP/1.1 101") {
            return Err(format!("answered {status}"));
        }
        Ok(stream)
    };
    tokio::time::timeout(Duration::from_secs(30), attempt).await.unwrap_or_else(|_| Err("timed out after 30 s".into()))
}
