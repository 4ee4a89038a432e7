//! `wasmgate-bench resume`: connections that survive their server (plugins/session-replay),
//! against the same failure through wasmgate without the plugin and through nginx.
//!
//! Kill: a chat hub and two `chat-backend` instances sharing its rooms (c0, c1), the proxy
//! in front of both. Clients connect until `--affected` of them (1,000 by default) are on
//! c0; each subscribes to a room of its own (`r<i>`), so a publication to it reaches that
//! client only. Then c0 is killed with SIGKILL and, right after, every client of c0 publishes
//! `after-<i>` to its room (one task sends them all, in client order). With session-replay the
//! gateway holds that message while it moves the client to c1, replays its subscribe there,
//! then delivers it: the client hears its own message back from c1. **Time to resume** is
//! measured by the client: from the kill to receiving that message, the first message
//! published after it re-attached. (The gateway's own `wasmgate_session_resume_seconds`,
//! from noticing the loss to being attached, is given as a mean beside it.) Without the
//! plugin, and through nginx, the clients of c0 are closed: the table counts closes and when
//! they came.
//!
//! Idle: the cost of the replay log. `--idle` clients (3,000 by default) each subscribe to
//! two rooms and stay idle; the proxy's RSS growth per connection, on the route with
//! session-replay (two remembered subscriptions per connection) and without it, and nginx.
//!
//! Every path gets fresh chat processes and a fresh proxy; `--rounds` repeats the kill (the
//! paths in turn) and reports medians.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::{sleep, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::load::{self, Outcome};
use crate::procs::{self, free_addr, Proc, TempDir};
use crate::proxies;
use crate::wasmgate::admin_request;

const STARTUP_LIMIT: Duration = Duration::from_secs(20);
/// Every affected client must have heard its message or been closed by then.
const OUTCOME_LIMIT: Duration = Duration::from_secs(30);
/// Clients connecting at once during set-up.
const SETUP_CONCURRENCY: usize = 100;

#[derive(clap::Args)]
pub struct Options {
    /// Clients on the killed server.
    #[arg(long, default_value_t = 1_000)]
    affected: usize,
    /// Idle connections for the memory rows (0: skip them).
    #[arg(long, default_value_t = 3_000)]
    idle: usize,
    /// Kill rounds per path; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Also write the table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The columns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    /// wasmgate, session-replay on the route.
    Replay,
    /// wasmgate, no plugin.
    Plain,
    Nginx,
    /// wasmgate, noop-messages on the route: a plugin reading every message, no session
    /// (idle rows only: what a plugin costs a connection without a replay log).
    Hook,
}

const PATHS: [Via; 3] = [Via::Replay, Via::Plain, Via::Nginx];
const IDLE_PATHS: [Via; 4] = [Via::Replay, Via::Hook, Via::Plain, Via::Nginx];

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Replay => "wasmgate + session-replay",
            Via::Plain => "wasmgate, no plugin",
            Via::Nginx => "nginx",
            Via::Hook => "wasmgate + noop-messages",
        }
    }
}

const REPLAY_CONFIG: &str = r#"{ remember = [{ match = { type = "subscribe" }, key = "channel" }], forget = [{ match = { type = "unsubscribe" }, key = "channel" }], swallow = [{ match = { type = "subscribed" }, key = "channel" }] }"#;

/// Where the programs are: chat-backend and wasmgate next to this binary, the component in
/// the plugins' target directory.
struct Programs {
    chat: PathBuf,
    wasmgate: PathBuf,
    replay: PathBuf,
    noop: PathBuf,
}

impl Programs {
    fn locate() -> anyhow::Result<Programs> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("executable has no directory")?;
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).context("tests/bench has two parents")?;
        let programs = Programs {
            chat: dir.join("chat-backend"),
            wasmgate: dir.join("wasmgate"),
            replay: repo.join("plugins/target/wasm32-wasip2/release/session_replay.wasm"),
            noop: repo.join("plugins/target/wasm32-wasip2/release/noop_messages.wasm"),
        };
        for (path, build) in [
            (&programs.chat, "cargo build --release --workspace --bins"),
            (&programs.wasmgate, "cargo build --release --workspace --bins"),
            (&programs.replay, "cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml"),
            (&programs.noop, "cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml"),
        ] {
            if !path.exists() {
                bail!("{} not found: build it with `{build}`", path.display());
            }
        }
        Ok(programs)
    }
}

