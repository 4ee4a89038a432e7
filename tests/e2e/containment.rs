//! Plugin containment end to end: hostile plugins (tests/plugins/hostile-*) loaded into the
//! real gateway binary, attacked over real sockets, while a route without plugins is
//! measured. Each test checks what issue #19 promises:
//! - the clean route keeps answering within normal latency while the hostile one is hammered;
//! - the attacked connection gets what its `on_error` says (503 / close 1011 for "deny",
//!   carrying on for "allow"), or the error the plugin chose to answer with;
//! - the gateway's memory stays within a stated bound;
//! - counters stay consistent: `wasmgate_connections_active` returns to 0 and every relayed
//!   connection's `on_close` ran.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::{self, Message};
use wasmgate_tests::*;

/// Generous on purpose: the normal figure is about a millisecond; a stalled worker is seconds.
const CLEAN_ROUTE_MEDIAN_LIMIT: Duration = Duration::from_millis(200);

/// The gateway binary, run as operators run it, so its memory is its own.
struct GatewayProcess {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    /// What the gateway wrote to stderr (its log), up to `LOG_KEPT` bytes.
    log: Arc<Mutex<String>>,
    _dir: TempDir,
}

/// Log bytes kept from a gateway; the rest is read and dropped so the pipe never fills.
const LOG_KEPT: usize = 16 << 20;

impl GatewayProcess {
    /// Starts `wasmgate run` on `config`, whose `[gateway]` table must say `listen` and
    /// `admin` as `LISTEN` and `ADMIN` (filled in here).
    fn start(config: &str) -> GatewayProcess {
        let dir = TempDir::new("containment");
        let admin = dead_address();
        let path = dir.0.join("gateway.toml");
        let text = config
            .replace("LISTEN", "127.0.0.1:0")
            .replace("ADMIN", &admin.to_string())
            .replace("TOKEN", ADMIN_TOKEN)
            .replace("CACHE", &dir.0.join("cache").display().to_string());
        std::fs::write(&path, text).unwrap();
        let mut child = Command::new(gateway_binary())
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "error")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let kept = log.clone();
        std::thread::spawn(move || {
            let mut line = Vec::new();
            while stderr.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let mut log = kept.lock().unwrap();
                if log.len() < LOG_KEPT {
                    log.push_str(&String::from_utf8_lossy(&line));
                }
                line.clear();
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().rsplit("ws://").next().unwrap().parse().unwrap_or_else(|_| panic!("first line {line:?}"));
        GatewayProcess { child, addr, admin, log, _dir: dir }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    fn rss_mib(&self) -> u64 {
        rss_kib(self.child.id()) / 1024
    }

    async fn admin(&self, path: &str) -> String {
        let admin = self.admin;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
        );
        let (status, text) = raw_http(self.admin, &request).await;
        assert_eq!(status, 200, "{path}: {text}");
        text[text.find("\r\n\r\n").unwrap() + 4..].to_string()
    }

    /// Waits until no connection is open and `on_close` ran as often as expected: for each
    /// plugin named in `closes`, the count its `closes_total` metric should reach.
    async fn assert_settled(&self, closes: &HashMap<String, u64>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = self.admin("/metrics").await;
            let active = metric_sum(&metrics, "wasmgate_connections_active");
            let wrong: Vec<String> = closes
                .iter()
                .filter_map(|(plugin, &want)| {
                    let got = metric_sum(&metrics, &format!("wasmgate_plugin_{plugin}__closes_total"));
                    (got != want as f64).then(|| format!("{plugin}: on_close {got} of {want}"))
                })
                .collect();
            if active == 0.0 && wrong.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "active {active}; {wrong:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory of its own, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = wasmgate_tests::scratch_dir(&format!("{tag}-{n}"));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `[gateway]` (with the placeholders `GatewayProcess::start` fills), the `echo` upstream,
/// plugin tables, and routes `(path, chain)`; `/clean` has no plugins.
fn config(backend: &EchoServer, plugins: &str, routes: &[(String, String)]) -> String {
    let mut text = format!(
        "[gateway]\nlisten = \"LISTEN\"\nadmin = \"ADMIN\"\nadmin_token = \"TOKEN\"\nplugin_cache = \"CACHE\"\n\n\
         [[upstream]]\nname = \"echo\"\nservers = [\"{}\"]\nconnect_timeout_ms = 2000\n\n{plugins}\n\
         [[route]]\npath = \"/clean\"\nupstream = \"echo\"\n\n",
        backend.addr
    );
    for (path, chain) in routes {
        text.push_str(&format!("[[route]]\npath = \"{path}\"\nupstream = \"echo\"\nplugins = [{chain}]\n\n"));
    }
    text
}

fn plugin(name: &str, krate: &str, extra: &str) -> String {
    format!("[[plugin]]\nname = \"{name}\"\nwasm = \"{}\"\n{extra}\n\n", plugin_wasm(krate).display())
}

/// Median time of 20 handshakes plus one echoed message on the route without plugins.
async fn clean_route_median(gw: &GatewayProcess) -> Duration {
    let mut times = Vec::with_capacity(20);
    for _ in 0..20 {
        let start = Instant::now();
        let mut ws = connect(&gw.url("/clean")).await;
        assert_eq!(roundtrip(&mut ws, Message::text("ping")).await, Message::text("ping"));
        times.push(start.elapsed());
        let _ = ws.close(None).await;
    }
    times.sort();
    times[times.len() / 2]
}

/// Runs `attack` in `clients` loops until the returned guard is stopped; counts rounds.
struct Hammer {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Hammer {
    fn start<F, Fut>(clients: usize, attack: F) -> Hammer
    where
        F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, rounds, attack) = (stop.clone(), rounds.clone(), attack.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        attack(rounds.fetch_add(1, Ordering::Relaxed)).await;
                    }
                })
            })
            .collect();
        Hammer { stop, rounds, tasks }
    }

    /// Stops the loops and returns how many rounds ran.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("an attack round failed");
        }
        self.rounds.load(Ordering::Relaxed)
    }
}

