//! The model registry: each model is an event-sourced actor of kind `model` (id = its name) with
//! a lifecycle, and deploying it is a saga whose every step is an event.
//!
//! ```text
//! Created ─► Placing ─► Loading ─► Serving ─► Retired
//!    │          │          │
//!    └──────────┴──────────┴──► Failed (reservations released by compensation) ─► Retired
//! ```
//! The saga (driven by the node that owns the model actor; see `node::saga`): plan the
//! reservations from the shard map (`Placing`), reserve device memory on each owner
//! (`Reserved`), load the latest checkpoint (`Loading` → `Loaded`), start consuming deltas
//! (`ConsumersStarted`), then `Serving`. A step that fails or times out records `Failed` with the
//! reason; compensation then releases every reservation made (`Released`). Because each step is
//! an event, a driver that crashes resumes (or compensates) from the recorded state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::behavior::{Aggregate, Rejection};

/// Largest row count.
pub const MAX_ROWS: u64 = 1 << 32;
/// Largest dimension.
pub const MAX_DIM: u32 = 65_536;

/// Where a model is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelStatus {
    /// Never created.
    #[default]
    Absent,
    /// Registered; the deploy saga has not placed it yet.
    Created,
    /// Reserving memory on the owners of its slots.
    Placing,
    /// Loading the latest checkpoint, then starting the delta consumers.
    Loading,
    /// Applying deltas and answering reads.
    Serving,
    /// Retired by an operator.
    Retired,
    /// The deploy saga failed (see `reason`).
    Failed,
}

/// A saga step where a failure can be injected (tests of compensation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStep {
    /// Reserving memory.
    Reserve,
    /// Loading the checkpoint.
    Load,
    /// Starting the consumers.
    Start,
}

/// A model's state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    /// Its lifecycle status.
    pub state: ModelStatus,
    /// Rows of its table.
    pub rows: u64,
    /// Columns.
    pub dim: u32,
    /// Element type.
    pub dtype: String,
    /// Planned reservation per node, bytes.
    pub plan: BTreeMap<String, u64>,
    /// Reservations made and not yet released, bytes per node.
    pub reserved: BTreeMap<String, u64>,
    /// Why it failed.
    pub reason: Option<String>,
    /// A failure to inject at a step (tests).
    pub inject_failure: Option<SagaStep>,
    /// Whether the delta consumers were started.
    pub consumers: bool,
    /// Deltas are multiplied by this before they are applied (1 when absent).
    #[serde(default)]
    pub scale: Option<f32>,
    /// Then clipped to ±this (no clipping when absent).
    #[serde(default)]
    pub clip: Option<f32>,
}

impl ModelState {
    /// Bytes of one element.
    pub fn dtype_bytes(dtype: &str) -> Option<u64> {
        match dtype {
            "f32" => Some(4),
            "f16" | "bf16" => Some(2),
            _ => None,
        }
    }

    /// Bytes of the whole table.
    pub fn table_bytes(&self) -> u64 {
        self.rows
            .saturating_mul(u64::from(self.dim))
            .saturating_mul(Self::dtype_bytes(&self.dtype).unwrap_or(4))
    }

    /// Whether the saga still has work (forward or compensation).
    pub fn saga_pending(&self) -> bool {
        matches!(
            self.state,
            ModelStatus::Created | ModelStatus::Placing | ModelStatus::Loading
        ) || (matches!(self.state, ModelStatus::Failed | ModelStatus::Retired)
            && !self.reserved.is_empty())
    }
}

/// Commands to a model actor.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelCommand {
    /// Register a model and start its deploy saga.
    Create {
        /// Rows.
        rows: u64,
        /// Columns.
        dim: u32,
        /// `f32` (default), `f16` or `bf16`.
        #[serde(default = "default_dtype")]
        dtype: String,
        /// Fail the saga at this step (tests of compensation).
        #[serde(default)]
        inject_failure: Option<SagaStep>,
        /// Multiply every delta value by this.
        #[serde(default)]
        scale: Option<f32>,
        /// Clip every (scaled) delta value to ±this.
        #[serde(default)]
        clip: Option<f32>,
    },
    /// Read the state.
    Describe,
    /// Retire the model (its reservations are released).
    Retire,
    /// Saga: the reservation plan.
    BeginPlacing {
        /// Bytes per node.
        plan: BTreeMap<String, u64>,
    },
    /// Saga: a node reserved its part.
    Reserved {
        /// The node.
        node: String,
        /// Bytes.
        bytes: u64,
    },
    /// Saga: every reservation made; load.
    BeginLoading,
    /// Saga: loaded and consumers started; serve.
    Serve {
        /// The checkpoint loaded (none yet: 0).
        checkpoint: u64,
    },
    /// Saga: a step failed.
    Fail {
        /// Why.
        reason: String,
    },
    /// Saga compensation: a reservation was released.
    Released {
        /// The node.
        node: String,
    },
}

