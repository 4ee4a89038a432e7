//! The demo's chat (`bash examples/demo.sh`), as its users meet it: the page is served by the
//! gateway from `examples/chat-web` (route `files`), the page logs in through the gateway and
//! gets an HS256 token, the chat WebSocket carries it in its `Sec-WebSocket-Protocol` offer,
//! the shipped jwt-auth plugin checks it, and three chat backends share their rooms.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;
use wasmgate_examples::demo::{Demo, AUDIENCE, ISSUER};
use wasmgate_examples::login::{sign_hs256, Issuer};
use wasmgate_tests::*;

async fn demo() -> Demo {
    Demo::start("127.0.0.1:0", "127.0.0.1:0").await.expect("the demo starts")
}

/// A token from the demo's login, asked through the gateway as the page asks.
async fn login(demo: &Demo, name: &str) -> Value {
    let mut ws = connect(&ws_url(&demo.gateway, "/login")).await;
    let Message::Text(answer) = roundtrip(&mut ws, Message::text(json!({ "name": name }).to_string())).await else {
        panic!("the login answers in text")
    };
    serde_json::from_str(answer.as_str()).unwrap()
}

/// The status of a chat upgrade offering `["chat", "bearer", token]`, and the socket if 101.
async fn chat_upgrade(demo: &Demo, token: &str) -> Result<Client, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = ws_url(&demo.gateway, "/chat").into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", format!("chat, bearer, {token}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, response)) => {
            assert_eq!(response.headers()["sec-websocket-protocol"], "chat", "the backend chose chat; the token went no further");
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

fn get(path: &str, method: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
}

/// Plain GETs on /chat are the page; dot files, missing files and ways out are not; an
/// upgrade on the same path is the chat, for valid tokens only, and the backend learns the
/// name from the token (jwt-auth's claims_to_headers), not from the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_the_chat_share_a_path_and_only_tokens_of_the_login_open_the_chat() {
    let demo = demo().await;
    let addr = demo.gateway.listen_addr;
    for path in ["/chat", "/chat/", "/chat/index.html", "/chat//index.html"] {
        let (status, page) = raw_http(addr, &get(path, "GET")).await;
        assert_eq!(status, 200, "{path}: {page}");
        assert!(page.to_ascii_lowercase().contains("content-type: text/html; charset=utf-8"), "{page}");
        assert!(page.contains(r#"new WebSocket(base + "/chat", ["chat", "bearer", token])"#), "{path}");
    }
    let (status, head) = raw_http(addr, &get("/chat", "HEAD")).await;
    assert!(status == 200 && !head.contains("<html"), "{head}");
    for path in ["/chat/.hidden", "/chat/missing.js", "/chat/%2e%2e/demo.toml", "/chat/..%2fdemo.toml", "/chat/%2e%2e/%2e%2e/Cargo.toml"] {
        let (status, answer) = raw_http(addr, &get(path, "GET")).await;
        assert_ne!(status, 200, "{path}: {answer}");
        assert!(!answer.contains("[[route]]") && !answer.contains("[workspace]"), "{path}: {answer}");
    }

    let (status, _) = raw_http(addr, "GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await;
    assert_eq!(status, 401, "no token, no chat");
    let stranger = Issuer { secret: "not the demo's secret, but long enough".into(), iss: ISSUER.into(), aud: AUDIENCE.into(), ttl_secs: 60 };
    assert_eq!(chat_upgrade(&demo, &stranger.token("mallory").0).await.err(), Some(401), "a token of another key");
    let unsigned = sign_hs256(b"", &json!({ "sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": 4102444800u64 }));
    assert_eq!(chat_upgrade(&demo, &unsigned).await.err(), Some(401), "a token signed with an empty key");
    assert_eq!(login(&demo, "no spaces").await["type"], "error");

    let answer = login(&demo, "carol").await;
    assert_eq!(answer["type"], "token", "{answer}");
    let mut ws = chat_upgrade(&demo, answer["token"].as_str().unwrap()).await.expect("the login's token opens the chat");
    let subscribed = roundtrip(&mut ws, Message::text(r#"{"type":"subscribe","channel":"r"}"#)).await;
    let subscribed: Value = serde_json::from_str(subscribed.to_text().unwrap()).unwrap();
    assert!(["chat-1", "chat-2", "chat-3"].contains(&subscribed["server"].as_str().unwrap()), "{subscribed}");
    let said = roundtrip(&mut ws, Message::text(r#"{"type":"publish","channel":"r","text":"hi","from":"mallory"}"#)).await;
    let said: Value = serde_json::from_str(said.to_text().unwrap()).unwrap();
    assert_eq!((said["from"].as_str(), said["text"].as_str()), (Some("carol"), Some("hi")), "{said}");
    demo.shutdown().await;
}

/// Two tabs of headless Chromium (tests/python/chat_browser.py, over the DevTools protocol)
/// open the chat page through the gateway, log in, join one room and see each other's
/// messages; each tab's "served by" line names the demo's backend that serves it (least-conn:
/// two tabs, two backends, so the messages crossed between backends). Screenshots go to
/// target/screenshots/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_tabs_chat_through_the_gateway() {
    let demo = demo().await;
    let shots = repo_root().join("target/screenshots");
    let mut browser = tokio::process::Command::new(python())
        .arg(repo_root().join("tests/python/chat_browser.py"))
        .arg(demo.chat_url())
        .arg(&shots)
        .arg("wasm")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(browser.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the browser script answers")
        .unwrap()
        .expect("the browser script ended early (its error is above)");
    let tabs: Value = serde_json::from_str(line.strip_prefix("TABS ").expect(&line)).unwrap();
    let (alice, bob) = (&tabs["alice"], &tabs["bob"]);
    let backends = ["chat-1", "chat-2", "chat-3"];
    for tab in [alice, bob] {
        assert!(backends.contains(&tab["served_by"].as_str().unwrap()), "{tabs}");
        assert_eq!(tab["protocol"], "chat", "{tabs}");
    }
    assert_ne!(alice["served_by"], bob["served_by"], "least-conn puts the second tab on another backend: {tabs}");
    let shows = |tab: &Value, from: &str, text: &str| {
        tab["messages"].as_array().unwrap().iter().any(|m| m["from"] == from && m["text"] == text)
    };
    assert!(shows(bob, "alice", "hello from alice in wasm"), "{tabs}");
    assert!(shows(alice, "bob", "hi alice, bob here"), "{tabs}");
    // Each tab's messages came from the backend its line names.
    for tab in [alice, bob] {
        for m in tab["messages"].as_array().unwrap() {
            assert_eq!(m["via"].as_str().unwrap(), format!("via {}", tab["served_by"].as_str().unwrap()), "{tabs}");
        }
    }
    assert!(browser.wait().await.unwrap().success());
    assert!(shots.join("chat-alice.png").exists() && shots.join("chat-bob.png").exists());
    demo.shutdown().await;
}
