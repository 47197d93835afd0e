//! The coordination buckets on JetStream, and the translation between KV entries and the core's
//! inputs and actions.
//!
//! Bucket `<c>-control` holds the lease (`leader`) and the shard map (`map`) in one stream so
//! that the leader's map write and its lease check go in one atomic batch: the server itself
//! refuses a deposed leader's write. Bucket `<c>-nodes` holds one TTL'd membership key per node.
//! See docs/nats-layout.md for every record.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv, stream};
use async_nats::{HeaderMap, HeaderValue, header};
use bytes::Bytes;
use cluster::core::{Gone, Input, KvOutcome, MapOutcome};
use cluster::{NodeId, Revision, ShardMap, Term};
use futures::StreamExt;
use tracing::warn;

use crate::metrics::Metrics;
use crate::records::{self, MemberRecord};

/// How long a failed KV write waits before it is reported (so a write that fails at once is
/// not retried in a tight loop).
pub const FAILED_WRITE_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// The lease key.
pub const LEASE_KEY: &str = "leader";
/// The map key.
pub const MAP_KEY: &str = "map";
/// How long the server keeps an expiry or delete marker (`subject_delete_marker_ttl`).
pub const MARKER_TTL: Duration = Duration::from_secs(60);
/// Timeout of the JetStream requests that create or bind the buckets.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at setting up the buckets before the node gives up.
pub const SETUP_ATTEMPTS: u32 = 6;
/// Timeout of one JetStream readiness probe (`$JS.API.INFO`) before setup.
pub const READY_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long setup waits for JetStream to answer before trying anyway.
pub const READY_LIMIT: Duration = Duration::from_secs(30);
/// Largest membership record.
pub const MAX_MEMBER_RECORD_BYTES: usize = 16 * 1024;
/// Most membership keys read in one listing.
pub const MAX_MEMBER_KEYS: usize = 4_096;

const KV_OPERATION: &str = "KV-Operation";

/// The subject of topology events.
pub fn events_subject(cluster: &str) -> String {
    format!("{cluster}.cluster.events")
}

/// The control bucket's name.
pub fn control_bucket(cluster: &str) -> String {
    format!("{cluster}-control")
}

/// The membership bucket's name.
pub fn nodes_bucket(cluster: &str) -> String {
    format!("{cluster}-nodes")
}

/// Why the buckets could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A JetStream request failed.
    #[error("{what}: {message}")]
    JetStream {
        /// What was being done.
        what: String,
        /// The error.
        message: String,
    },
    /// The server refused this node's JetStream requests for lack of permission: its user's
    /// publish permissions leave out the JetStream API subjects tessel uses (retrying would
    /// not help).
    #[error(
        "the NATS server refused a JetStream request for lack of permission (the log names the subject): the node's user needs publish on $JS.API.INFO and on the API subjects of tessel's streams (see deploy/nats/nats.conf, role NODE)"
    )]
    PermissionDenied,
}

