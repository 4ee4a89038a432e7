//! `wasmgate-bench soak`: does the gateway end where it started after a long run of mixed
//! work? Resident memory and open descriptors must end within 10% of where they started.
//!
//! One `wasmgate` process (jwt-auth + noop-messages on the route, least-conn balancer, TCP
//! health checks, admin API, `watch = false`) in front of three `echo-backend` processes,
//! and at once, at fixed rates (no closed loop, so a busy machine does not change the work):
//! - a pool of long-lived connections, each sending a message a second (16 B to 8 KiB, text
//!   and binary) and checking its echo, reconnecting when it loses its connection;
//! - connection churn: connections closed cleanly, dropped after a few echoes with a FIN or a
//!   reset, handshakes refused (no token, a forged token) and handshakes abandoned half-sent;
//! - every minute a reload (`POST /plugins/reload`) after changing jwt-auth's config, so every
//!   reload replaces that plugin's instances;
//! - every five minutes a backend killed with SIGKILL and restarted on its address 5 s later;
//!   the gateway closes the long-lived connections it carried (1011) and they reconnect.
//!
//! The gateway's RSS and descriptors are sampled every 10 s. Start is the median of the three
//! samples after a minute's warm-up, end the median of the last three; no reload, kill or
//! restart happens in either window or the 10 s before it, and the report says how many
//! long-lived connections were open in each.
//!
//! The admin token (`WASMGATE_ADMIN_TOKEN`, or one made for the run) goes into the config
//! as `admin_token` and with every admin request as a Bearer token.

mod clients;
mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use clients::{Churn, Counters, IO_LIMIT, SEND_EVERY};
use report::{clock, Report, Sample};

use crate::procs::{self, free_addr, Proc, TempDir};
use crate::proxies::{Binaries, Target};
use crate::wasmgate::{self, Extra, Plugin};
use crate::{jwt, machine};

