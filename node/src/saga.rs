//! The model deploy saga and the node's memory reservations.
//!
//! **Reservations.** Each node answers `<c>.node.<id>.reserve` (`{"model", "bytes"}`) and
//! `<c>.node.<id>.release` (`{"model"}`) from a budget of device memory; both are idempotent per
//! model. Replies: `{"ok": true}` or `{"error": {"kind", "message"}}`. `<c>.node.<id>.reservations`
//! answers `{"ok": {"<model>": <bytes>, …}}`.
//!
//! **The driver.** Every node runs a driver that, every `interval`, looks at the models whose
//! actor it hosts and moves each pending saga one step, by commands to the model actor (so every
//! step is an event): plan → reserve on each owner → load → serve; on a failure or a timeout it
//! records `Failed` and then releases every reservation made. A driver that crashes loses
//! nothing: the next one (on this node after a restart, or on the model's new owner) reads the
//! state and resumes or compensates.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::es::ActorKey;
use actors::model::{ModelState, ModelStatus, SagaStep};
use bytes::Bytes;
use cluster::SLOT_COUNT;
use futures::StreamExt;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::client::{ActorClient, AskError};

/// Timeout of one saga request (a reservation, a release).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// The reservation subject of a node.
pub fn reserve_subject(cluster: &str, node: &str) -> String {
    format!("{cluster}.node.{node}.reserve")
}

/// A node's echo subject: answers with the request's payload (a raw round-trip baseline).
pub fn ping_subject(cluster: &str, node: &str) -> String {
    format!("{cluster}.node.{node}.ping")
}

/// The subject that lists a node's reservations.
pub fn reservations_subject(cluster: &str, node: &str) -> String {
    format!("{cluster}.node.{node}.reservations")
}

/// The release subject of a node.
pub fn release_subject(cluster: &str, node: &str) -> String {
    format!("{cluster}.node.{node}.release")
}

/// A node's memory reservations.
#[derive(Debug)]
pub struct Reservations {
    budget_bytes: u64,
    held: Mutex<BTreeMap<String, u64>>,
}

impl Reservations {
    /// A budget.
    pub fn new(budget_bytes: u64) -> Self {
        Reservations {
            budget_bytes,
            held: Mutex::new(BTreeMap::new()),
        }
    }

    /// Reserves `bytes` for `model` (idempotent: the same model again is fine).
    pub fn reserve(&self, model: &str, bytes: u64) -> Result<(), String> {
        let mut held = self.held.lock().map_err(|_| "poisoned".to_string())?;
        if held.contains_key(model) {
            return Ok(());
        }
        let used: u64 = held.values().sum();
        if used.saturating_add(bytes) > self.budget_bytes {
            return Err(format!(
                "fits no device: {bytes} bytes requested, {} of the {} bytes for tables free \
                 (half of the largest device's memory, less other models' reservations)",
                self.budget_bytes.saturating_sub(used),
                self.budget_bytes
            ));
        }
        held.insert(model.to_string(), bytes);
        Ok(())
    }

    /// Releases a model's reservation (idempotent).
    pub fn release(&self, model: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(model);
        }
    }

    /// What is held, per model.
    pub fn held(&self) -> BTreeMap<String, u64> {
        self.held.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

/// Serves this node's reservation subjects until the task is dropped.
pub async fn serve_reservations(
    client: async_nats::Client,
    cluster: &str,
    node: &str,
    reservations: Arc<Reservations>,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let mut reserve = client.subscribe(reserve_subject(cluster, node)).await?;
    let mut list = client
        .subscribe(reservations_subject(cluster, node))
        .await?;
    let mut release = client.subscribe(release_subject(cluster, node)).await?;
    let mut ping = client.subscribe(ping_subject(cluster, node)).await?;
    Ok(tokio::spawn(async move {
        loop {
            let (msg, is_reserve) = tokio::select! {
                Some(m) = reserve.next() => (m, true),
                Some(m) = release.next() => (m, false),
                Some(m) = ping.next() => {
                    if let Some(reply) = m.reply {
                        let _ = client.publish(reply, m.payload).await;
                    }
                    continue;
                }
                Some(m) = list.next() => {
                    if let Some(reply) = m.reply {
                        let body = json!({"ok": reservations.held()});
                        let _ = client.publish(reply, Bytes::from(body.to_string())).await;
                    }
                    continue;
                }
                else => break,
            };
            let body: Result<Value, _> = serde_json::from_slice(&msg.payload);
            let model = body
                .as_ref()
                .ok()
                .and_then(|v| v.get("model"))
                .and_then(Value::as_str)
                .map(String::from);
            let answer = match (model, is_reserve) {
                (None, _) => {
                    json!({"error": {"kind": "bad_request", "message": "expected {\"model\": …}"}})
                }
                (Some(m), true) => {
                    let bytes = body
                        .as_ref()
                        .ok()
                        .and_then(|v| v.get("bytes"))
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    match reservations.reserve(&m, bytes) {
                        Ok(()) => json!({"ok": true}),
                        Err(e) => json!({"error": {"kind": "no_memory", "message": e}}),
                    }
                }
                (Some(m), false) => {
                    reservations.release(&m);
                    json!({"ok": true})
                }
            };
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, Bytes::from(answer.to_string())).await;
            }
        }
    }))
}

