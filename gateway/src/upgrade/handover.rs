//! The handover socket: a gateway offers its listening sockets on a Unix socket; a new
//! process connects, receives them (`SCM_RIGHTS`), accepts on them, and answers `ready`,
//! after which the old process retires. Until `ready` the old process keeps accepting, so a
//! successor that dies while starting costs nothing.
//!
//! One exchange per connection: the old process sends one message whose bytes are JSON
//! (`{"listen": "ip:port" | null, "tls": "ip:port" | null, "admin": "ip:port" | null}`) and
//! whose ancillary data carries the listening descriptors of the present ones in that order; the new one answers `ready\n`. Only a peer running
//! as the same user is served (the socket is made 0600, and the peer's credentials are
//! checked).

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener};

use crate::gateway::Shared;

/// How long a successor may take between receiving the sockets and saying it accepts on
/// them (it has loaded its plugins before asking).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the descriptors of the message are.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    listen: Option<SocketAddr>,
    #[serde(default)]
    tls: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

impl Manifest {
    fn addresses(&self) -> [Option<SocketAddr>; 3] {
        [self.listen, self.tls, self.admin]
    }
}

/// The listening sockets of a gateway, by kind.
#[derive(Clone, Copy)]
pub struct Sockets<T> {
    pub listen: Option<T>,
    pub tls: Option<T>,
    pub admin: Option<T>,
}

/// Copies (dup) of the listening sockets, kept to hand over.
pub struct Offered {
    fds: Vec<OwnedFd>,
    manifest: Manifest,
}

impl Offered {
    pub fn new(sockets: Sockets<&TcpListener>) -> std::io::Result<Offered> {
        let mut fds = Vec::new();
        let mut take = |l: Option<&TcpListener>| -> std::io::Result<Option<SocketAddr>> {
            match l {
                Some(l) => {
                    fds.push(l.as_fd().try_clone_to_owned()?);
                    Ok(Some(l.local_addr()?))
                }
                None => Ok(None),
            }
        };
        let manifest = Manifest { listen: take(sockets.listen)?, tls: take(sockets.tls)?, admin: take(sockets.admin)? };
        Ok(Offered { fds, manifest })
    }

    fn try_clone(&self) -> std::io::Result<Offered> {
        Ok(Offered {
            fds: self.fds.iter().map(|fd| fd.try_clone()).collect::<Result<_, _>>()?,
            manifest: Manifest { ..self.manifest },
        })
    }
}

/// Sockets taken over from a running gateway.
pub struct Taken {
    pub sockets: Sockets<std::net::TcpListener>,
    pub predecessor: Predecessor,
}

/// The process that handed its sockets over, waiting to hear that we accept on them.
pub struct Predecessor {
    stream: UnixStream,
}

impl Predecessor {
    /// Tells the predecessor we accept on its sockets: it stops accepting and retires.
    pub fn ready(mut self) {
        if let Err(e) = self.stream.write_all(b"ready\n") {
            tracing::warn!("could not tell the previous process to retire: {e}");
        }
    }
}

/// Asks the gateway serving `path` for its listening sockets, keeping those bound to the
/// addresses this config wants. None when no gateway answers there (a first start, or a
/// stale socket) or none of its sockets fit; the caller then binds its own.
pub fn take_over(path: &Path, wanted: Sockets<SocketAddr>) -> Option<Taken> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(path = %path.display(), "no gateway to take over from: {e}");
            return None;
        }
    };
    match receive(&stream) {
        Ok((manifest, fds)) => {
            let mut fds = fds.into_iter();
            // Each present address has its descriptor, in manifest order; keep those this
            // config listens on too.
            let [listen, tls, admin] = manifest.addresses().map(|theirs| theirs.map(|addr| (addr, fds.next().map(std::net::TcpListener::from))));
            let keep = |theirs: Option<(SocketAddr, Option<std::net::TcpListener>)>, ours: Option<SocketAddr>| match theirs {
                Some((addr, Some(l))) if Some(addr) == ours => Some(l),
                _ => None,
            };
            let sockets = Sockets { listen: keep(listen, wanted.listen), tls: keep(tls, wanted.tls), admin: keep(admin, wanted.admin) };
            let client_wanted = wanted.listen.is_some() as usize + wanted.tls.is_some() as usize;
            let client_taken = sockets.listen.is_some() as usize + sockets.tls.is_some() as usize;
            if client_taken < client_wanted {
                tracing::warn!(theirs = ?manifest.addresses(), "the gateway at the handover socket listens elsewhere; binding our own");
                return None;
            }
            for l in [&sockets.listen, &sockets.tls, &sockets.admin].into_iter().flatten() {
                if let Err(e) = l.set_nonblocking(true) {
                    tracing::warn!("cannot use a handed-over socket: {e}");
                    return None;
                }
            }
            tracing::info!(listen = ?manifest.listen, tls = ?manifest.tls, admin = ?manifest.admin, "took over the listening sockets");
            Some(Taken { sockets, predecessor: Predecessor { stream } })
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "handover failed, binding our own sockets: {e}");
            None
        }
    }
}

