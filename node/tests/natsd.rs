//! Integration tests of `tessel_node::natsd`: real nats-server processes on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tessel_node::metrics::Metrics;
use tessel_node::natsd::{NatsCluster, NatsOptions, find_nats_server};
use tokio::time::{Instant, sleep, timeout};

/// How long a put may keep failing on a healthy cluster.
const SETTLED: Duration = Duration::from_secs(10);

/// How long a put may keep failing after a server was killed: one Raft election timeout
/// (4-9 s), a possible second round, and the answer.
const FAILOVER: Duration = Duration::from_secs(20);

/// Options for `servers` servers under `dir`.
fn options(dir: &std::path::Path, servers: usize) -> NatsOptions {
    let binary = find_nats_server(true).expect("nats-server (run `bash scripts/tools.sh`)");
    NatsOptions::new(dir, binary).with_servers(servers)
}

/// A JetStream context with a short timeout, so that retries happen quickly.
fn jetstream(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client)
}

/// Puts `value` under `key`, retrying for up to `window` (a stream leader may be moving).
async fn put_with_retry(store: &kv::Store, key: &str, value: &'static str, window: Duration) {
    let deadline = Instant::now() + window;
    loop {
        match store.put(key, value.into()).await {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("put {key}={value} failed, retrying: {e}");
                sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("put {key}={value} kept failing for {window:?}: {e}"),
        }
    }
}

