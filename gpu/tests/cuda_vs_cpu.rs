//! The CUDA table against the CPU twin on random batches, and the fallbacks that run anywhere.
//!
//! Agreement: exact (bit for bit), also where a batch repeats rows: the CUDA kernel adds each
//! row's updates one after another in batch order, the same IEEE f32 additions in the same
//! order as the CPU twin (no atomics).
//!
//! The CUDA tests print `skipped: …` and pass when this machine has no CUDA device (or the crate
//! was built without `cuda`); `scripts/gpu-check.sh` runs them on a GPU machine.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use gpu::{Device, DeviceKind, Error, Table, TableConfig};

fn cuda_device() -> Option<Device> {
    let (devices, reason) = gpu::discover_report();
    let found = devices.into_iter().find(|d| d.kind == DeviceKind::Cuda);
    if found.is_none() {
        eprintln!(
            "skipped: no CUDA device ({})",
            reason.unwrap_or_else(|| "none found".into())
        );
    }
    found
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn value(&mut self) -> f32 {
        (self.below(2_000_001) as f32 - 1_000_000.0) / 1_000_000.0
    }
}

fn config(max_batch_rows: usize) -> TableConfig {
    TableConfig {
        cpu_threads: 2,
        max_batch_rows,
    }
}

/// A CPU and a CUDA table with the same random contents.
fn pair(device: &Device, rows: std::ops::Range<u64>, dim: usize, rng: &mut Rng) -> (Table, Table) {
    let n = (rows.end - rows.start) as usize * dim;
    let init: Vec<f32> = (0..n).map(|_| rng.value()).collect();
    let mut cpu = Table::create(&gpu::cpu_device(), rows.clone(), dim, config(1 << 16)).unwrap();
    let mut cuda = Table::create(device, rows, dim, config(1 << 16)).unwrap();
    cpu.load(&init).unwrap();
    cuda.load(&init).unwrap();
    assert_eq!(
        cuda.export().unwrap(),
        init,
        "load then export is the identity"
    );
    (cpu, cuda)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn unique_rows_agree_exactly() {
    let Some(device) = cuda_device() else { return };
    for (seed, dim) in [(1u64, 128usize), (2, 33), (3, 1), (4, 300)] {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        let (first, len) = (5_000u64, 20_000u64);
        let (mut cpu, mut cuda) = pair(&device, first..first + len, dim, &mut rng);
        for _ in 0..5 {
            // A random subset of rows, each once, in random order.
            let mut rows: Vec<u32> = (first as u32..(first + len) as u32)
                .filter(|_| rng.below(3) == 0)
                .collect();
            for i in (1..rows.len()).rev() {
                rows.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let values: Vec<f32> = (0..rows.len() * dim).map(|_| rng.value()).collect();
            cpu.apply(&rows, &values).unwrap();
            cuda.apply(&rows, &values).unwrap();
        }
        assert_eq!(
            bits(&cuda.export().unwrap()),
            bits(&cpu.export().unwrap()),
            "seed {seed} dim {dim}"
        );
        let probe: Vec<u32> = (0..1_000)
            .map(|_| (first + rng.below(len)) as u32)
            .collect();
        assert_eq!(
            bits(&cuda.gather(&probe).unwrap()),
            bits(&cpu.gather(&probe).unwrap())
        );
    }
}

#[test]
fn repeated_rows_agree_exactly() {
    let Some(device) = cuda_device() else { return };
    let dim = 64;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut cpu, mut cuda) = pair(&device, 0..2_000, dim, &mut rng);
    let batches: Vec<(Vec<u32>, Vec<f32>)> = (0..6)
        .map(|_| {
            // 10,000 updates on 2,000 rows: every row about five times per batch.
            let rows: Vec<u32> = (0..10_000).map(|_| rng.below(2_000) as u32).collect();
            let values = (0..rows.len() * dim).map(|_| rng.value()).collect();
            (rows, values)
        })
        .collect();
    let list: Vec<(&[u32], &[f32])> = batches
        .iter()
        .map(|(r, v)| (r.as_slice(), v.as_slice()))
        .collect();
    cpu.apply_many(&list).unwrap();
    cuda.apply_many(&list).unwrap();
    let (a, b) = (cpu.export().unwrap(), cuda.export().unwrap());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "value {i}: cpu {x} cuda {y}");
    }
}

