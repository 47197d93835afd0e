//! Virtual actors as pure code: an [`Aggregate`] decides and applies; the runtime enacts.
//!
//! User code implements [`Aggregate`] — `decide(&State, Command) -> Result<Vec<Event>,
//! Rejection>` and `apply(State, &Event) -> State` — with serde types. [`Typed`] erases the types
//! to JSON so that the runtime can host many kinds behind one [`Behavior`] interface.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::es::StoredEvent;

/// A refusal by an actor's `decide`: a stable code and a human message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// Stable, machine-readable.
    pub code: String,
    /// For people.
    pub message: String,
}

impl Rejection {
    /// Builds a rejection.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Rejection {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// Why an event could not be applied or a command not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BehaviorError {
    /// The command is not valid JSON for this kind.
    #[error("bad command: {0}")]
    BadCommand(String),
    /// An event of a schema version this node does not know.
    #[error("event {event} has schema {schema}; this node knows up to {known}")]
    UnknownSchema {
        /// The event type.
        event: String,
        /// Its schema.
        schema: u32,
        /// The highest this node knows.
        known: u32,
    },
    /// A stored event that does not decode.
    #[error("corrupt event: {0}")]
    CorruptEvent(String),
    /// A state that does not decode (a corrupt snapshot).
    #[error("corrupt state: {0}")]
    CorruptState(String),
}

/// A decided event: its type name and data.
#[derive(Clone, Debug, PartialEq)]
pub struct Decided {
    /// Type name.
    pub kind: String,
    /// Schema version.
    pub schema: u32,
    /// Data (the serialized event).
    pub data: Value,
}

/// The JSON face of an actor kind, as the runtime sees it.
pub trait Behavior: Send + Sync + 'static {
    /// The kind (actor type name).
    fn kind(&self) -> &'static str;
    /// The state of an actor with no events.
    fn initial(&self) -> Value;
    /// Decides a command against a state.
    fn decide(
        &self,
        state: &Value,
        command: &[u8],
    ) -> Result<Result<Vec<Decided>, Rejection>, BehaviorError>;
    /// Applies a stored event.
    fn apply(&self, state: Value, event: &StoredEvent) -> Result<Value, BehaviorError>;
    /// What an `ask` answers after a command was handled.
    fn view(&self, state: &Value) -> Value {
        state.clone()
    }
}

/// A pure event-sourced actor.
pub trait Aggregate: Send + Sync + 'static {
    /// The kind (actor type), one NATS token.
    const KIND: &'static str;
    /// The schema version of the events this code writes (and the highest it reads).
    const SCHEMA: u32 = 1;
    /// State.
    type State: Default + Serialize + DeserializeOwned + Send;
    /// Commands.
    type Command: DeserializeOwned;
    /// Events: serialize as an object with a `"type"` tag (`#[serde(tag = "type")]`).
    type Event: Serialize + DeserializeOwned;
    /// Decides.
    fn decide(state: &Self::State, command: Self::Command) -> Result<Vec<Self::Event>, Rejection>;
    /// Applies.
    fn apply(state: Self::State, event: &Self::Event) -> Self::State;
}

/// Erases an [`Aggregate`]'s types to JSON.
pub struct Typed<A>(PhantomData<fn() -> A>);

impl<A> Default for Typed<A> {
    fn default() -> Self {
        Typed(PhantomData)
    }
}

impl<A: Aggregate> Typed<A> {
    fn state(v: &Value) -> Result<A::State, BehaviorError> {
        serde_json::from_value(v.clone()).map_err(|e| BehaviorError::CorruptState(e.to_string()))
    }
}

