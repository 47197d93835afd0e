//! The delta pipeline: producers publish frames per slot; on each slot's owner a slot model
//! consumes its subject, validates, applies to the table, checkpoints, and answers reads.
//!
//! - Stream `<c>-deltas`, subjects `<c>.delta.<model>.<slot>` (frames, see `actors::frame`) and
//!   `<c>.delta.<model>.dlq` (refused frames, with the reason in `Tessel-Dlq-Reason`).
//! - **Exactly once**: delivery from the stream is at least once; each slot model remembers the
//!   stream sequence it applied last (its position), saved in every checkpoint, and skips any
//!   message at or below it. It reads with an ordered consumer from `position + 1`, so the
//!   position is the whole consumer state: no server-side acks are needed.
//! - **Checkpoints** in the object store `<c>-checkpoints`, object `<model>.<slot>.<position>`
//!   (20 digits), every `checkpoint_every` deltas or `checkpoint_ms`, keeping the last
//!   `keep_checkpoints`; a starting owner restores the newest and replays the tail.
//! - **Reads**: `<c>.model.<model>.get.<b9>.….<b0>` (the slot's ten bits, most significant
//!   first) with `{"rows": [...]}` → `{"ok": {"rows": [[...], ...], "position": N}}`. A node
//!   subscribes once per aligned block of the slots it holds of a model (one wildcard for all
//!   1,024), and a router hands each read to its slot model (see [`route_reads`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ordered::Anchored;
use actors::delta::{DeltaBatch, Hlc, MAX_HLC_NODE, slot_of_row, slot_rows};
use actors::frame::{self, Frame};
use async_nats::jetstream::{self, object_store, stream};
use bytes::Bytes;
use cluster::Slot;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use gpu::cpu::Table;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

/// The deltas stream.
pub fn deltas_stream(cluster: &str) -> String {
    format!("{cluster}-deltas")
}

/// A model's slot subject.
pub fn delta_subject(cluster: &str, model: &str, slot: Slot) -> String {
    format!("{cluster}.delta.{model}.{}", slot.get())
}

/// A model's dead-letter subject.
pub fn dlq_subject(cluster: &str, model: &str) -> String {
    format!("{cluster}.delta.{model}.dlq")
}

/// The prefix of a model's read subjects, up to the slot's bits.
fn read_prefix(cluster: &str, model: &str) -> String {
    format!("{cluster}.model.{model}.get.")
}

/// The first `n` bits of `slot`, most significant first, as subject tokens (`0` or `1`).
fn slot_bit_tokens(slot: Slot, n: u32) -> impl Iterator<Item = &'static str> {
    (0..n.min(cluster::SLOT_BITS)).map(move |i| {
        if slot.get() >> (cluster::SLOT_BITS - 1 - i) & 1 == 1 {
            "1"
        } else {
            "0"
        }
    })
}

/// A model slot's read subject: `<c>.model.<model>.get.` and the slot's ten bits, most
/// significant first (slot 5 is `….get.0.0.0.0.0.0.0.1.0.1`), so that one wildcard names an
/// aligned block of slots (see [`block_subject`]).
pub fn read_subject(cluster: &str, model: &str, slot: Slot) -> String {
    let one = cluster::SlotBlock {
        start: slot,
        log2_len: 0,
    };
    block_subject(&read_prefix(cluster, model), one)
}

/// The subscription subject of an aligned block of a model's slots, after the model's
/// [`read_prefix`]: the bits its slots share, then `>` for the rest (the exact subject for a
/// block of one).
fn block_subject(prefix: &str, block: cluster::SlotBlock) -> String {
    let shared = cluster::SLOT_BITS - block.log2_len.min(cluster::SLOT_BITS);
    let mut tokens: Vec<&str> = slot_bit_tokens(block.start, shared).collect();
    if block.log2_len > 0 {
        tokens.push(">");
    }
    format!("{prefix}{}", tokens.join("."))
}

/// The slot a read subject names, given its model's [`read_prefix`]: `None` unless exactly ten
/// `0`/`1` tokens follow the prefix.
fn slot_of_read_subject(prefix: &str, subject: &str) -> Option<Slot> {
    let bits = subject.strip_prefix(prefix)?;
    let mut n = 0u64;
    let mut count = 0;
    for token in bits.split('.') {
        n = n << 1
            | match token {
                "0" => 0,
                "1" => 1,
                _ => return None,
            };
        count += 1;
    }
    if count != cluster::SLOT_BITS {
        return None;
    }
    Slot::new(n).ok()
}

/// The checkpoints bucket.
pub fn checkpoints_bucket(cluster: &str) -> String {
    format!("{cluster}-checkpoints")
}

/// Checkpoints a starting group reads at a time.
const RESTORE_CONCURRENCY: usize = 16;

/// Payload bytes one unit of a pass's queue stands for: a frame costs a unit per started
/// 64 KiB ([`queue_cost`]), so the usual frame of about 16 KiB costs one.
const QUEUE_UNIT_BYTES: usize = 64 << 10;

/// Units a pass holds read and not yet applied: its read-ahead, or a replay's workers' queues
/// together. 4,096 frames of the usual size, and at most 256 MiB of payload whatever the
/// frames' size (a frame may be as large as the server's `max_payload`; counted in frames
/// alone, 4,096 frames of 8 MiB would have been 32 GiB).
const PASS_QUEUE_UNITS: usize = 4_096;

/// What a frame of `len` payload bytes costs in a pass's queue: one unit per started
/// [`QUEUE_UNIT_BYTES`], at least one (a small frame may keep a whole read buffer alive), at
/// most the whole queue (so that any frame fits).
fn queue_cost(len: usize) -> u32 {
    let units = len.div_ceil(QUEUE_UNIT_BYTES).clamp(1, PASS_QUEUE_UNITS);
    u32::try_from(units).unwrap_or(u32::MAX)
}

/// Frames a pass takes from its reader at a time (progress is reported once per chunk, or per
/// as many frames).
const SCAN_CHUNK_FRAMES: usize = 256;

/// A pass ends when the consumer has delivered nothing for this long.
const SCAN_IDLE: Duration = Duration::from_secs(2);

/// At most this many worker threads share a replay's pass (one per core, at least two).
const MAX_REPLAY_WORKERS: usize = 8;

/// Queue units ([`queue_cost`]; as many frames of the usual size) a replay's router gathers
/// for one worker before handing them over (waking a worker for every few frames cost the
/// router more than its routing).
const REPLAY_BATCH_FRAMES: usize = 64;

// A batch handed over always fits in the queue: under REPLAY_BATCH_FRAMES units before its
// last frame, and that frame's cost is clamped to the queue, so acquires are clamped too.
const _: () = assert!(REPLAY_BATCH_FRAMES <= PASS_QUEUE_UNITS);

/// The header with a refused frame's reason.
pub const DLQ_REASON_HEADER: &str = "Tessel-Dlq-Reason";

/// A header a producer may put on a delta: once the owner has applied the frame it publishes
/// the header's value on [`applied_subject`] (core NATS, not stored). Benchmarks and tracing
/// tools use it to time publish → applied.
pub const TRACE_HEADER: &str = "Tessel-Trace";

/// A header on each applied notice: the microseconds the owner held the frame, from its
/// receipt off the consumer until the notice is sent (queue, window, validation, apply). The
/// rest of publish → applied is the server and the network.
pub const HELD_US_HEADER: &str = "Tessel-Held-Us";

/// The longest trace value that is echoed; longer or non-token values are ignored.
pub const MAX_TRACE_BYTES: usize = 64;

/// Runs a table operation that waits on a device (a CUDA table synchronises its stream, tens to
/// hundreds of microseconds) without stalling the tasks queued behind it on this runtime
/// worker: on a multi-thread runtime it goes through `block_in_place`, which hands the worker's
/// queue to another thread first. CPU tables (a few microseconds of memory work per window) and
/// current-thread runtimes run it inline.
fn off_worker<R>(device: gpu::DeviceKind, f: impl FnOnce() -> R) -> R {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread && device != gpu::DeviceKind::Cpu {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Runs `f` on a slot's table where its device wants the work done: on the device's own
/// threads when it has them (a CUDA device, or the CPU with `delta_cpu_apply_on_threads`),
/// the table going there and coming back so that the slot task waits without holding a
/// runtime thread; otherwise through [`off_worker`]. `None` when the job did not finish (its
/// thread panicked, or the threads are gone): the table went with it, and the slot stops as
/// on a device loss.
async fn on_device<R: Send + 'static>(
    lease: &crate::tables::DeviceLease,
    cpu_on_threads: bool,
    mut table: gpu::Table,
    f: impl FnOnce(&mut gpu::Table) -> R + Send + 'static,
) -> Option<(gpu::Table, R)> {
    match lease.threads(cpu_on_threads) {
        Some(threads) => {
            threads
                .run(move || {
                    let r = f(&mut table);
                    (table, r)
                })
                .await
        }
        None => {
            let r = off_worker(table.device().kind, || f(&mut table));
            Some((table, r))
        }
    }
}

/// Applies a window's rows and values to `table` in batches of at most `max_batch_rows` (the
/// table's staging limit): all batches or none.
fn apply_window(
    table: &mut gpu::Table,
    rows: &[u32],
    values: &[f32],
    max_batch_rows: usize,
) -> Result<(), gpu::Error> {
    let d = table.dim();
    let batches: Vec<(&[u32], &[f32])> = rows
        .chunks(max_batch_rows)
        .zip(values.chunks(max_batch_rows * d))
        .collect();
    table.apply_many(&batches)
}

/// Where owners announce traced frames they applied: `<c>.applied.<model>`.
pub fn applied_subject(cluster: &str, model: &str) -> String {
    format!("{cluster}.applied.{model}")
}

/// The trace id of a delta message, when it carries a well-formed one.
pub fn trace_of(msg: &jetstream::Message) -> Option<Bytes> {
    let v = msg.headers.as_ref()?.get(TRACE_HEADER)?.as_str();
    let ok = !v.is_empty()
        && v.len() <= MAX_TRACE_BYTES
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| Bytes::copy_from_slice(v.as_bytes()))
}

/// Creates or binds the deltas stream and the checkpoints bucket. The bucket's handle is
/// shared (it holds the bucket's stream description, about 1.5 KB, and every slot model of a
/// node holds it).
pub async fn ensure(
    js: &jetstream::Context,
    cluster: &str,
    replicas: usize,
) -> anyhow::Result<Arc<object_store::ObjectStore>> {
    // Create first, bind on refusal (see `store::create_or_bind` for why not the other way).
    let cfg = stream::Config {
        name: deltas_stream(cluster),
        subjects: vec![format!("{cluster}.delta.>")],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_message_size: i32::try_from(frame::MAX_FRAME_BYTES).unwrap_or(i32::MAX),
        allow_direct: true,
        ..Default::default()
    };
    crate::store::create_or_bind(js, cfg)
        .await
        .map_err(|e| anyhow::anyhow!("deltas stream: {e}"))?;
    let bucket = checkpoints_bucket(cluster);
    match js
        .create_object_store(object_store::Config {
            bucket: bucket.clone(),
            num_replicas: replicas,
            ..Default::default()
        })
        .await
    {
        Ok(s) => Ok(Arc::new(s)),
        Err(e) => js
            .get_object_store(&bucket)
            .await
            .map(Arc::new)
            .map_err(|_| anyhow::anyhow!("checkpoints bucket: {e}")),
    }
}

/// Why a produce failed.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// A row outside the model or values of the wrong shape.
    #[error("bad batch: {0}")]
    BadBatch(String),
    /// The server did not acknowledge.
    #[error("publish failed: {0}")]
    Publish(String),
}

/// What one `send` delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Rows acknowledged by the server.
    pub rows: u64,
    /// Frames acknowledged.
    pub batches: u64,
}

/// Publishes deltas of one model: splits each batch by slot, one frame per slot (several, of
/// at most [`max_frame_rows`] rows, when a slot's share would not fit one message), chained
/// per slot, with at most `max_in_flight` unacknowledged publishes. A send that fails or is
/// dropped part-way starts a new chain on each of its slots.
pub struct Producer {
    js: jetstream::Context,
    cluster: String,
    model: String,
    rows: u64,
    dim: u32,
    max_in_flight: usize,
    clock: Hlc,
    parents: HashMap<u16, u64>,
    msg_id: Option<String>,
}

