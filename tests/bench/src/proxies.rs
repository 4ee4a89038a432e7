//! The paths under test: two echo backends, and in front of them nothing (direct), wasmgate
//! (without plugins, or with one of the plugin sets in `Target::wasmgate_plugins`), nginx or
//! HAProxy, each configured over both backends with generated config files. The `-tls`
//! columns are wasmgate, nginx and HAProxy terminating `wss://` with the run's certificate
//! (see `tls`), plain `ws://` to the backends.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::load::Probe;
use crate::procs::{free_addr, Proc};
use crate::tls::TlsFiles;
use crate::wasmgate::{self, Plugin};

pub const NGINX: &str = "/usr/sbin/nginx";
const HAPROXY: &str = "/usr/sbin/haproxy";
const STARTUP_LIMIT: Duration = Duration::from_secs(15);

/// Declaration order is column order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Target {
    Direct,
    /// No plugins, round robin in the gateway.
    Wasmgate,
    /// No plugins, with an access log line per connection written to a file.
    #[value(name = "wasmgate-log")]
    WasmgateLog,
    /// A per-message hook on every message.
    #[value(name = "wasmgate-hook")]
    WasmgateHook,
    /// A handshake plugin (JWT) and a balancer plugin.
    #[value(name = "wasmgate-auth")]
    WasmgateAuth,
    /// As wasmgate-auth with the gateway's verdict cache off (`verdict_cache_size = 0`):
    /// jwt-auth is called for every handshake, as before contract 0.6.1.
    #[value(name = "wasmgate-auth-call")]
    WasmgateAuthCall,
    /// jwt-auth alone on the route, round robin: with wasmgate-lc, splits wasmgate-auth's cost.
    #[value(name = "wasmgate-jwt")]
    WasmgateJwt,
    /// header-stamp alone on the route (adds one header): the least a handshake plugin costs.
    #[value(name = "wasmgate-stamp")]
    WasmgateStamp,
    /// least-conn alone as the balancer, no route plugin.
    #[value(name = "wasmgate-lc")]
    WasmgateLc,
    /// All three: JWT, per-message hook, balancer.
    #[value(name = "wasmgate-3")]
    Wasmgate3,
    /// As wasmgate-auth with RS256 tokens; verified tokens cached (jwt-auth's default).
    #[value(name = "wasmgate-rs256")]
    WasmgateRs256,
    /// RS256 with jwt-auth's verified-token cache off: a signature check per handshake.
    #[value(name = "wasmgate-rs256-nocache")]
    WasmgateRs256Nocache,
    /// No plugins, sockets over max_handshakes refused at once (max_handshakes_wait_ms = 0,
    /// the behaviour before #18).
    #[value(name = "wasmgate-refuse")]
    WasmgateRefuse,
    /// No plugins, `workers = 2`: a single-threaded runtime per core, each with its own
    /// listener (gateway/src/workers.rs).
    #[value(name = "wasmgate-workers")]
    WasmgateWorkers,
    /// jwt-auth and least-conn with `workers = 2`.
    #[value(name = "wasmgate-auth-workers")]
    WasmgateAuthWorkers,
    /// No plugins, an upstream connect timeout of 60 s (nginx's `proxy_connect_timeout`)
    /// instead of 3 s: in a 20,000-client storm the backends are slow to accept.
    #[value(name = "wasmgate-patient")]
    WasmgatePatient,
    /// No plugins, `on_client_loss = "disconnect"`: a vanished client's upstream gets its TCP
    /// connection closed instead of a close frame (what nginx and HAProxy do).
    #[value(name = "wasmgate-disconnect")]
    WasmgateDisconnect,
    /// jwt-auth and least-conn with `on_client_loss = "disconnect"`.
    #[value(name = "wasmgate-auth-disconnect")]
    WasmgateAuthDisconnect,
    Nginx,
    Haproxy,
    /// HAProxy relaying bytes (`mode tcp`): no HTTP, no WebSocket, not even the handshake
    /// looked at. The least any proxy can cost on this machine, for scale.
    #[value(name = "haproxy-tcp")]
    HaproxyTcp,
    /// The same byte relay on tokio, run as the gateway runs its runtime (`tcp_relay`):
    /// what any tokio proxy pays, for scale.
    #[value(name = "tokio-tcp")]
    TokioTcp,
    /// wasmgate without plugins, clients over `wss://` (`[gateway.tls]`).
    #[value(name = "wasmgate-tls")]
    WasmgateTls,
    /// jwt-auth and least-conn, clients over `wss://`.
    #[value(name = "wasmgate-auth-tls")]
    WasmgateAuthTls,
    /// nginx terminating `wss://`.
    #[value(name = "nginx-tls")]
    NginxTls,
    /// HAProxy terminating `wss://`.
    #[value(name = "haproxy-tls")]
    HaproxyTls,
}

