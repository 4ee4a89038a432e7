//! What the gateway makes itself obeys the limits relayed traffic does: replies and pongs
//! wait for a client that does not read (memory stays bounded), a plugin's payload or reply
//! is held to `max_message_size`, and a message assembled for plugins must arrive in time.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// One upstream `echo`, route `/` with the `message-actions` fixture as `actions`, and
/// `plugin_extra` in its `[[plugin]]` table.
fn actions_config(servers: &str, gateway_extra: &str, plugin_extra: &str) -> String {
    basic_config(servers, gateway_extra).replace("upstream = \"echo\"\n", "upstream = \"echo\"\nplugins = [\"actions\"]\n")
        + &format!(
            "\n[[plugin]]\nname = \"actions\"\nwasm = \"{}\"\n{plugin_extra}\n",
            plugin_wasm("message-actions").display()
        )
}

/// A masked client frame (mask key 0) of any length and opcode.
fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// Writes `frame` until `count` were sent or a write blocks for 2 s (backpressure reached
/// the client); returns how many were sent.
async fn send_until_blocked(stream: &mut tokio::net::TcpStream, frame: &[u8], count: usize) -> usize {
    let mut batch = Vec::new();
    for _ in 0..64 {
        batch.extend_from_slice(frame);
    }
    let mut sent = 0;
    while sent < count {
        match tokio::time::timeout(Duration::from_secs(2), stream.write_all(&batch)).await {
            Ok(Ok(())) => sent += 64,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break,
        }
    }
    sent
}

/// Another client still gets its echo: the gateway is serving.
async fn still_serves(addr: &str) {
    let mut ws = connect(&format!("ws://{addr}/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("still there?")).await, Message::text("still there?"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_to_a_client_that_never_reads_stay_bounded() {
    let backends = echo_backends(1).await;
    let path = write_config("replies.toml", &actions_config(&server_list(&backends), "", ""));
    let (child, addr) = spawn_gateway(&path);
    let child = KillOnDrop(child);
    // Warm up: plugin instances grow their memory to make 1 MiB replies (Wasm memory is
    // paid per instance, once, not per connection or message).
    let mut reader = connect(&format!("ws://{addr}/")).await;
    for _ in 0..16 {
        assert_eq!(roundtrip(&mut reader, Message::text("big:1048576")).await.len(), 1 << 20);
    }
    let mut client = raw_websocket(addr.parse().unwrap(), "/").await;
    let before = rss_kib(child.id());

    // Each 16-byte request asks for a 1 MiB reply: 2,048 of them would be 2 GiB unbounded.
    let sent = send_until_blocked(&mut client, &client_frame(0x1, true, b"big:1048576"), 2048).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(child.id());
    println!("asked for {sent} MiB of replies without reading; gateway RSS {before} KiB -> {after} KiB");
    assert!(after < before + 24 * 1024, "gateway grew by {} KiB", after - before);
    still_serves(&addr).await;

    // The replies were held back, not lost: reading now brings them.
    let mut head = [0u8; 10];
    client.read_exact(&mut head).await.unwrap();
    assert_eq!((head[0], head[1]), (0x81, 127), "a 1 MiB text reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_from_a_client_that_never_reads_costs_bounded_memory() {
    let backends = echo_backends(1).await;
    let path = write_config("pings.toml", &basic_config(&server_list(&backends), ""));
    let (child, addr) = spawn_gateway(&path);
    let child = KillOnDrop(child);
    let mut client = raw_websocket(addr.parse().unwrap(), "/").await;
    let before = rss_kib(child.id());

    // 125-byte pings, each answered by a pong the client never reads: up to 64 MiB of them.
    let sent = send_until_blocked(&mut client, &client_frame(0x9, true, &[7u8; 125]), 512 * 1024).await;
    let after = rss_kib(child.id());
    println!("sent {sent} pings without reading; gateway RSS {before} KiB -> {after} KiB");
    assert!(after < before + 16 * 1024, "gateway grew by {} KiB", after - before);
    still_serves(&addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_payload_or_reply_over_the_limit_is_its_failure() {
    let backends = echo_backends(1).await;
    let limit = "max_message_size = 65536";
    // on_error "allow": the message goes on as if the plugin were not there.
    let gw = start_gateway(&actions_config(&server_list(&backends), limit, "on_error = \"allow\"")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    for asked in ["grow:100000", "big:100000"] {
        assert_eq!(roundtrip(&mut ws, Message::text(asked)).await, Message::text(asked), "{asked}");
    }
    // Within the limit, the plugin's payload and reply go out as made.
    assert_eq!(roundtrip(&mut ws, Message::text("big:65536")).await, Message::text("x".repeat(65536)));
    assert_eq!(roundtrip(&mut ws, Message::text("grow:10")).await, Message::text("x".repeat(10)));
    gw.shutdown().await;

    // on_error "deny": the connection closes with 1011, the client's link is not blamed on
    // the upstream, and the upstream never saw the oversized payload.
    let gw = start_gateway(&actions_config(&server_list(&backends), limit, "on_error = \"deny\"")).await;
    for asked in ["grow:100000", "big:100000"] {
        let mut ws = connect(&ws_url(&gw, "/")).await;
        ws.send_text(asked).await;
        assert_eq!(close_code(&mut ws).await, 1011, "{asked}");
    }
    gw.shutdown().await;
}

/// Sends a text message, for the two-liners above.
trait SendText {
    async fn send_text(&mut self, text: &str);
}

impl SendText for Client {
    async fn send_text(&mut self, text: &str) {
        use futures_util::SinkExt;
        self.send(Message::text(text)).await.expect("send");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_trickled_to_plugins_must_arrive_in_time() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&actions_config(&server_list(&backends), "message_assembly_timeout_secs = 1", "")).await;
    let mut client = raw_websocket(gw.listen_addr, "/").await;
    client.write_all(&client_frame(0x1, false, b"the first half")).await.unwrap();
    let started = std::time::Instant::now();
    let (_, opcode, payload) = tokio::time::timeout(Duration::from_secs(10), server_frame(&mut client)).await.unwrap();
    assert_eq!(opcode, 0x8, "a close frame");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1008);
    println!("closed after {:?}", started.elapsed());
    gw.shutdown().await;

    // A route whose plugins read no messages streams frames: nothing is held, no deadline.
    let gw = start_gateway(&basic_config(&server_list(&backends), "message_assembly_timeout_secs = 1")).await;
    let mut client = raw_websocket(gw.listen_addr, "/").await;
    client.write_all(&client_frame(0x1, false, b"slow ")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.write_all(&client_frame(0x0, true, b"but whole")).await.unwrap();
    let (_, opcode, payload) = server_frame(&mut client).await;
    assert_eq!((opcode, payload.as_slice()), (0x1, &b"slow but whole"[..]));
    gw.shutdown().await;
}
