//! Local `nats-server` processes with JetStream on loopback.
//!
//! Used by `tessel up`, the integration tests, the chaos tests and the benchmarks: it finds the
//! `nats-server` binary (installing it with `scripts/tools.sh` when asked), writes one config
//! file per server, starts one server or a three-server JetStream cluster on `127.0.0.1`, waits
//! until it is ready, and kills, restarts and stops servers on demand.
//!
//! Layout under [`NatsOptions::dir`], for each server `<name>` (`nats-0`, `nats-1`, ...):
//!
//! ```text
//! <dir>/<name>/nats.conf   the generated configuration
//! <dir>/<name>/nats.log    the server's stdout and stderr (appended to across restarts)
//! <dir>/<name>/js/         the JetStream store
//! ```
//!
//! **Invariant:** no process outlives its [`NatsCluster`]: every child is spawned with
//! `kill_on_drop`, and dropping the cluster kills every server still running.

use std::fmt::Write as _;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

/// Environment variable naming the `nats-server` binary to use, overriding the project's copy.
pub const NATS_SERVER_ENV: &str = "TESSEL_NATS_SERVER";

/// The default cluster name of a multi-server deployment.
pub const DEFAULT_CLUSTER_NAME: &str = "tessel-nats";

/// How long [`NatsCluster::start`] and [`NatsCluster::restart`] wait for readiness.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How many sets of free ports [`NatsCluster::start`] tries when a server finds its port taken.
const START_PORT_ATTEMPTS: u32 = 3;

/// How long [`NatsCluster::restart`] keeps retrying a server that exits at once (for example
/// because its port is still briefly in use).
pub const RESTART_RETRY: Duration = Duration::from_secs(10);

/// How long [`NatsCluster::stop`] waits after SIGTERM before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How often readiness is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The timeout of one monitoring request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// How many bytes of a server's log an error message quotes at most.
const LOG_TAIL_BYTES: u64 = 4096;

/// How many lines of a server's log an error message quotes at most.
const LOG_TAIL_LINES: usize = 30;

/// The file, relative to the project root, whose presence marks the root.
const TOOLS_SCRIPT: &str = "scripts/tools.sh";

/// The project's copy of `nats-server`, relative to the project root.
const TOOLS_BINARY: &str = ".tools/bin/nats-server";

/// Errors of finding, starting and stopping `nats-server`.
#[derive(Debug, thiserror::Error)]
pub enum NatsdError {
    /// `TESSEL_NATS_SERVER` is set but names no file.
    #[error(
        "{NATS_SERVER_ENV} is set to {}, which does not exist; point it at a nats-server binary \
         or unset it to use the project's copy (installed by `bash scripts/tools.sh`)",
        path.display()
    )]
    EnvBinaryMissing {
        /// The path the variable names.
        path: PathBuf,
    },
    /// No directory containing `scripts/tools.sh` was found above the current directory or
    /// this crate's manifest directory.
    #[error(
        "cannot find nats-server: {NATS_SERVER_ENV} is not set and no project root (a directory \
         containing scripts/tools.sh) was found above {}; set {NATS_SERVER_ENV} to a nats-server \
         binary",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")
    )]
    NoProjectRoot {
        /// Where the search started.
        searched: Vec<PathBuf>,
    },
    /// The project's copy of `nats-server` is not installed and installing was not asked for.
    #[error(
        "nats-server is not installed at {}; run `bash {}` to install it, or set \
         {NATS_SERVER_ENV} to a nats-server binary",
        path.display(),
        script.display()
    )]
    NotInstalled {
        /// Where the binary was expected.
        path: PathBuf,
        /// The script that installs it.
        script: PathBuf,
    },
    /// `scripts/tools.sh` failed or did not produce a binary.
    #[error("installing nats-server with `bash {}` failed: {reason}", script.display())]
    InstallFailed {
        /// The script that was run.
        script: PathBuf,
        /// What went wrong, with the script's stderr when there is any.
        reason: String,
    },
    /// The options cannot describe a deployment.
    #[error("invalid NATS options: {0}")]
    InvalidOptions(String),
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A server exited before it became ready.
    #[error("nats-server {name} exited before it became ready ({status}); log {}:\n{log_tail}", log.display())]
    Exited {
        /// The server's name.
        name: String,
        /// Its exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },
    /// A server did not become ready in time.
    #[error(
        "nats-server {name} was not ready after {waited:?} (waiting for {waiting_for}); log {}:\n{log_tail}",
        log.display()
    )]
    Timeout {
        /// The server's name.
        name: String,
        /// What readiness condition was not met.
        waiting_for: String,
        /// How long it was waited for.
        waited: Duration,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },
    /// A server index is out of range.
    #[error("no nats-server with index {index}: the deployment has {len}")]
    NoSuchServer {
        /// The index asked for.
        index: usize,
        /// How many servers there are.
        len: usize,
    },
}