/// A hub, chat instances c0 and c1 sharing its rooms, and the proxy of one path over them.
struct Setup {
    // Dropped first: the proxy, then the servers it talks to.
    proxy: Proc,
    servers: Vec<Option<Proc>>,
    _hub: Proc,
    entry: SocketAddr,
    admin: Option<SocketAddr>,
}

impl Setup {
    fn start(path: Via, programs: &Programs, dir: &Path) -> anyhow::Result<Setup> {
        std::fs::create_dir_all(dir)?;
        let hub_addr = free_addr()?;
        let mut cmd = Command::new(&programs.chat);
        cmd.args(["--hub-listen", &hub_addr.to_string()]);
        let mut hub = Proc::spawn("hub", cmd, dir)?;
        hub.wait_listening(hub_addr, STARTUP_LIMIT)?;
        let mut servers = Vec::new();
        let mut addrs = Vec::new();
        for name in ["c0", "c1"] {
            let addr = free_addr()?;
            let mut cmd = Command::new(&programs.chat);
            cmd.args(["--listen", &addr.to_string(), "--name", name, "--hub", &hub_addr.to_string()]);
            let mut proc = Proc::spawn(name, cmd, dir)?;
            proc.wait_listening(addr, STARTUP_LIMIT)?;
            servers.push(Some(proc));
            addrs.push(addr);
        }
        let entry = free_addr()?;
        let (proxy, admin) = match path {
            Via::Replay | Via::Plain | Via::Hook => {
                let admin = free_addr()?;
                let plugin = match path {
                    Via::Replay => Some(("replay", &programs.replay, REPLAY_CONFIG)),
                    Via::Hook => Some(("noop", &programs.noop, "{}")),
                    _ => None,
                };
                let text = wasmgate_config(entry, admin, &addrs, plugin, dir);
                let config = dir.join("wasmgate.toml");
                std::fs::write(&config, text)?;
                let mut cmd = Command::new(&programs.wasmgate);
                cmd.arg("run").arg("--config").arg(config).env("RUST_LOG", "warn").env("NO_COLOR", "1");
                (Proc::spawn("wasmgate", cmd, dir)?, Some(admin))
            }
            Via::Nginx => {
                let config = dir.join("nginx.conf");
                std::fs::write(&config, proxies::nginx_config(entry, &addrs, dir, 2, None))?;
                let mut cmd = Command::new(proxies::NGINX);
                cmd.arg("-p").arg(dir).arg("-e").arg(dir.join("nginx-error.log")).arg("-c").arg(config);
                (Proc::spawn("nginx", cmd, dir)?, None)
            }
        };
        let mut setup = Setup { proxy, servers, _hub: hub, entry, admin };
        setup.proxy.wait_listening(entry, STARTUP_LIMIT)?;
        Ok(setup)
    }

    /// SIGKILL to chat instance `i`, reaped before this returns: its sockets are closed by
    /// the kernel, as in a crash.
    fn kill(&mut self, i: usize) {
        if let Some(proc) = self.servers[i].take() {
            proc.kill();
        }
    }

    fn metrics(&self) -> anyhow::Result<String> {
        admin_request(self.admin.context("no admin address")?, "GET", "/metrics", None)
    }
}

/// One route to the chat pool, with `plugin` (name, component, config) on it if given.
fn wasmgate_config(
    listen: SocketAddr,
    admin: SocketAddr,
    servers: &[SocketAddr],
    plugin: Option<(&str, &PathBuf, &str)>,
    dir: &Path,
) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let (plugin, chain) = match plugin {
        Some((name, wasm, config)) => (
            format!("[[plugin]]\nname = \"{name}\"\nwasm = \"{}\"\nconfig = {config}\n\n", wasm.display()),
            format!("\"{name}\""),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "[gateway]\nlisten = \"{listen}\"\nadmin = \"{admin}\"\nmetrics_public = true\nplugin_cache = \"{}\"\n\
         max_connections = 20000\nresume_timeout_ms = 5000\n\n\
         [[upstream]]\nname = \"chat\"\nservers = [{}]\n\n\
         {plugin}[[route]]\npath = \"/\"\nupstream = \"chat\"\nplugins = [{chain}]\n",
        dir.join("plugin-cache").display(),
        servers.join(", "),
    )
}

