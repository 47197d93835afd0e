//! `tessel up`: a local cluster — NATS server(s) with JetStream on free loopback ports, data
//! under `.tessel/`, and N nodes as child processes; prints the live status; on Ctrl-C (or after
//! `--duration-s`) drains the nodes, stops the servers, and leaves no process behind.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::validate_cluster_name;
use crate::metrics::Metrics;
use crate::natsd::{NatsCluster, NatsOptions, find_nats_server};
use crate::procs::{NodeProc, NodeSpec, current_binary};

/// Arguments of `tessel up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// How many NATS servers (1, or 3 for a replicated cluster).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=3))]
    servers: u16,
    /// The cluster name.
    #[arg(long, default_value = "tessel")]
    cluster: String,
    /// Where data and logs go.
    #[arg(long, default_value = ".tessel")]
    dir: PathBuf,
    /// Stop by itself after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration_s: u64,
    /// Seconds between status prints.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    status_every_s: u64,
    /// The demo workload's rate in rows per second, once the cluster settles (0: no demo).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    demo_rate: u64,
    /// The demo model's name.
    #[arg(long, default_value = "demo")]
    demo_model: String,
}

/// Runs `tessel up`.
pub fn run(args: UpArgs) -> ExitCode {
    if let Err(e) = validate_cluster_name(&args.cluster) {
        eprintln!("tessel up: {e}");
        return ExitCode::from(2);
    }
    if args.servers == 2 {
        eprintln!(
            "tessel up: --servers must be 1 or 3 (two servers cannot keep a JetStream quorum through a failure)"
        );
        return ExitCode::from(2);
    }
    if let Err(e) = actors::es::ActorKey::new("model", &args.demo_model) {
        eprintln!("tessel up: --demo-model: {e}");
        return ExitCode::from(2);
    }
    crate::cmd::node::init_tracing(crate::config::LogFormat::Text);
    let Some(rt) = crate::cmd::runtime("tessel up") else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(up(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessel up: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let binary = find_nats_server(true)?;
    let dir = std::path::absolute(&args.dir)?;
    let run_dir = dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    println!(
        "tessel up: starting {} NATS server(s) and {} node(s); data and logs in {}",
        args.servers,
        args.nodes,
        run_dir.display()
    );
    // The servers and nodes run in process groups of their own: a terminal's Ctrl-C reaches
    // only this process, which drains the nodes while the servers are still up, then stops them.
    // Should this process die without doing so, the guard does it.
    let bin = current_binary()?;
    let mut guard = Guard::start(&bin)?;
    let mut nats = NatsCluster::start(
        NatsOptions::new(run_dir.join("nats"), binary)
            .with_servers(usize::from(args.servers))
            .with_own_process_groups(),
    )
    .await?;
    let url = nats.url();
    println!("tessel up: NATS at {url}");
    for pid in (0..nats.len()).filter_map(|i| nats.pid(i)) {
        guard.tell(&format!("server {pid}")).await;
    }

    let replicas = if args.servers >= 3 { "3" } else { "1" };
    let mut nodes = Vec::new();
    let mut dashboards = Vec::new();
    for i in 1..=args.nodes {
        let id = format!("node-{i}");
        let http = format!("127.0.0.1:{}", crate::natsd::free_port()?);
        dashboards.push(format!("http://{http}/"));
        let spec = NodeSpec {
            bin: bin.clone(),
            id: id.clone(),
            nats: url.clone(),
            cluster: args.cluster.clone(),
            env: vec![("TESSEL_REPLICAS".into(), replicas.into())],
            args: vec!["--http".into(), http],
            log: run_dir.join(format!("{id}.log")),
            own_process_group: true,
        };
        let node = NodeProc::spawn(spec)?;
        if let Some(pid) = node.pid() {
            guard.tell(&format!("node {pid}")).await;
        }
        nodes.push(node);
    }
    println!(
        "tessel up: nodes started; status below (also: tessel status --nats {url} --cluster {})",
        args.cluster
    );
    if let Some(first) = dashboards.first() {
        println!("tessel up: dashboard at {first} (metrics at {first}metrics)");
        if dashboards.len() > 1 {
            println!("tessel up: every node serves one: {}", dashboards.join(" "));
        }
    }
    println!("tessel up: press Ctrl-C to stop everything");

    let client = crate::connect::connect(
        &crate::config::NodeConfig {
            nats_urls: crate::config::split_urls(&url),
            ..Default::default()
        },
        "tessel-up",
        Arc::new(Metrics::default()),
    )
    .await?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(crate::status::POLL_REQUEST_TIMEOUT)
        .build(client.clone());
    let mut demo: Option<crate::demo::Demo> = None;
    let mut demo_failed = false;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // A closed terminal: its hangup no longer reaches the children (own groups), so this
    // process stops them as for Ctrl-C.
    let mut hup = signal(SignalKind::hangup())?;
    let started = Instant::now();
    let until = (args.duration_s > 0).then(|| started + Duration::from_secs(args.duration_s));
    let mut every = tokio::time::interval(Duration::from_secs(args.status_every_s));
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => break,
            _ = every.tick() => {
                match crate::status::read(&js, &args.cluster).await {
                    Ok(s) => {
                        let table = s.table();
                        // Print when something other than the lease's countdown changed.
                        let key = format!("{:?}{:?}{}{}", s.leader.as_ref().map(|l| (&l.node, l.term)), s.nodes, s.map_epoch, s.unowned_slots);
                        if key != last {
                            println!("--- {:.1}s{}", started.elapsed().as_secs_f64(), if s.settled() { "  (settled)" } else { "" });
                            print!("{table}");
                            last = key;
                        }
                        if s.settled() && demo.is_none() && !demo_failed && args.demo_rate > 0 {
                            let opts = crate::demo::DemoOptions {
                                model: args.demo_model.clone(),
                                rate_rows_per_s: args.demo_rate,
                                ..Default::default()
                            };
                            println!("tessel up: demo: model {} ({} rows × {}), producing {} rows/s", opts.model, opts.rows, opts.dim, opts.rate_rows_per_s);
                            match crate::demo::Demo::start(&client, &args.cluster, opts).await {
                                Ok(d) => demo = Some(d),
                                Err(e) => {
                                    println!("tessel up: demo could not start: {e:#}");
                                    demo_failed = true;
                                }
                            }
                        } else if let Some(d) = demo.as_mut() {
                            println!("demo: {}: {}", args.demo_model, d.report());
                            if let Some(e) = d.last_error() {
                                println!("demo: last send error: {e}");
                            }
                        }
                    }
                    Err(e) => println!("--- {:.1}s  waiting for the cluster: {e}", started.elapsed().as_secs_f64()),
                }
                for n in &mut nodes {
                    if let Some(status) = n.exited() {
                        println!("tessel up: {} exited ({status}); see {}", n.spec.id, n.log().display());
                    }
                }
                if until.is_some_and(|u| Instant::now() >= u) {
                    break;
                }
            }
        }
    }
    if let Some(d) = demo.take() {
        let mut d = d;
        println!("demo: {}: final: {}", args.demo_model, d.report());
        d.stop();
    }
    println!("tessel up: stopping: draining the nodes");
    let stops = nodes.iter_mut().map(|n| n.stop(Duration::from_secs(15)));
    let results = futures::future::join_all(stops).await;
    for (n, r) in nodes.iter().zip(results) {
        match r {
            Some(s) => println!("tessel up: {} exited ({s})", n.spec.id),
            None => println!(
                "tessel up: {} did not drain in time and was killed",
                n.spec.id
            ),
        }
    }
    nats.stop().await?;
    guard.done().await;
    println!("tessel up: stopped; nothing left running");
    Ok(())
}

/// The guard process (`tessel guard`, see `cmd/guard.rs`): told each process group this
/// process starts, it stops them if this process ends without doing so.
struct Guard {
    child: tokio::process::Child,
    input: Option<tokio::process::ChildStdin>,
}

impl Guard {
    /// Starts the guard, in a process group of its own (a terminal's Ctrl-C is for
    /// `tessel up`, which stops everything itself).
    fn start(bin: &std::path::Path) -> std::io::Result<Guard> {
        let mut child = tokio::process::Command::new(bin)
            .arg("guard")
            .process_group(0)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let input = child.stdin.take();
        Ok(Guard { child, input })
    }

    /// Tells the guard one line; if it cannot be told (it has died), says so once.
    async fn tell(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        let Some(input) = self.input.as_mut() else {
            return;
        };
        if let Err(e) = input.write_all(format!("{line}\n").as_bytes()).await {
            println!(
                "tessel up: the guard is gone ({e}); a killed tessel up would leave its processes behind"
            );
            self.input = None;
        }
    }

    /// Everything is stopped: the guard exits without doing anything.
    async fn done(mut self) {
        self.tell("done").await;
        self.input = None;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
