//! Merging a branch into its parent, as a pure plan.
//!
//! Both sides are described by what changed since the fork: per row, the sum of the values
//! applied to it (after the model's transform) and the timestamp of the latest update. A row
//! changed on both sides is a **conflict**. The plan is the delta to publish to the parent:
//!
//! - [`MergePolicy::Sum`]: every row takes the branch's change (conflicting rows end up with
//!   both changes added).
//! - [`MergePolicy::Newer`]: a non-conflicting row takes the branch's change; a conflicting
//!   row keeps the side whose latest update is newer (HLC order; a tie keeps main). When the
//!   branch is newer, the parent's row must become the branch's row: both started from the
//!   same fork row, so the delta is `branch change − main change`. When main is newer, the
//!   branch's change for that row is dropped.
//!
//! Conflicts are reported ordered by the later of the two timestamps (when the conflict
//! arose), then by row.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::delta::Hlc;

/// What changed on one row since the fork.
#[derive(Clone, Debug, PartialEq)]
pub struct RowChange {
    /// The sum of the values applied, `dim` of them.
    pub values: Vec<f32>,
    /// The latest update's timestamp.
    pub latest: Hlc,
    /// Updates seen.
    pub updates: u64,
}

/// Every row one side changed since the fork.
#[derive(Clone, Debug, PartialEq)]
pub struct Changes {
    dim: usize,
    rows: BTreeMap<u32, RowChange>,
    max_rows: usize,
}

/// Why a plan could not be made.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MergeError {
    /// Values of the wrong length, or the sides disagree on dim.
    #[error("shape: {0}")]
    Shape(String),
    /// More changed rows than the limit.
    #[error("more than {0} changed rows")]
    TooManyRows(usize),
}

impl Changes {
    /// No changes yet, for rows of `dim` values, tracking at most `max_rows` rows.
    pub fn new(dim: usize, max_rows: usize) -> Self {
        Changes {
            dim,
            rows: BTreeMap::new(),
            max_rows,
        }
    }

    /// Adds one update: `rows.len() × dim` values, row-major, stamped `ts`.
    pub fn add(&mut self, rows: &[u32], values: &[f32], ts: Hlc) -> Result<(), MergeError> {
        if values.len() != rows.len() * self.dim {
            return Err(MergeError::Shape(format!(
                "{} values for {} rows of dim {}",
                values.len(),
                rows.len(),
                self.dim
            )));
        }
        for (i, &r) in rows.iter().enumerate() {
            if !self.rows.contains_key(&r) && self.rows.len() >= self.max_rows {
                return Err(MergeError::TooManyRows(self.max_rows));
            }
            let e = self.rows.entry(r).or_insert_with(|| RowChange {
                values: vec![0.0; self.dim],
                latest: ts,
                updates: 0,
            });
            for (a, v) in e.values.iter_mut().zip(&values[i * self.dim..]) {
                *a += *v;
            }
            e.latest = e.latest.max(ts);
            e.updates += 1;
        }
        Ok(())
    }

    /// The changed rows.
    pub fn rows(&self) -> &BTreeMap<u32, RowChange> {
        &self.rows
    }

    /// Values per row.
    pub fn dim(&self) -> usize {
        self.dim
    }
}

/// How conflicting rows are resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergePolicy {
    /// Add the branch's change to main's.
    Sum,
    /// Keep the side whose latest update is newer.
    Newer,
}

impl MergePolicy {
    /// Its name on the command line and in records.
    pub fn name(self) -> &'static str {
        match self {
            MergePolicy::Sum => "sum",
            MergePolicy::Newer => "newer",
        }
    }
}

/// What happened to a conflicting row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Both changes kept (policy sum).
    Summed,
    /// The branch was newer: main's row became the branch's.
    Branch,
    /// Main was newer (or as new): the branch's change was dropped.
    Main,
}

/// A row changed on both sides since the fork.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// The row.
    pub row: u32,
    /// Main's latest update.
    pub main_ts: Hlc,
    /// The branch's latest update.
    pub branch_ts: Hlc,
    /// What the merge did.
    pub resolution: Resolution,
}

/// The delta to publish to main, and the conflicts.
#[derive(Clone, Debug, PartialEq)]
pub struct MergePlan {
    /// Rows of the delta, ascending.
    pub rows: Vec<u32>,
    /// `rows.len() × dim` values, row-major.
    pub values: Vec<f32>,
    /// Rows changed on both sides, by the later timestamp, then row.
    pub conflicts: Vec<Conflict>,
}

