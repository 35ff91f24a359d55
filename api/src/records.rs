//! The values stored in the global zone (ARCHITECTURE.md §3.1).
//!
//! Records are read by controllers of other clusters, which may run another
//! fedmesh version, so unknown fields are tolerated here (unlike local config,
//! which denies them): a newer writer must not break an older reader.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::names::{NameError, validate_label};

/// Why a record or one of its fields is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("zones: at least one zone is required")]
    NoZones,
    #[error("zones: {0:?} is listed twice")]
    DuplicateZone(String),
    #[error("gateways: at least one gateway address is required")]
    NoGateways,
    #[error("gateway {input:?}: {reason}")]
    Gateway { input: String, reason: String },
    #[error("trustDomain is empty")]
    NoTrustDomain,
    #[error("locality {zone:?}: healthy ({healthy}) exceeds total ({total})")]
    Capacity {
        zone: String,
        healthy: u32,
        total: u32,
    },
    #[error("ports: at least one port is required")]
    NoPorts,
    #[error("ports: port 0 is out of range (1-65535)")]
    PortZero,
    #[error("ports: {0} is listed twice")]
    DuplicatePort(u16),
}

/// Where a peer reaches one of a cluster's east-west gateways. The host may
/// be a DNS name (a cloud load balancer's, say), an IPv4 or an IPv6 address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GatewayAddress {
    pub address: String,
    pub port: u16,
}

impl FromStr for GatewayAddress {
    type Err = RecordError;

    /// Parses `host:port` or `[v6]:port`.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| RecordError::Gateway {
            input: input.into(),
            reason: reason.into(),
        };
        let (host, port) = if let Some(rest) = input.strip_prefix('[') {
            let (v6, port) = rest
                .split_once("]:")
                .ok_or_else(|| err("expected [ipv6]:port"))?;
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| err("not a valid IPv6 address inside [ ]"))?;
            (v6, port)
        } else {
            let (host, port) = input
                .rsplit_once(':')
                .ok_or_else(|| err("expected host:port"))?;
            if host.contains(':') {
                return Err(err("an IPv6 address must be written [addr]:port"));
            }
            validate_host(host).map_err(|r| err(&r))?;
            (host, port)
        };
        let port: u16 = port
            .parse()
            .map_err(|_| err("the port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(err("the port must be a number from 1 to 65535"));
        }
        Ok(Self {
            address: host.to_owned(),
            port,
        })
    }
}

fn validate_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.len() > 253 {
        return Err("the host name is longer than 253 characters".into());
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("{label:?} is not a valid DNS label or IPv4 octet"));
        }
    }
    Ok(())
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.address.contains(':') {
            write!(f, "[{}]:{}", self.address, self.port)
        } else {
            write!(f, "{}:{}", self.address, self.port)
        }
    }
}

/// `clusters/<name>`: written once by `fedmesh register cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    pub name: String,
    pub cloud: String,
    pub region: String,
    pub zones: Vec<String>,
    pub trust_domain: String,
    pub gateways: Vec<GatewayAddress>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(with = "time::serde::rfc3339")]
    pub registered_at: OffsetDateTime,
    /// How the cluster's workloads reach other clusters. Absent in records
    /// written before it existed: `direct`.
    #[serde(default)]
    pub egress: EgressMode,
}

/// How a cluster's proxies reach other clusters' ingress gateways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    /// Each proxy opens QUIC streams straight to the remote gateways, with
    /// its own SVID: one encryption and one hop less.
    #[default]
    Direct,
    /// Through a local egress gateway (TCP + TLS to it, then its QUIC), for
    /// clusters whose workloads may not reach other clouds themselves.
    Gateway,
}

impl EgressMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EgressMode::Direct => "direct",
            EgressMode::Gateway => "gateway",
        }
    }
}

impl fmt::Display for EgressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EgressMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(EgressMode::Direct),
            "gateway" => Ok(EgressMode::Gateway),
            _ => Err(format!("{s:?} is not an egress mode: direct or gateway")),
        }
    }
}

impl ClusterRecord {
    /// Checks every field; the first problem is reported with its field name.
    pub fn validate(&self) -> Result<(), RecordError> {
        validate_label("cluster name", &self.name)?;
        validate_label("cloud", &self.cloud)?;
        validate_label("region", &self.region)?;
        if self.zones.is_empty() {
            return Err(RecordError::NoZones);
        }
        let mut seen = BTreeSet::new();
        for z in &self.zones {
            validate_label("zone", z)?;
            if !seen.insert(z) {
                return Err(RecordError::DuplicateZone(z.clone()));
            }
        }
        if self.trust_domain.is_empty() {
            return Err(RecordError::NoTrustDomain);
        }
        if self.gateways.is_empty() {
            return Err(RecordError::NoGateways);
        }
        for g in &self.gateways {
            g.to_string().parse::<GatewayAddress>()?;
        }
        Ok(())
    }

