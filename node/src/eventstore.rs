//! The event store on JetStream: [`JetStreamEventStore`], an [`actors::es::EventStore`].
//!
//! # Layout
//!
//! ```text
//! stream   <cluster>-events          subjects <cluster>.events.>   file storage, R = replicas,
//!                                    max_message_size = max_event_bytes, allow_direct,
//!                                    allow_atomic_publish, duplicate_window 2 min,
//!                                    discard Old, no limits on messages, bytes or age
//! subject  <cluster>.events.<kind>.<id>        one per actor; one message per event
//! bucket   <cluster>-snapshots (KV)  key <kind>.<id>, history 1    one snapshot per actor
//! ```
//!
//! Each message's payload is the [`StoredEvent`] JSON envelope (`v` = 1, `id`, `actor`,
//! `version`, `type`, `schema`, `timestamp_ms`, `data`); its `sequence` is not stored but
//! filled in on read from the stream sequence. Headers of every event message:
//!
//! - `Nats-Msg-Id: <event id>`: the server drops a second copy within the duplicate window;
//! - `Tessel-Version: <version>`: the actor's version after this event (read by
//!   [`JetStreamEventStore::last`] without decoding the payload);
//! - `Nats-Expected-Last-Subject-Sequence: <sequence of the actor's last event, or 0>`: on
//!   the (first) message of an append, so the server itself refuses an append at a stale
//!   version (optimistic concurrency);
//! - in appends of several events, `Nats-Batch-Id` (unique, ≤ 64 characters),
//!   `Nats-Batch-Sequence` (1..n) and `Nats-Batch-Commit: 1` on the last: an atomic batch
//!   (ADR-50), stored all together or not at all. The messages before the last go out as
//!   core NATS publishes without a reply; the last one's JetStream ack is the batch's answer.
//!
//! `max_event_bytes` bounds each message, headers included; a larger event fails with
//! [`StoreError::TooLarge`] before anything is sent.
//!
//! # Retries
//!
//! An append first reads the actor's last event — unless this store wrote the actor's event at
//! the expected version itself, whose stream sequence it remembers (then the append is one
//! round trip; a stale memory only costs a refusal and a re-read). When the version is not the
//! expected one, the
//! append is either a retry whose first attempt landed (the last event is at
//! `expected + events.len()` and has the id of the append's last event: the answer is that
//! version, nothing is written) or a [`StoreError::Conflict`]. When the server refuses the
//! publish, the same check decides between success and conflict, on a fresh read.
//!
//! # Atomic batches and `Nats-Msg-Id` (nats-server 2.15.1, found by experiment)
//!
//! The server accepts `Nats-Msg-Id` inside an atomic batch, so batches carry it too. A batch
//! that contains a message id already in the duplicate window (or the same id twice) is
//! refused as a whole with error 10201 ("atomic publish batch contains duplicate message id")
//! rather than acknowledged as a duplicate, and that check comes before the
//! expected-last-subject-sequence check (a stale batch of already-stored ids gets 10201, not
//! 10071). The store treats 10201 like a refused expected sequence: it re-reads the last event
//! and answers success (the retry's events are there) or a conflict. A single-event publish
//! of a known id gets an ack with `duplicate: true` instead; that too is settled by a re-read.
//!
//! A consequence: within the two-minute duplicate window, re-appending already-stored event
//! ids at a newer version is refused as a conflict, never written twice.
//!
//! # Reads
//!
//! [`EventStore::read`] uses an ordered consumer filtered on the actor's subject, starting after
//! the given sequence, and stops at the subject's last sequence as of the call: it never waits
//! for events appended later. Reads of the last event use direct get, which a replica may
//! answer: right after an append on another connection, a replica can lag a little.

use std::collections::hash_map::RandomState;
use std::error::Error as StdError;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ordered::Anchored;
use actors::es::{
    ActorKey, ENVELOPE_VERSION, EventStore, NewEvent, Snapshot, StoreError, StoredEvent,
    validate_append,
};
use async_nats::jetstream::context::{
    CreateKeyValueErrorKind, CreateStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, ErrorCode, kv, stream};
