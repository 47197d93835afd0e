//! `tessel replay`: rebuilds a model's tables offline from checkpoints and the stream (a
//! branch: from its parent's state at the fork point, then its own stream), up to a stream
//! sequence or a point in time, and with `--verify` compares every slot with the live cluster
//! at the live position.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use actors::delta::slot_rows;
use clap::Args;
use cluster::Slot;
use futures::StreamExt as _;
use serde_json::json;

use crate::cmd::actor::Target;
use crate::deltas::{
    SlotModel, SlotModelConfig, data_checksum, ensure, lineage, replay_model, replay_workers,
    seq_at_time, slot_checksum,
};
use crate::metrics::Metrics;

/// Checksum reads `--verify` keeps in flight: enough to hide the round trips, few enough that
/// the owners' slots (each hashes its table as it answers) keep applying meanwhile.
const VERIFY_READS_IN_FLIGHT: usize = 16;

/// How long `--verify` waits for one slot's checksum, asking again while the slot moves or
/// catches up.
const VERIFY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `tessel replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    target: Target,
    /// The model.
    #[arg(long)]
    model: String,
    /// Replay up to this stream sequence (default: everything).
    #[arg(long, conflicts_with_all = ["to_time", "verify"])]
    to_seq: Option<u64>,
    /// Replay the deltas the server stored at or before this time (RFC 3339 or unix ms): the
    /// first delta whose stream timestamp is after it, and everything after that, is left out.
    #[arg(long, conflicts_with = "verify", value_parser = crate::progress::parse_time_ns)]
    to_time: Option<i128>,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
    /// Write the rebuilt table here (little-endian f32, row-major, all rows).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Compare each slot with the live owner's table at the owner's position, by checksum
    /// (each owner hashes its own table).
    #[arg(long)]
    verify: bool,
    /// One JSON object at the end.
    #[arg(long)]
    json: bool,
    /// Threads that validate and apply (each takes a share of the slots; default one per
    /// core, 2 to 8).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: Option<u16>,
}

/// Runs `tessel replay`.
pub fn run(args: ReplayArgs) -> ExitCode {
    let Some(rt) = crate::cmd::runtime("tessel replay") else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async {
        let (client, rows, dim) = match crate::cmd::produce::connect_to_model(&args.target, "tessel replay", &args.model).await {
            Ok(v) => v,
            Err(c) => return c,
        };
        let js = async_nats::jetstream::new(client.clone());
        let actors = crate::client::ActorClient::new(client.clone(), &args.target.cluster);
        let line = match lineage(&actors, &args.model).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tessel replay: {e}");
                return ExitCode::FAILURE;
            }
        };
        // A point in time becomes the last stream sequence stored at or before it.
        let to_seq = match args.to_time {
            Some(t) => match seq_at_time(&js, &args.target.cluster, t).await {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("tessel replay: --to-time: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => args.to_seq,
        };
        let checkpoints = match ensure(&js, &args.target.cluster, 1).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tessel replay: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut out = match &args.out {
            Some(p) => match std::fs::File::create(p) {
                Ok(f) => Some((p, std::io::BufWriter::new(f))),
                Err(e) => {
                    eprintln!("tessel replay: {}: {e}", p.display());
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        // The live checksums and positions first (with --verify), then one pass over the
        // stream. Each owner hashes its own table: nothing of the tables crosses the network.
        let mut live = std::collections::BTreeMap::new();
        if args.verify {
            let slots = Slot::all().filter(|&s| !slot_rows(rows, s).is_empty());
            let mut asks = futures::stream::iter(slots.map(|slot| {
                let (client, cluster, model) = (&client, &args.target.cluster, &args.model);
                async move { (slot, slot_checksum(client, cluster, model, slot, VERIFY_READ_TIMEOUT).await) }
            }))
            .buffer_unordered(VERIFY_READS_IN_FLIGHT);
            while let Some((slot, got)) = asks.next().await {
                match got {
                    Ok(v) => {
                        live.insert(slot.get(), v);
                    }
                    Err(e) => {
                        eprintln!("tessel replay: live checksum of slot {}: {e}", slot.get());
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
        let template = SlotModel {
            js: js.clone(),
            client: client.clone(),
            checkpoints: checkpoints.clone(),
            cluster: args.target.cluster.clone(),
            model: args.model.clone(),
            rows,
            dim,
            slot: Slot::from_hash(0),
            cfg: SlotModelConfig::default(),
            metrics: std::sync::Arc::new(Metrics::default()),
        };
        let limit = |slot: Slot| live.get(&slot.get()).map(|(_, p)| *p).or(to_seq).unwrap_or(u64::MAX);
        let workers = args.workers.map_or_else(replay_workers, usize::from);
        let mut bar = crate::progress::Bar::new(args.quiet);
        let replayed = replay_model(&template, &line, None, &limit, workers, &mut |p| bar.update(p)).await;
        bar.finish();
        let tables = match replayed {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tessel replay: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut differing = Vec::new();
        let (mut slots_done, mut rows_done) = (0u64, 0u64);
        for (slot, table) in &tables {
            if let Some((checksum, _)) = live.get(slot)
                && *checksum != data_checksum(table.data())
            {
                differing.push(*slot);
            }
            if let Some((path, w)) = out.as_mut() {
                // A slot's values at a time, as little-endian bytes.
                let bytes: Vec<u8> = table.data().iter().flat_map(|v| v.to_le_bytes()).collect();
                if let Err(e) = w.write_all(&bytes) {
                    eprintln!("tessel replay: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            slots_done += 1;
            rows_done += table.rows().end - table.rows().start;
        }
        // What the buffer still holds is written here, not when it is dropped (where a failure,
        // such as a full disk, would go unnoticed and leave a short file behind an exit 0).
        if let Some((path, w)) = out.as_mut()
            && let Err(e) = w.flush()
        {
            eprintln!("tessel replay: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        let report = json!({"model": args.model, "slots": slots_done, "rows": rows_done, "to_seq": to_seq,
            "verified": args.verify, "differing_slots": differing});
        if args.json {
            println!("{report}");
        } else if args.verify {
            println!("replay: {slots_done} slots, {rows_done} rows rebuilt; {} differ from the live tables{}", differing.len(),
                if differing.is_empty() { String::new() } else { format!(": {differing:?}") });
        } else {
            println!("replay: {slots_done} slots, {rows_done} rows rebuilt{}", to_seq.map(|s| format!(" through stream sequence {s}")).unwrap_or_default());
        }
        if differing.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    })
}
