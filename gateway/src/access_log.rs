//! Access logs: one line per connection when it ends — who, which route and server, what was
//! negotiated, who refused it, how long, how much, and how it closed.
//!
//! A connection collects its line in a [`Trace`] (one pointer, `None` when logging is off, so
//! an unlogged gateway pays nothing per connection) and hands the finished [`Entry`] to a
//! bounded channel. One dedicated thread formats and writes the lines, flushing when the
//! channel runs dry: no connection task ever waits on a disk or a pipe. When the channel is
//! full (the disk is slower than connections end), the line is dropped and counted in
//! `wasmgate_access_log_dropped_total` rather than make connections wait.
//!
//! A file target is reopened on [`AccessLog::reopen`] (SIGUSR1 in the binary), so logrotate
//! can rename the file and signal, as with nginx.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::metrics::{Counter, Registry};
use crate::relay::RelayOutcome;

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 8192;

/// Where lines go: `access_log = "stdout" | "PATH" | "off"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

/// `log_format = "json" | "text"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// `key=value` pairs (logfmt), values with spaces or quotes quoted.
    Text,
}

/// What `[gateway] access_log` and `log_format` ask for; None when off.
pub fn configured(config: &crate::config::Config) -> Option<(Target, Format)> {
    let g = &config.gateway;
    let target = match g.access_log.as_ref().map(|l| l.get_ref().as_str()) {
        None | Some("off") => return None,
        Some("stdout") => Target::Stdout,
        Some(path) => Target::File(config.base_dir.join(path)),
    };
    let format = match g.log_format.as_ref().map(|f| f.get_ref().as_str()) {
        Some("text") => Format::Text,
        _ => Format::Json,
    };
    Some((target, format))
}

/// One connection's line.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// When the connection ended, RFC 3339 UTC with milliseconds.
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub client: SocketAddr,
    /// The request path in normal form, without the query (which may carry credentials).
    pub path: Option<String>,
    /// The matched route's path prefix.
    pub route: Option<String>,
    pub pool: Option<String>,
    /// The upstream server (`host:port`) that served the connection, or the last one tried.
    pub server: Option<String>,
    /// 101 for a relayed connection, else the status the client was refused with.
    pub status: u16,
    /// The plugin whose handshake or balancer call refused the connection.
    pub refused_by: Option<String>,
    /// Why the handshake was refused.
    pub reason: Option<String>,
    pub subprotocol: Option<String>,
    /// permessage-deflate as agreed: "passthrough", "terminate", or none.
    pub compression: Option<&'static str>,
    pub duration_ms: u64,
    pub messages_from_client: u64,
    pub messages_from_upstream: u64,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
    pub close_code: Option<u16>,
    /// "client", "upstream" or "gateway".
    pub closed_by: Option<&'static str>,
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

impl Entry {
    fn write_json<W: Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        serde_json::to_writer(&mut *out, self)?;
        out.write_all(b"\n")
    }

    fn write_text<W: Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let num = |v: Option<u16>| v.map_or_else(|| "-".into(), |n| n.to_string());
        let pairs: [(&str, String); 18] = [
            ("time", humantime::format_rfc3339_millis(self.time).to_string()),
            ("client", self.client.to_string()),
            ("path", opt(&self.path)),
            ("route", opt(&self.route)),
            ("pool", opt(&self.pool)),
            ("server", opt(&self.server)),
            ("status", self.status.to_string()),
            ("refused_by", opt(&self.refused_by)),
            ("reason", opt(&self.reason)),
            ("subprotocol", opt(&self.subprotocol)),
            ("compression", self.compression.unwrap_or("-").into()),
            ("duration_ms", self.duration_ms.to_string()),
            ("messages_from_client", self.messages_from_client.to_string()),
            ("messages_from_upstream", self.messages_from_upstream.to_string()),
            ("bytes_from_client", self.bytes_from_client.to_string()),
            ("bytes_from_upstream", self.bytes_from_upstream.to_string()),
            ("close_code", num(self.close_code)),
            ("closed_by", self.closed_by.unwrap_or("-").into()),
        ];
        let mut line = String::with_capacity(256);
        for (i, (key, value)) in pairs.iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            line.push_str(key);
            line.push('=');
            push_logfmt_value(&mut line, value);
        }
        line.push('\n');
        out.write_all(line.as_bytes())
    }
}

/// A value as is when it has no space, quote, `=` or control character; else quoted, with
/// `"`, `\` and control characters escaped, so one line stays one line.
fn push_logfmt_value(line: &mut String, value: &str) {
    let plain = !value.is_empty() && !value.chars().any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control());
    if plain {
        line.push_str(value);
        return;
    }
    line.push('"');
    for c in value.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            c if c.is_control() => line.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => line.push(c),
        }
    }
    line.push('"');
}