/// What a handshake got: a 101, or the refusal's status and body.
async fn handshake(url: &str) -> Result<Client, (u16, String)> {
    match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url)).await {
        Err(_) => panic!("{url}: no answer within 10 s"),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            Err((response.status().as_u16(), body))
        }
        Ok(Err(e)) => panic!("{url}: {e}"),
    }
}

/// Sends one message and returns what came back: the echo or reply, or the close code.
async fn message_outcome(ws: &mut Client, text: &str) -> Result<String, u16> {
    ws.send(Message::text(text.to_string())).await.expect("send");
    match next_data(ws).await {
        Message::Text(t) => Ok(t.to_string()),
        Message::Close(frame) => Err(frame.map_or(1005, |f| u16::from(f.code))),
        other => panic!("unexpected {other:?}"),
    }
}

/// Every WASI interface std links, from a handshake hook and from a message hook, under
/// both policies; the sockets case (`udp-bind`, which made wasmtime-wasi panic the worker)
/// and the trapping ones hammered while the clean route is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_calls_end_as_errors_or_traps_that_follow_on_error() {
    let backend = EchoServer::start("127.0.0.1:0", "b0").await.unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    // op, whether the plugin sees an error (418 / close 4418) rather than trapping.
    let ops = [
        ("udp-bind", true),
        ("udp-send", true),
        ("tcp-connect", true),
        ("tcp-listen", true),
        ("dns", true),
        ("fs-read", true),
        ("fs-write", true),
        ("sleep", false),
        ("exit", false),
        ("abort", false),
    ];
    let mut plugins = String::new();
    let mut routes = Vec::new();
    for (op, _) in ops {
        for hook in ["handshake", "message"] {
            for policy in ["deny", "allow"] {
                let name = format!("{}_{hook}_{policy}", op.replace('-', "_"));
                let config = format!("config = {{ op = \"{op}\", hook = \"{hook}\", target = \"{target}\" }}\non_error = \"{policy}\"");
                plugins.push_str(&plugin(&name, "hostile-wasi", &config));
                routes.push((format!("/{name}"), format!("\"{name}\"")));
            }
        }
    }
    let gw = GatewayProcess::start(&config(&backend, &plugins, &routes));
    let normal = clean_route_median(&gw).await;

    let mut relayed: HashMap<String, u64> = HashMap::new();
    for (op, sees_error) in ops {
        for hook in ["handshake", "message"] {
            for policy in ["deny", "allow"] {
                let name = format!("{}_{hook}_{policy}", op.replace('-', "_"));
                let url = gw.url(&format!("/{name}"));
                let what = format!("{op} in {hook}, on_error {policy}");
                match (hook, sees_error, policy) {
                    ("handshake", true, _) => {
                        let (status, body) = handshake(&url).await.err().unwrap_or_else(|| panic!("{what}: accepted"));
                        assert_eq!(status, 418, "{what}: {body}");
                        assert!(body.starts_with(&format!("{op}: ")), "{what}: {body}");
                    }
                    ("handshake", false, "deny") => {
                        let (status, body) = handshake(&url).await.err().unwrap_or_else(|| panic!("{what}: accepted"));
                        assert_eq!((status, body.trim()), (503, format!("plugin {name} failed: trap").as_str()), "{what}");
                    }
                    ("handshake", false, _) => {
                        let mut ws = handshake(&url).await.unwrap_or_else(|e| panic!("{what}: {e:?}"));
                        assert_eq!(message_outcome(&mut ws, "hi").await, Ok("hi".into()), "{what}");
                        ws.close(None).await.unwrap();
                        *relayed.entry(name.clone()).or_default() += 1;
                    }
                    (_, sees_error, policy) => {
                        let mut ws = handshake(&url).await.unwrap_or_else(|e| panic!("{what}: {e:?}"));
                        let got = message_outcome(&mut ws, "hi").await;
                        let want = match (sees_error, policy) {
                            (true, _) => Err(4418),
                            (false, "deny") => Err(1011),
                            (false, _) => Ok("hi".to_string()),
                        };
                        assert_eq!(got, want, "{what}");
                        if got.is_ok() {
                            ws.close(None).await.unwrap();
                        }
                        *relayed.entry(name.clone()).or_default() += 1;
                    }
                }
            }
        }
    }

    // Hammer the sockets case and the traps, from both hooks, while timing the clean route.
    let rss_before = gw.rss_mib();
    let urls: Arc<Vec<String>> = Arc::new(
        ["udp_bind_handshake_deny", "udp_bind_message_deny", "sleep_handshake_deny", "exit_message_deny", "abort_message_allow"]
            .iter()
            .map(|r| gw.url(&format!("/{r}")))
            .collect(),
    );
    let attacks = Hammer::start(4, {
        let urls = urls.clone();
        move |round| {
            let url = urls[round as usize % urls.len()].clone();
            async move {
                if let Ok(mut ws) = handshake(&url).await {
                    let _ = message_outcome(&mut ws, "x").await;
                }
            }
        }
    });
    let rounds = clean_route_holds(&gw, attacks, "wasi", normal, rss_before).await;
    // Round r attacked urls[r % 5]; on the message routes each relayed one connection.
    for (i, name) in [(1, "udp_bind_message_deny"), (3, "exit_message_deny"), (4, "abort_message_allow")] {
        let n = rounds / 5 + u64::from(rounds % 5 > i);
        *relayed.entry(name.to_string()).or_default() += n;
    }
    gw.assert_settled(&relayed).await;
    // Nothing reached the listener.
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "a plugin connected out");
}

