//! Ordered readers: a stream's messages in order, with a bounded read-ahead, held to their
//! start.
//!
//! [`Anchored`] is what async-nats' ordered consumer is (an ephemeral pull consumer without
//! acks, in memory, recreated after the last message it delivered when it skips one, misses
//! two heartbeats, or is deleted), with two differences:
//! - **Its read-ahead is bounded in bytes.** async-nats asks the server for 500 messages at a
//!   time with no byte limit, and may hold about 750: with frames of 8 MB that is 6 GB. Here
//!   each pull also asks for at most [`read_ahead_bytes`] (the stream's largest message, so
//!   that every message fits in a pull), and the client asks again once half of it has come.
//!   With the usual 16 KiB frames the message count binds first, as before.
//! - **It is held to its start.** async-nats recreates an ordered consumer that finds no
//!   responder (in a cluster, just after it is created) from the stream's first message when
//!   it has delivered none yet, whatever its deliver policy (`recreate_consumer_stream` in
//!   async-nats 0.51). Here a new consumer starts after the last message delivered, or as the
//!   first was asked; and a first message at or below the start (a consumer that started over
//!   anyway) gets a new consumer.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tracing::{debug, info, warn};

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

/// Messages asked for in one pull (async-nats' ordered consumer asks for as many).
const PULL_BATCH_MESSAGES: usize = 500;

/// How long one pull waits on the server, and the idle heartbeat the server sends meanwhile
/// (async-nats' defaults for ordered consumers). Two missed heartbeats make a new consumer.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
const PULL_HEARTBEAT: Duration = Duration::from_secs(15);

/// Bytes beyond the stream's largest message that one pull allows (subject, headers).
const READ_AHEAD_SLACK_BYTES: usize = 64 << 10;

/// The read-ahead of a stream with no message size limit.
const READ_AHEAD_UNLIMITED_BYTES: usize = 64 << 20;

/// How long [`Anchored`] keeps trying to make a new consumer (the server restarting, or a
/// cluster electing a stream leader) before it reports the error, and its longest pause.
const RECREATE_FOR: Duration = Duration::from_secs(60);
const RECREATE_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Bytes one pull asks for at most on `stream`: its largest message and a little more, so
/// that any message fits in a pull (the server refuses a pull that a message is larger than).
/// The client asks again once half has come, so about 1.5 times this is in flight at most.
pub fn read_ahead_bytes(stream: &jetstream::stream::Stream) -> usize {
    let largest = usize::try_from(stream.cached_info().config.max_message_size)
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(READ_AHEAD_UNLIMITED_BYTES);
    largest.saturating_add(READ_AHEAD_SLACK_BYTES)
}

/// An ordered reader of `filter_subjects` on a stream after sequence `after`, held to that
/// start, with a read-ahead bounded in bytes (see the module). Readers skip what is at or
/// below their position, so a consumer that started over applies nothing twice, but a slot, a
/// replay or an actor's read would read its whole subject again: a first message at or below
/// `after` gets a new consumer instead (at most [`ANCHOR_ATTEMPTS`] in all).
pub struct Anchored {
    stream: jetstream::stream::Stream,
    /// The consumer's config, its deliver policy for a consumer that has delivered nothing.
    cfg: consumer::pull::OrderedConfig,
    after: u64,
    messages: Option<consumer::pull::Stream>,
    /// The current consumer's name and the last consumer sequence it delivered.
    consumer: String,
    consumer_seq: u64,
    /// The last stream sequence handed out, once one has been.
    last: Option<u64>,
    missed_heartbeat: bool,
    attempts: u32,
    read_ahead: usize,
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
        let read_ahead = read_ahead_bytes(&stream);
        let (consumer, messages) = pull_messages(&stream, first, read_ahead).await?;
        Ok(Anchored {
            stream,
            cfg,
            after,
            messages: Some(messages),
            consumer,
            consumer_seq: 0,
            last: None,
            missed_heartbeat: false,
            attempts: 1,
            read_ahead,
        })
    }

    /// The next message, or the consumer's error; `None` once it has ended.
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, String>> {
        loop {
            let Some(messages) = self.messages.as_mut() else {
                if let Err(e) = self.recreate().await {
                    return Some(Err(e));
                }
                continue;
            };
            let msg = match messages.next().await? {
                Ok(m) => m,
                Err(e) => {
                    use consumer::pull::MessagesErrorKind as K;
                    match e.kind() {
                        K::MissingHeartbeat if !self.missed_heartbeat => {
                            self.missed_heartbeat = true;
                        }
                        K::MissingHeartbeat | K::ConsumerDeleted | K::NoResponders => {
                            info!(error = %e, consumer = %self.consumer, last = ?self.last, "ordered reader: its consumer is gone; making a new one after the last message read");
                            self.renew();
                        }
                        _ => return Some(Err(e.to_string())),
                    }
                    continue;
                }
            };
            self.missed_heartbeat = false;
            let (consumer_seq, seq) = match msg.info() {
                Ok(i) => (i.consumer_sequence, i.stream_sequence),
                Err(e) => return Some(Err(e.to_string())),
            };
            if consumer_seq != self.consumer_seq + 1 {
                info!(
                    expected = self.consumer_seq + 1,
                    got = consumer_seq,
                    consumer = %self.consumer,
                    "ordered reader: its consumer skipped a message; making a new one after the last message read"
                );
                self.renew();
                continue;
            }
            self.consumer_seq = consumer_seq;
            if self.last.is_none() && seq <= self.after && self.attempts < ANCHOR_ATTEMPTS {
                warn!(
                    seq,
                    after = self.after,
                    "an ordered consumer started over from the stream's start; recreating it"
                );
                self.attempts += 1;
                self.renew();
                continue;
            }
            self.last = Some(seq);
            return Some(Ok(msg));
        }
    }

    /// Drops the current consumer's messages (its consumer is deleted in the background; the
    /// server would remove it after 30 s idle anyway); the next read makes a new one.
    fn renew(&mut self) {
        self.messages = None;
        let (stream, name) = (self.stream.clone(), std::mem::take(&mut self.consumer));
        if !name.is_empty() {
            tokio::spawn(async move {
                let _ = stream.delete_consumer(&name).await;
            });
        }
    }

    /// A new consumer after the last message handed out (or as the first was asked, when none
    /// was), retried for [`RECREATE_FOR`].
    async fn recreate(&mut self) -> Result<(), String> {
        let cfg = consumer::pull::OrderedConfig {
            deliver_policy: match self.last {
                Some(seq) => deliver_after(seq),
                None => self.cfg.deliver_policy,
            },
            ..self.cfg.clone()
        };
        let deadline = tokio::time::Instant::now() + RECREATE_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            match pull_messages(&self.stream, cfg.clone(), self.read_ahead).await {
                Ok((consumer, messages)) => {
                    (self.consumer, self.messages, self.consumer_seq) =
                        (consumer, Some(messages), 0);
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() + pause > deadline => {
                    return Err(format!(
                        "an ordered reader could not make a new consumer for {} s: {e}",
                        RECREATE_FOR.as_secs()
                    ));
                }
                Err(e) => {
                    debug!(error = %e, "ordered reader: making a new consumer failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RECREATE_PAUSE_MAX);
                }
            }
        }
    }
}

