//! What the relay reads from and writes to: a plain TCP socket, or TLS over one.
//!
//! The relay works by readiness: it waits until a socket is readable or writable, then does
//! one non-blocking read or write. A [`Transport`] keeps that shape for both kinds. Plain
//! sockets are read straight into the relay's pooled buffer. TLS sockets go through a
//! rustls connection: a read pulls records off the socket and hands back their plaintext; a
//! write encrypts and sends what the socket takes, keeping the rest of the records for the
//! next write (the relay asks [`Transport::has_pending_output`] so it waits for them).
//!
//! The rustls connection sits behind a mutex only because the relay holds its transports by
//! shared reference; one task uses it, so the lock is never contended.

use std::io::{self, Read as _, Write as _};
use std::sync::Mutex;
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Plaintext handed to rustls per write: rustls buffers what it encrypts, so a bigger
/// slice only grows its buffer.
const TLS_WRITE_CHUNK: usize = 16 * 1024;

pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsTransport>),
    /// A `wss://` client: rustls's unbuffered API, buffers lent per read (see
    /// [`crate::tls::unbuffered`]).
    ServerTls(Box<ServerTlsTransport>),
}

pub struct ServerTlsTransport {
    tcp: TcpStream,
    tls: Mutex<crate::tls::ServerTls>,
}

impl ServerTlsTransport {
    fn lock(&self) -> std::sync::MutexGuard<'_, crate::tls::ServerTls> {
        self.tls.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct TlsTransport {
    tcp: TcpStream,
    state: Mutex<TlsState>,
}

struct TlsState {
    conn: rustls::Connection,
    /// Plaintext or unprocessed records are held in `conn`: the next read needs no socket
    /// readiness (none may come for bytes already off the socket).
    buffered_input: bool,
}

impl Transport {
    /// A TLS connection whose handshake is done, with whatever rustls read past it.
    pub fn tls(tcp: TcpStream, conn: impl Into<rustls::Connection>) -> Transport {
        let state = TlsState { conn: conn.into(), buffered_input: true };
        Transport::Tls(Box::new(TlsTransport { tcp, state: Mutex::new(state) }))
    }

    /// A client's TLS connection whose handshake is done, with whatever it read past it.
    pub fn server_tls(tcp: TcpStream, tls: crate::tls::ServerTls) -> Transport {
        Transport::ServerTls(Box::new(ServerTlsTransport { tcp, tls: Mutex::new(tls) }))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => &tls.tcp,
            Transport::ServerTls(tls) => &tls.tcp,
        }
    }

    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Plain(tcp) => tcp.poll_read_ready(cx),
            Transport::Tls(tls) if tls.lock().buffered_input => Poll::Ready(Ok(())),
            Transport::Tls(tls) => tls.tcp.poll_read_ready(cx),
            Transport::ServerTls(tls) if tls.lock().has_buffered_input() => Poll::Ready(Ok(())),
            Transport::ServerTls(tls) => tls.tcp.poll_read_ready(cx),
        }
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp().poll_write_ready(cx)
    }

    /// One read of plaintext into `buf`'s spare capacity (the caller reserves it): `Ok(0)`
    /// is the end of the stream, `WouldBlock` means wait for readiness.
    pub fn read_once(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => read_once(tcp, buf),
            Transport::Tls(tls) => tls.read(buf),
            Transport::ServerTls(tls) => {
                let start = buf.len();
                let mut out = tokio::io::ReadBuf::uninit(buf.spare_capacity_mut());
                tls.lock().read(&tls.tcp, &mut out)?;
                let n = out.filled().len();
                // SAFETY: `read` initialised the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(start + n) };
                Ok(n)
            }
        }
    }

    /// Writes from `data` what the socket takes now.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.try_write(data),
            Transport::Tls(tls) => tls.write(data),
            Transport::ServerTls(tls) => tls.lock().write(&tls.tcp, data),
        }
    }

    /// Bytes the transport holds for the socket (TLS records written only in part).
    pub fn has_pending_output(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.lock().conn.wants_write(),
            Transport::ServerTls(tls) => tls.lock().has_pending_output(),
        }
    }

    /// Sends what [`Transport::has_pending_output`] holds, as far as the socket takes it.
    pub fn flush(&self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(tls) => flush_records(&tls.tcp, &mut tls.lock().conn),
            Transport::ServerTls(tls) => tls.lock().flush(&tls.tcp),
        }
    }

    pub fn is_plain(&self) -> bool {
        matches!(self, Transport::Plain(_))
    }

    /// Half-closes: the peer reads the end of the stream after everything sent (TLS first
    /// says so with a close_notify alert).
    pub fn shutdown_write(&self) -> io::Result<()> {
        if let Transport::Tls(tls) = self {
            let mut state = tls.lock();
            state.conn.send_close_notify();
            let _ = flush_records(&tls.tcp, &mut state.conn);
        }
        if let Transport::ServerTls(tls) = self {
            let mut state = tls.lock();
            state.send_close_notify();
            let _ = state.flush(&tls.tcp);
        }
        socket2::SockRef::from(self.tcp()).shutdown(std::net::Shutdown::Write)
    }

    /// Ends the connection at once.
    pub fn abort(&self) {
        let _ = socket2::SockRef::from(self.tcp()).shutdown(std::net::Shutdown::Both);
    }
}

