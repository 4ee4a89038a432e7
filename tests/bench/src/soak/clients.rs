//! The soak run's clients: long-lived connections that echo a message a second and reconnect
//! when closed, and churn, short-lived connections of several kinds at a fixed rate. Every
//! network wait is bounded by `IO_LIMIT`; what goes wrong is counted in `Counters`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use tokio_tungstenite::WebSocketStream;

use crate::jwt;

pub const SEND_EVERY: Duration = Duration::from_secs(1);
const SIZES: [usize; 4] = [16, 128, 1024, 8192];
/// Every network wait of a client is bounded by this.
pub const IO_LIMIT: Duration = Duration::from_secs(5);
/// Churn cycles in flight at most; a tick finding this many is skipped (and counted).
pub const CHURN_IN_FLIGHT: usize = 200;

/// What the clients did, shared by all their tasks.
#[derive(Default)]
pub struct Counters {
    /// Long-lived connections open now.
    pub pool_open: AtomicU64,
    pub pool_connects: AtomicU64,
    /// Long-lived connections the gateway closed with 1011 (their backend was killed).
    pub pool_upstream_gone: AtomicU64,
    pub echoes: AtomicU64,
    /// Churn cycles that went as they should, by `Churn` kind.
    pub churned: [AtomicU64; Churn::ALL.len()],
    pub churn_skipped: AtomicU64,
    /// Anything unexpected: a failed echo, connect or reload, a wrong refusal, a timeout.
    pub errors: AtomicU64,
    pub first_errors: Mutex<Vec<String>>,
}

impl Counters {
    pub fn error(&self, what: &str, e: anyhow::Error) {
        self.errors.fetch_add(1, Relaxed);
        let mut first = self.first_errors.lock().unwrap();
        if first.len() < 5 {
            first.push(format!("{what}: {e:#}"));
        }
    }

    pub fn churned_total(&self) -> u64 {
        self.churned.iter().map(|c| c.load(Relaxed)).sum()
    }
}

type Ws = WebSocketStream<TcpStream>;

/// The gateway closed the connection with this frame.
#[derive(Debug)]
struct ClosedBy(Option<CloseFrame>);

impl std::fmt::Display for ClosedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(frame) => write!(f, "closed by the gateway: {} {}", u16::from(frame.code), frame.reason),
            None => f.write_str("closed by the gateway without a code"),
        }
    }
}

impl std::error::Error for ClosedBy {}

/// Whether the gateway closed the connection because its upstream went away (1011).
fn upstream_gone(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<ClosedBy>(), Some(ClosedBy(Some(frame))) if frame.code == CloseCode::Error)
}

async fn open(addr: SocketAddr, authorization: Option<&HeaderValue>) -> anyhow::Result<Ws> {
    let mut request = format!("ws://{addr}/soak").into_client_request()?;
    if let Some(authorization) = authorization {
        request.headers_mut().insert(AUTHORIZATION, authorization.clone());
    }
    let tcp = timeout(IO_LIMIT, TcpStream::connect(addr)).await.map_err(|_| anyhow!("connect timed out"))??;
    tcp.set_nodelay(true)?;
    let config = WebSocketConfig::default().read_buffer_size(16 << 10).write_buffer_size(0);
    let handshake = tokio_tungstenite::client_async_with_config(request, tcp, Some(config));
    let (ws, _) = timeout(IO_LIMIT, handshake).await.map_err(|_| anyhow!("handshake timed out"))??;
    Ok(ws)
}

/// Message `seq` of connection `id`: sizes and text/binary cycle, the content names both so
/// a mixed-up echo is caught.
fn message(id: usize, seq: u64) -> Message {
    let size = SIZES[seq as usize % SIZES.len()];
    let mut text = format!("{id}.{seq}.");
    let fill = char::from(b'a' + (seq % 26) as u8);
    text.extend(std::iter::repeat_n(fill, size.saturating_sub(text.len())));
    if seq.is_multiple_of(2) {
        Message::text(text)
    } else {
        Message::Binary(Bytes::from(text))
    }
}

