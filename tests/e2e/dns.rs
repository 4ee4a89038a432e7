//! Upstream servers by name, resolved with a DNS server the test runs: a name that resolves
//! to two backends, then three (the third joins and gets connections), then one (the other
//! two are drained); a lookup that fails (SERVFAIL, then no answer at all) keeps the last
//! good set.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio_tungstenite::tungstenite::Message as Ws;
use wasmgate_tests::*;

/// What the test DNS server answers for its one name.
#[derive(Clone, Debug)]
enum Zone {
    Addresses(Vec<Ipv4Addr>),
    ServFail,
    /// No answer at all, as a server that is down.
    Silent,
}

/// A DNS server on a free UDP port that answers `A` queries for `name` from `zone`.
async fn dns_server(name: &'static str, zone: Arc<Mutex<Zone>>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else { return };
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            let zone = zone.lock().unwrap().clone();
            let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
            answer.metadata.recursion_desired = query.metadata.recursion_desired;
            answer.metadata.recursion_available = true;
            answer.metadata.authoritative = true;
            answer.add_queries(query.queries.clone());
            match zone {
                Zone::Silent => continue,
                Zone::ServFail => answer.metadata.response_code = ResponseCode::ServFail,
                Zone::Addresses(ips) => {
                    for q in &query.queries {
                        let ours = q.name().to_ascii().trim_end_matches('.').eq_ignore_ascii_case(name);
                        if !ours {
                            answer.metadata.response_code = ResponseCode::NXDomain;
                        } else if q.query_type() == RecordType::A {
                            for ip in &ips {
                                answer.add_answer(Record::from_rdata(q.name().clone(), 0, RData::A(A(*ip))));
                            }
                        }
                    }
                }
            }
            let _ = socket.send_to(&answer.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

/// Echo backends `b0`, `b1`, `b2` on 127.0.0.2, .3 and .4, all on one port.
async fn backends_on_one_port() -> (u16, Vec<EchoServer>) {
    for _ in 0..20 {
        let first = EchoServer::start("127.0.0.2:0", "b0").await.unwrap();
        let port = first.addr.port();
        let mut servers = vec![first];
        for (i, ip) in ["127.0.0.3", "127.0.0.4"].iter().enumerate() {
            match EchoServer::start(&format!("{ip}:{port}"), &format!("b{}", i + 1)).await {
                Ok(s) => servers.push(s),
                Err(_) => break,
            }
        }
        if servers.len() == 3 {
            return (port, servers);
        }
    }
    panic!("no port free on 127.0.0.2, .3 and .4");
}

/// The addresses of pool `echo`'s servers, with their `host` label.
async fn pool_servers(gw: &Gateway) -> Vec<(String, String)> {
    let (status, body) = admin_request(gw, "GET", "/upstreams").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(body.split_once("\r\n\r\n").unwrap().1).unwrap();
    let mut servers: Vec<(String, String)> = json["pools"][0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["address"].as_str().unwrap().to_string(), s["labels"]["host"].as_str().unwrap_or("").to_string()))
        .collect();
    servers.sort();
    servers
}

async fn wait_for_servers(gw: &Gateway, want: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<String> = pool_servers(gw).await.into_iter().map(|(a, _)| a).collect();
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "servers {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects `n` clients; returns them with the backend each landed on.
async fn clients(gw: &Gateway, n: usize) -> Vec<(Client, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut ws = connect(&ws_url(gw, "/")).await;
        let Ws::Text(name) = roundtrip(&mut ws, Ws::text("whoami")).await else { panic!("no name") };
        out.push((ws, name.to_string()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_upstream_follows_its_dns_answers() {
    let (port, _backends) = backends_on_one_port().await;
    let ip = |last: u8| Ipv4Addr::new(127, 0, 0, last);
    let zone = Arc::new(Mutex::new(Zone::Addresses(vec![ip(2), ip(3)])));
    let dns = dns_server("chat.test", zone.clone()).await;
    let config = basic_config(
        &format!("[\"ws://chat.test:{port}\"]"),
        &format!("admin_token = \"{ADMIN_TOKEN}\"\nresolvers = [\"{dns}\"]\nresolve_interval_secs = 1"),
    )
    .replace("connect_timeout_ms = 1000", "connect_timeout_ms = 1000\ndrain_secs = 0");
    let gw = start_gateway(&config).await;
    let server = |last: u8| format!("127.0.0.{last}:{port}");

    // Two addresses: two servers, each shown by address with the name as its `host` label.
    let host = "chat.test".to_string();
    assert_eq!(pool_servers(&gw).await, [(server(2), host.clone()), (server(3), host.clone())]);
    let first = clients(&gw, 4).await;
    let mut names: Vec<&str> = first.iter().map(|(_, n)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["b0", "b0", "b1", "b1"]);

    // Three: the third joins and gets new connections.
    *zone.lock().unwrap() = Zone::Addresses(vec![ip(2), ip(3), ip(4)]);
    wait_for_servers(&gw, &[server(2), server(3), server(4)]).await;
    let second = clients(&gw, 3).await;
    assert!(second.iter().any(|(_, n)| n == "b2"), "b2 got no connection: {:?}", second.iter().map(|(_, n)| n).collect::<Vec<_>>());

    // One: the other two are drained (1012); new connections go to the one left.
    *zone.lock().unwrap() = Zone::Addresses(vec![ip(2)]);
    wait_for_servers(&gw, &[server(2)]).await;
    for (mut ws, name) in first.into_iter().chain(second) {
        if name == "b0" {
            assert_eq!(roundtrip(&mut ws, Ws::text("still")).await, Ws::text("still"), "b0's connections stay");
        } else {
            assert_eq!(close_code(&mut ws).await, 1012, "a connection to {name} was not drained");
        }
    }
    assert!(clients(&gw, 3).await.iter().all(|(_, n)| n == "b0"));
    let metrics = gw.metrics_text();
    assert!(metrics.contains("wasmgate_upstream_drained_connections_total{cause=\"removed\",pool=\"echo\"} 4"), "{metrics}");

    // Lookups that fail keep the last good set: SERVFAIL, then a server that does not answer.
    for failure in [Zone::ServFail, Zone::Silent] {
        *zone.lock().unwrap() = failure.clone();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(pool_servers(&gw).await, [(server(2), host.clone())], "after {failure:?}");
        assert_eq!(clients(&gw, 1).await[0].1, "b0");
    }
    // And an answer again is taken again.
    *zone.lock().unwrap() = Zone::Addresses(vec![ip(3)]);
    wait_for_servers(&gw, &[server(3)]).await;
    gw.shutdown().await;
}

#[test]
fn resolvers_must_be_addresses() {
    let text = basic_config("[\"chat.test:9000\"]", "resolvers = [\"dns.example\"]");
    let err = Config::parse(&text, "t.toml", repo_root()).unwrap_err().to_string();
    assert!(err.contains("t.toml:5:") && err.contains("resolvers"), "{err}");
    let text = basic_config("[\"chat.test:9000\"]", "resolve_interval_secs = 0");
    let err = Config::parse(&text, "t.toml", repo_root()).unwrap_err().to_string();
    assert!(err.contains("resolve_interval_secs must be at least 1"), "{err}");
}
