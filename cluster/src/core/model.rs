//! The data of the core: its state, the commands it takes, the events it emits, the actions it
//! asks the shell to perform, and the reasons it refuses a command.

use std::collections::BTreeMap;

use crate::core::config::CoreConfig;
use crate::shard_map::ShardMap;
use crate::types::{NodeId, NodeStatus, Revision, SlotSet, Term, Weight};

/// Identifies one request the core asked the shell to make, so that its reply can be matched
/// (and a late reply to an older request recognised and ignored).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct OpId(pub u64);

/// A live lease as read from the KV.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct LeaseEntry {
    /// The node holding it.
    pub holder: NodeId,
    /// Its term: the revision at which it was created.
    pub term: Term,
}

/// What a membership record says.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MemberInfo {
    /// The node's status as it last wrote it.
    pub status: NodeStatus,
    /// Its capacity weight.
    pub weight: Weight,
}

/// A member as this node knows it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Member {
    /// Its status (Failed when its key expired, Left when it was deleted).
    pub status: NodeStatus,
    /// Its capacity weight.
    pub weight: Weight,
    /// The KV revision of the last record that changed this entry.
    pub revision: Revision,
}

/// This node's leadership, while it holds the lease.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Leadership {
    /// The term (the lease's creation revision).
    pub term: Term,
    /// The lease's current revision (the expected revision of the next renewal).
    pub revision: Revision,
    /// By its own clock, the node stops acting as leader at this instant: the send time of the
    /// last successful write of the lease, plus the TTL, minus the margin.
    pub deadline_ms: u64,
    /// When the next renewal is due.
    pub renew_at_ms: u64,
}

/// The kind of a lease request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum LeaseOpKind {
    /// Create the lease (absent or expired).
    Acquire,
    /// Rewrite it with a fresh TTL, against the revision last seen.
    Renew,
    /// Delete it, against the revision last seen.
    Release,
}

/// A lease request in flight.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct LeaseOp {
    /// Its id.
    pub op: OpId,
    /// What it asks for.
    pub kind: LeaseOpKind,
    /// When it was sent, by this node's clock.
    pub sent_ms: u64,
}

/// A shard-map write in flight (atomically with a renewal of the lease, so the server refuses it
/// when the lease moved on).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct MapWrite {
    /// Its id.
    pub op: OpId,
    /// The map being written.
    pub proposal: ShardMap,
    /// The nodes that were Active when the proposal was made (the invariant checks that the
    /// proposal uses no other).
    pub active: Vec<NodeId>,
    /// When it was sent, by this node's clock.
    pub sent_ms: u64,
}

/// One node's view of the cluster and its own part in it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct State {
    /// Timings and limits.
    pub config: CoreConfig,
    /// This node.
    pub me: NodeId,
    /// This node's own status.
    pub status: NodeStatus,
    /// This node's capacity weight.
    pub weight: Weight,
    /// When `Start` was handled (None before).
    pub started_ms: Option<u64>,
    /// When this node last became Joining (at start, or when it registered again after its
    /// membership lapsed). It turns Active once a heartbeat sent since then is acknowledged.
    pub joined_ms: u64,
    /// Whether the node has exited.
    pub exited: bool,
    /// Which of lease, map and members have been read at least once since start.
    pub synced: Synced,
    /// The other nodes, and this one as the KV last showed it.
    pub members: BTreeMap<NodeId, Member>,
    /// The live lease, as last seen (None: absent or expired).
    pub lease: Option<LeaseEntry>,
    /// The lease key's latest revision seen (a marker or tombstone counts): the expected
    /// revision of the next acquire.
    pub lease_revision: Revision,
    /// This node's leadership, if it acts as leader.
    pub leadership: Option<Leadership>,
    /// The lease request in flight.
    pub lease_op: Option<LeaseOp>,
    /// The adopted shard map.
    pub map: ShardMap,
    /// The adopted map's KV revision.
    pub map_revision: Revision,
    /// The map key's latest revision seen, whatever it held (an unreadable record counts): the
    /// expected revision of the next map write.
    pub map_key_revision: Revision,
    /// Until this instant a contender must not acquire: the lease key held an unreadable record
    /// (garbage, or a lease no faithful KV could have written), which is treated as a live lease
    /// of an unknown holder for one TTL from when it was seen.
    pub lease_blocked_until_ms: u64,
    /// The map write in flight (leader only).
    pub map_op: Option<MapWrite>,
    /// The slots whose hosts this node runs: always the adopted map's slots of this node.
    pub hosted: SlotSet,
    /// The highest term seen in any lease or map.
    pub highest_term: Term,
    /// The next request id.
    pub next_op: u64,
    /// Heartbeats in flight (id, send time), newest last, at most [`HEARTBEATS_IN_FLIGHT`].
    pub heartbeats: Vec<(OpId, u64)>,
    /// When the next heartbeat is due.
    pub heartbeat_due_ms: u64,
    /// Send time of the newest heartbeat the KV acknowledged.
    pub heartbeat_ok_ms: u64,
    /// When the next full re-read is due.
    pub sync_due_ms: u64,
    /// When draining started.
    pub drain_started_ms: Option<u64>,
}

