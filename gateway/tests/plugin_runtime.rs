//! The plugin runtime against real components: the shipped plugins and the misbehaving
//! fixtures in tests/plugins. Build them first:
//!   cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmgate::metrics::Registry;
use wasmgate::plugin::*;

fn wasm(crate_name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-wasip2/release")
        .join(format!("{crate_name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml",
        path.display()
    );
    path
}

fn options() -> RuntimeOptions {
    // Small pools: many test runtimes live at once, each reserving address space.
    RuntimeOptions {
        max_instances: 32,
        ..RuntimeOptions::default()
    }
}

fn runtime() -> Arc<PluginRuntime> {
    PluginRuntime::new(options(), Arc::new(Registry::new())).unwrap()
}

fn spec(name: &str, crate_name: &str, config: &str) -> PluginSpec {
    PluginSpec {
        config_json: config.to_string(),
        ..PluginSpec::new(name, wasm(crate_name))
    }
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("wasmgate-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn conn() -> ConnContext {
    ConnContext::new(7, "10.0.0.1:5555".parse().unwrap(), "/chat")
}

fn request(path: &str) -> HandshakeRequest {
    HandshakeRequest {
        method: "GET".into(),
        path: path.into(),
        ..Default::default()
    }
}

/// A pool of `addresses`, each labelled zone=a, as the gateway lends it to `select`.
fn pool(addresses: &[&str]) -> PoolInfo {
    PoolInfo {
        name: "pool".into(),
        version: 1,
        max_attempts: 3,
        servers: addresses
            .iter()
            .map(|a| ServerInfo {
                address: (*a).into(),
                weight: 1,
                labels: Arc::new([("zone".to_string(), "a".to_string())]),
            })
            .collect(),
    }
}

fn candidate(server: u32, active: u32) -> Candidate {
    Candidate { server, weight: 1, active, ewma_connect_us: 100, ..Candidate::default() }
}

fn replaced(payload: &[u8]) -> Action {
    Action::Forward { payload: Some(payload.to_vec()), compress: true }
}

#[test]
fn message_plugin_exports_only_its_hook_and_forwards() {
    let rt = runtime();
    let p = rt.load(&spec("noop", "noop_messages", "{}")).unwrap();
    assert_eq!(
        p.hooks(),
        Hooks {
            messages: true,
            ..Hooks::default()
        }
    );
    let c = conn();
    for _ in 0..3 {
        let a = p
            .on_message(&c, Direction::ClientToUpstream, Opcode::Text, b"hi")
            .unwrap();
        assert_eq!(a, Action::FORWARD);
    }
    // Hooks it lacks answer without Wasm.
    assert_eq!(
        p.on_handshake(&c, &request("/")).unwrap(),
        Verdict::Accept(Accept::default())
    );
    assert_eq!(
        p.select(&c, &pool(&[]), &[]),
        Err(PluginError::NotImplemented("select"))
    );
    let info = p.info();
    assert_eq!((info.calls, info.errors), (3, 0));
    assert!(info.idle_instances >= 1, "{info:?}");
    assert_eq!(info.hash.len(), 64);
}

#[test]
fn config_reaches_init_and_replace_is_returned() {
    let rt = runtime();
    let p = rt
        .load(&spec("tag", "echo_tag", r#"{"prefix":"v1:"}"#))
        .unwrap();
    let c = conn();
    let a = p
        .on_message(&c, Direction::ClientToUpstream, Opcode::Text, b"hello")
        .unwrap();
    assert_eq!(a, replaced(b"v1:hello"));
    let a = p
        .on_message(&c, Direction::UpstreamToClient, Opcode::Text, b"hello")
        .unwrap();
    assert_eq!(a, Action::FORWARD);
}

#[test]
fn every_message_action_arrives_with_its_payload_or_reason() {
    let rt = runtime();
    let p = rt.load(&spec("actions", "message_actions", "{}")).unwrap();
    let c = conn();
    let send = |text: &str| {
        p.on_message(&c, Direction::ClientToUpstream, Opcode::Text, text.as_bytes())
            .unwrap()
    };
    assert_eq!(send("plain"), Action::FORWARD);
    assert_eq!(send("drop"), Action::Drop);
    assert_eq!(
        send("close"),
        Action::Close(CloseFrame { code: 4000, reason: "asked to close".into() })
    );
    // A reply without a payload set sends the message itself back.
    assert_eq!(send("echo"), Action::Reply(b"echo".to_vec()));
    assert_eq!(send("reply:pong"), Action::Reply(b"pong".to_vec()));
    assert_eq!(send("upper:abc"), replaced(b"UPPER:ABC"));
    assert_eq!(
        send("raw:zip"),
        Action::Forward { payload: None, compress: false }
    );
    // Edits do not leak into the next call.
    assert_eq!(send("plain"), Action::FORWARD);
    // Long upstream messages: the plugin reads only the length.
    let big = vec![b'x'; 100_000];
    let a = p
        .on_message(&c, Direction::UpstreamToClient, Opcode::Binary, &big)
        .unwrap();
    assert_eq!(a, Action::FORWARD);
    assert_eq!(p.info().errors, 0);
}

#[test]
fn a_balancer_reads_addresses_from_the_pool_and_skips_servers_that_are_down() {
    let rt = runtime();
    let hash = rt
        .load(&spec("hash", "hash", r#"{"key":"header:x-user"}"#))
        .unwrap();
    let servers = pool(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]);
    let all: Vec<Candidate> = (0..4).map(|i| candidate(i, 0)).collect();
    let first = |cands: &[Candidate], user: &str| {
        let c = conn();
        c.set_meta("hash-key", user).unwrap();
        cands[hash.select(&c, &servers, cands).unwrap()[0] as usize].server
    };
    for user in ["ann", "bob", "cid", "dee", "eve"] {
        let home = first(&all, user);
        assert_eq!(first(&all, user), home, "the same key goes to the same server");
        // Its server is down (not a candidate): the key goes elsewhere, then comes back.
        let up: Vec<Candidate> = all.iter().copied().filter(|c| c.server != home).collect();
        assert_ne!(first(&up, user), home);
        assert_eq!(first(&all, user), home);
    }
    assert_eq!(hash.info().errors, 0);
}

/// 0.6.1 only added an import (`verdicts`): a component built for 0.6.0 loads and runs, its
/// imports given the 0.6.1 functions.
#[test]
fn a_plugin_built_for_contract_0_6_0_still_loads_and_runs() {
    let rt = runtime();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/contract-0.6.0.wasm");
    let c = rt.load(&PluginSpec::new("least-active", path)).unwrap();
    assert!(c.hooks().balancer);
    let servers = pool(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
    let order = c.select(&conn(), &servers, &[candidate(0, 5), candidate(1, 1), candidate(2, 3)]).unwrap();
    assert_eq!(order[0], 1, "the least active first: {order:?}");
    assert_eq!(c.info().errors, 0);
}

#[test]
fn a_plugin_built_for_another_contract_version_is_refused_by_name() {
    let rt = runtime();
    for version in ["0.1.0", "0.2.0"] {
        let old = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/contract-{version}.wasm"));
        let err = rt.load(&PluginSpec::new("old", old)).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains(&format!(
                "built for wasmgate:plugin@{version}; this gateway speaks @0.6.1"
            )),
            "{text}"
        );
    }
}

#[test]
fn init_errors_reject_the_load_with_their_text() {
    let rt = runtime();
    let err = rt.load(&spec("tag", "echo_tag", "{}")).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("plugin `tag`") && text.contains("prefix"),
        "{text}"
    );
    let err = rt.load(&spec("fail", "fail_init", "{}")).unwrap_err();
    assert!(
        format!("{err:#}").contains("fail-init never accepts a config"),
        "{err:#}"
    );
}

#[test]
fn handshake_sees_the_connection_and_its_metadata() {
    let rt = runtime();
    let setter = rt
        .load(&spec(
            "auth",
            "header_stamp",
            r#"{"header":"x-auth","value":"alice","set_meta":"user"}"#,
        ))
        .unwrap();
    let copier = rt
        .load(&spec(
            "copy",
            "header_stamp",
            r#"{"header":"x-gw","value":"1","copy_meta":"user"}"#,
        ))
        .unwrap();
    assert_eq!(
        setter.hooks(),
        Hooks {
            handshake: true,
            ..Hooks::default()
        }
    );
    let c = conn();
    let Verdict::Accept(a) = setter.on_handshake(&c, &request("/chat")).unwrap() else {
        panic!("rejected")
    };
    assert_eq!(
        a.add_headers,
        vec![Header {
            name: "x-auth".into(),
            value: "alice".into()
        }]
    );
    assert_eq!(c.meta("user").as_deref(), Some("alice"));
    let Verdict::Accept(a) = copier.on_handshake(&c, &request("/chat")).unwrap() else {
        panic!("rejected")
    };
    assert!(a.add_headers.contains(&Header {
        name: "x-meta-user".into(),
        value: "alice".into()
    }));
}

#[test]
fn balancers_rank_candidates() {
    let rt = runtime();
    let least = rt.load(&spec("lc", "least_conn", "{}")).unwrap();
    let c = conn();
    let servers = pool(&["a:1", "b:1", "c:1"]);
    let cands = [candidate(0, 5), candidate(1, 0), candidate(2, 9)];
    let order = least.select(&c, &servers, &cands).unwrap();
    assert_eq!(order.len(), 3);
    assert_eq!(order[0], 1);

    // round-robin keeps its turn in kv, shared by all its instances.
    let rr = rt.load(&spec("rr", "round_robin", "{}")).unwrap();
    let firsts: Vec<u32> = (0..3)
        .map(|_| rr.select(&c, &servers, &cands).unwrap()[0])
        .collect();
    let mut sorted = firsts.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 1, 2], "{firsts:?}");
}

#[test]
fn an_endless_loop_times_out_and_the_plugin_recovers() {
    let rt = runtime();
    let timeout = Duration::from_millis(20);
    let p = rt
        .load(&PluginSpec {
            message_timeout: timeout,
            ..spec("loop", "hostile_loop", "{}")
        })
        .unwrap();
    let c = conn();
    for _ in 0..2 {
        let start = Instant::now();
        let r = p.on_message(&c, Direction::ClientToUpstream, Opcode::Binary, b"x");
        let took = start.elapsed();
        assert_eq!(r, Err(PluginError::Timeout(timeout)));
        assert!(
            took >= timeout && took < timeout + Duration::from_millis(300),
            "{took:?}"
        );
    }
    // Each timed-out instance was discarded, and fresh ones are made for the next calls.
    let info = p.info();
    assert_eq!((info.timeouts, info.errors), (2, 2));
    let refilled = Instant::now();
    while p.info().idle_instances == 0 {
        assert!(refilled.elapsed() < Duration::from_secs(5), "no instance was made again");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The runtime is unharmed: another plugin works.
    let noop = rt.load(&spec("noop", "noop_messages", "{}")).unwrap();
    assert_eq!(
        noop.on_message(&c, Direction::ClientToUpstream, Opcode::Text, b"x"),
        Ok(Action::FORWARD)
    );
}

#[test]
fn memory_growth_stops_at_the_limit() {
    let rt = runtime();
    let p = rt
        .load(&PluginSpec {
            memory_limit: 16 << 20,
            // Generous: only the memory limit should stop it, even on a busy machine.
            handshake_timeout: Duration::from_secs(5),
            ..spec("mem", "hostile_memory", "{}")
        })
        .unwrap();
    let r = p.on_handshake(&conn(), &request("/"));
    assert_eq!(r, Err(PluginError::MemoryLimit(16 << 20)));
    assert_eq!(p.info().memory_limit_hits, 1);
}

#[test]
fn traps_and_panics_fail_the_call_even_on_a_tokio_worker() {
    let rt = runtime();
    let trap = rt.load(&spec("trap", "hostile_trap", "{}")).unwrap();
    let panic = rt.load(&spec("panic", "hostile_panic", "{}")).unwrap();
    // The panic message is written to stderr: that must not block or panic on a worker.
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let (t, p) = tokio.block_on(async move {
        tokio::spawn(async move {
            let c = conn();
            (
                trap.on_handshake(&c, &request("/")),
                panic.on_handshake(&c, &request("/x")),
            )
        })
        .await
        .unwrap()
    });
    assert!(
        matches!(&t, Err(PluginError::Trap(m)) if m.contains("unreachable")),
        "{t:?}"
    );
    assert!(matches!(&p, Err(PluginError::Trap(_))), "{p:?}");
}

#[test]
fn components_without_lifecycle_or_garbage_are_refused() {
    let rt = runtime();
    let dir = TempDir::new("bad");
    let empty = dir.0.join("empty.wasm");
    // The smallest valid component: header only, no exports.
    std::fs::write(&empty, [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00]).unwrap();
    let err = format!(
        "{:#}",
        rt.load(&PluginSpec::new("empty", &empty)).unwrap_err()
    );
    assert!(err.contains("wasmgate:plugin/lifecycle"), "{err}");
    let garbage = dir.0.join("garbage.wasm");
    std::fs::write(&garbage, b"not wasm at all").unwrap();
    let err = format!(
        "{:#}",
        rt.load(&PluginSpec::new("garbage", &garbage)).unwrap_err()
    );
    assert!(
        err.contains("plugin `garbage`") && err.contains("not a valid WebAssembly component"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        rt.load(&PluginSpec::new("gone", dir.0.join("missing.wasm")))
            .unwrap_err()
    );
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn reconcile_swaps_versions_and_keeps_the_old_one_on_failure() {
    let dir = TempDir::new("reload");
    let file = dir.0.join("plugin.wasm");
    std::fs::copy(wasm("echo_tag"), &file).unwrap();
    let registry = PluginRegistry::new(runtime());
    let tag = |prefix: &str| PluginSpec {
        config_json: format!(r#"{{"prefix":"{prefix}"}}"#),
        ..PluginSpec::new("tag", &file)
    };
    let report = registry.reconcile(&[tag("a:"), spec("noop", "noop_messages", "{}")]);
    assert!(report.is_ok(), "{report}");

    let slot = registry.get("tag").unwrap();
    let held = slot.current().clone();
    let c = conn();
    let send = |p: &Plugin| {
        p.on_message(&c, Direction::ClientToUpstream, Opcode::Text, b"m")
            .unwrap()
    };
    assert_eq!(send(&slot.current()), replaced(b"a:m"));

    // Same bytes and settings: nothing reloads.
    let report = registry.reconcile(&[tag("a:"), spec("noop", "noop_messages", "{}")]);
    assert!(
        report
            .plugins
            .iter()
            .all(|p| p.outcome == ReloadOutcome::Unchanged),
        "{report}"
    );

    // A config change reaches the held slot; the version held by a call in flight still works.
    let report = registry.reconcile(&[tag("b:")]);
    assert!(
        matches!(report.plugins[0].outcome, ReloadOutcome::Loaded { .. }),
        "{report}"
    );
    assert_eq!(report.plugins[1].outcome, ReloadOutcome::Removed);
    assert_eq!(send(&slot.current()), replaced(b"b:m"));
    assert_eq!(send(&held), replaced(b"a:m"));
    assert!(registry.get("noop").is_none());

    // Garbage bytes, then a failing init: rejected, and version b keeps serving.
    std::fs::write(&file, b"garbage").unwrap();
    let report = registry.reconcile(&[tag("c:")]);
    assert!(!report.is_ok());
    let (name, error) = report.failures().next().unwrap();
    assert_eq!(name, "tag");
    assert!(
        error.contains("not a valid WebAssembly component"),
        "{error}"
    );
    std::fs::copy(wasm("fail_init"), &file).unwrap();
    let report = registry.reconcile(&[tag("c:")]);
    assert!(
        report.failures().next().unwrap().1.contains("init refused"),
        "{report}"
    );
    assert_eq!(
        send(&registry.get("tag").unwrap().current()),
        replaced(b"b:m")
    );

    let list = registry.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "tag");
    assert!(list[0].calls >= 4);
    let json = serde_json::to_string(&list).unwrap();
    assert!(
        json.contains("\"hooks\":{\"handshake\":false,\"balancer\":false,\"messages\":true"),
        "{json}"
    );
}

#[test]
fn compiled_components_are_cached_and_a_corrupt_entry_is_recompiled() {
    let dir = TempDir::new("cache");
    let opts = RuntimeOptions {
        cache_dir: Some(dir.0.clone()),
        ..options()
    };
    let rt = PluginRuntime::new(opts.clone(), Arc::new(Registry::new())).unwrap();
    rt.load(&spec("noop", "noop_messages", "{}")).unwrap();
    let entries: Vec<PathBuf> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].extension().is_some_and(|e| e == "cwasm"));

    let rt = PluginRuntime::new(opts, Arc::new(Registry::new())).unwrap();
    rt.load(&spec("noop", "noop_messages", "{}")).unwrap();
    // Damaged the way the cache can see it: replaced by rename (entries are never written
    // in place; the instances already made from the old file keep running from its pages).
    let tmp = dir.0.join("corrupt.tmp");
    std::fs::write(&tmp, b"corrupt").unwrap();
    std::fs::rename(&tmp, &entries[0]).unwrap();
    let p = rt.load(&spec("noop", "noop_messages", "{}")).unwrap();
    assert_eq!(
        p.on_message(&conn(), Direction::ClientToUpstream, Opcode::Text, b"x"),
        Ok(Action::FORWARD)
    );
    assert!(
        std::fs::metadata(&entries[0]).unwrap().len() > 1000,
        "the entry was rewritten"
    );
}

#[test]
fn instances_are_shared_and_capped() {
    let rt = runtime();
    let p = rt
        .load(&PluginSpec {
            max_instances: 2,
            // Eight threads share at most two idle instances: a call often finds none and
            // waits, for one to be made or for another call to give one back (the refiller
            // makes none while two idle, so a waiter that only its news woke timed out here).
            message_timeout: Duration::from_secs(2),
            ..spec("noop", "noop_messages", "{}")
        })
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let p = &p;
            s.spawn(move || {
                let c = ConnContext::new(t, "10.0.0.1:1".parse().unwrap(), "/");
                for _ in 0..2000 {
                    let a = p
                        .on_message(&c, Direction::ClientToUpstream, Opcode::Binary, b"x")
                        .unwrap();
                    assert_eq!(a, Action::FORWARD);
                }
            });
        }
    });
    let info = p.info();
    assert_eq!(info.calls, 16_000);
    assert!(info.idle_instances <= 2);
    // Connections cost only their context, never an instance.
    assert!(std::mem::size_of::<ConnContext>() <= 256);
}

