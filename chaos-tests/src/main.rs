//! # chaos-tests — real processes under faults
//!
//! Starts three NATS servers (one JetStream cluster, buckets and streams at replicas 3) and
//! 3–5 `tessel node`s as real processes — each in its own network namespace when run as root —
//! runs a workload of delta producers and actor commands that records every operation and its
//! outcome, injects faults drawn from a seed (the nemesis), heals, and checks the history: no
//! acknowledged delta or event lost, none applied twice, one leader per term, every slot owned
//! by a live node after healing, no crash the nemesis did not cause. Writes a JSON report and a
//! short summary; exits 1 when a check fails.
//!
//! ```text
//! cargo run -p chaos-tests -- --list
//! cargo run -p chaos-tests -- --scenario leader-kill --seed 1 --duration 60s --json report.json
//! ```
//!
//! **Boundary:** runs the `tessel` binary and `nats-server` as separate processes, as an
//! operator would; from the `tessel_node` library it uses only what a client application uses
//! (`Producer`, `ActorClient`, `get_rows`, the status reader) and the `nats-server` finder.

mod checker;
mod monitor;
mod nemesis;
mod net;
mod procs;
mod rng;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use actors::es::ActorKey;
use anyhow::{Context as _, bail};
use clap::Parser;
use serde::Serialize;
use serde_json::json;

use crate::nemesis::{FaultRecord, SCENARIOS};
use crate::procs::{Crash, Kind, Procs};
use crate::workload::Outcome;

/// How long the cluster may take to form and settle at the start.
const SETUP_LIMIT: Duration = Duration::from_secs(120);
/// How long the cluster may take to settle on every node after the last fault healed.
const HEAL_LIMIT: Duration = Duration::from_secs(120);
/// How long the tables may take to catch up after healing.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "chaos-tests",
    about = "Run tessel and NATS as real processes under faults and check the history"
)]
struct Args {
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// The scenario (see --list).
    #[arg(long)]
    scenario: Option<String>,
    /// The seed of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long faults are injected (e.g. 60s, 5m, 1500ms).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// tessel nodes (3–5).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
    nodes: u64,
    /// The tessel binary (default: `tessel` next to this binary).
    #[arg(long)]
    tessel: Option<PathBuf>,
    /// Where logs and JetStream data go (default: a new directory under the temp dir, removed
    /// after a passing run).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run everything on loopback even as root (partition scenarios are then refused).
    #[arg(long)]
    no_netns: bool,
}

/// Parses `60s`, `5m`, `1500ms` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (ms, s, m, h)"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1_000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if ms == 0 {
        return Err("the duration must be above zero".into());
    }
    Ok(Duration::from_millis(ms))
}

/// The report of one run.
#[derive(Debug, Serialize)]
struct Report {
    scenario: String,
    seed: u64,
    duration_s: f64,
    nodes: u64,
    network: String,
    ok: bool,
    failures: Vec<String>,
    /// Operations acknowledged (deltas + actor commands).
    acked: u64,
    /// Operations whose outcome is unknown.
    indeterminate: u64,
    /// Acknowledged operations missing (deltas + actor commands).
    lost: u64,
    /// Operations applied more than once.
    doubled: u64,
    faults: Vec<FaultRecord>,
    /// The longest stretch without an acknowledged write (deltas or actor commands) while
    /// faults were injected.
    max_unavailable_ms: u64,
    max_unavailable_deltas_ms: u64,
    max_unavailable_actors_ms: u64,
    /// The longest time from a fault's end until every node was back, Active and owning
    /// slots.
    heal_ms: Option<u64>,
    leaders_per_term_ok: bool,
    terms_seen: usize,
    split_terms: Vec<(u64, Vec<String>)>,
    map_regressions: Vec<String>,
    slots_owned_by_live_nodes: bool,
    crashes: Vec<Crash>,
    deltas: checker::DeltaCheck,
    actors: checker::ActorCheck,
    dir: String,
}

