//! Ordered consumers held to their start.
//!
//! async-nats recreates an ordered consumer that misses a message or a heartbeat, or whose pull
//! finds no responder (in a cluster, just after it is created). Once it has delivered a message
//! it resumes after that one; before, it starts over from the stream's first message, whatever
//! its deliver policy (`recreate_consumer_stream` in async-nats 0.51). [`Anchored`] notices and
//! makes a new consumer instead.

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tracing::warn;

/// A consumer's start: the first sequence after `start` (everything for 0).
fn deliver_after(start: u64) -> consumer::DeliverPolicy {
    if start > 0 {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start + 1,
        }
    } else {
        consumer::DeliverPolicy::All
    }
}

/// How many times [`Anchored`] recreates a consumer that started over from the stream's start.
const ANCHOR_ATTEMPTS: u32 = 3;

/// An ordered consumer's messages after stream sequence `after`, held to that start. Readers
/// skip what is at or below their position, so a consumer that started over applies nothing
/// twice, but a slot, a replay or an actor's read would read its whole subject again: a first
/// message at or below `after` gets a new consumer instead (at most [`ANCHOR_ATTEMPTS`] in all).
pub struct Anchored {
    stream: jetstream::stream::Stream,
    cfg: consumer::pull::OrderedConfig,
    after: u64,
    messages: consumer::pull::Ordered,
    started: bool,
    attempts: u32,
}

impl Anchored {
    /// The messages of `filter_subjects` (one or several) on `stream` after `after`.
    pub async fn open(
        stream: jetstream::stream::Stream,
        filter_subjects: Vec<String>,
        after: u64,
    ) -> Result<Self, String> {
        let mut cfg = consumer::pull::OrderedConfig {
            deliver_policy: deliver_after(after),
            ..Default::default()
        };
        match <[String; 1]>::try_from(filter_subjects) {
            Ok([one]) => cfg.filter_subject = one,
            Err(many) => cfg.filter_subjects = many,
        }
        Self::open_first(stream, cfg.clone(), cfg, after).await
    }

    /// [`Anchored::open`] whose first consumer is made from `first` (a test stands in a
    /// restarted one with it), and any later one from `cfg`.
    pub(crate) async fn open_first(
        stream: jetstream::stream::Stream,
        first: consumer::pull::OrderedConfig,
        cfg: consumer::pull::OrderedConfig,
        after: u64,
    ) -> Result<Self, String> {
        let messages = ordered_messages(&stream, first).await?;
        Ok(Anchored {
            stream,
            cfg,
            after,
            messages,
            started: false,
            attempts: 1,
        })
    }

    /// The next message, or the consumer's error; `None` once it has ended.
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, String>> {
        loop {
            let msg = match self.messages.next().await? {
                Ok(m) => m,
                Err(e) => return Some(Err(e.to_string())),
            };
            if !self.started {
                let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX);
                if seq <= self.after && self.attempts < ANCHOR_ATTEMPTS {
                    warn!(
                        seq,
                        after = self.after,
                        "an ordered consumer started over from the stream's start; recreating it"
                    );
                    self.attempts += 1;
                    match ordered_messages(&self.stream, self.cfg.clone()).await {
                        Ok(m) => self.messages = m,
                        Err(e) => return Some(Err(e)),
                    }
                    continue;
                }
                self.started = true;
            }
            return Some(Ok(msg));
        }
    }
}

/// The messages of a new ordered consumer on `stream`.
async fn ordered_messages(
    stream: &jetstream::stream::Stream,
    cfg: consumer::pull::OrderedConfig,
) -> Result<consumer::pull::Ordered, String> {
    stream
        .create_consumer(cfg)
        .await
        .map_err(|e| e.to_string())?
        .messages()
        .await
        .map_err(|e| e.to_string())
}

/// How many consumers [`last_seq_before`] creates before it gives up.
const TIME_LOOKUP_ATTEMPTS: u32 = 3;

