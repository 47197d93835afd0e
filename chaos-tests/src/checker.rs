//! The checker: reads the tables and the actors' histories after the faults heal and compares
//! them with the recorded operations.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;

use crate::procs::CLUSTER;
use crate::workload::{ACTORS, ActorOp, DeltaOp, MODEL, MODEL_ROWS, Outcome, op_rows};

/// Examples kept per kind of finding.
const EXAMPLES: usize = 10;

/// The tables against the acknowledged deltas.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeltaCheck {
    /// Operations acknowledged.
    pub acked: u64,
    /// Operations whose outcome is unknown.
    pub indeterminate: u64,
    /// Of those, how many took effect (all rows 1).
    pub indeterminate_applied: u64,
    /// Acknowledged operations with a row missing.
    pub lost: u64,
    /// Operations with a row applied more than once.
    pub doubled: u64,
    /// Acknowledged operations with a row that could not be read (its slot did not answer).
    pub unreadable: u64,
    /// Rows read.
    pub rows_checked: u64,
    /// Of the lost operations, those with a row whose frame is not in the deltas stream
    /// (lost by the pipeline before storage); the rest were stored but not applied.
    pub lost_in_stream: u64,
    /// Delta frames in the stream for this model.
    pub stream_frames: u64,
    /// Frames the slot owners dead-lettered.
    pub dlq_frames: u64,
    /// Slots holding a row of a lost operation (at most 32 listed).
    pub lost_slots: Vec<u64>,
    /// How long the tables took to match (ms from the start of the check).
    pub converged_ms: Option<u64>,
    /// The last read error, if reading never succeeded.
    pub read_error: Option<String>,
    /// A few findings.
    pub examples: Vec<String>,
}

/// Compares one reading with the operations.
fn compare(ops: &[DeltaOp], values: &HashMap<u32, f32>) -> DeltaCheck {
    let mut c = DeltaCheck::default();
    for op in ops {
        let ok = op.outcome == Outcome::Ok;
        if ok {
            c.acked += 1;
        } else {
            c.indeterminate += 1;
        }
        let vals: Vec<f32> = op_rows(op.id)
            .iter()
            .map(|r| values.get(r).copied().unwrap_or(f32::NAN))
            .collect();
        c.rows_checked += vals.len() as u64;
        let doubled = vals.iter().any(|v| *v > 1.0);
        let missing = vals.iter().any(|v| *v < 1.0);
        if ok && vals.iter().any(|v| v.is_nan()) {
            c.unreadable += 1;
        }
        if doubled {
            c.doubled += 1;
            if c.examples.len() < EXAMPLES {
                c.examples.push(format!(
                    "op {} ({:?}) rows read {vals:?}: doubled",
                    op.id, op.outcome
                ));
            }
        }
        if ok && missing {
            c.lost += 1;
            if c.examples.len() < EXAMPLES {
                c.examples.push(format!(
                    "op {} sent at {} ms, acknowledged at {} ms, rows read {vals:?}: lost",
                    op.id, op.start_ms, op.end_ms
                ));
            }
        }
        if !ok && vals.iter().all(|v| *v == 1.0) {
            c.indeterminate_applied += 1;
        }
    }
    c
}

/// Reads rows slot by slot, fresh: an owner answers once it has taken every delta the stream
/// holds for the slot, so a slot still catching up (restored, moved, replaying its tail) is not
/// read as a lost write. Rows of a slot that does not answer, or is still behind after the
/// read's timeout, read NaN (unreadable, not lost). Returns the values and the last error.
async fn read_rows(
    client: &async_nats::Client,
    rows: &[u32],
) -> (HashMap<u32, f32>, Option<String>) {
    let mut by_slot: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for &r in rows {
        by_slot
            .entry(u64::from(r) / crate::workload::ROWS_PER_SLOT)
            .or_default()
            .push(r);
    }
    let mut out = HashMap::new();
    let mut error = None;
    for (slot, rows) in by_slot {
        match tessel_node::deltas::get_rows(
            client,
            CLUSTER,
            MODEL,
            MODEL_ROWS,
            &rows,
            tessel_node::deltas::Freshness::Fresh,
            Duration::from_secs(3),
        )
        .await
        {
            Ok(values) => {
                for (r, v) in rows.iter().zip(&values) {
                    out.insert(*r, v.first().copied().unwrap_or(f32::NAN));
                }
            }
            Err(e) => error = Some(format!("slot {slot}: {e}")),
        }
    }
    (out, error)
}

