//! `tessel bench`: runs the benchmarks and prints a table (and JSON with `--json FILE`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::bench::{self, BenchReport};

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
    /// Run only one group: `cluster`, `actors` or `gpu` (the kernel benchmarks of `gpu`).
    #[arg(long, value_parser = ["cluster", "actors", "gpu"], conflicts_with = "group")]
    only: Option<String>,
    /// The same as `--only GROUP`: `tessel bench gpu`.
    #[arg(value_parser = ["cluster", "actors", "gpu"])]
    group: Option<String>,
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
        let bin = std::env::current_exe()?;
        let dir = std::path::absolute(&args.dir)?.join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut results = Vec::new();
        if only.as_deref() != Some("actors") {
            results.extend(bench::cluster(&bin, &dir.join("cluster"), trials).await?);
        }
        if only.as_deref() != Some("cluster") {
            results.extend(bench::actors(&bin, &dir.join("actors"), args.quick).await?);
        }
        anyhow::Ok(BenchReport {
            machine: bench::machine(),
            results,
        })
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
fn run_gpu(args: &BenchArgs) -> ExitCode {
    let gpu_report = gpu::bench::run(gpu::bench::BenchConfig { quick: args.quick });
    let devices = gpu::discover();
    let mut machine = bench::machine();
    for d in devices.iter().filter(|d| d.kind == gpu::DeviceKind::Cuda) {
        machine.push_str(&format!(", {}", d.name));
    }
    let report = BenchReport {
        machine,
        results: gpu_report
            .rows
            .into_iter()
            .map(|r| crate::bench::BenchResult {
                name: r.name,
                value: r.value,
                unit: r.unit,
                baseline: r.baseline,
                baseline_value: r.baseline_value,
                ratio: r.ratio,
            })
            .collect(),
    };
    let code = finish(args, &report);
    for s in &gpu_report.skipped {
        println!("skipped: {s}");
    }
    code
}