type Ws = WebSocketStream<TcpStream>;

/// What one client's reader saw.
#[derive(Default)]
struct Seen {
    /// "subscribed" answers, after the ones the set-up waited for.
    extra_subscribed: u32,
    /// When the text the harness waits for (`after-<i>`) arrived.
    heard: Option<Instant>,
    /// When the connection ended, and how (1006: without a close frame).
    closed: Option<(Instant, u16)>,
}

struct Client {
    server: String,
    sink: SplitSink<Ws, Message>,
    seen: Arc<Mutex<Seen>>,
}

/// Connects, subscribes to `rooms` and waits for every "subscribed"; then a reader task
/// watches for `expect` and for the end of the connection.
async fn join(entry: SocketAddr, rooms: Vec<String>, expect: String) -> anyhow::Result<Client> {
    let tcp = TcpStream::connect(entry).await?;
    tcp.set_nodelay(true)?;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{entry}/"), tcp).await?;
    for room in &rooms {
        ws.send(Message::text(json!({"type": "subscribe", "channel": room}).to_string())).await?;
    }
    let mut server = String::new();
    let mut waiting = rooms.len();
    while waiting > 0 {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let answer: Value = serde_json::from_str(text.as_str())?;
                if answer["type"] == "subscribed" {
                    server = answer["server"].as_str().unwrap_or("?").to_string();
                    waiting -= 1;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before subscribed"),
        }
    }
    let (sink, mut source) = ws.split();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (at, code) = match source.next().await {
                Some(Ok(Message::Text(text))) => {
                    let message: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    let mut seen = log.lock().unwrap();
                    if message["type"] == "subscribed" {
                        seen.extra_subscribed += 1;
                    } else if message["text"] == expect.as_str() && seen.heard.is_none() {
                        seen.heard = Some(Instant::now());
                    }
                    continue;
                }
                Some(Ok(Message::Close(frame))) => (Instant::now(), frame.map_or(1005, |f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => (Instant::now(), 1006),
            };
            log.lock().unwrap().closed.get_or_insert((at, code));
            return;
        }
    });
    Ok(Client { server, sink, seen })
}

/// Connects clients `first..` until `wanted` of them are on server `on` (at most 3 × wanted
/// in all): client i subscribes to `rooms(i)` and waits for `after-<i>`.
async fn join_until(
    entry: SocketAddr,
    on: &str,
    wanted: usize,
    rooms: impl Fn(usize) -> Vec<String>,
) -> anyhow::Result<Vec<Client>> {
    let mut clients: Vec<Client> = Vec::new();
    let on_count = |clients: &[Client]| clients.iter().filter(|c| c.server == on).count();
    while on_count(&clients) < wanted {
        if clients.len() > 3 * wanted {
            bail!("{} clients connected, only {} on {on}", clients.len(), on_count(&clients));
        }
        let batch = (wanted - on_count(&clients)).clamp(1, SETUP_CONCURRENCY * 4);
        let first = clients.len();
        clients.extend(join_many(entry, first..first + batch, &rooms).await?);
    }
    Ok(clients)
}

