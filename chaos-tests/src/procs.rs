//! The processes under test: three `nats-server`s in one JetStream cluster and 3–5 `tessel
//! node`s, each started on its host of the [`Net`], with its log under the run directory.
//!
//! Every process is spawned with `kill_on_drop`; [`Procs::shutdown`] stops nodes gracefully and
//! then the servers. Exits the harness did not cause are recorded as crashes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Child;

use crate::net::Net;

/// The cluster name the nodes use.
pub const CLUSTER: &str = "tessel";

/// The lease TTL the nodes are given.
pub const LEASE_TTL_MS: u64 = 2_000;

/// The membership TTL (above a stream-leader election, see docs/operations.md).
pub const MEMBER_TTL_MS: u64 = 10_000;

/// How long a node's KV request may take (the default, 500 ms, is short for three servers on a
/// loaded machine; it must stay under the lease TTL).
pub const REQUEST_TIMEOUT_MS: u64 = 1_000;

/// How often a slot that received deltas checkpoints (the default is 10 s).
pub const CHECKPOINT_INTERVAL_MS: u64 = 30_000;

/// What a process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A NATS server.
    Nats,
    /// A tessel node.
    Node,
}

/// One process slot: its current incarnation, if running.
#[derive(Debug)]
pub struct Proc {
    /// Its host name (`nats-0`, `n1`, …).
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Client port (NATS) — unused for nodes.
    pub port: u16,
    /// Cluster port (NATS).
    pub cluster_port: u16,
    /// Its log file.
    pub log: PathBuf,
    /// The running child, if any.
    child: Option<Child>,
    /// Whether the harness stopped it (SIGSTOP) and has not resumed it.
    pub paused: bool,
    /// The clock offset it runs with (nodes).
    pub clock_offset_ms: i64,
    /// How many times it was started.
    pub starts: u32,
}

impl Proc {
    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether a child is held (it may have exited unnoticed).
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    fn signal(&self, sig: Signal) -> bool {
        match self.pid().and_then(|p| i32::try_from(p).ok()) {
            Some(pid) => kill(Pid::from_raw(pid), sig).is_ok(),
            None => false,
        }
    }
}

/// An exit the harness did not cause.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Crash {
    /// The process.
    pub name: String,
    /// Its exit status.
    pub status: String,
    /// When it was noticed (ms since the start of the run).
    pub at_ms: u64,
}

/// All processes of a run.
pub struct Procs {
    /// NATS servers, then nodes.
    pub procs: Vec<Proc>,
    /// The network.
    pub net: Net,
    nats_bin: PathBuf,
    tessel_bin: PathBuf,
    dir: PathBuf,
    started: Instant,
    /// Unexpected exits seen.
    pub crashes: Vec<Crash>,
}

impl Procs {
    /// Lays out `servers` NATS servers and `nodes` nodes (nothing started yet).
    pub fn new(
        mut net: Net,
        nats_bin: &Path,
        tessel_bin: &Path,
        dir: &Path,
        servers: usize,
        nodes: usize,
        started: Instant,
    ) -> anyhow::Result<Procs> {
        let mut procs = Vec::new();
        for i in 0..servers {
            let name = format!("nats-{i}");
            let ip = net.add_host(&name)?;
            let (port, cluster_port) = match net {
                Net::Loopback => (
                    tessel_node::natsd::free_port()?,
                    tessel_node::natsd::free_port()?,
                ),
                Net::Netns(_) => (4222, 6222),
            };
            procs.push(Proc {
                log: dir.join(format!("{name}.log")),
                name,
                kind: Kind::Nats,
                ip,
                port,
                cluster_port,
                child: None,
                paused: false,
                clock_offset_ms: 0,
                starts: 0,
            });
        }
        for i in 1..=nodes {
            let name = format!("n{i}");
            let ip = net.add_host(&name)?;
            procs.push(Proc {
                log: dir.join(format!("{name}.log")),
                name,
                kind: Kind::Node,
                ip,
                port: 0,
                cluster_port: 0,
                child: None,
                paused: false,
                clock_offset_ms: 0,
                starts: 0,
            });
        }
        Ok(Procs {
            procs,
            net,
            nats_bin: nats_bin.to_path_buf(),
            tessel_bin: tessel_bin.to_path_buf(),
            dir: dir.to_path_buf(),
            started,
            crashes: Vec::new(),
        })
    }

