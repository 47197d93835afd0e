//! Counters, gauges and latency histograms of one node, shared by its tasks, rendered in the
//! Prometheus text format (every series prefixed `tessel_`), plus per-model delta counters
//! (labelled `model="…"`) that `/metrics` and `/status` both show.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histograms' buckets, in microseconds (100 µs to 10 s).
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Most models that get their own labelled series; later ones are counted in
/// `model_series_dropped_total` only.
pub const MAX_MODEL_SERIES: usize = 256;

/// A latency histogram with the fixed buckets [`LATENCY_BUCKETS_US`], rendered in seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last counts those above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        self.observe_us(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Records one observation in microseconds.
    pub fn observe_us(&self, us: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, name: &str, out: &mut String) {
        let mut cumulative = 0;
        for (i, b) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let le = *b as f64 / 1e6;
            let _ = writeln!(out, "tessel_{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[LATENCY_BUCKETS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "tessel_{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "tessel_{name}_sum {sum}");
        let _ = writeln!(out, "tessel_{name}_count {cumulative}");
    }
}

/// One series of the node's metrics.
trait Series {
    const KIND: &'static str;
    fn render_into(&self, name: &str, out: &mut String);
}

impl Series for AtomicU64 {
    const KIND: &'static str = "counter";
    fn render_into(&self, name: &str, out: &mut String) {
        let _ = writeln!(out, "tessel_{name} {}", self.load(Ordering::Relaxed));
    }
}

impl Series for AtomicI64 {
    const KIND: &'static str = "gauge";
    fn render_into(&self, name: &str, out: &mut String) {
        let _ = writeln!(out, "tessel_{name} {}", self.load(Ordering::Relaxed));
    }
}

impl Series for Histogram {
    const KIND: &'static str = "histogram";
    fn render_into(&self, name: &str, out: &mut String) {
        self.render(name, out);
    }
}

/// The delta counters of one model on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModelStats {
    /// Delta frames applied.
    pub deltas_applied: u64,
    /// Rows applied.
    pub rows_applied: u64,
    /// Deltas of the model's slots on this node still in the stream after the last one its
    /// consumer received (the consumer's pending count when it received it).
    pub pending: u64,
    /// Deltas received by the consumer but not yet applied, over the model's slots here.
    pub queued: u64,
    /// The most deltas received but not yet applied by one slot.
    pub max_slot_queued: u64,
    /// Deltas of the model's slots here not yet applied: `pending + queued`.
    pub lag: u64,
    /// Received but not applied, per slot (summed into `queued` when read).
    #[serde(skip)]
    slot_queued: BTreeMap<u16, u64>,
}

