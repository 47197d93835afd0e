//! The node's HTTP endpoint: `/metrics` (Prometheus text, series prefixed `tessel_`) and
//! `/status` (this node's view as JSON). A deliberately small HTTP/1.1 server: one request per
//! connection, bounded request size, time and concurrency.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::runtime::NodeView;

/// Largest request head accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Longest time a connection may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// What the endpoint serves.
#[derive(Clone)]
pub struct HttpState {
    /// The node's id.
    pub node: String,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Its view.
    pub view: watch::Receiver<NodeView>,
}

/// Binds `addr` and serves until the task is dropped.
pub async fn serve(addr: &str, state: HttpState) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "HTTP status endpoint listening");
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &state)).await
                {
                    warn!(error = %e, "HTTP request timed out");
                }
                drop(permit);
            });
        }
    }))
}

async fn handle(mut stream: TcpStream, state: &HttpState) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > MAX_REQUEST_BYTES {
            let _ = respond(&mut stream, 431, "text/plain", "request too large\n").await;
            return;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split('?').next().unwrap_or_default();
    let (code, kind, body) = route(method, path, state);
    let _ = respond(&mut stream, code, kind, &body).await;
}

/// The response for one request: status code, content type, body.
pub fn route(method: &str, path: &str, state: &HttpState) -> (u16, &'static str, String) {
    if method != "GET" {
        return (405, "text/plain", "only GET\n".into());
    }
    match path {
        "/metrics" => (200, "text/plain; version=0.0.4", state.metrics.render()),
        "/status" => {
            let view = state.view.borrow().clone();
            let body = serde_json::json!({"node": state.node, "view": view});
            (200, "application/json", body.to_string())
        }
        "/" => (
            200,
            "text/plain",
            format!("tessel node {}: see /status and /metrics\n", state.node),
        ),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

async fn respond(stream: &mut TcpStream, code: u16, kind: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let (_tx, view) = watch::channel(NodeView::default());
        let state = HttpState {
            node: "n1".into(),
            metrics: Arc::new(Metrics::default()),
            view,
        };
        assert_eq!(route("GET", "/metrics", &state).0, 200);
        assert!(route("GET", "/metrics", &state).2.contains("tessel_term"));
        let (code, _, body) = route("GET", "/status", &state);
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["node"], "n1");
        assert_eq!(route("POST", "/status", &state).0, 405);
        assert_eq!(route("GET", "/nope", &state).0, 404);
    }
}
