//! Property tests of the core's state machine over random command sequences.
//!
//! Commands are drawn as raw numbers and interpreted against the current state, so that most of
//! them are plausible (a reply to the request really in flight, a revision just above the known
//! one) and the rest are garbage (unknown request ids, old revisions, maps of any shape). Either
//! way: the core never panics, a refused command changes nothing, folding `apply` over the
//! emitted events gives the state `step` gives, and the invariants hold after every event.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use cluster::core::{
    self, Command, CoreConfig, Gone, Input, KvOutcome, LeaseEntry, MapOutcome, MemberInfo, OpId,
    State,
};
use cluster::invariants;
use cluster::{Epoch, NodeId, NodeStatus, Revision, SLOT_COUNT, ShardMap, Term, Weight};
use proptest::prelude::*;

const POOL: usize = 5;

fn id(i: usize) -> NodeId {
    NodeId::new(&format!("n{}", i % POOL)).unwrap()
}

fn status(i: u8) -> NodeStatus {
    match i % 5 {
        0 => NodeStatus::Joining,
        1 => NodeStatus::Active,
        2 => NodeStatus::Draining,
        3 => NodeStatus::Failed,
        _ => NodeStatus::Left,
    }
}

/// One drawn command, interpreted against the state by [`realise`].
#[derive(Clone, Debug)]
struct Raw {
    advance_ms: u16,
    kind: u8,
    a: u64,
    b: u64,
    c: u64,
    plausible: bool,
    owners: Vec<u8>,
}

fn raw() -> impl Strategy<Value = Raw> {
    (
        0u16..700,
        0u8..13,
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        prop::bool::weighted(0.85),
        prop::collection::vec(0u8..8, 0..3),
    )
        .prop_map(|(advance_ms, kind, a, b, c, plausible, owners)| Raw {
            advance_ms,
            kind,
            a,
            b,
            c,
            plausible,
            owners,
        })
}

/// A map whose owners cycle through `pattern` (values ≥ POOL mean no owner).
fn map_of(epoch: u64, term: u64, pattern: &[u8]) -> ShardMap {
    let owners = (0..SLOT_COUNT)
        .map(|s| {
            if pattern.is_empty() {
                Some(id(s))
            } else {
                let p = pattern[s % pattern.len()] as usize;
                (p < POOL).then(|| id(p))
            }
        })
        .collect();
    ShardMap::new(Epoch(epoch), Term(term), owners).unwrap()
}

fn outcome(sel: u64, revision: Revision) -> KvOutcome {
    match sel % 4 {
        0 | 1 => KvOutcome::Written { revision },
        2 => KvOutcome::WrongRevision,
        _ => KvOutcome::Failed,
    }
}

/// Turns a drawn command into an input for this state.
fn realise(s: &State, r: &Raw, kv_revision: &mut u64) -> Input {
    // Plausible revisions move forward like a real KV's; garbage ones are anywhere.
    let revision = if r.plausible {
        *kv_revision += 1 + r.c % 3;
        Revision(*kv_revision)
    } else {
        Revision(r.c % 64)
    };
    let op = |inflight: Option<OpId>| match inflight {
        Some(op) if r.plausible => op,
        _ => OpId(r.a % 64),
    };
    match r.kind {
        0 => Input::Start,
        1..=3 => Input::Tick,
        4 => {
            if r.a.is_multiple_of(8) {
                Input::Drain
            } else {
                Input::Tick
            }
        }
        5 => {
            let entry = (!r.a.is_multiple_of(3)).then(|| LeaseEntry {
                holder: id(r.b as usize),
                term: if r.plausible {
                    Term(revision.0)
                } else {
                    Term(r.b % 64)
                },
            });
            Input::LeaseSeen { entry, revision }
        }
        6 => Input::LeaseReply {
            op: op(s.lease_op.map(|o| o.op)),
            outcome: outcome(r.b, revision),
        },
        7 => {
            let map = (!r.a.is_multiple_of(5)).then(|| {
                let epoch = if r.plausible {
                    s.map.epoch().0 + 1
                } else {
                    r.b % 8
                };
                let pattern: Vec<u8> = if r.plausible {
                    // Owners a leader could have chosen: registered members (or this node).
                    let known: Vec<u8> = (0..POOL as u8)
                        .filter(|i| {
                            s.members.contains_key(&id(*i as usize)) || id(*i as usize) == s.me
                        })
                        .collect();
                    r.owners
                        .iter()
                        .map(|o| known[*o as usize % known.len()])
                        .collect()
                } else {
                    r.owners.clone()
                };
                map_of(
                    epoch,
                    if r.plausible {
                        s.highest_term.0
                    } else {
                        r.b % 64
                    },
                    &pattern,
                )
            });
            Input::MapSeen { map, revision }
        }
        8 => Input::MapReply {
            op: op(s.map_op.as_ref().map(|w| w.op)),
            outcome: match r.b % 3 {
                0 => MapOutcome::Written {
                    map_revision: revision,
                    lease_revision: Revision(revision.0 + 1),
                },
                1 => MapOutcome::Refused,
                _ => MapOutcome::Failed,
            },
        },
        9 => {
            let record = match r.b % 4 {
                0 => Err(if r.b.is_multiple_of(8) {
                    Gone::Expired
                } else {
                    Gone::Deleted
                }),
                _ => Ok(MemberInfo {
                    status: if r.plausible {
                        NodeStatus::Active
                    } else {
                        status(r.b as u8)
                    },
                    weight: Weight::new(1 + r.c % 4).unwrap(),
                }),
            };
            Input::MemberSeen {
                node: id(r.a as usize),
                record,
                revision,
            }
        }
        10 => {
            let entries = (0..POOL)
                .filter(|i| r.a >> i & 1 == 1)
                .map(|i| {
                    let st = if r.plausible {
                        NodeStatus::Active
                    } else {
                        status((r.b >> (3 * i)) as u8)
                    };
                    (
                        id(i),
                        MemberInfo {
                            status: st,
                            weight: Weight::ONE,
                        },
                        Revision(revision.0.saturating_sub(i as u64)),
                    )
                })
                .collect();
            Input::MembersListed {
                entries,
                as_of: revision,
            }
        }
        12 => Input::LeaseUnreadable { revision },
        _ => Input::HeartbeatReply {
            op: op(s.heartbeats.last().map(|h| h.0)),
            outcome: outcome(r.b, revision),
        },
    }
}