impl Target {
    /// The plugins a wasmgate column loads; None for the other paths.
    pub fn wasmgate_plugins(self) -> Option<&'static [Plugin]> {
        match self {
            Target::Wasmgate | Target::WasmgateLog | Target::WasmgateRefuse | Target::WasmgateWorkers | Target::WasmgatePatient | Target::WasmgateDisconnect | Target::WasmgateTls => Some(&[]),
            Target::WasmgateHook => Some(&[Plugin::NoopMessages]),
            Target::WasmgateAuth | Target::WasmgateAuthWorkers | Target::WasmgateAuthDisconnect | Target::WasmgateAuthTls => {
                Some(&[Plugin::JwtAuth, Plugin::LeastConn])
            }
            Target::WasmgateAuthCall => Some(&[Plugin::JwtAuthCalled, Plugin::LeastConn]),
            Target::WasmgateJwt => Some(&[Plugin::JwtAuth]),
            Target::WasmgateLc => Some(&[Plugin::LeastConn]),
            Target::WasmgateStamp => Some(&[Plugin::HeaderStamp]),
            Target::Wasmgate3 => Some(&[Plugin::JwtAuth, Plugin::NoopMessages, Plugin::LeastConn]),
            Target::WasmgateRs256 => Some(&[Plugin::JwtAuthRs256, Plugin::LeastConn]),
            Target::WasmgateRs256Nocache => Some(&[Plugin::JwtAuthRs256Uncached, Plugin::LeastConn]),
            Target::Direct
            | Target::Nginx
            | Target::Haproxy
            | Target::HaproxyTcp
            | Target::TokioTcp
            | Target::NginxTls
            | Target::HaproxyTls => None,
        }
    }

    /// Clients speak `wss://` to it.
    pub fn is_tls(self) -> bool {
        matches!(self, Target::WasmgateTls | Target::WasmgateAuthTls | Target::NginxTls | Target::HaproxyTls)
    }

    /// The column its ratios are taken against: nginx, over the same protocol.
    pub fn baseline(self) -> Target {
        if self.is_tls() {
            Target::NginxTls
        } else {
            Target::Nginx
        }
    }
}

impl Target {
    /// The token every handshake to this target carries: RS256 for the RS256 columns, HS256
    /// for the rest (checked by jwt-auth where it runs, passed on and ignored elsewhere).
    pub fn token_alg(self) -> crate::jwt::Alg {
        self.wasmgate_plugins()
            .and_then(|plugins| plugins.iter().map(|p| p.token_alg()).find(|a| *a != crate::jwt::Alg::Hs256))
            .unwrap_or(crate::jwt::Alg::Hs256)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Direct => "direct",
            Target::Wasmgate => "wasmgate",
            Target::WasmgateLog => "wasmgate-log",
            Target::WasmgateHook => "wasmgate-hook",
            Target::WasmgateAuth => "wasmgate-auth",
            Target::WasmgateAuthCall => "wasmgate-auth-call",
            Target::WasmgateJwt => "wasmgate-jwt",
            Target::WasmgateLc => "wasmgate-lc",
            Target::WasmgateStamp => "wasmgate-stamp",
            Target::Wasmgate3 => "wasmgate-3",
            Target::WasmgateRs256 => "wasmgate-rs256",
            Target::WasmgateRs256Nocache => "wasmgate-rs256-nocache",
            Target::WasmgateRefuse => "wasmgate-refuse",
            Target::WasmgateWorkers => "wasmgate-workers",
            Target::WasmgateAuthWorkers => "wasmgate-auth-workers",
            Target::WasmgatePatient => "wasmgate-patient",
            Target::WasmgateDisconnect => "wasmgate-disconnect",
            Target::WasmgateAuthDisconnect => "wasmgate-auth-disconnect",
            Target::Nginx => "nginx",
            Target::Haproxy => "haproxy",
            Target::HaproxyTcp => "haproxy-tcp",
            Target::TokioTcp => "tokio-tcp",
            Target::WasmgateTls => "wasmgate-tls",
            Target::WasmgateAuthTls => "wasmgate-auth-tls",
            Target::NginxTls => "nginx-tls",
            Target::HaproxyTls => "haproxy-tls",
        })
    }
}

