//! `tessel bench`: measured figures with their baselines, as a table and as JSON.
//!
//! Today: the cluster figures — leader failover after SIGKILL, graceful handover, rebalance on a
//! join — on real processes (one nats-server, three nodes, default timings). Each figure is
//! compared with the floor it cannot beat (the lease TTL for a failover).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Serialize;

use crate::config::NodeConfig;
use crate::localcluster::{LocalCluster, leader, moved};

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// What was measured.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// What it is compared with.
    pub baseline: Option<String>,
    /// The baseline's figure, in the same unit.
    pub baseline_value: Option<f64>,
    /// value / baseline_value.
    pub ratio: Option<f64>,
}

impl BenchResult {
    fn new(name: &str, value: f64, unit: &str, baseline: Option<(&str, f64)>) -> Self {
        BenchResult {
            name: name.into(),
            value,
            unit: unit.into(),
            baseline: baseline.map(|(b, _)| b.to_string()),
            baseline_value: baseline.map(|(_, v)| v),
            ratio: baseline.and_then(|(_, v)| (v != 0.0).then(|| value / v)),
        }
    }
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The machine it ran on.
    pub machine: String,
    /// The figures.
    pub results: Vec<BenchResult>,
}

impl BenchReport {
    /// A readable table.
    pub fn table(&self) -> String {
        let mut out = format!("machine: {}\n", self.machine);
        out.push_str(&format!(
            "{:<44} {:>12} {:<6} {:<28} {:>10} {:>7}\n",
            "figure", "value", "unit", "baseline", "value", "ratio"
        ));
        for r in &self.results {
            out.push_str(&format!(
                "{:<44} {:>12.2} {:<6} {:<28} {:>10} {:>7}\n",
                r.name,
                r.value,
                r.unit,
                r.baseline.clone().unwrap_or_default(),
                r.baseline_value
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_default(),
                r.ratio.map(|v| format!("{v:.2}")).unwrap_or_default(),
            ));
        }
        out
    }
}

/// A one-line description of this machine.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = gpu::discover().first().map_or(0, |d| d.memory_total_bytes) >> 30;
    format!("{model}, {cores} cores, {mem} GiB")
}

/// p-th percentile (0..=100) of sorted samples, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

const POLL: Duration = Duration::from_millis(5);
const LIMIT: Duration = Duration::from_secs(30);
const ALL: [&str; 3] = ["n1", "n2", "n3"];

fn others(id: &str) -> Vec<&'static str> {
    ALL.into_iter().filter(|n| *n != id).collect()
}

/// Runs the cluster figures with `trials` trials each, printing progress to stderr.
pub async fn cluster(
    bin: &std::path::Path,
    dir: &std::path::Path,
    trials: usize,
) -> anyhow::Result<Vec<BenchResult>> {
    let env = vec![("RUST_LOG".into(), "warn".into())];
    let mut c = LocalCluster::start(dir, bin, 1, 3, env).await?;
    let result = cluster_trials(&mut c, trials).await;
    c.shutdown().await;
    result
}

