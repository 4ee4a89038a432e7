//! The gateway under abuse, over real sockets: an admin API that answers only its operator,
//! connection limits that hold under floods, running out of descriptors without blaming the
//! upstreams, reloads that are all or nothing, admin inputs that change nothing when
//! refused. Each test also checks that the gateway keeps serving other clients.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::{self, Message};
use wasmgate_tests::*;

/// A gateway with an admin address and token, upstream `echo` of `servers`, route `/`, and
/// `extra` keys in `[gateway]`.
fn config(servers: &str, extra: &str) -> String {
    basic_config(servers, &format!("admin_token = \"{ADMIN_TOKEN}\"\n{extra}"))
}

/// An admin request with exactly the given header lines (each ending in \r\n).
async fn admin_raw(gw: &Gateway, method: &str, path: &str, headers: &str) -> (u16, String) {
    let request = format!("{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n");
    raw_http(gw.admin_addr.unwrap(), &request).await
}

/// The value of a Prometheus series (`name` with its labels as rendered), if present.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The JSON body of an HTTP response.
fn json_body(response: &str) -> serde_json::Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {response}"))
}

/// A client that is still served: one echo round trip.
async fn still_served(ws: &mut Client, what: &str) {
    let text = format!("still served: {what}");
    assert_eq!(roundtrip(ws, Message::text(text.clone())).await, Message::text(text), "{what}");
}

/// Connects a WebSocket client from `local` (any 127.0.0.0/8 address is this machine).
async fn connect_from(local: IpAddr, gw: &Gateway, path: &str) -> Result<Client, tungstenite::Error> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(local, 0)).unwrap();
    let stream = socket.connect(gw.listen_addr).await.map_err(tungstenite::Error::Io)?;
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(ws_url(gw, path), stream).await?;
    Ok(ws)
}

/// The status and body of a refused WebSocket connect.
fn refusal(result: Result<Client, tungstenite::Error>) -> (u16, String) {
    match result {
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            (response.status().as_u16(), body)
        }
        Err(e) => panic!("not an HTTP refusal: {e}"),
        Ok(_) => panic!("connected, expected a refusal"),
    }
}

