//! The `wasmgate` command: argument parsing only; the gateway is the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wasmgate::{Config, Gateway};

#[derive(Parser)]
#[command(name = "wasmgate", version, about = "A WebSocket gateway programmed with WebAssembly plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration and load its plugins (compile, instantiate, init), then
    /// exit: 0 when all is well, 1 with the reason when not.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Readiness events taken from epoll per turn of tokio's I/O driver (tokio's default is
/// 1,024). A worker queues the tasks a turn wakes in its local run queue, which holds 256;
/// the rest overflow to the global queue, which a busy worker visits once per 61 tasks while
/// new turns keep refilling its local queue. With a thousand busy connections that starved
/// some of them: p99 was 1.3-2x nginx's at the same median. Taking 32 at a time leaves the
/// rest on epoll's ready list, which hands them out in order: p99 0.7-0.9x nginx's in A/B
/// runs (BENCHMARKS.md has the spread over full runs).
const IO_EVENTS_PER_TICK: usize = 32;

fn main() -> ExitCode {
    // Logs go to stderr: stdout carries the one "listening on" line scripts read.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    // One crypto provider for every TLS config, chosen here rather than by whichever
    // dependency's rustls features happen to be on.
    wasmgate::tls::provider();
    match cli.command {
        Command::Check { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match wasmgate::check_plugins(&config) {
                Ok(plugins) => {
                    println!("{}: ok ({plugins} plugins load)", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e:#}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .max_io_events_per_tick(IO_EVENTS_PER_TICK)
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Each connection holds two sockets; the soft limit is often 1,024 while the hard one
    // allows far more. The default max_connections follows the limit in force.
    wasmgate::resources::raise_open_file_limit();
    let gateway = Gateway::start(config).await?;
    // Handlers first: a script that signals on reading the line must not kill the process.
    let signals = Signals::new()?;
    match gateway.tls_addr {
        Some(tls) if tls == gateway.listen_addr => println!("wasmgate listening on wss://{tls}"),
        Some(tls) => println!("wasmgate listening on ws://{} and wss://{tls}", gateway.listen_addr),
        None => println!("wasmgate listening on ws://{}", gateway.listen_addr),
    }
    if wait_for_signals(&gateway, signals).await? {
        tracing::info!("shutting down: closing connections with 1001");
    }
    gateway.shutdown().await;
    Ok(())
}

/// The signals the gateway answers.
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// Returns true on SIGTERM or Ctrl-C, false once the gateway retired (SIGUSR2, `POST
/// /shutdown`, a successor took over); reloads the configuration file on SIGHUP; reopens
/// the access log file on SIGUSR1.
async fn wait_for_signals(gateway: &Gateway, signals: Signals) -> anyhow::Result<bool> {
    let Signals { mut term, mut hup, mut usr1, mut usr2 } = signals;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(true),
            _ = term.recv() => return Ok(true),
            _ = gateway.retired() => return Ok(false),
            _ = usr2.recv() => {
                gateway.retire();
            }
            _ = usr1.recv() => gateway.reopen_access_log(),
            _ = hup.recv() => {
                // Failures are logged by the reload itself; the running configuration stays.
                if let Err(e) = gateway.reload_from_source().await {
                    tracing::error!("{e}");
                }
            }
        }
    }
}
