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
//! - **Reads**: `<c>.model.<model>.<slot>.get` with `{"rows": [...]}` → `{"ok": {"rows":
//!   [[...], ...], "position": N}}`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::delta::{DeltaBatch, Hlc, slot_of_row, slot_rows};
use actors::frame::{self, Frame};
use async_nats::jetstream::{self, consumer, object_store, stream};
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

/// A model slot's read subject.
pub fn read_subject(cluster: &str, model: &str, slot: Slot) -> String {
    format!("{cluster}.model.{model}.{}.get", slot.get())
}

/// The checkpoints bucket.
pub fn checkpoints_bucket(cluster: &str) -> String {
    format!("{cluster}-checkpoints")
}

/// The header with a refused frame's reason.
pub const DLQ_REASON_HEADER: &str = "Tessel-Dlq-Reason";

/// A header a producer may put on a delta: once the owner has applied the frame it publishes
/// the header's value on [`applied_subject`] (core NATS, not stored). Benchmarks and tracing
/// tools use it to time publish → applied.
pub const TRACE_HEADER: &str = "Tessel-Trace";

/// The longest trace value that is echoed; longer or non-token values are ignored.
pub const MAX_TRACE_BYTES: usize = 64;

/// Where owners announce traced frames they applied: `<c>.applied.<model>`.
pub fn applied_subject(cluster: &str, model: &str) -> String {
    format!("{cluster}.applied.{model}")
}

/// The trace id of a delta message, when it carries a well-formed one.
fn trace_of(msg: &jetstream::Message) -> Option<Bytes> {
    let v = msg.headers.as_ref()?.get(TRACE_HEADER)?.as_str();
    let ok = !v.is_empty()
        && v.len() <= MAX_TRACE_BYTES
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| Bytes::copy_from_slice(v.as_bytes()))
}