use async_nats::{HeaderMap, HeaderValue, header};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tracing::warn;

/// The header that carries an event's version.
pub const VERSION_HEADER: &str = "Tessel-Version";
/// Attempts at creating or binding the stream and the bucket before [`JetStreamEventStore::open`]
/// gives up.
pub const OPEN_ATTEMPTS: u32 = 5;
/// How long a read waits for the next message before it fails with
/// [`StoreError::Unavailable`].
pub const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The server's duplicate window for event ids.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The events stream's name.
pub fn events_stream(cluster: &str) -> String {
    format!("{cluster}-events")
}

/// The snapshots bucket's name.
pub fn snapshots_bucket(cluster: &str) -> String {
    format!("{cluster}-snapshots")
}

/// The subject of an actor's events.
pub fn actor_subject(cluster: &str, actor: &ActorKey) -> String {
    format!("{cluster}.events.{}.{}", actor.kind(), actor.id())
}

/// The snapshot key of an actor.
pub fn snapshot_key(actor: &ActorKey) -> String {
    format!("{}.{}", actor.kind(), actor.id())
}

/// An event store on a JetStream stream, with snapshots in a KV bucket (see the module docs).
pub struct JetStreamEventStore {
    js: jetstream::Context,
    client: async_nats::Client,
    stream: stream::Stream,
    snapshots: kv::Store,
    cluster: String,
    max_event_bytes: usize,
    batch_nonce: u64,
    batch_counter: AtomicU64,
    /// The last (version, stream sequence) this store wrote per actor: an append at that
    /// version skips reading the actor's last event (the server's expected-sequence check still
    /// guards it; a stale entry only costs a refusal and a re-read).
    positions: std::sync::Mutex<std::collections::HashMap<ActorKey, (u64, u64)>>,
}

/// Most actors whose last position the store remembers.
pub const MAX_CACHED_POSITIONS: usize = 100_000;

/// The actor's last event: its version, its stream sequence and its id.
type Last = Option<(u64, u64, String)>;

/// The JetStream API error code somewhere in an error's chain.
fn api_code(err: &(dyn StdError + 'static)) -> Option<ErrorCode> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(js) = e.downcast_ref::<jetstream::Error>() {
            return Some(js.error_code());
        }
        cur = e.source();
    }
    None
}

/// Maps a failed request to a store error: too large, else unavailable.
fn classify(what: &str, err: &(dyn StdError + 'static)) -> StoreError {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(p) = e.downcast_ref::<PublishError>()
            && p.kind() == PublishErrorKind::MaxPayloadExceeded
        {
            return StoreError::TooLarge(format!("{what}: {err}"));
        }
        if let Some(p) = e.downcast_ref::<async_nats::PublishError>()
            && p.kind() == async_nats::PublishErrorKind::MaxPayloadExceeded
        {
            return StoreError::TooLarge(format!("{what}: {err}"));
        }
        if let Some(js) = e.downcast_ref::<jetstream::Error>()
            && js.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
        {
            return StoreError::TooLarge(format!("{what}: {err}"));
        }
        cur = e.source();
    }
    StoreError::Unavailable(format!("{what}: {err}"))
}

/// Whether the server refused a publish because of the expected sequence or a known id.
fn refused(err: &PublishError) -> bool {
    err.kind() == PublishErrorKind::WrongLastSequence
        || matches!(
            api_code(err),
            Some(
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                    | ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE
            )
        )
}

/// Whether a setup error may go away on its own (timeouts, a cluster still forming).
fn transient_code(code: Option<ErrorCode>) -> bool {
    matches!(
        code,
        Some(
            ErrorCode::CLUSTER_NOT_AVAILABLE
                | ErrorCode::CLUSTER_NOT_ACTIVE
                | ErrorCode::CLUSTER_NO_PEERS
                | ErrorCode::INSUFFICIENT_RESOURCES
        )
    )
}

