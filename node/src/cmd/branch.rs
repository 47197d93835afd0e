//! `tessel model branch` and `tessel model merge`: forking a model's state at a stream
//! sequence, and merging a branch's change back into its parent.
//!
//! A branch is a model of its own (its own subjects, owners, checkpoints) whose registry record
//! names its parent and fork sequence; its slots start from the parent's state at that
//! sequence (see `deltas::ModelHost`). A merge reads both streams after the fork point up to
//! the stream's last sequence at the start of the merge (the cut), plans the delta with
//! `actors::merge::plan_merge`, publishes it to the parent through the [`Producer`] (so it is
//! acknowledged and applied exactly once like any delta), then records the merge on the
//! branch. A branch merges once.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actors::delta::Hlc;
use actors::es::ActorKey;
use actors::merge::{MergePolicy, plan_merge};
use cluster::Slot;
use serde_json::{Value, json};

use crate::client::{ActorClient, AskError};
use crate::cmd::actor::Target;
use crate::deltas::{
    Generation, Producer, SlotModel, SlotModelConfig, deltas_stream, ensure, stream_changes,
};
use crate::metrics::Metrics;

/// Most conflicts listed in the text summary (`--json` lists all).
pub const MAX_CONFLICTS_PRINTED: usize = 100;

/// Why a branch or merge was refused or failed; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    /// A model does not exist.
    #[error("no model {0:?}")]
    UnknownModel(String),
    /// The request does not make sense (not a branch of that model, shapes differ, a fork
    /// point past the stream's end, already merged…).
    #[error("{0}")]
    Refused(String),
    /// NATS or a model actor failed.
    #[error("{0}")]
    Failed(String),
}

impl BranchError {
    /// 2 for a refused request, 1 otherwise.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            BranchError::Refused(_) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

async fn describe(actors: &ActorClient, name: &str) -> Result<Value, BranchError> {
    let key =
        ActorKey::new("model", name).map_err(|e| BranchError::Refused(format!("{name:?}: {e}")))?;
    let (v, _) = actors
        .ask(&key, &json!({"cmd": "describe"}), Duration::from_secs(5))
        .await
        .map_err(|e| BranchError::Failed(format!("describe {name}: {e}")))?;
    if v["state"] == "Absent" {
        return Err(BranchError::UnknownModel(name.to_string()));
    }
    Ok(v)
}

async fn last_sequence(
    js: &async_nats::jetstream::Context,
    cluster: &str,
) -> Result<u64, BranchError> {
    let mut stream = js
        .get_stream(deltas_stream(cluster))
        .await
        .map_err(|e| BranchError::Failed(format!("deltas stream: {e}")))?;
    Ok(stream
        .info()
        .await
        .map_err(|e| BranchError::Failed(format!("deltas stream: {e}")))?
        .state
        .last_sequence)
}

/// Registers `name` as a branch of `parent` at stream sequence `at_seq`; returns its
/// description.
pub async fn branch(
    client: &async_nats::Client,
    cluster: &str,
    parent: &str,
    at_seq: u64,
    name: &str,
) -> Result<Value, BranchError> {
    let actors = ActorClient::new(client.clone(), cluster);
    let p = describe(&actors, parent).await?;
    if p["state"] != "Serving" {
        return Err(BranchError::Refused(format!(
            "model {parent} is {}, not Serving",
            p["state"]
        )));
    }
    let js = async_nats::jetstream::new(client.clone());
    let last = last_sequence(&js, cluster).await?;
    if at_seq > last {
        return Err(BranchError::Refused(format!(
            "the fork point {at_seq} is past the stream's last sequence {last}"
        )));
    }
    let key = ActorKey::new("model", name)
        .map_err(|e| BranchError::Refused(format!("branch name {name:?}: {e}")))?;
    let cmd = json!({"cmd": "branch", "parent": parent, "fork_seq": at_seq, "rows": p["rows"],
        "dim": p["dim"], "dtype": p["dtype"], "scale": p["scale"], "clip": p["clip"]});
    match actors.ask(&key, &cmd, Duration::from_secs(5)).await {
        Ok((v, _)) => Ok(v),
        Err(AskError::Rejected(r)) => Err(BranchError::Refused(format!(
            "{name}: {}",
            r["message"].as_str().unwrap_or("rejected")
        ))),
        Err(e) => Err(BranchError::Failed(e.to_string())),
    }
}

/// The outcome of a merge.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// The report as JSON (the `--json` output).
    pub json: Value,
}

fn ts_json(t: Hlc) -> Value {
    json!({"wall_ms": t.wall_ms, "logical": t.logical, "node": t.node})
}

