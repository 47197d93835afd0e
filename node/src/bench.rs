//! `tessel bench`: measured figures with their baselines, as a table and as JSON.
//!
//! Today: the cluster figures — leader failover after SIGKILL, graceful handover, rebalance on a
//! join — on real processes (one nats-server, three nodes, default timings). Each figure is
//! compared with the floor it cannot beat (the lease TTL for a failover).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Serialize;

use crate::config::NodeConfig;
use crate::localcluster::{LocalCluster, leader, moved};

/// One measured figure: the `gpu` crate's, so that its kernel figures join these as they are.
pub use gpu::bench::BenchRow as BenchResult;

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

/// p-th percentile (0..=100) of samples (any order), from an HDR histogram of the samples in
/// thousandths of their unit with 3 significant digits (so within 0.1%).
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    const MAX: u64 = 1 << 50;
    let Ok(mut h) = hdrhistogram::Histogram::<u64>::new_with_bounds(1, MAX, 3) else {
        return f64::NAN;
    };
    for s in samples {
        h.saturating_record(((s * 1e3).round().max(1.0) as u64).min(MAX));
    }
    h.value_at_quantile((p / 100.0).clamp(0.0, 1.0)) as f64 / 1e3
}

/// The benchmark nodes' log filter: `TESSEL_BENCH_NODE_LOG`, or warnings only (with
/// `TESSEL_BENCH_KEEP=1` the logs stay in the run directory).
fn node_log() -> String {
    std::env::var("TESSEL_BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into())
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
    let env = vec![("RUST_LOG".into(), node_log())];
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
        c.spawn("n4")?;
        // Timed until the map with n4 is written (the buckets), as labelled; then, untimed,
        // until every node has adopted it.
        let want = ["n1", "n2", "n3", "n4"];
        let (after, took) = c
            .wait_until("the map with n4", LIMIT, POLL, |s| s.settled_on(&want))
            .await?;
        c.wait_settled_on(&want, LIMIT, POLL).await?;
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
    let env = vec![("RUST_LOG".into(), node_log())];
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
    use async_nats::jetstream::{self, stream};
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
    let mut messages = ordered_reader(&raw_stream, "rawbench.1.0").await?;
    let raw_count = count_messages(&mut messages, count, Duration::from_secs(10)).await;
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

/// The raw NATS limits on this machine, measured on one nats-server with this process as the
/// only client: core publish → subscribe throughput, JetStream publish with acks in flight,
/// ordered-consumer replay, and request/reply round trips. They are the baselines the other
/// groups compare with (each group also measures its own baseline in the same run).
pub async fn raw(
    bin: &std::path::Path,
    dir: &std::path::Path,
    quick: bool,
) -> anyhow::Result<Vec<BenchResult>> {
    let env = vec![("RUST_LOG".into(), node_log())];
    let mut c = LocalCluster::start(dir, bin, 1, 0, env).await?;
    let result = raw_figures(&c, quick).await;
    c.shutdown().await;
    result
}

async fn raw_figures(c: &LocalCluster, quick: bool) -> anyhow::Result<Vec<BenchResult>> {
    use async_nats::jetstream::{self, stream};
    use futures::StreamExt;
    use futures::stream::FuturesUnordered;

    const PAYLOAD: usize = 256;
    let n: u64 = if quick { 100_000 } else { 400_000 };
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let mut out = Vec::new();

    // Core NATS: publish n messages; the subscriber (same process) counts them.
    let mut sub = c.client.subscribe("rawbench.core").await?;
    c.client.flush().await?;
    let counter = tokio::spawn(async move {
        let mut got = 0u64;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
                Ok(Some(_)) => got += 1,
                _ => break,
            }
        }
        (got, Instant::now())
    });
    let t0 = Instant::now();
    for _ in 0..n {
        c.client.publish("rawbench.core", payload.clone()).await?;
    }
    c.client.flush().await?;
    let (got, done) = counter.await?;
    let rate = got as f64 / (done - t0).as_secs_f64();
    eprintln!("bench: raw core pub/sub: {got} of {n} messages, {rate:.0} msg/s");
    out.push(BenchResult::new(
        "raw core NATS publish → subscribe, 256 B",
        rate,
        "msg/s",
        None,
    ));

    // JetStream: publish with 256 acknowledgements in flight, then replay with an ordered
    // consumer.
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(c.client.clone());
    js.create_stream(stream::Config {
        name: "rawjs".into(),
        subjects: vec!["rawjs.>".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    let m = n / 4;
    let t0 = Instant::now();
    let mut acks = FuturesUnordered::new();
    for _ in 0..m {
        acks.push(std::future::IntoFuture::into_future(
            js.publish("rawjs.a", payload.clone()).await?,
        ));
        while acks.len() >= 256 {
            if let Some(r) = acks.next().await {
                r?;
            }
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    let rate = m as f64 / t0.elapsed().as_secs_f64();
    eprintln!("bench: raw JetStream publish: {rate:.0} msg/s");
    out.push(BenchResult::new(
        "raw JetStream publish, 256 acks in flight, 256 B",
        rate,
        "msg/s",
        None,
    ));
    let t0 = Instant::now();
    let mut messages = ordered_reader(&js.get_stream("rawjs").await?, "rawjs.a").await?;
    let read = count_messages(&mut messages, m, Duration::from_secs(5)).await;
    let rate = read as f64 / t0.elapsed().as_secs_f64();
    eprintln!("bench: raw ordered consumer: {read} of {m} messages, {rate:.0} msg/s");
    out.push(BenchResult::new(
        "raw ordered-consumer replay, 256 B",
        rate,
        "msg/s",
        None,
    ));

    // Request/reply to a responder in this process.
    let mut echo = c.client.subscribe("rawbench.echo").await?;
    let responder = {
        let client = c.client.clone();
        tokio::spawn(async move {
            while let Some(msg) = echo.next().await {
                if let Some(reply) = msg.reply {
                    let _ = client.publish(reply, msg.payload).await;
                }
            }
        })
    };
    c.client.flush().await?;
    let k = if quick { 1_000 } else { 5_000 };
    let mut rtt = Vec::with_capacity(k);
    for _ in 0..k {
        let t0 = Instant::now();
        c.client.request("rawbench.echo", payload.clone()).await?;
        rtt.push(ms(t0.elapsed()) * 1e3);
    }
    responder.abort();
    for p in [50.0, 99.0] {
        out.push(BenchResult::new(
            &format!("raw request/reply round trip, p{p}"),
            percentile(&rtt, p),
            "µs",
            None,
        ));
    }
    Ok(out)
}

/// Creates `model` (`rows × dim`) through its registry actor and waits until it serves.
pub async fn serve_model(
    client: &async_nats::Client,
    cluster: &str,
    model: &str,
    rows: u64,
    dim: u32,
) -> anyhow::Result<()> {
    let actors = crate::client::ActorClient::new(client.clone(), cluster);
    let key = actors::es::ActorKey::new("model", model)?;
    let create = serde_json::json!({"cmd": "create", "rows": rows, "dim": dim});
    actors.ask(&key, &create, Duration::from_secs(10)).await?;
    let started = Instant::now();
    while started.elapsed() < LIMIT {
        let (v, _) = actors
            .ask(
                &key,
                &serde_json::json!({"cmd": "describe"}),
                Duration::from_secs(10),
            )
            .await?;
        if v["state"] == "Serving" {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("model {model} did not reach Serving within {LIMIT:?}")
}

/// CPU time so far of this process, the NATS server and a node, and the wall clock: what a
/// phase cost beside how long it took (on a machine with few cores, they compete).
#[derive(Clone, Copy, Debug, Default)]
struct CpuSeconds {
    wall: f64,
    bench: f64,
    /// This process's minor page faults (`getrusage`): fresh memory a phase touched.
    faults: std::ffi::c_long,
    server: f64,
    node: Option<f64>,
}

impl CpuSeconds {
    /// This process's user + system time (`getrusage`), and the server's and the node's (when
    /// given) from `/proc/<pid>/stat` (clock ticks of 10 ms); 0 where unreadable.
    fn now(server: Option<u32>, node: Option<u32>) -> Self {
        use nix::sys::resource::{UsageWho, getrusage};
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        let usage = getrusage(UsageWho::RUSAGE_SELF).ok();
        let bench = usage.map_or(0.0, |u| secs(u.user_time()) + secs(u.system_time()));
        let faults = usage.map_or(0, |u| u.minor_page_faults());
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self {
            wall,
            bench,
            faults,
            server: server.and_then(proc_cpu_seconds).unwrap_or(0.0),
            node: node.map(|pid| proc_cpu_seconds(pid).unwrap_or(0.0)),
        }
    }
}

impl std::ops::Sub for CpuSeconds {
    type Output = Self;
    fn sub(self, rhs: Self) -> Self {
        Self {
            wall: self.wall - rhs.wall,
            bench: self.bench - rhs.bench,
            faults: self.faults - rhs.faults,
            server: self.server - rhs.server,
            node: self.node.zip(rhs.node).map(|(a, b)| a - b),
        }
    }
}

impl std::fmt::Display for CpuSeconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3} s: cpu {:.3} s here ({} page faults), {:.2} s server",
            self.wall, self.bench, self.faults, self.server
        )?;
        if let Some(node) = self.node {
            write!(f, ", {node:.2} s node")?;
        }
        Ok(())
    }
}

/// A process's user + system CPU seconds from `/proc/<pid>/stat` (100 ticks a second, the
/// value Linux reports to user space on every architecture it runs on).
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at the state, field 3.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Resident memory of a process in bytes, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A xorshift generator for workload rows (deterministic, no dependency).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The delta pipeline's figures against raw JetStream in the same run, on one nats-server and
/// one node (dim 64, f32): end-to-end applied rows/s against a raw publish plus ordered consume
/// of the same frames; publish → applied latency at half that rate; replay against a raw
/// ordered consumer of the same stream; the node's resident memory per table byte. The replay
/// runs on `replay_workers` threads (by default [`crate::deltas::replay_workers`]).
pub async fn deltas(
    bin: &std::path::Path,
    dir: &std::path::Path,
    quick: bool,
    replay_workers: Option<usize>,
) -> anyhow::Result<Vec<BenchResult>> {
    // No checkpoints during the run, so that the replay figure replays the whole stream.
    let env = vec![
        ("RUST_LOG".into(), node_log()),
        ("TESSEL_CHECKPOINT_INTERVAL_MS".into(), "3600000".into()),
        ("TESSEL_CHECKPOINT_EVERY_FRAMES".into(), "100000000".into()),
    ];
    let mut c = LocalCluster::start(dir, bin, 1, 1, env).await?;
    let workers = replay_workers.unwrap_or_else(crate::deltas::replay_workers);
    let result = delta_figures(&c, quick, workers).await;
    c.shutdown().await;
    result
}

async fn delta_figures(
    c: &LocalCluster,
    quick: bool,
    workers: usize,
) -> anyhow::Result<Vec<BenchResult>> {
    use crate::deltas::{Producer, applied_subject};
    use async_nats::jetstream;
    use futures::StreamExt;

    const DIM: u32 = DELTA_DIM;
    const BATCH: usize = 65_536;
    const IN_FLIGHT: usize = DELTA_IN_FLIGHT;
    const MODEL: &str = DELTA_MODEL;
    // Full: a 1 GiB table (4M rows × 64), the regime the memory figure is about; quick: 64 MiB.
    let rows: u64 = if quick { 1 << 18 } else { 1 << 22 };
    let batches: usize = if quick { 16 } else { 48 };
    let probes: usize = if quick { 200 } else { 1_000 };
    c.wait_settled_on(&["n1"], LIMIT, POLL).await?;
    let pid = c
        .nodes
        .get("n1")
        .and_then(|n| n.pid())
        .ok_or_else(|| anyhow::anyhow!("node n1 has no pid"))?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(c.client.clone());
    let mut out = Vec::new();

    // The workload: `batches` batches of BATCH uniform rows (about 64 rows per slot frame),
    // then a fence of one row in every slot.
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut workload: Vec<Vec<u32>> = (0..batches)
        .map(|_| (0..BATCH).map(|_| (rng.next() % rows) as u32).collect())
        .collect();
    let fence: Vec<u32> = cluster::Slot::all()
        .map(|s| actors::delta::slot_rows(rows, s).start as u32)
        .collect();
    let fence_frames = fence.len();
    workload.push(fence);
    let frames_of = |batch: &[u32]| -> u64 {
        let slots: std::collections::BTreeSet<u16> = batch
            .iter()
            .filter_map(|r| actors::delta::slot_of_row(rows, u64::from(*r)).map(|s| s.get()))
            .collect();
        slots.len() as u64
    };
    let total_frames: u64 = workload.iter().map(|b| frames_of(b)).sum();
    let total_rows: usize = workload.iter().map(Vec::len).sum();
    let values = vec![0.5f32; BATCH * DIM as usize];
    eprintln!(
        "bench: deltas: {total_rows} rows of dim {DIM} in {total_frames} frames, table {} MiB",
        (rows * u64::from(DIM) * 4) >> 20
    );

    // The raw baselines, measured before tessel's phase and again after it; the faster of
    // each pair is the baseline (see `raw_delta_baselines`).
    let shape = Workload {
        batches: &workload,
        values: &values,
        rows,
        total_frames,
    };
    let before = raw_delta_baselines(&js, &shape, "before").await?;

    // tessel: the same batches through a Producer to the model's owner, timed until the
    // owner has applied the fence (one traced frame per slot; slots apply in stream order).
    let rss_before = rss_bytes(pid).unwrap_or(0);
    serve_model(&c.client, "tessel", MODEL, rows, DIM).await?;
    let mut notices = c.client.subscribe(applied_subject("tessel", MODEL)).await?;
    // Each notice: its trace id, when it came, and how long the owner held the frame.
    let (tx, mut applied) =
        tokio::sync::mpsc::unbounded_channel::<(String, (Instant, Option<f64>))>();
    let listener = tokio::spawn(async move {
        while let Some(m) = notices.next().await {
            let at = Instant::now();
            let id = String::from_utf8_lossy(&m.payload).into_owned();
            let held_ms = m
                .headers
                .as_ref()
                .and_then(|h| h.get(crate::deltas::HELD_US_HEADER))
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .map(|us| us as f64 / 1e3);
            if tx.send((id, (at, held_ms))).is_err() {
                break;
            }
        }
    });
    // Wait until the owner serves (a traced probe comes back) before timing.
    let mut producer = Producer::new(js.clone(), "tessel", MODEL, rows, DIM, IN_FLIGHT, 2);
    let mut ready = false;
    for i in 0..200 {
        let id = format!("ready-{i}");
        producer
            .send_traced(&[0], &values[..DIM as usize], Some(&id))
            .await?;
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), applied.recv()).await
        {
            ready = true;
            break;
        }
    }
    anyhow::ensure!(ready, "the model's owner never applied a probe");
    while applied.try_recv().is_ok() {}
    // The model's cost before any load: its zero tables, slot tasks, queues, subscriptions.
    let rss_serving = rss_bytes(pid).unwrap_or(0);
    let server = c.nats.server(0).and_then(crate::natsd::NatsServer::pid);
    let cpu = CpuSeconds::now(server, Some(pid));
    let t0 = Instant::now();
    let last = workload.len() - 1;
    for (i, batch) in workload.iter().enumerate() {
        let trace = (i == last).then_some("fence");
        producer
            .send_traced(batch, &values[..batch.len() * DIM as usize], trace)
            .await?;
    }
    let published = t0.elapsed();
    let mut fenced = 0usize;
    let mut done = t0;
    while fenced < fence_frames {
        match tokio::time::timeout(Duration::from_secs(30), applied.recv()).await {
            Ok(Some((id, (at, _)))) if id == "fence" => {
                fenced += 1;
                done = at;
            }
            Ok(Some(_)) => {}
            _ => anyhow::bail!("the fence was applied on {fenced} of {fence_frames} slots"),
        }
    }
    let tessel_rate = total_rows as f64 / (done - t0).as_secs_f64();
    let cpu = CpuSeconds::now(server, Some(pid)) - cpu;
    // The node's resident size right after the run, and its idle trims so far (see below).
    let rss_run = rss_bytes(pid).unwrap_or(0);
    let addr = c.http.get("n1").map(String::as_str);
    let trims_at_run = node_trims(addr).await;
    let after = raw_delta_baselines(&js, &shape, "after").await?;
    let raw_rate = before.0.max(after.0);
    let overlapped_rate = before.1.max(after.1);
    // Which side bounds it: the publishes (all acknowledged at `published`) or the applies.
    eprintln!(
        "bench: deltas end to end: tessel {tessel_rate:.0} rows/s, raw {raw_rate:.0} rows/s, the faster of before and after (published in {:.2} s, applied in {:.2} s; {cpu})",
        published.as_secs_f64(),
        (done - t0).as_secs_f64()
    );
    out.push(BenchResult::new(
        "delta end to end, dim 64 (rows applied/s)",
        tessel_rate,
        "rows/s",
        Some(("raw publish + consume", raw_rate)),
    ));
    out.push(BenchResult::new(
        "delta end to end, overlapped baseline",
        tessel_rate,
        "rows/s",
        Some(("raw publish while consuming", overlapped_rate)),
    ));
    // The resident cost at rest: once the node, quiet after the run, has given the allocator's
    // free memory back (`memory_trim_idle_ms`, 2 s by default; see `idle_trim`). The raw
    // baselines above may have taken long enough for it to come already.
    let mut trimmed = None;
    while done.elapsed() < Duration::from_secs(30) {
        if node_trims(addr).await > trims_at_run {
            trimmed = Some(done.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_after = rss_bytes(pid).unwrap_or(0);
    let table_bytes = rows * u64::from(DIM) * 4;
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    eprintln!(
        "bench: deltas node memory: table {:.1} MiB; resident +{:.1} MiB once serving, +{:.1} MiB after the run, +{:.1} MiB at rest ({})",
        mib(table_bytes),
        mib(rss_serving.saturating_sub(rss_before)),
        mib(rss_run.saturating_sub(rss_before)),
        mib(rss_after.saturating_sub(rss_before)),
        match trimmed {
            Some(t) => format!(
                "the node's idle trim seen {:.1} s after the run",
                t.as_secs_f64()
            ),
            None => "no idle trim within 30 s of the run".into(),
        },
    );
    out.push(BenchResult::new(
        "node memory growth per table byte",
        rss_after.saturating_sub(rss_before) as f64 / table_bytes as f64,
        "x",
        None,
    ));

    // Latency at half the measured rate: a paced background load of 4,096-row batches (64
    // slots each), and a traced one-row probe every 10 ms, timed from before its publish until
    // its owner announces it applied.
    let half = tessel_rate / 2.0;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let mut bg = Producer::new(js.clone(), "tessel", MODEL, rows, DIM, IN_FLIGHT, 3);
        let values = values.clone();
        let per_slot = (rows / 1024).max(1);
        tokio::spawn(async move {
            let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
            let period = Duration::from_secs_f64(4_096.0 / half);
            let mut due = Instant::now();
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let first = (rng.next() % 1024).min(1024 - 64) * per_slot;
                let batch: Vec<u32> = (0..4_096)
                    .map(|_| ((first + rng.next() % (64 * per_slot)) % rows) as u32)
                    .collect();
                bg.send(&batch, &values[..batch.len() * DIM as usize])
                    .await?;
                sent += batch.len() as u64;
                due += period;
                tokio::time::sleep_until(due.into()).await;
            }
            anyhow::Ok(sent)
        })
    };
    // The raw part of the same path: an ordered consumer of the probes' slot in this process
    // (the probes all go to slot 0; the load reaches it too, 1/1024 of it), timed from the
    // probe's publish until the consumer has it, as the owner's consumer gets it.
    let probe_slot = cluster::Slot::from_hash(0);
    let probe_rows = actors::delta::slot_rows(rows, probe_slot);
    let (raw_tx, mut raw_seen) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let raw_probe = {
        let stream = js
            .get_stream(crate::deltas::deltas_stream("tessel"))
            .await?;
        let mut messages = ordered_reader_from(
            &stream,
            &crate::deltas::delta_subject("tessel", MODEL, probe_slot),
            jetstream::consumer::DeliverPolicy::New,
        )
        .await?;
        tokio::spawn(async move {
            while let Some(Ok(m)) = messages.next().await {
                let at = Instant::now();
                if let Some(id) = crate::deltas::trace_of(&m)
                    && raw_tx
                        .send((String::from_utf8_lossy(&id).into_owned(), at))
                        .is_err()
                {
                    break;
                }
            }
        })
    };
    let load_started = Instant::now();
    let cpu = CpuSeconds::now(server, Some(pid));
    let mut latencies = Vec::with_capacity(probes);
    let mut acks = Vec::with_capacity(probes);
    let mut held = Vec::with_capacity(probes);
    let mut delivered = Vec::with_capacity(probes);
    let (mut raw_early, mut early) = (HashMap::new(), HashMap::new());
    for i in 0..probes {
        let id = format!("p{i}");
        let span = (probe_rows.end - probe_rows.start).max(1);
        let row = (probe_rows.start + rng.next() % span) as u32;
        let t0 = Instant::now();
        producer
            .send_traced(&[row], &values[..DIM as usize], Some(&id))
            .await?;
        acks.push(ms(t0.elapsed()));
        let Some((at, held_ms)) = traced(&mut applied, &mut early, &id).await else {
            anyhow::bail!("probe {id} was never applied");
        };
        latencies.push(ms(at - t0));
        held.extend(held_ms);
        let Some(raw_at) = traced(&mut raw_seen, &mut raw_early, &id).await else {
            anyhow::bail!("probe {id} never reached the raw consumer");
        };
        delivered.push(ms(raw_at - t0));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let load_rows = load.await??;
    let load_rate = load_rows as f64 / load_started.elapsed().as_secs_f64();
    let cpu = CpuSeconds::now(server, Some(pid)) - cpu;
    listener.abort();
    raw_probe.abort();
    latencies.sort_by(f64::total_cmp);
    acks.sort_by(f64::total_cmp);
    held.sort_by(f64::total_cmp);
    delivered.sort_by(f64::total_cmp);
    eprintln!(
        "bench: deltas latency at {load_rate:.0} rows/s (target {half:.0}): p50 {:.2} ms, p99 {:.2} ms (server ack p50 {:.2} ms, p99 {:.2} ms; raw consumer p50 {:.2} ms, p99 {:.2} ms; held by the owner p50 {:.2} ms, p99 {:.2} ms; {cpu})",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        percentile(&acks, 50.0),
        percentile(&acks, 99.0),
        percentile(&delivered, 50.0),
        percentile(&delivered, 99.0),
        percentile(&held, 50.0),
        percentile(&held, 99.0)
    );
    // The publisher's own wait for the server's acknowledgement of the same probes is the raw
    // part of that latency (the store, under the same load).
    for p in [50.0, 99.0] {
        out.push(BenchResult::new(
            &format!("delta publish → applied at half rate, p{p}"),
            percentile(&latencies, p),
            "ms",
            Some(("publish → server ack, same probes", percentile(&acks, p))),
        ));
    }
    // The same probes' publish → a raw ordered consumer has them: JetStream's part of the
    // path, without the owner and the notice.
    for p in [50.0, 99.0] {
        out.push(BenchResult::new(
            &format!("delta publish → applied at half rate, p{p}, against a raw consumer"),
            percentile(&latencies, p),
            "ms",
            Some((
                "publish → raw ordered consumer, same probes",
                percentile(&delivered, p),
            )),
        ));
    }
    // The owner's share of it: from the frame's receipt off the consumer to its notice.
    for p in [50.0, 99.0] {
        out.push(BenchResult::new(
            &format!("delta held by the owner at half rate, p{p}"),
            percentile(&held, p),
            "ms",
            None,
        ));
    }

    // Replay: the whole model rebuilt offline (no checkpoints exist: the bench node's interval
    // is longer than the run), against a raw ordered consumer of the same messages.
    let (tessel_rate, raw_rate) = replay_figures(c, &js, MODEL, rows, DIM, workers).await?;
    if quick {
        out.push(BenchResult::new(
            "delta replay (rows rebuilt/s)",
            tessel_rate,
            "rows/s",
            Some(("raw ordered consumer, same messages", raw_rate)),
        ));
        return Ok(out);
    }
    // The full run's table is 1 GiB for 0.75 updates per row, so its replay mostly writes
    // fresh memory: the first touch of as many fresh bytes, timed in this process, is that
    // figure's other bound.
    let first_touch = {
        let bytes = usize::try_from(table_bytes).unwrap_or(usize::MAX);
        let t0 = Instant::now();
        let mut fresh: Vec<u8> = Vec::new();
        fresh.try_reserve_exact(bytes)?;
        fresh.resize(bytes, 1);
        let rate = bytes as f64 / t0.elapsed().as_secs_f64();
        drop(std::hint::black_box(fresh));
        rate
    };
    eprintln!(
        "bench: deltas: fresh memory first touch {:.2} GB/s",
        first_touch / 1e9
    );
    out.push(BenchResult::new(
        "delta replay, 1 GiB table (rows rebuilt/s)",
        tessel_rate,
        "rows/s",
        Some(("raw ordered consumer, same messages", raw_rate)),
    ));
    out.push(BenchResult::new(
        "fresh memory first touch (as many bytes as the table)",
        first_touch / 1e9,
        "GB/s",
        None,
    ));
    // The stream-bound replay: as many rows again, on a 64 MiB table of another model
    // (published straight to the stream; no node serves it).
    const LONG: &str = "bench-replay";
    let long_rows: u64 = 1 << 18;
    let mut long = Producer::new(js.clone(), "tessel", LONG, long_rows, DIM, IN_FLIGHT, 4);
    let mut rng = XorShift(0x6a09_e667_f3bc_c909);
    for _ in 0..batches {
        let batch: Vec<u32> = (0..BATCH)
            .map(|_| (rng.next() % long_rows) as u32)
            .collect();
        long.send(&batch, &values[..batch.len() * DIM as usize])
            .await?;
    }
    let (tessel_rate, raw_rate) = replay_figures(c, &js, LONG, long_rows, DIM, workers).await?;
    out.push(BenchResult::new(
        "delta replay, 64 MiB table (rows rebuilt/s)",
        tessel_rate,
        "rows/s",
        Some(("raw ordered consumer, same messages", raw_rate)),
    ));
    Ok(out)
}

/// A node's `tessel_memory_trims_total` from its `/metrics` at `addr`, if it can be read.
async fn node_trims(addr: Option<&str>) -> Option<f64> {
    let (_, text) = crate::natsd::http_get(addr?, "/metrics").await.ok()?;
    crate::metrics::parse(&text)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "tessel_memory_trims_total")
        .map(|(_, v)| v)
}

/// The delta bench's columns (f32).
const DELTA_DIM: u32 = 64;
/// Publish acknowledgements in flight, for tessel's producers and the raw ones alike.
const DELTA_IN_FLIGHT: usize = 256;
/// The delta bench's model.
const DELTA_MODEL: &str = "bench";

/// The shape of the delta bench's workload, for its raw baselines.
struct Workload<'a> {
    batches: &'a [Vec<u32>],
    values: &'a [f32],
    rows: u64,
    total_frames: u64,
}

impl Workload<'_> {
    /// Publishes every batch through `producer`, each acknowledged before this returns.
    async fn publish(&self, producer: &mut crate::deltas::Producer) -> anyhow::Result<()> {
        for batch in self.batches {
            producer
                .send(batch, &self.values[..batch.len() * DELTA_DIM as usize])
                .await?;
        }
        Ok(())
    }
}

