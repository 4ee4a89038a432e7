//! Child processes (backends and proxies): start them, wait until they listen, measure their
//! memory and CPU time, and make sure none outlives the benchmark.
//!
//! Every child is the leader of its own process group, so nginx's workers are measured and
//! killed together with their master, and a Ctrl-C at the terminal reaches only the harness,
//! which then stops the children itself.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A running child process group; dropping it stops the whole group.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `log_dir/NAME.log`.
    ///
    /// Must be called from a thread that lives as long as the child (the harness's main
    /// thread): the parent-death signal set below fires when the spawning *thread* exits.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc { name: name.to_string(), child, log })
    }

    /// As `spawn`, with the child's stdin and stdout piped to the caller (stderr to the log).
    pub fn spawn_piped(
        name: &str,
        mut cmd: Command,
        log_dir: &Path,
    ) -> anyhow::Result<(Proc, std::process::ChildStdin, std::process::ChildStdout)> {
        let log = log_dir.join(format!("{name}.log"));
        let err = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(err).process_group(0);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        let stdin = child.stdin.take().context("piped stdin")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        Ok((Proc { name: name.to_string(), child, log }, stdin, stdout))
    }

    /// Waits until `addr` accepts TCP connections, failing early if the process exits.
    pub fn wait_listening(&mut self, addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) before listening: {}", self.name, self.log_tail());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} not listening on {addr} after {limit:?}: {}", self.name, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the whole process group in KiB (nginx: master plus workers).
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        self.for_each_member(|dir, _| {
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        })?;
        if total == 0 {
            bail!("{} has no resident processes", self.name);
        }
        Ok(total)
    }

    /// User plus system CPU time the process group has used so far, in seconds.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        // Safety: sysconf has no preconditions.
        let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let mut ticks = 0;
        self.for_each_member(|_, fields| {
            // utime and stime are fields 14 and 15; `fields` starts at field 3.
            ticks += fields[11..13].iter().filter_map(|f| f.parse::<u64>().ok()).sum::<u64>();
        })?;
        Ok(ticks as f64 / ticks_per_sec)
    }

    /// Calls `f` with the /proc directory and the stat fields (from the third on) of every
    /// process in this child's process group.
    fn for_each_member(&self, mut f: impl FnMut(&Path, &[&str])) -> anyhow::Result<()> {
        let pgid = self.child.id().to_string();
        for entry in std::fs::read_dir("/proc")? {
            let dir = entry?.path();
            // Processes can vanish between listing and reading; skip those.
            let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else { continue };
            // The command name before the fields may contain spaces and parentheses.
            let Some(close) = stat.rfind(')') else { continue };
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            if fields.len() > 12 && fields[2] == pgid {
                f(&dir, &fields);
            }
        }
        Ok(())
    }

    /// Descriptors the group leader has open (entries of /proc/PID/fd).
    pub fn open_fds(&self) -> anyhow::Result<usize> {
        let dir = format!("/proc/{}/fd", self.child.id());
        Ok(std::fs::read_dir(&dir).with_context(|| format!("{} is gone: reading {dir}", self.name))?.count())
    }

    /// Stops the whole group with SIGKILL, as a crash would: no close frames, no FIN from
    /// the application, the kernel resets its connections.
    pub fn kill(mut self) {
        // Safety: a plain syscall; the group leader is not reaped yet, so the id is still ours.
        unsafe { libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL) };
        // Reaped as soon as it is gone (Drop would poll for it every 10 ms): once this
        // returns, its sockets are closed.
        let _ = self.child.wait();
    }

    /// The last lines of the process's output, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(4).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

/// If the harness is killed outright, the child gets SIGTERM (nginx's master then stops its
/// workers).
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // Safety: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SIGTERM first so nginx and HAProxy clean up their workers; SIGKILL what is left.
        unsafe { libc::killpg(pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A free loopback port, found by binding port 0; the small race with other programs on the
/// machine is preferable to fixed ports that other engineers' tests also use.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A directory for generated configs and logs, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> anyhow::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("wasmgate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Raises this process's open-file soft limit to the hard limit; children inherit it, and the
/// idle-connection scenario holds one socket per connection here and two in each proxy.
pub fn raise_nofile_limit() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // Safety: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}