/// Names the gateway binary to measure instead of the one next to this executable: for
/// example the `dist` build (`cargo build --profile dist -p wasmgate`, target/dist/wasmgate).
pub const GATEWAY_ENV: &str = "WASMGATE_BENCH_GATEWAY";

/// Where the workspace's binaries are: next to this one (target/release), the gateway
/// wherever [`GATEWAY_ENV`] says if set.
pub struct Binaries {
    echo_backend: PathBuf,
    wasmgate: PathBuf,
}

impl Binaries {
    /// Also checks that the plugin components the wasmgate columns of `targets` load exist.
    pub fn locate(targets: &[Target]) -> anyhow::Result<Binaries> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("executable has no directory")?;
        let (wasmgate, how) = match std::env::var_os(GATEWAY_ENV) {
            Some(path) => (PathBuf::from(path), format!("{GATEWAY_ENV} names it")),
            None => (dir.join("wasmgate"), "build it with `cargo build --release -p wasmgate`".to_string()),
        };
        if !wasmgate.exists() {
            bail!("{} not found: {how}", wasmgate.display());
        }
        let bins = Binaries { echo_backend: dir.join("echo-backend"), wasmgate };
        if !bins.echo_backend.exists() {
            bail!(
                "{} not found: build it with `cargo build --release -p wasmgate-examples`",
                bins.echo_backend.display()
            );
        }
        let plugins: Vec<Plugin> = targets.iter().filter_map(|t| t.wasmgate_plugins()).flatten().copied().collect();
        wasmgate::check_components(&plugins)?;
        Ok(bins)
    }

    pub fn wasmgate(&self) -> &Path {
        &self.wasmgate
    }

    pub fn echo_backend(&self) -> &Path {
        &self.echo_backend
    }

    /// `wasmgate --version`.
    pub fn wasmgate_version(&self) -> String {
        first_line(Command::new(&self.wasmgate).arg("--version"))
    }

    /// The version of each selected proxy and how it is set up, for the table header; the
    /// wasmgate columns share one entry that says what each of them runs.
    pub fn versions(&self, targets: &[Target]) -> Vec<String> {
        let mut versions = Vec::new();
        let columns: Vec<String> = targets
            .iter()
            .filter_map(|t| t.wasmgate_plugins().map(|plugins| format!("{t} ({})", wasmgate::describe(plugins))))
            .collect();
        if !columns.is_empty() {
            let version = first_line(Command::new(&self.wasmgate).arg("--version"));
            versions.push(format!("{version} ({}) as {}", self.wasmgate.display(), columns.join(", ")));
        }
        if targets.contains(&Target::Nginx) || targets.contains(&Target::NginxTls) {
            versions.push(format!("{} (2 workers)", first_line(Command::new(NGINX).arg("-v"))));
        }
        if targets.iter().any(|t| matches!(t, Target::Haproxy | Target::HaproxyTcp | Target::HaproxyTls)) {
            let tcp = if targets.contains(&Target::HaproxyTcp) { "; haproxy-tcp: the same in mode tcp" } else { "" };
            versions.push(format!("{} (nbthread 2{tcp})", first_line(Command::new(HAPROXY).arg("-v"))));
        }
        if targets.contains(&Target::TokioTcp) {
            versions.push("tokio-tcp: wasmgate-bench tcp-relay (tokio copy_bidirectional, the gateway's runtime settings)".into());
        }
        versions
    }
}