/// Plugins abusing the `metrics` import and the log: a 4 MiB label, a series per
/// connection, another plugin's metric name, updates from calls that then fail, 10,000
/// updates in one call, forged and huge log records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_metrics_and_logs_are_bounded_and_namespaced() {
    let backend = EchoServer::start("127.0.0.1:0", "b0").await.unwrap();
    let hostile = |name: &str, op: &str, extra: &str| {
        plugin(name, "hostile-metrics", &format!("config = {{ op = \"{op}\" }}\non_error = \"allow\"\n{extra}"))
    };
    let plugins = [
        hostile("huge", "huge-label", "memory_limit_mb = 32\ntimeout_ms = 500"),
        hostile("many", "many-series", "max_metric_series = 50"),
        hostile("steal", "steal", ""),
        hostile("fail", "fail-after-metric", ""),
        hostile("burst", "many-updates", "timeout_ms = 500"),
        hostile("log", "log-forge", "timeout_ms = 500"),
        plugin("limits", "rate-limit", "config = { connections_per_window = 2, window_secs = 3600 }"),
    ]
    .concat();
    let routes: Vec<(String, String)> = [
        ("/huge", "\"huge\""),
        ("/many", "\"many\""),
        ("/limited", "\"steal\", \"limits\""),
        ("/fail", "\"fail\""),
        ("/burst", "\"burst\""),
        ("/log", "\"log\""),
    ]
    .iter()
    .map(|(p, c)| (p.to_string(), c.to_string()))
    .collect();
    let gw = GatewayProcess::start(&config(&backend, &plugins, &routes));
    let normal = clean_route_median(&gw).await;
    let rss_before = gw.rss_mib();

    // Another plugin's name: the stealer's gauge is its own, the limiter still counts.
    for expect in [101, 101, 429] {
        let got = handshake(&gw.url("/limited")).await.map_or_else(|(status, _)| status, |_| 101);
        assert_eq!(got, expect);
    }
    let metrics = gw.admin("/metrics").await;
    assert_eq!(metric_sum(&metrics, "wasmgate_plugin_limits__rate_limit_refused_total"), 1.0, "{metrics}");
    assert_eq!(metric_sum(&metrics, "wasmgate_plugin_steal__rate_limit_refused_total"), -1.0, "{metrics}");

    // Huge labels and bursts of updates, hammered, while the clean route is measured.
    let urls = Arc::new([gw.url("/huge"), gw.url("/burst"), gw.url("/many"), gw.url("/fail")]);
    let attacks = Hammer::start(4, {
        let urls = urls.clone();
        move |round| {
            let url = urls[round as usize % urls.len()].clone();
            async move {
                let mut ws = handshake(&url).await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
                let _ = ws.close(None).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let under_attack = clean_route_median(&gw).await;
    // At least 200 handshakes with a 4 MiB label, as in the issue.
    while attacks.rounds.load(Ordering::Relaxed) < 800 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rounds = attacks.stop().await;
    for _ in 0..5 {
        handshake(&gw.url("/log")).await.unwrap();
    }
    let rss_after = gw.rss_mib();
    let metrics = gw.admin("/metrics").await;
    println!(
        "metrics: clean route median {normal:?} alone, {under_attack:?} during {rounds} attacks; \
         RSS {rss_before} -> {rss_after} MiB; /metrics {} bytes",
        metrics.len()
    );
    assert!(under_attack < CLEAN_ROUTE_MEDIAN_LIMIT, "{under_attack:?}");
    assert!(rss_after < rss_before + 64, "RSS {rss_before} -> {rss_after} MiB");
    assert!(metrics.len() < 64 * 1024, "/metrics is {} bytes", metrics.len());
    let series = |name: &str| metrics.lines().filter(|l| l.starts_with(name)).count();
    assert_eq!(series("wasmgate_plugin_huge__"), 0, "no 4 MiB label was kept");
    assert_eq!(series("wasmgate_plugin_many__per_conn_total{"), 50, "a series per connection, up to its budget");
    assert_eq!(series("wasmgate_plugin_fail__"), 0, "calls that failed left no series");
    assert_eq!(series("wasmgate_plugin_burst__burst_total{"), 64, "64 updates per call");
    let refused = |plugin: &str| {
        metric_sum(&metrics, &format!("wasmgate_plugins_refused_writes_total{{plugin=\"{plugin}\",what=\"metric\"}}"))
    };
    assert!(refused("huge") >= 200.0 && refused("many") > 0.0 && refused("burst") > 9_000.0, "{metrics}");
    let plugins = gw.admin("/plugins").await;
    assert!(plugins.contains("\"metric_series\": 50") && plugins.contains("\"max_metric_series\": 50"), "{plugins}");

    // The log: one line per record, no terminal escapes, records cut.
    let log = gw.log();
    assert!(log.contains("FORGED RECORD"), "the record was logged:\n{log}");
    assert!(!log.lines().any(|l| l.starts_with("2030-01-01")), "a forged record:\n{log}");
    assert!(!log.contains('\x1b') && !log.contains('\u{202E}'), "raw escapes in the log");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 8 * 1024, "a log line of {longest} bytes");
    assert!(log.contains("more bytes cut"), "{}", &log[..log.len().min(2000)]);
}

/// A backend that resets any upgrade request carrying `x-poison` and accepts the others
/// (then holds the connection until the client leaves): a strict server that a plugin's
/// valid but unwelcome header upsets.
async fn strict_backend() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                if head.to_ascii_lowercase().contains("x-poison") {
                    // Dropped with a zero linger: a reset, which is the point (the deprecation
                    // is about blocking on drop, which a zero linger does not).
                    #[allow(deprecated)]
                    let _ = stream.set_linger(Some(Duration::ZERO));
                    return;
                }
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {}\r\n\r\n",
                    accept_for(&head)
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let mut sink = [0u8; 1024];
                while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    addr
}

/// Handshake plugins answering with what would corrupt or bloat the upstream request (or
/// the refusal): each answer fails the call and `on_error` decides; with "allow" the
/// upstream sees none of it. A valid header that makes a strict upstream reset does not get
/// the server ejected for the other routes of its pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_plugins_add_toward_the_upstream_is_valid_and_bounded() {
    let backend = EchoServer::start("127.0.0.1:0", "b0").await.unwrap();
    let strict = strict_backend().await;
    let bad_ops = [
        "framing", "chunked", "connection", "upgrade", "second-key", "host", "crlf", "control", "non-ascii",
        "huge-value", "many", "bad-name", "remove-host", "remove-key", "path-huge", "path-authority",
        "path-fragment", "path-dots", "path-space", "path-non-ascii", "path-relative", "subprotocol-bad",
        "reject-framing", "reject-huge-reason", "pool-huge",
    ];
    let mut plugins = String::new();
    let mut routes = Vec::new();
    let mut add = |name: String, op: &str, policy: &str, upstream: &str| {
        plugins.push_str(&plugin(&name, "hostile-headers", &format!("config = {{ op = \"{op}\" }}\non_error = \"{policy}\"")));
        routes.push((format!("/{name}"), format!("\"{name}\""), upstream.to_string()));
    };
    for op in bad_ops {
        for policy in ["deny", "allow"] {
            add(format!("{}_{policy}", op.replace('-', "_")), op, policy, "echo");
        }
    }
    add("ok".into(), "ok", "deny", "echo");
    add("poison".into(), "poison", "deny", "strict");
    let mut text = config(&backend, &plugins, &[]);
    text.push_str(&format!(
        "[[upstream]]\nname = \"strict\"\nservers = [\"{strict}\"]\neject_after = 3\n\n\
         [[route]]\npath = \"/clean-strict\"\nupstream = \"strict\"\n\n"
    ));
    for (path, chain, upstream) in &routes {
        text.push_str(&format!("[[route]]\npath = \"{path}\"\nupstream = \"{upstream}\"\nplugins = [{chain}]\n\n"));
    }
    let gw = GatewayProcess::start(&text);
    let normal = clean_route_median(&gw).await;

    for op in bad_ops {
        let name = format!("{}_deny", op.replace('-', "_"));
        let (status, body) = handshake(&gw.url(&format!("/{name}"))).await.err().unwrap_or_else(|| panic!("{op}: accepted"));
        assert_eq!((status, body.trim()), (503, format!("plugin {name} failed: invalid").as_str()), "{op}");
        // "allow": as if the plugin were not there; the upstream sees nothing of its answer.
        let name = format!("{}_allow", op.replace('-', "_"));
        let mut ws = handshake(&gw.url(&format!("/{name}"))).await.unwrap_or_else(|e| panic!("{op} allow: {e:?}"));
        let Message::Text(seen) = roundtrip(&mut ws, Message::text("headers")).await else { panic!() };
        let seen = seen.to_ascii_lowercase();
        for leaked in ["x-injected", "content-length", "transfer-encoding", "h2c", "admin.internal", "x-0:", "x-a:"] {
            assert!(!seen.contains(leaked), "{op} allow: {leaked} reached the upstream:\n{seen}");
        }
        ws.close(None).await.unwrap();
    }
    let mut ws = handshake(&gw.url("/ok")).await.unwrap();
    let Message::Text(seen) = roundtrip(&mut ws, Message::text("headers")).await else { panic!() };
    assert!(seen.contains("x-fine: 1"), "{seen}");
    ws.close(None).await.unwrap();

    // A strict upstream resets what the poison plugin sends, many times over: the clients
    // of that route get 502s, and the pool's other route keeps its server.
    for _ in 0..10 {
        let (status, body) = handshake(&gw.url("/poison")).await.expect_err("the poisoned request is reset");
        assert_eq!(status, 502, "{body}");
    }
    let mut clean = handshake(&gw.url("/clean-strict")).await.expect("the server was not ejected");
    clean.close(None).await.unwrap();
    let upstreams: serde_json::Value = serde_json::from_str(&gw.admin("/upstreams").await).unwrap();
    let strict_pool = upstreams["pools"].as_array().unwrap().iter().find(|p| p["name"] == "strict").unwrap();
    assert_eq!(strict_pool["servers"][0]["ejected_for_ms"], 0, "{strict_pool}");
    assert_eq!(strict_pool["servers"][0]["available"], true, "{strict_pool}");

    // 1 MiB values, 10,000 headers and 1 MiB paths, hammered.
    let rss_before = gw.rss_mib();
    let urls = Arc::new(["/huge_value_deny", "/many_deny", "/path_huge_deny", "/reject_huge_reason_deny"].map(|p| gw.url(p)));
    let attacks = Hammer::start(4, {
        let urls = urls.clone();
        move |round| {
            let url = urls[round as usize % urls.len()].clone();
            async move {
                let (status, _) = handshake(&url).await.expect_err("refused");
                assert_eq!(status, 503);
            }
        }
    });
    clean_route_holds(&gw, attacks, "headers", normal, rss_before).await;
    gw.assert_settled(&HashMap::new()).await;
}

