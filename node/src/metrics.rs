//! Counters and gauges of one node, shared by its tasks, rendered in the Prometheus text format
//! (every series prefixed `tessel_`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

macro_rules! metrics {
    ($( $kind:ident $name:ident : $help:literal ),* $(,)?) => {
        /// The node's metrics. Counters only grow; gauges are set.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( #[doc = $help] pub $name: metrics!(@ty $kind), )*
        }

        impl Metrics {
            /// Renders every series in the Prometheus text exposition format.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP tessel_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE tessel_{} {}", stringify!($name), metrics!(@kind $kind));
                    let _ = writeln!(out, "tessel_{} {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
                out
            }
        }
    };
    (@ty counter) => { AtomicU64 };
    (@ty gauge) => { AtomicI64 };
    (@kind counter) => { "counter" };
    (@kind gauge) => { "gauge" };
}

metrics! {
    counter commands_total: "Commands the core handled.",
    counter commands_rejected_total: "Commands the core refused (stale, duplicate or inconsistent input).",
    counter bad_records_total: "KV records that failed to parse or validate and were ignored.",
    counter lease_acquisitions_total: "Lease acquisitions that succeeded.",
    counter lease_renewals_total: "Lease renewals (and map writes) that succeeded.",
    counter lease_renewal_failures_total: "Lease renewals refused or unanswered.",
    counter leadership_losses_total: "Times this node stopped acting as leader.",
    counter map_writes_total: "Shard maps this node wrote as leader.",
    counter map_write_failures_total: "Map writes refused or unanswered.",
    counter maps_adopted_total: "Shard maps this node adopted.",
    counter kv_errors_total: "KV requests that failed (timeouts, transport errors).",
    counter heartbeats_total: "Membership heartbeats written.",
    counter watch_restarts_total: "KV watches re-established after ending or failing.",
    counter nats_reconnects_total: "Reconnections to NATS.",
    counter supervisor_restarts_total: "Child actors restarted by the node supervisor.",
    counter slot_hosts_started_total: "Slot hosts started.",
    counter slot_hosts_stopped_total: "Slot hosts stopped.",
    counter actor_activations_total: "Virtual actors activated.",
    counter actor_passivations_total: "Virtual actors passivated.",
    counter actor_events_appended_total: "Appends of actor events that succeeded.",
    counter actor_conflicts_total: "Actor appends that met a version conflict.",
    counter actor_errors_total: "Actor requests answered with an error.",
    counter deltas_applied_total: "Delta frames applied.",
    counter rows_applied_total: "Rows applied from deltas.",
    counter deltas_rejected_total: "Delta frames refused and dead-lettered.",
    counter deltas_skipped_total: "Delta frames skipped as already applied (redelivery, replay).",
    counter checkpoints_total: "Slot checkpoints written.",
    counter devices_lost_total: "Devices lost (a driver error or the fault switch); their tables are rebuilt.",
    counter tables_lost_total: "Slot tables that stopped on a lost device (rebuilt from checkpoint and stream).",
    counter faults_refused_total: "Fault-switch requests refused (disabled, malformed, unknown fault or device).",
    gauge term: "The term of the lease this node holds, 0 if it does not lead.",
    gauge highest_term: "The highest term this node has seen.",
    gauge is_leader: "1 while this node acts as leader.",
    gauge slots_owned: "Slots the adopted map gives this node.",
    gauge map_epoch: "Epoch of the adopted shard map.",
    gauge members: "Members this node knows.",
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicI64, value: i64) {
        gauge.store(value, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_series() {
        let m = Metrics::default();
        Metrics::inc(&m.bad_records_total);
        Metrics::set(&m.term, 42);
        let text = m.render();
        assert!(text.contains("tessel_bad_records_total 1\n"), "{text}");
        assert!(
            text.contains("# TYPE tessel_term gauge\ntessel_term 42\n"),
            "{text}"
        );
    }
}
