//! CPU apply against memory bandwidth, measured in the same run:
//! `cargo bench -p gpu --bench apply`.
//!
//! A 1,000,000 × 64 f32 table (256 MB); batches of 65,536 random rows. Apply moves, per row,
//! the row in and out of the table plus the delta in: 3 × 256 bytes. The baseline is a large
//! memcpy (read + write), in bytes per second.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Instant;

use gpu::cpu::Table;

fn main() {
    let (rows, dim, batch) = (1_000_000u64, 64usize, 65_536usize);
    let mut t = Table::zeros(0..rows, dim);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let ids: Vec<u32> = (0..batch)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % rows) as u32
        })
        .collect();
    let values: Vec<f32> = (0..batch * dim).map(|i| (i % 13) as f32 * 1e-3).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    // memcpy baseline: 256 MB, best of 5.
    let src = vec![1u8; (rows as usize) * dim * 4];
    let mut dst = vec![0u8; src.len()];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        dst.copy_from_slice(black_box(&src));
        best = best.min(t0.elapsed().as_secs_f64());
        black_box(&dst);
    }
    let memcpy = 2.0 * src.len() as f64 / best; // read + write
    println!("memcpy: {:.2} GB/s (read + write)", memcpy / 1e9);

    for th in [1, threads] {
        let reps = 20;
        let t0 = Instant::now();
        for _ in 0..reps {
            t.apply(black_box(&ids), black_box(&values), th).unwrap();
        }
        let secs = t0.elapsed().as_secs_f64();
        let rows_s = (reps * batch) as f64 / secs;
        let bytes_s = rows_s * (3 * dim * 4) as f64;
        println!(
            "apply ({th} thread(s)): {:.2} M rows/s, {:.2} GB/s moved, {:.0}% of memcpy",
            rows_s / 1e6,
            bytes_s / 1e9,
            100.0 * bytes_s / memcpy
        );
    }
    let resident = t.data().len() * 4;
    println!(
        "table: {} bytes for {rows} × {dim} f32 ({:.3} × R × D × 4)",
        resident,
        resident as f64 / (rows as f64 * dim as f64 * 4.0)
    );
}