/// Connects clients `range` together (`SETUP_CONCURRENCY` at a time); client i subscribes
/// to `rooms(i)` and waits for `after-<i>`.
async fn join_many(
    entry: SocketAddr,
    range: std::ops::Range<usize>,
    rooms: &impl Fn(usize) -> Vec<String>,
) -> anyhow::Result<Vec<Client>> {
    let joined: Vec<anyhow::Result<Client>> = futures_util::stream::iter(range)
        .map(|i| join(entry, rooms(i), format!("after-{i}")))
        .buffered(SETUP_CONCURRENCY)
        .collect()
        .await;
    joined.into_iter().map(|c| c.context("setting up a client")).collect()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The kill rows, in this order.
const KILL_ROWS: [&str; 10] = [
    "clients on the killed server",
    "of them closed",
    "other clients closed",
    "of them heard their message after the kill",
    "kill → first message after re-attach, p50 ms",
    "kill → first message after re-attach, p99 ms",
    "kill → first message after re-attach, max ms",
    "gateway: lost → attached (resume_seconds), mean ms",
    "kill → client closed, p50 ms",
    "duplicate \"subscribed\" seen",
];

async fn kill_round(path: Via, programs: &Programs, dir: &Path, affected: usize) -> anyhow::Result<Outcome> {
    let mut setup = Setup::start(path, programs, dir)?;
    let mut clients = join_until(setup.entry, "c0", affected, |i| vec![format!("r{i}")]).await?;
    // Let the proxy and servers settle after the ramp.
    sleep(Duration::from_secs(1)).await;
    let on_c0: Vec<usize> = (0..clients.len()).filter(|&i| clients[i].server == "c0").collect();

    let overflows_before = listen_overflows();
    let killed = Instant::now();
    setup.kill(0);
    let gone = killed.elapsed();
    for &i in &on_c0 {
        let publish = json!({"type": "publish", "channel": format!("r{i}"), "text": format!("after-{i}")}).to_string();
        // Without the plugin the connection may already be closing: the send may fail.
        let _ = clients[i].sink.send(Message::text(publish)).await;
    }
    let deadline = killed + OUTCOME_LIMIT;
    let done = |c: &Client| {
        let seen = c.seen.lock().unwrap();
        seen.heard.is_some() || seen.closed.is_some()
    };
    while Instant::now() < deadline && !on_c0.iter().all(|&i| done(&clients[i])) {
        sleep(Duration::from_millis(20)).await;
    }
    // Closes of others, or late duplicates, would show within a moment more.
    sleep(Duration::from_millis(500)).await;
    let overflows = listen_overflows().saturating_sub(overflows_before);

    let ms = |at: Instant| at.duration_since(killed).as_secs_f64() * 1e3;
    let mut heard = Vec::new();
    let mut closed = Vec::new();
    let mut duplicates = 0;
    for &i in &on_c0 {
        let seen = clients[i].seen.lock().unwrap();
        heard.extend(seen.heard.map(ms));
        closed.extend(seen.closed.map(|(at, _)| ms(at)));
        duplicates += (seen.extra_subscribed > 0) as usize;
    }
    let others_closed = clients.iter().filter(|c| c.server != "c0" && c.seen.lock().unwrap().closed.is_some()).count();
    heard.sort_by(f64::total_cmp);
    closed.sort_by(f64::total_cmp);
    let gateway_mean = match setup.admin {
        Some(_) => {
            let text = setup.metrics()?;
            let sum = metric(&text, "wasmgate_session_resume_seconds_sum");
            let count = metric(&text, "wasmgate_session_resume_seconds_count");
            let buckets = [0.5, 0.99].map(|q| bucket_quantile(&text, "wasmgate_session_resume_seconds", q) * 1e3);
            let failures = metric(&text, "wasmgate_session_resume_failures_total") + 0.0;
            eprint!("(gateway: {count} resumed, {failures} failed, p50 ≤ {} ms, p99 ≤ {} ms) ", buckets[0], buckets[1]);
            if count > 0.0 { sum / count * 1e3 } else { f64::NAN }
        }
        None => f64::NAN,
    };
    let unresolved = on_c0.len() - on_c0.iter().filter(|&&i| done(&clients[i])).count();
    let trouble = (unresolved > 0).then(|| format!("{unresolved} clients neither heard nor closed within {OUTCOME_LIMIT:?}"));
    eprint!(
        "({} clients in all; c0 gone {:.1} ms after SIGKILL; heard p50 {:.1} ms, closed p50 {:.1} ms) ",
        clients.len(),
        gone.as_secs_f64() * 1e3,
        percentile(&heard, 0.5),
        percentile(&closed, 0.5)
    );
    eprint!(
        "(p90 {:.1} p95 {:.1} ms; over 1 s: {}; listen queue overflows on the machine meanwhile: {overflows}; proxy log: {}) ",
        percentile(&heard, 0.9),
        percentile(&heard, 0.95),
        heard.iter().filter(|&&t| t > 1000.0).count(),
        setup.proxy.log_tail()
    );
    drop(clients);
    Ok(Outcome {
        values: vec![
            on_c0.len() as f64,
            closed.len() as f64,
            others_closed as f64,
            heard.len() as f64,
            percentile(&heard, 0.5),
            percentile(&heard, 0.99),
            heard.last().copied().unwrap_or(f64::NAN),
            gateway_mean,
            percentile(&closed, 0.5),
            duplicates as f64,
        ],
        trouble,
    })
}

/// The upper bound of the histogram bucket holding quantile `q` of `name` (Prometheus
/// text: cumulative `NAME_bucket{le="..."}` lines), in the histogram's unit.
fn bucket_quantile(text: &str, name: &str, q: f64) -> f64 {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"}")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return f64::NAN;
    }
    buckets.iter().find(|(_, count)| *count >= q * total).map_or(f64::NAN, |b| b.0)
}

