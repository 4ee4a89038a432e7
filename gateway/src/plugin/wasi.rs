//! The WASI p2 that plugins get: enough for a language runtime to start (Rust's std,
//! componentize-py and jco components import `wasi:cli`, `wasi:io` and friends) and nothing
//! that reaches outside: no files, no environment, no arguments, no network.
//!
//! What differs from wasmtime-wasi's synchronous bindings:
//! - Several of them (blocking streams, poll, `create-udp-socket`, and the socket and
//!   filesystem methods behind them) run a future with `Handle::block_on`, which panics on a
//!   Tokio worker thread, where the gateway calls hooks. Here the blocking stream functions
//!   act without waiting (the only streams are stdio, always ready) and `wasi:io/poll` traps:
//!   a hook must not wait, and sleeping is waiting.
//! - Creating a TCP or UDP socket and looking up a name answer `access-denied` without
//!   touching the operating system. No socket resource can then exist, so none of the
//!   socket methods (some of which block) can be reached. No directory is preopened, so no
//!   filesystem descriptor exists either.
//! - Random bytes come in calls of at most `MAX_RANDOM` bytes, so a guest cannot make the
//!   host allocate its default of 64 MiB per call.
//! - stdout and stderr go to the gateway's log, line by line, tagged with the plugin, with
//!   control characters escaped (see `log_text`).
//!
//! `gateway/tests/plugin_runtime.rs` and `tests/e2e/containment.rs` call every interface
//! Rust's std links from a hook (`tests/plugins/hostile-wasi`) on a Tokio worker.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{self, ResolveAddressStream};
use wasmtime_wasi::p2::bindings::sockets::network::{self, ErrorCode, IpAddress, IpAddressFamily, Network};
use wasmtime_wasi::p2::bindings::sockets::tcp_create_socket;
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::bindings::sync::sockets::udp_create_socket;
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, DynPollable, IoError, OutputStream, Pollable, SocketError, SocketResult, StreamError,
    StreamResult, TcpSocket, UdpSocket,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiView};

/// A partial line longer than this is logged as it is.
const MAX_LINE: usize = super::log_text::MAX_RECORD;
/// Most random bytes one `get-random-bytes` call returns (a larger request traps).
const MAX_RANDOM: u64 = 64 * 1024;
/// What a log stream accepts per write; `blocking-write-and-flush` allows 4096.
const WRITE_PERMIT: usize = 64 * 1024;

/// A WASI context that grants nothing; stdio goes to the log under `plugin`'s name.
pub(super) fn deny_all_ctx(plugin: &Arc<str>) -> WasiCtx {
    WasiCtxBuilder::new()
        .stdout(LogStream {
            plugin: plugin.clone(),
            stderr: false,
        })
        .stderr(LogStream {
            plugin: plugin.clone(),
            stderr: true,
        })
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .max_random_size(MAX_RANDOM)
        .build()
}

/// Adds WASI p2 to `linker`, with `wasi:io/streams` and `wasi:io/poll` replaced by the
/// non-waiting versions below, and socket creation and name lookup by refusals.
pub(super) fn add_to_linker<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    streams::add_to_linker::<T, NoWait>(linker, |t| NoWaitIo(t.ctx().table))?;
    poll::add_to_linker::<T, NoWait>(linker, |t| NoWaitIo(t.ctx().table))?;
    tcp_create_socket::add_to_linker::<T, NoNetwork>(linker, |t| NoNetworkIo(t.ctx().table))?;
    udp_create_socket::add_to_linker::<T, NoNetwork>(linker, |t| NoNetworkIo(t.ctx().table))?;
    ip_name_lookup::add_to_linker::<T, NoNetwork>(linker, |t| NoNetworkIo(t.ctx().table))?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Socket creation and name lookup, refused.
struct NoNetwork;

impl HasData for NoNetwork {
    type Data<'a> = NoNetworkIo<'a>;
}

