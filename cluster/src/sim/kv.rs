//! A simulated JetStream KV bucket with the semantics tessel relies on: one sequence for every
//! key (revisions compare across keys), compare-and-set on a key's last revision, per-key TTL
//! with an expiry marker that takes a new revision, deletes that take a revision, and an atomic
//! two-key write (lease renewal + map) that is all or nothing.

use std::collections::BTreeMap;

use crate::core::MemberInfo;
use crate::shard_map::ShardMap;
use crate::types::{NodeId, Term};

/// A key of the control bucket.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Key {
    /// The leader lease.
    Lease,
    /// The shard map.
    Map,
    /// A node's membership record.
    Member(NodeId),
}

/// A stored value.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Value {
    /// The lease: its holder, and its term once a renewal has written it (the creating write
    /// cannot know its own revision; readers use the revision then).
    Lease {
        /// The holder.
        holder: NodeId,
        /// The term, if written.
        term: Option<Term>,
    },
    /// The shard map.
    Map(ShardMap),
    /// A membership record.
    Member(MemberInfo),
    /// Bytes no node can read (a hostile or broken writer).
    Garbage,
}

/// How long an expiry marker stays before the server removes it (after which the key has no
/// message at all and reads as revision 0), like JetStream's `subject_delete_marker_ttl`.
pub const MARKER_TTL_MS: u64 = 1_000;

/// How a key changed, as a watcher sees it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Op {
    /// Written.
    Put,
    /// Deleted (tombstone).
    Delete,
    /// Expired (TTL marker).
    Purge,
}

/// One change, delivered to every watcher.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Change {
    /// The key.
    pub key: Key,
    /// Its new value (None after a delete or expiry).
    pub value: Option<Value>,
    /// The revision of the change.
    pub revision: u64,
    /// What happened.
    pub op: Op,
}

#[derive(Clone, Debug)]
struct Entry {
    last_seq: u64,
    value: Option<Value>,
    /// The revision at which the current value was created (resolves a lease's term).
    created_seq: u64,
    expires_at_ms: Option<u64>,
}

/// A write refused because a key's revision was not the expected one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct WrongRevision;

/// The bucket.
#[derive(Clone, Debug, Default)]
pub struct Kv {
    seq: u64,
    keys: BTreeMap<Key, Entry>,
}

impl Kv {
    /// The latest sequence of the bucket.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// A key's value and revision (0 if never written), after expiring what is due.
    pub fn get(&self, key: &Key) -> (Option<Value>, u64) {
        match self.keys.get(key) {
            Some(e) => (e.value.clone(), e.last_seq),
            None => (None, 0),
        }
    }

    /// The revision at which a key's current value was created.
    pub fn created(&self, key: &Key) -> u64 {
        self.keys.get(key).map_or(0, |e| e.created_seq)
    }

    /// The lease's resolved holder and term, if live.
    pub fn lease(&self) -> Option<(NodeId, Term)> {
        match self.keys.get(&Key::Lease) {
            Some(Entry {
                value: Some(Value::Lease { holder, term }),
                created_seq,
                ..
            }) => Some((holder.clone(), term.unwrap_or(Term(*created_seq)))),
            _ => None,
        }
    }

    /// The live membership records.
    pub fn members(&self) -> Vec<(NodeId, MemberInfo, u64)> {
        self.keys
            .iter()
            .filter_map(|(k, e)| match (k, &e.value) {
                (Key::Member(id), Some(Value::Member(info))) => {
                    Some((id.clone(), *info, e.last_seq))
                }
                _ => None,
            })
            .collect()
    }

    /// The earliest expiry still pending, if any.
    pub fn next_expiry(&self) -> Option<u64> {
        self.keys.values().filter_map(|e| e.expires_at_ms).min()
    }