/// Whether connecting to `url` fails (within 5 s).
async fn connect_fails(url: String) -> bool {
    match timeout(Duration::from_secs(5), async_nats::connect(url)).await {
        Ok(Ok(_client)) => false,
        Ok(Err(_)) | Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_serves_jetstream_kv_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(options(dir.path(), 1)).await.unwrap();
    assert_eq!(cluster.len(), 1);
    assert!(!cluster.is_empty());
    let server = cluster.server(0).unwrap();
    assert!(server.config_path.is_file());
    assert!(server.store_dir.is_dir());
    assert_eq!(server.cluster_port, None);
    assert_eq!(
        cluster.url(),
        format!("nats://127.0.0.1:{}", server.client_port)
    );
    let pid = cluster.pid(0).expect("a running server has a pid");

    let client = async_nats::connect(cluster.url()).await.unwrap();
    let js = jetstream(client.clone());
    let store = js
        .create_key_value(kv::Config {
            bucket: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    store.put("k", "v".into()).await.unwrap();
    assert_eq!(store.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    drop(store);
    drop(js);
    drop(client);

    let url = cluster.url();
    let log_path = cluster.server(0).unwrap().log_path.clone();
    cluster.stop().await.unwrap();
    // SIGTERM, not SIGKILL, stopped it: the server logged the signal it trapped.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("\"terminated\" signal"),
        "no graceful shutdown in the log:\n{log}"
    );
    assert_eq!(cluster.pid(0), None);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} is still there"
    );
    assert!(connect_fails(url).await, "connecting after stop succeeded");
    // Stopping twice is harmless.
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_survive_a_kill_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(options(dir.path(), 3)).await.unwrap();
    assert_eq!(cluster.len(), 3);
    assert_eq!(cluster.urls().len(), 3);
    assert!(cluster.server(2).unwrap().cluster_port.is_some());
    assert!(cluster.server(3).is_none());
    let client_port_0 = cluster.server(0).unwrap().client_port;

    let client = async_nats::ConnectOptions::new()
        .connect(cluster.urls())
        .await
        .unwrap();
    let js = jetstream(client);
    let store = js
        .create_key_value(kv::Config {
            bucket: "t".into(),
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    put_with_retry(&store, "k", "v1", SETTLED).await;

    let pid0 = cluster.pid(0).unwrap();
    cluster.kill(0).await.unwrap();
    assert_eq!(cluster.pid(0), None);
    assert!(!std::path::Path::new(&format!("/proc/{pid0}")).exists());
    // When server 0 led the stream, the followers elect a new leader only after nats-server's
    // Raft election timeout (randomized 4-9 s, server/raft.go), so 10 s is too tight a window.
    put_with_retry(&store, "k", "v2", FAILOVER).await;

    cluster.restart(0).await.unwrap();
    assert_ne!(cluster.pid(0), None);
    assert_eq!(
        cluster.server(0).unwrap().client_port,
        client_port_0,
        "restart keeps the port"
    );
    put_with_retry(&store, "k", "v3", SETTLED).await;
    // A KV get is a direct get, which any replica may answer, the restarted one included while
    // it catches up: the value must converge to v3, not be v3 on the first read.
    let deadline = Instant::now() + SETTLED;
    let mut read = store.get("k").await.unwrap();
    while read.as_deref() != Some(&b"v3"[..]) && Instant::now() < deadline {
        sleep(Duration::from_millis(100)).await;
        read = store.get("k").await.unwrap();
    }
    assert_eq!(read.as_deref(), Some(&b"v3"[..]));

    // The restarted server serves clients on its old port.
    let direct = async_nats::connect(cluster.server(0).unwrap().url())
        .await
        .unwrap();
    direct.flush().await.unwrap();

    cluster.stop().await.unwrap();
    assert!((0..3).all(|i| cluster.pid(i).is_none()));
    assert!(cluster.kill(7).await.is_err(), "index out of range");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_requires_the_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(options(dir.path(), 1).with_auth("tessel", "s3cret"))
        .await
        .unwrap();

    assert!(
        connect_fails(cluster.url()).await,
        "connecting without credentials succeeded"
    );
    let wrong = async_nats::ConnectOptions::with_user_and_password("tessel".into(), "nope".into())
        .connect(cluster.url())
        .await;
    assert!(wrong.is_err(), "connecting with a wrong password succeeded");

    let client =
        async_nats::ConnectOptions::with_user_and_password("tessel".into(), "s3cret".into())
            .connect(cluster.url())
            .await
            .unwrap();
    client.publish("x", "y".into()).await.unwrap();
    client.flush().await.unwrap();

    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_cluster_kills_the_servers() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(options(dir.path(), 1)).await.unwrap();
    let pid = cluster.pid(0).unwrap();
    let url = cluster.url();
    drop(cluster);
    let deadline = Instant::now() + Duration::from_secs(5);
    // The runtime reaps the killed child in the background; the port closes at once.
    while !connect_fails(url.clone()).await {
        assert!(
            Instant::now() < deadline,
            "server {pid} still serves after drop"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

/// A three-server cluster without a meta leader (two servers down, or a cold start) drops
/// JetStream requests instead of refusing them, so a setup request would wait out its whole
/// timeout. `wait_for_jetstream` (what a node's store does first) waits while nothing answers
/// and returns once JetStream answers, after which a create succeeds within a short timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_waits_until_jetstream_has_a_meta_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(options(dir.path(), 3)).await.unwrap();
    let client = async_nats::ConnectOptions::new()
        .connect(cluster.server(0).unwrap().url())
        .await
        .unwrap();
    let limit = Duration::from_secs(30);
    assert!(
        tessel_node::store::wait_for_jetstream(&client, limit, &Metrics::default())
            .await
            .unwrap()
            < limit
    );
    // One server of three: no quorum, so no meta leader and, once the survivor has noticed
    // (a meta leader answers from its own state until it steps down), no answer.
    cluster.kill(1).await.unwrap();
    cluster.kill(2).await.unwrap();
    let probe = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(500))
        .build(client.clone());
    // A lone meta leader notices its lost quorum after up to about 20 s (nats-server's check).
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe.query_account().await.is_ok() {
        assert!(Instant::now() < deadline, "a lone server kept answering");
        sleep(Duration::from_millis(100)).await;
    }
    let short = Duration::from_secs(2);
    let waited = tessel_node::store::wait_for_jetstream(&client, short, &Metrics::default())
        .await
        .unwrap();
    assert!(
        waited >= short,
        "answered without a quorum after {waited:?}"
    );
    // Back to three: it returns once a meta leader answers, well before the limit.
    cluster.restart(1).await.unwrap();
    cluster.restart(2).await.unwrap();
    let waited = tessel_node::store::wait_for_jetstream(&client, limit, &Metrics::default())
        .await
        .unwrap();
    assert!(waited < limit, "JetStream never answered");
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(client);
    js.create_stream(jetstream::stream::Config {
        name: "after".into(),
        subjects: vec!["after.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    cluster.stop().await.unwrap();
}