#[tokio::test]
async fn the_admin_api_needs_the_token_and_its_own_host() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&config(&server_list(&backends), "admin_hosts = [\"gw.internal\"]")).await;
    let mut user = connect(&ws_url(&gw, "/")).await;
    let admin = gw.admin_addr.unwrap();
    let host = format!("Host: {admin}\r\n");
    let bearer = |token: &str| format!("{host}Authorization: Bearer {token}\r\n");

    // No token, a wrong one, a near miss, a second header, another scheme: 401 with a
    // Bearer challenge, whatever the endpoint (unknown ones too: nothing to enumerate).
    let wrong = [
        host.clone(),
        bearer("wrong"),
        bearer(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
        bearer(&format!("{ADMIN_TOKEN}x")),
        bearer(""),
        format!("{}Authorization: Bearer wrong\r\n", bearer(ADMIN_TOKEN)),
        format!("{host}Authorization: Basic {ADMIN_TOKEN}\r\n"),
        format!("{host}Authorization: {ADMIN_TOKEN}\r\n"),
        format!("{host}X-Admin-Token: {ADMIN_TOKEN}\r\n"),
    ];
    let b0 = backends[0].addr.to_string();
    let drain = format!("/upstreams/echo/servers/{b0}/drain");
    for headers in &wrong {
        for (method, path) in [("GET", "/upstreams"), ("GET", "/plugins"), ("GET", "/metrics"), ("POST", "/plugins/reload"), ("POST", drain.as_str()), ("GET", "/nope")] {
            let (status, response) = admin_raw(&gw, method, path, headers).await;
            assert_eq!(status, 401, "{method} {path} with {headers:?}: {response}");
            let challenge = response.lines().find(|l| l.to_ascii_lowercase().starts_with("www-authenticate:"));
            assert!(challenge.is_some_and(|c| c.contains("Bearer")), "{response}");
        }
    }
    // None of those drained anything.
    let (_, response) = admin_request(&gw, "GET", "/upstreams").await;
    assert_eq!(json_body(&response)["pools"][0]["servers"][0]["draining"], false);

    // The right token, with the scheme in any case.
    for headers in [bearer(ADMIN_TOKEN), format!("{host}authorization: bEARER {ADMIN_TOKEN}\r\n")] {
        let (status, response) = admin_raw(&gw, "GET", "/upstreams", &headers).await;
        assert_eq!(status, 200, "{response}");
    }

    // A Host that is not the admin address is refused, token or not: a page whose name was
    // rebound to 127.0.0.1 sends its own name.
    let port = admin.port();
    for foreign in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("127.0.0.1.nip.io:{port}"),
        format!("localhost.:{port}"),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        format!("[::1]:{port}"),
        "gw.internal.evil.example".to_string(),
    ] {
        for path in ["/upstreams", "/healthz", "/metrics"] {
            let headers = format!("Host: {foreign}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n");
            let (status, response) = admin_raw(&gw, "GET", path, &headers).await;
            assert_eq!(status, 421, "Host {foreign} {path}: {response}");
        }
    }
    // No Host at all (HTTP/1.0).
    let request = format!("GET /upstreams HTTP/1.0\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n");
    assert_eq!(raw_http(admin, &request).await.0, 421);
    // The names the admin address goes by.
    for name in [admin.to_string(), format!("localhost:{port}"), "gw.internal".into(), format!("GW.internal:{port}")] {
        let (status, response) = admin_raw(&gw, "GET", "/plugins", &format!("Host: {name}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n")).await;
        assert_eq!(status, 200, "Host {name}: {response}");
    }

    // /healthz is open; /metrics is not, without metrics_public.
    assert_eq!(admin_raw(&gw, "GET", "/healthz", &host).await.0, 200);
    assert_eq!(admin_raw(&gw, "GET", "/metrics", &host).await.0, 401);
    still_served(&mut user, "after the admin attacks").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn metrics_are_open_only_when_the_operator_says_so() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&config(&server_list(&backends), "metrics_public = true")).await;
    let host = format!("Host: {}\r\n", gw.admin_addr.unwrap());
    let (status, metrics) = admin_raw(&gw, "GET", "/metrics", &host).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("wasmgate_connections_open"), "{metrics}");
    for path in ["/plugins", "/upstreams"] {
        assert_eq!(admin_raw(&gw, "GET", path, &host).await.0, 401, "{path}");
    }
    gw.shutdown().await;

    // Without a token the API is locked: /healthz only, and /metrics if public.
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    let mut user = connect(&ws_url(&gw, "/")).await;
    let host = format!("Host: {}\r\n", gw.admin_addr.unwrap());
    assert_eq!(admin_raw(&gw, "GET", "/healthz", &host).await.0, 200);
    for path in ["/metrics", "/plugins", "/upstreams", "/plugins/reload"] {
        let headers = format!("{host}Authorization: Bearer {ADMIN_TOKEN}\r\n");
        let (status, response) = admin_raw(&gw, "GET", path, &headers).await;
        assert_eq!(status, 403, "{path}: {response}");
        assert!(response.contains("admin_token"), "says how to unlock it: {response}");
    }
    still_served(&mut user, "with a locked admin API").await;
    gw.shutdown().await;
}

