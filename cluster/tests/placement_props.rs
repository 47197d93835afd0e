//! Property tests of placement over random clusters: balanced, minimal (the moves equal an
//! independently computed lower bound), deterministic, and never on a node that is not Active.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;

use cluster::{
    Epoch, NodeId, NodeStatus, PlacementNode, SLOT_COUNT, ShardMap, Term, Weight, place,
};
use proptest::prelude::*;

fn id(i: usize) -> NodeId {
    NodeId::new(&format!("node-{i:03}")).unwrap()
}

fn status(i: u8) -> NodeStatus {
    match i % 8 {
        0 => NodeStatus::Joining,
        1 => NodeStatus::Draining,
        2 => NodeStatus::Failed,
        3 => NodeStatus::Left,
        _ => NodeStatus::Active,
    }
}

/// A random cluster and a random current map whose owners may be any of the nodes, nodes that
/// are not in the list at all, or nobody.
fn cluster_and_map() -> impl Strategy<Value = (Vec<PlacementNode>, ShardMap)> {
    (1usize..40, any::<u64>()).prop_flat_map(|(n, _)| {
        (
            prop::collection::vec((0u8..8, 1u64..6), n),
            prop::collection::vec(0usize..(n + 5), SLOT_COUNT),
        )
            .prop_map(move |(specs, raw_owners)| {
                let nodes: Vec<PlacementNode> = specs
                    .iter()
                    .enumerate()
                    .map(|(i, (st, w))| PlacementNode {
                        id: id(i),
                        status: status(*st),
                        weight: Weight::new(*w).unwrap(),
                    })
                    .collect();
                let owners = raw_owners
                    .iter()
                    .map(|&o| (o < n + 3).then(|| id(o)))
                    .collect();
                (nodes, ShardMap::new(Epoch(1), Term(1), owners).unwrap())
            })
    })
}

/// The fewest slots any balanced placement must move, computed from first principles: every
/// slot of a non-Active or unknown owner, plus every slot above an Active node's floor share,
/// less one for each node that may round up and already holds more than its floor (as many as
/// the rounding leaves over).
fn lower_bound(nodes: &[PlacementNode], current: &ShardMap) -> usize {
    let active: Vec<&PlacementNode> = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Active)
        .collect();
    let total: u64 = active.iter().map(|n| u64::from(n.weight.get())).sum();
    let held = current.counts();
    let mut orphaned = current.unowned();
    for (owner, count) in &held {
        if !active.iter().any(|n| &n.id == owner) {
            orphaned += count;
        }
    }
    let mut floors = 0usize;
    let mut excess = 0usize;
    let mut may_round_up_and_gain = 0usize;
    for n in &active {
        let share = SLOT_COUNT as u64 * u64::from(n.weight.get());
        let floor = (share / total) as usize;
        floors += floor;
        let h = held.get(&n.id).copied().unwrap_or(0);
        excess += h.saturating_sub(floor);
        if !share.is_multiple_of(total) && h > floor {
            may_round_up_and_gain += 1;
        }
    }
    let left_over = SLOT_COUNT - floors;
    orphaned + excess - may_round_up_and_gain.min(left_over)
}

fn counts(owners: &[Option<NodeId>]) -> BTreeMap<NodeId, usize> {
    let mut c = BTreeMap::new();
    for o in owners.iter().flatten() {
        *c.entry(o.clone()).or_insert(0) += 1;
    }
    c
}

fn moved(current: &ShardMap, next: &[Option<NodeId>]) -> usize {
    current
        .owners()
        .iter()
        .zip(next)
        .filter(|(a, b)| a != b)
        .count()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn balanced_minimal_deterministic_and_only_on_active((nodes, current) in cluster_and_map(), rotate in 0usize..40) {
        let next = place(&current, &nodes).unwrap();
        prop_assert_eq!(next.len(), SLOT_COUNT);
        let active: Vec<&PlacementNode> = nodes.iter().filter(|n| n.status == NodeStatus::Active).collect();
        if active.is_empty() {
            prop_assert!(next.iter().all(Option::is_none));
            return Ok(());
        }
        // Only on Active nodes, and every slot owned.
        for o in &next {
            let o = o.as_ref().unwrap();
            prop_assert!(active.iter().any(|n| &n.id == o), "slot on {} which is not Active", o);
        }
        // Balanced by weight.
        let total: u64 = active.iter().map(|n| u64::from(n.weight.get())).sum();
        let c = counts(&next);
        for n in &active {
            let share = SLOT_COUNT as u64 * u64::from(n.weight.get());
            let (lo, hi) = (share / total, share.div_ceil(total));
            let got = c.get(&n.id).copied().unwrap_or(0) as u64;
            prop_assert!((lo..=hi).contains(&got), "{} owns {} outside {}..={}", n.id, got, lo, hi);
        }
        // Minimal: exactly the lower bound.
        prop_assert_eq!(moved(&current, &next), lower_bound(&nodes, &current));
        // Deterministic, whatever the order of the nodes.
        let mut shuffled = nodes.clone();
        shuffled.rotate_left(rotate % nodes.len());
        shuffled.reverse();
        prop_assert_eq!(place(&current, &shuffled).unwrap(), next);
    }

    /// On a balanced map of equal weights, a join moves exactly the excess of the over-full
    /// nodes, and a failure moves exactly the failed node's slots.
    #[test]
    fn join_moves_the_excess_and_failure_the_failed_slots(n in 1usize..60, victim in any::<prop::sample::Index>()) {
        let mut nodes: Vec<PlacementNode> = (0..n)
            .map(|i| PlacementNode { id: id(i), status: NodeStatus::Active, weight: Weight::ONE })
            .collect();
        let balanced = ShardMap::new(Epoch(1), Term(1), place(&ShardMap::empty(), &nodes).unwrap()).unwrap();

        // Join: the new node's target count of slots move, all of them to it.
        nodes.push(PlacementNode { id: id(n), status: NodeStatus::Active, weight: Weight::ONE });
        let joined = place(&balanced, &nodes).unwrap();
        let target_floor = SLOT_COUNT / (n + 1);
        let excess: usize = balanced.counts().values().map(|&h| h.saturating_sub(SLOT_COUNT.div_ceil(n + 1))).sum();
        let moved_join = moved(&balanced, &joined);
        prop_assert!(moved_join >= excess);
        prop_assert_eq!(moved_join, counts(&joined).get(&id(n)).copied().unwrap_or(0));
        prop_assert!(moved_join == target_floor || moved_join == target_floor + 1);
        prop_assert_eq!(moved_join, lower_bound(&nodes, &balanced));
        nodes.pop();

        // Failure: exactly the failed node's slots move.
        let v = victim.index(n);
        nodes[v].status = NodeStatus::Failed;
        let failed = place(&balanced, &nodes).unwrap();
        let lost = balanced.counts().get(&id(v)).copied().unwrap_or(0);
        prop_assert_eq!(moved(&balanced, &failed), lost);
    }
}

#[test]
fn a_thousand_nodes_are_balanced() {
    let nodes: Vec<PlacementNode> = (0..1000)
        .map(|i| PlacementNode {
            id: id(i),
            status: NodeStatus::Active,
            weight: Weight::ONE,
        })
        .collect();
    let owners = place(&ShardMap::empty(), &nodes).unwrap();
    let c = counts(&owners);
    assert_eq!(c.len(), 1000);
    assert!(c.values().all(|&k| k == 1 || k == 2));
    assert_eq!(c.values().filter(|&&k| k == 2).count(), 24);
}
