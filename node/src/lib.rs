//! # node — the `tessel` binary's library
//!
//! The shell around the pure core: NATS I/O (the KV lease, membership, the shard map), the
//! configuration, the ractor supervision tree, the command line, and local process management.
//!
//! **Invariant:** decisions are made by `cluster::core`; this crate only turns NATS messages
//! and timer ticks into commands and performs the core's actions.
//! **Boundary:** the only crate that knows subject strings, wire formats and the wall clock.

pub mod bench;
pub mod client;
pub mod cmd;
pub mod config;
pub mod connect;
pub mod deltas;
pub mod demo;
pub mod eventstore;
pub mod http;
pub mod idle_trim;
pub mod localcluster;
pub mod metrics;
pub mod natsd;
pub mod ordered;
pub mod procs;
pub mod progress;
pub mod records;
pub mod runtime;
pub mod saga;
pub mod status;
pub mod store;
pub mod tables;
pub mod vactors;
