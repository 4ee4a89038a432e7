//! Plugins end to end: every hook through real sockets with real components built from
//! `plugins/` and `tests/plugins/`, hostile plugins contained, hot reload under traffic.

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// A plugin table; `wasm` is a crate name under plugins/ or tests/plugins/.
fn plugin(name: &str, krate: &str, extra: &str) -> String {
    format!(
        "[[plugin]]\nname = \"{name}\"\nwasm = \"{}\"\n{extra}\n",
        plugin_wasm(krate).display()
    )
}

/// Echo upstream `echo`, routes `path -> plugins`, plus plugin tables.
fn config(servers: &str, routes: &[(&str, &str)], plugins: &str, upstream_extra: &str) -> String {
    let mut text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\n[[upstream]]\nname = \"echo\"\nservers = {servers}\n{upstream_extra}\n\n{plugins}\n"
    );
    for (path, chain) in routes {
        text.push_str(&format!("[[route]]\npath = \"{path}\"\nupstream = \"echo\"\nplugins = [{chain}]\n\n"));
    }
    text
}

async fn admin_get(gw: &Gateway, path: &str) -> String {
    admin_request(gw, "GET", path).await.1
}

fn plugin_calls(plugins_json: &str, name: &str) -> u64 {
    let body = &plugins_json[plugins_json.find("\r\n\r\n").unwrap() + 4..];
    let list: serde_json::Value = serde_json::from_str(body).unwrap();
    list.as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["calls"].as_u64().unwrap()
}

#[tokio::test]
async fn handshake_hooks_edit_headers_and_share_metadata() {
    let backends = echo_backends(1).await;
    let plugins = plugin("auth-ish", "header-stamp", "config = { header = \"x-stamp\", value = \"alice\", set_meta = \"user\" }")
        + &plugin("forwarder", "header-stamp", "config = { header = \"x-second\", value = \"2\", copy_meta = \"user\" }");
    let toml = config(&server_list(&backends), &[("/", "\"auth-ish\", \"forwarder\"")], &plugins, "");
    let gw = start_gateway(&toml).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    let Message::Text(seen) = roundtrip(&mut ws, Message::text("headers")).await else { panic!() };
    for expected in ["x-stamp: alice", "x-second: 2", "x-meta-user: alice"] {
        assert!(seen.contains(expected), "want {expected:?} in\n{seen}");
    }
    // A route whose plugins read no messages calls no plugin per message.
    for i in 0..50 {
        roundtrip(&mut ws, Message::text(format!("m{i}"))).await;
    }
    let info = admin_get(&gw, "/plugins").await;
    assert_eq!(plugin_calls(&info, "auth-ish"), 1, "one handshake call, no message calls: {info}");
    gw.shutdown().await;
}

#[tokio::test]
async fn message_hooks_see_and_replace_messages() {
    let backends = echo_backends(1).await;
    let plugins = plugin("tag", "echo-tag", "config = { prefix = \"v1:\" }");
    let toml = config(&server_list(&backends), &[("/tagged", "\"tag\""), ("/", "")], &plugins, "");
    let gw = start_gateway(&toml).await;
    let mut tagged = connect(&ws_url(&gw, "/tagged")).await;
    assert_eq!(roundtrip(&mut tagged, Message::text("hello")).await, Message::text("v1:hello"));
    assert_eq!(roundtrip(&mut tagged, Message::binary(vec![1, 2])).await, Message::binary(vec![1, 2]));
    let mut plain = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut plain, Message::text("hello")).await, Message::text("hello"));
    gw.shutdown().await;
}

#[tokio::test]
async fn balancer_plugin_ranks_servers() {
    let backends = echo_backends(3).await;
    let plugins = plugin("rr", "round-robin", "");
    let toml = config(&server_list(&backends), &[("/", "")], &plugins, "balancer = \"rr\"");
    let gw = start_gateway(&toml).await;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..30 {
        let mut ws = connect(&ws_url(&gw, "/")).await;
        let Message::Text(name) = roundtrip(&mut ws, Message::text("whoami")).await else { panic!() };
        *counts.entry(name.to_string()).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 10), "round robin is exact: {counts:?}");
    gw.shutdown().await;
}

