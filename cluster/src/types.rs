//! Value types of the cluster domain. Every constructor that takes an outside value validates it
//! and returns a typed error; once built, a value is known to be well formed.

use std::fmt;
use std::sync::Arc;

/// Number of slots the key space is divided into. Fixed for the life of a cluster.
pub const SLOT_COUNT: usize = 1024;

/// Bits of a slot number: `SLOT_COUNT == 1 << SLOT_BITS`.
pub const SLOT_BITS: u32 = 10;

const _: () = assert!(SLOT_COUNT == 1 << SLOT_BITS);

/// Longest node id accepted, in bytes.
pub const NODE_ID_MAX_LEN: usize = 64;

/// Why an outside value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A node id was empty, too long, or used a character outside `[A-Za-z0-9_-]`.
    #[error("invalid node id {id:?}: {reason}")]
    NodeId {
        /// The refused text (truncated to 80 characters).
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A slot number was not below [`SLOT_COUNT`].
    #[error("slot {0} out of range 0..{SLOT_COUNT}")]
    Slot(u64),
    /// A capacity weight was zero or above [`Weight::MAX`].
    #[error("capacity weight {0} out of range 1..={max}", max = Weight::MAX)]
    Weight(u64),
    /// A status name was not one of the five statuses.
    #[error("unknown node status {0:?}")]
    Status(String),
}

/// A node's identity: 1 to 64 characters from `[A-Za-z0-9_-]`, so it is safe inside a NATS
/// subject token and a KV key. Cheap to clone (shared).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Validates and builds a node id.
    pub fn new(id: &str) -> Result<Self, ValueError> {
        let refuse = |reason| ValueError::NodeId {
            id: id.chars().take(80).collect(),
            reason,
        };
        if id.is_empty() {
            return Err(refuse("empty"));
        }
        if id.len() > NODE_ID_MAX_LEN {
            return Err(refuse("longer than 64 bytes"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(refuse("only A-Z, a-z, 0-9, '-' and '_' are allowed"));
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The fencing token of a leadership: the KV revision at which the lease was created. Strictly
/// increasing across lease holders because revisions are a stream sequence. `Term(0)` means
/// "no leader seen yet".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Term(pub u64);

/// A KV revision (the stream sequence of a key's latest message). `Revision(0)` means "the key
/// has never been written".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Revision(pub u64);

/// The version of the shard map: increases by one with every map the leader writes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Self {
        Epoch(self.0.saturating_add(1))
    }
}

/// One of the [`SLOT_COUNT`] slots. Always in range.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Slot(u16);

impl Slot {
    /// Validates and builds a slot.
    pub fn new(n: u64) -> Result<Self, ValueError> {
        if n < SLOT_COUNT as u64 {
            Ok(Slot(n as u16))
        } else {
            Err(ValueError::Slot(n))
        }
    }

    /// The slot of a hash value: `h mod SLOT_COUNT`. Never fails.
    pub fn from_hash(h: u64) -> Self {
        Slot((h % SLOT_COUNT as u64) as u16)
    }

    /// The slot number.
    pub fn get(self) -> u16 {
        self.0
    }

    /// The slot number, `0..SLOT_COUNT`.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// Every slot in order.
    pub fn all() -> impl Iterator<Item = Slot> {
        (0..SLOT_COUNT as u16).map(Slot)
    }
}

/// A node's capacity weight for placement: 1..=[`Weight::MAX`]. With equal weights every active
/// node gets the same share of slots; with unequal weights, a share in proportion.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Weight(u32);

impl Weight {
    /// The largest accepted weight (so that a sum over many nodes cannot overflow).
    pub const MAX: u32 = 1_000_000;
    /// The weight of a node that says nothing about its capacity.
    pub const ONE: Weight = Weight(1);

    /// Validates and builds a weight.
    pub fn new(w: u64) -> Result<Self, ValueError> {
        if (1..=u64::from(Self::MAX)).contains(&w) {
            Ok(Weight(w as u32))
        } else {
            Err(ValueError::Weight(w))
        }
    }

    /// The weight as a number.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// Where a node is in its life. Allowed transitions:
///
/// ```text
/// Joining ─► Active ─► Draining ─► Left
///    │         │          │
///    └─────────┴──────────┴──► Failed      (its membership key expired)
/// Failed, Left ─► Joining                   (the same id starts again)
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum NodeStatus {
    /// Registered, not yet taking slots.
    Joining,
    /// Healthy and eligible to own slots and to lead.
    Active,
    /// Shutting down gracefully: owns no new slots, hands its slots over, then leaves.
    Draining,
    /// Its membership key expired: it is presumed dead and owns nothing.
    Failed,
    /// Left gracefully: its key was deleted.
    Left,
}

impl NodeStatus {
    /// Whether a node may move from `self` to `to`. Staying in the same status is allowed.
    pub fn can_become(self, to: NodeStatus) -> bool {
        use NodeStatus::*;
        self == to
            || matches!(
                (self, to),
                (Joining, Active | Failed | Left | Draining)
                    | (Active, Draining | Failed | Left)
                    | (Draining, Left | Failed)
                    | (Failed | Left, Joining)
            )
    }

    /// The status's name as it appears in records and output.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Joining => "Joining",
            NodeStatus::Active => "Active",
            NodeStatus::Draining => "Draining",
            NodeStatus::Failed => "Failed",
            NodeStatus::Left => "Left",
        }
    }

    /// Parses a status name.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        Ok(match s {
            "Joining" => NodeStatus::Joining,
            "Active" => NodeStatus::Active,
            "Draining" => NodeStatus::Draining,
            "Failed" => NodeStatus::Failed,
            "Left" => NodeStatus::Left,
            other => return Err(ValueError::Status(other.chars().take(40).collect())),
        })
    }
}