macro_rules! metrics {
    ($( $kind:ident $name:ident : $help:literal ),* $(,)?) => {
        /// The node's metrics. Counters only grow; gauges are set.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( #[doc = $help] pub $name: metrics!(@ty $kind), )*
            /// Per-model delta counters (at most [`MAX_MODEL_SERIES`] models).
            models: Mutex<BTreeMap<String, ModelStats>>,
        }

        impl Metrics {
            /// Renders every series in the Prometheus text exposition format.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP tessel_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE tessel_{} {}", stringify!($name), <metrics!(@ty $kind) as Series>::KIND);
                    self.$name.render_into(stringify!($name), &mut out);
                )*
                self.render_models(&mut out);
                out
            }
        }
    };
    (@ty counter) => { AtomicU64 };
    (@ty gauge) => { AtomicI64 };
    (@ty histogram) => { Histogram };
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
    counter nats_permission_violations_total: "Publishes or subscriptions the NATS server refused for lack of permission.",
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
    counter memory_trims_total: "Times the node, quiet after work, gave the allocator's free memory back (memory_trim_idle_ms).",
    counter reads_refused_total: "Reads answered with an error: by the read router (a subject naming no slot held here, a slot's read queue full, a slot stopping, no reply subject) or by the slot (a body that is not a read, a row outside the slot, more rows than one answer carries).",
    counter checkpoints_total: "Slot checkpoints written.",
    counter checkpoints_failed_total: "Slot checkpoints the object store did not take (the slot goes on; the next is due at the next interval, and a restart replays from the last one stored).",
    counter checkpoint_list_failures_total: "Model starts put off because the checkpoints could not be listed (retried at the next reconcile).",
    counter devices_lost_total: "Devices lost (a driver error or the fault switch); their tables are rebuilt.",
    counter tables_lost_total: "Slot tables that stopped on a lost device (rebuilt from checkpoint and stream).",
    counter faults_refused_total: "Fault-switch requests refused (disabled, malformed, unknown fault or device).",
    gauge term: "The term of the lease this node holds, 0 if it does not lead.",
    gauge highest_term: "The highest term this node has seen.",
    gauge is_leader: "1 while this node acts as leader.",
    gauge slots_owned: "Slots the adopted map gives this node.",
    gauge map_epoch: "Epoch of the adopted shard map.",
    gauge members: "Members this node knows.",
    counter model_series_dropped_total: "Per-model updates not recorded because MAX_MODEL_SERIES models already have series.",
    histogram delta_apply_seconds: "Time to apply one window of validated delta frames to a slot's table.",
    histogram delta_e2e_seconds: "Publish to applied: the applying node's wall clock minus the frame's HLC wall time.",
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

    /// Counts a window of `frames` frames and `rows` rows applied to `model`.
    pub fn model_applied(&self, model: &str, frames: u64, rows: u64) {
        self.with_model(model, |s| {
            s.deltas_applied += frames;
            s.rows_applied += rows;
        });
    }

    /// Records a window applied to `model`: `rows` rows in `elapsed`, from frames published at
    /// the wall times `walls` (milliseconds; their end-to-end latency is measured from now).
    pub fn window_applied(&self, model: &str, rows: usize, elapsed: Duration, walls: &[u64]) {
        self.delta_apply_seconds.observe(elapsed);
        let now = crate::store::wall_ms();
        for w in walls {
            self.delta_e2e_seconds
                .observe_us(now.saturating_sub(*w).saturating_mul(1000));
        }
        self.model_applied(model, walls.len() as u64, rows as u64);
    }

    /// Sets the consumer's pending count of `model` on this node.
    pub fn model_lag(&self, model: &str, pending: u64) {
        self.with_model(model, |s| s.pending = pending);
    }

    /// Sets how many deltas one slot of `model` has received but not yet applied (0 when the
    /// slot stops here).
    pub fn slot_queued(&self, model: &str, slot: u16, queued: u64) {
        self.with_model(model, |s| {
            if queued == 0 {
                s.slot_queued.remove(&slot);
            } else {
                s.slot_queued.insert(slot, queued);
            }
        });
    }

    /// A copy of the per-model counters, with `queued`, `max_slot_queued` and `lag` computed.
    pub fn models(&self) -> BTreeMap<String, ModelStats> {
        let mut models = self.models.lock().map(|m| m.clone()).unwrap_or_default();
        for s in models.values_mut() {
            s.queued = s.slot_queued.values().sum();
            s.max_slot_queued = s.slot_queued.values().copied().max().unwrap_or(0);
            s.lag = s.pending + s.queued;
            s.slot_queued.clear();
        }
        models
    }

    fn with_model(&self, model: &str, f: impl FnOnce(&mut ModelStats)) {
        let Ok(mut models) = self.models.lock() else {
            return;
        };
        if let Some(s) = models.get_mut(model) {
            f(s);
        } else if models.len() < MAX_MODEL_SERIES {
            f(models.entry(model.to_string()).or_default());
        } else {
            Self::inc(&self.model_series_dropped_total);
        }
    }

    fn render_models(&self, out: &mut String) {
        let models = self.models();
        let series: [ModelSeries; 4] = [
            (
                "model_deltas_applied_total",
                "counter",
                "Delta frames applied, per model.",
                |s| s.deltas_applied,
            ),
            (
                "model_rows_applied_total",
                "counter",
                "Rows applied from deltas, per model.",
                |s| s.rows_applied,
            ),
            (
                "model_consumer_lag",
                "gauge",
                "Deltas of the model's slots on this node not yet applied (in the stream after what its consumer received, plus received and queued).",
                |s| s.lag,
            ),
            (
                "model_max_slot_queue",
                "gauge",
                "The most deltas received but not yet applied by one slot of the model on this node.",
                |s| s.max_slot_queued,
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP tessel_{name} {help}");
            let _ = writeln!(out, "# TYPE tessel_{name} {kind}");
            for (model, s) in &models {
                let _ = writeln!(
                    out,
                    "tessel_{name}{{model=\"{}\"}} {}",
                    escape_label(model),
                    value(s)
                );
            }
        }
    }
}