#[tokio::test]
async fn balancer_ranking_fails_over_past_a_dead_server() {
    let backends = echo_backends(1).await;
    let servers = format!("[\"{}\", \"{}\"]", dead_address(), backends[0].addr);
    let plugins = plugin("lc", "least-conn", "");
    let toml = config(&servers, &[("/", "")], &plugins, "balancer = \"lc\"");
    let gw = start_gateway(&toml).await;
    for _ in 0..6 {
        let mut ws = connect(&ws_url(&gw, "/")).await;
        assert_eq!(roundtrip(&mut ws, Message::text("whoami")).await, Message::text("b0"));
    }
    gw.shutdown().await;
}

/// Each hostile plugin guards `/bad`; `/good` has none. The gateway must stay up, answer
/// `/bad` by the plugin's `on_error`, and keep serving `/good` meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_contained() {
    let backends = echo_backends(1).await;
    for krate in ["hostile-loop", "hostile-memory", "hostile-trap", "hostile-panic"] {
        for (policy, expect_open) in [("deny", false), ("allow", true)] {
            let plugins = plugin(
                "bad",
                krate,
                &format!("on_error = \"{policy}\"\ntimeout_ms = 50\nmemory_limit_mb = 16"),
            );
            let toml = config(&server_list(&backends), &[("/bad", "\"bad\""), ("/good", "")], &plugins, "");
            let gw = start_gateway(&toml).await;
            let mut good = connect(&ws_url(&gw, "/good")).await;
            for attempt in 0..3 {
                let result = tokio_tungstenite::connect_async(ws_url(&gw, "/bad")).await;
                match (&result, expect_open) {
                    (Ok(_), true) => {}
                    (Err(tokio_tungstenite::tungstenite::Error::Http(response)), false) => {
                        assert_eq!(response.status(), 503, "{krate} {policy} attempt {attempt}");
                    }
                    _ => panic!("{krate} with on_error={policy}, attempt {attempt}: {result:?}"),
                }
                assert_eq!(roundtrip(&mut good, Message::text("alive")).await, Message::text("alive"));
            }
            let metrics = gw.metrics_text();
            assert!(metrics.contains("wasmgate_plugin_call_failures_total 3"), "{krate}: {metrics}");
            gw.shutdown().await;
        }
    }
}

#[tokio::test]
async fn hostile_message_hook_times_out_per_call() {
    let backends = echo_backends(1).await;
    let plugins = plugin("bad", "hostile-loop", "on_error = \"allow\"\ntimeout_ms = 50\nmessage_timeout_ms = 2");
    // The loop plugin also loops in on_handshake: allow lets the connection through.
    let toml = config(&server_list(&backends), &[("/", "\"bad\"")], &plugins, "");
    let gw = start_gateway(&toml).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    for i in 0..5 {
        // Each message's hook is interrupted; "allow" forwards the message unchanged.
        let msg = Message::text(format!("m{i}"));
        assert_eq!(roundtrip(&mut ws, msg.clone()).await, msg);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn plugins_that_cannot_load_are_rejected_and_the_old_version_keeps_serving() {
    let backends = echo_backends(1).await;
    let good = config(
        &server_list(&backends),
        &[("/", "\"tag\"")],
        &plugin("tag", "echo-tag", "config = { prefix = \"old:\" }"),
        "",
    );
    let gw = start_gateway(&good).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("a")).await, Message::text("old:a"));

    // A config its init refuses, an init that always fails, garbage bytes instead of Wasm.
    let garbage = wasmgate_tests::scratch_dir("garbage").join("garbage.wasm");
    std::fs::write(&garbage, b"this is not wasm at all").unwrap();
    let bad_configs = [
        good.replace("config = { prefix = \"old:\" }", "config = { nonsense = 1 }"),
        good.replace(&plugin_wasm("echo-tag").display().to_string(), &plugin_wasm("fail-init").display().to_string()),
        good.replace(&plugin_wasm("echo-tag").display().to_string(), &garbage.display().to_string()),
    ];
    for bad in bad_configs {
        let config = Config::parse(&bad, "test.toml", repo_root()).unwrap();
        let report = gw.reload(config).await.expect("other parts of the config apply");
        let failures: Vec<_> = report.failures().collect();
        assert_eq!(failures.len(), 1, "{report:?}");
        assert_eq!(roundtrip(&mut ws, Message::text("b")).await, Message::text("old:b"), "old version serves");
        let mut fresh = connect(&ws_url(&gw, "/")).await;
        assert_eq!(roundtrip(&mut fresh, Message::text("c")).await, Message::text("old:c"));
    }
    // A plugin that never loaded cannot be started with.
    let config = Config::parse(&bad_start(&backends), "test.toml", repo_root()).unwrap();
    let err = Gateway::start(config).await.err().expect("start refused");
    assert!(err.to_string().contains("fail-init never accepts"), "{err}");
    gw.shutdown().await;
    let _ = std::fs::remove_file(&garbage);
}

