//! `tessel node`: one cluster node.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::{LogFormat, NodeConfig, split_urls};
use crate::connect::connect;
use crate::metrics::Metrics;
use crate::records::{MemberRecord, SCHEMA_VERSION, device_records};
use crate::runtime::SupMsg;
use crate::store::{Store, wall_ms};

/// Exit code for a configuration that does not validate.
pub const EXIT_CONFIG: u8 = 2;

/// Arguments of `tessel node`; flags override the file and the environment.
#[derive(Args, Debug, Clone, Default)]
pub struct NodeArgs {
    /// NATS server URLs, comma-separated.
    #[arg(long)]
    pub nats: Option<String>,
    /// This node's id ([A-Za-z0-9_-], at most 64).
    #[arg(long)]
    pub node_id: Option<String>,
    /// The cluster name (prefix of every bucket, stream and subject).
    #[arg(long)]
    pub cluster: Option<String>,
    /// A TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Serve HTTP status on this address.
    #[arg(long)]
    pub http: Option<String>,
    /// Capacity weight for placement (default: GiB of the largest CUDA device's memory, else of
    /// host memory).
    #[arg(long)]
    pub capacity: Option<u64>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Loads the configuration: file, then environment, then flags; validated.
pub fn load(args: &NodeArgs) -> Result<NodeConfig, crate::config::ConfigError> {
    let mut cfg = match &args.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => NodeConfig::default(),
    };
    cfg.apply_env(|k| std::env::var(k).ok())?;
    if let Some(v) = &args.nats {
        cfg.nats_urls = split_urls(v);
    }
    if let Some(v) = &args.node_id {
        cfg.node_id = v.clone();
    }
    if let Some(v) = &args.cluster {
        cfg.cluster = v.clone();
    }
    if let Some(v) = &args.http {
        cfg.http = Some(v.clone());
    }
    if let Some(v) = args.capacity {
        cfg.capacity = Some(v);
    }
    if let Some(v) = args.log_format {
        cfg.log_format = v;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The log filter without `RUST_LOG`: info, but only warnings from the NATS client library,
/// which logs every connection event at info; tessel logs those it acts on itself
/// (`connect.rs`).
pub const DEFAULT_LOG_FILTER: &str = "info,async_nats=warn";

/// Sets up logging (RUST_LOG filters; default [`DEFAULT_LOG_FILTER`]).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    // Colour only on a terminal: logs redirected to files stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs `tessel node`.
pub fn run(args: NodeArgs) -> ExitCode {
    let cfg = match load(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("tessel node: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(cfg.log_format);
    let Some(rt) = crate::cmd::runtime("tessel node") else {
        return ExitCode::FAILURE;
    };
    let code = rt.block_on(serve(cfg));
    rt.shutdown_timeout(Duration::from_secs(2));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

async fn serve(cfg: NodeConfig) -> i32 {
    let (me, _) = match cfg.validate() {
        Ok(v) => v,
        Err(e) => {
            error!("{e}");
            return i32::from(EXIT_CONFIG);
        }
    };
    let metrics = Arc::new(Metrics::default());
    let client = match connect(&cfg, &format!("tessel-{me}"), metrics.clone()).await {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            eprintln!("tessel node: {e}");
            return e.exit_code();
        }
    };
    let store = match Store::open(
        client.clone(),
        &cfg.cluster,
        cfg.replicas,
        Duration::from_millis(cfg.request_timeout_ms),
        cfg.lease_ttl_ms,
        cfg.member_ttl_ms,
        cfg.max_record_bytes,
        metrics.clone(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            error!("cannot set up the buckets: {e}");
            eprintln!("tessel node: cannot set up the buckets: {e}");
            // A refused permission, like refused credentials, is not cured by retrying.
            return match e {
                crate::store::StoreError::PermissionDenied => crate::connect::EXIT_AUTH,
                _ => 5,
            };
        }
    };
    let (found, cuda_unused) = gpu::discover_report();
    match &cuda_unused {
        Some(reason) => info!(node = %me, %reason, "CUDA not used: tables on the CPU"),
        None => info!(node = %me, devices = found.len(), "CUDA devices found"),
    }
    let weight = match cfg.weight(&found) {
        Ok(w) => w,
        Err(e) => {
            error!("{e}");
            return i32::from(EXIT_CONFIG);
        }
    };
    info!(node = %me, weight = weight.get(), explicit = cfg.capacity.is_some(), "placement weight");
    let record = MemberRecord {
        v: SCHEMA_VERSION,
        id: me.to_string(),
        status: "Joining".into(),
        capacity: u64::from(weight.get()),
        devices: device_records(&found),
        addr: cfg.http.clone(),
        started_at_ms: wall_ms(),
    };
    // The dashboard's ring of topology events follows them from before this node takes part.
    let events = Arc::new(crate::http::EventLog::default());
    if cfg.http.is_some()
        && let Err(e) = events
            .clone()
            .follow(client.clone(), &cfg.cluster, metrics.clone())
            .await
    {
        warn!("cannot follow the topology events: {e}");
    }
    let hook = match start_actors(&cfg, &me, client.clone(), metrics.clone(), &found).await {
        Ok(h) => h,
        Err(e) => {
            error!("cannot start the actor runtime: {e:#}");
            eprintln!("tessel node: cannot start the actor runtime: {e:#}");
            return 5;
        }
    };
    let running = match crate::runtime::start(
        cfg.clone(),
        me.clone(),
        weight,
        store,
        metrics,
        record,
        Some(hook),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the supervision tree: {e}");
            return 1;
        }
    };
    let crate::runtime::RunningNode {
        supervisor: sup,
        handle,
        exit: mut exit_rx,
        view,
        metrics,
    } = running;
    let _http = match &cfg.http {
        Some(addr) => {
            let state = crate::http::HttpState {
                node: me.to_string(),
                metrics,
                view,
                cluster: cfg.cluster.clone(),
                js: Some(
                    async_nats::jetstream::ContextBuilder::new()
                        .timeout(Duration::from_secs(2))
                        .build(client.clone()),
                ),
                events,
            };
            match crate::http::serve(addr, state).await {
                Ok(task) => Some(task),
                Err(e) => {
                    error!(%addr, "cannot serve HTTP: {e}");
                    sup.stop(None);
                    return i32::from(EXIT_CONFIG);
                }
            }
        }
        None => None,
    };
    info!(node = %me, cluster = %cfg.cluster, "node running");

    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            error!("cannot install signal handlers");
            sup.stop(None);
            return 1;
        }
    };
    let mut draining = false;
    let drain_limit = Duration::from_millis(cfg.drain_timeout_ms + 5_000);
    let deadline = tokio::time::sleep(Duration::from_secs(u64::MAX / 4));
    tokio::pin!(deadline);
    let code = loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            changed = exit_rx.changed() => {
                match (changed, *exit_rx.borrow()) {
                    (Ok(()), Some(code)) => break code,
                    (Err(_), _) => break 1,
                    _ => continue,
                }
            }
            _ = &mut deadline, if draining => {
                warn!("drain did not finish in time; exiting");
                break 1;
            }
        }
        if draining {
            warn!("second signal: exiting without finishing the drain");
            break 1;
        }
        draining = true;
        info!(node = %me, "signal received: draining");
        let _ = sup.cast(SupMsg::Drain);
        deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + drain_limit);
    };
    sup.stop(None);
    let _ = tokio::time::timeout(Duration::from_secs(2), handle).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    info!(node = %me, code, "node stopped");
    code
}

