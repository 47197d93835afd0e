//! Kernel benchmarks, each figure with the limit it is measured against in the same run:
//! the CPU twin's apply against a large host memcpy; with a CUDA device, the scatter-add of
//! batches of 1M rows at dim 128 against a device-to-device memcpy, and the host-to-device feed
//! of delta batches against a pinned memcpy of the same size. `tessel bench gpu` and
//! `cargo bench -p gpu --bench apply` print them.
//!
//! Byte accounting (effective bytes): an applied row moves its delta in, and its table row in
//! and out, so `3 × dim × 4` bytes (plus 4 for the row id on a device); a memcpy of `n` bytes
//! moves `2n` (read + write).

use std::hint::black_box;
use std::time::Instant;

use crate::cpu;

/// One measured figure.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BenchRow {
    /// What was measured.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// What it is compared with: a limit measured in the same run, or a floor such as a
    /// timeout.
    pub baseline: Option<String>,
    /// The baseline's figure, in the same unit.
    pub baseline_value: Option<f64>,
    /// `value / baseline_value` (absent without a baseline or with a zero one).
    pub ratio: Option<f64>,
}

impl BenchRow {
    /// Builds the figure `value` (in `unit`) named `name`, with its ratio to `baseline` (the
    /// baseline's name and figure) when there is one.
    pub fn new(name: &str, value: f64, unit: &str, baseline: Option<(&str, f64)>) -> Self {
        BenchRow {
            name: name.into(),
            value,
            unit: unit.into(),
            baseline: baseline.map(|(b, _)| b.to_string()),
            baseline_value: baseline.map(|(_, v)| v),
            ratio: baseline.and_then(|(_, v)| (v != 0.0).then(|| value / v)),
        }
    }
}

/// The figures of one run and the benchmarks that could not run, with why.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BenchReport {
    /// Measured figures.
    pub rows: Vec<BenchRow>,
    /// `name: reason` of each benchmark skipped.
    pub skipped: Vec<String>,
}

/// Sizes of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchConfig {
    /// Smaller tables and fewer repetitions.
    pub quick: bool,
}

/// Runs every benchmark this build and machine can run.
pub fn run(cfg: BenchConfig) -> BenchReport {
    let mut report = BenchReport {
        rows: cpu_apply(cfg),
        skipped: Vec::new(),
    };
    cuda_rows(cfg, &mut report);
    report
}

#[cfg(feature = "cuda")]
fn cuda_rows(cfg: BenchConfig, report: &mut BenchReport) {
    let (devices, reason) = crate::discover_report();
    match devices.iter().find(|d| d.kind == crate::DeviceKind::Cuda) {
        Some(device) => match crate::cuda::bench(device, cfg) {
            Ok(rows) => report.rows.extend(rows),
            Err(e) => report.skipped.push(format!("cuda: {e}")),
        },
        None => report.skipped.push(format!(
            "cuda scatter-add and feed: {}",
            reason.unwrap_or_else(|| "no CUDA device".into())
        )),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_rows(_cfg: BenchConfig, report: &mut BenchReport) {
    report
        .skipped
        .push("cuda scatter-add and feed: built without the `cuda` feature".into());
}

/// A deterministic xorshift stream of row ids below `rows`.
pub(crate) fn random_rows(n: usize, rows: u64, seed: u64) -> Vec<u32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % rows) as u32
        })
        .collect()
}

