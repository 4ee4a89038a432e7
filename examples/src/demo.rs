//! The demo, as a library so the tests run exactly what `bash examples/demo.sh` runs: two
//! echo backends, three chat backends sharing their rooms, the login service, and a gateway
//! in front of them from the embedded configuration `examples/demo.toml`, all in-process.

use std::path::Path;

use wasmgate::{Config, Gateway};

use crate::chat::{ChatServer, Hub};
use crate::echo::EchoServer;
use crate::login::{Issuer, LoginServer};

const DEMO_CONFIG: &str = include_str!("../demo.toml");

/// The token issuer and audience jwt-auth checks on the chat route (demo.toml says the same).
pub const ISSUER: &str = "wasmgate-demo";
pub const AUDIENCE: &str = "chat";

/// A running demo; dropping it stops the backends (call [`Demo::shutdown`] for the gateway).
pub struct Demo {
    pub gateway: Gateway,
    pub echo: Vec<EchoServer>,
    /// The chat backends, named `chat-1`, `chat-2`, `chat-3`.
    pub chat: Vec<ChatServer>,
    pub login: LoginServer,
}

impl Demo {
    /// Starts everything; the gateway listens on `listen` and serves its admin API on
    /// `admin` (`127.0.0.1:0` for any port).
    pub async fn start(listen: &str, admin: &str) -> anyhow::Result<Demo> {
        let echo = vec![EchoServer::start("127.0.0.1:0", "backend-1").await?, EchoServer::start("127.0.0.1:0", "backend-2").await?];
        let rooms = Hub::local();
        let mut chat = Vec::new();
        for i in 1..=3 {
            chat.push(ChatServer::start("127.0.0.1:0", &format!("chat-{i}"), rooms.clone()).await?);
        }
        // A new secret each run: tokens of an earlier run do not open this one.
        let secret = random_hex(32)?;
        let login = LoginServer::start(
            "127.0.0.1:0",
            Issuer { secret: secret.clone(), iss: ISSUER.into(), aud: AUDIENCE.into(), ttl_secs: 3600 },
        )
        .await?;
        let text = DEMO_CONFIG
            .replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"{listen}\""))
            .replace("admin = \"127.0.0.1:9090\"", &format!("admin = \"{admin}\""))
            .replace("BACKEND_1", &echo[0].addr.to_string())
            .replace("BACKEND_2", &echo[1].addr.to_string())
            .replace("CHAT_1", &chat[0].addr.to_string())
            .replace("CHAT_2", &chat[1].addr.to_string())
            .replace("CHAT_3", &chat[2].addr.to_string())
            .replace("LOGIN", &login.addr.to_string())
            .replace("DEMO_SECRET", &secret);
        // Plugin and file paths in the demo config are relative to the repository root.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let config = Config::parse(&text, "examples/demo.toml", root)?;
        let gateway = Gateway::start(config).await?;
        Ok(Demo { gateway, echo, chat, login })
    }

    /// The chat page's URL.
    pub fn chat_url(&self) -> String {
        format!("http://{}/chat", self.gateway.listen_addr)
    }

    pub async fn shutdown(self) {
        self.gateway.shutdown().await;
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let mut raw = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}