/// A new consumer on `stream` (ephemeral, no acks, in memory, as an ordered consumer is), and
/// its messages pulled at most [`PULL_BATCH_MESSAGES`] and `read_ahead` bytes at a time.
async fn pull_messages(
    stream: &jetstream::stream::Stream,
    cfg: consumer::pull::OrderedConfig,
    read_ahead: usize,
) -> Result<(String, consumer::pull::Stream), String> {
    let cfg: consumer::pull::Config = cfg.into();
    let consumer = stream
        .create_consumer(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let name = consumer.cached_info().name.clone();
    let messages = consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH_MESSAGES)
        .max_bytes_per_batch(read_ahead)
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    Ok((name, messages))
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
        let (_, mut messages) = pull_messages(stream, cfg, read_ahead_bytes(stream)).await?;
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

    /// A lone nats-server, a stream on it, and the server's directory (dropped after it).
    async fn lone_stream(
        cfg: jetstream::stream::Config,
    ) -> (
        crate::natsd::NatsCluster,
        jetstream::Context,
        jetstream::stream::Stream,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let binary = crate::natsd::find_nats_server(false).expect("nats-server (scripts/tools.sh)");
        let nats = crate::natsd::NatsCluster::start(crate::natsd::NatsOptions::new(
            dir.path().join("nats"),
            binary,
        ))
        .await
        .unwrap();
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let stream = js.create_stream(cfg).await.unwrap();
        (nats, js, stream, dir)
    }

    /// A reader of 40 messages of 256 KiB on a stream whose messages are at most 1 MiB asks
    /// the server for about 1 MiB at a time, not for all 40 (async-nats' ordered consumer
    /// asks for 500 messages, whatever their size); and when its consumer is deleted under it,
    /// it goes on with a new one after the last message it handed out, none lost or repeated.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_pulls_a_bounded_number_of_bytes_and_survives_its_consumers_deletion() {
        let (mut nats, js, stream, _dir) = lone_stream(jetstream::stream::Config {
            name: "bounded".into(),
            subjects: vec!["b.>".into()],
            max_message_size: 1 << 20,
            ..Default::default()
        })
        .await;
        assert_eq!(
            read_ahead_bytes(&stream),
            (1 << 20) + READ_AHEAD_SLACK_BYTES
        );
        for n in 1..=40u8 {
            js.publish("b.x", vec![n; 256 << 10].into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let mut a = Anchored::open(stream.clone(), vec!["b.x".into()], 0)
            .await
            .unwrap();
        assert_eq!(next_seq(&mut a).await, 1);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let delivered = stream
            .consumer_info(&a.consumer)
            .await
            .unwrap()
            .delivered
            .stream_sequence;
        // About 1.5 pulls of 1 MiB (4 messages each) may be out, and one message read.
        assert!(
            delivered <= 12,
            "the server sent {delivered} of 40 messages"
        );
        for want in 2..=5 {
            assert_eq!(next_seq(&mut a).await, want);
        }
        let first = a.consumer.clone();
        stream.delete_consumer(&first).await.unwrap();
        for want in 6..=40 {
            let got = tokio::time::timeout(std::time::Duration::from_secs(60), next_seq(&mut a))
                .await
                .unwrap();
            assert_eq!(got, want);
        }
        assert_ne!(a.consumer, first, "a new consumer took over");
        nats.stop().await.unwrap();
    }

    /// A consumer that starts over from the stream's first message, as a restarted ordered
    /// consumer does, is replaced: by one that starts after the anchor, and in a time lookup
    /// by one that starts at the time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_replace_a_consumer_that_started_over() {
        let (mut nats, js, stream, _dir) = lone_stream(jetstream::stream::Config {
            name: "anchored".into(),
            subjects: vec!["a.>".into()],
            ..Default::default()
        })
        .await;
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
