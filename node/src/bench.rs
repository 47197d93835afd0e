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
