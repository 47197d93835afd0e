//! The supervision tree of one node, on ractor:
//!
//! ```text
//! NodeSupervisor ── Coordinator      (the core's loop: lease, membership, map)
//!                └─ SlotHost × slots this node owns
//! ```
//! The Coordinator turns NATS entries and timer ticks into commands for the pure core, performs
//! the actions the core plans (each KV request in its own task, whose answer comes back as a
//! command), and asks the supervisor to start and stop slot hosts. A child that fails is
//! restarted one-for-one within a budget (`restart_budget` restarts in `restart_window_ms`);
//! beyond it the supervisor stops the whole node with a non-zero exit code, never leaving it
//! half alive. A restarted Coordinator starts from what the KV holds, like a restarted process.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::core::{self, Action, Command, Event, Input, State};
use cluster::types::SlotSet;
use cluster::{NodeId, Slot, Weight};
use futures::StreamExt;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::watch;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::records::MemberRecord;
use crate::store::Store;

/// Exit code when the restart budget is exhausted.
pub const EXIT_RESTARTS_EXHAUSTED: i32 = 70;

/// This node's clock for the core: monotonic milliseconds, plus the configured offset.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: Instant,
    offset_ms: i64,
}

/// Keeps the clock's values positive whatever the offset.
const CLOCK_BASE_MS: i64 = 1 << 40;

impl Clock {
    /// A clock starting now.
    pub fn new(offset_ms: i64) -> Self {
        Clock {
            origin: Instant::now(),
            offset_ms,
        }
    }

    /// The current reading.
    pub fn now_ms(&self) -> u64 {
        let elapsed = i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX / 2);
        (CLOCK_BASE_MS + elapsed + self.offset_ms).max(0) as u64
    }
}

/// What every actor of the tree shares.
#[derive(Clone)]
pub struct NodeContext {
    /// The configuration.
    pub cfg: NodeConfig,
    /// This node.
    pub me: NodeId,
    /// Its capacity weight.
    pub weight: Weight,
    /// The buckets.
    pub store: Store,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The clock.
    pub clock: Clock,
    /// The membership record's constant part (status is filled in per heartbeat).
    pub record: MemberRecord,
    /// Where the node publishes a summary of its state after every command.
    pub view: Arc<watch::Sender<NodeView>>,
    /// Told when slots start (true) or stop (false) here: the virtual-actor runtime listens.
    pub slot_hook: Option<SlotHook>,
    /// The delete of this node's membership key on a graceful leave, which the exit after it
    /// waits for (up to [`LEAVE_DELETE_TIMEOUT`]).
    pub leaving: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// Longest an exit waits for the delete of the membership key before it (2 s); past it, the key
/// goes as a dead node's does, when its heartbeats stop.
const LEAVE_DELETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A listener for slots starting (true) and stopping (false) on this node.
pub type SlotHook = Arc<dyn Fn(SlotSet, bool) + Send + Sync>;

/// A summary of one node's state, for status pages and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeView {
    /// Its status.
    pub status: String,
    /// The term it leads under, if it leads.
    pub leading_term: Option<u64>,
    /// The highest term seen.
    pub highest_term: u64,
    /// The adopted map's epoch.
    pub map_epoch: u64,
    /// Slots it hosts.
    pub slots: usize,
}

/// A running node: its supervision tree and what it exposes.
pub struct RunningNode {
    /// The root of the tree.
    pub supervisor: ActorRef<SupMsg>,
    /// Completes when the tree has stopped.
    pub handle: tokio::task::JoinHandle<()>,
    /// Becomes `Some(code)` when the node should exit.
    pub exit: watch::Receiver<Option<i32>>,
    /// The node's view, updated after every command.
    pub view: watch::Receiver<NodeView>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
}