/// A plugin filling the kv store fills only its own share: it is told when it is full, and
/// the rate-limit plugin beside it keeps counting. A rate limit whose own share is full
/// refuses what it cannot count (503), unless its operator chose to let it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_filling_the_kv_store_fills_only_its_own_share() {
    let backend = EchoServer::start("127.0.0.1:0", "b0").await.unwrap();
    let limit = |extra: &str| format!("config = {{ connections_per_window = 3, window_secs = 3600{extra} }}");
    let plugins = [
        plugin("hog", "hostile-kv", "config = { op = \"fill\" }\nkv_max_keys = 100000\nkv_max_bytes = 1048576\ntimeout_ms = 1000"),
        plugin("counters", "hostile-kv", "config = { op = \"counters\" }\nkv_max_keys = 500\ntimeout_ms = 1000"),
        plugin("huge", "hostile-kv", "config = { op = \"huge\" }\nmemory_limit_mb = 64\ntimeout_ms = 1000"),
        plugin("limits", "rate-limit", &limit("")),
        plugin("starved", "rate-limit", &format!("{}\nkv_max_bytes = 16", limit(""))),
        plugin("lenient", "rate-limit", &format!("{}\nkv_max_bytes = 16", limit(", uncounted = \"allow\""))),
    ]
    .concat();
    let routes: Vec<(String, String)> = ["hog", "counters", "huge", "limits", "starved", "lenient"]
        .iter()
        .map(|n| (format!("/{n}"), format!("\"{n}\"")))
        .collect();
    let gw = GatewayProcess::start(&config(&backend, &plugins, &routes));
    let normal = clean_route_median(&gw).await;
    let rss_before = gw.rss_mib();

    let seen = |path: &'static str| {
        let url = gw.url(path);
        async move {
            let mut ws = handshake(&url).await.unwrap_or_else(|e| panic!("{path}: {e:?}"));
            let Message::Text(headers) = roundtrip(&mut ws, Message::text("headers")).await else { panic!() };
            ws.close(None).await.unwrap();
            let line = headers.lines().find_map(|l| l.strip_prefix("x-kv: ")).unwrap_or_else(|| panic!("{headers}"));
            line.to_string()
        }
    };
    // The hog fills its 1 MiB share (1 KiB values plus key and overhead), then is refused.
    let first = seen("/hog").await;
    let stored: u64 = first.strip_prefix("stored ").and_then(|r| r.split(',').next()?.parse().ok()).unwrap();
    assert!((900..=1024).contains(&stored) && first.ends_with("full"), "{first}");
    assert_eq!(seen("/hog").await, "stored 0, full");
    assert_eq!(seen("/counters").await, "stored 500, full", "kv_max_keys bounds counters");
    assert_eq!(seen("/huge").await, "full", "a value larger than the share");
    // The limiter beside them still counts: three connections, then 429.
    for expect in [101, 101, 101, 429] {
        let got = handshake(&gw.url("/limits")).await.map_or_else(|(status, _)| status, |_| 101);
        assert_eq!(got, expect);
    }
    // A limiter whose own share is full refuses what it cannot count, or lets it through
    // when its operator said so.
    let (status, body) = handshake(&gw.url("/starved")).await.expect_err("refused");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot count"), "{body}");
    for _ in 0..5 {
        handshake(&gw.url("/lenient")).await.expect("uncounted = allow");
    }
    let plugins: serde_json::Value = serde_json::from_str(&gw.admin("/plugins").await).unwrap();
    let hog = plugins.as_array().unwrap().iter().find(|p| p["name"] == "hog").unwrap();
    assert_eq!(hog["kv_keys"], stored, "{hog}");
    assert!(hog["kv_bytes"].as_u64().unwrap() <= 1 << 20, "{hog}");
    let metrics = gw.admin("/metrics").await;
    assert!(metric_sum(&metrics, "wasmgate_plugins_refused_writes_total{plugin=\"hog\",what=\"kv\"}") >= 2.0, "{metrics}");

    // Hammered: memory stays with the shares.
    let url = gw.url("/hog");
    let attacks = Hammer::start(4, move |_| {
        let url = url.clone();
        async move {
            let mut ws = handshake(&url).await.expect("accepted");
            let _ = ws.close(None).await;
        }
    });
    clean_route_holds(&gw, attacks, "kv", normal, rss_before).await;
    gw.assert_settled(&HashMap::new()).await;
}

