//! `wasmgate-bench`: measures wasmgate (without and with plugins), nginx, HAProxy and a direct
//! connection side by side in one run and prints one Markdown table.
//!
//! ```text
//! cargo build --release -p wasmgate -p wasmgate-examples -p wasmgate-bench
//! cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
//! cargo run --release -p wasmgate-bench -- [--quick] [--only TARGET,...]
//!     [--scenario echo,connect,rss] [--out FILE]
//! cargo run --release -p wasmgate-bench -- soak [--minutes 30] [--out FILE]
//! cargo run --release -p wasmgate-bench -- storm [--clients 20000] [--only TARGET,...] [--out FILE]
//! cargo run --release -p wasmgate-bench -- teardown [--clients 8000] [--only TARGET,...] [--rounds 3] [--out FILE]
//! cargo run --release -p wasmgate-bench -- scale [--connections 100000] [--gateways 12] [--out FILE]
//! cargo run --release -p wasmgate-bench -- kv [--seconds 5] [--rounds 3] [--out FILE]
//! cargo run --release -p wasmgate-bench -- resume [--affected 1000] [--idle 3000] [--out FILE]
//! ```
//! It runs the `wasmgate` and `echo-backend` binaries found next to its own executable (the
//! gateway from `WASMGATE_BENCH_GATEWAY` instead if set, e.g. `target/dist/wasmgate`), the
//! plugin components in plugins/target/wasm32-wasip2/release, and `/usr/sbin/nginx` and
//! `/usr/sbin/haproxy` (installing them with apt-get when missing).
//!
//! Targets (table columns, in this order; `--only` picks some, default all, ~5 min in full):
//! - `direct`: the client alternates between the two echo backends.
//! - `wasmgate`: no plugins, round robin in the gateway.
//! - `wasmgate-log`: the same with `access_log` to a file: one JSON line per connection.
//! - `wasmgate-hook`: `noop-messages` on the route, a Wasm call for every message both ways;
//!   round robin. One plugin.
//! - `wasmgate-auth`: `jwt-auth` (HS256) on the route, `least-conn` as the upstream's balancer:
//!   a Wasm balancer call per connection, and a handshake call per token: the gateway keeps
//!   jwt-auth's accepts (contract 0.6.1 `verdicts`) and answers a token it has seen without
//!   calling it. Two plugins.
//! - `wasmgate-auth-call` (not in the default set): the same with `verdict_cache_size = 0`,
//!   so jwt-auth is called for every handshake.
//! - `wasmgate-3`: `jwt-auth` + `noop-messages` on the route, `least-conn` balancer. Three.
//! - `wasmgate-rs256`, `wasmgate-rs256-nocache` (not in the default set): as `wasmgate-auth`
//!   with RS256 tokens, jwt-auth's verified-token cache on (its default) or off.
//! - `nginx`, `haproxy`: round robin.
//! - `haproxy-tcp`: HAProxy in `mode tcp`, a byte relay that never parses the handshake or a
//!   frame: what the kernel work of proxying costs with next to nothing on top, the floor
//!   for every other column.
//! - `wasmgate-tls`, `nginx-tls`, `haproxy-tls`: clients over `wss://`, the proxy terminating
//!   TLS with one ECDSA P-256 certificate made at the start of the run (see `tls`); no
//!   session resumption, so every new connection is a full handshake. Their ratios are to
//!   `nginx-tls`. Not in the default set: `--only ...,wasmgate-tls,nginx-tls,haproxy-tls`.
//!
//! Every handshake, to every target, carries `Authorization: Bearer <HS256 JWT>` signed with
//! the secret the generated jwt-auth config checks (see `jwt`), so all targets get the same
//! requests.
//!
//! `storm` drops many idle clients at once and times their reconnecting (see `storm`);
//! `teardown` measures the dropping alone, the proxy's CPU per vanished client (see `teardown`).
//!
//! `soak` runs something else: one wasmgate under 30 minutes of mixed work, checking that its
//! memory and descriptors end where they started (see `soak`).
//!
//! This file holds the command line and the run order; see the modules for the rest.

