//! permessage-deflate: terminated at the gateway (plain upstream), passed through between a
//! compressing client and a compressing backend, refused bombs. Autobahn's compression
//! sections run in `conformance.rs`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmgate_tests::*;

async fn run(mut command: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output().expect("command runs")).await.unwrap()
}

async fn python_client(url: String, expect: &str) -> String {
    let mut command = Command::new(python());
    command.arg(repo_root().join("tests/python/compression.py")).args(["client", &url, expect]);
    let out = run(command).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_mode_compresses_for_the_client_and_not_for_the_backend() {
    let backends = echo_backends(1).await; // tokio-tungstenite: no compression at all
    let gw = start_gateway(&basic_config(&server_list(&backends), "compression = \"terminate\"")).await;
    let out = python_client(ws_url(&gw, "/"), "deflate").await;
    println!("{out}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_mode_declines_compression() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "compression = \"off\"")).await;
    python_client(ws_url(&gw, "/"), "none").await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_mode_leaves_compression_end_to_end() {
    let port = dead_address().port();
    let mut server = Command::new(python())
        .arg(repo_root().join("tests/python/compression.py"))
        .args(["server", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    let gw = start_gateway(&basic_config(&format!("[\"127.0.0.1:{port}\"]"), "compression = \"passthrough\"")).await;
    let out = python_client(ws_url(&gw, "/"), "deflate").await;
    assert!(out.contains("server side: [\"permessage-deflate\"]"), "the backend negotiated it too:\n{out}");
    // The gateway relayed compressed bytes: fewer payload bytes than the ~180 KB sent.
    let metrics = gw.metrics_text();
    let from_client: f64 = metrics
        .lines()
        .find(|l| l.starts_with("wasmgate_payload_bytes_total{from=\"client\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(from_client < 60_000.0, "payloads passed compressed: {from_client} bytes");
    gw.shutdown().await;
    server.kill().unwrap();
    server.wait().unwrap();
}

/// A client frame that inflates to `inflated` zero bytes.
fn bomb_frame(inflated: usize) -> Vec<u8> {
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&vec![0u8; inflated]).unwrap();
    let mut payload = encoder.finish().unwrap();
    // RFC 7692: strip the empty stored block a sync flush would end with, if present.
    if payload.ends_with(&[0, 0, 0xff, 0xff]) {
        payload.truncate(payload.len() - 4);
    }
    let mut frame = vec![0xC2, 0xFF]; // FIN + RSV1 + binary, masked, 64-bit length
    frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(&payload);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompression_bomb_is_refused_with_1009_and_memory_stays_flat() {
    let backends = echo_backends(1).await;
    let dir = wasmgate_tests::scratch_dir("bomb");
    let path = dir.join("gw.toml");
    std::fs::write(&path, basic_config(&server_list(&backends), "compression = \"terminate\"\nmax_message_size = 1048576")).unwrap();
    let mut child = Command::new(gateway_binary()).args(["run", "--config"]).arg(&path).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().rsplit("ws://").next().unwrap().to_string();

    let frame = bomb_frame(512 << 20); // 512 MiB of zeros, about 500 KB compressed
    let mut peak = 0;
    let before = rss_kib(child.id());
    for _ in 0..5 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = upgrade_request(
            "GET",
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate\r\n",
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 1024];
        let n = stream.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101") && head.contains("permessage-deflate"), "{head}");
        let _ = stream.write_all(&frame).await;
        let mut reply = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut reply)).await.unwrap().unwrap();
        assert!(n >= 4 && reply[0] == 0x88, "a close frame");
        assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), 1009);
        peak = peak.max(rss_kib(child.id()));
    }
    println!("bomb: gateway RSS {before} KiB before, peak {peak} KiB");
    assert!(peak < before + 8 * 1024, "memory grew by {} KiB", peak - before);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Inflates one permessage-deflate message (RFC 7692 §7.2.2: append 00 00 ff ff).
fn inflate(payload: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::new();
    let mut decoder = flate2::read::DeflateDecoder::new(&input[..]);
    let _ = decoder.read_to_end(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_and_marked_messages_go_uncompressed() {
    let backends = echo_backends(1).await;
    // The compression plugin asks for a 64-byte threshold; message-actions marks `raw:`
    // messages from the upstream (echoes here) to go uncompressed.
    let toml = format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
compression = "off"

[[upstream]]
name = "echo"
servers = {}

[[plugin]]
name = "compress"
wasm = "{}"
config = {{ default = {{ mode = "terminate", max_window_bits = 12, min_size = 64 }} }}

[[plugin]]
name = "actions"
wasm = "{}"

[[route]]
path = "/"
upstream = "echo"
plugins = ["compress", "actions"]
"#,
        server_list(&backends),
        plugin_wasm("compression").display(),
        plugin_wasm("message-actions").display(),
    );
    let gw = start_gateway(&toml).await;
    let mut stream = tokio::net::TcpStream::connect(gw.listen_addr).await.unwrap();
    let request = upgrade_request(
        "GET",
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate\r\n",
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101") && head.contains("permessage-deflate"), "{head}");

    let big = format!("{{\"price\": 101.25, \"pad\": \"{}\"}}", "ab".repeat(100));
    let raw = format!("raw:{}", "cd".repeat(100));
    for (sent, compressed) in [("tiny", false), (big.as_str(), true), (raw.as_str(), false), ("upper:abc", false)] {
        stream.write_all(&client_text(sent)).await.unwrap();
        let (rsv1, opcode, payload) = tokio::time::timeout(Duration::from_secs(10), server_frame(&mut stream)).await.unwrap();
        assert_eq!(opcode, 1, "a text frame, not {:?}", String::from_utf8_lossy(&payload));
        assert_eq!(rsv1, compressed, "{sent:.20}: compressed");
        let text = if rsv1 { inflate(&payload) } else { payload };
        let expected = if sent == "upper:abc" { "UPPER:ABC" } else { sent };
        assert_eq!(String::from_utf8(text).unwrap(), expected);
    }
    gw.shutdown().await;
}