impl Producer {
    /// A producer id for [`Producer::new`] drawn at random (std's per-process random hash keys
    /// over the process id and the time), 48 bits. Ids must differ between producers writing to
    /// a model at the same time: each slot checks a chain per id, and two producers sharing one
    /// would break each other's chains, so their owners would dead-letter acknowledged frames.
    /// Among 1,000 concurrent producers two share an id with a chance of about 2·10⁻⁹ (it was
    /// 10⁻⁴ with the frame's first 32 bits alone). A process id does not do: every container's
    /// first process is 1.
    pub fn random_id() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish() & MAX_HLC_NODE
    }

    /// A producer for `model` (`rows × dim`), identified as `node` in timestamps and chains:
    /// unique among the model's producers (see [`Producer::random_id`]); only its low 48 bits
    /// are kept, as many as a frame carries.
    pub fn new(
        js: jetstream::Context,
        cluster: &str,
        model: &str,
        rows: u64,
        dim: u32,
        max_in_flight: usize,
        node: u64,
    ) -> Self {
        Producer {
            js,
            cluster: cluster.into(),
            model: model.into(),
            rows,
            dim,
            max_in_flight: max_in_flight.max(1),
            clock: Hlc::new(node & MAX_HLC_NODE),
            parents: HashMap::new(),
            msg_id: None,
        }
    }

    /// Stamps every frame with `Nats-Msg-Id: <id>.<slot>` (`<id>.<slot>.<k>` for the k-th
    /// further frame of a slot split across frames), so that the server drops a resend
    /// of the same frames within the stream's duplicate window (2 minutes) — for one-off sends
    /// such as a merge, where a retry after a crash must not apply twice. Use it for one
    /// `send` per producer: a second send would reuse the ids and be dropped. Each such frame
    /// starts a chain of its own (parent 0): in a rerun, a slot's first frame may be dropped
    /// as a duplicate while its second is stored, and that one must not depend on the first.
    pub fn with_msg_id(mut self, id: &str) -> Self {
        self.msg_id = Some(id.to_string());
        self
    }

    /// Sends a batch (`values` row-major, `rows.len() × dim`); returns when every frame is
    /// acknowledged by the server.
    pub async fn send(&mut self, rows: &[u32], values: &[f32]) -> Result<Sent, ProduceError> {
        self.send_traced(rows, values, None).await
    }

    /// Sends the change from `old` to `new`, two row-major copies of the rows `first_row ..`:
    /// the rows whose difference has an L2 norm above `min_l2` (0: every row that changed), as
    /// [`actors::delta::capture`] finds them, and nothing when none did. Returns what was
    /// acknowledged and what was captured (the rows left out below the threshold among it).
    pub async fn send_change(
        &mut self,
        first_row: u32,
        old: &[f32],
        new: &[f32],
        min_l2: f32,
    ) -> Result<(Sent, actors::delta::Captured), ProduceError> {
        let captured = actors::delta::capture(first_row, self.dim, old, new, min_l2)
            .map_err(|e| ProduceError::BadBatch(e.to_string()))?;
        let sent = if captured.rows.is_empty() {
            Sent::default()
        } else {
            self.send(&captured.rows, &captured.values).await?
        };
        Ok((sent, captured))
    }

    /// [`Producer::send`], with every frame carrying `trace` in [`TRACE_HEADER`] so that its
    /// owner announces it on [`applied_subject`] once applied.
    pub async fn send_traced(
        &mut self,
        rows: &[u32],
        values: &[f32],
        trace: Option<&str>,
    ) -> Result<Sent, ProduceError> {
        let d = self.dim as usize;
        if values.len() != rows.len() * d {
            return Err(ProduceError::BadBatch(format!(
                "{} values for {} rows of dim {d}",
                values.len(),
                rows.len()
            )));
        }
        let mut by_slot: BTreeMap<u16, (Vec<u32>, Vec<f32>)> = BTreeMap::new();
        for (i, &r) in rows.iter().enumerate() {
            let slot = slot_of_row(self.rows, u64::from(r)).ok_or_else(|| {
                ProduceError::BadBatch(format!("row {r} outside 0..{}", self.rows))
            })?;
            let e = by_slot.entry(slot.get()).or_default();
            e.0.push(r);
            e.1.extend_from_slice(&values[i * d..(i + 1) * d]);
        }
        // Each slot's chain is taken out for the send and put back only once every frame of
        // it is acknowledged. A send that fails, or is dropped part-way, may have left frames
        // unstored; its slots then start new chains (parent 0) with their next frames, which
        // their owners accept either way. Chained to a frame the stream never got, that next
        // frame would be dead-lettered although the server acknowledged it.
        let mut chains: HashMap<u16, u64> = by_slot
            .keys()
            .map(|&slot| (slot, self.parents.remove(&slot).unwrap_or(0)))
            .collect();
        let sent = self.publish_frames(by_slot, trace, &mut chains).await?;
        self.parents.extend(chains);
        Ok(sent)
    }

    /// Publishes each slot's rows as frames of at most [`max_frame_rows`] rows (the server's
    /// `max_payload` allowing), chained per slot, with at most `max_in_flight` unacknowledged.
    async fn publish_frames(
        &mut self,
        by_slot: BTreeMap<u16, (Vec<u32>, Vec<f32>)>,
        trace: Option<&str>,
        chains: &mut HashMap<u16, u64>,
    ) -> Result<Sent, ProduceError> {
        let d = self.dim as usize;
        let per_frame = max_frame_rows(self.js.client().max_payload(), &self.model, self.dim);
        let now = crate::store::wall_ms();
        let mut acks = FuturesUnordered::new();
        let mut sent = Sent::default();
        for (slot, (r, v)) in by_slot {
            let parts: Vec<(Vec<u32>, Vec<f32>)> = if r.len() <= per_frame {
                vec![(r, v)]
            } else {
                r.chunks(per_frame)
                    .zip(v.chunks(per_frame * d))
                    .map(|(r, v)| (r.to_vec(), v.to_vec()))
                    .collect()
            };
            for (part, (r, v)) in parts.into_iter().enumerate() {
                let n = r.len() as u64;
                // Frames with message ids start chains of their own: a rerun's frame may be
                // dropped as a duplicate while the next one is stored, which must not then
                // depend on it.
                let parent = match self.msg_id {
                    Some(_) => 0,
                    None => chains.get(&slot).copied().unwrap_or(0),
                };
                let batch = DeltaBatch::new(self.dim, r, v, self.clock.tick(now), parent)
                    .map_err(|e| ProduceError::BadBatch(e.to_string()))?;
                chains.insert(slot, batch.checksum);
                let bytes = frame::encode(&self.model, slot, &batch)
                    .map_err(|e| ProduceError::BadBatch(e.to_string()))?;
                let subject = format!("{}.delta.{}.{slot}", self.cluster, self.model);
                let mut headers = async_nats::HeaderMap::new();
                if let Some(t) = trace {
                    headers.insert(TRACE_HEADER, t);
                }
                if let Some(id) = &self.msg_id {
                    let id = match part {
                        0 => format!("{id}.{slot}"),
                        k => format!("{id}.{slot}.{k}"),
                    };
                    headers.insert("Nats-Msg-Id", id.as_str());
                }
                let published = if headers.is_empty() {
                    self.js.publish(subject, Bytes::from(bytes)).await
                } else {
                    self.js
                        .publish_with_headers(subject, headers, Bytes::from(bytes))
                        .await
                };
                let ack = published.map_err(|e| ProduceError::Publish(e.to_string()))?;
                acks.push(async move { ack.await.map(|_| n) });
                while acks.len() >= self.max_in_flight {
                    if let Some(r) = acks.next().await {
                        sent.rows += r.map_err(|e| ProduceError::Publish(e.to_string()))?;
                        sent.batches += 1;
                    }
                }
            }
        }
        while let Some(r) = acks.next().await {
            sent.rows += r.map_err(|e| ProduceError::Publish(e.to_string()))?;
            sent.batches += 1;
        }
        Ok(sent)
    }
}

/// Room a producer leaves in a frame's message for its headers (a trace id, a message id).
const FRAME_HEADER_ROOM_BYTES: usize = 1_024;

/// The most rows of `dim` values one frame of `model` carries: within the server's
/// `max_payload` (0 while not known: then only the frame's own limits) less
/// [`FRAME_HEADER_ROOM_BYTES`], within [`frame::MAX_FRAME_BYTES`] and
/// [`frame::MAX_ROWS_PER_FRAME`], and at least one.
pub fn max_frame_rows(max_payload: usize, model: &str, dim: u32) -> usize {
    let limit = match max_payload {
        0 => frame::MAX_FRAME_BYTES,
        m => m
            .saturating_sub(FRAME_HEADER_ROOM_BYTES)
            .min(frame::MAX_FRAME_BYTES),
    };
    let head = frame::HEADER_LEN + model.len().next_multiple_of(4);
    let row = 4 + 4 * dim as usize;
    (limit.saturating_sub(head) / row.max(1))
        .min(frame::MAX_ROWS_PER_FRAME as usize)
        .max(1)
}

/// A delta handed to a slot model, holding its share of the model's queue budget. Queued
/// boxed: a slot's queue is a channel whose blocks hold 32 entries each, and a node keeps a
/// queue per slot of every model it serves; 8 bytes an entry instead of 440 keeps a block at
/// 256 bytes.
pub struct Queued {
    msg: jetstream::Message,
    permit: tokio::sync::OwnedSemaphorePermit,
    /// When the model's consumer handed it over.
    received: Instant,
}

/// Limits and timings of a slot model.
#[derive(Clone, Debug)]
pub struct SlotModelConfig {
    /// Most frames applied together.
    pub window_frames: usize,
    /// Most bytes of frames applied together.
    pub window_bytes: usize,
    /// Most bytes of deltas received but not yet applied, per model on a node: the consumer
    /// waits (backpressure) rather than buffer more.
    pub queue_bytes: usize,
    /// Longest wait to fill a window.
    pub window_ms: u64,
    /// Refuse values with |v| above this.
    pub max_abs: f32,
    /// Checkpoint after this many frames…
    pub checkpoint_every: u64,
    /// …or this long.
    pub checkpoint_ms: u64,
    /// Checkpoints kept per slot.
    pub keep_checkpoints: usize,
    /// Apply on the device's threads on the CPU too (see [`crate::tables::DeviceLease::threads`]).
    pub cpu_apply_on_threads: bool,
    /// Threads for applying.
    pub apply_threads: usize,
    /// The model's transform: values are multiplied by this…
    pub scale: f32,
    /// …then clipped to ±this.
    pub clip: Option<f32>,
}

impl Default for SlotModelConfig {
    fn default() -> Self {
        SlotModelConfig {
            window_frames: 256,
            window_bytes: 8 << 20,
            queue_bytes: 32 << 20,
            window_ms: 0,
            max_abs: 1e6,
            checkpoint_every: 10_000,
            checkpoint_ms: 10_000,
            keep_checkpoints: 3,
            cpu_apply_on_threads: false,
            apply_threads: 1,
            scale: 1.0,
            clip: None,
        }
    }
}

fn checkpoint_name(model: &str, slot: Slot, position: u64) -> String {
    format!("{model}.{}.{position:020}", slot.get())
}

/// Encodes a checkpoint of a slot's table (`data`, row-major, of `rows × dim`): a JSON header
/// line, then the f32 data (little-endian).
pub fn encode_checkpoint(
    rows: std::ops::Range<u64>,
    dim: usize,
    data: &[f32],
    position: u64,
    chains: &Chains,
) -> Vec<u8> {
    let header = json!({"v": 2, "first_row": rows.start, "rows": rows.end - rows.start,
        "dim": dim, "position": position, "chains": chains.to_json(), "checksum": data_checksum(data)});
    let mut out = serde_json::to_vec(&header).unwrap_or_default();
    out.push(b'\n');
    out.reserve(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A checksum of a table's bits (for verifying checkpoints and replays).
pub fn data_checksum(data: &[f32]) -> u64 {
    let mut h = actors::delta::WordHash::new();
    h.f32s(data);
    h.finish()
}

/// Decodes a checkpoint for the expected shape.
pub fn decode_checkpoint(
    bytes: &[u8],
    rows: std::ops::Range<u64>,
    dim: usize,
) -> Result<(Table, u64, Chains), String> {
    let nl = bytes.iter().position(|b| *b == b'\n').ok_or("no header")?;
    let h: Value = serde_json::from_slice(&bytes[..nl]).map_err(|e| e.to_string())?;
    if !(h["v"] == 1 || h["v"] == 2)
        || h["first_row"].as_u64() != Some(rows.start)
        || h["rows"].as_u64() != Some(rows.end - rows.start)
        || h["dim"].as_u64() != Some(dim as u64)
    {
        return Err(format!(
            "checkpoint shape {h} does not match rows {rows:?} dim {dim}"
        ));
    }
    let data = &bytes[nl + 1..];
    if data.len() != (rows.end - rows.start) as usize * dim * 4 {
        return Err("checkpoint data length".into());
    }
    let mut table = Table::zeros(rows.clone(), dim);
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if data_checksum(&values) != h["checksum"].as_u64().unwrap_or(0) {
        return Err("checkpoint checksum".into());
    }
    let all: Vec<u32> = (rows.start..rows.end).map(|r| r as u32).collect();
    table.apply(&all, &values, 1).map_err(|e| e.to_string())?;
    let chains = match &h["chains"] {
        Value::Null => Chains::new(),
        v => Chains::from_json(v).ok_or("checkpoint chains")?,
    };
    let position = h["position"].as_u64().ok_or("checkpoint position")?;
    Ok((table, position, chains))
}

/// A slot's table, the stream sequence it has applied through, and its producers' chains.
pub type SlotState = (Table, u64, Chains);

/// Most producers' chains a slot keeps (see [`Chains`]).
pub const MAX_CHAINS_PER_SLOT: usize = 1_024;

/// A slot's producer chains: for each producer (the HLC node of its frames), the checksum of
/// its last frame the slot took and that frame's stream sequence, for at most
/// [`MAX_CHAINS_PER_SLOT`] producers. When one more producer starts, the one whose last frame
/// is oldest is forgotten: its next frame, unless it starts a new chain (parent 0), is then
/// refused as a broken chain, and its chain goes on from there. Without the bound, every
/// producer that ever wrote to a slot (one per `tessel produce` run) would stay in its memory
/// and its checkpoints. The chains depend only on the frames taken, in stream order, so the
/// live slot, a restart from its checkpoint and a replay keep the same ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chains(HashMap<u64, (u64, u64)>);

impl Chains {
    /// No chains.
    pub fn new() -> Self {
        Self::default()
    }

    /// The checksum of `producer`'s last frame here; 0 for a producer with none (or forgotten).
    pub fn last(&self, producer: u64) -> u64 {
        self.0.get(&producer).map_or(0, |&(checksum, _)| checksum)
    }

    /// Takes `producer`'s frame with `checksum`, at stream sequence `seq`, as its chain's last;
    /// forgets the oldest chain when a new one would make one too many.
    pub fn take(&mut self, producer: u64, checksum: u64, seq: u64) {
        if !self.0.contains_key(&producer) && self.0.len() >= MAX_CHAINS_PER_SLOT {
            self.forget_oldest();
        }
        self.0.insert(producer, (checksum, seq));
    }

    /// Forgets the chain whose last frame is oldest (the lower producer id among equals).
    fn forget_oldest(&mut self) {
        if let Some(oldest) = self
            .0
            .iter()
            .min_by_key(|&(&id, &(_, seq))| (seq, id))
            .map(|(&id, _)| id)
        {
            self.0.remove(&oldest);
        }
    }

    /// How many chains are kept.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As a checkpoint holds them: `{"<producer>": [checksum, seq], …}`.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(id, &(checksum, seq))| (id.to_string(), json!([checksum, seq])))
                .collect(),
        )
    }

    /// From a checkpoint: the form of [`Chains::to_json`], or version 1's `{"<producer>":
    /// checksum}` (taken at sequence 0: the first forgotten). More than the bound keeps the
    /// newest. `None` when malformed.
    pub fn from_json(v: &Value) -> Option<Chains> {
        let mut all = Vec::new();
        for (id, entry) in v.as_object()? {
            let id: u64 = id.parse().ok()?;
            let (checksum, seq) = match entry {
                Value::Array(pair) => match pair.as_slice() {
                    [c, s] => (c.as_u64()?, s.as_u64()?),
                    _ => return None,
                },
                other => (other.as_u64()?, 0),
            };
            all.push((id, (checksum, seq)));
        }
        // The newest by (sequence, id), as forgetting the oldest one at a time would keep, in
        // one sort however many a checkpoint holds.
        if all.len() > MAX_CHAINS_PER_SLOT {
            all.sort_unstable_by_key(|&(id, (_, seq))| std::cmp::Reverse((seq, id)));
            all.truncate(MAX_CHAINS_PER_SLOT);
        }
        Some(Chains(all.into_iter().collect()))
    }
}

/// One model of a family of branches: its name, its transform, and where it forked from the
/// previous generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The model.
    pub model: String,
    /// Its delta scale.
    pub scale: f32,
    /// Its delta clip.
    pub clip: Option<f32>,
    /// The parent's stream sequence it forked at (None for a model created from nothing).
    pub fork_seq: Option<u64>,
}

impl Generation {
    /// From a model actor's description.
    pub fn from_description(model: &str, v: &Value) -> Generation {
        Generation {
            model: model.to_string(),
            scale: v["scale"].as_f64().map_or(1.0, |x| x as f32),
            clip: v["clip"].as_f64().map(|x| x as f32),
            fork_seq: v["parent"].as_str().and_then(|_| v["fork_seq"].as_u64()),
        }
    }
}

/// Most generations followed from a branch up to its root.
pub const MAX_LINEAGE: usize = 16;

/// A model's family line, root first and the model last, from the model actors' descriptions.
pub async fn lineage(
    actors: &crate::client::ActorClient,
    model: &str,
) -> Result<Vec<Generation>, String> {
    let mut line = Vec::new();
    let mut next = Some(model.to_string());
    while let Some(name) = next.take() {
        if line.len() >= MAX_LINEAGE {
            return Err(format!(
                "{model} descends through more than {MAX_LINEAGE} branches"
            ));
        }
        let key = actors::es::ActorKey::new("model", &name).map_err(|e| e.to_string())?;
        let (v, _) = actors
            .ask(&key, &json!({"cmd": "describe"}), Duration::from_secs(5))
            .await
            .map_err(|e| format!("describe {name}: {e}"))?;
        if v["state"] == "Absent" {
            return Err(format!("no model {name:?}"));
        }
        line.push(Generation::from_description(&name, &v));
        next = v["parent"].as_str().map(str::to_string);
    }
    line.reverse();
    Ok(line)
}