#[test]
fn an_admin_address_off_loopback_needs_a_token() {
    let dir = wasmgate_tests::scratch_dir("limits");
    let good = basic_config("[\"127.0.0.1:9\"]", "");
    for (name, admin, ok) in [
        ("loopback.toml", "127.0.0.1:0", true),
        ("any.toml", "0.0.0.0:0", false),
        ("any6.toml", "[::]:0", false),
        ("mapped.toml", "[::ffff:127.0.0.1]:0", false),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, good.replace("admin = \"127.0.0.1:0\"", &format!("admin = \"{admin}\""))).unwrap();
        let commands: &[&str] = if ok { &["check"] } else { &["check", "run"] };
        for command in commands {
            let out = Command::new(gateway_binary()).args([command, "--config"]).arg(&path).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if ok {
                assert!(out.status.success(), "{command} {name}: {stderr}");
                continue;
            }
            assert_eq!(out.status.code(), Some(1), "{command} {name}: {stderr}");
            let location = format!("{}:4:", path.display());
            assert!(stderr.contains(&location) && stderr.contains("key `admin`") && stderr.contains("admin_token"), "{command} {name}: {stderr}");
        }
    }
    // With a token from the environment it starts; a token too short is refused.
    let path = dir.join("token.toml");
    let text = good.replace("admin = \"127.0.0.1:0\"", "admin = \"0.0.0.0:0\"\nadmin_token = \"${env:WASMGATE_ADMIN_TOKEN}\"");
    std::fs::write(&path, &text).unwrap();
    for (token, ok) in [("a-long-enough-admin-token", true), ("short", false)] {
        let out = Command::new(gateway_binary())
            .args(["check", "--config"])
            .arg(&path)
            .env("WASMGATE_ADMIN_TOKEN", token)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), ok, "{token}: {stderr}");
        if !ok {
            assert!(stderr.contains(":5:") && stderr.contains("key `admin_token`") && !stderr.contains(token), "{stderr}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_flood_past_max_connections_is_answered_503() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&config(&server_list(&backends), "max_connections = 20")).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(connect(&ws_url(&gw, "/")).await);
    }
    assert!(eventually(Duration::from_secs(2), || gw.open_sockets() == 20).await);

    // 200 more at once: every one gets an answer, none is dropped unanswered.
    let flood: Vec<_> = (0..200)
        .map(|_| {
            let addr = gw.listen_addr;
            tokio::spawn(async move {
                raw_http(addr, &upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")).await
            })
        })
        .collect();
    for answer in flood {
        let (status, response) = answer.await.unwrap();
        assert_eq!(status, 503, "{response}");
        assert!(response.contains("limit of 20 connections") && response.to_ascii_lowercase().contains("retry-after: 1"), "{response}");
    }
    for (i, ws) in held.iter_mut().enumerate() {
        still_served(ws, &format!("held connection {i} during the flood")).await;
    }
    let metrics = gw.metrics_text();
    assert_eq!(metric(&metrics, "wasmgate_connections_refused_total{reason=\"max_connections\"}"), Some(200.0), "{metrics}");
    assert_eq!(metric(&metrics, "wasmgate_connections_open"), Some(20.0));

    // Room again once some leave; every count goes back to zero at the end.
    for mut ws in held.drain(..5) {
        ws.close(None).await.unwrap();
        while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), futures_util::StreamExt::next(&mut ws)).await {}
    }
    assert!(eventually(Duration::from_secs(2), || gw.open_sockets() == 15).await);
    for _ in 0..5 {
        let mut ws = connect(&ws_url(&gw, "/")).await;
        still_served(&mut ws, "a newcomer").await;
        held.push(ws);
    }
    drop(held);
    assert!(eventually(Duration::from_secs(5), || gw.open_sockets() == 0).await, "{} left", gw.open_sockets());
    let metrics = gw.metrics_text();
    assert_eq!(metric(&metrics, "wasmgate_connections_open"), Some(0.0));
    assert_eq!(metric(&metrics, "wasmgate_handshakes_in_progress"), Some(0.0));
    gw.shutdown().await;
}

