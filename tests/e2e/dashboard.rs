//! The dashboard on the admin address: its page needs no token and holds no data; its event
//! stream needs the token (or `dashboard_public`), and what it reports agrees with
//! `/metrics`, per server, while connections are still open.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// An open `/events` stream.
struct Events {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Events {
    /// Opens `/events` (with the test token if `token`); the status and, if 200, the stream.
    async fn open(admin: SocketAddr, token: bool) -> (u16, Option<Events>) {
        let mut stream = TcpStream::connect(admin).await.unwrap();
        let auth = if token { format!("Authorization: Bearer {ADMIN_TOKEN}\r\n") } else { String::new() };
        stream.write_all(format!("GET /events HTTP/1.1\r\nHost: {admin}\r\n{auth}\r\n").as_bytes()).await.unwrap();
        let head = read_head(&mut stream).await;
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        if status != 200 {
            return (status, None);
        }
        assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
        (status, Some(Events { stream, buf: Vec::new() }))
    }

    /// The next snapshot (the body is chunked; each event is one `data:` line).
    async fn next(&mut self) -> Value {
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            if let Some(start) = text.find("data: ") {
                if let Some(len) = text[start..].find("\n\n") {
                    let json = text[start + 6..start + len].to_string();
                    self.buf.drain(..start + len + 2);
                    return serde_json::from_str(&json).unwrap();
                }
            }
            let mut chunk = [0u8; 16384];
            let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk))
                .await
                .expect("a snapshot a second")
                .unwrap();
            assert!(n > 0, "the stream ended");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The value of one sample line of `/metrics` (series written exactly as rendered).
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
        .parse::<f64>()
        .unwrap() as u64
}

fn server<'a>(snapshot: &'a Value, address: &str) -> &'a Value {
    snapshot["pools"][0]["servers"].as_array().unwrap().iter().find(|s| s["key"] == address).unwrap()
}

#[tokio::test]
async fn the_page_is_public_and_holds_no_data_the_stream_needs_the_token() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), &format!("admin_token = \"{ADMIN_TOKEN}\""))).await;
    let admin = gw.admin_addr.unwrap();
    let (status, page) = raw_http(admin, &format!("GET / HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<script src=\"/dashboard.js\"></script>"), "{page}");
    assert!(page.contains("frame-ancestors 'none'") && page.contains("connect-src 'self'"), "{page}");
    assert!(!page.contains(&backends[0].addr.to_string()), "the page holds no data");
    let (status, script) =
        raw_http(admin, &format!("GET /dashboard.js HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")).await;
    assert_eq!(status, 200);
    assert!(script.contains("Authorization") && !script.contains("EventSource("), "the token goes in a header");
    // The Host check still applies to the page (DNS rebinding).
    let (status, _) = raw_http(admin, "GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 421);

    assert_eq!(Events::open(admin, false).await.0, 401);
    let (status, events) = Events::open(admin, true).await;
    assert_eq!(status, 200);
    let snapshot = events.unwrap().next().await;
    assert_eq!(snapshot["pools"][0]["name"], "echo");
    assert_eq!(snapshot["routes"][0]["upstream"], "echo");
    gw.shutdown().await;
}

#[tokio::test]
async fn without_a_token_the_stream_is_locked_unless_dashboard_public() {
    let backends = echo_backends(1).await;
    let locked = start_gateway(&basic_config(&server_list(&backends), "")).await;
    assert_eq!(Events::open(locked.admin_addr.unwrap(), false).await.0, 403);
    locked.shutdown().await;
    let public = start_gateway(&basic_config(&server_list(&backends), "dashboard_public = true")).await;
    let admin = public.admin_addr.unwrap();
    assert_eq!(Events::open(admin, false).await.0, 200);
    // Opening the data does not open the actions.
    let (status, _) = raw_http(
        admin,
        &format!("POST /upstreams/echo/servers/{}/drain HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\n\r\n", backends[0].addr),
    )
    .await;
    assert_eq!(status, 403);
    public.shutdown().await;
}

