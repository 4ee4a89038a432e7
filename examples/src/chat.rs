//! A small pub/sub chat server: rooms (channels) with a history numbered by offset, JSON
//! messages over WebSocket. Several instances serve the same rooms: instances made with one
//! [`Hub`] share it in-process; instances in separate processes share a hub process
//! ([`run_hub`]) that orders every publication and sends it to all of them, so each keeps a
//! whole copy of every room.
//!
//! The protocol, one JSON object per text message:
//! - client `{"type":"subscribe","channel":C}` (optionally `"from":N`: first the room's
//!   history from offset N) → server `{"type":"subscribed","channel":C,"offset":NEXT,"server":S}`
//!   (NEXT: the offset the next message in C will have), then every message published to C;
//! - client `{"type":"unsubscribe","channel":C}` → `{"type":"unsubscribed","channel":C}`;
//! - client `{"type":"publish","channel":C,"text":T}` → every subscriber of C, on every
//!   instance: `{"type":"message","channel":C,"offset":N,"text":T,"server":S}` (S: the
//!   instance that sends it to that subscriber), with `"from":U` when the publisher's
//!   upgrade request carried [`USER_HEADER`];
//! - client `{"type":"history","channel":C,"from":N}` → the `message`s of C from offset N;
//! - anything else → `{"type":"error","error":WHY}`.
//!
//! The handshake: an offer of the subprotocol `chat` is answered with it. The user comes
//! from the [`USER_HEADER`] request header, which only a gateway that sets it from a
//! verified token (jwt-auth's `claims_to_headers`, which also removes a client's own) makes
//! trustworthy.
//!
//! A subscribe is idempotent (subscribing twice delivers each message once), which is what
//! lets a gateway replay it on another instance (plugins/session-replay).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// The request header that names the user whose messages a connection publishes.
pub const USER_HEADER: &str = "x-chat-user";
/// The subprotocol a chat server chooses when the client offers it.
pub const SUBPROTOCOL: &str = "chat";

/// One published message, as every instance keeps it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Posted {
    pub channel: String,
    pub offset: u64,
    pub text: String,
    /// Who published it, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

#[derive(Default)]
struct Room {
    history: Vec<Posted>,
    live: Option<broadcast::Sender<Posted>>,
}

/// The rooms an instance serves, and where its publications go to be ordered.
pub struct Hub {
    rooms: Mutex<HashMap<String, Room>>,
    /// To the hub process, one JSON line per publication; None: ordered here.
    remote: Option<mpsc::UnboundedSender<String>>,
}

impl Hub {
    /// Rooms kept in this process, shared by every instance started with this hub.
    pub fn local() -> Arc<Hub> {
        Arc::new(Hub { rooms: Mutex::new(HashMap::new()), remote: None })
    }

    /// Rooms kept by the hub process at `addr` (see [`run_hub`]), copied here.
    pub async fn connect(addr: &str) -> anyhow::Result<Arc<Hub>> {
        let stream = TcpStream::connect(addr).await?;
        let (read, mut write) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let hub = Arc::new(Hub { rooms: Mutex::new(HashMap::new()), remote: Some(tx) });
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        let copy = hub.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(posted) = serde_json::from_str::<Posted>(&line) {
                    copy.apply(posted);
                }
            }
        });
        Ok(hub)
    }

    /// Records a publication whose offset is decided, and tells the room's subscribers.
    fn apply(&self, posted: Posted) {
        let mut rooms = self.rooms.lock().unwrap();
        let room = rooms.entry(posted.channel.clone()).or_default();
        if posted.offset as usize != room.history.len() {
            return; // a copy already seen
        }
        room.history.push(posted.clone());
        if let Some(live) = &room.live {
            let _ = live.send(posted);
        }
    }

    fn publish(&self, channel: &str, text: &str, from: Option<&str>) {
        match &self.remote {
            Some(hub) => {
                let _ = hub.send(json!({ "channel": channel, "text": text, "from": from }).to_string());
            }
            None => {
                let offset = self.rooms.lock().unwrap().get(channel).map_or(0, |r| r.history.len() as u64);
                self.apply(Posted { channel: channel.into(), offset, text: text.into(), from: from.map(str::to_string) });
            }
        }
    }

    /// The room's live feed, its next offset and its history from `from`, atomically.
    fn subscribe(&self, channel: &str, from: Option<u64>) -> (broadcast::Receiver<Posted>, u64, Vec<Posted>) {
        let mut rooms = self.rooms.lock().unwrap();
        let room = rooms.entry(channel.to_string()).or_default();
        let live = room.live.get_or_insert_with(|| broadcast::channel(1024).0).subscribe();
        let past = from.map(|f| room.history.iter().skip(f as usize).cloned().collect()).unwrap_or_default();
        (live, room.history.len() as u64, past)
    }

    fn history(&self, channel: &str, from: u64) -> Vec<Posted> {
        let rooms = self.rooms.lock().unwrap();
        rooms.get(channel).map(|r| r.history.iter().skip(from as usize).cloned().collect()).unwrap_or_default()
    }
}

