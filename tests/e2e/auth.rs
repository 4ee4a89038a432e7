//! Authentication, origin, routing and rate-limit plugins end to end: real gateways, real
//! components from `plugins/`, real sockets. JWT cases run through the Python `websockets`
//! client with tokens made by PyJWT (tests/python/jwt_auth_client.py); the rest use
//! tokio-tungstenite and raw HTTP. One test edits plugin rules and reloads under open
//! connections.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// SHA-256 (hex) of the test API keys "key-a", "key-b" (`printf %s key-a | sha256sum`).
const KEY_A_SHA256: &str = "f10f781241e2246678b6b45c857069208152a53863e47fac33f607ab405006f4";
const KEY_B_SHA256: &str = "a30534a53b23547377ddccbd1ac85a8a84c13db43493c16e55a6abc7b0eba634";

/// A `[[plugin]]` table for a crate of `plugins/` with an inline `config` table.
fn plugin(name: &str, krate: &str, config: &str) -> String {
    format!(
        "[[plugin]]\nname = \"{name}\"\nwasm = \"{}\"\nconfig = {config}\n\n",
        plugin_wasm(krate).display()
    )
}

/// Upstreams (name, servers) (the first is the routes' upstream), plugin tables, and routes
/// `(path, chain)`, where chain is a TOML list body like `"auth", "limits"`.
fn config(upstreams: &[(&str, String)], plugins: &str, routes: &[(&str, &str)]) -> String {
    let mut text = String::from("[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n");
    for (name, servers) in upstreams {
        text.push_str(&format!("[[upstream]]\nname = \"{name}\"\nservers = {servers}\nconnect_timeout_ms = 1000\n\n"));
    }
    text.push_str(plugins);
    for (path, chain) in routes {
        text.push_str(&format!(
            "[[route]]\npath = \"{path}\"\nupstream = \"{}\"\nplugins = [{chain}]\n\n",
            upstreams[0].0
        ));
    }
    text
}