fn ts_text(t: Hlc) -> String {
    format!("{}.{}@{}", t.wall_ms, t.logical, t.node)
}

/// Merges branch `branch` into `into` under `policy`.
pub async fn merge(
    client: &async_nats::Client,
    cluster: &str,
    branch: &str,
    into: &str,
    policy: MergePolicy,
    max_abs: f32,
    progress: &mut (dyn FnMut(&crate::deltas::ScanProgress) + Send),
) -> Result<MergeReport, BranchError> {
    let actors = ActorClient::new(client.clone(), cluster);
    let b = describe(&actors, branch).await?;
    let m = describe(&actors, into).await?;
    if b["parent"].as_str() != Some(into) {
        return Err(BranchError::Refused(format!(
            "{branch} is not a branch of {into} (its parent: {})",
            b["parent"].as_str().unwrap_or("none")
        )));
    }
    let Some(fork) = b["fork_seq"].as_u64() else {
        return Err(BranchError::Refused(format!("{branch} has no fork point")));
    };
    if b["rows"] != m["rows"] || b["dim"] != m["dim"] {
        return Err(BranchError::Refused(format!(
            "shapes differ: {branch} is {}×{}, {into} is {}×{}",
            b["rows"], b["dim"], m["rows"], m["dim"]
        )));
    }
    if let Some(prev) = b["merged"].as_object() {
        return Err(BranchError::Refused(format!(
            "{branch} was already merged into {} through sequence {}",
            prev.get("into").and_then(Value::as_str).unwrap_or("?"),
            prev.get("through_seq").and_then(Value::as_u64).unwrap_or(0)
        )));
    }
    if b["state"] == "Retired" {
        return Err(BranchError::Refused(format!("{branch} is retired")));
    }
    if m["state"] != "Serving" {
        return Err(BranchError::Refused(format!(
            "model {into} is {}, not Serving",
            m["state"]
        )));
    }
    let (Some(rows), Some(dim)) = (
        m["rows"].as_u64(),
        m["dim"].as_u64().and_then(|d| u32::try_from(d).ok()),
    ) else {
        return Err(BranchError::Failed(format!(
            "model {into}: malformed description"
        )));
    };
    let js = async_nats::jetstream::new(client.clone());
    let checkpoints = ensure(&js, cluster, 1)
        .await
        .map_err(|e| BranchError::Failed(e.to_string()))?;
    let cut = last_sequence(&js, cluster).await?;
    let template = SlotModel {
        js: js.clone(),
        client: client.clone(),
        checkpoints,
        cluster: cluster.to_string(),
        model: into.to_string(),
        rows,
        dim,
        slot: Slot::from_hash(0),
        cfg: SlotModelConfig::default(),
        metrics: Arc::new(Metrics::default()),
    };
    let main_gen = Generation::from_description(into, &m);
    let branch_gen = Generation::from_description(branch, &b);
    let main = stream_changes(&template, &main_gen, fork, cut, progress)
        .await
        .map_err(BranchError::Failed)?;
    let side = stream_changes(&template, &branch_gen, fork, cut, progress)
        .await
        .map_err(BranchError::Failed)?;
    let plan = plan_merge(&main, &side, policy).map_err(|e| BranchError::Failed(e.to_string()))?;
    if let Some(v) = plan
        .values
        .iter()
        .find(|v| !v.is_finite() || v.abs() > max_abs)
    {
        return Err(BranchError::Refused(format!(
            "the merged change has a value {v} beyond the owners' bound {max_abs}: \
             the owners would dead-letter it (raise --max-abs only if delta_max_abs is higher)"
        )));
    }
    let mut sent = crate::deltas::Sent::default();
    if !plan.rows.is_empty() {
        let mut producer = Producer::new(
            js.clone(),
            cluster,
            into,
            rows,
            dim,
            64,
            Producer::random_id(),
        )
        // A rerun after a crash between publishing and recording is dropped by the
        // server within its duplicate window.
        .with_msg_id(&format!("merge.{branch}.{into}.{fork}"));
        sent = producer
            .send(&plan.rows, &plan.values)
            .await
            .map_err(|e| BranchError::Failed(format!("publishing the merge to {into}: {e}")))?;
    }
    let record = json!({"cmd": "record_merge", "merge": {"into": into, "policy": policy.name(),
        "through_seq": cut, "rows": plan.rows.len(), "conflicts": plan.conflicts.len()}});
    let key = ActorKey::new("model", branch).map_err(|e| BranchError::Failed(e.to_string()))?;
    actors
        .ask(&key, &record, Duration::from_secs(5))
        .await
        .map_err(|e| {
            BranchError::Failed(format!(
                "the merge was published to {into} but recording it on {branch} failed: {e}"
            ))
        })?;
    let conflicts: Vec<Value> = plan
        .conflicts
        .iter()
        .map(|c| {
            json!({"row": c.row, "main_ts": ts_json(c.main_ts), "branch_ts": ts_json(c.branch_ts),
                "resolution": c.resolution})
        })
        .collect();
    Ok(MergeReport {
        json: json!({
            "branch": branch, "into": into, "policy": policy.name(), "fork_seq": fork,
            "through_seq": cut, "branch_rows_changed": side.rows().len(),
            "main_rows_changed": main.rows().len(), "rows_merged": plan.rows.len(),
            "rows_published": sent.rows, "frames_published": sent.batches,
            "conflicts": conflicts,
        }),
    })
}