/// The names of every model ever created (the subjects of `<c>-events` under `model`).
pub async fn model_names(
    js: &async_nats::jetstream::Context,
    cluster: &str,
) -> Result<Vec<String>, String> {
    let stream = js
        .get_stream(format!("{cluster}-events"))
        .await
        .map_err(|e| e.to_string())?;
    let prefix = format!("{cluster}.events.model.");
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}*"))
        .await
        .map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    while let Some(item) = subjects.next().await {
        let (subject, _) = item.map_err(|e| e.to_string())?;
        if let Some(name) = subject.strip_prefix(&prefix) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Drives the sagas of the models this node hosts.
pub struct SagaDriver {
    /// Asks the model actors.
    pub actors: ActorClient,
    /// Observes the cluster.
    pub js: async_nats::jetstream::Context,
    /// Requests to nodes.
    pub client: async_nats::Client,
    /// The cluster.
    pub cluster: String,
    /// Whether this node hosts a slot now.
    pub hosts: Arc<dyn Fn(cluster::Slot) -> bool + Send + Sync>,
}

async fn request(client: &async_nats::Client, subject: String, body: Value) -> Result<(), String> {
    let req = async_nats::Request::new()
        .payload(Bytes::from(body.to_string()))
        .timeout(Some(STEP_TIMEOUT));
    match client.send_request(subject, req).await {
        Ok(m) => {
            let v: Value = serde_json::from_slice(&m.payload).map_err(|e| e.to_string())?;
            if v.get("ok").is_some() {
                Ok(())
            } else {
                Err(v["error"]["message"]
                    .as_str()
                    .unwrap_or("refused")
                    .to_string())
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

impl SagaDriver {
    async fn ask(&self, key: &ActorKey, cmd: Value) -> Result<ModelState, AskError> {
        let (v, _) = self.actors.ask(key, &cmd, STEP_TIMEOUT).await?;
        serde_json::from_value(v).map_err(|e| AskError::MalformedReply(e.to_string()))
    }

    /// One pass: moves every pending saga of a hosted model one step.
    pub async fn tick(&self) {
        let names = match model_names(&self.js, &self.cluster).await {
            Ok(n) => n,
            Err(_) => return, // no events stream yet: no model
        };
        for name in names {
            let Ok(key) = ActorKey::new("model", &name) else {
                continue;
            };
            if !(self.hosts)(key.slot()) {
                continue;
            }
            match self.ask(&key, json!({"cmd": "describe"})).await {
                Ok(state) if state.saga_pending() => {
                    if let Err(e) = self.step(&key, &state).await {
                        warn!(model = %name, error = %e, "saga step failed");
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(model = %name, error = %e, "cannot read model"),
            }
        }
    }

    async fn fail(&self, key: &ActorKey, reason: String) -> Result<(), AskError> {
        warn!(model = key.id(), %reason, "deploy saga failed; compensating");
        self.ask(key, json!({"cmd": "fail", "reason": reason}))
            .await
            .map(|_| ())
    }

    async fn step(&self, key: &ActorKey, s: &ModelState) -> Result<(), AskError> {
        let name = key.id();
        match s.state {
            ModelStatus::Created => {
                let status = crate::status::read(&self.js, &self.cluster)
                    .await
                    .map_err(|e| AskError::Remote("unavailable".into(), e.to_string()))?;
                let counts = status.counts();
                if counts.is_empty() {
                    return self.fail(key, "no node owns any slot".into()).await;
                }
                // Rows are spread over the 1024 slots; each owner reserves its slots' share.
                let total = s.table_bytes();
                let plan: BTreeMap<String, u64> = counts
                    .iter()
                    .map(|(node, slots)| {
                        (
                            node.clone(),
                            (total * *slots as u64).div_ceil(SLOT_COUNT as u64),
                        )
                    })
                    .collect();
                info!(model = name, nodes = plan.len(), bytes = total, "placing");
                self.ask(key, json!({"cmd": "begin_placing", "plan": plan}))
                    .await
                    .map(|_| ())
            }
            ModelStatus::Placing => {
                for (node, bytes) in &s.plan {
                    if s.reserved.contains_key(node) {
                        continue;
                    }
                    if s.inject_failure == Some(SagaStep::Reserve) && !s.reserved.is_empty() {
                        return self.fail(key, "injected failure at reserve".into()).await;
                    }
                    let body = json!({"model": name, "bytes": bytes});
                    match request(&self.client, reserve_subject(&self.cluster, node), body).await {
                        Ok(()) => {
                            self.ask(
                                key,
                                json!({"cmd": "reserved", "node": node, "bytes": bytes}),
                            )
                            .await?;
                        }
                        Err(e) => return self.fail(key, format!("reserve on {node}: {e}")).await,
                    }
                }
                if s.inject_failure == Some(SagaStep::Reserve) {
                    return self.fail(key, "injected failure at reserve".into()).await;
                }
                self.ask(key, json!({"cmd": "begin_loading"}))
                    .await
                    .map(|_| ())
            }
            ModelStatus::Loading => {
                // No checkpoint store yet: a new model starts from zeros (checkpoint 0).
                if s.inject_failure == Some(SagaStep::Load) {
                    return self.fail(key, "injected failure at load".into()).await;
                }
                if s.inject_failure == Some(SagaStep::Start) {
                    return self.fail(key, "injected failure at start".into()).await;
                }
                info!(model = name, "serving");
                self.ask(key, json!({"cmd": "serve", "checkpoint": 0}))
                    .await
                    .map(|_| ())
            }
            ModelStatus::Failed | ModelStatus::Retired => {
                for node in s.reserved.keys() {
                    match request(
                        &self.client,
                        release_subject(&self.cluster, node),
                        json!({"model": name}),
                    )
                    .await
                    {
                        Ok(()) => {}
                        // A node that is gone holds nothing any more.
                        Err(e) if e.contains("no responders") => {}
                        Err(e) => {
                            warn!(model = name, %node, error = %e, "release failed; will retry");
                            continue;
                        }
                    }
                    self.ask(key, json!({"cmd": "released", "node": node}))
                        .await?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Runs `tick` every `interval` until the task is dropped.
    pub fn spawn(self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                self.tick().await;
            }
        })
    }
}