/// A per-model family: name, type, help, and the value it shows.
type ModelSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ModelStats) -> u64,
);

/// A sample line that is not `name[{labels}] value`.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: not a Prometheus sample: {text:?}")]
pub struct ParseError {
    line: usize,
    text: String,
}

/// Parses Prometheus text into `(series, value)` pairs in order, `series` being the name with
/// its labels as written (`tessel_x_bucket{le="0.001"}`); comments and blank lines are
/// skipped. For tests and tools that read `/metrics`.
pub fn parse(text: &str) -> Result<Vec<(String, f64)>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || ParseError {
            line: i + 1,
            text: line.to_string(),
        };
        let (series, value) = line.rsplit_once(' ').ok_or_else(bad)?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().map_err(|_| bad())?,
        };
        let name = series.split('{').next().unwrap_or_default();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            || (series.contains('{') && !series.ends_with('}'))
        {
            return Err(bad());
        }
        out.push((series.to_string(), value));
    }
    Ok(out)
}

/// Escapes a label value (backslash, double quote, newline).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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

    #[test]
    fn histograms_and_models_parse() {
        let m = Metrics::default();
        m.delta_apply_seconds.observe(Duration::from_micros(80));
        m.delta_apply_seconds.observe(Duration::from_millis(3));
        m.delta_apply_seconds.observe(Duration::from_secs(60));
        m.model_applied("emb", 4, 400);
        m.model_applied("emb", 1, 100);
        m.model_lag("emb", 7);
        m.slot_queued("emb", 3, 2);
        m.slot_queued("emb", 9, 5);
        m.slot_queued("emb", 4, 1);
        m.slot_queued("emb", 4, 0);
        let text = m.render();
        let samples: BTreeMap<String, f64> = parse(&text).unwrap().into_iter().collect();
        let get = |k: &str| {
            *samples
                .get(k)
                .unwrap_or_else(|| panic!("{k} missing in {text}"))
        };
        assert_eq!(get("tessel_delta_apply_seconds_bucket{le=\"0.0001\"}"), 1.0);
        assert_eq!(get("tessel_delta_apply_seconds_bucket{le=\"0.0025\"}"), 1.0);
        assert_eq!(get("tessel_delta_apply_seconds_bucket{le=\"0.005\"}"), 2.0);
        assert_eq!(get("tessel_delta_apply_seconds_bucket{le=\"10\"}"), 2.0);
        assert_eq!(get("tessel_delta_apply_seconds_bucket{le=\"+Inf\"}"), 3.0);
        assert_eq!(get("tessel_delta_apply_seconds_count"), 3.0);
        assert!((get("tessel_delta_apply_seconds_sum") - 60.00308).abs() < 1e-9);
        assert_eq!(get("tessel_delta_e2e_seconds_count"), 0.0);
        assert_eq!(get("tessel_model_deltas_applied_total{model=\"emb\"}"), 5.0);
        assert_eq!(get("tessel_model_rows_applied_total{model=\"emb\"}"), 500.0);
        assert_eq!(get("tessel_model_consumer_lag{model=\"emb\"}"), 14.0);
        assert_eq!(get("tessel_model_max_slot_queue{model=\"emb\"}"), 5.0);
        assert!(text.contains("# TYPE tessel_delta_e2e_seconds histogram\n"));
        // Buckets are cumulative.
        let buckets: Vec<f64> = parse(&text)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.starts_with("tessel_delta_apply_seconds_bucket"))
            .map(|(_, v)| v)
            .collect();
        assert_eq!(buckets.len(), LATENCY_BUCKETS_US.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
        assert!(parse("tessel_x{le=\"1\" 3\n").is_err());
        assert!(parse("tessel_x three\n").is_err());
    }

    #[test]
    fn model_series_are_bounded() {
        let m = Metrics::default();
        for i in 0..MAX_MODEL_SERIES + 3 {
            m.model_applied(&format!("m{i}"), 1, 1);
        }
        assert_eq!(m.models().len(), MAX_MODEL_SERIES);
        assert_eq!(m.model_series_dropped_total.load(Ordering::Relaxed), 3);
        m.model_lag("a\"b", 1);
        assert!(m.render().contains("model=\"m0\""));
    }
}