    /// Writes expiry markers for every key whose TTL ran out by `now_ms`.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Change> {
        let due: Vec<Key> = self
            .keys
            .iter()
            .filter(|(_, e)| e.expires_at_ms.is_some_and(|t| t <= now_ms))
            .map(|(k, _)| k.clone())
            .collect();
        let mut changes = Vec::new();
        for key in due {
            let marker = self.keys.get(&key).is_some_and(|e| e.value.is_none());
            if marker {
                // The marker's own TTL ran out: the key disappears without a new revision.
                self.keys.remove(&key);
            } else {
                changes.push(self.write(key, None, Some(now_ms + MARKER_TTL_MS), Op::Purge));
            }
        }
        changes
    }

    fn check(&self, key: &Key, expected: Option<u64>) -> Result<(), WrongRevision> {
        match expected {
            Some(rev) if self.get(key).1 != rev => Err(WrongRevision),
            _ => Ok(()),
        }
    }

    fn write(&mut self, key: Key, value: Option<Value>, ttl_ms: Option<u64>, op: Op) -> Change {
        self.seq += 1;
        let seq = self.seq;
        let entry = self.keys.entry(key.clone()).or_insert(Entry {
            last_seq: 0,
            value: None,
            created_seq: 0,
            expires_at_ms: None,
        });
        if entry.value.is_none() {
            entry.created_seq = seq;
        }
        entry.last_seq = seq;
        entry.value = value.clone();
        entry.expires_at_ms = ttl_ms;
        Change {
            key,
            value,
            revision: seq,
            op,
        }
    }

    /// Puts a value if the key's revision is `expected` (any revision when None). `expires_at_ms`
    /// is the absolute expiry, when the value has a TTL.
    pub fn put(
        &mut self,
        key: Key,
        value: Value,
        expires_at_ms: Option<u64>,
        expected: Option<u64>,
    ) -> Result<Change, WrongRevision> {
        self.check(&key, expected)?;
        Ok(self.write(key, Some(value), expires_at_ms, Op::Put))
    }

    /// Deletes a key if its revision is `expected` (any when None).
    pub fn delete(&mut self, key: Key, expected: Option<u64>) -> Result<Change, WrongRevision> {
        self.check(&key, expected)?;
        Ok(self.write(key, None, None, Op::Delete))
    }

    /// Writes several keys at once: every expected revision is checked first, and either all are
    /// written or none.
    pub fn batch(
        &mut self,
        writes: Vec<(Key, Value, Option<u64>, Option<u64>)>,
    ) -> Result<Vec<Change>, WrongRevision> {
        for (key, _, _, expected) in &writes {
            self.check(key, *expected)?;
        }
        Ok(writes
            .into_iter()
            .map(|(key, value, expires, _)| self.write(key, Some(value), expires, Op::Put))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str) -> Value {
        Value::Lease {
            holder: NodeId::new(holder).unwrap(),
            term: None,
        }
    }

    #[test]
    fn cas_ttl_and_markers() {
        let mut kv = Kv::default();
        let c = kv.put(Key::Lease, lease("a"), Some(1000), Some(0)).unwrap();
        assert_eq!(c.revision, 1);
        assert_eq!(
            kv.put(Key::Lease, lease("b"), Some(1000), Some(0)),
            Err(WrongRevision)
        );
        assert_eq!(kv.lease().map(|(_, t)| t), Some(Term(1)));
        assert!(kv.expire(999).is_empty());
        let marks = kv.expire(1000);
        assert_eq!(marks.len(), 1);
        assert_eq!(marks[0].op, Op::Purge);
        assert_eq!(kv.get(&Key::Lease), (None, 2));
        // The next holder expects the marker's revision, and its term is its creation revision.
        kv.put(Key::Lease, lease("b"), Some(3000), Some(2)).unwrap();
        assert_eq!(kv.lease().map(|(_, t)| t), Some(Term(3)));
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let mut kv = Kv::default();
        kv.put(Key::Lease, lease("a"), None, Some(0)).unwrap();
        let map = Value::Map(ShardMap::empty());
        let before = kv.seq();
        let refused = kv.batch(vec![
            (Key::Lease, lease("a"), None, Some(99)),
            (Key::Map, map.clone(), None, Some(0)),
        ]);
        assert_eq!(refused, Err(WrongRevision));
        assert_eq!(kv.seq(), before);
        assert_eq!(kv.get(&Key::Map), (None, 0));
        let ok = kv
            .batch(vec![
                (Key::Lease, lease("a"), None, Some(1)),
                (Key::Map, map, None, Some(0)),
            ])
            .unwrap();
        assert_eq!(ok.len(), 2);
    }
}
