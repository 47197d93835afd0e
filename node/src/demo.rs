//! The demo workload of `tessel up`: creates a model, runs a paced producer against it, and
//! measures what the cluster does with it — rows applied per second, publish → applied latency
//! and lag — from the owners' applied notices (every demo batch is traced: see
//! [`crate::deltas::TRACE_HEADER`]).
//!
//! **Boundary:** a client of the cluster like any producer: it talks to NATS only.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::deltas::{Producer, applied_subject};

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The model's name.
    pub model: String,
    /// Rows of the model.
    pub rows: u64,
    /// Columns of the model.
    pub dim: u32,
    /// Rows per second the producer aims at.
    pub rate_rows_per_s: u64,
    /// Rows per batch (each batch touches a few neighbouring slots).
    pub batch_rows: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            model: "demo".into(),
            rows: 1 << 16,
            dim: 64,
            rate_rows_per_s: 20_000,
            batch_rows: 1_024,
        }
    }
}

/// Batches sent and not yet applied everywhere that the demo remembers at most; beyond it the
/// oldest are forgotten (counted as lag, never as applied).
const MAX_OUTSTANDING: usize = 100_000;
/// Latency samples kept between two reports.
const MAX_SAMPLES: usize = 100_000;

#[derive(Default)]
struct Shared {
    /// Batch → (frames still to be applied, rows, sent at).
    outstanding: HashMap<u64, (usize, u64, Instant)>,
    acked_rows: u64,
    applied_rows: u64,
    latencies_ms: Vec<f64>,
    failures: u64,
    last_error: Option<String>,
}

/// One report of the demo's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoFigures {
    /// Rows applied per second since the previous report.
    pub applied_rows_per_s: f64,
    /// Publish → applied (every frame of a batch) since the previous report, p50, ms.
    pub p50_ms: f64,
    /// The same, p99.
    pub p99_ms: f64,
    /// Rows sent but not yet applied.
    pub lag_rows: u64,
    /// Rows the server acknowledged, in all.
    pub acked_rows: u64,
    /// Rows applied, in all.
    pub applied_rows: u64,
    /// Sends that failed, in all.
    pub failures: u64,
}

impl std::fmt::Display for DemoFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} rows/s applied · publish→applied p50 {:.1} ms p99 {:.1} ms · lag {} rows · {} rows acked, {} applied",
            self.applied_rows_per_s,
            self.p50_ms,
            self.p99_ms,
            self.lag_rows,
            self.acked_rows,
            self.applied_rows
        )?;
        if self.failures > 0 {
            write!(f, " · {} failed sends", self.failures)?;
        }
        Ok(())
    }
}

/// A running demo.
pub struct Demo {
    shared: Arc<Mutex<Shared>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    last_report: Instant,
    last_applied: u64,
}