/// Serialized length of a header block ("NATS/1.0\r\n", each "key: value\r\n", "\r\n").
fn headers_len(headers: &HeaderMap) -> usize {
    let mut len = b"NATS/1.0\r\n".len() + b"\r\n".len();
    for (k, vs) in headers.iter() {
        for v in vs {
            len += AsRef::<[u8]>::as_ref(k).len() + 2 + v.as_str().len() + 2;
        }
    }
    len
}

fn decode(payload: &[u8], sequence: u64) -> Result<StoredEvent, StoreError> {
    let mut event: StoredEvent = serde_json::from_slice(payload)
        .map_err(|e| StoreError::Corrupt(format!("event at sequence {sequence}: {e}")))?;
    // A future envelope may mean something else by the same fields: never read it as this one.
    if event.v != ENVELOPE_VERSION {
        return Err(StoreError::Corrupt(format!(
            "event at sequence {sequence}: unsupported envelope version {}",
            event.v
        )));
    }
    event.sequence = sequence;
    Ok(event)
}

/// The answer when the actor's last event is `last` and the append would bring it to
/// `target` with an event whose id is `last_id`: a landed retry, or a conflict.
fn settle(last: &Last, target: u64, last_id: &str) -> Result<u64, StoreError> {
    match last {
        Some((version, _, id)) if *version == target && id == last_id => Ok(target),
        Some((version, _, _)) => Err(StoreError::Conflict { current: *version }),
        None => Err(StoreError::Conflict { current: 0 }),
    }
}

fn random_nonce() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
}

/// Binds the events stream, creating it when absent, and makes sure it allows direct gets and
/// atomic batches.
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, StoreError> {
    let name = config.name.clone();
    let mut attempt = 0;
    let mut stream = loop {
        attempt += 1;
        // Create first, bind on refusal (see `store::create_or_bind`).
        let result = crate::store::create_or_bind(js, config.clone()).await;
        match result {
            Ok(s) => break s,
            Err(e)
                if attempt < OPEN_ATTEMPTS
                    && (matches!(
                        e.kind(),
                        CreateStreamErrorKind::TimedOut
                            | CreateStreamErrorKind::JetStreamUnavailable
                    ) || transient_code(api_code(&e))) =>
            {
                warn!(attempt, stream = %name, error = %e, "creating the events stream failed; retrying");
                backoff(attempt).await;
            }
            Err(e) => return Err(classify(&format!("create stream {name}"), &e)),
        }
    };
    let info = stream.cached_info().clone();
    if !info.config.allow_atomic_publish || !info.config.allow_direct {
        let config = stream::Config {
            allow_atomic_publish: true,
            allow_direct: true,
            ..info.config.clone()
        };
        js.update_stream(config)
            .await
            .map_err(|e| classify(&format!("enable batches on {name}"), &e))?;
        stream = js
            .get_stream(&name)
            .await
            .map_err(|e| classify(&format!("stream {name}"), &e))?;
    }
    Ok(stream)
}

/// Binds the snapshots bucket, creating it when absent.
async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, StoreError> {
    let bucket = config.bucket.clone();
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Create first (idempotent for the same configuration), bind on refusal.
        let result = match js.create_key_value(config.clone()).await {
            Ok(s) => Ok(s),
            Err(e) => js.get_key_value(&bucket).await.map_err(|_| e),
        };
        match result {
            Ok(s) => return Ok(s),
            Err(e)
                if attempt < OPEN_ATTEMPTS
                    && (e.kind() == CreateKeyValueErrorKind::TimedOut
                        || transient_code(api_code(&e))) =>
            {
                warn!(attempt, %bucket, error = %e, "creating the snapshots bucket failed; retrying");
                backoff(attempt).await;
            }
            Err(e) => return Err(classify(&format!("create bucket {bucket}"), &e)),
        }
    }
}