/// Starts the supervision tree of one node over an open store.
pub async fn start(
    cfg: NodeConfig,
    me: NodeId,
    weight: Weight,
    store: Store,
    metrics: Arc<Metrics>,
    record: MemberRecord,
    slot_hook: Option<SlotHook>,
) -> Result<RunningNode, ractor::SpawnErr> {
    let (view_tx, view) = watch::channel(NodeView::default());
    let clock = Clock::new(cfg.clock_offset_ms);
    let ctx = NodeContext {
        cfg,
        me,
        weight,
        store,
        metrics: metrics.clone(),
        clock,
        record,
        view: Arc::new(view_tx),
        slot_hook,
        leaving: Arc::new(std::sync::Mutex::new(None)),
    };
    let (exit_tx, exit) = watch::channel(None);
    let (supervisor, handle) = Actor::spawn(None, NodeSupervisor, (ctx, Arc::new(exit_tx))).await?;
    Ok(RunningNode {
        supervisor,
        handle,
        exit,
        view,
        metrics,
    })
}

// ---- SlotHost ----------------------------------------------------------------------------

/// Messages to a slot host.
#[derive(Debug)]
pub enum SlotMsg {
    /// Answers with the slot number (liveness probe).
    Ping(ractor::RpcReplyPort<u16>),
}

/// Hosts one slot: the actors and model rows that hash to it live under it.
pub struct SlotHost;

impl Actor for SlotHost {
    type Msg = SlotMsg;
    type State = Slot;
    type Arguments = Slot;

    async fn pre_start(
        &self,
        _me: ActorRef<SlotMsg>,
        slot: Slot,
    ) -> Result<Slot, ActorProcessingErr> {
        debug!(slot = slot.get(), "slot host started");
        Ok(slot)
    }

    async fn handle(
        &self,
        _me: ActorRef<SlotMsg>,
        msg: SlotMsg,
        slot: &mut Slot,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SlotMsg::Ping(reply) => {
                let _ = reply.send(slot.get());
            }
        }
        Ok(())
    }
}

// ---- Coordinator -------------------------------------------------------------------------

/// Messages to the coordinator.
#[derive(Debug)]
pub enum CoordMsg {
    /// Something the shell saw: becomes a command.
    Input(Input),
    /// The timer.
    Tick,
    /// Drain and leave (SIGTERM).
    Drain,
}

/// Runs the core's loop.
pub struct Coordinator;

/// The coordinator's state.
pub struct CoordState {
    ctx: NodeContext,
    core: State,
    supervisor: ActorRef<SupMsg>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Actor for Coordinator {
    type Msg = CoordMsg;
    type State = CoordState;
    type Arguments = (NodeContext, ActorRef<SupMsg>);

    async fn pre_start(
        &self,
        me: ActorRef<CoordMsg>,
        (ctx, supervisor): Self::Arguments,
    ) -> Result<CoordState, ActorProcessingErr> {
        let core = State::new(ctx.me.clone(), ctx.weight, ctx.cfg.core())?;
        let mut tasks = Vec::new();
        // The timer.
        let tick = Duration::from_millis(ctx.cfg.tick_interval_ms);
        let m = me.clone();
        tasks.push(tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                if m.cast(CoordMsg::Tick).is_err() {
                    break;
                }
            }
        }));
        tasks.push(tokio::spawn(watch_control(
            ctx.store.clone(),
            ctx.metrics.clone(),
            me.clone(),
        )));
        tasks.push(tokio::spawn(watch_nodes(
            ctx.store.clone(),
            ctx.metrics.clone(),
            me.clone(),
        )));
        me.cast(CoordMsg::Input(Input::Start))?;
        Ok(CoordState {
            ctx,
            core,
            supervisor,
            tasks,
        })
    }

    async fn post_stop(
        &self,
        _me: ActorRef<CoordMsg>,
        st: &mut CoordState,
    ) -> Result<(), ActorProcessingErr> {
        for t in st.tasks.drain(..) {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<CoordMsg>,
        msg: CoordMsg,
        st: &mut CoordState,
    ) -> Result<(), ActorProcessingErr> {
        let input = match msg {
            CoordMsg::Input(i) => i,
            CoordMsg::Tick => Input::Tick,
            CoordMsg::Drain => {
                info!(node = %st.ctx.me, "draining");
                Input::Drain
            }
        };
        let cmd = Command {
            now_ms: st.ctx.clock.now_ms(),
            input,
        };
        Metrics::inc(&st.ctx.metrics.commands_total);
        // Everything the step logs, and the KV work it starts, carries the node and its term.
        let term = st
            .core
            .leadership
            .map_or(st.core.highest_term.0, |l| l.term.0);
        let _span = info_span!("coordinator", node = %st.ctx.me, term).entered();
        match core::step(&mut st.core, &cmd) {
            Ok(step) => {
                for ev in &step.events {
                    log_event(&st.ctx, ev);
                }
                for action in step.actions {
                    perform(&st.ctx, &me, &st.supervisor, action);
                }
                publish_view(&st.ctx, &st.core);
            }
            Err(rejection) => {
                Metrics::inc(&st.ctx.metrics.commands_rejected_total);
                debug!(node = %st.ctx.me, %rejection, "command refused");
            }
        }
        Ok(())
    }
}