impl TlsTransport {
    fn lock(&self) -> std::sync::MutexGuard<'_, TlsState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        let mut state = self.lock();
        let TlsState { conn, buffered_input } = &mut *state;
        loop {
            let io_state = match conn.process_new_packets() {
                Ok(io_state) => io_state,
                Err(e) => {
                    // rustls queued an alert for the peer: send it if the socket takes it.
                    let _ = flush_records(&self.tcp, conn);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            };
            let available = io_state.plaintext_bytes_to_read();
            let peer_closed = io_state.peer_has_closed();
            if available > 0 {
                let start = buf.len();
                let take = available.min(buf.capacity() - start);
                buf.resize(start + take, 0);
                let n = conn.reader().read(&mut buf[start..])?;
                buf.truncate(start + n);
                *buffered_input = n < available;
                return Ok(n);
            }
            // Records rustls sends on its own (key updates, alerts) go out with reads too.
            if conn.wants_write() {
                let _ = flush_records(&self.tcp, conn);
            }
            *buffered_input = false;
            if peer_closed {
                return Ok(0);
            }
            if recv_records(&self.tcp, conn)? == 0 {
                return Ok(0);
            }
        }
    }

    fn write(&self, data: &[u8]) -> io::Result<usize> {
        let mut state = self.lock();
        let conn = &mut state.conn;
        // Records from the last write go first; until they are out, take nothing more.
        flush_records(&self.tcp, conn)?;
        let n = conn.writer().write(&data[..data.len().min(TLS_WRITE_CHUNK)])?;
        match flush_records(&self.tcp, conn) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }
}

/// Reads records off the socket into rustls: the bytes read, 0 at the end of the stream.
/// Like [`read_once`], a short read clears the socket's readiness.
fn recv_records(tcp: &TcpStream, conn: &mut rustls::Connection) -> io::Result<usize> {
    let mut short_read = None;
    let result = tcp.try_io(Interest::READABLE, || {
        let mut socket = SocketIo { tcp, short: false };
        let n = conn.read_tls(&mut socket)?;
        if n > 0 && socket.short {
            short_read = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short_read {
        Some(n) => Ok(n),
        None => result,
    }
}

/// Writes the records rustls holds, until none is left (`Ok`) or the socket is full
/// (`WouldBlock`).
fn flush_records(tcp: &TcpStream, conn: &mut rustls::Connection) -> io::Result<()> {
    while conn.wants_write() {
        tcp.try_io(Interest::WRITABLE, || conn.write_tls(&mut SocketIo { tcp, short: false }))?;
    }
    Ok(())
}

/// The socket as `std::io` for rustls, with non-blocking `recv`/`send`.
struct SocketIo<'a> {
    tcp: &'a TcpStream,
    /// The last read returned less than asked: the receive queue is empty.
    short: bool,
}

impl io::Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&*socket2::SockRef::from(self.tcp)).read(buf)?;
        self.short = n < buf.len();
        Ok(n)
    }
}

impl io::Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*socket2::SockRef::from(self.tcp)).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*socket2::SockRef::from(self.tcp)).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One `recv` into `buf`'s spare capacity (no zeroing). A short read means the socket's
/// receive queue was empty, so, as tokio's own `poll_read` does, the socket's readiness is
/// cleared then: the relay waits for the next readiness event instead of paying a `recv`
/// that only says "would block" after every message (a third of the syscalls of a small
/// echo). Nothing is lost: data or a FIN arriving later raises a new event, and tokio
/// keeps a "read closed" state through the clearing.
pub(crate) fn read_once(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut short_read = None;
    let result = stream.try_io(tokio::io::Interest::READABLE, || {
        let spare = buf.spare_capacity_mut();
        let room = spare.len();
        let n = socket2::SockRef::from(stream).recv(spare)?;
        // SAFETY: `recv` initialised the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        if n > 0 && n < room {
            short_read = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short_read {
        Some(n) => Ok(n),
        None => result,
    }
}