/// The delta pipeline's raw baselines for `w`: (publish then consume, publish while
/// consuming), in rows/s. The bench takes them before tessel's phase and again after it and
/// keeps the faster of each: on the 16-core VM of docs/benchmarks.md, whichever phase ran
/// later ran faster, so one side measured first would favour the other.
async fn raw_delta_baselines(
    js: &async_nats::jetstream::Context,
    w: &Workload<'_>,
    when: &str,
) -> anyhow::Result<(f64, f64)> {
    use crate::deltas::Producer;
    let producer = |cluster: &str| {
        Producer::new(
            js.clone(),
            cluster,
            DELTA_MODEL,
            w.rows,
            DELTA_DIM,
            DELTA_IN_FLIGHT,
            1,
        )
    };
    let total_rows: usize = w.batches.iter().map(Vec::len).sum();
    let total_frames = w.total_frames;
    // Raw: the same frames through a plain stream, published with the same bound on acks in
    // flight (timed until the last ack), then read back by an ordered consumer in this process
    // (timed apart, so the baseline does not share this process's threads with itself). The
    // baseline is the rate of doing both, publish time plus consume time: on a machine whose
    // cores are all busy (nats-server, producer, consumer) overlapping the two adds no capacity.
    raw_delta_stream(js, "rawdelta").await?;
    let mut raw_producer = producer("rawdelta");
    let t0 = Instant::now();
    w.publish(&mut raw_producer).await?;
    let publish_rate = total_rows as f64 / t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut raw_msgs =
        ordered_reader(&js.get_stream("rawdelta").await?, "rawdelta.delta.>").await?;
    let raw_frames = count_messages(&mut raw_msgs, total_frames, Duration::from_secs(10)).await;
    anyhow::ensure!(
        raw_frames == total_frames,
        "raw consumer read {raw_frames} of {total_frames} frames"
    );
    let consume_rate = total_rows as f64 / t0.elapsed().as_secs_f64();
    let raw_rate = 1.0 / (1.0 / publish_rate + 1.0 / consume_rate);
    eprintln!(
        "bench: deltas raw ({when}): publish {publish_rate:.0} rows/s, consume {consume_rate:.0} rows/s"
    );
    js.delete_stream("rawdelta").await?;

    // Raw, overlapped: the same frames published to a fresh stream while an ordered consumer
    // reads them, timed until it has read the last: what the tessel pipeline does, less tessel.
    // Where cores are to spare, the server's writer and reader of one stream contend, and
    // publishing while a consumer reads is slower than publishing alone, which the sequential
    // baseline above does not see.
    raw_delta_stream(js, "rawlive").await?;
    let mut live_msgs = ordered_reader(&js.get_stream("rawlive").await?, "rawlive.delta.>").await?;
    let reader = tokio::spawn(async move {
        let frames = count_messages(&mut live_msgs, total_frames, Duration::from_secs(10)).await;
        (frames, Instant::now())
    });
    let mut live_producer = producer("rawlive");
    let t0 = Instant::now();
    w.publish(&mut live_producer).await?;
    let live_published = t0.elapsed();
    let (live_frames, live_done) = reader.await?;
    anyhow::ensure!(
        live_frames == total_frames,
        "overlapped raw consumer read {live_frames} of {total_frames} frames"
    );
    let overlapped_rate = total_rows as f64 / (live_done - t0).as_secs_f64();
    eprintln!(
        "bench: deltas raw overlapped ({when}): {overlapped_rate:.0} rows/s (published in {:.2} s, read in {:.2} s)",
        live_published.as_secs_f64(),
        (live_done - t0).as_secs_f64()
    );
    js.delete_stream("rawlive").await?;
    Ok((raw_rate, overlapped_rate))
}

