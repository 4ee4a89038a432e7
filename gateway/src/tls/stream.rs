//! A client connection during its upgrade request: plain TCP, or TLS once the handshake is
//! done. After the 101 it becomes the relay's [`Transport`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::relay::Transport;

pub enum ClientStream {
    Plain(TcpStream),
    /// Boxed: the TLS state is large and most of it is the handshake's.
    Tls(Box<TlsStream<TcpStream>>),
    /// While the TLS handshake runs, and after one that failed: nothing to read or write.
    Handshaking,
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
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let tls = acceptor
            .accept_with(tcp, |conn| {
                let mut rest = &already_read[..];
                while !rest.is_empty() && conn.read_tls(&mut rest).is_ok_and(|n| n > 0) {}
                // Processed now: the socket may have nothing more to wake the handshake with.
                // An error stays with the connection and ends the handshake.
                let _ = conn.process_new_packets();
            })
            .await?;
        *self = ClientStream::Tls(Box::new(tls));
        Ok(())
    }

    /// The TLS session, if the connection has one.
    pub fn tls(&self) -> Option<&rustls::ServerConnection> {
        match self {
            ClientStream::Tls(tls) => Some(tls.get_ref().1),
            _ => None,
        }
    }

    /// The stream for the relay, with what TLS buffered past the upgrade request.
    pub fn into_transport(self) -> Transport {
        match self {
            ClientStream::Plain(tcp) => Transport::Plain(tcp),
            ClientStream::Tls(tls) => {
                let (tcp, conn) = tls.into_inner();
                Transport::tls(tcp, conn)
            }
            ClientStream::Handshaking => unreachable!("a connection without a finished handshake is never relayed"),
        }
    }
}

fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake did not finish")
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            ClientStream::Handshaking => Poll::Ready(Err(not_connected())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
            ClientStream::Handshaking => Poll::Ready(Err(not_connected())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            ClientStream::Handshaking => Poll::Ready(Err(not_connected())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            ClientStream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            ClientStream::Handshaking => Poll::Ready(Err(not_connected())),
        }
    }
}