/// Builds an [`NatsdError::Io`] with context.
fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> NatsdError {
    let context = context.into();
    move |source| NatsdError::Io { context, source }
}

/// Finds the `nats-server` binary.
///
/// In order: the file named by `TESSEL_NATS_SERVER` when that is set (it must exist); else
/// `<root>/.tools/bin/nats-server`, where `<root>` is the first directory containing
/// `scripts/tools.sh` above the current directory or above this crate's manifest directory.
/// When that is absent and `install` is true, runs `bash <root>/scripts/tools.sh` (blocking; it
/// may take a while) and uses the path it prints last. Errors say what to run.
pub fn find_nats_server(install: bool) -> Result<PathBuf, NatsdError> {
    if let Some(value) = std::env::var_os(NATS_SERVER_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(NatsdError::EnvBinaryMissing { path })
        };
    }

    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let roots: Vec<PathBuf> = starts.iter().filter_map(|s| find_project_root(s)).collect();
    let Some(first_root) = roots.first() else {
        return Err(NatsdError::NoProjectRoot { searched: starts });
    };
    for root in &roots {
        let candidate = root.join(TOOLS_BINARY);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }

    let script = first_root.join(TOOLS_SCRIPT);
    if !install {
        return Err(NatsdError::NotInstalled {
            path: first_root.join(TOOLS_BINARY),
            script,
        });
    }
    run_tools_script(&script)
}

/// The first directory at or above `start` that contains `scripts/tools.sh`.
fn find_project_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| dir.join(TOOLS_SCRIPT).is_file())
        .map(Path::to_path_buf)
}

