//! The JetStream event store against a real nats-server, and the same contract checks against
//! the in-memory store: optimistic concurrency, idempotent retries, all-or-nothing batches,
//! snapshots plus tail, cluster namespaces, and typed errors for bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;

use actors::es::{ActorKey, EventStore, InMemoryStore, NewEvent, Snapshot, StoreError};
use async_nats::jetstream;
use futures::StreamExt;
use serde_json::json;
use tessel_node::eventstore::{JetStreamEventStore, events_stream, snapshot_key};
use tessel_node::natsd::NatsCluster;
use tokio::sync::Barrier;

const MAX_EVENT_BYTES: usize = 4096;

struct Server {
    _dir: tempfile::TempDir,
    _nats: NatsCluster,
    js: jetstream::Context,
}

async fn server() -> Server {
    let (dir, nats) = common::nats_server().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    Server {
        _dir: dir,
        _nats: nats,
        js: jetstream::new(client),
    }
}

async fn open(js: &jetstream::Context, cluster: &str) -> JetStreamEventStore {
    JetStreamEventStore::open(js.clone(), cluster, 1, MAX_EVENT_BYTES)
        .await
        .unwrap()
}

async fn stored_messages(js: &jetstream::Context, cluster: &str) -> u64 {
    let mut stream = js.get_stream(events_stream(cluster)).await.unwrap();
    stream.info().await.unwrap().state.messages
}

fn ev(id: &str, n: i64) -> NewEvent {
    NewEvent {
        id: id.into(),
        kind: "Added".into(),
        schema: 1,
        data: json!({ "n": n }),
    }
}

fn key(kind: &str, id: &str) -> ActorKey {
    ActorKey::new(kind, id).unwrap()
}

async fn read_all<S: EventStore>(
    store: &S,
    actor: &ActorKey,
    from: u64,
    after: u64,
) -> Vec<actors::es::StoredEvent> {
    store
        .read(actor, from, after)
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await
}

fn ids(events: &[actors::es::StoredEvent]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

// ---- the contract, for any store ----

/// Two writers race at version 0 on fresh actors: exactly one wins each round.
async fn contract_concurrent_writers<S: EventStore>(store: Arc<S>, rounds: usize) {
    for round in 0..rounds {
        let actor = key("race", &format!("r{round}"));
        // Every third round races batches of two events.
        let size = if round % 3 == 2 { 2 } else { 1 };
        let barrier = Arc::new(Barrier::new(2));
        let mut tasks = Vec::new();
        for writer in ["a", "b"] {
            let (store, actor, barrier) = (store.clone(), actor.clone(), barrier.clone());
            let events: Vec<NewEvent> = (0..size)
                .map(|i| ev(&format!("{writer}-{round}-{i}"), i))
                .collect();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store.append(&actor, 0, &events).await
            }));
        }
        let a = tasks.remove(0).await.unwrap();
        let b = tasks.remove(0).await.unwrap();
        let size = size as u64;
        let winner = match (&a, &b) {
            (Ok(v), Err(StoreError::Conflict { current })) if *v == size && *current == size => "a",
            (Err(StoreError::Conflict { current }), Ok(v)) if *v == size && *current == size => "b",
            other => panic!("round {round}: expected one winner and one conflict, got {other:?}"),
        };
        assert_eq!(store.latest_version(&actor).await, Ok(size));
        let events = read_all(&*store, &actor, 1, 0).await;
        assert_eq!(events.len() as u64, size, "round {round}");
        assert!(
            events
                .iter()
                .all(|e| e.id.starts_with(&format!("{winner}-"))),
            "round {round}: the loser's events were written: {:?}",
            ids(&events)
        );
    }
}

