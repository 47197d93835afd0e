//! `tessel guard` (hidden): what stops `tessel up`'s servers and nodes when `tessel up` itself
//! dies without stopping them (SIGKILL, the OOM killer, a crash).
//!
//! `tessel up` starts the guard first, in a process group of its own, with a pipe to its
//! standard input, and writes a line for each process group it starts (`node <pgid>` or
//! `server <pgid>`). The pipe's only writer is `tessel up`, so however it ends, the guard reads
//! the end of its input. After `done` (a clean stop: everything is already stopped) it exits at
//! once. Without `done` it does what `tessel up` would have done on Ctrl-C: it sends SIGTERM to
//! the node groups (each node drains and leaves), waits up to [`NODE_DRAIN_MS`] for them,
//! kills what is left, then does the same to the server groups. It needs no clock of its
//! parent and no `unsafe` (a parent-death signal would need `prctl` in a `pre_exec` hook).

use std::io::{BufRead, Read};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long the guard waits for the nodes to drain after SIGTERM before it kills them (as
/// `tessel up` does on Ctrl-C).
pub const NODE_DRAIN_MS: u64 = 15_000;

/// How long it waits for the servers after SIGTERM.
pub const SERVER_STOP_MS: u64 = 5_000;

/// The most process groups one guard accepts (a line more is ignored).
pub const MAX_GROUPS: usize = 1_024;

/// The longest line the guard reads.
const MAX_LINE_BYTES: usize = 64;

/// Arguments of `tessel guard` (none: its input says what to guard).
#[derive(Args, Debug)]
pub struct GuardArgs {}

/// What the guard was told.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Guarded {
    /// Process groups of nodes.
    pub nodes: Vec<i32>,
    /// Process groups of NATS servers.
    pub servers: Vec<i32>,
    /// Whether `tessel up` said it stopped everything itself.
    pub done: bool,
}

impl Guarded {
    /// Takes one line of the guard's input; a malformed line is ignored (and said so).
    pub fn take(&mut self, line: &str) -> Result<(), String> {
        let line = line.trim();
        if line == "done" {
            self.done = true;
            return Ok(());
        }
        let (kind, pgid) = line
            .split_once(' ')
            .ok_or_else(|| format!("not `<kind> <pgid>`: {line:?}"))?;
        let pgid: i32 = pgid
            .parse()
            .ok()
            .filter(|p| *p > 1)
            .ok_or_else(|| format!("not a process group: {pgid:?}"))?;
        if self.nodes.len() + self.servers.len() >= MAX_GROUPS {
            return Err(format!("more than {MAX_GROUPS} process groups"));
        }
        match kind {
            "node" => self.nodes.push(pgid),
            "server" => self.servers.push(pgid),
            _ => return Err(format!("unknown kind {kind:?}")),
        }
        Ok(())
    }
}

/// Runs `tessel guard`: reads its input to the end, then stops what it guards unless told
/// `done`.
pub fn run(_args: GuardArgs) -> ExitCode {
    let mut guarded = Guarded::default();
    let mut stdin = std::io::stdin().lock();
    while let Some(line) = read_line(&mut stdin) {
        match line {
            Ok(line) => {
                if let Err(e) = guarded.take(&line) {
                    eprintln!("tessel guard: ignoring a line: {e}");
                }
            }
            Err(e) => eprintln!("tessel guard: ignoring a line: {e}"),
        }
        if guarded.done {
            return ExitCode::SUCCESS;
        }
    }
    if guarded.nodes.is_empty() && guarded.servers.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "tessel guard: tessel up ended without stopping its {} node(s) and {} server(s); stopping them",
        guarded.nodes.len(),
        guarded.servers.len()
    );
    stop_groups(&guarded.nodes, Duration::from_millis(NODE_DRAIN_MS));
    stop_groups(&guarded.servers, Duration::from_millis(SERVER_STOP_MS));
    eprintln!("tessel guard: stopped");
    ExitCode::SUCCESS
}

/// The next line of `input` (at most [`MAX_LINE_BYTES`]; a longer one is read to its end and
/// refused), or `None` at the end of the input (or when it cannot be read).
fn read_line(input: &mut impl BufRead) -> Option<Result<String, String>> {
    let mut buf = Vec::new();
    let limit = MAX_LINE_BYTES as u64 + 1;
    let n = input
        .by_ref()
        .take(limit)
        .read_until(b'\n', &mut buf)
        .ok()?;
    if n == 0 {
        return None;
    }
    if buf.len() > MAX_LINE_BYTES && !buf.ends_with(b"\n") {
        // Skip the rest of it.
        loop {
            buf.clear();
            match input.by_ref().take(limit).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(_) if buf.ends_with(b"\n") => break,
                Ok(_) => {}
            }
        }
        return Some(Err(format!("a line longer than {MAX_LINE_BYTES} bytes")));
    }
    Some(String::from_utf8(buf).map_err(|_| "a line that is not UTF-8".to_string()))
}

/// SIGTERM to each group, then SIGKILL to those with a process left after `grace`.
fn stop_groups(groups: &[i32], grace: Duration) {
    let alive = |g: i32| killpg(Pid::from_raw(g), None).is_ok();
    for &g in groups {
        let _ = killpg(Pid::from_raw(g), Signal::SIGTERM);
    }
    let started = Instant::now();
    while groups.iter().any(|&g| alive(g)) && started.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(100));
    }
    for &g in groups.iter().filter(|&&g| alive(g)) {
        eprintln!("tessel guard: process group {g} did not stop in time; killing it");
        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_names_groups_and_bad_lines_are_refused() {
        let mut g = Guarded::default();
        assert_eq!(g.take("node 4242"), Ok(()));
        assert_eq!(g.take("server 4243\n"), Ok(()));
        assert!(g.take("node").is_err());
        assert!(g.take("node -5").is_err());
        assert!(g.take("node 1").is_err(), "init's group");
        assert!(g.take("node 0").is_err(), "the guard's own group");
        assert!(g.take("disk 77").is_err());
        assert!(g.take("node 99999999999").is_err());
        assert_eq!(
            g,
            Guarded {
                nodes: vec![4242],
                servers: vec![4243],
                done: false
            }
        );
        assert_eq!(g.take("done"), Ok(()));
        assert!(g.done);
        let mut full = Guarded::default();
        for i in 0..MAX_GROUPS {
            assert_eq!(full.take(&format!("node {}", i + 2)), Ok(()));
        }
        assert!(full.take("node 5000").is_err());
    }

    #[test]
    fn long_and_binary_lines_are_refused_and_reading_goes_on() {
        let long = "x".repeat(MAX_LINE_BYTES * 3);
        let input = format!("node 42\n{long}\nserver 43\n");
        let mut bytes = input.into_bytes();
        bytes.extend_from_slice(b"\xff\xfe\ndone\n");
        let mut r = std::io::BufReader::new(&bytes[..]);
        let mut lines = Vec::new();
        while let Some(l) = read_line(&mut r) {
            lines.push(l);
        }
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(lines[0].as_deref(), Ok("node 42\n"));
        assert!(lines[1].is_err());
        assert_eq!(lines[2].as_deref(), Ok("server 43\n"));
        assert!(lines[3].is_err());
        assert_eq!(lines[4].as_deref(), Ok("done\n"));
    }
}