fn list() {
    println!("scenarios:");
    for (name, _, what) in SCENARIOS {
        println!("  {name:<20} {what}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        list();
        return ExitCode::SUCCESS;
    }
    let Some(name) = args.scenario.clone() else {
        eprintln!("chaos-tests: --scenario NAME is required (see --list)");
        return ExitCode::from(2);
    };
    let Some((_, fault, _)) = SCENARIOS.iter().find(|(n, _, _)| *n == name) else {
        eprintln!("chaos-tests: unknown scenario {name:?}");
        list();
        return ExitCode::from(2);
    };
    let fault = *fault;
    let result = tokio::select! {
        r = run(&args, &name, fault) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match result {
        Ok(report) => {
            summary(&report);
            if let Some(path) = &args.json {
                let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("chaos-tests: cannot write {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("chaos-tests: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn summary(r: &Report) {
    println!(
        "scenario {} seed {} for {:.0} s on {} nodes ({})",
        r.scenario, r.seed, r.duration_s, r.nodes, r.network
    );
    let mut kinds = std::collections::BTreeMap::new();
    for f in &r.faults {
        *kinds.entry(f.kind).or_insert(0) += 1;
    }
    println!("faults: {} {kinds:?}", r.faults.len());
    println!(
        "acked {} (deltas {}, actor commands {}), indeterminate {}",
        r.acked, r.deltas.acked, r.actors.acked, r.indeterminate
    );
    println!("lost {}, doubled {}", r.lost, r.doubled);
    println!(
        "max unavailable {} ms (deltas {} ms, actors {} ms), heal {}",
        r.max_unavailable_ms,
        r.max_unavailable_deltas_ms,
        r.max_unavailable_actors_ms,
        r.heal_ms.map_or("never".into(), |h| format!("{h} ms"))
    );
    println!(
        "leaders per term ok: {} ({} terms), slots owned by live nodes: {}, crashes: {}",
        r.leaders_per_term_ok,
        r.terms_seen,
        r.slots_owned_by_live_nodes,
        r.crashes.len()
    );
    if r.ok {
        println!("PASS");
    } else {
        println!("FAIL: {}", r.failures.join("; "));
        println!("logs: {}", r.dir);
    }
}

/// The `tessel` binary: the flag, else next to this binary.
fn tessel_binary(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe().context("cannot find this binary")?;
    let dir = me.parent().context("this binary has no directory")?;
    for candidate in [dir.join("tessel"), dir.join("../tessel")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no tessel binary next to {}; build it (`cargo build -p node --bin tessel`) or pass --tessel",
        me.display()
    )
}

async fn run(args: &Args, scenario: &str, fault: Option<nemesis::Fault>) -> anyhow::Result<Report> {
    let started = Instant::now();
    let tessel = tessel_binary(args.tessel.as_deref())?;
    let nats_bin = tessel_node::natsd::find_nats_server(false)?;
    let net = net::Net::new(!args.no_netns)?;
    let needs_netns = fault.is_some_and(nemesis::Fault::needs_netns);
    if needs_netns && !net.can_partition() {
        bail!("scenario {scenario} needs network namespaces: run as root without --no-netns");
    }
    let pool: Vec<nemesis::Fault> = match fault {
        Some(f) => vec![f],
        None => nemesis::Fault::ALL
            .into_iter()
            .filter(|f| net.can_partition() || !f.needs_netns())
            .collect(),
    };
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "chaos-{scenario}-{}-{}",
            args.seed,
            std::process::id()
        )),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let network = net.describe();
    let mut procs = Procs::new(
        net,
        &nats_bin,
        &tessel,
        &dir,
        3,
        args.nodes as usize,
        started,
    )?;
    let result = drive(args, &mut procs, &pool, started).await;
    procs.shutdown().await;
    let mut report = result?;
    report.scenario = scenario.into();
    report.network = network;
    report.dir = dir.display().to_string();
    if report.ok && args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}

async fn drive(
    args: &Args,
    procs: &mut Procs,
    pool: &[nemesis::Fault],
    started: Instant,
) -> anyhow::Result<Report> {
    let mut rng = rng::SplitMix64::new(args.seed);
    for s in procs.names(Kind::Nats) {
        procs.spawn(&s)?;
    }
    for s in procs.names(Kind::Nats) {
        procs.wait_listening(&s, Duration::from_secs(20)).await?;
    }
    let client = async_nats::ConnectOptions::new()
        .ping_interval(Duration::from_secs(2))
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(procs.nats_urls())
        .await
        .context("the harness cannot connect to NATS")?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(client.clone());
    let (leadership, monitors) = monitor::start(client.clone());
    for n in procs.names(Kind::Node) {
        procs.spawn(&n)?;
    }
    let all_nodes = procs.names(Kind::Node);
    wait_settled(procs, &js, &all_nodes, SETUP_LIMIT)
        .await
        .context("the cluster did not form")?;
    create_model(&client).await?;

    // Workload, then faults until the duration is over.
    let workload = workload::Workload::start(client.clone(), started, 1);
    let faults_from = started.elapsed().as_millis() as u64;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut faults = Vec::new();
    let mut unhealed = Vec::new();
    let deadline = Instant::now() + args.duration;
    while Instant::now() < deadline {
        let f = pool[rng.index(pool.len())];
        let gap = rng.range(2_000, 6_000);
        let mut record = nemesis::inject(f, procs, &js, &mut rng).await?;
        // Every fault heals before the next: the time to settle is the fault's heal time.
        let heal_from = Instant::now();
        match wait_settled(procs, &js, &all_nodes, HEAL_LIMIT).await {
            Ok(()) => record.heal_ms = Some(heal_from.elapsed().as_millis() as u64),
            Err(e) => {
                unhealed.push(format!("{} at {} ms: {e:#}", record.kind, record.start_ms));
                nemesis::heal_everything(procs).await?;
            }
        }
        eprintln!(
            "[{:>7} ms] {} {:?} {}; healed in {}",
            record.start_ms,
            record.kind,
            record.targets,
            record.detail,
            record
                .heal_ms
                .map_or("more than the bound".into(), |h| format!("{h} ms"))
        );
        faults.push(record);
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(Duration::from_millis(gap).min(left)).await;
        procs.check_exits();
    }
    let faults_to = started.elapsed().as_millis() as u64;

    // Heal whatever is left and check that every slot is owned by a live node.
    nemesis::heal_everything(procs).await?;
    let healed = wait_settled(procs, &js, &all_nodes, HEAL_LIMIT).await;
    let heal_ms = faults.iter().filter_map(|f| f.heal_ms).max();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = workload.stop().await;
    procs.check_exits();

    // Check.
    let history = history.lock().await;
    let deltas = checker::check_deltas(&client, &js, &history.deltas, CONVERGE_LIMIT).await;
    let actors = checker::check_actors(&js, &history.actors).await;
    let ok_ends = |ops: Vec<(bool, u64)>| -> Vec<u64> {
        ops.into_iter()
            .filter(|(ok, _)| *ok)
            .map(|(_, t)| t)
            .collect()
    };
    let delta_acks = ok_ends(
        history
            .deltas
            .iter()
            .map(|o| (o.outcome == Outcome::Ok, o.end_ms))
            .collect(),
    );
    let actor_acks = ok_ends(
        history
            .actors
            .iter()
            .map(|o| (o.outcome == Outcome::Ok, o.end_ms))
            .collect(),
    );
    let gap_d = checker::longest_gap(delta_acks, faults_from, faults_to);
    let gap_a = checker::longest_gap(actor_acks, faults_from, faults_to);
    for n in &all_nodes {
        leadership.lock().await.read_log(&procs.log_text(n));
    }
    for m in monitors {
        m.abort();
    }
    let leadership = leadership.lock().await;
    let split_terms = leadership.split_terms();
    let map_regressions = leadership.map_regressions();

    let mut failures = Vec::new();
    if let Err(e) = &healed {
        failures.push(format!(
            "not settled at the end within {HEAL_LIMIT:?}: {e:#}"
        ));
    }
    for u in &unhealed {
        failures.push(format!("not healed within {HEAL_LIMIT:?}: {u}"));
    }
    let lost = deltas.lost + actors.lost;
    let doubled = deltas.doubled + actors.doubled;
    if lost > 0 {
        failures.push(format!(
            "{lost} acknowledged operations lost (deltas {}: {} not in the stream, the rest stored \
             but not in the tables; actor commands {})",
            deltas.lost, deltas.lost_in_stream, actors.lost
        ));
    }
    if doubled > 0 {
        failures.push(format!("{doubled} operations applied twice"));
    }
    if deltas.unreadable > 0 {
        failures.push(format!(
            "{} acknowledged delta operations unreadable after {CONVERGE_LIMIT:?}: {}",
            deltas.unreadable,
            deltas.read_error.as_deref().unwrap_or("")
        ));
    }
    if let Some(e) = &actors.read_error {
        failures.push(format!("histories unreadable: {e}"));
    }
    if actors.version_errors > 0 || actors.unknown > 0 {
        failures.push(format!(
            "actor histories: {} version errors, {} unknown events",
            actors.version_errors, actors.unknown
        ));
    }
    if !split_terms.is_empty() {
        failures.push(format!("several leaders in one term: {split_terms:?}"));
    }
    if !map_regressions.is_empty() {
        failures.push(format!("map writes out of order: {map_regressions:?}"));
    }
    if !procs.crashes.is_empty() {
        failures.push(format!("unexpected exits: {:?}", procs.crashes));
    }
    if deltas.acked + actors.acked == 0 {
        failures.push("nothing was acknowledged".into());
    }
    Ok(Report {
        scenario: String::new(),
        seed: args.seed,
        duration_s: args.duration.as_secs_f64(),
        nodes: args.nodes,
        network: String::new(),
        ok: failures.is_empty(),
        failures,
        acked: deltas.acked + actors.acked,
        indeterminate: deltas.indeterminate + actors.indeterminate,
        lost,
        doubled,
        faults,
        max_unavailable_ms: gap_d.max(gap_a),
        max_unavailable_deltas_ms: gap_d,
        max_unavailable_actors_ms: gap_a,
        heal_ms,
        leaders_per_term_ok: split_terms.is_empty(),
        terms_seen: leadership.leaders.len(),
        split_terms,
        map_regressions,
        slots_owned_by_live_nodes: healed.is_ok() && unhealed.is_empty(),
        crashes: procs.crashes.clone(),
        deltas,
        actors,
        dir: String::new(),
    })
}

/// Waits until the status shows a leader, no unowned slot, and exactly `nodes` owning slots,
/// each Active (every slot owned by a live node).
async fn wait_settled(
    procs: &mut Procs,
    js: &async_nats::jetstream::Context,
    nodes: &[String],
    limit: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = String::from("no status read");
    while started.elapsed() < limit {
        procs.check_exits();
        match tessel_node::status::read(js, procs::CLUSTER).await {
            Ok(s) => {
                let owners: Vec<String> = s.counts().keys().cloned().collect();
                let active = s.nodes.iter().filter(|n| n.status == "Active").count();
                if s.settled() && owners == nodes && active >= nodes.len() {
                    return Ok(());
                }
                last = format!(
                    "leader {:?}, unowned {}, owners {owners:?}, active {active}",
                    s.leader.map(|l| l.node),
                    s.unowned_slots
                );
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("not settled on {nodes:?} after {limit:?}: {last}")
}

/// Creates the workload's model and waits until it serves.
async fn create_model(client: &async_nats::Client) -> anyhow::Result<()> {
    let actors = tessel_node::client::ActorClient::new(client.clone(), procs::CLUSTER);
    let key = ActorKey::new("model", workload::MODEL)?;
    actors
        .ask(
            &key,
            &json!({"cmd": "create", "rows": workload::MODEL_ROWS, "dim": 1}),
            Duration::from_secs(30),
        )
        .await
        .context("creating the model")?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok((v, _)) = actors
            .ask(&key, &json!({"cmd": "describe"}), Duration::from_secs(10))
            .await
            && v["state"] == "Serving"
        {
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the model did not reach Serving within 60 s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_or_mean_seconds() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn every_fault_has_a_scenario_and_mixed_draws_from_all() {
        for f in nemesis::Fault::ALL {
            assert_ne!(f.name(), "?");
        }
        assert!(
            SCENARIOS
                .iter()
                .any(|(n, f, _)| *n == "mixed" && f.is_none())
        );
    }
}
