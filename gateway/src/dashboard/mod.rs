//! The live dashboard on the admin address: a static page (`/`, `/dashboard.js`,
//! `/dashboard.css`, embedded in the binary, nothing fetched from elsewhere) and its data,
//! a server-sent event stream (`/events`) with one [`snapshot`] a second.
//!
//! Who may see what, failing closed: the page holds no data and is served to anyone who
//! passes the admin API's `Host` check; `/events` needs the admin token like the rest of the
//! API, unless `[gateway] dashboard_public = true`; actions (drain, undrain) always need it.
//! The page asks for the token, keeps it in `sessionStorage` (gone with the tab) and sends
//! it as `Authorization: Bearer`. It reads the stream with `fetch` rather than
//! `EventSource`, which cannot send headers: a token in the URL would end up in histories
//! and logs. The page's Content-Security-Policy allows only its own script, style and
//! fetches, and no framing (the drain buttons cannot be clickjacked).

pub mod snapshot;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

use crate::gateway::Shared;

/// Every admin response's body: whole, or a stream (`/events`).
pub type Body = BoxBody<Bytes, Infallible>;

/// Time between two snapshots on `/events`.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Event streams open at once, per process; more are answered 503 (a snapshot is cheap, but
/// with `dashboard_public` anyone who reaches the address could open them).
const MAX_STREAMS: usize = 64;
static STREAMS: AtomicUsize = AtomicUsize::new(0);

const INDEX_HTML: &str = include_str!("static/index.html");
const DASHBOARD_JS: &str = include_str!("static/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("static/dashboard.css");

/// The page's own files, which need no token.
pub fn is_page(path: &str) -> bool {
    matches!(path, "/" | "/dashboard.js" | "/dashboard.css")
}

/// Answers the dashboard's paths (after the admin API's checks); None for other paths.
pub fn answer(method: &http::Method, path: &str, shared: &Arc<Shared>) -> Option<Response<Body>> {
    let (body, content_type) = match path {
        "/" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/dashboard.js" => (DASHBOARD_JS, "text/javascript; charset=utf-8"),
        "/dashboard.css" => (DASHBOARD_CSS, "text/css; charset=utf-8"),
        "/events" => return Some(if method == http::Method::GET { events(shared) } else { not_allowed() }),
        _ => return None,
    };
    if method != http::Method::GET {
        return Some(not_allowed());
    }
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}

fn not_allowed() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"method not allowed\n")).boxed());
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

/// Counts an open stream until dropped (when the client goes, hyper drops the body).
struct StreamSlot;

impl StreamSlot {
    fn take() -> Option<StreamSlot> {
        STREAMS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_STREAMS).then_some(n + 1))
            .ok()
            .map(|_| StreamSlot)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        STREAMS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `text/event-stream`: a `snapshot` event now and every [`INTERVAL`], until the client goes
/// or the gateway shuts down.
fn events(shared: &Arc<Shared>) -> Response<Body> {
    let Some(slot) = StreamSlot::take() else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"too many dashboard streams are open\n")).boxed());
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return response;
    };
    let state = (shared.clone(), slot, true);
    let stream = futures_util::stream::unfold(state, |(shared, slot, first)| async move {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = shared.shutdown.cancelled() => return None,
            }
        }
        let json = serde_json::to_string(&snapshot::take(&shared)).expect("serializable");
        let event = format!("event: snapshot\ndata: {json}\n\n");
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(event))), (shared, slot, false)))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}
