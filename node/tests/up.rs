//! `tessel up`, the README's main job: starts NATS and three nodes, shows a settled status, runs
//! the demo workload, stops everything it started.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

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
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("tessel up: NATS at "))
        .unwrap()
        .trim();
    let marker = dir.path().to_string_lossy();
    let left: Vec<&str> = ps
        .lines()
        .filter(|l| l.contains(marker.as_ref()) || l.contains(url))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Ctrl-C in a terminal goes to the whole foreground process group. `tessel up` keeps its
/// servers and nodes in groups of their own, so only it gets the signal: it drains the nodes
/// (each exits 0) while the servers are still up, then stops the servers.
#[test]
fn ctrl_c_to_the_terminal_group_drains_the_nodes() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessel"))
        .args(["up", "--status-every-s", "1", "--demo-rate", "0", "--dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pgid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut text = String::new();
    let started = Instant::now();
    while !text.contains("(settled)") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never settled:\n{text}"
        );
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            text.push_str(&line);
            text.push('\n');
        }
    }
    // What the terminal does on Ctrl-C: SIGINT to every process of the foreground group.
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    text.extend(rx.try_iter().map(|l| l + "\n"));
    assert!(status.success(), "{status}:\n{text}");
    for n in ["node-1", "node-2", "node-3"] {
        assert!(
            text.contains(&format!("{n} exited (exit status: 0)")),
            "{n} did not drain cleanly:\n{text}"
        );
    }
    assert!(text.contains("nothing left running"), "{text}");
}
