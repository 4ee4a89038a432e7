//! Frames through the gateway: messages of every shape, close codes both ways, limits,
//! keepalive, and what happens when one side vanishes.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

#[tokio::test]
async fn echoes_text_binary_and_large_messages() {
    let backends = echo_backends(2).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("héllo")).await, Message::text("héllo"));
    let binary: Vec<u8> = (0..=255).collect();
    assert_eq!(roundtrip(&mut ws, Message::binary(binary.clone())).await, Message::binary(binary));
    assert_eq!(roundtrip(&mut ws, Message::binary(Vec::new())).await, Message::binary(Vec::new()));
    let big: Vec<u8> = (0..16 << 20).map(|i: u32| (i % 251) as u8).collect();
    assert_eq!(roundtrip(&mut ws, Message::binary(big.clone())).await, Message::binary(big));
    gw.shutdown().await;
}

#[tokio::test]
async fn fragmented_messages_arrive_whole_with_pings_between_fragments() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    ws.send(Message::Frame(Frame::message("frag", OpCode::Data(Data::Text), false))).await.unwrap();
    ws.send(Message::Ping("between".into())).await.unwrap();
    ws.send(Message::Frame(Frame::message("mént", OpCode::Data(Data::Continue), false))).await.unwrap();
    ws.send(Message::Frame(Frame::message("ed", OpCode::Data(Data::Continue), true))).await.unwrap();
    // The ping is answered by the backend through the gateway.
    let pong = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(pong, Message::Pong("between".into()));
    assert_eq!(next_data(&mut ws).await, Message::text("fragménted"));
    gw.shutdown().await;
}

#[tokio::test]
async fn close_codes_propagate_both_ways() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;

    // Client-initiated: the backend receives the client's code and echoes it back.
    let mut ws = connect(&ws_url(&gw, "/")).await;
    ws.close(Some(CloseFrame { code: CloseCode::from(4001), reason: "client bye".into() })).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 4001);
    assert!(eventually(Duration::from_secs(5), || backends[0].closes.lock().unwrap().contains(&4001)).await);

    // Upstream-initiated: the client receives the backend's code and reason.
    let mut ws = connect(&ws_url(&gw, "/")).await;
    ws.send(Message::text("close:4002:server bye")).await.unwrap();
    let msg = next_data(&mut ws).await;
    let Message::Close(Some(frame)) = msg else { panic!("expected a close frame, got {msg:?}") };
    assert_eq!((u16::from(frame.code), frame.reason.as_str()), (4002, "server bye"));
    gw.shutdown().await;
}

/// RFC 6455 §5.5.1: each side of a close handshake gets one close frame back, and it is the
/// peer's own answer (its code and reason), not one the gateway made up.
#[tokio::test]
async fn each_close_is_answered_once_by_the_peer() {
    // Client first: tungstenite's echo backend answers with the client's code and reason.
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    let mut client = raw_websocket(gw.listen_addr, "/").await;
    client.write_all(&masked_frame(0x8, &close_payload(4001, "client bye"))).await.unwrap();
    let answer = frames(&read_to_eof(&mut client).await);
    assert_eq!(answer, vec![(0x8, close_payload(4001, "client bye"))]);
    gw.shutdown().await;

    // Upstream first: a hand-made backend closes and records everything the gateway sends.
    let (addr, backend) = raw_backend(|mut s| async move {
        let mut close = vec![0x88, 12];
        close.extend_from_slice(&close_payload(4002, "server bye"));
        s.write_all(&close).await.unwrap();
        frames(&read_to_eof(&mut s).await)
    })
    .await;
    let gw = start_gateway(&basic_config(&format!("[\"{addr}\"]"), "")).await;
    let mut client = raw_websocket(gw.listen_addr, "/").await;
    assert_eq!(server_frame(&mut client).await, (false, 0x8, close_payload(4002, "server bye")));
    client.write_all(&masked_frame(0x8, &close_payload(4002, "client ack"))).await.unwrap();
    assert_eq!(frames(&read_to_eof(&mut client).await), vec![], "nothing follows the close");
    let seen = tokio::time::timeout(Duration::from_secs(5), backend).await.unwrap().unwrap();
    assert_eq!(seen, vec![(0x8, close_payload(4002, "client ack"))]);
    gw.shutdown().await;
}