/// Rounds of the replay figures: the VM's noise moves one round's ratio by a tenth.
const REPLAY_ROUNDS: usize = 3;

/// What came for trace `id` on `rx`, keeping what comes first for other ids in `early`;
/// `None` when nothing comes for 10 s or the sender is gone.
async fn traced<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, T)>,
    early: &mut HashMap<String, T>,
    id: &str,
) -> Option<T> {
    if let Some(seen) = early.remove(id) {
        return Some(seen);
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some((got, seen))) if got == id => return Some(seen),
            Ok(Some((got, seen))) => {
                early.insert(got, seen);
            }
            _ => return None,
        }
    }
}

/// Replays `model` (`rows × dim`, one generation, no checkpoints) offline from the deltas
/// stream, each time just after a raw ordered consumer has read the same messages, for
/// [`REPLAY_ROUNDS`] rounds, on `workers` threads: the median (tessel, raw) rows/s. Every
/// round is printed.
async fn replay_figures(
    c: &LocalCluster,
    js: &async_nats::jetstream::Context,
    model: &str,
    rows: u64,
    dim: u32,
    workers: usize,
) -> anyhow::Result<(f64, f64)> {
    let checkpoints = crate::deltas::ensure(js, "tessel", 1).await?;
    let template = crate::deltas::SlotModel {
        js: js.clone(),
        client: c.client.clone(),
        checkpoints,
        cluster: "tessel".into(),
        model: model.into(),
        rows,
        dim,
        slot: cluster::Slot::from_hash(0),
        cfg: crate::deltas::SlotModelConfig::default(),
        metrics: std::sync::Arc::new(crate::metrics::Metrics::default()),
    };
    let line = [crate::deltas::Generation {
        model: model.into(),
        scale: 1.0,
        clip: None,
        fork_seq: None,
    }];
    let (mut tessel, mut raw) = (Vec::new(), Vec::new());
    let server = c.nats.server(0).and_then(crate::natsd::NatsServer::pid);
    for round in 1..=REPLAY_ROUNDS {
        let before = CpuSeconds::now(server, None);
        let (raw_rows, raw_rate) = raw_read(js, model).await?;
        let raw_cpu = CpuSeconds::now(server, None) - before;
        let before = CpuSeconds::now(server, None);
        let t0 = Instant::now();
        // The reader's wait for the workers, and when the last message was routed: what
        // follows is the workers' tail.
        let (mut waited, mut routed) = (Duration::ZERO, t0);
        let tables =
            crate::deltas::replay_model(&template, &line, None, &|_| u64::MAX, workers, &mut |p| {
                (waited, routed) = (p.waited, Instant::now())
            })
            .await
            .map_err(|e| anyhow::anyhow!("replay: {e}"))?;
        let tail = routed.elapsed();
        let tessel_rate = raw_rows as f64 / t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            tables.len() == 1024,
            "replay rebuilt {} slots",
            tables.len()
        );
        let tessel_cpu = CpuSeconds::now(server, None) - before;
        drop(tables);
        eprintln!(
            "bench: deltas replay of {model}, round {round}: tessel {tessel_rate:.0} rows/s on {workers} workers ({tessel_cpu}; the reader waited {:.1} ms for the workers, who finished {:.1} ms after it), raw {raw_rate:.0} rows/s ({raw_cpu})",
            waited.as_secs_f64() * 1e3,
            tail.as_secs_f64() * 1e3,
        );
        tessel.push(tessel_rate);
        raw.push(raw_rate);
    }
    tessel.sort_by(f64::total_cmp);
    raw.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
    Ok((median(&tessel), median(&raw)))
}

