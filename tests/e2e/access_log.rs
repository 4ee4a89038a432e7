//! Access logs: each way a connection ends leaves exactly one line with the right fields,
//! and a log file is reopened on SIGUSR1 (rename, signal, the next line goes to a new file).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// A fresh log path in a per-test directory.
fn log_path(test: &str) -> PathBuf {
    let dir = wasmgate_tests::scratch_dir(&format!("access-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("access.log")
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

/// Waits until the log holds `n` lines (the writer is a thread of its own), then gives it a
/// moment to show that no more come.
async fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    assert!(
        eventually(Duration::from_secs(5), || lines(path).len() >= n).await,
        "expected {n} lines in {}, found {:?}",
        path.display(),
        lines(path)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let found = lines(path);
    assert_eq!(found.len(), n, "one line per connection: {found:#?}");
    found
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn config(servers: &str, log: &Path, extra: &str) -> String {
    let key_sha256 = "e0bebd7ef4d9a5b3b6a7e1ec8d7a7c8f44e9a4cd8e0a3dd9e2c3f1c1c6c7b0a1";
    format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
access_log = "{log}"
{extra}

[[upstream]]
name = "echo"
servers = {servers}
connect_timeout_ms = 1000
max_attempts = 1

[[plugin]]
name = "keys"
wasm = "{api_key}"
config = {{ keys = [{{ name = "team-a", sha256 = "{key_sha256}" }}] }}

[[route]]
path = "/"
upstream = "echo"

[[route]]
path = "/locked"
upstream = "echo"
plugins = ["keys"]
"#,
        log = log.display(),
        api_key = plugin_wasm("api-key").display(),
    )
}

#[tokio::test]
async fn a_refused_handshake_names_the_plugin_and_its_status() {
    let backends = echo_backends(1).await;
    let log = log_path("refused");
    let gw = start_gateway(&config(&server_list(&backends), &log, "")).await;
    let (status, _) = raw_http(
        gw.listen_addr,
        &upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
            .replacen("GET / ", "GET /locked/room?api_key=secret ", 1),
    )
    .await;
    assert_eq!(status, 401);
    let line = json(&wait_lines(&log, 1).await[0]);
    assert_eq!(line["status"], 401, "{line}");
    assert_eq!(line["refused_by"], "keys", "{line}");
    assert_eq!(line["reason"], "missing API key", "{line}");
    assert_eq!(line["route"], "/locked", "{line}");
    assert_eq!(line["path"], "/locked/room", "the query is not logged: {line}");
    assert!(line["server"].is_null() && line["close_code"].is_null(), "{line}");
    assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
    assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_close_is_logged_with_counts_server_and_subprotocol() {
    let backends = echo_backends(1).await;
    let log = log_path("client-close");
    let gw = start_gateway(&config(&server_list(&backends), &log, "compression = \"terminate\"")).await;
    let mut request = ws_url(&gw, "/chat").into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "chat.v1".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(roundtrip(&mut ws, Message::text("hello")).await, Message::text("hello"));
    assert_eq!(roundtrip(&mut ws, Message::text("again")).await, Message::text("again"));
    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1000);
    let line = json(&wait_lines(&log, 1).await[0]);
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["route"], "/", "{line}");
    assert_eq!(line["pool"], "echo", "{line}");
    assert_eq!(line["server"], backends[0].addr.to_string(), "{line}");
    assert_eq!(line["subprotocol"], "chat.v1", "{line}");
    assert!(line["compression"].is_null(), "tungstenite offers no deflate: {line}");
    assert_eq!(line["messages_from_client"], 2, "{line}");
    assert_eq!(line["messages_from_upstream"], 2, "{line}");
    assert_eq!(line["bytes_from_client"], 10, "{line}");
    assert_eq!(line["bytes_from_upstream"], 10, "{line}");
    assert_eq!(line["close_code"], 1000, "{line}");
    assert_eq!(line["closed_by"], "client", "{line}");
    assert!(line["refused_by"].is_null(), "{line}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_close_is_logged_as_the_upstreams() {
    let backends = echo_backends(1).await;
    let log = log_path("upstream-close");
    let gw = start_gateway(&config(&server_list(&backends), &log, "")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    ws.send(Message::text("close:4000:done")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 4000);
    drop(ws);
    let line = json(&wait_lines(&log, 1).await[0]);
    assert_eq!(line["close_code"], 4000, "{line}");
    assert_eq!(line["closed_by"], "upstream", "{line}");
    assert_eq!(line["messages_from_client"], 1, "{line}");
    assert_eq!(line["messages_from_upstream"], 0, "{line}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_failure_is_a_502_line_naming_the_server_tried() {
    let dead = dead_address();
    let log = log_path("upstream-down");
    let gw = start_gateway(&config(&format!("[\"{dead}\"]"), &log, "")).await;
    let (status, _) = raw_http(
        gw.listen_addr,
        &upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
    )
    .await;
    assert_eq!(status, 502);
    let line = json(&wait_lines(&log, 1).await[0]);
    assert_eq!(line["status"], 502, "{line}");
    assert_eq!(line["pool"], "echo", "{line}");
    assert_eq!(line["server"], dead.to_string(), "{line}");
    assert!(line["reason"].as_str().unwrap().contains("no upstream server of echo answered"), "{line}");
    assert!(line["refused_by"].is_null(), "no plugin refused it: {line}");
    gw.shutdown().await;
}

/// The binary, text format: rename the file, send SIGUSR1, and the next connection's line is
/// in a new file at the configured path while the renamed one keeps the first.
#[tokio::test]
async fn sigusr1_reopens_the_file_for_logrotate() {
    let backends = echo_backends(1).await;
    let log = log_path("reopen");
    let config_path = write_config("access-log-reopen.toml", &config(&server_list(&backends), &log, "log_format = \"text\""));
    let (child, addr) = spawn_gateway(&config_path);
    let child = KillOnDrop(child);
    let url = format!("ws://{addr}/first");
    let mut ws = connect(&url).await;
    ws.close(None).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1005);
    let first = wait_lines(&log, 1).await;
    assert!(first[0].contains(" path=/first ") && first[0].contains(" status=101 "), "{}", first[0]);
    assert!(first[0].contains(" closed_by=client"), "{}", first[0]);

    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let signalled = Command::new("kill").args(["-USR1", &child.id().to_string()]).status().unwrap();
    assert!(signalled.success());
    // The writer reopens before its next line; give the signal a moment to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ws = connect(&format!("ws://{addr}/second")).await;
    ws.close(None).await.unwrap();
    close_code(&mut ws).await;
    let second = wait_lines(&log, 1).await;
    assert!(second[0].contains(" path=/second "), "{}", second[0]);
    assert_eq!(lines(&rotated).len(), 1, "the rotated file keeps only the first line");
    drop(child);
}