/// Live connections and their messages show on the right server while they are open, and
/// the numbers are those of `/metrics`.
#[tokio::test]
async fn live_numbers_per_server_agree_with_metrics() {
    let backends = echo_backends(2).await;
    let extra = format!("admin_token = \"{ADMIN_TOKEN}\"\nmetrics_public = true");
    let gw = start_gateway(&basic_config(&server_list(&backends), &extra)).await;
    let admin = gw.admin_addr.unwrap();
    // Round robin: the first connection to b0, the second to b1.
    let mut first = connect(&ws_url(&gw, "/")).await;
    let mut second = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut first, Message::text("whoami")).await, Message::text("b0"));
    assert_eq!(roundtrip(&mut second, Message::text("whoami")).await, Message::text("b1"));
    for _ in 0..4 {
        roundtrip(&mut first, Message::text("x")).await;
    }
    // A relay publishes its counts at most once a second, on a read: wait, then read once
    // more so the first connection publishes while it stays open.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    roundtrip(&mut first, Message::text("y")).await;
    roundtrip(&mut second, Message::text("y")).await;

    let (_, events) = Events::open(admin, true).await;
    let mut events = events.unwrap();
    let snapshot = events.next().await;
    let (_, metrics) = raw_http(admin, &format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")).await;
    for (backend, messages) in [(&backends[0], 6), (&backends[1], 2)] {
        let address = backend.addr.to_string();
        let view = server(&snapshot, &address);
        assert_eq!(view["relayed_now"], 1, "{view}");
        assert_eq!(view["available"], true, "{view}");
        assert_eq!(view["messages_from_client"], messages, "{view}");
        let labels = format!("{{from=\"client\",pool=\"echo\",server=\"{address}\"}}");
        assert_eq!(sample(&metrics, &format!("wasmgate_upstream_messages_total{labels}")), messages);
        assert_eq!(view["messages_from_client"].as_u64().unwrap(), messages);
        let active = format!("wasmgate_upstream_connections_active{{pool=\"echo\",server=\"{address}\"}}");
        assert_eq!(sample(&metrics, &active), 1);
    }
    assert_eq!(snapshot["gateway"]["connections_active"], 2);
    assert_eq!(snapshot["gateway"]["messages_from_client"], sample(&metrics, "wasmgate_messages_total{from=\"client\"}"));
    assert!(metrics.contains("wasmgate_upstream_connect_seconds_bucket{pool=\"echo\",server="), "{metrics}");
    assert!(metrics.contains("wasmgate_handshake_seconds_count{result=\"accepted\"} 2"), "{metrics}");

    // Closed connections leave the live count; the stream keeps coming.
    first.close(None).await.unwrap();
    close_code(&mut first).await;
    let mut closed = false;
    for _ in 0..5 {
        let snapshot = events.next().await;
        if server(&snapshot, &backends[0].addr.to_string())["relayed_now"] == 0 {
            closed = true;
            break;
        }
    }
    assert!(closed, "the closed connection left the dashboard's live count");
    gw.shutdown().await;
}