/// Creates or binds the deltas stream and the checkpoints bucket.
pub async fn ensure(
    js: &jetstream::Context,
    cluster: &str,
    replicas: usize,
) -> anyhow::Result<object_store::ObjectStore> {
    let name = deltas_stream(cluster);
    if js.get_stream(&name).await.is_err() {
        let cfg = stream::Config {
            name: name.clone(),
            subjects: vec![format!("{cluster}.delta.>")],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_message_size: i32::try_from(frame::MAX_FRAME_BYTES).unwrap_or(i32::MAX),
            allow_direct: true,
            ..Default::default()
        };
        if let Err(e) = js.create_stream(cfg).await {
            js.get_stream(&name)
                .await
                .map_err(|_| anyhow::anyhow!("deltas stream: {e}"))?;
        }
    }
    let bucket = checkpoints_bucket(cluster);
    match js.get_object_store(&bucket).await {
        Ok(s) => Ok(s),
        Err(_) => match js
            .create_object_store(object_store::Config {
                bucket: bucket.clone(),
                num_replicas: replicas,
                ..Default::default()
            })
            .await
        {
            Ok(s) => Ok(s),
            Err(e) => js
                .get_object_store(&bucket)
                .await
                .map_err(|_| anyhow::anyhow!("checkpoints bucket: {e}")),
        },
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

/// Publishes deltas of one model: splits each batch by slot, one frame per slot, chained per
/// slot, with at most `max_in_flight` unacknowledged publishes.
pub struct Producer {
    js: jetstream::Context,
    cluster: String,
    model: String,
    rows: u64,
    dim: u32,
    max_in_flight: usize,
    clock: Hlc,
    parents: HashMap<u16, u64>,
}

impl Producer {
    /// A producer for `model` (`rows × dim`), identified as `node` in timestamps.
    pub fn new(
        js: jetstream::Context,
        cluster: &str,
        model: &str,
        rows: u64,
        dim: u32,
        max_in_flight: usize,
        node: u32,
    ) -> Self {
        Producer {
            js,
            cluster: cluster.into(),
            model: model.into(),
            rows,
            dim,
            max_in_flight: max_in_flight.max(1),
            clock: Hlc::new(node),
            parents: HashMap::new(),
        }
    }

    /// Sends a batch (`values` row-major, `rows.len() × dim`); returns when every frame is
    /// acknowledged by the server.
    pub async fn send(&mut self, rows: &[u32], values: &[f32]) -> Result<Sent, ProduceError> {
        self.send_traced(rows, values, None).await
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
        let now = crate::store::wall_ms();
        let mut acks = FuturesUnordered::new();
        let mut sent = Sent::default();
        for (slot, (r, v)) in by_slot {
            let n = r.len() as u64;
            let parent = self.parents.get(&slot).copied().unwrap_or(0);
            let batch = DeltaBatch::new(self.dim, r, v, self.clock.tick(now), parent)
                .map_err(|e| ProduceError::BadBatch(e.to_string()))?;
            self.parents.insert(slot, batch.checksum);
            let bytes = frame::encode(&self.model, slot, &batch)
                .map_err(|e| ProduceError::BadBatch(e.to_string()))?;
            let subject = format!("{}.delta.{}.{slot}", self.cluster, self.model);
            let published = match trace {
                Some(t) => {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert(TRACE_HEADER, t);
                    self.js
                        .publish_with_headers(subject, h, Bytes::from(bytes))
                        .await
                }
                None => self.js.publish(subject, Bytes::from(bytes)).await,
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
        while let Some(r) = acks.next().await {
            sent.rows += r.map_err(|e| ProduceError::Publish(e.to_string()))?;
            sent.batches += 1;
        }
        Ok(sent)
    }
}

/// A delta handed to a slot model, holding its share of the model's queue budget.
pub struct Queued {
    msg: jetstream::Message,
    permit: tokio::sync::OwnedSemaphorePermit,
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
            apply_threads: 1,
            scale: 1.0,
            clip: None,
        }
    }
}

fn checkpoint_name(model: &str, slot: Slot, position: u64) -> String {
    format!("{model}.{}.{position:020}", slot.get())
}

/// Encodes a checkpoint: a JSON header line, then the table's f32 data (little-endian).
pub fn encode_checkpoint(table: &Table, position: u64, chains: &HashMap<u32, u64>) -> Vec<u8> {
    let header = json!({"v": 1, "first_row": table.rows().start, "rows": table.rows().end - table.rows().start,
        "dim": table.dim(), "position": position, "chains": chains, "checksum": data_checksum(table.data())});
    let mut out = serde_json::to_vec(&header).unwrap_or_default();
    out.push(b'\n');
    out.reserve(table.data().len() * 4);
    for v in table.data() {
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
) -> Result<(Table, u64, HashMap<u32, u64>), String> {
    let nl = bytes.iter().position(|b| *b == b'\n').ok_or("no header")?;
    let h: Value = serde_json::from_slice(&bytes[..nl]).map_err(|e| e.to_string())?;
    if h["v"] != 1
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
    let chains: HashMap<u32, u64> = serde_json::from_value(h["chains"].clone()).unwrap_or_default();
    Ok((table, h["position"].as_u64().unwrap_or(0), chains))
}

/// One model's slot on its owner: the table, the position, the consumer.
pub struct SlotModel {
    /// Shared.
    pub js: jetstream::Context,
    /// Client for replies and DLQ.
    pub client: async_nats::Client,
    /// Checkpoints.
    pub checkpoints: object_store::ObjectStore,
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
    /// The names of this model's checkpoints (of every slot), oldest first.
    async fn checkpoint_names(&self) -> Vec<String> {
        let prefix = format!("{}.", self.model);
        let mut names = Vec::new();
        if let Ok(mut list) = self.checkpoints.list().await {
            while let Some(Ok(info)) = list.next().await {
                if info.name.starts_with(&prefix) && !info.deleted {
                    names.push(info.name);
                }
            }
        }
        names.sort();
        names
    }

    /// The names among `names` that belong to this slot.
    fn own<'a>(&self, names: &'a [String]) -> impl DoubleEndedIterator<Item = &'a String> {
        let prefix = format!("{}.{}.", self.model, self.slot.get());
        names.iter().filter(move |n| n.starts_with(&prefix))
    }

    /// The newest readable checkpoint of the slot (or an empty table at position 0).
    pub async fn restore(&self) -> (Table, u64, HashMap<u32, u64>) {
        let names = self.checkpoint_names().await;
        self.restore_from(&names, u64::MAX).await
    }

    /// The newest readable checkpoint among `names` at a position of at most `limit`.
    async fn restore_from(&self, names: &[String], limit: u64) -> (Table, u64, HashMap<u32, u64>) {
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
            let Ok(mut obj) = self.checkpoints.get(name).await else {
                continue;
            };
            let mut bytes = Vec::new();
            if obj.read_to_end(&mut bytes).await.is_err() {
                continue;
            }
            match decode_checkpoint(&bytes, range.clone(), self.dim as usize) {
                Ok(v) => {
                    info!(model = %self.model, slot = self.slot.get(), position = v.1, "restored checkpoint");
                    return v;
                }
                Err(e) => {
                    warn!(model = %self.model, slot = self.slot.get(), %name, error = %e, "skipping a bad checkpoint")
                }
            }
        }
        (Table::zeros(range, self.dim as usize), 0, HashMap::new())
    }

    async fn checkpoint(&self, table: &Table, position: u64, chains: &HashMap<u32, u64>) {
        let name = checkpoint_name(&self.model, self.slot, position);
        let bytes = encode_checkpoint(table, position, chains);
        let mut reader = bytes.as_slice();
        if let Err(e) = self.checkpoints.put(name.as_str(), &mut reader).await {
            warn!(model = %self.model, slot = self.slot.get(), error = %e, "checkpoint failed");
            return;
        }
        Metrics::inc(&self.metrics.checkpoints_total);
        // Keep the last K.
        let names: Vec<String> = self.own(&self.checkpoint_names().await).cloned().collect();
        let excess = names.len().saturating_sub(self.cfg.keep_checkpoints);
        for old in names.into_iter().take(excess) {
            let _ = self.checkpoints.delete(&old).await;
        }
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
    /// what [`SlotModel::restore`] returned.
    pub async fn run(
        self,
        state: (Table, u64, HashMap<u32, u64>),
        mut inbox: tokio::sync::mpsc::Receiver<Queued>,
    ) {
        let (mut table, mut position, mut chains) = state;
        let range = table.rows();
        let mut reads = match self
            .client
            .subscribe(read_subject(&self.cluster, &self.model, self.slot))
            .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot serve reads");
                None
            }
        };
        let mut since_ckpt = 0u64;
        let mut last_ckpt = Instant::now();
        let window = Duration::from_millis(self.cfg.window_ms);
        let mut open = true;
        while open {
            // Fill a window: the first message waits (reads are answered meanwhile); then what is
            // already queued is taken at once, and an empty queue is waited on only until
            // `window_ms` after the first message (0: never), so a lone delta is not delayed.
            let mut batch_rows: Vec<u32> = Vec::new();
            let mut batch_values: Vec<f32> = Vec::new();
            let mut frames = 0usize;
            let mut bytes = 0usize;
            let mut traces: Vec<Bytes> = Vec::new();
            let mut walls: Vec<u64> = Vec::new();
            let mut deadline = tokio::time::Instant::now();
            let mut permits: Vec<tokio::sync::OwnedSemaphorePermit> = Vec::new();
            loop {
                let next = if frames == 0 {
                    tokio::select! {
                        m = inbox.recv() => m,
                        r = async { match reads.as_mut() { Some(s) => s.next().await, None => std::future::pending().await } } => {
                            if let Some(req) = r {
                                self.answer(&table, position, req).await;
                            }
                            continue;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(self.cfg.checkpoint_ms)) => break,
                    }
                } else {
                    match inbox.try_recv() {
                        Ok(m) => Some(m),
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                            match tokio::time::timeout_at(deadline, inbox.recv()).await {
                                Ok(m) => m,
                                Err(_) => break,
                            }
                        }
                    }
                };
                let Some(Queued { msg, permit }) = next else {
                    open = false;
                    break;
                };
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
                    &range,
                    &mut chains,
                    &mut batch_rows,
                    &mut batch_values,
                ) {
                    Ok(()) => {
                        traces.extend(trace_of(&msg));
                        walls.extend(Frame::decode(&msg.payload).map(|f| f.ts.wall_ms));
                    }
                    Err(reason) => self.dead_letter(msg.payload.clone(), &reason).await,
                }
                if frames >= self.cfg.window_frames || bytes >= self.cfg.window_bytes {
                    break;
                }
            }
            if !batch_rows.is_empty() {
                let apply_started = Instant::now();
                match table.apply(&batch_rows, &batch_values, self.cfg.apply_threads) {
                    Ok(()) => {
                        let (elapsed, rows) = (apply_started.elapsed(), batch_rows.len());
                        self.metrics
                            .window_applied(&self.model, rows, elapsed, &walls);
                        let subject = applied_subject(&self.cluster, &self.model);
                        for t in traces.drain(..) {
                            let _ = self.client.publish(subject.clone(), t).await;
                        }
                        self.metrics
                            .deltas_applied_total
                            .fetch_add(frames as u64, std::sync::atomic::Ordering::Relaxed);
                        self.metrics.rows_applied_total.fetch_add(
                            batch_rows.len() as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    Err(e) => warn!(error = %e, "apply refused a validated window"),
                }
            }

            self.metrics
                .slot_queued(&self.model, self.slot.get(), inbox.len() as u64);
            since_ckpt += frames as u64;
            let due = since_ckpt >= self.cfg.checkpoint_every
                || (since_ckpt > 0
                    && last_ckpt.elapsed() >= Duration::from_millis(self.cfg.checkpoint_ms));
            if due || (!open && since_ckpt > 0) {
                self.checkpoint(&table, position, &chains).await;
                since_ckpt = 0;
                last_ckpt = Instant::now();
            }
        }
        self.metrics.slot_queued(&self.model, self.slot.get(), 0);
        debug!(model = %self.model, slot = self.slot.get(), position, "slot model stopped");
    }

    /// The model's transform of one value: scale, then clip.
    pub fn transform(&self, v: f32) -> f32 {
        let v = v * self.cfg.scale;
        match self.cfg.clip {
            Some(c) => v.clamp(-c, c),
            None => v,
        }
    }

    /// The live path's validation (shared with replay): decodes the frame, checks it against
    /// the model, the slot's rows, the producer's checksum chain and the value bounds, and
    /// appends its rows and transformed values to `rows` and `values`. A refused frame
    /// appends nothing.
    pub fn validate_into(
        &self,
        payload: &[u8],
        range: &std::ops::Range<u64>,
        chains: &mut HashMap<u32, u64>,
        rows: &mut Vec<u32>,
        values: &mut Vec<f32>,
    ) -> Result<(), String> {
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
        let previous = chains.get(&f.ts.node).copied().unwrap_or(0);
        // A chain starts at parent 0 (a new producer); otherwise it continues the last batch.
        let broken = f.parent != 0 && f.parent != previous;
        chains.insert(f.ts.node, f.checksum);
        if broken {
            return Err(format!(
                "broken chain: parent {:x}, last {:x}",
                f.parent, previous
            ));
        }
        if let Some(r) = f.rows().find(|r| !range.contains(&u64::from(*r))) {
            return Err(format!("row {r} outside the slot's rows {range:?}"));
        }
        let values_before = values.len();
        let max_abs = self.cfg.max_abs;
        let identity = self.cfg.scale == 1.0 && self.cfg.clip.is_none();
        values.reserve(f.values().len());
        // One pass: check each value (before the transform) and append it transformed.
        let mut bad = None;
        for (i, v) in f.values().enumerate() {
            if !v.is_finite() || v.abs() > max_abs {
                bad = Some((i, v));
                break;
            }
            values.push(if identity { v } else { self.transform(v) });
        }
        if let Some((i, v)) = bad {
            values.truncate(values_before);
            return Err(if v.is_finite() {
                format!("|value| {v} above {max_abs}")
            } else {
                format!("value {i} is not finite")
            });
        }
        rows.extend(f.rows());
        Ok(())
    }

    async fn answer(&self, table: &Table, position: u64, req: async_nats::Message) {
        let Some(reply) = req.reply else { return };
        let body = match serde_json::from_slice::<Value>(&req.payload) {
            Ok(v) => {
                let rows: Vec<u32> = v["rows"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                            .collect()
                    })
                    .unwrap_or_default();
                match table.gather(&rows) {
                    Ok(vals) => {
                        let d = table.dim().max(1);
                        let out: Vec<&[f32]> = vals.chunks(d).collect();
                        json!({"ok": {"rows": out, "position": position}})
                    }
                    Err(e) => json!({"error": {"kind": "bad_request", "message": e.to_string()}}),
                }
            }
            Err(e) => json!({"error": {"kind": "bad_request", "message": e.to_string()}}),
        };
        let _ = self
            .client
            .publish(reply, Bytes::from(body.to_string()))
            .await;
    }
}