impl<A: Aggregate> Behavior for Typed<A> {
    fn kind(&self) -> &'static str {
        A::KIND
    }

    fn initial(&self) -> Value {
        serde_json::to_value(A::State::default()).unwrap_or(Value::Null)
    }

    fn decide(
        &self,
        state: &Value,
        command: &[u8],
    ) -> Result<Result<Vec<Decided>, Rejection>, BehaviorError> {
        let cmd: A::Command = serde_json::from_slice(command)
            .map_err(|e| BehaviorError::BadCommand(e.to_string()))?;
        let st = Self::state(state)?;
        Ok(A::decide(&st, cmd).map(|events| {
            events
                .into_iter()
                .map(|e| {
                    let data = serde_json::to_value(&e).unwrap_or(Value::Null);
                    let kind = data
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("Event")
                        .to_string();
                    Decided {
                        kind,
                        schema: A::SCHEMA,
                        data,
                    }
                })
                .collect()
        }))
    }

    fn apply(&self, state: Value, event: &StoredEvent) -> Result<Value, BehaviorError> {
        if event.schema > A::SCHEMA {
            return Err(BehaviorError::UnknownSchema {
                event: event.kind.clone(),
                schema: event.schema,
                known: A::SCHEMA,
            });
        }
        let ev: A::Event = serde_json::from_value(event.data.clone())
            .map_err(|e| BehaviorError::CorruptEvent(e.to_string()))?;
        let st = A::apply(Self::state(&state)?, &ev);
        serde_json::to_value(st).map_err(|e| BehaviorError::CorruptState(e.to_string()))
    }
}

/// A counter: the smallest useful actor, for tests, examples and benchmarks.
pub struct Counter;

/// The counter's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CounterState {
    /// The total.
    pub total: i64,
    /// Commands handled.
    pub adds: u64,
}

/// The counter's commands.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum CounterCommand {
    /// Add `n` (|n| ≤ 10⁹).
    Add {
        /// The amount.
        n: i64,
    },
    /// Read the state.
    Get,
}

/// The counter's events.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(tag = "type")]
pub enum CounterEvent {
    /// `n` was added.
    Added {
        /// The amount.
        n: i64,
    },
}

impl Aggregate for Counter {
    const KIND: &'static str = "counter";
    type State = CounterState;
    type Command = CounterCommand;
    type Event = CounterEvent;

    fn decide(_: &CounterState, cmd: CounterCommand) -> Result<Vec<CounterEvent>, Rejection> {
        match cmd {
            CounterCommand::Add { n } if n.unsigned_abs() > 1_000_000_000 => Err(Rejection::new(
                "out_of_range",
                format!("{n} is beyond ±10^9"),
            )),
            CounterCommand::Add { n } => Ok(vec![CounterEvent::Added { n }]),
            CounterCommand::Get => Ok(vec![]),
        }
    }

    fn apply(mut s: CounterState, e: &CounterEvent) -> CounterState {
        match e {
            CounterEvent::Added { n } => {
                s.total = s.total.saturating_add(*n);
                s.adds += 1;
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::es::ENVELOPE_VERSION;

    fn stored(d: &Decided, version: u64) -> StoredEvent {
        StoredEvent {
            v: ENVELOPE_VERSION,
            id: format!("e{version}"),
            actor: "counter/a".into(),
            version,
            kind: d.kind.clone(),
            schema: d.schema,
            timestamp_ms: 0,
            data: d.data.clone(),
            sequence: 0,
        }
    }

    #[test]
    fn typed_counter_round_trip() {
        let b = Typed::<Counter>::default();
        let s0 = b.initial();
        let decided = b.decide(&s0, br#"{"cmd":"add","n":5}"#).unwrap().unwrap();
        assert_eq!(decided[0].kind, "Added");
        let s1 = b.apply(s0, &stored(&decided[0], 1)).unwrap();
        assert_eq!(s1["total"], 5);
        assert!(matches!(
            b.decide(&s1, b"not json"),
            Err(BehaviorError::BadCommand(_))
        ));
        assert!(matches!(
            b.decide(&s1, br#"{"cmd":"add","n":5,"x":1}"#),
            Err(BehaviorError::BadCommand(_))
        ));
        let refused = b.decide(&s1, br#"{"cmd":"add","n":99999999999}"#).unwrap();
        assert_eq!(refused.unwrap_err().code, "out_of_range");
        let mut future = stored(&decided[0], 2);
        future.schema = 9;
        assert!(matches!(
            b.apply(s1, &future),
            Err(BehaviorError::UnknownSchema { .. })
        ));
    }
}