fn fresh(me: usize) -> State {
    let config = CoreConfig {
        lease_ttl_ms: 1_000,
        lease_renew_interval_ms: 300,
        lease_margin_ms: 100,
        member_ttl_ms: 1_000,
        heartbeat_interval_ms: 300,
        request_timeout_ms: 300,
        sync_interval_ms: 500,
        ..CoreConfig::default()
    };
    State::new(id(me), Weight::ONE, config).unwrap()
}

/// Drives one core through the drawn commands, checking every property at every step.
fn drive(me: usize, script: &[Raw]) -> Result<(), TestCaseError> {
    let mut s = fresh(me);
    let mut now_ms = 0u64;
    let mut kv_revision = 0u64;
    for r in script {
        now_ms += u64::from(r.advance_ms);
        let input = realise(&s, r, &mut kv_revision);
        let cmd = Command { now_ms, input };
        match core::decide(&s, &cmd) {
            Err(_) => {
                // A refused command emits nothing and changes nothing.
                let mut again = s.clone();
                prop_assert!(core::step(&mut again, &cmd).is_err());
                prop_assert_eq!(&again, &s);
            }
            Ok(events) => {
                let mut folded = s.clone();
                for ev in &events {
                    folded = core::apply(folded, ev);
                    let _actions = core::plan(&folded, ev);
                    if let Err(v) = invariants::check(&folded) {
                        return Err(TestCaseError::fail(format!(
                            "{v:?} after {ev:?} (command {cmd:?})"
                        )));
                    }
                }
                let mut stepped = s.clone();
                let step = core::step(&mut stepped, &cmd)
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(&step.events, &events);
                prop_assert_eq!(&stepped, &folded);
                s = folded;
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_command_sequence_keeps_the_invariants(me in 0usize..POOL, script in prop::collection::vec(raw(), 1..200)) {
        drive(me, &script)?;
    }

    /// Time only, no answers from the KV: requests time out and are retried, and no rule breaks.
    #[test]
    fn time_alone_never_breaks_a_rule(me in 0usize..POOL, gaps in prop::collection::vec(1u16..200, 50..150)) {
        let script: Vec<Raw> = gaps.iter().enumerate().map(|(i, g)| Raw {
            advance_ms: *g, kind: if i == 0 { 0 } else { 1 }, a: 1, b: 0, c: 0, plausible: true, owners: vec![],
        }).collect();
        drive(me, &script)?;
    }
}

/// A core whose whole KV conversation is answered faithfully (a single-node cluster with a
/// perfect KV) becomes Active, leads, and owns all 1024 slots.
#[test]
fn a_single_node_with_a_faithful_kv_owns_every_slot() {
    use cluster::sim::{SimConfig, run};
    // One node, no faults worth the name: the simulator's own settle check is the assertion.
    let report = run(&SimConfig {
        seed: 7,
        nodes: 1,
        steps: 200,
        ..SimConfig::default()
    })
    .unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert!(report.settled_after.is_some());
}

/// Commands before `Start` are refused and change nothing.
#[test]
fn nothing_happens_before_start() {
    let s = fresh(0);
    for input in [
        Input::Tick,
        Input::Drain,
        Input::LeaseReply {
            op: OpId(0),
            outcome: KvOutcome::Failed,
        },
    ] {
        let cmd = Command { now_ms: 5, input };
        assert!(core::decide(&s, &cmd).is_err(), "{cmd:?}");
    }
}

fn adopts(r: &Result<Vec<core::Event>, core::Rejection>) -> bool {
    r.as_ref().is_ok_and(|evs| {
        evs.iter()
            .any(|e| matches!(e, core::Event::MapAdopted { .. }))
    })
}

/// A map of a lower term written after a higher term began is refused (the term rule); one
/// written before it is accepted.
#[test]
fn the_term_rule_refuses_stale_maps() {
    let mut s = fresh(0);
    core::step(
        &mut s,
        &Command {
            now_ms: 0,
            input: Input::Start,
        },
    )
    .unwrap();
    let n1 = Input::MemberSeen {
        node: id(1),
        record: Ok(MemberInfo {
            status: NodeStatus::Active,
            weight: Weight::ONE,
        }),
        revision: Revision(1),
    };
    core::step(
        &mut s,
        &Command {
            now_ms: 0,
            input: n1,
        },
    )
    .unwrap();
    let lease = LeaseEntry {
        holder: id(1),
        term: Term(10),
    };
    core::step(
        &mut s,
        &Command {
            now_ms: 1,
            input: Input::LeaseSeen {
                entry: Some(lease),
                revision: Revision(10),
            },
        },
    )
    .unwrap();
    let stale = map_of(3, 5, &[1]);
    let refused = core::decide(
        &s,
        &Command {
            now_ms: 2,
            input: Input::MapSeen {
                map: Some(stale.clone()),
                revision: Revision(11),
            },
        },
    );
    assert!(!adopts(&refused), "{refused:?}");
    let before = core::decide(
        &s,
        &Command {
            now_ms: 2,
            input: Input::MapSeen {
                map: Some(stale),
                revision: Revision(9),
            },
        },
    );
    assert!(adopts(&before), "{before:?}");
    let incomplete = map_of(4, 10, &[1, 7]);
    let refused = core::decide(
        &s,
        &Command {
            now_ms: 2,
            input: Input::MapSeen {
                map: Some(incomplete),
                revision: Revision(12),
            },
        },
    );
    let stranger = map_of(5, 10, &[4]);
    let refused_stranger = core::decide(
        &s,
        &Command {
            now_ms: 2,
            input: Input::MapSeen {
                map: Some(stranger),
                revision: Revision(13),
            },
        },
    );
    assert!(!adopts(&refused_stranger), "{refused_stranger:?}");
    assert!(!adopts(&refused), "{refused:?}");
    // A map naming a node that never registered is not adopted.
    let stranger = map_of(5, 10, &[4]);
    let cmd = Command {
        now_ms: 2,
        input: Input::MapSeen {
            map: Some(stranger),
            revision: Revision(13),
        },
    };
    let refused = core::decide(&s, &cmd);
    assert!(!adopts(&refused), "{refused:?}");
}

/// A starting node that reads the map before the members it names (the watch can deliver them
/// in either order) reads the map again as soon as the members are listed, not a whole sync
/// interval later: a joining node becomes Active in one round trip.
#[test]
fn a_map_read_before_its_members_is_read_again_once_they_are_listed() {
    let mut s = fresh(0);
    let at = |now_ms, input| Command { now_ms, input };
    core::step(&mut s, &at(0, Input::Start)).unwrap();
    let map = map_of(1, 1, &[1]);
    let early = core::step(
        &mut s,
        &at(
            1,
            Input::MapSeen {
                map: Some(map.clone()),
                revision: Revision(5),
            },
        ),
    )
    .unwrap();
    assert!(
        !early
            .events
            .iter()
            .any(|e| matches!(e, core::Event::MapAdopted { .. })),
        "{early:?}"
    );
    let active = MemberInfo {
        status: NodeStatus::Active,
        weight: Weight::ONE,
    };
    let listed = core::step(
        &mut s,
        &at(
            2,
            Input::MembersListed {
                entries: vec![(id(1), active, Revision(3))],
                as_of: Revision(6),
            },
        ),
    )
    .unwrap();
    let rereads = listed
        .events
        .iter()
        .any(|e| core::plan(&s, e).contains(&core::Action::ReadMap));
    assert!(rereads, "no map read planned after the listing: {listed:?}");
    let again = core::decide(
        &s,
        &at(
            3,
            Input::MapSeen {
                map: Some(map),
                revision: Revision(5),
            },
        ),
    );
    assert!(adopts(&again), "{again:?}");
}