/// The admin token, from the harness's environment; handed to the gateway in the same
/// variable, which its config names.
const ADMIN_TOKEN_ENV: &str = "WASMGATE_ADMIN_TOKEN";
const PLUGINS: [Plugin; 3] = [Plugin::JwtAuth, Plugin::NoopMessages, Plugin::LeastConn];
const BACKENDS: usize = 3;

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const WARMUP: Duration = Duration::from_secs(60);
/// Samples whose median is "start" (from the end of warm-up) and "end" (the last ones).
const WINDOW: usize = 3;
/// Reloads at 0:25 past every minute: clear of both windows and the sample period before
/// each, 0:50 to 1:20 after warm-up and the last 30 s of the run.
const RELOAD_FIRST: Duration = Duration::from_secs(25);
const RELOAD_EVERY: Duration = Duration::from_secs(60);
/// The first kill comes after the start window; none in the last minute.
const KILL_FIRST: Duration = Duration::from_secs(105);
const KILL_EVERY: Duration = Duration::from_secs(300);
const RESTART_AFTER: Duration = Duration::from_secs(5);
const QUIET_END: Duration = Duration::from_secs(60);
/// The gateway compiles its plugins at start (the run's cache is empty).
const STARTUP_LIMIT: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub struct Options {
    /// Length of the run in minutes, warm-up included (3 to 240).
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Long-lived connections, each sending one message a second.
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// New connections per second, all churn kinds together.
    #[arg(long, default_value_t = 40)]
    churn_rate: u32,
    /// Also write the report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    if !(3..=240).contains(&options.minutes) {
        bail!("--minutes must be between 3 and 240");
    }
    if !(1..=5_000).contains(&options.connections) {
        bail!("--connections must be between 1 and 5000");
    }
    if !(1..=1_000).contains(&options.churn_rate) {
        bail!("--churn-rate must be between 1 and 1000");
    }
    let length = Duration::from_secs(options.minutes * 60);
    let nofile = procs::raise_nofile_limit()?;
    let bins = Binaries::locate(&[Target::Wasmgate3])?;
    let dir = TempDir::new()?;
    // The admin API is locked without a token: make one when none is given.
    let admin_token = std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| Some(format!("soak-token-{:016x}", rand_token())));
    let header = header(&bins, &options, admin_token.is_some(), nofile);

    let mut backends = Backends::start(bins.echo_backend(), &dir.0)?;
    let mut gateway = Gateway::start(bins.wasmgate(), &dir.0, &backends.addrs, admin_token)?;
    eprintln!("soak: gateway on {}, admin on {}, {} minutes", gateway.listen, gateway.admin, options.minutes);
    sleep(Duration::from_secs(2)).await;
    let idle_before = gateway.sample(Duration::ZERO, &Counters::default(), 0, 0)?;

    let counters = Arc::new(Counters::default());
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let authorization = jwt::bearer();
    for id in 0..options.connections {
        // Spread the connects and the sends over the send period.
        let phase = SEND_EVERY.mul_f64(id as f64 / options.connections as f64);
        let (addr, authorization, counters, stopped) =
            (gateway.listen, authorization.clone(), counters.clone(), stopped.clone());
        tasks.spawn(clients::long_lived(id, phase, addr, authorization, counters, stopped));
    }
    tasks.spawn(clients::churn(gateway.listen, options.churn_rate, counters.clone(), stopped));

    let cpu_at_start = gateway.proc.cpu_secs()?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let (mut reloads, mut kills) = (0, 0);
    for (at, event) in schedule(length) {
        sleep_until(started + at).await;
        match event {
            Event::Sample => {
                let sample = gateway.sample(at, &counters, reloads, kills)?;
                eprintln!("{}", sample.row(""));
                samples.push(sample);
            }
            Event::Reload => match gateway.reload() {
                Ok(()) => reloads += 1,
                Err(e) => counters.error("reload", e),
            },
            Event::Kill(n) => {
                backends.kill(n);
                kills += 1;
            }
            Event::Restart(n) => {
                if let Err(e) = backends.restart(n) {
                    counters.error("restarting a backend", e);
                }
            }
        }
    }
    let cpu_secs = gateway.proc.cpu_secs()? - cpu_at_start;
    let metrics = gateway.metrics().unwrap_or_default();

    stop.send_replace(true);
    // Every client step is bounded by IO_LIMIT; this only guards against a bug here.
    if timeout(IO_LIMIT * 4, async { while tasks.join_next().await.is_some() {} }).await.is_err() {
        counters.error("stopping", anyhow!("clients still running {:?} after the end", IO_LIMIT * 4));
        tasks.abort_all();
    }
    // Let the gateway finish the close handshakes and the backends' side of them.
    sleep(Duration::from_secs(3)).await;
    let idle_after = gateway.sample(length, &counters, reloads, kills)?;

    let report = Report {
        header,
        samples,
        idle_before,
        idle_after,
        counters: &counters,
        connections: options.connections as u64,
        cpu_percent: cpu_secs / length.as_secs_f64() * 100.0,
        plugin_failures: metric(&metrics, "wasmgate_plugin_call_failures_total"),
        connect_failures: metric(&metrics, "wasmgate_upstream_connect_failures_total"),
        gateway_log: gateway.log_summary(),
    };
    let (text, passed) = report.render();
    println!("{text}");
    if let Some(out) = &options.out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    if !passed {
        bail!("soak failed: see the verdict above");
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Event {
    Sample,
    Reload,
    /// Kill backend N.
    Kill(usize),
    /// Start backend N again.
    Restart(usize),
}

/// Every event of a run of `length`, in time order, as offsets from the start of the load.
fn schedule(length: Duration) -> Vec<(Duration, Event)> {
    let mut events = Vec::new();
    let mut every = |first: Duration, period: Duration, last: Duration, event: &dyn Fn(usize) -> Event| {
        let mut at = first;
        let mut n = 0;
        while at <= last {
            events.push((at, event(n)));
            at += period;
            n += 1;
        }
    };
    every(Duration::ZERO, SAMPLE_EVERY, length, &|_| Event::Sample);
    every(RELOAD_FIRST, RELOAD_EVERY, length.saturating_sub(SAMPLE_EVERY), &|_| Event::Reload);
    let last_kill = length.saturating_sub(QUIET_END + RESTART_AFTER);
    every(KILL_FIRST, KILL_EVERY, last_kill, &|n| Event::Kill(n % BACKENDS));
    every(KILL_FIRST + RESTART_AFTER, KILL_EVERY, last_kill + RESTART_AFTER, &|n| Event::Restart(n % BACKENDS));
    events.sort();
    events
}

/// The three echo backends; a killed one is None until restarted.
struct Backends {
    exe: PathBuf,
    dir: PathBuf,
    procs: Vec<Option<Proc>>,
    addrs: Vec<SocketAddr>,
}

impl Backends {
    fn start(exe: &Path, dir: &Path) -> anyhow::Result<Backends> {
        let mut backends = Backends { exe: exe.into(), dir: dir.into(), procs: Vec::new(), addrs: Vec::new() };
        for n in 0..BACKENDS {
            let addr = free_addr()?;
            backends.addrs.push(addr);
            backends.procs.push(Some(backends.spawn(n, addr)?));
        }
        Ok(backends)
    }

    fn spawn(&self, n: usize, addr: SocketAddr) -> anyhow::Result<Proc> {
        let name = format!("backend{}", n + 1);
        let mut cmd = Command::new(&self.exe);
        cmd.args(["--listen", &addr.to_string(), "--name", &name]);
        let mut proc = Proc::spawn(&name, cmd, &self.dir)?;
        proc.wait_listening(addr, Duration::from_secs(15))?;
        Ok(proc)
    }

    fn kill(&mut self, n: usize) {
        if let Some(proc) = self.procs[n].take() {
            eprintln!("soak: SIGKILL backend{} ({})", n + 1, self.addrs[n]);
            proc.kill();
        }
    }

    /// On the same address, so the gateway's config still names it.
    fn restart(&mut self, n: usize) -> anyhow::Result<()> {
        if self.procs[n].is_none() {
            eprintln!("soak: restart backend{}", n + 1);
            self.procs[n] = Some(self.spawn(n, self.addrs[n])?);
        }
        Ok(())
    }
}

/// The gateway process and what it takes to reconfigure it.
struct Gateway {
    proc: Proc,
    config: ConfigFile,
    listen: SocketAddr,
    admin: SocketAddr,
    /// Sent with every admin request; the config names the environment variable.
    admin_token: Option<String>,
    log: PathBuf,
}

/// The gateway's config file, written again for every reload.
struct ConfigFile {
    path: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    servers: Vec<SocketAddr>,
    cache: PathBuf,
    admin_token: bool,
    /// Bumped by every reload; jwt-auth's `leeway_secs` is 60 plus this.
    revision: u64,
}

impl ConfigFile {
    fn write(&self) -> anyhow::Result<()> {
        let mut gateway = vec!["watch = false".to_string()];
        if self.admin_token {
            gateway.push(format!("admin_token = \"${{env:{ADMIN_TOKEN_ENV}}}\""));
        }
        let extra = Extra {
            gateway,
            upstream: vec!["health = { kind = \"tcp\", interval_ms = 1000 }".into()],
            jwt_leeway_secs: Some(60 + self.revision),
        };
        let text = wasmgate::config_with(self.listen, Some(self.admin), &self.servers, &PLUGINS, &self.cache, &extra);
        std::fs::write(&self.path, text).with_context(|| format!("writing {}", self.path.display()))
    }
}

impl Gateway {
    fn start(exe: &Path, dir: &Path, servers: &[SocketAddr], admin_token: Option<String>) -> anyhow::Result<Gateway> {
        if !exe.exists() {
            bail!("{} not found: build it with `cargo build --release -p wasmgate`", exe.display());
        }
        let (listen, admin) = (free_addr()?, free_addr()?);
        let config = ConfigFile {
            path: dir.join("wasmgate.toml"),
            listen,
            admin,
            servers: servers.to_vec(),
            cache: dir.join("plugin-cache"),
            admin_token: admin_token.is_some(),
            revision: 0,
        };
        config.write()?;
        let mut cmd = Command::new(exe);
        // Warnings only, as the benchmark columns run; NO_COLOR keeps escapes out of the log.
        cmd.arg("run").arg("--config").arg(&config.path).env("RUST_LOG", "warn").env("NO_COLOR", "1");
        if let Some(token) = &admin_token {
            cmd.env(ADMIN_TOKEN_ENV, token);
        }
        let mut proc = Proc::spawn("wasmgate", cmd, dir)?;
        proc.wait_listening(listen, STARTUP_LIMIT)?;
        proc.wait_listening(admin, STARTUP_LIMIT)?;
        Ok(Gateway { proc, config, listen, admin, admin_token, log: dir.join("wasmgate.log") })
    }

    /// Changes jwt-auth's config, reloads, and checks that jwt-auth was replaced.
    fn reload(&mut self) -> anyhow::Result<()> {
        self.config.revision += 1;
        self.config.write()?;
        let body = self.admin_request("POST", "/plugins/reload")?;
        let report: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("reload report is not JSON: {body}"))?;
        let plugins = report["plugins"].as_array().with_context(|| format!("no plugins in the reload report: {body}"))?;
        let status = |name: &str| plugins.iter().find(|p| p["name"] == name).and_then(|p| p["status"].as_str());
        if status(Plugin::JwtAuth.name()) != Some("loaded") {
            bail!("jwt-auth was not replaced by the reload: {body}");
        }
        if let Some(failed) = plugins.iter().find(|p| p["status"] == "failed") {
            bail!("a plugin failed to reload: {failed}");
        }
        Ok(())
    }

    fn metrics(&self) -> anyhow::Result<String> {
        self.admin_request("GET", "/metrics")
    }

    fn admin_request(&self, method: &str, path: &str) -> anyhow::Result<String> {
        wasmgate::admin_request(self.admin, method, path, self.admin_token.as_deref())
    }

    fn sample(&self, at: Duration, counters: &Counters, reloads: u64, kills: u64) -> anyhow::Result<Sample> {
        let rss_kib = self.proc.rss_kib().with_context(|| format!("the gateway is gone: {}", self.proc.log_tail()))?;
        let fds = self.proc.open_fds()?;
        let gateway_conns = self.metrics().ok().and_then(|m| metric(&m, "wasmgate_connections_active"));
        Ok(Sample {
            at,
            rss_kib,
            fds,
            gateway_conns,
            pool_open: counters.pool_open.load(Relaxed),
            churned: counters.churned_total(),
            echoes: counters.echoes.load(Relaxed),
            reloads,
            kills,
            errors: counters.errors.load(Relaxed),
        })
    }

    /// "no warnings" or "12 warnings, 0 errors; first: ...", from the gateway's log.
    fn log_summary(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
        let errors = log.lines().filter(|l| l.contains("ERROR")).count();
        match warnings.first() {
            None if errors == 0 => "no warnings or errors".into(),
            first => format!(
                "{} warnings, {errors} errors{}",
                warnings.len(),
                first.map(|l| format!("; first warning: {}", l.trim())).unwrap_or_default()
            ),
        }
    }
}