/// Reads every row the operations wrote and compares, until nothing acknowledged is missing or
/// unreadable, or `limit` passes (slot models may still be catching up after the heal).
pub async fn check_deltas(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    ops: &[DeltaOp],
    limit: Duration,
) -> DeltaCheck {
    let mut rows: Vec<u32> = ops.iter().flat_map(|o| op_rows(o.id)).collect();
    rows.sort_unstable();
    let started = Instant::now();
    loop {
        let (values, error) = read_rows(client, &rows).await;
        let mut c = compare(ops, &values);
        c.read_error = error;
        if c.lost == 0 && c.unreadable == 0 {
            c.converged_ms = Some(started.elapsed().as_millis() as u64);
            c.read_error = None;
            return c;
        }
        if started.elapsed() >= limit {
            locate_losses(js, ops, &mut c, &values).await;
            return c;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Counts, per row, how many stored frames of the model's deltas stream carry it, and the
/// frames in the dead-letter subject. Tells a delta lost before storage from one stored but
/// not applied.
pub async fn stream_tally(
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<(HashMap<u32, u32>, u64, u64)> {
    let stream = js.get_stream(format!("{CLUSTER}-deltas")).await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("{CLUSTER}.delta.{MODEL}.>"),
            ..Default::default()
        })
        .await?;
    let dlq = tessel_node::deltas::dlq_subject(CLUSTER, MODEL);
    let mut rows: HashMap<u32, u32> = HashMap::new();
    let (mut frames, mut dead) = (0u64, 0u64);
    let mut messages = consumer.messages().await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
            Ok(Some(Ok(m))) => {
                if m.subject.as_str() == dlq {
                    dead += 1;
                } else {
                    frames += 1;
                    if let Ok(f) = actors::frame::Frame::decode(&m.payload) {
                        for r in f.rows() {
                            *rows.entry(r).or_insert(0) += 1;
                        }
                    }
                }
                if m.info().map(|i| i.pending).unwrap_or(0) == 0 {
                    break;
                }
            }
            Ok(Some(Err(e))) => anyhow::bail!("reading the deltas stream: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    Ok((rows, frames, dead))
}

/// Adds to a check with lost operations where they were lost.
pub async fn locate_losses(
    js: &async_nats::jetstream::Context,
    ops: &[DeltaOp],
    c: &mut DeltaCheck,
    values: &HashMap<u32, f32>,
) {
    let Ok((stored, frames, dead)) = stream_tally(js).await else {
        return;
    };
    c.stream_frames = frames;
    c.dlq_frames = dead;
    let mut slots = std::collections::BTreeSet::new();
    for op in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        let rows = op_rows(op.id);
        let mut lost = false;
        for r in &rows {
            if values.get(r).is_some_and(|v| *v < 1.0) {
                lost = true;
                slots.insert(u64::from(*r) / crate::workload::ROWS_PER_SLOT);
            }
        }
        if lost
            && rows
                .iter()
                .any(|r| stored.get(r).copied().unwrap_or(0) == 0)
        {
            c.lost_in_stream += 1;
        }
    }
    c.lost_slots = slots.into_iter().take(32).collect();
}

/// The actors' histories against the acknowledged commands.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ActorCheck {
    /// Commands acknowledged.
    pub acked: u64,
    /// Commands whose outcome is unknown.
    pub indeterminate: u64,
    /// Events read.
    pub events: u64,
    /// Acknowledged commands without their event.
    pub lost: u64,
    /// Commands whose event is in a history more than once.
    pub doubled: u64,
    /// Versions not above the one before, or an acknowledged version that differs from its
    /// event's.
    pub version_errors: u64,
    /// Events no command of this run made.
    pub unknown: u64,
    /// A read error, if a history could not be read.
    pub read_error: Option<String>,
    /// A few findings.
    pub examples: Vec<String>,
}

/// Reads one actor's events: (version, n) in stream order.
async fn read_history(
    js: &async_nats::jetstream::Context,
    actor: &str,
) -> anyhow::Result<Vec<(u64, i64)>> {
    let stream = js.get_stream(format!("{CLUSTER}-events")).await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("{CLUSTER}.events.counter.{actor}"),
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    let mut messages = consumer.messages().await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
            Ok(Some(Ok(m))) => {
                let v: Value = serde_json::from_slice(&m.payload)?;
                out.push((
                    v["version"].as_u64().unwrap_or(0),
                    v["data"]["n"].as_i64().unwrap_or(0),
                ));
                if m.info().map(|i| i.pending).unwrap_or(0) == 0 {
                    break;
                }
            }
            Ok(Some(Err(e))) => anyhow::bail!("reading {actor}: {e}"),
            // Nothing (more) to read.
            Ok(None) | Err(_) => break,
        }
    }
    Ok(out)
}

