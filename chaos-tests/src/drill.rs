//! A drill, as its YAML file says it: which federation, a client, steady
//! load on one service, one fault at `at` recovered at `recover`, and the
//! thresholds the result is judged against.
//!
//! ```yaml
//! name: zone-outage
//! topology: three-clouds
//! client: aws-use1
//! service: shop/frontend
//! rate: 200
//! duration: 9s
//! fault: {kill: aws-use1@use1-az1, at: 3s, recover: 6s}
//! thresholds: {failed: 0, rto: 1s}
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A drill file that cannot be run, and where it is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct DrillError {
    pub origin: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Drill {
    pub name: String,
    /// One line on what breaks, for the report.
    #[serde(default)]
    pub about: String,
    /// The name of the topology it is written for (`three-clouds`).
    pub topology: String,
    /// The cluster whose proxy the load goes through; several share the
    /// load in turn (request `i` through the `i mod n`-th).
    pub client: Targets,
    /// `namespace/name`.
    pub service: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// Requests (or TCP exchanges) a second, from all clients together,
    /// sent on schedule whatever the answers do.
    pub rate: u32,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub fault: Fault,
    /// Faults on the same timeline that are not judged by themselves: the
    /// conditions the judged fault happens under (etcd frozen while a
    /// backend stops; a gateway restarted after a CA rotation). Each
    /// follows the traffic as `fault` does, resolved at the first fault.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<Fault>,
    #[serde(default)]
    pub thresholds: Thresholds,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
}

/// What breaks, when, and when it is put right.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "RawFault")]
pub struct Fault {
    #[serde(flatten)]
    pub action: Action,
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// When the fault is undone; never within the drill if absent.
    #[serde(with = "humantime_serde")]
    pub recover: Option<Duration>,
}

/// A fault as written: one action beside `at` and `recover`. (Serde's
/// flatten would let a misspelt `recover` pass unnoticed.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    #[serde(with = "humantime_serde")]
    at: Duration,
    #[serde(default, with = "humantime_serde")]
    recover: Option<Duration>,
    kill: Option<Targets>,
    freeze: Option<Targets>,
    flap: Option<Flap>,
    wan: Option<WanFault>,
    rotate_ca: Option<Rotation>,
    poison: Option<Poison>,
    forge: Option<Forge>,
    wipe_etcd: Option<WipeEtcd>,
    restart: Option<Targets>,
}

impl TryFrom<RawFault> for Fault {
    type Error = String;

    fn try_from(r: RawFault) -> Result<Self, String> {
        let actions = [
            r.kill.map(Action::Kill),
            r.freeze.map(Action::Freeze),
            r.flap.map(Action::Flap),
            r.wan.map(Action::Wan),
            r.rotate_ca.map(Action::RotateCa),
            r.poison.map(Action::Poison),
            r.forge.map(Action::Forge),
            r.wipe_etcd.map(Action::WipeEtcd),
            r.restart.map(Action::Restart),
        ];
        let mut given = actions.into_iter().flatten();
        match (given.next(), given.next()) {
            (Some(action), None) => Ok(Fault {
                action,
                at: r.at,
                recover: r.recover,
            }),
            _ => Err(
                "fault: give exactly one of kill, freeze, flap, wan, rotate_ca, poison, forge, wipe_etcd, restart"
                    .into(),
            ),
        }
    }
}