/// An upstream that never answers a forwarded close: when the close timeout runs out, the
/// client still gets its answer (its own code) before the FIN.
#[tokio::test]
async fn an_unanswered_close_is_answered_by_the_gateway_at_the_deadline() {
    // Reads, never answers.
    let (addr, backend) = raw_backend(|mut s| async move { frames(&read_to_eof(&mut s).await) }).await;
    let gw = start_gateway(&basic_config(&format!("[\"{addr}\"]"), "close_timeout_secs = 1")).await;
    let mut client = raw_websocket(gw.listen_addr, "/").await;
    client.write_all(&masked_frame(0x8, &close_payload(4003, "leaving"))).await.unwrap();
    assert_eq!(frames(&read_to_eof(&mut client).await), vec![(0x8, close_payload(4003, ""))]);
    let seen = tokio::time::timeout(Duration::from_secs(5), backend).await.unwrap().unwrap();
    assert_eq!(seen, vec![(0x8, close_payload(4003, "leaving"))], "the close was forwarded");
    gw.shutdown().await;
}

/// An upstream that hangs up on a forwarded close instead of answering: the client's close
/// still completes cleanly, with its own code, not as an upstream failure (1011).
#[tokio::test]
async fn a_close_the_upstream_hangs_up_on_is_answered_by_the_gateway() {
    // Reads the close, then is gone without an answer.
    let (addr, _backend) = raw_backend(|mut s| async move {
        let _ = s.read(&mut [0u8; 64]).await;
    })
    .await;
    let gw = start_gateway(&basic_config(&format!("[\"{addr}\"]"), "")).await;
    let mut client = raw_websocket(gw.listen_addr, "/").await;
    client.write_all(&masked_frame(0x8, &close_payload(1000, "done"))).await.unwrap();
    assert_eq!(frames(&read_to_eof(&mut client).await), vec![(0x8, close_payload(1000, ""))]);
    gw.shutdown().await;
}

/// A hand-made backend for one connection: it accepts the gateway's, answers the upgrade,
/// then hands the socket to `then`, whose result the handle gives.
async fn raw_backend<T, F>(then: impl FnOnce(tokio::net::TcpStream) -> F + Send + 'static) -> (std::net::SocketAddr, tokio::task::JoinHandle<T>)
where
    F: std::future::Future<Output = T> + Send,
    T: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        accept_upgrade(&mut s).await;
        then(s).await
    });
    (addr, task)
}

/// A hand-made backend's side of the upgrade: reads the gateway's request, answers 101.
async fn accept_upgrade(s: &mut tokio::net::TcpStream) {
    let accept = accept_for(&read_head(s).await);
    let reply = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
    s.write_all(reply.as_bytes()).await.unwrap();
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// A short (< 126 bytes) final frame, masked as a client's must be.
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Short frames, masked or not, as (opcode, unmasked payload).
fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (masked, len) = (bytes[1] & 0x80 != 0, (bytes[1] & 0x7f) as usize);
        assert!(len < 126, "a short frame");
        let mask_len = if masked { 4 } else { 0 };
        let mask = bytes[2..2 + mask_len].to_vec();
        let payload = &bytes[2 + mask_len..2 + mask_len + len];
        let payload = payload.iter().enumerate().map(|(i, b)| if masked { b ^ mask[i % 4] } else { *b });
        out.push((bytes[0] & 0x0f, payload.collect()));
        bytes = &bytes[2 + mask_len + len..];
    }
    out
}

async fn read_to_eof(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all))
        .await
        .expect("the gateway ends the connection after the close handshake")
        .unwrap();
    all
}

