//! `echo-backend --listen ADDR [--name NAME]`: a standalone echo server for benchmarks and
//! manual testing.

use wasmgate_examples::echo::EchoServer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:9001".to_string();
    let mut name = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or_else(|| anyhow::anyhow!("--listen needs ADDR"))?,
            "--name" => name = args.next(),
            other => anyhow::bail!("unknown argument {other}; usage: echo-backend --listen ADDR [--name NAME]"),
        }
    }
    let server = EchoServer::start(&listen, name.as_deref().unwrap_or(&listen)).await?;
    println!("echo backend listening on ws://{}", server.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
