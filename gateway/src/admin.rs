//! The admin HTTP API, on its own address:
//! - `GET /healthz`: 200 while serving;
//! - `GET /metrics`: Prometheus text (gateway counters and plugin metrics);
//! - `GET /plugins`: each plugin with its hash, load time, hooks, calls and errors (JSON);
//! - `POST /plugins/reload`: re-read the config file and reload changed plugins (JSON report;
//!   409 when the new config is refused — the running one stays);
//! - `GET /upstreams`: pools and servers with active/total connections, health, ejection and
//!   draining state (JSON);
//! - `POST /upstreams/{pool}/servers/{addr}/drain?rate=N`: no new connections to the server;
//!   its connections are closed with 1012 at N per second (default: spread over the pool's
//!   `drain_secs`); `.../undrain` takes it back;
//! - `POST /upstreams/{pool}/rebalance?rate=N&target=R`: move connections off the most loaded
//!   servers (N per second, default 10) until max/min load ≤ R (default 1.2); both take
//!   `mode=close` (default) or `mode=migrate`: connections whose route keeps session state
//!   move to another server without their client noticing;
//! - `POST /shutdown?drain_secs=N`: retire this process (see `upgrade`): stop accepting,
//!   close live connections with 1012 spread over N seconds, exit.
//! - `GET /`: the live [dashboard](crate::dashboard) (the page needs no token, its data
//!   stream `GET /events` does unless `dashboard_public = true`).
//!
//! Who may ask: every request must name this admin address in its `Host` (its IP and port
//! as the client reached it, `localhost:PORT` on loopback, or one of `admin_hosts`), else
//! 421 — a browser page whose name was rebound to this address sends its own name. Then
//! `/healthz` answers anyone, `/metrics` too with `metrics_public = true`; everything else
//! needs `Authorization: Bearer <admin_token>` (401 without it). With no `admin_token`
//! configured those endpoints are locked (403): loopback is not a credential, since any
//! local process or a server-side request forgery on the host reaches it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::config::GatewaySection;
use crate::dashboard::Body;
use crate::gateway::{AdminError, Shared};
use crate::resources::AcceptBackoff;

/// How long a client has to send a request's headers (and an idle keep-alive connection
/// stays open).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin API's bearer token, kept as its SHA-256: comparing digests takes the same time
/// whatever the presented token is, its length included.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    pub fn new(token: &str) -> AdminToken {
        AdminToken(Sha256::digest(token.as_bytes()).into())
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.0).into()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut backoff = AcceptBackoff::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.upgrade.accepting.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if crate::resources::accept_failed(&shared.resources, "admin accept", &e) && !backoff.pause(&shared.shutdown).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        // The address the client reached, which its Host must name.
        let Ok(local) = stream.local_addr() else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(|req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(guard(req, local, &shared).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Checks the Host, then the token, then answers.
async fn guard(req: Request<Incoming>, local: SocketAddr, shared: &Arc<Shared>) -> Response<Body> {
    let config = shared.config.load();
    let g = &config.gateway;
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    if !host.is_some_and(|host| host_allowed(host, local, g)) {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "the Host header does not name this admin address; add the name to [gateway] admin_hosts\n".into(),
        )
        .map(BodyExt::boxed);
    }
    let open = match req.uri().path() {
        "/healthz" => true,
        "/metrics" => g.metrics_public,
        "/events" => g.dashboard_public,
        page => crate::dashboard::is_page(page),
    };
    if !open {
        let Some(token) = &g.admin_secret else {
            return text(StatusCode::FORBIDDEN, "the admin API is locked: set [gateway] admin_token to use it\n".into())
                .map(BodyExt::boxed);
        };
        if let Err(challenge) = authorize(&req, token) {
            let mut response = text(StatusCode::UNAUTHORIZED, "a valid admin token is needed: Authorization: Bearer <admin_token>\n".into());
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
            return response.map(BodyExt::boxed);
        }
    }
    drop(config);
    if let Some(response) = crate::dashboard::answer(req.method(), req.uri().path(), shared) {
        return response;
    }
    route(req, shared).await.map(BodyExt::boxed)
}

/// Ok when the request carries exactly one `Authorization: Bearer <token>` with the right
/// token; else the `WWW-Authenticate` challenge to answer with (RFC 6750 §3).
fn authorize(req: &Request<Incoming>, token: &AdminToken) -> Result<(), &'static str> {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err("Bearer realm=\"wasmgate admin\"");
    };
    let bytes = value.as_bytes();
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let credential = bytes
        .split_at_checked(7)
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|(_, credential)| credential.trim_ascii());
    match credential {
        Some(presented) if token.matches(presented) => Ok(()),
        _ => Err("Bearer realm=\"wasmgate admin\", error=\"invalid_token\""),
    }
}

