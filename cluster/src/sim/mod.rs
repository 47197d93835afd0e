//! The deterministic simulator: N cores on one thread over a simulated KV and a faulty bus.
//!
//! One seed fixes everything: the fault plan (drop, duplicate and delay rates, partitions,
//! clogged links restored in random order, crashes with restart, pauses longer than the lease
//! TTL, clock skew) and every random choice after it, so a seed replays a run exactly. The
//! invariants of every node are checked after every step, the cross-node ones (one leader per
//! term, at most one node acting as leader at any instant, no lease stolen, every map written by
//! the lease holder of its term) on every KV write and every step, and after the faults stop the
//! cluster must settle within a bounded number of steps: one leader, every slot on an Active
//! node, every node on the latest map.

pub mod kv;
pub mod rng;
mod world;

pub use world::{FaultPlan, MAX_NODES, MAX_STEPS, Report, SimConfig, SimError, describe, run};
