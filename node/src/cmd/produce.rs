//! `tessel produce`: the delta workload generator, and `tessel model get`'s row reads.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use crate::cmd::actor::Target;
use crate::deltas::Producer;

/// Arguments of `tessel produce`.
#[derive(Args, Debug)]
pub struct ProduceArgs {
    #[command(flatten)]
    target: Target,
    /// The model (must be Serving).
    #[arg(long)]
    model: String,
    /// Batches per second (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Rows per batch.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    batch: u64,
    /// How long, e.g. `10s`, `500ms`, `2m`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Zipf exponent of the row distribution (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    zipf: f64,
    /// Most unacknowledged frames in flight.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Print one JSON object at the end.
    #[arg(long)]
    json: bool,
}

/// Parses `10s`, `500ms`, `2m`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit {unit:?} (ms, s, m)")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err("duration must be within a day".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Draws rows: uniform, or Zipf-like with exponent `a` by inverse-power sampling.
struct Rows {
    x: u64,
    rows: u64,
    zipf: f64,
}

impl Rows {
    fn next(&mut self) -> u32 {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        let u = (self.x >> 11) as f64 / (1u64 << 53) as f64;
        let r = if self.zipf > 0.0 {
            ((self.rows as f64).powf(u.powf(self.zipf)) - 1.0) as u64
        } else {
            (u * self.rows as f64) as u64
        };
        r.min(self.rows - 1) as u32
    }
}

/// Runs `tessel produce`.
pub fn produce(args: ProduceArgs) -> ExitCode {
    let Some(rt) = crate::cmd::runtime("tessel produce") else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async {
        let (client, rows, dim) = match connect_to_model(&args.target, "tessel produce", &args.model).await {
            Ok(v) => v,
            Err(c) => return c,
        };
        let js = async_nats::jetstream::new(client);
        let mut producer = Producer::new(js, &args.target.cluster, &args.model, rows, dim, args.max_in_flight, Producer::random_id());
        let mut draw = Rows { x: 0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id()), rows, zipf: args.zipf };
        let started = Instant::now();
        let (mut acked_rows, mut acked_batches) = (0u64, 0u64);
        let mut latencies = Vec::new();
        let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
        let mut next = Instant::now();
        let mut last_print = Instant::now();
        while started.elapsed() < args.duration {
            let ids: Vec<u32> = (0..args.batch).map(|_| draw.next()).collect();
            let values = vec![1e-3f32; ids.len() * dim as usize];
            let t0 = Instant::now();
            match producer.send(&ids, &values).await {
                Ok(sent) => {
                    acked_rows += sent.rows;
                    acked_batches += sent.batches;
                    latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                Err(e) => {
                    eprintln!("tessel produce: {e}");
                    return ExitCode::FAILURE;
                }
            }
            if !args.json && last_print.elapsed() >= Duration::from_secs(1) {
                eprintln!("produce: {:.0} rows/s acknowledged", acked_rows as f64 / started.elapsed().as_secs_f64());
                last_print = Instant::now();
            }
            if let Some(i) = interval {
                next += i;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        latencies.sort_by(f64::total_cmp);
        let seconds = started.elapsed().as_secs_f64();
        let out = json!({
            "model": args.model, "rows_acked": acked_rows, "batches_acked": acked_batches, "seconds": seconds,
            "rows_per_s": acked_rows as f64 / seconds,
            "p50_ms": crate::bench::percentile(&latencies, 50.0), "p99_ms": crate::bench::percentile(&latencies, 99.0),
        });
        if args.json {
            println!("{out}");
        } else {
            println!("produce: {acked_rows} rows in {acked_batches} frames acknowledged in {seconds:.1}s; send p50 {:.2} ms, p99 {:.2} ms", out["p50_ms"].as_f64().unwrap_or(0.0), out["p99_ms"].as_f64().unwrap_or(0.0));
        }
        ExitCode::SUCCESS
    })
}

/// Connects and reads a serving model's shape: (client, rows, dim); prints why and returns the
/// exit code otherwise.
pub async fn connect_to_model(
    target: &Target,
    who: &str,
    model: &str,
) -> Result<(async_nats::Client, u64, u32), ExitCode> {
    let client = target.connect().await?;
    let actors = crate::client::ActorClient::new(client.clone(), &target.cluster);
    match model_shape(&actors, model).await {
        Ok((rows, dim)) => Ok((client, rows, dim)),
        Err(e) => {
            eprintln!("{who}: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// A serving model's (rows, dim).
pub async fn model_shape(
    actors: &crate::client::ActorClient,
    model: &str,
) -> Result<(u64, u32), String> {
    let key = actors::es::ActorKey::new("model", model).map_err(|e| e.to_string())?;
    let (v, _) = actors
        .ask(&key, &json!({"cmd": "describe"}), Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    if v["state"] != "Serving" {
        return Err(format!("model {model} is {}, not Serving", v["state"]));
    }
    match (
        v["rows"].as_u64(),
        v["dim"].as_u64().and_then(|d| u32::try_from(d).ok()),
    ) {
        (Some(r), Some(d)) => Ok((r, d)),
        _ => Err(format!("model {model}: malformed description {v}")),
    }
}

/// Arguments of `tessel model get` (see `cmd::actor`).
pub async fn get(
    target: &Target,
    model: &str,
    rows: &str,
    fresh: bool,
    json_out: bool,
) -> ExitCode {
    let ids: Result<Vec<u32>, _> = rows.split(',').map(|r| r.trim().parse::<u32>()).collect();
    let Ok(ids) = ids else {
        eprintln!("tessel model get: --rows takes comma-separated row numbers");
        return ExitCode::from(2);
    };
    let (client, total, _) = match connect_to_model(target, "tessel model get", model).await {
        Ok(v) => v,
        Err(c) => return c,
    };
    match crate::deltas::get_rows(
        &client,
        &target.cluster,
        model,
        total,
        &ids,
        if fresh {
            crate::deltas::Freshness::Fresh
        } else {
            crate::deltas::Freshness::Any
        },
        Duration::from_secs(10),
    )
    .await
    {
        Ok(values) => {
            if json_out {
                let rows: Vec<_> = ids
                    .iter()
                    .zip(&values)
                    .map(|(r, v)| json!({"row": r, "values": v}))
                    .collect();
                println!("{}", json!({"model": model, "rows": rows}));
            } else {
                for (r, v) in ids.iter().zip(values) {
                    println!("{r}: {v:?}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessel model get: {e}");
            ExitCode::FAILURE
        }
    }
}
