//! Several gateways as one: gateways sharing one real `redis-server` (started by each test
//! on a free port, without persistence) count a per-IP limit once, keep one round-robin
//! turn, hash a key to the same server, balance least-conn over the backends' total; keep
//! serving under each `kv_unavailable` mode while Redis is stopped and share again once it
//! is back; and a gateway process killed with SIGKILL leaves `GET /cluster` with its lease.
//!
//! Needs `redis-server` on the PATH (Debian package redis-server).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// A `redis-server` on a loopback port, killed when dropped.
struct Redis {
    port: u16,
    process: Option<KillOnDrop>,
}

impl Redis {
    async fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Redis { port, process: None };
        redis.restart().await;
        redis
    }

    /// Starts it (again) on its port, empty, and waits until it answers PING.
    async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (Debian package redis-server)");
        self.process = Some(KillOnDrop(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers().await {
            assert!(Instant::now() < deadline, "redis-server did not answer on port {}", self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop(&mut self) {
        self.process = None;
    }

    async fn answers(&self) -> bool {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else { return false };
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").await.is_ok() && matches!(s.read(&mut buf).await, Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// A plugin table; `krate` is a crate name under plugins/.
fn plugin(name: &str, krate: &str, extra: &str) -> String {
    format!("[[plugin]]\nname = \"{name}\"\nwasm = \"{}\"\n{extra}\n", plugin_wasm(krate).display())
}

/// A gateway in the cluster of `redis`: upstream `echo` over `backends` with
/// `upstream_extra`, then `rest` (plugin and route tables).
fn config(redis: &Redis, instance: &str, lease_ms: u64, backends: &[EchoServer], upstream_extra: &str, rest: &str) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\n\
         [cluster]\nredis = \"{}\"\ninstance = \"{instance}\"\nlease_ms = {lease_ms}\n\n\
         [[upstream]]\nname = \"echo\"\nservers = {}\nconnect_timeout_ms = 1000\n{upstream_extra}\n\n{rest}\n",
        redis.url(),
        server_list(backends),
    )
}

fn route(path: &str, plugins: &str) -> String {
    format!("[[route]]\npath = \"{path}\"\nupstream = \"echo\"\nplugins = [{plugins}]\n")
}

/// The status of an upgrade to `path` with `headers`, and the open client on 101.
async fn attempt(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, Option<Client>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
    use tokio_tungstenite::tungstenite::Error;
    let mut request = ws_url(gw, path).into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    // Whatever Redis does, a handshake must not hang: 5 s is far past any deadline.
    let connected = tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(request))
        .await
        .expect("the handshake hung");
    match connected {
        Ok((ws, _)) => (101, Some(ws)),
        Err(Error::Http(response)) => (response.status().as_u16(), None),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

/// The backend that answers on `ws`.
async fn whoami(ws: &mut Client) -> String {
    roundtrip(ws, Message::text("whoami")).await.into_text().unwrap().to_string()
}

/// The value of a metric series (the line starting with `series`), 0 if absent.
async fn metric(gw: &Gateway, series: &str) -> f64 {
    let (status, text) = admin_request(gw, "GET", "/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn cluster_status(gw: &Gateway) -> (u16, serde_json::Value) {
    let (status, text) = admin_request(gw, "GET", "/cluster").await;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

/// Names of the instances `GET /cluster` lists, with their connection counts.
async fn members(gw: &Gateway) -> BTreeMap<String, u64> {
    let (status, body) = cluster_status(gw).await;
    assert_eq!(status, 200, "{body}");
    body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["instance"].as_str().unwrap().to_string(), m["connections"].as_u64().unwrap()))
        .collect()
}

/// Waits until every gateway sees Redis up (after a start or a restart).
async fn wait_redis_up(gateways: &[&Gateway]) {
    for gw in gateways {
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(gw, "wasmgate_cluster_redis_up").await != 1.0 {
            assert!(Instant::now() < deadline, "the gateway never saw Redis up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_ip_limit_holds_across_gateways() {
    let redis = Redis::start().await;
    let backends = echo_backends(1).await;
    let rest = format!(
        "{}{}",
        plugin("limit", "rate-limit", "config = { connections_per_window = 4, window_secs = 3600 }"),
        route("/", "\"limit\"")
    );
    let a = start_gateway(&config(&redis, "gw-a", 3000, &backends, "", &rest)).await;
    let b = start_gateway(&config(&redis, "gw-b", 3000, &backends, "", &rest)).await;
    wait_redis_up(&[&a, &b]).await;
    let mut open = Vec::new();
    let mut statuses = Vec::new();
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let (status, ws) = attempt(gw, "/", &[]).await;
        statuses.push(status);
        open.extend(ws);
    }
    // 4 from this IP in all, not 4 per gateway; both gateways refuse the rest.
    assert_eq!(statuses, [101, 101, 101, 101, 429, 429, 429, 429, 429, 429]);
    // Every call went to Redis: none was served without it (the series exists from load).
    let (_, text) = admin_request(&a, "GET", "/metrics").await;
    assert!(text.contains("wasmgate_cluster_kv_unavailable_total{mode=\"local\",plugin=\"limit\"} 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_keeps_one_turn_across_gateways() {
    let redis = Redis::start().await;
    let backends = echo_backends(3).await;
    let rest = format!("{}{}", plugin("rr", "round-robin", ""), route("/", ""));
    let a = start_gateway(&config(&redis, "gw-a", 3000, &backends, "balancer = \"rr\"", &rest)).await;
    let b = start_gateway(&config(&redis, "gw-b", 3000, &backends, "balancer = \"rr\"", &rest)).await;
    wait_redis_up(&[&a, &b]).await;
    // Four connections through each gateway, alternating. With a turn per gateway each
    // would send its four to b0, b1, b2, b0: b0 would get 4 and the others 2.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..8 {
        let mut ws = connect(&ws_url(if i % 2 == 0 { &a } else { &b }, "/")).await;
        *counts.entry(whoami(&mut ws).await).or_default() += 1;
    }
    println!("round robin over two gateways: {counts:?}");
    let (min, max) = (counts.values().min().copied(), counts.values().max().copied());
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(max.unwrap() - min.unwrap() <= 1, "not within 1 of even: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_sends_a_key_to_the_same_server_through_either_gateway() {
    let redis = Redis::start().await;
    let backends = echo_backends(3).await;
    let rest = format!("{}{}", plugin("hash", "hash", "config = { key = \"header:x-room\" }"), route("/", "\"hash\""));
    // A long lease: the first heartbeats happen at start, the next ones after the test, so
    // the bounded load sees each gateway's own connections only (none left open).
    let a = start_gateway(&config(&redis, "gw-a", 60_000, &backends, "balancer = \"hash\"", &rest)).await;
    let b = start_gateway(&config(&redis, "gw-b", 60_000, &backends, "balancer = \"hash\"", &rest)).await;
    wait_redis_up(&[&a, &b]).await;
    let mut servers = std::collections::BTreeSet::new();
    for room in 0..12 {
        let room = format!("room-{room}");
        let mut answers = Vec::new();
        for gw in [&a, &b] {
            let mut ws = connect_with(gw, "/", &[("x-room", &room)]).await;
            answers.push(whoami(&mut ws).await);
            ws.close(None).await.unwrap();
            assert!(eventually(Duration::from_secs(5), || gw.active_connections() == 0).await);
        }
        assert_eq!(answers[0], answers[1], "{room} went to different servers");
        servers.insert(answers.swap_remove(0));
    }
    assert!(servers.len() > 1, "12 keys all on one server: {servers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_balances_the_backends_total_over_two_gateways() {
    let redis = Redis::start().await;
    let backends = echo_backends(2).await;
    let rest = format!("{}{}", plugin("lc", "least-conn", ""), route("/", ""));
    // Heartbeats every 200 ms.
    let a = start_gateway(&config(&redis, "gw-a", 600, &backends, "balancer = \"lc\"", &rest)).await;
    let b = start_gateway(&config(&redis, "gw-b", 600, &backends, "balancer = \"lc\"", &rest)).await;
    wait_redis_up(&[&a, &b]).await;
    // Gateway A holds six connections, three on each backend; then its b0 ones close, so A
    // holds 0 on b0 and 3 on b1.
    let mut on_a = Vec::new();
    for _ in 0..6 {
        let mut ws = connect(&ws_url(&a, "/")).await;
        let name = whoami(&mut ws).await;
        on_a.push((name, ws));
    }
    let per_backend = |list: &[(String, Client)]| list.iter().filter(|(n, _)| n == "b0").count();
    assert_eq!(per_backend(&on_a), 3, "least-conn on one gateway evens out");
    let mut kept = Vec::new();
    for (name, mut ws) in on_a {
        if name == "b0" {
            ws.close(None).await.unwrap();
        } else {
            kept.push((name, ws));
        }
    }
    assert!(eventually(Duration::from_secs(5), || a.active_connections() == 3).await);
    // B's heartbeats see A's counts (two rounds to be sure).
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Three clients through B: the backends' total is 0 and 3, so all go to b0. Counting
    // only its own connections, B would split them over both.
    let mut on_b = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&ws_url(&b, "/")).await;
        on_b.push((whoami(&mut ws).await, ws));
    }
    let names: Vec<&str> = on_b.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["b0", "b0", "b0"], "B balanced its own share, not the total");
    let (status, body) = cluster_status(&a).await;
    assert_eq!(status, 200);
    let instances = body["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_each_mode_does_what_it_says_and_sharing_resumes() {
    let mut redis = Redis::start().await;
    let backends = echo_backends(1).await;
    let limit = |name: &str, mode: &str| {
        plugin(
            name,
            "rate-limit",
            &format!("config = {{ connections_per_window = 2, window_secs = 3600, key = \"header:x-client\" }}\nkv_unavailable = \"{mode}\""),
        )
    };
    let rest = format!(
        "{}{}{}{}{}{}",
        limit("local-limit", "local"),
        limit("deny-limit", "deny"),
        limit("allow-limit", "allow"),
        route("/local", "\"local-limit\""),
        route("/deny", "\"deny-limit\""),
        route("/allow", "\"allow-limit\""),
    );
    let a = start_gateway(&config(&redis, "gw-a", 3000, &backends, "", &rest)).await;
    let b = start_gateway(&config(&redis, "gw-b", 3000, &backends, "", &rest)).await;
    wait_redis_up(&[&a, &b]).await;
    let mut open = Vec::new();
    // Shared while Redis is up: two in all for client c1, whichever gateway.
    let tries = |path: &'static str, client: &'static str, n: usize| {
        let (a, b) = (&a, &b);
        async move {
            let mut statuses = Vec::new();
            let mut clients = Vec::new();
            for i in 0..n {
                let (status, ws) = attempt(if i % 2 == 0 { a } else { b }, path, &[("x-client", client)]).await;
                statuses.push(status);
                clients.extend(ws);
            }
            (statuses, clients)
        }
    };
    let (statuses, clients) = tries("/local", "c1", 4).await;
    assert_eq!(statuses, [101, 101, 429, 429]);
    open.extend(clients);

    redis.stop();
    // local: each gateway counts on its own (its memory holds nothing of c1 yet), so c1 gets
    // two more per gateway: the limit is per instance rather than gone.
    let (statuses, clients) = tries("/local", "c1", 6).await;
    assert_eq!(statuses, [101, 101, 101, 101, 429, 429], "local mode");
    open.extend(clients);
    // deny: the plugin's kv calls fail its hook, and its on_error (deny) answers 503.
    let (statuses, _) = tries("/deny", "c2", 2).await;
    assert_eq!(statuses, [503, 503], "deny mode");
    // allow: nothing is counted, so nothing is limited.
    let (statuses, clients) = tries("/allow", "c3", 5).await;
    assert_eq!(statuses, [101; 5], "allow mode");
    open.extend(clients);
    for gw in [&a, &b] {
        assert_eq!(metric(gw, "wasmgate_cluster_redis_up").await, 0.0);
        for (plugin, mode) in [("local-limit", "local"), ("deny-limit", "deny"), ("allow-limit", "allow")] {
            let series = format!("wasmgate_cluster_kv_unavailable_total{{mode=\"{mode}\",plugin=\"{plugin}\"}}");
            assert!(metric(gw, &series).await >= 1.0, "{series} not counted");
        }
    }
    assert_eq!(cluster_status(&a).await.0, 503, "GET /cluster says Redis is away");

    // Back: a fresh Redis (no persistence), shared again by both gateways.
    redis.restart().await;
    wait_redis_up(&[&a, &b]).await;
    for path in ["/local", "/deny", "/allow"] {
        let (statuses, clients) = tries(path, "c4", 4).await;
        assert_eq!(statuses, [101, 101, 429, 429], "{path} after Redis came back");
        open.extend(clients);
    }
    assert_eq!(metric(&a, "wasmgate_cluster_redis_lost_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_with_sigkill_leaves_the_cluster_with_its_lease() {
    let redis = Redis::start().await;
    let backends = echo_backends(1).await;
    let lease_ms = 1000;
    let a = start_gateway(&config(&redis, "gw-a", lease_ms, &backends, "", &route("/", ""))).await;
    let text = config(&redis, "gw-killed", lease_ms, &backends, "", &route("/", "")).replace("admin = \"127.0.0.1:0\"\n", "");
    let file = write_config("cluster-killed.toml", &text);
    let (child, addr) = spawn_gateway(&file);
    let mut child = KillOnDrop(child);
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect(&format!("ws://{addr}/")).await);
    }
    // Both listed, with the connections the process holds, after a heartbeat or two.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed = members(&a).await;
        if listed.get("gw-killed") == Some(&2) && listed.contains_key("gw-a") {
            break;
        }
        assert!(Instant::now() < deadline, "never listed both: {listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = cluster_status(&a).await;
    let killed = body["instances"].as_array().unwrap().iter().find(|m| m["instance"] == "gw-killed").unwrap().clone();
    assert_eq!(killed["pid"].as_u64(), Some(u64::from(child.id())));
    assert_eq!(killed["version"].as_str(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(killed["servers"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 2);
    assert_eq!(killed["config_hash"].as_str().unwrap().len(), 16);

    child.0.kill().unwrap(); // SIGKILL: no goodbye
    let killed_at = Instant::now();
    child.0.wait().unwrap();
    while members(&a).await.contains_key("gw-killed") {
        assert!(killed_at.elapsed() < Duration::from_millis(lease_ms + 500), "still listed after its lease");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let gone_after = killed_at.elapsed();
    println!("a SIGKILLed gateway left GET /cluster after {gone_after:?} (lease {lease_ms} ms)");
    // Its lease held until it ended: it was not dropped early either.
    assert!(gone_after > Duration::from_millis(lease_ms / 3), "{gone_after:?}");
    assert_eq!(members(&a).await.keys().collect::<Vec<_>>(), ["gw-a"]);

    // A gateway that shuts down leaves at once.
    a.shutdown().await;
    let c = start_gateway(&config(&redis, "gw-c", lease_ms, &backends, "", &route("/", ""))).await;
    wait_redis_up(&[&c]).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while members(&c).await.keys().collect::<Vec<_>>() != ["gw-c"] {
        assert!(Instant::now() < deadline, "{:?}", members(&c).await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_config_errors_name_the_key() {
    let base = "[gateway]\nlisten = \"127.0.0.1:0\"\n[[upstream]]\nname = \"e\"\nservers = [\"127.0.0.1:1\"]\n[[route]]\nupstream = \"e\"\n";
    for (extra, key, why) in [
        ("[cluster]\nredis = \"http://x\"\n", "redis", "not a Redis URL"),
        ("[cluster]\nredis = \"redis://127.0.0.1:1/0\"\nredis_timeout_ms = 0\n", "redis_timeout_ms", "1..=10000"),
        ("[cluster]\nredis = \"redis://127.0.0.1:1/0\"\nlease_ms = 10\n", "lease_ms", "300..=600000"),
        ("[cluster]\nredis = \"redis://127.0.0.1:1/0\"\ninstance = \"a b\"\n", "instance", "visible ASCII"),
        ("[[plugin]]\nname = \"p\"\nwasm = \"p.wasm\"\nkv_unavailable = \"maybe\"\n", "kv_unavailable", "\"local\", \"deny\" or \"allow\""),
    ] {
        let err = Config::parse(&format!("{base}{extra}"), "gw.toml", repo_root()).unwrap_err().to_string();
        assert!(err.starts_with("gw.toml:") && err.contains(&format!("key `{key}`")) && err.contains(why), "{err}");
    }
}
