//! The JSON records of the coordination buckets, and their validation.
//!
//! Every record carries `"v": 1`. Parsing is strict: unknown fields, another schema version,
//! wrong types, oversized values, invalid node ids or a map without exactly 1024 owners are all
//! typed errors; the caller logs and counts them and never adopts the record.

use cluster::core::{LeaseEntry, MemberInfo};
use cluster::{Epoch, NodeId, NodeStatus, SLOT_COUNT, ShardMap, Term, Weight};
use serde::{Deserialize, Serialize};

/// The schema version of every record.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Larger than the configured limit.
    #[error("record of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON of the expected shape.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// Another schema version.
    #[error("unsupported schema version {0}")]
    Version(u32),
    /// A value inside broke a rule.
    #[error("invalid record: {0}")]
    Invalid(String),
}

/// The lease record, key `leader` of `<c>-control`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRecord {
    /// Schema version.
    pub v: u32,
    /// The holder.
    pub node: String,
    /// The term; null in the creating write (the term is then the record's own revision).
    pub term: Option<u64>,
    /// When the lease expires unless renewed, by the writer's wall clock (informative only: the
    /// server's TTL is what counts).
    pub expires_at_ms: u64,
}

/// The shard map record, key `map` of `<c>-control`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapRecord {
    /// Schema version.
    pub v: u32,
    /// The map's epoch.
    pub epoch: u64,
    /// The term of the leader that wrote it.
    pub term: u64,
    /// The owner of each slot, in slot order: exactly 1024 entries.
    pub owners: Vec<Option<String>>,
}

/// One device as a membership record reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// `cpu` or `cuda`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Total memory.
    pub memory_total_bytes: u64,
    /// Free memory when reported.
    pub memory_free_bytes: u64,
    /// CUDA compute capability (`"9.0"`), null for the CPU.
    pub compute_capability: Option<String>,
}

/// A membership record, key `<node id>` of `<c>-nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRecord {
    /// Schema version.
    pub v: u32,
    /// The node's id (must equal the key).
    pub id: String,
    /// `Joining`, `Active`, `Draining`, `Failed` or `Left`.
    pub status: String,
    /// Capacity weight.
    pub capacity: u64,
    /// The node's devices.
    pub devices: Vec<DeviceRecord>,
    /// The node's HTTP address, if it serves one.
    pub addr: Option<String>,
    /// When the node process started, by its wall clock.
    pub started_at_ms: u64,
}

/// Most devices a record may list.
pub const MAX_DEVICES: usize = 64;

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], max: usize) -> Result<T, RecordError> {
    if bytes.len() > max {
        return Err(RecordError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))
}

fn version(v: u32) -> Result<(), RecordError> {
    if v == SCHEMA_VERSION {
        Ok(())
    } else {
        Err(RecordError::Version(v))
    }
}

fn node_id(s: &str) -> Result<NodeId, RecordError> {
    NodeId::new(s).map_err(|e| RecordError::Invalid(format!("node id {s:?}: {e}")))
}

/// Decodes a lease record stored at `revision`; the term must not exceed the revision.
pub fn parse_lease(bytes: &[u8], revision: u64, max: usize) -> Result<LeaseEntry, RecordError> {
    let r: LeaseRecord = decode(bytes, max)?;
    version(r.v)?;
    let holder = node_id(&r.node)?;
    let term = r.term.unwrap_or(revision);
    if term == 0 || term > revision {
        return Err(RecordError::Invalid(format!(
            "term {term} at revision {revision}"
        )));
    }
    Ok(LeaseEntry {
        holder,
        term: Term(term),
    })
}

/// Decodes a shard map stored at `revision`.
pub fn parse_map(bytes: &[u8], revision: u64, max: usize) -> Result<ShardMap, RecordError> {
    let r: MapRecord = decode(bytes, max)?;
    version(r.v)?;
    if r.owners.len() != SLOT_COUNT {
        return Err(RecordError::Invalid(format!(
            "{} owners, not {SLOT_COUNT}",
            r.owners.len()
        )));
    }
    if r.term == 0 || r.term > revision {
        return Err(RecordError::Invalid(format!(
            "term {} at revision {revision}",
            r.term
        )));
    }
    if r.epoch == 0 {
        return Err(RecordError::Invalid("epoch 0".into()));
    }
    let mut owners = Vec::with_capacity(SLOT_COUNT);
    for o in &r.owners {
        owners.push(match o {
            Some(s) => Some(node_id(s)?),
            None => None,
        });
    }
    ShardMap::new(Epoch(r.epoch), Term(r.term), owners)
        .map_err(|e| RecordError::Invalid(e.to_string()))
}

