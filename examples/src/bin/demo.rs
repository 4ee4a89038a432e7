//! The demo: two example echo backends and a gateway in front of them, all in this process,
//! from the embedded configuration `examples/demo.toml`. Prints the URL to connect to.

use std::path::Path;

use wasmgate::{Config, Gateway};
use wasmgate_examples::echo::EchoServer;

const DEMO_CONFIG: &str = include_str!("../../demo.toml");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let first = EchoServer::start("127.0.0.1:0", "backend-1").await?;
    let second = EchoServer::start("127.0.0.1:0", "backend-2").await?;
    let text = DEMO_CONFIG
        .replace("BACKEND_1", &first.addr.to_string())
        .replace("BACKEND_2", &second.addr.to_string());
    // Plugin paths in the demo config are relative to the repository root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let config = Config::parse(&text, "examples/demo.toml", root)?;
    let gateway = Gateway::start(config).await?;
    println!();
    println!("wasmgate demo: two echo backends behind the gateway, three Wasm plugins.");
    println!("  connect:  ws://{}/echo     (send whoami or headers)", gateway.listen_addr);
    println!("            ws://{}/tagged   (a message plugin prefixes what you send)", gateway.listen_addr);
    if let Some(admin) = gateway.admin_addr {
        println!("  dashboard: http://{admin}/   (live connections and messages per server; drain needs [gateway] admin_token)");
        println!("  admin:    http://{admin}/metrics   (the rest of the admin API needs [gateway] admin_token)");
    }
    println!("  try:      .venv/bin/python -m websockets ws://{}/echo   (then type whoami)", gateway.listen_addr);
    println!("Ctrl-C stops it.");
    tokio::signal::ctrl_c().await?;
    gateway.shutdown().await;
    Ok(())
}
