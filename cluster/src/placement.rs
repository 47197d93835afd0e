//! Placement of the [`SLOT_COUNT`] slots on the active nodes.
//!
//! `place` is balanced, minimal and deterministic:
//! - **balanced**: every eligible node gets ⌊S·wᵢ/W⌋ or ⌈S·wᵢ/W⌉ slots (S = 1024, wᵢ its weight,
//!   W the sum); with equal weights that is ⌊S/N⌋ or ⌈S/N⌉;
//! - **minimal**: a slot moves only if its owner is not eligible, or its owner holds more than its
//!   target; which nodes get the rounded-up targets is chosen so that this count is the smallest
//!   possible (nodes that already hold more keep more);
//! - **deterministic**: the result depends only on the inputs, never on the order of `nodes`.
//!
//! A node is eligible only when it is [`NodeStatus::Active`].

use crate::shard_map::ShardMap;
use crate::types::{NodeId, NodeStatus, SLOT_COUNT, Weight};

/// The most nodes placement accepts in one call.
pub const MAX_NODES: usize = 100_000;

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementNode {
    /// Its id.
    pub id: NodeId,
    /// Its status: only Active nodes receive slots.
    pub status: NodeStatus,
    /// Its capacity weight.
    pub weight: Weight,
}

/// Why placement refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    /// The same node id appeared twice.
    #[error("node {0} appears twice")]
    DuplicateNode(NodeId),
    /// More than [`MAX_NODES`] nodes.
    #[error("{0} nodes is more than the {MAX_NODES} placement accepts")]
    TooManyNodes(usize),
}

/// Places every slot on an Active node (or leaves all unowned when there is none).
pub fn place(
    current: &ShardMap,
    nodes: &[PlacementNode],
) -> Result<Vec<Option<NodeId>>, PlaceError> {
    place_among(current, nodes, |s| s == NodeStatus::Active)
}

/// The placement engine, with the eligibility rule as an argument so that a planted bug can
/// widen it; production code always goes through [`place`].
pub(crate) fn place_among(
    current: &ShardMap,
    nodes: &[PlacementNode],
    eligible: impl Fn(NodeStatus) -> bool,
) -> Result<Vec<Option<NodeId>>, PlaceError> {
    if nodes.len() > MAX_NODES {
        return Err(PlaceError::TooManyNodes(nodes.len()));
    }
    let mut sorted: Vec<&PlacementNode> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(w) = sorted.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(PlaceError::DuplicateNode(w[0].id.clone()));
    }
    let cands: Vec<&PlacementNode> = sorted.into_iter().filter(|n| eligible(n.status)).collect();
    if cands.is_empty() {
        return Ok(vec![None; SLOT_COUNT]);
    }
    let index_of = |id: &NodeId| cands.binary_search_by(|c| c.id.cmp(id)).ok();

    // How many slots each candidate holds now.
    let mut held = vec![0usize; cands.len()];
    for owner in current.owners().iter().flatten() {
        if let Some(i) = index_of(owner) {
            held[i] += 1;
        }
    }
    let target = targets(&cands, &held);

    // Keep each owner's first `target` slots; everything else is free.
    let mut kept = vec![0usize; cands.len()];
    let mut owners: Vec<Option<NodeId>> = vec![None; SLOT_COUNT];
    let mut free = Vec::new();
    for (slot, owner) in current.owners().iter().enumerate() {
        match owner.as_ref().and_then(&index_of) {
            Some(i) if kept[i] < target[i] => {
                kept[i] += 1;
                owners[slot] = Some(cands[i].id.clone());
            }
            _ => free.push(slot),
        }
    }
    // Hand free slots, in slot order, to the nodes below target, in id order.
    let mut free = free.into_iter();
    for (i, cand) in cands.iter().enumerate() {
        for _ in kept[i]..target[i] {
            match free.next() {
                Some(slot) => owners[slot] = Some(cand.id.clone()),
                None => break,
            }
        }
    }
    Ok(owners)
}