/// The text summary of a merge report.
pub fn summary(r: &MergeReport) -> String {
    let j = &r.json;
    let conflicts = j["conflicts"].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "merged {} into {} (policy {}, stream sequences {}..={}): {} rows merged ({} changed on the branch, {} on {}), {} conflicts\n",
        j["branch"].as_str().unwrap_or("?"),
        j["into"].as_str().unwrap_or("?"),
        j["policy"].as_str().unwrap_or("?"),
        j["fork_seq"].as_u64().unwrap_or(0) + 1,
        j["through_seq"],
        j["rows_merged"],
        j["branch_rows_changed"],
        j["main_rows_changed"],
        j["into"].as_str().unwrap_or("?"),
        conflicts.len()
    );
    if !conflicts.is_empty() {
        out.push_str(&format!(
            "{:>10}  {:<24} {:<24} {}\n",
            "row", "main ts", "branch ts", "resolution"
        ));
    }
    let ts = |v: &Value| {
        ts_text(Hlc {
            wall_ms: v["wall_ms"].as_u64().unwrap_or(0),
            logical: v["logical"]
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .unwrap_or(0),
            node: v["node"].as_u64().unwrap_or(0),
        })
    };
    for c in conflicts.iter().take(MAX_CONFLICTS_PRINTED) {
        out.push_str(&format!(
            "{:>10}  {:<24} {:<24} {}\n",
            c["row"],
            ts(&c["main_ts"]),
            ts(&c["branch_ts"]),
            c["resolution"].as_str().unwrap_or("?")
        ));
    }
    if conflicts.len() > MAX_CONFLICTS_PRINTED {
        out.push_str(&format!(
            "… and {} more (--json lists them all)\n",
            conflicts.len() - MAX_CONFLICTS_PRINTED
        ));
    }
    out
}

/// Where a branch forks.
#[derive(Clone, Copy, Debug)]
pub enum ForkPoint {
    /// A stream sequence.
    Seq(u64),
    /// Unix nanoseconds: the last sequence stored at or before.
    TimeNs(i128),
}

/// Runs `tessel model branch`.
pub async fn run_branch(target: &Target, parent: &str, at: ForkPoint, name: &str) -> ExitCode {
    let client = match target.connect().await {
        Ok(c) => c,
        Err(c) => return c,
    };
    let at_seq = match at {
        ForkPoint::Seq(s) => s,
        ForkPoint::TimeNs(t) => {
            let js = async_nats::jetstream::new(client.clone());
            match crate::deltas::seq_at_time(&js, &target.cluster, t).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tessel model branch: --at-time: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    match branch(&client, &target.cluster, parent, at_seq, name).await {
        Ok(_) => {
            println!(
                "model {name} branched from {parent} at stream sequence {at_seq}; the deploy saga has started"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessel model branch: {e}");
            e.exit_code()
        }
    }
}

/// Arguments of `tessel model merge` beyond the names.
pub struct MergeArgs {
    /// The policy.
    pub policy: MergePolicy,
    /// The owners' magnitude bound.
    pub max_abs: f32,
    /// One JSON object.
    pub json: bool,
    /// No progress line.
    pub quiet: bool,
}

/// Runs `tessel model merge`.
pub async fn run_merge(target: &Target, branch: &str, into: &str, a: MergeArgs) -> ExitCode {
    let client = match target.connect().await {
        Ok(c) => c,
        Err(c) => return c,
    };
    let mut bar = crate::progress::Bar::new(a.quiet);
    let r = merge(
        &client,
        &target.cluster,
        branch,
        into,
        a.policy,
        a.max_abs,
        &mut |p| bar.update(p),
    )
    .await;
    bar.finish();
    match r {
        Ok(r) => {
            if a.json {
                println!("{}", r.json);
            } else {
                print!("{}", summary(&r));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessel model merge: {e}");
            e.exit_code()
        }
    }
}