fn js_err(what: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> StoreError {
    let what = what.into();
    move |e| StoreError::JetStream {
        what,
        message: e.to_string(),
    }
}

/// Waits until JetStream answers an account-info request, each probe with a short timeout.
///
/// A clustered server answers no JetStream API request until its servers have elected a meta
/// leader (about half a second after a cold start): a request sent before that is dropped, or
/// answered 503 ("JetStream system temporarily unavailable") once the server knows. A setup
/// request sent then would sit out its whole timeout ([`SETUP_TIMEOUT`]) for nothing.
/// Returns how long it waited; gives up after `limit` (the setup then reports what is wrong),
/// and at once on any other answer, an error included (JetStream disabled). A probe the server
/// refuses for lack of permission goes unanswered too (the refusal comes as a connection
/// event, which the node counts in `metrics`): that is [`StoreError::PermissionDenied`] at
/// once, not a wait.
pub async fn wait_for_jetstream(
    client: &async_nats::Client,
    limit: Duration,
    metrics: &Metrics,
) -> Result<Duration, StoreError> {
    use jetstream::context::AccountErrorKind;
    let probe = jetstream::ContextBuilder::new()
        .timeout(READY_PROBE_TIMEOUT)
        .build(client.clone());
    let started = std::time::Instant::now();
    let refused_before = refusals(metrics);
    let mut waiting = false;
    while started.elapsed() < limit {
        let pause = match probe.query_account().await {
            // Dropped: the probe's own timeout was the wait.
            Err(e) if matches!(e.kind(), AccountErrorKind::TimedOut) => Duration::ZERO,
            // A server that knows it has no meta leader says so at once.
            Err(e) if matches!(e.kind(), AccountErrorKind::JetStream(ref j) if j.code() == 503) => {
                READY_PROBE_TIMEOUT / 5
            }
            // An answer, or no responders (JetStream is off): the setup says what is wrong.
            _ => break,
        };
        if refusals(metrics) > refused_before {
            return Err(StoreError::PermissionDenied);
        }
        if !waiting {
            warn!("JetStream does not answer yet (no meta leader?); waiting");
            waiting = true;
        }
        tokio::time::sleep(pause).await;
    }
    Ok(started.elapsed())
}

/// How many requests or subscriptions the server has refused this node for lack of
/// permission (counted by the connection's event handler).
fn refusals(metrics: &Metrics) -> u64 {
    metrics
        .nats_permission_violations_total
        .load(Ordering::Relaxed)
}

/// Creates a stream, or binds the existing one of that name.
///
/// The create goes first: the meta leader answers it, and it is idempotent for an identical
/// configuration (every node asks for the same). A stream-info request about a stream another
/// node is creating at that moment goes unanswered until the stream has a leader, which cost a
/// node joining a forming cluster the whole setup timeout. Only when the create is refused (a
/// stream of that name with another configuration, e.g. an older version's) is the stream bound
/// as it is. The returned stream's `cached_info` is the server's view at that moment.
pub async fn create_or_bind(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, jetstream::context::CreateStreamError> {
    let name = config.name.clone();
    match js.create_stream(config).await {
        Ok(s) => Ok(s),
        Err(e) => js.get_stream(&name).await.map_err(|_| e),
    }
}

/// Creates a KV bucket with per-key TTLs and limit markers, or binds an existing one, and makes
/// sure its stream allows atomic batches when `atomic` is set. Never calls
/// `update_key_value` (it would reset the stream's atomic flag).
pub async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
    max_value_bytes: usize,
    atomic: bool,
) -> Result<kv::Store, StoreError> {
    let name = format!("KV_{bucket}");
    // The stream a KV bucket is, created in one step with every flag it needs (a later
    // update_stream races with the other nodes creating it and can stall for seconds).
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_message_size: i32::try_from(max_value_bytes).unwrap_or(i32::MAX),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        allow_message_ttl: true,
        subject_delete_marker_ttl: Some(MARKER_TTL),
        allow_atomic_publish: atomic,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let existing = create_or_bind(js, config)
        .await
        .map_err(|e| js_err(format!("stream {name}"))(&e))?;
    if atomic {
        let info = existing.cached_info();
        if !info.config.allow_atomic_publish {
            let config = stream::Config {
                allow_atomic_publish: true,
                ..info.config.clone()
            };
            js.update_stream(config)
                .await
                .map_err(|e| js_err(format!("enable atomic batches on {name}"))(&e))?;
        }
    }
    // The handle is made from the stream in hand: another stream-info request now could be the
    // one that goes unanswered (see `create_or_bind`).
    Ok(kv::Store {
        name: bucket.to_string(),
        stream_name: name,
        prefix: format!("$KV.{bucket}."),
        put_prefix: None,
        use_jetstream_prefix: false,
        stream: existing,
    })
}

/// Binds a bucket to `js` (its timeout then applies to the handle's requests), retrying an
/// unanswered bind for up to `budget`: right after the bucket's stream was created it may not
/// have a leader yet, and until it has, its info requests go unanswered.
async fn bind_bucket(js: &jetstream::Context, bucket: &str, budget: Duration) -> Option<kv::Store> {
    let started = std::time::Instant::now();
    loop {
        match js.get_key_value(bucket).await {
            Ok(s) => return Some(s),
            Err(e) if started.elapsed() < budget => {
                tracing::debug!(bucket, error = %e, "binding the bucket; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                warn!(bucket, error = %e, "cannot bind the bucket to the request timeout");
                return None;
            }
        }
    }
}

/// Reads every entry of a KV bucket without creating a consumer: the stream's subject list
/// (from stream info), then a direct get of each key. Returns the entries and the stream's
/// last sequence before the listing.
pub async fn list_entries(
    js: &jetstream::Context,
    store: &kv::Store,
    bucket: &str,
    limit: usize,
) -> Result<(Vec<kv::Entry>, u64), String> {
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| e.to_string())?;
    let prefix = format!("$KV.{bucket}.");
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| e.to_string())?;
    let as_of = subjects.info.state.last_sequence;
    let mut keys = Vec::new();
    while let Some(item) = subjects.next().await {
        let (subject, _) = item.map_err(|e| e.to_string())?;
        if let Some(key) = subject.strip_prefix(&prefix) {
            keys.push(key.to_string());
        }
        if keys.len() >= limit {
            warn!(limit, bucket, "listing truncated");
            break;
        }
    }
    keys.sort();
    let mut entries = Vec::with_capacity(keys.len());
    for key in keys {
        match store.entry(&key).await {
            Ok(Some(e)) => entries.push(e),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok((entries, as_of))
}

/// The buckets, and the requests the core's actions turn into.
#[derive(Clone)]
pub struct Store {
    client: async_nats::Client,
    js: jetstream::Context,
    control: kv::Store,
    nodes: kv::Store,
    control_prefix: String,
    nodes_prefix: String,
    nodes_bucket: String,
    events_subject: String,
    lease_ttl: String,
    member_ttl: String,
    lease_ttl_ms: u64,
    max_record_bytes: usize,
    batch_nonce: u64,
    batch_counter: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

fn ttl_header(ms: u64) -> String {
    format!("{}s", ms.div_ceil(1_000).max(1))
}

/// Milliseconds since the Unix epoch by the wall clock (informative fields only).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Creates or binds the buckets of `cluster`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        client: async_nats::Client,
        cluster: &str,
        replicas: usize,
        request_timeout: Duration,
        lease_ttl_ms: u64,
        member_ttl_ms: u64,
        max_record_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreError> {
        let js = jetstream::ContextBuilder::new()
            .timeout(request_timeout)
            .build(client.clone());
        // Creating replicated streams takes longer than a KV request may: set up with a longer
        // timeout, retrying while the servers form their JetStream quorum.
        let setup = jetstream::ContextBuilder::new()
            .timeout(SETUP_TIMEOUT)
            .build(client.clone());
        let refused_before = refusals(&metrics);
        let waited = wait_for_jetstream(&client, READY_LIMIT, &metrics).await?;
        if waited >= READY_LIMIT {
            warn!(
                ms = waited.as_millis() as u64,
                "JetStream still does not answer; setting up the buckets anyway"
            );
        } else if waited > READY_PROBE_TIMEOUT {
            tracing::info!(
                ms = waited.as_millis() as u64,
                "JetStream answers; setting up the buckets"
            );
        }
        let control_name = control_bucket(cluster);
        let nodes_name = nodes_bucket(cluster);
        let mut attempt = 0;
        let (control, nodes) = loop {
            attempt += 1;
            let both = async {
                let c =
                    ensure_bucket(&setup, &control_name, replicas, max_record_bytes, true).await?;
                let n = ensure_bucket(
                    &setup,
                    &nodes_name,
                    replicas,
                    MAX_MEMBER_RECORD_BYTES,
                    false,
                )
                .await?;
                Ok::<_, StoreError>((c, n))
            };
            match both.await {
                Ok(v) => break v,
                // The server refused a request of the setup (it goes unanswered): no retry.
                Err(_) if refusals(&metrics) > refused_before => {
                    return Err(StoreError::PermissionDenied);
                }
                Err(e) if attempt < SETUP_ATTEMPTS => {
                    warn!(attempt, error = %e, "setting up the buckets failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
                Err(e) => return Err(e),
            }
        };
        // Bind the buckets to the short-timeout context used by the lease's requests.
        let control = bind_bucket(&js, &control_name, SETUP_TIMEOUT)
            .await
            .unwrap_or(control);
        let nodes = bind_bucket(&js, &nodes_name, SETUP_TIMEOUT)
            .await
            .unwrap_or(nodes);
        let batch_nonce = wall_ms() ^ u64::from(std::process::id()).rotate_left(40);
        Ok(Store {
            client,
            js,
            control,
            nodes,
            control_prefix: format!("$KV.{control_name}."),
            nodes_prefix: format!("$KV.{nodes_name}."),
            nodes_bucket: nodes_name.clone(),
            events_subject: events_subject(cluster),
            lease_ttl: ttl_header(lease_ttl_ms),
            member_ttl: ttl_header(member_ttl_ms),
            lease_ttl_ms,
            max_record_bytes,
            batch_nonce,
            batch_counter: Arc::new(AtomicU64::new(0)),
            metrics,
        })
    }

    /// The control bucket.
    pub fn control(&self) -> &kv::Store {
        &self.control
    }

    /// The membership bucket.
    pub fn nodes(&self) -> &kv::Store {
        &self.nodes
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Publishes a topology event on `<c>.cluster.events` (core NATS: for observers; the
    /// buckets remain the source of truth).
    pub async fn announce(&self, body: serde_json::Value) {
        let payload = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        if let Err(e) = self
            .client
            .publish(self.events_subject.clone(), payload)
            .await
        {
            warn!(error = %e, "cannot publish a topology event");
        }
    }

    fn bad_record(&self, what: &str, revision: u64, err: &records::RecordError) {
        Metrics::inc(&self.metrics.bad_records_total);
        warn!(what, revision, error = %err, "ignoring a bad record");
    }

    /// The core input for the lease key's entry (None: the key has no message at all).
    pub fn lease_input(&self, entry: Option<&kv::Entry>) -> Input {
        let Some(e) = entry else {
            return Input::LeaseSeen {
                entry: None,
                revision: Revision(0),
            };
        };
        let revision = Revision(e.revision);
        match e.operation {
            kv::Operation::Put => {
                match records::parse_lease(&e.value, e.revision, self.max_record_bytes) {
                    Ok(entry) => Input::LeaseSeen {
                        entry: Some(entry),
                        revision,
                    },
                    Err(err) => {
                        self.bad_record("lease", e.revision, &err);
                        Input::LeaseUnreadable { revision }
                    }
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => Input::LeaseSeen {
                entry: None,
                revision,
            },
        }
    }

    /// The core input for the map key's entry.
    pub fn map_input(&self, entry: Option<&kv::Entry>) -> Input {
        let Some(e) = entry else {
            return Input::MapSeen {
                map: None,
                revision: Revision(0),
            };
        };
        let revision = Revision(e.revision);
        let map = match e.operation {
            kv::Operation::Put => {
                match records::parse_map(&e.value, e.revision, self.max_record_bytes) {
                    Ok(map) => Some(map),
                    Err(err) => {
                        self.bad_record("map", e.revision, &err);
                        None
                    }
                }
            }
            _ => None,
        };
        Input::MapSeen { map, revision }
    }

    /// The core input for a control-bucket entry from a watch (None for unknown keys).
    pub fn control_input(&self, e: &kv::Entry) -> Option<Input> {
        match e.key.as_str() {
            LEASE_KEY => Some(self.lease_input(Some(e))),
            MAP_KEY => Some(self.map_input(Some(e))),
            other => {
                Metrics::inc(&self.metrics.bad_records_total);
                warn!(key = other, "ignoring an unknown key in the control bucket");
                None
            }
        }
    }

    /// The core input for a membership entry (None when unreadable).
    pub fn member_input(&self, e: &kv::Entry) -> Option<Input> {
        let revision = Revision(e.revision);
        let node = match NodeId::new(&e.key) {
            Ok(n) => n,
            Err(err) => {
                Metrics::inc(&self.metrics.bad_records_total);
                warn!(key = %e.key, error = %err, "ignoring a membership key that is not a node id");
                return None;
            }
        };
        let record = match e.operation {
            kv::Operation::Put => {
                match records::parse_member(&e.value, &e.key, MAX_MEMBER_RECORD_BYTES) {
                    Ok((_, info, _)) => Ok(info),
                    Err(err) => {
                        self.bad_record("member", e.revision, &err);
                        return None;
                    }
                }
            }
            kv::Operation::Delete => Err(Gone::Deleted),
            kv::Operation::Purge => Err(Gone::Expired),
        };
        Some(Input::MemberSeen {
            node,
            record,
            revision,
        })
    }

    /// Reads the lease key.
    pub async fn read_lease(&self) -> Option<Input> {
        match self.control.entry(LEASE_KEY).await {
            Ok(e) => Some(self.lease_input(e.as_ref())),
            Err(err) => self.kv_failed("read lease", &err),
        }
    }

    /// Reads the map key.
    pub async fn read_map(&self) -> Option<Input> {
        match self.control.entry(MAP_KEY).await {
            Ok(e) => Some(self.map_input(e.as_ref())),
            Err(err) => self.kv_failed("read map", &err),
        }
    }

    /// Reads every membership record.
    pub async fn read_members(&self) -> Option<Input> {
        let (list, as_of) =
            match list_entries(&self.js, &self.nodes, &self.nodes_bucket, MAX_MEMBER_KEYS).await {
                Ok(v) => v,
                Err(err) => return self.kv_failed("membership listing", &err),
            };
        let mut entries = Vec::new();
        for e in &list {
            if let Some(Input::MemberSeen {
                node,
                record: Ok(info),
                revision,
            }) = self.member_input(e)
            {
                entries.push((node, info, revision));
            }
        }
        Some(Input::MembersListed {
            entries,
            as_of: Revision(as_of),
        })
    }

    fn kv_failed<T>(&self, what: &str, err: &dyn std::fmt::Display) -> Option<T> {
        Metrics::inc(&self.metrics.kv_errors_total);
        warn!(what, error = %err, "KV request failed");
        None
    }

    /// Publishes one KV write with the given headers and classifies the outcome. A failure is
    /// reported no sooner than [`FAILED_WRITE_PAUSE`] after it happened.
    async fn write(&self, subject: String, headers: HeaderMap, payload: Bytes) -> KvOutcome {
        let ack = match self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
        {
            Ok(fut) => fut.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => KvOutcome::Written {
                revision: Revision(ack.sequence),
            },
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                KvOutcome::WrongRevision
            }
            Err(e) => {
                Metrics::inc(&self.metrics.kv_errors_total);
                warn!(error = %e, "KV write failed");
                // A server without the stream (a NATS server restarting, a stream leader being
                // elected) refuses at once, and the core answers a failure with the next write:
                // pausing here bounds that loop to one write per pause instead of thousands a
                // second.
                tokio::time::sleep(FAILED_WRITE_PAUSE).await;
                KvOutcome::Failed
            }
        }
    }

    fn expect(headers: &mut HeaderMap, revision: Revision) {
        headers.insert(
            header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            HeaderValue::from(revision.0),
        );
    }

    fn lease_payload(&self, me: &NodeId, term: Option<Term>) -> Bytes {
        let expires = wall_ms() + self.lease_ttl_ms;
        Bytes::from(records::encode_lease(me, term.map(|t| t.0), expires))
    }

    /// Creates the lease if the key's revision is `expected`.
    pub async fn acquire(&self, me: &NodeId, expected: Revision) -> KvOutcome {
        let mut h = HeaderMap::new();
        Self::expect(&mut h, expected);
        h.insert(header::NATS_MESSAGE_TTL, self.lease_ttl.as_str());
        let out = self
            .write(
                format!("{}{LEASE_KEY}", self.control_prefix),
                h,
                self.lease_payload(me, None),
            )
            .await;
        if matches!(out, KvOutcome::Written { .. }) {
            Metrics::inc(&self.metrics.lease_acquisitions_total);
        }
        out
    }

    /// Rewrites the lease with a fresh TTL if its revision is `expected` (None: unconditionally,
    /// which only the planted bug asks for).
    pub async fn renew(&self, me: &NodeId, term: Term, expected: Option<Revision>) -> KvOutcome {
        let mut h = HeaderMap::new();
        if let Some(rev) = expected {
            Self::expect(&mut h, rev);
        }
        h.insert(header::NATS_MESSAGE_TTL, self.lease_ttl.as_str());
        let out = self
            .write(
                format!("{}{LEASE_KEY}", self.control_prefix),
                h,
                self.lease_payload(me, Some(term)),
            )
            .await;
        match out {
            KvOutcome::Written { .. } => Metrics::inc(&self.metrics.lease_renewals_total),
            _ => Metrics::inc(&self.metrics.lease_renewal_failures_total),
        }
        out
    }

    /// Deletes the lease if its revision is `expected`.
    pub async fn release(&self, expected: Revision) -> KvOutcome {
        let mut h = HeaderMap::new();
        Self::expect(&mut h, expected);
        h.insert(KV_OPERATION, "DEL");
        self.write(
            format!("{}{LEASE_KEY}", self.control_prefix),
            h,
            Bytes::new(),
        )
        .await
    }

    /// Writes this node's membership record with the member TTL.
    pub async fn put_member(&self, record: &MemberRecord) -> KvOutcome {
        let mut h = HeaderMap::new();
        h.insert(header::NATS_MESSAGE_TTL, self.member_ttl.as_str());
        let out = self
            .write(
                format!("{}{}", self.nodes_prefix, record.id),
                h,
                Bytes::from(records::encode_member(record)),
            )
            .await;
        if matches!(out, KvOutcome::Written { .. }) {
            Metrics::inc(&self.metrics.heartbeats_total);
        }
        out
    }

    /// Deletes this node's membership key (graceful leave).
    pub async fn delete_member(&self, me: &NodeId) -> KvOutcome {
        let mut h = HeaderMap::new();
        h.insert(KV_OPERATION, "DEL");
        self.write(format!("{}{me}", self.nodes_prefix), h, Bytes::new())
            .await
    }

    /// Writes the map, in one atomic batch with a renewal of the lease at `lease_revision` when
    /// `fenced` (always, outside the planted bug): the server refuses both if either key moved.
    pub async fn write_map(
        &self,
        me: &NodeId,
        map: &ShardMap,
        expected: Revision,
        lease_revision: Revision,
        fenced: bool,
    ) -> MapOutcome {
        let map_subject = format!("{}{MAP_KEY}", self.control_prefix);
        let payload = Bytes::from(records::encode_map(map));
        if !fenced {
            let mut h = HeaderMap::new();
            Self::expect(&mut h, expected);
            return match self.write(map_subject, h, payload).await {
                KvOutcome::Written { revision } => MapOutcome::Written {
                    map_revision: revision,
                    lease_revision,
                },
                KvOutcome::WrongRevision => MapOutcome::Refused,
                KvOutcome::Failed => MapOutcome::Failed,
            };
        }
        let n = self.batch_counter.fetch_add(1, Ordering::Relaxed);
        let batch_id = format!("m{:x}{:x}", self.batch_nonce, n);

        let mut first = HeaderMap::new();
        Self::expect(&mut first, lease_revision);
        first.insert(header::NATS_MESSAGE_TTL, self.lease_ttl.as_str());
        first.insert(header::NATS_BATCH_ID, batch_id.as_str());
        first.insert(header::NATS_BATCH_SEQUENCE, "1");
        let lease_subject = format!("{}{LEASE_KEY}", self.control_prefix);
        let lease = self.lease_payload(me, Some(map.term()));
        if let Err(e) = self
            .client
            .publish_with_headers(lease_subject, first, lease)
            .await
        {
            Metrics::inc(&self.metrics.map_write_failures_total);
            warn!(error = %e, "map write: publishing the lease part failed");
            return MapOutcome::Failed;
        }
        let mut last = HeaderMap::new();
        Self::expect(&mut last, expected);
        last.insert(header::NATS_BATCH_ID, batch_id.as_str());
        last.insert(header::NATS_BATCH_SEQUENCE, "2");
        last.insert(header::NATS_BATCH_COMMIT, "1");
        match self.write(map_subject, last, payload).await {
            // The batch is stored contiguously: the lease part sits just before the map.
            KvOutcome::Written { revision } => {
                Metrics::inc(&self.metrics.map_writes_total);
                Metrics::inc(&self.metrics.lease_renewals_total);
                MapOutcome::Written {
                    map_revision: revision,
                    lease_revision: Revision(revision.0.saturating_sub(1)),
                }
            }
            KvOutcome::WrongRevision => {
                Metrics::inc(&self.metrics.map_write_failures_total);
                MapOutcome::Refused
            }
            KvOutcome::Failed => {
                Metrics::inc(&self.metrics.map_write_failures_total);
                MapOutcome::Failed
            }
        }
    }
}
