//! `chat-backend --listen ADDR [--name NAME] [--hub ADDR]`: a pub/sub chat server (see
//! `wasmgate_examples::chat` for its protocol). Instances given the same `--hub` share their
//! rooms; `chat-backend --hub-listen ADDR` runs that hub. Without `--hub` an instance keeps
//! its rooms to itself.

use std::sync::Arc;

use wasmgate_examples::chat::{run_hub, ChatServer, Hub};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let usage = "usage: chat-backend --listen ADDR [--name NAME] [--hub ADDR] | chat-backend --hub-listen ADDR";
    let (mut listen, mut name, mut hub, mut hub_listen) = (None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value; {usage}"));
        match arg.as_str() {
            "--listen" => listen = Some(value()?),
            "--name" => name = Some(value()?),
            "--hub" => hub = Some(value()?),
            "--hub-listen" => hub_listen = Some(value()?),
            other => anyhow::bail!("unknown argument {other}; {usage}"),
        }
    }
    if let Some(addr) = hub_listen {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        println!("chat hub listening on {}", listener.local_addr()?);
        return run_hub(listener).await;
    }
    let listen = listen.ok_or_else(|| anyhow::anyhow!("{usage}"))?;
    let rooms: Arc<Hub> = match hub {
        Some(addr) => Hub::connect(&addr).await?,
        None => Hub::local(),
    };
    let server = ChatServer::start(&listen, name.as_deref().unwrap_or(&listen), rooms).await?;
    println!("chat backend listening on ws://{}", server.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
