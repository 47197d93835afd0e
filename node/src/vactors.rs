//! The virtual-actor runtime of one node: hosts the event-sourced actors of the slots it owns.
//!
//! - The owner of slot `s` subscribes to `<c>.actor.<s>.>` (and only its own slots').
//! - A message on `<c>.actor.<s>.<kind>.<id>` activates the actor on first use: its state is
//!   rebuilt from the latest snapshot plus the events after it.
//! - Each active actor handles its commands one at a time from a bounded queue: `decide`, append
//!   the events with the expected version (a conflict reloads the state and decides again, once),
//!   `apply`, answer, and snapshot every `snapshot_every` events.
//! - An actor idle for `idle_ms` is passivated; when its slot moves away, every actor of the
//!   slot is passivated and the subscription dropped, so the next message activates it at the
//!   new owner from the store, with all its state.
//!
//! Replies are JSON: `{"ok": <view>, "version": N}` or `{"error": {"kind", "message",
//! "rejection"?, "current"?}}`; kinds: `bad_request`, `unknown_type`, `rejected`, `conflict`,
//! `overloaded`, `too_large`, `unavailable`, `corrupt`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::behavior::{Behavior, BehaviorError};
use actors::es::{ActorKey, ENVELOPE_VERSION, EventStore, NewEvent, Snapshot, StoreError};
use bytes::Bytes;
use cluster::Slot;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// Limits and timings of the runtime.
#[derive(Clone, Debug)]
pub struct ActorConfig {
    /// Snapshot after this many events since the last one.
    pub snapshot_every: u64,
    /// Passivate after this long without a message.
    pub idle_ms: u64,
    /// Mailbox bound of one actor.
    pub queue_len: usize,
    /// Largest command accepted.
    pub max_message_bytes: usize,
    /// Most actors active at once on this node.
    pub max_active: usize,
}

impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig {
            snapshot_every: 100,
            idle_ms: 60_000,
            queue_len: 1_024,
            max_message_bytes: 1 << 20,
            max_active: 100_000,
        }
    }
}

/// The subject prefix of actor messages.
pub fn actor_subject(cluster: &str, key: &ActorKey) -> String {
    format!(
        "{cluster}.actor.{}.{}.{}",
        key.slot().get(),
        key.kind(),
        key.id()
    )
}

/// An error reply body.
pub fn error_reply(kind: &str, message: &str) -> Value {
    json!({"error": {"kind": kind, "message": message}})
}

struct Request {
    /// The request's id (from the `Tessel-Request-Id` header, or made up): the ids of the events
    /// it appends derive from it, so the same request handled twice (a retry, or two owners
    /// during a handover) is applied once.
    id: String,
    payload: Bytes,
    reply: Option<async_nats::Subject>,
}

/// How many answers an actor remembers for retried requests.
pub const RECENT_REQUESTS: usize = 64;

/// The header carrying a request's id.
pub const REQUEST_ID_HEADER: &str = "Tessel-Request-Id";

/// What activation rebuilt.
struct Loaded {
    state: Value,
    version: u64,
    sequence: u64,
    last_id: Option<String>,
}

struct Shared<S> {
    client: async_nats::Client,
    cluster: String,
    store: Arc<S>,
    behaviors: HashMap<&'static str, Arc<dyn Behavior>>,
    cfg: ActorConfig,
    metrics: Arc<Metrics>,
    active: Mutex<HashMap<ActorKey, mpsc::Sender<Request>>>,
    slots: Mutex<HashMap<u16, tokio::task::JoinHandle<()>>>,
    control: mpsc::UnboundedSender<(Slot, bool)>,
}

/// The runtime; cheap to clone.
pub struct ActorRuntime<S> {
    inner: Arc<Shared<S>>,
}

impl<S> Clone for ActorRuntime<S> {
    fn clone(&self) -> Self {
        ActorRuntime {
            inner: self.inner.clone(),
        }
    }
}

impl<S: EventStore> ActorRuntime<S> {
    /// A runtime hosting the given kinds.
    pub fn new(
        client: async_nats::Client,
        cluster: &str,
        store: Arc<S>,
        behaviors: Vec<Arc<dyn Behavior>>,
        cfg: ActorConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let behaviors = behaviors.into_iter().map(|b| (b.kind(), b)).collect();
        let (control, mut orders) = mpsc::unbounded_channel();
        let rt = ActorRuntime {
            inner: Arc::new(Shared {
                client,
                cluster: cluster.into(),
                store,
                behaviors,
                cfg,
                metrics,
                active: Mutex::new(HashMap::new()),
                slots: Mutex::new(HashMap::new()),
                control,
            }),
        };
        // Slot starts and stops are carried out in the order they were asked for, so a stop
        // right after a start is never overtaken by the start's subscription.
        let weak = Arc::downgrade(&rt.inner);
        tokio::spawn(async move {
            while let Some((slot, start)) = orders.recv().await {
                let Some(inner) = weak.upgrade() else { break };
                let rt = ActorRuntime { inner };
                if start {
                    rt.start_slot(slot).await;
                } else {
                    rt.stop_slot(slot);
                }
            }
        });
        rt
    }