#[test]
fn bad_input_leaves_a_cuda_table_unchanged_and_the_fault_switch_works() {
    let Some(device) = cuda_device() else { return };
    let mut rng = Rng(7);
    let (_, mut t) = pair(&device, 100..200, 8, &mut rng);
    let before = t.export().unwrap();
    assert!(matches!(
        t.apply(&[200], &[0.5; 8]),
        Err(Error::Row { row: 200, .. })
    ));
    assert!(matches!(
        t.apply(&[150], &[0.5; 7]),
        Err(Error::Shape { .. })
    ));
    let big: Vec<u32> = vec![150; (1 << 16) + 1];
    let big_values = vec![0.5; big.len() * 8];
    assert!(matches!(
        t.apply(&big, &big_values),
        Err(Error::BatchTooLarge {
            max_rows: 65_536,
            ..
        })
    ));
    assert!(matches!(t.gather(&[99]), Err(Error::Row { .. })));
    assert!(matches!(t.load(&[0.0; 3]), Err(Error::Shape { .. })));
    assert_eq!(t.export().unwrap(), before);
    t.inject_device_lost();
    assert_eq!(t.apply(&[150], &[0.5; 8]), Err(Error::DeviceLost));
    assert_eq!(t.export(), Err(Error::DeviceLost));
}

#[test]
fn an_oversized_cuda_table_is_out_of_memory() {
    let Some(device) = cuda_device() else { return };
    // Twice the device's memory cannot be allocated.
    let rows = device.memory_total_bytes / 4 / 64 * 2;
    let r = Table::create(&device, 0..rows, 64, config(1024));
    assert!(matches!(r, Err(Error::OutOfMemory { .. })), "{r:?}");
}

#[test]
fn discovery_without_a_device_is_the_cpu_and_a_reason() {
    let (devices, reason) = gpu::discover_report();
    assert_eq!(devices[0].kind, DeviceKind::Cpu);
    if devices.len() > 1 {
        eprintln!("skipped: a CUDA device is present");
        assert!(reason.is_none());
        return;
    }
    let reason = reason.expect("a reason when CUDA is not used");
    if cfg!(feature = "cuda") {
        assert!(!reason.contains("without the `cuda` feature"), "{reason}");
    } else {
        assert!(reason.contains("without the `cuda` feature"), "{reason}");
    }
    // Discovery twice gives the same answer (and never panics).
    assert_eq!(gpu::discover().len(), 1);
}

#[test]
fn a_cuda_table_without_a_device_is_a_typed_error() {
    if gpu::discover().len() > 1 {
        eprintln!("skipped: a CUDA device is present");
        return;
    }
    let fake = Device {
        kind: DeviceKind::Cuda,
        ordinal: 0,
        name: "absent".into(),
        memory_total_bytes: 1 << 30,
        memory_free_bytes: 1 << 30,
        compute_capability: Some((9, 0)),
    };
    match Table::create(&fake, 0..10, 4, config(16)) {
        Err(Error::Unavailable(reason)) => assert!(!reason.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_cpu_twin_is_deterministic_across_thread_counts() {
    let mut rng = Rng(42);
    let (first, len, dim) = (1_000u64, 9_999u64, 12usize);
    let rows: Vec<u32> = (0..50_000)
        .map(|_| (first + rng.below(len)) as u32)
        .collect();
    let values: Vec<f32> = (0..rows.len() * dim).map(|_| rng.value()).collect();
    let mut reference = None;
    for threads in [1, 2, 3, 7, 16] {
        let mut t = Table::create(
            &gpu::cpu_device(),
            first..first + len,
            dim,
            TableConfig {
                cpu_threads: threads,
                max_batch_rows: 1 << 20,
            },
        )
        .unwrap();
        t.apply(&rows, &values).unwrap();
        let out = bits(&t.export().unwrap());
        match &reference {
            None => reference = Some(out),
            Some(r) => assert_eq!(&out, r, "{threads} threads"),
        }
    }
}
