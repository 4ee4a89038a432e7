//! `wasmgate-bench teardown`: what a proxy spends on a client that vanishes. A storm's CPU per
//! reconnect includes tearing down the connection the client dropped; this separates the
//! two. N idle clients are connected (handshake and one echo each, 200 at a time, or as
//! many as `--set-up-concurrency` says), then all of them reset their sockets at once
//! (`SO_LINGER` 0), and nothing reconnects. The table gives the proxy's CPU per connection
//! for the set-up and for the teardown. A set-up of all N at once is a storm of new clients
//! with no teardown in it.
//!
//! Proxies differ in what a vanished client costs by design: nginx and HAProxy close the
//! upstream socket; wasmgate by default first sends the upstream a close frame (1001,
//! "client went away") and waits for its answer, so the server hears a clean WebSocket
//! close. The `-disconnect` columns (`on_client_loss = "disconnect"`) close it as nginx does.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::time::sleep;

use crate::jwt;
use crate::load::{Metric, Outcome, Probe, Unit};
use crate::procs::{self, TempDir};
use crate::proxies::{self, Binaries, Running, Target};
use crate::table::Results;

/// After the resets, the proxy is given this long to finish closing (its close timeout for
/// an upstream that does not answer is longer, but the echo backends answer at once).
const SETTLE: Duration = Duration::from_secs(3);

#[derive(clap::Args)]
pub struct Options {
    /// Idle clients connected, then reset at once (one proxy process holds them all: at
    /// most 9,000).
    #[arg(long, default_value_t = 8_000)]
    clients: usize,
    /// Proxies to measure, comma separated (plain ws:// ones, not `direct`).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "wasmgate,wasmgate-auth,nginx,haproxy")]
    only: Vec<Target>,
    /// Connections opened at once while setting up (a storm's set-up opens 200 at a time;
    /// as many as `--clients` makes the set-up a storm of new clients with no teardown).
    #[arg(long, default_value_t = 200)]
    set_up_concurrency: usize,
    /// Measure every proxy this many times (a fresh proxy each time); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Also write the table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn metrics() -> Vec<Metric> {
    vec![
        Metric::new("set-up: proxy CPU µs per connection".into(), Unit::Micros),
        Metric::new("teardown after a client reset: proxy CPU µs per connection".into(), Unit::Micros),
    ]
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let mut targets = options.only.clone();
    if targets.iter().any(|t| *t == Target::Direct || t.is_tls()) {
        bail!("teardown measures plain ws:// proxies: not `direct` or the -tls ones");
    }
    if !(1..=9_000).contains(&options.clients) {
        bail!("--clients must be between 1 and 9,000 (one proxy process holds them all)");
    }
    targets.sort_by_key(|t| *t as u8);
    targets.dedup();
    proxies::ensure_installed(&targets)?;
    let nofile = procs::raise_nofile_limit()?;
    let bins = Binaries::locate(&targets)?;
    let dir = TempDir::new()?;
    let mut results = Results::new(&targets);
    let outcomes = crate::table::rounds_over("teardown", &targets, options.rounds, &dir.0, |target, cell| {
        let bins = &bins;
        async move { measure(target, bins, &cell, options.clients, options.set_up_concurrency).await }
    })
    .await?;
    for (target, rounds) in targets.iter().zip(outcomes) {
        results.record("teardown", metrics(), *target, &crate::load::median(rounds));
    }
    results.note(format!(
        "{} idle clients connected ({} at a time: handshake + one 64 B echo), then all reset (SO_LINGER 0) at once; CPU is \
         user plus system time of the proxy's processes, over the set-up and over the {} s after the resets, \
         per connection. Medians of {} rounds.",
        options.clients,
        options.set_up_concurrency,
        SETTLE.as_secs(),
        options.rounds
    ));
    results.note(
        "On a client's reset nginx and HAProxy close the upstream socket; wasmgate sends the upstream a close \
         frame (1001) and waits for its reply, or with on_client_loss = \"disconnect\" (the -disconnect \
         columns) closes the upstream socket too."
            .into(),
    );
    results.note(format!("open-file limit {nofile}; load average at the end: {}", crate::machine::load_average()));
    results.publish("Teardown of vanished clients", &bins, &targets, options.out.as_deref())
}

async fn measure(target: Target, bins: &Binaries, dir: &std::path::Path, clients: usize, concurrency: usize) -> anyhow::Result<Outcome> {
    let running = Running::start(target, bins, dir)?;
    let addr = running.entry[0];
    let token = jwt::bearer_for(target.token_alg(), "teardown");
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1));
    sleep(Duration::from_millis(500)).await;

    let before_set_up = running.cpu_secs()?;
    let held: Vec<_> = futures_util::stream::iter(0..clients)
        .map(|_| crate::storm::connect_once(addr, source, &token, None))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let held = held.into_iter().collect::<anyhow::Result<Vec<_>>>().context("setting up the clients")?;
    let set_up = running.cpu_secs()? - before_set_up;
    // Let the proxy finish what follows a handshake (logging, freeing its buffers).
    sleep(Duration::from_secs(1)).await;

    let before_teardown = running.cpu_secs()?;
    for ws in held {
        let _ = ws.get_ref().tcp().set_zero_linger();
        drop(ws);
    }
    sleep(SETTLE).await;
    let teardown = running.cpu_secs()? - before_teardown;
    Ok(Outcome { values: vec![set_up * 1e6 / clients as f64, teardown * 1e6 / clients as f64], trouble: None })
}
