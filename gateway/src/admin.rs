//! The admin HTTP API, on its own address:
//! - `GET /healthz`: 200 while serving;
//! - `GET /metrics`: Prometheus text (gateway counters and plugin metrics);
//! - `GET /plugins`: each plugin with its hash, load time, hooks, calls and errors (JSON);
//! - `POST /plugins/reload`: re-read the config file and reload changed plugins (JSON report;
//!   409 when the new config is refused — the running one stays).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::gateway::Shared;

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
        (_, "/healthz" | "/metrics" | "/plugins" | "/plugins/reload") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into())
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
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
