//! The supervision tree: a failed coordinator is restarted and counted, within a budget; beyond
//! it the node stops with exit code 70. And the HTTP endpoint of a running node.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tessel_node::config::NodeConfig;
use tessel_node::metrics::Metrics;
use tessel_node::natsd::free_port;
use tessel_node::records::{MemberRecord, SCHEMA_VERSION};
use tessel_node::runtime::{self, EXIT_RESTARTS_EXHAUSTED, SupMsg};
use tessel_node::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_are_counted_then_the_budget_stops_the_node() {
    let (_dir, nats) = common::nats_server().await;
    let cfg = NodeConfig {
        node_id: "s1".into(),
        nats_urls: vec![nats.url()],
        restart_budget: 3,
        ..NodeConfig::default()
    };
    let (me, weight) = cfg.validate().unwrap();
    let metrics = Arc::new(Metrics::default());
    let client = async_nats::connect(nats.url()).await.unwrap();
    let store = Store::open(
        client,
        "sup",
        1,
        Duration::from_millis(500),
        2_000,
        2_000,
        256 * 1024,
        metrics.clone(),
    )
    .await
    .unwrap();
    let record = MemberRecord {
        v: SCHEMA_VERSION,
        id: "s1".into(),
        status: "Joining".into(),
        capacity: 1,
        devices: vec![],
        addr: None,
        started_at_ms: 0,
    };
    let node = runtime::start(cfg, me, weight, store, metrics.clone(), record, None)
        .await
        .unwrap();

    let mut last_id = None;
    for round in 1..=4u64 {
        // Wait for a (new) coordinator, then kill it.
        let started = Instant::now();
        let coord = loop {
            if let Ok(Some(c)) = ractor::call!(node.supervisor, SupMsg::Coordinator)
                && Some(c.get_id()) != last_id
            {
                break c;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no coordinator after round {round}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        last_id = Some(coord.get_id());
        tokio::time::sleep(Duration::from_millis(200)).await;
        coord.kill();
        if round <= 3 {
            let started = Instant::now();
            while metrics.supervisor_restarts_total.load(Ordering::Relaxed) < round {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "restart {round} not counted"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // The fourth failure exceeds the budget of three: the node stops with code 70.
    let mut exit = node.exit.clone();
    let code = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(code) = *exit.borrow() {
                return code;
            }
            exit.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(code, EXIT_RESTARTS_EXHAUSTED);
    assert_eq!(metrics.supervisor_restarts_total.load(Ordering::Relaxed), 3);
    tokio::time::timeout(Duration::from_secs(5), node.handle)
        .await
        .unwrap()
        .unwrap();
}

async fn get(port: u16, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_metrics_and_status() {
    let (_dir, nats) = common::nats_server().await;
    let port = free_port().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessel"))
        .args([
            "node",
            "--nats",
            &nats.url(),
            "--node-id",
            "h1",
            "--http",
            &format!("127.0.0.1:{port}"),
        ])
        .kill_on_drop(true)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            let m = get(port, "/metrics").await;
            if m.contains("tessel_is_leader 1") && m.contains("tessel_slots_owned 1024") {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the lone node never led with every slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = get(port, "/status").await;
    let body = status.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["node"], "h1");
    assert_eq!(v["view"]["status"], "Active");
    assert_eq!(v["view"]["slots"], 1024);
    assert!(get(port, "/nope").await.starts_with("HTTP/1.1 404"));
    child.start_kill().unwrap();
}
