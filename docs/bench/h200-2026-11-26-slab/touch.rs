use std::time::Instant;
const MIB: usize = 1 << 20;
fn many(per: usize, n: usize) -> Vec<Vec<f32>> {
    (0..n).map(|_| vec![0f32; per / 4]).collect::<Vec<_>>().into_iter().map(|mut v| { v.resize(per/4, 0.0); v }).collect()
}
fn many_write(per: usize, n: usize) -> Vec<Vec<f32>> {
    (0..n).map(|_| { let mut v = Vec::with_capacity(per/4); v.resize(per/4, 0.0f32); std::hint::black_box(&mut v); v }).collect()
}
fn region(bytes: usize, huge: bool) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(bytes / 4);
    if huge {
        let start = v.as_mut_ptr() as usize;
        let a = start.next_multiple_of(2 * MIB);
        let e = (start + bytes) / (2 * MIB) * (2 * MIB);
        unsafe { libc::madvise(a as *mut _, e - a, libc::MADV_HUGEPAGE) };
    }
    v.resize(bytes / 4, 0.0);
    std::hint::black_box(&mut v);
    v
}
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args[1].as_str();
    let threads: usize = args[2].parse().unwrap();
    let total = 1usize << 30;
    let t0 = Instant::now();
    let hs: Vec<_> = (0..threads).map(|_| {
        let mode = mode.to_string();
        std::thread::spawn(move || {
            let share = total / threads;
            match mode.as_str() {
                "small" => Box::new(many_write(MIB, share / MIB)) as Box<dyn std::any::Any + Send>,
                "calloc" => Box::new(many(MIB, share / MIB)),
                "region" => Box::new(region(share, false)),
                "huge" => Box::new(region(share, true)),
                _ => Box::new(0u8),
            }
        })
    }).collect();
    // keep results alive until timing ends
    let kept: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let n = kept.len();
    let s = t0.elapsed().as_secs_f64();
    println!("{mode:7} threads {threads}: {:.2} GB/s ({:.3} s) n={n}", total as f64 / s / 1e9, s);
}