/// Runs `bash scripts/tools.sh` and returns the path it prints last.
fn run_tools_script(script: &Path) -> Result<PathBuf, NatsdError> {
    tracing::info!(script = %script.display(), "installing nats-server");
    let failed = |reason: String| NatsdError::InstallFailed {
        script: script.to_path_buf(),
        reason,
    };
    let output = std::process::Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("cannot run bash: {e}")))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(failed(format!(
            "{}; stderr:\n{}",
            output.status,
            stderr.trim_end()
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(last) = stdout.lines().map(str::trim).rfind(|l| !l.is_empty()) else {
        return Err(failed(format!(
            "it printed no path; stderr:\n{}",
            stderr.trim_end()
        )));
    };
    let path = PathBuf::from(last);
    if path.is_file() {
        Ok(path)
    } else {
        Err(failed(format!(
            "the path it printed, {}, does not exist",
            path.display()
        )))
    }
}

/// Ports this process handed out lately, newest last (at most [`RECENT_PORTS`]).
static RECENT: std::sync::Mutex<std::collections::VecDeque<u16>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
/// How many handed-out ports are remembered.
const RECENT_PORTS: usize = 1_024;
/// How many ports the kernel is asked for before giving up on one not handed out lately.
const PORT_TRIES: usize = 64;

/// A listener on a free port of 127.0.0.1 that this process has not handed out lately, and
/// the port, now remembered. Once a caller drops its listener the port is free again, and the
/// kernel may offer it to the next caller before the first one's server has bound it: two
/// nodes of one local cluster were once given the same HTTP port, and one could not start.
fn fresh_listener() -> Result<(TcpListener, u16), NatsdError> {
    // Ports refused here stay bound until the end, so that the kernel offers others.
    let mut refused = Vec::new();
    for _ in 0..PORT_TRIES {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_err("cannot bind a free port on 127.0.0.1"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("cannot read a bound port"))?
            .port();
        let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
        if recent.contains(&port) {
            refused.push(listener);
            continue;
        }
        if recent.len() >= RECENT_PORTS {
            recent.pop_front();
        }
        recent.push_back(port);
        return Ok((listener, port));
    }
    Err(NatsdError::Io {
        context: format!("no free port on 127.0.0.1 outside the {RECENT_PORTS} handed out lately"),
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

/// A free TCP port on 127.0.0.1: binds port 0, reads the port, and drops the listener. It is
/// never one this process handed out lately.
///
/// Another process may take the port before it is used; callers that start servers on it
/// should treat "address in use" as retryable.
pub fn free_port() -> Result<u16, NatsdError> {
    fresh_listener().map(|(_, port)| port)
}

/// `n` distinct free ports on 127.0.0.1, none handed out lately by this process.
fn free_ports(n: usize) -> Result<Vec<u16>, NatsdError> {
    let mut listeners = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n {
        let (listener, port) = fresh_listener()?;
        ports.push(port);
        listeners.push(listener);
    }
    drop(listeners);
    Ok(ports)
}

/// Options for a local NATS deployment.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// How many servers: 1 (a single server) or 3 (a JetStream cluster); any number from 1 up
    /// is accepted, more than one forms a cluster.
    pub servers: usize,
    /// The directory the configuration, logs and JetStream stores go under.
    pub dir: PathBuf,
    /// The `nats-server` binary (see [`find_nats_server`]).
    pub binary: PathBuf,
    /// The cluster name of a multi-server deployment.
    pub cluster_name: String,
    /// An optional `(user, password)` every client must present. Routes between the servers
    /// need none. A password beginning with `$2a$` would be taken as a bcrypt hash.
    pub auth: Option<(String, String)>,
    /// Start each server in a process group of its own (see [`NatsOptions::with_own_process_groups`]).
    pub own_process_groups: bool,
}

impl NatsOptions {
    /// One server under `dir`, run from `binary`, no auth, the default cluster name.
    pub fn new(dir: impl Into<PathBuf>, binary: impl Into<PathBuf>) -> Self {
        Self {
            servers: 1,
            dir: dir.into(),
            binary: binary.into(),
            cluster_name: DEFAULT_CLUSTER_NAME.to_owned(),
            auth: None,
            own_process_groups: false,
        }
    }

    /// Starts each server in a process group of its own, so that a terminal's Ctrl-C (sent to
    /// the whole foreground group) reaches only the parent, which stops the servers after its
    /// nodes have drained.
    #[must_use]
    pub fn with_own_process_groups(mut self) -> Self {
        self.own_process_groups = true;
        self
    }

    /// Sets how many servers to run.
    #[must_use]
    pub fn with_servers(mut self, servers: usize) -> Self {
        self.servers = servers;
        self
    }

    /// Requires every client to present `user` and `password`.
    #[must_use]
    pub fn with_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Some((user.into(), password.into()));
        self
    }

    /// Sets the cluster name.
    #[must_use]
    pub fn with_cluster_name(mut self, name: impl Into<String>) -> Self {
        self.cluster_name = name.into();
        self
    }
}

/// One server of a [`NatsCluster`]: its name, ports, files and process.
#[derive(Debug)]
pub struct NatsServer {
    /// The server name (`nats-<index>`), also its JetStream peer name.
    pub name: String,
    /// The client port on 127.0.0.1.
    pub client_port: u16,
    /// The cluster (route) port on 127.0.0.1, for a multi-server deployment.
    pub cluster_port: Option<u16>,
    /// The HTTP monitoring port on 127.0.0.1.
    pub http_port: u16,
    /// The generated configuration file.
    pub config_path: PathBuf,
    /// The JetStream store directory.
    pub store_dir: PathBuf,
    /// The file the server's stdout and stderr are appended to.
    pub log_path: PathBuf,
    binary: PathBuf,
    own_process_group: bool,
    child: Option<Child>,
}

impl NatsServer {
    /// The client URL, `nats://127.0.0.1:<client_port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// The monitoring URL, `http://127.0.0.1:<http_port>`.
    pub fn monitor_url(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// The process id while the server runs (it is `None` after a kill or a stop).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether a process was started and has not been killed or stopped by this handle.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The last lines of the server's log file (empty when it cannot be read).
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }

    /// Starts the process with the existing configuration; does not wait for readiness.
    fn spawn(&mut self) -> Result<(), NatsdError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_err(format!("cannot open {}", self.log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_err(format!("cannot open {}", self.log_path.display())))?;
        let mut command = Command::new(&self.binary);
        if self.own_process_group {
            command.process_group(0);
        }
        let child = command
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true)
            .spawn()
            .map_err(io_err(format!("cannot run {}", self.binary.display())))?;
        tracing::info!(
            server = %self.name,
            pid = child.id(),
            url = %self.url(),
            monitor = %self.monitor_url(),
            "nats-server started"
        );
        self.child = Some(child);
        Ok(())
    }

    /// If the process has exited, forgets it and returns its status.
    fn check_exited(&mut self) -> Result<Option<ExitStatus>, NatsdError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child
            .try_wait()
            .map_err(io_err(format!("cannot poll nats-server {}", self.name)))?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// SIGKILLs the process, if any, and reaps it.
    async fn kill(&mut self) -> Result<(), NatsdError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        // `kill` fails only when the process has already been reaped; `wait` then still works.
        let _ = child.start_kill();
        let status = child
            .wait()
            .await
            .map_err(io_err(format!("cannot reap nats-server {}", self.name)))?;
        tracing::info!(server = %self.name, ?pid, %status, "nats-server killed");
        Ok(())
    }

    /// Sends SIGTERM to the process, if it runs.
    async fn terminate(&mut self) {
        let Some(pid) = self.pid() else {
            return;
        };
        // `unsafe_code` is forbidden, so the signal goes through the shell's `kill` builtin
        // instead of `libc::kill`.
        let sent = Command::new("sh")
            .args(["-c", "kill -s TERM \"$1\"", "sh", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        match sent {
            Ok(status) if status.success() => {}
            Ok(status) => tracing::warn!(server = %self.name, pid, %status, "kill -TERM failed"),
            Err(e) => tracing::warn!(server = %self.name, pid, error = %e, "cannot run kill"),
        }
    }

    /// Waits up to `deadline` for the process to exit after a SIGTERM, then SIGKILLs it.
    async fn wait_or_kill(&mut self, deadline: Instant) -> Result<(), NatsdError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let pid = child.id();
        match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(Ok(status)) => {
                self.child = None;
                tracing::info!(server = %self.name, ?pid, %status, "nats-server stopped");
                Ok(())
            }
            Ok(Err(e)) => {
                self.child = None;
                Err(io_err(format!("cannot reap nats-server {}", self.name))(e))
            }
            Err(_elapsed) => {
                tracing::warn!(server = %self.name, ?pid, "nats-server ignored SIGTERM; killing it");
                self.kill().await
            }
        }
    }

    /// Waits until `deadline` for the server to serve clients with JetStream enabled and, when
    /// `clustered`, to know the JetStream meta leader. While `retry_until` has not passed, a
    /// process that exits is started again.
    async fn wait_ready(
        &mut self,
        deadline: Instant,
        retry_until: Instant,
        clustered: bool,
    ) -> Result<(), NatsdError> {
        let started = Instant::now();
        const HEALTHZ: &str = "/healthz?js-enabled-only=true to answer 200";
        let mut waiting_for = HEALTHZ;
        let mut healthy = false;
        loop {
            if let Some(status) = self.check_exited()? {
                if Instant::now() < retry_until {
                    tracing::info!(server = %self.name, %status, "nats-server exited at once; retrying");
                    sleep(Duration::from_millis(250)).await;
                    self.spawn()?;
                    healthy = false;
                    waiting_for = HEALTHZ;
                    continue;
                }
                return Err(NatsdError::Exited {
                    name: self.name.clone(),
                    status: status.to_string(),
                    log: self.log_path.clone(),
                    log_tail: self.log_tail(),
                });
            }
            if self.child.is_none() {
                // Never started (or killed meanwhile): nothing will become ready.
                return Err(NatsdError::Exited {
                    name: self.name.clone(),
                    status: "not running".to_owned(),
                    log: self.log_path.clone(),
                    log_tail: self.log_tail(),
                });
            }

            if !healthy
                && let Ok((200, _)) =
                    http_get(&self.http_addr(), "/healthz?js-enabled-only=true").await
            {
                waiting_for = "the client port";
                healthy = true;
            }
            if healthy
                && TcpStream::connect((Ipv4Addr::LOCALHOST, self.client_port))
                    .await
                    .is_ok()
            {
                if !clustered {
                    return Ok(());
                }
                waiting_for = "a JetStream meta leader (/jsz meta_cluster.leader)";
                if let Ok((200, body)) = http_get(&self.http_addr(), "/jsz").await
                    && meta_leader(&body).is_some()
                {
                    return Ok(());
                }
            }

            if Instant::now() >= deadline {
                return Err(NatsdError::Timeout {
                    name: self.name.clone(),
                    waiting_for: waiting_for.to_owned(),
                    waited: started.elapsed(),
                    log: self.log_path.clone(),
                    log_tail: self.log_tail(),
                });
            }
            sleep(POLL_INTERVAL).await;
        }
    }
}

/// The non-empty `meta_cluster.leader` of a `/jsz` answer.
fn meta_leader(body: &str) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    let leader = json.get("meta_cluster")?.get("leader")?.as_str()?;
    (!leader.is_empty()).then(|| leader.to_owned())
}

