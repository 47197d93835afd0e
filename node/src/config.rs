//! Node configuration: a TOML file, then `TESSEL_*` environment variables, then flags, each
//! overriding the one before; validated as a whole with messages that say which rule broke.

use std::path::{Path, PathBuf};

use cluster::core::CoreConfig;
use cluster::{NodeId, Weight};
use serde::Deserialize;

/// Largest config file accepted.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_CONFIG_FILE_BYTES`].
    #[error("config file {path} is {len} bytes; the limit is {MAX_CONFIG_FILE_BYTES}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// An environment variable did not parse.
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        /// The variable.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A value broke a rule.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything a node needs to run. Durations and sizes carry their unit in the name.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// The cluster name: a prefix of every bucket, stream and subject (`[A-Za-z0-9_-]`, ≤ 32).
    pub cluster: String,
    /// NATS server URLs.
    pub nats_urls: Vec<String>,
    /// This node's id.
    pub node_id: String,
    /// Address of the HTTP status endpoint, if any (e.g. `127.0.0.1:8080`).
    pub http: Option<String>,
    /// This node's capacity weight for placement (1..=1,000,000). Unset: derived from device
    /// memory (whole GiB of the largest CUDA device, else of host memory; see
    /// [`crate::tables::default_weight`]).
    pub capacity: Option<u64>,
    /// Lease TTL (whole seconds, ≥ 1 s: NATS message TTLs).
    pub lease_ttl_ms: u64,
    /// How often the leader renews (at most a third of the TTL).
    pub lease_renew_interval_ms: u64,
    /// The leader stops acting this long before its lease could expire.
    pub lease_margin_ms: u64,
    /// Membership key TTL (whole seconds, ≥ 1 s).
    pub member_ttl_ms: u64,
    /// How often a node refreshes its membership key (at most a third of the member TTL).
    pub heartbeat_interval_ms: u64,
    /// How long a KV request may take before it is abandoned and the key re-read.
    pub request_timeout_ms: u64,
    /// How often the node re-reads the lease, map and members in full.
    pub sync_interval_ms: u64,
    /// How long a draining node waits for its slots to move before leaving anyway.
    pub drain_timeout_ms: u64,
    /// Most members a node tracks.
    pub max_members: usize,
    /// Timer tick of the core loop.
    pub tick_interval_ms: u64,
    /// Timeout of one connection attempt.
    pub connect_timeout_ms: u64,
    /// How long to keep retrying the first connection before giving up (0: forever).
    pub connect_retry_for_ms: u64,
    /// Longest wait between reconnection attempts.
    pub reconnect_max_delay_ms: u64,
    /// Replicas of the buckets and streams this node creates (1 or 3 in practice).
    pub replicas: usize,
    /// Largest KV record a node accepts.
    pub max_record_bytes: usize,
    /// Restarts of a child actor allowed within `restart_window_ms` before the node gives up.
    pub restart_budget: u32,
    /// The window of the restart budget.
    pub restart_window_ms: u64,
    /// Queue length of a slot host's mailbox (messages beyond it are refused).
    pub slot_queue_len: usize,
    /// Added to this node's clock (chaos tests skew clocks with it).
    pub clock_offset_ms: i64,
    /// Most delta frames a slot applies together.
    pub delta_window_frames: usize,
    /// Most delta bytes a slot applies together.
    pub delta_window_bytes: usize,
    /// Most delta bytes received but not yet applied, per model on this node (backpressure).
    pub delta_queue_bytes: usize,
    /// Longest wait, from a window's first delta, for more deltas when none is queued (0: apply
    /// what is queued at once; raise it to trade latency for larger windows).
    pub delta_window_ms: u64,
    /// Deltas with a value above this magnitude are dead-lettered.
    pub delta_max_abs: f32,
    /// A slot checkpoints after this many frames…
    pub checkpoint_every_frames: u64,
    /// …or this long.
    pub checkpoint_interval_ms: u64,
    /// Checkpoints kept per slot.
    pub checkpoints_kept: usize,
    /// Apply CPU tables' windows on the device's own threads, as GPU tables always are,
    /// instead of inline on the async runtime (where a small window costs least).
    pub delta_cpu_apply_on_threads: bool,
    /// Once the node has applied nothing for this long after work, it gives the allocator's
    /// free memory back to the system (once per quiet spell; 0: never). See `idle_trim`.
    pub memory_trim_idle_ms: u64,
    /// NATS user (with `password`).
    pub user: Option<String>,
    /// NATS password.
    pub password: Option<String>,
    /// NATS credentials file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU…`), for servers that list the user's public nkey.
    pub nkey_file: Option<PathBuf>,
    /// CA certificate for TLS to NATS.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate for TLS to NATS (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// Client key for TLS to NATS.
    pub tls_key_file: Option<PathBuf>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Serve the fault switch (`<c>.admin.<node>.fault`: mark a device lost). Tests only;
    /// off in production.
    pub fault_injection: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let core = CoreConfig::default();
        NodeConfig {
            cluster: "tessel".into(),
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            node_id: String::new(),
            http: None,
            capacity: None,
            lease_ttl_ms: core.lease_ttl_ms,
            lease_renew_interval_ms: core.lease_renew_interval_ms,
            lease_margin_ms: core.lease_margin_ms,
            member_ttl_ms: core.member_ttl_ms,
            heartbeat_interval_ms: core.heartbeat_interval_ms,
            request_timeout_ms: core.request_timeout_ms,
            sync_interval_ms: core.sync_interval_ms,
            drain_timeout_ms: core.drain_timeout_ms,
            max_members: core.max_members,
            tick_interval_ms: 50,
            connect_timeout_ms: 2_000,
            connect_retry_for_ms: 60_000,
            reconnect_max_delay_ms: 2_000,
            replicas: 1,
            max_record_bytes: 256 * 1024,
            restart_budget: 5,
            restart_window_ms: 60_000,
            slot_queue_len: 10_000,
            clock_offset_ms: 0,
            delta_window_frames: 256,
            delta_window_bytes: 8 << 20,
            delta_queue_bytes: 32 << 20,
            delta_window_ms: 0,
            delta_max_abs: 1e6,
            checkpoint_every_frames: 10_000,
            checkpoint_interval_ms: 10_000,
            checkpoints_kept: 3,
            delta_cpu_apply_on_threads: false,
            memory_trim_idle_ms: 2_000,
            user: None,
            password: None,
            creds_file: None,
            nkey_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            log_format: LogFormat::Text,
            fault_injection: false,
        }
    }
}