/// The last sequence of `stream`, at most `last`, stored before `start_time`: one less than the
/// first message stored at or after it, or `last` when none comes within 2 s.
pub async fn last_seq_before(
    stream: &jetstream::stream::Stream,
    last: u64,
    start_time: async_nats::datetime::DateTime,
) -> Result<u64, String> {
    lookup_from(
        stream,
        last,
        start_time,
        consumer::DeliverPolicy::ByStartTime { start_time },
    )
    .await
}

/// [`last_seq_before`] whose first consumer starts as `first` says (a test stands in a
/// restarted one with it). A first message stored before `start_time` came from a consumer
/// that started over from the stream's start, and the lookup is made again on a new one.
async fn lookup_from(
    stream: &jetstream::stream::Stream,
    last: u64,
    start_time: async_nats::datetime::DateTime,
    first: consumer::DeliverPolicy,
) -> Result<u64, String> {
    let mut deliver_policy = first;
    for _ in 0..TIME_LOOKUP_ATTEMPTS {
        let cfg = consumer::pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        };
        deliver_policy = consumer::DeliverPolicy::ByStartTime { start_time };
        let mut messages = ordered_messages(stream, cfg).await?;
        match tokio::time::timeout(std::time::Duration::from_secs(2), messages.next()).await {
            Ok(Some(Ok(m))) => {
                let info = m.info().map_err(|e| e.to_string())?;
                if info.published < start_time {
                    warn!(
                        seq = info.stream_sequence,
                        "the time lookup's consumer started over from the stream's start; asking again"
                    );
                    continue;
                }
                return Ok(info.stream_sequence.saturating_sub(1).min(last));
            }
            Err(_) => return Ok(last),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("the time lookup consumer ended".into()),
        }
    }
    Err(format!(
        "the time lookup's consumer started over from the stream's start {TIME_LOOKUP_ATTEMPTS} times"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next_seq(a: &mut Anchored) -> u64 {
        let m = a.next().await.unwrap().unwrap();
        m.info().unwrap().stream_sequence
    }

    /// A consumer that starts over from the stream's first message, as a restarted ordered
    /// consumer does, is replaced: by one that starts after the anchor, and in a time lookup
    /// by one that starts at the time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_replace_a_consumer_that_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let binary = crate::natsd::find_nats_server(false).expect("nats-server (scripts/tools.sh)");
        let mut nats = crate::natsd::NatsCluster::start(crate::natsd::NatsOptions::new(
            dir.path().join("nats"),
            binary,
        ))
        .await
        .unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client);
        let stream = js
            .create_stream(jetstream::stream::Config {
                name: "anchored".into(),
                subjects: vec!["a.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        for n in 1..=10u8 {
            js.publish(format!("a.{}", n % 2), vec![n].into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        // As asked: from 6, across both subjects.
        let mut a = Anchored::open(stream.clone(), vec!["a.0".into(), "a.1".into()], 5)
            .await
            .unwrap();
        assert_eq!((next_seq(&mut a).await, a.attempts), (6, 1));
        // A first consumer that delivers from the start is replaced once, and the reader goes on
        // from 6 in order.
        let cfg = consumer::pull::OrderedConfig {
            filter_subject: "a.>".into(),
            deliver_policy: deliver_after(5),
            ..Default::default()
        };
        let restarted = consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..cfg.clone()
        };
        let mut a = Anchored::open_first(stream.clone(), restarted, cfg, 5)
            .await
            .unwrap();
        assert_eq!((next_seq(&mut a).await, a.attempts), (6, 2));
        assert_eq!(next_seq(&mut a).await, 7);
        // The time of message 6: the last sequence before it is 5, asked as such or through a
        // first consumer that delivers from the start (which would have answered 0).
        let t6 = stream.get_raw_message(6).await.unwrap().time;
        assert_eq!(last_seq_before(&stream, 10, t6).await, Ok(5));
        assert_eq!(
            lookup_from(&stream, 10, t6, consumer::DeliverPolicy::All).await,
            Ok(5)
        );
        nats.stop().await.unwrap();
    }
}
