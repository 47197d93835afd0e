//! The simulated world: nodes, links, the KV server, the nemesis, and the checker.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::core::{
    self, Action, Command, CoreConfig, Event, Gone, Input, KvOutcome, LeaseEntry, MapOutcome, OpId,
    PlantedBug, State,
};
use crate::invariants;
use crate::shard_map::ShardMap;
use crate::sim::kv::{Change, Key, Kv, Op, Value};
use crate::sim::rng::Rng;
use crate::types::{NodeId, NodeStatus, Revision, Term, Weight};

/// Most nodes a simulation runs.
pub const MAX_NODES: usize = 16;
/// Most steps a simulation runs in its fault phase.
pub const MAX_STEPS: u64 = 10_000_000;
/// How often (in simulated ms) every node gets a timer tick.
const TICK_MS: u64 = 50;
/// Most messages a clogged link or a paused node holds; beyond it the oldest are dropped.
const HOLD_LIMIT: usize = 4_096;
/// Most lines kept in a run's fault log.
const LOG_LIMIT: usize = 400;

/// What to simulate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// The seed: everything else follows from it.
    pub seed: u64,
    /// How many nodes.
    pub nodes: usize,
    /// Steps of the fault phase.
    pub steps: u64,
    /// Most steps allowed after healing for the cluster to settle.
    pub heal_steps: u64,
    /// The planted bug, if any (needs the `planted-bugs` feature).
    pub plant: Option<PlantedBug>,
    /// Log every command, event and action (for replaying one seed), up to [`VERBOSE_LOG_LIMIT`] lines.
    pub verbose: bool,
}

/// Most lines a verbose run logs.
pub const VERBOSE_LOG_LIMIT: usize = 20_000;

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            nodes: 5,
            steps: 1_000,
            heal_steps: 6_000,
            plant: None,
            verbose: false,
        }
    }
}

/// Why a simulation could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// The node count was out of range.
    #[error("nodes must be 1..={MAX_NODES}, got {0}")]
    Nodes(usize),
    /// The step count was out of range.
    #[error("steps must be 1..={MAX_STEPS}, got {0}")]
    Steps(u64),
    /// The core configuration was refused.
    #[error("core configuration: {0}")]
    Config(#[from] core::ConfigError),
}

/// The fault parameters of one run, all drawn from its seed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FaultPlan {
    /// Chance per message of being dropped, per mille.
    pub drop_per_mille: u64,
    /// Chance per message of being delivered twice, per mille.
    pub dup_per_mille: u64,
    /// Smallest one-way delay, ms.
    pub delay_min_ms: u64,
    /// Largest one-way delay, ms (messages overtake each other within this range).
    pub delay_max_ms: u64,
    /// Time between two faults, ms (lower and upper bound).
    pub fault_gap_ms: (u64, u64),
    /// Relative weights of partition, swizzle, crash, pause, drain, pause-at-write, garbage.
    pub weights: [u64; 7],
    /// Largest clock offset of a node, ms.
    pub skew_max_ms: u64,
    /// How many crashed nodes stay dead after healing, at most.
    pub permanent_deaths: usize,
}

impl FaultPlan {
    fn draw(rng: &mut Rng, nodes: usize) -> FaultPlan {
        let delay_min_ms = rng.range(0, 2);
        let mut weights = [0; 7];
        for w in &mut weights {
            *w = rng.range(0, 4);
        }
        if weights.iter().all(|&w| w == 0) {
            weights[rng.below(7)] = 1;
        }
        let gap_lo = rng.range(100, 800);
        FaultPlan {
            drop_per_mille: rng.range(0, 30),
            dup_per_mille: rng.range(0, 30),
            delay_min_ms,
            delay_max_ms: delay_min_ms + rng.range(1, 60),
            fault_gap_ms: (gap_lo, gap_lo + rng.range(100, 1500)),
            weights,
            skew_max_ms: rng.range(0, 5_000),
            permanent_deaths: rng.below(nodes.saturating_sub(1) / 2 + 1),
        }
    }
}

/// What a run found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Steps executed, faults and healing together.
    pub steps: u64,
    /// Simulated time at the end, ms.
    pub sim_ms: u64,
    /// Faults injected.
    pub faults: u64,
    /// Commands the cores refused (stale or duplicate input: expected under faults).
    pub rejections: u64,
    /// Every invariant violation, in order (empty for a clean run).
    pub violations: Vec<String>,
    /// A hash of everything that happened: equal for two runs of one seed.
    pub trace: u64,
    /// Steps after healing until the cluster settled (None if it did not).
    pub settled_after: Option<u64>,
    /// The fault plan.
    pub plan: FaultPlan,
    /// What the nemesis did, with times.
    pub log: Vec<String>,
}

