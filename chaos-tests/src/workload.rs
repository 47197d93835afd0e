//! The workload: delta producers and actor commands, each operation recorded with its outcome.
//!
//! - **Deltas.** Operation `i` adds 1.0 to its own [`OPS_ROWS`] rows of the model (rows no other
//!   operation touches, spread over consecutive slots, so one operation is several frames).
//!   After the run each of those rows must read 1.0 if the operation was acknowledged, 0.0 or 1.0
//!   if its outcome is unknown, and never more. A producer whose send failed is replaced by a
//!   fresh one with a new producer id, so a frame that was stored after all cannot break the
//!   chain of later frames.
//! - **Actors.** `add n` to one of [`ACTORS`] counters, `n` unique per operation, so each event
//!   in a history names the operation that made it.
//!
//! An operation is `ok` when the server (JetStream) or the actor acknowledged it, and
//! `indeterminate` when it failed or timed out: it may or may not have taken effect.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actors::es::ActorKey;
use serde_json::json;
use tessel_node::client::ActorClient;
use tessel_node::deltas::Producer;
use tokio::sync::Mutex;

/// Slots of the model.
const SLOTS: u64 = 1024;
/// Slots the workload writes to: every [`SLOT_STRIDE`]th, so that every node owns some. Fewer
/// than all 1024 because every slot that receives deltas checkpoints, and checkpointing all of
/// them at once overloads a three-server JetStream cluster on a small machine.
pub const ACTIVE_SLOTS: u64 = 64;
/// The distance between two written slots.
pub const SLOT_STRIDE: u64 = SLOTS / ACTIVE_SLOTS;
/// Rows per slot.
pub const ROWS_PER_SLOT: u64 = 8192;
/// Rows of the model.
pub const MODEL_ROWS: u64 = SLOTS * ROWS_PER_SLOT;
/// Rows each delta operation writes.
pub const OPS_ROWS: u64 = 8;
/// Delta operations the model has room for.
pub const MAX_DELTA_OPS: u64 = ACTIVE_SLOTS * ROWS_PER_SLOT / OPS_ROWS;
/// Counters the actor workload writes to.
pub const ACTORS: usize = 4;
/// The model's name.
pub const MODEL: &str = "chaos";
/// How long one operation may take before it counts as indeterminate.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// The rows of delta operation `i`: eight rows of eight different written slots, used by no
/// other operation.
pub fn op_rows(i: u64) -> Vec<u32> {
    (0..OPS_ROWS)
        .map(|j| {
            let u = i * OPS_ROWS + j;
            let slot = (u % ACTIVE_SLOTS) * SLOT_STRIDE;
            (slot * ROWS_PER_SLOT + u / ACTIVE_SLOTS) as u32
        })
        .collect()
}

/// The counter actor of actor operation `i`.
pub fn actor_of(i: u64) -> String {
    format!("c{}", i % ACTORS as u64)
}

/// An operation's outcome.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Acknowledged.
    Ok,
    /// Failed or timed out: unknown whether it took effect.
    Indeterminate(String),
}

/// One delta operation.
#[derive(Clone, Debug)]
pub struct DeltaOp {
    /// Its index (its rows: [`op_rows`]).
    pub id: u64,
    /// Start, ms since the run began.
    pub start_ms: u64,
    /// End.
    pub end_ms: u64,
    /// Outcome.
    pub outcome: Outcome,
}

/// One actor operation.
#[derive(Clone, Debug)]
pub struct ActorOp {
    /// The counter's id.
    pub actor: String,
    /// The amount added (unique).
    pub n: i64,
    /// Start, ms since the run began.
    pub start_ms: u64,
    /// End.
    pub end_ms: u64,
    /// Outcome.
    pub outcome: Outcome,
    /// The version the actor answered with.
    pub version: Option<u64>,
}

/// Everything the workload did.
#[derive(Default)]
pub struct History {
    /// Delta operations.
    pub deltas: Vec<DeltaOp>,
    /// Actor operations.
    pub actors: Vec<ActorOp>,
}

