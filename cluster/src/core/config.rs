//! The core's limits and timings, validated. Every duration is in milliseconds and says so.

use crate::types::NodeStatus;

/// A bug planted on purpose so that a test can show the simulator finds it. Only selectable when
/// the crate is built with the `planted-bugs` feature; otherwise [`CoreConfig::planted`] is always
/// false and the production paths are the only paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlantedBug {
    /// A leader ignores its own lease deadline and writes the map without the server-side lease
    /// check, so a leader whose lease expired keeps writing.
    StaleLeaderWrite,
    /// Placement treats Failed nodes as eligible.
    PlaceOnFailed,
    /// Renewal is a plain put that ignores the revision the holder last saw.
    RenewWithoutCas,
}

impl PlantedBug {
    /// Every planted bug.
    pub const ALL: [PlantedBug; 3] = [
        PlantedBug::StaleLeaderWrite,
        PlantedBug::PlaceOnFailed,
        PlantedBug::RenewWithoutCas,
    ];

    /// The bug's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::StaleLeaderWrite => "stale-leader-write",
            PlantedBug::PlaceOnFailed => "place-on-failed",
            PlantedBug::RenewWithoutCas => "renew-without-cas",
        }
    }

    /// Parses a bug's name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value was outside its allowed range.
    #[error("{name} = {value} is out of range: {rule}")]
    OutOfRange {
        /// The setting's name.
        name: &'static str,
        /// The refused value.
        value: u64,
        /// The rule it broke.
        rule: &'static str,
    },
    /// Two settings contradict each other.
    #[error("{0}")]
    Inconsistent(String),
    /// A planted bug was selected in a build without the `planted-bugs` feature.
    #[error("planted bugs need a build with the `planted-bugs` feature")]
    PlantsNotBuilt,
}

/// Timings and limits of one node's core.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CoreConfig {
    /// How long a lease lives without renewal. NATS message TTLs are whole seconds, at least 1 s.
    pub lease_ttl_ms: u64,
    /// How often the leader renews; at most a third of the TTL so two renewals can fail in a row.
    pub lease_renew_interval_ms: u64,
    /// Safety margin: a leader stops acting at `renewal sent + TTL − margin` by its own clock.
    /// Covers clock-rate drift and the server's expiry jitter.
    pub lease_margin_ms: u64,
    /// How long a membership key lives without a heartbeat (whole seconds, at least 1 s).
    pub member_ttl_ms: u64,
    /// How often a node refreshes its membership key; at most a third of the member TTL.
    pub heartbeat_interval_ms: u64,
    /// How long a KV request may go unanswered before it is abandoned (and re-read).
    pub request_timeout_ms: u64,
    /// How often a node re-reads the lease, the map and the members, in case a watch went blind.
    pub sync_interval_ms: u64,
    /// How long a draining node waits for its slots to move before leaving anyway.
    pub drain_timeout_ms: u64,
    /// Most members a node keeps in its view.
    pub max_members: usize,
    /// The bug planted for the simulator's self-test, if any.
    pub plant: Option<PlantedBug>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            lease_ttl_ms: 2_000,
            lease_renew_interval_ms: 600,
            lease_margin_ms: 200,
            member_ttl_ms: 2_000,
            heartbeat_interval_ms: 500,
            request_timeout_ms: 500,
            sync_interval_ms: 1_000,
            drain_timeout_ms: 30_000,
            max_members: 4_096,
            plant: None,
        }
    }
}