/// Reads rows of a model from the owners of their slots.
pub async fn get_rows(
    client: &async_nats::Client,
    cluster: &str,
    model: &str,
    total_rows: u64,
    rows: &[u32],
    timeout: Duration,
) -> Result<Vec<Vec<f32>>, String> {
    let mut by_slot: BTreeMap<u16, Vec<(usize, u32)>> = BTreeMap::new();
    for (i, &r) in rows.iter().enumerate() {
        let s = slot_of_row(total_rows, u64::from(r))
            .ok_or_else(|| format!("row {r} outside 0..{total_rows}"))?;
        by_slot.entry(s.get()).or_default().push((i, r));
    }
    let mut out = vec![Vec::new(); rows.len()];
    for (slot, items) in by_slot {
        let slot = Slot::new(u64::from(slot)).map_err(|e| e.to_string())?;
        let body = json!({"rows": items.iter().map(|(_, r)| r).collect::<Vec<_>>()});
        let v = read_request(
            client,
            cluster,
            model,
            slot,
            &body,
            Duration::from_secs(2),
            timeout,
        )
        .await?;
        let got = v["ok"]["rows"]
            .as_array()
            .ok_or_else(|| format!("slot {}: {}", slot.get(), v["error"]))?;
        for ((i, _), row) in items.iter().zip(got) {
            out[*i] = row
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_f64().map(|f| f as f32))
                        .collect()
                })
                .unwrap_or_default();
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
    pub checkpoints: object_store::ObjectStore,
    /// Cluster.
    pub cluster: String,
    /// Whether this node owns a slot now.
    pub hosts: Arc<dyn Fn(Slot) -> bool + Send + Sync>,
    /// Limits of each slot model.
    pub cfg: SlotModelConfig,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The slot models of one model on this node, fed by one ordered consumer.