/// Plugins whose later instances are slow to start (800 ms of `init`) or fail to, and whose
/// every call traps so each call needs a new instance: the instances are made off the
/// connection path, a call waits at most its deadline for one, and a plugin that keeps
/// failing rests instead of being restarted in a loop, visibly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_made_off_the_connection_path() {
    let backend = EchoServer::start("127.0.0.1:0", "b0").await.unwrap();
    let plugins = [
        plugin("slow", "hostile-slow-init", "config = { slow_ms = 800, trap = true }"),
        plugin("failing", "hostile-slow-init", "config = { fail = true, trap = true }"),
        plugin("slow_ok", "hostile-slow-init", "config = { slow_ms = 800 }\non_error = \"allow\""),
    ]
    .concat();
    let routes: Vec<(String, String)> =
        ["slow", "failing", "slow_ok"].iter().map(|n| (format!("/{n}"), format!("\"{n}\""))).collect();
    let gw = GatewayProcess::start(&config(&backend, &plugins, &routes));
    let normal = clean_route_median(&gw).await;
    let rss_before = gw.rss_mib();

    // Every call on these routes fails (a trap, or no instance within 20 ms): 503, fast.
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let urls = Arc::new([gw.url("/slow"), gw.url("/failing")]);
    let attacks = Hammer::start(4, {
        let (urls, slowest) = (urls.clone(), slowest.clone());
        move |round| {
            let url = urls[round as usize % 2].clone();
            let slowest = slowest.clone();
            async move {
                let start = Instant::now();
                let (status, body) = handshake(&url).await.expect_err("refused");
                assert_eq!(status, 503, "{body}");
                let took = start.elapsed();
                let mut slowest = slowest.lock().unwrap();
                *slowest = (*slowest).max(took);
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let under_attack = clean_route_median(&gw).await;
    // A route whose plugin works but whose new instances are slow keeps working meanwhile.
    for _ in 0..10 {
        let mut ws = handshake(&gw.url("/slow_ok")).await.expect("allowed");
        ws.close(None).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rounds = attacks.stop().await;
    let rss_after = gw.rss_mib();
    let slowest = *slowest.lock().unwrap();
    println!(
        "instances: clean route median {normal:?} alone, {under_attack:?} during {rounds} attacks \
         (slowest refusal {slowest:?}); RSS {rss_before} -> {rss_after} MiB"
    );
    assert!(under_attack < CLEAN_ROUTE_MEDIAN_LIMIT, "{under_attack:?}");
    assert!(slowest < Duration::from_millis(500), "a refusal took {slowest:?}");
    assert!(rss_after < rss_before + 64, "RSS {rss_before} -> {rss_after} MiB");

    // The failing plugin rests, and says so; the slow one was not made to fail at all.
    let plugins: serde_json::Value = serde_json::from_str(&gw.admin("/plugins").await).unwrap();
    let info = |name: &str| plugins.as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone();
    let failing = info("failing");
    let failures = failing["instance_failures"].as_u64().unwrap();
    assert!((1..=6).contains(&failures), "restarted in a loop: {failing}");
    assert!(failing["last_instance_error"].as_str().unwrap().contains("fails on purpose"), "{failing}");
    assert_eq!(info("slow")["instance_failures"], 0, "{}", info("slow"));
    let metrics = gw.admin("/metrics").await;
    assert_eq!(metric_sum(&metrics, "wasmgate_plugins_instance_failures_total{plugin=\"failing\"}"), failures as f64);
    assert_eq!(metric_sum(&metrics, "wasmgate_plugins_backing_off{plugin=\"failing\"}"), 1.0, "{metrics}");
    assert!(metric_sum(&metrics, "wasmgate_plugins_errors_total{kind=\"unavailable\",plugin=\"slow\"}") > 0.0, "{metrics}");
    gw.assert_settled(&HashMap::new()).await;
}

/// A call's `timeout_ms` is time it runs, not time on the clock: a gateway descheduled in
/// the middle of calls, for longer than their timeout (a machine busy with a reconnect
/// storm, a VM's stolen time; here the whole process stopped with SIGSTOP), fails none of
/// them, while a call that keeps computing is still stopped at its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_count_running_time_not_time_descheduled() {
    const TIMEOUT_MS: u64 = 20;
    const STOPS: u32 = 20;
    const STOPPED: Duration = Duration::from_millis(4 * TIMEOUT_MS);
    let backend = EchoServer::start("127.0.0.1:0", "b0").await.unwrap();
    let plugins = [
        plugin("work", "steady-work", &format!("config = {{ work_ms = 4 }}\ntimeout_ms = {TIMEOUT_MS}")),
        plugin("spin", "hostile-loop", &format!("timeout_ms = {TIMEOUT_MS}")),
    ]
    .concat();
    let routes = [("/work".to_string(), "\"work\"".to_string()), ("/spin".to_string(), "\"spin\"".to_string())];
    let gw = GatewayProcess::start(&config(&backend, &plugins, &routes));

    // Four clients handshake back to back: each call computes 4 ms, so both workers are
    // nearly always inside one when the process is stopped.
    let url = gw.url("/work");
    let clients = Hammer::start(4, move |_| {
        let url = url.clone();
        async move {
            let mut ws = handshake(&url).await.unwrap_or_else(|(status, body)| panic!("refused: {status} {body}"));
            let _ = ws.close(None).await;
        }
    });
    let pid = gw.child.id().to_string();
    let signal = |name: &str| assert!(Command::new("kill").args([name, &pid]).status().unwrap().success());
    for i in 0..STOPS {
        // Uneven gaps, so the stops land at different points of the calls.
        tokio::time::sleep(Duration::from_millis(15 + (i as u64 * 7) % 11)).await;
        signal("-STOP");
        std::thread::sleep(STOPPED);
        signal("-CONT");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rounds = clients.stop().await;

    let metrics = gw.admin("/metrics").await;
    let calls = metric_sum(&metrics, "wasmgate_plugin_call_seconds_count{hook=\"handshake\",plugin=\"work\"}");
    // Calls that took longer on the clock than the process was stopped: cut by a stop.
    let within = metric_sum(&metrics, "wasmgate_plugin_call_seconds_bucket{hook=\"handshake\",plugin=\"work\",le=\"0.05\"}");
    let failed = metric_sum(&metrics, "wasmgate_plugins_errors_total{kind=\"timeout\",plugin=\"work\"}");
    println!("descheduled: {rounds} handshakes, {calls} calls, {} cut by {STOPS} stops of {STOPPED:?}, {failed} timed out", calls - within);
    assert!(calls - within >= (STOPS / 2) as f64, "the stops did not land in calls: {}", calls - within);
    assert_eq!(failed, 0.0, "calls failed for time they were descheduled: {metrics}");

    // A call that never ends is stopped all the same: 503 (on_error "deny"), soon.
    let started = Instant::now();
    let (status, body) = handshake(&gw.url("/spin")).await.expect_err("refused");
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    let metrics = gw.admin("/metrics").await;
    assert_eq!(metric_sum(&metrics, "wasmgate_plugins_errors_total{kind=\"timeout\",plugin=\"spin\"}"), 1.0);
    gw.assert_settled(&HashMap::new()).await;
}

/// While `attacks` run, the route without plugins keeps its latency and RSS stays within
/// 64 MiB of `rss_before`; stops the attacks and returns how many rounds ran.
async fn clean_route_holds(gw: &GatewayProcess, attacks: Hammer, what: &str, normal: Duration, rss_before: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let under_attack = clean_route_median(gw).await;
    let rounds = attacks.stop().await;
    let rss_after = gw.rss_mib();
    println!(
        "{what}: clean route median {normal:?} alone, {under_attack:?} during {rounds} attacks; RSS {rss_before} -> {rss_after} MiB"
    );
    assert!(under_attack < CLEAN_ROUTE_MEDIAN_LIMIT, "{under_attack:?}");
    assert!(rss_after < rss_before + 64, "RSS {rss_before} -> {rss_after} MiB");
    rounds
}
