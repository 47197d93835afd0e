//! Placement speed: `cargo bench -p cluster --bench place`.
//!
//! Times `place` for 1024 slots on 1,000 nodes in the cases the leader meets: the first
//! placement, a join, a failure, and a no-op on a balanced map. Prints the median and the
//! 99th percentile of many runs; the target is under 1 ms.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use cluster::{Epoch, NodeId, NodeStatus, PlacementNode, ShardMap, Term, Weight, place};

fn nodes(n: usize) -> Vec<PlacementNode> {
    (0..n)
        .map(|i| PlacementNode {
            id: NodeId::new(&format!("node-{i:04}")).unwrap(),
            status: NodeStatus::Active,
            weight: Weight::ONE,
        })
        .collect()
}

fn time(name: &str, runs: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..runs / 10 {
        f();
    }
    let mut samples: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    samples.sort();
    let p50 = samples[runs / 2];
    let p99 = samples[runs * 99 / 100];
    println!(
        "{name:<40} p50 {:>9.1} µs   p99 {:>9.1} µs",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    p99
}

fn main() {
    let runs = 2_000;
    let mut worst = Duration::ZERO;
    for n in [3usize, 100, 1_000] {
        let all = nodes(n);
        let empty = ShardMap::empty();
        worst = worst.max(time(&format!("place {n} nodes from empty"), runs, || {
            black_box(place(black_box(&empty), black_box(&all)).unwrap());
        }));
        let balanced = ShardMap::new(Epoch(1), Term(1), place(&empty, &all).unwrap()).unwrap();
        worst = worst.max(time(&format!("place {n} nodes, no change"), runs, || {
            black_box(place(black_box(&balanced), black_box(&all)).unwrap());
        }));
        let mut joined = nodes(n + 1);
        joined.rotate_left(1);
        worst = worst.max(time(&format!("place {n} nodes + 1 join"), runs, || {
            black_box(place(black_box(&balanced), black_box(&joined)).unwrap());
        }));
        let mut failed = all.clone();
        failed[n / 2].status = NodeStatus::Failed;
        worst = worst.max(time(&format!("place {n} nodes, 1 failed"), runs, || {
            black_box(place(black_box(&balanced), black_box(&failed)).unwrap());
        }));
    }
    println!(
        "place: worst p99 {:.3} ms (target < 1 ms)",
        worst.as_secs_f64() * 1e3
    );
}
