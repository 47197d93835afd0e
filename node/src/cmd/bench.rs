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
    /// Run only one group: `cluster`, `actors` or `deltas`.
    #[arg(long, value_parser = ["cluster", "actors", "deltas"])]
    only: Option<String>,
    /// Where the temporary cluster keeps its data and logs.
    #[arg(long, default_value = ".tessel/bench")]
    dir: PathBuf,
}

/// Runs `tessel bench`.
pub fn run(args: BenchArgs) -> ExitCode {
    crate::cmd::node::init_tracing(crate::config::LogFormat::Text);
    let trials = args.trials.unwrap_or(if args.quick { 5 } else { 20 }) as usize;
    let Some(rt) = crate::cmd::runtime("tessel bench") else {
        return ExitCode::FAILURE;
    };
    let result = rt.block_on(async {
        let bin = std::env::current_exe()?;
        let dir = std::path::absolute(&args.dir)?.join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut results = Vec::new();
        let wants = |group: &str| args.only.as_deref().is_none_or(|o| o == group);
        if wants("cluster") {
            results.extend(bench::cluster(&bin, &dir.join("cluster"), trials).await?);
        }
        if wants("actors") {
            results.extend(bench::actors(&bin, &dir.join("actors"), args.quick).await?);
        }
        if wants("deltas") {
            results.extend(bench::deltas(&bin, &dir.join("deltas"), args.quick).await?);
        }
        anyhow::Ok(BenchReport {
            machine: bench::machine(),
            results,
        })
    });
    match result {
        Ok(report) => {
            print!("{}", report.table());
            if let Some(path) = &args.json {
                let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("tessel bench: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessel bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