/// Runs one seed to the end: the fault phase, then healing until the cluster settles or the
/// heal budget runs out.
pub fn run(cfg: &SimConfig) -> Result<Report, SimError> {
    if !(1..=MAX_NODES).contains(&cfg.nodes) {
        return Err(SimError::Nodes(cfg.nodes));
    }
    if !(1..=MAX_STEPS).contains(&cfg.steps) {
        return Err(SimError::Steps(cfg.steps));
    }
    let core_cfg = sim_core_config(cfg.plant);
    core_cfg.validate()?;
    let mut world = World::new(cfg, core_cfg);
    world.run();
    Ok(world.report())
}

/// The cores' configuration in the simulator: the shortest timings NATS accepts, so that a
/// thousand steps cover several lease lifetimes.
fn sim_core_config(plant: Option<PlantedBug>) -> CoreConfig {
    CoreConfig {
        lease_ttl_ms: 1_000,
        lease_renew_interval_ms: 300,
        lease_margin_ms: 100,
        member_ttl_ms: 1_000,
        heartbeat_interval_ms: 300,
        request_timeout_ms: 300,
        sync_interval_ms: 500,
        drain_timeout_ms: 5_000,
        max_members: 64,
        plant,
    }
}

/// Which way a link carries messages.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
enum Dir {
    /// Node to server.
    Up,
    /// Server to node.
    Down,
}

#[derive(Clone, Debug, Default)]
enum Link {
    #[default]
    Open,
    /// Messages are lost.
    Cut,
    /// Messages wait until the link is restored.
    Clogged(Vec<Item>),
}

