//! The nemesis: faults drawn from the seed, each injected, held, and healed.
//!
//! Every random choice (which fault, which target, how long) comes from the run's
//! [`SplitMix64`], so a seed replays the same schedule of choices; the moments at which they
//! happen follow the real processes and vary a little between runs.

use std::time::Duration;

use crate::net::HARNESS;
use crate::procs::{Kind, LEASE_TTL_MS, Procs};
use crate::rng::SplitMix64;

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 the leader, restart it later.
    LeaderKill,
    /// kill -9 a random node (two of five), restart later.
    NodeKill,
    /// SIGSTOP a node for longer than the lease TTL, then SIGCONT.
    Pause,
    /// kill -9 a NATS server, restart it later.
    NatsRestart,
    /// Cut one node from everything.
    PartitionOne,
    /// Cut a minority (one server, a minority of nodes) from the majority and the harness.
    PartitionMinority,
    /// Cut links one by one, restore them in random order.
    Links,
    /// Restart a node with a clock offset, later without.
    ClockSkew,
}

/// The scenarios: name, fault (None: mixed), whether partitions are needed, description.
pub const SCENARIOS: [(&str, Option<Fault>, &str); 9] = [
    (
        "leader-kill",
        Some(Fault::LeaderKill),
        "kill -9 the leader, restart it",
    ),
    (
        "node-kill",
        Some(Fault::NodeKill),
        "kill -9 random nodes, restart them",
    ),
    (
        "pause",
        Some(Fault::Pause),
        "SIGSTOP a node longer than the lease TTL, then SIGCONT",
    ),
    (
        "nats-restart",
        Some(Fault::NatsRestart),
        "kill -9 a NATS server, restart it",
    ),
    (
        "partition-one",
        Some(Fault::PartitionOne),
        "cut one node from everything (needs root)",
    ),
    (
        "partition-minority",
        Some(Fault::PartitionMinority),
        "split a minority of servers and nodes from the majority (needs root)",
    ),
    (
        "links",
        Some(Fault::Links),
        "cut links one by one, restore them in random order (needs root)",
    ),
    (
        "clock-skew",
        Some(Fault::ClockSkew),
        "restart a node with a clock offset, later without",
    ),
    ("mixed", None, "every fault above, drawn from the seed"),
];

impl Fault {
    /// Every fault.
    pub const ALL: [Fault; 8] = [
        Fault::LeaderKill,
        Fault::NodeKill,
        Fault::Pause,
        Fault::NatsRestart,
        Fault::PartitionOne,
        Fault::PartitionMinority,
        Fault::Links,
        Fault::ClockSkew,
    ];

    /// Its scenario name.
    pub fn name(self) -> &'static str {
        SCENARIOS
            .iter()
            .find(|(_, f, _)| *f == Some(self))
            .map_or("?", |(n, _, _)| n)
    }

    /// Whether it needs network namespaces.
    pub fn needs_netns(self) -> bool {
        matches!(
            self,
            Fault::PartitionOne | Fault::PartitionMinority | Fault::Links
        )
    }
}

/// One injected fault.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FaultRecord {
    /// The fault's scenario name.
    pub kind: &'static str,
    /// What it hit.
    pub targets: Vec<String>,
    /// Details (offsets, cut links).
    pub detail: String,
    /// When it began (ms since the start of the run).
    pub start_ms: u64,
    /// When it was healed.
    pub healed_ms: u64,
    /// From the heal until every node was Active again and owned slots (None: not within the
    /// bound).
    pub heal_ms: Option<u64>,
}

/// Sleeps `ms`, noting unexpected exits every second.
async fn hold(procs: &mut Procs, ms: u64) {
    let mut left = ms;
    while left > 0 {
        let step = left.min(1_000);
        tokio::time::sleep(Duration::from_millis(step)).await;
        left -= step;
        procs.check_exits();
    }
}

/// The current leader by the status, if readable.
async fn leader(js: &async_nats::jetstream::Context) -> Option<String> {
    tessel_node::status::read(js, crate::procs::CLUSTER)
        .await
        .ok()
        .and_then(|s| s.leader.map(|l| l.node))
}

