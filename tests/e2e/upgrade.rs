//! Restarts and upgrades that refuse nothing, on the real binary: a second gateway process
//! takes over the port (handover of the listening socket) while 300 clients exchange
//! numbered messages; the first process moves its connections off with 1012 and exits.
//! Also: the `wss://` listener is handed over the same way; `POST /shutdown` and SIGUSR2
//! retire a process, and two processes share a port (SO_REUSEPORT).

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

const CLIENTS: usize = 300;

/// Two free loopback ports (bound, then released).
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

fn config(servers: &str, port: u16, admin: u16, extra: &str) -> String {
    basic_config(servers, &format!("admin_token = \"{ADMIN_TOKEN}\"\nshutdown_drain_secs = 3\n{extra}"))
        // A backend slowed by a busy machine must not fail connections: only the swap may.
        .replace("connect_timeout_ms = 1000", "connect_timeout_ms = 10000\neject_after = 0")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace("admin = \"127.0.0.1:0\"", &format!("admin = \"127.0.0.1:{admin}\""))
}

/// What the clients saw, summed.
#[derive(Default)]
struct Tally {
    /// Connection attempts that failed: refused, reset, or a handshake that was not a 101.
    failed_attempts: AtomicU64,
    /// Connections that ended other than by a 1012 close from the gateway.
    bad_closes: AtomicU64,
    /// Echoes that were not the message in flight.
    wrong_echoes: AtomicU64,
    connects: AtomicU64,
    acked: AtomicU64,
}