impl Demo {
    /// Creates the model (waiting until it serves) and starts the producer and the listener.
    pub async fn start(
        client: &async_nats::Client,
        cluster: &str,
        opts: DemoOptions,
    ) -> anyhow::Result<Demo> {
        crate::bench::serve_model(client, cluster, &opts.model, opts.rows, opts.dim).await?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut notices = client
            .subscribe(applied_subject(cluster, &opts.model))
            .await?;
        let listener = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(m) = notices.next().await {
                    let Some(batch) = std::str::from_utf8(&m.payload)
                        .ok()
                        .and_then(|s| s.strip_prefix('d'))
                        .and_then(|s| s.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    let now = Instant::now();
                    let Ok(mut s) = shared.lock() else { break };
                    let done = match s.outstanding.get_mut(&batch) {
                        Some((frames, _, _)) => {
                            *frames = frames.saturating_sub(1);
                            *frames == 0
                        }
                        None => false,
                    };
                    if done && let Some((_, rows, sent)) = s.outstanding.remove(&batch) {
                        s.applied_rows += rows;
                        if s.latencies_ms.len() < MAX_SAMPLES {
                            s.latencies_ms.push((now - sent).as_secs_f64() * 1e3);
                        }
                    }
                }
            })
        };
        let js = async_nats::jetstream::new(client.clone());
        let producer = {
            let shared = shared.clone();
            let mut p = Producer::new(js, cluster, &opts.model, opts.rows, opts.dim, 64, 0xde);
            tokio::spawn(async move { produce(&mut p, &opts, &shared).await })
        };
        Ok(Demo {
            shared,
            tasks: vec![listener, producer],
            last_report: Instant::now(),
            last_applied: 0,
        })
    }

    /// The figures since the previous report.
    pub fn report(&mut self) -> DemoFigures {
        let now = Instant::now();
        let secs = (now - self.last_report).as_secs_f64().max(1e-3);
        self.last_report = now;
        let Ok(mut s) = self.shared.lock() else {
            return DemoFigures {
                applied_rows_per_s: 0.0,
                p50_ms: f64::NAN,
                p99_ms: f64::NAN,
                lag_rows: 0,
                acked_rows: 0,
                applied_rows: 0,
                failures: 0,
            };
        };
        let mut samples = std::mem::take(&mut s.latencies_ms);
        samples.sort_by(f64::total_cmp);
        let applied = s.applied_rows;
        let rate = (applied - self.last_applied) as f64 / secs;
        self.last_applied = applied;
        DemoFigures {
            applied_rows_per_s: rate,
            p50_ms: crate::bench::percentile(&samples, 50.0),
            p99_ms: crate::bench::percentile(&samples, 99.0),
            lag_rows: s.outstanding.values().map(|(_, r, _)| r).sum(),
            acked_rows: s.acked_rows,
            applied_rows: applied,
            failures: s.failures,
        }
    }

    /// The last send error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared.lock().ok().and_then(|s| s.last_error.clone())
    }

    /// Stops the producer and the listener.
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The rows of one demo batch: uniform within 16 neighbouring slots' rows.
fn batch_rows(rows: u64, n: usize, x: &mut u64) -> Vec<u32> {
    let mut next = || {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    };
    let span = (rows / 64).max(1);
    let first = next() % rows.saturating_sub(span).max(1);
    (0..n)
        .map(|_| ((first + next() % span) % rows) as u32)
        .collect()
}

async fn produce(p: &mut Producer, opts: &DemoOptions, shared: &Mutex<Shared>) {
    let batch_n = opts.batch_rows.max(1);
    let period = Duration::from_secs_f64(batch_n as f64 / opts.rate_rows_per_s.max(1) as f64);
    let values = vec![0.001f32; batch_n * opts.dim as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut due = tokio::time::Instant::now();
    for batch in 0u64.. {
        let rows = batch_rows(opts.rows, batch_n, &mut x);
        let frames = rows
            .iter()
            .filter_map(|r| actors::delta::slot_of_row(opts.rows, u64::from(*r)))
            .collect::<BTreeSet<_>>()
            .len();
        if let Ok(mut s) = shared.lock() {
            if s.outstanding.len() >= MAX_OUTSTANDING
                && let Some(oldest) = s.outstanding.keys().min().copied()
            {
                s.outstanding.remove(&oldest);
            }
            s.outstanding
                .insert(batch, (frames, rows.len() as u64, Instant::now()));
        }
        let trace = format!("d{batch}");
        match p.send_traced(&rows, &values, Some(&trace)).await {
            Ok(sent) => {
                if let Ok(mut s) = shared.lock() {
                    s.acked_rows += sent.rows;
                }
            }
            Err(e) => {
                if let Ok(mut s) = shared.lock() {
                    s.failures += 1;
                    s.last_error = Some(e.to_string());
                    // A failed send may be partly stored; it is not waited for.
                    s.outstanding.remove(&batch);
                }
            }
        }
        due += period;
        tokio::time::sleep_until(due).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_batches_stay_in_the_model_and_in_few_slots() {
        let mut x = 7;
        for rows in [100u64, 1 << 16, 3_000_001] {
            let batch = batch_rows(rows, 1_024, &mut x);
            assert_eq!(batch.len(), 1_024);
            assert!(batch.iter().all(|r| u64::from(*r) < rows));
            let slots: BTreeSet<_> = batch
                .iter()
                .filter_map(|r| actors::delta::slot_of_row(rows, u64::from(*r)))
                .collect();
            assert!(slots.len() <= 20, "{} slots", slots.len());
        }
    }
}
