//! `tessel ask`, `tessel events` and `tessel model …`: talking to actors from the command line
//! (`model branch` and `model merge` are in `cmd::branch`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actors::es::{ActorKey, EventStore};
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::client::{ActorClient, AskError};
use crate::config::{NodeConfig, split_urls, validate_cluster_name};
use crate::metrics::Metrics;

/// Where the cluster is.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// NATS server URLs, comma-separated.
    #[arg(long, default_value = "nats://127.0.0.1:4222", global = true)]
    pub nats: String,
    /// The cluster name.
    #[arg(long, default_value = "tessel", global = true)]
    pub cluster: String,
}

impl Target {
    pub(crate) async fn connect(&self) -> Result<async_nats::Client, ExitCode> {
        if let Err(e) = validate_cluster_name(&self.cluster) {
            eprintln!("tessel: {e}");
            return Err(ExitCode::from(2));
        }
        let mut cfg = NodeConfig {
            connect_retry_for_ms: 3_000,
            ..NodeConfig::default()
        };
        // Credentials and TLS come from the same TESSEL_* variables a node reads.
        if let Err(e) = cfg.apply_env(|k| std::env::var(k).ok()) {
            eprintln!("tessel: {e}");
            return Err(ExitCode::from(2));
        }
        cfg.nats_urls = split_urls(&self.nats);
        crate::connect::connect(&cfg, "tessel-cli", Arc::new(Metrics::default()))
            .await
            .map_err(|e| {
                eprintln!("tessel: {e}");
                ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
            })
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()
}

fn key(s: &str) -> Result<ActorKey, ExitCode> {
    ActorKey::parse(s).map_err(|e| {
        eprintln!("tessel: {e}");
        ExitCode::from(2)
    })
}

/// Parses `actor` as a `kind/id` key and, on a new current-thread runtime, runs `body` with
/// it and returns its exit code; a key that does not parse ends with exit code 2.
fn on_actor(actor: &str, body: impl AsyncFnOnce(ActorKey) -> ExitCode) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async {
        let actor = match key(actor) {
            Ok(k) => k,
            Err(c) => return c,
        };
        body(actor).await
    })
}

fn ask_failed(e: &AskError) -> ExitCode {
    eprintln!("tessel: {e}");
    match e {
        AskError::BadRequest(_) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// Arguments of `tessel ask`.
#[derive(Args, Debug)]
pub struct AskArgs {
    #[command(flatten)]
    target: Target,
    /// The actor, `kind/id`.
    actor: String,
    /// The command, as JSON.
    command: String,
    /// How long to wait, ms.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
}

/// Runs `tessel ask`.
pub fn ask(args: AskArgs) -> ExitCode {
    on_actor(&args.actor, async |actor| {
        let command: Value = match serde_json::from_str(&args.command) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("tessel ask: the command is not JSON: {e}");
                return ExitCode::from(2);
            }
        };
        let client = match args.target.connect().await {
            Ok(c) => c,
            Err(c) => return c,
        };
        match ActorClient::new(client, &args.target.cluster)
            .ask(&actor, &command, Duration::from_millis(args.timeout_ms))
            .await
        {
            Ok((view, version)) => {
                println!("{}", json!({"version": version, "state": view}));
                ExitCode::SUCCESS
            }
            Err(e) => ask_failed(&e),
        }
    })
}

/// Arguments of `tessel events`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    target: Target,
    /// The actor, `kind/id`.
    actor: String,
    /// First version to print.
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// Runs `tessel events`.
pub fn events(args: EventsArgs) -> ExitCode {
    on_actor(&args.actor, async |actor| {
        let client = match args.target.connect().await {
            Ok(c) => c,
            Err(c) => return c,
        };
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client);
        let store = match crate::eventstore::JetStreamEventStore::open(
            js,
            &args.target.cluster,
            1,
            8 << 20,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tessel events: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut stream = match store.read(&actor, args.from, 0).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tessel events: {e}");
                return ExitCode::FAILURE;
            }
        };
        while let Some(e) = stream.next().await {
            match e {
                Ok(e) if args.json => println!("{}", serde_json::to_string(&e).unwrap_or_default()),
                Ok(e) => println!(
                    "{:>6}  {:<20} {}  {}",
                    e.version, e.kind, e.timestamp_ms, e.data
                ),
                Err(err) => {
                    eprintln!("tessel events: {err}");
                    return ExitCode::FAILURE;
                }
            }
        }
        ExitCode::SUCCESS
    })
}

