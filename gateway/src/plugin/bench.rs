//! What hook calls cost, printed as a table. Ignored by default; run with
//!   cargo test --release -p wasmgate --lib plugin::bench -- --ignored --nocapture
//! after building the plugins (see tests/plugin_runtime.rs).
//!
//! "raw" is the bare typed-function call on one instance (argument lowering, the Wasm call,
//! result lifting), which this module cannot make cheaper; the hook methods add to it
//! taking and returning a pooled instance, the deadline, lending the connection, counting
//! and checking the answer.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::host::HostState;
use super::types::WireAction;
use super::*;
use crate::metrics::Registry;

fn wasm(crate_name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../plugins/target/wasm32-wasip2/release/{crate_name}.wasm"
    ))
}

/// Time per run of `f`: the best of 5 rounds of `n / 5` runs, after `n / 10` warm-up runs.
/// The best round is the figure that other work on a shared machine disturbs least.
fn per_call(n: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..n / 10 {
        f();
    }
    let round = (n / 5).max(1);
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..round {
                f();
            }
            start.elapsed() / round
        })
        .min()
        .expect("five rounds")
}

fn once(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

/// A pool of `n` servers with one label each, or none, and all of them as candidates.
fn pool(n: usize, label: bool) -> (PoolInfo, Vec<Candidate>) {
    let labels: Arc<[(String, String)]> = match label {
        true => Arc::new([("zone".to_string(), "a".to_string())]),
        false => Arc::new([]),
    };
    let servers = (0..n)
        .map(|i| ServerInfo {
            address: format!("10.0.{}.{}:9000", i / 256, i % 256).into(),
            weight: 1,
            labels: labels.clone(),
        })
        .collect();
    let candidates = (0..n)
        .map(|i| Candidate {
            server: i as u32,
            weight: 1,
            active: (i * 7 % 13) as u32,
            total: i as u64,
            ewma_connect_us: 250,
            recent_failures: 0,
        })
        .collect();
    (PoolInfo { name: "p".into(), version: 1, servers, max_attempts: 3 }, candidates)
}

/// A compact HS256 JWT with these claims.
fn hs256_token(secret: &str, claims: &str) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let signed = format!("{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(claims.as_bytes()));
    // HMAC-SHA256 (RFC 2104) with a key shorter than the block.
    let mut key = [0u8; 64];
    key[..secret.len()].copy_from_slice(secret.as_bytes());
    let pad = |byte: u8| key.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(signed.as_bytes()).finalize();
    let mac = Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize();
    format!("{signed}.{}", b64(&mac))
}

/// An upgrade request as a browser sends it, with a bearer token.
fn browser_request(token: &str) -> HandshakeRequest {
    let authorization = format!("Bearer {token}");
    HandshakeRequest {
        method: "GET".into(),
        path: "/chat".into(),
        query: "room=lobby".into(),
        host: "chat.example.com".into(),
        headers: header_lines([
            ("host", "chat.example.com"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-extensions", "permessage-deflate; client_max_window_bits"),
            ("origin", "https://chat.example.com"),
            ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"),
            ("accept-language", "en-US,en;q=0.5"),
            ("cache-control", "no-cache"),
            ("cookie", "sid=abc123; theme=dark"),
            ("authorization", authorization.as_str()),
        ]),
        client_addr: "10.0.0.1:40000".into(),
        subprotocols: vec![],
        scheme: "ws".into(),
        tls: None,
    }
}

#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn plugin_call_costs() {
    let rt = PluginRuntime::new(RuntimeOptions::default(), Arc::new(Registry::new())).unwrap();
    let conn = ConnContext::new(1, "10.0.0.1:40000".parse().unwrap(), "/");
    let mut rows: Vec<(&str, Duration)> = Vec::new();

    let noop = rt
        .load(&PluginSpec::new("noop", wasm("noop_messages")))
        .unwrap();
    let mut instance = noop.pool.take(std::time::Duration::from_secs(1)).unwrap();
    instance.store.set_epoch_deadline(u64::MAX / 2);
    let raw = per_call(200_000, || {
        let guard = HostState::enter(&mut instance.store, &conn).with_message(b"hello", true, super::types::Opcode::Text);
        let r = instance
            .exports
            .on_message(guard.store, Direction::ClientToUpstream, Opcode::Text, 5);
        assert!(matches!(r, Some(Ok(WireAction::Forward))));
    });
    noop.pool.put(instance);
    rows.push(("on-message no-op, raw typed call (16 B)", raw));
    rows.push((
        "on-message no-op, Plugin::on_message (16 B)",
        per_call(200_000, || {
            let r = noop.on_message(&conn, Direction::ClientToUpstream, Opcode::Text, b"hello");
            assert_eq!(r, Ok(Action::FORWARD));
        }),
    ));
    let kib = vec![b'x'; 4096];
    rows.push((
        "on-message no-op, Plugin::on_message (4 KiB)",
        per_call(100_000, || {
            noop.on_message(&conn, Direction::ClientToUpstream, Opcode::Binary, &kib)
                .unwrap();
        }),
    ));
    // Two threads calling one plugin at once, as two runtime workers do: what sharing the
    // plugin's instances between cores costs (the mean of the two threads' figures).
    rows.push((
        "on-message no-op, Plugin::on_message, 2 threads at once",
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let conn = ConnContext::new(2, "10.0.0.2:40000".parse().unwrap(), "/");
                        per_call(400_000, || {
                            noop.on_message(&conn, Direction::ClientToUpstream, Opcode::Text, b"hello")
                                .unwrap();
                        })
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum::<Duration>() / 2
        }),
    ));

    let least = rt
        .load(&PluginSpec::new("least", wasm("least_conn")))
        .unwrap();
    for (name, n, label) in [
        ("select, least_conn, 1 candidate", 1, true),
        ("select, least_conn, 10 candidates", 10, true),
        ("select, least_conn, 100 candidates", 100, true),
        ("select, least_conn, 100 candidates, no labels", 100, false),
    ] {
        let (servers, cands) = pool(n, label);
        rows.push((
            name,
            per_call(20_000, || {
                // least-conn ranks only the 3 servers the host would try (max_attempts).
                assert_eq!(least.select(&conn, &servers, &cands).unwrap().len(), n.min(3))
            }),
        ));
    }
    let mut instance = least.pool.take(std::time::Duration::from_secs(1)).unwrap();
    instance.store.set_epoch_deadline(u64::MAX / 2);
    let (servers, cands) = pool(100, true);
    rows.push((
        "select, least_conn, 100 candidates, raw typed call",
        per_call(20_000, || {
            let guard = HostState::enter(&mut instance.store, &conn).with_pool(&servers);
            assert!(matches!(
                instance.exports.select(guard.store, &cands),
                Some(Ok(_))
            ));
        }),
    ));
    least.pool.put(instance);
    // hash reads the pool's addresses (once per pool version) to build its ring.
    let hash = rt.load(&PluginSpec::new("hash", wasm("hash"))).unwrap();
    let (servers, cands) = pool(100, true);
    rows.push((
        "select, hash (ring cached), 100 candidates",
        per_call(20_000, || {
            assert_eq!(hash.select(&conn, &servers, &cands).unwrap().len(), 100)
        }),
    ));

    // jwt-auth on a browser-like upgrade request with an HS256 token.
    let secret = "0123456789abcdef0123456789abcdef";
    let jwt = rt
        .load(&PluginSpec {
            config_json: format!(
                r#"{{"secret":"{secret}","audience":"bench","claims_to_headers":{{"sub":"x-user-id"}}}}"#
            ),
            ..PluginSpec::new("jwt", wasm("jwt_auth"))
        })
        .unwrap();
    let req = browser_request(&hs256_token(secret, r#"{"sub":"user-1","aud":"bench","exp":4102444800}"#));
    rows.push((
        "on-handshake, jwt-auth HS256, accept kept (no call)",
        per_call(20_000, || {
            let c = ConnContext::new(1, "10.0.0.1:40000".parse().unwrap(), "/");
            assert!(matches!(jwt.on_handshake(&c, &req), Ok(Verdict::Accept(_))));
        }),
    ));
    // The same with the gateway's verdict cache off: a call, jwt-auth's own cache hit.
    let jwt_called = rt
        .load(&PluginSpec {
            config_json: format!(
                r#"{{"secret":"{secret}","audience":"bench","claims_to_headers":{{"sub":"x-user-id"}}}}"#
            ),
            verdict_cache_size: 0,
            ..PluginSpec::new("jwt-called", wasm("jwt_auth"))
        })
        .unwrap();
    rows.push((
        "on-handshake, jwt-auth HS256, called, 12 headers",
        per_call(20_000, || {
            let c = ConnContext::new(1, "10.0.0.1:40000".parse().unwrap(), "/");
            assert!(matches!(jwt_called.on_handshake(&c, &req), Ok(Verdict::Accept(_))));
        }),
    ));
    // A token this instance has not verified before: the HMAC, and the claims parsed.
    let jwt_uncached = rt
        .load(&PluginSpec {
            config_json: format!(
                r#"{{"secret":"{secret}","audience":"bench","claims_to_headers":{{"sub":"x-user-id"}},"verified_cache_size":0}}"#
            ),
            ..PluginSpec::new("jwt-uncached", wasm("jwt_auth"))
        })
        .unwrap();
    rows.push((
        "on-handshake, jwt-auth HS256, cache off, 12 headers",
        per_call(20_000, || {
            let c = ConnContext::new(1, "10.0.0.1:40000".parse().unwrap(), "/");
            assert!(matches!(jwt_uncached.on_handshake(&c, &req), Ok(Verdict::Accept(_))));
        }),
    ));
    let stamp = rt
        .load(&PluginSpec {
            config_json: r#"{"header":"x-a","value":"1"}"#.into(),
            ..PluginSpec::new("stamp", wasm("header_stamp"))
        })
        .unwrap();
    rows.push((
        "on-handshake, header-stamp, 12 headers",
        per_call(20_000, || {
            assert!(matches!(stamp.on_handshake(&conn, &req), Ok(Verdict::Accept(_))));
        }),
    ));

    // What lowering the headers costs: the same call with none.
    let bare = HandshakeRequest { headers: String::new(), ..req.clone() };
    rows.push((
        "on-handshake, header-stamp, 0 headers",
        per_call(20_000, || {
            assert!(matches!(stamp.on_handshake(&conn, &bare), Ok(Verdict::Accept(_))));
        }),
    ));

    rows.push((
        "instantiate + init (noop_messages)",
        per_call(500, || {
            noop.pool.make().unwrap();
        }),
    ));

    let registry = PluginRegistry::new(rt.clone());
    let spec = |prefix: &str| PluginSpec {
        config_json: format!(r#"{{"prefix":"{prefix}"}}"#),
        ..PluginSpec::new("tag", wasm("echo_tag"))
    };
    rows.push((
        "reconcile: first load, compile (echo_tag)",
        once(|| assert!(registry.reconcile(&[spec("a")]).is_ok())),
    ));
    let mut turn = 0;
    rows.push((
        "reconcile: config change (echo_tag)",
        per_call(20, || {
            turn += 1;
            assert!(registry.reconcile(&[spec(&turn.to_string())]).is_ok());
        }),
    ));
    rows.push((
        "reconcile: unchanged (echo_tag)",
        per_call(20, || {
            assert!(registry.reconcile(&[spec(&turn.to_string())]).is_ok())
        }),
    ));

    println!("\n{:<55} {:>14}", "what", "time");
    for (what, d) in rows {
        println!("{what:<55} {d:>14?}");
    }
}