#[tokio::test]
async fn one_address_over_its_limit_gets_429_and_others_are_served() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&config(&server_list(&backends), "max_connections_per_ip = 5")).await;
    let flooder: IpAddr = "127.0.0.2".parse().unwrap();
    let other: IpAddr = "127.0.0.3".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from(flooder, &gw, "/").await.unwrap());
    }
    for _ in 0..20 {
        let (status, body) = refusal(connect_from(flooder, &gw, "/").await);
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("limit of 5 connections"), "{body}");
    }
    // Another address is not affected, up to its own limit.
    let mut others = Vec::new();
    for i in 0..5 {
        let mut ws = connect_from(other, &gw, "/").await.unwrap();
        still_served(&mut ws, &format!("other address, connection {i}")).await;
        others.push(ws);
    }
    assert_eq!(refusal(connect_from(other, &gw, "/").await).0, 429);
    still_served(&mut held[0], "the flooder's admitted connection").await;
    let metrics = gw.metrics_text();
    assert_eq!(metric(&metrics, "wasmgate_connections_refused_total{reason=\"max_connections_per_ip\"}"), Some(21.0), "{metrics}");

    // The flooder's count goes down as its connections close.
    drop(held.pop());
    let mut again = None;
    for _ in 0..40 {
        if let Ok(ws) = connect_from(flooder, &gw, "/").await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_served(again.as_mut().expect("a closed connection frees its place"), "the flooder, once below its limit").await;
    drop((held, others, again));
    assert!(eventually(Duration::from_secs(5), || gw.open_sockets() == 0).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn handshakes_in_progress_are_capped() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&config(&server_list(&backends), "max_handshakes = 4\nhandshake_timeout_secs = 2")).await;
    let mut user = connect(&ws_url(&gw, "/")).await;
    // Four sockets that never finish their request (slowloris) fill the handshake slots.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(gw.listen_addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        slow.push(s);
    }
    let metrics_show = |n: f64| {
        let text = gw.metrics_text();
        metric(&text, "wasmgate_handshakes_in_progress") == Some(n)
    };
    assert!(eventually(Duration::from_secs(2), || metrics_show(4.0)).await);
    let (status, body) = refusal(tokio_tungstenite::connect_async(ws_url(&gw, "/")).await.map(|(ws, _)| ws));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("handshakes in progress"), "{body}");
    still_served(&mut user, "an established connection while handshakes are full").await;

    // The slow ones time out (408) and free their slots.
    for mut s in slow {
        let mut response = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut response)).await;
        assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    }
    let mut late = connect(&ws_url(&gw, "/")).await;
    still_served(&mut late, "a client after the slow ones left").await;
    assert!(metrics_show(0.0));
    gw.shutdown().await;
}

/// A reconnect storm is many fast handshakes at once, not slow ones: over `max_handshakes`
/// they wait in the accept queue for a slot instead of being refused (with
/// `max_handshakes_wait_ms = 0`, the behaviour before, part of this burst got 503), while
/// slow-loris sockets stay bounded by the limit.
#[tokio::test]
async fn a_burst_of_fast_handshakes_over_the_limit_waits_instead_of_being_refused() {
    let backends = echo_backends(2).await;
    let gw = start_gateway(&config(&server_list(&backends), "max_handshakes = 8\nhandshake_timeout_secs = 10")).await;
    let slow_request = |n: usize| {
        let addr = gw.listen_addr;
        async move {
            let mut held = Vec::new();
            for _ in 0..n {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
                held.push(s);
            }
            held
        }
    };
    let in_progress = || metric(&gw.metrics_text(), "wasmgate_handshakes_in_progress");
    // Half the slots held by slow clients, then a burst of 300 at once.
    let slow = slow_request(4).await;
    assert!(eventually(Duration::from_secs(2), || in_progress() == Some(4.0)).await);
    let burst = (0..300).map(|i| {
        let url = ws_url(&gw, "/");
        async move {
            let mut ws = tokio_tungstenite::connect_async(url).await.map(|(ws, _)| ws).map_err(|e| refusal(Err(e)))?;
            still_served(&mut ws, &format!("burst client {i}")).await;
            Ok::<Client, (u16, String)>(ws)
        }
    });
    let results = futures_util::future::join_all(burst).await;
    let refused: Vec<&(u16, String)> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(refused.is_empty(), "{} of 300 refused, first: {:?}", refused.len(), refused.first());
    let metrics = gw.metrics_text();
    assert_eq!(metric(&metrics, "wasmgate_connections_refused_total{reason=\"max_handshakes\"}"), Some(0.0), "{metrics}");

    // Slow clients still get no more than the limit: with 4 more holding every slot, a
    // client waits its second for one, then is answered 503, and more slow ones at once.
    let more_slow = slow_request(4).await;
    assert!(eventually(Duration::from_secs(2), || in_progress() == Some(8.0)).await);
    let started = Instant::now();
    let (status, body) = refusal(tokio_tungstenite::connect_async(ws_url(&gw, "/")).await.map(|(ws, _)| ws));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("handshakes in progress"), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(900), "waited for a slot first: {:?}", started.elapsed());
    let started = Instant::now();
    for mut s in slow_request(4).await {
        let mut response = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut response)).await;
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    }
    assert!(started.elapsed() < Duration::from_millis(900), "no second wait while slow clients hold the slots");
    assert_eq!(in_progress(), Some(8.0), "bounded by max_handshakes");
    let mut burst: Vec<Client> = results.into_iter().map(|r| r.unwrap()).collect();
    still_served(&mut burst[0], "a burst client while slow ones hold every slot").await;
    drop((slow, more_slow, burst));
    gw.shutdown().await;
}

