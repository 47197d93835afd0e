//! A local cluster for integration tests: real nats-server processes and real `tessel node`
//! processes, observed through the buckets.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tessel_node::natsd::{NatsCluster, NatsOptions, find_nats_server};
use tessel_node::procs::{NodeProc, NodeSpec};
use tessel_node::status::{self, ClusterStatus};

pub struct TestCluster {
    pub nats: NatsCluster,
    pub nodes: BTreeMap<String, NodeProc>,
    pub dir: tempfile::TempDir,
    pub js: async_nats::jetstream::Context,
    pub client: async_nats::Client,
    pub cluster: String,
    pub env: Vec<(String, String)>,
}

impl TestCluster {
    /// Starts `servers` NATS servers and `nodes` nodes (`n1`…).
    pub async fn start(servers: usize, nodes: usize) -> TestCluster {
        Self::start_with(servers, nodes, vec![]).await
    }

    pub async fn start_with(
        servers: usize,
        nodes: usize,
        mut env: Vec<(String, String)>,
    ) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let binary = find_nats_server(true).unwrap();
        let nats = NatsCluster::start(
            NatsOptions::new(dir.path().join("nats"), binary).with_servers(servers),
        )
        .await
        .unwrap();
        let client = async_nats::ConnectOptions::new()
            .connect(nats.urls())
            .await
            .unwrap();
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client.clone());
        env.push((
            "TESSEL_REPLICAS".into(),
            if servers >= 3 { "3" } else { "1" }.into(),
        ));
        env.push(("RUST_LOG".into(), "info".into()));
        let mut c = TestCluster {
            nats,
            nodes: BTreeMap::new(),
            dir,
            js,
            client,
            cluster: "tessel".into(),
            env,
        };
        for i in 1..=nodes {
            c.spawn(&format!("n{i}"));
        }
        c
    }

    pub fn spawn(&mut self, id: &str) {
        let spec = NodeSpec {
            bin: env!("CARGO_BIN_EXE_tessel").into(),
            id: id.into(),
            nats: self.nats.url(),
            cluster: self.cluster.clone(),
            env: self.env.clone(),
            args: vec![],
            log: self.dir.path().join(format!("{id}.log")),
        };
        self.nodes.insert(id.into(), NodeProc::spawn(spec).unwrap());
    }

    pub async fn status(&self) -> Option<ClusterStatus> {
        status::read(&self.js, &self.cluster).await.ok()
    }

    /// Polls the status until `pred` holds; panics with the last status and the logs' tails.
    pub async fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&ClusterStatus) -> bool,
    ) -> (ClusterStatus, Duration) {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < limit {
            if let Some(s) = self.status().await {
                if pred(&s) {
                    return (s, started.elapsed());
                }
                last = Some(s);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut logs = String::new();
        for (id, n) in &self.nodes {
            let text = std::fs::read_to_string(n.log()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            logs.push_str(&format!(
                "--- {id}\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        panic!("timed out after {limit:?} waiting for {what}; last status: {last:#?}\n{logs}");
    }

    /// Settled with every named node Active and holding slots.
    pub async fn wait_settled_on(
        &self,
        ids: &[&str],
        limit: Duration,
    ) -> (ClusterStatus, Duration) {
        let want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        self.wait_until(&format!("settled on {want:?}"), limit, |s| {
            let owners: Vec<String> = s.counts().keys().cloned().collect();
            s.settled() && owners == want
        })
        .await
    }

    pub fn leader(s: &ClusterStatus) -> (String, u64) {
        let l = s.leader.as_ref().expect("a leader");
        (l.node.clone(), l.term)
    }

    pub fn signal(&self, id: &str, sig: Signal) {
        assert!(self.nodes[id].signal(sig), "{id} is not running");
    }

    pub async fn kill9(&mut self, id: &str) {
        self.nodes.get_mut(id).unwrap().kill9().await;
    }

    pub fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.nodes[id].log()).unwrap_or_default()
    }
}

/// Slots whose owner differs between two maps.
pub fn moved(a: &ClusterStatus, b: &ClusterStatus) -> usize {
    a.owners
        .iter()
        .zip(&b.owners)
        .filter(|(x, y)| x != y)
        .count()
}

/// The slots a node owns.
pub fn slots_of(s: &ClusterStatus, id: &str) -> Vec<usize> {
    s.owners
        .iter()
        .enumerate()
        .filter(|(_, o)| o.as_deref() == Some(id))
        .map(|(i, _)| i)
        .collect()
}

pub const SETTLE: Duration = Duration::from_secs(30);
