//! Connections that survive their server: a route with plugins/session-replay in front of
//! chat backends (examples/src/chat.rs) run as child processes sharing rooms through a hub
//! process, so one can be killed with SIGKILL.
//!
//! Shown here: a backend killed, drained (`mode=migrate`) and rebalanced (`mode=migrate`)
//! under 200 subscribed clients without one client close or one duplicate "subscribed";
//! messages published after the move and during the gap arrive; the same kill without the
//! plugin closes every affected client; a server that dies in the middle of a message to a
//! client closes that client with 1011 while the others move.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, StreamExt};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

fn chat_binary() -> PathBuf {
    let path = gateway_binary().with_file_name("chat-backend");
    assert!(path.exists(), "{} missing: cargo build --release --workspace --bins builds it", path.display());
    path
}

/// Starts `chat-backend ARGS` and waits for its "listening on ADDR" line; the address.
fn spawn_chat(args: &[&str]) -> (KillOnDrop, String) {
    let mut child = Command::new(chat_binary()).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().trim_start_matches("ws://").to_string();
    assert!(addr.contains(':'), "unexpected first line {line:?}");
    (KillOnDrop(child), addr)
}

/// A hub and `n` chat instances named c0, c1, ... sharing its rooms.
struct Chat {
    _hub: KillOnDrop,
    servers: Vec<(Option<KillOnDrop>, String)>,
}

impl Chat {
    fn start(n: usize) -> Chat {
        let (hub, hub_addr) = spawn_chat(&["--hub-listen", "127.0.0.1:0"]);
        let servers = (0..n)
            .map(|i| {
                let (child, addr) =
                    spawn_chat(&["--listen", "127.0.0.1:0", "--name", &format!("c{i}"), "--hub", &hub_addr]);
                (Some(child), addr)
            })
            .collect();
        Chat { _hub: hub, servers }
    }

    fn list(&self) -> String {
        let items: Vec<String> = self.servers.iter().map(|(_, a)| format!("\"{a}\"")).collect();
        format!("[{}]", items.join(", "))
    }

    /// SIGKILL, and wait until the process is gone (its sockets closed by the kernel).
    fn kill(&mut self, i: usize) {
        let mut child = self.servers[i].0.take().unwrap();
        child.0.kill().unwrap();
        child.0.wait().unwrap();
    }
}

const REPLAY: &str = r#"{ remember = [{ match = { type = "subscribe" }, key = "channel" }], forget = [{ match = { type = "unsubscribe" }, key = "channel" }], swallow = [{ match = { type = "subscribed" }, key = "channel" }] }"#;

fn config(servers: &str, with_plugin: bool) -> String {
    let plugin = if with_plugin {
        format!(
            "[[plugin]]\nname = \"replay\"\nwasm = \"{}\"\nconfig = {REPLAY}\n",
            plugin_wasm("session-replay").display()
        )
    } else {
        String::new()
    };
    let plugins = if with_plugin { r#"plugins = ["replay"]"# } else { "" };
    format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
admin_token = "{ADMIN_TOKEN}"
max_connections = 5000
resume_timeout_ms = 3000

[[upstream]]
name = "chat"
servers = {servers}
connect_timeout_ms = 1000

{plugin}
[[route]]
path = "/"
upstream = "chat"
{plugins}
"#
    )
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    messages: Vec<Value>,
    /// Set when the connection ended: the close code, 1006 without one.
    closed: Option<u16>,
}

struct ChatClient {
    room: String,
    /// The server that answered its subscribe.
    server: String,
    sink: SplitSink<Client, Message>,
    seen: Arc<Mutex<Seen>>,
}

impl ChatClient {
    async fn join(gw: &Gateway, room: &str) -> ChatClient {
        ChatClient::join_at(gw, "/", room).await
    }