fn receive(stream: &UnixStream) -> std::io::Result<(Manifest, Vec<OwnedFd>)> {
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let mut bytes = [0u8; 1024];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(stream, &mut [IoSliceMut::new(&mut bytes)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    let manifest: Manifest = serde_json::from_slice(&bytes[..received.bytes])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad handover manifest: {e}")))?;
    let want = manifest.addresses().iter().flatten().count();
    if fds.len() != want {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} descriptors, {want} announced", fds.len())));
    }
    Ok((manifest, fds))
}

/// The handover socket this process serves.
pub struct Serving {
    path: PathBuf,
    /// (device, inode) of the socket file we made: removed on retiring only if it is still
    /// ours (a successor replaces it with its own).
    file: (u64, u64),
}

impl Serving {
    /// Binds `path` (replacing a predecessor's or a stale socket file), private to this user.
    pub fn bind(path: &Path) -> anyhow::Result<(Serving, UnixListener)> {
        // A retiring process that saw this path as its own may still remove it just after
        // we bound it (its check and its removal are two steps): bind again then.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => anyhow::bail!("cannot replace the handover socket {}: {e}", path.display()),
            }
            let listener =
                UnixListener::bind(path).map_err(|e| anyhow::anyhow!("cannot bind the handover socket {}: {e}", path.display()))?;
            let made = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).and_then(|()| std::fs::metadata(path));
            match made {
                Ok(meta) => return Ok((Serving { path: path.to_path_buf(), file: (meta.dev(), meta.ino()) }, listener)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => continue,
                Err(e) => anyhow::bail!("cannot set up the handover socket {}: {e}", path.display()),
            }
        }
    }

    pub fn remove(self) {
        let ours = std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Answers successors until this process stops accepting.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("handover accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shared.upgrade.accepting.cancelled() => break,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let offered = shared.upgrade.offered.lock().unwrap().as_ref().map(Offered::try_clone);
            let offered = match offered {
                Some(Ok(o)) => o,
                Some(Err(e)) => return tracing::warn!("cannot copy the listening sockets for a successor: {e}"),
                None => return,
            };
            let stream = match stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) {
                Ok(s) => s,
                Err(e) => return tracing::warn!("handover: {e}"),
            };
            match tokio::task::spawn_blocking(move || offer(stream, offered)).await {
                Ok(Ok(())) => {
                    shared.upgrade.handed_over.store(true, std::sync::atomic::Ordering::SeqCst);
                    let drain = Duration::from_secs(shared.config.load().gateway.shutdown_drain_secs);
                    super::retire::start(&shared, drain, "handover");
                }
                Ok(Err(e)) => tracing::warn!("handover did not complete; still serving: {e}"),
                Err(e) => tracing::error!("handover task failed: {e}"),
            }
        });
    }
}

/// Sends the sockets and waits for `ready`.
fn offer(stream: UnixStream, offered: Offered) -> std::io::Result<()> {
    let peer = rustix::net::sockopt::socket_peercred(&stream)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if peer.uid.as_raw() != me {
        return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("peer runs as uid {}", peer.uid.as_raw())));
    }
    let manifest = serde_json::to_vec(&offered.manifest).expect("serializable");
    let fds: Vec<_> = offered.fds.iter().map(|fd| fd.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(&stream, &[IoSlice::new(&manifest)], &mut control, SendFlags::empty())?;
    tracing::info!(pid = peer.pid.as_raw_nonzero().get(), "handed the listening sockets to a successor; waiting for it to accept");
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.trim_end() != "ready" {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the successor left without saying ready"));
    }
    Ok(())
}