fn bad_start(backends: &[EchoServer]) -> String {
    config(&server_list(backends), &[("/", "\"x\"")], &plugin("x", "fail-init", ""), "")
}

/// 200 connections exchange numbered messages while the message plugin is replaced 10 times
/// (new config each time, and every other time a new file too). Nothing may be dropped,
/// lost or reordered, and the last version must be the one answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_traffic_drops_nothing() {
    let backends = echo_backends(2).await;
    let dir = wasmgate_tests::scratch_dir("reload");
    let wasm = dir.join("tag.wasm");
    std::fs::copy(plugin_wasm("echo-tag"), &wasm).unwrap();
    let make = |version: u32| {
        let plugins = format!(
            // Generous deadlines: this test is about reloads, not a loaded machine's scheduling.
            "[[plugin]]\nname = \"tag\"\nwasm = \"{}\"\nconfig = {{ prefix = \"v{version}:\" }}\nmessage_timeout_ms = 1000\n",
            wasm.display()
        );
        config(&server_list(&backends), &[("/", "\"tag\"")], &plugins, "")
    };
    let gw = start_gateway(&make(0)).await;
    let url = ws_url(&gw, "/");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..200 {
        let url = url.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut ws = connect(&url).await;
            let mut n = 0u64;
            let mut versions = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 5 {
                ws.send(Message::text(format!("{c}:{n}"))).await.expect("send");
                let Message::Text(reply) = next_data(&mut ws).await else { panic!("client {c} got a non-text reply") };
                let (version, body) = reply.split_once(':').unwrap();
                assert_eq!(body, format!("{c}:{n}"), "client {c}: lost or reordered");
                versions.insert(version.to_string());
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ws.close(None).await.unwrap();
            (n, versions)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for version in 1..=10 {
        if version % 2 == 0 {
            // A new file as well: the runtime must compile and swap it.
            let tmp = dir.join("tag.wasm.tmp");
            let mut bytes = std::fs::read(plugin_wasm("echo-tag")).unwrap();
            bytes.extend_from_slice(&custom_section(version));
            std::fs::write(&tmp, bytes).unwrap();
            std::fs::rename(&tmp, &wasm).unwrap();
        }
        let config = Config::parse(&make(version), "test.toml", repo_root()).unwrap();
        let report = gw.reload(config).await.unwrap();
        assert!(report.is_ok(), "{report:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (n, versions) = tokio::time::timeout(Duration::from_secs(30), client).await.unwrap().expect("client ok");
        total += n;
        assert!(versions.contains("v10"), "a live connection reached the last version: {versions:?}");
    }
    println!("hot reload: {total} messages over 200 connections, 10 reloads, none lost");
    let metrics = gw.metrics_text();
    assert!(metrics.contains("wasmgate_plugin_call_failures_total 0"), "no hook call failed: {metrics}");
    let mut fresh = connect(&url).await;
    assert_eq!(roundtrip(&mut fresh, Message::text("x")).await, Message::text("v10:x"));
    gw.shutdown().await;
}

/// A Wasm custom section: changes the file's bytes (and hash) without changing behaviour.
fn custom_section(version: u32) -> Vec<u8> {
    let name = b"wasmgate-test";
    let payload = version.to_le_bytes();
    let size = 1 + name.len() + payload.len();
    let mut section = vec![0u8, size as u8, name.len() as u8];
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    section
}

#[tokio::test]
async fn admin_lists_plugins_and_reloads_from_the_file() {
    let backends = echo_backends(1).await;
    let dir = wasmgate_tests::scratch_dir("admin");
    let path = dir.join("gw.toml");
    let text = |prefix: &str| {
        config(&server_list(&backends), &[("/", "\"tag\"")], &plugin("tag", "echo-tag", &format!("config = {{ prefix = \"{prefix}\" }}")), "")
    };
    std::fs::write(&path, text("a:")).unwrap();
    let gw = Gateway::start(Config::load(&path).unwrap()).await.unwrap();
    let info = admin_get(&gw, "/plugins").await;
    assert!(info.contains("\"messages\": true") && info.contains("\"hash\""), "{info}");

    std::fs::write(&path, text("b:")).unwrap();
    let (status, body) = admin_request(&gw, "POST", "/plugins/reload").await;
    assert_eq!(status, 200, "{body}");
    let mut ws = connect(&ws_url(&gw, "/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("x")).await, Message::text("b:x"));

    std::fs::write(&path, "[gateway]\nlisten = 5\n").unwrap();
    let (status, body) = admin_request(&gw, "POST", "/plugins/reload").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("gw.toml:2"), "names the line: {body}");
    assert_eq!(roundtrip(&mut ws, Message::text("y")).await, Message::text("b:y"));
    let metrics = admin_get(&gw, "/metrics").await;
    assert!(metrics.contains("wasmgate_connections_active 1"), "{metrics}");
    gw.shutdown().await;
}

/// The demo's embedded configuration loads its plugins and serves its echo routes (its chat
/// is tests/e2e/chat_browser.rs's).
#[tokio::test]
async fn demo_config_serves() {
    let demo = wasmgate_examples::demo::Demo::start("127.0.0.1:0", "127.0.0.1:0").await.unwrap();
    let gw = &demo.gateway;
    let mut echo = connect(&ws_url(gw, "/echo")).await;
    let Message::Text(seen) = roundtrip(&mut echo, Message::text("headers")).await else { panic!() };
    assert!(seen.contains("x-demo: stamped by a Wasm plugin"), "{seen}");
    let mut tagged = connect(&ws_url(gw, "/tagged")).await;
    assert_eq!(roundtrip(&mut tagged, Message::text("hi")).await, Message::text("[via wasm] hi"));
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_action_reaches_the_wire() {
    let backends = echo_backends(1).await;
    let plugins = plugin("actions", "message-actions", "");
    let gw = start_gateway(&config(&server_list(&backends), &[("/", "\"actions\"")], &plugins, "")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    let text = |s: &str| Message::text(s.to_string());
    assert_eq!(roundtrip(&mut ws, text("plain")).await, text("plain"));
    assert_eq!(roundtrip(&mut ws, text("upper:abc")).await, text("UPPER:ABC"), "replace");
    assert_eq!(roundtrip(&mut ws, text("reply:pong")).await, text("pong"), "reply");
    assert_eq!(roundtrip(&mut ws, text("echo")).await, text("echo"), "reply without a payload");
    // A dropped message never comes back: the next answer is the next message's echo.
    ws.send(text("drop")).await.unwrap();
    assert_eq!(roundtrip(&mut ws, text("after")).await, text("after"), "drop");
    let long = "z".repeat(5000);
    assert_eq!(roundtrip(&mut ws, text(&long)).await, text(&long), "long upstream message by length");
    ws.send(text("close")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 4000);
    let metrics = gw.metrics_text();
    assert!(
        !metrics.lines().any(|l| l.starts_with("wasmgate_plugins_errors_total") && l.contains("actions") && !l.ends_with(" 0")),
        "no plugin errors:\n{metrics}"
    );
    gw.shutdown().await;
}