/// A set of slots, as a 1024-bit bitmap: cheap to copy and compare.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SlotSet([u64; SLOT_COUNT / 64]);

impl SlotSet {
    /// The empty set.
    pub const EMPTY: SlotSet = SlotSet([0; SLOT_COUNT / 64]);

    /// Adds a slot; returns whether it was absent.
    pub fn insert(&mut self, slot: Slot) -> bool {
        let (w, b) = (slot.index() / 64, slot.index() % 64);
        let absent = self.0[w] & (1 << b) == 0;
        self.0[w] |= 1 << b;
        absent
    }

    /// Removes a slot; returns whether it was present.
    pub fn remove(&mut self, slot: Slot) -> bool {
        let (w, b) = (slot.index() / 64, slot.index() % 64);
        let present = self.0[w] & (1 << b) != 0;
        self.0[w] &= !(1 << b);
        present
    }

    /// Whether the slot is in the set.
    pub fn contains(&self, slot: Slot) -> bool {
        self.0[slot.index() / 64] & (1 << (slot.index() % 64)) != 0
    }

    /// How many slots are in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The slots in `self` but not in `other`.
    pub fn minus(&self, other: &SlotSet) -> SlotSet {
        let mut out = *self;
        for (o, x) in out.0.iter_mut().zip(other.0.iter()) {
            *o &= !x;
        }
        out
    }

    /// The slots in order.
    pub fn iter(&self) -> impl Iterator<Item = Slot> + '_ {
        Slot::all().filter(|s| self.contains(*s))
    }
}

/// An aligned power-of-two run of slots: the `1 << log2_len` slots from `start`, where `start`
/// is a multiple of that length. Such a run is exactly the slots whose numbers share their
/// first `SLOT_BITS - log2_len` bits, so one subject wildcard can name it (see the node's read
/// subjects).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SlotBlock {
    /// Its first slot.
    pub start: Slot,
    /// The base-2 logarithm of its length, `0..=SLOT_BITS`.
    pub log2_len: u32,
}

impl SlotBlock {
    /// How many slots it holds.
    pub fn len(self) -> usize {
        1 << self.log2_len
    }

    /// Never empty; here for the `len` convention.
    pub fn is_empty(self) -> bool {
        false
    }

    /// Its slots in order.
    pub fn slots(self) -> impl Iterator<Item = Slot> {
        (self.start.index()..self.start.index() + self.len()).map(|i| Slot(i as u16))
    }
}

impl SlotSet {
    /// The set as aligned blocks, in slot order: each block as long as the set and alignment
    /// allow, so that no two blocks could merge into one. Their union is the set, and they are
    /// disjoint. A contiguous run of slots takes at most `2 * SLOT_BITS` blocks, and all slots
    /// one.
    pub fn aligned_blocks(&self) -> Vec<SlotBlock> {
        let mut out = Vec::new();
        let mut i = 0usize;
        while i < SLOT_COUNT {
            if !self.contains(Slot(i as u16)) {
                i += 1;
                continue;
            }
            // The largest block that starts here: aligned at `i`, inside the set.
            let align = if i == 0 {
                SLOT_BITS
            } else {
                i.trailing_zeros().min(SLOT_BITS)
            };
            let mut log2_len = 0;
            while log2_len < align
                && (i..i + (2 << log2_len)).all(|j| self.contains(Slot(j as u16)))
            {
                log2_len += 1;
            }
            out.push(SlotBlock {
                start: Slot(i as u16),
                log2_len,
            });
            i += 1 << log2_len;
        }
        out
    }
}