/// Checks a cluster name: one NATS subject token, usable in bucket and stream names.
pub fn validate_cluster_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "cluster name {name:?} must be 1-32 characters of [A-Za-z0-9_-]"
        )))
    }
}

impl NodeConfig {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_CONFIG_FILE_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
                len,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Applies `TESSEL_<FIELD>` environment variables (upper case), read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.trim().parse().map_err(|e: T::Err| ConfigError::Env {
                name: name.into(),
                value: v.into(),
                message: e.to_string(),
            })
        }
        macro_rules! env_num {
            ($($field:ident),*) => {$(
                let name = concat!("TESSEL_", stringify!($field)).to_ascii_uppercase();
                if let Some(v) = get(&name) {
                    self.$field = num(&name, &v)?;
                }
            )*};
        }
        env_num!(
            lease_ttl_ms,
            lease_renew_interval_ms,
            lease_margin_ms,
            member_ttl_ms,
            heartbeat_interval_ms,
            request_timeout_ms,
            sync_interval_ms,
            drain_timeout_ms,
            max_members,
            tick_interval_ms,
            connect_timeout_ms,
            connect_retry_for_ms,
            reconnect_max_delay_ms,
            replicas,
            max_record_bytes,
            restart_budget,
            restart_window_ms,
            slot_queue_len,
            clock_offset_ms,
            delta_window_frames,
            delta_window_bytes,
            delta_queue_bytes,
            delta_window_ms,
            delta_max_abs,
            checkpoint_every_frames,
            checkpoint_interval_ms,
            checkpoints_kept,
            delta_cpu_apply_on_threads,
            memory_trim_idle_ms,
            fault_injection
        );
        if let Some(v) = get("TESSEL_CAPACITY") {
            self.capacity = Some(num("TESSEL_CAPACITY", &v)?);
        }
        if let Some(v) = get("TESSEL_CLUSTER") {
            self.cluster = v;
        }
        if let Some(v) = get("TESSEL_NATS_URLS") {
            self.nats_urls = split_urls(&v);
        }
        if let Some(v) = get("TESSEL_NODE_ID") {
            self.node_id = v;
        }
        if let Some(v) = get("TESSEL_HTTP") {
            self.http = Some(v);
        }
        if let Some(v) = get("TESSEL_USER") {
            self.user = Some(v);
        }
        if let Some(v) = get("TESSEL_PASSWORD") {
            self.password = Some(v);
        }
        if let Some(v) = get("TESSEL_CREDS_FILE") {
            self.creds_file = Some(v.into());
        }
        if let Some(v) = get("TESSEL_NKEY_FILE") {
            self.nkey_file = Some(v.into());
        }
        if let Some(v) = get("TESSEL_TLS_CA_FILE") {
            self.tls_ca_file = Some(v.into());
        }
        if let Some(v) = get("TESSEL_TLS_CERT_FILE") {
            self.tls_cert_file = Some(v.into());
        }
        if let Some(v) = get("TESSEL_TLS_KEY_FILE") {
            self.tls_key_file = Some(v.into());
        }
        Ok(())
    }

    /// The delta pipeline's part of the configuration.
    pub fn slot_model(&self) -> crate::deltas::SlotModelConfig {
        crate::deltas::SlotModelConfig {
            window_frames: self.delta_window_frames,
            window_bytes: self.delta_window_bytes,
            queue_bytes: self.delta_queue_bytes,
            window_ms: self.delta_window_ms,
            max_abs: self.delta_max_abs,
            checkpoint_every: self.checkpoint_every_frames,
            checkpoint_ms: self.checkpoint_interval_ms,
            keep_checkpoints: self.checkpoints_kept,
            cpu_apply_on_threads: self.delta_cpu_apply_on_threads,
            apply_threads: 1,
            scale: 1.0,
            clip: None,
        }
    }

    /// The core's part of the configuration.
    pub fn core(&self) -> CoreConfig {
        CoreConfig {
            lease_ttl_ms: self.lease_ttl_ms,
            lease_renew_interval_ms: self.lease_renew_interval_ms,
            lease_margin_ms: self.lease_margin_ms,
            member_ttl_ms: self.member_ttl_ms,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            request_timeout_ms: self.request_timeout_ms,
            sync_interval_ms: self.sync_interval_ms,
            drain_timeout_ms: self.drain_timeout_ms,
            max_members: self.max_members,
            plant: None,
        }
    }

    /// The placement weight: `capacity` when set, else derived from `devices` (see
    /// [`crate::tables::default_weight`]).
    pub fn weight(&self, devices: &[gpu::Device]) -> Result<Weight, ConfigError> {
        match self.capacity {
            Some(c) => Weight::new(c).map_err(|e| ConfigError::Invalid(format!("capacity: {e}"))),
            None => Ok(crate::tables::default_weight(devices)),
        }
    }

    /// Checks every rule; the message names the field and the rule. The weight returned is
    /// `capacity`, or 1 when it is unset (the node derives it from its devices with
    /// [`NodeConfig::weight`]).
    pub fn validate(&self) -> Result<(NodeId, Weight), ConfigError> {
        validate_cluster_name(&self.cluster)?;
        let id = NodeId::new(&self.node_id)
            .map_err(|e| ConfigError::Invalid(format!("node_id {:?}: {e}", self.node_id)))?;
        let weight = self.weight(&[])?;
        self.core()
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.nats_urls.is_empty() {
            return Err(ConfigError::Invalid(
                "nats_urls: at least one URL is needed".into(),
            ));
        }
        let range = |name: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Invalid(format!(
                    "{name} = {v} must be in {lo}..={hi}"
                )))
            }
        };
        range("tick_interval_ms", self.tick_interval_ms, 1, 1_000)?;
        if self.tick_interval_ms * 2 > self.lease_margin_ms {
            return Err(ConfigError::Invalid(format!(
                "tick_interval_ms = {} must be at most half of lease_margin_ms = {}",
                self.tick_interval_ms, self.lease_margin_ms
            )));
        }
        range("connect_timeout_ms", self.connect_timeout_ms, 100, 60_000)?;
        if self.memory_trim_idle_ms != 0 {
            range(
                "memory_trim_idle_ms",
                self.memory_trim_idle_ms,
                100,
                3_600_000,
            )?;
        }
        range(
            "connect_retry_for_ms",
            self.connect_retry_for_ms,
            0,
            86_400_000,
        )?;
        range(
            "reconnect_max_delay_ms",
            self.reconnect_max_delay_ms,
            10,
            60_000,
        )?;
        range("replicas", self.replicas as u64, 1, 5)?;
        range(
            "max_record_bytes",
            self.max_record_bytes as u64,
            64 * 1024,
            8 << 20,
        )?;
        range("restart_budget", u64::from(self.restart_budget), 0, 1_000)?;
        range(
            "restart_window_ms",
            self.restart_window_ms,
            1_000,
            86_400_000,
        )?;
        range("slot_queue_len", self.slot_queue_len as u64, 1, 10_000_000)?;
        range(
            "delta_window_frames",
            self.delta_window_frames as u64,
            1,
            100_000,
        )?;
        range(
            "delta_window_bytes",
            self.delta_window_bytes as u64,
            1_024,
            1 << 30,
        )?;
        range(
            "delta_queue_bytes",
            self.delta_queue_bytes as u64,
            1 << 20,
            4 << 30,
        )?;
        range("delta_window_ms", self.delta_window_ms, 0, 10_000)?;
        if !(self.delta_max_abs.is_finite() && self.delta_max_abs > 0.0) {
            return Err(ConfigError::Invalid(
                "delta_max_abs must be a positive finite number".into(),
            ));
        }
        range(
            "checkpoint_every_frames",
            self.checkpoint_every_frames,
            1,
            100_000_000,
        )?;
        range(
            "checkpoint_interval_ms",
            self.checkpoint_interval_ms,
            100,
            86_400_000,
        )?;
        range("checkpoints_kept", self.checkpoints_kept as u64, 1, 1_000)?;
        if self.clock_offset_ms.unsigned_abs() > 3_600_000 {
            return Err(ConfigError::Invalid(
                "clock_offset_ms must be within ±1 hour".into(),
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(ConfigError::Invalid("user and password go together".into()));
        }
        let methods = [
            self.user.is_some(),
            self.creds_file.is_some(),
            self.nkey_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(ConfigError::Invalid(
                "choose one of user/password, creds_file and nkey_file".into(),
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert_file and tls_key_file go together".into(),
            ));
        }
        Ok((id, weight))
    }
}