    /// Milliseconds since the start of the run.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The client URLs of the NATS servers.
    pub fn nats_urls(&self) -> Vec<String> {
        self.procs
            .iter()
            .filter(|p| p.kind == Kind::Nats)
            .map(|p| format!("nats://{}:{}", p.ip, p.port))
            .collect()
    }

    /// Names of processes of a kind.
    pub fn names(&self, kind: Kind) -> Vec<String> {
        self.procs
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| p.name.clone())
            .collect()
    }

    fn get(&self, name: &str) -> anyhow::Result<&Proc> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no process {name}"))
    }

    fn get_mut(&mut self, name: &str) -> anyhow::Result<&mut Proc> {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process {name}"))
    }

    fn nats_conf(&self, p: &Proc) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join(&p.name);
        std::fs::create_dir_all(&dir)?;
        let routes: Vec<String> = self
            .procs
            .iter()
            .filter(|q| q.kind == Kind::Nats && q.name != p.name)
            .map(|q| format!("    nats-route://{}:{}", q.ip, q.cluster_port))
            .collect();
        let store = dir.join("js");
        let conf = format!(
            "server_name: {name}\nlisten: {ip}:{port}\nmax_payload: 8MB\n\
             jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 256MB\n  max_file_store: 4GB\n}}\n\
             cluster {{\n  name: tessel-chaos\n  listen: {ip}:{cport}\n  routes: [\n{routes}\n  ]\n}}\n",
            name = p.name,
            ip = p.ip,
            port = p.port,
            store = store.display(),
            cport = p.cluster_port,
            routes = routes.join("\n"),
        );
        let path = dir.join("nats.conf");
        std::fs::write(&path, conf)?;
        Ok(path)
    }

    /// Starts (or restarts) a process.
    pub fn spawn(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self.get(name)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)
            .with_context(|| format!("cannot open {}", p.log.display()))?;
        let mut cmd = match p.kind {
            Kind::Nats => {
                let conf = self.nats_conf(p)?;
                let mut c = self.net.command(name, &self.nats_bin);
                c.arg("-c").arg(conf);
                c
            }
            Kind::Node => {
                let config = self.dir.join("node.toml");
                std::fs::write(
                    &config,
                    format!("checkpoint_interval_ms = {CHECKPOINT_INTERVAL_MS}\n"),
                )?;
                let mut c = self.net.command(name, &self.tessel_bin);
                c.arg("node").arg("--config").arg(&config).args([
                    "--nats",
                    &self.nats_urls().join(","),
                    "--node-id",
                    name,
                    "--cluster",
                    CLUSTER,
                    "--log-format",
                    "json",
                ]);
                c.envs([
                    ("RUST_LOG", "info".to_string()),
                    ("TESSEL_REPLICAS", "3".to_string()),
                    ("TESSEL_LEASE_TTL_MS", LEASE_TTL_MS.to_string()),
                    ("TESSEL_MEMBER_TTL_MS", MEMBER_TTL_MS.to_string()),
                    ("TESSEL_HEARTBEAT_INTERVAL_MS", "1000".to_string()),
                    ("TESSEL_REQUEST_TIMEOUT_MS", REQUEST_TIMEOUT_MS.to_string()),
                    ("TESSEL_DRAIN_TIMEOUT_MS", "10000".to_string()),
                    ("TESSEL_CONNECT_RETRY_FOR_MS", "0".to_string()),
                    ("TESSEL_CLOCK_OFFSET_MS", p.clock_offset_ms.to_string()),
                ]);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let p = self.get_mut(name)?;
        p.child = Some(child);
        p.paused = false;
        p.starts += 1;
        Ok(())
    }

    /// Waits until a NATS server accepts TCP connections (from the harness's host).
    pub async fn wait_listening(&self, name: &str, limit: Duration) -> anyhow::Result<()> {
        let p = self.get(name)?;
        let addr = (p.ip, p.port);
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "{name} not listening on {}:{} after {limit:?}",
            p.ip,
            p.port
        )
    }

    /// SIGKILL a process and reap it.
    pub async fn kill9(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self.get_mut(name)?;
        if let Some(mut c) = p.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        p.paused = false;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status if it exited by itself.
    pub async fn stop(&mut self, name: &str, grace: Duration) -> anyhow::Result<Option<String>> {
        let p = self.get_mut(name)?;
        if p.paused {
            p.signal(Signal::SIGCONT);
            p.paused = false;
        }
        p.signal(Signal::SIGTERM);
        let Some(mut c) = p.child.take() else {
            return Ok(None);
        };
        match tokio::time::timeout(grace, c.wait()).await {
            Ok(Ok(s)) => Ok(Some(s.to_string())),
            _ => {
                let _ = c.start_kill();
                let _ = c.wait().await;
                Ok(None)
            }
        }
    }

    /// SIGSTOP.
    pub fn pause(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self.get_mut(name)?;
        if p.signal(Signal::SIGSTOP) {
            p.paused = true;
        }
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self.get_mut(name)?;
        p.signal(Signal::SIGCONT);
        p.paused = false;
        Ok(())
    }

    /// Sets the clock offset a node gets at its next start.
    pub fn set_clock_offset(&mut self, name: &str, ms: i64) -> anyhow::Result<()> {
        self.get_mut(name)?.clock_offset_ms = ms;
        Ok(())
    }

    /// Records (and restarts) every process that exited without the harness causing it.
    pub fn check_exits(&mut self) {
        let now = self.now_ms();
        let mut restart = Vec::new();
        for p in &mut self.procs {
            let Some(c) = p.child.as_mut() else { continue };
            if let Ok(Some(status)) = c.try_wait() {
                self.crashes.push(Crash {
                    name: p.name.clone(),
                    status: status.to_string(),
                    at_ms: now,
                });
                p.child = None;
                restart.push(p.name.clone());
            }
        }
        for name in restart {
            let _ = self.spawn(&name);
        }
    }

    /// Names of processes that are down (killed and not restarted).
    pub fn down(&self) -> Vec<String> {
        self.procs
            .iter()
            .filter(|p| !p.is_up())
            .map(|p| p.name.clone())
            .collect()
    }

    /// Names of paused processes.
    pub fn paused(&self) -> Vec<String> {
        self.procs
            .iter()
            .filter(|p| p.paused)
            .map(|p| p.name.clone())
            .collect()
    }

    /// A node's log text.
    pub fn log_text(&self, name: &str) -> String {
        self.get(name)
            .ok()
            .and_then(|p| std::fs::read_to_string(&p.log).ok())
            .unwrap_or_default()
    }

    /// Stops nodes (SIGTERM, 10 s grace), then servers.
    pub async fn shutdown(&mut self) {
        let names: Vec<String> = self.names(Kind::Node);
        for n in &names {
            let _ = self.resume(n);
        }
        let stops = self
            .procs
            .iter_mut()
            .filter(|p| p.kind == Kind::Node)
            .filter_map(|p| p.child.take())
            .map(|mut c| async move {
                if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
                if tokio::time::timeout(Duration::from_secs(10), c.wait())
                    .await
                    .is_err()
                {
                    let _ = c.start_kill();
                    let _ = c.wait().await;
                }
            });
        futures::future::join_all(stops).await;
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }
}