/// Each candidate's slot count: ⌊S·wᵢ/W⌋, plus one for the R candidates that most reduce the
/// number of moves, where R is what the floors leave over.
fn targets(cands: &[&PlacementNode], held: &[usize]) -> Vec<usize> {
    let slots = SLOT_COUNT as u64;
    let total: u64 = cands.iter().map(|c| u64::from(c.weight.get())).sum();
    let mut target: Vec<usize> = Vec::with_capacity(cands.len());
    let mut fraction: Vec<u64> = Vec::with_capacity(cands.len());
    for c in cands {
        let scaled = slots * u64::from(c.weight.get());
        target.push((scaled / total) as usize);
        fraction.push(scaled % total);
    }
    let left_over = SLOT_COUNT - target.iter().sum::<usize>();
    if left_over > 0 {
        // Only candidates with a fractional share may round up. Those already holding more than
        // their floor come first (rounding them up saves a move), then the larger fraction, then
        // id order (the candidates are sorted by id, and the sort is stable).
        let mut order: Vec<usize> = (0..cands.len()).filter(|&i| fraction[i] > 0).collect();
        order.sort_by(|&a, &b| {
            let gain = |i: usize| held[i] > target[i];
            gain(b).cmp(&gain(a)).then(fraction[b].cmp(&fraction[a]))
        });
        for &i in order.iter().take(left_over) {
            target[i] += 1;
        }
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Epoch, Term};

    fn node(id: &str) -> PlacementNode {
        PlacementNode {
            id: NodeId::new(id).unwrap(),
            status: NodeStatus::Active,
            weight: Weight::ONE,
        }
    }

    fn map(owners: Vec<Option<NodeId>>) -> ShardMap {
        ShardMap::new(Epoch(1), Term(1), owners).unwrap()
    }

    #[test]
    fn three_nodes_from_empty() {
        let nodes = [node("a"), node("b"), node("c")];
        let owners = place(&ShardMap::empty(), &nodes).unwrap();
        let m = map(owners);
        let counts: Vec<usize> = m.counts().values().copied().collect();
        assert_eq!(counts, vec![342, 341, 341]);
        assert_eq!(m.unowned(), 0);
    }

    #[test]
    fn join_moves_only_the_excess() {
        let before = map(place(&ShardMap::empty(), &[node("a"), node("b")]).unwrap());
        let after = map(place(&before, &[node("a"), node("b"), node("c")]).unwrap());
        // 512 + 512 -> 342/341/341: the new node takes 341 and nothing else moves.
        assert_eq!(before.moved_to(&after), 341);
    }

    #[test]
    fn failure_moves_only_the_failed_nodes_slots() {
        let nodes = [node("a"), node("b"), node("c")];
        let before = map(place(&ShardMap::empty(), &nodes).unwrap());
        let mut after_nodes = nodes.to_vec();
        after_nodes[1].status = NodeStatus::Failed;
        let after = map(place(&before, &after_nodes).unwrap());
        assert_eq!(
            before.moved_to(&after),
            before.slots_of(&nodes[1].id).count()
        );
        assert_eq!(after.slots_of(&nodes[1].id).count(), 0);
    }

    #[test]
    fn weights_are_respected() {
        let mut nodes = vec![node("a"), node("b")];
        nodes[0].weight = Weight::new(3).unwrap();
        let m = map(place(&ShardMap::empty(), &nodes).unwrap());
        assert_eq!(m.slots_of(&nodes[0].id).count(), 768);
        assert_eq!(m.slots_of(&nodes[1].id).count(), 256);
    }

    #[test]
    fn no_active_node_means_no_owner() {
        let mut n = node("a");
        n.status = NodeStatus::Joining;
        assert!(
            place(&ShardMap::empty(), &[n])
                .unwrap()
                .iter()
                .all(Option::is_none)
        );
    }

    #[test]
    fn duplicates_are_refused() {
        let err = place(&ShardMap::empty(), &[node("a"), node("a")]).unwrap_err();
        assert!(matches!(err, PlaceError::DuplicateNode(_)));
    }
}
