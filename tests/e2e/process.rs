//! The `wasmgate` binary as operators run it: config checking, signals, and memory under a
//! slow consumer, measured on the real process.

use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

#[test]
fn check_names_file_line_and_key() {
    let good = basic_config("[\"127.0.0.1:9\"]", "");
    let path = write_config("good.toml", &good);
    let out = Command::new(gateway_binary()).args(["check", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let cases = [
        ("typo.toml", good.replace("admin = ", "admn = "), "key `admn`", 4),
        ("type.toml", good.replace("connect_timeout_ms = 1000", "connect_timeout_ms = \"soon\""), "key `connect_timeout_ms`", 10),
        ("ref.toml", good.replace("upstream = \"echo\"", "upstream = \"missing\""), "key `upstream`", 14),
    ];
    for (name, text, key, line) in cases {
        let path = write_config(name, &text);
        for command in ["check", "run"] {
            let out = Command::new(gateway_binary()).args([command, "--config"]).arg(&path).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{command} {name}: {stderr}");
            let location = format!("{}:{line}:", path.display());
            assert!(stderr.contains(&location) && stderr.contains(key), "{command} {name}: want {location} and {key} in {stderr}");
        }
    }
}

#[test]
fn check_loads_plugins_and_names_the_one_that_fails() {
    let plugin = |wasm: &std::path::Path| {
        format!(
            "\n[[plugin]]\nname = \"tag\"\nwasm = \"{}\"\nconfig = {{ prefix = \"x\" }}\n",
            wasm.display()
        )
    };
    let good = basic_config("[\"127.0.0.1:9\"]", "") + &plugin(&plugin_wasm("echo-tag"));
    let path = write_config("plugin-good.toml", &good);
    let out = Command::new(gateway_binary()).args(["check", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 plugins load)"));

    // A file that is not Wasm, and a plugin whose init refuses its config: both caught
    // by `check`, without starting a gateway.
    let garbage = wasmgate_tests::scratch_dir("check").join("garbage.wasm");
    std::fs::write(&garbage, b"not wasm at all").unwrap();
    let bad_init = good.replace("prefix = \"x\"", "prefx = \"x\"");
    let bad_wasm = basic_config("[\"127.0.0.1:9\"]", "") + &plugin(&garbage);
    for (name, text, want) in [
        ("plugin-garbage.toml", bad_wasm, "not a valid WebAssembly component"),
        ("plugin-init.toml", bad_init, "init refused the configuration"),
    ] {
        let path = write_config(name, &text);
        let out = Command::new(gateway_binary()).args(["check", "--config"]).arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains("plugin `tag`") && stderr.contains(want), "{name}: {stderr}");
    }
    std::fs::remove_file(garbage).ok();
}

#[tokio::test]
async fn sigterm_closes_connections_with_1001_and_exits() {
    let backends = echo_backends(1).await;
    let path = write_config("sigterm.toml", &basic_config(&server_list(&backends), ""));
    let (mut child, addr) = spawn_gateway(&path);
    let mut ws = connect(&format!("ws://{addr}/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("x")).await, Message::text("x"));
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert_eq!(close_code(&mut ws).await, 1001);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_keeps_gateway_memory_bounded() {
    let backends = echo_backends(1).await;
    let path = write_config("slow.toml", &basic_config(&server_list(&backends), ""));
    let (mut child, addr) = spawn_gateway(&path);
    let before = rss_kib(child.id());

    // A client that sends 1 MiB messages as fast as it can and never reads the echoes.
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 129];
    let n = stream.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 101"));
    let payload = vec![0u8; 1 << 20];
    let mut frame = vec![0x82, 0xFF];
    frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]); // zero mask: payload unchanged
    frame.extend_from_slice(&payload);
    let mut sent_mib = 0;
    while sent_mib < 512 {
        match tokio::time::timeout(Duration::from_secs(2), stream.write_all(&frame)).await {
            Ok(Ok(())) => sent_mib += 1,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break, // blocked: backpressure reached the client
        }
    }
    let after = rss_kib(child.id());
    println!("slow consumer: sent {sent_mib} MiB before blocking; gateway RSS {before} KiB -> {after} KiB");
    assert!(sent_mib < 512, "the client was never slowed down");
    assert!(after < before + 16 * 1024, "gateway grew by {} KiB", after - before);
    child.kill().unwrap();
    child.wait().unwrap();
}