/// The CPU twin's apply (1 thread and all threads) against a large host memcpy.
///
/// A 2,000,000 × 64 f32 table (512 MB, larger than the 480 MiB L3 of the development machine;
/// 250,000 rows with `quick`) and batches of 65,536 random rows. The memcpy copies a buffer as
/// large as the table. Seven rounds (three with `quick`), each timing one memcpy and then five
/// distinct batches per thread count; the best round of each.
pub fn cpu_apply(cfg: BenchConfig) -> Vec<BenchRow> {
    let (rows, dim, batch) = (
        if cfg.quick { 250_000u64 } else { 2_000_000 },
        64usize,
        65_536usize,
    );
    let (rounds, reps) = if cfg.quick { (3, 2) } else { (7, 5) };
    let mut t = cpu::Table::zeros(0..rows, dim);
    // A round's batches are distinct (rows and values), so no batch finds the previous one's
    // rows or values in cache.
    let ids: Vec<Vec<u32>> = (0..reps as u64)
        .map(|k| random_rows(batch, rows, 0x9e37_79b9_7f4a_7c15 + k))
        .collect();
    let values: Vec<Vec<f32>> = (0..reps)
        .map(|k| {
            (0..batch * dim)
                .map(|i| ((i + k) % 13) as f32 * 1e-3)
                .collect()
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    // Touch every page of the table first, so no timed batch pays for first-touch faults.
    let all: Vec<u32> = (0..rows as u32).collect();
    let zeros = vec![0f32; batch * dim];
    for part in all.chunks(batch) {
        t.apply(part, &zeros[..part.len() * dim], 1)
            .unwrap_or_default();
    }

    let src = vec![1u8; (rows as usize) * dim * 4];
    let mut dst = vec![0u8; src.len()];
    let mut counts = vec![1];
    if threads > 1 {
        counts.push(threads);
    }
    // Rounds interleave the memcpy and each apply, so a noisy neighbour slows both alike; each
    // figure is the best round. A round applies `reps` batches.
    // The memcpy runs on as many threads as each apply, so that an apply on every core is
    // compared with the bandwidth every core gets, not with one thread's.
    let mut best_memcpy = vec![f64::MAX; counts.len()];
    let mut best_apply = vec![f64::MAX; counts.len()];
    for _ in 0..rounds {
        for (k, &th) in counts.iter().enumerate() {
            let t0 = Instant::now();
            parallel_memcpy(&mut dst, black_box(&src), th);
            best_memcpy[k] = best_memcpy[k].min(t0.elapsed().as_secs_f64());
            black_box(&dst);
        }
        for (k, &th) in counts.iter().enumerate() {
            let t0 = Instant::now();
            for (ids, values) in ids.iter().zip(&values) {
                t.apply(black_box(ids), black_box(values), th)
                    .unwrap_or_default();
            }
            best_apply[k] = best_apply[k].min(t0.elapsed().as_secs_f64());
        }
    }
    let mut out = Vec::new();
    for (k, th) in counts.into_iter().enumerate() {
        let memcpy = 2.0 * src.len() as f64 / best_memcpy[k] / 1e9;
        // One thread's row keeps its old name, which earlier figures were reported under.
        let copy = if th == 1 {
            "host memcpy (read + write)".to_string()
        } else {
            format!("host memcpy, {th} threads (read + write)")
        };
        out.push(BenchRow::new(&copy, memcpy, "GB/s", None));
        let bytes_s = (reps * batch * 3 * dim * 4) as f64 / best_apply[k] / 1e9;
        let baseline = if th == 1 {
            "host memcpy"
        } else {
            "host memcpy, same threads"
        };
        out.push(BenchRow::new(
            &format!("cpu twin apply, {th} thread(s)"),
            bytes_s,
            "GB/s",
            Some((baseline, memcpy)),
        ));
    }
    black_box(t.data().first());
    out
}

/// `dst.copy_from_slice(src)` split into `threads` contiguous parts, one per thread.
fn parallel_memcpy(dst: &mut [u8], src: &[u8], threads: usize) {
    if threads <= 1 {
        dst.copy_from_slice(src);
        return;
    }
    let per = src.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (d, c) in dst.chunks_mut(per).zip(src.chunks(per)) {
            s.spawn(move || d.copy_from_slice(c));
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_report_names_what_it_skipped_or_measured() {
        let report = super::run(super::BenchConfig { quick: true });
        assert!(report.rows.len() >= 2);
        assert!(report.rows.iter().all(|r| r.value > 0.0));
        let cuda_measured = report.rows.iter().any(|r| r.name.starts_with("cuda"));
        assert!(cuda_measured || !report.skipped.is_empty());
    }
}
