//! The delta pipeline on real NATS: every acknowledged delta applied exactly once across a node
//! kill, and invalid deltas dead-lettered without touching the table.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actors::delta::{DeltaBatch, Hlc, slot_of_row};
use actors::es::ActorKey;
use common::{SETTLE, TestCluster};
use futures::StreamExt;
use serde_json::json;
use tessel_node::client::ActorClient;
use tessel_node::deltas::{Freshness, Producer, dlq_subject};

const ROWS: u64 = 2_048;
const DIM: u32 = 2;

async fn serving(c: &TestCluster, model: &str) {
    serving_with(c, model, json!({"cmd": "create", "rows": ROWS, "dim": DIM})).await
}

async fn serving_with(c: &TestCluster, model: &str, create: serde_json::Value) {
    let actors = ActorClient::new(c.client.clone(), "tessel");
    let key = ActorKey::new("model", model).unwrap();
    actors
        .ask(&key, &create, Duration::from_secs(10))
        .await
        .unwrap();
    common::wait_serving(c, model, 200).await;
}

/// Publishes random 64-row batches of ones to `model` for `seconds` in a background task and
/// returns how many times each row was acknowledged. Only acknowledged sends count; every send
/// must be acknowledged (a failed send may be partly stored, so the test could not count it).
fn produce_ones(
    c: &TestCluster,
    model: &str,
    seconds: u64,
) -> tokio::task::JoinHandle<HashMap<u32, f32>> {
    let js = async_nats::jetstream::new(c.client.clone());
    let mut producer = Producer::new(js, "tessel", model, ROWS, DIM, 32, 7);
    tokio::spawn(async move {
        let mut counts: HashMap<u32, f32> = HashMap::new();
        let mut x = 0x1234_5678_9abc_def1u64;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(seconds) {
            let rows: Vec<u32> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % ROWS) as u32
                })
                .collect();
            let values = vec![1.0f32; rows.len() * DIM as usize];
            let sent = producer.send(&rows, &values).await.unwrap();
            assert_eq!(sent.rows, 64);
            for r in rows {
                *counts.entry(r).or_insert(0.0) += 1.0;
            }
        }
        counts
    })
}

