//! Node processes started by `tessel up`, the integration tests, the chaos harness and the
//! benchmarks: spawn, signal (TERM, KILL, STOP, CONT), wait, and never leave one behind.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How to start one node.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The `tessel` binary.
    pub bin: PathBuf,
    /// The node id.
    pub id: String,
    /// NATS URLs, comma-separated.
    pub nats: String,
    /// The cluster name.
    pub cluster: String,
    /// Extra environment (`TESSEL_*` settings).
    pub env: Vec<(String, String)>,
    /// Extra arguments after `node …`.
    pub args: Vec<String>,
    /// Where its log goes.
    pub log: PathBuf,
    /// Start it in a process group of its own, so that a terminal's Ctrl-C (sent to the whole
    /// foreground group) reaches only the parent, which then drains it; `tessel up` sets this.
    pub own_process_group: bool,
}

/// A running node process.
#[derive(Debug)]
pub struct NodeProc {
    /// How it was started (to restart it).
    pub spec: NodeSpec,
    child: Child,
}

impl NodeProc {
    /// Starts a node.
    pub fn spawn(spec: NodeSpec) -> std::io::Result<NodeProc> {
        if let Some(dir) = spec.log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)?;
        let mut command = Command::new(&spec.bin);
        if spec.own_process_group {
            command.process_group(0);
        }
        let child = command
            .arg("node")
            .args([
                "--nats",
                &spec.nats,
                "--node-id",
                &spec.id,
                "--cluster",
                &spec.cluster,
            ])
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(NodeProc { spec, child })
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal; false if the process is gone.
    pub fn signal(&self, sig: Signal) -> bool {
        match self.child.id().and_then(|p| i32::try_from(p).ok()) {
            Some(pid) => kill(Pid::from_raw(pid), sig).is_ok(),
            None => false,
        }
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM (a graceful drain), then SIGKILL if it has not exited within `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        match self.wait_for(grace).await {
            Some(s) => Some(s),
            None => {
                self.kill9().await;
                None
            }
        }
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.spec.log
    }
}

/// The `tessel` binary of this process (for spawning nodes from `tessel up`).
pub fn current_binary() -> std::io::Result<PathBuf> {
    std::env::current_exe()
}
