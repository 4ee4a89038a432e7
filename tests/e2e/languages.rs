//! Plugins written in Python (componentize-py), JavaScript (ComponentizeJS) and C
//! (wit-bindgen + clang), built by `examples/plugins/build.sh`, running in real gateways.
//! Each language's own unit tests run here too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// A component built by examples/plugins/build.sh.
fn example_wasm(lang: &str, file: &str) -> PathBuf {
    let path = repo_root().join("examples/plugins").join(lang).join("build").join(file);
    assert!(
        path.exists(),
        "{} is missing: run bash examples/plugins/build.sh (tests/setup.sh does)",
        path.display()
    );
    path
}

fn plugin(name: &str, wasm: &Path, config: &str) -> String {
    format!("[[plugin]]\nname = \"{name}\"\nwasm = \"{}\"\nconfig = {config}\n\n", wasm.display())
}

/// A complete upgrade request with extra header lines; (status, response text).
async fn handshake(gw: &Gateway, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = String::from(
        "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    raw_http(gw.listen_addr, &request).await
}

async fn whoami(ws: &mut Client) -> String {
    match roundtrip(ws, Message::text("whoami")).await {
        Message::Text(t) => t.to_string(),
        other => panic!("wanted text, got {other:?}"),
    }
}

/// Runs a language's unit tests; the output ends with its runner's summary.
async fn unit_tests(program: PathBuf, args: &[&str], dir: &str) {
    let out = tokio::process::Command::new(&program)
        .args(args)
        .current_dir(repo_root().join(dir))
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} {args:?} failed:\n{text}", program.display());
}

#[tokio::test]
async fn python_allowlist_admits_listed_teams_only() {
    unit_tests(python(), &["test_app.py"], "examples/plugins/python").await;
    let wasm = example_wasm("python", "allowlist.wasm");
    let backends = echo_backends(1).await;
    let plugins = plugin("teams", &wasm, "{ allow = [\"red\", \"blue\"] }")
        // Shows the team the Python plugin put in the metadata to the backend.
        + &format!(
            "[[plugin]]\nname = \"stamp\"\nwasm = \"{}\"\nconfig = {{ header = \"x-stamp\", value = \"1\", copy_meta = \"team\" }}\n\n",
            plugin_wasm("header-stamp").display()
        );
    let toml = format!(
        "{}\n{plugins}",
        basic_config(&server_list(&backends), "").replace("upstream = \"echo\"\n", "upstream = \"echo\"\nplugins = [\"teams\", \"stamp\"]\n")
    );
    let gw = start_gateway(&toml).await;

    let mut ws = connect_with(&gw, "/", &[("x-team", "blue")]).await;
    match roundtrip(&mut ws, Message::text("headers")).await {
        Message::Text(seen) => assert!(seen.contains("x-meta-team: blue"), "{seen}"),
        other => panic!("{other:?}"),
    }
    let (status, text) = handshake(&gw, &[("X-Team", "green")]).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.trim_end().ends_with("x-team 'green' is not allowed"), "{text}");
    let (status, text) = handshake(&gw, &[]).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.trim_end().ends_with("missing x-team header"), "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn javascript_router_picks_the_pool_from_a_header() {
    let node_tests = repo_root().join("examples/plugins/js/router.test.mjs");
    unit_tests(PathBuf::from("node"), &["--test", node_tests.to_str().unwrap()], "examples/plugins/js").await;
    let wasm = example_wasm("js", "router.wasm");
    let backends = echo_backends(3).await;
    let plugins = plugin(
        "router",
        &wasm,
        "{ header = \"x-backend\", backends = { blue = \"blue\", green = \"green\" } }",
    );
    let mut toml = String::from("[gateway]\nlisten = \"127.0.0.1:0\"\n\n");
    for (name, server) in ["echo", "blue", "green"].iter().zip(&backends) {
        toml.push_str(&format!("[[upstream]]\nname = \"{name}\"\nservers = [\"{}\"]\n\n", server.addr));
    }
    toml.push_str(&plugins);
    toml.push_str("[[route]]\npath = \"/\"\nupstream = \"echo\"\nplugins = [\"router\"]\n");
    let gw = start_gateway(&toml).await;

    for (value, expected) in [("green", "b2"), ("blue", "b1"), ("purple", "b0")] {
        let mut ws = connect_with(&gw, "/", &[("x-backend", value)]).await;
        assert_eq!(whoami(&mut ws).await, expected, "x-backend: {value}");
    }
    let mut ws = connect(&ws_url(&gw, "/")).await;
    assert_eq!(whoami(&mut ws).await, "b0", "no header: the route's upstream");
    gw.shutdown().await;
}

#[tokio::test]
async fn c_balancer_sends_each_connection_to_the_least_active_server() {
    let wasm = example_wasm("c", "least_active.wasm");
    let backends = echo_backends(3).await;
    let plugins = plugin("least-active", &wasm, "{ max_failures = 3 }");
    let toml = format!(
        "{}\n{plugins}",
        basic_config(&server_list(&backends), "").replace(
            "connect_timeout_ms = 1000\n",
            "connect_timeout_ms = 1000\nbalancer = \"least-active\"\n"
        )
    );
    let gw = start_gateway(&toml).await;

    // Held open one after another, six connections spread two to a server.
    let mut open = Vec::new();
    for _ in 0..6 {
        let mut ws = connect(&ws_url(&gw, "/")).await;
        let name = whoami(&mut ws).await;
        open.push((name, ws));
    }
    for name in ["b0", "b1", "b2"] {
        assert_eq!(open.iter().filter(|(n, _)| n == name).count(), 2, "{name}: {:?}", open.iter().map(|(n, _)| n).collect::<Vec<_>>());
    }
    // Free b1's two: the next two connections go there.
    let mut kept = Vec::new();
    for (name, mut ws) in open {
        if name == "b1" {
            ws.close(None).await.unwrap();
            close_code(&mut ws).await;
        } else {
            kept.push(ws);
        }
    }
    // The gateway counts a connection as gone once its relay has ended on both sides.
    assert!(eventually(Duration::from_secs(10), || gw.active_connections() == 4).await);
    let mut landed = Vec::new();
    for _ in 0..2 {
        let mut ws = connect(&ws_url(&gw, "/")).await;
        landed.push(whoami(&mut ws).await);
        kept.push(ws);
    }
    assert_eq!(landed, ["b1", "b1"]);
    gw.shutdown().await;
}
