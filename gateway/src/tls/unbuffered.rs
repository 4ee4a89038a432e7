//! A `wss://` client's TLS session over rustls's unbuffered API, so that an idle connection
//! keeps no TLS buffers.
//!
//! rustls's buffered `ServerConnection` keeps a receive buffer of about 4 KiB for the life
//! of the connection. Here the gateway owns the buffers: a read takes a buffer from the
//! relay's per-thread pool, receives into it, decrypts the records in place and gives it
//! back; only the bytes of an unfinished record stay with the connection. A write encrypts
//! into a pooled buffer and keeps only what the socket did not take. Plaintext the reader
//! had no room for waits in a third buffer. Each is an empty `Vec` (no allocation) when
//! there is nothing in it, which is the case between messages.
//!
//! Everything is non-blocking and readiness-based, like the relay's plain sockets:
//! `WouldBlock` means wait for the socket to be readable (reads) or writable (writes).

use std::cell::RefCell;
use std::io;
use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    AppDataRecord, ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::{CommonState, ServerConfig};
use tokio::io::ReadBuf;
use tokio::net::TcpStream;

use crate::relay::pool;

/// Plaintext encrypted per write: one full record.
const WRITE_CHUNK: usize = 16 * 1024;
/// What a record adds to its plaintext, with room to spare (TLS 1.3: 5 + 1 + 16 bytes).
const RECORD_OVERHEAD: usize = 64;
/// Room a read asks the socket for at least.
const MIN_READ: usize = 4096;

thread_local! {
    /// The SNI name of the ClientHello the certificate resolver saw last on this thread.
    /// The unbuffered connection does not expose it, and the resolver runs inside
    /// `process_tls_records`, on this thread, so the handshake reads it right after.
    static LAST_SNI: RefCell<Option<Option<Box<str>>>> = const { RefCell::new(None) };
}

/// Called by the certificate resolver with the ClientHello's SNI name.
pub fn note_sni(name: Option<&str>) {
    LAST_SNI.with(|sni| *sni.borrow_mut() = Some(name.map(Into::into)));
}