/// One model's slot on its owner: the table, the position, the consumer.
pub struct SlotModel {
    /// Shared.
    pub js: jetstream::Context,
    /// Client for replies and DLQ.
    pub client: async_nats::Client,
    /// Checkpoints.
    pub checkpoints: Arc<object_store::ObjectStore>,
    /// Cluster.
    pub cluster: String,
    /// Model.
    pub model: String,
    /// Total rows of the model.
    pub rows: u64,
    /// Columns.
    pub dim: u32,
    /// Slot.
    pub slot: Slot,
    /// Limits.
    pub cfg: SlotModelConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl SlotModel {
    /// The names of this model's checkpoints (of every slot), oldest first. A listing that
    /// fails, at the start or part-way, is an error rather than fewer names: a slot restored
    /// from a short list would start from an older checkpoint, or from nothing, and rebuild
    /// from the stream what its newest checkpoint already holds (correct, since the stream
    /// keeps every delta, but a storm of replays on a server that is already struggling).
    async fn checkpoint_names(&self) -> Result<Vec<String>, String> {
        let prefix = format!("{}.", self.model);
        let mut names = Vec::new();
        let mut list = self
            .checkpoints
            .list()
            .await
            .map_err(|e| format!("cannot list the checkpoints: {e}"))?;
        while let Some(item) = list.next().await {
            let info = item.map_err(|e| format!("the checkpoint listing broke off: {e}"))?;
            if info.name.starts_with(&prefix) && !info.deleted {
                names.push(info.name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The stream sequence of the slot's last delta, if it has any.
    async fn last_delta_seq(&self) -> Result<Option<u64>, String> {
        let stream = self
            .js
            .get_stream_no_info(deltas_stream(&self.cluster))
            .await
            .map_err(|e| e.to_string())?;
        last_delta_seq(&stream, &self.cluster, &self.model, self.slot).await
    }

    /// The names among `names` that belong to this slot.
    fn own<'a>(&self, names: &'a [String]) -> impl DoubleEndedIterator<Item = &'a String> {
        let prefix = format!("{}.{}.", self.model, self.slot.get());
        names.iter().filter(move |n| n.starts_with(&prefix))
    }

    /// The newest readable checkpoint of the slot, if it has one; an error when the
    /// checkpoints cannot be listed.
    pub async fn restore(&self) -> Result<Option<SlotState>, String> {
        let names = self.checkpoint_names().await?;
        Ok(self.restore_from(&names, u64::MAX).await)
    }

    /// The newest readable checkpoint among `names` at a position of at most `limit`.
    async fn restore_from(&self, names: &[String], limit: u64) -> Option<SlotState> {
        let range = slot_rows(self.rows, self.slot);
        for name in self.own(names).rev() {
            let pos: u64 = name
                .rsplit('.')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(u64::MAX);
            if pos > limit {
                continue;
            }
            let bytes = match self.read_checkpoint(name, &range).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(model = %self.model, slot = self.slot.get(), %name, error = %e, "cannot read a checkpoint");
                    continue;
                }
            };
            // The position inside must be the one its name gives: the name chose it as at or
            // below the limit, and a table restored at another would skip deltas or apply
            // them twice.
            let decoded =
                decode_checkpoint(&bytes, range.clone(), self.dim as usize).and_then(|v| {
                    if v.1 == pos {
                        Ok(v)
                    } else {
                        Err(format!("its header says position {}", v.1))
                    }
                });
            match decoded {
                Ok(v) => {
                    debug!(model = %self.model, slot = self.slot.get(), position = v.1, "restored checkpoint");
                    return Some(v);
                }
                Err(e) => {
                    warn!(model = %self.model, slot = self.slot.get(), %name, error = %e, "skipping a bad checkpoint")
                }
            }
        }
        None
    }

    /// Reads a checkpoint object. The chunks are read with direct gets rather than the object
    /// store's reader, which creates a consumer per object: restoring a model's 1,024 slots
    /// that way can exceed the server's consumer limit for the 30 s the consumers linger.
    /// Falls back to the object store's reader where direct gets are unavailable.
    async fn read_checkpoint(
        &self,
        name: &str,
        range: &std::ops::Range<u64>,
    ) -> Result<Vec<u8>, String> {
        let info = self
            .checkpoints
            .info(name)
            .await
            .map_err(|e| e.to_string())?;
        if info.deleted {
            return Err("deleted".into());
        }
        // The data plus a generous header: anything larger is not this slot's checkpoint.
        let limit = (range.end - range.start) as usize * self.dim as usize * 4 + (1 << 20);
        if info.size > limit {
            return Err(format!(
                "{} bytes, more than the {limit} expected",
                info.size
            ));
        }
        let direct = async {
            let stream = self
                .js
                .get_stream(format!("OBJ_{}", checkpoints_bucket(&self.cluster)))
                .await
                .map_err(|e| e.to_string())?;
            let subject = format!("$O.{}.C.{}", checkpoints_bucket(&self.cluster), info.nuid);
            let mut bytes = Vec::with_capacity(info.size);
            let mut next = None;
            for _ in 0..info.chunks {
                let m = stream
                    .direct_get_next_for_subject(subject.as_str(), next)
                    .await
                    .map_err(|e| e.to_string())?;
                bytes.extend_from_slice(&m.payload);
                if bytes.len() > info.size {
                    return Err("chunks larger than the object".to_string());
                }
                next = Some(m.sequence + 1);
            }
            if bytes.len() == info.size {
                Ok(bytes)
            } else {
                Err(format!("{} of {} bytes", bytes.len(), info.size))
            }
        };
        match direct.await {
            Ok(b) => Ok(b),
            Err(e) => {
                debug!(%name, error = %e, "direct checkpoint read failed; using the object reader");
                let mut obj = self
                    .checkpoints
                    .get(name)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut bytes = Vec::new();
                obj.read_to_end(&mut bytes)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(bytes)
            }
        }
    }

    /// An empty table of the slot at position 0.
    fn empty(&self) -> SlotState {
        (
            Table::zeros(slot_rows(self.rows, self.slot), self.dim as usize),
            0,
            Chains::new(),
        )
    }

    /// Writes a checkpoint of a host table (a branch's fork state); true when it was stored.
    async fn put_checkpoint(&self, table: &Table, position: u64, chains: &Chains) -> bool {
        let name = checkpoint_name(&self.model, self.slot, position);
        let bytes = encode_checkpoint(table.rows(), table.dim(), table.data(), position, chains);
        let mut reader = bytes.as_slice();
        if let Err(e) = self.checkpoints.put(name.as_str(), &mut reader).await {
            Metrics::inc(&self.metrics.checkpoints_failed_total);
            warn!(model = %self.model, slot = self.slot.get(), error = %e, "checkpoint failed");
            return false;
        }
        Metrics::inc(&self.metrics.checkpoints_total);
        true
    }

    /// Writes a checkpoint at `position` of `table`, whose rows `exported` are (the export
    /// is the caller's: see [`on_device`]). A table that could not be exported (its device
    /// was lost) writes nothing and returns the error.
    /// `kept` is the slot's checkpoints, oldest first (as listed when the slot was restored),
    /// kept up to date here: a checkpoint costs a put and a delete, not a listing of every
    /// checkpoint of the model (each listing is a server-side consumer).
    async fn checkpoint(
        &self,
        exported: Result<Vec<f32>, gpu::Error>,
        table: &gpu::Table,
        position: u64,
        chains: &Chains,
        kept: &mut std::collections::VecDeque<String>,
    ) -> Result<(), gpu::Error> {
        let data = exported?;
        let name = checkpoint_name(&self.model, self.slot, position);
        let bytes = encode_checkpoint(table.rows(), table.dim(), &data, position, chains);
        drop(data);
        let mut reader = bytes.as_slice();
        if let Err(e) = self.checkpoints.put(name.as_str(), &mut reader).await {
            Metrics::inc(&self.metrics.checkpoints_failed_total);
            warn!(model = %self.model, slot = self.slot.get(), error = %e, "checkpoint failed");
            return Ok(());
        }
        Metrics::inc(&self.metrics.checkpoints_total);
        // Keep the last K.
        if kept.back() != Some(&name) {
            kept.push_back(name);
        }
        while kept.len() > self.cfg.keep_checkpoints.max(1) {
            if let Some(old) = kept.pop_front() {
                let _ = self.checkpoints.delete(&old).await;
            }
        }
        Ok(())
    }

    async fn dead_letter(&self, payload: Bytes, reason: &str) {
        Metrics::inc(&self.metrics.deltas_rejected_total);
        let mut h = async_nats::HeaderMap::new();
        h.insert(DLQ_REASON_HEADER, reason);
        h.insert("Tessel-Slot", self.slot.get().to_string().as_str());
        match self
            .js
            .publish_with_headers(dlq_subject(&self.cluster, &self.model), h, payload)
            .await
        {
            Ok(ack) => {
                let _ = ack.await;
            }
            Err(e) => warn!(error = %e, "cannot dead-letter"),
        }
    }

    /// Runs on the messages of its slot (from the model's pump) until the sender is dropped:
    /// validate, apply in windows, checkpoint; a final checkpoint on the way out. `state` is
    /// the table (on the device of `lease`), its position and chains, as restored; `kept` the
    /// slot's checkpoints, oldest first.
    ///
    /// When the device is lost (an operation returns [`gpu::Error::DeviceLost`], or the lease
    /// says another table on the device met the loss) the slot model stops at once without a
    /// checkpoint: the table cannot be read, and the deltas it applied since its last
    /// checkpoint are still in the stream. Its group is then restarted elsewhere from that
    /// checkpoint, so nothing acknowledged is lost and nothing is applied twice.
    ///
    /// Boxed, with its state: a future keeps its arguments beside its locals, and a node runs
    /// a task per slot of every model it serves.
    pub async fn run(
        self: Box<Self>,
        state: Box<(gpu::Table, u64, Chains)>,
        mut inbox: tokio::sync::mpsc::Receiver<Box<Queued>>,
        reads: Arc<ReadQueue>,
        lease: Arc<crate::tables::DeviceLease>,
        mut kept: std::collections::VecDeque<String>,
    ) -> SlotExit {
        let (mut table, mut position, mut chains) = *state;
        // Closes the slot's read queue however this ends.
        let reads = ReadInbox(reads);
        let range = table.rows();
        // Mirrors a loss reported by another table on the device into this one, so that every
        // later operation refuses it.
        let guard = |table: &mut gpu::Table| {
            if lease.is_lost() {
                table.inject_device_lost();
            }
        };
        let lost = |e: &gpu::Error| {
            // One line per slot at debug; the loss itself is logged once, by the device book.
            debug!(model = %self.model, slot = self.slot.get(), device = %lease.id(), error = %e,
                "table lost: stopping; the group restarts from the last checkpoint");
            if matches!(e, gpu::Error::DeviceLost | gpu::Error::Driver(_)) {
                lease.lose();
            }
            Metrics::inc(&self.metrics.tables_lost_total);
            SlotExit::Lost
        };
        let mut since_ckpt = 0u64;
        let mut gate = ReadGate::Unknown;
        let mut last_ckpt = Instant::now();
        let window = Duration::from_millis(self.cfg.window_ms);
        let max_batch_rows = table.config().max_batch_rows.max(1);
        let mut open = true;
        while open {
            // Fill a window: the first message waits (reads are answered meanwhile); then what is
            // already queued is taken at once, and an empty queue is waited on only until
            // `window_ms` after the first message (0: never), so a lone delta is not delayed.
            let mut batch_rows: Vec<u32> = Vec::new();
            let mut batch_values: Vec<f32> = Vec::new();
            let mut frames = 0usize;
            let mut bytes = 0usize;
            let mut traces: Vec<(Bytes, Instant)> = Vec::new();
            let mut walls: Vec<u64> = Vec::new();
            let mut deadline = tokio::time::Instant::now();
            let mut permits: Vec<tokio::sync::OwnedSemaphorePermit> = Vec::new();
            loop {
                let next = if frames == 0 {
                    tokio::select! {
                        m = inbox.recv() => m,
                        req = reads.0.pop() => {
                            guard(&mut table);
                            if let Err(e) = Box::pin(self.answer(&table, position, &mut gate, *req)).await {
                                return lost(&e);
                            }
                            continue;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(self.cfg.checkpoint_ms)) => break,
                    }
                } else {
                    match inbox.try_recv() {
                        Ok(m) => Some(m),
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                        // The timer rounds up to the next millisecond: with no window left
                        // (or none configured) the window closes at once instead.
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty)
                            if window.is_zero() || tokio::time::Instant::now() >= deadline =>
                        {
                            break;
                        }
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                            match tokio::time::timeout_at(deadline, inbox.recv()).await {
                                Ok(m) => m,
                                Err(_) => break,
                            }
                        }
                    }
                };
                let Some(queued) = next else {
                    open = false;
                    break;
                };
                let Queued {
                    msg,
                    permit,
                    received,
                } = *queued;
                // The bytes are released from the model's queue budget once the window applied.
                permits.push(permit);
                if frames == 0 {
                    deadline = tokio::time::Instant::now() + window;
                }
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                if seq <= position {
                    Metrics::inc(&self.metrics.deltas_skipped_total);
                    continue;
                }
                position = seq;
                frames += 1;
                bytes += msg.payload.len();
                match self.validate_into(
                    &msg.payload,
                    seq,
                    &range,
                    &mut chains,
                    &mut batch_rows,
                    &mut batch_values,
                ) {
                    Ok(f) => {
                        traces.extend(trace_of(&msg).map(|t| (t, received)));
                        walls.push(f.ts.wall_ms);
                    }
                    Err(reason) => Box::pin(self.dead_letter(msg.payload.clone(), &reason)).await,
                }
                if frames >= self.cfg.window_frames || bytes >= self.cfg.window_bytes {
                    break;
                }
            }
            // A lost device is noticed even by a slot without traffic (the wait above ends
            // every `checkpoint_ms`).
            guard(&mut table);
            if table.is_lost() {
                return lost(&gpu::Error::DeviceLost);
            }
            if !batch_rows.is_empty() {
                let apply_started = Instant::now();
                let rows_values = (batch_rows, batch_values);
                let job = move |t: &mut gpu::Table| {
                    let done = apply_window(t, &rows_values.0, &rows_values.1, max_batch_rows);
                    (rows_values, done)
                };
                // Boxed: the job holds the window, and every slot task would carry room for it.
                let applied =
                    match Box::pin(on_device(&lease, self.cfg.cpu_apply_on_threads, table, job))
                        .await
                    {
                        Some((t, ((r, v), done))) => {
                            (table, batch_rows, batch_values) = (t, r, v);
                            done
                        }
                        None => {
                            return lost(&gpu::Error::Driver(
                                "an apply on the device's threads did not finish".into(),
                            ));
                        }
                    };
                if let Err(e) = applied {
                    // A validated window cannot be refused for its content: the device failed,
                    // and the window's deltas (already counted in `position`) must come again
                    // from the stream.
                    return lost(&e);
                }
                self.metrics.window_applied(
                    &self.model,
                    batch_rows.len(),
                    apply_started.elapsed(),
                    &walls,
                );
                let subject = applied_subject(&self.cluster, &self.model);
                for (t, received) in traces.drain(..) {
                    let mut headers = async_nats::HeaderMap::new();
                    let held = received.elapsed().as_micros().to_string();
                    headers.insert(HELD_US_HEADER, held.as_str());
                    // Boxed: traced frames are rare, and the publish is the largest thing
                    // a slot task would otherwise carry room for.
                    let _ = Box::pin(
                        self.client
                            .publish_with_headers(subject.clone(), headers, t),
                    )
                    .await;
                }
                self.metrics
                    .deltas_applied_total
                    .fetch_add(frames as u64, std::sync::atomic::Ordering::Relaxed);
                self.metrics.rows_applied_total.fetch_add(
                    batch_rows.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }

            self.metrics
                .slot_queued(&self.model, self.slot.get(), inbox.len() as u64);
            since_ckpt += frames as u64;
            let due = since_ckpt >= self.cfg.checkpoint_every
                || (since_ckpt > 0
                    && last_ckpt.elapsed() >= Duration::from_millis(self.cfg.checkpoint_ms));
            if due || (!open && since_ckpt > 0) {
                guard(&mut table);
                let exported = match Box::pin(on_device(
                    &lease,
                    self.cfg.cpu_apply_on_threads,
                    table,
                    |t: &mut gpu::Table| t.export(),
                ))
                .await
                {
                    Some((t, data)) => {
                        table = t;
                        data
                    }
                    None => {
                        return lost(&gpu::Error::Driver(
                            "a checkpoint export on the device's threads did not finish".into(),
                        ));
                    }
                };
                if let Err(e) =
                    Box::pin(self.checkpoint(exported, &table, position, &chains, &mut kept)).await
                {
                    return lost(&e);
                }
                since_ckpt = 0;
                last_ckpt = Instant::now();
            }
        }
        self.metrics.slot_queued(&self.model, self.slot.get(), 0);
        debug!(model = %self.model, slot = self.slot.get(), position, "slot model stopped");
        SlotExit::Stopped
    }

