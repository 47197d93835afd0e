//! The kernel benchmarks of `gpu::bench`, printed: `cargo bench -p gpu --bench apply`
//! (add `--features cuda` on a machine with a CUDA device; `-- --quick` for smaller sizes).
//!
//! CPU twin: a 2,000,000 × 64 f32 table (512 MB); distinct batches of 65,536 random rows. Apply
//! moves, per row, the row in and out of the table plus the delta in: 3 × 256 bytes. The
//! baseline is a memcpy as large as the table (read + write), in bytes per second, measured in
//! the same run (rounds interleave the two; best round each).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let report = gpu::bench::run(gpu::bench::BenchConfig { quick });
    for r in &report.rows {
        match (&r.baseline, r.ratio) {
            (Some(b), Some(ratio)) => println!(
                "{}: {:.2} {} ({:.0}% of {b})",
                r.name,
                r.value,
                r.unit,
                100.0 * ratio
            ),
            _ => println!("{}: {:.2} {}", r.name, r.value, r.unit),
        }
    }
    for s in &report.skipped {
        println!("skipped: {s}");
    }
}
