//! `tessel up`, the README's main job: starts NATS and three nodes, shows a settled status, runs
//! the demo workload, stops everything it started.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn up_starts_a_settled_three_node_cluster_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tessel"))
        .args(["up", "--duration-s", "10", "--status-every-s", "1", "--dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("(settled)"), "{text}");
    let settled = text.split("(settled)").nth(1).unwrap();
    for n in ["node-1", "node-2", "node-3"] {
        assert!(
            settled
                .lines()
                .any(|l| l.starts_with(n) && l.contains("Active")),
            "{n} not Active:\n{text}"
        );
    }
    assert!(text.contains("unowned slots 0"), "{text}");
    // The demo workload ran: its final report counts rows acknowledged and applied.
    let last = text
        .lines()
        .find(|l| l.starts_with("demo: demo: final: "))
        .unwrap_or_else(|| panic!("no final demo report:\n{text}"));
    let applied: u64 = last
        .split(" rows acked, ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the applied rows in {last:?}"));
    assert!(applied > 0, "{last}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("tessel up: dashboard at http://127.0.0.1:")),
        "{text}"
    );
    for n in ["node-1", "node-2", "node-3"] {
        assert!(
            text.contains(&format!("{n} exited (exit status: 0)")),
            "{n} did not drain cleanly:\n{text}"
        );
    }
    assert!(text.contains("nothing left running"), "{text}");
    // No process of this run is left: the data directory's servers and nodes are gone.
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("tessel up: NATS at "))
        .unwrap()
        .trim();
    let left = left_running(&dir.path().to_string_lossy(), url);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The command lines of running processes that name `marker` (the data directory: the
/// servers' configuration) or `url` (the nodes' `--nats`).
fn left_running(marker: &str, url: &str) -> Vec<String> {
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(marker) || l.contains(url))
        .map(str::to_string)
        .collect()
}

/// `tessel up` started in a process group of its own (as a terminal's foreground job), with
/// its stdout read line by line on a thread and its stderr in `dir/up.err`.
struct Up {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
    text: String,
}

impl Up {
    fn start(dir: &std::path::Path, extra: &[&str]) -> Up {
        use std::io::{BufRead, BufReader};
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessel"))
            .args(["up", "--status-every-s", "1", "--demo-rate", "0", "--dir"])
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.join("up.err")).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Up {
            child,
            lines,
            reader,
            text: String::new(),
        }
    }

    /// Reads its output until the status says the cluster has settled.
    fn wait_settled(&mut self) {
        let started = Instant::now();
        while !self.text.contains("(settled)") {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "never settled:\n{}",
                self.text
            );
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                self.text.push_str(&line);
                self.text.push('\n');
            }
        }
    }

    /// Waits for it to exit; its status and its whole output.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        self.reader.join().unwrap();
        self.text.extend(self.lines.try_iter().map(|l| l + "\n"));
        (status, self.text)
    }
}

/// Ctrl-C in a terminal goes to the whole foreground process group. `tessel up` keeps its
/// servers and nodes in groups of their own, so only it gets the signal: it drains the nodes
/// (each exits 0) while the servers are still up, then stops the servers.
#[test]
fn ctrl_c_to_the_terminal_group_drains_the_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path(), &[]);
    up.wait_settled();
    // What the terminal does on Ctrl-C: SIGINT to every process of the foreground group.
    let pgid = nix::unistd::Pid::from_raw(i32::try_from(up.child.id()).unwrap());
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGINT).unwrap();
    let (status, text) = up.finish();
    assert!(status.success(), "{status}:\n{text}");
    for n in ["node-1", "node-2", "node-3"] {
        assert!(
            text.contains(&format!("{n} exited (exit status: 0)")),
            "{n} did not drain cleanly:\n{text}"
        );
    }
    assert!(text.contains("nothing left running"), "{text}");
}

/// A `tessel up` killed outright (SIGKILL: it stops nothing) leaves nothing running either: its
/// guard reads the end of its input, drains the node (its log shows the lease released, not
/// lost) and then stops the server.
#[test]
fn a_killed_tessel_up_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Up::start(dir.path(), &["--nodes", "1"]);
    up.wait_settled();
    up.child.kill().unwrap();
    let (_, text) = up.finish();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("tessel up: NATS at "))
        .unwrap()
        .trim()
        .to_string();
    let marker = dir.path().to_string_lossy().into_owned();
    // The guard says when it has stopped everything.
    let err = || std::fs::read_to_string(dir.path().join("up.err")).unwrap_or_default();
    let started = Instant::now();
    while !err().contains("tessel guard: stopped") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the guard did not finish:\n{}",
            err()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = left_running(&marker, &url);
    assert!(left.is_empty(), "left behind: {left:?}\n{}", err());
    let node_log = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path().join("node-1.log"))
        .find(|p| p.exists())
        .unwrap();
    // The lone node led; drained, it released the lease (a killed one would not have).
    let log = std::fs::read_to_string(&node_log).unwrap();
    assert!(log.contains("reason=Released"), "{log}");
}