/// Processes are named as `fedmesh stop` names them, plus groups:
/// `<cluster>` (every process of it), `cloud:<cloud>`, `<cluster>@<zone>`
/// (every process placed in that zone), `etcd-leader`. Anywhere a cluster
/// or cloud is named, `{serving}` and `{serving-cloud}` stand for the
/// cluster that served most in the second before the fault, and its
/// cloud: the fault hits wherever the traffic goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// SIGKILL; recovery starts them again.
    Kill(Targets),
    /// SIGSTOP, the gray failure; recovery is SIGCONT.
    Freeze(Targets),
    /// Killed and started again every `period` until recovery.
    Flap(Flap),
    /// Changes the WAN between two clouds; recovery restores the topology's
    /// link.
    Wan(WanFault),
    /// Starts a CA rotation of a cluster (`fedmesh rotate-ca`); nothing to
    /// undo.
    RotateCa(Rotation),
    /// Overwrites what the global zone holds with bytes that do not parse;
    /// recovery puts the original back.
    Poison(Poison),
    /// Writes, with one cluster's own etcd credentials inside a nested
    /// transaction (which the etcd we install lets past key permissions),
    /// values that claim to be another's: a bundle of the forger's root, a
    /// record moving gateways, an export withdrawn, a policy taking a
    /// service to the forger; recovery puts back what was there.
    Forge(Forge),
    /// Empties the global zone's etcd under load (every member stopped,
    /// its data removed, started again), gives it back its users, roles
    /// and auth as `fedmesh up` does, then restarts every controller one by
    /// one. Nothing to undo: the owners rebuild the zone.
    WipeEtcd(WipeEtcd),
    /// Restarts each process named, gracefully (`fedmesh restart`), one
    /// after another, each ready before the next; a cluster names its
    /// controller, gateways and proxy. Nothing to undo.
    Restart(Targets),
}

/// How the global zone's etcd comes back.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WipeEtcd {
    /// Put back from a backup older than the zone (`fedmesh zone backup`
    /// taken first; then the operator re-signs every record, `fedmesh
    /// anchor adopt`): an etcd restored from an old snapshot. Otherwise
    /// empty.
    #[serde(default)]
    pub from_old_backup: bool,
}

/// One target or several.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Targets {
    One(String),
    Many(Vec<String>),
}

impl Targets {
    pub fn list(&self) -> Vec<String> {
        match self {
            Targets::One(t) => vec![t.clone()],
            Targets::Many(ts) => ts.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    pub cluster: String,
    /// How long the new root is published before it signs.
    #[serde(with = "humantime_serde")]
    pub propagation: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Flap {
    pub target: String,
    #[serde(with = "humantime_serde")]
    pub period: Duration,
}

/// A change to the links between two clouds, both ways unless `one_way`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WanFault {
    /// Two clouds.
    pub between: [String; 2],
    /// Only from the first cloud to the second.
    #[serde(default)]
    pub one_way: bool,
    #[serde(default, with = "humantime_serde")]
    pub latency: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub jitter: Option<Duration>,
    #[serde(default)]
    pub loss: Option<f64>,
    /// Every datagram dropped.
    #[serde(default)]
    pub blackhole: bool,
    /// Bits a second.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    /// Every flow across the link gets a new source address (NAT
    /// rebinding); nothing to undo.
    #[serde(default)]
    pub rebind: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Poison {
    /// `<cluster>/<namespace>/<name>`: that cluster's export of a service.
    Export(String),
    /// A cluster's trust bundle.
    Bundle(String),
    /// A global traffic policy of this name: written with a value that
    /// parses but fails the checks (every service's traffic to one
    /// cluster, with a failover threshold of 1.5), so that what would move
    /// traffic if it were taken must be refused.
    Policy(String),
}

/// What a forger writes, as the cluster `by` (its join directory's etcd
/// certificate and CA). At least one of the targets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Forge {
    /// The forging cluster.
    #[serde(rename = "as")]
    pub by: String,
    /// A cluster whose bundle is replaced by one of the forger's root,
    /// signed by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// A cluster whose record is replaced by one naming the forger's
    /// gateways, signed by the forger's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// `<cluster>/<namespace>/<name>`: that export is deleted, with the
    /// manifest that vouches for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    /// `<namespace>/<name>`: a policy by which only the forger exports that
    /// service (`export.clusters: [<as>]`), signed by the forger's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl Forge {
    fn resolve(&self, r: impl Fn(&String) -> String) -> Forge {
        Forge {
            by: r(&self.by),
            bundle: self.bundle.as_ref().map(&r),
            record: self.record.as_ref().map(&r),
            export: self.export.as_ref().map(&r),
            policy: self.policy.as_ref().map(&r),
        }
    }
}

impl std::fmt::Display for Forge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} forges", self.by)?;
        let parts = [
            self.bundle.as_ref().map(|c| format!("the bundle of {c}")),
            self.record.as_ref().map(|c| format!("the record of {c}")),
            self.export
                .as_ref()
                .map(|e| format!("the withdrawal of {e}")),
            self.policy
                .as_ref()
                .map(|p| format!("a policy exporting {p} from {} alone", self.by)),
        ];
        let parts: Vec<String> = parts.into_iter().flatten().collect();
        write!(f, " {}", parts.join(", "))
    }
}