fn note(c: &mut ActorCheck, s: String) {
    if c.examples.len() < EXAMPLES {
        c.examples.push(s);
    }
}

/// Checks every counter's history.
pub async fn check_actors(js: &async_nats::jetstream::Context, ops: &[ActorOp]) -> ActorCheck {
    let mut c = ActorCheck::default();
    let by_n: HashMap<i64, &ActorOp> = ops.iter().map(|o| (o.n, o)).collect();
    for o in ops {
        if o.outcome == Outcome::Ok {
            c.acked += 1;
        } else {
            c.indeterminate += 1;
        }
    }
    for a in 0..ACTORS {
        let actor = format!("c{a}");
        let mut history = Err(anyhow::anyhow!("not read"));
        for _ in 0..5 {
            history = read_history(js, &actor).await;
            if history.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let history = match history {
            Ok(h) => h,
            Err(e) => {
                c.read_error = Some(e.to_string());
                continue;
            }
        };
        c.events += history.len() as u64;
        let mut seen: BTreeMap<i64, u32> = BTreeMap::new();
        let mut last_version = 0u64;
        for (version, n) in &history {
            if *version <= last_version {
                c.version_errors += 1;
                note(
                    &mut c,
                    format!("{actor}: version {version} after {last_version}"),
                );
            }
            last_version = *version;
            *seen.entry(*n).or_insert(0) += 1;
            match by_n.get(n) {
                None => {
                    c.unknown += 1;
                    note(&mut c, format!("{actor}: event n={n} from no command"));
                }
                Some(op) if op.actor != actor => {
                    c.unknown += 1;
                    note(&mut c, format!("{actor}: event n={n} sent to {}", op.actor));
                }
                Some(op) => {
                    if let Some(v) = op.version
                        && v != *version
                    {
                        c.version_errors += 1;
                        note(
                            &mut c,
                            format!(
                                "{actor}: n={n} acknowledged at version {v}, stored at {version}"
                            ),
                        );
                    }
                }
            }
        }
        for op in ops.iter().filter(|o| o.actor == actor) {
            let times = seen.get(&op.n).copied().unwrap_or(0);
            if times > 1 {
                c.doubled += 1;
                note(&mut c, format!("{actor}: n={} stored {times} times", op.n));
            }
            if times == 0 && op.outcome == Outcome::Ok {
                c.lost += 1;
                note(
                    &mut c,
                    format!(
                        "{actor}: n={} sent at {} ms, acknowledged at {} ms, not stored",
                        op.n, op.start_ms, op.end_ms
                    ),
                );
            }
        }
    }
    c
}

/// The longest stretch (ms) within `from..to` in which no operation was acknowledged.
pub fn longest_gap(mut acks: Vec<u64>, from: u64, to: u64) -> u64 {
    acks.retain(|t| (from..=to).contains(t));
    acks.sort_unstable();
    let mut prev = from;
    let mut gap = 0;
    for t in acks {
        gap = gap.max(t - prev);
        prev = t;
    }
    gap.max(to.saturating_sub(prev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: u64, ok: bool) -> DeltaOp {
        DeltaOp {
            id,
            start_ms: 0,
            end_ms: 1,
            outcome: if ok {
                Outcome::Ok
            } else {
                Outcome::Indeterminate("timeout".into())
            },
        }
    }

    #[test]
    fn acknowledged_rows_must_read_one_and_unknown_rows_zero_or_one() {
        let ops = vec![op(0, true), op(1, true), op(2, false), op(3, false)];
        let mut values: HashMap<u32, f32> = HashMap::new();
        for r in op_rows(0) {
            values.insert(r, 1.0);
        }
        // Op 1 lost one row.
        for (i, r) in op_rows(1).into_iter().enumerate() {
            values.insert(r, if i == 3 { 0.0 } else { 1.0 });
        }
        // Op 2 (unknown) applied; op 3 (unknown) applied twice in one row.
        for r in op_rows(2) {
            values.insert(r, 1.0);
        }
        for (i, r) in op_rows(3).into_iter().enumerate() {
            values.insert(r, if i == 0 { 2.0 } else { 0.0 });
        }
        let c = compare(&ops, &values);
        assert_eq!((c.acked, c.indeterminate), (2, 2));
        assert_eq!(c.lost, 1);
        assert_eq!(c.doubled, 1);
        assert_eq!(c.indeterminate_applied, 1);
    }

    #[test]
    fn the_longest_gap_counts_the_edges() {
        assert_eq!(longest_gap(vec![10, 20, 70], 0, 100), 50);
        assert_eq!(longest_gap(vec![], 0, 100), 100);
        assert_eq!(longest_gap(vec![5, 95], 0, 100), 90);
    }
}