/// A minimal HTTP/1.0 GET to `addr` (`host:port`) within 2 s: the status code and the body.
pub(crate) async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let request = async {
        let mut stream = TcpStream::connect(addr).await?;
        let head = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
        stream.write_all(head.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = timeout(HTTP_TIMEOUT, request).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP request timed out")
    })??;
    let text = String::from_utf8_lossy(&response);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let status_line = text.lines().next().ok_or_else(bad)?;
    let mut parts = status_line.split_whitespace();
    let version = parts.next().ok_or_else(bad)?;
    if !version.starts_with("HTTP/") {
        return Err(bad());
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(bad)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The last lines of a log file, or a note that it cannot be read.
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let from = len.saturating_sub(LOG_TAIL_BYTES);
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<&str> = text.lines().collect();
        if from > 0 && !lines.is_empty() {
            lines.remove(0); // probably cut in the middle
        }
        let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
        Ok(lines[skip..].join("\n"))
    };
    match read() {
        Ok(tail) if tail.is_empty() => "(log is empty)".to_owned(),
        Ok(tail) => tail,
        Err(e) => format!("(cannot read log: {e})"),
    }
}

/// A string literal for the NATS configuration format.
fn conf_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path as a NATS configuration string literal; the format needs UTF-8.
fn conf_path(path: &Path) -> Result<String, NatsdError> {
    path.to_str()
        .map(conf_str)
        .ok_or_else(|| NatsdError::InvalidOptions(format!("path {} is not UTF-8", path.display())))
}