pub struct ServerTls {
    conn: UnbufferedServerConnection,
    /// Received bytes of a record not complete yet.
    incoming: Vec<u8>,
    /// Records the socket has not taken yet.
    outgoing: Vec<u8>,
    /// Decrypted bytes the last read had no room for.
    plaintext: Vec<u8>,
    sni: Option<Box<str>>,
    handshake_done: bool,
    /// The peer sent close_notify, or the socket reached its end.
    read_closed: bool,
    close_sent: bool,
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl ServerTls {
    /// Runs the server handshake on `tcp`. `already_read` holds bytes of the ClientHello that
    /// came off the socket before (behind a PROXY protocol header). The caller bounds it with
    /// the handshake timeout.
    pub async fn accept(tcp: &TcpStream, config: Arc<ServerConfig>, already_read: Vec<u8>) -> io::Result<ServerTls> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut tls = ServerTls {
            conn,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            plaintext: Vec::new(),
            sni: None,
            handshake_done: false,
            read_closed: false,
            close_sent: false,
        };
        LAST_SNI.with(|sni| sni.borrow_mut().take());
        let mut work = already_read;
        loop {
            let processed = tls.process(&mut work, None);
            if let Some(sni) = LAST_SNI.with(|sni| sni.borrow_mut().take()) {
                tls.sni = sni;
            }
            tls.keep_incoming(work);
            if tls.handshake_done && processed.is_ok() && !tls.incoming.is_empty() {
                // The upgrade request came with the client's Finished: the session ticket
                // rustls queued goes out with the response, in one send (see `write`).
                // Without the request it goes at once: its segment acknowledges the
                // Finished, and a client writing the request separately with Nagle on
                // waits for that ACK (40 ms of delayed ACK per connection, measured).
                return Ok(tls);
            }
            // The alert of a failed handshake goes out too, as far as the socket takes it.
            let flushed = tls.flush_async(tcp).await;
            processed.map_err(invalid)?;
            flushed?;
            if tls.handshake_done {
                return Ok(tls);
            }
            if tls.read_closed {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            work = tls.take_work();
            loop {
                tcp.readable().await?;
                match crate::relay::transport::read_once(tcp, &mut work) {
                    Ok(0) => {
                        tls.keep_incoming(work);
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        tls.keep_incoming(work);
                        return Err(e);
                    }
                }
            }
        }
    }

    /// What plugins learn of the session: version and client certificate.
    pub fn common(&self) -> &CommonState {
        &self.conn
    }

    /// The SNI name the client sent.
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// A read returns without waiting for the socket (plaintext or the end are buffered).
    pub fn has_buffered_input(&self) -> bool {
        !self.plaintext.is_empty() || self.read_closed
    }

    pub fn has_pending_output(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// One read of plaintext into `out`: nothing filled is the end of the stream,
    /// `WouldBlock` means wait for the socket to be readable.
    pub fn read(&mut self, tcp: &TcpStream, out: &mut ReadBuf<'_>) -> io::Result<()> {
        if !self.plaintext.is_empty() {
            let n = self.plaintext.len().min(out.remaining());
            out.put_slice(&self.plaintext[..n]);
            self.plaintext.drain(..n);
            if self.plaintext.is_empty() {
                self.plaintext = Vec::new();
            }
            return Ok(());
        }
        let start = out.filled().len();
        loop {
            if self.read_closed {
                return Ok(());
            }
            let mut work = self.take_work();
            match crate::relay::transport::read_once(tcp, &mut work) {
                Ok(0) => {
                    self.keep_incoming(work);
                    self.read_closed = true;
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    self.keep_incoming(work);
                    return Err(e);
                }
            }
            let queued = self.outgoing.len();
            let processed = self.process(&mut work, Some(out));
            self.keep_incoming(work);
            // Records rustls sends on its own (key updates, alerts) go out with reads; the
            // session ticket the handshake left waits for the response.
            if self.outgoing.len() > queued {
                let _ = self.flush(tcp);
            }
            processed.map_err(invalid)?;
            if out.filled().len() > start {
                return Ok(());
            }
        }
    }

    /// Encrypts from `data` one record's worth and sends what the socket takes; the rest of
    /// the record waits for [`ServerTls::flush`]. Records still waiting, or queued by rustls
    /// while encrypting (a key update), go out first, in the same send; `WouldBlock` while
    /// more than a record's worth waits.
    pub fn write(&mut self, tcp: &TcpStream, data: &[u8]) -> io::Result<usize> {
        if self.outgoing.len() > WRITE_CHUNK {
            self.flush(tcp)?;
        }
        let chunk = &data[..data.len().min(WRITE_CHUNK)];
        let mut scratch = pool::take();
        let result = self.encrypt(chunk, &mut scratch);
        if !self.outgoing.is_empty() {
            let queued = result.map(|len| self.outgoing.extend_from_slice(&scratch[..len]));
            pool::give(scratch);
            queued?;
            return match self.flush(tcp) {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
                _ => Ok(chunk.len()),
            };
        }
        let sent = match result {
            Ok(len) => {
                let records = &scratch[..len];
                let sent = match tcp.try_write(records) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => {
                        pool::give(scratch);
                        return Err(e);
                    }
                };
                if sent < records.len() {
                    self.outgoing.extend_from_slice(&records[sent..]);
                }
                Ok(chunk.len())
            }
            Err(e) => Err(e),
        };
        pool::give(scratch);
        sent
    }

    /// Sends the records [`ServerTls::has_pending_output`] holds, as far as the socket takes
    /// them: `Ok` once all are out.
    pub fn flush(&mut self, tcp: &TcpStream) -> io::Result<()> {
        while !self.outgoing.is_empty() {
            let n = tcp.try_write(&self.outgoing)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.outgoing.drain(..n);
        }
        self.outgoing = Vec::new();
        Ok(())
    }

    async fn flush_async(&mut self, tcp: &TcpStream) -> io::Result<()> {
        loop {
            match self.flush(tcp) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.writable().await?,
                other => return other,
            }
        }
    }

