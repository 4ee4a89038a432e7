//! Balancing and high availability end to end: the shipped balancer plugins measured over
//! real connections to several echo backends (each answers `whoami` with its name), health
//! checks and passive ejection with a backend killed and restarted, draining with 1012 at a
//! rate, removal by reload, and rebalancing after servers were added.
//!
//! The distributions measured are printed (`cargo test --release --test balancing -- --nocapture`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// When a connection attempt was made, and the backend it reached or the error.
type Outcome = (Instant, Result<String, String>);
/// A connection's backend, the close code it ended with (None while open), and when.
type Ending = (String, Option<u16>, Option<Instant>);

/// The tests here measure timings and distributions: they run one at a time, so that they
/// do not compete for the CPU with each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A plugin table; `krate` is a crate name under plugins/.
fn plugin(name: &str, krate: &str, extra: &str) -> String {
    format!("[[plugin]]\nname = \"{name}\"\nwasm = \"{}\"\n{extra}\n", plugin_wasm(krate).display())
}

/// Upstream `echo` with `servers` and `upstream_extra` keys, route `/` with `chain`, and
/// plugin tables.
fn config(servers: &str, upstream_extra: &str, chain: &str, plugins: &str) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nadmin_token = \"{ADMIN_TOKEN}\"\n\n\
         [[upstream]]\nname = \"echo\"\nservers = {servers}\nconnect_timeout_ms = 1000\n{upstream_extra}\n\n\
         {plugins}\n[[route]]\npath = \"/\"\nupstream = \"echo\"\nplugins = [{chain}]\n"
    )
}

/// The backends' addresses with weights, as a TOML array of tables.
fn weighted_list(servers: &[EchoServer], weights: &[u32]) -> String {
    let items: Vec<String> = servers
        .iter()
        .zip(weights)
        .map(|(s, w)| format!("{{ address = \"{}\", weight = {w} }}", s.addr))
        .collect();
    format!("[{}]", items.join(", "))
}

async fn reload(gw: &Gateway, toml: &str) {
    let config = Config::parse(toml, "test.toml", repo_root()).expect("valid config");
    let report = gw.reload(config).await.expect("reload applies");
    assert!(report.is_ok(), "{report:?}");
}

/// An admin request; the status and the JSON body.
async fn admin(gw: &Gateway, method: &str, path: &str) -> (u16, serde_json::Value) {
    let (status, text) = admin_request(gw, method, path).await;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_string())))
}

/// `GET /upstreams`, the servers of pool `echo` by address.
async fn servers(gw: &Gateway) -> BTreeMap<String, serde_json::Value> {
    let (status, body) = admin(gw, "GET", "/upstreams").await;
    assert_eq!(status, 200, "{body}");
    let pool = body["pools"].as_array().unwrap().iter().find(|p| p["name"] == "echo").unwrap().clone();
    pool["servers"].as_array().unwrap().iter().map(|s| (s["address"].as_str().unwrap().to_string(), s.clone())).collect()
}

/// Active connections per backend name, from `GET /upstreams`.
async fn actives(gw: &Gateway, backends: &[EchoServer]) -> Vec<u64> {
    let status = servers(gw).await;
    backends.iter().map(|b| status.get(&b.addr.to_string()).map_or(0, |s| s["active"].as_u64().unwrap())).collect()
}

/// Connects, asks `whoami`, closes; the backend's name or what went wrong.
async fn whoami_once(url: &str) -> Result<String, String> {
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    ws.send(Message::text("whoami")).await.map_err(|e| e.to_string())?;
    let name = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(name)))) => break name.to_string(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => return Err(format!("no whoami answer: {other:?}")),
        }
    };
    let _ = ws.close(None).await;
    // Wait for the gateway's close reply, so the connection is gone before the next one.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {}
    Ok(name)
}

