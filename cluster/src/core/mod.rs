//! The node's state machine: `decide` turns a command into events (or refuses it), `apply` folds
//! an event into the state, `plan` turns an event into the effects the shell performs.
//!
//! ```text
//! NATS message / timer tick ─► Command ─► decide(&State, &Command) ─► Ok(events) | Err(Rejection)
//!                                          for each event: state = apply(state, &event)
//!                                                          actions += plan(&state, &event)
//! ```
//! Every rule about time takes `now_ms` from the command: nothing here reads a clock.

pub mod config;
pub mod model;

use crate::placement::{PlacementNode, place_among};
use crate::shard_map::ShardMap;
use crate::types::{Epoch, NodeId, NodeStatus, Revision, SlotSet, Term, Weight};
pub use config::{ConfigError, CoreConfig, PlantedBug};
pub use model::*;

impl State {
    /// A node that has not started yet.
    pub fn new(me: NodeId, weight: Weight, config: CoreConfig) -> Result<State, ConfigError> {
        config.validate()?;
        Ok(State {
            config,
            me,
            status: NodeStatus::Joining,
            weight,
            started_ms: None,
            joined_ms: 0,
            exited: false,
            synced: Synced::default(),
            members: Default::default(),
            lease: None,
            lease_revision: Revision(0),
            leadership: None,
            lease_op: None,
            map: ShardMap::empty(),
            map_revision: Revision(0),
            map_key_revision: Revision(0),
            lease_blocked_until_ms: 0,
            map_op: None,
            hosted: SlotSet::EMPTY,
            highest_term: Term(0),
            next_op: 1,
            heartbeats: Vec::new(),
            heartbeat_due_ms: 0,
            heartbeat_ok_ms: 0,
            sync_due_ms: 0,
            drain_started_ms: None,
        })
    }

    /// Whether this node acts as leader at `now_ms` by its own clock.
    pub fn is_leader_at(&self, now_ms: u64) -> bool {
        self.leadership.is_some_and(|l| now_ms < l.deadline_ms)
    }

    /// The nodes placement sees: every known member, with this node's own status and weight.
    pub fn placement_nodes(&self) -> Vec<PlacementNode> {
        let mut nodes: Vec<PlacementNode> = self
            .members
            .iter()
            .filter(|(id, _)| **id != self.me)
            .map(|(id, m)| PlacementNode {
                id: id.clone(),
                status: m.status,
                weight: m.weight,
            })
            .collect();
        nodes.push(PlacementNode {
            id: self.me.clone(),
            status: self.status,
            weight: self.weight,
        });
        nodes
    }

    /// The slots the adopted map gives this node.
    pub fn owned(&self) -> SlotSet {
        self.map.slots_of(&self.me).collect()
    }
}

/// The result of handling one command: the events (already applied) and the actions to perform.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// The events, in order.
    pub events: Vec<Event>,
    /// The effects, in order.
    pub actions: Vec<Action>,
}

/// Handles one command: decide, then apply and plan each event. On a rejection the state is
/// unchanged.
pub fn step(state: &mut State, cmd: &Command) -> Result<Step, Rejection> {
    let events = decide(state, cmd)?;
    let mut actions = Vec::new();
    for ev in &events {
        apply_in_place(state, ev);
        actions.extend(plan(state, ev));
    }
    Ok(Step { events, actions })
}

/// Decides what a command means for this node. Pure: the state is not changed; a refused
/// command yields no event.
pub fn decide(state: &State, cmd: &Command) -> Result<Vec<Event>, Rejection> {
    if state.exited {
        return Err(Rejection::NotRunning);
    }
    match (&cmd.input, state.started_ms) {
        (Input::Start, Some(_)) => return Err(Rejection::AlreadyStarted),
        (Input::Start, None) => {}
        (_, None) => return Err(Rejection::NotRunning),
        _ => {}
    }
    let mut d = Decider {
        s: state.clone(),
        events: Vec::new(),
        now: cmd.now_ms,
    };
    // Time first: a leader past its deadline steps down before it handles anything.
    d.check_deadline();
    d.handle(&cmd.input)?;
    if !d.s.exited {
        d.duties();
    }
    Ok(d.events)
}

/// Works on a scratch copy of the state so that each decision sees the effect of the previous.
struct Decider {
    s: State,
    events: Vec<Event>,
    now: u64,
}

impl Decider {
    fn emit(&mut self, ev: Event) {
        apply_in_place(&mut self.s, &ev);
        self.events.push(ev);
    }

