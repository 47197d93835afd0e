//! Property tests of [`SlotSet::aligned_blocks`] over random slot sets: the blocks are aligned,
//! disjoint, in order, cover exactly the set, and no two could merge into one (so there are as
//! few as the set allows).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use cluster::{SLOT_BITS, SLOT_COUNT, Slot, SlotSet};
use proptest::prelude::*;

/// Random sets: scattered slots, or runs of slots (as placement makes them).
fn slot_sets() -> impl Strategy<Value = SlotSet> {
    prop_oneof![
        proptest::collection::vec(0u64..SLOT_COUNT as u64, 0..300)
            .prop_map(|v| v.into_iter().map(Slot::from_hash).collect()),
        proptest::collection::vec((0u64..SLOT_COUNT as u64, 0u64..400), 0..4).prop_map(|runs| {
            runs.into_iter()
                .flat_map(|(a, n)| (a..(a + n).min(SLOT_COUNT as u64)).map(Slot::from_hash))
                .collect()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn blocks_are_the_set_in_the_fewest_aligned_pieces(set in slot_sets()) {
        let blocks = set.aligned_blocks();
        let mut covered = SlotSet::EMPTY;
        let mut next = 0usize;
        for b in &blocks {
            prop_assert!(b.log2_len <= SLOT_BITS);
            prop_assert_eq!(b.start.index() % b.len(), 0, "unaligned {:?}", b);
            prop_assert!(b.start.index() >= next, "out of order or overlapping: {:?}", b);
            next = b.start.index() + b.len();
            for s in b.slots() {
                prop_assert!(covered.insert(s));
            }
        }
        prop_assert_eq!(covered, set);
        // Maximal: no block's buddy (the other half of the next larger aligned block) is
        // another block of the same size.
        for w in blocks.windows(2) {
            let (a, b) = (w[0], w[1]);
            let buddies = a.log2_len == b.log2_len
                && a.log2_len < SLOT_BITS
                && a.start.index() % (2 * a.len()) == 0
                && b.start.index() == a.start.index() + a.len();
            prop_assert!(!buddies, "{:?} and {:?} could be one block", a, b);
        }
        // A run of slots takes at most 2 × SLOT_BITS blocks.
        let runs = (0..SLOT_COUNT)
            .filter(|&i| {
                set.contains(Slot::from_hash(i as u64))
                    && (i == 0 || !set.contains(Slot::from_hash(i as u64 - 1)))
            })
            .count();
        prop_assert!(blocks.len() <= runs * 2 * SLOT_BITS as usize);
    }
}