/// The configuration file of one server.
fn render_config(
    server: &NatsServer,
    opts: &NatsOptions,
    other_cluster_ports: &[u16],
) -> Result<String, NatsdError> {
    // `write!` to a String cannot fail.
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Generated by tessel (node/src/natsd.rs); rewritten on every start."
    );
    let _ = writeln!(c, "server_name: {}", conf_str(&server.name));
    let _ = writeln!(c, "listen: 127.0.0.1:{}", server.client_port);
    let _ = writeln!(c, "http: 127.0.0.1:{}", server.http_port);
    let _ = writeln!(c, "max_payload: 8MB");
    let _ = writeln!(c, "jetstream {{");
    let _ = writeln!(c, "  store_dir: {}", conf_path(&server.store_dir)?);
    let _ = writeln!(c, "  max_memory_store: 256MB");
    let _ = writeln!(c, "  max_file_store: 4GB");
    let _ = writeln!(c, "}}");
    if let Some(cluster_port) = server.cluster_port {
        let _ = writeln!(c, "cluster {{");
        let _ = writeln!(c, "  name: {}", conf_str(&opts.cluster_name));
        let _ = writeln!(c, "  listen: 127.0.0.1:{cluster_port}");
        let _ = writeln!(c, "  routes: [");
        for port in other_cluster_ports {
            let _ = writeln!(c, "    nats-route://127.0.0.1:{port}");
        }
        let _ = writeln!(c, "  ]");
        let _ = writeln!(c, "}}");
    }
    if let Some((user, password)) = &opts.auth {
        let _ = writeln!(c, "authorization {{");
        let _ = writeln!(c, "  user: {}", conf_str(user));
        let _ = writeln!(c, "  password: {}", conf_str(password));
        let _ = writeln!(c, "}}");
    }
    Ok(c)
}

