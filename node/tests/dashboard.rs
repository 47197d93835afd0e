//! The HTTP endpoint of real nodes: `/metrics` scraped and parsed (latency histograms and
//! per-model counters after real deltas), `/status`, `--log-format json` lines with the node's
//! spans, and the dashboard in headless Chromium (through chromedriver's WebDriver protocol):
//! three nodes and 1024 owned slots, then a node killed and its slots shown on the survivors.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use actors::es::ActorKey;
use common::{SETTLE, TestCluster};
use serde_json::{Value, json};
use tessel_node::client::ActorClient;
use tessel_node::deltas::Producer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the page may take to show a killed node's slots on the survivors: the lease and
/// membership TTLs (2 s each by default), the leader's reassignment, and the page's 1 s poll.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

/// One HTTP/1.1 request over a fresh connection; returns the status code and the body.
async fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // Read the head, then Content-Length bytes (chromedriver may keep the connection open).
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let split = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the head: {raw:?}");
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    let mut body = raw[split + 4..].to_vec();
    match length {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed before the body's end");
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None => {
            s.read_to_end(&mut body).await.unwrap();
        }
    }
    (code, String::from_utf8_lossy(&body).to_string())
}

async fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let (code, text) = http(addr, "GET", "/metrics", None).await;
    assert_eq!(code, 200, "{text}");
    tessel_node::metrics::parse(&text)
        .unwrap()
        .into_iter()
        .collect()
}

async fn status(addr: &str) -> Value {
    let (code, text) = http(addr, "GET", "/status", None).await;
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_status_and_json_logs_of_a_real_node() {
    let mut c = TestCluster::start(1, 0).await;
    c.inner.node_args = vec!["--log-format".into(), "json".into()];
    c.inner.env = vec![
        ("RUST_LOG".into(), "info,tessel_node::runtime=debug".into()),
        ("TESSEL_REPLICAS".into(), "1".into()),
        ("TESSEL_MEMORY_TRIM_IDLE_MS".into(), "300".into()),
    ];
    c.spawn("n1");
    c.wait_settled_on(&["n1"], SETTLE).await;
    let addr = c.http["n1"].clone();

    // A model and some deltas, so that the histograms and the model's counters move.
    let actors = ActorClient::new(c.client.clone(), "tessel");
    let key = ActorKey::new("model", "emb").unwrap();
    actors
        .ask(
            &key,
            &json!({"cmd": "create", "rows": 1024, "dim": 2}),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let mut sent = 0;
    let started = Instant::now();
    let mut producer = Producer::new(c.js.clone(), "tessel", "emb", 1024, 2, 8, 3);
    let metrics = loop {
        // Until the model serves, deltas wait in the stream; keep sending a few.
        if sent < 20 {
            let rows: Vec<u32> = (0..4).map(|i| (sent * 37 + i * 11) % 1024).collect();
            let values = vec![1.0; rows.len() * 2];
            sent += u32::try_from(producer.send(&rows, &values).await.unwrap().batches).unwrap();
        }
        let m = scrape(&addr).await;
        if m.get("tessel_model_deltas_applied_total{model=\"emb\"}") >= Some(&f64::from(sent))
            && m.get("tessel_model_consumer_lag{model=\"emb\"}") == Some(&0.0)
            && sent >= 20
        {
            break m;
        }
        assert!(started.elapsed() < SETTLE, "deltas never applied: {m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(metrics["tessel_slots_owned"], 1024.0);
    assert_eq!(metrics["tessel_is_leader"], 1.0);
    assert!(metrics["tessel_term"] >= 1.0);
    assert!(metrics["tessel_lease_acquisitions_total"] >= 1.0);
    assert!(metrics["tessel_delta_e2e_seconds_count"] >= f64::from(sent));
    assert!(metrics["tessel_delta_apply_seconds_count"] >= 1.0);
    assert_eq!(
        metrics["tessel_delta_e2e_seconds_count"],
        metrics["tessel_delta_e2e_seconds_bucket{le=\"+Inf\"}"]
    );
    assert_eq!(
        metrics["tessel_model_max_slot_queue{model=\"emb\"}"], 0.0,
        "all applied"
    );
    // Quiet after the deltas, the node gives the allocator's free memory back: once more
    // than it had when they were applied, then no more while it stays quiet.
    let trims_then = metrics["tessel_memory_trims_total"];
    let quiet = Instant::now();
    let trims_after = loop {
        let n = scrape(&addr).await["tessel_memory_trims_total"];
        if n > trims_then {
            break n;
        }
        assert!(quiet.elapsed() < SETTLE, "no idle trim after the deltas");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Three more intervals, well before the slots' first checkpoints (10 s) are work again.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        scrape(&addr).await["tessel_memory_trims_total"],
        trims_after,
        "trimmed again with no work in between"
    );
    for name in [
        "tessel_lease_renewals_total",
        "tessel_lease_renewal_failures_total",
        "tessel_actor_activations_total",
        "tessel_actor_passivations_total",
        "tessel_supervisor_restarts_total",
        "tessel_nats_reconnects_total",
        "tessel_deltas_rejected_total",
    ] {
        assert!(metrics.contains_key(name), "{name} missing");
    }

    let s = status(&addr).await;
    assert_eq!(s["node"], "n1");
    assert_eq!(s["cluster"]["leader"]["node"], "n1");
    let owners = s["cluster"]["owners"].as_array().unwrap();
    assert_eq!(owners.len(), 1024);
    assert!(owners.iter().all(|o| o == "n1"));
    assert!(s["models"]["emb"]["deltas_applied"].as_u64().unwrap() >= u64::from(sent));
    assert!(
        s["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "SlotsAssigned" && e["node"] == "n1"),
        "{s}"
    );
    let (code, page) = http(&addr, "GET", "/", None).await;
    assert_eq!(code, 200);
    assert!(page.contains("<html") && page.contains("/status"));

    // The first connection is not a reconnection; a server restart is one.
    assert_eq!(metrics["tessel_nats_reconnects_total"], 0.0);
    c.inner.nats.restart(0).await.unwrap();
    let started = Instant::now();
    while scrape(&addr).await["tessel_nats_reconnects_total"] < 1.0 {
        assert!(
            started.elapsed() < SETTLE,
            "the reconnection was not counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every line the node logged is JSON, and its spans carry the node, the term and slots.
    c.inner.shutdown().await;
    let log = c.log("n1");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 5, "{log}");
    let in_span = |name: &str, field: &str| {
        lines.iter().any(|l| {
            l["spans"].as_array().is_some_and(|spans| {
                spans
                    .iter()
                    .any(|s| s["name"] == name && s["node"] == "n1" && !s[field].is_null())
            })
        })
    };
    assert!(in_span("coordinator", "term"), "{log}");
    assert!(in_span("slot_host", "slot"), "{log}");
}

/// chromium and chromedriver, installed by scripts/browser-deps.sh when missing and possible.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| {
        names.iter().find_map(|n| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(n))
                    .find(|f| f.is_file())
            })
        })
    };
    let both = || {
        Some((
            find(&["chromium", "chromium-browser"])?,
            find(&["chromedriver"])?,
        ))
    };
    if both().is_none() {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/browser-deps.sh");
        let _ = std::process::Command::new("bash").arg(script).status();
    }
    both()
}