/// The first line a command prints on stdout or stderr (nginx -v uses stderr).
fn first_line(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(out) => {
            let text = [out.stdout, out.stderr].concat();
            // The first words are name and version; HAProxy adds a date and a URL.
            let line = String::from_utf8_lossy(&text).lines().next().unwrap_or("?").to_string();
            line.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        }
        Err(e) => format!("{}: {e}", cmd.get_program().to_string_lossy()),
    }
}

/// Installs nginx and HAProxy from Debian's packages when a selected one is missing.
pub fn ensure_installed(targets: &[Target]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = [
        (Target::Nginx, NGINX, "nginx-light"),
        (Target::Haproxy, HAPROXY, "haproxy"),
        (Target::HaproxyTcp, HAPROXY, "haproxy"),
        (Target::NginxTls, NGINX, "nginx-light"),
        (Target::HaproxyTls, HAPROXY, "haproxy"),
    ]
    .into_iter()
    .filter(|(t, bin, _)| targets.contains(t) && !Path::new(bin).exists())
    .map(|(_, _, package)| package)
    .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status()?;
        if !status.success() {
            bail!("apt-get {} failed: {status}", args.join(" "));
        }
        Ok(())
    };
    run(&["update"])?;
    run(&[&["install", "-y"], missing.as_slice()].concat())
}

/// Two backends and, unless direct, the proxy in front of them (one process group, or for
/// the storm scenario several, each on its own address).
pub struct Running {
    // Declared first so it is dropped (stopped) before the backends it talks to.
    proxy: Vec<Proc>,
    backends: Vec<Proc>,
    /// What the load generator connects to, round robin: the proxy, or both backends.
    pub entry: Vec<SocketAddr>,
    /// wasmgate's admin address, when it loads plugins.
    admin: Option<SocketAddr>,
}

impl Running {
    /// Starts fresh backends and the target's proxy, with configs and logs in `dir`.
    pub fn start(target: Target, bins: &Binaries, dir: &Path) -> anyhow::Result<Running> {
        Running::start_instances(target, bins, dir, 1)
    }

    /// As `start`, with `instances` proxy processes, each on its own address (`entry` lists
    /// them): one process may hold only ~9,900 proxied connections under the machine's
    /// open-file limit. With more than one, nginx runs one worker per instance.
    pub fn start_instances(target: Target, bins: &Binaries, dir: &Path, instances: usize) -> anyhow::Result<Running> {
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for name in ["backend1", "backend2"] {
            let addr = free_addr()?;
            let mut cmd = Command::new(&bins.echo_backend);
            cmd.args(["--listen", &addr.to_string(), "--name", name]);
            let mut proc = Proc::spawn(name, cmd, dir)?;
            proc.wait_listening(addr, STARTUP_LIMIT)?;
            backends.push(proc);
            servers.push(addr);
        }
        if target == Target::Direct {
            return Ok(Running { proxy: Vec::new(), backends, entry: servers, admin: None });
        }
        let mut running = Running { proxy: Vec::new(), backends, entry: Vec::new(), admin: None };
        for instance in 0..instances {
            let instance_dir = if instances == 1 { dir.to_path_buf() } else { dir.join(format!("instance-{instance}")) };
            std::fs::create_dir_all(&instance_dir)?;
            if target.is_tls() && instances > 1 {
                // Every instance serves the run's one certificate.
                let (from, to) = (TlsFiles::in_dir(dir), TlsFiles::in_dir(&instance_dir));
                for (from, to) in [(from.cert, to.cert), (from.key, to.key), (from.combined, to.combined)] {
                    std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
                }
            }
            let dir = instance_dir;
            let (proxy, listen, admin) = start_proxy(target, bins, &dir, &servers, instances)?;
            running.proxy.push(proxy);
            running.entry.push(listen);
            running.admin = running.admin.or(admin);
        }
        Ok(running)
    }

