//! The cluster's status, read straight from the buckets (no node needed): the lease, the map,
//! and every membership record.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use cluster::SLOT_COUNT;
use serde::Serialize;

use crate::records;
use crate::store::{LEASE_KEY, MAP_KEY, MAX_MEMBER_KEYS, MAX_MEMBER_RECORD_BYTES, wall_ms};

/// Timeout of one status poll's JetStream requests (`tessel up`, the local cluster): a request
/// about a stream the nodes are still creating goes unanswered, and the next poll should not
/// wait behind it.
pub const POLL_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// The leader as the lease shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeaderStatus {
    /// The holder.
    pub node: String,
    /// Its term.
    pub term: u64,
    /// Time left on the lease by the holder's record (informative).
    pub expires_in_ms: u64,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeStatusRow {
    /// Its id.
    pub id: String,
    /// Its status (`Failed` for a node the map names but that has no live record).
    pub status: String,
    /// Slots the current map gives it.
    pub slots: usize,
    /// Its capacity weight (0 when unknown).
    pub capacity: u64,
    /// Its devices.
    pub devices: Vec<records::DeviceRecord>,
    /// Its HTTP address.
    pub addr: Option<String>,
}

/// What `tessel status --json` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// The cluster name.
    pub cluster: String,
    /// The leader, if a valid lease exists.
    pub leader: Option<LeaderStatus>,
    /// The map's epoch (0 if none).
    pub map_epoch: u64,
    /// The map's term (0 if none).
    pub map_term: u64,
    /// The map key's revision (0 if none).
    pub map_revision: u64,
    /// Slots without an owner.
    pub unowned_slots: usize,
    /// The owner of every slot (empty strings for none), for tools that compare maps.
    #[serde(skip)]
    pub owners: Vec<Option<String>>,
    /// The nodes.
    pub nodes: Vec<NodeStatusRow>,
}

impl ClusterStatus {
    /// Whether there is a leader, no unowned slot, and every owner is an Active node.
    pub fn settled(&self) -> bool {
        self.leader.is_some()
            && self.unowned_slots == 0
            && self.map_term == self.leader.as_ref().map_or(0, |l| l.term)
            && self
                .nodes
                .iter()
                .all(|n| n.slots == 0 || n.status == "Active")
    }

    /// Whether it is [`settled`](Self::settled) with exactly `ids` (in order) owning slots.
    pub fn settled_on(&self, ids: &[&str]) -> bool {
        self.settled()
            && self
                .counts()
                .keys()
                .map(String::as_str)
                .eq(ids.iter().copied())
    }

    /// Slots per owner.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for o in self.owners.iter().flatten() {
            *c.entry(o.clone()).or_insert(0) += 1;
        }
        c
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let leader = match &self.leader {
            Some(l) => format!("{} (term {}, {} ms left)", l.node, l.term, l.expires_in_ms),
            None => "none".into(),
        };
        out.push_str(&format!(
            "cluster {}  leader {}  map epoch {} (term {})  unowned slots {}\n",
            self.cluster, leader, self.map_epoch, self.map_term, self.unowned_slots
        ));
        out.push_str(&format!(
            "{:<24} {:<9} {:>6} {:>8}  devices\n",
            "NODE", "STATUS", "SLOTS", "CAPACITY"
        ));
        for n in &self.nodes {
            let devices: Vec<String> = n
                .devices
                .iter()
                .map(|d| format!("{}:{}", d.kind, d.name))
                .collect();
            out.push_str(&format!(
                "{:<24} {:<9} {:>6} {:>8}  {}\n",
                n.id,
                n.status,
                n.slots,
                n.capacity,
                devices.join(", ")
            ));
        }
        out
    }
}

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {what}: {message}")]
pub struct StatusError {
    what: &'static str,
    message: String,
}

fn err(what: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> StatusError {
    move |e| StatusError {
        what,
        message: e.to_string(),
    }
}

/// Reads the status of `cluster` from its buckets.
pub async fn read(
    js: &async_nats::jetstream::Context,
    cluster: &str,
) -> Result<ClusterStatus, StatusError> {
    let control = js
        .get_key_value(crate::store::control_bucket(cluster))
        .await
        .map_err(|e| err("the control bucket")(&e))?;
    let nodes = js
        .get_key_value(crate::store::nodes_bucket(cluster))
        .await
        .map_err(|e| err("the membership bucket")(&e))?;
    let max = 8 << 20;
    let leader = match control
        .entry(LEASE_KEY)
        .await
        .map_err(|e| err("the lease")(&e))?
    {
        Some(e) if e.operation == kv::Operation::Put => {
            let record: Option<records::LeaseRecord> = serde_json::from_slice(&e.value).ok();
            match (records::parse_lease(&e.value, e.revision, max), record) {
                (Ok(entry), Some(r)) => Some(LeaderStatus {
                    node: entry.holder.to_string(),
                    term: entry.term.0,
                    expires_in_ms: r.expires_at_ms.saturating_sub(wall_ms()),
                }),
                _ => None,
            }
        }
        _ => None,
    };
    let (mut map_epoch, mut map_term, mut map_revision) = (0, 0, 0);
    let mut owners: Vec<Option<String>> = vec![None; SLOT_COUNT];
    if let Some(e) = control
        .entry(MAP_KEY)
        .await
        .map_err(|e| err("the map")(&e))?
    {
        map_revision = e.revision;
        if e.operation == kv::Operation::Put
            && let Ok(map) = records::parse_map(&e.value, e.revision, max)
        {
            map_epoch = map.epoch().0;
            map_term = map.term().0;
            owners = map
                .owners()
                .iter()
                .map(|o| o.as_ref().map(|n| n.to_string()))
                .collect();
        }
    }
    let unowned_slots = owners.iter().filter(|o| o.is_none()).count();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for o in owners.iter().flatten() {
        *counts.entry(o.clone()).or_insert(0) += 1;
    }
    let mut rows: BTreeMap<String, NodeStatusRow> = BTreeMap::new();
    let bucket = crate::store::nodes_bucket(cluster);
    let (entries, _) = crate::store::list_entries(js, &nodes, &bucket, MAX_MEMBER_KEYS)
        .await
        .map_err(|e| err("the membership keys")(&e))?;
    for e in entries {
        if e.operation != kv::Operation::Put {
            continue;
        }
        let key = e.key.clone();
        if let Ok((_, info, r)) = records::parse_member(&e.value, &key, MAX_MEMBER_RECORD_BYTES) {
            rows.insert(
                key.clone(),
                NodeStatusRow {
                    id: key.clone(),
                    status: info.status.as_str().to_string(),
                    slots: counts.get(&key).copied().unwrap_or(0),
                    capacity: r.capacity,
                    devices: r.devices,
                    addr: r.addr,
                },
            );
        }
    }
    for (owner, slots) in &counts {
        rows.entry(owner.clone()).or_insert_with(|| NodeStatusRow {
            id: owner.clone(),
            status: "Failed".into(),
            slots: *slots,
            capacity: 0,
            devices: vec![],
            addr: None,
        });
    }
    Ok(ClusterStatus {
        cluster: cluster.to_string(),
        leader,
        map_epoch,
        map_term,
        map_revision,
        unowned_slots,
        owners,
        nodes: rows.into_values().collect(),
    })
}