fn default_dtype() -> String {
    "f32".into()
}

/// Events of a model actor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ModelEvent {
    /// Registered.
    Created {
        /// Rows.
        rows: u64,
        /// Columns.
        dim: u32,
        /// Element type.
        dtype: String,
        /// Injected failure.
        inject_failure: Option<SagaStep>,
        /// Delta scale.
        #[serde(default)]
        scale: Option<f32>,
        /// Delta clip.
        #[serde(default)]
        clip: Option<f32>,
    },
    /// Placement planned.
    PlacingStarted {
        /// Bytes per node.
        plan: BTreeMap<String, u64>,
    },
    /// A reservation was made.
    Reserved {
        /// The node.
        node: String,
        /// Bytes.
        bytes: u64,
    },
    /// Loading started.
    LoadingStarted,
    /// Serving.
    ServingStarted {
        /// The checkpoint loaded.
        checkpoint: u64,
    },
    /// The saga failed.
    Failed {
        /// Why.
        reason: String,
    },
    /// A reservation was released.
    Released {
        /// The node.
        node: String,
    },
    /// Retired.
    Retired,
}

/// The model registry actor.
pub struct Model;

fn reject(code: &str, msg: impl Into<String>) -> Result<Vec<ModelEvent>, Rejection> {
    Err(Rejection::new(code, msg))
}

impl Aggregate for Model {
    const KIND: &'static str = "model";
    type State = ModelState;
    type Command = ModelCommand;
    type Event = ModelEvent;

    fn decide(s: &ModelState, cmd: ModelCommand) -> Result<Vec<ModelEvent>, Rejection> {
        use ModelStatus as St;
        if s.state == St::Retired
            && !matches!(cmd, ModelCommand::Describe | ModelCommand::Released { .. })
        {
            return reject("retired", "the model is retired");
        }
        match cmd {
            ModelCommand::Describe => Ok(vec![]),
            ModelCommand::Create {
                rows,
                dim,
                dtype,
                inject_failure,
                scale,
                clip,
            } => {
                if scale.is_some_and(|x| !x.is_finite())
                    || clip.is_some_and(|c| !(c.is_finite() && c > 0.0))
                {
                    return reject("invalid", "scale must be finite and clip positive");
                }
                if s.state != St::Absent {
                    return reject("exists", "the model already exists");
                }
                if !(1..=MAX_ROWS).contains(&rows) {
                    return reject("invalid", format!("rows must be 1..={MAX_ROWS}"));
                }
                if !(1..=MAX_DIM).contains(&dim) {
                    return reject("invalid", format!("dim must be 1..={MAX_DIM}"));
                }
                if ModelState::dtype_bytes(&dtype).is_none() {
                    return reject("invalid", format!("dtype {dtype:?}: f32, f16 or bf16"));
                }
                Ok(vec![ModelEvent::Created {
                    rows,
                    dim,
                    dtype,
                    inject_failure,
                    scale,
                    clip,
                }])
            }
            ModelCommand::BeginPlacing { plan } => match s.state {
                St::Created => Ok(vec![ModelEvent::PlacingStarted { plan }]),
                _ => reject("wrong_state", format!("cannot place from {:?}", s.state)),
            },
            ModelCommand::Reserved { node, bytes } => match s.state {
                St::Placing if s.plan.contains_key(&node) && !s.reserved.contains_key(&node) => {
                    Ok(vec![ModelEvent::Reserved { node, bytes }])
                }
                St::Placing => reject(
                    "wrong_state",
                    format!("{node} is not planned or already reserved"),
                ),
                _ => reject("wrong_state", format!("cannot reserve in {:?}", s.state)),
            },
            ModelCommand::BeginLoading => match s.state {
                St::Placing if s.plan.keys().all(|n| s.reserved.contains_key(n)) => {
                    Ok(vec![ModelEvent::LoadingStarted])
                }
                St::Placing => reject("wrong_state", "reservations are missing"),
                _ => reject("wrong_state", format!("cannot load from {:?}", s.state)),
            },
            ModelCommand::Serve { checkpoint } => match s.state {
                St::Loading => Ok(vec![ModelEvent::ServingStarted { checkpoint }]),
                _ => reject("wrong_state", format!("cannot serve from {:?}", s.state)),
            },
            ModelCommand::Fail { reason } => match s.state {
                St::Created | St::Placing | St::Loading => Ok(vec![ModelEvent::Failed { reason }]),
                _ => reject("wrong_state", format!("cannot fail from {:?}", s.state)),
            },
            ModelCommand::Released { node } => {
                if s.reserved.contains_key(&node) {
                    Ok(vec![ModelEvent::Released { node }])
                } else {
                    Ok(vec![])
                }
            }
            ModelCommand::Retire => match s.state {
                St::Absent => reject("not_found", "no such model"),
                _ => Ok(vec![ModelEvent::Retired]),
            },
        }
    }