/// Whether `host` (a request's Host header) names this admin listener: the IP and port the
/// client connected to (`local`), `localhost` with that port when the IP is loopback, or a
/// name of `admin_hosts` (on any port, or with the port it gives).
fn host_allowed(host: &str, local: SocketAddr, g: &GatewaySection) -> bool {
    let host = host.trim().to_ascii_lowercase();
    if g.admin_hosts.iter().any(|name| {
        let name = name.get_ref().to_ascii_lowercase();
        host == name || split_host(&host).0 == name
    }) {
        return true;
    }
    let (name, port) = split_host(&host);
    // Without a port a client means 80.
    if port.unwrap_or(80) != local.port() {
        return false;
    }
    let ip = match local.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let literal = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    literal.parse::<IpAddr>().is_ok_and(|named| named == ip) || (ip.is_loopback() && name == "localhost")
}

/// `host[:port]` or `[v6][:port]` split into the name and the port, if it has a valid one.
fn split_host(host: &str) -> (&str, Option<u16>) {
    let split = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') && (host.starts_with('[') || !host[..i].contains(':')) => Some(i),
        _ => None,
    };
    match split {
        Some(i) => match host[i + 1..].parse() {
            Ok(port) => (&host[..i], Some(port)),
            // "name:junk" names nothing.
            Err(_) => ("", Some(0)),
        },
        None => (host, None),
    }
}

async fn route(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/metrics") => text(StatusCode::OK, shared.metrics_registry.render()),
        (&Method::GET, "/plugins") => json(StatusCode::OK, &shared.plugins.list()),
        (&Method::POST, "/plugins/reload") => match shared.reload_from_source().await {
            Ok(report) => json(StatusCode::OK, &report),
            Err(error) => json(StatusCode::CONFLICT, &serde_json::json!({ "error": error })),
        },
        (&Method::GET, "/upstreams") => json(StatusCode::OK, &shared.upstreams_status()),
        (&Method::GET, "/cluster") => { let (status, body) = crate::cluster::admin_status(shared).await; json(status, &body) }
        (&Method::POST, "/shutdown") => answer(crate::upgrade::retire::admin_shutdown(req.uri().query(), shared)),
        (_, "/healthz" | "/metrics" | "/plugins" | "/plugins/reload" | "/upstreams" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into())
        }
        (method, path) if path.starts_with("/upstreams/") => upstream_action(method, path, req.uri().query(), shared),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// The slowest drain or rebalance rate asked for: one connection per 1,000 s.
const MIN_RATE: f64 = crate::upstream::drain::MIN_RATE;