    /// The model's transform of one value: scale, then clip.
    pub fn transform(&self, v: f32) -> f32 {
        let v = v * self.cfg.scale;
        match self.cfg.clip {
            Some(c) => v.clamp(-c, c),
            None => v,
        }
    }

    /// The live path's validation (shared with replay) of the frame at stream sequence `seq`:
    /// decodes the frame, checks it against the model, the slot's rows, the producer's
    /// checksum chain and the value bounds, and appends its rows and transformed values to
    /// `rows` and `values`. A refused frame appends nothing.
    pub fn validate_into<'a>(
        &self,
        payload: &'a [u8],
        seq: u64,
        range: &std::ops::Range<u64>,
        chains: &mut Chains,
        rows: &mut Vec<u32>,
        values: &mut Vec<f32>,
    ) -> Result<Frame<'a>, String> {
        let f = self.check_frame(payload, seq, range, chains)?;
        let bytes = f.value_bytes();
        let values_before = values.len();
        values.resize(values_before + bytes.len() / 4, 0.0);
        for (v, b) in values[values_before..]
            .iter_mut()
            .zip(bytes.chunks_exact(4))
        {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        if !self.is_identity() {
            for v in &mut values[values_before..] {
                *v = self.transform(*v);
            }
        }
        rows.extend(f.rows());
        Ok(f)
    }

    /// Whether the model's transform leaves values as they are (scale 1, no clip).
    fn is_identity(&self) -> bool {
        self.cfg.scale == 1.0 && self.cfg.clip.is_none()
    }

    /// Every check of [`Self::validate_into`] (advancing the chain as it does), without
    /// copying the values out: the frame, when it is valid.
    fn check_frame<'a>(
        &self,
        payload: &'a [u8],
        seq: u64,
        range: &std::ops::Range<u64>,
        chains: &mut Chains,
    ) -> Result<Frame<'a>, String> {
        let f = Frame::decode(payload).map_err(|e| format!("frame: {e}"))?;
        if f.model != self.model || f.slot != self.slot.get() {
            return Err(format!(
                "frame for {}/{} on {}/{}",
                f.model,
                f.slot,
                self.model,
                self.slot.get()
            ));
        }
        if f.dim != self.dim {
            return Err(format!("dim {} for a model of dim {}", f.dim, self.dim));
        }
        if !f.verify() {
            return Err("checksum does not match the content".into());
        }
        let previous = chains.last(f.ts.node);
        // A chain starts at parent 0 (a new producer); otherwise it continues the last batch.
        let broken = f.parent != 0 && f.parent != previous;
        chains.take(f.ts.node, f.checksum, seq);
        if broken {
            return Err(format!(
                "broken chain: parent {:x}, last {:x}",
                f.parent, previous
            ));
        }
        if let Some(r) = f.rows().find(|r| !range.contains(&u64::from(*r))) {
            return Err(format!("row {r} outside the slot's rows {range:?}"));
        }
        // A branch-free pass the compiler vectorises: `|v| <= max` is false for NaN and ±∞
        // (`max_abs` is finite).
        let max_abs = self.cfg.max_abs;
        let value = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let bytes = f.value_bytes();
        if !bytes
            .chunks_exact(4)
            .fold(true, |ok, b| ok & (value(b).abs() <= max_abs))
        {
            let (i, v) = bytes
                .chunks_exact(4)
                .map(value)
                .enumerate()
                .find(|(_, v)| !v.is_finite() || v.abs() > max_abs)
                .unwrap_or((0, f32::NAN));
            return Err(if v.is_finite() {
                format!("|value| {v} above {max_abs}")
            } else {
                format!("value {i} is not finite")
            });
        }
        Ok(f)
    }

    /// Answers a read ([`ReadAsk`]). A lost device is returned (no reply: the reader retries
    /// until the rebuilt table answers); any other refusal is a `bad_request` reply, or
    /// `too_large` for more rows than one answer can carry.
    async fn answer(
        &self,
        table: &gpu::Table,
        position: u64,
        gate: &mut ReadGate,
        req: async_nats::Message,
    ) -> Result<(), gpu::Error> {
        let Some(reply) = req.reply else {
            return Ok(());
        };
        // A new owner (restored from a checkpoint, replaying the tail) does not answer from an
        // older table than the stream held for the slot when its first read came.
        if *gate == ReadGate::Unknown {
            *gate = match self.last_delta_seq().await {
                Ok(Some(seq)) => ReadGate::Until(seq),
                Ok(None) => ReadGate::Open,
                Err(e) => {
                    debug!(model = %self.model, slot = self.slot.get(), error = %e, "cannot read the slot's last delta; the read is answered behind");
                    ReadGate::Unknown
                }
            };
        }
        if let ReadGate::Until(seq) = *gate
            && position >= seq
        {
            *gate = ReadGate::Open;
        }
        let gate_min = match *gate {
            ReadGate::Open => 0,
            ReadGate::Until(seq) => seq,
            // Not known yet: the reader asks again.
            ReadGate::Unknown => u64::MAX,
        };
        // Read your writes: the reader may ask for the slot's state at or after a position
        // (the stream sequence of the last delta it must see); until the slot has taken it, or
        // the gate's, the answer is `behind`, and the reader asks again.
        let body = match ReadAsk::parse(&req.payload) {
            Err(message) => {
                Metrics::inc(&self.metrics.reads_refused_total);
                json!({"error": {"kind": "bad_request", "message": message}})
            }
            Ok((_, min)) if min.max(gate_min) > position => json!({
                "error": {
                    "kind": "behind",
                    "position": position,
                    "min_position": min.max(gate_min),
                    "message": format!("the slot is at position {position}, behind the position asked for or the one it must reach before it answers"),
                }
            }),
            Ok((ReadAsk::Rows(rows), _)) => {
                let dim = table.dim().max(1);
                let max_rows = max_answer_rows(self.client.max_payload(), dim);
                if rows.len() > max_rows {
                    Metrics::inc(&self.metrics.reads_refused_total);
                    json!({"error": {"kind": "too_large", "max_rows": max_rows, "message": format!(
                        "{} rows of {dim} values may not fit in one answer; ask for at most {max_rows} at a time", rows.len())}})
                } else {
                    match table.gather(&rows) {
                        Ok(vals) => {
                            let out: Vec<&[f32]> = vals.chunks(dim).collect();
                            json!({"ok": {"rows": out, "position": position}})
                        }
                        Err(e @ (gpu::Error::DeviceLost | gpu::Error::Driver(_))) => return Err(e),
                        Err(e) => {
                            Metrics::inc(&self.metrics.reads_refused_total);
                            json!({"error": {"kind": "bad_request", "message": e.to_string()}})
                        }
                    }
                }
            }
            Ok((ReadAsk::Checksum, _)) => match Box::pin(table_checksum(table)).await {
                Ok(checksum) => {
                    let rows = table.rows();
                    json!({"ok": {"checksum": format!("{checksum:016x}"), "position": position, "rows": rows.end - rows.start}})
                }
                Err(e @ (gpu::Error::DeviceLost | gpu::Error::Driver(_))) => return Err(e),
                Err(e) => {
                    Metrics::inc(&self.metrics.reads_refused_total);
                    json!({"error": {"kind": "bad_request", "message": e.to_string()}})
                }
            },
        };
        let _ = self
            .client
            .publish(reply, Bytes::from(body.to_string()))
            .await;
        Ok(())
    }
}

/// Whether a slot model answers reads: only once it has applied what the stream held for its
/// slot when its first read came, so that a slot taken over (restored from a checkpoint, the
/// tail not yet replayed) never answers from an older table than its previous owner did. The
/// reader asks again while the answer is `behind` ("reads during a move are served by the old
/// owner until the new one is ready, or retried").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadGate {
    /// No read yet (or the slot's last delta could not be read).
    Unknown,
    /// Closed until the slot's position reaches this stream sequence.
    Until(u64),
    /// Open for good.
    Open,
}

/// What a read asks of a slot (its request's body): rows, or the checksum of the whole table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadAsk {
    /// `{"rows": [r, …]}`: these rows of the slot, in this order (a row may repeat).
    Rows(Vec<u32>),
    /// `{"checksum": true}`: [`data_checksum`] of the slot's whole table, so that a table can
    /// be compared without shipping it (`tessel replay --verify`).
    Checksum,
}

impl ReadAsk {
    /// Parses a read's body: what it asks, and the position the answer must be at or after
    /// (`min_position`, 0 when absent). A body that is not one of the two forms, or whose rows
    /// are not all row numbers, is refused whole: answering the rows that parse would hand
    /// back fewer rows than were asked for, out of place.
    pub fn parse(payload: &[u8]) -> Result<(ReadAsk, u64), String> {
        let v: Value =
            serde_json::from_slice(payload).map_err(|e| format!("not a JSON read: {e}"))?;
        let min = match &v["min_position"] {
            Value::Null => 0,
            m => m
                .as_u64()
                .ok_or_else(|| format!("min_position {m} is not a stream sequence"))?,
        };
        let ask = match (&v["rows"], &v["checksum"]) {
            (Value::Array(rows), Value::Null) => ReadAsk::Rows(
                rows.iter()
                    .map(|r| r.as_u64().and_then(|r| u32::try_from(r).ok()))
                    .collect::<Option<_>>()
                    .ok_or("rows must all be row numbers (0 to 4294967295)")?,
            ),
            (Value::Null, Value::Bool(true)) => ReadAsk::Checksum,
            _ => return Err("a read asks for {\"rows\": [...]} or {\"checksum\": true}".into()),
        };
        Ok((ask, min))
    }
}

/// The most JSON bytes one f32 takes in an answer, with its separator. An answer's values go
/// through `serde_json::Value`, which holds an f32 as the f64 of the same value and writes
/// that f64's shortest form (so a reader parsing f64 gets the f32 back exactly): at most 23
/// characters, such as `-1.1754943508222875e-38`.
const JSON_F32_BYTES: usize = 24;

/// What an answer holds besides its rows: the envelope, the position, the brackets.
const ANSWER_ENVELOPE_BYTES: usize = 256;

/// The most rows of `dim` values one answer carries within `max_payload` bytes (the server's
/// limit): a read for more is answered `too_large` with this number, and the reader splits it.
pub fn max_answer_rows(max_payload: usize, dim: usize) -> usize {
    max_payload.saturating_sub(ANSWER_ENVELOPE_BYTES) / (dim.max(1) * JSON_F32_BYTES + 2)
}

/// Rows gathered at a time for a table's checksum: the host copy of a device table stays this
/// small however large the slot is.
const CHECKSUM_CHUNK_ROWS: u64 = 4_096;

/// [`data_checksum`] of a table's values, row-major, gathered [`CHECKSUM_CHUNK_ROWS`] rows at a
/// time (the hash is streamed, so this equals the checksum of the whole table in one piece),
/// yielding to the runtime between chunks.
async fn table_checksum(table: &gpu::Table) -> Result<u64, gpu::Error> {
    let range = table.rows();
    let mut h = actors::delta::WordHash::new();
    let mut at = range.start;
    while at < range.end {
        let end = (at + CHECKSUM_CHUNK_ROWS).min(range.end);
        let rows: Vec<u32> = (at..end)
            .map(|r| u32::try_from(r).unwrap_or(u32::MAX))
            .collect();
        h.f32s(&table.gather(&rows)?);
        at = end;
        tokio::task::yield_now().await;
    }
    Ok(h.finish())
}

/// Reads a slot model may have waiting; one more is answered `busy` (and the reader asks
/// again).
const SLOT_READ_QUEUE: usize = 32;

/// A read on its way from the router to its slot model.
pub type ReadRequest = Box<async_nats::Message>;

/// A slot's reads, handed over by the model's router and taken by the slot model: at most
/// [`SLOT_READ_QUEUE`] waiting. A node keeps one per slot of every model it serves, so it is
/// a deque behind a lock and a wake-up (about 100 bytes, nothing more until a read waits)
/// rather than a tokio channel (800 bytes before its first message).
#[derive(Default)]
pub struct ReadQueue {
    waiting: std::sync::Mutex<std::collections::VecDeque<ReadRequest>>,
    ready: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
}

/// Why a read was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadRefused {
    /// [`SLOT_READ_QUEUE`] reads are waiting already.
    Full,
    /// The slot model has ended.
    Closed,
}