    fn next_op(&self) -> OpId {
        OpId(self.s.next_op)
    }

    fn ttl_deadline(&self, sent_ms: u64) -> u64 {
        sent_ms + self.s.config.lease_ttl_ms - self.s.config.lease_margin_ms
    }

    fn check_deadline(&mut self) {
        if self.s.config.planted(PlantedBug::StaleLeaderWrite) {
            return;
        }
        if let Some(l) = self.s.leadership
            && self.now >= l.deadline_ms
        {
            self.emit(Event::LeadershipLost {
                term: l.term,
                reason: LossReason::Expired,
            });
        }
    }

    fn lose_leadership(&mut self, reason: LossReason) {
        if let Some(l) = self.s.leadership {
            self.emit(Event::LeadershipLost {
                term: l.term,
                reason,
            });
        }
    }

    fn set_status(&mut self, to: NodeStatus) {
        let from = self.s.status;
        if from != to && from.can_become(to) {
            self.emit(Event::StatusChanged {
                from,
                to,
                at_ms: self.now,
            });
        }
    }

    fn heartbeat(&mut self) {
        let op = self.next_op();
        self.emit(Event::HeartbeatSent {
            op,
            at_ms: self.now,
        });
    }

    fn request_lease(&mut self, kind: LeaseOpKind, expected: Revision) {
        let op = self.next_op();
        self.emit(Event::LeaseRequested {
            op,
            kind,
            expected,
            at_ms: self.now,
        });
    }