/// Injects one fault, holds it, heals it.
pub async fn inject(
    fault: Fault,
    procs: &mut Procs,
    js: &async_nats::jetstream::Context,
    rng: &mut SplitMix64,
) -> anyhow::Result<FaultRecord> {
    let nodes = procs.names(Kind::Node);
    let servers = procs.names(Kind::Nats);
    let start_ms = procs.now_ms();
    let mut targets = Vec::new();
    let mut detail = String::new();
    match fault {
        Fault::LeaderKill => {
            // The draw happens whether or not a leader is found, to keep the schedule.
            let fallback = nodes[rng.index(nodes.len())].clone();
            let down_ms = rng.range(1_000, 5_000);
            let target = leader(js).await.unwrap_or_else(|| {
                detail = "no leader readable; killed a random node".into();
                fallback
            });
            procs.kill9(&target).await?;
            hold(procs, down_ms).await;
            procs.spawn(&target)?;
            targets.push(target);
        }
        Fault::NodeKill => {
            let mut pool = nodes.clone();
            rng.shuffle(&mut pool);
            let k = rng.range(1, ((nodes.len() - 1) / 2) as u64) as usize;
            let down_ms = rng.range(1_000, 6_000);
            targets = pool.into_iter().take(k).collect();
            for t in &targets {
                procs.kill9(t).await?;
            }
            hold(procs, down_ms).await;
            for t in &targets {
                procs.spawn(t)?;
            }
        }
        Fault::Pause => {
            let prefer_leader = rng.below(2) == 0;
            let fallback = nodes[rng.index(nodes.len())].clone();
            let paused_ms = LEASE_TTL_MS + rng.range(1_000, 4_000);
            let target = if prefer_leader {
                leader(js).await.unwrap_or(fallback)
            } else {
                fallback
            };
            procs.pause(&target)?;
            hold(procs, paused_ms).await;
            procs.resume(&target)?;
            detail = format!("paused {paused_ms} ms (lease TTL {LEASE_TTL_MS} ms)");
            targets.push(target);
        }
        Fault::NatsRestart => {
            let target = servers[rng.index(servers.len())].clone();
            let down_ms = rng.range(1_000, 6_000);
            procs.kill9(&target).await?;
            hold(procs, down_ms).await;
            restart_nats(procs, &target).await?;
            targets.push(target);
        }
        Fault::PartitionOne => {
            let target = nodes[rng.index(nodes.len())].clone();
            let cut_ms = rng.range(3_000, 14_000);
            let mut others: Vec<String> = servers.iter().chain(&nodes).cloned().collect();
            others.push(HARNESS.into());
            for o in others.iter().filter(|o| **o != target) {
                procs.net.cut(&target, o)?;
            }
            hold(procs, cut_ms).await;
            procs.net.heal_all();
            detail = format!("isolated for {cut_ms} ms");
            targets.push(target);
        }
        Fault::PartitionMinority => {
            let server = servers[rng.index(servers.len())].clone();
            let mut pool = nodes.clone();
            rng.shuffle(&mut pool);
            let k = rng.range(1, ((nodes.len() - 1) / 2) as u64) as usize;
            let cut_ms = rng.range(3_000, 14_000);
            let minority: Vec<String> = std::iter::once(server)
                .chain(pool.into_iter().take(k))
                .collect();
            let mut majority: Vec<String> = servers
                .iter()
                .chain(&nodes)
                .filter(|x| !minority.contains(x))
                .cloned()
                .collect();
            majority.push(HARNESS.into());
            for a in &minority {
                for b in &majority {
                    procs.net.cut(a, b)?;
                }
            }
            hold(procs, cut_ms).await;
            procs.net.heal_all();
            detail = format!("minority cut for {cut_ms} ms");
            targets = minority;
        }
        Fault::Links => {
            let hosts: Vec<String> = servers.iter().chain(&nodes).cloned().collect();
            let mut links = Vec::new();
            for (i, a) in hosts.iter().enumerate() {
                for b in &hosts[i + 1..] {
                    // Node-to-node links carry nothing; the links that matter touch a server.
                    if a.starts_with("nats") || b.starts_with("nats") {
                        links.push((a.clone(), b.clone()));
                    }
                }
            }
            rng.shuffle(&mut links);
            let k = rng.range(2, (links.len() / 2) as u64) as usize;
            let mut cut: Vec<(String, String)> = links.into_iter().take(k).collect();
            let hold_ms = rng.range(2_000, 8_000);
            for (a, b) in &cut {
                procs.net.cut(a, b)?;
                let gap = rng.range(300, 1_500);
                hold(procs, gap).await;
            }
            hold(procs, hold_ms).await;
            rng.shuffle(&mut cut);
            for (a, b) in &cut {
                procs.net.heal(a, b);
                let gap = rng.range(300, 1_500);
                hold(procs, gap).await;
            }
            targets = cut.iter().map(|(a, b)| format!("{a}-{b}")).collect();
            detail = format!("{k} links cut one by one, restored in the order listed");
        }
        Fault::ClockSkew => {
            let target = nodes[rng.index(nodes.len())].clone();
            let magnitude = rng.range(1_000, 600_000) as i64;
            let offset = if rng.below(2) == 0 {
                magnitude
            } else {
                -magnitude
            };
            let skewed_ms = rng.range(4_000, 10_000);
            procs.stop(&target, Duration::from_secs(15)).await?;
            procs.set_clock_offset(&target, offset)?;
            procs.spawn(&target)?;
            hold(procs, skewed_ms).await;
            procs.stop(&target, Duration::from_secs(15)).await?;
            procs.set_clock_offset(&target, 0)?;
            procs.spawn(&target)?;
            detail = format!("clock_offset_ms = {offset} for {skewed_ms} ms");
            targets.push(target);
        }
    }
    Ok(FaultRecord {
        kind: fault.name(),
        targets,
        detail,
        start_ms,
        healed_ms: procs.now_ms(),
        heal_ms: None,
    })
}

/// Restarts a NATS server, retrying while it exits at once (its port still held).
pub async fn restart_nats(procs: &mut Procs, name: &str) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..10 {
        procs.spawn(name)?;
        match procs.wait_listening(name, Duration::from_secs(5)).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                last = Some(e);
                procs.kill9(name).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{name} did not restart")))
}

/// Undoes whatever is still in force: resumes paused processes, heals cuts, restarts the dead.
pub async fn heal_everything(procs: &mut Procs) -> anyhow::Result<()> {
    for p in procs.paused() {
        procs.resume(&p)?;
    }
    procs.net.heal_all();
    for p in procs.down() {
        if p.starts_with("nats") {
            restart_nats(procs, &p).await?;
        } else {
            procs.spawn(&p)?;
        }
    }
    Ok(())
}
