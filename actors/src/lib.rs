//! # actors — what runs inside a tessel node
//!
//! The ractor supervision tree of a node (node supervisor, coordinator, slot hosts, model actors,
//! event-sourced actors) and, as pure modules, the delta and event-sourcing domains they use.
//!
//! **Invariant:** `actors` never decides placement; it hosts what the shard map says.
//! **Boundary:** no NATS subjects or wire formats here; the `node` crate owns those.
//!
//! Today it holds the actor address rule; the actors themselves arrive with the issues that need
//! them (nodes on NATS, event-sourced actors, the delta pipeline).

pub mod address;
pub mod behavior;
pub mod es;
pub mod model;