/// A keep-alive HTTP/1.1 connection to the admin API, opened before descriptors run out.
struct AdminConnection {
    stream: TcpStream,
    host: SocketAddr,
}

impl AdminConnection {
    async fn open(admin: SocketAddr) -> AdminConnection {
        AdminConnection { stream: TcpStream::connect(admin).await.unwrap(), host: admin }
    }

    /// GET `path` with the token; the body.
    async fn get(&mut self, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n", self.host);
        self.stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "the admin connection closed");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            let Some(head_end) = text.find("\r\n\r\n") else { continue };
            let len: usize = text[..head_end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .expect("a Content-Length");
            if buf.len() >= head_end + 4 + len {
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                return text[head_end + 4..].to_string();
            }
        }
    }
}

/// Every server of every pool healthy, not ejected, with no failures counted against it.
fn assert_all_healthy(upstreams: &str, when: &str) {
    let status: serde_json::Value = serde_json::from_str(upstreams).unwrap();
    for pool in status["pools"].as_array().unwrap() {
        for server in pool["servers"].as_array().unwrap() {
            let fine = server["healthy"] == true
                && server["ejected_for_ms"] == 0
                && server["recent_failures"] == 0
                && server["available"] == true;
            assert!(fine, "{when}: a server was blamed for the gateway's shortage: {server}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_blames_no_upstream() {
    let backends = echo_backends(2).await;
    let dir = wasmgate_tests::scratch_dir("emfile");
    let path = dir.join("gw.toml");
    // max_connections above what 64 descriptors allow, so the descriptors run out first; any
    // failure held against a server would show: one ejects it, one failed probe marks it
    // unhealthy, and it would take 100 good probes to come back.
    // The binary prints only its listen address: give the admin one a known free port.
    let admin = dead_address();
    let text = config(&server_list(&backends), "max_connections = 10000")
        .replace("admin = \"127.0.0.1:0\"", &format!("admin = \"{admin}\""))
        .replace(
            "connect_timeout_ms = 1000",
            "connect_timeout_ms = 1000\neject_after = 1\nhealth = { interval_ms = 100, timeout_ms = 500, fall = 1, rise = 100 }",
        );
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" run --config \"$1\""])
        .arg(gateway_binary())
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let listen = line.trim().rsplit("ws://").next().unwrap().to_string();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let mut operator = AdminConnection::open(admin).await;
    assert_all_healthy(&operator.get("/upstreams").await, "at start");

    // Open connections until the gateway runs out: clients are then refused with a 503 that
    // says so, or wait in the listen backlog while accept backs off.
    let started = Instant::now();
    let url = format!("ws://{listen}/");
    let mut held = Vec::new();
    let mut out_of_files = 0;
    let mut waiting = 0;
    while held.len() < 64 && out_of_files + waiting < 6 {
        match tokio::time::timeout(Duration::from_millis(1500), tokio_tungstenite::connect_async(&url)).await {
            Ok(Ok((ws, _))) => held.push(ws),
            Ok(Err(tungstenite::Error::Http(response))) => {
                let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
                assert_eq!(response.status().as_u16(), 503, "{body}");
                assert!(body.contains("out of open files"), "{body}");
                out_of_files += 1;
            }
            Ok(Err(e)) => panic!("unexpected error: {e}"),
            Err(_) => waiting += 1,
        }
    }
    println!("{} connections held, {out_of_files} refused for lack of files, {waiting} left waiting", held.len());
    assert!(held.len() >= 5 && held.len() < 32, "64 descriptors hold 5 to 31 connections, not {}", held.len());
    assert!(out_of_files + waiting > 0);
    // Let health checks run into the shortage too.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (i, ws) in held.iter_mut().enumerate() {
        still_served(ws, &format!("held connection {i} while out of descriptors")).await;
    }
    assert_all_healthy(&operator.get("/upstreams").await, "out of descriptors");
    let metrics = operator.get("/metrics").await;
    let shortages = metric(&metrics, "wasmgate_resource_errors_total{kind=\"descriptors\"}").unwrap();
    assert!(shortages > 0.0, "{metrics}");
    assert_eq!(metric(&metrics, "wasmgate_upstream_connect_failures_total"), Some(0.0), "{metrics}");

    // Clients gone, the gateway recovers by itself.
    drop(held);
    let mut recovered = None;
    for _ in 0..50 {
        if let Ok(Ok((ws, _))) = tokio::time::timeout(Duration::from_secs(2), tokio_tungstenite::connect_async(&url)).await {
            recovered = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ws = recovered.expect("new connections succeed once descriptors are free");
    still_served(&mut ws, "after the shortage").await;
    let mut more = Vec::new();
    for _ in 0..5 {
        more.push(connect(&url).await);
    }
    assert_all_healthy(&operator.get("/upstreams").await, "after the shortage");

    // Now sockets that take one descriptor each and send nothing, until accept itself fails,
    // and an operator knocking on the admin port: both accept loops face a listener that
    // stays readable and an accept that keeps failing. They back off instead of spinning.
    let before = metric(&operator.get("/metrics").await, "wasmgate_resource_errors_total{kind=\"descriptors\"}").unwrap();
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(TcpStream::connect(&listen).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut knocking = TcpStream::connect(admin).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu_before = cpu_secs(child.id());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_secs(child.id()) - cpu_before;
    let after = metric(&operator.get("/metrics").await, "wasmgate_resource_errors_total{kind=\"descriptors\"}").unwrap();
    println!("accept out of descriptors: {} more shortages, {cpu:.2} s of CPU in 2 s", after - before);
    assert!(after > before, "failed accepts are counted");
    assert!(cpu < 0.4, "the gateway spins while accept fails: {cpu:.2} s of CPU in 2 s");
    for (i, ws) in more.iter_mut().enumerate() {
        still_served(ws, &format!("connection {i} while accept fails")).await;
    }
    // Descriptors back: the operator who waited in the admin backlog is answered.
    drop(idle);
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    knocking.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), knocking.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut ws = connect(&url).await;
    still_served(&mut ws, "after accept recovered").await;

    // Logged, but at most about once a second.
    let elapsed = started.elapsed().as_secs_f64();
    let lines = log.lock().unwrap().iter().filter(|l| l.contains("out of open files")).count();
    println!("{lines} log lines for {shortages} shortages in {elapsed:.1} s");
    assert!(lines >= 1, "the shortage is logged: {:?}", log.lock().unwrap());
    assert!((lines as f64) <= elapsed + 2.0, "{lines} lines in {elapsed:.1} s");
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(dir).ok();
}

/// CPU time (user + system) process `pid` has used, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (in parentheses): utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // In USER_HZ, which Linux fixes at 100 for what it shows user space.
    ticks / 100.0
}

#[tokio::test]
async fn a_refused_reload_changes_nothing() {
    let backends = echo_backends(2).await;
    let dir = wasmgate_tests::scratch_dir("reload");
    let path = dir.join("gw.toml");
    let garbage = dir.join("broken.wasm");
    std::fs::write(&garbage, b"not wasm at all").unwrap();
    let tag = |prefix: &str| {
        format!("[[plugin]]\nname = \"tag\"\nwasm = \"{}\"\nconfig = {{ prefix = \"{prefix}\" }}\n", plugin_wasm("echo-tag").display())
    };
    let broken = format!("[[plugin]]\nname = \"broken\"\nwasm = \"{}\"\n", garbage.display());
    let first = config(&format!("[\"{}\"]", backends[0].addr), "")
        .replace("upstream = \"echo\"\n", "upstream = \"echo\"\nplugins = [\"tag\"]\n")
        + &tag("v1:");
    std::fs::write(&path, &first).unwrap();
    let gw = Gateway::start(Config::load(&path).unwrap()).await.unwrap();
    let mut live = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut live, Message::text("x")).await, Message::text("v1:x"));
    let plugins_before = plugin_versions(&gw).await;
    let upstreams_before = json_body(&admin_request(&gw, "GET", "/upstreams").await.1)["pools"].clone();

    // The new config changes the tag plugin's config (it loads), adds a server to the pool
    // and a route to a new pool, and needs a plugin that cannot load: refused as a whole.
    let second = config(&server_list(&backends), "")
        .replace("upstream = \"echo\"\n", "upstream = \"echo\"\nplugins = [\"tag\"]\n")
        + &tag("v2:")
        + &broken
        + &format!("[[upstream]]\nname = \"extra\"\nservers = [\"{}\"]\n\n[[route]]\npath = \"/new\"\nupstream = \"extra\"\nplugins = [\"broken\"]\n", backends[1].addr);
    std::fs::write(&path, &second).unwrap();
    let (status, response) = admin_request(&gw, "POST", "/plugins/reload").await;
    assert_eq!(status, 409, "{response}");
    assert!(response.contains("reload refused") && response.contains("broken"), "{response}");

    assert_eq!(plugin_versions(&gw).await, plugins_before, "plugin versions and load times");
    let upstreams_after = json_body(&admin_request(&gw, "GET", "/upstreams").await.1)["pools"].clone();
    assert_eq!(pool_shapes(&upstreams_after), pool_shapes(&upstreams_before), "pools and servers");
    // The live connection and new ones still get the old plugin config.
    assert_eq!(roundtrip(&mut live, Message::text("y")).await, Message::text("v1:y"));
    let mut fresh = connect(&ws_url(&gw, "/new")).await;
    assert_eq!(roundtrip(&mut fresh, Message::text("whoami")).await, Message::text("v1:whoami"), "/new is still the / route");
    let metrics = gw.metrics_text();
    assert_eq!(metric(&metrics, "wasmgate_reloads_total"), Some(0.0), "{metrics}");

    // A config that is fine but for a plugin nothing uses: applied, that plugin reported.
    let third = second.replace("plugins = [\"broken\"]", "plugins = []").replace("v2:", "v3:");
    std::fs::write(&path, &third).unwrap();
    let (status, response) = admin_request(&gw, "POST", "/plugins/reload").await;
    assert_eq!(status, 200, "{response}");
    assert!(response.contains("\"failed\"") && response.contains("broken"), "{response}");
    assert_eq!(roundtrip(&mut live, Message::text("z")).await, Message::text("v3:z"), "the live connection moved on");
    let mut newest = connect(&ws_url(&gw, "/new")).await;
    assert_eq!(roundtrip(&mut newest, Message::text("whoami")).await, Message::text("b1"), "the new route");
    gw.shutdown().await;
    std::fs::remove_dir_all(dir).ok();
}