/// Splits a comma-separated URL list.
pub fn split_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NodeConfig {
        NodeConfig {
            node_id: "n1".into(),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn defaults_with_an_id_are_valid() {
        valid().validate().unwrap();
        assert_eq!(valid().lease_ttl_ms, 2_000);
    }

    #[test]
    fn rules_are_enforced_with_names() {
        // 0 turns the idle trim off; otherwise at least 100 ms.
        let off = NodeConfig {
            memory_trim_idle_ms: 0,
            ..valid()
        };
        assert!(off.validate().is_ok());
        let cases: Vec<(NodeConfig, &str)> = vec![
            (
                NodeConfig {
                    memory_trim_idle_ms: 50,
                    ..valid()
                },
                "memory_trim_idle_ms",
            ),
            (
                NodeConfig {
                    node_id: "bad id".into(),
                    ..valid()
                },
                "node_id",
            ),
            (
                NodeConfig {
                    cluster: "a.b".into(),
                    ..valid()
                },
                "cluster name",
            ),
            (
                NodeConfig {
                    lease_ttl_ms: 500,
                    ..valid()
                },
                "lease_ttl_ms",
            ),
            (
                NodeConfig {
                    lease_renew_interval_ms: 1_000,
                    ..valid()
                },
                "lease_renew_interval_ms",
            ),
            (
                NodeConfig {
                    capacity: Some(0),
                    ..valid()
                },
                "capacity",
            ),
            (
                NodeConfig {
                    replicas: 9,
                    ..valid()
                },
                "replicas",
            ),
            (
                NodeConfig {
                    user: Some("u".into()),
                    ..valid()
                },
                "password",
            ),
            (
                NodeConfig {
                    creds_file: Some("a.creds".into()),
                    nkey_file: Some("a.nk".into()),
                    ..valid()
                },
                "choose one",
            ),
            (
                NodeConfig {
                    nats_urls: vec![],
                    ..valid()
                },
                "nats_urls",
            ),
        ];
        for (cfg, needle) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle}");
        }
    }

    #[test]
    fn toml_unknown_fields_and_env_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "node_id = \"a\"\nlease_ttl_ms = 3000\n").unwrap();
        let cfg = NodeConfig::from_file(&path).unwrap();
        assert_eq!((cfg.node_id.as_str(), cfg.lease_ttl_ms), ("a", 3_000));
        std::fs::write(&path, "lease_ttl = 3000\n").unwrap();
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&path, "lease_ttl_ms = \"soon\"\n").unwrap();
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));

        let mut cfg = valid();
        cfg.apply_env(|k| (k == "TESSEL_LEASE_TTL_MS").then(|| "4000".to_string()))
            .unwrap();
        assert_eq!(cfg.lease_ttl_ms, 4_000);
        let err = cfg.apply_env(|k| (k == "TESSEL_REPLICAS").then(|| "three".to_string()));
        assert!(matches!(err, Err(ConfigError::Env { .. })));
        let mut cfg = valid();
        assert_eq!((cfg.capacity, cfg.fault_injection), (None, false));
        cfg.apply_env(|k| match k {
            "TESSEL_CAPACITY" => Some("7".into()),
            "TESSEL_FAULT_INJECTION" => Some("true".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!((cfg.capacity, cfg.fault_injection), (Some(7), true));
        let err = cfg.apply_env(|k| (k == "TESSEL_FAULT_INJECTION").then(|| "yes".to_string()));
        assert!(matches!(err, Err(ConfigError::Env { .. })));
    }

    #[test]
    fn an_unset_capacity_comes_from_device_memory() {
        let host = gpu::Device {
            kind: gpu::DeviceKind::Cpu,
            ordinal: 0,
            name: "cpu".into(),
            memory_total_bytes: 16 << 30,
            memory_free_bytes: 8 << 30,
            compute_capability: None,
        };
        let cfg = valid();
        assert_eq!(cfg.weight(std::slice::from_ref(&host)).unwrap().get(), 16);
        let set = NodeConfig {
            capacity: Some(3),
            ..valid()
        };
        assert_eq!(set.weight(&[host]).unwrap().get(), 3);
    }
}