fn publish_view(ctx: &NodeContext, s: &State) {
    let m = &ctx.metrics;
    let leading = s.leadership.map(|l| l.term.0);
    Metrics::set(&m.term, leading.unwrap_or(0) as i64);
    Metrics::set(&m.is_leader, i64::from(leading.is_some()));
    Metrics::set(&m.highest_term, s.highest_term.0 as i64);
    Metrics::set(&m.slots_owned, s.hosted.len() as i64);
    Metrics::set(&m.map_epoch, s.map.epoch().0 as i64);
    Metrics::set(&m.members, s.members.len() as i64);
    let view = NodeView {
        status: s.status.as_str().to_string(),
        leading_term: leading,
        highest_term: s.highest_term.0,
        map_epoch: s.map.epoch().0,
        slots: s.hosted.len(),
    };
    ctx.view.send_if_modified(|v| {
        let changed = *v != view;
        *v = view;
        changed
    });
}

fn log_event(ctx: &NodeContext, ev: &Event) {
    let node = &ctx.me;
    match ev {
        Event::StatusChanged { from, to, .. } => {
            info!(%node, from = from.as_str(), to = to.as_str(), "status changed")
        }
        Event::LeaderElected { term, .. } => info!(%node, term = term.0, "elected leader"),
        Event::LeadershipLost { term, reason } => {
            Metrics::inc(&ctx.metrics.leadership_losses_total);
            warn!(%node, term = term.0, ?reason, "stopped acting as leader");
        }
        Event::MapAdopted {
            map,
            revision,
            gained,
            lost,
        } => {
            Metrics::inc(&ctx.metrics.maps_adopted_total);
            info!(%node, epoch = map.epoch().0, term = map.term().0, revision = revision.0,
                  gained = gained.len(), lost = lost.len(), "adopted shard map");
        }
        Event::MapProposed { write, .. } => {
            debug!(%node, epoch = write.proposal.epoch().0, "proposing shard map");
        }
        Event::LeaseBlocked { revision, .. } => {
            warn!(%node, revision = revision.0, "lease key holds an unreadable record")
        }
        Event::MemberGone {
            node: gone, status, ..
        } => info!(%node, member = %gone, status = status.as_str(), "member gone"),
        Event::Exited { .. } => info!(%node, "left the cluster"),
        _ => {}
    }
}

