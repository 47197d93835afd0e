//! Event sourcing: the event store interface, its records, and an in-memory implementation.
//!
//! An actor is identified by an [`ActorKey`] (`kind/id`). Its history is a sequence of events
//! with versions 1, 2, 3, …; an append names the version it expects the history to be at and
//! fails with [`StoreError::Conflict`] otherwise. Every event has a unique id (the message id),
//! so retrying an append whose answer was lost does not write it twice.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

/// The schema version of the envelope records.
pub const ENVELOPE_VERSION: u32 = 1;
/// Longest actor kind.
pub const MAX_KIND_LEN: usize = 32;
/// Longest actor id.
pub const MAX_ID_LEN: usize = 128;
/// Most events in one append.
pub const MAX_EVENTS_PER_APPEND: usize = 100;

/// Identifies an actor: its kind (type) and its id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ActorKey {
    kind: String,
    id: String,
}

fn token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl ActorKey {
    /// Validates: kind 1–32 and id 1–128 characters of `[A-Za-z0-9_-]` (each one NATS token).
    pub fn new(kind: &str, id: &str) -> Result<Self, StoreError> {
        if !token(kind, MAX_KIND_LEN) {
            return Err(StoreError::InvalidKey(format!("actor kind {kind:?}")));
        }
        if !token(id, MAX_ID_LEN) {
            return Err(StoreError::InvalidKey(format!("actor id {id:?}")));
        }
        Ok(ActorKey {
            kind: kind.into(),
            id: id.into(),
        })
    }

    /// Parses `kind/id`.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s.split_once('/') {
            Some((k, i)) => ActorKey::new(k, i),
            None => Err(StoreError::InvalidKey(format!("{s:?} is not kind/id"))),
        }
    }

    /// The kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The slot this actor lives in (see [`crate::address::slot_of`]).
    pub fn slot(&self) -> cluster::Slot {
        crate::address::slot_of(&self.kind, &self.id)
    }
}

impl fmt::Display for ActorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

/// An event to append.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Unique id (the message id): reuse it when retrying the same append.
    pub id: String,
    /// The event's type name.
    pub kind: String,
    /// The schema version of `data`.
    pub schema: u32,
    /// The event's data.
    pub data: serde_json::Value,
}

/// An event as stored: the envelope record of each message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredEvent {
    /// Envelope schema version ([`ENVELOPE_VERSION`]).
    pub v: u32,
    /// Unique id.
    pub id: String,
    /// The actor.
    pub actor: String,
    /// Its version after this event (1 for the first).
    pub version: u64,
    /// The event's type name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Schema version of `data`.
    pub schema: u32,
    /// When it was appended (writer's wall clock).
    pub timestamp_ms: u64,
    /// The data.
    pub data: serde_json::Value,
    /// The stream sequence (0 in the in-memory store; filled in on read, not stored).
    #[serde(default, skip_serializing)]
    pub sequence: u64,
}

/// A snapshot of an actor's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Envelope schema version.
    pub v: u32,
    /// The version the state includes.
    pub version: u64,
    /// The stream sequence of that version's event (read the tail after it).
    pub sequence: u64,
    /// The state.
    pub state: serde_json::Value,
}

