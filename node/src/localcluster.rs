//! A local cluster of real processes — NATS server(s) and `tessel node`s — observed through
//! the buckets. Used by the integration tests, the benchmarks and the chaos harness.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::natsd::{NatsCluster, NatsOptions, find_nats_server};
use crate::procs::{NodeProc, NodeSpec};
use crate::status::{self, ClusterStatus};

/// Servers, nodes, and a client to watch them.
pub struct LocalCluster {
    /// The NATS servers.
    pub nats: NatsCluster,
    /// The nodes by id.
    pub nodes: BTreeMap<String, NodeProc>,
    /// Where logs and data go.
    pub dir: PathBuf,
    /// A JetStream context for observing.
    pub js: async_nats::jetstream::Context,
    /// The context of status polls ([`status::POLL_REQUEST_TIMEOUT`]).
    status_js: async_nats::jetstream::Context,
    /// A plain client for observing.
    pub client: async_nats::Client,
    /// The cluster name.
    pub cluster: String,
    /// Environment given to every node.
    pub env: Vec<(String, String)>,
    /// The `tessel` binary.
    pub bin: PathBuf,
    /// Each node's HTTP address (`/status`, `/metrics`, the dashboard), on a free loopback port
    /// picked when it was (re)started.
    pub http: BTreeMap<String, String>,
    /// Extra arguments given to every node started from now on (e.g. `--log-format json`).
    pub node_args: Vec<String>,
}

impl LocalCluster {
    /// Starts `servers` NATS servers under `dir` and `nodes` nodes named `n1`, `n2`, ….
    pub async fn start(
        dir: &Path,
        bin: &Path,
        servers: usize,
        nodes: usize,
        mut env: Vec<(String, String)>,
    ) -> anyhow::Result<LocalCluster> {
        let binary = find_nats_server(true)?;
        let nats =
            NatsCluster::start(NatsOptions::new(dir.join("nats"), binary).with_servers(servers))
                .await?;
        let client = async_nats::ConnectOptions::new()
            .connect(nats.urls())
            .await?;
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client.clone());
        env.push((
            "TESSEL_REPLICAS".into(),
            if servers >= 3 { "3" } else { "1" }.into(),
        ));
        let status_js = async_nats::jetstream::ContextBuilder::new()
            .timeout(status::POLL_REQUEST_TIMEOUT)
            .build(client.clone());
        let mut c = LocalCluster {
            nats,
            nodes: BTreeMap::new(),
            dir: dir.to_path_buf(),
            js,
            status_js,
            client,
            cluster: "tessel".into(),
            env,
            bin: bin.to_path_buf(),
            http: BTreeMap::new(),
            node_args: Vec::new(),
        };
        for i in 1..=nodes {
            c.spawn(&format!("n{i}"))?;
        }
        Ok(c)
    }

    /// Starts (or restarts) a node.
    pub fn spawn(&mut self, id: &str) -> std::io::Result<()> {
        let port = crate::natsd::free_port().map_err(std::io::Error::other)?;
        let addr = format!("127.0.0.1:{port}");
        let spec = NodeSpec {
            bin: self.bin.clone(),
            id: id.into(),
            nats: self.nats.url(),
            cluster: self.cluster.clone(),
            env: self.env.clone(),
            args: [vec!["--http".into(), addr.clone()], self.node_args.clone()].concat(),
            log: self.dir.join(format!("{id}.log")),
            own_process_group: false,
        };
        self.nodes.insert(id.into(), NodeProc::spawn(spec)?);
        self.http.insert(id.into(), addr);
        Ok(())
    }

    /// The status, if it can be read.
    pub async fn status(&self) -> Option<ClusterStatus> {
        status::read(&self.status_js, &self.cluster).await.ok()
    }

    /// Polls every `poll` until `pred` holds; the error carries the last status and the tails
    /// of the node logs.
    pub async fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        poll: Duration,
        pred: impl Fn(&ClusterStatus) -> bool,
    ) -> anyhow::Result<(ClusterStatus, Duration)> {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < limit {
            if let Some(s) = self.status().await {
                if pred(&s) {
                    return Ok((s, started.elapsed()));
                }
                last = Some(s);
            }
            tokio::time::sleep(poll).await;
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
        anyhow::bail!(
            "timed out after {limit:?} waiting for {what}; last status: {last:#?}\n{logs}"
        )
    }

    /// Waits until the cluster is settled with exactly these nodes owning slots, and each of
    /// them has adopted that map (its own view holds the map's epoch and its slot count). The
    /// buckets alone say what the leader decided; a node that has not read the new map yet
    /// still serves the slots it is losing, and a test that kills "the owner" by the bucket
    /// would kill the wrong process.
    pub async fn wait_settled_on(
        &self,
        ids: &[&str],
        limit: Duration,
        poll: Duration,
    ) -> anyhow::Result<(ClusterStatus, Duration)> {
        let started = Instant::now();
        loop {
            let left = limit.saturating_sub(started.elapsed());
            let (s, _) = self
                .wait_until(&format!("settled on {ids:?}"), left, poll, |s| {
                    s.settled_on(ids)
                })
                .await?;
            let counts = s.counts();
            let mut lagging = Vec::new();
            for &id in ids {
                let view = self.node_view(id).await;
                let adopted = view.as_ref().is_some_and(|v| {
                    v["map_epoch"].as_u64() == Some(s.map_epoch)
                        && v["slots"].as_u64() == counts.get(id).map(|&c| c as u64)
                });
                if !adopted {
                    lagging.push(format!("{id}: {view:?}"));
                }
            }
            if lagging.is_empty() {
                return Ok((s, started.elapsed()));
            }
            if started.elapsed() >= limit {
                anyhow::bail!(
                    "timed out after {limit:?}: the map (epoch {}) is settled on {ids:?} but \
                     not every node has adopted it: {}",
                    s.map_epoch,
                    lagging.join("; ")
                );
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// A node's own view (`view` of its `/status`), if it answers within 2 s.
    pub async fn node_view(&self, id: &str) -> Option<serde_json::Value> {
        let addr = self.http.get(id)?;
        let (200, body) = crate::natsd::http_get(addr, "/status").await.ok()? else {
            return None;
        };
        let mut v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(v.get_mut("view")?.take())
    }

    /// Sends a signal to a node; false if it is not running.
    pub fn signal(&self, id: &str, sig: Signal) -> bool {
        self.nodes.get(id).is_some_and(|n| n.signal(sig))
    }

    /// SIGKILL a node and reap it.
    pub async fn kill9(&mut self, id: &str) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.kill9().await;
        }
    }

    /// A node's log.
    pub fn log(&self, id: &str) -> String {
        self.nodes
            .get(id)
            .map(|n| std::fs::read_to_string(n.log()).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Stops every node (SIGTERM, then SIGKILL) and the servers.
    pub async fn shutdown(&mut self) {
        let stops = self
            .nodes
            .values_mut()
            .map(|n| n.stop(Duration::from_secs(10)));
        futures::future::join_all(stops).await;
        // Close the observing client first, so that stopping the servers is not logged as a
        // lost connection.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.drain()).await;
        let _ = self.nats.stop().await;
    }
}

/// The leader's id and term of a status (None without a leader).
pub fn leader(s: &ClusterStatus) -> Option<(String, u64)> {
    s.leader.as_ref().map(|l| (l.node.clone(), l.term))
}

/// Slots whose owner differs between two statuses.
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
