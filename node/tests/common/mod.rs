//! The test face of `tessel_node::localcluster` and `tessel_node::natsd`: panics instead of
//! errors.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs
)]

use std::time::Duration;

use actors::es::ActorKey;
use serde_json::json;
use tessel_node::client::ActorClient;
use tessel_node::localcluster::LocalCluster;
pub use tessel_node::localcluster::{moved, slots_of};
use tessel_node::natsd::{NatsCluster, NatsOptions, find_nats_server};
use tessel_node::status::ClusterStatus;

pub const SETTLE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

pub struct TestCluster {
    pub inner: LocalCluster,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TestCluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.inner
    }
}

impl std::ops::DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        &mut self.inner
    }
}

impl TestCluster {
    pub async fn start(servers: usize, nodes: usize) -> TestCluster {
        Self::start_with_env(servers, nodes, &[]).await
    }

    /// [`TestCluster::start`] with extra `TESSEL_*` variables for every node.
    pub async fn start_with_env(
        servers: usize,
        nodes: usize,
        extra: &[(&str, &str)],
    ) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut env = vec![("RUST_LOG".into(), "info,tessel_node::vactors=debug".into())];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let inner = LocalCluster::start(
            dir.path(),
            env!("CARGO_BIN_EXE_tessel").as_ref(),
            servers,
            nodes,
            env,
        )
        .await
        .unwrap();
        TestCluster { inner, _dir: dir }
    }

    pub fn spawn(&mut self, id: &str) {
        self.inner.spawn(id).unwrap();
    }

    pub async fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&ClusterStatus) -> bool,
    ) -> (ClusterStatus, Duration) {
        self.inner
            .wait_until(what, limit, POLL, pred)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn wait_settled_on(
        &self,
        ids: &[&str],
        limit: Duration,
    ) -> (ClusterStatus, Duration) {
        self.inner
            .wait_settled_on(ids, limit, POLL)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn leader(s: &ClusterStatus) -> (String, u64) {
        tessel_node::localcluster::leader(s).expect("a leader")
    }

    pub fn signal(&self, id: &str, sig: nix::sys::signal::Signal) {
        assert!(self.inner.signal(id, sig), "{id} is not running");
    }
}

/// Every row of `model` (of `total_rows`) equals `expect` (missing rows 0) in every column,
/// within 40 s; otherwise panics with the differences and the node logs.
pub async fn wait_equal(
    c: &TestCluster,
    model: &str,
    total_rows: u64,
    expect: &std::collections::HashMap<u32, f32>,
) {
    let rows: Vec<u32> = (0..total_rows as u32).collect();
    let started = std::time::Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(40) {
        match tessel_node::deltas::get_rows(
            &c.client,
            "tessel",
            model,
            total_rows,
            &rows,
            tessel_node::deltas::Freshness::Any,
            Duration::from_secs(5),
        )
        .await
        {
            Ok(values) => {
                let diff: Vec<(u32, f32, Vec<f32>)> = rows
                    .iter()
                    .zip(&values)
                    .filter_map(|(r, v)| {
                        let want = expect.get(r).copied().unwrap_or(0.0);
                        v.iter().any(|x| *x != want).then(|| (*r, want, v.clone()))
                    })
                    .collect();
                if diff.is_empty() {
                    return;
                }
                last = format!(
                    "{model}: {} rows differ, e.g. {:?}",
                    diff.len(),
                    &diff[..diff.len().min(5)]
                );
            }
            Err(e) => last = format!("read failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs: String = ["n1", "n2", "n3"]
        .iter()
        .map(|n| format!("--- {n}\n{}", c.log(n)))
        .collect();
    panic!("{last}\n{logs}");
}

/// Starts one nats-server in a new temporary directory and returns both; the server stops when
/// the cluster is dropped, and its files go with the directory.
pub async fn nats_server() -> (tempfile::TempDir, NatsCluster) {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(NatsOptions::new(
        dir.path(),
        find_nats_server(true).unwrap(),
    ))
    .await
    .unwrap();
    (dir, nats)
}

/// Runs the `tessel` binary with `args` and `--nats` set to the cluster's server, and returns
/// its output.
pub fn tessel(c: &TestCluster, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tessel"))
        .args(args)
        .args(["--nats", &c.nats.url()])
        .output()
        .unwrap()
}

/// Asks `model` to describe itself every 50 ms, at most `tries` times, until it is serving,
/// then gives its owners 800 ms to start their slot models; panics if it never serves.
pub async fn wait_serving(c: &TestCluster, model: &str, tries: usize) {
    let actors = ActorClient::new(c.client.clone(), "tessel");
    let key = ActorKey::new("model", model).unwrap();
    for _ in 0..tries {
        let (v, _) = actors
            .ask(&key, &json!({"cmd": "describe"}), Duration::from_secs(10))
            .await
            .unwrap();
        if v["state"] == "Serving" {
            // Give the owners a moment to start their slot models.
            tokio::time::sleep(Duration::from_millis(800)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{model} never served");
}