/// Reads `model`'s deltas with a raw ordered consumer (frame headers decoded, nothing
/// applied): (rows, rows/s).
async fn raw_read(js: &async_nats::jetstream::Context, model: &str) -> anyhow::Result<(u64, f64)> {
    use futures::StreamExt;

    let stream = js
        .get_stream(crate::deltas::deltas_stream("tessel"))
        .await?;
    let end = stream.get_info().await?.state.last_sequence;
    let t0 = Instant::now();
    let mut raw_rows = 0u64;
    let mut messages = ordered_reader(&stream, &format!("tessel.delta.{model}.*")).await?;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await
    {
        raw_rows += actors::frame::Frame::decode(&m.payload).map_or(0, |f| u64::from(f.count));
        let info = m.info().map(|i| (i.stream_sequence, i.pending));
        if info.is_ok_and(|(seq, pending)| seq >= end || pending == 0) {
            break;
        }
    }
    Ok((raw_rows, raw_rows as f64 / t0.elapsed().as_secs_f64()))
}

/// A fresh plain stream `name` (subjects `name.delta.>`, frames up to the frame limit) for the
/// raw delta baselines.
async fn raw_delta_stream(js: &async_nats::jetstream::Context, name: &str) -> anyhow::Result<()> {
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.delta.>")],
        max_message_size: i32::try_from(actors::frame::MAX_FRAME_BYTES).unwrap_or(i32::MAX),
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// An ordered consumer's messages of `subject` on `stream`, from the start.
async fn ordered_reader(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
) -> anyhow::Result<async_nats::jetstream::consumer::pull::Ordered> {
    ordered_reader_from(
        stream,
        subject,
        async_nats::jetstream::consumer::DeliverPolicy::All,
    )
    .await
}

/// An ordered consumer's messages of `subject` on `stream`, from where `deliver` says.
async fn ordered_reader_from(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
    deliver: async_nats::jetstream::consumer::DeliverPolicy,
) -> anyhow::Result<async_nats::jetstream::consumer::pull::Ordered> {
    Ok(stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.into(),
            deliver_policy: deliver,
            ..Default::default()
        })
        .await?
        .messages()
        .await?)
}

