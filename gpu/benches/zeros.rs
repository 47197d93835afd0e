//! Making fresh zero tables: `cargo bench -p gpu --bench zeros -- MODE THREADS`, one mode per
//! process (the pages a run frees would make the next one's memory not fresh).
//!
//! 1 GiB as 1,024 slot tables of 4,096 rows × 64 f32 (1 MiB each, the slots of a 4M-row
//! model), split evenly over THREADS threads, each thread making its share:
//! - `alone`: each table by `Table::zeros` (a vector of its own, 4 KiB pages);
//! - `slabs`: by `Table::try_zeros_many` (cut from 32 MiB slabs advised for huge pages).
//!
//! Prints GB/s of tables made, timed until every thread is done (the tables are kept until
//! then).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Instant;

use gpu::cpu::Table;

const TABLES: u64 = 1_024;
const ROWS: u64 = 4_096;
const DIM: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mode = args.first().map_or("slabs", String::as_str).to_string();
    let threads: u64 = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(1).max(1);
    let t0 = Instant::now();
    let made: Vec<Vec<Table>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mode = mode.as_str();
                s.spawn(move || {
                    let ranges: Vec<_> = (0..TABLES)
                        .filter(|k| k % threads == t)
                        .map(|k| k * ROWS..(k + 1) * ROWS)
                        .collect();
                    match mode {
                        "alone" => ranges.into_iter().map(|r| Table::zeros(r, DIM)).collect(),
                        _ => Table::try_zeros_many(&ranges, DIM).unwrap(),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let bytes = (TABLES * ROWS) as f64 * DIM as f64 * 4.0;
    let tables: usize = made.iter().map(Vec::len).sum();
    assert_eq!(tables as u64, TABLES);
    println!(
        "{mode} with {threads} thread(s): {:.2} GB/s ({secs:.3} s for {tables} tables)",
        bytes / secs / 1e9
    );
}