    fn apply(mut s: ModelState, e: &ModelEvent) -> ModelState {
        match e {
            ModelEvent::Created {
                rows,
                dim,
                dtype,
                inject_failure,
                scale,
                clip,
            } => {
                s.state = ModelStatus::Created;
                s.scale = *scale;
                s.clip = *clip;
                s.rows = *rows;
                s.dim = *dim;
                s.dtype = dtype.clone();
                s.inject_failure = *inject_failure;
            }
            ModelEvent::PlacingStarted { plan } => {
                s.state = ModelStatus::Placing;
                s.plan = plan.clone();
            }
            ModelEvent::Reserved { node, bytes } => {
                s.reserved.insert(node.clone(), *bytes);
            }
            ModelEvent::LoadingStarted => s.state = ModelStatus::Loading,
            ModelEvent::ServingStarted { .. } => {
                s.state = ModelStatus::Serving;
                s.consumers = true;
            }
            ModelEvent::Failed { reason } => {
                s.state = ModelStatus::Failed;
                s.reason = Some(reason.clone());
                s.consumers = false;
            }
            ModelEvent::Released { node } => {
                s.reserved.remove(node);
            }
            ModelEvent::Retired => {
                s.state = ModelStatus::Retired;
                s.consumers = false;
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: ModelState, c: ModelCommand) -> Result<ModelState, Rejection> {
        Ok(Model::decide(&s, c)?.iter().fold(s, Model::apply))
    }

    #[test]
    fn the_happy_path_and_compensation() {
        let s = run(
            ModelState::default(),
            ModelCommand::Create {
                rows: 10,
                dim: 4,
                dtype: "f32".into(),
                inject_failure: None,
                scale: None,
                clip: None,
            },
        )
        .unwrap();
        assert_eq!(s.table_bytes(), 160);
        let plan: BTreeMap<String, u64> = [("a".to_string(), 80), ("b".to_string(), 80)].into();
        let s = run(s, ModelCommand::BeginPlacing { plan }).unwrap();
        assert!(
            run(s.clone(), ModelCommand::BeginLoading).is_err(),
            "reservations missing"
        );
        let s = run(
            s,
            ModelCommand::Reserved {
                node: "a".into(),
                bytes: 80,
            },
        )
        .unwrap();
        // b fails: the saga fails and must release a.
        let failed = run(
            s.clone(),
            ModelCommand::Fail {
                reason: "b out of memory".into(),
            },
        )
        .unwrap();
        assert_eq!(failed.state, ModelStatus::Failed);
        assert!(
            failed.saga_pending(),
            "a's reservation still needs releasing"
        );
        let released = run(failed, ModelCommand::Released { node: "a".into() }).unwrap();
        assert!(!released.saga_pending());
        // The happy path.
        let s = run(
            s,
            ModelCommand::Reserved {
                node: "b".into(),
                bytes: 80,
            },
        )
        .unwrap();
        let s = run(s, ModelCommand::BeginLoading).unwrap();
        let s = run(s, ModelCommand::Serve { checkpoint: 0 }).unwrap();
        assert_eq!(s.state, ModelStatus::Serving);
        let s = run(s, ModelCommand::Retire).unwrap();
        assert_eq!(s.state, ModelStatus::Retired);
        assert!(s.saga_pending(), "retiring releases the reservations");
        assert_eq!(
            run(s, ModelCommand::Serve { checkpoint: 0 })
                .unwrap_err()
                .code,
            "retired"
        );
    }

    #[test]
    fn bad_creates_are_rejected() {
        for (rows, dim, dtype) in [(0, 4, "f32"), (10, 0, "f32"), (10, 4, "f64")] {
            let r = Model::decide(
                &ModelState::default(),
                ModelCommand::Create {
                    rows,
                    dim,
                    dtype: dtype.into(),
                    inject_failure: None,
                    scale: None,
                    clip: None,
                },
            );
            assert_eq!(r.unwrap_err().code, "invalid");
        }
    }
}