/// Sends `message` and waits for the same message back.
async fn echo(ws: &mut Ws, message: Message) -> anyhow::Result<()> {
    ws.send(message.clone()).await?;
    loop {
        let next = timeout(IO_LIMIT, ws.next()).await.map_err(|_| anyhow!("no echo within {IO_LIMIT:?}"))?;
        match next {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) if m == message => return Ok(()),
            Some(Ok(Message::Text(_) | Message::Binary(_))) => bail!("the echo differs from the message sent"),
            // tungstenite answers pings by itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(frame))) => return Err(ClosedBy(frame).into()),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended without a close frame"),
        }
    }
}

/// Reads until the connection ends (after a close frame, to send tungstenite's answer).
async fn finish(ws: &mut Ws) {
    let _ = timeout(IO_LIMIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

/// One long-lived client: connects, sends a message every `SEND_EVERY` (offset by `phase`)
/// and checks its echo, reconnects when the connection is lost, closes cleanly when stopped.
pub async fn long_lived(
    id: usize,
    phase: Duration,
    addr: SocketAddr,
    authorization: HeaderValue,
    counters: Arc<Counters>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut seq = 0;
    let mut pause = phase;
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = sleep(pause) => {}
        }
        // Reconnects are spread too, so a killed backend's clients do not return at once.
        pause = Duration::from_millis(200) + phase;
        let mut ws = match open(addr, Some(&authorization)).await {
            Ok(ws) => ws,
            Err(e) => {
                counters.error("long-lived connect", e);
                continue;
            }
        };
        counters.pool_connects.fetch_add(1, Relaxed);
        counters.pool_open.fetch_add(1, Relaxed);
        let ended = converse(id, &mut ws, &mut seq, phase, &counters, &mut stopped).await;
        counters.pool_open.fetch_sub(1, Relaxed);
        match ended {
            Ok(()) => {
                let _ = timeout(IO_LIMIT, ws.close(None)).await;
                finish(&mut ws).await;
                return;
            }
            Err(e) if upstream_gone(&e) => {
                counters.pool_upstream_gone.fetch_add(1, Relaxed);
                finish(&mut ws).await;
            }
            Err(e) => counters.error("long-lived connection", e),
        }
    }
}

/// Echoes on `ws` until stopped (Ok) or the connection fails (Err).
async fn converse(
    id: usize,
    ws: &mut Ws,
    seq: &mut u64,
    phase: Duration,
    counters: &Counters,
    stopped: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    enum Step {
        Stop,
        Incoming(Option<Result<Message, tungstenite::Error>>),
        Send,
    }
    let mut next_send = Instant::now() + phase;
    loop {
        // Reading between sends, so a close from the gateway is seen when it comes.
        let step = tokio::select! {
            _ = stopped.wait_for(|s| *s) => Step::Stop,
            incoming = ws.next() => Step::Incoming(incoming),
            _ = sleep_until(next_send) => Step::Send,
        };
        match step {
            Step::Stop => return Ok(()),
            Step::Incoming(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Step::Incoming(Some(Ok(Message::Close(frame)))) => return Err(ClosedBy(frame).into()),
            Step::Incoming(Some(Ok(_))) => bail!("a message nobody asked for"),
            Step::Incoming(Some(Err(e))) => return Err(e.into()),
            Step::Incoming(None) => bail!("connection ended without a close frame"),
            Step::Send => {
                echo(ws, message(id, *seq)).await?;
                *seq += 1;
                counters.echoes.fetch_add(1, Relaxed);
                next_send += SEND_EVERY;
            }
        }
    }
}

/// The kinds of short-lived connection the churn makes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Churn {
    Clean,
    DropFin,
    DropReset,
    NoToken,
    ForgedToken,
    HalfRequest,
}

