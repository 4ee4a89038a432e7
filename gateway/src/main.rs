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
    match gateway.tls_addr {
        Some(tls) if tls == gateway.listen_addr => println!("wasmgate listening on wss://{tls}"),
        Some(tls) => println!("wasmgate listening on ws://{} and wss://{tls}", gateway.listen_addr),
        None => println!("wasmgate listening on ws://{}", gateway.listen_addr),
    }
    wait_for_signals(&gateway).await?;
    tracing::info!("shutting down: closing connections with 1001");
    gateway.shutdown().await;
    Ok(())
}

/// Returns on SIGTERM or Ctrl-C; reloads the configuration file on SIGHUP.
async fn wait_for_signals(gateway: &Gateway) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => {
                // Failures are logged by the reload itself; the running configuration stays.
                if let Err(e) = gateway.reload_from_source().await {
                    tracing::error!("{e}");
                }
            }
        }
    }
}