/// Serves the hub for instances in other processes: each publication line gets the room's
/// next offset and goes to every instance, which also gets all history when it connects.
pub async fn run_hub(listener: TcpListener) -> anyhow::Result<()> {
    let state = Arc::new(Mutex::new((HashMap::<String, u64>::new(), Vec::<String>::new())));
    let (fanout, _) = broadcast::channel::<String>(1 << 16);
    loop {
        let (stream, _) = listener.accept().await?;
        let (read, mut write) = stream.into_split();
        let state = state.clone();
        let fanout = fanout.clone();
        let (past, mut feed) = {
            let log = state.lock().unwrap();
            (log.1.clone(), fanout.subscribe())
        };
        tokio::spawn(async move {
            for line in past {
                if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
            while let Ok(line) = feed.recv().await {
                if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(request) = serde_json::from_str::<Value>(&line) else { continue };
                let (Some(channel), Some(text)) = (request["channel"].as_str(), request["text"].as_str()) else { continue };
                let mut log = state.lock().unwrap();
                let next = log.0.entry(channel.to_string()).or_insert(0);
                let from = request["from"].as_str().map(str::to_string);
                let posted = Posted { channel: channel.into(), offset: *next, text: text.into(), from };
                *next += 1;
                let line = serde_json::to_string(&posted).unwrap();
                log.1.push(line.clone());
                let _ = fanout.send(line);
            }
        });
    }
}

/// A running chat instance.
pub struct ChatServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl ChatServer {
    /// Binds `addr` (port 0 for any) and serves the rooms of `hub` as `name` until dropped.
    pub async fn start(addr: &str, name: &str, hub: Arc<Hub>) -> anyhow::Result<ChatServer> {
        let listener = listen(addr).await?;
        let addr = listener.local_addr()?;
        let name: Arc<str> = name.into();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, name.clone(), hub.clone()));
            }
        });
        Ok(ChatServer { addr, task })
    }
}

impl Drop for ChatServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn message(posted: &Posted, server: &str) -> String {
    let mut m = json!({ "type": "message", "channel": posted.channel, "offset": posted.offset, "text": posted.text, "server": server });
    if let Some(from) = &posted.from {
        m["from"] = from.as_str().into();
    }
    m.to_string()
}

async fn serve(stream: TcpStream, name: Arc<str>, hub: Arc<Hub>) {
    let mut user = None;
    let handshake = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        user = request.headers().get(USER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let offers = request.headers().get_all("sec-websocket-protocol");
        if offers.iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|p| p.trim() == SUBPROTOCOL) {
            response.headers_mut().insert("sec-websocket-protocol", SUBPROTOCOL.parse().unwrap());
        }
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, handshake).await else { return };
    let (mut sink, mut source) = ws.split();
    // Everything for this client goes through one queue, so room feeds never interleave
    // inside a frame.
    let (out, mut queue) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        while let Some(text) = queue.recv().await {
            if sink.send(Message::text(text)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut feeds: HashMap<String, JoinHandle<()>> = HashMap::new();
    while let Some(Ok(frame)) = source.next().await {
        let text = match frame {
            Message::Text(text) => text,
            Message::Close(_) => break,
            _ => continue,
        };
        let request: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
        let channel = request["channel"].as_str().map(str::to_string);
        let answer = match (request["type"].as_str(), channel) {
            (Some("subscribe"), Some(channel)) => {
                let (mut live, next, past) = hub.subscribe(&channel, request["from"].as_u64());
                let _ = out.send(json!({ "type": "subscribed", "channel": channel, "offset": next, "server": &*name }).to_string());
                for posted in &past {
                    let _ = out.send(message(posted, &name));
                }
                let (out, name) = (out.clone(), name.clone());
                let feed = tokio::spawn(async move {
                    while let Ok(posted) = live.recv().await {
                        if out.send(message(&posted, &name)).is_err() {
                            break;
                        }
                    }
                });
                // Subscribing again replaces the feed: each message still arrives once.
                if let Some(old) = feeds.insert(channel, feed) {
                    old.abort();
                }
                None
            }
            (Some("unsubscribe"), Some(channel)) => {
                if let Some(feed) = feeds.remove(&channel) {
                    feed.abort();
                }
                Some(json!({ "type": "unsubscribed", "channel": channel }))
            }
            (Some("publish"), Some(channel)) => match request["text"].as_str() {
                Some(text) => {
                    hub.publish(&channel, text, user.as_deref());
                    None
                }
                None => Some(json!({ "type": "error", "error": "publish needs a text" })),
            },
            (Some("history"), Some(channel)) => {
                for posted in hub.history(&channel, request["from"].as_u64().unwrap_or(0)) {
                    let _ = out.send(message(&posted, &name));
                }
                None
            }
            _ => Some(json!({ "type": "error", "error": "expected a subscribe, unsubscribe, publish or history with a channel" })),
        };
        if let Some(answer) = answer {
            let _ = out.send(answer.to_string());
        }
    }
    for feed in feeds.into_values() {
        feed.abort();
    }
    drop(out);
    let _ = writer.await;
}

/// Binds `addr` with an accept queue of 4,096 (the kernel caps it at `somaxconn`), not
/// tokio's 128: when a gateway moves a thousand connections here at once, a short queue
/// drops their SYNs and each waits a second for TCP to send it again.
async fn listen(addr: &str) -> anyhow::Result<TcpListener> {
    let addr = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| anyhow::anyhow!("{addr}: no address"))?;
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(4096)?)
}