mod jwt;
mod kv;
mod load;
mod machine;
mod procs;
mod proxies;
mod resume;
mod scale;
mod soak;
mod storm;
mod table;
mod tcp_relay;
mod teardown;
mod tls;
mod wasmgate;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use load::{Scenario, Timing};
use tokio_rustls::TlsConnector;
use proxies::{Binaries, Running, Target};
use table::Results;

#[derive(Parser)]
#[command(
    name = "wasmgate-bench",
    about = "Benchmark wasmgate against nginx, HAProxy and a direct connection",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Measure 2 s per scenario instead of 5 s.
    #[arg(long)]
    quick: bool,
    /// Seconds measured per timed scenario; overrides --quick.
    #[arg(long)]
    duration: Option<f64>,
    /// Paths to measure, comma separated; the wasmgate-* ones load plugins (see the module doc).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,wasmgate,wasmgate-log,wasmgate-hook,wasmgate-auth,wasmgate-3,nginx,haproxy,haproxy-tcp"
    )]
    only: Vec<Target>,
    /// Scenarios, comma separated: echo (all four echo-SIZE-CONNS), echo-64-50, echo-64-1000,
    /// echo-16k-50, echo-16k-1000, connect, rss. Default: all.
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
    /// Measure every cell this many times and report each metric's median. Rounds run one
    /// after another over all cells, so a busy spell on the machine hits one round of every
    /// cell rather than every round of one.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Also write the table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Mode {
    /// Soak wasmgate: mixed work for a while (30 minutes by default), its RSS and open
    /// descriptors sampled every 10 s; they must end within 10% of where they started.
    Soak(soak::Options),
    /// A reconnect storm: idle clients all dropped at once and reconnecting with their
    /// tokens; the time until 99% and 100% are back, per proxy.
    Storm(storm::Options),
    /// Idle clients all reset at once, nothing reconnecting: the proxy's CPU per vanished
    /// client, apart from the storm's reconnects.
    Teardown(teardown::Options),
    /// A byte relay on tokio, the `tokio-tcp` column's proxy (started by the harness).
    #[command(hide = true)]
    TcpRelay(tcp_relay::Options),
    /// One process of the storm's clients (started by `storm`).
    #[command(hide = true)]
    StormClient(storm::ClientOptions),
    /// Hold many idle proxied connections (100,000 by default) with several gateway
    /// processes sharing one port; report memory per connection and the handshake rate.
    Scale(scale::Options),
    /// One client process of `scale` (started by it).
    #[command(hide = true)]
    ScaleClient(scale::ClientOptions),
    /// The handshake cost of the plugin kv store in Redis (`[cluster]`) against the local
    /// store: rate-limit on the route, the connect scenario (see `kv`).
    Kv(kv::Options),
    /// A chat server killed under 1,000 clients: time to resume with session-replay, closes
    /// without it and through nginx; the replay log's memory per idle connection.
    Resume(resume::Options),
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    // The relay builds its own runtime, configured as the gateway's.
    if let Some(Mode::TcpRelay(options)) = &args.mode {
        return match tcp_relay::run(options.clone()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    // The run future owns every child process, so leaving it (done, failed or interrupted)
    // stops them all. It runs on this thread, which children's parent-death signal watches.
    let result = match args.mode.take() {
        Some(Mode::Soak(options)) => runtime.block_on(until_signal(soak::run(options))),
        Some(Mode::Storm(options)) => runtime.block_on(until_signal(storm::run(options))),
        Some(Mode::Teardown(options)) => runtime.block_on(until_signal(teardown::run(options))),
        Some(Mode::TcpRelay(_)) => unreachable!("handled above"),
        Some(Mode::StormClient(options)) => runtime.block_on(until_signal(storm::client(options))),
        Some(Mode::Scale(options)) => runtime.block_on(until_signal(scale::run(options))),
        Some(Mode::ScaleClient(options)) => runtime.block_on(until_signal(scale::client(options))),
        Some(Mode::Kv(options)) => runtime.block_on(until_signal(kv::run(options))),
        Some(Mode::Resume(options)) => runtime.block_on(until_signal(resume::run(options))),
        None => runtime.block_on(until_signal(run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn until_signal(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = terminate.recv() => bail!("terminated"),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let scenarios = select_scenarios(&args.scenario)?;
    let mut targets = args.only.clone();
    targets.sort_by_key(|t| *t as u8);
    targets.dedup();
    let seconds = args.duration.unwrap_or(if args.quick { 2.0 } else { 5.0 });
    if !(0.1..=60.0).contains(&seconds) {
        bail!("--duration must be between 0.1 and 60 seconds");
    }
    if !(1..=9).contains(&args.rounds) {
        bail!("--rounds must be between 1 and 9");
    }
    let timing = Timing { warmup: Duration::from_millis(500), duration: Duration::from_secs_f64(seconds) };

    proxies::ensure_installed(&targets)?;
    let nofile = procs::raise_nofile_limit()?;
    let bins = Binaries::locate(&targets)?;
    let dir = procs::TempDir::new()?;
    let tls = match targets.iter().any(|t| t.is_tls()) {
        true => Some(tls::BenchCert::make(&dir.0)?.connector()?),
        false => None,
    };
    let header = header(&bins, &targets, timing, args.rounds, nofile);
    let load_at_start = machine::load_1min();

    check_plugins_load(&targets, &bins, &dir.0)?;

    let mut results = Results::new(&targets);
    // Scenario-major order spreads drifting background load (a shared 2-core machine) over
    // all targets instead of penalising whichever ran during a busy spell.
    let cells: Vec<(Scenario, Target)> =
        scenarios.iter().flat_map(|s| targets.iter().map(move |t| (*s, *t))).collect();
    let mut outcomes: Vec<Vec<anyhow::Result<load::Outcome>>> = cells.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds {
        for (&(scenario, target), rounds) in cells.iter().zip(&mut outcomes) {
            eprint!("{round} {target:>13} {:<14} ", scenario.name());
            let authorization = jwt::bearer_for(target.token_alg(), "bench");
            let connector = if target.is_tls() { tls.as_ref() } else { None };
            let outcome = measure(scenario, target, &bins, &dir.0, &authorization, connector, timing).await;
            match &outcome {
                Ok(o) => eprintln!("{}", o.values.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join("  ")),
                Err(e) => eprintln!("error: {e:#}"),
            }
            rounds.push(outcome);
        }
    }
    for ((scenario, target), rounds) in cells.into_iter().zip(outcomes) {
        results.record(&scenario.name(), scenario.metrics(), target, &load::median(rounds));
    }
    if targets.contains(&Target::Direct) && scenarios.contains(&Scenario::IdleRss) {
        results.note("direct RSS is that of the two echo backends together; proxied RSS is the proxy's alone.".into());
    }
    if scenarios.iter().any(|s| *s != Scenario::IdleRss) {
        results.note(
            "CPU µs per msg or conn: user plus system time of the proxy's processes (direct: both backends) \
             over the measured window, divided by the work done there."
                .into(),
        );
    }
    results.note(format!("load average at the end: {}", machine::load_average()));
    if load_at_start >= 1.0 {
        results.note(format!(
            "the machine was busy before the run (1-minute load {load_at_start}): rates and latencies \
             suffer; CPU per msg or conn holds up better."
        ));
    }

    let table = results.render(&header);
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table)?;
    }
    Ok(())
}

/// One scenario on one target, with fresh backends and proxy so no scenario inherits another's
/// memory or connections.
async fn measure(
    scenario: Scenario,
    target: Target,
    bins: &Binaries,
    dir: &std::path::Path,
    authorization: &HeaderValue,
    tls: Option<&TlsConnector>,
    timing: Timing,
) -> anyhow::Result<load::Outcome> {
    let running = Running::start(target, bins, dir)?;
    let mut outcome = scenario.run(&running.entry, authorization, tls, &running, timing).await?;
    let failed_calls = match running.failed_plugin_calls() {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(failed))) => Some(format!("failed plugin calls, handled by their on_error: {failed}")),
        Some(Err(e)) => Some(format!("plugin call failures unknown: {e:#}")),
    };
    if let Some(failed_calls) = failed_calls {
        outcome.trouble = Some(match outcome.trouble {
            Some(trouble) => format!("{trouble}; {failed_calls}"),
            None => failed_calls,
        });
    }
    Ok(outcome)
}

/// Starts each wasmgate column that loads plugins once before measuring: a plugin that does
/// not load (built for another version of the plugin contract, say) stops the run now
/// instead of filling its column with errors, and the components get compiled into the
/// run's cache.
fn check_plugins_load(targets: &[Target], bins: &Binaries, dir: &std::path::Path) -> anyhow::Result<()> {
    for &target in targets.iter().filter(|t| t.wasmgate_plugins().is_some_and(|p| !p.is_empty())) {
        Running::start(target, bins, dir).with_context(|| {
            format!(
                "{target} does not start with its plugins; if they are out of date, rebuild them with \
                 `cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml`"
            )
        })?;
    }
    Ok(())
}

fn select_scenarios(names: &[String]) -> anyhow::Result<Vec<Scenario>> {
    if names.is_empty() {
        return Ok(Scenario::ALL.to_vec());
    }
    let mut chosen = Vec::new();
    for name in names {
        let before = chosen.len();
        chosen.extend(
            Scenario::ALL
                .into_iter()
                .filter(|s| s.name() == *name || (name == "echo" && matches!(s, Scenario::Echo { .. }))),
        );
        if chosen.len() == before {
            let known: Vec<String> = Scenario::ALL.iter().map(Scenario::name).collect();
            bail!("unknown scenario {name}; known: echo, {}", known.join(", "));
        }
    }
    Ok(Scenario::ALL.into_iter().filter(|s| chosen.contains(s)).collect())
}

fn header(bins: &Binaries, targets: &[Target], timing: Timing, rounds: u32, nofile: u64) -> String {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut paths = Vec::new();
    let versions = bins.versions(targets);
    if !versions.is_empty() {
        paths.push(format!(
            "Proxies: {}; each in front of two echo-backend processes, round robin unless a \
             balancer is named.",
            versions.join("; ")
        ));
    }
    let loads = |plugin| targets.iter().any(|t| t.wasmgate_plugins().is_some_and(|p| p.contains(&plugin)));
    if loads(wasmgate::Plugin::JwtAuth) || loads(wasmgate::Plugin::JwtAuthCalled) {
        paths.push(
            "jwt-auth checks the HS256 token (signature, exp, audience; sub to a header) that every \
             handshake to every target carries."
                .to_string(),
        );
    }
    if loads(wasmgate::Plugin::JwtAuthRs256) || loads(wasmgate::Plugin::JwtAuthRs256Uncached) {
        paths.push(
            "The RS256 columns get RS256 tokens instead (jwt-auth's test key, 2048-bit); -nocache turns \
             jwt-auth's verified-token cache off."
                .to_string(),
        );
    }
    if loads(wasmgate::Plugin::NoopMessages) {
        paths.push("noop-messages is called for every message, both ways, and forwards it.".to_string());
    }
    if targets.contains(&Target::Direct) {
        paths.push("Direct: the client alternates between the two backends.".to_string());
    }
    if targets.iter().any(|t| t.is_tls()) {
        paths.push(
            "The -tls columns: clients over wss:// (TLS 1.3, rustls client offering a browser's \
             cipher suite order, no session resumption: every new connection is a full handshake; \
             the certificate and signature checked in full on the first handshake only, as \
             load generators do), the proxy terminating TLS with the same \
             ECDSA P-256 certificate, plain ws:// to the backends; their ratios are to nginx-tls."
                .to_string(),
        );
    }
    format!(
        "## wasmgate benchmark\n\n{}\n\n{}\n\n\
         Timed scenarios: {:.1} s warm-up, then {:.1} s measured; fresh backends and proxy for \
         every cell{}. Load generator: tokio-tungstenite, {workers} runtime threads, on the same \
         cores as the proxy and backends; open-file limit {nofile}.\n",
        machine::describe(),
        paths.join(" "),
        timing.warmup.as_secs_f64(),
        timing.duration.as_secs_f64(),
        match rounds {
            1 => String::new(),
            n => format!("; every value is the median of {n} rounds, run one after another over all cells"),
        },
    )
}