/// What a drill must show to pass. Unset, a threshold is not judged.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Failed requests, at most.
    #[serde(default)]
    pub failed: Option<u64>,
    /// Failed requests due after the fault was detected (the first request
    /// that showed it ended), at most.
    #[serde(default)]
    pub failed_after_detect: Option<u64>,
    /// Time from the fault until requests succeed again at the steady rate.
    #[serde(default, with = "humantime_serde")]
    pub rto: Option<Duration>,
    /// The most any cluster's share of the traffic may change, in any
    /// second of the fault, from its share before (0.05: five points).
    #[serde(default)]
    pub max_share_shift: Option<f64>,
    /// p99 while the fault lasts, at most.
    #[serde(default, with = "humantime_serde")]
    pub p99_during: Option<Duration>,
    /// p99 while the fault lasts, at most this much above the p99 before.
    #[serde(default)]
    pub p99_vs_before: Option<RelativeP99>,
    /// From this long after recovery to the end, every cluster's share is
    /// back within ten points of its share before the fault.
    #[serde(default, with = "humantime_serde")]
    pub recovered_share: Option<Duration>,
    /// Time after recovery until traffic is back where it was.
    #[serde(default, with = "humantime_serde")]
    pub failback: Option<Duration>,
    /// A request slower than this counts as not yet recovered (500 ms).
    #[serde(default, with = "humantime_serde")]
    pub slow: Option<Duration>,
    /// Time from the fault until the global zone, read as `fedmesh get`
    /// reads it, holds again every cluster record, bundle and export it
    /// held before the fault, none of them older.
    #[serde(default, with = "humantime_serde")]
    pub healed: Option<Duration>,
    /// QUIC handshakes refused for trust (a certificate or TLS alert) by
    /// any gateway or proxy during the drill, at most.
    #[serde(default)]
    pub handshakes_failed: Option<u64>,
}

/// `times` × the p99 before the fault, plus `plus`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelativeP99 {
    pub times: f64,
    #[serde(with = "humantime_serde")]
    pub plus: Duration,
}

impl Action {
    /// This action with `{serving}` and `{serving-cloud}` replaced.
    pub fn resolve(&self, serving: &str, cloud: &str) -> Action {
        let r = |s: &String| {
            s.replace("{serving}", serving)
                .replace("{serving-cloud}", cloud)
        };
        match self {
            Action::Kill(t) => Action::Kill(Targets::Many(t.list().iter().map(r).collect())),
            Action::Freeze(t) => Action::Freeze(Targets::Many(t.list().iter().map(r).collect())),
            Action::Flap(f) => Action::Flap(Flap {
                target: r(&f.target),
                period: f.period,
            }),
            Action::Wan(w) => Action::Wan(WanFault {
                between: [r(&w.between[0]), r(&w.between[1])],
                ..w.clone()
            }),
            Action::RotateCa(rot) => Action::RotateCa(Rotation {
                cluster: r(&rot.cluster),
                propagation: rot.propagation,
            }),
            Action::Poison(Poison::Export(p)) => Action::Poison(Poison::Export(r(p))),
            Action::Poison(Poison::Bundle(c)) => Action::Poison(Poison::Bundle(r(c))),
            Action::Poison(Poison::Policy(n)) => Action::Poison(Poison::Policy(r(n))),
            Action::Forge(fg) => Action::Forge(fg.resolve(r)),
            Action::WipeEtcd(w) => Action::WipeEtcd(w.clone()),
            Action::Restart(t) => Action::Restart(Targets::Many(t.list().iter().map(r).collect())),
        }
    }

