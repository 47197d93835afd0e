//! # cluster — the pure core of tessel
//!
//! Membership, lease terms, placement of the 1024 slots, the invariants, and the deterministic
//! simulator that drives many cores over a simulated KV and a faulty bus.
//!
//! **Invariant:** this crate has no async, no I/O, no clock and no randomness. Time (`now_ms`) and
//! seeds come in as arguments; the simulator's random numbers come from a seeded generator.
//! **Boundary:** it knows nothing of NATS subjects, JSON, or processes: the `node` crate turns
//! NATS messages and timer ticks into [`core::Command`]s and performs the [`core::Action`]s.
//!
//! The loop: `decide(&State, &Command) -> Result<Vec<Event>, Rejection>`, then for each event
//! `apply(State, &Event) -> State` and `plan(&State, &Event) -> Vec<Action>`.

pub mod placement;
pub mod shard_map;
pub mod types;

pub use placement::{PlaceError, PlacementNode, place};
pub use shard_map::{MapError, ShardMap};
pub use types::{
    Epoch, NodeId, NodeStatus, Revision, SLOT_BITS, SLOT_COUNT, Slot, SlotBlock, SlotSet, Term,
    ValueError, Weight,
};
pub mod core;
pub mod invariants;
pub mod sim;