    /// For a wasmgate column with plugins, the plugin calls that have failed so far (timed
    /// out, trapped, broke the contract), if any. A failed message hook is skipped, not
    /// refused, so this is the only sign of it. None for the other columns.
    pub fn failed_plugin_calls(&self) -> Option<anyhow::Result<Option<String>>> {
        self.admin.map(wasmgate::failed_plugin_calls)
    }
}

/// One proxy process group in front of `servers`: the process, its address and its admin
/// address (wasmgate with plugins only).
fn start_proxy(
    target: Target,
    bins: &Binaries,
    dir: &Path,
    servers: &[SocketAddr],
    instances: usize,
) -> anyhow::Result<(Proc, SocketAddr, Option<SocketAddr>)> {
    let listen = free_addr()?;
    let mut admin = None;
    let cmd = match target {
        Target::Direct => unreachable!("handled above"),
        Target::Wasmgate
        | Target::WasmgateLog
        | Target::WasmgateHook
        | Target::WasmgateAuth
        | Target::WasmgateAuthCall
        | Target::WasmgateJwt
        | Target::WasmgateLc
        | Target::WasmgateStamp
        | Target::Wasmgate3
        | Target::WasmgateRs256
        | Target::WasmgateRs256Nocache
        | Target::WasmgateRefuse
        | Target::WasmgateWorkers
        | Target::WasmgateAuthWorkers
        | Target::WasmgatePatient
        | Target::WasmgateDisconnect
        | Target::WasmgateAuthDisconnect
        | Target::WasmgateTls
        | Target::WasmgateAuthTls => {
            if !bins.wasmgate.exists() {
                bail!("{} not found: build it with `cargo build --release -p wasmgate`", bins.wasmgate.display());
            }
            let plugins = target.wasmgate_plugins().expect("a wasmgate target");
            // Only columns with plugins get an admin listener (for their failure count), so
            // the plain column runs as it always did.
            admin = if plugins.is_empty() { None } else { Some(free_addr()?) };
            let mut extra = wasmgate::Extra::default();
            if target == Target::WasmgateLog {
                extra.gateway.push(format!("access_log = \"{}\"", dir.join("access.log").display()));
            }
            if target == Target::WasmgateRefuse {
                extra.gateway.push("max_handshakes_wait_ms = 0".into());
            }
            if matches!(target, Target::WasmgateWorkers | Target::WasmgateAuthWorkers) {
                extra.gateway.push("workers = 2".into());
            }
            if target == Target::WasmgatePatient {
                extra.upstream.push("connect_timeout_ms = 60000".into());
            }
            if matches!(target, Target::WasmgateDisconnect | Target::WasmgateAuthDisconnect) {
                extra.gateway.push("on_client_loss = \"disconnect\"".into());
            }
            let cache = dir.join("plugin-cache");
            let text = if target.is_tls() {
                // The client port is the TLS listener's; the plain one idles on its own.
                let files = TlsFiles::in_dir(dir);
                extra.gateway.push(format!(
                    "\n[gateway.tls]\nlisten = \"{listen}\"\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]",
                    files.cert.display(),
                    files.key.display()
                ));
                wasmgate::config_with(free_addr()?, admin, servers, plugins, &cache, &extra)
            } else {
                wasmgate::config_with(listen, admin, servers, plugins, &cache, &extra)
            };
            let config = write(dir, "wasmgate.toml", &text)?;
            let mut cmd = Command::new(&bins.wasmgate);
            // Per-connection info logs would be extra work the other proxies (access_log
            // off) do not do. NO_COLOR keeps escape codes out of the error messages.
            cmd.arg("run").arg("--config").arg(config).env("RUST_LOG", "warn").env("NO_COLOR", "1");
            cmd
        }
        Target::Nginx | Target::NginxTls => {
            let workers = if instances == 1 { 2 } else { 1 };
            let tls = target.is_tls().then(|| TlsFiles::in_dir(dir));
            let config = write(dir, "nginx.conf", &nginx_config(listen, servers, dir, workers, tls.as_ref()))?;
            let mut cmd = Command::new(NGINX);
            // -e: the startup error log, before the config's error_log applies.
            cmd.arg("-p").arg(dir).arg("-e").arg(dir.join("nginx-error.log")).arg("-c").arg(config);
            cmd
        }
        Target::Haproxy | Target::HaproxyTcp | Target::HaproxyTls => {
            let mode = if target == Target::HaproxyTcp { "tcp" } else { "http" };
            let tls = target.is_tls().then(|| TlsFiles::in_dir(dir));
            let config = write(dir, "haproxy.cfg", &haproxy_config(listen, servers, mode, tls.as_ref()))?;
            let mut cmd = Command::new(HAPROXY);
            cmd.arg("-db").arg("-f").arg(config);
            cmd
        }
        Target::TokioTcp => {
            let upstreams: Vec<String> = servers.iter().map(SocketAddr::to_string).collect();
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg("tcp-relay").arg("--listen").arg(listen.to_string()).arg("--upstream").arg(upstreams.join(","));
            cmd
        }
    };
    let mut proxy = Proc::spawn(&target.to_string(), cmd, dir)?;
    proxy.wait_listening(listen, STARTUP_LIMIT)?;
    Ok((proxy, listen, admin))
}

