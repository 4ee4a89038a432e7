//! The demo: echo and chat backends, a login service and a gateway in front of them, all in
//! this process, from the embedded configuration `examples/demo.toml` (see
//! `wasmgate_examples::demo`). Prints the URLs to open.

use wasmgate_examples::demo::Demo;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let demo = Demo::start("127.0.0.1:8080", "127.0.0.1:9090").await?;
    let listen = demo.gateway.listen_addr;
    println!();
    println!("wasmgate demo: echo and chat backends behind the gateway, Wasm plugins in front.");
    println!("  chat:     {}   (open it in two tabs; the page logs in, gets a JWT, jwt-auth checks it)", demo.chat_url());
    for (i, server) in demo.chat.iter().enumerate() {
        println!("            chat-{} at ws://{} behind it (the three share their rooms)", i + 1, server.addr);
    }
    if let Some(admin) = demo.gateway.admin_addr {
        println!("  dashboard: http://{admin}/   (live connections and messages per server; drain needs [gateway] admin_token)");
        println!("  admin:    http://{admin}/metrics   (the rest of the admin API needs [gateway] admin_token)");
    }
    println!("  connect:  ws://{listen}/echo     (send whoami or headers)");
    println!("            ws://{listen}/tagged   (a message plugin prefixes what you send)");
    println!("  try:      .venv/bin/python -m websockets ws://{listen}/echo   (then type whoami)");
    println!("Ctrl-C stops it.");
    tokio::signal::ctrl_c().await?;
    demo.shutdown().await;
    Ok(())
}
