//! `tessel status`: the cluster's state read straight from its buckets.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::config::{NodeConfig, split_urls, validate_cluster_name};
use crate::connect::connect;
use crate::metrics::Metrics;

/// Arguments of `tessel status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// NATS server URLs, comma-separated.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The cluster name.
    #[arg(long, default_value = "tessel")]
    cluster: String,
    /// A node configuration file to take credentials and TLS settings from.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs `tessel status`.
pub fn run(args: StatusArgs) -> ExitCode {
    let mut cfg = match &args.config {
        Some(p) => match NodeConfig::from_file(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tessel status: {e}");
                return ExitCode::from(2);
            }
        },
        None => NodeConfig::default(),
    };
    // Credentials and TLS may also come from the TESSEL_* variables a node reads.
    if let Err(e) = cfg.apply_env(|k| std::env::var(k).ok()) {
        eprintln!("tessel status: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = validate_cluster_name(&args.cluster) {
        eprintln!("tessel status: {e}");
        return ExitCode::from(2);
    }
    cfg.nats_urls = split_urls(&args.nats);
    cfg.cluster = args.cluster.clone();
    cfg.connect_retry_for_ms = 3_000;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tessel status: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let client = match connect(&cfg, "tessel-status", Arc::new(Metrics::default())).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tessel status: {e}");
                return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1));
            }
        };
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client);
        match crate::status::read(&js, &cfg.cluster).await {
            Ok(s) => {
                if args.json {
                    println!("{}", serde_json::to_string(&s).unwrap_or_default());
                } else {
                    print!("{}", s.table());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "tessel status: {e} (is a node of cluster {:?} running?)",
                    cfg.cluster
                );
                ExitCode::FAILURE
            }
        }
    })
}
