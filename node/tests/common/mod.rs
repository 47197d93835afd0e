//! The test face of `tessel_node::localcluster`: panics instead of errors.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs
)]

use std::time::Duration;

use tessel_node::localcluster::LocalCluster;
pub use tessel_node::localcluster::{moved, slots_of};
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
