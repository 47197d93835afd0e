//! Giving the allocator's free memory back once the node is quiet after work.
//!
//! A burst of deltas allocates and frees a great deal (each received frame's payload copy,
//! each window's rows and values); glibc keeps what was freed (see
//! [`gpu::host::release_free_memory`]), so without this a node stays resident at its burst's
//! high-water mark. Every `memory_trim_idle_ms` the task compares the node's work counters
//! with the previous look; when they have not moved for a whole interval, and moved since the
//! last trim, it trims once, on a blocking thread. A busy node is never trimmed (the walk
//! locks the allocator's arenas), and an idle one only once per quiet spell.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::metrics::Metrics;

/// Whether to trim now: the work count `now` equals the one an interval ago (`previous`), and
/// no trim has happened at this count yet.
pub fn trim_due(previous: u64, now: u64, trimmed_at: Option<u64>) -> bool {
    now == previous && trimmed_at != Some(now)
}

/// The node's work so far, as one count: deltas applied or skipped, checkpoints written.
fn work(metrics: &Metrics) -> u64 {
    [
        &metrics.deltas_applied_total,
        &metrics.deltas_skipped_total,
        &metrics.checkpoints_total,
    ]
    .iter()
    .map(|c| c.load(Ordering::Relaxed))
    .fold(0u64, u64::wrapping_add)
}

/// Runs until dropped: trims once per quiet spell of at least `idle` (see the module).
pub fn spawn(metrics: Arc<Metrics>, idle: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(idle);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        let mut previous = work(&metrics);
        let mut trimmed_at = None;
        loop {
            every.tick().await;
            let now = work(&metrics);
            if trim_due(previous, now, trimmed_at) {
                let started = Instant::now();
                let released = tokio::task::spawn_blocking(gpu::host::release_free_memory)
                    .await
                    .unwrap_or(false);
                Metrics::inc(&metrics.memory_trims_total);
                debug!(
                    released,
                    ms = started.elapsed().as_millis() as u64,
                    "idle: gave the allocator's free memory back"
                );
                trimmed_at = Some(now);
            }
            previous = now;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_comes_once_per_quiet_spell_and_never_while_busy() {
        // Busy: the count moved during the interval.
        assert!(!trim_due(10, 12, None));
        // Quiet for an interval: trim, once.
        assert!(trim_due(12, 12, None));
        assert!(!trim_due(12, 12, Some(12)));
        // Work again, then quiet again: trim again.
        assert!(!trim_due(12, 20, Some(12)));
        assert!(trim_due(20, 20, Some(12)));
    }
}