    /// Asks for a slot to start (true) or stop (false) here; carried out in order.
    pub fn set_slot(&self, slot: Slot, start: bool) {
        let _ = self.inner.control.send((slot, start));
    }

    /// Actors active now.
    pub fn active(&self) -> usize {
        self.inner.active.lock().map_or(0, |a| a.len())
    }

    /// Starts serving a slot: subscribes to its actor subjects.
    pub async fn start_slot(&self, slot: Slot) {
        let subject = format!("{}.actor.{}.>", self.inner.cluster, slot.get());
        let mut sub = match self.inner.client.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                warn!(%subject, error = %e, "cannot subscribe to a slot");
                return;
            }
        };
        let rt = self.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                rt.dispatch(msg).await;
            }
        });
        if let Ok(mut slots) = self.inner.slots.lock()
            && let Some(old) = slots.insert(slot.get(), task)
        {
            old.abort();
        }
    }

    /// Stops serving a slot: drops the subscription and passivates the slot's actors.
    pub fn stop_slot(&self, slot: Slot) {
        if let Ok(mut slots) = self.inner.slots.lock()
            && let Some(task) = slots.remove(&slot.get())
        {
            task.abort();
        }
        if let Ok(mut active) = self.inner.active.lock() {
            // Dropping the senders ends each actor's loop once its queue is drained.
            active.retain(|k, _| k.slot() != slot);
        }
    }

    async fn reply(&self, to: Option<async_nats::Subject>, body: Value) {
        if let Some(to) = to {
            let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
            if let Err(e) = self.inner.client.publish(to, bytes).await {
                debug!(error = %e, "cannot reply");
            }
        }
    }

    async fn refuse(&self, to: Option<async_nats::Subject>, kind: &str, message: &str) {
        Metrics::inc(&self.inner.metrics.actor_errors_total);
        self.reply(to, error_reply(kind, message)).await;
    }

    async fn dispatch(&self, msg: async_nats::Message) {
        let reply = msg.reply.clone();
        // <c>.actor.<slot>.<kind>.<id>
        let parts: Vec<&str> = msg.subject.split('.').collect();
        let key = match parts.as_slice() {
            [_, "actor", slot, kind, id] => match ActorKey::new(kind, id) {
                Ok(k) if k.slot().get().to_string() == *slot => k,
                Ok(_) => {
                    return self
                        .refuse(
                            reply,
                            "bad_request",
                            "the slot in the subject is not the actor's",
                        )
                        .await;
                }
                Err(e) => return self.refuse(reply, "bad_request", &e.to_string()).await,
            },
            _ => {
                return self
                    .refuse(
                        reply,
                        "bad_request",
                        "subject is not <c>.actor.<slot>.<kind>.<id>",
                    )
                    .await;
            }
        };
        if msg.payload.len() > self.inner.cfg.max_message_bytes {
            let m = format!(
                "{} bytes; the limit is {}",
                msg.payload.len(),
                self.inner.cfg.max_message_bytes
            );
            return self.refuse(reply, "too_large", &m).await;
        }
        let Some(behavior) = self.inner.behaviors.get(key.kind()).cloned() else {
            return self
                .refuse(
                    reply,
                    "unknown_type",
                    &format!("no actor kind {:?} here", key.kind()),
                )
                .await;
        };
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(REQUEST_ID_HEADER))
            .map(|v| v.as_str().to_string())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 64
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            .unwrap_or_else(event_id);
        let request = Request {
            id,
            payload: msg.payload,
            reply,
        };
        let sender = match self.sender_for(&key, behavior) {
            Some(s) => s,
            None => {
                return self
                    .refuse(request.reply, "overloaded", "too many active actors")
                    .await;
            }
        };
        if let Err(e) = sender.try_send(request) {
            let (reply, why) = match e {
                mpsc::error::TrySendError::Full(r) => (r.reply, "the actor's mailbox is full"),
                mpsc::error::TrySendError::Closed(r) => (r.reply, "the actor is moving; retry"),
            };
            self.refuse(reply, "overloaded", why).await;
        }
    }

    /// The mailbox of an actor, activating it if needed (None: too many active).
    fn sender_for(
        &self,
        key: &ActorKey,
        behavior: Arc<dyn Behavior>,
    ) -> Option<mpsc::Sender<Request>> {
        let mut active = self.inner.active.lock().ok()?;
        if let Some(s) = active.get(key)
            && !s.is_closed()
        {
            return Some(s.clone());
        }
        if active.len() >= self.inner.cfg.max_active {
            return None;
        }
        let (tx, rx) = mpsc::channel(self.inner.cfg.queue_len);
        active.insert(key.clone(), tx.clone());
        Metrics::inc(&self.inner.metrics.actor_activations_total);
        tokio::spawn(
            self.clone()
                .run_actor(key.clone(), behavior, rx, tx.clone()),
        );
        Some(tx)
    }

    /// Rebuilds an actor's state: snapshot, then the events after it.
    pub async fn load(
        store: &S,
        behavior: &dyn Behavior,
        key: &ActorKey,
    ) -> Result<(Value, u64, u64), String> {
        Self::load_full(store, behavior, key)
            .await
            .map(|l| (l.state, l.version, l.sequence))
    }

    async fn load_full(
        store: &S,
        behavior: &dyn Behavior,
        key: &ActorKey,
    ) -> Result<Loaded, String> {
        let mut last_id = None;
        let (mut state, mut version, mut sequence) = match store.load_snapshot(key).await {
            Ok(Some(s)) if s.v == ENVELOPE_VERSION => (s.state, s.version, s.sequence),
            Ok(_) => (behavior.initial(), 0, 0),
            Err(e) => return Err(e.to_string()),
        };
        let mut events = store
            .read(key, version + 1, sequence)
            .await
            .map_err(|e| e.to_string())?;
        while let Some(e) = events.next().await {
            let e = e.map_err(|e| e.to_string())?;
            if e.version != version + 1 {
                return Err(format!(
                    "gap in the history of {key}: version {} after {version}",
                    e.version
                ));
            }
            state = behavior.apply(state, &e).map_err(|e| e.to_string())?;
            version = e.version;
            sequence = e.sequence;
            last_id = Some(e.id);
        }
        Ok(Loaded {
            state,
            version,
            sequence,
            last_id,
        })
    }

    async fn run_actor(
        self,
        key: ActorKey,
        behavior: Arc<dyn Behavior>,
        mut rx: mpsc::Receiver<Request>,
        me: mpsc::Sender<Request>,
    ) {
        let store = self.inner.store.clone();
        let started = std::time::Instant::now();
        let loaded = Self::load(&store, behavior.as_ref(), &key).await;
        debug!(actor = %key, ms = started.elapsed().as_millis() as u64, ok = loaded.is_ok(), "activated");
        let (mut state, mut version, mut sequence) = match loaded {
            Ok(v) => v,
            Err(e) => {
                warn!(actor = %key, error = %e, "activation failed");
                self.deactivate(&key, &me);
                rx.close();
                // An event of a schema this node does not know is not a transient failure.
                let kind = if e.contains("schema") {
                    "unknown_schema"
                } else {
                    "unavailable"
                };
                while let Some(r) = rx.recv().await {
                    self.refuse(r.reply, kind, &format!("cannot load {key}: {e}"))
                        .await;
                }
                return;
            }
        };
        let mut since_snapshot = 0u64;
        // Answers to the latest requests, by request id: a retried request gets its first
        // answer again instead of being applied twice.
        let mut recent: std::collections::VecDeque<(String, Value)> =
            std::collections::VecDeque::new();
        let idle = Duration::from_millis(self.inner.cfg.idle_ms);
        loop {
            let request = match tokio::time::timeout(idle, rx.recv()).await {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(_) => {
                    // Idle: leave the map first, then finish what was queued.
                    self.deactivate(&key, &me);
                    rx.close();
                    continue;
                }
            };
            if let Some((_, body)) = recent.iter().find(|(id, _)| *id == request.id) {
                let body = body.clone();
                self.reply(request.reply, body).await;
                continue;
            }
            let mut attempt = 0;
            let body = loop {
                attempt += 1;
                let decided = match behavior.decide(&state, &request.payload) {
                    Err(e) => break error_body(&e),
                    Ok(Err(rejection)) => {
                        break json!({"error": {"kind": "rejected", "message": rejection.to_string(), "rejection": rejection}});
                    }
                    Ok(Ok(d)) => d,
                };
                if decided.is_empty() {
                    break json!({"ok": behavior.view(&state), "version": version});
                }
                let events: Vec<NewEvent> = decided
                    .iter()
                    .enumerate()
                    .map(|(i, d)| NewEvent {
                        id: format!("{}-{i}", request.id),
                        kind: d.kind.clone(),
                        schema: d.schema,
                        data: d.data.clone(),
                    })
                    .collect();
                match store.append(&key, version, &events).await {
                    Ok(v) => {
                        // Apply what was appended, as it will be replayed.
                        let mut ok = true;
                        for (i, d) in decided.iter().enumerate() {
                            let stored = actors::es::StoredEvent {
                                v: ENVELOPE_VERSION,
                                id: events[i].id.clone(),
                                actor: key.to_string(),
                                version: version + 1 + i as u64,
                                kind: d.kind.clone(),
                                schema: d.schema,
                                timestamp_ms: 0,
                                data: d.data.clone(),
                                sequence: 0,
                            };
                            match behavior.apply(state.clone(), &stored) {
                                Ok(s) => state = s,
                                Err(e) => {
                                    ok = false;
                                    warn!(actor = %key, error = %e, "applying an own event failed");
                                }
                            }
                        }
                        version = v;
                        since_snapshot += decided.len() as u64;
                        Metrics::inc(&self.inner.metrics.actor_events_appended_total);
                        if !ok {
                            break error_reply("corrupt", "an appended event could not be applied");
                        }
                        break json!({"ok": behavior.view(&state), "version": version});
                    }
                    Err(StoreError::Conflict { current }) if attempt == 1 => {
                        // Another writer (an old owner during a move): catch up and decide again.
                        Metrics::inc(&self.inner.metrics.actor_conflicts_total);
                        match Self::load_full(&store, behavior.as_ref(), &key).await {
                            Ok(l) => {
                                (state, version, sequence) = (l.state, l.version, l.sequence);
                                // The same request already applied (another owner during a
                                // handover, or a retry): answer, don't apply it twice.
                                let mine = format!("{}-", request.id);
                                if l.last_id.is_some_and(|id| id.starts_with(&mine)) {
                                    break json!({"ok": behavior.view(&state), "version": version});
                                }
                            }
                            Err(e) => break error_reply("unavailable", &e),
                        }
                        debug!(actor = %key, current, "conflict; reloaded");
                    }
                    Err(StoreError::Conflict { current }) => {
                        break json!({"error": {"kind": "conflict", "message": format!("the actor moved on to version {current}"), "current": current}});
                    }
                    Err(StoreError::TooLarge(m)) => break error_reply("too_large", &m),
                    Err(StoreError::InvalidKey(m)) => break error_reply("bad_request", &m),
                    Err(e) => break error_reply("unavailable", &e.to_string()),
                }
            };
            if body.get("error").is_some() {
                Metrics::inc(&self.inner.metrics.actor_errors_total);
            }
            if recent.len() >= RECENT_REQUESTS {
                recent.pop_front();
            }
            recent.push_back((request.id.clone(), body.clone()));
            self.reply(request.reply, body).await;
            if since_snapshot >= self.inner.cfg.snapshot_every {
                // The snapshot needs the sequence of its version's event: read it from the last
                // sequence known (a few events back).
                if let Some(seq) = sequence_of(store.as_ref(), &key, version, sequence).await {
                    sequence = seq;
                    let snap = Snapshot {
                        v: ENVELOPE_VERSION,
                        version,
                        sequence,
                        state: state.clone(),
                    };
                    match store.save_snapshot(&key, &snap).await {
                        Ok(()) => since_snapshot = 0,
                        Err(e) => warn!(actor = %key, error = %e, "snapshot failed"),
                    }
                }
            }
        }
        Metrics::inc(&self.inner.metrics.actor_passivations_total);
        debug!(actor = %key, version, "passivated");
    }

    fn deactivate(&self, key: &ActorKey, me: &mpsc::Sender<Request>) {
        if let Ok(mut active) = self.inner.active.lock()
            && active.get(key).is_some_and(|s| s.same_channel(me))
        {
            active.remove(key);
        }
    }
}

/// The stream sequence of an actor's event at `version`, reading after a known sequence.
async fn sequence_of<S: EventStore>(
    store: &S,
    key: &ActorKey,
    version: u64,
    after: u64,
) -> Option<u64> {
    let mut events = store.read(key, version, after).await.ok()?;
    let mut seq = None;
    while let Some(Ok(e)) = events.next().await {
        if e.version == version {
            seq = Some(e.sequence);
        }
    }
    seq
}

fn error_body(e: &BehaviorError) -> Value {
    match e {
        BehaviorError::BadCommand(m) => error_reply("bad_request", m),
        other => error_reply("corrupt", &other.to_string()),
    }
}

/// A unique event id: time, process and a counter.
pub fn event_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}-{n:x}", t, std::process::id())
}