/// Each plugin's name, hash and load time from `GET /plugins`.
async fn plugin_versions(gw: &Gateway) -> Vec<(String, String, u64)> {
    let (status, response) = admin_request(gw, "GET", "/plugins").await;
    assert_eq!(status, 200, "{response}");
    json_body(&response)
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().into(), p["hash"].as_str().unwrap().into(), p["loaded_at_ms"].as_u64().unwrap()))
        .collect()
}

/// Each pool's name and server addresses.
fn pool_shapes(pools: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    pools
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let servers = p["servers"].as_array().unwrap().iter().map(|s| s["address"].as_str().unwrap().to_string()).collect();
            (p["name"].as_str().unwrap().to_string(), servers)
        })
        .collect()
}

#[tokio::test]
async fn refused_drains_change_nothing() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&config(&server_list(&backends), "")).await;
    let b0 = backends[0].addr.to_string();
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&ws_url(&gw, "/")).await);
    }
    let draining = || async {
        let (_, response) = admin_request(&gw, "GET", "/upstreams").await;
        json_body(&response)["pools"][0]["servers"][0]["draining"].as_bool().unwrap()
    };
    // Rates that are not finite and positive, or that no clock can wait for.
    for rate in ["0", "-1", "-0", "NaN", "nan", "inf", "-inf", "1e400", "1e-300", "0.0001", "", "abc", "1&rate=2", "0x10", "%31"] {
        let (status, response) = admin_request(&gw, "POST", &format!("/upstreams/echo/servers/{b0}/drain?rate={rate}")).await;
        assert_eq!(status, 400, "rate={rate}: {response}");
        assert!(!draining().await, "rate={rate} changed nothing");
    }
    for query in ["rate=0", "target=0.5", "target=inf", "rate=1e-9"] {
        let (status, response) = admin_request(&gw, "POST", &format!("/upstreams/echo/rebalance?{query}")).await;
        assert_eq!(status, 400, "{query}: {response}");
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        still_served(ws, &format!("client {i} after refused drains")).await;
    }

    // A slow drain closes the oldest connection at once and the next in 1,000 s.
    let drain = format!("/upstreams/echo/servers/{b0}/drain");
    assert_eq!(admin_request(&gw, "POST", &format!("{drain}?rate=0.001")).await.0, 202);
    assert_eq!(close_code(&mut clients[0]).await, 1012);
    // A second drain is refused and changes nothing: the slow pace stays.
    let (status, response) = admin_request(&gw, "POST", &format!("{drain}?rate=1000")).await;
    assert_eq!(status, 409, "{response}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    still_served(&mut clients[1], "still there at the slow pace").await;
    assert!(draining().await);

    // Undrained while the slow drain sleeps, then drained again: the new drain is the one
    // that runs (the old one stops), and a drain that is refused after it changes nothing.
    assert_eq!(admin_request(&gw, "POST", &format!("/upstreams/echo/servers/{b0}/undrain")).await.0, 202);
    assert!(!draining().await);
    still_served(&mut clients[1], "after undrain").await;
    assert_eq!(admin_request(&gw, "POST", &format!("{drain}?rate=1000")).await.0, 202);
    assert_eq!(close_code(&mut clients[1]).await, 1012);
    assert_eq!(close_code(&mut clients[2]).await, 1012);
    assert!(draining().await);
    let (status, body) = refusal(tokio_tungstenite::connect_async(ws_url(&gw, "/")).await.map(|(ws, _)| ws));
    assert!(status == 503 && body.contains("1 draining"), "nothing goes to a drained server: {status} {body}");
    gw.shutdown().await;
}