impl ReadQueue {
    fn waiting(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<ReadRequest>> {
        // A panic while the lock was held leaves a deque that is still whole.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a read for the slot model.
    pub fn push(&self, req: ReadRequest) -> Result<(), ReadRefused> {
        use std::sync::atomic::Ordering;
        {
            let mut waiting = self.waiting();
            if self.closed.load(Ordering::Acquire) {
                return Err(ReadRefused::Closed);
            }
            if waiting.len() >= SLOT_READ_QUEUE {
                return Err(ReadRefused::Full);
            }
            waiting.push_back(req);
        }
        // Wakes the slot model, or leaves a permit for its next wait.
        self.ready.notify_one();
        Ok(())
    }

    /// The next read, waiting for one. Cancel-safe: a read is taken only when returned.
    pub async fn pop(&self) -> ReadRequest {
        loop {
            if let Some(req) = self.waiting().pop_front() {
                return req;
            }
            self.ready.notified().await;
        }
    }

    /// Refuses every later read and drops those waiting (their readers time out and ask
    /// again): the slot model has ended.
    pub fn close(&self) {
        let mut waiting = self.waiting();
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        waiting.clear();
    }
}

/// The slot model's end of its [`ReadQueue`]: closes it when dropped, however the slot model
/// ends.
struct ReadInbox(Arc<ReadQueue>);

impl Drop for ReadInbox {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Serves the reads of a model's slots on this node: subscribes once per aligned block of the
/// slots in `routes` (see [`cluster::SlotSet::aligned_blocks`]; one subscription when the node
/// holds every slot, at most 20 for a run of slots) and hands each read to its slot model's
/// queue. A read it cannot hand over is answered at once, and counted: `bad_request` (its
/// subject names no slot held here), `busy` (the slot's queue is full), `stopping` (the slot
/// model has ended). Ends when a subscription fails (the group is then restarted) or when it
/// is aborted with its group.
///
/// A node subscribes to the slots it holds and no others, so a read of a slot nobody here
/// holds gets "no responders" at once, and the reader asks again (a slot moving).
async fn route_reads(
    client: async_nats::Client,
    prefix: String,
    routes: HashMap<u16, Arc<ReadQueue>>,
    metrics: Arc<Metrics>,
) {
    let held: cluster::SlotSet = routes
        .keys()
        .filter_map(|&k| Slot::new(u64::from(k)).ok())
        .collect();
    let mut subs = Vec::new();
    for block in held.aligned_blocks() {
        match client.subscribe(block_subject(&prefix, block)).await {
            Ok(s) => subs.push(s),
            Err(e) => {
                warn!(error = %e, "cannot serve reads; the model's slots restart at the next reconcile");
                return;
            }
        }
    }
    if subs.is_empty() {
        // No slots (a group always has some): nothing to serve, and nothing to restart for.
        return std::future::pending().await;
    }
    let mut requests = futures::stream::select_all(subs);
    while let Some(req) = requests.next().await {
        let Some(reply) = req.reply.clone() else {
            Metrics::inc(&metrics.reads_refused_total);
            continue;
        };
        let route = slot_of_read_subject(&prefix, &req.subject)
            .and_then(|slot| routes.get(&slot.get()).map(|tx| (slot, tx)));
        let refused = match route {
            None => {
                json!({"error": {"kind": "bad_request", "message": format!("{} names no slot served here", req.subject)}})
            }
            Some((slot, queue)) => match queue.push(Box::new(req)) {
                Ok(()) => continue,
                Err(ReadRefused::Full) => {
                    json!({"error": {"kind": "busy", "message": format!("slot {} has {SLOT_READ_QUEUE} reads waiting", slot.get())}})
                }
                Err(ReadRefused::Closed) => {
                    json!({"error": {"kind": "stopping", "message": format!("slot {} is stopping here", slot.get())}})
                }
            },
        };
        Metrics::inc(&metrics.reads_refused_total);
        let _ = client
            .publish(reply, Bytes::from(refused.to_string()))
            .await;
    }
}

/// How a slot model ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotExit {
    /// Its inbox closed: it applied what it had and checkpointed.
    Stopped,
    /// Its table was lost with its device: it stopped without a checkpoint.
    Lost,
}

/// The stream sequence of the last delta on a slot's subject of `stream` (the deltas stream,
/// bound without its info: a permission the producer role lacks), if it has any.
async fn last_delta_seq<I>(
    stream: &jetstream::stream::Stream<I>,
    cluster: &str,
    model: &str,
    slot: Slot,
) -> Result<Option<u64>, String> {
    match stream
        .direct_get_last_for_subject(delta_subject(cluster, model, slot))
        .await
    {
        Ok(m) => Ok(Some(m.sequence)),
        Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Whatever the owner has applied (it may be catching up after a restart or a move).
    Any,
    /// At least every delta the stream held for the slot when the read began: the read waits
    /// (up to its timeout) until the owner has taken the slot's last delta, so a writer that
    /// was acknowledged before it reads sees its writes.
    Fresh,
}

/// Reads rows of a model from the owners of their slots.
pub async fn get_rows(
    client: &async_nats::Client,
    cluster: &str,
    model: &str,
    total_rows: u64,
    rows: &[u32],
    freshness: Freshness,
    timeout: Duration,
) -> Result<Vec<Vec<f32>>, String> {
    let stream = match freshness {
        Freshness::Any => None,
        Freshness::Fresh => Some(
            jetstream::new(client.clone())
                .get_stream_no_info(deltas_stream(cluster))
                .await
                .map_err(|e| format!("the deltas stream: {e}"))?,
        ),
    };
    let mut by_slot: BTreeMap<u16, Vec<(usize, u32)>> = BTreeMap::new();
    for (i, &r) in rows.iter().enumerate() {
        let s = slot_of_row(total_rows, u64::from(r))
            .ok_or_else(|| format!("row {r} outside 0..{total_rows}"))?;
        by_slot.entry(s.get()).or_default().push((i, r));
    }
    let mut out = vec![Vec::new(); rows.len()];
    for (slot, items) in by_slot {
        let slot = Slot::new(u64::from(slot)).map_err(|e| e.to_string())?;
        // The slot's last delta now; none yet: nothing to wait for.
        let min_position = match &stream {
            Some(stream) => last_delta_seq(stream, cluster, model, slot)
                .await
                .map_err(|e| format!("slot {}: the last delta: {e}", slot.get()))?,
            None => None,
        };
        // All the slot's rows in one read, unless its owner says one answer cannot carry
        // them: then in parts of the size it names.
        let mut parts = std::collections::VecDeque::from([items.as_slice()]);
        while let Some(part) = parts.pop_front() {
            let mut body = json!({"rows": part.iter().map(|(_, r)| r).collect::<Vec<_>>()});
            if let Some(seq) = min_position {
                body["min_position"] = json!(seq);
            }
            let v = read_reply(
                client,
                cluster,
                model,
                slot,
                &body,
                Duration::from_secs(2),
                timeout,
            )
            .await?;
            match answered_rows(&v, slot, part.len()) {
                Ok(got) => {
                    for ((i, _), row) in part.iter().zip(got) {
                        out[*i] = row;
                    }
                }
                Err(RowsRefused::TooLarge(max)) if (1..part.len()).contains(&max) => {
                    parts.extend(part.chunks(max));
                }
                Err(RowsRefused::TooLarge(max)) => {
                    return Err(format!(
                        "slot {}: its owner answers at most {max} rows at a time",
                        slot.get()
                    ));
                }
                Err(RowsRefused::Other(e)) => return Err(e),
            }
        }
    }
    Ok(out)
}

/// Runs the slot models of the serving models whose slots this node owns, starting and
/// stopping them as models start serving or retire and as slots move (a stopped slot model
/// applies what it has and checkpoints before it lets go).
pub struct ModelHost {
    /// Asks model actors for their state.
    pub actors: crate::client::ActorClient,
    /// JetStream.
    pub js: jetstream::Context,
    /// NATS.
    pub client: async_nats::Client,
    /// Checkpoints.
    pub checkpoints: Arc<object_store::ObjectStore>,
    /// Cluster.
    pub cluster: String,
    /// Whether this node owns a slot now.
    pub hosts: Arc<dyn Fn(Slot) -> bool + Send + Sync>,
    /// Limits of each slot model.
    pub cfg: SlotModelConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The node's devices and what is placed on them.
    pub devices: Arc<crate::tables::DeviceBook>,
}

/// The slot models of one model on this node, fed by one ordered consumer, their tables on one
/// device.
struct Group {
    slots: std::collections::BTreeSet<u16>,
    pump: tokio::task::JoinHandle<()>,
    /// The group's read router ([`route_reads`]).
    reads: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<SlotExit>>,
    lease: Arc<crate::tables::DeviceLease>,
}

impl ModelHost {
    /// Reconciles every `interval` until the task is dropped.
    pub fn spawn(self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut running: HashMap<String, Group> = HashMap::new();
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                self.reconcile(&mut running).await;
            }
        })
    }

    async fn reconcile(&self, running: &mut HashMap<String, Group>) {
        let Ok(names) = crate::saga::model_names(&self.js, &self.cluster).await else {
            return;
        };
        let mut want: HashMap<String, (u64, u32, std::collections::BTreeSet<u16>)> = HashMap::new();
        let mut generations: HashMap<String, Generation> = HashMap::new();
        for name in names {
            let Ok(key) = actors::es::ActorKey::new("model", &name) else {
                continue;
            };
            let Ok((v, _)) = self
                .actors
                .ask(&key, &json!({"cmd": "describe"}), Duration::from_secs(2))
                .await
            else {
                continue;
            };
            if v["state"] != "Serving" {
                continue;
            }
            let (Some(rows), Some(dim)) = (
                v["rows"].as_u64(),
                v["dim"].as_u64().and_then(|d| u32::try_from(d).ok()),
            ) else {
                continue;
            };
            let slots: std::collections::BTreeSet<u16> = Slot::all()
                .filter(|s| (self.hosts)(*s) && !slot_rows(rows, *s).is_empty())
                .map(|s| s.get())
                .collect();
            if !slots.is_empty() {
                generations.insert(name.clone(), Generation::from_description(&name, &v));
                want.insert(name, (rows, dim, slots));
            }
        }
        // A model whose slots changed is stopped (each slot checkpoints) and started again
        // (each restores its checkpoint): simple, and exactly once by position.
        let stale: Vec<String> = running
            .iter()
            .filter(|(m, g)| {
                want.get(*m).is_none_or(|w| w.2 != g.slots)
                    || g.pump.is_finished()
                    // Its reads are not served (a subscription failed).
                    || g.reads.is_finished()
                    // A lost device (or a slot model that stopped on one): rebuild elsewhere.
                    || g.lease.is_lost()
                    || g.tasks.iter().any(|t| t.is_finished())
            })
            .map(|(m, _)| m.clone())
            .collect();
        for m in stale {
            if let Some(g) = running.remove(&m) {
                if g.lease.is_lost() {
                    warn!(model = %m, device = %g.lease.id(), "tables lost with their device: restarting the model's slots from checkpoints");
                }
                g.pump.abort();
                for t in g.tasks {
                    let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
                }
                // Reads of the stopped slots were answered `stopping` meanwhile; now nobody
                // answers them here, and readers retry until the new owner does.
                g.reads.abort();
            }
        }
        for (model, (rows, dim, slots)) in want {
            if running.contains_key(&model) {
                continue;
            }
            let Some(me) = generations.remove(&model) else {
                continue;
            };
            // A branch needs its family line: its slots without a checkpoint of their own
            // start from the parent's tables at the fork point.
            let line = if me.fork_seq.is_some() {
                match lineage(&self.actors, &model).await {
                    Ok(l) => l,
                    Err(e) => {
                        warn!(%model, error = %e, "cannot read the branch's parents");
                        continue;
                    }
                }
            } else {
                vec![me]
            };
            match self.start_group(&line, rows, dim, &slots).await {
                Ok(g) => {
                    running.insert(model, g);
                }
                Err(e) => warn!(%model, error = %e, "cannot start the model's slots"),
            }
        }
    }

    async fn start_group(
        &self,
        line: &[Generation],
        rows: u64,
        dim: u32,
        slots: &std::collections::BTreeSet<u16>,
    ) -> anyhow::Result<Group> {
        let Some(me) = line.last() else {
            anyhow::bail!("no model");
        };
        let model = me.model.as_str();
        let mut models = Vec::new();
        for &slot in slots {
            models.push(SlotModel {
                js: self.js.clone(),
                client: self.client.clone(),
                checkpoints: self.checkpoints.clone(),
                cluster: self.cluster.clone(),
                model: model.to_string(),
                rows,
                dim,
                slot: Slot::new(u64::from(slot))?,
                cfg: SlotModelConfig {
                    scale: me.scale,
                    clip: me.clip,
                    ..self.cfg.clone()
                },
                metrics: self.metrics.clone(),
            });
        }
        // One listing for the group, and a bounded number of checkpoint reads at a time: each
        // is a server-side consumer, and the server limits them.
        let names = match models.first() {
            Some(m) => m.checkpoint_names().await.map_err(|e| {
                Metrics::inc(&self.metrics.checkpoint_list_failures_total);
                anyhow::anyhow!("{e} (the group starts at the next reconcile)")
            })?,
            None => Vec::new(),
        };
        let mut restored = Vec::with_capacity(models.len());
        for chunk in models.chunks(RESTORE_CONCURRENCY) {
            let some =
                futures::future::join_all(chunk.iter().map(|m| m.restore_from(&names, u64::MAX)));
            restored.extend(some.await);
        }
        let missing: std::collections::BTreeSet<u16> = models
            .iter()
            .zip(&restored)
            .filter(|(_, r)| r.is_none())
            .map(|(m, _)| m.slot.get())
            .collect();
        // A branch's slot without a checkpoint of its own starts from the parent's table at
        // the fork point, checkpointed at once so that a restart does not rebuild it again.
        let mut forked: BTreeMap<u16, Table> = BTreeMap::new();
        if let (Some(fork), Some(template), false) =
            (me.fork_seq, models.first(), missing.is_empty())
            && line.len() > 1
        {
            forked = replay_model(
                template,
                &line[..line.len() - 1],
                Some(&missing),
                &|_| fork,
                replay_workers(),
                &mut |_| {},
            )
            .await
            .map_err(|e| anyhow::anyhow!("the branch's fork state: {e}"))?;
            info!(%model, slots = forked.len(), fork, "branch slots start from the parent's state");
        }
        let mut states = Vec::new();
        let mut forked_names = Vec::new();
        for (m, r) in models.iter().zip(restored) {
            let state = match (r, forked.remove(&m.slot.get()), me.fork_seq) {
                (Some(st), _, _) => st,
                (None, Some(table), Some(fork)) => {
                    let chains = Chains::new();
                    // The slot's first checkpoint: nothing to prune.
                    if m.put_checkpoint(&table, fork, &chains).await {
                        forked_names.push(checkpoint_name(model, m.slot, fork));
                    }
                    (table, fork, chains)
                }
                _ => m.empty(),
            };
            states.push(state);
        }
        let mut names = names;
        names.extend(forked_names);
        names.sort();
        let start = states.iter().map(|s| s.1).min().unwrap_or(0);
        let (lease, states) = self.place_tables(model, dim, states)?;
        let mut inboxes: HashMap<u16, tokio::sync::mpsc::Sender<Box<Queued>>> = HashMap::new();
        let mut read_routes: HashMap<u16, Arc<ReadQueue>> = HashMap::new();
        let mut tasks = Vec::new();
        for (m, state) in models.into_iter().zip(states) {
            let (tx, rx) = tokio::sync::mpsc::channel(self.cfg.window_frames * 4);
            inboxes.insert(m.slot.get(), tx);
            let reads = Arc::new(ReadQueue::default());
            read_routes.insert(m.slot.get(), reads.clone());
            let kept = m.own(&names).cloned().collect();
            let span = tracing::info_span!("slot_model", model = %m.model, slot = m.slot.get());
            tasks.push(tokio::spawn(tracing::Instrument::instrument(
                Box::new(m).run(Box::new(state), rx, reads, lease.clone(), kept),
                span,
            )));
        }
        let reads = tokio::spawn(route_reads(
            self.client.clone(),
            read_prefix(&self.cluster, model),
            read_routes,
            self.metrics.clone(),
        ));
        let stream = self.js.get_stream(deltas_stream(&self.cluster)).await?;
        let filters: Vec<String> = slots
            .iter()
            .map(|s| format!("{}.delta.{model}.{s}", self.cluster))
            .collect();
        let mut messages = Anchored::open(stream, filters, start)
            .await
            .map_err(anyhow::Error::msg)?;
        let prefix = format!("{}.delta.{model}.", self.cluster);
        let budget_bytes = self.cfg.queue_bytes.clamp(1, u32::MAX as usize);
        let budget = Arc::new(tokio::sync::Semaphore::new(budget_bytes));
        let (metrics, name) = (self.metrics.clone(), model.to_string());
        let pump = tokio::spawn(async move {
            while let Some(item) = messages.next().await {
                let mut msg = match item {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "delta consumer failed; it restarts at the next reconcile");
                        break;
                    }
                };
                let received = Instant::now();
                if let Ok(info) = msg.info() {
                    metrics.model_lag(&name, info.pending);
                }
                let slot = msg
                    .subject
                    .strip_prefix(prefix.as_str())
                    .and_then(|s| s.parse::<u16>().ok());
                let Some(tx) = slot.and_then(|s| inboxes.get(&s)) else {
                    continue;
                };
                // Backpressure: wait until the slots have applied enough of what is queued.
                let cost = msg.payload.len().clamp(1, budget_bytes) as u32;
                let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
                    break;
                };
                // The payload is a slice of the connection's read buffer (64 KiB), which it
                // would keep alive until applied, however small the frame: the budget bounds
                // what is queued only once the frame holds its own bytes.
                msg.message.payload = Bytes::copy_from_slice(&msg.message.payload);
                let queued = Box::new(Queued {
                    msg,
                    permit,
                    received,
                });
                if tx.send(queued).await.is_err() {
                    break;
                }
            }
            // Dropping the senders lets each slot model apply, checkpoint and stop.
        });
        info!(%model, slots = slots.len(), from_checkpoints = slots.len() - missing.len(), from = start, device = %lease.id(), "serving the model's slots");
        Ok(Group {
            slots: slots.clone(),
            pump,
            reads,
            tasks,
            lease,
        })
    }

    /// Moves a model's restored slot tables (CPU twins) onto the device chosen for them (see
    /// [`crate::tables::load_tables`]), keeping each slot's position and chains.
    #[allow(clippy::type_complexity)]
    fn place_tables(
        &self,
        model: &str,
        dim: u32,
        states: Vec<(Table, u64, Chains)>,
    ) -> anyhow::Result<(
        Arc<crate::tables::DeviceLease>,
        Vec<(gpu::Table, u64, Chains)>,
    )> {
        let table_cfg = gpu::TableConfig {
            cpu_threads: self.cfg.apply_threads.max(1),
            ..gpu::TableConfig::default()
        };
        let (cpu, rest): (Vec<Table>, Vec<(u64, Chains)>) = states
            .into_iter()
            .map(|(table, position, chains)| (table, (position, chains)))
            .unzip();
        let (lease, tables) =
            crate::tables::load_tables(&self.devices, model, dim as usize, cpu, table_cfg)?;
        let live = tables
            .into_iter()
            .zip(rest)
            .map(|(t, (position, chains))| (t, position, chains))
            .collect();
        Ok((Arc::new(lease), live))
    }
}