/// The proxy, or for the direct path the two backends together.
impl Probe for Running {
    fn rss_kib(&self) -> anyhow::Result<u64> {
        match self.proxy.is_empty() {
            false => self.proxy.iter().map(Proc::rss_kib).sum(),
            true => self.backends.iter().map(Proc::rss_kib).sum(),
        }
    }

    fn cpu_secs(&self) -> anyhow::Result<f64> {
        match self.proxy.is_empty() {
            false => self.proxy.iter().map(Proc::cpu_secs).sum(),
            true => self.backends.iter().map(Proc::cpu_secs).sum(),
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Two workers (one per core; one per instance when several run); each may end up holding
/// all 9,000 idle connections of the RSS scenario, two sockets each, within the machine's
/// hard limit of 20,000 open files. With `tls`, the listener is `ssl` with the run's
/// certificate (nginx's defaults otherwise: TLS 1.2 and 1.3, no session cache).
pub fn nginx_config(listen: SocketAddr, servers: &[SocketAddr], dir: &Path, workers: usize, tls: Option<&TlsFiles>) -> String {
    let (ssl, certificate) = match tls {
        Some(files) => (
            " ssl",
            format!(
                "        ssl_certificate {};\n        ssl_certificate_key {};\n",
                files.cert.display(),
                files.key.display()
            ),
        ),
        None => ("", String::new()),
    };
    let dir = dir.display();
    let servers: String = servers.iter().map(|s| format!("        server {s};\n")).collect();
    format!(
        r#"daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;

events {{
    worker_connections 19500;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;

    upstream echo {{
{servers}    }}

    server {{
        listen {listen}{ssl} backlog=4096;
{certificate}        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_connect_timeout 5s;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"#
    )
}

/// HAProxy sizes its file limit from maxconn (two sockets per proxied connection plus a
/// margin), so maxconn stays under half the hard limit of 20,000. With `tls`, the frontend
/// binds `ssl` with the run's certificate and key in one file.
fn haproxy_config(listen: SocketAddr, servers: &[SocketAddr], mode: &str, tls: Option<&TlsFiles>) -> String {
    let ssl = tls.map(|files| format!(" ssl crt {}", files.combined.display())).unwrap_or_default();
    let servers: String = servers.iter().enumerate().map(|(i, s)| format!("    server s{} {s}\n", i + 1)).collect();
    format!(
        r#"global
    nbthread 2
    maxconn 9800

defaults
    mode {mode}
    maxconn 9800
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h

frontend ws
    bind {listen}{ssl}
    default_backend echo

backend echo
    balance roundrobin
{servers}"#
    )
}
