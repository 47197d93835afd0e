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
    /// A branch's parent model (absent for a model created from nothing).
    #[serde(default)]
    pub parent: Option<String>,
    /// A branch's fork point: the `<c>-deltas` stream sequence of the parent's state it
    /// starts from.
    #[serde(default)]
    pub fork_seq: Option<u64>,
    /// The merge of this branch into its parent, once it happened (a branch merges once: a
    /// second merge would apply its change again).
    #[serde(default)]
    pub merged: Option<MergeRecord>,
}

/// One merge of a branch into its parent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergeRecord {
    /// The model merged into.
    pub into: String,
    /// The policy (`sum` or `newer`).
    pub policy: String,
    /// The last stream sequence the merge read (both sides were read up to it).
    pub through_seq: u64,
    /// Rows whose change was published to the parent.
    pub rows: u64,
    /// Rows changed on both sides.
    pub conflicts: u64,
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
    /// Register a branch of `parent` at stream sequence `fork_seq` (the caller copies the
    /// parent's shape and transform; the parent is another actor, so it is checked there).
    Branch {
        /// The parent model.
        parent: String,
        /// The fork point.
        fork_seq: u64,
        /// Rows (the parent's).
        rows: u64,
        /// Columns (the parent's).
        dim: u32,
        /// Element type (the parent's).
        #[serde(default = "default_dtype")]
        dtype: String,
        /// Delta scale.
        #[serde(default)]
        scale: Option<f32>,
        /// Delta clip.
        #[serde(default)]
        clip: Option<f32>,
    },
    /// Record a merge of this branch into its parent.
    RecordMerge {
        /// The merge.
        merge: MergeRecord,
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
        /// The parent of a branch (absent in records written before branches existed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<String>,
        /// The fork point of a branch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fork_seq: Option<u64>,
    },
    /// The branch was merged into its parent.
    Merged {
        /// The merge.
        merge: MergeRecord,
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

/// The checks shared by `create` and `branch`.
fn check_create(
    s: &ModelState,
    rows: u64,
    dim: u32,
    dtype: &str,
    scale: Option<f32>,
    clip: Option<f32>,
) -> Result<(), Rejection> {
    if scale.is_some_and(|x| !x.is_finite()) || clip.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
        return Err(Rejection::new(
            "invalid",
            "scale must be finite and clip positive",
        ));
    }
    if s.state != ModelStatus::Absent {
        return Err(Rejection::new("exists", "the model already exists"));
    }
    if !(1..=MAX_ROWS).contains(&rows) {
        return Err(Rejection::new(
            "invalid",
            format!("rows must be 1..={MAX_ROWS}"),
        ));
    }
    if !(1..=MAX_DIM).contains(&dim) {
        return Err(Rejection::new(
            "invalid",
            format!("dim must be 1..={MAX_DIM}"),
        ));
    }
    if ModelState::dtype_bytes(dtype).is_none() {
        return Err(Rejection::new(
            "invalid",
            format!("dtype {dtype:?}: f32, f16 or bf16"),
        ));
    }
    Ok(())
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
                check_create(s, rows, dim, &dtype, scale, clip)?;
                Ok(vec![ModelEvent::Created {
                    rows,
                    dim,
                    dtype,
                    inject_failure,
                    scale,
                    clip,
                    parent: None,
                    fork_seq: None,
                }])
            }
            ModelCommand::Branch {
                parent,
                fork_seq,
                rows,
                dim,
                dtype,
                scale,
                clip,
            } => {
                check_create(s, rows, dim, &dtype, scale, clip)?;
                if parent.is_empty() {
                    return reject("invalid", "a branch needs a parent");
                }
                Ok(vec![ModelEvent::Created {
                    rows,
                    dim,
                    dtype,
                    inject_failure: None,
                    scale,
                    clip,
                    parent: Some(parent),
                    fork_seq: Some(fork_seq),
                }])
            }
            ModelCommand::RecordMerge { merge } => match (&s.state, &s.parent) {
                (St::Absent, _) => reject("not_found", "no such model"),
                (_, Some(p)) if *p == merge.into => match &s.merged {
                    // A retried record of the same merge: nothing new.
                    Some(m) if *m == merge => Ok(vec![]),
                    Some(m) => reject(
                        "already_merged",
                        format!("merged into {} through sequence {}", m.into, m.through_seq),
                    ),
                    None => Ok(vec![ModelEvent::Merged { merge }]),
                },
                _ => reject(
                    "not_a_branch",
                    format!("the model is not a branch of {}", merge.into),
                ),
            },
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
                parent,
                fork_seq,
            } => {
                s.state = ModelStatus::Created;
                s.parent = parent.clone();
                s.fork_seq = *fork_seq;
                s.scale = *scale;
                s.clip = *clip;
                s.rows = *rows;
                s.dim = *dim;
                s.dtype = dtype.clone();
                s.inject_failure = *inject_failure;
            }
            ModelEvent::Merged { merge } => s.merged = Some(merge.clone()),
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
    fn a_branch_records_its_parent_and_merges_once() {
        let s = run(
            ModelState::default(),
            ModelCommand::Branch {
                parent: "m".into(),
                fork_seq: 42,
                rows: 10,
                dim: 4,
                dtype: "f32".into(),
                scale: None,
                clip: None,
            },
        )
        .unwrap();
        assert_eq!(s.state, ModelStatus::Created);
        assert_eq!((s.parent.as_deref(), s.fork_seq), (Some("m"), Some(42)));
        let merge = MergeRecord {
            into: "m".into(),
            policy: "sum".into(),
            through_seq: 50,
            rows: 3,
            conflicts: 1,
        };
        assert_eq!(
            Model::decide(
                &s,
                ModelCommand::RecordMerge {
                    merge: MergeRecord {
                        into: "other".into(),
                        ..merge.clone()
                    }
                }
            )
            .unwrap_err()
            .code,
            "not_a_branch"
        );
        let s = run(
            s,
            ModelCommand::RecordMerge {
                merge: merge.clone(),
            },
        )
        .unwrap();
        assert_eq!(s.merged.as_ref(), Some(&merge));
        // The same record again is a no-op; another merge is refused.
        assert!(
            Model::decide(
                &s,
                ModelCommand::RecordMerge {
                    merge: merge.clone()
                }
            )
            .unwrap()
            .is_empty()
        );
        let again = MergeRecord {
            through_seq: 60,
            ..merge
        };
        assert_eq!(
            Model::decide(&s, ModelCommand::RecordMerge { merge: again })
                .unwrap_err()
                .code,
            "already_merged"
        );
    }

    #[test]
    fn records_written_before_branches_still_decode() {
        let old = r#"{"type":"Created","rows":10,"dim":4,"dtype":"f32","inject_failure":null}"#;
        let e: ModelEvent = serde_json::from_str(old).unwrap();
        let s = Model::apply(ModelState::default(), &e);
        assert_eq!((s.parent, s.fork_seq, s.merged), (None, None, None));
        let state = r#"{"state":"Serving","rows":10,"dim":4,"dtype":"f32","plan":{},"reserved":{},
            "reason":null,"inject_failure":null,"consumers":true}"#;
        let s: ModelState = serde_json::from_str(state).unwrap();
        assert_eq!(s.parent, None);
        // A plain model's Created event is written exactly as before.
        let e = ModelEvent::Created {
            rows: 1,
            dim: 1,
            dtype: "f32".into(),
            inject_failure: None,
            scale: None,
            clip: None,
            parent: None,
            fork_seq: None,
        };
        assert!(!serde_json::to_string(&e).unwrap().contains("parent"));
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