/// Why a read of rows got no rows.
#[derive(Debug)]
enum RowsRefused {
    /// The owner can carry at most this many rows in one answer.
    TooLarge(usize),
    /// Anything else, said for the user.
    Other(String),
}

/// The rows of a read's answer: exactly `asked` rows, each of `f32`s.
fn answered_rows(v: &Value, slot: Slot, asked: usize) -> Result<Vec<Vec<f32>>, RowsRefused> {
    let Some(got) = v["ok"]["rows"].as_array() else {
        if v["error"]["kind"] == "too_large"
            && let Some(max) = v["error"]["max_rows"].as_u64()
        {
            return Err(RowsRefused::TooLarge(
                usize::try_from(max).unwrap_or(usize::MAX),
            ));
        }
        return Err(RowsRefused::Other(format!(
            "slot {}: {}",
            slot.get(),
            v["error"]
        )));
    };
    if got.len() != asked {
        return Err(RowsRefused::Other(format!(
            "slot {}: {} rows answered for {asked} asked",
            slot.get(),
            got.len()
        )));
    }
    got.iter()
        .map(|row| {
            row.as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
                .ok_or_else(|| {
                    RowsRefused::Other(format!("slot {}: a row that is not numbers", slot.get()))
                })
        })
        .collect()
}

/// The checksum of a slot's whole table on its owner and the owner's position (its last
/// applied stream sequence): a checksum read ([`ReadAsk::Checksum`]), asked again while the
/// slot moves or catches up, up to `timeout`.
pub async fn slot_checksum(
    client: &async_nats::Client,
    cluster: &str,
    model: &str,
    slot: Slot,
    timeout: Duration,
) -> Result<(u64, u64), String> {
    let body = json!({"checksum": true});
    let v = read_reply(
        client,
        cluster,
        model,
        slot,
        &body,
        Duration::from_secs(5),
        timeout,
    )
    .await?;
    let ok = &v["ok"];
    match (
        ok["checksum"]
            .as_str()
            .and_then(|c| u64::from_str_radix(c, 16).ok()),
        ok["position"].as_u64(),
    ) {
        (Some(checksum), Some(position)) => Ok((checksum, position)),
        _ if ok.is_object() => Err(format!(
            "slot {}: its owner answered without a checksum (a node older than checksum reads)",
            slot.get()
        )),
        _ => Err(format!("slot {}: {}", slot.get(), v["error"])),
    }
}

/// The reply to a read, as JSON, asked again until `timeout` while no owner answers (the slot
/// is moving) or the owner answers `behind` (it is catching up); after that, the last answer.
async fn read_reply(
    client: &async_nats::Client,
    cluster: &str,
    model: &str,
    slot: Slot,
    body: &Value,
    attempt: Duration,
    timeout: Duration,
) -> Result<Value, String> {
    let started = Instant::now();
    loop {
        let req = async_nats::Request::new()
            .payload(Bytes::from(body.to_string()))
            .timeout(Some(attempt));
        let (last, pause) = match client
            .send_request(read_subject(cluster, model, slot), req)
            .await
        {
            Ok(m) => {
                let v: Value = serde_json::from_slice(&m.payload).map_err(|e| e.to_string())?;
                // Catching up, or a slot whose queue is full or which is moving away: ask again.
                if !["behind", "busy", "stopping"]
                    .contains(&v["error"]["kind"].as_str().unwrap_or(""))
                {
                    return Ok(v);
                }
                (Ok(v), Duration::from_millis(20))
            }
            Err(e) => {
                debug!(error = %e, "read retry");
                (
                    Err(format!("slot {}: {e}", slot.get())),
                    Duration::from_millis(50),
                )
            }
        };
        if started.elapsed() >= timeout {
            return last;
        }
        tokio::time::sleep(pause).await;
    }
}

/// Where a pass over the stream is (for progress bars).
#[derive(Clone, Debug, Default)]
pub struct ScanProgress<'a> {
    /// The model whose subjects are read.
    pub model: &'a str,
    /// The stream sequence just read.
    pub seq: u64,
    /// The pass started after this sequence…
    pub start: u64,
    /// …and ends at this one.
    pub end: u64,
    /// Messages read so far.
    pub messages: u64,
    /// Rows in the frames read so far.
    pub rows: u64,
    /// Messages of the model after this one, by the server's count (past `end` too).
    pub pending: u64,
    /// Whether the pass reads to the stream's last sequence (then `messages + pending` is the
    /// pass's total).
    pub to_end: bool,
    /// How long a replay's reader has waited so far for its workers to take frames (their
    /// shared queue was full): where a replay is slower than its read, this says whether the
    /// workers or the read held it up. Zero for other passes.
    pub waited: Duration,
}

/// What a pass over the stream does with each valid frame: slot, stream sequence, the frame,
/// its rows, its values after the model's transform.
type Visit<'v> = dyn FnMut(u16, u64, &Frame<'_>, &[u32], &[f32]) -> Result<(), String> + Send + 'v;

/// A slot during a pass over the stream.
struct ScanSlot {
    model: SlotModel,
    position: u64,
    chains: Chains,
    limit: u64,
    range: std::ops::Range<u64>,
}

impl ScanSlot {
    /// The message at `seq`, when it is this slot's to take (after its position, up to its
    /// limit; the position then moves to it) and valid by the live path's checks (which
    /// advance the chains). With it, whether its values are left in the frame's own bytes
    /// (`bytes` was asked and the transform is the identity; `rows` holds its rows) or were
    /// transformed into `values`. Invalid frames are skipped: the live path dead-letters them.
    fn take<'a>(
        &mut self,
        seq: u64,
        payload: &'a [u8],
        bytes: bool,
        rows: &mut Vec<u32>,
        values: &mut Vec<f32>,
    ) -> Option<(Frame<'a>, bool)> {
        if seq <= self.position || seq > self.limit {
            return None;
        }
        self.position = seq;
        rows.clear();
        values.clear();
        if bytes && self.model.is_identity() {
            let f = self
                .model
                .check_frame(payload, seq, &self.range, &mut self.chains)
                .ok()?;
            rows.extend(f.rows());
            Some((f, true))
        } else {
            self.model
                .validate_into(payload, seq, &self.range, &mut self.chains, rows, values)
                .ok()
                .map(|f| (f, false))
        }
    }
}

/// A message of a pass: its stream sequence, the server's count of the model's messages after
/// it, the message.
type PassItem = Result<(u64, u64, jetstream::Message), String>;

/// The reading half of a pass: an ordered consumer over a model's slot subjects, from the
/// lowest position of the pass's slots to their highest limit (at most the stream's last
/// sequence).
struct Pass {
    messages: Anchored,
    prefix: String,
    start: u64,
    end: u64,
    to_end: bool,
    done: bool,
}

impl Pass {
    /// The pass over `slots`, or `None` when there is nothing to read.
    async fn open(
        js: &jetstream::Context,
        cluster: &str,
        model: &str,
        slots: impl Iterator<Item = &ScanSlot> + Clone,
    ) -> Result<Option<Pass>, String> {
        let (stream, last) = deltas_stream_at_end(js, cluster).await?;
        let start = slots.clone().map(|s| s.position).min().unwrap_or(0);
        let end = slots.map(|s| s.limit).max().unwrap_or(0).min(last);
        if end <= start {
            return Ok(None);
        }
        let prefix = format!("{cluster}.delta.{model}.");
        let messages = Anchored::open(stream, vec![format!("{prefix}*")], start).await?;
        Ok(Some(Pass {
            messages,
            prefix,
            start,
            end,
            to_end: end == last,
            done: false,
        }))
    }

    /// The next message, or `None` at the end of the pass: its last sequence read, nothing
    /// more of the model pending, or nothing delivered for [`SCAN_IDLE`].
    async fn next(&mut self) -> Option<PassItem> {
        if self.done {
            return None;
        }
        let msg = match tokio::time::timeout(SCAN_IDLE, self.messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Err(_) => {
                self.done = true;
                return None;
            }
            _ => {
                self.done = true;
                return Some(Err("the replay consumer failed".to_string()));
            }
        };
        let (seq, pending) = msg
            .info()
            .map(|i| (i.stream_sequence, i.pending))
            .unwrap_or((0, 0));
        if seq > self.end {
            self.done = true;
            return None;
        }
        self.done = seq >= self.end || pending == 0;
        Some(Ok((seq, pending, msg)))
    }

    /// The rest of the pass read on a task of its own, at most [`PASS_QUEUE_UNITS`] ahead
    /// (each message holds its [`queue_cost`] until the caller drops it), so that the
    /// consumer's pulls keep flowing while the caller works on each message. The task ends
    /// with the pass, or when the receiver is dropped.
    fn read_ahead(
        mut self,
    ) -> tokio::sync::mpsc::Receiver<(PassItem, tokio::sync::OwnedSemaphorePermit)> {
        let (tx, rx) = tokio::sync::mpsc::channel(PASS_QUEUE_UNITS);
        let budget = Arc::new(tokio::sync::Semaphore::new(PASS_QUEUE_UNITS));
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    () = tx.closed() => break,
                    item = self.next() => item,
                };
                let Some(item) = item else { break };
                let cost = item
                    .as_ref()
                    .map_or(1, |(_, _, m)| queue_cost(m.payload.len()));
                let Ok(held) = budget.clone().acquire_many_owned(cost).await else {
                    break;
                };
                if tx.send((item, held)).await.is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// The slot a message's subject names, for a pass with this `prefix`.
    fn slot_of(prefix: &str, subject: &str) -> Option<u16> {
        subject.strip_prefix(prefix)?.parse().ok()
    }

    /// The progress of this pass before its first message.
    fn progress<'m>(&self, model: &'m str) -> ScanProgress<'m> {
        ScanProgress {
            model,
            start: self.start,
            end: self.end,
            to_end: self.to_end,
            ..Default::default()
        }
    }
}

/// One pass over `slots` (see [`Pass`]): each slot's messages after its position and up to
/// its limit are validated exactly as the live path does (advancing the chains) and, when
/// valid, handed to `visit` with their transformed values, in stream order. The pass is read
/// ahead on a task of its own while this one validates and visits.
async fn scan(
    js: &jetstream::Context,
    cluster: &str,
    model: &str,
    slots: &mut BTreeMap<u16, ScanSlot>,
    progress: &mut (dyn FnMut(&ScanProgress) + Send),
    visit: &mut Visit<'_>,
) -> Result<(), String> {
    let Some(pass) = Pass::open(js, cluster, model, slots.values()).await? else {
        return Ok(());
    };
    let mut at = pass.progress(model);
    let prefix = pass.prefix.clone();
    let mut rx = pass.read_ahead();
    let (mut rows, mut values) = (Vec::new(), Vec::new());
    let mut chunk = Vec::with_capacity(SCAN_CHUNK_FRAMES);
    while rx.recv_many(&mut chunk, SCAN_CHUNK_FRAMES).await > 0 {
        for (item, _held) in chunk.drain(..) {
            let (seq, pending, msg) = item?;
            at.seq = seq;
            at.pending = pending;
            at.messages += 1;
            let Some((k, s)) = Pass::slot_of(&prefix, &msg.subject)
                .and_then(|k| slots.get_mut(&k).map(|s| (k, s)))
            else {
                continue;
            };
            if let Some((f, _)) = s.take(seq, &msg.payload, false, &mut rows, &mut values) {
                at.rows += u64::from(f.count);
                visit(k, seq, &f, &rows, &values)?;
            }
        }
        progress(&at);
    }
    Ok(())
}

/// Rebuilds tables of a model offline. `lineage` is the model's family line, root first and
/// the model last (one generation for a model that is not a branch). Each slot (of `only`, or
/// every slot) starts from the model's newest checkpoint at or below its limit
/// (`to_seq(slot)`); a branch's slot without one starts from its parent's table at the fork
/// point (rebuilt the same way, recursively), and a root's from zeros. Then one ordered
/// consumer applies the model's deltas after that, up to the limit, validated and
/// transformed exactly as the live path does, shared by `workers` threads (see
/// [`replay_pass`]).
pub async fn replay_model(
    template: &SlotModel,
    lineage: &[Generation],
    only: Option<&std::collections::BTreeSet<u16>>,
    to_seq: &(dyn Fn(Slot) -> u64 + Sync),
    workers: usize,
    progress: &mut (dyn FnMut(&ScanProgress) + Send),
) -> Result<BTreeMap<u16, Table>, String> {
    Ok(
        replay_states(template, lineage, only, to_seq, workers, progress)
            .await?
            .into_iter()
            .map(|(k, s)| (k, s.0))
            .collect(),
    )
}

