//! `tessel devices`: the devices this process can hold tables in, as `gpu` discovers them.

use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

/// Arguments of `tessel devices`.
#[derive(Args, Debug)]
pub struct DevicesArgs {
    /// Print `{"devices": [...]}` as one JSON line.
    #[arg(long)]
    json: bool,
}

/// One device as `tessel devices --json` prints it.
#[derive(Serialize, Debug)]
struct DeviceJson {
    kind: &'static str,
    name: String,
    memory_total_bytes: u64,
    memory_free_bytes: u64,
    compute_capability: Option<String>,
}

#[derive(Serialize, Debug)]
struct DevicesJson {
    devices: Vec<DeviceJson>,
}

/// Runs `tessel devices`.
pub fn run(args: DevicesArgs) -> ExitCode {
    let (devices, reason) = gpu::discover_report();
    if args.json {
        let out = DevicesJson {
            devices: devices
                .iter()
                .map(|d| DeviceJson {
                    kind: d.kind.as_str(),
                    name: d.name.clone(),
                    memory_total_bytes: d.memory_total_bytes,
                    memory_free_bytes: d.memory_free_bytes,
                    compute_capability: d.compute_capability_string(),
                })
                .collect(),
        };
        match serde_json::to_string(&out) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("tessel devices: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<6} {:<40} {:>16} {:>16} {:>10}",
        "kind", "name", "memory total", "memory free", "capability"
    );
    for d in &devices {
        println!(
            "{:<6} {:<40} {:>16} {:>16} {:>10}",
            d.kind.as_str(),
            d.name,
            d.memory_total_bytes,
            d.memory_free_bytes,
            d.compute_capability_string().unwrap_or_else(|| "-".into())
        );
    }
    if let Some(reason) = reason {
        println!("CUDA not used: {reason}; tables live on the CPU.");
    }
    ExitCode::SUCCESS
}