    /// Whether `other` describes the same registration. `registeredAt` is
    /// ignored, so that registering again with the same values is a no-op.
    pub fn same_registration(&self, other: &ClusterRecord) -> bool {
        let strip = |r: &ClusterRecord| ClusterRecord {
            registered_at: OffsetDateTime::UNIX_EPOCH,
            ..r.clone()
        };
        strip(self) == strip(other)
    }
}

/// `seen/<cluster>`: when that cluster's controller last said it was alive.
/// Rewritten every [`SeenRecord::INTERVAL`] and bound to no lease, so it
/// outlives the cluster's `alive` key: it dates the last liveness of a
/// cluster that has become unverified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeenRecord {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl SeenRecord {
    /// How often a live controller rewrites its `seen` key: the precision
    /// of a stale cluster's age.
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
}

/// What an operator is told of a cluster's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum Liveness {
    /// Its `alive` key is present.
    Live,
    /// Its `alive` key has lapsed: still served at its last known capacity.
    /// `seconds` since it was last seen alive, when known.
    Stale { seconds: Option<u64> },
}

impl Liveness {
    pub fn of(alive: bool, seen: Option<&SeenRecord>, now: OffsetDateTime) -> Self {
        if alive {
            return Liveness::Live;
        }
        let seconds = seen.map(|s| (now - s.at).whole_seconds().max(0) as u64);
        Liveness::Stale { seconds }
    }
}

impl fmt::Display for Liveness {
    /// `LIVE`, `STALE 2m`, `STALE 45s`, `STALE 3h`, or `STALE` when never seen.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Liveness::Live => f.write_str("LIVE"),
            Liveness::Stale { seconds: None } => f.write_str("STALE"),
            Liveness::Stale { seconds: Some(s) } => match s {
                0..60 => write!(f, "STALE {s}s"),
                60..3600 => write!(f, "STALE {}m", s / 60),
                3600..86400 => write!(f, "STALE {}h", s / 3600),
                _ => write!(f, "STALE {}d", s / 86400),
            },
        }
    }
}

/// `alive/<cluster>`: kept on a lease by that cluster's controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AliveRecord {
    pub controller: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    pub version: String,
}

/// The healthy capacity of one zone for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneCapacity {
    pub zone: String,
    pub healthy: u32,
    pub total: u32,
    /// Relative weight within the cluster; by default the healthy count.
    pub weight: u32,
}

/// The rule every export's localities obey: a zone name is a DNS label, and
/// no more endpoints are healthy than exist.
pub fn validate_locality(zone: &str, healthy: u32, total: u32) -> Result<(), RecordError> {
    validate_label("zone", zone)?;
    if healthy > total {
        return Err(RecordError::Capacity {
            zone: zone.to_owned(),
            healthy,
            total,
        });
    }
    Ok(())
}

/// The rule every service's ports obey: at least one, each 1-65535, none
/// twice. The first port is the one tunnels name.
pub fn validate_ports(ports: &[u16]) -> Result<(), RecordError> {
    if ports.is_empty() {
        return Err(RecordError::NoPorts);
    }
    let mut seen = BTreeSet::new();
    for &p in ports {
        if p == 0 {
            return Err(RecordError::PortZero);
        }
        if !seen.insert(p) {
            return Err(RecordError::DuplicatePort(p));
        }
    }
    Ok(())
}

/// `exports/<cluster>/<namespace>/<service>`: per-zone capacity only, never
/// endpoints, so that pod churn does not reach the global zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSummary {
    pub ports: Vec<u16>,
    pub localities: Vec<ZoneCapacity>,
    /// Bumped by the writer on every change.
    pub generation: u64,
}

impl ExportSummary {
    pub fn validate(&self) -> Result<(), RecordError> {
        validate_ports(&self.ports)?;
        for l in &self.localities {
            validate_locality(&l.zone, l.healthy, l.total)?;
        }
        Ok(())
    }

    /// Healthy endpoints across all zones.
    pub fn healthy(&self) -> u64 {
        self.localities.iter().map(|l| u64::from(l.healthy)).sum()
    }