#[tokio::test]
async fn oversize_message_closes_with_1009() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "max_message_size = 1024")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut ws, Message::binary(vec![1; 1024])).await, Message::binary(vec![1; 1024]));
    ws.send(Message::binary(vec![1; 1025])).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1009);
    // The upstream is told the client is going away.
    assert!(eventually(Duration::from_secs(5), || backends[0].closes.lock().unwrap().contains(&1001)).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_bad_frames_with_1002() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    for (frame, expected) in [
        // Text with invalid UTF-8.
        (vec![0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28], 1007),
        // Reserved bit set.
        (vec![0xC1, 0x80, 0, 0, 0, 0], 1002),
        // Unmasked client frame.
        (vec![0x81, 0x01, b'a'], 1002),
    ] {
        let mut stream = raw_websocket(gw.listen_addr, "/").await;
        stream.write_all(&frame).await.unwrap();
        let mut buf = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n >= 4, "expected a close frame");
        assert_eq!(buf[0], 0x88, "a close frame");
        assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), expected);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn vanished_client_gets_its_upstream_closed_with_1001() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("x")).await, Message::text("x"));
    drop(ws); // TCP gone, no close frame
    assert!(
        eventually(Duration::from_secs(5), || backends[0].closes.lock().unwrap().contains(&1001)).await,
        "upstream saw {:?}",
        backends[0].closes.lock().unwrap()
    );
    gw.shutdown().await;
}

/// `on_client_loss = "disconnect"`: no close frame; the upstream gets what the client sent
/// before it vanished, then the end of its TCP connection.
#[tokio::test]
async fn with_disconnect_a_vanished_clients_upstream_gets_its_last_message_then_a_tcp_close() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(socket.read_u8().await.unwrap());
        }
        let accept = accept_for(&String::from_utf8_lossy(&head));
        let answer = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
        socket.write_all(answer.as_bytes()).await.unwrap();
        // Everything the gateway sends until it closes the connection.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut rest)).await.expect("the gateway closes").unwrap();
        rest
    });
    let extra = "on_client_loss = \"disconnect\"";
    let gw = start_gateway(&basic_config(&format!("[\"{addr}\"]"), extra)).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    ws.send(Message::text("last words")).await.unwrap();
    drop(ws); // TCP gone, no close frame
    let rest = backend.await.unwrap();
    // One masked text frame (2 header bytes, 4 of mask, 10 of payload), and no close frame.
    assert_eq!(rest.len(), 16, "{rest:?}");
    assert_eq!(&rest[..2], &[0x81, 0x80 | 10]);
    let text: Vec<u8> = rest[6..].iter().zip(rest[2..6].iter().cycle()).map(|(b, m)| b ^ m).collect();
    assert_eq!(text, b"last words");
    gw.shutdown().await;
}

#[tokio::test]
async fn vanished_upstream_gets_the_client_a_1011() {
    // A backend that accepts the upgrade, then drops the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let ws = tokio_tungstenite::accept_async(s).await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(ws);
            });
        }
    });
    let gw = start_gateway(&basic_config(&format!("[\"{addr}\"]"), "")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    assert_eq!(close_code(&mut ws).await, 1011);
    gw.shutdown().await;
}

#[tokio::test]
async fn keepalive_keeps_live_peers_and_drops_dead_ones() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "ping_interval_secs = 1\npong_timeout_secs = 1")).await;
    // tokio-tungstenite answers pings while it reads: a live client.
    let mut live = connect(&ws_url(&gw, "/")).await;
    // A raw client that never answers: a dead peer.
    let mut dead = raw_websocket(gw.listen_addr, "/").await;
    let reader = tokio::spawn(async move {
        let mut got_ping = false;
        let mut buf = [0u8; 256];
        loop {
            match dead.read(&mut buf).await {
                Ok(0) | Err(_) => return got_ping,
                Ok(n) => got_ping |= buf[..n].contains(&0x89),
            }
        }
    });
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), live.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(other) => panic!("live client got {other:?}"),
            Err(_) => {}
        }
    }
    assert!(pings >= 1, "the idle live client was pinged");
    assert_eq!(roundtrip(&mut live, Message::text("still here")).await, Message::text("still here"));
    let dead_result = tokio::time::timeout(Duration::from_secs(6), reader).await;
    assert!(dead_result.expect("dead peer was not disconnected").unwrap(), "it was pinged first");
    assert!(eventually(Duration::from_secs(5), || backends[0].closes.lock().unwrap().contains(&1001)).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_live_connections_with_1001() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("x")).await, Message::text("x"));
    let closing = tokio::spawn(gw.shutdown());
    assert_eq!(close_code(&mut ws).await, 1001);
    closing.await.unwrap();
}