/// A minimal WebDriver client over chromedriver's HTTP API.
struct WebDriver {
    addr: String,
    session: String,
    driver: tokio::process::Child,
    /// Chromium's profile and temporary files, removed with the test.
    _tmp: tempfile::TempDir,
}

impl WebDriver {
    async fn start(chromium: &std::path::Path, chromedriver: &std::path::Path) -> WebDriver {
        let port = tessel_node::natsd::free_port().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let driver = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            assert!(started.elapsed() < SETTLE, "chromedriver never listened");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--no-first-run",
                         format!("--user-data-dir={}", tmp.path().join("profile").display())]
            }
        }}});
        let (code, body) = http(&addr, "POST", "/session", Some(&caps)).await;
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        WebDriver {
            addr,
            session,
            driver,
            _tmp: tmp,
        }
    }

    async fn command(&self, path: &str, body: &Value) -> Value {
        let path = format!("/session/{}/{path}", self.session);
        let (code, text) = http(&self.addr, "POST", &path, Some(body)).await;
        assert_eq!(code, 200, "{path}: {text}");
        serde_json::from_str::<Value>(&text).unwrap()["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.command("url", &json!({"url": url})).await;
    }

    /// The counts the page rendered into `#summary`'s data attributes.
    async fn summary(&self) -> Value {
        let script = "const d = document.getElementById('summary').dataset; \
                      return {nodes: d.nodes, owned: d.owned, owners: d.owners, polls: d.polls, \
                              leader: d.leader, \
                              models: Object.fromEntries([...document.querySelectorAll('#models tr')] \
                                .map(r => [r.dataset.model, [...r.cells].map(c => c.textContent)])), \
                              events: [...document.querySelectorAll('#events li')].map(e => e.textContent), \
                              cells: document.querySelectorAll('#grid div[data-owner]').length};";
        let v = self
            .command("execute/sync", &json!({"script": script, "args": []}))
            .await;
        json!({
            "nodes": v["nodes"].as_str().and_then(|s| s.parse::<u64>().ok()),
            "owned": v["owned"].as_str().and_then(|s| s.parse::<u64>().ok()),
            "owners": v["owners"].as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()),
            "polls": v["polls"].as_str().and_then(|s| s.parse::<u64>().ok()),
            "cells": v["cells"],
            "leader": v["leader"],
            "models": v["models"],
            "events": v["events"],
        })
    }

    async fn wait(&self, what: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let s = self.summary().await;
            if pred(&s) {
                return s;
            }
            assert!(
                started.elapsed() < limit,
                "the page never showed {what}; last: {s}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn quit(mut self) {
        let path = format!("/session/{}", self.session);
        let _ = http(&self.addr, "DELETE", &path, None).await;
        let _ = self.driver.kill().await;
    }
}