    /// Whether it names `{serving}` or `{serving-cloud}` anywhere.
    pub fn follows_traffic(&self) -> bool {
        self.resolve("a", "a") != self.resolve("b", "b")
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Kill(t) => write!(f, "kill {}", t.list().join(", ")),
            Action::Freeze(t) => write!(f, "freeze {}", t.list().join(", ")),
            Action::Flap(fl) => write!(f, "flap {} every {:?}", fl.target, fl.period),
            Action::Wan(w) => {
                let arrow = if w.one_way { "→" } else { "↔" };
                write!(f, "wan {} {arrow} {}:", w.between[0], w.between[1])?;
                if let Some(l) = w.latency {
                    write!(f, " latency {l:?}")?;
                }
                if let Some(j) = w.jitter {
                    write!(f, " jitter {j:?}")?;
                }
                if let Some(l) = w.loss {
                    write!(f, " loss {l}")?;
                }
                if w.blackhole {
                    write!(f, " blackhole")?;
                }
                if let Some(b) = w.bandwidth {
                    write!(f, " bandwidth {b} bit/s")?;
                }
                if w.rebind {
                    write!(f, " rebind")?;
                }
                Ok(())
            }
            Action::RotateCa(rot) => write!(
                f,
                "rotate the CA of {} (signs after {:?})",
                rot.cluster, rot.propagation
            ),
            Action::Poison(Poison::Export(p)) => write!(f, "poison the export {p}"),
            Action::Poison(Poison::Bundle(c)) => write!(f, "poison the bundle of {c}"),
            Action::Poison(Poison::Policy(n)) => write!(f, "write the bad policy {n}"),
            Action::Forge(fg) => write!(f, "{fg}"),
            Action::WipeEtcd(w) if w.from_old_backup => write!(
                f,
                "restore etcd from a backup older than the zone, then restart every controller"
            ),
            Action::WipeEtcd(_) => write!(f, "empty etcd, then restart every controller"),
            Action::Restart(t) if t.list().len() == 1 => write!(f, "restart {}", t.list()[0]),
            Action::Restart(t) => write!(f, "restart {}, one by one", t.list().join(", ")),
        }
    }
}

impl Thresholds {
    pub fn slow(&self) -> Duration {
        self.slow.unwrap_or(Duration::from_millis(500))
    }
}

impl Drill {
    /// Parses and checks a drill file; errors name `origin` and the line,
    /// or the field.
    pub fn parse(yaml: &str, origin: &str) -> Result<Self, DrillError> {
        let err = |message: String| DrillError {
            origin: origin.to_string(),
            message,
        };
        let d: Drill = serde_saphyr::from_str(yaml).map_err(|e| err(e.to_string()))?;
        d.check().map_err(err)?;
        Ok(d)
    }