/// Starts the virtual-actor runtime (event store, actor kinds), the memory reservations and the
/// saga driver; returns the hook that starts and stops slots in the runtime.
async fn start_actors(
    cfg: &NodeConfig,
    me: &cluster::NodeId,
    client: async_nats::Client,
    metrics: Arc<Metrics>,
    found: &[gpu::Device],
) -> anyhow::Result<crate::runtime::SlotHook> {
    use actors::behavior::{Behavior, Counter, Typed};
    use actors::model::Model;
    use cluster::types::SlotSet;

    let setup = async_nats::jetstream::ContextBuilder::new()
        .timeout(crate::store::SETUP_TIMEOUT)
        .build(client.clone());
    let events = with_retries("event store", || {
        crate::eventstore::JetStreamEventStore::open(
            setup.clone(),
            &cfg.cluster,
            cfg.replicas,
            cfg.max_record_bytes,
        )
    })
    .await?;
    let behaviors: Vec<Arc<dyn Behavior>> = vec![
        Arc::new(Typed::<Counter>::default()),
        Arc::new(Typed::<Model>::default()),
    ];
    let rt = crate::vactors::ActorRuntime::new(
        client.clone(),
        &cfg.cluster,
        Arc::new(events),
        behaviors,
        crate::vactors::ActorConfig::default(),
        metrics.clone(),
    );
    let devices = crate::tables::DeviceBook::new(found.to_vec(), metrics.clone());
    crate::tables::serve_faults(
        client.clone(),
        &cfg.cluster,
        me.as_str(),
        devices.clone(),
        cfg.fault_injection,
    )
    .await?;
    let metrics_trim = metrics.clone();
    let metrics_models = metrics;
    let hosted = Arc::new(std::sync::Mutex::new(SlotSet::EMPTY));

    // Memory reservations: half of the largest device's memory.
    let budget = found
        .iter()
        .map(|d| d.memory_total_bytes)
        .max()
        .unwrap_or(0)
        / 2;
    let reservations = Arc::new(crate::saga::Reservations::new(budget));
    crate::saga::serve_reservations(client.clone(), &cfg.cluster, me.as_str(), reservations)
        .await?;

    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    let js_models = async_nats::jetstream::ContextBuilder::new()
        .timeout(crate::store::SETUP_TIMEOUT)
        .build(client.clone());
    let client_models = client.clone();
    let h = hosted.clone();
    let driver = crate::saga::SagaDriver {
        actors: crate::client::ActorClient::new(client.clone(), &cfg.cluster),
        js,
        client,
        cluster: cfg.cluster.clone(),
        hosts: Arc::new(move |slot| h.lock().is_ok_and(|s| s.contains(slot))),
    };
    driver.spawn(Duration::from_millis(500));

    // The delta pipeline: slot models of the serving models on the slots this node owns.
    let checkpoints = with_retries("deltas stream and checkpoints", || {
        crate::deltas::ensure(&js_models, &cfg.cluster, cfg.replicas)
    })
    .await?;
    let h = hosted.clone();
    let host = crate::deltas::ModelHost {
        actors: crate::client::ActorClient::new(client_models.clone(), &cfg.cluster),
        js: js_models,
        client: client_models,
        checkpoints,
        cluster: cfg.cluster.clone(),
        hosts: Arc::new(move |slot| h.lock().is_ok_and(|s| s.contains(slot))),
        cfg: cfg.slot_model(),
        metrics: metrics_models,
        devices,
    };
    host.spawn(Duration::from_millis(500));
    if cfg.memory_trim_idle_ms > 0 {
        crate::idle_trim::spawn(metrics_trim, Duration::from_millis(cfg.memory_trim_idle_ms));
    }

    Ok(Arc::new(move |set: SlotSet, start: bool| {
        if let Ok(mut h) = hosted.lock() {
            for slot in set.iter() {
                if start {
                    h.insert(slot);
                } else {
                    h.remove(slot);
                }
            }
        }
        for slot in set.iter() {
            rt.set_slot(slot, start);
        }
    }))
}

/// Retries a setup step while other nodes create the same streams on a forming cluster (a
/// replicated stream can be briefly invisible from a server that did not create it).
async fn with_retries<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut step: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match step().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < crate::store::SETUP_ATTEMPTS => {
                warn!(what, attempt, error = %e, "setup failed; retrying");
                tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
            }
            Err(e) => return Err(anyhow::anyhow!("{what}: {e}")),
        }
    }
}