/// Most heartbeats remembered while waiting for their acknowledgements.
pub const HEARTBEATS_IN_FLIGHT: usize = 8;

/// Which parts of the KV a node has read since it started.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Synced {
    /// The lease was read.
    pub lease: bool,
    /// The map was read.
    pub map: bool,
    /// The member list was read.
    pub members: bool,
}

impl Synced {
    /// Whether everything was read.
    pub fn all(self) -> bool {
        self.lease && self.map && self.members
    }
}

/// A part of the KV a node reads at start.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum SyncPart {
    /// The lease key.
    Lease,
    /// The map key.
    Map,
    /// The membership keys.
    Members,
}

/// How a member key disappeared.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Gone {
    /// Its TTL ran out (a marker): the node is presumed dead.
    Expired,
    /// It was deleted: the node left gracefully.
    Deleted,
}

/// The outcome of a plain KV write (lease or membership).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum KvOutcome {
    /// Written at this revision.
    Written {
        /// The new revision.
        revision: Revision,
    },
    /// Refused: the key's revision was not the expected one.
    WrongRevision,
    /// No answer or a transport error: it may or may not have been written.
    Failed,
}

/// The outcome of the atomic map write.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum MapOutcome {
    /// Both the lease renewal and the map were written.
    Written {
        /// The map's new revision.
        map_revision: Revision,
        /// The lease's new revision.
        lease_revision: Revision,
    },
    /// Refused as a whole: the map or the lease had moved on.
    Refused,
    /// No answer or a transport error: it may or may not have been written.
    Failed,
}

/// An input to the core, stamped with this node's clock.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Command {
    /// This node's clock, in milliseconds (monotonic; the origin does not matter).
    pub now_ms: u64,
    /// What happened.
    pub input: Input,
}

/// What the shell saw or was asked.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Input {
    /// The process started: register and read the KV.
    Start,
    /// Time passed.
    Tick,
    /// Shut down gracefully (SIGTERM).
    Drain,
    /// The lease key, from a read or a watch.
    LeaseSeen {
        /// The live lease, or None if absent, deleted or expired.
        entry: Option<LeaseEntry>,
        /// The key's revision (0 if never written).
        revision: Revision,
    },
    /// The lease key holds a record that cannot be read (malformed, or inconsistent with its
    /// revision).
    LeaseUnreadable {
        /// The key's revision.
        revision: Revision,
    },
    /// The answer to a lease request.
    LeaseReply {
        /// The request.
        op: OpId,
        /// Its outcome.
        outcome: KvOutcome,
    },
    /// The map key, from a read or a watch.
    MapSeen {
        /// The map, or None if never written, deleted, or unreadable.
        map: Option<ShardMap>,
        /// The key's revision.
        revision: Revision,
    },
    /// The answer to a map write.
    MapReply {
        /// The request.
        op: OpId,
        /// Its outcome.
        outcome: MapOutcome,
    },
    /// One membership key changed (a watch).
    MemberSeen {
        /// Whose key.
        node: NodeId,
        /// Its record, or how it disappeared.
        record: Result<MemberInfo, Gone>,
        /// The key's revision.
        revision: Revision,
    },
    /// A full read of the membership keys; nodes without a key are absent.
    MembersListed {
        /// Every live record.
        entries: Vec<(NodeId, MemberInfo, Revision)>,
        /// The KV's latest revision when the read was made.
        as_of: Revision,
    },
    /// The answer to a heartbeat.
    HeartbeatReply {
        /// The request.
        op: OpId,
        /// Its outcome.
        outcome: KvOutcome,
    },
}

/// Why this node stopped acting as leader.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum LossReason {
    /// Its own deadline passed without a successful renewal.
    Expired,
    /// The server refused a renewal or a map write: the lease moved on.
    Refused,
    /// It saw a lease or map of another holder or a higher term.
    Superseded,
    /// It released the lease (draining).
    Released,
    /// Its own membership lapsed, or it stopped being Active.
    NotActive,
}