/// TCP connections the kernel dropped because a listener's accept queue was full (all of
/// the machine's, `TcpExt: ListenOverflows`).
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let [names, values] = lines[..] else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// The sum of a metric's series in Prometheus text, 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// RSS growth of the proxy per idle connection subscribed to two rooms, in KiB.
async fn idle_round(path: Via, programs: &Programs, dir: &Path, n: usize) -> anyhow::Result<Outcome> {
    let setup = Setup::start(path, programs, dir)?;
    let rooms = |i: usize| vec![format!("a{}", i % 50), format!("b{}", i % 50)];
    // Warm up: the first connections instantiate the plugin and fill pools; then gone.
    drop(join_many(setup.entry, 0..50, &rooms).await?);
    sleep(Duration::from_secs(1)).await;
    let before = setup.proxy.rss_kib()?;
    let held = join_many(setup.entry, 0..n, &rooms).await?;
    sleep(Duration::from_secs(2)).await;
    let after = setup.proxy.rss_kib()?;
    let closed = held.iter().filter(|c| c.seen.lock().unwrap().closed.is_some()).count();
    let trouble = (closed > 0).then(|| format!("{closed} idle clients closed"));
    drop(held);
    Ok(Outcome { values: vec![(after as f64 - before as f64) / n as f64], trouble })
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    if options.affected == 0 || !(1..=9).contains(&options.rounds) {
        bail!("--affected must be positive and --rounds between 1 and 9");
    }
    if options.affected > 4_000 || options.idle > 8_000 {
        bail!("at most 4,000 affected and 8,000 idle clients: they live in this process, under its open-file limit");
    }
    proxies::ensure_installed(&[proxies::Target::Nginx])?;
    let nofile = procs::raise_nofile_limit()?;
    let programs = Programs::locate()?;
    let dir = TempDir::new()?;
    let load_at_start = crate::machine::load_average();

    let mut kills: Vec<Vec<anyhow::Result<Outcome>>> = PATHS.iter().map(|_| Vec::new()).collect();
    for round in 1..=options.rounds {
        for (&path, rounds) in PATHS.iter().zip(&mut kills) {
            eprint!("{round} {:>26} kill ", path.name());
            let outcome = kill_round(path, &programs, &dir.0.join(format!("kill-{path:?}-{round}")), options.affected).await;
            match &outcome {
                Ok(o) => eprintln!("{}", o.values.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join("  ")),
                Err(e) => eprintln!("error: {e:#}"),
            }
            rounds.push(outcome);
        }
    }
    let mut idle: Vec<anyhow::Result<Outcome>> = Vec::new();
    if options.idle > 0 {
        for &path in &IDLE_PATHS {
            eprint!("{:>28} idle ", path.name());
            let outcome = idle_round(path, &programs, &dir.0.join(format!("idle-{path:?}")), options.idle).await;
            match &outcome {
                Ok(o) => eprintln!("{:.2} KiB per connection", o.values[0]),
                Err(e) => eprintln!("error: {e:#}"),
            }
            idle.push(outcome);
        }
    }

    let kills: Vec<anyhow::Result<Outcome>> = kills.into_iter().map(load::median).collect();
    let mut table = format!(
        "## Connections that survive their server\n\n{}\n\n\
         Two chat-backend instances (c0, c1) sharing rooms through a hub; the proxy in front of both, \
         round robin. Clients connect until {} are on c0, each subscribed to a room of its own; c0 gets \
         SIGKILL, and right after it each of its clients publishes one message to its room (sent from one \
         task, in order). Time to resume is the client's: from the kill until it hears that message, \
         which the server it was moved to publishes after the replayed subscribe. Median of {} rounds; \
         fresh processes for every cell. Clients, proxy and chat processes share the machine's cores.\n\n\
         | | {} |\n|---|{}\n",
        crate::machine::describe(),
        options.affected,
        options.rounds,
        PATHS.map(Via::name).join(" | "),
        "---:|".repeat(PATHS.len()),
    );
    let cell = |outcome: &anyhow::Result<Outcome>, row: usize, decimals: usize| match outcome {
        Ok(o) if o.values[row].is_nan() => "–".to_string(),
        Ok(o) => format!("{:.*}", decimals, o.values[row]),
        Err(_) => "error".to_string(),
    };
    for (row, label) in KILL_ROWS.iter().enumerate() {
        let decimals = if label.contains("ms") { 1 } else { 0 };
        let cells: Vec<String> = kills.iter().map(|o| cell(o, row, decimals)).collect();
        table.push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
    }
    if options.idle > 0 {
        table.push_str(&format!(
            "\n| {} idle connections, each subscribed to 2 rooms | proxy RSS per connection, KiB |\n|---|---:|\n",
            options.idle
        ));
        for (path, outcome) in IDLE_PATHS.iter().zip(&idle) {
            table.push_str(&format!("| {} | {} |\n", path.name(), cell(outcome, 0, 2)));
        }
    }
    table.push('\n');
    let mut notes = Vec::new();
    for (path, outcome) in PATHS.iter().zip(&kills) {
        match outcome {
            Ok(Outcome { trouble: Some(t), .. }) => notes.push(format!("{}, kill: {t}", path.name())),
            Err(e) => notes.push(format!("{}, kill: error: {e:#}", path.name())),
            _ => {}
        }
    }
    for (path, outcome) in IDLE_PATHS.iter().zip(&idle) {
        match outcome {
            Ok(Outcome { trouble: Some(t), .. }) => notes.push(format!("{}, idle: {t}", path.name())),
            Err(e) => notes.push(format!("{}, idle: error: {e:#}", path.name())),
            _ => {}
        }
    }
    notes.push(
        "RSS per idle connection: the proxy's RSS growth (all its processes) from after 50 warm-up \
         connections to after the idle ones, over their number; the chat processes are not counted."
            .into(),
    );
    notes.push(format!(
        "open-file limit {nofile}; load average at the start {load_at_start}, at the end {}",
        crate::machine::load_average()
    ));
    for note in notes {
        table.push_str(&format!("- {note}\n"));
    }
    println!("{table}");
    if let Some(out) = &options.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE wasmgate_session_resume_seconds histogram\n\
        wasmgate_session_resume_seconds_bucket{le=\"0.1\"} 10\n\
        wasmgate_session_resume_seconds_bucket{le=\"0.25\"} 95\n\
        wasmgate_session_resume_seconds_bucket{le=\"0.5\"} 100\n\
        wasmgate_session_resume_seconds_bucket{le=\"+Inf\"} 100\n\
        wasmgate_session_resume_seconds_sum 17.5\n\
        wasmgate_session_resume_seconds_count 100\n\
        wasmgate_session_resumed_total{reason=\"server_gone\"} 60\n\
        wasmgate_session_resumed_total{reason=\"drained\"} 40\n";

    #[test]
    fn histogram_quantiles_are_bucket_bounds() {
        assert_eq!(bucket_quantile(TEXT, "wasmgate_session_resume_seconds", 0.5), 0.25);
        assert_eq!(bucket_quantile(TEXT, "wasmgate_session_resume_seconds", 0.99), 0.5);
        assert_eq!(bucket_quantile(TEXT, "wasmgate_session_resume_seconds", 0.1), 0.1);
        assert!(bucket_quantile("", "wasmgate_session_resume_seconds", 0.5).is_nan());
    }

    #[test]
    fn metrics_sum_their_series_and_not_longer_names() {
        assert_eq!(metric(TEXT, "wasmgate_session_resumed_total"), 100.0);
        assert_eq!(metric(TEXT, "wasmgate_session_resume_seconds_count"), 100.0);
        assert_eq!(metric(TEXT, "wasmgate_session_resume_seconds"), 0.0, "only _bucket, _sum and _count exist");
    }

    #[test]
    fn percentiles_round_up() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&sorted, 0.5), percentile(&sorted, 0.99)), (50.0, 99.0));
        assert!(percentile(&[], 0.5).is_nan());
    }
}
