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
//!   servers (N per second, default 10) until max/min load ≤ R (default 1.2).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::gateway::{AdminError, Shared};

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.shutdown.cancelled() => break,
        };
        let Ok((stream, _)) = accepted else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(|req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, &shared).await) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
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
        (_, "/healthz" | "/metrics" | "/plugins" | "/plugins/reload" | "/upstreams") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into())
        }
        (method, path) if path.starts_with("/upstreams/") => upstream_action(method, path, req.uri().query(), shared),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// `/upstreams/{pool}/servers/{addr}/drain|undrain` and `/upstreams/{pool}/rebalance`.
fn upstream_action(method: &Method, path: &str, query: Option<&str>, shared: &Shared) -> Response<Full<Bytes>> {
    let segments: Vec<String> = path.trim_start_matches("/upstreams/").split('/').map(percent_decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    // The error is the message of a 400.
    let param = |name: &str| -> Result<Option<f64>, String> {
        let value = query.unwrap_or("").split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='));
        value
            .map(|v| v.parse::<f64>().ok().filter(|n| n.is_finite() && *n > 0.0))
            .map(|parsed| parsed.ok_or_else(|| format!("{name} must be a number above 0")))
            .transpose()
    };
    let result = match segments.as_slice() {
        [pool, "servers", address, "drain"] if method == Method::POST => match param("rate") {
            Ok(rate) => shared.drain_server(pool, address, rate),
            Err(message) => return error(StatusCode::BAD_REQUEST, message),
        },
        [pool, "servers", address, "undrain"] if method == Method::POST => shared.undrain_server(pool, address),
        [pool, "rebalance"] if method == Method::POST => match (param("rate"), param("target")) {
            (Ok(rate), Ok(target)) => shared.rebalance(pool, rate.unwrap_or(10.0), target.unwrap_or(1.2)),
            (Err(message), _) | (_, Err(message)) => return error(StatusCode::BAD_REQUEST, message),
        },
        [_, "servers", _, "drain" | "undrain"] | [_, "rebalance"] => {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into())
        }
        _ => return text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
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