struct NoNetworkIo<'a>(&'a mut ResourceTable);

/// Turns the refusals above into the guest's `error-code`; required by the bindings.
impl network::Host for NoNetworkIo<'_> {
    fn convert_error_code(&mut self, error: SocketError) -> wasmtime::Result<ErrorCode> {
        error.downcast()
    }
    fn network_error_code(&mut self, _: Resource<IoError>) -> wasmtime::Result<Option<ErrorCode>> {
        Ok(None)
    }
}

impl network::HostNetwork for NoNetworkIo<'_> {
    fn drop(&mut self, n: Resource<Network>) -> wasmtime::Result<()> {
        self.0.delete(n)?;
        Ok(())
    }
}

impl tcp_create_socket::Host for NoNetworkIo<'_> {
    fn create_tcp_socket(&mut self, _: IpAddressFamily) -> SocketResult<Resource<TcpSocket>> {
        Err(ErrorCode::AccessDenied.into())
    }
}

impl udp_create_socket::Host for NoNetworkIo<'_> {
    fn create_udp_socket(&mut self, _: IpAddressFamily) -> SocketResult<Resource<UdpSocket>> {
        Err(ErrorCode::AccessDenied.into())
    }
}

impl ip_name_lookup::Host for NoNetworkIo<'_> {
    fn resolve_addresses(
        &mut self,
        _: Resource<Network>,
        _: String,
    ) -> SocketResult<Resource<ResolveAddressStream>> {
        Err(ErrorCode::AccessDenied.into())
    }
}

const NO_LOOKUP: &str = "no name lookup stream exists: lookups are refused";

impl ip_name_lookup::HostResolveAddressStream for NoNetworkIo<'_> {
    fn resolve_next_address(
        &mut self,
        _: Resource<ResolveAddressStream>,
    ) -> SocketResult<Option<IpAddress>> {
        Err(SocketError::trap(wasmtime::format_err!(NO_LOOKUP)))
    }
    fn subscribe(
        &mut self,
        _: Resource<ResolveAddressStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        wasmtime::bail!(NO_LOOKUP)
    }
    fn drop(&mut self, s: Resource<ResolveAddressStream>) -> wasmtime::Result<()> {
        self.0.delete(s)?;
        Ok(())
    }
}

struct NoWait;

impl HasData for NoWait {
    type Data<'a> = NoWaitIo<'a>;
}

struct NoWaitIo<'a>(&'a mut ResourceTable);

const NO_POLL: &str = "wasi:io/poll is not available to plugins: a hook must not wait";

impl poll::Host for NoWaitIo<'_> {
    fn poll(&mut self, _: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        wasmtime::bail!(NO_POLL)
    }
}

impl poll::HostPollable for NoWaitIo<'_> {
    fn ready(&mut self, _: Resource<DynPollable>) -> wasmtime::Result<bool> {
        wasmtime::bail!(NO_POLL)
    }
    fn block(&mut self, _: Resource<DynPollable>) -> wasmtime::Result<()> {
        wasmtime::bail!(NO_POLL)
    }
    fn drop(&mut self, p: Resource<DynPollable>) -> wasmtime::Result<()> {
        poll::HostPollable::drop(self.0, p)
    }
}

impl streams::Host for NoWaitIo<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(self.0, err)
    }
}

type Out = Resource<DynOutputStream>;
type In = Resource<DynInputStream>;