/// `tessel model …`.
#[derive(Args, Debug)]
pub struct ModelArgs {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Register a model and start its deploy saga.
    Create {
        /// Its name.
        #[arg(long)]
        name: String,
        /// Rows.
        #[arg(long)]
        rows: u64,
        /// Columns.
        #[arg(long)]
        dim: u32,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Multiply every delta value by this before applying it.
        #[arg(long)]
        scale: Option<f32>,
        /// Clip every (scaled) delta value to ±this.
        #[arg(long)]
        clip: Option<f32>,
    },
    /// List the models.
    List {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Describe a model.
    Describe {
        /// Its name.
        name: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Read rows of a model from the owners of their slots.
    Get {
        /// Its name.
        name: String,
        /// Comma-separated rows.
        #[arg(long)]
        rows: String,
        /// Wait until each slot's owner has applied every delta the stream held for the slot
        /// when the read began (read your writes), instead of reading what it has now.
        #[arg(long)]
        fresh: bool,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Retire a model.
    Retire {
        /// Its name.
        name: String,
    },
    /// Fork a model's state at a stream sequence into a new model (a branch).
    Branch {
        /// The model to fork.
        model: String,
        /// The fork point: a `<c>-deltas` stream sequence (the branch starts from the model's
        /// state with every delta up to it applied).
        #[arg(long, required_unless_present = "at_time", conflicts_with = "at_time")]
        at_seq: Option<u64>,
        /// The fork point as a time (RFC 3339 or unix ms): the last stream sequence the
        /// server stored at or before it.
        #[arg(long, value_parser = crate::progress::parse_time_ns)]
        at_time: Option<i128>,
        /// The branch's name.
        #[arg(long)]
        name: String,
    },
    /// Merge a branch's change since the fork into its parent.
    Merge {
        /// The branch.
        branch: String,
        /// Its parent.
        #[arg(long)]
        into: String,
        /// `sum` adds the branch's change; `newer` keeps, for each row changed on both sides,
        /// the side with the newer latest update.
        #[arg(long, default_value = "sum", value_parser = parse_policy)]
        policy: actors::merge::MergePolicy,
        /// The owners' delta bound (`delta_max_abs`): a merged value above it is refused.
        #[arg(long, default_value_t = 1e6)]
        max_abs: f32,
        /// One JSON object.
        #[arg(long)]
        json: bool,
        /// No progress line on stderr.
        #[arg(long)]
        quiet: bool,
    },
}

fn parse_policy(s: &str) -> Result<actors::merge::MergePolicy, String> {
    match s {
        "sum" => Ok(actors::merge::MergePolicy::Sum),
        "newer" => Ok(actors::merge::MergePolicy::Newer),
        _ => Err(format!("{s:?}: sum or newer")),
    }
}

/// Runs `tessel model …`.
pub fn model(args: ModelArgs) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async {
        let client = match args.target.connect().await {
            Ok(c) => c,
            Err(c) => return c,
        };
        let actors = ActorClient::new(client.clone(), &args.target.cluster);
        let timeout = Duration::from_secs(5);
        let describe = |name: String| {
            let actors = actors.clone();
            async move {
                let k = ActorKey::new("model", &name).map_err(|e| AskError::BadRequest(e.to_string()))?;
                actors.ask(&k, &json!({"cmd": "describe"}), timeout).await
            }
        };
        match args.command {
            ModelCommand::Create { name, rows, dim, dtype, scale, clip } => {
                let k = match ActorKey::new("model", &name) {
                    Ok(k) => k,
                    Err(e) => {
                        eprintln!("tessel model create: {e}");
                        return ExitCode::from(2);
                    }
                };
                let cmd = json!({"cmd": "create", "rows": rows, "dim": dim, "dtype": dtype, "scale": scale, "clip": clip});
                match actors.ask(&k, &cmd, timeout).await {
                    Ok((v, _)) => {
                        println!("model {name} created ({}); the deploy saga has started", v["state"].as_str().unwrap_or("?"));
                        ExitCode::SUCCESS
                    }
                    Err(e) => ask_failed(&e),
                }
            }
            ModelCommand::Describe { name, json } => match describe(name.clone()).await {
                Ok((v, version)) if v["state"] == "Absent" => {
                    eprintln!("tessel model describe: no model {name:?} (version {version})");
                    ExitCode::FAILURE
                }
                Ok((v, _)) => {
                    if json {
                        println!("{v}");
                    } else {
                        println!("{name}: {} rows={} dim={} dtype={} reserved on {} node(s){}{}",
                            v["state"].as_str().unwrap_or("?"), v["rows"], v["dim"], v["dtype"].as_str().unwrap_or("?"),
                            v["reserved"].as_object().map_or(0, |m| m.len()),
                            v["parent"].as_str().map(|p| format!("; branch of {p} at stream sequence {}", v["fork_seq"])).unwrap_or_default(),
                            v["reason"].as_str().map(|r| format!("; failed: {r}")).unwrap_or_default());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => ask_failed(&e),
            },
            ModelCommand::List { json } => {
                let js = async_nats::jetstream::new(client);
                let names = crate::saga::model_names(&js, &args.target.cluster).await.unwrap_or_default();
                let mut rows = Vec::new();
                for name in names {
                    match describe(name.clone()).await {
                        Ok((v, _)) => rows.push(json!({"name": name, "state": v["state"], "rows": v["rows"], "dim": v["dim"], "dtype": v["dtype"], "parent": v["parent"], "fork_seq": v["fork_seq"]})),
                        Err(e) => rows.push(json!({"name": name, "error": e.to_string()})),
                    }
                }
                if json {
                    println!("{}", json!({"models": rows}));
                } else {
                    for r in rows {
                        println!("{:<24} {:<8} rows={} dim={}", r["name"].as_str().unwrap_or("?"), r["state"].as_str().unwrap_or("?"), r["rows"], r["dim"]);
                    }
                }
                ExitCode::SUCCESS
            }
            ModelCommand::Get {
                name,
                rows,
                fresh,
                json,
            } => crate::cmd::produce::get(&args.target, &name, &rows, fresh, json).await,
            ModelCommand::Branch { model, at_seq, at_time, name } => {
                let at = match (at_seq, at_time) {
                    (Some(s), _) => crate::cmd::branch::ForkPoint::Seq(s),
                    (None, Some(t)) => crate::cmd::branch::ForkPoint::TimeNs(t),
                    (None, None) => {
                        eprintln!("tessel model branch: --at-seq or --at-time is required");
                        return ExitCode::from(2);
                    }
                };
                crate::cmd::branch::run_branch(&args.target, &model, at, &name).await
            }
            ModelCommand::Merge { branch, into, policy, max_abs, json, quiet } => {
                let a = crate::cmd::branch::MergeArgs { policy, max_abs, json, quiet };
                crate::cmd::branch::run_merge(&args.target, &branch, &into, a).await
            }
            ModelCommand::Retire { name } => {
                let Ok(k) = ActorKey::new("model", &name) else {
                    eprintln!("tessel model retire: invalid name {name:?}");
                    return ExitCode::from(2);
                };
                match actors.ask(&k, &json!({"cmd": "retire"}), timeout).await {
                    Ok(_) => {
                        println!("model {name} retired");
                        ExitCode::SUCCESS
                    }
                    Err(e) => ask_failed(&e),
                }
            }
        }
    })
}