/// [`replay_model`], keeping each slot's position and chains.
async fn replay_states(
    template: &SlotModel,
    lineage: &[Generation],
    only: Option<&std::collections::BTreeSet<u16>>,
    to_seq: &(dyn Fn(Slot) -> u64 + Sync),
    workers: usize,
    progress: &mut (dyn FnMut(&ScanProgress) + Send),
) -> Result<BTreeMap<u16, SlotState>, String> {
    let Some((me, ancestors)) = lineage.split_last() else {
        return Err("no model to replay".into());
    };
    let own = template.for_generation(me);
    let started = Instant::now();
    let names = own.checkpoint_names().await?;
    debug!(model = %me.model, checkpoints = names.len(), ms = started.elapsed().as_millis() as u64, "replay: listed checkpoints");
    let models: Vec<SlotModel> = Slot::all()
        .filter(|&slot| {
            !slot_rows(template.rows, slot).is_empty()
                && only.is_none_or(|o| o.contains(&slot.get()))
        })
        .map(|slot| own.for_slot(slot))
        .collect();
    // Each slot from its newest checkpoint at or below its limit, several read at a time.
    let mut states: BTreeMap<u16, SlotState> = BTreeMap::new();
    let mut missing = std::collections::BTreeSet::new();
    for chunk in models.chunks(RESTORE_CONCURRENCY) {
        let restored =
            futures::future::join_all(chunk.iter().map(|m| m.restore_from(&names, to_seq(m.slot))))
                .await;
        for (m, r) in chunk.iter().zip(restored) {
            match r {
                Some(st) => {
                    states.insert(m.slot.get(), st);
                }
                None => {
                    missing.insert(m.slot.get());
                }
            }
        }
    }
    // Slots without a checkpoint of their own: a branch's start from its parent at the fork
    // point (or at the limit, when that comes first); a root's from zeros, made by the pass's
    // workers (see `replay_pass`), so that making them overlaps with reading the stream.
    if !missing.is_empty()
        && let (Some(fork), false) = (me.fork_seq, ancestors.is_empty())
    {
        let limit = |s: Slot| to_seq(s).min(fork);
        let base = Box::pin(replay_states(
            template,
            ancestors,
            Some(&missing),
            &limit,
            workers,
            progress,
        ))
        .await?;
        for (k, (table, _, _)) in base {
            let slot = Slot::new(u64::from(k)).map_err(|e| e.to_string())?;
            states.insert(k, (table, limit(slot), Chains::new()));
        }
    }
    debug!(model = %me.model, restored = states.len(), ms = started.elapsed().as_millis() as u64, "replay: starting states ready");
    let mut work: BTreeMap<u16, ReplaySlot> = BTreeMap::new();
    for model in models {
        let k = model.slot.get();
        let (table, position, chains) = match states.remove(&k) {
            Some((t, p, c)) => (Some(t), p, c),
            None => (None, 0, Chains::new()),
        };
        let limit = to_seq(model.slot);
        let range = slot_rows(template.rows, model.slot);
        let slot = ScanSlot {
            model,
            position,
            chains,
            limit,
            range,
        };
        work.insert(k, (slot, table));
    }
    replay_pass(template, &me.model, work, workers, progress).await
}

/// A slot of a replay: its pass state and its table (`None` until a zero table is made for
/// it).
type ReplaySlot = (ScanSlot, Option<Table>);

/// Worker threads of a replay by default: one per core, at least two (so that making zero
/// tables and applying overlap on a small machine), at most [`MAX_REPLAY_WORKERS`].
pub fn replay_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, std::num::NonZero::get)
        .clamp(2, MAX_REPLAY_WORKERS)
}

