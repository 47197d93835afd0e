//! `tessel sim`: runs the deterministic simulator of `cluster` over many seeds, in parallel
//! threads, and prints a summary whose last line is machine-readable.

use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Args;
use cluster::core::PlantedBug;
use cluster::sim::{self, Report, SimConfig};

/// Arguments of `tessel sim`.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// Run this one seed and print its fault plan and log.
    #[arg(long, conflicts_with_all = ["seeds", "first_seed"])]
    seed: Option<u64>,
    /// How many seeds to run.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    seeds: u64,
    /// The first seed of the range.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Nodes per run.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Steps of the fault phase per run.
    #[arg(long, default_value_t = 1_000)]
    steps: u64,
    /// Most steps after healing for the cluster to settle.
    #[arg(long, default_value_t = 6_000)]
    heal_steps: u64,
    /// Plant a known bug (stale-leader-write, place-on-failed, renew-without-cas); needs a build
    /// with the `planted-bugs` feature.
    #[arg(long)]
    plant: Option<String>,
    /// Run each seed twice and fail if the two traces differ.
    #[arg(long)]
    check_determinism: bool,
    /// Stop at the first failing seed.
    #[arg(long)]
    stop_on_failure: bool,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// End with one JSON object instead of the text summary.
    #[arg(long)]
    json: bool,
    /// With --seed: log every command, event and action of the run.
    #[arg(long, requires = "seed")]
    verbose: bool,
}

/// Runs the simulator and returns the exit code: 0 when no seed broke anything.
pub fn run(args: SimArgs) -> ExitCode {
    let plant = match args.plant.as_deref().map(|n| (n, PlantedBug::parse(n))) {
        None => None,
        Some((_, Some(bug))) => Some(bug),
        Some((name, None)) => {
            eprintln!(
                "tessel sim: unknown planted bug {name:?}; known: stale-leader-write, place-on-failed, renew-without-cas"
            );
            return ExitCode::from(2);
        }
    };
    let (first, count) = match args.seed {
        Some(s) => (s, 1),
        None => (args.first_seed, args.seeds),
    };
    let base = SimConfig {
        seed: 0,
        nodes: args.nodes,
        steps: args.steps,
        heal_steps: args.heal_steps,
        plant,
        verbose: args.verbose,
    };
    // Validate once up front so a bad argument is one clear error, not one per seed.
    if let Err(e) = sim::run(&SimConfig {
        steps: 1,
        heal_steps: 0,
        ..base.clone()
    }) {
        eprintln!("tessel sim: {e}");
        return ExitCode::from(2);
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, 64);
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let failures: Mutex<Vec<Report>> = Mutex::new(Vec::new());
    let nondeterministic: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let steps = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let single = args.seed.is_some();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= count {
                        break;
                    }
                    let seed = first + k;
                    let cfg = SimConfig {
                        seed,
                        ..base.clone()
                    };
                    let Ok(report) = sim::run(&cfg) else { break };
                    steps.fetch_add(report.steps, Ordering::Relaxed);
                    if args.check_determinism
                        && let Ok(again) = sim::run(&cfg)
                        && again != report
                        && let Ok(mut n) = nondeterministic.lock()
                    {
                        n.push(seed);
                    }
                    if single {
                        print_single(&report);
                    }
                    if !report.violations.is_empty() {
                        if args.stop_on_failure {
                            stop.store(true, Ordering::Relaxed);
                        }
                        if let Ok(mut f) = failures.lock() {
                            f.push(report);
                        }
                    }
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if !args.json && !single && d.is_multiple_of(1000) {
                        eprintln!(
                            "sim: {d}/{count} seeds, {:.1}s",
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap_or_default();
    failures.sort_by_key(|r| r.seed);
    let nondeterministic = nondeterministic.into_inner().unwrap_or_default();
    let seeds_run = done.load(Ordering::Relaxed);
    let steps = steps.load(Ordering::Relaxed);
    let violations: usize = failures.iter().map(|r| r.violations.len()).sum();
    let secs = started.elapsed().as_secs_f64();
    for r in &failures {
        println!("seed {} FAILED:", r.seed);
        for v in r.violations.iter().take(5) {
            println!("  {v}");
        }
        println!(
            "reproduce with: tessel sim --seed {}{}",
            r.seed,
            plant_flag(plant)
        );
    }
    for s in &nondeterministic {
        println!("seed {s} is not deterministic: two runs differ");
        println!(
            "reproduce with: tessel sim --seed {s} --check-determinism{}",
            plant_flag(plant)
        );
    }
    if args.json {
        let first_failing = failures.first().map(|r| r.seed);
        println!(
            "{}",
            serde_json::json!({
                "seeds": seeds_run,
                "steps": steps,
                "violations": violations,
                "failing_seeds": failures.iter().map(|r| r.seed).collect::<Vec<_>>(),
                "first_failing_seed": first_failing,
                "nondeterministic_seeds": nondeterministic,
                "seconds": (secs * 1000.0).round() / 1000.0,
                "plant": plant.map(PlantedBug::name),
            })
        );
    } else {
        eprintln!(
            "sim: {:.2}s, {:.0} steps/s on {threads} threads",
            secs,
            steps as f64 / secs.max(1e-9)
        );
        println!("sim: {seeds_run} seeds, {steps} steps, {violations} violations");
    }
    if violations > 0 || !nondeterministic.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn plant_flag(plant: Option<PlantedBug>) -> String {
    plant
        .map(|p| format!(" --plant {}", p.name()))
        .unwrap_or_default()
}

fn print_single(r: &Report) {
    print!("{}", sim::describe(r));
    for line in &r.log {
        println!("  {line}");
    }
    match r.settled_after {
        Some(n) => println!(
            "settled {n} steps after healing; {} faults, {} refused commands",
            r.faults, r.rejections
        ),
        None => println!(
            "did not settle; {} faults, {} refused commands",
            r.faults, r.rejections
        ),
    }
    for v in &r.violations {
        println!("VIOLATION {v}");
    }
    println!(
        "trace {:016x}, {} steps, {} simulated ms",
        r.trace, r.steps, r.sim_ms
    );
}