/// The running workload.
pub struct Workload {
    /// What it did.
    pub history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    /// Starts `producers` delta producers and one actor client.
    pub fn start(client: async_nats::Client, started: Instant, producers: u32) -> Workload {
        let history = Arc::new(Mutex::new(History::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let next_op = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for p in 0..producers {
            tasks.push(tokio::spawn(produce(
                client.clone(),
                started,
                p,
                next_op.clone(),
                history.clone(),
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(ask(
            client,
            started,
            history.clone(),
            stop.clone(),
        )));
        Workload {
            history,
            stop,
            tasks,
        }
    }

    /// Stops issuing and waits for operations in flight.
    pub async fn stop(self) -> Arc<Mutex<History>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.history
    }
}

fn ms(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

async fn produce(
    client: async_nats::Client,
    started: Instant,
    p: u32,
    next_op: Arc<AtomicU64>,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
) {
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(3))
        .build(client);
    // One producer throughout: after a send that failed or timed out (its frames may or may
    // not be stored), its next frames start new chains, so a frame never stored cannot get a
    // later acknowledged one dead-lettered. The checker's `lost` count tests exactly that.
    let mut producer = Producer::new(
        js,
        crate::procs::CLUSTER,
        MODEL,
        MODEL_ROWS,
        1,
        OPS_ROWS as usize,
        1_000_000 + u64::from(p),
    );
    while !stop.load(Ordering::Relaxed) {
        let id = next_op.fetch_add(1, Ordering::Relaxed);
        if id >= MAX_DELTA_OPS {
            break;
        }
        let rows = op_rows(id);
        let values = vec![1.0f32; rows.len()];
        let start_ms = ms(started);
        let outcome = match tokio::time::timeout(OP_TIMEOUT, producer.send(&rows, &values)).await {
            Ok(Ok(sent)) if sent.rows == OPS_ROWS => Outcome::Ok,
            Ok(Ok(sent)) => Outcome::Indeterminate(format!("{} rows acknowledged", sent.rows)),
            Ok(Err(e)) => Outcome::Indeterminate(e.to_string()),
            Err(_) => Outcome::Indeterminate(format!("no answer within {OP_TIMEOUT:?}")),
        };
        let failed = outcome != Outcome::Ok;
        history.lock().await.deltas.push(DeltaOp {
            id,
            start_ms,
            end_ms: ms(started),
            outcome,
        });
        if failed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
}

async fn ask(
    client: async_nats::Client,
    started: Instant,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
) {
    let actors = ActorClient::new(client, crate::procs::CLUSTER);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let actor = actor_of(i);
        let n = i as i64 + 1;
        i += 1;
        let Ok(key) = ActorKey::new("counter", &actor) else {
            break;
        };
        let start_ms = ms(started);
        let (outcome, version) = match actors
            .ask(&key, &json!({"cmd": "add", "n": n}), OP_TIMEOUT)
            .await
        {
            Ok((_, v)) => (Outcome::Ok, Some(v)),
            Err(e) => (Outcome::Indeterminate(e.to_string()), None),
        };
        history.lock().await.actors.push(ActorOp {
            actor,
            n,
            start_ms,
            end_ms: ms(started),
            outcome,
            version,
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_operation_has_its_own_rows_in_distinct_slots() {
        let mut seen = HashSet::new();
        for i in [0, 1, 127, 128, 129, MAX_DELTA_OPS - 1] {
            let rows = op_rows(i);
            let slots: HashSet<u64> = rows.iter().map(|&r| u64::from(r) / ROWS_PER_SLOT).collect();
            assert_eq!(slots.len(), OPS_ROWS as usize);
            for r in rows {
                assert!(u64::from(r) < MODEL_ROWS);
                assert!(seen.insert(r), "row {r} reused");
            }
        }
        // Exhaustively: no two (op, j) share a row, and only written slots are used.
        let all: HashSet<u32> = (0..MAX_DELTA_OPS).flat_map(op_rows).collect();
        assert_eq!(all.len() as u64, MAX_DELTA_OPS * OPS_ROWS);
        assert!(
            all.iter()
                .all(|r| (u64::from(*r) / ROWS_PER_SLOT).is_multiple_of(SLOT_STRIDE))
        );
    }
}
