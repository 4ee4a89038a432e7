//! The upgrade: what a client gets for good and bad requests, upstream failures, failover
//! and what the upstream sees of the client's request.

use std::time::Duration;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn malformed_handshakes_get_4xx_with_a_reason() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    let addr = gw.listen_addr;
    let cases = [
        ("missing key", upgrade_request("GET", "Sec-WebSocket-Version: 13\r\n"), 400),
        ("short key", upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n"), 400),
        ("bad version", upgrade_request("GET", &format!("Sec-WebSocket-Version: 8\r\n{KEY}")), 426),
        ("not GET", upgrade_request("POST", &format!("Sec-WebSocket-Version: 13\r\n{KEY}")), 405),
        ("plain HTTP", "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(), 426),
        ("garbage", "HELLO THERE\r\n\r\n".to_string(), 400),
        ("two Hosts", upgrade_request("GET", &format!("Host: other\r\nSec-WebSocket-Version: 13\r\n{KEY}")), 400),
        ("two keys", upgrade_request("GET", &format!("Sec-WebSocket-Version: 13\r\n{KEY}{KEY}")), 400),
        (
            "target naming another host",
            upgrade_request("GET", &format!("Sec-WebSocket-Version: 13\r\n{KEY}")).replacen("GET /", "GET http://other/", 1),
            400,
        ),
    ];
    for (what, request, expected) in cases {
        let (status, text) = raw_http(addr, &request).await;
        assert_eq!(status, expected, "{what}: {text}");
    }
    let (_, text) = raw_http(addr, &upgrade_request("GET", &format!("Sec-WebSocket-Version: 8\r\n{KEY}"))).await;
    assert!(text.to_ascii_lowercase().contains("sec-websocket-version: 13"), "426 names the version: {text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn unknown_route_is_404() {
    let backends = echo_backends(1).await;
    let toml = basic_config(&server_list(&backends), "").replace("path = \"/\"", "path = \"/chat\"");
    let gw = start_gateway(&toml).await;
    let request = format!(
        "GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{KEY}\r\n"
    );
    let (status, text) = raw_http(gw.listen_addr, &request).await;
    assert_eq!(status, 404, "{text}");
    // The route matches its own path and what lies below it.
    let mut ws = connect(&ws_url(&gw, "/chat/room1")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("hi")).await, Message::text("hi"));
    gw.shutdown().await;
}

#[tokio::test]
async fn dead_upstream_gives_502_not_an_accepted_socket() {
    let toml = basic_config(&format!("[\"{}\"]", dead_address()), "");
    let gw = start_gateway(&toml).await;
    let request = upgrade_request("GET", &format!("Sec-WebSocket-Version: 13\r\n{KEY}"));
    let (status, text) = raw_http(gw.listen_addr, &request).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("no upstream server"), "{text}");
    gw.shutdown().await;
}

