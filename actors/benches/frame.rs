//! Frame decoding and checksum verification speed: `cargo bench -p actors --bench frame`.
//!
//! Encodes frames of 64 rows × dim 64 (16 KiB of values, as `tessel bench`'s delta workload
//! makes), then times decode + checksum verification, and a plain copy of the same
//! bytes (into a reused buffer) as the baseline. Prints bytes/s and the ratio.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Instant;

use actors::delta::{DeltaBatch, Hlc};
use actors::frame::{Frame, encode};

fn main() {
    let (rows, dim, frames) = (64u32, 64u32, 20_000usize);
    let encoded: Vec<Vec<u8>> = (0..frames)
        .map(|i| {
            let r: Vec<u32> = (0..rows).map(|k| k * 3 + i as u32 % 3).collect();
            let v: Vec<f32> = (0..rows * dim).map(|k| (k as f32) * 0.001).collect();
            let ts = Hlc {
                wall_ms: i as u64,
                logical: 0,
                node: 1,
            };
            encode("m", 0, &DeltaBatch::new(dim, r, v, ts, 0).unwrap()).unwrap()
        })
        .collect();
    let bytes: usize = encoded.iter().map(Vec::len).sum();
    for round in 0..3 {
        let t0 = Instant::now();
        let mut sum = 0.0f32;
        for b in &encoded {
            let f = Frame::decode(b).unwrap();
            assert!(f.verify());
            sum += f.values().next().unwrap_or(0.0);
        }
        let validate = bytes as f64 / t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut copy = vec![0u8; encoded[0].len()];
        let mut copied = 0usize;
        for b in &encoded {
            copy.copy_from_slice(b);
            copied += copy[copy.len() / 2] as usize;
        }
        let memcpy = bytes as f64 / t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut x = 0u64;
        for b in &encoded {
            let mut h = actors::delta::WordHash::new();
            h.le_bytes(b);
            x ^= h.finish();
        }
        let hash = bytes as f64 / t0.elapsed().as_secs_f64();
        println!(
            "round {round}: WordHash over the frame bytes {:.2} GB/s ({x:x})",
            hash / 1e9
        );
        println!(
            "round {round}: decode + verify {:.2} GB/s, copy {:.2} GB/s, ratio {:.2} ({sum} {copied})",
            validate / 1e9,
            memcpy / 1e9,
            validate / memcpy,
        );
    }
}