impl CoreConfig {
    /// Checks every rule; the first broken one is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |name, value: u64, lo: u64, hi: u64, rule| {
            if (lo..=hi).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange { name, value, rule })
            }
        };
        range(
            "lease_ttl_ms",
            self.lease_ttl_ms,
            1_000,
            3_600_000,
            "1 s to 1 h",
        )?;
        if !self.lease_ttl_ms.is_multiple_of(1_000) {
            return Err(ConfigError::OutOfRange {
                name: "lease_ttl_ms",
                value: self.lease_ttl_ms,
                rule: "NATS message TTLs are whole seconds",
            });
        }
        range(
            "member_ttl_ms",
            self.member_ttl_ms,
            1_000,
            3_600_000,
            "1 s to 1 h",
        )?;
        if !self.member_ttl_ms.is_multiple_of(1_000) {
            return Err(ConfigError::OutOfRange {
                name: "member_ttl_ms",
                value: self.member_ttl_ms,
                rule: "NATS message TTLs are whole seconds",
            });
        }
        range(
            "lease_renew_interval_ms",
            self.lease_renew_interval_ms,
            10,
            u64::MAX,
            "at least 10 ms",
        )?;
        if self.lease_renew_interval_ms * 3 > self.lease_ttl_ms {
            return Err(ConfigError::Inconsistent(format!(
                "lease_renew_interval_ms ({}) must be at most a third of lease_ttl_ms ({})",
                self.lease_renew_interval_ms, self.lease_ttl_ms
            )));
        }
        if self.lease_margin_ms + self.lease_renew_interval_ms >= self.lease_ttl_ms {
            return Err(ConfigError::Inconsistent(format!(
                "lease_margin_ms ({}) + lease_renew_interval_ms ({}) must stay under lease_ttl_ms ({})",
                self.lease_margin_ms, self.lease_renew_interval_ms, self.lease_ttl_ms
            )));
        }
        range(
            "heartbeat_interval_ms",
            self.heartbeat_interval_ms,
            10,
            u64::MAX,
            "at least 10 ms",
        )?;
        if self.heartbeat_interval_ms * 3 > self.member_ttl_ms {
            return Err(ConfigError::Inconsistent(format!(
                "heartbeat_interval_ms ({}) must be at most a third of member_ttl_ms ({})",
                self.heartbeat_interval_ms, self.member_ttl_ms
            )));
        }
        range(
            "request_timeout_ms",
            self.request_timeout_ms,
            10,
            60_000,
            "10 ms to 60 s",
        )?;
        if self.request_timeout_ms >= self.lease_ttl_ms {
            return Err(ConfigError::Inconsistent(format!(
                "request_timeout_ms ({}) must be under lease_ttl_ms ({})",
                self.request_timeout_ms, self.lease_ttl_ms
            )));
        }
        range(
            "sync_interval_ms",
            self.sync_interval_ms,
            10,
            600_000,
            "10 ms to 10 min",
        )?;
        range(
            "drain_timeout_ms",
            self.drain_timeout_ms,
            0,
            3_600_000,
            "at most 1 h",
        )?;
        range(
            "max_members",
            self.max_members as u64,
            1,
            100_000,
            "1 to 100000",
        )?;
        if self.plant.is_some() && !cfg!(feature = "planted-bugs") {
            return Err(ConfigError::PlantsNotBuilt);
        }
        Ok(())
    }

    /// Whether `bug` is planted. Always false in a build without the `planted-bugs` feature.
    pub fn planted(&self, bug: PlantedBug) -> bool {
        cfg!(feature = "planted-bugs") && self.plant == Some(bug)
    }

    /// Whether placement may give slots to a node in `status`.
    pub fn eligible(&self, status: NodeStatus) -> bool {
        status == NodeStatus::Active
            || (self.planted(PlantedBug::PlaceOnFailed) && status == NodeStatus::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(CoreConfig::default().validate(), Ok(()));
    }

    #[test]
    fn rules_are_enforced() {
        let bad = |f: fn(&mut CoreConfig)| {
            let mut c = CoreConfig::default();
            f(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.lease_ttl_ms = 500));
        assert!(bad(|c| c.lease_ttl_ms = 1_500));
        assert!(bad(|c| c.lease_renew_interval_ms = 700));
        assert!(bad(|c| c.heartbeat_interval_ms = 1_000));
        assert!(bad(|c| c.request_timeout_ms = 2_000));
        assert!(bad(|c| c.max_members = 0));
        assert!(bad(|c| c.lease_margin_ms = 1_500));
    }
}