async fn cluster_trials(c: &mut LocalCluster, trials: usize) -> anyhow::Result<Vec<BenchResult>> {
    let ttl = NodeConfig::default().lease_ttl_ms as f64;
    c.wait_settled_on(&ALL, LIMIT, POLL).await?;

    // Failover: SIGKILL the leader; until a new leader has written a map with every slot on a
    // live node.
    let mut failover = Vec::new();
    for i in 0..trials {
        let (s, _) = c.wait_settled_on(&ALL, LIMIT, POLL).await?;
        let (old, term) = leader(&s).ok_or_else(|| anyhow::anyhow!("no leader"))?;
        let t0 = Instant::now();
        c.kill9(&old).await;
        c.wait_until("failover", LIMIT, POLL, |s| {
            s.settled()
                && leader(s).is_some_and(|(_, t)| t > term)
                && s.counts().keys().all(|k| *k != old)
        })
        .await?;
        failover.push(ms(t0.elapsed()));
        eprintln!("bench: failover {}/{trials}: {:.0} ms", i + 1, failover[i]);
        c.spawn(&old)?;
    }

    // Graceful handover: SIGTERM the leader; until a new leader has written a map without it.
    let mut handover = Vec::new();
    for i in 0..trials {
        let (s, _) = c.wait_settled_on(&ALL, LIMIT, POLL).await?;
        let (old, term) = leader(&s).ok_or_else(|| anyhow::anyhow!("no leader"))?;
        let rest = others(&old);
        let t0 = Instant::now();
        c.signal(&old, Signal::SIGTERM);
        c.wait_until("handover", LIMIT, POLL, |s| {
            s.settled()
                && leader(s).is_some_and(|(_, t)| t > term)
                && s.counts()
                    .keys()
                    .map(String::as_str)
                    .eq(rest.iter().copied())
        })
        .await?;
        handover.push(ms(t0.elapsed()));
        eprintln!("bench: handover {}/{trials}: {:.0} ms", i + 1, handover[i]);
        if let Some(n) = c.nodes.get_mut(&old) {
            n.wait_for(Duration::from_secs(10)).await;
        }
        c.spawn(&old)?;
    }

    // Rebalance on a join: a fourth node starts; until the map includes it.
    let mut join = Vec::new();
    let mut moved_slots = Vec::new();
    for i in 0..trials {
        let (before, _) = c.wait_settled_on(&ALL, LIMIT, POLL).await?;
        let t0 = Instant::now();
        c.spawn("n4")?;
        let (after, took) = c
            .wait_settled_on(&["n1", "n2", "n3", "n4"], LIMIT, POLL)
            .await?;
        let _ = t0;
        join.push(ms(took));
        moved_slots.push(moved(&before, &after) as f64);
        eprintln!(
            "bench: join {}/{trials}: {:.0} ms, {} slots moved",
            i + 1,
            join[i],
            moved_slots[i]
        );
        c.signal("n4", Signal::SIGTERM);
        if let Some(n) = c.nodes.get_mut("n4") {
            n.wait_for(Duration::from_secs(10)).await;
        }
    }

    for v in [&mut failover, &mut handover, &mut join] {
        v.sort_by(f64::total_cmp);
    }
    let optimal = 256.0; // 342/341/341 → 4 × 256
    let worst_moved = moved_slots.iter().copied().fold(0.0, f64::max);
    Ok(vec![
        BenchResult::new(
            "failover after SIGKILL of the leader, p50",
            percentile(&failover, 50.0),
            "ms",
            Some(("lease TTL", ttl)),
        ),
        BenchResult::new(
            "failover after SIGKILL of the leader, p99",
            percentile(&failover, 99.0),
            "ms",
            Some(("lease TTL", ttl)),
        ),
        BenchResult::new(
            "graceful handover (leader drains), p50",
            percentile(&handover, 50.0),
            "ms",
            Some(("lease TTL", ttl)),
        ),
        BenchResult::new(
            "graceful handover (leader drains), p99",
            percentile(&handover, 99.0),
            "ms",
            Some(("lease TTL", ttl)),
        ),
        BenchResult::new(
            "rebalance on join, map written, p50",
            percentile(&join, 50.0),
            "ms",
            None,
        ),
        BenchResult::new(
            "rebalance on join, map written, p99",
            percentile(&join, 99.0),
            "ms",
            None,
        ),
        BenchResult::new(
            "rebalance on join, slots moved (worst)",
            worst_moved,
            "slots",
            Some(("optimal moves", optimal)),
        ),
    ])
}

