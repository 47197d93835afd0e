//! Fencing at the server: a deposed leader's map write is refused by NATS itself, even when the
//! map key has not moved, because the write is one atomic batch with a check of the lease.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::Operation;
use cluster::core::{KvOutcome, MapOutcome};
use cluster::{Epoch, NodeId, Revision, SLOT_COUNT, ShardMap, Term};
use tessel_node::metrics::Metrics;
use tessel_node::natsd::NatsCluster;
use tessel_node::store::{LEASE_KEY, MAP_KEY, Store};

fn map(epoch: u64, term: u64, owner: &NodeId) -> ShardMap {
    ShardMap::new(
        Epoch(epoch),
        Term(term),
        vec![Some(owner.clone()); SLOT_COUNT],
    )
    .unwrap()
}

/// One nats-server (kept alive by the returned directory and cluster) and a client of it.
async fn server() -> (tempfile::TempDir, NatsCluster, async_nats::Client) {
    let (dir, nats) = common::nats_server().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    (dir, nats, client)
}

/// The coordination store of cluster `name`, with a 2 s request timeout and 1 s TTLs.
async fn open(client: async_nats::Client, name: &str) -> Store {
    Store::open(
        client,
        name,
        1,
        Duration::from_secs(2),
        1_000,
        1_000,
        256 * 1024,
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_map_write_is_refused_by_the_server() {
    let (_dir, _nats, client) = server().await;
    let store = open(client, "fence").await;
    let (a, b) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());

    // A acquires (term = the creating revision) and writes a map fenced by its lease.
    let KvOutcome::Written { revision: t1 } = store.acquire(&a, Revision(0)).await else {
        panic!("acquire")
    };
    let MapOutcome::Written {
        map_revision,
        lease_revision,
    } = store
        .write_map(&a, &map(1, t1.0, &a), Revision(0), t1, true)
        .await
    else {
        panic!("first map write refused")
    };
    // The batch is stored contiguously: the lease part sits just below the map.
    let lease_entry = store.control().entry(LEASE_KEY).await.unwrap().unwrap();
    assert_eq!(lease_entry.revision, lease_revision.0);
    assert_eq!(map_revision.0, lease_revision.0 + 1);

    // A create that expects the key absent is refused while the lease lives.
    assert_eq!(
        store.acquire(&b, Revision(0)).await,
        KvOutcome::WrongRevision
    );

    // A stalls; its lease expires at the server (TTL 1 s) and B takes over.
    let started = Instant::now();
    let marker = loop {
        let e = store.control().entry(LEASE_KEY).await.unwrap().unwrap();
        if e.operation == Operation::Purge {
            break e.revision;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let KvOutcome::Written { revision: t2 } = store.acquire(&b, Revision(marker)).await else {
        panic!("B's acquire")
    };
    assert!(t2 > t1, "terms strictly increase: {t1:?} then {t2:?}");

    // A wakes and writes with everything it knew: the map key has not moved since its own
    // write, so only the lease check can refuse it — and the server does.
    let stale = store
        .write_map(&a, &map(2, t1.0, &a), map_revision, lease_revision, true)
        .await;
    assert_eq!(stale, MapOutcome::Refused);
    let renew = store.renew(&a, Term(t1.0), Some(lease_revision)).await;
    assert_eq!(renew, KvOutcome::WrongRevision);
    let m = store.control().entry(MAP_KEY).await.unwrap().unwrap();
    assert_eq!(m.revision, map_revision.0, "the map is untouched");

    // B's own write over the same map revision goes through.
    let ok = store
        .write_map(&b, &map(2, t2.0, &b), map_revision, t2, true)
        .await;
    assert!(matches!(ok, MapOutcome::Written { .. }), "{ok:?}");
}

/// A control bucket made by an older version, without atomic batches: the node's create is
/// refused (other settings), so it binds the stream as it is, turns batches on, and its fenced
/// map write works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_control_bucket_is_bound_and_given_atomic_batches() {
    use async_nats::jetstream::stream;
    let (_dir, _nats, client) = server().await;
    let js = async_nats::jetstream::new(client.clone());
    let old = stream::Config {
        name: "KV_old-control".into(),
        subjects: vec!["$KV.old-control.>".into()],
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::New,
        max_message_size: 256 * 1024,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        allow_message_ttl: true,
        subject_delete_marker_ttl: Some(Duration::from_secs(60)),
        allow_atomic_publish: false,
        description: Some("made by an older version".into()),
        ..Default::default()
    };
    js.create_stream(old).await.unwrap();
    let store = open(client, "old").await;
    let info = js
        .get_stream("KV_old-control")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert!(info.config.allow_atomic_publish, "{:?}", info.config);
    assert_eq!(
        info.config.description.as_deref(),
        Some("made by an older version"),
        "bound as it was, not replaced"
    );
    let a = NodeId::new("a").unwrap();
    let KvOutcome::Written { revision: t1 } = store.acquire(&a, Revision(0)).await else {
        panic!("acquire")
    };
    let written = store
        .write_map(&a, &map(1, t1.0, &a), Revision(0), t1, true)
        .await;
    assert!(matches!(written, MapOutcome::Written { .. }), "{written:?}");
}
