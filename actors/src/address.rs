//! Actor addresses and the stable rule that maps an actor to its slot.

#[cfg(doc)]
use cluster::SLOT_COUNT;
use cluster::Slot;

/// The slot of an actor `(type, id)`: FNV-1a (64-bit) over the bytes of `type`, one `/` byte,
/// then the bytes of `id`, modulo [`SLOT_COUNT`]. The rule is part of the wire contract (other
/// clients compute it too): changing it moves every actor.
pub fn slot_of(actor_type: &str, id: &str) -> Slot {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in actor_type
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(id.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    Slot::from_hash(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_is_stable() {
        // Pinned values: if these change, every deployed actor would move.
        assert_eq!(slot_of("model", "emb").index(), 209);
        assert_eq!(slot_of("model", "emc").index(), 798);
        assert_eq!(slot_of("counter", "a").index(), 63);
    }
}