fn owners_of(s: &Value) -> Vec<String> {
    s["owners"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_and_a_failover_in_headless_chromium() {
    let Some((chromium, chromedriver)) = browser() else {
        eprintln!(
            "SKIPPED: chromium and chromedriver are not installed and scripts/browser-deps.sh \
             could not install them (it needs root or sudo for apt-get)"
        );
        return;
    };
    let mut c = TestCluster::start(1, 3).await;
    c.wait_settled_on(&["n1", "n2", "n3"], SETTLE).await;
    let web = WebDriver::start(&chromium, &chromedriver).await;
    web.goto(&format!("http://{}/", c.http["n1"])).await;
    let s = web
        .wait("3 nodes and 1024 owned slots", SETTLE, |s| {
            s["nodes"] == 3 && s["owned"] == 1024 && s["cells"] == 1024 && owners_of(s).len() == 3
        })
        .await;
    assert_eq!(owners_of(&s), ["n1", "n2", "n3"]);
    let truth = c.status().await.unwrap();
    assert_eq!(s["leader"], truth.leader.as_ref().unwrap().node.as_str());
    let before: u64 = s["owners"]["n3"].as_u64().unwrap();
    assert!(before > 0);

    // n3 dies; the page (served by n1) shows its slots on n1 and n2.
    // A model under load: the page shows its rate (summed over the three nodes' /status).
    let actors = ActorClient::new(c.client.clone(), "tessel");
    let key = ActorKey::new("model", "emb").unwrap();
    actors
        .ask(
            &key,
            &json!({"cmd": "create", "rows": 4096, "dim": 2}),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (js, stop) = (c.js.clone(), stop.clone());
        tokio::spawn(async move {
            let mut producer = Producer::new(js, "tessel", "emb", 4096, 2, 8, 5);
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let rows: Vec<u32> = (0..32).map(|k| (i * 97 + k * 131) % 4096).collect();
                let _ = producer.send(&rows, &vec![1.0; 64]).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let shown = web
        .wait("a delta rate for emb", SETTLE, |s| {
            let row = &s["models"]["emb"];
            let rate = row[2].as_str().and_then(|r| r.parse::<f64>().ok());
            rate.is_some_and(|r| r > 0.0)
        })
        .await;
    let row = &shown["models"]["emb"];
    assert!(
        row[1].as_str().unwrap().parse::<u64>().unwrap() > 0,
        "{row}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    // Once the load stops, the page's total is every node's, not only n1's.
    let mut per_node = BTreeMap::new();
    let started = Instant::now();
    loop {
        for id in ["n1", "n2", "n3"] {
            let s = status(&c.http[id]).await;
            per_node.insert(
                id,
                s["models"]["emb"]["deltas_applied"].as_u64().unwrap_or(0),
            );
        }
        let total: u64 = per_node.values().sum();
        let page = web.summary().await["models"]["emb"][1]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok());
        if page == Some(total) {
            break;
        }
        assert!(
            started.elapsed() < SETTLE,
            "page {page:?}, nodes {per_node:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(per_node.values().all(|n| *n > 0), "{per_node:?}");

    let earlier: Vec<Value> = web.summary().await["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    c.kill9("n3").await;
    let killed = Instant::now();
    let polls = s["polls"].as_u64().unwrap();
    let after = web
        .wait("n3's slots on the survivors", FAILOVER_BOUND, |s| {
            s["owned"] == 1024 && owners_of(s) == ["n1", "n2"]
        })
        .await;
    // The events list shows a new assignment to n1 and n2 alone (announced by the leader).
    let listed = web
        .wait("the new assignment in the events", SETTLE, |s| {
            s["events"].as_array().is_some_and(|e| {
                e.iter().any(|t| {
                    !earlier.contains(t)
                        && t.as_str().is_some_and(|t| {
                            t.contains("SlotsAssigned")
                                && t.contains("\"n1\"")
                                && t.contains("\"n2\"")
                                && !t.contains("\"n3\"")
                        })
                })
            })
        })
        .await;
    assert!(!listed["events"].as_array().unwrap().is_empty());
    eprintln!(
        "the page showed the failover {:?} after the SIGKILL",
        killed.elapsed()
    );
    assert!(after["polls"].as_u64().unwrap() > polls, "updated live");
    let shown = after["owners"]["n1"].as_u64().unwrap() + after["owners"]["n2"].as_u64().unwrap();
    assert_eq!(shown, 1024);
    // What the page shows is what the buckets hold.
    let truth = c.status().await.unwrap();
    assert_eq!(
        truth.counts().get("n1").copied().unwrap_or(0) as u64,
        after["owners"]["n1"].as_u64().unwrap()
    );
    web.quit().await;
    c.inner.shutdown().await;
}