    async fn join_at(gw: &Gateway, path: &str, room: &str) -> ChatClient {
        let ws = connect(&ws_url(gw, path)).await;
        let (mut sink, mut source) = ws.split();
        let seen = Arc::new(Mutex::new(Seen::default()));
        sink.send(Message::text(json!({"type": "subscribe", "channel": room}).to_string())).await.unwrap();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                match source.next().await {
                    Some(Ok(Message::Text(t))) => log.lock().unwrap().messages.push(serde_json::from_str(t.as_str()).unwrap()),
                    Some(Ok(Message::Close(frame))) => {
                        log.lock().unwrap().closed = Some(frame.map_or(1005, |f| u16::from(f.code)));
                        return;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        log.lock().unwrap().closed.get_or_insert(1006);
                        return;
                    }
                }
            }
        });
        let mut client = ChatClient { room: room.into(), server: String::new(), sink, seen };
        let subscribed = client.wait_for(|m| m["type"] == "subscribed").await.expect("subscribed");
        client.server = subscribed["server"].as_str().unwrap().to_string();
        client
    }

    async fn publish(&mut self, text: &str) {
        let publish = json!({"type": "publish", "channel": self.room, "text": text}).to_string();
        self.sink.send(Message::text(publish)).await.unwrap();
    }

    async fn wait_for(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(m) = self.seen.lock().unwrap().messages.iter().find(|m| pred(m)) {
                return Some(m.clone());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    fn closed(&self) -> Option<u16> {
        self.seen.lock().unwrap().closed
    }

    fn subscribed_count(&self) -> usize {
        self.seen.lock().unwrap().messages.iter().filter(|m| m["type"] == "subscribed").count()
    }
}

async fn join_all(gw: &Gateway, n: usize) -> Vec<ChatClient> {
    let mut clients = Vec::new();
    for i in 0..n {
        clients.push(ChatClient::join(gw, &format!("room{}", i % 20)).await);
    }
    clients
}

/// A metric's value from `/metrics` (summing its series), 0 when absent.
async fn metric(gw: &Gateway, name: &str) -> f64 {
    let (_, body) = admin_request(gw, "GET", "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_metric(gw: &Gateway, name: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let value = metric(gw, name).await;
        if value >= at_least || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One message per room from a client of it; every client of the room must get it.
async fn everyone_hears_their_room(clients: &mut [ChatClient], tag: &str) {
    let mut speakers: HashMap<String, usize> = HashMap::new();
    for (i, c) in clients.iter().enumerate() {
        speakers.entry(c.room.clone()).or_insert(i);
    }
    for (room, &i) in &speakers {
        clients[i].publish(&format!("{tag}-{room}")).await;
    }
    for c in clients.iter() {
        let text = format!("{tag}-{}", c.room);
        assert!(c.wait_for(|m| m["type"] == "message" && m["text"] == text.as_str()).await.is_some(), "{text} did not reach a client on {}", c.server);
    }
}

fn assert_no_close_and_no_duplicate(clients: &[ChatClient], when: &str) {
    let closed = clients.iter().filter(|c| c.closed().is_some()).count();
    assert_eq!(closed, 0, "{when}: clients closed");
    let dup = clients.iter().filter(|c| c.subscribed_count() != 1).count();
    assert_eq!(dup, 0, "{when}: clients saw a second \"subscribed\"");
}

async fn active_on(gw: &Gateway, addr: &str) -> u64 {
    let (_, text) = admin_request(gw, "GET", "/upstreams").await;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let status: Value = serde_json::from_str(body).unwrap();
    status["pools"][0]["servers"].as_array().unwrap().iter().find(|s| s["address"] == addr).unwrap()["active"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_survive_a_killed_a_drained_and_a_rebalanced_server() {
    let mut chat = Chat::start(3);
    let gw = start_gateway(&config(&chat.list(), true)).await;
    let mut clients = join_all(&gw, 200).await;

    // SIGKILL c0; its clients publish right after, while they move.
    let affected: Vec<usize> = (0..clients.len()).filter(|&i| clients[i].server == "c0").collect();
    assert!(affected.len() >= 50, "round robin put {} of 200 on c0", affected.len());
    let killed = Instant::now();
    chat.kill(0);
    for &i in &affected {
        clients[i].publish(&format!("gap-{i}")).await;
    }
    let resumed = wait_metric(&gw, "wasmgate_session_resumed_total", affected.len() as f64).await;
    let all_moved = killed.elapsed();
    assert_eq!(resumed as usize, affected.len(), "every client of the killed server moved");
    let (sum, count) =
        (metric(&gw, "wasmgate_session_resume_seconds_sum").await, metric(&gw, "wasmgate_session_resume_seconds_count").await);
    eprintln!(
        "kill: {} clients moved, mean time to resume {:.1} ms, all moved {:.1} ms after the kill",
        affected.len(),
        sum / count * 1e3,
        all_moved.as_secs_f64() * 1e3
    );
    for &i in &affected {
        let text = format!("gap-{i}");
        assert!(clients[i].wait_for(|m| m["text"] == text.as_str()).await.is_some(), "{text}, sent during the move, was lost");
    }
    everyone_hears_their_room(&mut clients, "after-kill").await;
    assert_no_close_and_no_duplicate(&clients, "after the kill");

    // Drain c1 with mode=migrate: all its connections leave it, none closes.
    let c1 = chat.servers[1].1.clone();
    assert!(active_on(&gw, &c1).await > 0);
    let (status, body) = admin_request(&gw, "POST", &format!("/upstreams/chat/servers/{c1}/drain?rate=1000&mode=migrate")).await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while active_on(&gw, &c1).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(active_on(&gw, &c1).await, 0, "the drained server kept connections");
    everyone_hears_their_room(&mut clients, "after-drain").await;
    assert_no_close_and_no_duplicate(&clients, "after the drain");

    // c1 back, then a migrating rebalance moves connections onto it.
    let (status, _) = admin_request(&gw, "POST", &format!("/upstreams/chat/servers/{c1}/undrain")).await;
    assert_eq!(status, 202);
    let (status, body) = admin_request(&gw, "POST", "/upstreams/chat/rebalance?rate=1000&target=1.2&mode=migrate").await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while active_on(&gw, &c1).await < 90 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(active_on(&gw, &c1).await >= 90, "the rebalance moved connections back");
    everyone_hears_their_room(&mut clients, "after-rebalance").await;
    assert_no_close_and_no_duplicate(&clients, "after the rebalance");
    assert_eq!(metric(&gw, "wasmgate_session_resume_failures_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_plugin_a_killed_server_closes_its_clients() {
    let mut chat = Chat::start(3);
    let gw = start_gateway(&config(&chat.list(), false)).await;
    let clients = join_all(&gw, 200).await;
    let affected: Vec<usize> = (0..clients.len()).filter(|&i| clients[i].server == "c0").collect();
    chat.kill(0);
    for &i in &affected {
        let deadline = Instant::now() + Duration::from_secs(10);
        while clients[i].closed().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(clients[i].closed(), Some(1011), "a client of the killed server");
    }
    let others = clients.iter().filter(|c| c.server != "c0" && c.closed().is_some()).count();
    assert_eq!(others, 0);
    eprintln!("without session-replay: {} of {} affected clients closed", affected.len(), affected.len());
}

/// A hand-made server: answers upgrades, and on `die` sends the first fragment of a message
/// to its first connection and then closes every connection without a close frame.
async fn dying_server() -> (String, tokio::sync::oneshot::Sender<()>, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (die, mut dead) = tokio::sync::oneshot::channel::<()>();
    let accepted = Arc::new(Mutex::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut streams = Vec::new();
        loop {
            tokio::select! {
                Ok((mut stream, _)) = listener.accept() => {
                    let head = read_head(&mut stream).await;
                    let answer = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n", accept_for(&head));
                    // Counted before the answer, so a client that has its 101 sees the count.
                    *count.lock().unwrap() += 1;
                    stream.write_all(answer.as_bytes()).await.unwrap();
                    streams.push(stream);
                }
                _ = &mut dead => break,
            }
        }
        // A text frame without FIN: the message is never finished.
        let first: &mut tokio::net::TcpStream = &mut streams[0];
        first.write_all(&[0x01, 4, b'p', b'a', b'r', b't']).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(streams);
        drop(listener);
    });
    (addr, die, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_mid_message_closes_that_client_with_1011_and_the_others_move() {
    let chat = Chat::start(1);
    let (dying, die, accepted) = dying_server().await;
    let servers = format!("[\"{dying}\", \"{}\"]", chat.servers[0].1);
    let gw = start_gateway(&config(&servers, true)).await;
    // Round robin: the 1st and 3rd connections go to the dying server, the 2nd to c0.
    let mut raw = Vec::new();
    for _ in 0..3 {
        let ws = connect(&ws_url(&gw, "/")).await;
        raw.push(ws);
    }
    assert_eq!(*accepted.lock().unwrap(), 2);
    let mut cut = raw.remove(0);
    let mut other = raw.remove(1);
    other.send(Message::text(json!({"type": "subscribe", "channel": "r"}).to_string())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    die.send(()).unwrap();
    assert_eq!(close_code(&mut cut).await, 1011, "the client cut mid-message");
    // The other moved to c0, where its subscribe was replayed: it hears the room.
    assert_eq!(wait_metric(&gw, "wasmgate_session_resumed_total", 1.0).await, 1.0);
    let publish = json!({"type": "publish", "channel": "r", "text": "still here"}).to_string();
    other.send(Message::text(publish)).await.unwrap();
    let heard: Value = serde_json::from_str(next_data(&mut other).await.to_text().unwrap()).unwrap();
    assert_eq!((heard["text"].as_str(), heard["server"].as_str()), (Some("still here"), Some("c0")));
    assert_eq!(metric(&gw, "wasmgate_session_resume_failures_total").await, 1.0, "counted as mid_message");
}

/// Stops (SIGSTOP) or resumes (SIGCONT) a process: stopped, it answers nothing, health
/// probes included, while its sockets stay open.
fn signal(child: &KillOnDrop, sig: &str) {
    let status = Command::new("kill").args([sig, &child.0.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill {sig}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leave_a_server_that_fails_its_health_checks() {
    let chat = Chat::start(3);
    // WebSocket probes every 200 ms; two failed in a row make a server unhealthy. "/plain"
    // reaches the same servers without the plugin.
    let text = config(&chat.list(), true).replace(
        "connect_timeout_ms = 1000\n",
        "connect_timeout_ms = 1000\nhealth = { interval_ms = 200, timeout_ms = 300, fall = 2, rise = 2 }\n",
    ) + "\n[[route]]\npath = \"/plain\"\nupstream = \"chat\"\n";
    let gw = start_gateway(&text).await;
    let mut clients = join_all(&gw, 60).await;
    let mut plain = Vec::new();
    for i in 0..9 {
        plain.push(ChatClient::join_at(&gw, "/plain", &format!("room{i}")).await);
    }
    let affected = clients.iter().filter(|c| c.server == "c0").count();
    let plain_on_c0 = plain.iter().filter(|c| c.server == "c0").count();
    assert!(affected >= 10 && plain_on_c0 >= 1, "round robin put {affected} session and {plain_on_c0} plain clients on c0");

    // c0 hangs: its sockets stay open, it answers nothing, its probes time out.
    let stopped = Instant::now();
    signal(chat.servers[0].0.as_ref().unwrap(), "-STOP");
    let resumed = wait_metric(&gw, "wasmgate_session_resumed_total", affected as f64).await;
    assert_eq!(resumed as usize, affected, "every session client of the unhealthy server moved");
    eprintln!("health: {affected} clients moved {:.0} ms after the server hung", stopped.elapsed().as_secs_f64() * 1e3);
    assert_eq!(active_on(&gw, &chat.servers[0].1).await, plain_on_c0 as u64, "only the plain clients are left on c0");
    everyone_hears_their_room(&mut clients, "after-health").await;
    assert_no_close_and_no_duplicate(&clients, "after the health ejection");
    // Connections without the plugin keep today's behaviour: they stay on their server.
    let closed = plain.iter().filter(|c| c.closed().is_some()).count();
    assert_eq!(closed, 0, "a health ejection closed clients of the route without the plugin");
    assert_eq!(metric(&gw, "wasmgate_session_resume_failures_total").await, 0.0);
    signal(chat.servers[0].0.as_ref().unwrap(), "-CONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_client_sends_during_a_move_is_queued_bounded_and_delivered_in_order() {
    let mut chat = Chat::start(2);
    let text = config(&chat.list(), true).replace("resume_timeout_ms = 3000\n", "resume_timeout_ms = 3000\nresume_buffer_bytes = 16384\n");
    let gw = start_gateway(&text).await;
    let mut clients = vec![ChatClient::join(&gw, "q0").await, ChatClient::join(&gw, "q1").await];
    let i = clients.iter().position(|c| c.server == "c0").expect("round robin put one client on c0");
    // c1 hangs, so the move off c0 waits for it (its handshake is answered once it resumes).
    signal(chat.servers[1].0.as_ref().unwrap(), "-STOP");
    chat.kill(0);
    // Let the gateway notice c0 is gone: what is written to a dead socket before may be lost.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let filler = "x".repeat(1000);
    for k in 0..100 {
        clients[i].publish(&format!("gap-{k} {filler}")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metric(&gw, "wasmgate_session_resumed_total").await, 0.0, "still moving while c1 hangs");
    signal(chat.servers[1].0.as_ref().unwrap(), "-CONT");
    assert_eq!(wait_metric(&gw, "wasmgate_session_resumed_total", 1.0).await, 1.0);
    // 100 KiB were sent during the move: 16 KiB of it read into the queue, the rest left in
    // the socket until the move was done.
    assert_eq!(metric(&gw, "wasmgate_session_queued_bytes_total").await, 16384.0, "the queue is filled to its bound");
    let last = format!("gap-99 {filler}");
    assert!(clients[i].wait_for(|m| m["text"] == last.as_str()).await.is_some(), "the last message sent during the move arrived");
    let texts: Vec<String> = clients[i].seen.lock().unwrap().messages.iter().filter_map(|m| m["text"].as_str().map(str::to_string)).collect();
    let expected: Vec<String> = (0..100).map(|k| format!("gap-{k} {filler}")).collect();
    assert_eq!(texts, expected, "every message sent during the move arrived once, in order");
    assert_no_close_and_no_duplicate(&clients, "after the move");
}
