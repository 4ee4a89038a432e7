//! What the end-to-end tests share: starting real gateways and backends on ephemeral
//! loopback ports, WebSocket clients, raw HTTP, and the paths of built plugins and tools.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
pub use wasmgate::{Config, Gateway};
pub use wasmgate_examples::echo::EchoServer;

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A built plugin from `plugins/` or `tests/plugins/` (built by `tests/run.sh`).
pub fn plugin_wasm(crate_name: &str) -> PathBuf {
    let file = format!("{}.wasm", crate_name.replace('-', "_"));
    let path = repo_root().join("plugins/target/wasm32-wasip2/release").join(&file);
    assert!(
        path.exists(),
        "{} is missing: build the plugins first (bash tests/run.sh does)",
        path.display()
    );
    path
}

/// The Python interpreter of the test venv (websockets, kosoku), made by `tests/run.sh`.
pub fn python() -> PathBuf {
    let path = std::env::var_os("WASMGATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(path.exists(), "{} is missing: run bash tests/run.sh to set up the venv", path.display());
    path
}

/// Echo backends named `b0`, `b1`, ... on ephemeral ports.
pub async fn echo_backends(n: usize) -> Vec<EchoServer> {
    let mut servers = Vec::new();
    for i in 0..n {
        servers.push(EchoServer::start("127.0.0.1:0", &format!("b{i}")).await.unwrap());
    }
    servers
}

/// A TOML array of the backends' addresses.
pub fn server_list(servers: &[EchoServer]) -> String {
    let items: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    format!("[{}]", items.join(", "))
}

/// A minimal config: one upstream `echo` with `servers`, one route `/`, plus `extra` TOML
/// appended to the `[gateway]` table.
pub fn basic_config(servers: &str, gateway_extra: &str) -> String {
    format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
{gateway_extra}

[[upstream]]
name = "echo"
servers = {servers}
connect_timeout_ms = 1000

[[route]]
path = "/"
upstream = "echo"
"#
    )
}

/// The admin token of test configs that call the admin API.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// An admin request as an operator's client makes it: `Host` naming the admin address and
/// the token of [`ADMIN_TOKEN`]. The status and the whole response text.
pub async fn admin_request(gw: &Gateway, method: &str, path: &str) -> (u16, String) {
    let admin = gw.admin_addr.expect("the gateway has an admin address");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    raw_http(admin, &request).await
}

/// Starts an in-process gateway from config text (relative paths resolve against the repo).
pub async fn start_gateway(toml: &str) -> Gateway {
    let config = Config::parse(toml, "test.toml", repo_root()).expect("test config is valid");
    Gateway::start(config).await.expect("gateway starts")
}

pub fn ws_url(gateway: &Gateway, path: &str) -> String {
    format!("ws://{}{}", gateway.listen_addr, path)
}

/// Connects a tokio-tungstenite client that accepts messages up to 64 MiB.
pub async fn connect(url: &str) -> Client {
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20)).max_frame_size(Some(64 << 20));
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(url, Some(config), false),
    )
    .await
    .expect("connect timed out")
    .expect("connect failed");
    ws
}

/// Connects with extra request headers (auth tokens, API keys, routing headers).
pub async fn connect_with(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Client {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
    let mut request = ws_url(gw, path).into_client_request().unwrap();
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    let (ws, _) = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(request))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    ws
}

/// Sends a message and returns the next data message, failing after 10 s.
pub async fn roundtrip(ws: &mut Client, msg: Message) -> Message {
    ws.send(msg).await.expect("send");
    next_data(ws).await
}

/// The next text or binary message (pings and pongs skipped), or a close frame.
pub async fn next_data(ws: &mut Client) -> Message {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no message within 10 s")
            .expect("stream ended")
            .expect("read error");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Waits for the close frame (skipping data) and returns its code, or 1006 if none came.
pub async fn close_code(ws: &mut Client) -> u16 {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("no close within 10 s") {
            Some(Ok(Message::Close(frame))) => return frame.map_or(1005, |f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return 1006,
        }
    }
}

/// Sends raw bytes over a new TCP connection and returns the HTTP status line's code and the
/// whole response text.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    // One response is enough: stop at the end of its body or headers.
                    let text = String::from_utf8_lossy(&buf);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text[..head_end]
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                            .unwrap_or(0);
                        if buf.len() >= head_end + 4 + len {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A handshake request with the given extra header lines (each ending in \r\n).
pub fn upgrade_request(method: &str, extra: &str) -> String {
    format!(
        "{method} / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
    )
}

/// An address nothing listens on (bound, then released).
pub fn dead_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The release binary of the gateway, built by the same `cargo test --release` run.
pub fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/release/deps/test-xxxx -> target/release/wasmgate
    let path = exe.parent().unwrap().parent().unwrap().join("wasmgate");
    assert!(path.exists(), "{} missing: cargo test --workspace builds it", path.display());
    path
}

/// Polls `check` every 50 ms until it holds or `within` passes; returns whether it held.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// A masked client text frame, uncompressed (RSV1 clear), shorter than 64 KiB.
pub fn client_text(text: &str) -> Vec<u8> {
    let mut frame = vec![0x81];
    // RFC 6455 §5.2: the length in the fewest bytes that hold it.
    match text.len() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]); // mask key 0: the payload goes as is
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// Reads one unmasked server frame: (RSV1 set, opcode, payload).
pub async fn server_frame(stream: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.unwrap();
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).await.unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).await.unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    (head[0] & 0x40 != 0, head[0] & 0x0F, payload)
}