enum Msg {
    Entry(Box<Entry>),
    /// Look at the reopen flag now.
    Wake,
}

/// The sending side of the log, shared by every connection.
pub struct AccessLog {
    queue: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
    dropped: Counter,
    target: Target,
}

impl AccessLog {
    /// Opens the target (a file is created or appended to; failing here names the path) and
    /// starts the writer thread, which ends when the last sender is dropped.
    pub fn start(target: Target, format: Format, metrics: &Registry) -> io::Result<AccessLog> {
        let sink = Sink::open(&target)?;
        let (queue, received) = mpsc::sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let written = metrics.counter("wasmgate_access_log_lines_total", "Access log lines written", &[] as &[(&str, &str)]);
        let errors = metrics.counter("wasmgate_access_log_errors_total", "Access log writes or reopens that failed", &[] as &[(&str, &str)]);
        let dropped = metrics.counter(
            "wasmgate_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind",
            &[] as &[(&str, &str)],
        );
        let writer = Writer { sink, format, target: target.clone(), reopen: reopen.clone(), written, errors };
        std::thread::Builder::new().name("access-log".into()).spawn(move || writer.run(received))?;
        Ok(AccessLog { queue, reopen, dropped, target })
    }

    /// Queues a line; never waits. A full queue drops it (counted).
    pub fn log(&self, entry: Entry) {
        match self.queue.try_send(Msg::Entry(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped.inc(),
            // The writer stopped (it panicked): nothing can be logged any more.
            Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Reopens a file target at its path before the next line (after logrotate renamed it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        // A full queue means the writer is busy and sees the flag before its next line.
        let _ = self.queue.try_send(Msg::Wake);
    }

    pub fn target(&self) -> &Target {
        &self.target
    }
}

enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File(BufWriter<File>),
}

impl Sink {
    fn open(target: &Target) -> io::Result<Sink> {
        Ok(match target {
            Target::Stdout => Sink::Stdout(BufWriter::new(io::stdout())),
            Target::File(path) => {
                let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot open access log {}: {e}", path.display()))
                })?;
                Sink::File(BufWriter::new(file))
            }
        })
    }

    fn out(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File(w) => w,
        }
    }
}

struct Writer {
    sink: Sink,
    format: Format,
    target: Target,
    reopen: Arc<AtomicBool>,
    written: Counter,
    errors: Counter,
}

impl Writer {
    fn run(mut self, received: Receiver<Msg>) {
        // Ends when the gateway (the last sender) is gone.
        while let Ok(first) = received.recv() {
            // Everything waiting is written, then flushed once: a burst costs few writes,
            // a single line is on disk at once.
            let mut next = Some(first);
            while let Some(msg) = next {
                if self.reopen.swap(false, Ordering::AcqRel) {
                    self.reopen_sink();
                }
                if let Msg::Entry(entry) = msg {
                    let out = self.sink.out();
                    let done = match self.format {
                        Format::Json => entry.write_json(out),
                        Format::Text => entry.write_text(out),
                    };
                    match done {
                        Ok(()) => self.written.inc(),
                        Err(_) => self.errors.inc(),
                    }
                }
                next = received.try_recv().ok();
            }
            if self.sink.out().flush().is_err() {
                self.errors.inc();
            }
        }
        let _ = self.sink.out().flush();
    }

    fn reopen_sink(&mut self) {
        let _ = self.sink.out().flush();
        if matches!(self.target, Target::Stdout) {
            return;
        }
        match Sink::open(&self.target) {
            Ok(sink) => self.sink = sink,
            Err(e) => {
                // Keep writing to the old file rather than lose lines.
                self.errors.inc();
                tracing::error!("{e}; still writing to the previous file");
            }
        }
    }
}

/// What a connection learns for its line as it goes: one pointer, allocated only when
/// logging is on; every method does nothing otherwise.
#[derive(Default)]
pub struct Trace(Option<Box<(Entry, Instant)>>);

impl Trace {
    pub fn start(log: Option<&AccessLog>, client: SocketAddr) -> Trace {
        Trace(log.map(|_| {
            Box::new((
                Entry {
                    time: SystemTime::now(),
                    client,
                    path: None,
                    route: None,
                    pool: None,
                    server: None,
                    status: 0,
                    refused_by: None,
                    reason: None,
                    subprotocol: None,
                    compression: None,
                    duration_ms: 0,
                    messages_from_client: 0,
                    messages_from_upstream: 0,
                    bytes_from_client: 0,
                    bytes_from_upstream: 0,
                    close_code: None,
                    closed_by: None,
                },
                Instant::now(),
            ))
        }))
    }