/// One pass of a replay over `slots`, shared by `workers` threads: the slots are dealt out
/// round the workers, and each worker validates and applies its own slots' messages in
/// stream order (a slot's chains and table are touched by one thread only) while this task
/// routes the pass's messages to them. A worker with nothing to apply makes the zero tables
/// its slots will need, and makes the rest at the end: on a large table with few updates per
/// row, writing fresh memory is most of a pass, and this puts every core on it. The tables
/// are the same, bit for bit, as one thread's: each slot's messages are applied in the same
/// order.
async fn replay_pass(
    template: &SlotModel,
    model: &str,
    slots: BTreeMap<u16, ReplaySlot>,
    workers: usize,
    progress: &mut (dyn FnMut(&ScanProgress) + Send),
) -> Result<BTreeMap<u16, SlotState>, String> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let workers = workers.clamp(1, slots.len().max(1));
    let mut shards: Vec<BTreeMap<u16, ReplaySlot>> =
        (0..workers).map(|_| BTreeMap::new()).collect();
    let mut owner = vec![None; 1 << 10];
    let pass = Pass::open(
        &template.js,
        &template.cluster,
        model,
        slots.values().map(|(s, _)| s),
    )
    .await?;
    for (i, (k, slot)) in slots.into_iter().enumerate() {
        if let Some(o) = owner.get_mut(usize::from(k)) {
            *o = Some(i % workers);
        }
        if let Some(shard) = shards.get_mut(i % workers) {
            shard.insert(k, slot);
        }
    }
    let applied = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // The workers' queues are bounded together: a worker busy making a zero table may fall
    // behind for a while without holding up the others.
    let queued = Arc::new(tokio::sync::Semaphore::new(PASS_QUEUE_UNITS));
    let (rows, dim) = (template.rows, template.dim as usize);
    let mut senders = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for shard in shards {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (applied, stop, queued) = (applied.clone(), stop.clone(), queued.clone());
        handles.push(tokio::task::spawn_blocking(move || {
            let done = replay_worker(shard, rx, rows, dim, &applied, &stop, &queued);
            if done.is_err() {
                // The router may be waiting for this worker's share of the queue.
                queued.close();
            }
            done
        }));
        senders.push(tx);
    }
    // This task reads the consumer itself: routing a message costs less than handing it on.
    let routed = async {
        let Some(mut pass) = pass else {
            return Ok(());
        };
        let mut at = pass.progress(model);
        let mut batches: Vec<(ReplayBatch, u32)> = vec![(Vec::new(), 0); workers];
        while let Some(item) = pass.next().await {
            let (seq, pending, msg) = item?;
            at.seq = seq;
            at.pending = pending;
            at.messages += 1;
            if at.messages % SCAN_CHUNK_FRAMES as u64 == 0 {
                at.rows = applied.load(Ordering::Relaxed);
                progress(&at);
            }
            let Some(k) = Pass::slot_of(&pass.prefix, &msg.subject) else {
                continue;
            };
            let Some(w) = owner.get(usize::from(k)).copied().flatten() else {
                continue;
            };
            if let (Some((batch, cost)), Some(tx)) = (batches.get_mut(w), senders.get(w)) {
                // Every frame costs at least a unit, so a batch is at most REPLAY_BATCH_FRAMES.
                *cost = cost.saturating_add(queue_cost(msg.message.payload.len()));
                batch.push((k, seq, msg.message.payload));
                if *cost as usize >= REPLAY_BATCH_FRAMES
                    && !hand_over(&queued, tx, batch, cost, &mut at.waited).await
                {
                    return Ok(());
                }
            }
        }
        for ((batch, cost), tx) in batches.iter_mut().zip(&senders) {
            if !batch.is_empty() && !hand_over(&queued, tx, batch, cost, &mut at.waited).await {
                return Ok(());
            }
        }
        at.rows = applied.load(Ordering::Relaxed);
        progress(&at);
        Ok::<(), String>(())
    };
    let routed = routed.await;
    // A failed pass, or a failed worker (it closes the queue): the others make no more tables.
    if routed.is_err() || queued.is_closed() {
        stop.store(true, Ordering::Relaxed);
    }
    drop(senders);
    let mut out = BTreeMap::new();
    let mut failed = routed.err();
    for h in handles {
        match h.await {
            Ok(Ok(shard)) => out.extend(shard),
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => failed = failed.or(Some(format!("a replay worker failed: {e}"))),
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// A replay's batch of messages for one worker: slot, stream sequence, payload.
type ReplayBatch = Vec<(u16, u64, Bytes)>;

/// The queue units a replay batch holds: its frames' [`queue_cost`], clamped to the queue
/// (what the router counts as it fills the batch).
fn batch_cost(batch: &ReplayBatch) -> u32 {
    batch
        .iter()
        .fold(0u32, |n, (_, _, p)| n.saturating_add(queue_cost(p.len())))
        .min(queue_cost(usize::MAX))
}

/// Hands a replay worker its batch, of `cost` queue units ([`queue_cost`]), with those units
/// once the shared queue has room for them (the worker gives them back once it has applied
/// the batch), adding the time that took to `waited`; false when a worker has failed (the
/// queue is closed, or the send refused), and its result says why.
async fn hand_over(
    queued: &tokio::sync::Semaphore,
    tx: &tokio::sync::mpsc::UnboundedSender<(ReplayBatch, u32)>,
    batch: &mut ReplayBatch,
    cost: &mut u32,
    waited: &mut Duration,
) -> bool {
    let n = std::mem::take(cost).min(queue_cost(usize::MAX));
    debug_assert_eq!(n, batch_cost(batch));
    let since = Instant::now();
    let permits = queued.acquire_many(n).await;
    *waited += since.elapsed();
    match permits {
        Ok(permits) => permits.forget(),
        Err(_) => return false,
    }
    tx.send((std::mem::take(batch), n)).is_ok()
}

/// A replay worker (see [`replay_pass`]): applies the batches routed to its `shard` until the
/// router closes the channel, making zero tables whenever it has nothing to apply; then its
/// slots' states, each with its table.
fn replay_worker(
    mut shard: BTreeMap<u16, ReplaySlot>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(ReplayBatch, u32)>,
    rows: u64,
    dim: usize,
    applied: &std::sync::atomic::AtomicU64,
    stop: &std::sync::atomic::AtomicBool,
    queued: &tokio::sync::Semaphore,
) -> Result<BTreeMap<u16, SlotState>, String> {
    use std::sync::atomic::Ordering;
    use tokio::sync::mpsc::error::TryRecvError;
    let mut unmade: Vec<u16> = shard
        .iter()
        .filter(|(_, (_, t))| t.is_none())
        .map(|(&k, _)| k)
        .collect();
    let (mut ids, mut values) = (Vec::new(), Vec::new());
    loop {
        let batch = match rx.try_recv() {
            Ok(b) => b,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                if !unmade.is_empty() && !stop.load(Ordering::Relaxed) {
                    make_tables(&mut shard, &mut unmade, None, rows, dim)?;
                    continue;
                }
                match rx.blocking_recv() {
                    Some(b) => b,
                    None => break,
                }
            }
        };
        let (batch, n) = batch;
        for (k, seq, payload) in batch {
            if shard.get(&k).is_some_and(|(_, t)| t.is_none()) {
                make_tables(&mut shard, &mut unmade, Some(k), rows, dim)?;
            }
            let Some((slot, Some(table))) = shard.get_mut(&k) else {
                continue;
            };
            let Some((f, raw)) = slot.take(seq, &payload, true, &mut ids, &mut values) else {
                continue;
            };
            applied.fetch_add(u64::from(f.count), Ordering::Relaxed);
            if raw {
                table.apply_le(&ids, f.value_bytes())
            } else {
                table.apply(&ids, &values, 1)
            }
            .map_err(|e| e.to_string())?;
        }
        queued.add_permits(n as usize);
    }
    if stop.load(Ordering::Relaxed) {
        return Err("the replay stopped".into());
    }
    while !unmade.is_empty() {
        make_tables(&mut shard, &mut unmade, None, rows, dim)?;
    }
    let mut done = BTreeMap::new();
    for (k, (slot, table)) in shard {
        let Some(table) = table else {
            return Err(format!("slot {k}: no table was made for it"));
        };
        done.insert(k, (table, slot.position, slot.chains));
    }
    Ok(done)
}

/// Makes the zero tables of up to one slab's worth (see [`gpu::cpu::SLAB_BYTES`]) of the
/// shard's `unmade` slots, `first` among them when given, and takes them off the list: slot
/// tables of a large model are small, and cut from one slab backed by huge pages they cost far
/// fewer page faults than made one by one.
fn make_tables(
    shard: &mut BTreeMap<u16, ReplaySlot>,
    unmade: &mut Vec<u16>,
    first: Option<u16>,
    rows: u64,
    dim: usize,
) -> Result<(), String> {
    let table_bytes = usize::try_from(slot_rows(rows, Slot::from_hash(0)).end)
        .unwrap_or(usize::MAX)
        .saturating_mul(dim)
        .saturating_mul(4)
        .max(1);
    let per_slab = (gpu::cpu::SLAB_BYTES / table_bytes).max(1);
    let mut slots = Vec::with_capacity(per_slab);
    if let Some(k) = first {
        unmade.retain(|&u| u != k);
        slots.push(k);
    }
    while slots.len() < per_slab
        && let Some(k) = unmade.pop()
    {
        slots.push(k);
    }
    let ranges = slots
        .iter()
        .map(|&k| Slot::new(u64::from(k)).map(|slot| slot_rows(rows, slot)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let tables = Table::try_zeros_many(&ranges, dim)
        .map_err(|bytes| format!("cannot allocate {bytes} bytes of replay tables"))?;
    for (k, table) in slots.into_iter().zip(tables) {
        if let Some((_, slot @ None)) = shard.get_mut(&k) {
            *slot = Some(table);
        }
    }
    Ok(())
}

/// What a model's stream changed after sequence `after`, through `through`, per row (values
/// after the model's transform, the latest HLC), validated as the live path does. The chains
/// are first brought to `after` from the newest checkpoint at or below it (or from the fork
/// point of a branch, or from the start), so the frames read are judged as the live slots
/// judged them.
pub async fn stream_changes(
    template: &SlotModel,
    me: &Generation,
    after: u64,
    through: u64,
    progress: &mut (dyn FnMut(&ScanProgress) + Send),
) -> Result<actors::merge::Changes, String> {
    let own = template.for_generation(me);
    let names = own.checkpoint_names().await?;
    let mut slots: BTreeMap<u16, ScanSlot> = BTreeMap::new();
    for slot in Slot::all() {
        let range = slot_rows(template.rows, slot);
        if range.is_empty() {
            continue;
        }
        let model = own.for_slot(slot);
        let (position, chains) = match model.restore_from(&names, after).await {
            Some((_, p, c)) => (p, c),
            None => match me.fork_seq {
                Some(f) if f <= after => (f, Chains::new()),
                _ => (0, Chains::new()),
            },
        };
        slots.insert(
            slot.get(),
            ScanSlot {
                model,
                position,
                chains,
                limit: through,
                range,
            },
        );
    }
    let max_rows = usize::try_from(template.rows).unwrap_or(usize::MAX);
    let mut changes = actors::merge::Changes::new(template.dim as usize, max_rows);
    let mut add = |_slot: u16, seq: u64, f: &Frame<'_>, rows: &[u32], values: &[f32]| {
        if seq <= after {
            return Ok(());
        }
        changes.add(rows, values, f.ts).map_err(|e| e.to_string())
    };
    scan(
        &template.js,
        &template.cluster,
        &me.model,
        &mut slots,
        progress,
        &mut add,
    )
    .await?;
    Ok(changes)
}

/// The deltas stream and its last sequence.
async fn deltas_stream_at_end(
    js: &jetstream::Context,
    cluster: &str,
) -> Result<(jetstream::stream::Stream, u64), String> {
    let stream = js
        .get_stream(deltas_stream(cluster))
        .await
        .map_err(|e| e.to_string())?;
    let last = stream
        .get_info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .last_sequence;
    Ok((stream, last))
}

/// The last sequence of the deltas stream whose server timestamp is at or before `t_ns` (unix
/// nanoseconds): one less than the first message stored after it, or the last sequence when
/// none was.
pub async fn seq_at_time(
    js: &jetstream::Context,
    cluster: &str,
    t_ns: i128,
) -> Result<u64, String> {
    let (stream, last) = deltas_stream_at_end(js, cluster).await?;
    let start_time =
        async_nats::datetime::from_nanos(t_ns.saturating_add(1)).map_err(|e| e.to_string())?;
    crate::ordered::last_seq_before(&stream, last, start_time).await
}

impl SlotModel {
    /// The same model's slot `slot`, sharing the handles (for replay).
    fn for_slot(&self, slot: Slot) -> SlotModel {
        SlotModel {
            js: self.js.clone(),
            client: self.client.clone(),
            checkpoints: self.checkpoints.clone(),
            cluster: self.cluster.clone(),
            model: self.model.clone(),
            rows: self.rows,
            dim: self.dim,
            slot,
            cfg: self.cfg.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Another model of the same shape (a generation of its family), with its transform.
    fn for_generation(&self, g: &Generation) -> SlotModel {
        SlotModel {
            model: g.model.clone(),
            cfg: SlotModelConfig {
                scale: g.scale,
                clip: g.clip,
                ..self.cfg.clone()
            },
            ..self.for_slot(self.slot)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass's queue is bounded in bytes as well as frames: the usual 16 KiB frame costs one
    /// unit (4,096 of them fit, as before), a large frame its size in 64 KiB units, and no
    /// frame or batch costs more than the whole queue (it could never be admitted).
    #[test]
    fn a_pass_queue_counts_large_frames_by_their_size() {
        assert_eq!(queue_cost(0), 1);
        assert_eq!(queue_cost(300), 1);
        assert_eq!(queue_cost(16_448), 1);
        assert_eq!(queue_cost(64 << 10), 1);
        assert_eq!(queue_cost((64 << 10) + 1), 2);
        assert_eq!(queue_cost(8 << 20), 128);
        assert_eq!(queue_cost(usize::MAX) as usize, PASS_QUEUE_UNITS);
        // What the queue can hold, in payload bytes, whatever the frames' size.
        for len in [1, 16_448, 1 << 20, 8 << 20, 64 << 20] {
            let frames = PASS_QUEUE_UNITS / queue_cost(len) as usize;
            assert!(frames * len <= PASS_QUEUE_UNITS * QUEUE_UNIT_BYTES, "{len}");
        }
        let big = Bytes::from(vec![0u8; 8 << 20]);
        let batch: ReplayBatch = (0..40).map(|i| (0, i, big.clone())).collect();
        assert_eq!(batch_cost(&batch) as usize, PASS_QUEUE_UNITS);
        let usual: ReplayBatch = (0..64)
            .map(|i| (0, i, Bytes::from(vec![0u8; 16_448])))
            .collect();
        assert_eq!(batch_cost(&usual), 64);
    }

    #[test]
    fn chains_are_bounded_forgetting_the_oldest_and_survive_a_checkpoint() {
        let mut c = Chains::new();
        for id in 0..MAX_CHAINS_PER_SLOT as u64 {
            // Producer `id`'s last frame at sequence 10 + id, producer 0's refreshed later.
            c.take(id, id + 1, 10 + id);
        }
        c.take(0, 99, 5_000);
        assert_eq!(c.len(), MAX_CHAINS_PER_SLOT);
        // One more producer: the oldest chain (producer 1, last at 11) is forgotten.
        c.take(7_777, 42, 5_001);
        assert_eq!(c.len(), MAX_CHAINS_PER_SLOT);
        assert_eq!(c.last(1), 0);
        assert_eq!(c.last(0), 99);
        assert_eq!(c.last(2), 3);
        assert_eq!(c.last(7_777), 42);
        // A known producer moving on forgets nobody.
        c.take(2, 1_234, 5_002);
        assert_eq!(c.len(), MAX_CHAINS_PER_SLOT);
        assert_eq!(c.last(3), 4);

        // Through a checkpoint and back, the same chains (so the same one is forgotten next).
        let table = Table::zeros(0..4, 2);
        let bytes = encode_checkpoint(table.rows(), 2, table.data(), 5_002, &c);
        let (_, position, back) = decode_checkpoint(&bytes, 0..4, 2).unwrap();
        assert_eq!((position, &back), (5_002, &c));
        // Version 1's chains (checksums only) still read, as taken at sequence 0.
        let v1 = Chains::from_json(&json!({"5": 17, "6": 18})).unwrap();
        assert_eq!((v1.last(5), v1.last(6), v1.len()), (17, 18, 2));
        // Malformed chains are refused, not read as none.
        for bad in [
            json!([1, 2]),
            json!({"x": 1}),
            json!({"5": "17"}),
            json!({"5": [1]}),
        ] {
            assert!(Chains::from_json(&bad).is_none(), "{bad}");
        }
        let broken =
            String::from_utf8_lossy(&bytes).replacen("\"chains\":{", "\"chains\":{\"x\":[1,2],", 1);
        assert_eq!(
            decode_checkpoint(broken.as_bytes(), 0..4, 2)
                .err()
                .as_deref(),
            Some("checkpoint chains")
        );
        // A header without its position is refused (read as 0, the slot would apply every
        // delta again on top of the checkpoint's table).
        let no_position = String::from_utf8_lossy(&bytes).replacen("\"position\":5002,", "", 1);
        assert_eq!(
            decode_checkpoint(no_position.as_bytes(), 0..4, 2)
                .err()
                .as_deref(),
            Some("checkpoint position")
        );
        // More chains than the bound in a checkpoint: the newest are kept.
        let many = Value::Object(
            (0..MAX_CHAINS_PER_SLOT as u64 + 10)
                .map(|i| (i.to_string(), json!([i, i])))
                .collect(),
        );
        let kept = Chains::from_json(&many).unwrap();
        assert_eq!(kept.len(), MAX_CHAINS_PER_SLOT);
        assert_eq!((kept.last(9), kept.last(10)), (0, 10));
        // Producers whose ids share their low 32 bits keep chains of their own, in a
        // checkpoint too.
        let (a, b) = (5, 5 | 1 << 40);
        let mut c = Chains::new();
        c.take(a, 100, 1);
        c.take(b, 200, 2);
        assert_eq!((c.last(a), c.last(b)), (100, 200));
        let back = Chains::from_json(&c.to_json()).unwrap();
        assert_eq!((back.last(a), back.last(b)), (100, 200));
    }

    #[test]
    fn random_producer_ids_differ() {
        let ids: std::collections::HashSet<u64> = (0..100).map(|_| Producer::random_id()).collect();
        assert_eq!(ids.len(), 100);
        assert!(ids.iter().all(|&id| id <= MAX_HLC_NODE));
        // Drawn over all 48 bits, not only the 32 that frames carried before.
        assert!(ids.iter().any(|&id| id > u64::from(u32::MAX)));
    }

    #[test]
    fn a_frame_of_max_frame_rows_fits_the_server_and_the_frame_limits() {
        let frame_len = |model: &str, dim: u32, n: usize| {
            let rows: Vec<u32> = (0..n as u32).collect();
            let batch = DeltaBatch::new(
                dim,
                rows,
                vec![0.5; n * dim as usize],
                Hlc::new(1).tick(1),
                0,
            )
            .unwrap();
            frame::encode(model, 3, &batch).map(|b| b.len())
        };
        let long = "m".repeat(61);
        for (max_payload, model, dim) in [
            (1usize << 20, "m", 64u32),
            (8 << 20, long.as_str(), 2),
            (1 << 20, "emb", 65_536),
            (64 << 10, "emb", 1_000),
        ] {
            let n = max_frame_rows(max_payload, model, dim);
            let len = frame_len(model, dim, n).unwrap();
            assert!(
                len + FRAME_HEADER_ROOM_BYTES <= max_payload,
                "{max_payload} {model} {dim}: {len}"
            );
            // One more row would not fit (or the frame's own row limit binds).
            if n < frame::MAX_ROWS_PER_FRAME as usize {
                let more = frame_len(model, dim, n + 1).unwrap();
                assert!(
                    more + FRAME_HEADER_ROOM_BYTES > max_payload,
                    "{max_payload} {model} {dim}"
                );
            }
        }
        // Unknown limit: the frame's own; a row larger than the limit still goes alone.
        assert_eq!(
            max_frame_rows(0, "m", 1),
            frame::MAX_ROWS_PER_FRAME as usize
        );
        assert_eq!(max_frame_rows(2_000, "m", 65_536), 1);
    }

    #[test]
    fn a_read_body_is_rows_or_a_checksum_and_anything_else_is_refused_whole() {
        let parse = |v: Value| ReadAsk::parse(v.to_string().as_bytes());
        assert_eq!(
            parse(json!({"rows": [0, 7, 7, 4294967295u64]})),
            Ok((ReadAsk::Rows(vec![0, 7, 7, u32::MAX]), 0))
        );
        assert_eq!(
            parse(json!({"checksum": true, "min_position": 12})),
            Ok((ReadAsk::Checksum, 12))
        );
        assert_eq!(parse(json!({"rows": []})), Ok((ReadAsk::Rows(vec![]), 0)));
        for bad in [
            json!({"rows": [1, "2"]}),
            json!({"rows": [1.5]}),
            json!({"rows": [-1]}),
            json!({"rows": [4294967296u64]}),
            json!({"rows": 3}),
            json!({"rows": [1], "checksum": true}),
            json!({"checksum": false}),
            json!({"checksum": "yes"}),
            json!({"rows": [1], "min_position": -3}),
            json!({}),
            json!([1, 2]),
        ] {
            assert!(parse(bad.clone()).is_err(), "{bad}");
        }
        assert!(ReadAsk::parse(b"{\"rows\": [1,").is_err());
        assert!(ReadAsk::parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn an_answer_of_max_answer_rows_fits_the_payload_limit_at_its_longest() {
        // Long forms of an f32 in an answer: negative, 17 digits, a two-digit exponent.
        let longest = [
            -1.175_494_4e-38_f32,
            -3.402_823_5e38,
            -1.234_567_9e-12,
            -1e-45,
        ];
        for v in longest {
            let text = json!(v).to_string();
            assert!(text.len() < JSON_F32_BYTES, "{v}: {text}");
            assert_eq!(text.parse::<f64>().unwrap() as f32, v);
        }
        for (max_payload, dim) in [(1 << 20, 1), (1 << 20, 64), (8 << 20, 17), (64 << 10, 300)] {
            let n = max_answer_rows(max_payload, dim);
            assert!(n > 0);
            let rows: Vec<Vec<f32>> = (0..n)
                .map(|i| vec![longest[i % longest.len()]; dim])
                .collect();
            let body = json!({"ok": {"rows": rows, "position": u64::MAX}}).to_string();
            assert!(
                body.len() <= max_payload,
                "{max_payload} B, dim {dim}: {} B",
                body.len()
            );
            // Not far below it either: a read is split no more than it must be.
            assert!(
                body.len() * 10 >= max_payload * 9,
                "{max_payload} B, dim {dim}: {} B",
                body.len()
            );
        }
        assert_eq!(max_answer_rows(100, 4), 0);
    }

    #[test]
    fn a_queued_delta_is_small_since_every_slot_queue_keeps_blocks_of_them() {
        // tokio's channels allocate 32 entries at a time and keep a block or two per queue:
        // 1,024 slots × 32 entries of this size, per model.
        assert_eq!(std::mem::size_of::<Box<Queued>>(), 8);
    }

    #[test]
    fn a_read_queue_is_small_since_every_slot_has_one() {
        assert_eq!(std::mem::size_of::<ReadRequest>(), 8);
        let size = std::mem::size_of::<ReadQueue>();
        assert!(size <= 128, "{size} bytes");
    }

    fn read(n: u32) -> ReadRequest {
        Box::new(async_nats::Message {
            subject: format!("r.{n}").into(),
            reply: None,
            payload: Bytes::new(),
            headers: None,
            status: None,
            description: None,
            length: 0,
        })
    }

    #[tokio::test]
    async fn a_read_queue_is_bounded_in_order_and_refuses_once_closed() {
        let q = Arc::new(ReadQueue::default());
        for n in 0..SLOT_READ_QUEUE as u32 {
            assert_eq!(q.push(read(n)), Ok(()));
        }
        assert_eq!(q.push(read(99)), Err(ReadRefused::Full));
        for n in 0..SLOT_READ_QUEUE as u32 {
            assert_eq!(q.pop().await.subject.as_str(), format!("r.{n}"));
        }
        // A waiting slot model is woken by the next read.
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await.subject.to_string() }
        });
        tokio::task::yield_now().await;
        assert_eq!(q.push(read(7)), Ok(()));
        assert_eq!(waiter.await.unwrap(), "r.7");
        // Its end closes the queue: later reads are refused, waiting ones dropped.
        assert_eq!(q.push(read(8)), Ok(()));
        drop(ReadInbox(q.clone()));
        assert_eq!(q.push(read(9)), Err(ReadRefused::Closed));
        assert!(q.waiting().is_empty());
    }

    #[test]
    fn read_subjects_spell_the_slot_in_bits_and_blocks_as_wildcards() {
        let slot = |n| Slot::new(n).unwrap();
        assert_eq!(
            read_subject("c", "m", slot(5)),
            "c.model.m.get.0.0.0.0.0.0.0.1.0.1"
        );
        let prefix = read_prefix("c", "m");
        for n in [0, 1, 5, 512, 777, 1023] {
            assert_eq!(
                slot_of_read_subject(&prefix, &read_subject("c", "m", slot(n))),
                Some(slot(n))
            );
        }
        let all: cluster::SlotSet = Slot::all().collect();
        let blocks = all.aligned_blocks();
        assert_eq!(blocks.len(), 1);
        assert_eq!(block_subject(&prefix, blocks[0]), "c.model.m.get.>");
        // Slots 4..8: the first eight bits, then the rest.
        let four: cluster::SlotSet = (4..8).map(slot).collect();
        let blocks = four.aligned_blocks();
        assert_eq!(
            blocks
                .iter()
                .map(|b| block_subject(&prefix, *b))
                .collect::<Vec<_>>(),
            vec!["c.model.m.get.0.0.0.0.0.0.0.1.>"]
        );
        // Malformed: too few or too many bits, other tokens, another model.
        for bad in [
            "c.model.m.get.0.1",
            "c.model.m.get.0.0.0.0.0.0.0.1.0.1.1",
            "c.model.m.get.0.0.0.0.0.0.0.1.0.2",
            "c.model.m.get.0.0.0.0.0.0.0.1.0.x",
            "c.model.m.get.",
            "c.model.n.get.0.0.0.0.0.0.0.1.0.1",
            "c.model.m.5.get",
        ] {
            assert_eq!(slot_of_read_subject(&prefix, bad), None, "{bad}");
        }
    }

    #[test]
    fn a_slot_model_shares_the_checkpoint_bucket_handle() {
        // Each of a node's slot tasks holds its SlotModel; the bucket's handle alone (with
        // its stream description) is about 1.5 KB, so it is shared.
        let size = std::mem::size_of::<SlotModel>();
        assert!(size <= 1024, "{size} bytes");
    }
}
