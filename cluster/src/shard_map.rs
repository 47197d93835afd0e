//! The shard map: an owner for each of the [`SLOT_COUNT`] slots, the epoch, and the term of the
//! leader that wrote it.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::types::{Epoch, NodeId, SLOT_COUNT, Slot, Term};

/// Why a shard map was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The owner list did not have exactly [`SLOT_COUNT`] entries.
    #[error("a shard map has {SLOT_COUNT} owners, this one has {0}")]
    WrongLength(usize),
}

/// Who owns each slot, at which epoch, written under which term. Cheap to clone: the owner list
/// is shared.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ShardMap {
    epoch: Epoch,
    term: Term,
    owners: Arc<[Option<NodeId>]>,
}

impl ShardMap {
    /// The map before any leader has written one: epoch 0, term 0, no owners.
    pub fn empty() -> Self {
        ShardMap {
            epoch: Epoch(0),
            term: Term(0),
            owners: vec![None; SLOT_COUNT].into(),
        }
    }

    /// Builds a map from exactly [`SLOT_COUNT`] owners.
    pub fn new(epoch: Epoch, term: Term, owners: Vec<Option<NodeId>>) -> Result<Self, MapError> {
        if owners.len() != SLOT_COUNT {
            return Err(MapError::WrongLength(owners.len()));
        }
        Ok(ShardMap {
            epoch,
            term,
            owners: owners.into(),
        })
    }

    /// The map's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The term of the leader that wrote it.
    pub fn term(&self) -> Term {
        self.term
    }

    /// The owner of each slot, indexed by slot number.
    pub fn owners(&self) -> &[Option<NodeId>] {
        &self.owners
    }

    /// The owner of one slot.
    pub fn owner(&self, slot: Slot) -> Option<&NodeId> {
        self.owners[slot.index()].as_ref()
    }

    /// The slots a node owns, in order.
    pub fn slots_of<'a>(&'a self, node: &'a NodeId) -> impl Iterator<Item = Slot> + 'a {
        Slot::all().filter(move |s| self.owners[s.index()].as_ref() == Some(node))
    }

    /// How many slots each owner holds.
    pub fn counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts = BTreeMap::new();
        for owner in self.owners.iter().flatten() {
            *counts.entry(owner.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// How many slots have no owner.
    pub fn unowned(&self) -> usize {
        self.owners.iter().filter(|o| o.is_none()).count()
    }

    /// How many slots have a different owner in `other`.
    pub fn moved_to(&self, other: &ShardMap) -> usize {
        self.owners
            .iter()
            .zip(other.owners.iter())
            .filter(|(a, b)| a != b)
            .count()
    }

    /// Whether two maps assign every slot to the same owner (epoch and term aside).
    pub fn same_owners(&self, other: &ShardMap) -> bool {
        Arc::ptr_eq(&self.owners, &other.owners) || self.owners == other.owners
    }
}