struct Group {
    slots: std::collections::BTreeSet<u16>,
    pump: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
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
        let mut transforms: HashMap<String, (f32, Option<f32>)> = HashMap::new();
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
                let scale = v["scale"].as_f64().map_or(1.0, |x| x as f32);
                let clip = v["clip"].as_f64().map(|x| x as f32);
                transforms.insert(name.clone(), (scale, clip));
                want.insert(name, (rows, dim, slots));
            }
        }
        // A model whose slots changed is stopped (each slot checkpoints) and started again
        // (each restores its checkpoint): simple, and exactly once by position.
        let stale: Vec<String> = running
            .iter()
            .filter(|(m, g)| want.get(*m).is_none_or(|w| w.2 != g.slots) || g.pump.is_finished())
            .map(|(m, _)| m.clone())
            .collect();
        for m in stale {
            if let Some(g) = running.remove(&m) {
                g.pump.abort();
                for t in g.tasks {
                    let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
                }
            }
        }
        for (model, (rows, dim, slots)) in want {
            if running.contains_key(&model) {
                continue;
            }
            let (scale, clip) = transforms.get(&model).copied().unwrap_or((1.0, None));
            match self
                .start_group(&model, rows, dim, &slots, scale, clip)
                .await
            {
                Ok(g) => {
                    running.insert(model, g);
                }
                Err(e) => warn!(%model, error = %e, "cannot start the model's slots"),
            }
        }
    }

    async fn start_group(
        &self,
        model: &str,
        rows: u64,
        dim: u32,
        slots: &std::collections::BTreeSet<u16>,
        scale: f32,
        clip: Option<f32>,
    ) -> anyhow::Result<Group> {
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
                    scale,
                    clip,
                    ..self.cfg.clone()
                },
                metrics: self.metrics.clone(),
            });
        }
        let states = futures::future::join_all(models.iter().map(|m| m.restore())).await;
        let start = states.iter().map(|s| s.1).min().unwrap_or(0);
        let mut inboxes: HashMap<u16, tokio::sync::mpsc::Sender<Queued>> = HashMap::new();
        let mut tasks = Vec::new();
        for (m, state) in models.into_iter().zip(states) {
            let (tx, rx) = tokio::sync::mpsc::channel(self.cfg.window_frames * 4);
            inboxes.insert(m.slot.get(), tx);
            let span = tracing::info_span!("slot_model", model = %m.model, slot = m.slot.get());
            tasks.push(tokio::spawn(tracing::Instrument::instrument(
                m.run(state, rx),
                span,
            )));
        }
        let stream = self.js.get_stream(deltas_stream(&self.cluster)).await?;
        let filters: Vec<String> = slots
            .iter()
            .map(|s| format!("{}.delta.{model}.{s}", self.cluster))
            .collect();
        let cfg = consumer::pull::OrderedConfig {
            filter_subjects: filters,
            deliver_policy: if start > 0 {
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start + 1,
                }
            } else {
                consumer::DeliverPolicy::All
            },
            ..Default::default()
        };
        let mut messages = stream.create_consumer(cfg).await?.messages().await?;
        let prefix = format!("{}.delta.{model}.", self.cluster);
        let budget_bytes = self.cfg.queue_bytes.clamp(1, u32::MAX as usize);
        let budget = Arc::new(tokio::sync::Semaphore::new(budget_bytes));
        let (metrics, name) = (self.metrics.clone(), model.to_string());
        let pump = tokio::spawn(async move {
            while let Some(item) = messages.next().await {
                let msg = match item {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "delta consumer failed; it restarts at the next reconcile");
                        break;
                    }
                };
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
                if tx.send(Queued { msg, permit }).await.is_err() {
                    break;
                }
            }
            // Dropping the senders lets each slot model apply, checkpoint and stop.
        });
        info!(%model, slots = slots.len(), from = start, "serving the model's slots");
        Ok(Group {
            slots: slots.clone(),
            pump,
            tasks,
        })
    }
}