    fn check(&self) -> Result<(), String> {
        let clients = self.client.list();
        if clients.is_empty() || clients.iter().any(String::is_empty) {
            return Err("client: name at least one cluster".into());
        }
        if self.name.is_empty() || self.name.contains(['/', ' ']) {
            return Err(format!(
                "name: {:?} must be a word (letters, digits, '-')",
                self.name
            ));
        }
        if !self.service.contains('/') {
            return Err(format!(
                "service: {:?} must be <namespace>/<name>",
                self.service
            ));
        }
        if self.rate == 0 || self.rate > 5000 {
            return Err(format!(
                "rate: {} must be between 1 and 5000 a second",
                self.rate
            ));
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(600) {
            return Err("duration: must be more than 0 and at most 10m".into());
        }
        self.check_fault(&self.fault, "fault")?;
        for (i, f) in self.also.iter().enumerate() {
            self.check_fault(f, &format!("also[{i}]"))?;
        }
        self.check_thresholds()
    }

    /// Checks one fault; errors name it as `field`.
    fn check_fault(&self, f: &Fault, field: &str) -> Result<(), String> {
        if f.at.is_zero() || f.at >= self.duration {
            return Err(format!(
                "{field}.at: {:?} must fall within the drill (after 0, before {:?}) so that there is load before it",
                f.at, self.duration
            ));
        }
        if let Some(r) = f.recover
            && (r <= f.at || r >= self.duration)
        {
            return Err(format!(
                "{field}.recover: {r:?} must come after {field}.at ({:?}) and before the end ({:?})",
                f.at, self.duration
            ));
        }
        match &f.action {
            Action::Kill(t) | Action::Freeze(t) | Action::Restart(t)
                if t.list().iter().any(String::is_empty) =>
            {
                Err(format!("{field}: an empty target"))
            }
            Action::Kill(t) | Action::Freeze(t) | Action::Restart(t) if t.list().is_empty() => {
                Err(format!("{field}: no target"))
            }
            Action::Flap(flap) if flap.period < Duration::from_millis(100) => {
                Err(format!("{field}.flap.period: at least 100ms"))
            }
            Action::Wan(w) if w.loss.is_some_and(|l| !(0.0..1.0).contains(&l)) => {
                Err(format!("{field}.wan.loss: a share in [0, 1)"))
            }
            Action::Wan(w) if w.bandwidth == Some(0) => Err(format!(
                "{field}.wan.bandwidth: bits a second, more than 0 (use blackhole: true to cut the link)"
            )),
            _ => Ok(()),
        }
    }

    /// The judged fault, then the others.
    pub fn faults(&self) -> impl Iterator<Item = &Fault> {
        std::iter::once(&self.fault).chain(&self.also)
    }

    fn check_thresholds(&self) -> Result<(), String> {
        let t = &self.thresholds;
        if t.max_share_shift.is_some_and(|x| !(0.0..=1.0).contains(&x)) {
            return Err("thresholds.max_share_shift: a share in [0, 1]".into());
        }
        if t.p99_vs_before
            .as_ref()
            .is_some_and(|r| !(r.times.is_finite() && r.times >= 1.0))
        {
            return Err("thresholds.p99_vs_before.times: a factor of at least 1".into());
        }
        if let Some(within) = t.recovered_share {
            let Some(at) = self.fault.recover else {
                return Err("thresholds.recovered_share: the fault has no recover time".into());
            };
            if at + within + crate::report::SHARE_WINDOW > self.duration {
                return Err(format!(
                    "thresholds.recovered_share: {within:?} after recovery at {at:?} leaves less than a second of the drill ({:?}) to compare shares",
                    self.duration
                ));
            }
        }
        Ok(())
    }

    /// When the fault is put right, or the end of the drill.
    pub fn recovery(&self) -> Duration {
        self.fault.recover.unwrap_or(self.duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &str = "
name: zone-outage
topology: three-clouds
client: aws-use1
service: shop/frontend
rate: 200
duration: 9s
fault: {kill: aws-use1@use1-az1, at: 3s, recover: 6s}
thresholds: {failed: 0, rto: 1s}
";

    #[test]
    fn a_drill_reads_as_written() {
        let d = Drill::parse(ZONE, "zone.yaml").unwrap();
        assert_eq!(
            d.fault.action,
            Action::Kill(Targets::One("aws-use1@use1-az1".into()))
        );
        assert_eq!(d.fault.at, Duration::from_secs(3));
        assert_eq!(d.recovery(), Duration::from_secs(6));
        assert_eq!(d.thresholds.failed, Some(0));
        assert_eq!(d.thresholds.slow(), Duration::from_millis(500));
        assert_eq!(d.protocol, Protocol::Http);
    }

    #[test]
    fn every_fault_kind_parses() {
        for fault in [
            "{freeze: [aws-use1/gateway-0, gcp-usc1/gateway-0], at: 1s}",
            "{flap: {target: aws-use1/shop/frontend@use1-az1, period: 2s}, at: 1s}",
            "{wan: {between: [aws, gcp], latency: 500ms, jitter: 10ms}, at: 1s}",
            "{wan: {between: [aws, gcp], blackhole: true, one_way: true}, at: 1s}",
            "{wan: {between: [aws, gcp], bandwidth: 1000000, rebind: true}, at: 1s}",
            "{rotate_ca: {cluster: gcp-usc1, propagation: 2s}, at: 1s}",
            "{poison: {export: gcp-usc1/shop/payments}, at: 1s}",
            "{poison: {bundle: gcp-usc1}, at: 1s}",
            "{wipe_etcd: {}, at: 1s}",
            "{wipe_etcd: {from_old_backup: true}, at: 1s}",
            "{restart: [aws-use1/proxy, gcp-usc1], at: 1s}",
        ] {
            let yaml = ZONE.replace("{kill: aws-use1@use1-az1, at: 3s, recover: 6s}", fault);
            Drill::parse(&yaml, "d.yaml").unwrap_or_else(|e| panic!("{fault}: {e}"));
        }
    }

    #[test]
    fn other_faults_share_the_timeline() {
        let yaml = ZONE.replace(
            "thresholds: {failed: 0, rto: 1s}",
            "also: [{freeze: etcd-0, at: 1s, recover: 8s}, {restart: \"{serving}/gateway-0\", at: 4s}]
thresholds: {handshakes_failed: 0}",
        );
        let d = Drill::parse(&yaml, "d.yaml").unwrap();
        let at: Vec<Duration> = d.faults().map(|f| f.at).collect();
        assert_eq!(at, [3, 1, 4].map(Duration::from_secs));
        assert!(d.also[1].action.follows_traffic());
        assert_eq!(d.thresholds.handshakes_failed, Some(0));
    }

    #[test]
    fn serving_stands_for_where_the_traffic_goes() {
        let yaml = ZONE.replace(
            "{kill: aws-use1@use1-az1, at: 3s, recover: 6s}",
            "{wan: {between: [aws, \"{serving-cloud}\"], blackhole: true}, at: 1s}",
        );
        let d = Drill::parse(&yaml, "d.yaml").unwrap();
        assert!(d.fault.action.follows_traffic());
        let hit = d.fault.action.resolve("gcp-usc1", "gcp");
        assert!(!hit.follows_traffic());
        assert_eq!(hit.to_string(), "wan aws ↔ gcp: blackhole");
        let kill = Action::Kill(Targets::One("{serving}/gateway-0".into()));
        assert_eq!(
            kill.resolve("gcp-usc1", "gcp").to_string(),
            "kill gcp-usc1/gateway-0"
        );
        let fixed = Action::Kill(Targets::One("aws-use1".into()));
        assert!(!fixed.follows_traffic());
    }

    #[test]
    fn a_bad_drill_says_where() {
        for (from, to, says) in [
            ("rate: 200", "rate: 0", "rate"),
            ("at: 3s", "at: 12s", "fault.at"),
            ("recover: 6s", "recover: 2s", "fault.recover"),
            ("shop/frontend", "frontend", "service"),
            ("kill:", "explode:", "explode"),
            ("failed: 0", "failures: 0", "failures"),
            ("duration: 9s", "duration: soon", "duration"),
            (
                "thresholds:",
                "also: [{freeze: etcd-0, at: 1s, recover: 20s}]\nthresholds:",
                "also[0].recover",
            ),
            (
                "thresholds:",
                "also: [{kill: [\"\"], at: 1s}]\nthresholds:",
                "also[0]: an empty target",
            ),
        ] {
            let e = Drill::parse(&ZONE.replace(from, to), "zone.yaml")
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("zone.yaml: ") && e.contains(says),
                "{to}: {e}"
            );
        }
    }
}