impl JetStreamEventStore {
    /// Creates or binds the events stream `<cluster>-events` and the snapshots bucket
    /// `<cluster>-snapshots` with `replicas` replicas; events (headers included) may be up to
    /// `max_event_bytes` long. Retries setup up to [`OPEN_ATTEMPTS`] times on timeouts.
    pub async fn open(
        js: jetstream::Context,
        cluster: &str,
        replicas: usize,
        max_event_bytes: usize,
    ) -> Result<Self, StoreError> {
        if crate::config::validate_cluster_name(cluster).is_err() {
            return Err(StoreError::InvalidKey(format!("cluster name {cluster:?}")));
        }
        let config = stream::Config {
            name: events_stream(cluster),
            subjects: vec![format!("{cluster}.events.>")],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_message_size: i32::try_from(max_event_bytes).unwrap_or(i32::MAX),
            max_messages: -1,
            max_messages_per_subject: -1,
            max_bytes: -1,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            allow_atomic_publish: true,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        let stream = ensure_stream(&js, config).await?;
        let snapshots = ensure_bucket(
            &js,
            kv::Config {
                bucket: snapshots_bucket(cluster),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Self {
            client: js.client(),
            js,
            stream,
            snapshots,
            cluster: cluster.to_owned(),
            max_event_bytes,
            batch_nonce: random_nonce(),
            batch_counter: AtomicU64::new(0),
            positions: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// The subject of an actor's events.
    pub fn subject(&self, actor: &ActorKey) -> String {
        actor_subject(&self.cluster, actor)
    }

    /// The events stream.
    pub fn stream(&self) -> &stream::Stream {
        &self.stream
    }

    /// The snapshots bucket.
    pub fn snapshots(&self) -> &kv::Store {
        &self.snapshots
    }

    /// The actor's last message, by direct get (None: it has no events).
    async fn last_message(
        &self,
        actor: &ActorKey,
    ) -> Result<Option<async_nats::jetstream::message::StreamMessage>, StoreError> {
        match self
            .stream
            .direct_get_last_for_subject(self.subject(actor))
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(classify(&format!("last event of {actor}"), &e)),
        }
    }

    /// The actor's last event, by direct get: `(version, stream sequence, event id)`, or None
    /// when it has no events. Reads the version and the id from the headers, else from the
    /// payload.
    pub async fn last(&self, actor: &ActorKey) -> Result<Option<(u64, u64, String)>, StoreError> {
        let Some(msg) = self.last_message(actor).await? else {
            return Ok(None);
        };
        let version = msg
            .headers
            .get(VERSION_HEADER)
            .and_then(|v| v.as_str().parse::<u64>().ok());
        let id = msg
            .headers
            .get(header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_owned());
        match (version, id) {
            (Some(version), Some(id)) => Ok(Some((version, msg.sequence, id))),
            (version, _) => {
                let event = decode(&msg.payload, msg.sequence)?;
                Ok(Some((
                    version.unwrap_or(event.version),
                    msg.sequence,
                    event.id,
                )))
            }
        }
    }

    fn next_batch_id(&self) -> String {
        let n = self.batch_counter.fetch_add(1, Ordering::Relaxed);
        format!("es{:016x}{n:x}", self.batch_nonce)
    }

    /// The messages of an append: headers and payload of each, checked against the size limit.
    /// The first one's expected-sequence header holds a placeholder of the longest length.
    fn messages(
        &self,
        actor: &ActorKey,
        expected_version: u64,
        events: &[NewEvent],
    ) -> Result<Vec<(HeaderMap, Bytes)>, StoreError> {
        let batch = (events.len() > 1).then(|| self.next_batch_id());
        let timestamp_ms = crate::store::wall_ms();
        let mut out = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let version = expected_version + 1 + i as u64;
            let record = StoredEvent {
                v: ENVELOPE_VERSION,
                id: e.id.clone(),
                actor: actor.to_string(),
                version,
                kind: e.kind.clone(),
                schema: e.schema,
                timestamp_ms,
                data: e.data.clone(),
                sequence: 0,
            };
            let payload = serde_json::to_vec(&record)
                .map_err(|err| StoreError::InvalidKey(format!("event {}: {err}", e.id)))?;
            let mut h = HeaderMap::new();
            h.insert(header::NATS_MESSAGE_ID, e.id.as_str());
            h.insert(VERSION_HEADER, HeaderValue::from(version));
            if i == 0 {
                h.insert(
                    header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    HeaderValue::from(u64::MAX),
                );
            }
            if let Some(batch) = &batch {
                h.insert(header::NATS_BATCH_ID, batch.as_str());
                h.insert(header::NATS_BATCH_SEQUENCE, HeaderValue::from(i + 1));
                if i + 1 == events.len() {
                    h.insert(header::NATS_BATCH_COMMIT, header::NATS_BATCH_COMMIT_FINAL);
                }
            }
            let size = payload.len() + headers_len(&h);
            if size > self.max_event_bytes {
                return Err(StoreError::TooLarge(format!(
                    "event {} is {size} bytes with its headers (max {})",
                    e.id, self.max_event_bytes
                )));
            }
            out.push((h, Bytes::from(payload)));
        }
        Ok(out)
    }

    /// Publishes through JetStream and waits for the ack.
    async fn publish_acked(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, PublishError> {
        match self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        }
    }

    /// Re-reads the last event after a refused publish and settles the append.
    async fn resettle(
        &self,
        actor: &ActorKey,
        target: u64,
        last_id: &str,
    ) -> Result<u64, StoreError> {
        settle(&self.last(actor).await?, target, last_id)
    }
}

struct ReadState {
    messages: Anchored,
    last_sequence: u64,
    from_version: u64,
}

impl ReadState {
    /// The next item and whether the read goes on after it (None: the read is over).
    async fn next(&mut self) -> Option<(Result<StoredEvent, StoreError>, bool)> {
        loop {
            // A buffered message is taken at once; only an empty buffer waits, with a timeout
            // (a timer per message would cost more than the message).
            let ready = futures::FutureExt::now_or_never(self.messages.next());
            let next = match ready {
                Some(item) => Ok(item),
                None => tokio::time::timeout(READ_IDLE_TIMEOUT, self.messages.next()).await,
            };
            let msg = match next {
                Err(_) => {
                    return Some((
                        Err(StoreError::Unavailable("read: no message in time".into())),
                        false,
                    ));
                }
                Ok(None) => return None,
                Ok(Some(Err(e))) => {
                    return Some((Err(StoreError::Unavailable(format!("read: {e}"))), false));
                }
                Ok(Some(Ok(msg))) => msg,
            };
            let sequence = match msg.info() {
                Ok(info) => info.stream_sequence,
                Err(e) => {
                    return Some((
                        Err(StoreError::Corrupt(format!("message metadata: {e}"))),
                        false,
                    ));
                }
            };
            let more = sequence < self.last_sequence;
            match decode(&msg.payload, sequence) {
                Ok(event) if event.version < self.from_version => {
                    if !more {
                        return None;
                    }
                }
                other => return Some((other, more)),
            }
        }
    }
}

impl EventStore for JetStreamEventStore {
    async fn append(
        &self,
        actor: &ActorKey,
        expected_version: u64,
        events: &[NewEvent],
    ) -> Result<u64, StoreError> {
        validate_append(events)?;
        let Some(last_event) = events.last() else {
            return Err(StoreError::InvalidKey(
                "an append needs at least one event".into(),
            ));
        };
        let target = expected_version
            .checked_add(events.len() as u64)
            .ok_or_else(|| StoreError::InvalidKey("version overflow".into()))?;
        let mut messages = self.messages(actor, expected_version, events)?;

        let cached = self
            .positions
            .lock()
            .ok()
            .and_then(|p| p.get(actor).copied())
            .filter(|(v, _)| *v == expected_version);
        let last_sequence = match cached {
            Some((_, seq)) => seq,
            None => {
                let last = self.last(actor).await?;
                let current = last.as_ref().map_or(0, |(v, _, _)| *v);
                if current != expected_version {
                    return settle(&last, target, &last_event.id);
                }
                last.as_ref().map_or(0, |(_, s, _)| *s)
            }
        };
        if let Some((h, _)) = messages.first_mut() {
            h.insert(
                header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                HeaderValue::from(last_sequence),
            );
        }

        let subject = self.subject(actor);
        let Some((commit_headers, commit_payload)) = messages.pop() else {
            return Err(StoreError::InvalidKey(
                "an append needs at least one event".into(),
            ));
        };
        // The batch's leading messages: core publishes; the server stages them until the
        // commit (or drops them when the commit never comes).
        for (h, payload) in messages {
            self.client
                .publish_with_headers(subject.clone(), h, payload)
                .await
                .map_err(|e| classify(&format!("append to {actor}"), &e))?;
        }
        match self
            .publish_acked(subject, commit_headers, commit_payload)
            .await
        {
            Ok(ack) if !ack.duplicate => {
                if let Ok(mut p) = self.positions.lock() {
                    if p.len() >= MAX_CACHED_POSITIONS {
                        p.clear();
                    }
                    p.insert(actor.clone(), (target, ack.sequence));
                }
                Ok(target)
            }
            // The id was already stored: ours only if it is the actor's last event.
            Ok(_) => self.resettle(actor, target, &last_event.id).await,
            Err(e) if refused(&e) => self.resettle(actor, target, &last_event.id).await,
            Err(e) => Err(classify(&format!("append to {actor}"), &e)),
        }
    }

    async fn read(
        &self,
        actor: &ActorKey,
        from_version: u64,
        after_sequence: u64,
    ) -> Result<BoxStream<'static, Result<StoredEvent, StoreError>>, StoreError> {
        // Where to stop: the subject's last message now (whatever its content).
        let Some(last_sequence) = self.last_message(actor).await?.map(|m| m.sequence) else {
            return Ok(futures::stream::empty().boxed());
        };
        if last_sequence <= after_sequence {
            return Ok(futures::stream::empty().boxed());
        }
        let messages = Anchored::open(
            self.stream.clone(),
            vec![self.subject(actor)],
            after_sequence,
        )
        .await
        .map_err(|e| StoreError::Unavailable(format!("read {actor}: {e}")))?;
        let state = ReadState {
            messages,
            last_sequence,
            from_version,
        };
        Ok(futures::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            let (item, more) = state.next().await?;
            Some((item, more.then_some(state)))
        })
        .boxed())
    }