/// An append retried after a lost answer returns the same version and writes nothing twice.
async fn contract_retry<S: EventStore>(store: &S) -> ActorKey {
    let actor = key("retry", "one");
    let single = [ev("s1", 1)];
    assert_eq!(store.append(&actor, 0, &single).await, Ok(1));
    assert_eq!(store.append(&actor, 0, &single).await, Ok(1));
    let batch = [ev("b1", 2), ev("b2", 3), ev("b3", 4)];
    assert_eq!(store.append(&actor, 1, &batch).await, Ok(4));
    assert_eq!(store.append(&actor, 1, &batch).await, Ok(4));
    // The history goes on after retries.
    assert_eq!(store.append(&actor, 4, &[ev("c1", 5)]).await, Ok(5));
    let events = read_all(store, &actor, 1, 0).await;
    assert_eq!(ids(&events), ["s1", "b1", "b2", "b3", "c1"]);
    assert_eq!(
        events.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(store.latest_version(&actor).await, Ok(5));
    actor
}

/// An append at a stale version writes none of its events.
async fn contract_all_or_nothing<S: EventStore>(store: &S) -> ActorKey {
    let actor = key("atomic", "one");
    assert_eq!(store.append(&actor, 0, &[ev("x1", 1)]).await, Ok(1));
    let stale = [ev("y1", 1), ev("y2", 2), ev("y3", 3)];
    assert_eq!(
        store.append(&actor, 0, &stale).await,
        Err(StoreError::Conflict { current: 1 })
    );
    // Ahead of the history is a conflict too.
    assert_eq!(
        store.append(&actor, 5, &stale).await,
        Err(StoreError::Conflict { current: 1 })
    );
    assert_eq!(store.latest_version(&actor).await, Ok(1));
    assert_eq!(ids(&read_all(store, &actor, 1, 0).await), ["x1"]);
    actor
}

fn fold(state: i64, events: &[actors::es::StoredEvent]) -> i64 {
    events.iter().fold(state, |acc, e| {
        acc * 3 % 1_000_003 + e.data["n"].as_i64().unwrap()
    })
}

/// Reading from a version; a snapshot plus the tail after it folds to the full replay.
async fn contract_snapshot_and_tail<S: EventStore>(store: &S) {
    let actor = key("counter", "c");
    let other = key("counter", "other");
    let mut version = 0;
    let mut n = 0;
    // 50 events, in appends of 1 to 4, interleaved with another actor's.
    while version < 50 {
        let size = (1 + version % 4).min(50 - version);
        let events: Vec<NewEvent> = (0..size)
            .map(|_| {
                n += 1;
                ev(&format!("c{n}"), n)
            })
            .collect();
        version = store.append(&actor, version, &events).await.unwrap();
        let ov = store.latest_version(&other).await.unwrap();
        store
            .append(&other, ov, &[ev(&format!("o{ov}"), 0)])
            .await
            .unwrap();
    }
    let full = read_all(store, &actor, 1, 0).await;
    assert_eq!(
        full.iter().map(|e| e.version).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<u64>>()
    );
    assert!(full.iter().all(|e| e.actor == "counter/c" && e.v == 1));
    assert!(full.windows(2).all(|w| w[0].sequence <= w[1].sequence));
    let from_20 = read_all(store, &actor, 20, 0).await;
    assert_eq!(from_20.first().map(|e| e.version), Some(20));
    assert_eq!(from_20.len(), 31);

    let at_30 = &full[29];
    assert_eq!(at_30.version, 30);
    let snapshot = Snapshot {
        v: 1,
        version: 30,
        sequence: at_30.sequence,
        state: json!(fold(0, &full[..30])),
    };
    assert_eq!(store.load_snapshot(&actor).await, Ok(None));
    store.save_snapshot(&actor, &snapshot).await.unwrap();
    let loaded = store.load_snapshot(&actor).await.unwrap().unwrap();
    assert_eq!(loaded, snapshot);
    let tail = read_all(store, &actor, loaded.version + 1, loaded.sequence).await;
    assert_eq!(
        tail.iter().map(|e| e.version).collect::<Vec<_>>(),
        (31..=50).collect::<Vec<u64>>()
    );
    assert_eq!(
        fold(loaded.state.as_i64().unwrap(), &tail),
        fold(0, &full),
        "snapshot + tail = full replay"
    );
    // Nothing after the last event; nothing for an actor without events.
    assert!(read_all(store, &actor, 51, 0).await.is_empty());
    assert!(
        read_all(store, &key("counter", "none"), 1, 0)
            .await
            .is_empty()
    );
}

// ---- the in-memory store ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_store_meets_the_contract() {
    let store = Arc::new(InMemoryStore::new());
    contract_concurrent_writers(store.clone(), 30).await;
    contract_retry(&*store).await;
    contract_all_or_nothing(&*store).await;
    contract_snapshot_and_tail(&*store).await;
}

