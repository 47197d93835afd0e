//! `tessel bench`: runs the benchmarks and prints a table (and JSON with `--json FILE`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::bench::{self, BenchReport, BenchResult};

/// The groups, in the order the whole suite runs them.
const GROUPS: [&str; 5] = ["raw", "cluster", "actors", "deltas", "gpu"];

/// Arguments of `tessel bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Fewer trials, for a quick look.
    #[arg(long)]
    quick: bool,
    /// Trials per figure (default 20, or 5 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    trials: Option<u64>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only one group: `raw`, `cluster`, `actors`, `deltas` or `gpu` (the kernel
    /// benchmarks).
    #[arg(long, value_parser = GROUPS, conflicts_with = "group")]
    only: Option<String>,
    /// The same as `--only GROUP`: `tessel bench gpu`.
    #[arg(value_parser = GROUPS)]
    group: Option<String>,
    /// Worker threads of the delta replay figures (default: one per core, 2 to 8, as
    /// `tessel replay`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    replay_workers: Option<u64>,
    /// Where the temporary cluster keeps its data and logs.
    #[arg(long, default_value = ".tessel/bench")]
    dir: PathBuf,
}

/// Runs `tessel bench`.
pub fn run(args: BenchArgs) -> ExitCode {
    crate::cmd::node::init_tracing(crate::config::LogFormat::Text);
    let only = args.only.clone().or(args.group.clone());
    if only.as_deref() == Some("gpu") {
        return run_gpu(&args);
    }
    let trials = args.trials.unwrap_or(if args.quick { 5 } else { 20 }) as usize;
    let Some(rt) = crate::cmd::runtime("tessel bench") else {
        return ExitCode::FAILURE;
    };
    let result = rt.block_on(async {
        // The nodes run from this binary, or from `TESSEL_BENCH_NODE_BIN` (a wrapper around
        // it, such as a heap profiler's, for looking into a node under the same load).
        let bin = match std::env::var_os("TESSEL_BENCH_NODE_BIN") {
            Some(wrapper) => {
                let path = std::path::PathBuf::from(wrapper);
                anyhow::ensure!(
                    path.is_file(),
                    "TESSEL_BENCH_NODE_BIN={}: no such file",
                    path.display()
                );
                path
            }
            None => std::env::current_exe()?,
        };
        let dir = std::path::absolute(&args.dir)?.join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut results = Vec::new();
        let wants = |group: &str| only.as_deref().is_none_or(|o| o == group);
        let started = std::time::Instant::now();
        let total = if only.is_some() { 1 } else { GROUPS.len() };
        let mut done = 0usize;
        let mut step = |group: &str| {
            done += 1;
            eprintln!(
                "bench: [{}{}] {done}/{total} {group} (at {:.0} s)",
                "#".repeat(done),
                ".".repeat(total.saturating_sub(done)),
                started.elapsed().as_secs_f64()
            );
        };
        if wants("raw") {
            step("raw NATS baselines");
            results.extend(bench::raw(&bin, &dir.join("raw"), args.quick).await?);
        }
        if wants("cluster") {
            step("cluster: failover, handover, rebalance");
            results.extend(bench::cluster(&bin, &dir.join("cluster"), trials).await?);
        }
        if wants("actors") {
            step("actors: append, replay, ask, activation");
            results.extend(bench::actors(&bin, &dir.join("actors"), args.quick).await?);
        }
        if wants("deltas") {
            step("deltas: end to end, latency, replay, memory");
            let workers = args.replay_workers.map(|w| w as usize);
            results.extend(bench::deltas(&bin, &dir.join("deltas"), args.quick, workers).await?);
        }
        if only.is_none() {
            step("gpu: table kernels against memcpy");
        }
        // The run's NATS data can be large; logs stay only when a figure failed, or when
        // TESSEL_BENCH_KEEP is set.
        if std::env::var_os("TESSEL_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        anyhow::Ok(BenchReport {
            machine: machine_with_devices(),
            results,
        })
    });
    // The whole suite ends with the kernel figures (outside the runtime: they are CPU-bound).
    let result = result.map(|mut report| {
        if only.is_none() {
            let (results, skipped) = gpu_results(args.quick);
            report.results.extend(results);
            for s in skipped {
                eprintln!("bench: skipped: {s}");
            }
        }
        report
    });
    match result {
        Ok(report) => finish(&args, &report),
        Err(e) => {
            eprintln!("tessel bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the table and writes the JSON file when asked.
fn finish(args: &BenchArgs, report: &BenchReport) -> ExitCode {
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("tessel bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// `tessel bench gpu`: the kernel benchmarks of the `gpu` crate, in this process.
/// The kernel benchmarks of `gpu` as bench results, and the figures it skipped (with why).
fn gpu_results(quick: bool) -> (Vec<BenchResult>, Vec<String>) {
    let gpu_report = gpu::bench::run(gpu::bench::BenchConfig { quick });
    (gpu_report.rows, gpu_report.skipped)
}

/// The machine line, with the CUDA devices found.
fn machine_with_devices() -> String {
    let mut machine = bench::machine();
    for d in gpu::discover()
        .iter()
        .filter(|d| d.kind == gpu::DeviceKind::Cuda)
    {
        machine.push_str(&format!(", {}", d.name));
    }
    machine
}

fn run_gpu(args: &BenchArgs) -> ExitCode {
    let (results, skipped) = gpu_results(args.quick);
    let report = BenchReport {
        machine: machine_with_devices(),
        results,
    };
    let code = finish(args, &report);
    for s in &skipped {
        println!("skipped: {s}");
    }
    code
}