impl Churn {
    pub const ALL: [Churn; 6] =
        [Churn::Clean, Churn::DropFin, Churn::DropReset, Churn::NoToken, Churn::ForgedToken, Churn::HalfRequest];
    /// The order new connections take, over and over.
    pub const MIX: [Churn; 8] = [
        Churn::Clean,
        Churn::DropFin,
        Churn::Clean,
        Churn::NoToken,
        Churn::Clean,
        Churn::DropReset,
        Churn::ForgedToken,
        Churn::HalfRequest,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Churn::Clean => "with 3 echoes and a close handshake",
            Churn::DropFin => "with 2 echoes, then dropped (FIN)",
            Churn::DropReset => "with 1 echo, then reset (RST)",
            Churn::NoToken => "refused without a token (401)",
            Churn::ForgedToken => "refused with a forged token (401)",
            Churn::HalfRequest => "abandoned halfway through the upgrade request",
        }
    }

    /// "of every 8 new connections, 3 with 3 echoes and a close handshake, 1 ...".
    pub fn describe_mix() -> String {
        let kinds: Vec<String> = Churn::ALL
            .iter()
            .map(|kind| format!("{} {}", Churn::MIX.iter().filter(|k| *k == kind).count(), kind.describe()))
            .collect();
        format!("of every {} new connections, {}", Churn::MIX.len(), kinds.join(", "))
    }

    /// One connection of this kind; Ok when everything went as it should.
    async fn once(self, addr: SocketAddr, n: u64) -> anyhow::Result<()> {
        let id = n as usize;
        match self {
            Churn::Clean => {
                let mut ws = open(addr, Some(&jwt::bearer())).await?;
                for seq in 0..3 {
                    echo(&mut ws, message(id, seq)).await?;
                }
                ws.close(None).await?;
                finish(&mut ws).await;
            }
            Churn::DropFin => {
                let mut ws = open(addr, Some(&jwt::bearer())).await?;
                for seq in 0..2 {
                    echo(&mut ws, message(id, seq)).await?;
                }
            }
            Churn::DropReset => {
                let mut ws = open(addr, Some(&jwt::bearer())).await?;
                echo(&mut ws, message(id, 0)).await?;
                ws.get_ref().set_zero_linger()?;
            }
            Churn::NoToken => refused(open(addr, None).await, 401)?,
            Churn::ForgedToken => refused(open(addr, Some(&jwt::forged_bearer())).await, 401)?,
            Churn::HalfRequest => {
                let mut tcp = TcpStream::connect(addr).await?;
                tcp.write_all(format!("GET /soak HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n").as_bytes())
                    .await?;
                sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

/// Ok if the handshake was refused with `status`.
fn refused(result: anyhow::Result<Ws>, status: u16) -> anyhow::Result<()> {
    match result {
        Ok(_) => bail!("handshake accepted, expected {status}"),
        Err(e) => match e.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Http(response)) if response.status() == status => Ok(()),
            _ => Err(e.context(format!("expected a {status} refusal"))),
        },
    }
}

/// New connections at `rate` a second, of the kinds in `Churn::MIX` in turn, until stopped.
pub async fn churn(addr: SocketAddr, rate: u32, counters: Arc<Counters>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut in_flight = JoinSet::new();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        while in_flight.try_join_next().is_some() {}
        if in_flight.len() >= CHURN_IN_FLIGHT {
            counters.churn_skipped.fetch_add(1, Relaxed);
            continue;
        }
        let kind = Churn::MIX[n as usize % Churn::MIX.len()];
        n += 1;
        let counters = counters.clone();
        in_flight.spawn(async move {
            match timeout(IO_LIMIT * 2, kind.once(addr, n)).await {
                Ok(Ok(())) => {
                    counters.churned[kind as usize].fetch_add(1, Relaxed);
                }
                Ok(Err(e)) => counters.error(kind.describe(), e),
                Err(_) => counters.error(kind.describe(), anyhow!("not done within {:?}", IO_LIMIT * 2)),
            }
        });
    }
    // Each cycle is bounded; let those in flight finish.
    while in_flight.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_differ_by_connection_and_sequence() {
        assert_ne!(message(1, 0), message(2, 0));
        assert_ne!(message(1, 0), message(1, 4));
        assert_eq!(message(1, 3).len(), 8192);
        assert!(matches!(message(1, 0), Message::Text(_)));
        assert!(matches!(message(1, 1), Message::Binary(_)));
    }
}