/// `n` whoami connections, `parallel` at a time; the names in order of the connections' index.
async fn whoami_many(url: &str, n: usize, parallel: usize, query: impl Fn(usize) -> String + Send + Sync + 'static) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(vec![String::new(); n]));
    let query = Arc::new(query);
    let mut workers = Vec::new();
    for _ in 0..parallel {
        let (next, results, query, url) = (next.clone(), results.clone(), query.clone(), url.to_string());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let name = whoami_once(&format!("{url}{}", query(i))).await.expect("whoami");
                results.lock().unwrap()[i] = name;
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

fn counts(names: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for n in names {
        *counts.entry(n.clone()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_even_within_one() {
    let _serial = SERIAL.lock().await;
    let backends = echo_backends(4).await;
    for (label, upstream_extra, plugins) in [
        ("round-robin plugin", "balancer = \"rr\"", plugin("rr", "round-robin", "")),
        ("host round robin", "", String::new()),
    ] {
        let gw = start_gateway(&config(&server_list(&backends), upstream_extra, "", &plugins)).await;
        let names = whoami_many(&ws_url(&gw, "/"), 402, 4, |_| String::new()).await;
        let counts = counts(&names);
        println!("{label}: 402 connections over 4 servers: {counts:?}");
        assert_eq!(counts.len(), 4, "{counts:?}");
        let (max, min) = (counts.values().max().unwrap(), counts.values().min().unwrap());
        assert!(max - min <= 1, "{label}: {counts:?}");
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_the_weights() {
    let _serial = SERIAL.lock().await;
    let backends = echo_backends(4).await;
    let weights = [1, 2, 3, 4];
    let toml = config(&weighted_list(&backends, &weights), "balancer = \"wrr\"", "", &plugin("wrr", "weighted-round-robin", ""));
    let gw = start_gateway(&toml).await;
    let n = 2000;
    let started = Instant::now();
    let names = whoami_many(&ws_url(&gw, "/"), n, 8, |_| String::new()).await;
    let counts = counts(&names);
    let total: u32 = weights.iter().sum();
    println!("weighted 1:2:3:4, {n} connections in {:?}: {counts:?}", started.elapsed());
    for (i, w) in weights.iter().enumerate() {
        let expected = n as f64 * *w as f64 / total as f64;
        let got = counts.get(&format!("b{i}")).copied().unwrap_or(0) as f64;
        let error = (got - expected).abs() / expected;
        println!("  b{i}: weight {w}, expected {expected}, got {got}, error {:.2}%", error * 100.0);
        assert!(error <= 0.02, "b{i}: {got} instead of {expected}: {counts:?}");
    }
    gw.shutdown().await;
}

/// Connections arrive steadily and live longer on some servers (b0 2 s, b1 1 s, b2 and b3
/// 0.5 s). Round robin would pile up 4:2:1:1; least-conn must keep active counts level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_levels_active_connections_under_skewed_lifetimes() {
    let _serial = SERIAL.lock().await;
    let backends = echo_backends(4).await;
    let toml = config(&server_list(&backends), "balancer = \"lc\"", "", &plugin("lc", "least-conn", ""));
    let gw = Arc::new(start_gateway(&toml).await);
    let url = ws_url(&gw, "/");
    let lifetime = |name: &str| match name {
        "b0" => Duration::from_millis(2000),
        "b1" => Duration::from_millis(1000),
        _ => Duration::from_millis(500),
    };
    let errors = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    let arrivals = 1000;
    let gap = Duration::from_millis(4);
    let started = tokio::time::Instant::now();
    let sampler = {
        let gw = gw.clone();
        let backends: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            tokio::time::sleep_until(started + Duration::from_millis(2500)).await;
            while started.elapsed() < Duration::from_millis(4000) {
                let status = servers(&gw).await;
                let active: Vec<u64> = backends.iter().map(|a| status[a]["active"].as_u64().unwrap()).collect();
                samples.push(active);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        })
    };
    for i in 0..arrivals {
        tokio::time::sleep_until(started + gap * i).await;
        let (url, errors) = (url.clone(), errors.clone());
        clients.push(tokio::spawn(async move {
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await else {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let _ = ws.send(Message::text("whoami")).await;
            let Some(Ok(Message::Text(name))) = ws.next().await else {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            tokio::time::sleep(lifetime(name.as_str())).await;
            let _ = ws.close(None).await;
            while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {}
        }));
    }
    let samples = sampler.await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0);
    let ratios: Vec<f64> = samples
        .iter()
        .map(|s| *s.iter().max().unwrap() as f64 / (*s.iter().min().unwrap()).max(1) as f64)
        .collect();
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let worst = ratios.iter().cloned().fold(0.0, f64::max);
    println!("least-conn, lifetimes 2 s/1 s/0.5 s/0.5 s, one arrival per {gap:?}: active per server {samples:?}");
    println!("  max/min active: mean {mean:.3}, worst {worst:.3} over {} samples", ratios.len());
    assert!(samples.iter().all(|s| s.iter().sum::<u64>() >= 100), "enough load to measure: {samples:?}");
    assert!(mean < 1.2, "mean max/min {mean}: {samples:?}");
    assert!(worst < 1.3, "worst max/min {worst}: {samples:?}");
    Arc::try_unwrap(gw).ok().unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_keeps_keys_and_moves_few_when_a_server_is_added() {
    let _serial = SERIAL.lock().await;
    let backends = echo_backends(5).await;
    // A large balance factor: concurrent test connections must not trigger the load bound.
    let hash = plugin("hash", "hash", "config = { key = \"query:user\", balance_factor = 10.0 }");
    let toml = |n: usize| config(&server_list(&backends[..n]), "balancer = \"hash\"", "\"hash\"", &hash);
    let gw = start_gateway(&toml(4)).await;
    let url = ws_url(&gw, "/");
    let keys = 2000;
    let started = Instant::now();
    let before = whoami_many(&url, keys, 16, |i| format!("?user=u{i}")).await;
    let one_pass = started.elapsed();
    let again = whoami_many(&url, keys, 16, |i| format!("?user=u{i}")).await;
    assert_eq!(before, again, "the same key goes to the same server");
    reload(&gw, &toml(5)).await;
    let after = whoami_many(&url, keys, 16, |i| format!("?user=u{i}")).await;
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let to_new = after.iter().zip(&before).filter(|(a, b)| a != b && a.as_str() == "b4").count();
    let share = moved as f64 / keys as f64;
    println!(
        "hash: {keys} keys, one pass {one_pass:?}; before {:?}; after adding b4 {:?}; moved {moved} ({:.1}%), {to_new} of them to b4",
        counts(&before),
        counts(&after),
        share * 100.0
    );
    assert!((0.10..=0.30).contains(&share), "{share}");
    assert_eq!(moved, to_new, "keys move only to the new server");
    gw.shutdown().await;
}

/// One hot key held open many times: the bounded load (ε = 0.25) spills it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_bounds_the_load_of_a_hot_key() {
    let _serial = SERIAL.lock().await;
    let backends = echo_backends(4).await;
    let hash = plugin("hash", "hash", "config = { key = \"query:user\", balance_factor = 0.25 }");
    let gw = start_gateway(&config(&server_list(&backends), "balancer = \"hash\"", "\"hash\"", &hash)).await;
    let mut held = Vec::new();
    let n = 40;
    for _ in 0..n {
        let mut ws = connect(&ws_url(&gw, "/?user=hot")).await;
        let Message::Text(_) = roundtrip(&mut ws, Message::text("whoami")).await else { panic!() };
        held.push(ws);
    }
    let active = actives(&gw, &backends).await;
    // ceil((1 + 0.25) * 40 / 4): the bound when the last connection was placed.
    let bound = ((1.25 * n as f64) / 4.0).ceil() as u64;
    println!("hash: {n} open connections with one key: active per server {active:?}, bound {bound}");
    assert_eq!(active.iter().sum::<u64>(), n as u64);
    assert!(active.iter().all(|&a| a <= bound), "{active:?} over {bound}");
    assert!(active.iter().max() == Some(&bound), "the hot key's server fills up to the bound: {active:?}");
    gw.shutdown().await;
}

/// b1 is killed while clients keep connecting: no client sees an error; the health checks
/// mark it down within interval × fall; restarted on the same port it is back after `rise`
/// good probes and gets connections again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_fails_over_is_ejected_and_comes_back() {
    let _serial = SERIAL.lock().await;
    let mut backends = echo_backends(3).await;
    let (interval, fall, rise) = (200u64, 3u64, 2u64);
    let health = format!("health = {{ interval_ms = {interval}, timeout_ms = 150, rise = {rise}, fall = {fall}, path = \"/health-probe\" }}");
    let gw = Arc::new(start_gateway(&config(&server_list(&backends), &health, "", "")).await);
    let url = ws_url(&gw, "/");
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (url, stop, seen) = (url.clone(), stop.clone(), seen.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = whoami_once(&url).await;
                seen.lock().unwrap().push((Instant::now(), result));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b1 = backends[1].addr;
    let is_healthy = |gw: Arc<Gateway>| async move { servers(&gw).await[&b1.to_string()]["healthy"].as_bool().unwrap() };
    assert!(is_healthy(gw.clone()).await);

    let killed = Instant::now();
    drop(backends.remove(1));
    while is_healthy(gw.clone()).await {
        assert!(killed.elapsed() < Duration::from_secs(5), "never marked down");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let down_after = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let restarted = Instant::now();
    let revived = EchoServer::start(&b1.to_string(), "b1").await.expect("rebind the same port");
    while !is_healthy(gw.clone()).await {
        assert!(restarted.elapsed() < Duration::from_secs(5), "never back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let up_after = restarted.elapsed();
    let back = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let errors: Vec<_> = seen.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let b1_after = seen.iter().filter(|(t, r)| *t > back && r.as_deref() == Ok("b1")).count();
    let b1_while_down = seen.iter().filter(|(t, r)| *t > killed + down_after && *t < restarted && r.as_deref() == Ok("b1")).count();
    println!(
        "failover: {} connections, {} errors; b1 marked down {down_after:?} after the kill (interval {interval} ms × fall {fall}), \
         up {up_after:?} after the restart (rise {rise}); {b1_after} connections to b1 once back",
        seen.len(),
        errors.len()
    );
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    assert!(down_after <= Duration::from_millis(interval * fall + 150), "{down_after:?}");
    assert!(up_after <= Duration::from_millis(interval * (rise + 1) + 150), "{up_after:?}");
    assert_eq!(b1_while_down, 0);
    assert!(b1_after > 0, "b1 gets connections again");
    drop(revived);
    Arc::try_unwrap(gw).ok().unwrap().shutdown().await;
}

/// Without health checks, connect failures eject a server; with every server down the
/// client gets a 503 that says so.
#[tokio::test]
async fn passive_ejection_and_all_servers_down() {
    let _serial = SERIAL.lock().await;
    let backends = echo_backends(1).await;
    let dead = dead_address();
    let servers_toml = format!("[\"{dead}\", \"{}\"]", backends[0].addr);
    let gw = start_gateway(&config(&servers_toml, "eject_after = 2", "", "")).await;
    for _ in 0..6 {
        assert_eq!(whoami_once(&ws_url(&gw, "/")).await.as_deref(), Ok("b0"));
    }
    let status = servers(&gw).await;
    let dead_status = &status[&dead.to_string()];
    println!("passive ejection: {dead_status}");
    assert!(dead_status["ejected_for_ms"].as_u64().unwrap() > 0 && !dead_status["available"].as_bool().unwrap());
    // Tried twice at most (round robin alternates): ejected after the second failure.
    assert_eq!(dead_status["recent_failures"], 2);
    gw.shutdown().await;

    let gw = start_gateway(&config(&format!("[\"{dead}\"]"), "eject_after = 1", "", "")).await;
    let (status, first) = raw_http(gw.listen_addr, &upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")).await;
    assert_eq!(status, 502, "{first}");
    let (status, second) = raw_http(gw.listen_addr, &upgrade_request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")).await;
    assert_eq!(status, 503, "{second}");
    assert!(second.contains("all servers of pool echo are down"), "{second}");
    gw.shutdown().await;
}

/// A client that keeps a connection open, reconnecting whenever the gateway closes it with
/// 1012. Records each connection's backend and how it ended.
struct Client {
    /// (backend, close code it ended with or None while open, when it ended).
    history: Arc<Mutex<Vec<Ending>>>,
    task: tokio::task::JoinHandle<()>,
}

fn reconnecting_client(url: String, stop: Arc<AtomicBool>) -> Client {
    let history: Arc<Mutex<Vec<Ending>>> = Arc::default();
    let log = history.clone();
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let mut ws = connect(&url).await;
            let Message::Text(name) = roundtrip(&mut ws, Message::text("whoami")).await else { panic!() };
            let index = {
                let mut log = log.lock().unwrap();
                log.push((name.to_string(), None, None));
                log.len() - 1
            };
            let code = loop {
                if stop.load(Ordering::Relaxed) {
                    let _ = ws.close(None).await;
                    return;
                }
                // A message every 50 ms; a close frame ends this connection.
                if ws.send(Message::text("ping")).await.is_err() {
                    break 1006;
                }
                match tokio::time::timeout(Duration::from_millis(50), ws.next()).await {
                    Ok(Some(Ok(Message::Close(frame)))) => break frame.map_or(1005, |f| u16::from(f.code)),
                    Ok(Some(Ok(_))) | Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    Ok(Some(Err(_)) | None) => break 1006,
                }
            };
            log.lock().unwrap()[index] = (name.to_string(), Some(code), Some(Instant::now()));
            if code != 1012 {
                return;
            }
        }
    });
    Client { history, task }
}

fn open_per_backend(clients: &[Client]) -> BTreeMap<String, usize> {
    let mut open = BTreeMap::new();
    for c in clients {
        if let Some((name, None, _)) = c.history.lock().unwrap().last() {
            *open.entry(name.clone()).or_insert(0) += 1;
        }
    }
    open
}

fn metric(gw: &Gateway, cause: &str) -> u64 {
    let text = gw.metrics_text();
    text.lines()
        .find(|l| l.starts_with("wasmgate_upstream_drained_connections_total") && l.contains(&format!("cause=\"{cause}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Closes of connections to `backend` with their times.
fn closes_of(clients: &[Client], backend: &str) -> Vec<(Option<u16>, Option<Instant>)> {
    let mut out = Vec::new();
    for c in clients {
        for (name, code, at) in c.history.lock().unwrap().iter() {
            if name == backend {
                out.push((*code, *at));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_connections_at_the_rate_and_removal_drains_too() {
    let _serial = SERIAL.lock().await;
    let backends = echo_backends(3).await;
    let toml = |n: usize| config(&server_list(&backends[..n]), "drain_secs = 1", "", "");
    let gw = start_gateway(&toml(3)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<Client> = (0..30).map(|_| reconnecting_client(ws_url(&gw, "/"), stop.clone())).collect();
    assert!(eventually(Duration::from_secs(10), || open_per_backend(&clients).values().sum::<usize>() == 30).await);
    let before = open_per_backend(&clients);
    assert_eq!(before.values().copied().collect::<Vec<_>>(), [10, 10, 10], "{before:?}");

    // Drain b0 at 20 connections per second: its 10 leave over about 0.45 s.
    let b0 = backends[0].addr.to_string();
    let asked = Instant::now();
    let (status, body) = admin(&gw, "POST", &format!("/upstreams/echo/servers/{b0}/drain?rate=20")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["closing"], 10, "connections register their close signal when the relay starts: {body}");
    assert!(eventually(Duration::from_secs(5), || closes_of(&clients, "b0").iter().all(|(code, _)| code.is_some())).await);
    let closes = closes_of(&clients, "b0");
    assert!(closes.iter().all(|(code, _)| *code == Some(1012)), "every drained connection got 1012: {closes:?}");
    let times: Vec<Duration> = closes.iter().map(|(_, at)| at.unwrap() - asked).collect();
    let (first, last) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    assert!(eventually(Duration::from_secs(5), || open_per_backend(&clients).values().sum::<usize>() == 30).await);
    let after = open_per_backend(&clients);
    println!("drain b0 at 20/s: 10 closes with 1012 from {first:?} to {last:?}; open per backend {before:?} -> {after:?}");
    assert!(*last - *first >= Duration::from_millis(350) && *last <= Duration::from_millis(1500), "{times:?}");
    assert_eq!(after.get("b0"), None, "nothing reconnects to a draining server: {after:?}");
    assert_eq!(metric(&gw, "drain"), 10);
    let status = servers(&gw).await;
    assert!(status[&b0]["draining"].as_bool().unwrap() && status[&b0]["active"] == 0, "{status:?}");
    let (status, _) = admin(&gw, "POST", &format!("/upstreams/echo/servers/{b0}/drain")).await;
    assert_eq!(status, 202, "a finished drain can be asked again (nothing left)");
    let (status, _) = admin(&gw, "POST", "/upstreams/echo/servers/127.0.0.1:1/drain").await;
    assert_eq!(status, 404);

    // Remove b2 by reload: its connections leave spread over drain_secs = 1.
    let on_b2 = after["b2"];
    let reloaded = Instant::now();
    reload(&gw, &toml(2)).await;
    assert!(eventually(Duration::from_secs(5), || closes_of(&clients, "b2").iter().all(|(code, _)| code.is_some())).await);
    let closes = closes_of(&clients, "b2");
    let times: Vec<Duration> = closes.iter().map(|(_, at)| at.unwrap() - reloaded).collect();
    assert!(closes.iter().all(|(code, _)| *code == Some(1012)), "{closes:?}");
    assert!(eventually(Duration::from_secs(5), || open_per_backend(&clients).values().sum::<usize>() == 30).await);
    let last = open_per_backend(&clients);
    println!(
        "removed b2 ({on_b2} connections, drain_secs = 1): closes from {:?} to {:?}; open per backend now {last:?}",
        times.iter().min().unwrap(),
        times.iter().max().unwrap()
    );
    assert_eq!(last.get("b1"), Some(&30), "{last:?}");
    assert!(*times.iter().max().unwrap() <= Duration::from_millis(1500), "{times:?}");
    assert_eq!(metric(&gw, "removed"), on_b2 as u64);

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.task.await.unwrap();
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_spreads_connections_onto_added_servers() {
    let _serial = SERIAL.lock().await;
    let backends = echo_backends(4).await;
    let lc = plugin("lc", "least-conn", "");
    let toml = |n: usize| config(&server_list(&backends[..n]), "balancer = \"lc\"", "", &lc);
    let gw = start_gateway(&toml(2)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<Client> = (0..40).map(|_| reconnecting_client(ws_url(&gw, "/"), stop.clone())).collect();
    assert!(eventually(Duration::from_secs(10), || open_per_backend(&clients).values().sum::<usize>() == 40).await);
    let before = open_per_backend(&clients);
    reload(&gw, &toml(4)).await;
    let (status, body) = admin(&gw, "POST", "/upstreams/echo/rebalance?rate=50&target=1.2").await;
    assert_eq!(status, 202, "{body}");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let active = actives(&gw, &backends).await;
        let (max, min) = (*active.iter().max().unwrap(), *active.iter().min().unwrap());
        if active.iter().sum::<u64>() == 40 && (max as f64) <= 1.2 * min as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let active = actives(&gw, &backends).await;
    let moved = metric(&gw, "rebalance");
    println!("rebalance: open {before:?} on 2 servers, 2 added; after {:?}: active {active:?}, {moved} moved", started.elapsed());
    let (max, min) = (*active.iter().max().unwrap(), *active.iter().min().unwrap());
    assert_eq!(active.iter().sum::<u64>(), 40);
    assert!(max as f64 <= 1.2 * min as f64, "{active:?}");
    assert!((20..=24).contains(&moved), "about 20 moves: {moved}");
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.task.await.unwrap();
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_lists_upstreams() {
    let _serial = SERIAL.lock().await;
    let backends = echo_backends(2).await;
    let servers_toml = format!(
        "[\"{}\", {{ address = \"{}\", weight = 3, labels = {{ zone = \"a\" }} }}]",
        backends[0].addr, backends[1].addr
    );
    let gw = start_gateway(&config(&servers_toml, "health = { kind = \"tcp\", interval_ms = 100 }", "", "")).await;
    let mut ws = connect(&ws_url(&gw, "/")).await;
    roundtrip(&mut ws, Message::text("x")).await;
    let (status, body) = admin(&gw, "GET", "/upstreams").await;
    assert_eq!(status, 200);
    let pool = &body["pools"][0];
    assert_eq!(pool["name"], "echo");
    assert_eq!(pool["health"]["kind"], "tcp");
    assert_eq!(pool["available"], 2);
    let second = &pool["servers"][1];
    assert_eq!((second["weight"].as_u64(), second["labels"]["zone"].as_str()), (Some(3), Some("a")));
    let active: u64 = pool["servers"].as_array().unwrap().iter().map(|s| s["active"].as_u64().unwrap()).sum();
    assert_eq!(active, 1, "{body}");
    let (status, _) = admin(&gw, "DELETE", "/upstreams").await;
    assert_eq!(status, 405);
    let (status, _) = admin(&gw, "POST", "/upstreams/nope/rebalance").await;
    assert_eq!(status, 404);
    let (status, _) = admin(&gw, "POST", "/upstreams/echo/rebalance?rate=-1").await;
    assert_eq!(status, 400);
    gw.shutdown().await;
}

/// The health-check task of a pool stops when a reload removes the pool's checks (or the
/// pool), starts again when they come back, and stops on shutdown. Each WebSocket probe
/// ends with a 1000 close that the echo backend records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_stop_with_their_pool_and_on_shutdown() {
    let _serial = SERIAL.lock().await;
    let backends = echo_backends(1).await;
    let with = config(&server_list(&backends), "health = { interval_ms = 50, path = \"/probe\" }", "", "");
    let without = config(&server_list(&backends), "", "", "");
    let probes = || backends[0].closes.lock().unwrap().iter().filter(|&&c| c == 1000).count();
    let gw = start_gateway(&with).await;
    assert!(eventually(Duration::from_secs(2), || probes() >= 3).await, "probes run");
    reload(&gw, &without).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped_at = probes();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(probes(), stopped_at, "no probes once the checks are gone");
    reload(&gw, &with).await;
    assert!(eventually(Duration::from_secs(2), || probes() >= stopped_at + 3).await, "probes again");
    gw.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_shutdown = probes();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(probes(), after_shutdown, "no probes after shutdown");
}