/// Reads an HTTP head byte by byte, up to and including the blank line, so nothing after
/// it is consumed.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// The Sec-WebSocket-Accept that answers the key in an upgrade request's head, for
/// hand-made backends.
pub fn accept_for(request_head: &str) -> String {
    let key = request_head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-key")))
        .map(|(_, value)| value.trim())
        .expect("the request carries a key");
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
}

/// This test process's scratch directory, `$TMPDIR/wasmgate-tests-PID`: configs, generated
/// certificates and keys, logs. It is removed when the process exits.
static SCRATCH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// `name`, a directory inside this test process's scratch directory (made if missing).
/// Test processes run side by side (CI and a developer's run); each has its own.
pub fn scratch_dir(name: &str) -> PathBuf {
    let root = SCRATCH.get_or_init(|| {
        // libtest has no hook for the end of a test binary; the C library's exit handlers
        // run on every exit through `exit`, failed tests included.
        extern "C" fn remove_scratch() {
            if let Some(root) = SCRATCH.get() {
                let _ = std::fs::remove_dir_all(root);
            }
        }
        // SAFETY: registers a plain function with no arguments, as atexit(3) requires.
        unsafe { libc::atexit(remove_scratch) };
        std::env::temp_dir().join(format!("wasmgate-tests-{}", std::process::id()))
    });
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a config file into this test process's scratch directory.
pub fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let path = scratch_dir("configs").join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A child process that is killed when dropped, so a failing test leaves no process behind.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the `wasmgate run` binary and waits for its "listening on ws://ADDR" line.
pub fn spawn_gateway(config: &std::path::Path) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(gateway_binary())
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // "listening on ws://A", "... on wss://B", or "... on ws://A and wss://B": the plain
    // address when there is one.
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = words
        .iter()
        .find_map(|w| w.strip_prefix("ws://"))
        .or_else(|| words.iter().find_map(|w| w.strip_prefix("wss://")))
        .unwrap_or("")
        .to_string();
    assert!(addr.contains(':'), "unexpected first line {line:?}");
    (child, addr)
}

/// A completed handshake over a raw socket to `path`, for sending hand-made frames.
pub async fn raw_websocket(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
        .replacen("GET / ", &format!("GET {path} "), 1);
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// A kosoku (Autobahn TestSuite) report in `outdir`, judged: every case's verdict, counted
/// by `behavior`; the cases that FAILED, or whose compression case (sections 12, 13) was
/// not OK; and the cases that ended NON-STRICT. kosoku exits non-zero for UNIMPLEMENTED
/// cases too, so a run is judged by its report, not its exit status.
pub struct AutobahnReport {
    pub cases: usize,
    pub counts: std::collections::BTreeMap<String, usize>,
    pub failed: Vec<String>,
    pub not_strict: Vec<String>,
}

pub fn autobahn_report(outdir: &Path, kosoku_stderr: &[u8]) -> AutobahnReport {
    assert!(outdir.join("index.json").exists(), "kosoku wrote no report: {}", String::from_utf8_lossy(kosoku_stderr));
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(outdir.join("index.json")).unwrap()).unwrap();
    let cases = index.as_object().unwrap().values().next().unwrap().as_object().unwrap();
    let mut report = AutobahnReport { cases: cases.len(), counts: Default::default(), failed: Vec::new(), not_strict: Vec::new() };
    for (case, result) in cases {
        let compression_case = case.starts_with("12.") || case.starts_with("13.");
        for key in ["behavior", "behaviorClose"] {
            let verdict = result[key].as_str().unwrap_or("?");
            if verdict == "FAILED" || (compression_case && verdict != "OK") {
                report.failed.push(format!("{case} ({key}: {verdict})"));
            }
        }
        if result["behavior"] == "NON-STRICT" {
            report.not_strict.push(case.clone());
        }
        *report.counts.entry(result["behavior"].as_str().unwrap_or("?").to_string()).or_default() += 1;
    }
    report
}