/// A client that sends `c{id}-{n}` and waits for its echo before sending n+1; on a close it
/// reconnects and sends the message that was not acknowledged again. Returns the numbers
/// acknowledged per connection, in order.
async fn client(id: usize, url: String, tally: Arc<Tally>, stop: Arc<AtomicBool>) -> Vec<Vec<u64>> {
    let mut next = 0u64;
    let mut per_connection = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                eprintln!("client {id}: connect failed: {e}");
                tally.failed_attempts.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        tally.connects.fetch_add(1, Ordering::Relaxed);
        let mut acked = Vec::new();
        'connection: while !stop.load(Ordering::Relaxed) {
            let text = format!("c{id}-{next}");
            if ws.send(Message::text(text.clone())).await.is_err() {
                // The close frame is on its way; read it below.
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                    Ok(Some(Ok(Message::Text(echo)))) => {
                        if echo.as_str() == text {
                            acked.push(next);
                            next += 1;
                            tally.acked.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.wrong_echoes.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        let code = frame.map(|f| u16::from(f.code));
                        if code != Some(1012) {
                            eprintln!("client {id}: closed with {code:?}");
                            tally.bad_closes.fetch_add(1, Ordering::Relaxed);
                        }
                        // Let tungstenite answer the close, then reconnect.
                        while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {}
                        break 'connection;
                    }
                    Ok(Some(Ok(_))) => continue,
                    other => {
                        eprintln!("client {id}: connection broke: {other:?}");
                        tally.bad_closes.fetch_add(1, Ordering::Relaxed);
                        break 'connection;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        per_connection.push(acked);
    }
    per_connection
}

/// New connections one after another (connect, one echo, close), for attempts that arrive
/// at every moment of the swap, not only after a drain; returns how many completed.
async fn churn(url: String, tally: Arc<Tally>, stop: Arc<AtomicBool>) -> u64 {
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((mut ws, _)) => {
                let echoed = match ws.send(Message::text("churn")).await {
                    Ok(()) => matches!(tokio::time::timeout(Duration::from_secs(10), ws.next()).await, Ok(Some(Ok(Message::Text(_))))),
                    Err(_) => false,
                };
                // A connection the old process drained before it echoed is not a failure.
                done += u64::from(echoed);
                let _ = ws.close(None).await;
            }
            Err(e) => {
                eprintln!("churn: connect failed: {e}");
                tally.failed_attempts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    done
}

async fn metric(admin: u16, name: &str) -> Option<f64> {
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let (_, text) = raw_http(format!("127.0.0.1:{admin}").parse().unwrap(), &request).await;
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

async fn wait_exit(child: &mut KillOnDrop, within: Duration) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "process {} did not exit within {within:?}", child.id());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An `echo-backend` process (its own process, so the clients' load in this one does not
/// slow it down); its address.
fn echo_process() -> (KillOnDrop, String) {
    let binary = gateway_binary().with_file_name("echo-backend");
    let mut child = std::process::Command::new(binary)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("echo-backend is built with the workspace's binaries");
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().rsplit("ws://").next().unwrap().to_string();
    (KillOnDrop(child), addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_takes_over_the_port_and_nothing_is_refused_or_lost() {
    let (_backend, backend) = echo_process();
    let (port, admin) = free_ports();
    let handover = wasmgate_tests::scratch_dir("handover").join("handover.sock");
    let extra = format!("handover = \"{}\"", handover.display());
    let path = write_config("upgrade.toml", &config(&format!("[\"{backend}\"]"), port, admin, &extra));
    let (old, addr) = spawn_gateway(&path);
    let mut old = KillOnDrop(old);
    assert_eq!(addr, format!("127.0.0.1:{port}"));

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(id, format!("ws://{addr}/"), tally.clone(), stop.clone())))
        .collect();
    let stop_churn = Arc::new(AtomicBool::new(false));
    let churners: Vec<_> = (0..4).map(|_| tokio::spawn(churn(format!("ws://{addr}/"), tally.clone(), stop_churn.clone()))).collect();
    let going = || tally.connects.load(Ordering::Relaxed) == CLIENTS as u64 && tally.acked.load(Ordering::Relaxed) >= 3 * CLIENTS as u64;
    assert!(
        eventually(Duration::from_secs(60), going).await,
        "the clients did not get going: {} connected, {} acked",
        tally.connects.load(Ordering::Relaxed),
        tally.acked.load(Ordering::Relaxed)
    );
    // Each churner has one connection open, and may have sent the close of its previous one
    // (it does not wait for the close handshake) while the gateway still relays it.
    let active = metric(admin, "wasmgate_connections_active").await.unwrap();
    assert!((CLIENTS as f64..=CLIENTS as f64 + 8.0).contains(&active), "{active} active (clients and churn)");

    // The successor: same config, so the same port, admin port and handover socket.
    let started = std::time::Instant::now();
    let (new, new_addr) = spawn_gateway(&path);
    let new = KillOnDrop(new);
    assert_eq!(new_addr, addr);
    let status = wait_exit(&mut old, Duration::from_secs(15)).await;
    let swap = started.elapsed();
    assert!(status.success(), "the old process exited with {status}");

    // Every client reconnected (to the only process left) and goes on.
    let acked_at_exit = tally.acked.load(Ordering::Relaxed);
    assert!(eventually(Duration::from_secs(10), || tally.acked.load(Ordering::Relaxed) >= acked_at_exit + 2 * CLIENTS as u64).await);
    assert!(
        eventually(Duration::from_secs(10), || tally.connects.load(Ordering::Relaxed) >= 2 * CLIENTS as u64).await,
        "{} connects",
        tally.connects.load(Ordering::Relaxed)
    );
    stop_churn.store(true, Ordering::Relaxed);
    let mut churned = 0;
    for handle in churners {
        churned += handle.await.unwrap();
    }
    let mut active = None;
    for _ in 0..50 {
        active = metric(admin, "wasmgate_connections_active").await;
        if active == Some(CLIENTS as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(active, Some(CLIENTS as f64), "all on the new process");
    stop.store(true, Ordering::Relaxed);
    let mut moved = 0;
    for (id, handle) in clients.into_iter().enumerate() {
        let per_connection = handle.await.unwrap();
        // Acknowledged numbers run 0, 1, 2, ... across connections: none lost, none skipped.
        let all: Vec<u64> = per_connection.iter().flatten().copied().collect();
        assert!(all.iter().copied().eq(0..all.len() as u64), "client {id} acked {all:?}");
        moved += usize::from(per_connection.len() >= 2 && !per_connection.last().unwrap().is_empty());
    }
    println!(
        "upgrade: {CLIENTS} clients, swap took {swap:?}, {} connects, {churned} short connections, {} messages acknowledged, {} failed attempts",
        tally.connects.load(Ordering::Relaxed),
        tally.acked.load(Ordering::Relaxed),
        tally.failed_attempts.load(Ordering::Relaxed)
    );
    assert_eq!(tally.failed_attempts.load(Ordering::Relaxed), 0, "connection attempts failed");
    assert_eq!(tally.bad_closes.load(Ordering::Relaxed), 0, "connections ended other than by 1012");
    assert_eq!(tally.wrong_echoes.load(Ordering::Relaxed), 0);
    assert_eq!(moved, CLIENTS, "every client moved to the new process and exchanged messages there");
    drop(new);
    let _ = std::fs::remove_file(handover);
}

#[tokio::test]
async fn post_shutdown_retires_the_process_and_two_processes_share_a_port() {
    let backends = echo_backends(1).await;
    let (port, admin) = free_ports();
    let (_, admin2) = free_ports();
    let first = write_config("shutdown-a.toml", &config(&server_list(&backends), port, admin, ""));
    let second = write_config("shutdown-b.toml", &config(&server_list(&backends), port, admin2, ""));
    let (a, addr) = spawn_gateway(&first);
    let mut a = KillOnDrop(a);
    let mut ws = connect(&format!("ws://{addr}/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("a")).await, Message::text("a"));
    // SO_REUSEPORT: a second process binds the same address while the first runs.
    let (b, addr_b) = spawn_gateway(&second);
    let _b = KillOnDrop(b);
    assert_eq!(addr_b, addr);

    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let post = |path: &str, token: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: {admin_addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    };
    assert_eq!(raw_http(admin_addr, &post("/shutdown", "wrong-token-0123456789")).await.0, 401);
    for bad in ["-1", "soon", "1e9", "1&drain_secs=2"] {
        let (status, body) = raw_http(admin_addr, &post(&format!("/shutdown?drain_secs={bad}"), ADMIN_TOKEN)).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, body) = raw_http(admin_addr, &post("/shutdown?drain_secs=1", ADMIN_TOKEN)).await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"closing\": 1"), "{body}");
    assert_eq!(close_code(&mut ws).await, 1012);
    let status = wait_exit(&mut a, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    // The second process serves the port alone.
    let mut ws = connect(&format!("ws://{addr}/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("b")).await, Message::text("b"));
}

#[tokio::test]
async fn sigusr2_retires_the_process() {
    let backends = echo_backends(1).await;
    let (port, admin) = free_ports();
    let path = write_config("usr2.toml", &config(&server_list(&backends), port, admin, ""));
    let (child, addr) = spawn_gateway(&path);
    let mut child = KillOnDrop(child);
    let mut ws = connect(&format!("ws://{addr}/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("x")).await, Message::text("x"));
    Command::new("kill").args(["-USR2", &child.id().to_string()]).status().unwrap();
    assert_eq!(close_code(&mut ws).await, 1012);
    let status = wait_exit(&mut child, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err(), "the listener is closed");
}

/// Short `wss://` connections one after another (TLS handshake, upgrade, one echo, close)
/// against `addr`; failed attempts are counted.
async fn churn_wss(addr: String, tls: Arc<rustls::ClientConfig>, tally: Arc<Tally>, stop: Arc<AtomicBool>) -> u64 {
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::try_from("gateway.test").unwrap();
            let stream = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(|e| e.to_string())?;
            let (ws, _) = tokio_tungstenite::client_async("wss://gateway.test/", stream).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(ws)
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(mut ws)) => {
                let echoed = match ws.send(Message::text("churn")).await {
                    Ok(()) => matches!(tokio::time::timeout(Duration::from_secs(10), ws.next()).await, Ok(Some(Ok(Message::Text(_))))),
                    Err(_) => false,
                };
                done += u64::from(echoed);
                let _ = ws.close(None).await;
            }
            failed => {
                eprintln!("wss churn: attempt failed: {failed:?}", failed = failed.map(|r| r.err()));
                tally.failed_attempts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    done
}

/// The inodes of the sockets listening on 127.0.0.1:`port` (from /proc/net/tcp): the same
/// inode before and after a swap means the very socket was handed over, not bound again.
fn listening_inodes(port: u16) -> Vec<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    let mut inodes: Vec<u64> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")).then(|| fields[9].parse().unwrap())
        })
        .collect();
    inodes.sort();
    inodes
}

/// With `[gateway.tls]`, the successor takes over the `wss://` listener too (the handover
/// carries every listening socket): the same listening sockets serve before and after,
/// short `wss` connections made all through the swap all succeed, and afterwards the new
/// process alone serves both ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wss_listener_is_handed_over_too() {
    let (_backend, backend) = echo_process();
    let (port, admin) = free_ports();
    let (tls_port, _) = free_ports();
    let dir = wasmgate_tests::scratch_dir("upgrade-tls");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["gateway.test".to_string()]).unwrap().signed_by(&leaf_key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("gw.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("gw.key"), leaf_key.serialize_pem()).unwrap();
    let handover = dir.join("handover.sock");
    let extra = format!("handover = \"{}\"", handover.display());
    let text = config(&format!("[\"{backend}\"]"), port, admin, &extra).replacen(
        "\n[[upstream]]",
        &format!(
            "\n[gateway.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]\n\n[[upstream]]",
            dir.join("gw.pem").display(),
            dir.join("gw.key").display()
        ),
        1,
    );
    assert!(text.contains("[gateway.tls]"), "{text}");
    let path = write_config("upgrade-tls.toml", &text);
    let (old, addr) = spawn_gateway(&path);
    let mut old = KillOnDrop(old);
    assert_eq!(addr, format!("127.0.0.1:{port}"));
    let sockets_before = (listening_inodes(port), listening_inodes(tls_port));
    assert_eq!((sockets_before.0.len(), sockets_before.1.len()), (1, 1), "{sockets_before:?}");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let wss_addr = format!("127.0.0.1:{tls_port}");
    let churners: Vec<_> =
        (0..4).map(|_| tokio::spawn(churn_wss(wss_addr.clone(), tls.clone(), tally.clone(), stop.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (new, new_addr) = spawn_gateway(&path);
    let _new = KillOnDrop(new);
    assert_eq!(new_addr, addr);
    let status = wait_exit(&mut old, Duration::from_secs(15)).await;
    assert!(status.success(), "the old process exited with {status}");
    assert_eq!((listening_inodes(port), listening_inodes(tls_port)), sockets_before, "the listening sockets were not handed over");
    // Churn on the new process alone for a while.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut churned = 0;
    for handle in churners {
        churned += handle.await.unwrap();
    }
    println!("wss handover: {churned} short wss connections, {} failed", tally.failed_attempts.load(Ordering::Relaxed));
    assert!(churned > 20, "only {churned} wss connections completed");
    assert_eq!(tally.failed_attempts.load(Ordering::Relaxed), 0, "wss connection attempts failed");
    let mut ws = connect(&format!("ws://{addr}/")).await;
    assert_eq!(roundtrip(&mut ws, Message::text("plain")).await, Message::text("plain"));
    let _ = std::fs::remove_dir_all(&dir);
}