/// Sends a read to a slot's owner, retrying (while a slot moves) until `timeout`.
async fn read_request(
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
        match client
            .send_request(read_subject(cluster, model, slot), req)
            .await
        {
            Ok(m) => return serde_json::from_slice(&m.payload).map_err(|e| e.to_string()),
            Err(e) if started.elapsed() < timeout => {
                debug!(error = %e, "read retry");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(format!("slot {}: {e}", slot.get())),
        }
    }
}

/// Reads a whole slot's rows and its applied position from the owner.
pub async fn get_slot(
    client: &async_nats::Client,
    cluster: &str,
    model: &str,
    total_rows: u64,
    slot: Slot,
    timeout: Duration,
) -> Result<(Vec<f32>, u64), String> {
    let range = slot_rows(total_rows, slot);
    let rows: Vec<u64> = range.collect();
    let body = json!({"rows": rows});
    let v = read_request(
        client,
        cluster,
        model,
        slot,
        &body,
        Duration::from_secs(5),
        timeout,
    )
    .await?;
    let got = v["ok"]["rows"]
        .as_array()
        .ok_or_else(|| format!("slot {}: {}", slot.get(), v["error"]))?;
    let data: Vec<f32> = got
        .iter()
        .flat_map(|r| r.as_array().cloned().unwrap_or_default())
        .filter_map(|x| x.as_f64().map(|f| f as f32))
        .collect();
    Ok((data, v["ok"]["position"].as_u64().unwrap_or(0)))
}