/// Reads up to `n` messages, giving up after `wait` without one: how many came.
async fn count_messages(
    messages: &mut async_nats::jetstream::consumer::pull::Ordered,
    n: u64,
    wait: Duration,
) -> u64 {
    use futures::StreamExt;
    let mut read = 0u64;
    while read < n {
        match tokio::time::timeout(wait, messages.next()).await {
            Ok(Some(Ok(_))) => read += 1,
            _ => break,
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_count_this_process_work_in_both_sources() {
        let me = std::process::id();
        let before = CpuSeconds::now(Some(me), Some(me));
        // Spin until getrusage has seen 0.3 s of this thread's CPU (or give up after 20 s of
        // wall time on a starved machine).
        let started = Instant::now();
        let mut x = 0u64;
        while (CpuSeconds::now(None, None).bench - before.bench) < 0.3
            && started.elapsed() < Duration::from_secs(20)
        {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let spent = CpuSeconds::now(Some(me), Some(me)) - before;
        assert!(spent.bench >= 0.3, "{spent}");
        // /proc counts in 10 ms ticks: the same work, within a few ticks.
        assert!(spent.server >= 0.25, "{spent}");
        assert_eq!(spent.node.map(|n| n >= 0.25), Some(true), "{spent}");
        assert!(spent.wall > 0.0, "{spent}");
        assert_eq!(proc_cpu_seconds(u32::MAX), None);
        assert!(CpuSeconds::now(Some(u32::MAX), None).server == 0.0);
    }

    #[test]
    fn hdr_percentiles_are_within_a_tenth_of_a_percent() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        let near = |a: f64, b: f64| (a - b).abs() <= b * 1e-3;
        assert!(near(percentile(&v, 50.0), 10.0), "{}", percentile(&v, 50.0));
        assert!(near(percentile(&v, 99.0), 20.0), "{}", percentile(&v, 99.0));
        assert!(near(percentile(&v, 0.0), 1.0), "{}", percentile(&v, 0.0));
        assert!(percentile(&[], 50.0).is_nan());
        // Large values (a failover in ms, an ask in µs) keep their precision too.
        let big: Vec<f64> = (1..=100).map(|i| 2_000.0 + f64::from(i)).collect();
        assert!(
            near(percentile(&big, 50.0), 2_050.0),
            "{}",
            percentile(&big, 50.0)
        );
    }
}
