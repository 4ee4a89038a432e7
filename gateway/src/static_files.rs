//! Static files on a WebSocket route: a route with `files = "DIR"` answers plain GET and
//! HEAD requests (no `Upgrade`) from that directory, so a page and the WebSocket it opens
//! come from the same origin, through the same gateway, with no second web server. Upgrades
//! on the route still go upstream through its plugins; files never reach a plugin (they are
//! public, like any page: the WebSocket behind them is what the plugins guard).
//!
//! What is served is decided on the request path in normal form (see `normalize`: no dot
//! segments, no doubled slashes, no encoded `/`, `\` or control bytes), less the route's
//! prefix. On top of that a file name must be plain: each segment made of letters, digits,
//! `-`, `_`, `.` and `~`, not starting with `.` (no `..`, no hidden files), no `%` escapes at
//! all. The file is then resolved through symlinks and must still be inside the directory
//! (itself resolved when the route loads), and be a regular file. Anything else is a 404
//! that says no more than "not found". `/route` and `/route/` serve `index.html`.
//!
//! One response per connection (`connection: close`), as for every other answer the
//! gateway gives before a 101; files are read whole, up to [`MAX_FILE`].

use std::path::{Path, PathBuf};

use http::{header, HeaderMap, Method};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::handshake::RequestHead;
use crate::normalize;
use crate::routes::RouteTable;

/// Largest file served; larger ones are a 404 (this is for a page and its scripts).
pub const MAX_FILE: u64 = 8 << 20;

/// A static answer: its status (for the access log) and its bytes on the wire.
pub struct Answer {
    pub status: u16,
    /// The normal request path and the route's prefix, for the access log.
    pub path: String,
    pub route: String,
    pub bytes: Vec<u8>,
}

/// The directory a route serves, resolved (symlinks and all) when the route loads.
#[derive(Debug, Clone)]
pub struct StaticDir {
    root: PathBuf,
}

impl StaticDir {
    /// `dir` must exist and be a directory.
    pub fn open(dir: &Path) -> Result<StaticDir, String> {
        let root = dir.canonicalize().map_err(|e| format!("files directory {}: {e}", dir.display()))?;
        if !root.is_dir() {
            return Err(format!("files: {} is not a directory", dir.display()));
        }
        Ok(StaticDir { root })
    }

    /// The file for `rest` (the path after the route's prefix), or none.
    async fn resolve(&self, rest: &str) -> Option<PathBuf> {
        let relative = file_name(rest)?;
        let path = tokio::fs::canonicalize(self.root.join(relative)).await.ok()?;
        let meta = tokio::fs::metadata(&path).await.ok()?;
        (path.starts_with(&self.root) && meta.is_file() && meta.len() <= MAX_FILE).then_some(path)
    }
}

/// The relative file a request path (after the route's prefix) names, or none when it is not
/// a plain file name. The path is already in normal form; this refuses everything but plain
/// segments, so nothing that is a traversal to any file system gets through.
pub fn file_name(rest: &str) -> Option<PathBuf> {
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let (body, directory) = match rest.strip_suffix('/') {
        Some(body) => (body, true),
        None => (rest, rest.is_empty()),
    };
    let mut relative = PathBuf::new();
    for segment in body.split('/').filter(|_| !body.is_empty()) {
        let plain = segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'));
        if segment.is_empty() || segment.starts_with('.') || !plain {
            return None;
        }
        relative.push(segment);
    }
    if directory {
        relative.push("index.html");
    }
    Some(relative)
}

/// The content type for a file, by its extension.
pub fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("ico") => "image/x-icon",
        Some("webp") => "image/webp",
        Some("wasm") => "application/wasm",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// The answer to a plain GET or HEAD on a route that serves files; none for anything else