/// What a request is, so that its answer becomes the right command.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Tag {
    Heartbeat(OpId),
    Lease(OpId),
    Map(OpId),
    ReadLease,
    ReadMap,
    ReadMembers,
    DeleteMember,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Request {
    Get(Key),
    ListMembers,
    Put {
        key: Key,
        value: Value,
        ttl_ms: Option<u64>,
        expected: Option<u64>,
    },
    Delete {
        key: Key,
        expected: Option<u64>,
    },
    WriteMap {
        map: ShardMap,
        expected: u64,
        lease_revision: Option<u64>,
        holder: NodeId,
        ttl_ms: u64,
    },
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Response {
    Entry {
        value: Option<Value>,
        revision: u64,
        created: u64,
    },
    Members {
        entries: Vec<(NodeId, core::MemberInfo, u64)>,
        as_of: u64,
    },
    Written {
        revision: u64,
    },
    WrittenMap {
        map_revision: u64,
        lease_revision: u64,
    },
    Refused,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Item {
    Tick {
        node: usize,
        inc: u32,
    },
    ToKv {
        node: usize,
        inc: u32,
        tag: Tag,
        req: Request,
    },
    Reply {
        node: usize,
        inc: u32,
        tag: Tag,
        resp: Response,
    },
    Watch {
        node: usize,
        inc: u32,
        change: Change,
    },
    Expire,
    Nemesis,
    Resume {
        node: usize,
        inc: u32,
    },
    Restart {
        node: usize,
    },
    Restore {
        node: usize,
        dir: Dir,
    },
}

impl Item {
    fn target(&self) -> Option<(usize, Dir)> {
        match self {
            Item::ToKv { node, .. } => Some((*node, Dir::Up)),
            Item::Reply { node, .. } | Item::Watch { node, .. } => Some((*node, Dir::Down)),
            _ => None,
        }
    }
}

struct Node {
    id: NodeId,
    state: Option<State>,
    inc: u32,
    offset_ms: u64,
    paused: bool,
    held_in: Vec<Item>,
    held_out: Vec<Item>,
    up: Link,
    down: Link,
    dead_for_good: bool,
    pause_at_write: bool,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Queued {
    at_ms: u64,
    seq: u64,
}

struct World {
    cfg: SimConfig,
    core_cfg: CoreConfig,
    plan: FaultPlan,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(Queued, usize)>>,
    items: BTreeMap<usize, Item>,
    next_item: usize,
    nodes: Vec<Node>,
    kv: Kv,
    expiry_scheduled: Option<u64>,
    steps: u64,
    healing: Option<u64>,
    settled_after: Option<u64>,
    faults: u64,
    rejections: u64,
    violations: Vec<String>,
    trace: u64,
    log: Vec<String>,
    leaders: BTreeMap<Term, NodeId>,
    max_term: Term,
    last_lease_holder: Option<NodeId>,
    last_epoch: u64,
    permanent_left: usize,
}

impl World {
    fn new(cfg: &SimConfig, core_cfg: CoreConfig) -> World {
        let mut rng = Rng::new(cfg.seed);
        let plan = FaultPlan::draw(&mut rng, cfg.nodes);
        let nodes = (0..cfg.nodes)
            .map(|i| Node {
                id: NodeId::new(&format!("n{i}"))
                    .unwrap_or_else(|_| unreachable!("n<digits> is a valid id")),
                state: None,
                inc: 0,
                offset_ms: 0,
                paused: false,
                held_in: Vec::new(),
                held_out: Vec::new(),
                up: Link::Open,
                down: Link::Open,
                dead_for_good: false,
                pause_at_write: false,
            })
            .collect();
        let permanent_left = plan.permanent_deaths;
        let mut w = World {
            cfg: cfg.clone(),
            core_cfg,
            plan,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            items: BTreeMap::new(),
            next_item: 0,
            nodes,
            kv: Kv::default(),
            expiry_scheduled: None,
            steps: 0,
            healing: None,
            settled_after: None,
            faults: 0,
            rejections: 0,
            violations: Vec::new(),
            trace: 0,
            log: Vec::new(),
            leaders: BTreeMap::new(),
            max_term: Term(0),
            last_lease_holder: None,
            last_epoch: 0,
            permanent_left,
        };
        for i in 0..cfg.nodes {
            let at = w.rng.range(0, 200);
            w.schedule(at, Item::Restart { node: i });
        }
        let first = w.rng.range(w.plan.fault_gap_ms.0, w.plan.fault_gap_ms.1);
        w.schedule(first, Item::Nemesis);
        w
    }

    fn report(self) -> Report {
        Report {
            seed: self.cfg.seed,
            steps: self.steps,
            sim_ms: self.now,
            faults: self.faults,
            rejections: self.rejections,
            violations: self.violations,
            trace: self.trace,
            settled_after: self.settled_after,
            plan: self.plan,
            log: self.log,
        }
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        let limit = if self.cfg.verbose {
            VERBOSE_LOG_LIMIT
        } else {
            LOG_LIMIT
        };
        if self.log.len() < limit {
            let text = line();
            self.log
                .push(format!("t={}ms step={}: {}", self.now, self.steps, text));
        }
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations
                .push(format!("t={}ms step={}: {}", self.now, self.steps, what));
        }
    }

    fn schedule(&mut self, delay_ms: u64, item: Item) {
        self.seq += 1;
        let key = self.next_item;
        self.next_item += 1;
        self.items.insert(key, item);
        self.queue.push(Reverse((
            Queued {
                at_ms: self.now + delay_ms,
                seq: self.seq,
            },
            key,
        )));
    }

    fn mix(&mut self, value: impl Hash) {
        let mut h = DefaultHasher::new();
        self.trace.hash(&mut h);
        value.hash(&mut h);
        self.trace = h.finish();
    }

    fn run(&mut self) {
        let budget = self.cfg.steps + self.cfg.heal_steps;
        while self.steps < budget {
            if self.healing.is_none() && self.steps >= self.cfg.steps {
                self.heal();
            }
            let Some(Reverse((q, key))) = self.queue.pop() else {
                break;
            };
            let Some(item) = self.items.remove(&key) else {
                continue;
            };
            self.now = self.now.max(q.at_ms);
            self.steps += 1;
            self.mix((self.now, &item));
            self.process(item);
            self.check_acting();
            if let Some(healed_at) = self.healing
                && (self.steps - healed_at).is_multiple_of(8)
                && self.settled().is_ok()
            {
                self.settled_after = Some(self.steps - healed_at);
                return;
            }
        }
        if self.healing.is_none() {
            self.heal();
        }
        if let Err(why) = self.settled() {
            let heal = self.cfg.heal_steps;
            self.violation(format!(
                "liveness: not settled within {heal} steps after healing: {why}"
            ));
        }
    }

    fn local_now(&self, i: usize) -> u64 {
        self.now + self.nodes[i].offset_ms
    }

    // ---- the network -------------------------------------------------------------------

    fn send(&mut self, item: Item) {
        let Some((node, dir)) = item.target() else {
            return;
        };
        let link = match dir {
            Dir::Up => &mut self.nodes[node].up,
            Dir::Down => &mut self.nodes[node].down,
        };
        match link {
            Link::Cut => return,
            Link::Clogged(held) => {
                if held.len() < HOLD_LIMIT {
                    held.push(item);
                }
                return;
            }
            Link::Open => {}
        }
        if self.rng.chance(self.plan.drop_per_mille) {
            return;
        }
        if self.rng.chance(self.plan.dup_per_mille) {
            let d = self
                .rng
                .range(self.plan.delay_min_ms, self.plan.delay_max_ms);
            self.schedule(d, item.clone());
        }
        let d = self
            .rng
            .range(self.plan.delay_min_ms, self.plan.delay_max_ms);
        self.schedule(d, item);
    }

    fn broadcast(&mut self, changes: Vec<Change>) {
        for change in changes {
            for i in 0..self.nodes.len() {
                if self.nodes[i].state.is_some() {
                    let inc = self.nodes[i].inc;
                    self.send(Item::Watch {
                        node: i,
                        inc,
                        change: change.clone(),
                    });
                }
            }
        }
        self.schedule_expiry();
    }

    fn schedule_expiry(&mut self) {
        if let Some(at) = self.kv.next_expiry()
            && self.expiry_scheduled.is_none_or(|s| s > at)
        {
            self.expiry_scheduled = Some(at);
            self.schedule(at.saturating_sub(self.now), Item::Expire);
        }
    }

    // ---- processing ----------------------------------------------------------------------

    fn process(&mut self, item: Item) {
        match item {
            Item::Tick { node, inc } => {
                if self.nodes[node].inc != inc || self.nodes[node].state.is_none() {
                    return;
                }
                self.schedule(TICK_MS, Item::Tick { node, inc });
                if !self.nodes[node].paused {
                    self.command(node, Input::Tick);
                }
            }
            Item::ToKv {
                node,
                inc,
                tag,
                req,
            } => self.serve(node, inc, tag, req),
            Item::Reply { node, inc, .. } | Item::Watch { node, inc, .. } => {
                if self.nodes[node].inc != inc || self.nodes[node].state.is_none() {
                    return;
                }
                if self.nodes[node].paused {
                    if self.nodes[node].held_in.len() < HOLD_LIMIT {
                        self.nodes[node].held_in.push(item);
                    }
                    return;
                }
                let input = match item {
                    Item::Reply { tag, resp, .. } => reply_input(tag, resp),
                    Item::Watch { change, .. } => Some(watch_input(change)),
                    _ => None,
                };
                if let Some(input) = input {
                    self.command(node, input);
                }
            }
            Item::Expire => {
                self.expiry_scheduled = None;
                let changes = self.kv.expire(self.now);
                self.broadcast(changes);
            }
            Item::Nemesis => {
                if self.healing.is_none() {
                    self.nemesis();
                    let gap = self
                        .rng
                        .range(self.plan.fault_gap_ms.0, self.plan.fault_gap_ms.1);
                    self.schedule(gap, Item::Nemesis);
                }
            }
            Item::Resume { node, inc } => {
                if self.nodes[node].inc == inc {
                    self.resume(node);
                }
            }
            Item::Restart { node } => self.restart(node),
            Item::Restore { node, dir } => self.restore(node, dir),
        }
    }

    /// Hands one input to a node's core, performs its actions, and checks its invariants.
    fn command(&mut self, i: usize, input: Input) {
        let now_ms = self.local_now(i);
        let Some(state) = self.nodes[i].state.as_mut() else {
            return;
        };
        let verbose = self.cfg.verbose.then(|| format!("{input:?}"));
        let result = core::step(state, &Command { now_ms, input });
        let check = invariants::check(state);
        if let Some(input) = verbose {
            let id = self.nodes[i].id.clone();
            let outcome = match &result {
                Ok(step) => format!("events {:?} actions {:?}", step.events, step.actions),
                Err(r) => format!("refused: {r}"),
            };
            self.note(|| format!("{id} @{now_ms} {input} => {outcome}"));
        }
        match result {
            Err(_) => self.rejections += 1,
            Ok(step) => {
                for ev in &step.events {
                    self.mix(ev);
                    if let Event::LeaderElected { term, .. } = ev {
                        let id = self.nodes[i].id.clone();
                        if let Some(other) = self.leaders.get(term).filter(|o| **o != id) {
                            let other = other.clone();
                            self.violation(format!(
                                "I1: term {} has two leaders, {other} and {id}",
                                term.0
                            ));
                        }
                        self.leaders.insert(*term, id);
                    }
                }
                for action in step.actions {
                    self.perform(i, action);
                }
            }
        }
        if let Err(v) = check {
            let id = self.nodes[i].id.clone();
            self.violation(format!("{id}: {v}"));
        }
    }

    fn perform(&mut self, i: usize, action: Action) {
        let (me, inc) = (self.nodes[i].id.clone(), self.nodes[i].inc);
        let (lease_ttl, member_ttl) = (self.core_cfg.lease_ttl_ms, self.core_cfg.member_ttl_ms);
        let (tag, req) = match action {
            Action::PutMember { op, info } => (
                Tag::Heartbeat(op),
                Request::Put {
                    key: Key::Member(me),
                    value: Value::Member(info),
                    ttl_ms: Some(member_ttl),
                    expected: None,
                },
            ),
            Action::DeleteMember => (
                Tag::DeleteMember,
                Request::Delete {
                    key: Key::Member(me),
                    expected: None,
                },
            ),
            Action::ReadLease => (Tag::ReadLease, Request::Get(Key::Lease)),
            Action::ReadMap => (Tag::ReadMap, Request::Get(Key::Map)),
            Action::ReadMembers => (Tag::ReadMembers, Request::ListMembers),
            Action::AcquireLease { op, expected } => (
                Tag::Lease(op),
                Request::Put {
                    key: Key::Lease,
                    value: Value::Lease {
                        holder: me,
                        term: None,
                    },
                    ttl_ms: Some(lease_ttl),
                    expected: Some(expected.0),
                },
            ),
            Action::RenewLease { op, term, expected } => {
                self.maybe_pause_at_write(i);
                (
                    Tag::Lease(op),
                    Request::Put {
                        key: Key::Lease,
                        value: Value::Lease {
                            holder: me,
                            term: Some(term),
                        },
                        ttl_ms: Some(lease_ttl),
                        expected: expected.map(|r| r.0),
                    },
                )
            }
            Action::ReleaseLease { op, expected } => (
                Tag::Lease(op),
                Request::Delete {
                    key: Key::Lease,
                    expected: Some(expected.0),
                },
            ),
            Action::WriteMap {
                op,
                map,
                expected,
                lease_revision,
                fenced,
            } => {
                self.maybe_pause_at_write(i);
                (
                    Tag::Map(op),
                    Request::WriteMap {
                        map,
                        expected: expected.0,
                        lease_revision: fenced.then_some(lease_revision.0),
                        holder: me,
                        ttl_ms: lease_ttl,
                    },
                )
            }
            Action::Exit => {
                self.node_exited(i);
                return;
            }
            Action::StartSlots(_) | Action::StopSlots(_) | Action::Announce(_) => return,
        };
        let item = Item::ToKv {
            node: i,
            inc,
            tag,
            req,
        };
        if self.nodes[i].paused {
            self.nodes[i].held_out.push(item);
        } else {
            self.send(item);
        }
    }

    /// A process pause that strikes right after a leader decided to write, before the write
    /// leaves: the classic stale-leader scenario.
    fn maybe_pause_at_write(&mut self, i: usize) {
        if self.nodes[i].pause_at_write && !self.nodes[i].paused && self.healing.is_none() {
            self.nodes[i].pause_at_write = false;
            let d = self.pause_length();
            let id = self.nodes[i].id.clone();
            self.note(|| format!("pause {id} at its write for {d}ms"));
            self.pause(i, d);
        }
    }

    fn node_exited(&mut self, i: usize) {
        let id = self.nodes[i].id.clone();
        self.note(|| format!("{id} drained and exited"));
        self.nodes[i].state = None;
        self.nodes[i].paused = false;
        let d = if self.healing.is_some() {
            10
        } else {
            self.rng.range(300, 3_000)
        };
        self.schedule(d, Item::Restart { node: i });
    }

    /// The KV server handles one request.
    fn serve(&mut self, node: usize, inc: u32, tag: Tag, req: Request) {
        let expired = self.kv.expire(self.now);
        self.broadcast(expired);
        let writer = self.nodes[node].id.clone();
        let (resp, changes) = match req {
            Request::Get(key) => {
                let (value, revision) = self.kv.get(&key);
                let created = self.kv.created(&key);
                (
                    Response::Entry {
                        value,
                        revision,
                        created,
                    },
                    Vec::new(),
                )
            }
            Request::ListMembers => (
                Response::Members {
                    entries: self.kv.members(),
                    as_of: self.kv.seq(),
                },
                Vec::new(),
            ),
            Request::Put {
                key,
                value,
                ttl_ms,
                expected,
            } => {
                let before = self.kv.lease();
                match self
                    .kv
                    .put(key.clone(), value, ttl_ms.map(|t| self.now + t), expected)
                {
                    Ok(change) => {
                        if key == Key::Lease {
                            self.check_lease_write(before, &change);
                        }
                        (
                            Response::Written {
                                revision: change.revision,
                            },
                            vec![change],
                        )
                    }
                    Err(_) => (Response::Refused, Vec::new()),
                }
            }
            Request::Delete { key, expected } => match self.kv.delete(key, expected) {
                Ok(change) => (
                    Response::Written {
                        revision: change.revision,
                    },
                    vec![change],
                ),
                Err(_) => (Response::Refused, Vec::new()),
            },
            Request::WriteMap {
                map,
                expected,
                lease_revision,
                holder,
                ttl_ms,
            } => {
                let before = self.kv.lease();
                let mut writes = Vec::new();
                if let Some(rev) = lease_revision {
                    let value = Value::Lease {
                        holder,
                        term: Some(map.term()),
                    };
                    writes.push((Key::Lease, value, Some(self.now + ttl_ms), Some(rev)));
                }
                writes.push((Key::Map, Value::Map(map.clone()), None, Some(expected)));
                match self.kv.batch(writes) {
                    Ok(changes) => {
                        let mut lease_revision = self.kv.get(&Key::Lease).1;
                        for c in &changes {
                            if c.key == Key::Lease {
                                self.check_lease_write(before.clone(), c);
                                lease_revision = c.revision;
                            }
                        }
                        let map_revision = changes.last().map_or(0, |c| c.revision);
                        self.check_map_write(&writer, &map);
                        (
                            Response::WrittenMap {
                                map_revision,
                                lease_revision,
                            },
                            changes,
                        )
                    }
                    Err(_) => (Response::Refused, Vec::new()),
                }
            }
        };
        if tag != Tag::DeleteMember {
            self.send(Item::Reply {
                node,
                inc,
                tag,
                resp,
            });
        }
        self.broadcast(changes);
    }

    // ---- the checker -----------------------------------------------------------------------

    /// A lease write may only extend its own holder's lease or create one where none is live,
    /// and a new holder's term must exceed every term before it.
    fn check_lease_write(&mut self, before: Option<(NodeId, Term)>, change: &Change) {
        let Some(Value::Lease { holder, term }) = &change.value else {
            return;
        };
        let term = term.unwrap_or(Term(change.revision));
        if let Some((prev, prev_term)) = &before
            && prev != holder
        {
            self.violation(format!(
                "lease of {prev} (term {}) overwritten by {holder} while live",
                prev_term.0
            ));
        }
        if self.last_lease_holder.as_ref() != Some(holder)
            && term <= self.max_term
            && before.is_none()
        {
            self.violation(format!(
                "lease taken by {holder} with term {} not above {}",
                term.0, self.max_term.0
            ));
        }
        self.max_term = self.max_term.max(term);
        self.last_lease_holder = Some(holder.clone());
    }

    /// Every map that lands must come from the live lease holder, under its term, with a higher
    /// epoch than the last.
    fn check_map_write(&mut self, writer: &NodeId, map: &ShardMap) {
        match self.kv.lease() {
            Some((holder, term)) if holder == *writer && term == map.term() => {}
            lease => self.violation(format!(
                "map epoch {} of term {} written by {writer}, but the lease is {lease:?}",
                map.epoch().0,
                map.term().0
            )),
        }
        if map.epoch().0 <= self.last_epoch {
            self.violation(format!(
                "map epoch {} written after epoch {}",
                map.epoch().0,
                self.last_epoch
            ));
        }
        self.last_epoch = self.last_epoch.max(map.epoch().0);
    }

    fn acting(&self, i: usize) -> Option<Term> {
        let n = &self.nodes[i];
        let s = n.state.as_ref()?;
        let l = s.leadership?;
        (!n.paused && self.local_now(i) < l.deadline_ms).then_some(l.term)
    }

    /// At most one node acts as leader at any instant.
    fn check_acting(&mut self) {
        let acting: Vec<(usize, Term)> = (0..self.nodes.len())
            .filter_map(|i| self.acting(i).map(|t| (i, t)))
            .collect();
        if acting.len() > 1 && !self.core_cfg.planted(PlantedBug::StaleLeaderWrite) {
            let names: Vec<String> = acting
                .iter()
                .map(|(i, t)| format!("{} (term {})", self.nodes[*i].id, t.0))
                .collect();
            self.violation(format!(
                "{} nodes act as leader at once: {}",
                acting.len(),
                names.join(", ")
            ));
        }
    }

    /// Settled: one live leader holds the lease, the map of its term puts every slot on a live
    /// Active node, and every live node is Active on that map.
    fn settled(&self) -> Result<(), String> {
        let Some((holder, term)) = self.kv.lease() else {
            return Err("no lease".into());
        };
        let Some(li) = self.nodes.iter().position(|n| n.id == holder) else {
            return Err(format!("lease held by unknown {holder}"));
        };
        if self.acting(li) != Some(term) {
            return Err(format!(
                "lease holder {holder} is not acting as leader of term {}",
                term.0
            ));
        }
        let (Some(Value::Map(map)), map_rev) = self.kv.get(&Key::Map) else {
            return Err("no map".into());
        };
        if map.term() != term {
            return Err(format!(
                "map is of term {}, lease of term {}",
                map.term().0,
                term.0
            ));
        }
        let mut live_active = Vec::new();
        for n in &self.nodes {
            match &n.state {
                Some(s)
                    if s.status == NodeStatus::Active && s.map_revision == Revision(map_rev) =>
                {
                    live_active.push(n.id.clone())
                }
                Some(s) => {
                    return Err(format!(
                        "{} is {:?} at map revision {}",
                        n.id, s.status, s.map_revision.0
                    ));
                }
                None if n.dead_for_good => {}
                None => return Err(format!("{} is down", n.id)),
            }
        }
        if let Some(bad) = map
            .owners()
            .iter()
            .find(|o| o.as_ref().is_none_or(|o| !live_active.contains(o)))
        {
            return Err(format!(
                "a slot is owned by {bad:?}, not a live Active node"
            ));
        }
        Ok(())
    }

    // ---- the nemesis -----------------------------------------------------------------------

    fn pause_length(&mut self) -> u64 {
        let ttl = self.core_cfg.lease_ttl_ms;
        self.rng.range(ttl + ttl / 5, ttl * 3)
    }

    fn nemesis(&mut self) {
        let total: u64 = self.plan.weights.iter().sum();
        let mut pick = self.rng.range(0, total.saturating_sub(1));
        let mut kind = 0;
        for (k, w) in self.plan.weights.iter().enumerate() {
            if pick < *w {
                kind = k;
                break;
            }
            pick -= w;
        }
        let i = self.rng.below(self.nodes.len());
        let id = self.nodes[i].id.clone();
        self.faults += 1;
        match kind {
            0 => {
                let d = self.rng.range(300, 3_000);
                self.note(|| format!("partition {id} away for {d}ms"));
                self.nodes[i].up = Link::Cut;
                self.nodes[i].down = Link::Cut;
                self.schedule(
                    d,
                    Item::Restore {
                        node: i,
                        dir: Dir::Up,
                    },
                );
                self.schedule(
                    d,
                    Item::Restore {
                        node: i,
                        dir: Dir::Down,
                    },
                );
            }
            1 => {
                // Swizzle: clog a random set of links one by one, then restore them in random order.
                let mut links: Vec<(usize, Dir)> = (0..self.nodes.len())
                    .flat_map(|n| [(n, Dir::Up), (n, Dir::Down)])
                    .collect();
                self.rng.shuffle(&mut links);
                links.truncate(self.rng.range(1, links.len() as u64) as usize);
                let mut at = 0;
                for &(n, dir) in &links {
                    at += self.rng.range(0, 200);
                    self.clog_at(n, dir, at);
                }
                let mut order = links.clone();
                self.rng.shuffle(&mut order);
                for &(n, dir) in &order {
                    at += self.rng.range(50, 600);
                    self.schedule(at, Item::Restore { node: n, dir });
                }
                let names: Vec<String> = links
                    .iter()
                    .map(|(n, d)| format!("{}{:?}", self.nodes[*n].id, d))
                    .collect();
                self.note(|| format!("swizzle-clog {} until +{at}ms", names.join(" ")));
            }
            2 => {
                if self.nodes[i].state.is_none() {
                    return;
                }
                let forever = self.permanent_left > 0 && self.rng.chance(300);
                self.note(|| format!("crash {id}{}", if forever { " for good" } else { "" }));
                self.crash(i);
                if forever {
                    self.permanent_left -= 1;
                    self.nodes[i].dead_for_good = true;
                } else {
                    let d = self.rng.range(200, 4_000);
                    self.schedule(d, Item::Restart { node: i });
                }
            }
            3 => {
                if self.nodes[i].state.is_none() || self.nodes[i].paused {
                    return;
                }
                let d = self.pause_length();
                self.note(|| format!("pause {id} for {d}ms"));
                self.pause(i, d);
            }
            4 => {
                if self.nodes[i].state.is_none() || self.nodes[i].paused {
                    return;
                }
                self.note(|| format!("drain {id}"));
                self.command(i, Input::Drain);
            }
            6 => {
                // A hostile or broken client writes bytes no node can read over a control key.
                let key = if self.rng.chance(500) {
                    Key::Lease
                } else {
                    Key::Map
                };
                self.note(|| format!("garbage written to {key:?}"));
                if let Ok(change) = self.kv.put(key, Value::Garbage, None, None) {
                    self.broadcast(vec![change]);
                }
            }
            _ => {
                // Arm a pause at the current leader's next lease or map write.
                if let Some(l) = (0..self.nodes.len()).find(|&n| self.acting(n).is_some()) {
                    let lid = self.nodes[l].id.clone();
                    self.note(|| format!("arm a pause at {lid}'s next write"));
                    self.nodes[l].pause_at_write = true;
                }
            }
        }
    }

    fn clog_at(&mut self, n: usize, dir: Dir, _at: u64) {
        // Clogging takes effect at once; the stagger is in the restore times.
        let link = match dir {
            Dir::Up => &mut self.nodes[n].up,
            Dir::Down => &mut self.nodes[n].down,
        };
        if matches!(link, Link::Open) {
            *link = Link::Clogged(Vec::new());
        }
    }

    fn restore(&mut self, n: usize, dir: Dir) {
        let link = match dir {
            Dir::Up => &mut self.nodes[n].up,
            Dir::Down => &mut self.nodes[n].down,
        };
        if let Link::Clogged(held) = std::mem::take(link) {
            for item in held {
                self.send(item);
            }
        }
    }

    fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.state = None;
        n.paused = false;
        n.held_in.clear();
        n.held_out.clear();
        n.pause_at_write = false;
    }

    fn pause(&mut self, i: usize, d: u64) {
        self.nodes[i].paused = true;
        let inc = self.nodes[i].inc;
        self.schedule(d, Item::Resume { node: i, inc });
    }

    fn resume(&mut self, i: usize) {
        if !self.nodes[i].paused {
            return;
        }
        self.nodes[i].paused = false;
        // The first thing a resumed process does is look at its clock.
        self.command(i, Input::Tick);
        for item in std::mem::take(&mut self.nodes[i].held_out) {
            self.send(item);
        }
        for item in std::mem::take(&mut self.nodes[i].held_in) {
            self.schedule(0, item);
        }
    }

    /// Starts a node afresh: it keeps only what the KV holds.
    fn restart(&mut self, i: usize) {
        if self.nodes[i].state.is_some() || self.nodes[i].dead_for_good {
            return;
        }
        let skew = self.plan.skew_max_ms;
        let n = &mut self.nodes[i];
        n.inc += 1;
        n.paused = false;
        n.held_in.clear();
        n.held_out.clear();
        n.offset_ms = self.rng.range(0, skew);
        let n = &mut self.nodes[i];
        match State::new(n.id.clone(), Weight::ONE, self.core_cfg.clone()) {
            Ok(state) => n.state = Some(state),
            Err(e) => {
                self.violation(format!("cannot start: {e}"));
                return;
            }
        }
        let inc = self.nodes[i].inc;
        let id = self.nodes[i].id.clone();
        self.note(|| format!("start {id} (incarnation {inc})"));
        self.command(i, Input::Start);
        self.schedule(TICK_MS, Item::Tick { node: i, inc });
    }

    /// Stops the nemesis and undoes every fault still in force (but nodes crashed for good stay
    /// down).
    fn heal(&mut self) {
        self.healing = Some(self.steps);
        self.note(|| "heal: restore links, resume and restart nodes".to_string());
        for i in 0..self.nodes.len() {
            self.nodes[i].pause_at_write = false;
            self.restore(i, Dir::Up);
            self.restore(i, Dir::Down);
            self.nodes[i].up = Link::Open;
            self.nodes[i].down = Link::Open;
            self.resume(i);
            if self.nodes[i].state.is_none() {
                self.restart(i);
            }
        }
    }
}

/// The command an answer becomes.
fn reply_input(tag: Tag, resp: Response) -> Option<Input> {
    let outcome = |resp: &Response| match resp {
        Response::Written { revision } => KvOutcome::Written {
            revision: Revision(*revision),
        },
        _ => KvOutcome::WrongRevision,
    };
    Some(match (tag, resp) {
        (Tag::Heartbeat(op), r) => Input::HeartbeatReply {
            op,
            outcome: outcome(&r),
        },
        (Tag::Lease(op), r) => Input::LeaseReply {
            op,
            outcome: outcome(&r),
        },
        (
            Tag::Map(op),
            Response::WrittenMap {
                map_revision,
                lease_revision,
            },
        ) => Input::MapReply {
            op,
            outcome: MapOutcome::Written {
                map_revision: Revision(map_revision),
                lease_revision: Revision(lease_revision),
            },
        },
        (Tag::Map(op), _) => Input::MapReply {
            op,
            outcome: MapOutcome::Refused,
        },
        (
            Tag::ReadLease,
            Response::Entry {
                value,
                revision,
                created,
            },
        ) => match value {
            Some(Value::Garbage) => Input::LeaseUnreadable {
                revision: Revision(revision),
            },
            _ => Input::LeaseSeen {
                entry: lease_entry(value.as_ref(), created),
                revision: Revision(revision),
            },
        },
        (
            Tag::ReadMap,
            Response::Entry {
                value, revision, ..
            },
        ) => Input::MapSeen {
            map: match value {
                Some(Value::Map(m)) => Some(m),
                _ => None,
            },
            revision: Revision(revision),
        },
        (Tag::ReadMembers, Response::Members { entries, as_of }) => Input::MembersListed {
            entries: entries
                .into_iter()
                .map(|(n, info, rev)| (n, info, Revision(rev)))
                .collect(),
            as_of: Revision(as_of),
        },
        _ => return None,
    })
}

fn lease_entry(value: Option<&Value>, created: u64) -> Option<LeaseEntry> {
    match value {
        Some(Value::Lease { holder, term }) => Some(LeaseEntry {
            holder: holder.clone(),
            term: term.unwrap_or(Term(created)),
        }),
        _ => None,
    }
}

/// The command a watched change becomes.
fn watch_input(change: Change) -> Input {
    let revision = Revision(change.revision);
    match change.key {
        Key::Lease if change.value == Some(Value::Garbage) => Input::LeaseUnreadable { revision },
        Key::Lease => Input::LeaseSeen {
            entry: lease_entry(change.value.as_ref(), change.revision),
            revision,
        },
        Key::Map => Input::MapSeen {
            map: match change.value {
                Some(Value::Map(m)) => Some(m),
                _ => None,
            },
            revision,
        },
        Key::Member(node) => {
            let record = match (change.value, change.op) {
                (Some(Value::Member(info)), _) => Ok(info),
                (_, Op::Delete) => Err(Gone::Deleted),
                _ => Err(Gone::Expired),
            };
            Input::MemberSeen {
                node,
                record,
                revision,
            }
        }
    }
}

/// Formats a report the way `tessel sim --seed S` prints it.
pub fn describe(r: &Report) -> String {
    let mut out = String::new();
    let p = &r.plan;
    let _ = writeln!(
        out,
        "seed {}: drop {}‰ dup {}‰ delay {}-{}ms fault gap {}-{}ms weights {:?} (partition swizzle crash pause drain pause@write garbage) skew ≤{}ms permanent deaths ≤{}",
        r.seed,
        p.drop_per_mille,
        p.dup_per_mille,
        p.delay_min_ms,
        p.delay_max_ms,
        p.fault_gap_ms.0,
        p.fault_gap_ms.1,
        p.weights,
        p.skew_max_ms,
        p.permanent_deaths
    );
    out
}