impl FromIterator<Slot> for SlotSet {
    fn from_iter<I: IntoIterator<Item = Slot>>(iter: I) -> Self {
        let mut set = SlotSet::EMPTY;
        for s in iter {
            set.insert(s);
        }
        set
    }
}

impl fmt::Debug for SlotSet {
    /// Prints ranges: `{0-99, 512, 700-1023}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut run: Option<(usize, usize)> = None;
        for s in self.iter().map(Slot::index) {
            run = match run {
                Some((a, b)) if b + 1 == s => Some((a, s)),
                Some((a, b)) => {
                    parts.push(if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    });
                    Some((s, s))
                }
                None => Some((s, s)),
            };
        }
        if let Some((a, b)) = run {
            parts.push(if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            });
        }
        write!(f, "{{{}}}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_validated() {
        assert!(NodeId::new("n-1_a").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("a.b").is_err());
        assert!(NodeId::new("a b").is_err());
        assert!(NodeId::new("*").is_err());
        assert!(NodeId::new(&"x".repeat(65)).is_err());
        assert!(NodeId::new(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn slots_are_checked() {
        assert_eq!(Slot::new(1023).map(Slot::index), Ok(1023));
        assert_eq!(Slot::new(1024), Err(ValueError::Slot(1024)));
        assert_eq!(Slot::all().count(), SLOT_COUNT);
    }

    #[test]
    fn slot_sets() {
        let mut set: SlotSet = [0u64, 1, 2, 5, 1023]
            .iter()
            .map(|&n| Slot::from_hash(n))
            .collect();
        assert_eq!(set.len(), 5);
        assert_eq!(format!("{set:?}"), "{0-2, 5, 1023}");
        assert!(set.remove(Slot::from_hash(1)));
        assert!(!set.remove(Slot::from_hash(1)));
        assert!(set.contains(Slot::from_hash(1023)));
        let other: SlotSet = [5u64].iter().map(|&n| Slot::from_hash(n)).collect();
        assert_eq!(set.minus(&other).len(), 3);
        assert!(SlotSet::EMPTY.is_empty());
    }

    #[test]
    fn aligned_blocks_cover_the_set_with_the_fewest_blocks() {
        let set_of = |r: std::ops::Range<u64>| -> SlotSet { r.map(Slot::from_hash).collect() };
        let all = set_of(0..1024);
        assert_eq!(
            all.aligned_blocks(),
            vec![SlotBlock {
                start: Slot(0),
                log2_len: SLOT_BITS
            }]
        );
        assert!(SlotSet::EMPTY.aligned_blocks().is_empty());
        // 3..13 = {3} + 4..8 + 8..12 + {12}.
        let blocks = set_of(3..13).aligned_blocks();
        let got: Vec<(u16, u32)> = blocks.iter().map(|b| (b.start.get(), b.log2_len)).collect();
        assert_eq!(got, vec![(3, 0), (4, 2), (8, 2), (12, 0)]);
        // A third of the slots, as placement hands them out.
        let third = set_of(342..683);
        let blocks = third.aligned_blocks();
        assert!(blocks.len() <= 2 * SLOT_BITS as usize, "{blocks:?}");
        let back: SlotSet = blocks.iter().flat_map(|b| b.slots()).collect();
        assert_eq!(back, third);
        let last = set_of(1023..1024).aligned_blocks();
        assert_eq!(
            last,
            vec![SlotBlock {
                start: Slot(1023),
                log2_len: 0
            }]
        );
    }

    #[test]
    fn weights_are_checked() {
        assert!(Weight::new(0).is_err());
        assert!(Weight::new(1).is_ok());
        assert!(Weight::new(u64::from(Weight::MAX) + 1).is_err());
    }

    #[test]
    fn status_transitions() {
        use NodeStatus::*;
        assert!(Joining.can_become(Active));
        assert!(Active.can_become(Draining));
        assert!(Draining.can_become(Left));
        assert!(Active.can_become(Failed));
        assert!(Failed.can_become(Joining));
        assert!(!Failed.can_become(Active));
        assert!(!Left.can_become(Active));
        assert!(!Draining.can_become(Active));
        assert!(!Active.can_become(Joining));
        for s in [Joining, Active, Draining, Failed, Left] {
            assert_eq!(NodeStatus::parse(s.as_str()), Ok(s));
        }
        assert!(NodeStatus::parse("active").is_err());
    }
}