impl streams::HostOutputStream for NoWaitIo<'_> {
    fn drop(&mut self, s: Out) -> wasmtime::Result<()> {
        self.0.delete(s)?;
        Ok(())
    }
    fn check_write(&mut self, s: Out) -> StreamResult<u64> {
        streams::HostOutputStream::check_write(self.0, s)
    }
    fn write(&mut self, s: Out, bytes: Vec<u8>) -> StreamResult<()> {
        streams::HostOutputStream::write(self.0, s, bytes)
    }
    fn blocking_write_and_flush(&mut self, s: Out, bytes: Vec<u8>) -> StreamResult<()> {
        let stream = self.0.get_mut(&s)?;
        if stream.check_write()? < bytes.len() {
            return Err(StreamError::trap(
                "the output stream is not ready and a hook must not wait",
            ));
        }
        stream.write(bytes.into())?;
        stream.flush()
    }
    fn blocking_write_zeroes_and_flush(&mut self, s: Out, len: u64) -> StreamResult<()> {
        let stream = self.0.get_mut(&s)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if stream.check_write()? < len {
            return Err(StreamError::trap(
                "the output stream is not ready and a hook must not wait",
            ));
        }
        stream.write_zeroes(len)?;
        stream.flush()
    }
    fn subscribe(&mut self, s: Out) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostOutputStream::subscribe(self.0, s)
    }
    fn write_zeroes(&mut self, s: Out, len: u64) -> StreamResult<()> {
        streams::HostOutputStream::write_zeroes(self.0, s, len)
    }
    fn flush(&mut self, s: Out) -> StreamResult<()> {
        streams::HostOutputStream::flush(self.0, s)
    }
    fn blocking_flush(&mut self, s: Out) -> StreamResult<()> {
        streams::HostOutputStream::flush(self.0, s)
    }
    fn splice(&mut self, dst: Out, src: In, len: u64) -> StreamResult<u64> {
        streams::HostOutputStream::splice(self.0, dst, src, len)
    }
    fn blocking_splice(&mut self, dst: Out, src: In, len: u64) -> StreamResult<u64> {
        streams::HostOutputStream::splice(self.0, dst, src, len)
    }
}

impl streams::HostInputStream for NoWaitIo<'_> {
    fn drop(&mut self, s: In) -> wasmtime::Result<()> {
        self.0.delete(s)?;
        Ok(())
    }
    fn read(&mut self, s: In, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(self.0, s, len)
    }
    fn blocking_read(&mut self, s: In, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(self.0, s, len)
    }
    fn skip(&mut self, s: In, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(self.0, s, len)
    }
    fn blocking_skip(&mut self, s: In, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(self.0, s, len)
    }
    fn subscribe(&mut self, s: In) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostInputStream::subscribe(self.0, s)
    }
}

/// stdout or stderr of a plugin.
#[derive(Clone)]
struct LogStream {
    plugin: Arc<str>,
    stderr: bool,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineLogger::new(self.clone()))
    }
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineLogger::new(self.clone()))
    }
}

/// Collects bytes into lines and logs each; never refuses a write.
struct LineLogger {
    to: LogStream,
    line: Vec<u8>,
}

impl LineLogger {
    fn new(to: LogStream) -> LineLogger {
        LineLogger {
            to,
            line: Vec::new(),
        }
    }

    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&bytes[..nl]);
            self.emit();
            bytes = &bytes[nl + 1..];
        }
        self.line.extend_from_slice(bytes);
        if self.line.len() >= MAX_LINE {
            self.emit();
        }
    }

    fn emit(&mut self) {
        if self.line.iter().all(u8::is_ascii_whitespace) {
            self.line.clear();
            return;
        }
        let lossy = String::from_utf8_lossy(&self.line);
        let text = super::log_text::printable(&lossy);
        let plugin = &*self.to.plugin;
        if self.to.stderr {
            tracing::warn!(target: "wasmgate::plugin", plugin, "stderr: {text}");
        } else {
            tracing::info!(target: "wasmgate::plugin", plugin, "stdout: {text}");
        }
        self.line.clear();
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineLogger {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LineLogger {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
    /// Zeroes carry no text; not buffering them keeps a guest from making the host allocate.
    fn write_zeroes(&mut self, _: usize) -> StreamResult<()> {
        Ok(())
    }
}

impl tokio::io::AsyncWrite for LineLogger {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