/// A Prometheus series without labels.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

fn header(bins: &Binaries, options: &Options, admin_token: bool, nofile: u64) -> String {
    let kills = schedule(Duration::from_secs(options.minutes * 60))
        .iter()
        .filter(|(_, e)| matches!(e, Event::Kill(_)))
        .count();
    format!(
        "## wasmgate soak, {} minutes\n\n{}\n\n\
         {} ({}), admin API{}, `watch = false`, TCP health checks every second, in front of {BACKENDS} \
         echo-backend processes. Work, at fixed rates: {} long-lived connections, each sending a message \
         a second (16 B to 8 KiB, text and binary) and checking its echo, reconnecting when closed; \
         {} new connections a second ({}); a reload every minute (0:25 past) with a new \
         jwt-auth `leeway_secs`, so every reload replaces jwt-auth; a backend killed with SIGKILL at {} and \
         every {} minutes after, none in the last minute ({kills} in all), restarted {} s later. RSS \
         and descriptors (/proc/PID/status VmRSS, /proc/PID/fd) of the gateway process every {} s. \
         Open-file limit {nofile}.\n",
        options.minutes,
        machine::describe(),
        bins.wasmgate_version(),
        wasmgate::describe(&PLUGINS),
        if admin_token { " with a Bearer token" } else { "" },
        options.connections,
        options.churn_rate,
        Churn::describe_mix(),
        clock(KILL_FIRST),
        KILL_EVERY.as_secs() / 60,
        RESTART_AFTER.as_secs(),
        SAMPLE_EVERY.as_secs(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Neither window, nor the sample period before it, contains a reload, kill or restart,
    /// and every run has reloads and at least one kill.
    #[test]
    fn windows_are_quiet() {
        for minutes in 3..=240 {
            let length = Duration::from_secs(minutes * 60);
            let events = schedule(length);
            let samples: Vec<Duration> =
                events.iter().filter(|(_, e)| *e == Event::Sample).map(|(at, _)| *at).collect();
            assert_eq!(samples.len() as u64, minutes * 6 + 1);
            let first = samples.iter().position(|at| *at == WARMUP).unwrap();
            let windows = [
                (samples[first] - SAMPLE_EVERY, samples[first + WINDOW - 1]),
                (samples[samples.len() - WINDOW] - SAMPLE_EVERY, *samples.last().unwrap()),
            ];
            assert!(windows[0].1 < windows[1].0, "{minutes} min: windows overlap");
            for (at, event) in &events {
                if *event != Event::Sample {
                    assert!(
                        windows.iter().all(|(from, to)| at < from || at > to),
                        "{minutes} min: {event:?} at {at:?} falls in a window"
                    );
                }
            }
            let count = |f: fn(&Event) -> bool| events.iter().filter(|(_, e)| f(e)).count() as u64;
            assert_eq!(count(|e| *e == Event::Reload), minutes);
            assert!(count(|e| matches!(e, Event::Kill(_))) >= 1);
            assert_eq!(count(|e| matches!(e, Event::Kill(_))), count(|e| matches!(e, Event::Restart(_))));
        }
        let kills = schedule(Duration::from_secs(1800)).iter().filter(|(_, e)| matches!(e, Event::Kill(_))).count();
        assert_eq!(kills, 6);
    }
}

/// 64 bits for a per-run admin token: the clock and the process id are enough for a
/// token that lives on loopback for one run.
fn rand_token() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ ((std::process::id() as u64) << 32)
}