    fn with(&mut self, f: impl FnOnce(&mut Entry)) {
        if let Some(data) = &mut self.0 {
            f(&mut data.0);
        }
    }

    /// The client as the PROXY protocol header named it, and the request's path.
    pub fn request(&mut self, client: SocketAddr, path: &str) {
        self.with(|e| {
            e.client = client;
            e.path = Some(path.to_string());
        });
    }

    pub fn route(&mut self, prefix: &str) {
        self.with(|e| e.route = Some(prefix.to_string()));
    }

    pub fn pool(&mut self, name: &str) {
        self.with(|e| e.pool = Some(name.to_string()));
    }

    /// The server being tried; the last one set is the one logged.
    pub fn server(&mut self, authority: &str) {
        self.with(|e| e.server = Some(authority.to_string()));
    }

    pub fn refused_by(&mut self, plugin: &str) {
        self.with(|e| e.refused_by = Some(plugin.to_string()));
    }

    pub fn refused(&mut self, status: u16, reason: &str) {
        self.with(|e| {
            e.status = status;
            e.reason = Some(reason.to_string());
        });
    }

    pub fn negotiated(&mut self, subprotocol: Option<&str>, compression: Option<&'static str>) {
        self.with(|e| {
            e.status = 101;
            e.subprotocol = subprotocol.map(str::to_string);
            e.compression = compression;
        });
    }

    pub fn relayed(&mut self, outcome: &RelayOutcome) {
        self.with(|e| {
            e.messages_from_client = outcome.messages_from_client;
            e.messages_from_upstream = outcome.messages_from_upstream;
            e.bytes_from_client = outcome.bytes_from_client;
            e.bytes_from_upstream = outcome.bytes_from_upstream;
            e.close_code = Some(outcome.code);
            e.closed_by = Some(outcome.closed_by.name());
        });
    }

    /// Hands the line to the writer. A connection that never sent a request (status still
    /// 0: a port scan, a client gone before its headers) leaves none.
    pub fn finish(self, log: Option<&AccessLog>) {
        let (Some(data), Some(log)) = (self.0, log) else { return };
        let (mut entry, started) = *data;
        if entry.status == 0 {
            return;
        }
        entry.time = SystemTime::now();
        entry.duration_ms = started.elapsed().as_millis() as u64;
        log.log(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut trace = Trace::start(Some(&dummy().0), "127.0.0.1:5000".parse().unwrap());
        trace.request("127.0.0.1:5000".parse().unwrap(), "/chat");
        trace.route("/");
        trace.refused_by("jwt");
        trace.refused(401, "bad \"token\"\nsecond line");
        let (entry, _) = *trace.0.unwrap();
        entry
    }

    fn dummy() -> (AccessLog, Receiver<Msg>) {
        let (queue, received) = mpsc::sync_channel(1);
        (AccessLog { queue, reopen: Arc::default(), dropped: Counter::default(), target: Target::Stdout }, received)
    }

    #[test]
    fn text_lines_stay_one_line_and_quote_what_needs_it() {
        let mut out = Vec::new();
        entry().write_text(&mut out).unwrap();
        let line = String::from_utf8(out).unwrap();
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.contains(" path=/chat route=/ pool=- server=- status=401 refused_by=jwt "), "{line}");
        assert!(line.contains(r#"reason="bad \"token\"\nsecond line""#), "{line}");
        assert!(line.contains(" close_code=- closed_by=-\n"), "{line}");
    }

    #[test]
    fn json_lines_name_every_field() {
        let mut out = Vec::new();
        entry().write_json(&mut out).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["status"], 401);
        assert_eq!(value["refused_by"], "jwt");
        assert_eq!(value["client"], "127.0.0.1:5000");
        assert!(value["time"].as_str().unwrap().ends_with('Z'));
        assert!(value["server"].is_null());
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (log, received) = dummy();
        log.log(entry());
        log.log(entry());
        log.log(entry());
        assert_eq!(log.dropped.get(), 2, "one fits in the queue");
        assert!(matches!(received.try_recv(), Ok(Msg::Entry(_))));
    }

    #[test]
    fn nothing_is_kept_when_logging_is_off() {
        let mut trace = Trace::start(None, "127.0.0.1:1".parse().unwrap());
        trace.route("/");
        assert!(trace.0.is_none());
        assert_eq!(std::mem::size_of::<Trace>(), 8);
    }
}
