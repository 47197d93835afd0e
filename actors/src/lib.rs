//! # actors — what runs inside a tessel node
//!
//! The ractor supervision tree of a node (node supervisor, coordinator, slot hosts, model actors,
//! event-sourced actors) and, as pure modules, the delta and event-sourcing domains they use.
//!
//! **Invariant:** `actors` never decides placement; it hosts what the shard map says.
//! **Boundary:** no NATS subjects or wire formats here; the `node` crate owns those.
//!
//! Pure modules: the actor address rule, event sourcing (`es`, `behavior`), the model registry
//! (`model`), and the delta domain (`delta`, `frame`, `merge`). The runtime that hosts actors on NATS is
//! in the `node` crate.

pub mod address;
pub mod behavior;
pub mod delta;
pub mod es;
pub mod frame;
pub mod merge;
pub mod model;