/// A past-tense fact about this node's view. `apply` folds them into the state.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Event {
    /// The node started, as Joining.
    Started {
        /// When.
        at_ms: u64,
    },
    /// This node's own status changed.
    StatusChanged {
        /// From.
        from: NodeStatus,
        /// To.
        to: NodeStatus,
        /// When.
        at_ms: u64,
    },
    /// A heartbeat (the membership record with a fresh TTL) was sent.
    HeartbeatSent {
        /// Its id.
        op: OpId,
        /// When.
        at_ms: u64,
    },
    /// A heartbeat was answered: written at a revision, or not (refused, failed).
    HeartbeatAnswered {
        /// Its id.
        op: OpId,
        /// The record's revision, when written.
        written: Option<Revision>,
    },
    /// A full re-read of lease, map and members was started.
    SyncStarted {
        /// When.
        at_ms: u64,
    },
    /// The lease view changed.
    LeaseObserved {
        /// The live lease, or None.
        entry: Option<LeaseEntry>,
        /// The key's revision.
        revision: Revision,
    },
    /// The lease key holds an unreadable record: contenders wait one TTL before taking it over.
    LeaseBlocked {
        /// The unreadable record's revision.
        revision: Revision,
        /// Contenders wait until this instant.
        until_ms: u64,
    },
    /// The map key moved to a revision whose record is not a map this node can adopt.
    MapKeyMoved {
        /// The key's revision.
        revision: Revision,
    },
    /// A lease request was sent.
    LeaseRequested {
        /// Its id.
        op: OpId,
        /// What it asks.
        kind: LeaseOpKind,
        /// The revision it expects the key to have.
        expected: Revision,
        /// When.
        at_ms: u64,
    },
    /// The lease request in flight ended (answered, refused or abandoned).
    LeaseOpEnded {
        /// Its id.
        op: OpId,
        /// Whether the lease must be read again (refused, or no answer).
        reread: bool,
    },
    /// This node became leader.
    LeaderElected {
        /// Its term.
        term: Term,
        /// The lease's revision (equal to the term).
        revision: Revision,
        /// When it stops acting unless renewed.
        deadline_ms: u64,
        /// When the first renewal is due.
        renew_at_ms: u64,
    },
    /// The lease was renewed.
    LeaseRenewed {
        /// Its new revision.
        revision: Revision,
        /// The new deadline.
        deadline_ms: u64,
        /// When the next renewal is due.
        renew_at_ms: u64,
    },
    /// The leader learned that its lease has a newer revision than it thought (an answer it
    /// never got was written after all).
    LeaseRevisionLearned {
        /// The revision.
        revision: Revision,
    },
    /// This node stopped acting as leader.
    LeadershipLost {
        /// The term it held.
        term: Term,
        /// Why.
        reason: LossReason,
    },
    /// A member's record was added or changed.
    MemberUpdated {
        /// Which node.
        node: NodeId,
        /// What it says.
        info: MemberInfo,
        /// The record's revision.
        revision: Revision,
    },
    /// A member's key disappeared: Failed (expired) or Left (deleted).
    MemberGone {
        /// Which node.
        node: NodeId,
        /// Failed or Left.
        status: NodeStatus,
        /// The revision of the marker (or of the read that found it absent).
        revision: Revision,
    },
    /// A member no longer needed in the view was forgotten to stay within `max_members`.
    MemberForgotten {
        /// Which node.
        node: NodeId,
    },
    /// A newer map was adopted; this node starts hosts for `gained` and stops those for `lost`.
    MapAdopted {
        /// The map.
        map: ShardMap,
        /// Its revision.
        revision: Revision,
        /// Slots this node now owns and did not.
        gained: SlotSet,
        /// Slots this node owned and no longer does.
        lost: SlotSet,
    },
    /// The leader proposed a new map and sent it, with a lease renewal, as one atomic write.
    MapProposed {
        /// The write.
        write: MapWrite,
        /// The map revision it expects.
        expected: Revision,
        /// The lease revision it expects.
        lease_revision: Revision,
    },
    /// The map write in flight ended.
    MapWriteEnded {
        /// Its id.
        op: OpId,
        /// Whether map and lease must be read again (refused, or no answer).
        reread: bool,
    },
    /// A part of the KV was read for the first time since start.
    Synced {
        /// Which part.
        part: SyncPart,
    },
    /// The node left the cluster and stopped its hosts.
    Exited {
        /// The slots whose hosts it stopped.
        stopped: SlotSet,
    },
}