    async fn latest_version(&self, actor: &ActorKey) -> Result<u64, StoreError> {
        Ok(self.last(actor).await?.map_or(0, |(v, _, _)| v))
    }

    async fn save_snapshot(&self, actor: &ActorKey, snapshot: &Snapshot) -> Result<(), StoreError> {
        let value = serde_json::to_vec(snapshot)
            .map_err(|e| StoreError::InvalidKey(format!("snapshot of {actor}: {e}")))?;
        self.snapshots
            .put(snapshot_key(actor), Bytes::from(value))
            .await
            .map_err(|e| classify(&format!("save snapshot of {actor}"), &e))?;
        Ok(())
    }

    async fn load_snapshot(&self, actor: &ActorKey) -> Result<Option<Snapshot>, StoreError> {
        let Some(value) = self
            .snapshots
            .get(snapshot_key(actor))
            .await
            .map_err(|e| classify(&format!("load snapshot of {actor}"), &e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&value)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("snapshot of {actor}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_of_another_envelope_version_is_refused() {
        let event = |v: u32| {
            format!(
                r#"{{"v":{v},"id":"e1","actor":"counter/a","version":1,"type":"Added","schema":1,"timestamp_ms":5,"data":{{"n":1}}}}"#
            )
        };
        let read = decode(event(1).as_bytes(), 42).unwrap();
        assert_eq!((read.version, read.sequence), (1, 42));
        for v in [0, 2] {
            match decode(event(v).as_bytes(), 42) {
                Err(StoreError::Corrupt(why)) => {
                    assert!(why.contains(&format!("envelope version {v}")), "{why}")
                }
                other => panic!("version {v}: {other:?}"),
            }
        }
        assert!(matches!(
            decode(br#"{"v":1}"#, 1),
            Err(StoreError::Corrupt(_))
        ));
    }
}
