//! Virtual actors on real NATS: ask/tell, replay equals live state, failover of a hosting node
//! with full state, bad input answered with typed errors, and the model saga with compensation.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use actors::es::{ActorKey, EventStore};
use bytes::Bytes;
use common::{SETTLE, TestCluster};
use futures::StreamExt;
use serde_json::{Value, json};
use tessel_node::client::{ActorClient, AskError};
use tessel_node::eventstore::JetStreamEventStore;

const T: Duration = Duration::from_secs(10);

async fn started() -> (TestCluster, ActorClient) {
    let c = TestCluster::start(1, 3).await;
    c.wait_settled_on(&["n1", "n2", "n3"], SETTLE).await;
    let client = ActorClient::new(c.client.clone(), "tessel");
    (c, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asks_are_applied_once_and_replay_equals_live_state() {
    let (c, actors) = started().await;
    let key = ActorKey::new("counter", "replay").unwrap();
    let mut total = 0;
    for n in 1..=30 {
        let (state, version) = actors
            .ask(&key, &json!({"cmd": "add", "n": n}), T)
            .await
            .unwrap();
        total += n;
        assert_eq!((state["total"].as_i64(), version), (Some(total), n as u64));
    }
    // A command that decides nothing answers without appending.
    let (state, version) = actors.ask(&key, &json!({"cmd": "get"}), T).await.unwrap();
    assert_eq!((state["total"].as_i64(), version), (Some(total), 30));
    // Replaying the stored events gives the live state.
    let store = JetStreamEventStore::open(c.js.clone(), "tessel", 1, 1 << 20)
        .await
        .unwrap();
    let replayed: i64 = store
        .read(&key, 1, 0)
        .await
        .unwrap()
        .map(|e| e.unwrap().data["n"].as_i64().unwrap())
        .fold(0, |a, n| async move { a + n })
        .await;
    assert_eq!(replayed, total);
    // The same request id twice (a client retry after a lost answer) is applied once.
    let subject = tessel_node::vactors::actor_subject("tessel", &key);
    let mut answers = Vec::new();
    for _ in 0..2 {
        let mut h = async_nats::HeaderMap::new();
        h.insert(tessel_node::vactors::REQUEST_ID_HEADER, "retry-1");
        let m = c
            .client
            .request_with_headers(
                subject.clone(),
                h,
                Bytes::from_static(br#"{"cmd":"add","n":1}"#),
            )
            .await
            .unwrap();
        answers.push(serde_json::from_slice::<Value>(&m.payload).unwrap());
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0]["version"], 31);
    total += 1;
    // tell is one-way; a later ask sees it.
    actors
        .tell(&key, &json!({"cmd": "add", "n": 1000}))
        .await
        .unwrap();
    let mut seen = 0;
    for _ in 0..50 {
        seen = actors.ask(&key, &json!({"cmd": "get"}), T).await.unwrap().0["total"]
            .as_i64()
            .unwrap();
        if seen == total + 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, total + 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_hosting_node_moves_the_actor_with_its_state() {
    let (mut c, actors) = started().await;
    let key = ActorKey::new("counter", "mover").unwrap();
    for n in 1..=10 {
        actors
            .ask(&key, &json!({"cmd": "add", "n": n}), T)
            .await
            .unwrap();
    }
    let status = c.status().await.unwrap();
    let host = status.owners[key.slot().index()].clone().unwrap();
    c.kill9(&host).await;
    // The next ask waits out the failover and reaches the new owner, which rebuilds the actor.
    let answer = actors
        .ask(
            &key,
            &json!({"cmd": "add", "n": 100}),
            Duration::from_secs(20),
        )
        .await;
    let Ok((state, version)) = answer else {
        let logs: String = ["n1", "n2", "n3"]
            .iter()
            .map(|n| format!("--- {n}\n{}", c.log(n)))
            .collect();
        panic!("{answer:?} after killing {host}\n{logs}");
    };
    assert_eq!((state["total"].as_i64(), version), (Some(155), 11));
    let after = c.status().await.unwrap();
    assert_ne!(
        after.owners[key.slot().index()].as_deref(),
        Some(host.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_and_appends_nothing() {
    let (c, actors) = started().await;
    let key = ActorKey::new("counter", "bad").unwrap();
    actors
        .ask(&key, &json!({"cmd": "add", "n": 1}), T)
        .await
        .unwrap();
    let cases: Vec<(ActorKey, Bytes, &str)> = vec![
        (
            key.clone(),
            Bytes::from_static(b"\xff\xfe not json"),
            "bad_request",
        ),
        (
            key.clone(),
            Bytes::from_static(br#"{"cmd":"add","n":"x"}"#),
            "bad_request",
        ),
        (key.clone(), Bytes::from(vec![b' '; 2 << 20]), "too_large"),
        (
            ActorKey::new("nosuchkind", "x").unwrap(),
            Bytes::from_static(b"{}"),
            "unknown_type",
        ),
    ];
    for (k, payload, kind) in cases {
        match actors.ask_raw(&k, payload, T).await {
            Err(AskError::BadRequest(m)) => assert!(m.starts_with(kind), "{m} should be {kind}"),
            // A payload over the server's max_payload is refused by the client before sending.
            Err(AskError::Remote(k2, m)) => panic!("{k2}: {m}"),
            other => panic!("expected {kind}, got {other:?}"),
        }
    }
    // A rejection is typed and appends nothing.
    let r = actors
        .ask(&key, &json!({"cmd": "add", "n": 99_999_999_999i64}), T)
        .await;
    assert!(
        matches!(&r, Err(AskError::Rejected(v)) if v["code"] == "out_of_range"),
        "{r:?}"
    );
    let (_, version) = actors.ask(&key, &json!({"cmd": "get"}), T).await.unwrap();
    assert_eq!(version, 1, "nothing was appended");

    // An event of an unknown schema: the actor refuses to load rather than guess.
    let store = JetStreamEventStore::open(c.js.clone(), "tessel", 1, 1 << 20)
        .await
        .unwrap();
    let future = ActorKey::new("counter", "future").unwrap();
    let ev = actors::es::NewEvent {
        id: "f1".into(),
        kind: "Added".into(),
        schema: 99,
        data: json!({"type": "Added", "n": 1}),
    };
    store.append(&future, 0, &[ev]).await.unwrap();
    let r = actors.ask(&future, &json!({"cmd": "add", "n": 1}), T).await;
    assert!(
        matches!(&r, Err(AskError::Remote(k, _)) if k == "unknown_schema"),
        "{r:?}"
    );
    assert_eq!(
        store.latest_version(&future).await.unwrap(),
        1,
        "nothing was appended"
    );

    // A command for a retired model is refused.
    let model = ActorKey::new("model", "old").unwrap();
    actors
        .ask(&model, &json!({"cmd": "create", "rows": 10, "dim": 2}), T)
        .await
        .unwrap();
    actors
        .ask(&model, &json!({"cmd": "retire"}), T)
        .await
        .unwrap();
    let r = actors
        .ask(&model, &json!({"cmd": "serve", "checkpoint": 0}), T)
        .await;
    assert!(
        matches!(&r, Err(AskError::Rejected(v)) if v["code"] == "retired"),
        "{r:?}"
    );

    // A subject whose slot is not the actor's is refused by the owner.
    let reply = c
        .client
        .request("tessel.actor.0.counter.bad", Bytes::from_static(b"{}"))
        .await;
    if let Ok(m) = reply {
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["error"]["kind"], "bad_request");
    }
}

async fn wait_model(actors: &ActorClient, name: &str, want: &[&str]) -> Value {
    let key = ActorKey::new("model", name).unwrap();
    for _ in 0..200 {
        let (v, _) = actors
            .ask(&key, &json!({"cmd": "describe"}), T)
            .await
            .unwrap();
        if want.contains(&v["state"].as_str().unwrap_or_default())
            && v["reserved"]
                .as_object()
                .is_some_and(|m| m.is_empty() || v["state"] == "Serving")
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("model {name} never reached {want:?}");
}

async fn reservations(c: &TestCluster, node: &str) -> Value {
    let m = c
        .client
        .request(format!("tessel.node.{node}.reservations"), Bytes::new())
        .await
        .unwrap();
    serde_json::from_slice::<Value>(&m.payload).unwrap()["ok"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_saga_serves_or_compensates_at_every_step() {
    let (c, actors) = started().await;
    let key = ActorKey::new("model", "emb").unwrap();
    actors
        .ask(
            &key,
            &json!({"cmd": "create", "rows": 10_000, "dim": 16}),
            T,
        )
        .await
        .unwrap();
    let v = wait_model(&actors, "emb", &["Serving"]).await;
    assert_eq!(v["reserved"].as_object().unwrap().len(), 3, "{v}");
    for n in ["n1", "n2", "n3"] {
        assert!(
            reservations(&c, n).await.get("emb").is_some(),
            "{n} holds no reservation"
        );
    }
    // An injected failure at each step ends Failed with every reservation released.
    for step in ["reserve", "load", "start"] {
        let name = format!("fail-{step}");
        let k = ActorKey::new("model", &name).unwrap();
        actors
            .ask(
                &k,
                &json!({"cmd": "create", "rows": 1000, "dim": 8, "inject_failure": step}),
                T,
            )
            .await
            .unwrap();
        let v = wait_model(&actors, &name, &["Failed"]).await;
        assert!(v["reason"].as_str().unwrap().contains(step), "{v}");
        for n in ["n1", "n2", "n3"] {
            assert!(
                reservations(&c, n).await.get(&name).is_none(),
                "{n} still holds {name}"
            );
        }
    }
    // Retiring releases the reservations of a serving model.
    actors
        .ask(&key, &json!({"cmd": "retire"}), T)
        .await
        .unwrap();
    wait_model(&actors, "emb", &["Retired"]).await;
    for n in ["n1", "n2", "n3"] {
        assert!(
            reservations(&c, n).await.get("emb").is_none(),
            "{n} still holds emb"
        );
    }
    // The history has every step.
    let store = JetStreamEventStore::open(c.js.clone(), "tessel", 1, 1 << 20)
        .await
        .unwrap();
    let types: Vec<String> = store
        .read(&key, 1, 0)
        .await
        .unwrap()
        .map(|e| e.unwrap().kind)
        .collect()
        .await;
    for t in [
        "Created",
        "PlacingStarted",
        "Reserved",
        "LoadingStarted",
        "ServingStarted",
        "Retired",
        "Released",
    ] {
        assert!(types.iter().any(|x| x == t), "{t} missing from {types:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_and_events_commands_keep_their_contract() {
    let (c, _) = started().await;
    let run = |sub: &[&str]| common::tessel(&c, &[sub, &["--cluster", "tessel"]].concat());
    let out = run(&[
        "model", "create", "--name", "emb", "--rows", "10000", "--dim", "16",
    ]);
    assert!(out.status.success(), "{out:?}");
    let mut state = String::new();
    for _ in 0..100 {
        let out = run(&["model", "describe", "emb", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        state = v["state"].as_str().unwrap().to_string();
        if state == "Serving" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, "Serving");
    let out = run(&["model", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"][0]["name"], "emb");
    let out = run(&["events", "model/emb", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 5, "{lines:?}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["version"], i as u64 + 1);
        assert!(l["type"].is_string() && l["timestamp_ms"].is_u64(), "{l}");
    }
    let out = run(&["model", "retire", "emb"]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&[
        "model", "create", "--name", "bad", "--rows", "0", "--dim", "1",
    ]);
    assert!(!out.status.success(), "{out:?}");
    let out = run(&["events", "not-a-key"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