/// The event-store and actor figures against raw JetStream and NATS in the same run: append
/// with the version check vs a raw publish with the expected-sequence header, replay vs a raw
/// ordered consumer, a warm `ask` vs a raw request/reply, and cold activations.
pub async fn actors(
    bin: &std::path::Path,
    dir: &std::path::Path,
    quick: bool,
) -> anyhow::Result<Vec<BenchResult>> {
    let env = vec![("RUST_LOG".into(), "warn".into())];
    let mut c = LocalCluster::start(dir, bin, 1, 1, env).await?;
    let result = actor_figures(&c, quick).await;
    c.shutdown().await;
    result
}

fn event(n: u64) -> actors::es::NewEvent {
    actors::es::NewEvent {
        id: crate::vactors::event_id(),
        kind: "Added".into(),
        schema: 1,
        data: serde_json::json!({"type": "Added", "n": n}),
    }
}

async fn actor_figures(c: &LocalCluster, quick: bool) -> anyhow::Result<Vec<BenchResult>> {
    use actors::es::{ActorKey, EventStore, Snapshot};
    use async_nats::jetstream::{self, consumer, stream};
    use futures::StreamExt;
    use std::sync::Arc;

    c.wait_settled_on(&["n1"], LIMIT, POLL).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(c.client.clone());
    let store = Arc::new(
        crate::eventstore::JetStreamEventStore::open(js.clone(), "tessel", 1, 1 << 20).await?,
    );
    let n: u64 = if quick { 2_000 } else { 10_000 };
    let mut out = Vec::new();

    // The raw baseline stream: same settings as the events stream.
    js.create_stream(stream::Config {
        name: "rawbench".into(),
        subjects: vec!["rawbench.>".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    let payload_len = serde_json::to_vec(&actors::es::StoredEvent {
        v: 1,
        id: crate::vactors::event_id(),
        actor: "counter/writer-0".into(),
        version: 1,
        kind: "Added".into(),
        schema: 1,
        timestamp_ms: 0,
        data: serde_json::json!({"type": "Added", "n": 1}),
        sequence: 0,
    })?
    .len();

    for writers in [1u64, 16] {
        // tessel: appends with the version check, `writers` actors in parallel.
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let store = store.clone();
            let key = ActorKey::new("counter", &format!("writer-{writers}-{w}"))?;
            tasks.push(tokio::spawn(async move {
                for v in 0..n / writers {
                    store.append(&key, v, &[event(v)]).await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let tessel = (n / writers * writers) as f64 / t0.elapsed().as_secs_f64();
        // raw: publish with the expected-last-subject-sequence header, same sizes.
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let js = js.clone();
            let payload = bytes::Bytes::from(vec![b'x'; payload_len]);
            tasks.push(tokio::spawn(async move {
                let subject = format!("rawbench.{writers}.{w}");
                let mut last = 0u64;
                for _ in 0..n / writers {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert(
                        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                        async_nats::HeaderValue::from(last),
                    );
                    h.insert(
                        async_nats::header::NATS_MESSAGE_ID,
                        crate::vactors::event_id().as_str(),
                    );
                    last = js
                        .publish_with_headers(subject.clone(), h, payload.clone())
                        .await?
                        .await?
                        .sequence;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let raw = (n / writers * writers) as f64 / t0.elapsed().as_secs_f64();
        eprintln!("bench: append ({writers} writers): tessel {tessel:.0}/s, raw {raw:.0}/s");
        out.push(BenchResult::new(
            &format!("event append with version check, {writers} writer(s)"),
            tessel,
            "ev/s",
            Some(("raw JetStream publish, expected seq", raw)),
        ));
    }

    // Replay: read one actor's whole history, against a raw ordered consumer of the same subject.
    let key = ActorKey::new("counter", "writer-1-0")?;
    let t0 = Instant::now();
    let mut count = 0u64;
    let mut events = store.read(&key, 1, 0).await?;
    while let Some(e) = events.next().await {
        e?;
        count += 1;
    }
    let tessel = count as f64 / t0.elapsed().as_secs_f64();
    let raw_stream = js.get_stream("rawbench").await?;
    let t0 = Instant::now();
    let mut messages = raw_stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "rawbench.1.0".into(),
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let mut raw_count = 0u64;
    while raw_count < count {
        match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(_))) => raw_count += 1,
            _ => break,
        }
    }
    let raw = raw_count as f64 / t0.elapsed().as_secs_f64();
    eprintln!("bench: replay {count} events: tessel {tessel:.0}/s, raw {raw:.0}/s");
    out.push(BenchResult::new(
        "replay (ordered read of one actor)",
        tessel,
        "ev/s",
        Some(("raw ordered consumer", raw)),
    ));

    // Ask a warm remote actor (hosted by the node process) against a raw request/reply.
    let actors = crate::client::ActorClient::new(c.client.clone(), "tessel");
    let warm = ActorKey::new("counter", "warm")?;
    actors
        .ask(
            &warm,
            &serde_json::json!({"cmd": "add", "n": 1}),
            Duration::from_secs(10),
        )
        .await?;
    let m = if quick { 1_000 } else { 5_000 };
    let mut ask = Vec::with_capacity(m);
    for _ in 0..m {
        let t0 = Instant::now();
        actors
            .ask(
                &warm,
                &serde_json::json!({"cmd": "get"}),
                Duration::from_secs(5),
            )
            .await?;
        ask.push(ms(t0.elapsed()) * 1e3);
    }
    // The baseline: a raw request/reply to the same node process (its echo subject).
    let ping = crate::saga::ping_subject("tessel", "n1");
    let mut raw = Vec::with_capacity(m);
    for _ in 0..m {
        let t0 = Instant::now();
        c.client
            .request(ping.clone(), bytes::Bytes::from_static(br#"{"cmd":"get"}"#))
            .await?;
        raw.push(ms(t0.elapsed()) * 1e3);
    }
    ask.sort_by(f64::total_cmp);
    raw.sort_by(f64::total_cmp);
    out.push(BenchResult::new(
        "actor ask, warm remote actor, p50",
        percentile(&ask, 50.0),
        "µs",
        Some(("raw request/reply to the node, p50", percentile(&raw, 50.0))),
    ));
    out.push(BenchResult::new(
        "actor ask, warm remote actor, p99",
        percentile(&ask, 99.0),
        "µs",
        Some(("raw request/reply to the node, p99", percentile(&raw, 99.0))),
    ));

    // Cold activation: a snapshot, then 1,000 events after it; the first ask rebuilds the actor.
    let k = if quick { 5 } else { 20 };
    let mut cold = Vec::new();
    for i in 0..k {
        let key = ActorKey::new("counter", &format!("cold-{i}"))?;
        let batch: Vec<_> = (0..100).map(event).collect();
        store.append(&key, 0, &batch).await?;
        let mut events = store.read(&key, 100, 0).await?;
        let mut seq = 0;
        while let Some(e) = events.next().await {
            seq = e?.sequence;
        }
        let state = serde_json::json!({"total": 4950, "adds": 100});
        store
            .save_snapshot(
                &key,
                &Snapshot {
                    v: 1,
                    version: 100,
                    sequence: seq,
                    state,
                },
            )
            .await?;
        for chunk in 0..10u64 {
            let batch: Vec<_> = (0..100).map(event).collect();
            store.append(&key, 100 + chunk * 100, &batch).await?;
        }
        let t0 = Instant::now();
        let (_, version) = actors
            .ask(
                &key,
                &serde_json::json!({"cmd": "get"}),
                Duration::from_secs(30),
            )
            .await?;
        cold.push(ms(t0.elapsed()));
        anyhow::ensure!(version == 1_100, "cold actor at version {version}");
    }
    cold.sort_by(f64::total_cmp);
    out.push(BenchResult::new(
        "cold activation (snapshot + 1,000 events), p50",
        percentile(&cold, 50.0),
        "ms",
        None,
    ));
    out.push(BenchResult::new(
        "cold activation (snapshot + 1,000 events), p99",
        percentile(&cold, 99.0),
        "ms",
        None,
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 99.0), 20.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