/// Decodes a membership record stored under `key`.
pub fn parse_member(
    bytes: &[u8],
    key: &str,
    max: usize,
) -> Result<(NodeId, MemberInfo, MemberRecord), RecordError> {
    let r: MemberRecord = decode(bytes, max)?;
    version(r.v)?;
    let id = node_id(&r.id)?;
    if r.id != key {
        return Err(RecordError::Invalid(format!(
            "record of {:?} under key {key:?}",
            r.id
        )));
    }
    let status =
        NodeStatus::parse(&r.status).map_err(|e| RecordError::Invalid(format!("status: {e}")))?;
    let weight =
        Weight::new(r.capacity).map_err(|e| RecordError::Invalid(format!("capacity: {e}")))?;
    if r.devices.len() > MAX_DEVICES {
        return Err(RecordError::Invalid(format!("{} devices", r.devices.len())));
    }
    Ok((id, MemberInfo { status, weight }, r))
}

/// Encodes a shard map.
pub fn encode_map(map: &ShardMap) -> Vec<u8> {
    let r = MapRecord {
        v: SCHEMA_VERSION,
        epoch: map.epoch().0,
        term: map.term().0,
        owners: map
            .owners()
            .iter()
            .map(|o| o.as_ref().map(|n| n.to_string()))
            .collect(),
    };
    serde_json::to_vec(&r).unwrap_or_default()
}

/// Encodes a lease record.
pub fn encode_lease(node: &NodeId, term: Option<u64>, expires_at_ms: u64) -> Vec<u8> {
    let r = LeaseRecord {
        v: SCHEMA_VERSION,
        node: node.to_string(),
        term,
        expires_at_ms,
    };
    serde_json::to_vec(&r).unwrap_or_default()
}

/// Encodes a membership record.
pub fn encode_member(r: &MemberRecord) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

/// The devices of this node as records.
pub fn device_records(devices: &[gpu::Device]) -> Vec<DeviceRecord> {
    devices
        .iter()
        .take(MAX_DEVICES)
        .map(|d| DeviceRecord {
            kind: d.kind.as_str().to_string(),
            name: d.name.clone(),
            memory_total_bytes: d.memory_total_bytes,
            memory_free_bytes: d.memory_free_bytes,
            compute_capability: d.compute_capability_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 256 * 1024;

    #[test]
    fn lease_round_trip_and_garbage() {
        let n = NodeId::new("a").unwrap();
        let bytes = encode_lease(&n, None, 5);
        assert_eq!(
            parse_lease(&bytes, 7, MAX).unwrap(),
            LeaseEntry {
                holder: n.clone(),
                term: Term(7)
            }
        );
        let bytes = encode_lease(&n, Some(3), 5);
        assert_eq!(parse_lease(&bytes, 7, MAX).unwrap().term, Term(3));
        for bad in [
            &b"not json"[..],
            br#"{"v":2,"node":"a","term":1,"expires_at_ms":0}"#,
            br#"{"v":1,"node":"a","term":1,"expires_at_ms":0,"extra":1}"#,
            br#"{"v":1,"node":"a b","term":1,"expires_at_ms":0}"#,
            br#"{"v":1,"node":"a","term":18446744073709551615,"expires_at_ms":0}"#,
            br#"{"v":1,"node":"a","term":-1,"expires_at_ms":0}"#,
        ] {
            assert!(
                parse_lease(bad, 7, MAX).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            parse_lease(&vec![b' '; 300], 7, 100),
            Err(RecordError::TooLarge { .. })
        ));
    }

    #[test]
    fn map_round_trip_and_garbage() {
        let owners = (0..SLOT_COUNT)
            .map(|i| Some(NodeId::new(&format!("n{}", i % 3)).unwrap()))
            .collect();
        let map = ShardMap::new(Epoch(4), Term(9), owners).unwrap();
        let bytes = encode_map(&map);
        assert_eq!(parse_map(&bytes, 12, MAX).unwrap(), map);
        assert!(parse_map(&bytes, 8, MAX).is_err(), "term above revision");
        let short = serde_json::to_vec(&MapRecord {
            v: 1,
            epoch: 1,
            term: 1,
            owners: vec![None; 1000],
        })
        .unwrap();
        assert!(matches!(
            parse_map(&short, 5, MAX),
            Err(RecordError::Invalid(_))
        ));
        let bad_id = serde_json::to_vec(&MapRecord {
            v: 1,
            epoch: 1,
            term: 1,
            owners: vec![Some("x/y".into()); SLOT_COUNT],
        })
        .unwrap();
        assert!(parse_map(&bad_id, 5, MAX).is_err());
    }

    #[test]
    fn member_must_match_its_key() {
        let r = MemberRecord {
            v: 1,
            id: "a".into(),
            status: "Active".into(),
            capacity: 2,
            devices: vec![],
            addr: None,
            started_at_ms: 1,
        };
        let bytes = encode_member(&r);
        let (id, info, _) = parse_member(&bytes, "a", MAX).unwrap();
        assert_eq!(
            (id.as_str(), info.status, info.weight.get()),
            ("a", NodeStatus::Active, 2)
        );
        assert!(parse_member(&bytes, "b", MAX).is_err());
        let bad = encode_member(&MemberRecord {
            status: "Zombie".into(),
            ..r.clone()
        });
        assert!(parse_member(&bad, "a", MAX).is_err());
        let bad = encode_member(&MemberRecord { capacity: 0, ..r });
        assert!(parse_member(&bad, "a", MAX).is_err());
    }
}
