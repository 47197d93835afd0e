//! The node's HTTP endpoint: `/metrics` (Prometheus text, series prefixed `tessel_`),
//! `/status` (this node's view, its per-model delta counters, the latest topology events and
//! the cluster's status read from the buckets, as JSON) and `/`, the dashboard: one
//! self-contained page (no external assets) that polls `/status` every second. A deliberately
//! small HTTP/1.1 server: one request per connection, bounded request size, time and
//! concurrency.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;

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
/// Topology events kept for `/status` (the newest).
pub const MAX_EVENTS: usize = 64;
/// Largest topology event kept; larger ones are ignored.
pub const MAX_EVENT_BYTES: usize = 16 * 1024;
/// Longest time `/status` waits for the cluster's status from the buckets.
pub const CLUSTER_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The dashboard page, served at `/`.
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// What the endpoint serves.
#[derive(Clone)]
pub struct HttpState {
    /// The node's id.
    pub node: String,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Its view.
    pub view: watch::Receiver<NodeView>,
    /// The cluster name.
    pub cluster: String,
    /// Where the cluster's status is read (None: `/status` carries no cluster part).
    pub js: Option<async_nats::jetstream::Context>,
    /// The latest topology events.
    pub events: Arc<EventLog>,
}

/// A bounded ring of the latest topology events (the JSON records announced on
/// `<c>.cluster.events`, see docs/nats-layout.md).
#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<VecDeque<serde_json::Value>>,
}

impl EventLog {
    /// Keeps an event, dropping the oldest beyond [`MAX_EVENTS`].
    pub fn push(&self, event: serde_json::Value) {
        if let Ok(mut q) = self.events.lock() {
            if q.len() >= MAX_EVENTS {
                q.pop_front();
            }
            q.push_back(event);
        }
    }

    /// The events kept, oldest first.
    pub fn list(&self) -> Vec<serde_json::Value> {
        self.events
            .lock()
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Follows the cluster's topology events until the task is dropped; records that are too
    /// large or not JSON objects are counted as bad records and ignored.
    pub async fn follow(
        self: Arc<Self>,
        client: async_nats::Client,
        cluster: &str,
        metrics: Arc<Metrics>,
    ) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
        let mut sub = client
            .subscribe(crate::store::events_subject(cluster))
            .await?;
        Ok(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let parsed = (msg.payload.len() <= MAX_EVENT_BYTES)
                    .then(|| serde_json::from_slice::<serde_json::Value>(&msg.payload).ok())
                    .flatten();
                match parsed {
                    Some(v) if v.is_object() => self.push(v),
                    _ => Metrics::inc(&metrics.bad_records_total),
                }
            }
        }))
    }
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
    let (code, kind, body) = route(method, path, state).await;
    let _ = respond(&mut stream, code, kind, &body).await;
}

/// The response for one request: status code, content type, body.
pub async fn route(method: &str, path: &str, state: &HttpState) -> (u16, &'static str, String) {
    if method != "GET" {
        return (405, "text/plain", "only GET\n".into());
    }
    match path {
        "/metrics" => (200, "text/plain; version=0.0.4", state.metrics.render()),
        "/status" => (200, "application/json", status(state).await.to_string()),
        "/" | "/index.html" => (200, "text/html; charset=utf-8", DASHBOARD_HTML.into()),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// The body of `/status`: `node`, `view`, `models`, `events`, and `cluster` (the status read
/// from the buckets, with `owners`: the owner of each of the 1024 slots, null for none) or
/// `cluster_error`.
pub async fn status(state: &HttpState) -> serde_json::Value {
    let view = state.view.borrow().clone();
    let mut body = serde_json::json!({
        "node": state.node,
        "view": view,
        "models": state.metrics.models(),
        "events": state.events.list(),
    });
    let cluster = match &state.js {
        None => Err("no NATS connection".to_string()),
        Some(js) => {
            match tokio::time::timeout(
                CLUSTER_STATUS_TIMEOUT,
                crate::status::read(js, &state.cluster),
            )
            .await
            {
                Ok(Ok(s)) => {
                    let mut v = serde_json::to_value(&s).unwrap_or_default();
                    if let Some(o) = v.as_object_mut() {
                        o.insert("owners".into(), serde_json::json!(s.owners));
                    }
                    Ok(v)
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out reading the cluster's status".into()),
            }
        }
    };
    if let Some(o) = body.as_object_mut() {
        match cluster {
            Ok(v) => o.insert("cluster".into(), v),
            Err(e) => o.insert("cluster_error".into(), serde_json::json!(e)),
        };
    }
    body
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
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn routes() {
        let (_tx, view) = watch::channel(NodeView::default());
        let metrics = Arc::new(Metrics::default());
        metrics.model_applied("emb", 2, 20);
        let events = Arc::new(EventLog::default());
        for i in 0..MAX_EVENTS + 5 {
            events.push(serde_json::json!({"type": "SlotsAssigned", "epoch": i}));
        }
        let state = HttpState {
            node: "n1".into(),
            metrics,
            view,
            cluster: "tessel".into(),
            js: None,
            events,
        };
        assert_eq!(route("GET", "/metrics", &state).await.0, 200);
        assert!(
            route("GET", "/metrics", &state)
                .await
                .2
                .contains("tessel_term")
        );
        let (code, _, body) = route("GET", "/status", &state).await;
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["node"], "n1");
        assert_eq!(v["models"]["emb"]["deltas_applied"], 2);
        assert_eq!(v["events"].as_array().unwrap().len(), MAX_EVENTS);
        assert_eq!(v["events"][0]["epoch"], 5, "the oldest are dropped");
        assert!(v["cluster_error"].is_string());
        let (code, kind, page) = route("GET", "/", &state).await;
        assert_eq!((code, kind), (200, "text/html; charset=utf-8"));
        assert!(page.contains("fetch(\"/status\""));
        // Self-contained: nothing loaded from elsewhere.
        assert!(!page.contains("src=\"http") && !page.contains("href=\"http"));
        assert_eq!(route("POST", "/status", &state).await.0, 405);
        assert_eq!(route("GET", "/nope", &state).await.0, 404);
    }
}