/// An effect for the shell to perform.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Action {
    /// Write this node's membership record with the member TTL; answer with `HeartbeatReply`.
    PutMember {
        /// Request id.
        op: OpId,
        /// The record.
        info: MemberInfo,
    },
    /// Delete this node's membership key (graceful leave).
    DeleteMember,
    /// Read the lease key; answer with `LeaseSeen`.
    ReadLease,
    /// Read the map key; answer with `MapSeen`.
    ReadMap,
    /// Read every membership key; answer with `MembersListed`.
    ReadMembers,
    /// Create the lease with the lease TTL if its revision is `expected`; answer `LeaseReply`.
    AcquireLease {
        /// Request id.
        op: OpId,
        /// The expected revision (0 if never written, else the marker or tombstone's).
        expected: Revision,
    },
    /// Rewrite the lease with a fresh TTL if its revision is `expected` (None: unconditionally,
    /// which only a planted bug does); answer `LeaseReply`.
    RenewLease {
        /// Request id.
        op: OpId,
        /// The term to write in the record.
        term: Term,
        /// The expected revision.
        expected: Option<Revision>,
    },
    /// Delete the lease if its revision is `expected`; answer `LeaseReply`.
    ReleaseLease {
        /// Request id.
        op: OpId,
        /// The expected revision.
        expected: Revision,
    },
    /// In one all-or-nothing write: renew the lease if its revision is `lease_revision`
    /// (skipped when `fenced` is false, which only a planted bug does) and write the map if its
    /// revision is `expected`; answer `MapReply`.
    WriteMap {
        /// Request id.
        op: OpId,
        /// The map.
        map: ShardMap,
        /// The expected map revision.
        expected: Revision,
        /// The expected lease revision.
        lease_revision: Revision,
        /// Whether the lease check is part of the write.
        fenced: bool,
    },
    /// Start slot hosts.
    StartSlots(SlotSet),
    /// Stop slot hosts (flush and hand over first).
    StopSlots(SlotSet),
    /// Publish a topology event for observers.
    Announce(Event),
    /// Exit the process with success.
    Exit,
}

/// Why a command was refused. A refused command emits no event.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum Rejection {
    /// The node has not started (or has exited).
    #[error("the node is not running")]
    NotRunning,
    /// `Start` was given twice.
    #[error("the node has already started")]
    AlreadyStarted,
    /// The node cannot drain from its status.
    #[error("cannot drain from status {0:?}")]
    CannotDrain(NodeStatus),
    /// A reply to a request that is no longer in flight.
    #[error("reply to {0:?}, which is not in flight")]
    UnknownOp(OpId),
    /// An observation no newer than what the node already has.
    #[error("observation at revision {seen:?} is not newer than {known:?}")]
    Stale {
        /// The observation's revision.
        seen: Revision,
        /// The revision already known.
        known: Revision,
    },
    /// A map written under a term lower than the highest seen, after that term began.
    #[error("map of term {map_term:?} written after term {highest:?} began")]
    StaleTerm {
        /// The map's term.
        map_term: Term,
        /// The highest term seen.
        highest: Term,
    },
    /// A map whose epoch is not above the adopted one.
    #[error("map epoch {seen:?} is not above the adopted {adopted:?}")]
    OldEpoch {
        /// The map's epoch.
        seen: crate::types::Epoch,
        /// The adopted epoch.
        adopted: crate::types::Epoch,
    },
    /// A lease that claims a term already held by another node.
    #[error("lease claims term {term:?} for {claimed}, but {known} holds it")]
    ConflictingLeader {
        /// The term.
        term: Term,
        /// The holder the record names.
        claimed: NodeId,
        /// The holder already known for that term.
        known: NodeId,
    },
    /// A written map (epoch above 0) that leaves slots without an owner: malformed.
    #[error("map epoch {epoch:?} leaves {unowned} slots without an owner")]
    IncompleteMap {
        /// The map's epoch.
        epoch: crate::types::Epoch,
        /// How many slots have no owner.
        unowned: usize,
    },
    /// A record that no faithful KV could have produced (a term above its own revision, or a
    /// lease term that falls inside the adopted map's lifetime under a lower term).
    #[error("inconsistent record: {0}")]
    Inconsistent(&'static str),
    /// A map that names a node this node has never seen register: not written by a leader
    /// of this cluster (a leader places slots only on members it has seen Active).
    #[error("map names {0}, which never registered")]
    UnknownOwner(NodeId),
    /// A new member would exceed `max_members`.
    #[error("more than {0} members")]
    TooManyMembers(usize),
}