/// `tessel replay --verify`: checkpoints plus the stream rebuild every slot bit for bit as the
/// live tables are, whether one thread applies or several share the slots.
fn replay_verifies(c: &TestCluster, model: &str) {
    for workers in ["1", "5"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessel"))
            .args([
                "replay",
                "--model",
                model,
                "--verify",
                "--json",
                "--workers",
                workers,
                "--nats",
                &c.nats.url(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{workers} workers: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["differing_slots"], json!([]), "{workers} workers");
        assert_eq!(v["slots"], 1024);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_delta_is_applied_exactly_once_across_a_node_kill() {
    let mut c = TestCluster::start(1, 3).await;
    c.wait_settled_on(&["n1", "n2", "n3"], SETTLE).await;
    serving(&c, "m").await;
    let load = produce_ones(&c, "m", 4);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    c.kill9("n2").await;
    let counts = load.await.unwrap();
    c.wait_settled_on(&["n1", "n3"], SETTLE).await;
    common::wait_equal(&c, "m", ROWS, &counts).await;
    replay_verifies(&c, "m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_under_load_loses_nothing() {
    // Two nodes under load; a third joins (slots move to it), then one leaves gracefully
    // (its slots drain away), all while the producer runs.
    let mut c = TestCluster::start(1, 2).await;
    c.wait_settled_on(&["n1", "n2"], SETTLE).await;
    serving(&c, "r").await;
    let load = produce_ones(&c, "r", 6);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    c.spawn("n3");
    c.wait_settled_on(&["n1", "n2", "n3"], SETTLE).await;
    c.signal("n1", nix::sys::signal::Signal::SIGTERM);
    let counts = load.await.unwrap();
    c.wait_settled_on(&["n2", "n3"], SETTLE).await;
    common::wait_equal(&c, "r", ROWS, &counts).await;
    replay_verifies(&c, "r");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_deltas_go_to_the_dlq_and_leave_the_table_alone() {
    let c = TestCluster::start(1, 3).await;
    c.wait_settled_on(&["n1", "n2", "n3"], SETTLE).await;
    serving(&c, "d").await;
    let js = async_nats::jetstream::new(c.client.clone());
    let mut producer = Producer::new(js.clone(), "tessel", "d", ROWS, DIM, 8, 1);
    producer
        .send(&[10, 11], &[1.0, 1.0, 2.0, 2.0])
        .await
        .unwrap();
    let slot = slot_of_row(ROWS, 10).unwrap();
    let subject = format!("tessel.delta.d.{}", slot.get());
    let frame =
        |b: &DeltaBatch| bytes::Bytes::from(actors::frame::encode("d", slot.get(), b).unwrap());
    let ts = Hlc {
        wall_ms: 1,
        logical: 0,
        node: 99,
    };
    let bad = vec![
        bytes::Bytes::from_static(b"not a frame"),
        frame(&DeltaBatch::new(DIM, vec![10], vec![f32::NAN, 1.0], ts, 0).unwrap()),
        frame(&DeltaBatch::new(3, vec![10], vec![1.0, 1.0, 1.0], ts, 0).unwrap()),
        frame(
            &DeltaBatch::new(DIM, vec![10], vec![1.0, 1.0], Hlc { node: 98, ..ts }, 12345).unwrap(),
        ),
        frame(&DeltaBatch::new(DIM, vec![10], vec![1e30, 1.0], Hlc { node: 97, ..ts }, 0).unwrap()),
    ];
    let n_bad = bad.len();
    for b in bad {
        js.publish(subject.clone(), b).await.unwrap().await.unwrap();
    }
    // A good delta after the bad ones still applies.
    producer.send(&[10], &[5.0, 5.0]).await.unwrap();
    // Two producers whose ids share their low 32 bits (all that frames carried once), taking
    // turns on one slot: each keeps a chain of its own, and none of their frames is refused.
    let mut twins =
        [7, 7 | 1 << 40].map(|id| Producer::new(js.clone(), "tessel", "d", ROWS, DIM, 8, id));
    for _ in 0..2 {
        for p in &mut twins {
            p.send(&[11], &[1.0, 1.0]).await.unwrap();
        }
    }
    let expect: HashMap<u32, f32> = [(10, 6.0), (11, 6.0)].into();
    common::wait_equal(&c, "d", ROWS, &expect).await;
    // The DLQ holds exactly the invalid frames, each with a reason.
    let stream = js.get_stream("tessel-deltas").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: dlq_subject("tessel", "d"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut reasons = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await
    {
        let reason = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Tessel-Dlq-Reason"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        reasons.push(reason);
    }
    assert_eq!(reasons.len(), n_bad, "{reasons:?}");
    assert!(reasons.iter().all(|r| !r.is_empty()), "{reasons:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_models_transform_scales_then_clips() {
    let c = TestCluster::start(1, 3).await;
    c.wait_settled_on(&["n1", "n2", "n3"], SETTLE).await;
    serving_with(
        &c,
        "t",
        json!({"cmd": "create", "rows": ROWS, "dim": DIM, "scale": 2.0, "clip": 3.0}),
    )
    .await;
    let js = async_nats::jetstream::new(c.client.clone());
    let mut producer = Producer::new(js, "tessel", "t", ROWS, DIM, 8, 1);
    // 1 → 2 (scaled); 5 → 10 → 3 (clipped); -5 → -3.
    producer
        .send(&[1, 2, 3], &[1.0, 1.0, 5.0, 5.0, -5.0, -5.0])
        .await
        .unwrap();
    let expect: HashMap<u32, f32> = [(1, 2.0), (2, 3.0), (3, -3.0)].into();
    common::wait_equal(&c, "t", ROWS, &expect).await;
    // A traced frame is announced once applied, with how long its owner held it; a trace id
    // that is not a token is not echoed. Both frames are applied (row 4 ends at 2 + 2).
    let mut notices = c
        .client
        .subscribe(tessel_node::deltas::applied_subject("tessel", "t"))
        .await
        .unwrap();
    c.client.flush().await.unwrap();
    for id in ["not a token", "probe-1"] {
        producer
            .send_traced(&[4], &[1.0, 1.0], Some(id))
            .await
            .unwrap();
    }
    let notice = tokio::time::timeout(SETTLE, notices.next())
        .await
        .expect("no applied notice")
        .unwrap();
    assert_eq!(&notice.payload[..], b"probe-1");
    let held_us: u64 = notice
        .headers
        .as_ref()
        .and_then(|h| h.get(tessel_node::deltas::HELD_US_HEADER))
        .and_then(|v| v.as_str().parse().ok())
        .expect("the notice says how long the owner held the frame");
    assert!(held_us < SETTLE.as_micros() as u64, "{held_us} µs");
    let expect: HashMap<u32, f32> = [(1, 2.0), (2, 3.0), (3, -3.0), (4, 4.0)].into();
    common::wait_equal(&c, "t", ROWS, &expect).await;
    // Replay applies the same transform.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessel"))
        .args(["replay", "--model", "t", "--verify", "--json", "--quiet"])
        .args(["--nats", &c.nats.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["differing_slots"], json!([]));
}

/// Sends a fault request to a node's fault switch and returns the reply.
async fn fault(c: &TestCluster, node: &str, body: serde_json::Value) -> serde_json::Value {
    let m = c
        .client
        .request(
            tessel_node::tables::fault_subject("tessel", node),
            bytes::Bytes::from(body.to_string()),
        )
        .await
        .unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

/// The text of a log without its colour codes (`ESC [ … m`).
/// The device a node serves the model's slots on, from its first "serving the model's slots"
/// line (`device=cpu:0`, or `cuda:0` on a GPU machine).
fn serving_device(c: &TestCluster, node: &str) -> String {
    let log = strip_ansi(&c.log(node));
    log.lines()
        .filter(|l| l.contains("serving the model's slots"))
        .find_map(|l| {
            let i = l.find("device=")?;
            l[i + "device=".len()..]
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("{node} serves no slots yet\n{log}"))
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_lost_mid_run_loses_no_acknowledged_delta() {
    // Frequent checkpoints, so that the lost tables restart from a checkpoint taken under load
    // and replay only the tail. Windows are applied on the device's threads, as a GPU table's
    // are, also on the CPU here: the table goes to those threads and comes back with each
    // window, and a loss meets it there.
    let c = TestCluster::start_with_env(
        1,
        3,
        &[
            ("TESSEL_FAULT_INJECTION", "true"),
            ("TESSEL_CHECKPOINT_INTERVAL_MS", "1000"),
            ("TESSEL_DELTA_CPU_APPLY_ON_THREADS", "true"),
        ],
    )
    .await;
    c.wait_settled_on(&["n1", "n2", "n3"], SETTLE).await;
    serving(&c, "g").await;
    let load = produce_ones(&c, "g", 8);
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    // Malformed or unknown faults are refused with a typed error, and change nothing.
    let v = fault(&c, "n2", json!({"fault": "melt", "device": "cpu:0"})).await;
    assert_eq!(v["error"]["kind"], "unknown_fault", "{v}");
    let v = fault(
        &c,
        "n2",
        json!({"fault": "device-lost", "device": "cuda:9"}),
    )
    .await;
    assert_eq!(v["error"]["kind"], "no_such_device", "{v}");
    // The device holding n2's tables is lost while the producer runs; later, n3's too. That
    // is `cpu:0` here, `cuda:0` on a GPU machine: each node's log names it.
    let d2 = serving_device(&c, "n2");
    let v = fault(&c, "n2", json!({"fault": "device-lost", "device": d2})).await;
    assert_eq!(v["ok"]["device"], d2.as_str(), "{v}");
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let d3 = serving_device(&c, "n3");
    let v = fault(&c, "n3", json!({"fault": "device-lost", "device": d3})).await;
    assert_eq!(v["ok"]["device"], d3.as_str(), "{v}");
    let counts = load.await.unwrap();
    common::wait_equal(&c, "g", ROWS, &counts).await;
    replay_verifies(&c, "g");
    // The lost groups were rebuilt: n2 and n3 each started serving the model again.
    for node in ["n2", "n3"] {
        let log = c.log(node);
        assert!(log.contains("the device's apply threads started"), "{log}");
        let n = log.matches("serving the model's slots").count();
        assert!(n >= 2, "{node} started the model {n} times\n{log}");
        // The rebuild started from checkpoints taken before the loss, not from scratch.
        let after = log
            .split("device lost")
            .nth(1)
            .unwrap_or_else(|| panic!("{log}"));
        let restored = strip_ansi(after)
            .lines()
            .find_map(|l| {
                let i = l.find("from_checkpoints=")?;
                l[i + "from_checkpoints=".len()..]
                    .split(' ')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no restart after the loss\n{log}"));
        assert!(restored > 0, "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fits_nowhere_fails_its_deploy_with_the_reason() {
    let c = TestCluster::start(1, 2).await;
    c.wait_settled_on(&["n1", "n2"], SETTLE).await;
    let run = |sub: &[&str]| common::tessel(&c, &[sub, &["--cluster", "tessel"]].concat());
    // 2^32 rows × 65536 × 4 bytes = 1 PiB: more than any device here.
    let out = run(&[
        "model",
        "create",
        "--name",
        "huge",
        "--rows",
        "4294967296",
        "--dim",
        "65536",
    ]);
    assert!(out.status.success(), "{out:?}");
    let mut v = serde_json::Value::Null;
    for _ in 0..200 {
        let out = run(&["model", "describe", "huge", "--json"]);
        assert!(out.status.success(), "{out:?}");
        v = serde_json::from_slice(&out.stdout).unwrap();
        if v["state"] == "Failed" && v["reserved"].as_object().is_some_and(|m| m.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(v["state"], "Failed", "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("fits no device"), "{reason}");
    assert!(reason.contains("bytes requested"), "{reason}");
    let out = run(&["model", "describe", "huge"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Failed") && text.contains("fits no device"),
        "{text}"
    );
    // No node serves tables for it.
    for node in ["n1", "n2"] {
        assert!(!c.log(node).contains("serving the model's slots"));
    }
    // Without `fault_injection` the fault switch refuses, with a typed error.
    let v = fault(&c, "n1", json!({"fault": "device-lost", "device": "cpu:0"})).await;
    assert_eq!(v["error"]["kind"], "disabled", "{v}");
}

/// Reads `rows` of model `r` and asserts each row's values are all `expect`.
async fn reads_equal(
    c: &TestCluster,
    rows: &[u32],
    expect: &[f32],
    freshness: Freshness,
    when: &str,
) {
    let got = tessel_node::deltas::get_rows(
        &c.client,
        "tessel",
        "r",
        ROWS,
        rows,
        freshness,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    for ((row, want), v) in rows.iter().zip(expect).zip(&got) {
        assert_eq!(v, &vec![*want; DIM as usize], "{when}, row {row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_read_sees_every_acknowledged_write() {
    let mut c = TestCluster::start(1, 2).await;
    c.wait_settled_on(&["n1", "n2"], SETTLE).await;
    serving(&c, "r").await;
    // A read asking for a position the slot has not reached is answered `behind`, with the
    // slot's position.
    let slot0 = cluster::Slot::new(0).unwrap();
    let reply = c
        .client
        .request(
            tessel_node::deltas::read_subject("tessel", "r", slot0),
            json!({"rows": [0], "min_position": 1u64 << 40})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["error"]["kind"], "behind", "{v}");
    assert!(v["error"]["position"].as_u64().is_some(), "{v}");
    // A subject under the owner's wildcard for slot 0's block that names no slot (a token
    // that is not a bit) is refused by its read router, not dropped.
    let reply = c
        .client
        .request(
            "tessel.model.r.get.0.0.x",
            json!({"rows": [0]}).to_string().into(),
        )
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["error"]["kind"], "bad_request", "{v}");
    // Each acknowledged write is seen by the fresh read right after it, on whichever slots
    // and owners it landed (values differ per round, so a stale read cannot pass).
    let js = async_nats::jetstream::new(c.client.clone());
    let mut producer = Producer::new(js, "tessel", "r", ROWS, DIM, 32, 7);
    let rows: Vec<u32> = vec![3, 700, 1_500, 2_047];
    let mut expect = vec![0.0f32; rows.len()];
    for round in 1..=40u32 {
        if round == 21 {
            // Half the slots move: their new owner restores a checkpoint and replays the tail
            // while the reads go on (and wait for it). Even a plain read is not answered from
            // the restored table before the tail is replayed: it sees round 20's state.
            c.kill9("n2").await;
            reads_equal(&c, &rows, &expect, Freshness::Any, "after the kill").await;
        }
        let add = round as f32 * 0.25;
        let values = vec![add; rows.len() * DIM as usize];
        producer.send(&rows, &values).await.unwrap();
        for e in &mut expect {
            *e += add;
        }
        reads_equal(
            &c,
            &rows,
            &expect,
            Freshness::Fresh,
            &format!("round {round}"),
        )
        .await;
    }
    // The CLI's --fresh reads the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessel"))
        .args(["model", "get", "r", "--rows", "3,2047", "--fresh", "--json"])
        .args(["--nats", &c.nats.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rows"][1]["values"], json!([expect[3], expect[3]]), "{v}");
    // A captured change: of rows 699–701 (699 and 701 never written), 700 moves by 1 in its
    // first column and 701 by 0.001, under the threshold of 0.01: only 700 is sent.
    let e = expect[1];
    let old = [0.0, 0.0, e, e, 0.0, 0.0];
    let new = [0.0, 0.0, e + 1.0, e, 0.0, 0.001];
    let (sent, captured) = producer.send_change(699, &old, &new, 0.01).await.unwrap();
    assert_eq!((sent.rows, captured.rows.clone()), (1, vec![700]));
    assert_eq!(captured.below_threshold, 1);
    let got = tessel_node::deltas::get_rows(
        &c.client,
        "tessel",
        "r",
        ROWS,
        &[699, 700, 701],
        Freshness::Fresh,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(got, vec![vec![0.0, 0.0], vec![e + 1.0, e], vec![0.0, 0.0]]);
    // Nothing changed: nothing sent. Sides of different lengths: refused before any send.
    let (sent, _) = producer.send_change(699, &new, &new, 0.0).await.unwrap();
    assert_eq!(sent.rows, 0);
    assert!(
        producer
            .send_change(699, &old, &new[..4], 0.0)
            .await
            .is_err()
    );
}

/// A read's request body is checked whole, an answer too large for one message is split by
/// the reader, a checksum read hashes the owner's table, a batch too large for one message is
/// split by the producer, and `replay --verify` names the one slot whose stream lost a delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_checked_split_and_checksummed_and_verify_names_a_differing_slot() {
    // No checkpoints while the node runs: the replay then rebuilds every slot from the stream.
    let mut c = TestCluster::start_with_env(
        1,
        1,
        &[
            ("TESSEL_CHECKPOINT_INTERVAL_MS", "3600000"),
            ("TESSEL_CHECKPOINT_EVERY_FRAMES", "100000000"),
        ],
    )
    .await;
    c.wait_settled_on(&["n1"], SETTLE).await;
    serving(&c, "v").await;
    let js = async_nats::jetstream::new(c.client.clone());
    let mut producer = Producer::new(js.clone(), "tessel", "v", ROWS, DIM, 32, 7);
    let rows: Vec<u32> = vec![3, 700, 1_500];
    producer
        .send(&rows, &vec![0.5f32; rows.len() * DIM as usize])
        .await
        .unwrap();
    let fresh = |asked: Vec<u32>| {
        let client = c.client.clone();
        async move {
            tessel_node::deltas::get_rows(
                &client,
                "tessel",
                "v",
                ROWS,
                &asked,
                Freshness::Fresh,
                Duration::from_secs(30),
            )
            .await
        }
    };
    assert_eq!(fresh(vec![3]).await.unwrap(), vec![vec![0.5; DIM as usize]]);

    // Bodies that are not a read are refused whole, with the reason.
    let slot3 = slot_of_row(ROWS, 3).unwrap();
    let subject = tessel_node::deltas::read_subject("tessel", "v", slot3);
    for body in [
        json!({"rows": [3, "x"]}),
        json!({"rows": [-1]}),
        json!({"rows": [1u64 << 32]}),
        json!({}),
        json!({"rows": [3], "checksum": true}),
        json!({"checksum": false}),
        json!({"rows": [3], "min_position": "soon"}),
    ] {
        let reply = c
            .client
            .request(subject.clone(), body.to_string().into())
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(v["error"]["kind"], "bad_request", "{body}: {v}");
    }

    // More rows than one answer can carry: refused `too_large` with the most it carries, and
    // `get_rows` asks for them in parts of that size.
    let max_rows =
        tessel_node::deltas::max_answer_rows(c.client.server_info().max_payload, DIM as usize);
    let many = vec![3u32; max_rows + 1_000];
    let reply = c
        .client
        .request(subject.clone(), json!({"rows": many}).to_string().into())
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["error"]["kind"], "too_large", "{}", v["error"]);
    assert_eq!(v["error"]["max_rows"], max_rows as u64);
    let got = fresh(many.clone()).await.unwrap();
    assert_eq!(got.len(), many.len());
    assert!(got.iter().all(|r| r == &vec![0.5; DIM as usize]));

    // A checksum read is the checksum of the slot's rows as a plain read returns them.
    let (checksum, position) =
        tessel_node::deltas::slot_checksum(&c.client, "tessel", "v", slot3, SETTLE)
            .await
            .unwrap();
    assert!(position > 0);
    let slot_rows: Vec<u32> = actors::delta::slot_rows(ROWS, slot3)
        .map(|r| r as u32)
        .collect();
    let values: Vec<f32> = fresh(slot_rows).await.unwrap().concat();
    assert_eq!(checksum, tessel_node::deltas::data_checksum(&values));

    // A batch too large for one message (1.1M updates of row 1,500: 13 MB in one slot, over
    // the server's 8 MB and the frame's 1M rows) goes as several chained frames, all applied
    // (and replayed alike: `--verify` below finds that slot equal).
    let big = vec![1_500u32; 1_100_000];
    let sent = producer
        .send(&big, &vec![1.0f32; big.len() * DIM as usize])
        .await
        .unwrap();
    assert_eq!(sent.rows, big.len() as u64);
    assert!(sent.batches >= 2, "{sent:?}");
    assert_eq!(
        fresh(vec![1_500]).await.unwrap(),
        vec![vec![1_100_000.5f32; DIM as usize]]
    );

    // Delete row 700's delta from the stream: the live table still has it, a replay cannot,
    // and `--verify` names that slot and no other.
    let slot700 = slot_of_row(ROWS, 700).unwrap();
    let stream = js
        .get_stream(tessel_node::deltas::deltas_stream("tessel"))
        .await
        .unwrap();
    let seq = stream
        .direct_get_last_for_subject(tessel_node::deltas::delta_subject("tessel", "v", slot700))
        .await
        .unwrap()
        .sequence;
    assert!(stream.delete_message(seq).await.unwrap());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessel"))
        .args(["replay", "--model", "v", "--verify", "--json", "--quiet"])
        .args(["--nats", &c.nats.url()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["differing_slots"], json!([slot700.get()]), "{v}");
    c.shutdown().await;
}

/// A send that fails or is dropped part-way (here: the server stopped, then killed, so its
/// frame is never stored) leaves no broken chain behind: the producer's next send starts new
/// chains, and its owner applies it instead of dead-lettering it as chained to a frame the
/// stream never got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_or_dropped_send_the_next_acknowledged_send_is_applied() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    /// SIGSTOPs process `pid` and waits until every one of its threads is stopped: the signal
    /// reaches a thread running on another core a moment later, long enough for a request
    /// to be answered.
    fn stopped(pid: u32) {
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
        let all_stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .all(|task| {
                    let stat = std::fs::read_to_string(task.unwrap().path().join("stat"))
                        .unwrap_or_default();
                    // The state follows the command name's closing parenthesis.
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
                })
        };
        for _ in 0..500 {
            if all_stopped() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("nats-server {pid} did not stop");
    }

    /// Kills the (stopped) server, so that what it had not read is gone, starts it again on
    /// its store, and waits until `w` is served again.
    async fn revived(c: &mut TestCluster) {
        c.nats.restart(0).await.unwrap();
        c.wait_settled_on(&["n1"], Duration::from_secs(60)).await;
        common::wait_serving(c, "w", 200).await;
    }

    let mut c = TestCluster::start(1, 1).await;
    c.wait_settled_on(&["n1"], SETTLE).await;
    serving(&c, "w").await;
    let js = async_nats::jetstream::new(c.client.clone());
    let mut producer = Producer::new(js, "tessel", "w", ROWS, DIM, 32, 9);
    let row = |v: f32| vec![v; DIM as usize];
    producer.send(&[5], &row(1.0)).await.unwrap();
    let read = |c: &TestCluster| {
        let client = c.client.clone();
        async move {
            tessel_node::deltas::get_rows(
                &client,
                "tessel",
                "w",
                ROWS,
                &[5],
                Freshness::Fresh,
                Duration::from_secs(60),
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(read(&c).await, vec![row(1.0)]);

    // The server stops reading: the send is not acknowledged; then it dies with the frame
    // unread in its socket, so the frame is never stored.
    stopped(c.nats.pid(0).unwrap());
    assert!(producer.send(&[5], &row(10.0)).await.is_err());
    revived(&mut c).await;

    // Acknowledged, so applied: 1 + 100, without the 10 the stream never got.
    producer.send(&[5], &row(100.0)).await.unwrap();
    assert_eq!(read(&c).await, vec![row(101.0)]);

    // The same for a send dropped part-way (a caller's timeout), as the chaos workload does.
    stopped(c.nats.pid(0).unwrap());
    let dropped =
        tokio::time::timeout(Duration::from_millis(300), producer.send(&[5], &row(10.0))).await;
    assert!(dropped.is_err(), "the send finished: {dropped:?}");
    revived(&mut c).await;
    producer.send(&[5], &row(1_000.0)).await.unwrap();
    assert_eq!(read(&c).await, vec![row(1_101.0)]);
}
