//! A client connection during its upgrade request: plain TCP, or TLS once the handshake is
//! done. After the 101 it becomes the relay's [`Transport`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::ServerTls;
use crate::relay::Transport;

pub enum ClientStream {
    Plain(TcpStream),
    /// Boxed: the TLS state is large and most of it is the handshake's.
    Tls(Box<TlsClient>),
    /// While the TLS handshake runs, and after one that failed: nothing to read or write.
    Handshaking,
}

pub struct TlsClient {
    tcp: TcpStream,
    tls: ServerTls,
}

impl ClientStream {
    /// The TCP socket, before TLS (to read a PROXY protocol header).
    pub fn tcp_mut(&mut self) -> Option<&mut TcpStream> {
        match self {
            ClientStream::Plain(tcp) => Some(tcp),
            _ => None,
        }
    }

    /// Runs the TLS handshake as the server. `already_read` holds bytes of the ClientHello
    /// that came off the socket before (behind a PROXY protocol header). The caller bounds
    /// it with the handshake timeout.
    pub async fn accept_tls(&mut self, config: Arc<ServerConfig>, already_read: Vec<u8>) -> io::Result<()> {
        let ClientStream::Plain(tcp) = std::mem::replace(self, ClientStream::Handshaking) else {
            return Err(io::Error::other("TLS is already on"));
        };
        let tls = ServerTls::accept(&tcp, config, already_read).await?;
        *self = ClientStream::Tls(Box::new(TlsClient { tcp, tls }));
        Ok(())
    }

    /// The TLS session, if the connection has one.
    pub fn tls(&self) -> Option<&ServerTls> {
        match self {
            ClientStream::Tls(client) => Some(&client.tls),
            _ => None,
        }
    }

    /// The stream for the relay, with what TLS buffered past the upgrade request.
    pub fn into_transport(self) -> Transport {
        match self {
            ClientStream::Plain(tcp) => Transport::Plain(tcp),
            ClientStream::Tls(client) => {
                let TlsClient { tcp, tls } = *client;
                Transport::server_tls(tcp, tls)
            }
            ClientStream::Handshaking => unreachable!("a connection without a finished handshake is never relayed"),
        }
    }
}

impl TlsClient {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.tls.has_buffered_input() {
                ready!(self.tcp.poll_read_ready(cx))?;
            }
            match self.tls.read(&self.tcp, buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.tls.write(&self.tcp, data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_write_ready(cx))?,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.tls.flush(&self.tcp) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_write_ready(cx))?,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tls.send_close_notify();
        ready!(self.poll_flush(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake did not finish")
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            ClientStream::Tls(tls) => tls.poll_read(cx, buf),
            ClientStream::Handshaking => Poll::Ready(Err(not_connected())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            ClientStream::Tls(tls) => tls.poll_write(cx, buf),
            ClientStream::Handshaking => Poll::Ready(Err(not_connected())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            ClientStream::Tls(tls) => tls.poll_flush(cx),
            ClientStream::Handshaking => Poll::Ready(Err(not_connected())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            ClientStream::Tls(tls) => tls.poll_shutdown(cx),
            ClientStream::Handshaking => Poll::Ready(Err(not_connected())),
        }
    }
}