/// Performs one action; KV requests run in their own tasks and answer with a command.
fn perform(ctx: &NodeContext, me: &ActorRef<CoordMsg>, sup: &ActorRef<SupMsg>, action: Action) {
    let store = ctx.store.clone();
    let reply = me.clone();
    let node = ctx.me.clone();
    let answer = move |input: Option<Input>| {
        if let Some(input) = input {
            let _ = reply.cast(CoordMsg::Input(input));
        }
    };
    match action {
        Action::PutMember { op, info } => {
            let record = MemberRecord {
                status: info.status.as_str().to_string(),
                capacity: u64::from(info.weight.get()),
                ..ctx.record.clone()
            };
            tokio::spawn(async move {
                let outcome = store.put_member(&record).await;
                answer(Some(Input::HeartbeatReply { op, outcome }));
            });
        }
        Action::DeleteMember => {
            let delete = tokio::spawn(async move {
                store.delete_member(&node).await;
            });
            *ctx.leaving.lock().unwrap_or_else(|p| p.into_inner()) = Some(delete);
        }
        Action::ReadLease => {
            tokio::spawn(async move { answer(store.read_lease().await) });
        }
        Action::ReadMap => {
            tokio::spawn(async move { answer(store.read_map().await) });
        }
        Action::ReadMembers => {
            tokio::spawn(async move { answer(store.read_members().await) });
        }
        Action::AcquireLease { op, expected } => {
            tokio::spawn(
                async move {
                    let outcome = store.acquire(&node, expected).await;
                    answer(Some(Input::LeaseReply { op, outcome }));
                }
                .in_current_span(),
            );
        }
        Action::RenewLease { op, term, expected } => {
            tokio::spawn(
                async move {
                    let outcome = store.renew(&node, term, expected).await;
                    answer(Some(Input::LeaseReply { op, outcome }));
                }
                .in_current_span(),
            );
        }
        Action::ReleaseLease { op, expected } => {
            tokio::spawn(
                async move {
                    let outcome = store.release(expected).await;
                    answer(Some(Input::LeaseReply { op, outcome }));
                }
                .in_current_span(),
            );
        }
        Action::WriteMap {
            op,
            map,
            expected,
            lease_revision,
            fenced,
        } => {
            tokio::spawn(
                async move {
                    let outcome = store
                        .write_map(&node, &map, expected, lease_revision, fenced)
                        .await;
                    answer(Some(Input::MapReply { op, outcome }));
                }
                .in_current_span(),
            );
        }
        Action::StartSlots(set) => {
            let _ = sup.cast(SupMsg::StartSlots(set));
        }
        Action::StopSlots(set) => {
            let _ = sup.cast(SupMsg::StopSlots(set));
        }
        Action::Announce(ev) => {
            if let Some(body) = announcement(&node, &ev) {
                tokio::spawn(async move { store.announce(body).await });
            }
        }
        Action::Exit => {
            // The core asks for the membership delete just before: the process must not end
            // before the server has it, or the key stays ("Draining") until it ages out.
            let leaving = ctx.leaving.lock().unwrap_or_else(|p| p.into_inner()).take();
            let sup = sup.clone();
            tokio::spawn(async move {
                if let Some(delete) = leaving
                    && tokio::time::timeout(LEAVE_DELETE_TIMEOUT, delete)
                        .await
                        .is_err()
                {
                    warn!("the membership key's delete took too long; exiting without it");
                }
                let _ = sup.cast(SupMsg::Exit(0));
            });
        }
    }
}

/// The JSON of a topology event (see docs/nats-layout.md), or None for events not announced.
pub fn announcement(node: &NodeId, ev: &Event) -> Option<serde_json::Value> {
    use serde_json::json;
    let mut body = match ev {
        Event::LeaderElected { term, .. } => json!({"type": "LeaderElected", "term": term.0}),
        Event::LeadershipLost { term, reason } => {
            json!({"type": "LeadershipLost", "term": term.0, "reason": format!("{reason:?}")})
        }
        Event::StatusChanged { from, to, .. } => {
            json!({"type": "StatusChanged", "from": from.as_str(), "to": to.as_str()})
        }
        Event::MemberGone {
            node: gone, status, ..
        } => {
            let kind = if *status == cluster::NodeStatus::Left {
                "NodeLeft"
            } else {
                "NodeFailed"
            };
            json!({"type": kind, "member": gone.as_str()})
        }
        Event::MapProposed { write, .. } => {
            let counts: BTreeMap<String, usize> = write
                .proposal
                .counts()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            json!({"type": "SlotsAssigned", "epoch": write.proposal.epoch().0,
                   "term": write.proposal.term().0, "slots": counts})
        }
        _ => return None,
    };
    if let Some(o) = body.as_object_mut() {
        o.insert("v".into(), json!(1));
        o.insert("node".into(), json!(node.as_str()));
        o.insert("at_ms".into(), json!(crate::store::wall_ms()));
    }
    Some(body)
}

