//! Branches, merges and time travel on real NATS: a branch starts from its parent's state at
//! the fork sequence and its deltas never touch the parent; a merge follows its policy; a
//! replay stops at a point in time.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use actors::es::ActorKey;
use common::{SETTLE, TestCluster, tessel};
use serde_json::{Value, json};
use tessel_node::client::ActorClient;
use tessel_node::deltas::Producer;

const ROWS: u64 = 2_048;
const DIM: u32 = 2;

fn stdout_json(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// Waits until `model` serves, asking it at most 400 times.
async fn wait_serving(c: &TestCluster, model: &str) {
    common::wait_serving(c, model, 400).await;
}

async fn serving(c: &TestCluster, model: &str) {
    let actors = ActorClient::new(c.client.clone(), "tessel");
    let key = ActorKey::new("model", model).unwrap();
    actors
        .ask(
            &key,
            &json!({"cmd": "create", "rows": ROWS, "dim": DIM}),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    wait_serving(c, model).await;
}

/// Waits until every row of `model` has both columns equal to its value in `expect` (rows not
/// named: 0); panics with the differences otherwise.
async fn wait_rows(c: &TestCluster, model: &str, expect: &[(u32, f32)]) {
    common::wait_equal(c, model, ROWS, &expect.iter().copied().collect()).await;
}

/// Starts one server and three nodes, waits until they settle, creates `model` and waits
/// until it serves; returns the cluster and a producer of deltas to the model from node 1.
async fn started(model: &str) -> (TestCluster, Producer) {
    let c = TestCluster::start(1, 3).await;
    c.wait_settled_on(&["n1", "n2", "n3"], SETTLE).await;
    serving(&c, model).await;
    let p = producer(&c, model, 1);
    (c, p)
}

/// Runs `tessel model branch` of `parent` as `name`, forking where `at` says (`--at-seq` or
/// `--at-time` and its value), and returns its output.
fn branch(c: &TestCluster, parent: &str, at: [&str; 2], name: &str) -> std::process::Output {
    tessel(
        c,
        &["model", "branch", parent, at[0], at[1], "--name", name],
    )
}

/// Branches `parent` at sequence `seq` as `name`, asserts that the command succeeded and
/// waits until the branch serves.
async fn branch_serving(c: &TestCluster, parent: &str, seq: u64, name: &str) {
    let out = branch(c, parent, ["--at-seq", &seq.to_string()], name);
    assert!(out.status.success(), "{out:?}");
    wait_serving(c, name).await;
}

/// Asserts that `tessel replay --verify` rebuilds every slot of `model` as its live tables are.
fn assert_replay_verifies(c: &TestCluster, model: &str) {
    let v = stdout_json(&tessel(
        c,
        &["replay", "--model", model, "--verify", "--json", "--quiet"],
    ));
    assert_eq!(v["differing_slots"], json!([]));
}

/// The stderr of a `--quiet` replay.
fn out_quiet_stderr(c: &TestCluster, t_ms: i128) -> Vec<u8> {
    let out = tessel(
        c,
        &[
            "replay",
            "--model",
            "r",
            "--to-time",
            &t_ms.to_string(),
            "--quiet",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    out.stderr
}

async fn last_seq(c: &TestCluster) -> u64 {
    let js = async_nats::jetstream::new(c.client.clone());
    let mut s = js.get_stream("tessel-deltas").await.unwrap();
    s.info().await.unwrap().state.last_sequence
}

fn producer(c: &TestCluster, model: &str, node: u64) -> Producer {
    let js = async_nats::jetstream::new(c.client.clone());
    Producer::new(js, "tessel", model, ROWS, DIM, 8, node)
}

/// `(row, value)` pairs, both columns equal.
async fn send(p: &mut Producer, updates: &[(u32, f32)]) {
    let rows: Vec<u32> = updates.iter().map(|u| u.0).collect();
    let values: Vec<f32> = updates.iter().flat_map(|u| [u.1, u.1]).collect();
    let sent = p.send(&rows, &values).await.unwrap();
    assert_eq!(sent.rows, rows.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_starts_at_its_fork_point_and_a_sum_merge_adds_its_change() {
    let (c, mut main) = started("m").await;
    send(&mut main, &[(1, 1.0), (2, 1.0), (3, 1.0)]).await;
    let fork = last_seq(&c).await;
    // After the fork point: not in the branch.
    send(&mut main, &[(1, 10.0), (4, 10.0)]).await;
    branch_serving(&c, "m", fork, "b").await;
    wait_rows(&c, "b", &[(1, 1.0), (2, 1.0), (3, 1.0)]).await;

    // Deltas to the branch leave main alone; main goes on (row 2 changes on both sides).
    let mut side = producer(&c, "b", 2);
    send(&mut side, &[(2, 100.0), (5, 100.0)]).await;
    send(&mut main, &[(2, 10.0)]).await;
    wait_rows(&c, "b", &[(1, 1.0), (2, 101.0), (3, 1.0), (5, 100.0)]).await;
    wait_rows(&c, "m", &[(1, 11.0), (2, 11.0), (3, 1.0), (4, 10.0)]).await;
    // Replay rebuilds the branch from the fork state plus its own stream, bit for bit.
    assert_replay_verifies(&c, "b");
    // Without the branch's own checkpoints (written at the fork point when its owners
    // started), replay rebuilds the fork state from the parent's stream.
    let js = async_nats::jetstream::new(c.client.clone());
    let bucket = js.get_object_store("tessel-checkpoints").await.unwrap();
    // Each object read or listing is a consumer of the bucket's stream, and the reads above
    // may have used up the server's consumer limit for a while (they expire after 30 s).
    let started = Instant::now();
    let mut list = loop {
        match bucket.list().await {
            Ok(l) => break l,
            Err(e) if started.elapsed() < Duration::from_secs(90) => {
                eprintln!("listing the checkpoints: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("listing the checkpoints: {e}"),
        }
    };
    let mut names = Vec::new();
    while let Some(Ok(info)) = futures::StreamExt::next(&mut list).await {
        if info.name.starts_with("b.") && !info.deleted {
            names.push(info.name);
        }
    }
    assert!(
        !names.is_empty(),
        "the branch's owners checkpoint the fork state"
    );
    for n in &names {
        bucket.delete(n).await.unwrap();
    }
    assert_replay_verifies(&c, "b");

    // A branch of the branch starts from the branch's state (two generations up to m).
    let fork2 = last_seq(&c).await;
    branch_serving(&c, "b", fork2, "b2").await;
    send(&mut producer(&c, "b2", 3), &[(7, 1.0)]).await;
    wait_rows(
        &c,
        "b2",
        &[(1, 1.0), (2, 101.0), (3, 1.0), (5, 100.0), (7, 1.0)],
    )
    .await;
    assert_replay_verifies(&c, "b2");

    // Merge (sum): main = main + the branch's change; row 2 is the one conflict.
    let v = stdout_json(&tessel(
        &c,
        &["model", "merge", "b", "--into", "m", "--json", "--quiet"],
    ));
    assert_eq!(v["policy"], "sum");
    assert_eq!(v["rows_merged"], 2);
    assert_eq!(v["rows_published"], 2);
    let conflicts = v["conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{v}");
    assert_eq!(conflicts[0]["row"], 2);
    assert_eq!(conflicts[0]["resolution"], "summed");
    wait_rows(
        &c,
        "m",
        &[(1, 11.0), (2, 111.0), (3, 1.0), (4, 10.0), (5, 100.0)],
    )
    .await;
    // The branch itself is unchanged.
    wait_rows(&c, "b", &[(1, 1.0), (2, 101.0), (3, 1.0), (5, 100.0)]).await;
    // Main's replay still matches its live tables after the merge.
    assert_replay_verifies(&c, "m");

    // Refusals: a second merge, a model that is not a branch of the target, an unknown model.
    let again = tessel(&c, &["model", "merge", "b", "--into", "m", "--quiet"]);
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already merged"));
    let wrong = tessel(&c, &["model", "merge", "m", "--into", "b", "--quiet"]);
    assert_eq!(wrong.status.code(), Some(2), "{wrong:?}");
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not a branch"));
    let unknown = tessel(&c, &["model", "merge", "nope", "--into", "m", "--quiet"]);
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no model"));
    // A fork point past the stream's end is refused.
    let past_end = (last_seq(&c).await + 100).to_string();
    let past = branch(&c, "m", ["--at-seq", &past_end], "late");
    assert_eq!(past.status.code(), Some(2), "{past:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_merge_keeps_the_newer_side_of_each_conflict() {
    let (c, mut main) = started("n").await;
    send(&mut main, &[(1, 1.0), (2, 1.0)]).await;
    let fork = last_seq(&c).await;
    branch_serving(&c, "n", fork, "nb").await;
    let mut side = producer(&c, "nb", 2);
    // Row 2: main first, then the branch (the branch is newer).
    // Row 1: the branch first, then main (main is newer).
    // Row 9: only the branch.
    let gap = Duration::from_millis(50);
    send(&mut main, &[(2, 5.0)]).await;
    tokio::time::sleep(gap).await;
    send(&mut side, &[(1, 3.0), (2, 7.0)]).await;
    tokio::time::sleep(gap).await;
    send(&mut main, &[(1, 4.0)]).await;
    send(&mut side, &[(9, 2.0)]).await;
    let v = stdout_json(&tessel(
        &c,
        &[
            "model", "merge", "nb", "--into", "n", "--policy", "newer", "--json", "--quiet",
        ],
    ));
    let got: Vec<(u64, String)> = v["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["row"].as_u64().unwrap(),
                c["resolution"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // Ordered by the later of the two timestamps: row 2's arose before row 1's.
    assert_eq!(
        got,
        vec![(2, "branch".to_string()), (1, "main".to_string())],
        "{v}"
    );
    assert_eq!(v["rows_merged"], 2, "{v}");
    // Row 2 becomes the branch's row (1 + 7), row 1 keeps main's (1 + 4), row 9 takes the
    // branch's change.
    wait_rows(&c, "n", &[(1, 5.0), (2, 8.0), (9, 2.0)]).await;
    wait_rows(&c, "nb", &[(1, 4.0), (2, 8.0), (9, 2.0)]).await;
    // The owner of row 2's slot dies: the branch's slot moves and its new owner rebuilds it
    // from the branch's checkpoint and stream, not from the parent's later state.
    let mut c = c;
    let status = c.status().await.unwrap();
    let slot = actors::delta::slot_of_row(ROWS, 2).unwrap().get() as usize;
    let owner = status.owners[slot].clone().unwrap();
    c.kill9(&owner).await;
    let rest: Vec<&str> = ["n1", "n2", "n3"]
        .into_iter()
        .filter(|n| *n != owner)
        .collect();
    c.wait_settled_on(&rest, SETTLE).await;
    wait_rows(&c, "nb", &[(1, 4.0), (2, 8.0), (9, 2.0)]).await;
    wait_rows(&c, "n", &[(1, 5.0), (2, 8.0), (9, 2.0)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_a_time_stops_before_the_first_later_delta() {
    let (c, mut p) = started("r").await;
    send(&mut p, &[(1, 1.0)]).await;
    let first = last_seq(&c).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    send(&mut p, &[(1, 10.0)]).await;
    wait_rows(&c, "r", &[(1, 11.0)]).await;
    // The server's timestamp of the first delta, in unix ms, plus one: at or after the first
    // delta, 50 ms before the second.
    let js = async_nats::jetstream::new(c.client.clone());
    let stream = js.get_stream("tessel-deltas").await.unwrap();
    let stored = stream.get_raw_message(first).await.unwrap();
    let t_ms = stored.time.unix_timestamp_nanos() / 1_000_000 + 1;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.bin");
    let v = stdout_json(&tessel(
        &c,
        &[
            "replay",
            "--model",
            "r",
            "--to-time",
            &t_ms.to_string(),
            "--out",
            file.to_str().unwrap(),
            "--json",
            "--quiet",
        ],
    ));
    assert_eq!(v["to_seq"], first, "{v}");
    assert!(!String::from_utf8_lossy(&out_quiet_stderr(&c, t_ms)).contains("rows/s"));
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len(), ROWS as usize * DIM as usize * 4);
    let row1: Vec<f32> = bytes[8..16]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(row1, vec![1.0, 1.0]);
    // Without a limit both deltas are in; without --quiet a progress line goes to stderr
    // (not a terminal here: plain lines).
    let out = tessel(
        &c,
        &[
            "replay",
            "--model",
            "r",
            "--out",
            file.to_str().unwrap(),
            "--json",
        ],
    );
    let v = stdout_json(&out);
    assert_eq!(v["to_seq"], Value::Null);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress
            .lines()
            .any(|l| l.starts_with("r [") && l.contains("rows/s")),
        "{progress}"
    );
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(
        f32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        11.0
    );
    // A file that cannot take the table (a full disk) fails the command, with the reason.
    let out = tessel(
        &c,
        &["replay", "--model", "r", "--out", "/dev/full", "--quiet"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/dev/full"),
        "{out:?}"
    );
    // A branch can fork at a time too: the same sequence.
    let out = branch(&c, "r", ["--at-time", &t_ms.to_string()], "rb");
    assert!(out.status.success(), "{out:?}");
    let actors = ActorClient::new(c.client.clone(), "tessel");
    let (d, _) = actors
        .ask(
            &ActorKey::new("model", "rb").unwrap(),
            &json!({"cmd": "describe"}),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(
        (d["parent"].clone(), d["fork_seq"].clone()),
        (json!("r"), json!(first))
    );
    // --to-seq and --to-time together are refused as a usage error.
    let both = tessel(
        &c,
        &["replay", "--model", "r", "--to-seq", "1", "--to-time", "1"],
    );
    assert_eq!(both.status.code(), Some(2), "{both:?}");
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
}
