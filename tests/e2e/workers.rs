//! `[gateway] workers = N` (gateway/src/workers.rs): client connections served by N
//! single-threaded runtimes, each with its own listener on the same address.

use std::time::Duration;

use tokio_tungstenite::tungstenite::Message;
use wasmgate_tests::*;

/// Names of this process's threads (the gateway runs in the test process).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

#[tokio::test]
async fn workers_serve_clients_and_shut_down() {
    let backends = echo_backends(2).await;
    let gw = start_gateway(&basic_config(&server_list(&backends), "workers = 2")).await;
    // A thread names itself once it runs.
    let named = |names: Vec<String>| (0..2).all(|n| names.contains(&format!("wg-worker-{n}")));
    assert!(eventually(Duration::from_secs(2), || named(thread_names())).await, "{:?}", thread_names());
    // Enough clients that both listeners get some (the kernel hashes them over the two).
    let mut clients = Vec::new();
    for i in 0..64 {
        let mut ws = connect(&ws_url(&gw, "/")).await;
        let text = format!("client {i}");
        assert_eq!(roundtrip(&mut ws, Message::text(text.clone())).await, Message::text(text));
        clients.push(ws);
    }
    assert!(eventually(Duration::from_secs(2), || gw.active_connections() == 64).await);
    drop(clients);
    assert!(eventually(Duration::from_secs(5), || gw.open_sockets() == 0).await, "closed connections are uncounted");
    // Shutdown closes a held connection with 1001 on its worker and returns.
    let mut held = connect(&ws_url(&gw, "/")).await;
    let shutdown = tokio::spawn(gw.shutdown());
    let closed = tokio::time::timeout(Duration::from_secs(5), futures_util::StreamExt::next(&mut held)).await.expect("closed in time");
    assert!(matches!(closed, Some(Ok(Message::Close(Some(ref f)))) if u16::from(f.code) == 1001), "{closed:?}");
    tokio::time::timeout(Duration::from_secs(10), shutdown).await.expect("shutdown returns").unwrap();
}