/// `/upstreams/{pool}/servers/{addr}/drain|undrain` and `/upstreams/{pool}/rebalance`.
fn upstream_action(method: &Method, path: &str, query: Option<&str>, shared: &Shared) -> Response<Full<Bytes>> {
    let segments: Vec<String> = path.trim_start_matches("/upstreams/").split('/').map(percent_decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    // The error is the message of a 400. A parameter given twice is refused rather than
    // guessed at.
    let param = |name: &str, min: f64| -> Result<Option<f64>, String> {
        let mut values = query.unwrap_or("").split('&').filter_map(|kv| kv.strip_prefix(name)?.strip_prefix('='));
        let (value, again) = (values.next(), values.next());
        if again.is_some() {
            return Err(format!("{name} is given more than once"));
        }
        value
            .map(|v| v.parse::<f64>().ok().filter(|n| n.is_finite() && *n >= min))
            .map(|parsed| parsed.ok_or_else(|| format!("{name} must be a finite number of at least {min}")))
            .transpose()
    };
    let migrate = match query.unwrap_or("").split('&').filter_map(|kv| kv.strip_prefix("mode=")).collect::<Vec<_>>()[..] {
        [] | ["close"] => false,
        ["migrate"] => true,
        _ => return error(StatusCode::BAD_REQUEST, "mode must be given once, as close or migrate".into()),
    };
    let result = match segments.as_slice() {
        [pool, "servers", address, "drain"] if method == Method::POST => match param("rate", MIN_RATE) {
            Ok(rate) => shared.drain_server(pool, address, rate, migrate),
            Err(message) => return error(StatusCode::BAD_REQUEST, message),
        },
        [pool, "servers", address, "undrain"] if method == Method::POST => shared.undrain_server(pool, address),
        [pool, "rebalance"] if method == Method::POST => match (param("rate", MIN_RATE), param("target", 1.0)) {
            (Ok(rate), Ok(target)) => shared.rebalance(pool, rate.unwrap_or(10.0), target.unwrap_or(1.2), migrate),
            (Err(message), _) | (_, Err(message)) => return error(StatusCode::BAD_REQUEST, message),
        },
        [_, "servers", _, "drain" | "undrain"] | [_, "rebalance"] => {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into())
        }
        _ => return text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    answer(result)
}

/// An admin action's answer: 202 with its JSON, or the error's status.
fn answer(result: Result<serde_json::Value, AdminError>) -> Response<Full<Bytes>> {
    match result {
        Ok(body) => json(StatusCode::ACCEPTED, &body),
        Err(AdminError::NotFound(e)) => error(StatusCode::NOT_FOUND, e),
        Err(AdminError::Conflict(e)) => error(StatusCode::CONFLICT, e),
        Err(AdminError::BadRequest(e)) => error(StatusCode::BAD_REQUEST, e),
    }
}

fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

/// Decodes `%XX` escapes (an address may come as `127.0.0.1%3A9001`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut response = text(status, serde_json::to_string_pretty(value).expect("serializable") + "\n");
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(extra: &str) -> GatewaySection {
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:1\"\n{extra}\n[[upstream]]\nname = \"e\"\nservers = [\"127.0.0.1:2\"]\n[[route]]\nupstream = \"e\"\n"
        );
        crate::config::Config::parse(&text, "t.toml", Default::default()).unwrap().gateway
    }

    #[test]
    fn the_host_must_name_this_admin_address() {
        let g = gateway("admin_hosts = [\"gw.internal\", \"ops.example:8443\"]");
        let v4: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let v6: SocketAddr = "[::1]:9090".parse().unwrap();
        let public: SocketAddr = "192.0.2.7:9090".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:9090".parse().unwrap();
        for (host, local) in [
            ("127.0.0.1:9090", v4),
            ("LOCALHOST:9090", v4),
            ("localhost:9090", v6),
            ("[::1]:9090", v6),
            ("192.0.2.7:9090", public),
            ("192.0.2.7:9090", mapped),
            ("gw.internal", public),
            ("gw.internal:1234", v4),
            ("ops.example:8443", public),
        ] {
            assert!(host_allowed(host, local, &g), "{host} on {local} should pass");
        }
        for (host, local) in [
            ("attacker.example:9090", v4),
            ("localhost:9091", v4),
            ("127.0.0.1:9091", v4),
            ("127.0.0.1", v4),
            ("127.0.0.2:9090", v4),
            ("localhost.:9090", v4),
            ("localhost:9090", public),
            ("192.0.2.7:9090", v4),
            ("[::1]:9090", v4),
            ("127.0.0.1:9090:9090", v4),
            ("127.0.0.1:junk", v4),
            ("gw.internal.evil.example", public),
            ("ops.example:9090", public),
            ("", v4),
        ] {
            assert!(!host_allowed(host, local, &g), "{host} on {local} should be refused");
        }
        let port80: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert!(host_allowed("127.0.0.1", port80, &g) && host_allowed("localhost", port80, &g));
    }

    #[test]
    fn tokens_compare_by_digest() {
        let token = AdminToken::new("0123456789abcdef");
        assert!(token.matches(b"0123456789abcdef"));
        for wrong in [&b""[..], b"0123456789abcde", b"0123456789abcdef ", b"0123456789ABCDEF"] {
            assert!(!token.matches(wrong));
        }
    }
}
