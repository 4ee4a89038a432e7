//! `wasmgate-bench kv`: what the plugin kv store in Redis (`[cluster]`) costs a handshake,
//! against the gateway's in-memory store.
//!
//! One wasmgate with `rate-limit` on its route (a per-IP connection count: one `incr` and
//! one `get` per handshake, the limit set far out of reach) in front of two echo backends;
//! the `connect` scenario (clients looping handshake, one echo, close) against it with the
//! kv store local, then with the store in a `redis-server` on loopback. Fresh gateway for
//! every cell; the rounds alternate the two, and each value is the median over rounds.
//! The CPU column is the gateway's alone (Redis's is not counted).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::jwt;
use crate::load::{self, Outcome, Probe, Scenario, Timing};
use crate::procs::{free_addr, Proc, TempDir};
use crate::proxies::Binaries;

const STARTUP_LIMIT: Duration = Duration::from_secs(20);

#[derive(clap::Args)]
pub struct Options {
    /// Seconds measured per cell (after 1 s of warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Measure each cell this many times and report the medians.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Also write the table to this file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq)]
enum Store {
    Local,
    Redis,
}

struct Gateway(Proc);

impl Probe for Gateway {
    fn rss_kib(&self) -> anyhow::Result<u64> {
        self.0.rss_kib()
    }
    fn cpu_secs(&self) -> anyhow::Result<f64> {
        self.0.cpu_secs()
    }
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let bins = Binaries::locate(&[])?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).context("tests/bench has two parents")?;
    let component = repo.join("plugins/target/wasm32-wasip2/release/rate_limit.wasm");
    if !component.exists() {
        bail!("{} not found: build the plugins (cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml)", component.display());
    }
    let dir = TempDir::new()?;
    let redis_addr = free_addr()?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &redis_addr.port().to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
    let mut redis = Proc::spawn("redis", cmd, &dir.0).context("redis-server (Debian package redis-server)")?;
    redis.wait_listening(redis_addr, STARTUP_LIMIT)?;
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for name in ["backend1", "backend2"] {
        let addr = free_addr()?;
        let mut cmd = Command::new(bins.echo_backend());
        cmd.args(["--listen", &addr.to_string(), "--name", name]);
        let mut proc = Proc::spawn(name, cmd, &dir.0)?;
        proc.wait_listening(addr, STARTUP_LIMIT)?;
        backends.push(proc);
        servers.push(addr);
    }
    let timing = Timing { warmup: Duration::from_secs(1), duration: Duration::from_secs_f64(options.seconds) };
    let authorization = jwt::bearer();
    let stores = [Store::Local, Store::Redis];
    let mut results: Vec<Vec<anyhow::Result<Outcome>>> = vec![Vec::new(), Vec::new()];
    for round in 1..=options.rounds.max(1) {
        for (i, &store) in stores.iter().enumerate() {
            let listen = free_addr()?;
            let text = config(listen, &servers, &component, &dir.0, (store == Store::Redis).then_some(redis_addr));
            let path = dir.0.join("wasmgate.toml");
            std::fs::write(&path, text)?;
            let mut cmd = Command::new(bins.wasmgate());
            cmd.arg("run").arg("--config").arg(&path).env("RUST_LOG", "warn").env("NO_COLOR", "1");
            let mut proc = Proc::spawn("wasmgate", cmd, &dir.0)?;
            proc.wait_listening(listen, STARTUP_LIMIT)?;
            let gateway = Gateway(proc);
            let outcome = Scenario::Connect.run(&[listen], &authorization, None, &gateway, timing).await;
            eprintln!("round {round}, {}: {:?}", name(store), outcome.as_ref().map(|o| &o.values));
            gateway.0.kill();
            results[i].push(outcome);
        }
    }
    let mut table = format!(
        "## Handshake cost of the kv store in Redis\n\n\
         rate-limit on the route (one `incr` and one `get` per handshake), connect scenario \
         ({} clients looping handshake, one 64-byte echo, close), {:.0} s per cell, median of {} \
         rounds. CPU: the gateway's only.\n\n\
         | kv store | handshakes/s | p99 cycle (µs) | gateway CPU per handshake (µs) |\n|---|---:|---:|---:|\n",
        16,
        options.seconds,
        options.rounds.max(1)
    );
    for (store, rounds) in stores.iter().zip(results) {
        match load::median(rounds) {
            Ok(o) => table.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.1} |{}\n",
                name(*store),
                o.values[0],
                o.values[1],
                o.values[2],
                o.trouble.map(|t| format!(" {t}")).unwrap_or_default()
            )),
            Err(e) => table.push_str(&format!("| {} | failed: {e:#} | | |\n", name(*store))),
        }
    }
    drop(backends);
    drop(redis);
    println!("{table}");
    if let Some(out) = &options.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn name(store: Store) -> &'static str {
    match store {
        Store::Local => "local (in memory)",
        Store::Redis => "Redis (loopback)",
    }
}

fn config(listen: SocketAddr, servers: &[SocketAddr], component: &Path, dir: &Path, redis: Option<SocketAddr>) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let cluster = redis.map(|r| format!("[cluster]\nredis = \"redis://{r}/0\"\ninstance = \"bench\"\n\n")).unwrap_or_default();
    format!(
        "[gateway]\nlisten = \"{listen}\"\nplugin_cache = \"{}\"\n\n{cluster}\
         [[upstream]]\nname = \"echo\"\nservers = [{}]\n\n\
         [[plugin]]\nname = \"limit\"\nwasm = \"{}\"\nconfig = {{ connections_per_window = 1000000000, window_secs = 60 }}\n\n\
         [[route]]\npath = \"/\"\nupstream = \"echo\"\nplugins = [\"limit\"]\n",
        dir.join("plugin-cache").display(),
        servers.join(", "),
        component.display(),
    )
}