/// (upgrades, other methods, routes without `files`), which goes on to the handshake.
pub async fn answer(head: &RequestHead, routes: &RouteTable) -> Option<Answer> {
    let head_only = match head.method {
        Method::GET => false,
        Method::HEAD => true,
        _ => return None,
    };
    if head.headers.contains_key(header::UPGRADE) {
        return None;
    }
    let host = single(&head.headers, header::HOST).and_then(|h| normalize::authority(h).ok())?;
    let target = normalize::target(&head.target).ok()?;
    let route = routes.find(&host.host, &target.path)?;
    let dir = route.files.as_ref()?;
    let rest = &target.path[route.prefix.len().min(target.path.len())..];
    let found = match dir.resolve(rest).await {
        Some(path) => tokio::fs::read(&path).await.ok().map(|body| (path, body)),
        None => None,
    };
    let (status, bytes) = match found {
        Some((path, body)) => (200, response(200, content_type(&path), &body, head_only)),
        None => (404, response(404, "text/plain; charset=utf-8", b"not found\n", head_only)),
    };
    Some(Answer { status, path: target.path, route: route.prefix.to_string(), bytes })
}

fn single(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    values.next().is_none().then(|| first.to_str().ok()).flatten()
}

fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let reason = if status == 200 { "OK" } else { "Not Found" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         cache-control: no-cache\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// Writes the answer and closes: half-closes, then reads what the client still sends for a
/// moment, so the close does not reset the connection before the client has read it.
pub async fn send<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, answer: &Answer) {
    if stream.write_all(&answer.bytes).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let mut sink = [0u8; 1024];
        let mut drained = 0;
        while drained < 64 << 10 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(rest: &str) -> Option<String> {
        file_name(rest).map(|p| p.to_string_lossy().into_owned())
    }

    #[test]
    fn the_route_itself_and_directories_serve_index_html() {
        assert_eq!(name("").as_deref(), Some("index.html"));
        assert_eq!(name("/").as_deref(), Some("index.html"));
        assert_eq!(name("/docs/").as_deref(), Some("docs/index.html"));
        assert_eq!(name("/app.js").as_deref(), Some("app.js"));
        assert_eq!(name("/img/logo-1_a~.png").as_deref(), Some("img/logo-1_a~.png"));
    }

    #[test]
    fn only_plain_segments_are_file_names() {
        for rest in [
            "/..", "/../x", "/a/../b", "/.hidden", "/a/.git/config", "/%2e%2e/x", "/%2E", "/a%2Fb",
            "/a%5Cb", "/a\\b", "/..\\x", "/a%00b", "/a\0b", "//x", "/a//b", "/a b", "/a%20b",
            "/a:b", "/C:/x", "/a;b", "/a?b", "/é",
        ] {
            assert_eq!(name(rest), None, "{rest:?}");
        }
    }

    /// Through the normaliser first, as requests come: what it lets through is still no way
    /// out of the directory.
    #[test]
    fn traversal_spellings_never_leave_the_directory() {
        let root = std::env::temp_dir().join(format!("wasmgate-static-{}", std::process::id()));
        let inside = root.join("site");
        std::fs::create_dir_all(inside.join("sub")).unwrap();
        std::fs::write(inside.join("index.html"), "in").unwrap();
        std::fs::write(inside.join("sub/page.html"), "in").unwrap();
        std::fs::write(root.join("secret.txt"), "out").unwrap();
        std::os::unix::fs::symlink(root.join("secret.txt"), inside.join("link.txt")).unwrap();
        std::os::unix::fs::symlink(&root, inside.join("up")).unwrap();
        let dir = StaticDir::open(&inside).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let serves = |target: &str| -> Option<PathBuf> {
            let path = normalize::target(&format!("/site{target}")).ok()?.path;
            rt.block_on(dir.resolve(path.strip_prefix("/site")?))
        };
        assert!(serves("").is_some() && serves("/").is_some() && serves("/sub/page.html").is_some());
        assert!(serves("//sub///page.html").is_some(), "doubled slashes are collapsed first");
        for target in [
            "/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E%2Fsecret.txt", "/sub/../../secret.txt",
            "/..%5Csecret.txt", "/..\\secret.txt", "/secret.txt%00.html", "/index.html%00",
            "/link.txt", "/up/secret.txt", "/sub", "/missing.html",
        ] {
            assert_eq!(serves(target), None, "{target:?}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type(Path::new("a/index.HTML")), "text/html; charset=utf-8");
        assert_eq!(content_type(Path::new("app.js")), "text/javascript; charset=utf-8");
        assert_eq!(content_type(Path::new("x.png")), "image/png");
        assert_eq!(content_type(Path::new("README")), "application/octet-stream");
    }
}