/// Why a store operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The actor's history is not at the expected version.
    #[error("version conflict: the actor is at version {current}")]
    Conflict {
        /// The version it is at.
        current: u64,
    },
    /// An invalid actor key or event.
    #[error("invalid: {0}")]
    InvalidKey(String),
    /// Too many events or too large a record.
    #[error("too large: {0}")]
    TooLarge(String),
    /// A stored record that cannot be read.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The store could not be reached or did not answer.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Where events live.
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` if the actor is at `expected_version`; returns the new version.
    /// All-or-nothing; a retry with the same event ids after a lost answer succeeds without
    /// writing twice.
    fn append(
        &self,
        actor: &ActorKey,
        expected_version: u64,
        events: &[NewEvent],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The events with version ≥ `from_version`, in order. `after_sequence` is a hint (the
    /// sequence of a snapshot's event) that lets the store skip what comes before; 0 reads from
    /// the start.
    fn read(
        &self,
        actor: &ActorKey,
        from_version: u64,
        after_sequence: u64,
    ) -> impl Future<
        Output = Result<BoxStream<'static, Result<StoredEvent, StoreError>>, StoreError>,
    > + Send;

    /// The actor's current version (0 if it has no events).
    fn latest_version(
        &self,
        actor: &ActorKey,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Saves a snapshot (replacing the previous one).
    fn save_snapshot(
        &self,
        actor: &ActorKey,
        snapshot: &Snapshot,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The latest snapshot, if any.
    fn load_snapshot(
        &self,
        actor: &ActorKey,
    ) -> impl Future<Output = Result<Option<Snapshot>, StoreError>> + Send;
}

/// Checks an append's events before anything is written.
pub fn validate_append(events: &[NewEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Err(StoreError::InvalidKey(
            "an append needs at least one event".into(),
        ));
    }
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(StoreError::TooLarge(format!(
            "{} events in one append (max {MAX_EVENTS_PER_APPEND})",
            events.len()
        )));
    }
    for (i, e) in events.iter().enumerate() {
        if events[..i].iter().any(|o| o.id == e.id) {
            return Err(StoreError::InvalidKey(format!(
                "event id {:?} twice in one append",
                e.id
            )));
        }
        if !token(&e.id, 128) {
            return Err(StoreError::InvalidKey(format!("event id {:?}", e.id)));
        }
        if !token(&e.kind, 64) {
            return Err(StoreError::InvalidKey(format!("event type {:?}", e.kind)));
        }
    }
    Ok(())
}

#[derive(Default)]
struct Memory {
    events: HashMap<ActorKey, Vec<StoredEvent>>,
    snapshots: HashMap<ActorKey, Snapshot>,
    sequence: u64,
}

/// An event store in memory, for tests: the same rules as the JetStream one.
#[derive(Default)]
pub struct InMemoryStore {
    inner: Mutex<Memory>,
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Memory>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Unavailable("poisoned".into()))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl EventStore for InMemoryStore {
    async fn append(
        &self,
        actor: &ActorKey,
        expected_version: u64,
        events: &[NewEvent],
    ) -> Result<u64, StoreError> {
        validate_append(events)?;
        let mut m = self.lock()?;
        let mut seq = m.sequence;
        let history = m.events.entry(actor.clone()).or_default();
        let current = history.len() as u64;
        if current != expected_version {
            // A retry of an append that did land: its last event is already there.
            let last_id = events.last().map(|e| e.id.as_str());
            let landed = history
                .get(expected_version as usize + events.len() - 1)
                .map(|e| e.id.as_str());
            if landed.is_some() && landed == last_id {
                return Ok(expected_version + events.len() as u64);
            }
            return Err(StoreError::Conflict { current });
        }
        for (i, e) in events.iter().enumerate() {
            seq += 1;
            history.push(StoredEvent {
                v: ENVELOPE_VERSION,
                id: e.id.clone(),
                actor: actor.to_string(),
                version: current + 1 + i as u64,
                kind: e.kind.clone(),
                schema: e.schema,
                timestamp_ms: now_ms(),
                data: e.data.clone(),
                sequence: seq,
            });
        }
        m.sequence = seq;
        Ok(current + events.len() as u64)
    }

    async fn read(
        &self,
        actor: &ActorKey,
        from_version: u64,
        _after_sequence: u64,
    ) -> Result<BoxStream<'static, Result<StoredEvent, StoreError>>, StoreError> {
        let m = self.lock()?;
        let events: Vec<Result<StoredEvent, StoreError>> = m
            .events
            .get(actor)
            .map(|h| {
                h.iter()
                    .filter(|e| e.version >= from_version)
                    .cloned()
                    .map(Ok)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Box::pin(futures::stream::iter(events)))
    }

    async fn latest_version(&self, actor: &ActorKey) -> Result<u64, StoreError> {
        Ok(self.lock()?.events.get(actor).map_or(0, |h| h.len() as u64))
    }

    async fn save_snapshot(&self, actor: &ActorKey, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.lock()?
            .snapshots
            .insert(actor.clone(), snapshot.clone());
        Ok(())
    }

    async fn load_snapshot(&self, actor: &ActorKey) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.lock()?.snapshots.get(actor).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn ev(id: &str) -> NewEvent {
        NewEvent {
            id: id.into(),
            kind: "Added".into(),
            schema: 1,
            data: serde_json::json!({"n": 1}),
        }
    }

    #[tokio::test]
    async fn versions_conflicts_and_retries() {
        let s = InMemoryStore::new();
        let a = ActorKey::new("counter", "a").unwrap();
        assert_eq!(s.append(&a, 0, &[ev("e1"), ev("e2")]).await, Ok(2));
        assert_eq!(
            s.append(&a, 0, &[ev("x1")]).await,
            Err(StoreError::Conflict { current: 2 })
        );
        // A retry of the landed append is not written twice.
        assert_eq!(s.append(&a, 0, &[ev("e1"), ev("e2")]).await, Ok(2));
        assert_eq!(s.latest_version(&a).await, Ok(2));
        let tail: Vec<u64> = s
            .read(&a, 2, 0)
            .await
            .unwrap()
            .map(|e| e.unwrap().version)
            .collect()
            .await;
        assert_eq!(tail, vec![2]);
        assert!(matches!(
            s.append(&a, 2, &[]).await,
            Err(StoreError::InvalidKey(_))
        ));
        assert!(ActorKey::new("a.b", "x").is_err());
        assert!(ActorKey::parse("model/emb").is_ok());
    }
}