    /// Queues a close_notify alert (sent by the next flush).
    pub fn send_close_notify(&mut self) {
        if self.close_sent || !self.handshake_done {
            return;
        }
        self.close_sent = true;
        let outgoing = &mut self.outgoing;
        let mut plaintext = std::mem::take(&mut self.plaintext);
        let mut read_closed = self.read_closed;
        loop {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let at = outgoing.len();
                    outgoing.resize(at + RECORD_OVERHEAD, 0);
                    let n = traffic.queue_close_notify(&mut outgoing[at..]).unwrap_or(0);
                    outgoing.truncate(at + n);
                    break;
                }
                Ok(ConnectionState::EncodeTlsData(encode)) => encode_into(outgoing, encode),
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                Ok(ConnectionState::PeerClosed) => read_closed = true,
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while let Some(Ok(AppDataRecord { payload, .. })) = traffic.next_record() {
                        plaintext.extend_from_slice(payload);
                    }
                }
                _ => break,
            }
        }
        self.plaintext = plaintext;
        self.read_closed = read_closed;
    }

    /// Encrypts `chunk` into `scratch` (resized): the length of the records.
    fn encrypt(&mut self, chunk: &[u8], scratch: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state.map_err(invalid)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    let mut size = chunk.len() + RECORD_OVERHEAD;
                    loop {
                        scratch.clear();
                        scratch.resize(size, 0);
                        match traffic.encrypt(chunk, scratch) {
                            Ok(n) => return Ok(n),
                            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                                size = required_size
                            }
                            Err(e) => return Err(io::Error::other(e.to_string())),
                        }
                    }
                }
                ConnectionState::EncodeTlsData(encode) => encode_into(&mut self.outgoing, encode),
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => self.read_closed = true,
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let AppDataRecord { payload, .. } = record.map_err(invalid)?;
                        self.plaintext.extend_from_slice(payload);
                    }
                }
                ConnectionState::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                _ => return Err(io::Error::new(io::ErrorKind::NotConnected, "TLS handshake not finished")),
            }
        }
    }

    /// A buffer for a read: pooled, starting with the unfinished record's bytes.
    fn take_work(&mut self) -> Vec<u8> {
        let mut work = pool::take();
        work.extend_from_slice(&self.incoming);
        self.incoming = Vec::new();
        if work.capacity() - work.len() < MIN_READ {
            work.reserve(MIN_READ);
        }
        work
    }

    /// Keeps what is left in `work` (an unfinished record) and returns it to the pool.
    fn keep_incoming(&mut self, work: Vec<u8>) {
        if !work.is_empty() {
            self.incoming = work.clone();
        }
        pool::give(work);
    }

    /// Processes the records in `work`, removing those it used: plaintext goes to `out`,
    /// what does not fit (or all of it without `out`) to `self.plaintext`; records to send
    /// go to `self.outgoing`. On an error, rustls's alert is in `self.outgoing` too.
    fn process(&mut self, work: &mut Vec<u8>, mut out: Option<&mut ReadBuf<'_>>) -> Result<(), rustls::Error> {
        let mut used = 0;
        let mut result = Ok(());
        loop {
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(&mut work[used..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    used += discard;
                    result = Err(e);
                    break;
                }
            };
            let mut stop = false;
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(AppDataRecord { discard: more, payload }) => {
                                discard += more;
                                deliver(payload, &mut out, &mut self.plaintext);
                            }
                            Err(e) => {
                                result = Err(e);
                                stop = true;
                                break;
                            }
                        }
                    }
                }
                ConnectionState::EncodeTlsData(encode) => encode_into(&mut self.outgoing, encode),
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => self.read_closed = true,
                ConnectionState::Closed => {
                    self.read_closed = true;
                    stop = true;
                }
                ConnectionState::WriteTraffic(_) => {
                    self.handshake_done = true;
                    stop = true;
                }
                _ => stop = true,
            }
            used += discard;
            if stop {
                break;
            }
        }
        work.drain(..used);
        if result.is_err() {
            // rustls queued an alert: take it.
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            if let Ok(ConnectionState::EncodeTlsData(encode)) = state {
                encode_into(&mut self.outgoing, encode);
            }
        }
        result
    }
}

/// Plaintext to the reader, or to `spill` when it has no room.
fn deliver(payload: &[u8], out: &mut Option<&mut ReadBuf<'_>>, spill: &mut Vec<u8>) {
    let n = match out {
        Some(out) if spill.is_empty() => {
            let n = payload.len().min(out.remaining());
            out.put_slice(&payload[..n]);
            n
        }
        _ => 0,
    };
    spill.extend_from_slice(&payload[n..]);
}

fn encode_into(outgoing: &mut Vec<u8>, mut encode: EncodeTlsData<'_, rustls::server::ServerConnectionData>) {
    let at = outgoing.len();
    let mut size = 1024;
    loop {
        outgoing.resize(at + size, 0);
        match encode.encode(&mut outgoing[at..]) {
            Ok(n) => {
                outgoing.truncate(at + n);
                return;
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => size = required_size,
            Err(_) => {
                outgoing.truncate(at);
                return;
            }
        }
    }
}
