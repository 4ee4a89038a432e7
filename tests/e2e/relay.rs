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
        let mut stream = raw_websocket(&gw).await;
        stream.write_all(&frame).await.unwrap();
        let mut buf = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n >= 4, "expected a close frame");
        assert_eq!(buf[0], 0x88, "a close frame");
        assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), expected);
    }
    gw.shutdown().await;
}

/// A completed handshake over a raw socket, for sending hand-made frames.
async fn raw_websocket(gw: &Gateway) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(gw.listen_addr).await.unwrap();
    let request = upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream
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
    let mut dead = raw_websocket(&gw).await;
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
    assert_eq!(dead_result.expect("dead peer was not disconnected").unwrap(), true, "it was pinged first");
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