/// Running `nats-server` processes: one server or a JetStream cluster on 127.0.0.1.
///
/// Dropping it kills every server still running; call [`NatsCluster::stop`] for a graceful
/// shutdown.
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<NatsServer>,
    dir: PathBuf,
}

impl NatsCluster {
    /// Writes the configurations, starts every server and waits (up to 20 s) until each serves
    /// clients with JetStream enabled and, for a cluster, knows the JetStream meta leader.
    ///
    /// On error every server already started is killed.
    pub async fn start(opts: NatsOptions) -> Result<Self, NatsdError> {
        if opts.servers == 0 {
            return Err(NatsdError::InvalidOptions(
                "servers must be at least 1".to_owned(),
            ));
        }
        if opts.servers > 1 && opts.cluster_name.trim().is_empty() {
            return Err(NatsdError::InvalidOptions(
                "cluster_name must not be empty".to_owned(),
            ));
        }
        if !opts.binary.is_file() {
            return Err(NatsdError::InvalidOptions(format!(
                "nats-server binary {} does not exist; run `bash scripts/tools.sh`",
                opts.binary.display()
            )));
        }
        let dir = std::path::absolute(&opts.dir)
            .map_err(io_err(format!("cannot resolve {}", opts.dir.display())))?;
        let clustered = opts.servers > 1;
        let mut attempt = 1;
        loop {
            let servers = Self::configure(&opts, &dir, clustered)?;
            let mut cluster = Self {
                servers,
                dir: dir.clone(),
            };
            match cluster.start_all(clustered).await {
                Ok(()) => {
                    tracing::info!(
                        servers = cluster.len(),
                        url = %cluster.url(),
                        dir = %cluster.dir.display(),
                        "NATS ready"
                    );
                    return Ok(cluster);
                }
                Err(e) => {
                    cluster.kill_all().await;
                    // Another process took one of the free ports between our probe and the
                    // server's bind: pick new ones (a cluster's routes name every port, so
                    // all of them change).
                    let taken = matches!(&e, NatsdError::Exited { log_tail, .. }
                        if log_tail.contains("address already in use"));
                    if !taken || attempt >= START_PORT_ATTEMPTS {
                        return Err(e);
                    }
                    tracing::info!(attempt, error = %e, "a port was taken; starting on new ones");
                    for server in &cluster.servers {
                        let _ = std::fs::remove_dir_all(&server.store_dir);
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Picks free ports for every server and writes their configurations under `dir`.
    fn configure(
        opts: &NatsOptions,
        dir: &Path,
        clustered: bool,
    ) -> Result<Vec<NatsServer>, NatsdError> {
        let per_server = if clustered { 3 } else { 2 };
        let ports = free_ports(opts.servers * per_server)?;
        let mut servers = Vec::with_capacity(opts.servers);
        for (i, p) in ports.chunks(per_server).enumerate() {
            let name = format!("nats-{i}");
            let home = dir.join(&name);
            servers.push(NatsServer {
                client_port: p[0],
                http_port: p[1],
                cluster_port: p.get(2).copied(),
                config_path: home.join("nats.conf"),
                store_dir: home.join("js"),
                log_path: home.join("nats.log"),
                binary: opts.binary.clone(),
                own_process_group: opts.own_process_groups,
                child: None,
                name,
            });
        }
        let cluster_ports: Vec<u16> = servers.iter().filter_map(|s| s.cluster_port).collect();
        for server in &servers {
            let home = server.config_path.parent().unwrap_or(dir);
            std::fs::create_dir_all(&server.store_dir).map_err(io_err(format!(
                "cannot create {}",
                server.store_dir.display()
            )))?;
            let others: Vec<u16> = cluster_ports
                .iter()
                .copied()
                .filter(|p| Some(*p) != server.cluster_port)
                .collect();
            let config = render_config(server, opts, &others)?;
            std::fs::write(&server.config_path, config).map_err(io_err(format!(
                "cannot write {}",
                server.config_path.display()
            )))?;
            tracing::debug!(server = %server.name, dir = %home.display(), "nats-server configured");
        }
        Ok(servers)
    }

    /// Spawns every server, then waits for each.
    async fn start_all(&mut self, clustered: bool) -> Result<(), NatsdError> {
        for server in &mut self.servers {
            server.spawn()?;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        // A server that exits at once on a fresh start (a port taken meanwhile) is retried
        // briefly; a bad configuration still fails within this window.
        let retry_until = Instant::now() + Duration::from_secs(2);
        for server in &mut self.servers {
            server.wait_ready(deadline, retry_until, clustered).await?;
        }
        Ok(())
    }

    /// SIGKILLs and reaps every server, ignoring errors (used on failure paths).
    async fn kill_all(&mut self) {
        for server in &mut self.servers {
            if let Err(e) = server.kill().await {
                tracing::warn!(server = %server.name, error = %e, "cannot kill nats-server");
            }
        }
    }

    /// The client URL of each server, `nats://127.0.0.1:PORT`.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// All client URLs joined by commas, as `--nats` and `async_nats::connect` accept.
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// How many servers the deployment has (running or not).
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the deployment has no servers (never true for a started one).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The directory the deployment lives under.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Server `i`, if there is one.
    pub fn server(&self, i: usize) -> Option<&NatsServer> {
        self.servers.get(i)
    }

    /// All servers.
    pub fn servers(&self) -> &[NatsServer] {
        &self.servers
    }

    /// The process id of server `i` while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers.get(i).and_then(NatsServer::pid)
    }

    /// Server `i`, mutably, or [`NatsdError::NoSuchServer`].
    fn server_mut(&mut self, i: usize) -> Result<&mut NatsServer, NatsdError> {
        let len = self.servers.len();
        self.servers
            .get_mut(i)
            .ok_or(NatsdError::NoSuchServer { index: i, len })
    }

    /// SIGKILLs server `i` and reaps it; does nothing when it is not running.
    pub async fn kill(&mut self, i: usize) -> Result<(), NatsdError> {
        self.server_mut(i)?.kill().await
    }

    /// Starts server `i` again with the same configuration, ports and store directory, and
    /// waits (up to 20 s) until it is ready. A server still running is killed first. While
    /// the server exits at once (its port still briefly in use), it is retried for up to 10 s.
    pub async fn restart(&mut self, i: usize) -> Result<(), NatsdError> {
        let clustered = self.servers.len() > 1;
        let server = self.server_mut(i)?;
        server.kill().await?;
        server.spawn()?;
        let now = Instant::now();
        let result = server
            .wait_ready(now + START_TIMEOUT, now + RESTART_RETRY, clustered)
            .await;
        match result {
            Ok(()) => {
                tracing::info!(server = %server.name, pid = server.pid(), "nats-server restarted");
                Ok(())
            }
            Err(e) => {
                let _ = server.kill().await;
                Err(e)
            }
        }
    }

    /// Stops every server: SIGTERM to all, up to 5 s for them to exit, then SIGKILL; reaps all.
    pub async fn stop(&mut self) -> Result<(), NatsdError> {
        for server in &mut self.servers {
            server.terminate().await;
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut first_error = None;
        for server in &mut self.servers {
            if let Err(e) = server.wait_or_kill(deadline).await {
                tracing::warn!(server = %server.name, error = %e, "cannot stop nats-server");
                first_error.get_or_insert(e);
            }
        }
        tracing::info!(dir = %self.dir.display(), "NATS stopped");
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(child) = server.child.as_mut() {
                // Already exited is fine; the runtime reaps the rest of `kill_on_drop` children.
                let _ = child.start_kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each call drops its listener, so the kernel may offer the same port again; among 900
    /// draws from its ~28,000 ephemeral ports it nearly always would (the chance of no repeat
    /// is about 10⁻⁶). The ports handed out are remembered and never repeat.
    #[test]
    fn free_ports_handed_out_do_not_repeat() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..900 {
            let port = free_port().unwrap();
            assert!(seen.insert(port), "port {port} handed out twice");
        }
        let more = free_ports(3).unwrap();
        assert!(more.iter().all(|p| seen.insert(*p)), "{more:?}");
    }

    #[test]
    fn conf_strings_are_escaped() {
        assert_eq!(conf_str(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn meta_leader_needs_a_name() {
        assert_eq!(
            meta_leader(r#"{"meta_cluster":{"leader":"nats-1"}}"#).as_deref(),
            Some("nats-1")
        );
        assert_eq!(meta_leader(r#"{"meta_cluster":{"leader":""}}"#), None);
        assert_eq!(meta_leader(r#"{"server_id":"x"}"#), None);
        assert_eq!(meta_leader("not json"), None);
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(6).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len());
        assert_ne!(free_port().unwrap(), 0);
    }

    #[test]
    fn config_has_cluster_and_auth() {
        let opts = NatsOptions::new("/tmp/x", "/bin/true")
            .with_servers(3)
            .with_auth("u", "p");
        let server = NatsServer {
            name: "nats-0".to_owned(),
            client_port: 1,
            cluster_port: Some(3),
            http_port: 2,
            config_path: PathBuf::from("/tmp/x/nats-0/nats.conf"),
            store_dir: PathBuf::from("/tmp/x/nats-0/js"),
            log_path: PathBuf::from("/tmp/x/nats-0/nats.log"),
            binary: PathBuf::from("/bin/true"),
            own_process_group: false,
            child: None,
        };
        let conf = render_config(&server, &opts, &[4, 5]).unwrap();
        assert!(conf.contains("listen: 127.0.0.1:1"));
        assert!(conf.contains("http: 127.0.0.1:2"));
        assert!(conf.contains("store_dir: \"/tmp/x/nats-0/js\""));
        assert!(conf.contains("nats-route://127.0.0.1:4"));
        assert!(conf.contains("nats-route://127.0.0.1:5"));
        assert!(conf.contains("name: \"tessel-nats\""));
        assert!(conf.contains("user: \"u\""));
    }
}