/// Rebuilds a model's slot tables offline with one ordered consumer over the model's subjects:
/// each slot starts from its newest checkpoint at or below its limit (`to_seq(slot)`), then
/// applies its deltas after that checkpoint up to the limit, validated exactly as the live path
/// does. `progress` is called with the stream sequences read so far and the last one.
pub async fn replay_model(
    template: &SlotModel,
    to_seq: &dyn Fn(Slot) -> u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BTreeMap<u16, Table>, String> {
    let names = template.checkpoint_names().await;
    struct S {
        model: SlotModel,
        table: Table,
        position: u64,
        chains: HashMap<u32, u64>,
        limit: u64,
        range: std::ops::Range<u64>,
    }
    let mut slots: BTreeMap<u16, S> = BTreeMap::new();
    for slot in Slot::all() {
        let range = slot_rows(template.rows, slot);
        if range.is_empty() {
            continue;
        }
        let limit = to_seq(slot);
        let model = template.for_slot(slot);
        let state = model.restore_from(&names, limit).await;
        slots.insert(
            slot.get(),
            S {
                model,
                table: state.0,
                position: state.1,
                chains: state.2,
                limit,
                range,
            },
        );
    }
    let stream = template
        .js
        .get_stream(deltas_stream(&template.cluster))
        .await
        .map_err(|e| e.to_string())?;
    let last = stream
        .get_info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .last_sequence;
    let start = slots.values().map(|s| s.position).min().unwrap_or(0);
    let end = slots.values().map(|s| s.limit).max().unwrap_or(0).min(last);
    if end > start {
        let prefix = format!("{}.delta.{}.", template.cluster, template.model);
        let cfg = consumer::pull::OrderedConfig {
            filter_subject: format!("{prefix}*"),
            deliver_policy: if start > 0 {
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start + 1,
                }
            } else {
                consumer::DeliverPolicy::All
            },
            ..Default::default()
        };
        let mut messages = stream
            .create_consumer(cfg)
            .await
            .map_err(|e| e.to_string())?
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let (mut rows, mut values) = (Vec::new(), Vec::new());
        loop {
            let msg = match tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
                Ok(Some(Ok(m))) => m,
                // Nothing more of this model before the end: done.
                Err(_) => break,
                _ => return Err("the replay consumer failed".into()),
            };
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            progress(seq, end);
            if let Some(s) = msg
                .subject
                .strip_prefix(prefix.as_str())
                .and_then(|s| s.parse::<u16>().ok())
                .and_then(|s| slots.get_mut(&s))
                && seq > s.position
                && seq <= s.limit
            {
                s.position = seq;
                rows.clear();
                values.clear();
                if s.model
                    .validate_into(
                        &msg.payload,
                        &s.range,
                        &mut s.chains,
                        &mut rows,
                        &mut values,
                    )
                    .is_ok()
                {
                    s.table
                        .apply(&rows, &values, 1)
                        .map_err(|e| e.to_string())?;
                }
            }
            if seq >= end {
                break;
            }
        }
    }
    Ok(slots.into_iter().map(|(k, s)| (k, s.table)).collect())
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
}