/// Every series the Grafana dashboard in examples/grafana queries exists on `/metrics`.
#[tokio::test]
async fn the_grafana_dashboard_reads_series_that_exist() {
    let backends = echo_backends(1).await;
    let log = wasmgate_tests::scratch_dir("grafana").join("access.log");
    let extra = format!(
        "metrics_public = true\naccess_log = \"{}\"\n\n[[plugin]]\nname = \"stamp\"\nwasm = \"{}\"\nconfig = {{ header = \"x-a\", value = \"b\" }}",
        log.display(),
        plugin_wasm("header-stamp").display()
    );
    let text = basic_config(&server_list(&backends), &extra).replace("upstream = \"echo\"\n", "upstream = \"echo\"\nplugins = [\"stamp\"]\n");
    let gw = start_gateway(&text).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    roundtrip(&mut ws, Message::text("x")).await;
    let admin = gw.admin_addr.unwrap();
    let (_, metrics) = raw_http(admin, &format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")).await;
    let dashboard = std::fs::read_to_string(repo_root().join("examples/grafana/wasmgate-dashboard.json")).unwrap();
    let _: Value = serde_json::from_str(&dashboard).expect("valid JSON");
    let mut names: Vec<&str> = dashboard
        .match_indices("wasmgate_")
        .map(|(at, _)| {
            let rest = &dashboard[at..];
            &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        let family = name.strip_suffix("_bucket").unwrap_or(name);
        assert!(metrics.contains(&format!("# TYPE {family} ")), "{family} is not on /metrics");
    }
    let _ = std::fs::remove_file(log);
    gw.shutdown().await;
}

/// The dashboard in headless Chromium (tests/python/dashboard_browser.py, over the DevTools
/// protocol): it shows the live connections on the right servers, marks a killed backend
/// down within its health checks' interval, and its drain button moves connections.
/// Screenshots go to target/screenshots/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_browser_shows_servers_marks_a_dead_one_and_drains() {
    use tokio::io::AsyncBufReadExt;
    let mut backends = echo_backends(3).await;
    let text = format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
admin_token = "{ADMIN_TOKEN}"

[[upstream]]
name = "echo"
servers = {}
drain_secs = 0
health = {{ interval_ms = 500, timeout_ms = 300, kind = "tcp", fall = 2 }}

[[route]]
path = "/"
upstream = "echo"
"#,
        server_list(&backends)
    );
    let gw = start_gateway(&text).await;
    let admin = gw.admin_addr.unwrap();
    // Round robin: b0, b1, b2, b0.
    let mut clients = Vec::new();
    for expected in ["b0", "b1", "b2", "b0"] {
        let mut ws = connect(&ws_url(&gw, "/")).await;
        assert_eq!(roundtrip(&mut ws, Message::text("whoami")).await, Message::text(expected));
        clients.push(ws);
    }
    let key = |i: usize| format!("echo/{}", backends[i].addr);
    let expect = serde_json::json!({
        "live": { key(0): 2, key(1): 1, key(2): 1 },
        "down": key(1),
        "drain": key(0),
    });
    let shots = repo_root().join("target/screenshots");
    let mut browser = tokio::process::Command::new(python())
        .arg(repo_root().join("tests/python/dashboard_browser.py"))
        .arg(format!("http://{admin}"))
        .arg(ADMIN_TOKEN)
        .arg(&shots)
        .arg(expect.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = browser.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(browser.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        tokio::time::timeout(Duration::from_secs(40), lines.next_line())
            .await
            .expect("the browser script answers")
            .unwrap()
            .expect("the browser script ended early (its error is above)")
    };

    let live = next_line().await;
    let rows: Value = serde_json::from_str(live.strip_prefix("LIVE ").expect(&live)).unwrap();
    let (_, metrics) = admin_request(&gw, "GET", "/metrics").await;
    for (i, n) in [(0, 2), (1, 1), (2, 1)] {
        assert_eq!(rows[key(i)]["live"], n, "{rows}");
        assert_eq!(rows[key(i)]["state"], "up", "{rows}");
        let series = format!("wasmgate_upstream_connections_active{{pool=\"echo\",server=\"{}\"}}", backends[i].addr);
        assert_eq!(sample(&metrics, &series), n, "the page agrees with /metrics");
    }

    drop(backends.remove(1));
    stdin.write_all(b"KILLED\n").await.unwrap();
    let down = next_line().await;
    let seconds: f64 = down.strip_prefix("DOWN ").expect(&down).parse().unwrap();
    // fall = 2 probes 500 ms apart, plus a snapshot a second.
    assert!(seconds < 3.0, "marked down after {seconds} s");

    assert_eq!(next_line().await, "DRAINING");
    // The two connections on b0 are closed with 1012; reconnecting lands on b2, the one
    // server left available.
    for i in [0, 3] {
        assert_eq!(close_code(&mut clients[i]).await, 1012);
        let mut again = connect(&ws_url(&gw, "/")).await;
        assert_eq!(roundtrip(&mut again, Message::text("whoami")).await, Message::text("b2"));
    }
    assert!(browser.wait().await.unwrap().success());
    assert!(shots.join("dashboard-draining.png").exists());
    gw.shutdown().await;
}