/// Plans the merge of `branch` into `main` (both relative to the fork).
pub fn plan_merge(
    main: &Changes,
    branch: &Changes,
    policy: MergePolicy,
) -> Result<MergePlan, MergeError> {
    if main.dim != branch.dim {
        return Err(MergeError::Shape(format!(
            "main has dim {}, the branch {}",
            main.dim, branch.dim
        )));
    }
    let mut plan = MergePlan {
        rows: Vec::new(),
        values: Vec::new(),
        conflicts: Vec::new(),
    };
    for (&row, b) in &branch.rows {
        let Some(m) = main.rows.get(&row) else {
            plan.rows.push(row);
            plan.values.extend_from_slice(&b.values);
            continue;
        };
        let resolution = match policy {
            MergePolicy::Sum => {
                plan.rows.push(row);
                plan.values.extend_from_slice(&b.values);
                Resolution::Summed
            }
            MergePolicy::Newer if b.latest > m.latest => {
                plan.rows.push(row);
                plan.values
                    .extend(b.values.iter().zip(&m.values).map(|(b, m)| b - m));
                Resolution::Branch
            }
            MergePolicy::Newer => Resolution::Main,
        };
        plan.conflicts.push(Conflict {
            row,
            main_ts: m.latest,
            branch_ts: b.latest,
            resolution,
        });
    }
    plan.conflicts
        .sort_by_key(|c| (c.main_ts.max(c.branch_ts), c.row));
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(wall_ms: u64) -> Hlc {
        Hlc {
            wall_ms,
            logical: 0,
            node: 1,
        }
    }

    fn changes(updates: &[(u32, f32, u64)]) -> Changes {
        let mut c = Changes::new(2, 100);
        for &(row, v, t) in updates {
            c.add(&[row], &[v, v], ts(t)).unwrap();
        }
        c
    }

    #[test]
    fn changes_sum_per_row_and_keep_the_latest_timestamp() {
        let c = changes(&[(3, 1.0, 10), (3, 2.0, 5), (4, 1.0, 7)]);
        let r = &c.rows()[&3];
        assert_eq!(r.values, vec![3.0, 3.0]);
        assert_eq!(r.latest, ts(10));
        assert_eq!(r.updates, 2);
        let mut c = Changes::new(2, 1);
        c.add(&[1], &[1.0, 1.0], ts(1)).unwrap();
        assert_eq!(
            c.add(&[2], &[1.0, 1.0], ts(1)),
            Err(MergeError::TooManyRows(1))
        );
        assert!(matches!(
            c.add(&[1], &[1.0], ts(1)),
            Err(MergeError::Shape(_))
        ));
    }

    #[test]
    fn sum_publishes_the_branch_change_and_reports_conflicts() {
        let main = changes(&[(1, 10.0, 20), (2, 1.0, 5)]);
        let branch = changes(&[(2, 3.0, 30), (7, 4.0, 10)]);
        let p = plan_merge(&main, &branch, MergePolicy::Sum).unwrap();
        assert_eq!(p.rows, vec![2, 7]);
        assert_eq!(p.values, vec![3.0, 3.0, 4.0, 4.0]);
        assert_eq!(
            p.conflicts,
            vec![Conflict {
                row: 2,
                main_ts: ts(5),
                branch_ts: ts(30),
                resolution: Resolution::Summed
            }]
        );
    }

    #[test]
    fn newer_takes_the_newer_side_of_each_conflict() {
        // Row 2: the branch is newer → main's row becomes the branch's (delta b − m).
        // Row 3: main is newer → the branch's change is dropped.
        // Row 4: equal timestamps → main is kept.
        // Row 9: only the branch changed it → the branch's change.
        let main = changes(&[(2, 1.0, 5), (3, 7.0, 50), (4, 1.0, 8)]);
        let branch = changes(&[(2, 3.0, 30), (3, 2.0, 40), (4, 5.0, 8), (9, 1.5, 1)]);
        let p = plan_merge(&main, &branch, MergePolicy::Newer).unwrap();
        assert_eq!(p.rows, vec![2, 9]);
        assert_eq!(p.values, vec![2.0, 2.0, 1.5, 1.5]);
        let got: Vec<(u32, Resolution)> =
            p.conflicts.iter().map(|c| (c.row, c.resolution)).collect();
        // Ordered by the later timestamp: row 4 (8), row 2 (30), row 3 (50).
        assert_eq!(
            got,
            vec![
                (4, Resolution::Main),
                (2, Resolution::Branch),
                (3, Resolution::Main)
            ]
        );
        // Applying the plan to main's rows makes row 2 equal the branch's row.
        let fork = 100.0f32;
        let main_row = fork + main.rows()[&2].values[0];
        assert_eq!(main_row + p.values[0], fork + branch.rows()[&2].values[0]);
    }

    #[test]
    fn nothing_on_the_branch_is_an_empty_plan_and_dims_must_agree() {
        let main = changes(&[(1, 1.0, 1)]);
        let empty = Changes::new(2, 10);
        for policy in [MergePolicy::Sum, MergePolicy::Newer] {
            let p = plan_merge(&main, &empty, policy).unwrap();
            assert!(p.rows.is_empty() && p.values.is_empty() && p.conflicts.is_empty());
        }
        assert!(matches!(
            plan_merge(&Changes::new(3, 10), &empty, MergePolicy::Sum),
            Err(MergeError::Shape(_))
        ));
    }
}