#[test]
fn call_counters_are_exported_as_metrics() {
    let metrics = Arc::new(Registry::new());
    let rt = PluginRuntime::new(options(), metrics.clone()).unwrap();
    let p = rt.load(&spec("noop", "noop_messages", "{}")).unwrap();
    p.on_message(&conn(), Direction::ClientToUpstream, Opcode::Text, b"x")
        .unwrap();
    let text = metrics.render();
    assert!(
        text.contains("wasmgate_plugins_calls_total{hook=\"message\",plugin=\"noop\"} 1"),
        "{text}"
    );
}

#[test]
fn watch_reports_a_file_replaced_by_rename() {
    let dir = TempDir::new("watch");
    let target = dir.0.join("gateway.toml");
    std::fs::write(&target, "a").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let _guard = watch(vec![target.clone()], move || {
        let _ = tx.send(());
    })
    .unwrap();
    std::fs::write(dir.0.join("unrelated.txt"), "x").unwrap();
    let tmp = dir.0.join(".gateway.toml.tmp");
    std::fs::write(&tmp, "b").unwrap();
    std::fs::rename(&tmp, &target).unwrap();
    rx.recv_timeout(Duration::from_secs(5))
        .expect("no change reported");
    // One debounced call for the burst.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
}

/// Every WASI interface Rust's std links, called from a hook on a Tokio worker (where
/// wasmtime-wasi's synchronous bindings would `block_on` and panic): each ends as an error
/// the plugin sees, a harmless result, or a trap, and the runtime keeps serving.
#[test]
fn every_wasi_interface_ends_as_an_error_a_result_or_a_trap_on_a_tokio_worker() {
    let rt = runtime();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // A live listener, so a connect that got through would succeed.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    enum Want {
        Error,
        Seen(&'static str),
        Trap(&'static str),
    }
    let cases = [
        ("fs-read", Want::Error),
        ("fs-write", Want::Error),
        ("fs-list", Want::Error),
        ("env", Want::Seen("0 variables")),
        ("args", Want::Seen("0 arguments")),
        ("stdin", Want::Seen("0 bytes from stdin")),
        ("stdout-flood", Want::Seen("flooded")),
        ("tcp-connect", Want::Error),
        ("tcp-listen", Want::Error),
        ("udp-bind", Want::Error),
        ("udp-send", Want::Error),
        ("dns", Want::Error),
        ("sleep", Want::Trap("wasi:io/poll")),
        ("random", Want::Seen("true")),
        ("exit", Want::Trap("exit")),
        ("abort", Want::Trap("unreachable")),
    ];
    for (op, want) in cases {
        let config = format!(r#"{{"op":"{op}","target":"{target}"}}"#);
        // Generous: writing a megabyte to the log takes a while on a busy machine, and
        // this test is about how calls end, not how fast.
        let slow_ok = PluginSpec { handshake_timeout: Duration::from_secs(5), ..spec(op, "hostile_wasi", &config) };
        let p = rt.load(&slow_ok).unwrap();
        let got = tokio.block_on(async move {
            tokio::spawn(async move { p.on_handshake(&conn(), &request("/")) })
                .await
                .expect("the call does not panic the worker")
        });
        match (&want, &got) {
            (Want::Error, Ok(Verdict::Reject(r))) if r.status == 418 => {}
            (Want::Seen(seen), Ok(Verdict::Accept(a)))
                if a.add_headers == [Header { name: "x-observed".into(), value: seen.to_string() }] => {}
            (Want::Trap(text), Err(PluginError::Trap(m))) if m.contains(text) => {}
            _ => panic!("{op}: {got:?}"),
        }
    }
    // Not one connection reached the listener.
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err());
    // The clocks work and the runtime is unharmed.
    let clock = rt.load(&spec("clock", "hostile_wasi", r#"{"op":"clock"}"#)).unwrap();
    let Ok(Verdict::Accept(a)) = clock.on_handshake(&conn(), &request("/")) else { panic!() };
    assert!(a.add_headers[0].value.ends_with(" true"), "{a:?}");
}

/// Instances are made off the calling thread: a plugin whose later `init`s are slow makes
/// its own calls wait (at most their deadline) and fail, not the thread; one whose later
/// `init`s fail is not restarted in a loop but rests, doubling, and says why.
#[test]
fn slow_and_failing_instance_starts_cost_the_plugin_not_the_caller() {
    let rt = runtime();
    let slow = rt
        .load(&spec("slow", "hostile_slow_init", r#"{"slow_ms":600,"trap":true}"#))
        .unwrap();
    let c = conn();
    // The first call takes the instance made at load, and loses it to its trap.
    assert!(matches!(slow.on_handshake(&c, &request("/")), Err(PluginError::Trap(_))));
    // The next calls find none ready: each waits its 20 ms deadline, not 600 ms.
    for _ in 0..5 {
        let start = Instant::now();
        let r = slow.on_handshake(&c, &request("/"));
        assert!(matches!(&r, Err(PluginError::Unavailable(_)) | Err(PluginError::Trap(_))), "{r:?}");
        assert!(start.elapsed() < Duration::from_millis(200), "{:?}", start.elapsed());
    }

    let failing = rt
        .load(&spec("failing", "hostile_slow_init", r#"{"fail":true,"trap":true}"#))
        .unwrap();
    assert!(matches!(failing.on_handshake(&c, &request("/")), Err(PluginError::Trap(_))));
    let deadline = Instant::now() + Duration::from_secs(5);
    while failing.info().instance_failures == 0 {
        assert!(Instant::now() < deadline, "no failure recorded");
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    let r = failing.on_handshake(&c, &request("/"));
    assert!(start.elapsed() < Duration::from_millis(10), "no wait while resting: {:?}", start.elapsed());
    let Err(PluginError::Unavailable(why)) = r else { panic!("{r:?}") };
    assert!(why.contains("keep failing to start") && why.contains("fails on purpose"), "{why}");
    let info = failing.info();
    assert!(info.instance_backoff_ms > 0 && info.instance_backoff_ms <= 30_000, "{info:?}");
    assert!(info.last_instance_error.as_deref().unwrap().contains("init refused the configuration"), "{info:?}");
    // It rests, doubling: after a few seconds only a few attempts were made, not thousands.
    std::thread::sleep(Duration::from_millis(1600));
    let _ = failing.on_handshake(&c, &request("/"));
    let attempts = failing.info().instance_failures;
    assert!((2..=6).contains(&attempts), "{attempts} attempts in 1.6 s");
}

/// The `verdict-keeper` fixture: accepts with `x-call: N` (its call count, in kv) and keeps
/// them, varying on the parts given.
fn keeper(rt: &PluginRuntime, vary: &str, keep_ms: u64, tune: impl FnOnce(&mut PluginSpec)) -> Arc<Plugin> {
    let mut spec = spec("keeper", "verdict_keeper", &format!(r#"{{"vary":{vary},"keep_ms":{keep_ms}}}"#));
    tune(&mut spec);
    rt.load(&spec).unwrap()
}

fn with_headers(headers: &str) -> HandshakeRequest {
    HandshakeRequest { headers: headers.into(), ..request("/chat") }
}

/// The `x-call` header of an accept: which call made it.
fn call_number(p: &Plugin, c: &ConnContext, req: &HandshakeRequest) -> String {
    match p.on_handshake(c, req).unwrap() {
        Verdict::Accept(a) => a.add_headers.iter().find(|h| h.name == "x-call").expect("x-call").value.clone(),
        other => panic!("refused: {other:?}"),
    }
}

#[test]
fn kept_verdicts_are_given_again_without_a_call() {
    let rt = runtime();
    let p = keeper(&rt, r#"["x-user"]"#, 60_000, |_| {});
    let ann = with_headers("x-user: ann\n");
    assert_eq!(call_number(&p, &conn(), &ann), "1");
    // The same user, other headers not declared: the kept accept, metadata and all.
    let again = conn();
    assert_eq!(call_number(&p, &again, &with_headers("user-agent: x\nx-user: ann\n")), "1");
    assert_eq!(again.meta("user").as_deref(), Some("ann"));
    assert_eq!(p.info().calls, 1, "one call for two handshakes");
    // Another value of the part, a second value, no value, another route: calls.
    assert_eq!(call_number(&p, &conn(), &with_headers("x-user: bob\n")), "2");
    assert_eq!(call_number(&p, &conn(), &with_headers("x-user: ann\nx-user: ann\n")), "3");
    assert_eq!(call_number(&p, &conn(), &with_headers("")), "4");
    let admin = ConnContext::new(8, "10.0.0.1:5556".parse().unwrap(), "/admin");
    assert_eq!(call_number(&p, &admin, &ann), "5");
    // Refusals are never kept.
    for n in [6, 7] {
        match p.on_handshake(&conn(), &with_headers("x-user: eve\nx-deny: 1\n")).unwrap() {
            Verdict::Reject(r) => assert_eq!(r.reason, format!("denied by call {n}")),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(call_number(&p, &conn(), &ann), "1", "still kept");
    assert_eq!(p.info().calls, 7);
    // A new version of the plugin starts with none.
    let reloaded = keeper(&rt, r#"["x-user"]"#, 60_000, |_| {});
    assert_eq!(call_number(&reloaded, &conn(), &ann), "8");
}

#[test]
fn kept_verdicts_expire_and_the_operator_bounds_them() {
    let rt = runtime();
    // The plugin's own time.
    let p = keeper(&rt, r#"["x-user", ":client-ip"]"#, 100, |_| {});
    let ann = with_headers("x-user: ann\n");
    assert_eq!(call_number(&p, &conn(), &ann), "1");
    assert_eq!(call_number(&p, &conn(), &ann), "1");
    // The client's IP is a declared part; its port is not.
    assert_eq!(call_number(&p, &ConnContext::new(9, "10.0.0.1:6000".parse().unwrap(), "/chat"), &HandshakeRequest { client_addr: "10.0.0.1:6000".into(), ..ann.clone() }), "2");
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(call_number(&p, &conn(), &ann), "3", "expired");
    // The operator's cap is shorter than the plugin asks.
    let capped = keeper(&rt, r#"["x-user"]"#, 60_000, |s| s.verdict_cache_max_ttl = Duration::from_millis(100));
    let first = call_number(&capped, &conn(), &ann);
    assert_eq!(call_number(&capped, &conn(), &ann), first);
    std::thread::sleep(Duration::from_millis(150));
    assert_ne!(call_number(&capped, &conn(), &ann), first, "capped");
    // Turned off: a call every time.
    let off = keeper(&rt, r#"["x-user"]"#, 60_000, |s| s.verdict_cache_size = 0);
    let calls = off.info().calls;
    let a = call_number(&off, &conn(), &ann);
    assert_ne!(call_number(&off, &conn(), &ann), a);
    assert_eq!(off.info().calls - calls, 2);
}

#[test]
fn verdicts_are_declared_in_init_and_kept_only_from_on_handshake() {
    let rt = runtime();
    for bad in [r#"["X-User"]"#, r#"[":method"]"#, r#"[]"#, r#"["a","b","c","d","e","f","g","h","i"]"#] {
        let err = rt
            .load(&spec("keeper", "verdict_keeper", &format!(r#"{{"vary":{bad},"keep_ms":1000}}"#)))
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("verdicts.vary-on"), "{bad}: {text}");
    }
    let p = rt
        .load(&spec("keeper", "verdict_keeper", r#"{"vary":["x-user"],"keep_ms":1000,"keep_in_close":true}"#))
        .unwrap();
    p.on_close(&conn(), 1000, ConnStats::default());
    assert_eq!(p.info().traps, 1, "keep from on-close is refused");
}
