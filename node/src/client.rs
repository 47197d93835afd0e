//! Talking to virtual actors from anywhere: `ask` (request/reply) and `tell` (one way), routed
//! on `<c>.actor.<slot>.<kind>.<id>` to the slot's owner. While a slot has no owner (moving, or
//! its node just died), `ask` retries with backoff until the owner answers, within its timeout.

use std::time::{Duration, Instant};

use actors::es::ActorKey;
use bytes::Bytes;
use serde_json::Value;

use crate::vactors::actor_subject;

/// Why an ask failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AskError {
    /// No answer within the timeout (an owner existed but did not reply).
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Nobody owned the actor's slot for the whole timeout.
    #[error("no node owns the actor's slot")]
    NoOwner,
    /// The actor refused the command.
    #[error("rejected: {0}")]
    Rejected(Value),
    /// A version conflict persisted.
    #[error("conflict: the actor is at version {0}")]
    Conflict(u64),
    /// The command or the address was malformed, or the kind is unknown.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Any other error the owner reported (kind, message).
    #[error("{0}: {1}")]
    Remote(String, String),
    /// The reply was not understood.
    #[error("malformed reply: {0}")]
    MalformedReply(String),
}

/// A handle for asking actors.
#[derive(Clone)]
pub struct ActorClient {
    client: async_nats::Client,
    cluster: String,
}

const RETRY_MIN: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_millis(250);
/// Longest wait for one attempt's answer before it is sent again (same request id).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Error kinds after which an ask is retried (the actor was moving or busy).
const RETRYABLE: [&str; 2] = ["overloaded", "unavailable"];

impl ActorClient {
    /// A client for `cluster`.
    pub fn new(client: async_nats::Client, cluster: &str) -> Self {
        ActorClient {
            client,
            cluster: cluster.into(),
        }
    }

    /// Sends a command and waits for the answer: the actor's view after it, and its version.
    pub async fn ask(
        &self,
        actor: &ActorKey,
        command: &Value,
        timeout: Duration,
    ) -> Result<(Value, u64), AskError> {
        let payload = Bytes::from(
            serde_json::to_vec(command).map_err(|e| AskError::BadRequest(e.to_string()))?,
        );
        self.ask_raw(actor, payload, timeout).await
    }

    /// Like [`ask`](Self::ask) with raw bytes (for tools and tests of bad input).
    pub async fn ask_raw(
        &self,
        actor: &ActorKey,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(Value, u64), AskError> {
        let subject = actor_subject(&self.cluster, actor);
        let started = Instant::now();
        let mut delay = RETRY_MIN;
        let mut owner_seen = false;
        // One id for every retry of this ask: the actor applies it once.
        let request_id = crate::vactors::event_id();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(if owner_seen {
                    AskError::Timeout(timeout)
                } else {
                    AskError::NoOwner
                });
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(crate::vactors::REQUEST_ID_HEADER, request_id.as_str());
            let request = async_nats::Request::new()
                .payload(payload.clone())
                .headers(headers)
                .timeout(Some(left.min(ATTEMPT_TIMEOUT)));
            match self.client.send_request(subject.clone(), request).await {
                Ok(msg) => {
                    owner_seen = true;
                    let v: Value = serde_json::from_slice(&msg.payload)
                        .map_err(|e| AskError::MalformedReply(e.to_string()))?;
                    if let Some(ok) = v.get("ok") {
                        let version = v.get("version").and_then(Value::as_u64).unwrap_or(0);
                        return Ok((ok.clone(), version));
                    }
                    let err = v.get("error").cloned().unwrap_or(Value::Null);
                    let kind = err
                        .get("kind")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string();
                    let message = err
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    match kind.as_str() {
                        "rejected" => {
                            return Err(AskError::Rejected(
                                err.get("rejection").cloned().unwrap_or(Value::Null),
                            ));
                        }
                        "conflict" => {
                            return Err(AskError::Conflict(
                                err.get("current").and_then(Value::as_u64).unwrap_or(0),
                            ));
                        }
                        "bad_request" | "unknown_type" | "too_large" => {
                            return Err(AskError::BadRequest(format!("{kind}: {message}")));
                        }
                        k if RETRYABLE.contains(&k) => {}
                        _ => return Err(AskError::Remote(kind, message)),
                    }
                }
                Err(e) => match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {}
                    // This attempt went unanswered (a request lost in a handover): try again
                    // with the same id while time remains.
                    async_nats::RequestErrorKind::TimedOut => {}
                    async_nats::RequestErrorKind::InvalidSubject
                    | async_nats::RequestErrorKind::MaxPayloadExceeded => {
                        return Err(AskError::BadRequest(e.to_string()));
                    }
                    _ => {}
                },
            }
            let left = timeout.saturating_sub(started.elapsed());
            tokio::time::sleep(delay.min(left)).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// Sends a command without waiting for an answer (delivered at most once, to the owner at
    /// the time).
    pub async fn tell(&self, actor: &ActorKey, command: &Value) -> Result<(), AskError> {
        let payload = Bytes::from(
            serde_json::to_vec(command).map_err(|e| AskError::BadRequest(e.to_string()))?,
        );
        self.client
            .publish(actor_subject(&self.cluster, actor), payload)
            .await
            .map_err(|e| AskError::Remote("unavailable".into(), e.to_string()))
    }
}