    /// Whether two summaries differ in anything but their generation: a
    /// controller writes only real changes.
    pub fn same_content(&self, other: &ExportSummary) -> bool {
        self.ports == other.ports && self.localities == other.localities
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ClusterRecord {
        ClusterRecord {
            name: "aws-use1".into(),
            cloud: "aws".into(),
            region: "us-east-1".into(),
            zones: vec!["use1-az1".into(), "use1-az2".into()],
            trust_domain: "aws-use1.fedmesh.example".into(),
            gateways: vec!["gw.aws.example:15443".parse().unwrap()],
            labels: BTreeMap::new(),
            registered_at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            egress: EgressMode::Direct,
        }
    }

    #[test]
    fn cluster_record_json_is_camel_case_and_round_trips() {
        let r = record();
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["trustDomain"], "aws-use1.fedmesh.example");
        assert_eq!(json["registeredAt"], "2027-01-15T08:00:00Z");
        assert_eq!(json["gateways"][0]["address"], "gw.aws.example");
        assert_eq!(json["gateways"][0]["port"], 15443);
        let back: ClusterRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.validate(), Ok(()));
    }

    #[test]
    fn unknown_fields_from_newer_writers_are_tolerated() {
        let mut json = serde_json::to_value(record()).unwrap();
        json["futureField"] = serde_json::json!(42);
        assert!(serde_json::from_value::<ClusterRecord>(json).is_ok());
    }

    #[test]
    fn validation_names_the_field() {
        type Mutation = fn(&mut ClusterRecord);
        let cases: [(Mutation, &str); 7] = [
            (|r| r.name = "AWS".into(), "cluster name"),
            (|r| r.name = "a".repeat(64), "63"),
            (|r| r.zones.clear(), "zones: at least one"),
            (|r| r.zones.push("use1-az1".into()), "listed twice"),
            (|r| r.zones.push("Zone_A".into()), "zone"),
            (|r| r.gateways.clear(), "gateways"),
            (|r| r.trust_domain.clear(), "trustDomain"),
        ];
        for (mutate, want) in cases {
            let mut r = record();
            mutate(&mut r);
            let err = r.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn same_registration_ignores_the_timestamp_only() {
        let a = record();
        let mut b = record();
        b.registered_at = OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
        assert!(a.same_registration(&b));
        b.region = "us-east-2".into();
        assert!(!a.same_registration(&b));
    }

    #[test]
    fn gateway_addresses_parse_dns_ipv4_and_ipv6() {
        let g: GatewayAddress = "127.0.1.1:15443".parse().unwrap();
        assert_eq!((g.address.as_str(), g.port), ("127.0.1.1", 15443));
        let g: GatewayAddress = "[::1]:443".parse().unwrap();
        assert_eq!(g.address, "::1");
        assert_eq!(g.to_string(), "[::1]:443");
        let g: GatewayAddress = "lb-123.elb.amazonaws.com:15443".parse().unwrap();
        assert_eq!(g.to_string(), "lb-123.elb.amazonaws.com:15443");
    }

    #[test]
    fn bad_gateway_addresses_say_why() {
        let cases = [
            ("gw.example", "host:port"),
            ("gw.example:", "port must be"),
            ("gw.example:0", "port must be"),
            ("gw.example:70000", "port must be"),
            (":443", "host is empty"),
            ("::1:443", "[addr]:port"),
            ("[::1]443", "[ipv6]:port"),
            ("[not-v6]:443", "IPv6"),
            ("gw..example:443", "DNS label"),
            ("gw_1.example:443", "DNS label"),
        ];
        for (input, want) in cases {
            let err = input.parse::<GatewayAddress>().unwrap_err().to_string();
            assert!(err.contains(want) && err.contains(input), "{input}: {err}");
        }
    }

    #[test]
    fn export_summary_validation_and_content_comparison() {
        let s = ExportSummary {
            ports: vec![8080],
            localities: vec![
                ZoneCapacity {
                    zone: "use1-az1".into(),
                    healthy: 2,
                    total: 3,
                    weight: 2,
                },
                ZoneCapacity {
                    zone: "use1-az2".into(),
                    healthy: 3,
                    total: 3,
                    weight: 3,
                },
            ],
            generation: 4,
        };
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.healthy(), 5);
        let mut t = s.clone();
        t.generation = 5;
        assert!(s.same_content(&t));
        t.localities[0].healthy = 1;
        assert!(!s.same_content(&t));
        t.localities[0].healthy = 4;
        assert!(
            t.validate()
                .unwrap_err()
                .to_string()
                .contains("exceeds total")
        );
    }

    #[test]
    fn liveness_reads_as_an_operator_expects() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::hours(100);
        let seen = |ago: i64| SeenRecord {
            at: now - time::Duration::seconds(ago),
        };
        assert_eq!(
            Liveness::of(true, Some(&seen(500)), now).to_string(),
            "LIVE"
        );
        assert_eq!(Liveness::of(false, None, now).to_string(), "STALE");
        assert_eq!(
            Liveness::of(false, Some(&seen(45)), now).to_string(),
            "STALE 45s"
        );
        assert_eq!(
            Liveness::of(false, Some(&seen(150)), now).to_string(),
            "STALE 2m"
        );
        assert_eq!(
            Liveness::of(false, Some(&seen(7300)), now).to_string(),
            "STALE 2h"
        );
        assert_eq!(
            serde_json::to_value(Liveness::of(false, Some(&seen(150)), now)).unwrap(),
            serde_json::json!({"state": "stale", "seconds": 150})
        );
    }
}