    fn handle(&mut self, input: &Input) -> Result<(), Rejection> {
        match input {
            Input::Start => self.emit(Event::Started { at_ms: self.now }),
            Input::Tick => {}
            Input::Drain => self.drain()?,
            Input::LeaseSeen { entry, revision } => self.lease_seen(entry, *revision)?,
            Input::LeaseUnreadable { revision } => self.lease_unreadable(*revision)?,
            Input::LeaseReply { op, outcome } => self.lease_reply(*op, *outcome)?,
            Input::MapSeen { map, revision } => self.map_seen(map.as_ref(), *revision)?,
            Input::MapReply { op, outcome } => self.map_reply(*op, *outcome)?,
            Input::MemberSeen {
                node,
                record,
                revision,
            } => self.member_seen(node, *record, *revision)?,
            Input::MembersListed { entries, as_of } => self.members_listed(entries, *as_of)?,
            Input::HeartbeatReply { op, outcome } => {
                if !self.s.heartbeats.iter().any(|(o, _)| o == op) {
                    return Err(Rejection::UnknownOp(*op));
                }
                let written = match outcome {
                    KvOutcome::Written { revision } => Some(*revision),
                    _ => None,
                };
                self.emit(Event::HeartbeatAnswered { op: *op, written });
            }
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), Rejection> {
        let status = self.s.status;
        if !matches!(status, NodeStatus::Joining | NodeStatus::Active) {
            return Err(Rejection::CannotDrain(status));
        }
        // Step down first, so that no state shows a leader that is not Active.
        self.release_if_leader(LossReason::Released);
        self.set_status(NodeStatus::Draining);
        self.heartbeat();
        Ok(())
    }

    /// Stops acting as leader at once, then deletes the lease (if no other lease request is in
    /// flight) so that a contender takes over without waiting for the TTL.
    fn release_if_leader(&mut self, reason: LossReason) {
        if let Some(l) = self.s.leadership {
            self.lose_leadership(reason);
            if self.s.lease_op.is_none() {
                self.request_lease(LeaseOpKind::Release, l.revision);
            }
        }
    }

    fn lease_seen(
        &mut self,
        entry: &Option<LeaseEntry>,
        revision: Revision,
    ) -> Result<(), Rejection> {
        let known = self.s.lease_revision;
        // A read that finds no message at all (revision 0) after markers were seen: the server
        // removed the expiry marker, and the next acquire must expect 0.
        let vanished = entry.is_none() && revision == Revision(0) && known > Revision(0);
        if (revision < known && !vanished)
            || (revision == known && *entry == self.s.lease && self.s.synced.lease)
        {
            return Err(Rejection::Stale {
                seen: revision,
                known,
            });
        }
        if let Some(e) = entry {
            if e.term.0 > revision.0 {
                return Err(Rejection::Inconsistent(
                    "lease term above the key's revision",
                ));
            }
            // A term between the adopted map's term and its revision: the map would have been
            // written by a deposed leader, which the atomic map write makes impossible.
            if !self.term_fits_map(e.term) {
                return Err(Rejection::Inconsistent(
                    "lease term inside a lower-term map's lifetime",
                ));
            }
        }
        if let (Some(e), Some(l)) = (entry, self.s.leadership)
            && e.term == l.term
            && e.holder != self.s.me
        {
            return Err(Rejection::ConflictingLeader {
                term: e.term,
                claimed: e.holder.clone(),
                known: self.s.me.clone(),
            });
        }
        // A leader that sees its lease gone or someone else's steps down before the new view is
        // applied, so no state ever shows a leader behind the highest term.
        let mut learned = None;
        if let Some(l) = self.s.leadership {
            match entry {
                Some(e) if e.holder == self.s.me && e.term == l.term => {
                    learned = (revision > l.revision).then_some(revision);
                }
                _ => self.lose_leadership(LossReason::Superseded),
            }
        }
        self.emit(Event::LeaseObserved {
            entry: entry.clone(),
            revision,
        });
        if let Some(revision) = learned {
            self.emit(Event::LeaseRevisionLearned { revision });
        }
        if !self.s.synced.lease {
            self.emit(Event::Synced {
                part: SyncPart::Lease,
            });
        }
        Ok(())
    }

    /// The lease key holds a record nobody can read: no one leads under it. A leader steps down
    /// (its next renewal would be refused anyway); contenders treat it as a live lease of an
    /// unknown holder for one TTL, so that a leader it displaced has passed its own deadline
    /// before anyone acquires.
    fn lease_unreadable(&mut self, revision: Revision) -> Result<(), Rejection> {
        let known = self.s.lease_revision;
        if revision <= known {
            return Err(Rejection::Stale {
                seen: revision,
                known,
            });
        }
        if self.s.leadership.is_some() {
            self.lose_leadership(LossReason::Superseded);
        }
        self.emit(Event::LeaseObserved {
            entry: None,
            revision,
        });
        let until_ms = self.now + self.s.config.lease_ttl_ms;
        self.emit(Event::LeaseBlocked { revision, until_ms });
        if !self.s.synced.lease {
            self.emit(Event::Synced {
                part: SyncPart::Lease,
            });
        }
        Ok(())
    }

    /// Whether a newly learned term is consistent with the adopted map: a term strictly between
    /// the map's term and its revision would mean a deposed leader wrote the map, which the
    /// atomic map write rules out.
    fn term_fits_map(&self, term: Term) -> bool {
        !(term > self.s.map.term() && term.0 < self.s.map_revision.0)
    }

    fn lease_reply(&mut self, op: OpId, outcome: KvOutcome) -> Result<(), Rejection> {
        let pending = match self.s.lease_op {
            Some(p) if p.op == op => p,
            _ => return Err(Rejection::UnknownOp(op)),
        };
        let reread = !matches!(outcome, KvOutcome::Written { .. });
        self.emit(Event::LeaseOpEnded { op, reread });
        let KvOutcome::Written { revision } = outcome else {
            if pending.kind == LeaseOpKind::Renew && outcome == KvOutcome::WrongRevision {
                self.lose_leadership(LossReason::Refused);
            }
            return Ok(());
        };
        let deadline_ms = self.ttl_deadline(pending.sent_ms);
        let renew_at_ms = self.now + self.s.config.lease_renew_interval_ms;
        match pending.kind {
            LeaseOpKind::Acquire => {
                let term = Term(revision.0);
                let fresh = term > self.s.highest_term && self.term_fits_map(term);
                if fresh && self.s.status == NodeStatus::Active && self.s.leadership.is_none() {
                    self.emit(Event::LeaderElected {
                        term,
                        revision,
                        deadline_ms,
                        renew_at_ms,
                    });
                } else {
                    // Won a lease it cannot use (no longer Active, or a term that does not
                    // increase because the bucket was recreated): give it back at once.
                    self.request_lease(LeaseOpKind::Release, revision);
                }
            }
            LeaseOpKind::Renew => {
                if self.s.leadership.is_some() {
                    self.emit(Event::LeaseRenewed {
                        revision,
                        deadline_ms,
                        renew_at_ms,
                    });
                } else {
                    self.request_lease(LeaseOpKind::Release, revision);
                }
            }
            LeaseOpKind::Release => {}
        }
        Ok(())
    }

    fn map_seen(&mut self, map: Option<&ShardMap>, revision: Revision) -> Result<(), Rejection> {
        let Some(map) = map else {
            // Absent, deleted or unreadable: nothing to adopt, but a leader must know the key's
            // revision to write over it.
            let moved = revision > self.s.map_key_revision;
            if moved {
                self.emit(Event::MapKeyMoved { revision });
            }
            if !self.s.synced.map {
                self.emit(Event::Synced {
                    part: SyncPart::Map,
                });
            } else if !moved {
                return Err(Rejection::Stale {
                    seen: revision,
                    known: self.s.map_key_revision,
                });
            }
            return Ok(());
        };
        if let Err(refused) = self.check_adoptable(map, revision) {
            // A newer record that cannot be adopted (hostile, malformed, or naming nodes never
            // seen) still moves the key: a leader must know its revision to write over it.
            if revision <= self.s.map_key_revision || matches!(refused, Rejection::Stale { .. }) {
                return Err(refused);
            }
            self.emit(Event::MapKeyMoved { revision });
            // A map naming nodes not yet listed may be fine once the members are read: only
            // then does it count as read.
            let wait = matches!(refused, Rejection::UnknownOwner(_)) && !self.s.synced.members;
            if !self.s.synced.map && !wait {
                self.emit(Event::Synced {
                    part: SyncPart::Map,
                });
            }
            return Ok(());
        }
        if let Some(l) = self.s.leadership
            && map.term() > l.term
        {
            self.lose_leadership(LossReason::Superseded);
        }
        self.adopt(map, revision)?;
        if !self.s.synced.map {
            self.emit(Event::Synced {
                part: SyncPart::Map,
            });
        }
        Ok(())
    }

    /// Adopts a map if it is newer and not stale by the term rule.
    fn adopt(&mut self, map: &ShardMap, revision: Revision) -> Result<(), Rejection> {
        self.check_adoptable(map, revision)?;
        let owned: SlotSet = map.slots_of(&self.s.me).collect();
        let gained = owned.minus(&self.s.hosted);
        let lost = self.s.hosted.minus(&owned);
        self.emit(Event::MapAdopted {
            map: map.clone(),
            revision,
            gained,
            lost,
        });
        Ok(())
    }

    fn check_adoptable(&self, map: &ShardMap, revision: Revision) -> Result<(), Rejection> {
        if map.term().0 > revision.0 {
            return Err(Rejection::Inconsistent("map term above the key's revision"));
        }
        let me = &self.s.me;
        if let Some(o) = map
            .owners()
            .iter()
            .flatten()
            .find(|o| *o != me && !self.s.members.contains_key(*o))
        {
            return Err(Rejection::UnknownOwner(o.clone()));
        }
        if map.epoch().0 > 0 && map.unowned() > 0 {
            return Err(Rejection::IncompleteMap {
                epoch: map.epoch(),
                unowned: map.unowned(),
            });
        }
        if revision <= self.s.map_revision {
            return Err(Rejection::Stale {
                seen: revision,
                known: self.s.map_revision,
            });
        }
        // Lease and map live in one stream, so revisions compare across the two keys: a map of
        // a lower term is stale exactly when it was written after the higher term's lease was
        // created (its revision is above that term).
        let highest = self.s.highest_term;
        if map.term() < highest && revision.0 > highest.0 {
            return Err(Rejection::StaleTerm {
                map_term: map.term(),
                highest,
            });
        }
        if map.epoch() <= self.s.map.epoch() && self.s.map_revision > Revision(0) {
            return Err(Rejection::OldEpoch {
                seen: map.epoch(),
                adopted: self.s.map.epoch(),
            });
        }
        Ok(())
    }

    fn map_reply(&mut self, op: OpId, outcome: MapOutcome) -> Result<(), Rejection> {
        let write = match &self.s.map_op {
            Some(w) if w.op == op => w.clone(),
            _ => return Err(Rejection::UnknownOp(op)),
        };
        let reread = !matches!(outcome, MapOutcome::Written { .. });
        self.emit(Event::MapWriteEnded { op, reread });
        if let MapOutcome::Written {
            map_revision,
            lease_revision,
        } = outcome
        {
            if map_revision > self.s.map_revision {
                // Our own write: adopting it cannot be refused by the term rule, but a newer
                // map may already have been seen; then this one is simply not adopted.
                let _ = self.adopt(&write.proposal, map_revision);
            }
            if let Some(l) = self.s.leadership
                && l.term == write.proposal.term()
            {
                let deadline_ms = self.ttl_deadline(write.sent_ms);
                let renew_at_ms = self.now + self.s.config.lease_renew_interval_ms;
                self.emit(Event::LeaseRenewed {
                    revision: lease_revision,
                    deadline_ms,
                    renew_at_ms,
                });
            }
        }
        Ok(())
    }

    fn member_seen(
        &mut self,
        node: &NodeId,
        record: Result<MemberInfo, Gone>,
        revision: Revision,
    ) -> Result<(), Rejection> {
        let known = self.s.members.get(node).copied();
        if let Some(m) = known
            && m.revision >= revision
        {
            return Err(Rejection::Stale {
                seen: revision,
                known: m.revision,
            });
        }
        match record {
            Ok(info) => {
                if known.is_none() {
                    self.make_room()?;
                }
                self.emit(Event::MemberUpdated {
                    node: node.clone(),
                    info,
                    revision,
                });
            }
            Err(gone) => {
                let Some(m) = known else {
                    return Err(Rejection::Stale {
                        seen: revision,
                        known: Revision(0),
                    });
                };
                if *node == self.s.me {
                    self.emit(Event::MemberGone {
                        node: node.clone(),
                        status: NodeStatus::Failed,
                        revision,
                    });
                    self.lapsed();
                    return Ok(());
                }
                let status = match (gone, m.status) {
                    (_, NodeStatus::Left) | (Gone::Deleted, _) => NodeStatus::Left,
                    (Gone::Expired, _) => NodeStatus::Failed,
                };
                self.emit(Event::MemberGone {
                    node: node.clone(),
                    status,
                    revision,
                });
            }
        }
        Ok(())
    }

    /// Makes room for one more member, forgetting a gone member that owns no slot.
    fn make_room(&mut self) -> Result<(), Rejection> {
        let max = self.s.config.max_members;
        if self.s.members.len() < max {
            return Ok(());
        }
        let counts = self.s.map.counts();
        let victim = self
            .s
            .members
            .iter()
            .find(|(id, m)| {
                matches!(m.status, NodeStatus::Failed | NodeStatus::Left)
                    && !counts.contains_key(*id)
            })
            .map(|(id, _)| id.clone());
        match victim {
            Some(node) => {
                self.emit(Event::MemberForgotten { node });
                Ok(())
            }
            None => Err(Rejection::TooManyMembers(max)),
        }
    }

    fn members_listed(
        &mut self,
        entries: &[(NodeId, MemberInfo, Revision)],
        as_of: Revision,
    ) -> Result<(), Rejection> {
        for (node, info, revision) in entries {
            let known = self.s.members.get(node).copied();
            if known.is_some_and(|m| m.revision >= *revision) {
                continue;
            }
            if known.is_none() {
                self.make_room()?;
            }
            self.emit(Event::MemberUpdated {
                node: node.clone(),
                info: *info,
                revision: *revision,
            });
        }
        let vanished: Vec<NodeId> = self
            .s
            .members
            .iter()
            .filter(|(id, m)| {
                **id != self.s.me
                    && !matches!(m.status, NodeStatus::Failed | NodeStatus::Left)
                    && m.revision < as_of
                    && !entries.iter().any(|(n, _, _)| n == *id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for node in vanished {
            self.emit(Event::MemberGone {
                node,
                status: NodeStatus::Failed,
                revision: as_of,
            });
        }
        if !self.s.synced.members {
            self.emit(Event::Synced {
                part: SyncPart::Members,
            });
            // A map that named members not listed yet was left unread (see `map_seen`): read
            // it again now that they are, rather than at the next periodic sync.
            if !self.s.synced.map && self.s.map_key_revision > self.s.map_revision {
                self.emit(Event::SyncStarted { at_ms: self.now });
            }
        }
        Ok(())
    }

    /// This node's own membership key lapsed (or may have): others see it as Failed and move its
    /// slots. It stops leading and registers again as Joining.
    fn lapsed(&mut self) {
        match self.s.status {
            NodeStatus::Draining => self.leave(),
            NodeStatus::Joining | NodeStatus::Active => {
                self.release_if_leader(LossReason::NotActive);
                self.set_status(NodeStatus::Failed);
                self.set_status(NodeStatus::Joining);
                self.heartbeat();
            }
            NodeStatus::Failed | NodeStatus::Left => {}
        }
    }

    fn leave(&mut self) {
        self.set_status(NodeStatus::Left);
        let stopped = self.s.hosted;
        self.emit(Event::Exited { stopped });
    }

    /// What a node does whatever its input was: timers, and reactions to its new view.
    fn duties(&mut self) {
        let now = self.now;
        let cfg = self.s.config.clone();
        self.check_deadline();

        // Requests that went unanswered are abandoned; the answer may still have been written,
        // so the key is read again before anything is decided on it.
        if let Some(p) = self.s.lease_op
            && now >= p.sent_ms + cfg.request_timeout_ms
        {
            self.emit(Event::LeaseOpEnded {
                op: p.op,
                reread: true,
            });
        }
        if let Some(w) = &self.s.map_op
            && now >= w.sent_ms + cfg.request_timeout_ms
        {
            let op = w.op;
            self.emit(Event::MapWriteEnded { op, reread: true });
        }

        // Membership: a key not refreshed within its TTL may be gone. (A node that just joined
        // has one TTL from joining to get its first heartbeat through.)
        let refreshed_ms = self.s.heartbeat_ok_ms.max(self.s.joined_ms);
        if matches!(
            self.s.status,
            NodeStatus::Joining | NodeStatus::Active | NodeStatus::Draining
        ) && now >= refreshed_ms + cfg.member_ttl_ms
        {
            self.lapsed();
            if self.s.exited {
                return;
            }
        }
        if self.s.status == NodeStatus::Joining
            && self.s.synced.all()
            && self.s.heartbeat_ok_ms >= self.s.joined_ms
        {
            self.set_status(NodeStatus::Active);
            self.heartbeat();
        }
        if now >= self.s.heartbeat_due_ms {
            self.heartbeat();
        }
        if now >= self.s.sync_due_ms {
            self.emit(Event::SyncStarted { at_ms: now });
        }

        if self.s.leadership.is_some() {
            self.lead();
        } else {
            self.contend();
        }

        if self.s.status == NodeStatus::Draining
            && self.s.leadership.is_none()
            && self.s.lease_op.is_none()
        {
            let timed_out = self
                .s
                .drain_started_ms
                .is_some_and(|t| now >= t + cfg.drain_timeout_ms);
            // Nobody Active to hand the slots to (the whole cluster is shutting down): waiting
            // would only delay the exit.
            let me = &self.s.me;
            let heir = self
                .s
                .members
                .iter()
                .any(|(id, m)| id != me && m.status == NodeStatus::Active);
            if self.s.hosted.is_empty() || timed_out || !heir {
                self.leave();
            }
        }
    }

    fn lead(&mut self) {
        let Some(l) = self.s.leadership else { return };
        if self.s.status != NodeStatus::Active {
            self.release_if_leader(LossReason::NotActive);
            return;
        }
        // One lease write at a time: the map write renews the lease too, so a renewal and a map
        // write in flight together would make one of them fail its revision check.
        if self.s.lease_op.is_some() || self.s.map_op.is_some() {
            return;
        }
        if let Some(write) = self.proposal(l.term) {
            let (expected, lease_revision) = (self.s.map_key_revision, l.revision);
            self.emit(Event::MapProposed {
                write,
                expected,
                lease_revision,
            });
        } else if self.now >= l.renew_at_ms {
            self.request_lease(LeaseOpKind::Renew, l.revision);
        }
    }

    /// A new map, when the current one is not what placement wants or is of an older term.
    fn proposal(&self, term: Term) -> Option<MapWrite> {
        if !self.s.synced.all() {
            return None;
        }
        let nodes = self.s.placement_nodes();
        let cfg = &self.s.config;
        let owners = place_among(&self.s.map, &nodes, |st| cfg.eligible(st)).ok()?;
        let current = self.s.map.term() == term
            && owners.as_slice() == self.s.map.owners()
            && self.s.map_key_revision == self.s.map_revision;
        if current {
            return None;
        }
        // Epochs only grow. Every map's epoch is at most its revision (each write takes at least
        // one revision), so when the key holds something unreadable on top of the adopted map,
        // an epoch above that revision is above every map ever written.
        let epoch = if self.s.map_key_revision > self.s.map_revision {
            Epoch(self.s.map.epoch().0.max(self.s.map_key_revision.0)).next()
        } else {
            self.s.map.epoch().next()
        };
        let proposal = ShardMap::new(epoch, term, owners).ok()?;
        let active = nodes
            .into_iter()
            .filter(|n| n.status == NodeStatus::Active)
            .map(|n| n.id)
            .collect();
        Some(MapWrite {
            op: self.next_op(),
            proposal,
            active,
            sent_ms: self.now,
        })
    }

    fn contend(&mut self) {
        if self.s.lease_op.is_some() || !self.s.synced.lease {
            return;
        }
        match &self.s.lease {
            None if self.s.status == NodeStatus::Active
                && self.now >= self.s.lease_blocked_until_ms =>
            {
                let expected = self.s.lease_revision;
                self.request_lease(LeaseOpKind::Acquire, expected);
            }
            // A lease in this node's name that it does not use (an acquire whose answer was
            // lost): release it so that others need not wait for the TTL.
            Some(e) if e.holder == self.s.me => {
                let expected = self.s.lease_revision;
                self.request_lease(LeaseOpKind::Release, expected);
            }
            _ => {}
        }
    }
}

/// Folds an event into the state. Never fails: events are facts.
pub fn apply(mut state: State, ev: &Event) -> State {
    apply_in_place(&mut state, ev);
    state
}

/// [`apply`] on a borrowed state.
pub fn apply_in_place(s: &mut State, ev: &Event) {
    match ev {
        Event::Started { at_ms } => {
            s.started_ms = Some(*at_ms);
            s.joined_ms = *at_ms;
            s.status = NodeStatus::Joining;
            s.heartbeat_due_ms = *at_ms;
            s.sync_due_ms = *at_ms;
        }
        Event::StatusChanged { to, at_ms, .. } => {
            s.status = *to;
            match to {
                NodeStatus::Draining => s.drain_started_ms = Some(*at_ms),
                NodeStatus::Joining => s.joined_ms = *at_ms,
                _ => {}
            }
        }
        Event::HeartbeatSent { op, at_ms } => {
            s.heartbeats.push((*op, *at_ms));
            if s.heartbeats.len() > HEARTBEATS_IN_FLIGHT {
                s.heartbeats.remove(0);
            }
            s.heartbeat_due_ms = at_ms + s.config.heartbeat_interval_ms;
            s.next_op = s.next_op.max(op.0 + 1);
        }
        Event::HeartbeatAnswered { op, written } => {
            if let Some(i) = s.heartbeats.iter().position(|(o, _)| o == op) {
                let (_, sent_ms) = s.heartbeats.remove(i);
                if let Some(revision) = written {
                    s.heartbeat_ok_ms = s.heartbeat_ok_ms.max(sent_ms);
                    let (status, weight) = (s.status, s.weight);
                    let m = s.members.entry(s.me.clone()).or_insert(Member {
                        status,
                        weight,
                        revision: *revision,
                    });
                    if m.revision < *revision {
                        *m = Member {
                            status,
                            weight,
                            revision: *revision,
                        };
                    }
                }
            }
        }
        Event::LeaseBlocked { until_ms, .. } => {
            s.lease_blocked_until_ms = s.lease_blocked_until_ms.max(*until_ms);
        }
        Event::MapKeyMoved { revision } => s.map_key_revision = s.map_key_revision.max(*revision),
        Event::SyncStarted { at_ms } => s.sync_due_ms = at_ms + s.config.sync_interval_ms,
        Event::LeaseObserved { entry, revision } => {
            if let Some(e) = entry {
                s.highest_term = s.highest_term.max(e.term);
            }
            s.lease = entry.clone();
            s.lease_revision = *revision;
        }
        Event::LeaseRequested {
            op, kind, at_ms, ..
        } => {
            s.lease_op = Some(LeaseOp {
                op: *op,
                kind: *kind,
                sent_ms: *at_ms,
            });
            s.next_op = s.next_op.max(op.0 + 1);
        }
        Event::LeaseOpEnded { op, .. } => {
            if s.lease_op.is_some_and(|p| p.op == *op) {
                s.lease_op = None;
            }
        }
        Event::LeaderElected {
            term,
            revision,
            deadline_ms,
            renew_at_ms,
        } => {
            s.leadership = Some(Leadership {
                term: *term,
                revision: *revision,
                deadline_ms: *deadline_ms,
                renew_at_ms: *renew_at_ms,
            });
            s.lease = Some(LeaseEntry {
                holder: s.me.clone(),
                term: *term,
            });
            s.lease_revision = s.lease_revision.max(*revision);
            s.highest_term = s.highest_term.max(*term);
        }
        Event::LeaseRenewed {
            revision,
            deadline_ms,
            renew_at_ms,
        } => {
            if let Some(l) = s.leadership.as_mut() {
                l.revision = l.revision.max(*revision);
                l.deadline_ms = l.deadline_ms.max(*deadline_ms);
                l.renew_at_ms = *renew_at_ms;
            }
            s.lease_revision = s.lease_revision.max(*revision);
        }
        Event::LeaseRevisionLearned { revision } => {
            if let Some(l) = s.leadership.as_mut() {
                l.revision = l.revision.max(*revision);
            }
        }
        Event::LeadershipLost { .. } => s.leadership = None,
        Event::MemberUpdated {
            node,
            info,
            revision,
        } => {
            s.members.insert(
                node.clone(),
                Member {
                    status: info.status,
                    weight: info.weight,
                    revision: *revision,
                },
            );
        }
        Event::MemberGone {
            node,
            status,
            revision,
        } => {
            if let Some(m) = s.members.get_mut(node) {
                m.status = *status;
                m.revision = *revision;
            }
        }
        Event::MemberForgotten { node } => {
            s.members.remove(node);
        }
        Event::MapAdopted {
            map,
            revision,
            gained,
            lost,
        } => {
            s.highest_term = s.highest_term.max(map.term());
            s.map = map.clone();
            s.map_revision = *revision;
            s.map_key_revision = s.map_key_revision.max(*revision);
            for slot in lost.iter() {
                s.hosted.remove(slot);
            }
            for slot in gained.iter() {
                s.hosted.insert(slot);
            }
        }
        Event::MapProposed { write, .. } => {
            s.next_op = s.next_op.max(write.op.0 + 1);
            s.map_op = Some(write.clone());
        }
        Event::MapWriteEnded { op, .. } => {
            if s.map_op.as_ref().is_some_and(|w| w.op == *op) {
                s.map_op = None;
            }
        }
        Event::Synced { part } => match part {
            SyncPart::Lease => s.synced.lease = true,
            SyncPart::Map => s.synced.map = true,
            SyncPart::Members => s.synced.members = true,
        },
        Event::Exited { .. } => {
            s.exited = true;
            s.hosted = SlotSet::EMPTY;
            s.leadership = None;
        }
    }
}

/// The effects an event asks for. `state` is the state after the event was applied.
pub fn plan(state: &State, ev: &Event) -> Vec<Action> {
    let cfg = &state.config;
    match ev {
        Event::HeartbeatSent { op, .. } => {
            vec![Action::PutMember {
                op: *op,
                info: MemberInfo {
                    status: state.status,
                    weight: state.weight,
                },
            }]
        }
        Event::SyncStarted { .. } => vec![Action::ReadLease, Action::ReadMap, Action::ReadMembers],
        Event::LeaseRequested {
            op, kind, expected, ..
        } => vec![match kind {
            LeaseOpKind::Acquire => Action::AcquireLease {
                op: *op,
                expected: *expected,
            },
            LeaseOpKind::Renew => Action::RenewLease {
                op: *op,
                term: state.leadership.map_or(Term(0), |l| l.term),
                expected: (!cfg.planted(PlantedBug::RenewWithoutCas)).then_some(*expected),
            },
            LeaseOpKind::Release => Action::ReleaseLease {
                op: *op,
                expected: *expected,
            },
        }],
        Event::LeaseOpEnded { reread: true, .. } => vec![Action::ReadLease],
        Event::MapProposed {
            write,
            expected,
            lease_revision,
        } => vec![
            Action::WriteMap {
                op: write.op,
                map: write.proposal.clone(),
                expected: *expected,
                lease_revision: *lease_revision,
                fenced: !cfg.planted(PlantedBug::StaleLeaderWrite),
            },
            Action::Announce(ev.clone()),
        ],
        Event::MapWriteEnded { reread: true, .. } => vec![Action::ReadMap, Action::ReadLease],
        Event::MapAdopted { gained, lost, .. } => {
            let mut actions = Vec::new();
            if !lost.is_empty() {
                actions.push(Action::StopSlots(*lost));
            }
            if !gained.is_empty() {
                actions.push(Action::StartSlots(*gained));
            }
            actions
        }
        Event::LeaderElected { .. }
        | Event::LeadershipLost { .. }
        | Event::StatusChanged { .. } => {
            vec![Action::Announce(ev.clone())]
        }
        Event::MemberGone { .. } if state.leadership.is_some() => {
            vec![Action::Announce(ev.clone())]
        }
        Event::Exited { stopped } => {
            let mut actions = Vec::new();
            if !stopped.is_empty() {
                actions.push(Action::StopSlots(*stopped));
            }
            actions.extend([Action::DeleteMember, Action::Exit]);
            actions
        }
        _ => Vec::new(),
    }
}
