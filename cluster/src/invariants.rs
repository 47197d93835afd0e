//! The invariants of one node's state, checked after every `apply` in tests and the simulator.
//!
//! From seed 002, made checkable on one node's view (the simulator checks the cross-node forms
//! over all nodes and the KV):
//! - **I1** at most one leader per term: a leader's lease view names itself at its own term;
//! - **I2** all slots owned once settled: every map a leader wrote owns all 1024 slots;
//! - **I3** slots only on healthy nodes: a proposed map uses only nodes Active at proposal;
//! - **I4** assignments stable during a lease: a node hosts exactly the adopted map's slots;
//! - **I5** the leader is an active node;
//! - **term rule**: no leader below the highest term seen, and an adopted map of a lower term
//!   was written before that term began.

use crate::core::{HEARTBEATS_IN_FLIGHT, LeaseEntry, State};
use crate::types::{NodeStatus, SlotSet};

/// A broken invariant, with what was seen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// I1: the leader's lease view does not name it at its term.
    #[error("I1: leader of term {term} sees lease {seen:?}")]
    LeaderLeaseMismatch {
        /// The leader's term.
        term: u64,
        /// The lease it sees.
        seen: Option<LeaseEntry>,
    },
    /// I2: an adopted map leaves slots unowned.
    #[error("I2: map epoch {epoch} leaves {unowned} slots unowned")]
    UnownedSlots {
        /// The map's epoch.
        epoch: u64,
        /// How many slots have no owner.
        unowned: usize,
    },
    /// I3: a proposal places slots on a node that was not Active.
    #[error("I3: map epoch {epoch} places slots on {node}, which is not Active")]
    PlacedOnInactive {
        /// The proposal's epoch.
        epoch: u64,
        /// The node.
        node: String,
    },
    /// I4: the hosted slots differ from the adopted map's.
    #[error("I4: hosting {hosted:?} but the map gives {owned:?}")]
    HostedMismatch {
        /// What the node hosts.
        hosted: Box<SlotSet>,
        /// What the map gives it.
        owned: Box<SlotSet>,
    },
    /// I5: a leader that is not Active.
    #[error("I5: leader is {0:?}, not Active")]
    LeaderNotActive(NodeStatus),
    /// The term rule: a leader below the highest term seen.
    #[error("term rule: leading term {term} after seeing term {highest}")]
    LeaderBehind {
        /// The leader's term.
        term: u64,
        /// The highest term seen.
        highest: u64,
    },
    /// The term rule: an adopted map of a lower term written after a higher term began.
    #[error(
        "term rule: adopted map of term {map_term} at revision {revision}, after term {highest} began"
    )]
    StaleMapAdopted {
        /// The map's term.
        map_term: u64,
        /// Its revision.
        revision: u64,
        /// The highest term seen.
        highest: u64,
    },
    /// A bounded collection outgrew its limit.
    #[error("limit: {what} holds {len}, more than {max}")]
    OverLimit {
        /// Which collection.
        what: &'static str,
        /// Its size.
        len: usize,
        /// Its limit.
        max: usize,
    },
}

/// Checks every invariant of one node's state; returns the first one broken.
pub fn check(s: &State) -> Result<(), Violation> {
    if let Some(l) = s.leadership {
        let mine = LeaseEntry {
            holder: s.me.clone(),
            term: l.term,
        };
        if s.lease.as_ref() != Some(&mine) {
            return Err(Violation::LeaderLeaseMismatch {
                term: l.term.0,
                seen: s.lease.clone(),
            });
        }
        if s.status != NodeStatus::Active {
            return Err(Violation::LeaderNotActive(s.status));
        }
        if l.term != s.highest_term {
            return Err(Violation::LeaderBehind {
                term: l.term.0,
                highest: s.highest_term.0,
            });
        }
    }
    if s.map.epoch().0 > 0 && s.map.unowned() > 0 {
        return Err(Violation::UnownedSlots {
            epoch: s.map.epoch().0,
            unowned: s.map.unowned(),
        });
    }
    if s.map.term() < s.highest_term && s.map_revision.0 > s.highest_term.0 {
        return Err(Violation::StaleMapAdopted {
            map_term: s.map.term().0,
            revision: s.map_revision.0,
            highest: s.highest_term.0,
        });
    }
    if let Some(w) = &s.map_op
        && let Some(node) = w
            .proposal
            .owners()
            .iter()
            .flatten()
            .find(|o| !w.active.contains(o))
    {
        return Err(Violation::PlacedOnInactive {
            epoch: w.proposal.epoch().0,
            node: node.to_string(),
        });
    }
    if !s.exited {
        let owned = s.owned();
        if owned != s.hosted {
            return Err(Violation::HostedMismatch {
                hosted: Box::new(s.hosted),
                owned: Box::new(owned),
            });
        }
    }
    if s.members.len() > s.config.max_members {
        return Err(Violation::OverLimit {
            what: "members",
            len: s.members.len(),
            max: s.config.max_members,
        });
    }
    if s.heartbeats.len() > HEARTBEATS_IN_FLIGHT {
        return Err(Violation::OverLimit {
            what: "heartbeats",
            len: s.heartbeats.len(),
            max: HEARTBEATS_IN_FLIGHT,
        });
    }
    Ok(())
}