/// Backoff between watch restarts.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(50);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(2);

async fn watch_control(store: Store, metrics: Arc<Metrics>, me: ActorRef<CoordMsg>) {
    let mut delay = WATCH_RETRY_MIN;
    loop {
        match store.control().watch_with_history(">").await {
            Ok(mut w) => {
                delay = WATCH_RETRY_MIN;
                while let Some(item) = w.next().await {
                    match item {
                        Ok(entry) => {
                            if let Some(input) = store.control_input(&entry)
                                && me.cast(CoordMsg::Input(input)).is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "control watch failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot watch the control bucket"),
        }
        Metrics::inc(&metrics.watch_restarts_total);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(WATCH_RETRY_MAX);
    }
}

async fn watch_nodes(store: Store, metrics: Arc<Metrics>, me: ActorRef<CoordMsg>) {
    let mut delay = WATCH_RETRY_MIN;
    loop {
        match store.nodes().watch_with_history(">").await {
            Ok(mut w) => {
                delay = WATCH_RETRY_MIN;
                while let Some(item) = w.next().await {
                    match item {
                        Ok(entry) => {
                            if let Some(input) = store.member_input(&entry)
                                && me.cast(CoordMsg::Input(input)).is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "membership watch failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot watch the membership bucket"),
        }
        Metrics::inc(&metrics.watch_restarts_total);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(WATCH_RETRY_MAX);
    }
}

// ---- NodeSupervisor ----------------------------------------------------------------------

/// Messages to the node supervisor.
#[derive(Debug)]
pub enum SupMsg {
    /// Start hosts for these slots.
    StartSlots(SlotSet),
    /// Stop the hosts of these slots.
    StopSlots(SlotSet),
    /// Forward a drain request to the coordinator.
    Drain,
    /// Stop the node with this exit code.
    Exit(i32),
    /// Answers with the current coordinator (tests use it to inject failures).
    Coordinator(ractor::RpcReplyPort<Option<ActorRef<CoordMsg>>>),
}

/// The root of the tree.
pub struct NodeSupervisor;

/// The supervisor's state.
pub struct SupState {
    ctx: NodeContext,
    coordinator: Option<ActorRef<CoordMsg>>,
    slots: BTreeMap<u16, ActorRef<SlotMsg>>,
    restarts: VecDeque<Instant>,
    exit: Arc<watch::Sender<Option<i32>>>,
    exiting: bool,
}

impl SupState {
    /// Counts a restart; false when the budget is exhausted.
    fn budget_allows(&mut self) -> bool {
        let window = Duration::from_millis(self.ctx.cfg.restart_window_ms);
        let now = Instant::now();
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() >= self.ctx.cfg.restart_budget as usize {
            return false;
        }
        self.restarts.push_back(now);
        Metrics::inc(&self.ctx.metrics.supervisor_restarts_total);
        true
    }

    fn give_up(&mut self, me: &ActorRef<SupMsg>, what: &str) {
        error!(
            node = %self.ctx.me,
            budget = self.ctx.cfg.restart_budget,
            window_ms = self.ctx.cfg.restart_window_ms,
            "{what} failed and the restart budget is exhausted; stopping the node"
        );
        self.exiting = true;
        let _ = self.exit.send(Some(EXIT_RESTARTS_EXHAUSTED));
        me.stop(Some("restart budget exhausted".into()));
    }
}

async fn spawn_coordinator(
    me: &ActorRef<SupMsg>,
    ctx: &NodeContext,
) -> Result<ActorRef<CoordMsg>, ActorProcessingErr> {
    let (coord, _) =
        Actor::spawn_linked(None, Coordinator, (ctx.clone(), me.clone()), me.get_cell()).await?;
    Ok(coord)
}

async fn spawn_slot(
    me: &ActorRef<SupMsg>,
    slot: Slot,
) -> Result<ActorRef<SlotMsg>, ActorProcessingErr> {
    let (host, _) = Actor::spawn_linked(None, SlotHost, slot, me.get_cell()).await?;
    Ok(host)
}

impl Actor for NodeSupervisor {
    type Msg = SupMsg;
    type State = SupState;
    type Arguments = (NodeContext, Arc<watch::Sender<Option<i32>>>);

    async fn pre_start(
        &self,
        me: ActorRef<SupMsg>,
        (ctx, exit): Self::Arguments,
    ) -> Result<SupState, ActorProcessingErr> {
        let coordinator = spawn_coordinator(&me, &ctx).await?;
        Ok(SupState {
            ctx,
            coordinator: Some(coordinator),
            slots: BTreeMap::new(),
            restarts: VecDeque::new(),
            exit,
            exiting: false,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<SupMsg>,
        msg: SupMsg,
        st: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupMsg::StartSlots(set) => {
                for slot in set.iter() {
                    if let std::collections::btree_map::Entry::Vacant(e) =
                        st.slots.entry(slot.get())
                    {
                        let span = info_span!("slot_host", node = %st.ctx.me, slot = slot.get());
                        e.insert(spawn_slot(&me, slot).instrument(span).await?);
                        Metrics::inc(&st.ctx.metrics.slot_hosts_started_total);
                    }
                }
                if let Some(hook) = &st.ctx.slot_hook {
                    hook(set, true);
                }
            }
            SupMsg::StopSlots(set) => {
                let _span =
                    info_span!("stop_slots", node = %st.ctx.me, slots = set.len()).entered();
                if let Some(hook) = &st.ctx.slot_hook {
                    hook(set, false);
                }
                for slot in set.iter() {
                    if let Some(host) = st.slots.remove(&slot.get()) {
                        host.stop(None);
                        Metrics::inc(&st.ctx.metrics.slot_hosts_stopped_total);
                    }
                }
            }
            SupMsg::Drain => {
                if let Some(c) = &st.coordinator {
                    let _ = c.cast(CoordMsg::Drain);
                }
            }
            SupMsg::Coordinator(reply) => {
                let _ = reply.send(st.coordinator.clone());
            }
            SupMsg::Exit(code) => {
                st.exiting = true;
                let _ = st.exit.send(Some(code));
                me.stop(None);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<SupMsg>,
        event: SupervisionEvent,
        st: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why): (ActorCell, String) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if st.exiting {
            return Ok(());
        }
        let id = cell.get_id();
        if st.coordinator.as_ref().is_some_and(|c| c.get_id() == id) {
            warn!(node = %st.ctx.me, reason = %why, "coordinator ended; restarting it");
            if !st.budget_allows() {
                st.give_up(&me, "the coordinator");
                return Ok(());
            }
            // A new coordinator starts from what the KV holds; it re-adopts the map and asks
            // for its slot hosts again.
            let mut stopped = SlotSet::EMPTY;
            for (slot, host) in std::mem::take(&mut st.slots) {
                host.stop(None);
                if let Ok(s) = Slot::new(u64::from(slot)) {
                    stopped.insert(s);
                }
            }
            if let Some(hook) = &st.ctx.slot_hook {
                hook(stopped, false);
            }
            st.coordinator = Some(spawn_coordinator(&me, &st.ctx).await?);
            return Ok(());
        }
        let slot = st
            .slots
            .iter()
            .find(|(_, h)| h.get_id() == id)
            .map(|(s, _)| *s);
        if let Some(s) = slot {
            warn!(node = %st.ctx.me, slot = s, reason = %why, "slot host ended; restarting it");
            st.slots.remove(&s);
            if !st.budget_allows() {
                st.give_up(&me, "a slot host");
                return Ok(());
            }
            if let Ok(slot) = Slot::new(u64::from(s)) {
                let host = spawn_slot(&me, slot).await?;
                st.slots.insert(s, host);
            }
        }
        Ok(())
    }
}