/// A TOML basic string holding `text` (JSON string escapes are TOML's too).
fn toml_str(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

/// `Bearer <HS256 token>` for `sub` with `aud = "chat"`, expiring `exp_in_secs` from now.
fn hs256_bearer(secret: &str, sub: &str, exp_in_secs: i64) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let head = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"{sub}","aud":"chat","exp":{}}}"#, now + exp_in_secs));
    let input = format!("{head}.{claims}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    format!("Bearer {input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// A series' value on the admin `/metrics` page (0 when absent).
async fn metric(gw: &Gateway, series: &str) -> f64 {
    let (status, text) = admin_request(gw, "GET", "/metrics").await;
    assert_eq!(status, 200, "{text}");
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// A complete upgrade request for `target` with extra header lines; (status, response text).
async fn handshake(gw: &Gateway, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    raw_http(gw.listen_addr, &request).await
}

async fn text_roundtrip(ws: &mut Client, text: &str) -> String {
    match roundtrip(ws, Message::text(text)).await {
        Message::Text(t) => t.to_string(),
        other => panic!("wanted text, got {other:?}"),
    }
}

/// A fresh scratch directory under the system temp dir.
fn scratch_dir(what: &str) -> PathBuf {
    let name = format!("{what}-{:?}", Instant::now()).replace([' ', '{', '}', ':', ','], "_");
    wasmgate_tests::scratch_dir(&name)
}

async fn run_python(args: &[&str]) -> std::process::Output {
    let script = repo_root().join("tests/python/jwt_auth_client.py");
    let child = tokio::process::Command::new(python())
        .arg(&script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("jwt_auth_client.py finished within 120 s")
        .unwrap()
}

#[tokio::test]
async fn jwt_tokens_of_every_algorithm_through_python_websockets() {
    let dir = scratch_dir("jwt");
    let made = run_python(&["keys", dir.to_str().unwrap()]).await;
    assert!(made.status.success(), "making keys failed: {}", String::from_utf8_lossy(&made.stderr));
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("keys.json")).unwrap()).unwrap();
    let key = |name: &str| toml_str(keys[name].as_str().unwrap());
    // Keys kept in files, as an operator would, read by the gateway's `${file:...}`.
    let in_file = |name: &str, file: &str| {
        let path = dir.join(file);
        std::fs::write(&path, keys[name].as_str().unwrap()).unwrap();
        toml_str(&format!("${{file:{}}}", path.display()))
    };

    let backends = echo_backends(1).await;
    let plugins = plugin(
        "auth",
        "jwt-auth",
        &format!(
            "{{ keys = [{{ secret = {} }}, {{ public_key = {} }}, {{ public_key = {} }}], audience = \"chat\", \
             issuer = \"https://issuer.test\", required_claims = [\"sub\"], leeway_secs = 0, \
             token_query = \"access_token\", token_subprotocol = \"bearer\", \
             claims_to_headers = {{ sub = \"x-user-id\", role = \"x-role\" }}, claims_to_meta = [\"sub\"] }}",
            key("secret"),
            in_file("rsa_public", "rsa_public.pem"),
            key("ec_public")
        ),
    ) + &plugin("auth-jwks", "jwt-auth", &format!("{{ jwks = {} }}", in_file("jwks", "jwks.json")))
        + &plugin(
            "auth-live",
            "jwt-auth",
            &format!("{{ secret = {}, close_on_expiry = true, leeway_secs = 0 }}", key("secret")),
        );
    let toml = config(
        &[("echo", server_list(&backends))],
        &plugins,
        &[("/", "\"auth\""), ("/jwks", "\"auth-jwks\""), ("/live", "\"auth-live\"")],
    );
    let gw = start_gateway(&toml).await;
    let url = format!("ws://{}", gw.listen_addr);
    let out = run_python(&["check", &url, dir.to_str().unwrap()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "jwt_auth_client.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn api_key_plugin(keys: &[(&str, &str)], extra: &str) -> String {
    let list: Vec<String> = keys
        .iter()
        .map(|(name, hash)| format!("{{ name = \"{name}\", sha256 = \"{hash}\" }}"))
        .collect();
    plugin("keys", "api-key", &format!("{{ keys = [{}]{extra} }}", list.join(", ")))
}

#[tokio::test]
async fn api_keys_admit_known_clients_and_name_them() {
    let backends = echo_backends(1).await;
    let plugins = api_key_plugin(
        &[("team-a", KEY_A_SHA256), ("team-b", KEY_B_SHA256)],
        ", query = \"api_key\", name_header = \"x-api-client\"",
    );
    let gw = start_gateway(&config(&[("echo", server_list(&backends))], &plugins, &[("/", "\"keys\"")])).await;

    let mut ws = connect_with(&gw, "/", &[("x-api-key", "key-a")]).await;
    let seen = text_roundtrip(&mut ws, "headers").await;
    assert!(seen.contains("x-api-client: team-a"), "{seen}");
    assert!(!seen.contains("x-api-key"), "the key is not passed upstream: {seen}");
    let mut ws = connect(&ws_url(&gw, "/?api_key=key-b")).await;
    assert!(text_roundtrip(&mut ws, "headers").await.contains("x-api-client: team-b"));
    // A client's own name header is replaced, not trusted.
    let mut ws = connect_with(&gw, "/", &[("x-api-key", "key-b"), ("x-api-client", "team-a")]).await;
    let seen = text_roundtrip(&mut ws, "headers").await;
    assert!(seen.contains("x-api-client: team-b") && !seen.contains("x-api-client: team-a"), "{seen}");

    let (status, text) = handshake(&gw, "/", &[]).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.trim_end().ends_with("missing API key"), "{text}");
    let (status, text) = handshake(&gw, "/", &[("X-Api-Key", "key-c")]).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.trim_end().ends_with("unknown API key"), "{text}");
    let (status, text) = handshake(&gw, "/?api_key=key-c", &[]).await;
    assert_eq!(status, 401, "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn origin_allowlist_with_wildcards() {
    let backends = echo_backends(1).await;
    let plugins = plugin(
        "origins",
        "origin",
        "{ allow = [\"https://app.example.com\", \"https://*.example.org\"] }",
    );
    let gw = start_gateway(&config(&[("echo", server_list(&backends))], &plugins, &[("/", "\"origins\"")])).await;
    for allowed in ["https://app.example.com", "https://a.b.example.org", "HTTPS://App.Example.COM"] {
        let (status, text) = handshake(&gw, "/", &[("Origin", allowed)]).await;
        assert_eq!(status, 101, "{allowed}: {text}");
    }
    for refused in ["https://evil.example.com", "https://example.org", "http://app.example.com", "null"] {
        let (status, text) = handshake(&gw, "/", &[("Origin", refused)]).await;
        assert_eq!(status, 403, "{refused}: {text}");
        assert!(text.trim_end().ends_with("is not allowed"), "{text}");
    }
    let (status, text) = handshake(&gw, "/", &[]).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.trim_end().ends_with("missing Origin header"), "{text}");
    let mut ws = connect_with(&gw, "/", &[("origin", "https://chat.example.org")]).await;
    assert_eq!(text_roundtrip(&mut ws, "hi").await, "hi");
    gw.shutdown().await;
}

#[tokio::test]
async fn router_picks_pools_and_rewrites_paths() {
    let backends = echo_backends(2).await;
    let plugins = plugin(
        "router",
        "router",
        "{ rules = [\
           { name = \"canary\", header = { \"x-canary\" = \"1\" }, upstream = \"blue\" }, \
           { name = \"v2\", path_prefix = \"/v2\", strip_prefix = true, upstream = \"blue\", headers = { \"x-routed\" = \"v2\" } }, \
           { name = \"legacy\", path = \"/old/**\", rewrite = \"/new\" } ] }",
    );
    let upstreams = [
        ("echo", format!("[\"{}\"]", backends[0].addr)),
        ("blue", format!("[\"{}\"]", backends[1].addr)),
    ];
    let gw = start_gateway(&config(&upstreams, &plugins, &[("/", "\"router\"")])).await;

    let mut ws = connect(&ws_url(&gw, "/v2/chat?room=1")).await;
    assert_eq!(text_roundtrip(&mut ws, "whoami").await, "b1");
    let seen = text_roundtrip(&mut ws, "headers").await;
    assert!(seen.contains("path: /chat?room=1") && seen.contains("x-routed: v2"), "{seen}");
    let mut ws = connect_with(&gw, "/x", &[("x-canary", "1")]).await;
    assert_eq!(text_roundtrip(&mut ws, "whoami").await, "b1");
    let mut ws = connect(&ws_url(&gw, "/old/a/b")).await;
    assert_eq!(text_roundtrip(&mut ws, "whoami").await, "b0");
    assert!(text_roundtrip(&mut ws, "headers").await.contains("path: /new\n"));
    let mut ws = connect(&ws_url(&gw, "/v2x")).await;
    assert_eq!(text_roundtrip(&mut ws, "whoami").await, "b0", "prefixes match whole segments");
    gw.shutdown().await;
}

#[tokio::test]
async fn connection_rate_limit_trips_and_recovers() {
    let backends = echo_backends(1).await;
    let plugins = plugin("limits", "rate-limit", "{ connections_per_window = 3, window_secs = 2 }");
    let gw = start_gateway(&config(&[("echo", server_list(&backends))], &plugins, &[("/", "\"limits\"")])).await;
    for i in 0..3 {
        let (status, text) = handshake(&gw, "/", &[]).await;
        assert_eq!(status, 101, "connection {i}: {text}");
    }
    let (status, text) = handshake(&gw, "/", &[]).await;
    assert_eq!(status, 429, "{text}");
    let retry_after: u64 = text
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no Retry-After in {text}"));
    assert!((1..=4).contains(&retry_after), "{text}");
    assert!(text.contains("too many connections"), "{text}");
    // Refused attempts do not use up the budget; after Retry-After there is room again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, text) = handshake(&gw, "/", &[]).await;
    assert_eq!(status, 101, "after {retry_after} s: {text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn message_rate_limit_closes_with_1008() {
    let backends = echo_backends(1).await;
    let plugins = plugin("limits", "rate-limit", "{ messages_per_sec = 5, burst = 5 }");
    let gw = start_gateway(&config(&[("echo", server_list(&backends))], &plugins, &[("/", "\"limits\"")])).await;

    // Within the rate: 4 a second for 2 s stays up.
    let mut steady = connect(&ws_url(&gw, "/")).await;
    for i in 0..8 {
        assert_eq!(text_roundtrip(&mut steady, &format!("m{i}")).await, format!("m{i}"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A burst: the first 5 (the bucket) pass, more at once close the connection with 1008.
    let mut flood = connect(&ws_url(&gw, "/")).await;
    for i in 0..5 {
        assert_eq!(text_roundtrip(&mut flood, &format!("b{i}")).await, format!("b{i}"));
    }
    for i in 0..10 {
        if flood.send(Message::text(format!("f{i}"))).await.is_err() {
            break;
        }
    }
    // Echoes of what passed may or may not beat the close back to the client.
    let mut echoed = 0;
    let code = loop {
        match next_data(&mut flood).await {
            Message::Text(_) => echoed += 1,
            Message::Close(frame) => break frame.map_or(1005, |f| u16::from(f.code)),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, 1008);
    assert!(echoed < 10, "{echoed} echoed before the close");
    // The limit is per connection: the steady one is still fine.
    assert_eq!(text_roundtrip(&mut steady, "still here").await, "still here");
    gw.shutdown().await;
}

#[tokio::test]
async fn reload_changes_rules_for_new_handshakes_only() {
    let backends = echo_backends(1).await;
    let upstreams = [("echo", server_list(&backends))];
    let before = config(&upstreams, &api_key_plugin(&[("team-a", KEY_A_SHA256)], ""), &[("/", "\"keys\"")]);
    let dir = scratch_dir("reload");
    let file = dir.join("gateway.toml");
    std::fs::write(&file, &before).unwrap();
    let gw = Gateway::start(Config::load(&file).expect("config is valid")).await.expect("gateway starts");
    let mut open = connect_with(&gw, "/", &[("x-api-key", "key-a")]).await;
    assert_eq!(text_roundtrip(&mut open, "before").await, "before");
    assert_eq!(handshake(&gw, "/", &[("x-api-key", "key-b")]).await.0, 401);

    // The operator edits the rules in the config file, team-a out and team-b in, and reloads.
    let after = before.replace(
        &format!("{{ name = \"team-a\", sha256 = \"{KEY_A_SHA256}\" }}"),
        &format!("{{ name = \"team-b\", sha256 = \"{KEY_B_SHA256}\" }}"),
    );
    assert_ne!(before, after);
    std::fs::write(&file, &after).unwrap();
    gw.reload_from_source().await.expect("reload applies");

    let (status, text) = handshake(&gw, "/", &[("x-api-key", "key-a")]).await;
    assert_eq!(status, 401, "new handshakes follow the new rules: {text}");
    let mut fresh = connect_with(&gw, "/", &[("x-api-key", "key-b")]).await;
    assert_eq!(text_roundtrip(&mut fresh, "after").await, "after");
    // The connection opened under the old rules stays up.
    assert_eq!(text_roundtrip(&mut open, "still open").await, "still open");
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// jwt-auth lets the gateway keep its accepts (`verdicts`): a reconnect with the same token
/// gets the same answer, claim headers included, without a call into the plugin; another
/// token, a forged one, a token on another route, or one kept past its expiry is checked.
#[tokio::test]
async fn a_reconnect_with_the_same_token_is_answered_without_calling_jwt_auth() {
    const SECRET: &str = "verdict-cache-test-secret-0123456789abcdef";
    let backends = echo_backends(1).await;
    let plugins = plugin(
        "auth",
        "jwt-auth",
        &format!("{{ secret = \"{SECRET}\", audience = \"chat\", leeway_secs = 0, claims_to_headers = {{ sub = \"x-user-id\" }}, strip_token = true }}"),
    );
    let toml = config(&[("echo", server_list(&backends))], &plugins, &[("/", "\"auth\""), ("/b", "\"auth\"")])
        .replacen("[gateway]\n", &format!("[gateway]\nadmin_token = \"{ADMIN_TOKEN}\"\n"), 1);
    let gw = start_gateway(&toml).await;
    let calls = "wasmgate_plugins_calls_total{hook=\"handshake\",plugin=\"auth\"}";
    let hits = "wasmgate_plugins_verdict_cache_total{plugin=\"auth\",result=\"hit\"}";

    let ann = hs256_bearer(SECRET, "ann", 3600);
    for round in 0..3 {
        let mut ws = connect_with(&gw, "/", &[("authorization", &ann)]).await;
        let seen = text_roundtrip(&mut ws, "headers").await;
        assert!(seen.contains("x-user-id: ann"), "round {round}: {seen}");
        assert!(!seen.to_ascii_lowercase().contains("authorization"), "round {round}: the token is stripped: {seen}");
    }
    assert_eq!(metric(&gw, calls).await, 1.0, "one call for three handshakes");
    assert_eq!(metric(&gw, hits).await, 2.0);

    // A client's own x-user-id does not ride on a kept answer.
    let mut ws = connect_with(&gw, "/", &[("authorization", &ann), ("x-user-id", "root")]).await;
    let seen = text_roundtrip(&mut ws, "headers").await;
    assert!(seen.contains("x-user-id: ann") && !seen.contains("x-user-id: root"), "{seen}");
    assert_eq!(metric(&gw, calls).await, 1.0);

    // Another user, the same token on another route, a forged token (twice): each a call.
    let mut ws = connect_with(&gw, "/", &[("authorization", &hs256_bearer(SECRET, "bob", 3600))]).await;
    assert!(text_roundtrip(&mut ws, "headers").await.contains("x-user-id: bob"));
    let mut ws = connect_with(&gw, "/b", &[("authorization", &ann)]).await;
    assert!(text_roundtrip(&mut ws, "headers").await.contains("x-user-id: ann"));
    let forged = hs256_bearer("not-the-secret-the-gateway-checks-with-0123", "ann", 3600);
    for _ in 0..2 {
        let (status, text) = handshake(&gw, "/", &[("Authorization", &forged)]).await;
        assert_eq!(status, 401, "{text}");
    }
    assert_eq!(metric(&gw, calls).await, 5.0);

    // A token kept until it expires, then refused by the plugin.
    let brief = hs256_bearer(SECRET, "cid", 2);
    let mut ws = connect_with(&gw, "/", &[("authorization", &brief)]).await;
    assert!(text_roundtrip(&mut ws, "headers").await.contains("x-user-id: cid"));
    let _kept = connect_with(&gw, "/", &[("authorization", &brief)]).await;
    assert_eq!(metric(&gw, calls).await, 6.0, "kept while valid");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, text) = handshake(&gw, "/", &[("Authorization", &brief)]).await;
    assert_eq!(status, 401, "expired, not kept past its exp: {text}");
    assert!(text.contains("expired"), "{text}");
    gw.shutdown().await;
}