/// An upstream whose 101 breaks RFC 6455 §4.1 is not a WebSocket: the client gets a 502,
/// never a 101 over a connection nobody can speak to.
#[tokio::test]
async fn an_upstream_101_that_is_not_a_websocket_answer_gives_502() {
    let answers = [
        ("wrong accept", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n"),
        ("no Upgrade", "Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"),
        ("no Connection: upgrade", "Upgrade: websocket\r\nConnection: keep-alive\r\nSec-WebSocket-Accept: {accept}\r\n"),
    ];
    for (what, headers) in answers {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = listener.accept().await.unwrap();
            let accept = accept_for(&read_head(&mut s).await);
            let answer = format!("HTTP/1.1 101 Switching Protocols\r\n{}\r\n", headers.replace("{accept}", &accept));
            s.write_all(answer.as_bytes()).await.unwrap();
            let _ = s.read(&mut [0u8; 16]).await;
        });
        let gw = start_gateway(&basic_config(&format!("[\"{addr}\"]"), "")).await;
        let request = upgrade_request("GET", &format!("Sec-WebSocket-Version: 13\r\n{KEY}"));
        let (status, text) = raw_http(gw.listen_addr, &request).await;
        assert_eq!(status, 502, "{what}: {text}");
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn connect_failure_fails_over_to_the_next_server() {
    let backends = echo_backends(1).await;
    let servers = format!("[\"{}\", \"{}\"]", dead_address(), backends[0].addr);
    let gw = start_gateway(&basic_config(&servers, "")).await;
    // Round robin starts at each server in turn: every attempt must still succeed.
    for _ in 0..6 {
        let mut ws = connect(&ws_url(&gw, "/")).await;
        assert_eq!(roundtrip(&mut ws, Message::text("whoami")).await, Message::text("b0"));
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_refusal_is_passed_to_the_client() {
    // A backend that answers every upgrade with 403.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nno entry\n").await;
        }
    });
    let gw = start_gateway(&basic_config(&format!("[\"{addr}\"]"), "")).await;
    let (status, text) = raw_http(gw.listen_addr, &upgrade_request("GET", &format!("Sec-WebSocket-Version: 13\r\n{KEY}"))).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("no entry"), "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_sees_client_headers_and_forwarding_headers() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    let mut request = ws_url(&gw, "/chat?room=1").into_client_request().unwrap();
    let h = request.headers_mut();
    h.insert("origin", "http://app.example".parse().unwrap());
    h.insert("cookie", "session=abc".parse().unwrap());
    h.insert("authorization", "Bearer t0k3n".parse().unwrap());
    h.insert("sec-websocket-protocol", "v2.chat, v1.chat".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers().get("sec-websocket-protocol").unwrap(), "v2.chat", "upstream's choice comes back");
    let Message::Text(seen) = roundtrip(&mut ws, Message::text("headers")).await else { panic!() };
    for expected in [
        "origin: http://app.example",
        "cookie: session=abc",
        "authorization: Bearer t0k3n",
        "x-forwarded-for: 127.0.0.1",
        "forwarded: for=127.0.0.1;proto=http",
        "path: /chat?room=1",
    ] {
        assert!(seen.contains(expected), "upstream should see {expected:?} in:\n{seen}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn slow_handshake_is_cut_off() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "handshake_timeout_secs = 1")).await;
    let mut stream = tokio::net::TcpStream::connect(gw.listen_addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Never finish the headers: the gateway must answer 408 and close the socket on its own.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "connection with unfinished headers was not closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn oversized_heads_and_bodies_are_refused_with_a_status() {
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    let huge = format!("X-Big: {}\r\n", "a".repeat(70_000));
    let (status, text) = raw_http(gw.listen_addr, &upgrade_request("GET", &format!("Sec-WebSocket-Version: 13\r\n{KEY}{huge}"))).await;
    assert_eq!(status, 431, "{text}");
    let body = format!("Sec-WebSocket-Version: 13\r\n{KEY}Content-Length: 5\r\n");
    let mut request = upgrade_request("GET", &body);
    request.push_str("hello");
    let (status, text) = raw_http(gw.listen_addr, &request).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("no body"), "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_frame_sent_right_behind_the_request_is_relayed() {
    // Some clients do not wait for the 101; the bytes after the request head are frames.
    let backends = echo_backends(1).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "")).await;
    let mut stream = tokio::net::TcpStream::connect(gw.listen_addr).await.unwrap();
    let mut bytes = upgrade_request("GET", &format!("Sec-WebSocket-Version: 13\r\n{KEY}")).into_bytes();
    bytes.extend_from_slice(&client_text("early"));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(&bytes).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "), "{}", String::from_utf8_lossy(&head));
    let (_, opcode, payload) = tokio::time::timeout(Duration::from_secs(5), server_frame(&mut stream)).await.unwrap();
    assert_eq!((opcode, payload.as_slice()), (1, &b"early"[..]));
    gw.shutdown().await;
}