// ---- the JetStream store ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_exactly_one_wins() {
    let s = server().await;
    let store = Arc::new(open(&s.js, "t").await);
    contract_concurrent_writers(store, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_append_is_written_once() {
    let s = server().await;
    let store = open(&s.js, "t").await;
    let actor = contract_retry(&store).await;
    assert_eq!(stored_messages(&s.js, "t").await, 5);

    // Ids already stored, re-appended at the current version: the server's duplicate check
    // (a duplicate ack for one event, error 10201 for a batch) refuses them; a conflict.
    assert_eq!(
        store.append(&actor, 5, &[ev("s1", 9)]).await,
        Err(StoreError::Conflict { current: 5 })
    );
    assert_eq!(
        store.append(&actor, 5, &[ev("new1", 9), ev("b2", 9)]).await,
        Err(StoreError::Conflict { current: 5 })
    );
    assert_eq!(stored_messages(&s.js, "t").await, 5);
    assert_eq!(store.latest_version(&actor).await, Ok(5));
    let (version, sequence, id) = store.last(&actor).await.unwrap().unwrap();
    assert_eq!((version, sequence, id.as_str()), (5, 5, "c1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_event_append_is_all_or_nothing() {
    let s = server().await;
    let store = open(&s.js, "t").await;
    contract_all_or_nothing(&store).await;
    assert_eq!(stored_messages(&s.js, "t").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_plus_tail_equals_full_replay() {
    let s = server().await;
    let store = open(&s.js, "t").await;
    contract_snapshot_and_tail(&store).await;
    // The snapshot is one KV entry under <kind>.<id>.
    let actor = key("counter", "c");
    assert!(
        store
            .snapshots()
            .get(snapshot_key(&actor))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_are_separate_namespaces() {
    let s = server().await;
    let a = open(&s.js, "a").await;
    let b = open(&s.js, "b").await;
    // Opening again binds what is there.
    let a_again = open(&s.js, "a").await;
    let actor = key("acct", "same");
    assert_eq!(
        a.append(&actor, 0, &[ev("a1", 1), ev("a2", 2)]).await,
        Ok(2)
    );
    assert_eq!(b.append(&actor, 0, &[ev("b1", 1)]).await, Ok(1));
    assert_eq!(a_again.latest_version(&actor).await, Ok(2));
    assert_eq!(b.latest_version(&actor).await, Ok(1));
    assert_eq!(ids(&read_all(&a, &actor, 1, 0).await), ["a1", "a2"]);
    assert_eq!(ids(&read_all(&b, &actor, 1, 0).await), ["b1"]);
    let snap = Snapshot {
        v: 1,
        version: 1,
        sequence: 1,
        state: json!("b"),
    };
    b.save_snapshot(&actor, &snap).await.unwrap();
    assert_eq!(a.load_snapshot(&actor).await, Ok(None));
    assert_eq!(b.load_snapshot(&actor).await, Ok(Some(snap)));
    assert_eq!(a.subject(&actor), "a.events.acct.same");
    assert_eq!(stored_messages(&s.js, "a").await, 2);
    assert_eq!(stored_messages(&s.js, "b").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_typed_errors_and_writes_nothing() {
    let s = server().await;
    let store = open(&s.js, "t").await;
    let actor = key("acct", "bad");
    let invalid = |r: Result<u64, StoreError>| matches!(r, Err(StoreError::InvalidKey(_)));
    let too_large = |r: Result<u64, StoreError>| matches!(r, Err(StoreError::TooLarge(_)));

    assert!(invalid(store.append(&actor, 0, &[]).await));
    assert!(invalid(store.append(&actor, 0, &[ev("bad.id", 1)]).await));
    assert!(invalid(store.append(&actor, 0, &[ev("", 1)]).await));
    let mut bad_type = ev("ok", 1);
    bad_type.kind = "has space".into();
    assert!(invalid(store.append(&actor, 0, &[bad_type]).await));
    assert!(invalid(
        store.append(&actor, 0, &[ev("d", 1), ev("d", 2)]).await
    ));
    let many: Vec<NewEvent> = (0..101).map(|i| ev(&format!("m{i}"), i)).collect();
    assert!(too_large(store.append(&actor, 0, &many).await));

    let mut big = ev("big", 1);
    big.data = json!({ "blob": "x".repeat(MAX_EVENT_BYTES) });
    assert!(too_large(store.append(&actor, 0, &[big.clone()]).await));
    // In a batch, an oversized second event refuses the whole append.
    assert!(too_large(
        store.append(&actor, 0, &[ev("fine", 1), big]).await
    ));
    // Just under the limit passes.
    let mut fits = ev("fits", 1);
    fits.data = json!({ "blob": "x".repeat(MAX_EVENT_BYTES - 400) });
    assert_eq!(store.append(&key("acct", "fits"), 0, &[fits]).await, Ok(1));

    assert_eq!(store.latest_version(&actor).await, Ok(0));
    assert!(read_all(&store, &actor, 1, 0).await.is_empty());
    assert_eq!(stored_messages(&s.js, "t").await, 1);

    assert!(matches!(
        JetStreamEventStore::open(s.js.clone(), "a.b", 1, MAX_EVENT_BYTES).await,
        Err(StoreError::InvalidKey(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_records_are_corrupt() {
    let s = server().await;
    let store = open(&s.js, "t").await;
    let actor = key("acct", "junk");
    assert_eq!(store.append(&actor, 0, &[ev("g1", 1)]).await, Ok(1));
    s.js.publish(store.subject(&actor), "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(
        store.latest_version(&actor).await,
        Err(StoreError::Corrupt(_))
    ));
    let items: Vec<_> = store.read(&actor, 1, 0).await.unwrap().collect().await;
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].as_ref().map(|e| e.id.as_str()), Ok("g1"));
    assert!(matches!(items[1], Err(StoreError::Corrupt(_))));

    store
        .snapshots()
        .put(snapshot_key(&actor), "{".into())
        .await
        .unwrap();
    assert!(matches!(
        store.load_snapshot(&actor).await,
        Err(StoreError::Corrupt(_))
    ));
}
