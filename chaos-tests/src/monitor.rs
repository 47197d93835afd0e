//! Observers of leadership over the whole run: a watch on the `<c>-control` bucket (every
//! `leader` and `map` record it sees) and a subscription to `<c>.cluster.events`
//! (`LeaderElected`); after the run, the nodes' JSON logs (`elected leader`) are added.
//!
//! The control bucket keeps one record per key, so the watch sees the records as they are
//! written; a record written and replaced while the harness was disconnected may be missed by
//! the watch, which is why the events and the logs are read as well.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::procs::CLUSTER;

/// A map record seen by the watch.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MapSeen {
    /// The key's revision.
    pub revision: u64,
    /// The map's epoch.
    pub epoch: u64,
    /// The term of the leader that wrote it.
    pub term: u64,
}

/// What the observers saw.
#[derive(Default, Debug)]
pub struct Leadership {
    /// Term → the nodes seen leading in it, with where each was seen.
    pub leaders: BTreeMap<u64, BTreeMap<String, BTreeSet<&'static str>>>,
    /// Map records by revision.
    pub maps: BTreeMap<u64, MapSeen>,
}

impl Leadership {
    fn saw(&mut self, term: u64, node: &str, source: &'static str) {
        self.leaders
            .entry(term)
            .or_default()
            .entry(node.to_string())
            .or_default()
            .insert(source);
    }

    /// Adds the `elected leader` lines of a node's JSON log.
    pub fn read_log(&mut self, text: &str) {
        for line in text.lines() {
            if !line.contains("elected leader") {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let f = &v["fields"];
            if f["message"] != "elected leader" {
                continue;
            }
            if let (Some(node), Some(term)) = (f["node"].as_str(), f["term"].as_u64()) {
                self.saw(term, node, "log");
            }
        }
    }

    /// Terms in which more than one node led.
    pub fn split_terms(&self) -> Vec<(u64, Vec<String>)> {
        self.leaders
            .iter()
            .filter(|(_, nodes)| nodes.len() > 1)
            .map(|(t, nodes)| (*t, nodes.keys().cloned().collect()))
            .collect()
    }

    /// Map records whose epoch did not rise or whose term fell, against the one before.
    pub fn map_regressions(&self) -> Vec<String> {
        let maps: Vec<&MapSeen> = self.maps.values().collect();
        maps.windows(2)
            .filter(|w| w[1].epoch <= w[0].epoch || w[1].term < w[0].term)
            .map(|w| format!("{:?} after {:?}", w[1], w[0]))
            .collect()
    }
}

/// Starts the watch and the subscription; they run until the returned handles are aborted.
pub fn start(
    client: async_nats::Client,
) -> (Arc<Mutex<Leadership>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Mutex::new(Leadership::default()));
    let watch = tokio::spawn(watch_control(client.clone(), seen.clone()));
    let events = tokio::spawn(watch_events(client, seen.clone()));
    (seen, vec![watch, events])
}

async fn watch_control(client: async_nats::Client, seen: Arc<Mutex<Leadership>>) {
    let js = async_nats::jetstream::new(client);
    let bucket = format!("{CLUSTER}-control");
    loop {
        if let Ok(kv) = js.get_key_value(&bucket).await
            && let Ok(mut w) = kv.watch_all().await
        {
            while let Some(Ok(e)) = w.next().await {
                let Ok(v) = serde_json::from_slice::<Value>(&e.value) else {
                    continue;
                };
                let mut s = seen.lock().await;
                match e.key.as_str() {
                    "leader" => {
                        if let Some(node) = v["node"].as_str() {
                            let term = v["term"].as_u64().unwrap_or(e.revision);
                            s.saw(term, node, "lease");
                        }
                    }
                    "map" => {
                        if let (Some(epoch), Some(term)) = (v["epoch"].as_u64(), v["term"].as_u64())
                        {
                            s.maps.insert(
                                e.revision,
                                MapSeen {
                                    revision: e.revision,
                                    epoch,
                                    term,
                                },
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn watch_events(client: async_nats::Client, seen: Arc<Mutex<Leadership>>) {
    loop {
        if let Ok(mut sub) = client.subscribe(format!("{CLUSTER}.cluster.events")).await {
            while let Some(m) = sub.next().await {
                let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                    continue;
                };
                if v["type"] == "LeaderElected"
                    && let (Some(node), Some(term)) = (v["node"].as_str(), v["term"].as_u64())
                {
                    seen.lock().await.saw(term, node, "event");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_in_one_term_are_a_split_and_a_falling_map_term_a_regression() {
        let mut l = Leadership::default();
        l.read_log(r#"{"fields":{"message":"elected leader","node":"n1","term":5}}"#);
        l.saw(5, "n1", "lease");
        l.saw(9, "n2", "event");
        assert!(l.split_terms().is_empty());
        l.read_log(
            "noise\n{\"fields\":{\"message\":\"elected leader\",\"node\":\"n3\",\"term\":9}}",
        );
        assert_eq!(l.split_terms(), vec![(9, vec!["n2".into(), "n3".into()])]);
        l.maps.insert(
            1,
            MapSeen {
                revision: 1,
                epoch: 1,
                term: 5,
            },
        );
        l.maps.insert(
            3,
            MapSeen {
                revision: 3,
                epoch: 2,
                term: 9,
            },
        );
        assert!(l.map_regressions().is_empty());
        l.maps.insert(
            4,
            MapSeen {
                revision: 4,
                epoch: 3,
                term: 5,
            },
        );
        assert_eq!(l.map_regressions().len(), 1);
    }
}
