//! `fedmesh drill`: failover drills (`fedmesh-chaos`) against what `fedmesh
//! up` runs. [`UpFederation`] turns a drill's fault into acts on that
//! federation: signals to the processes its state lists, commands to its
//! WAN relays, and writes to its global zone.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::Client;
use fedmesh_api::KeySpace;
use fedmesh_chaos::drill::{Forge, Poison, Protocol, WanFault, WipeEtcd};
use fedmesh_chaos::{Action, Drill, Federation, Report};
use tokio::time::Instant;

use crate::up;
use crate::up::backends::{component, matches, respawn, respawn_backend};
use crate::up::state::State;
use crate::up::supervise::{Binaries, alive, binaries, reap, signal};
use crate::wan::{self, Change, Impairment, WanCommand};

/// One process a target names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Member {
    /// By the state's name for it (`etcd-0`, `aws-use1-gateway-0`), or a
    /// backend's id. Sorted as they must start again: etcd, backends (a
    /// registry lists them), controllers, gateways, proxies.
    Etcd(String),
    Backend(String),
    Controller(String),
    Gateway(String),
    Proxy(String),
}

/// The federation in a state directory, as a drill acts on it.
#[derive(Debug)]
pub struct UpFederation {
    dir: PathBuf,
    state: State,
    bins: Binaries,
    /// What a poisoning overwrote: (key, original value) to put back.
    poisoned: Vec<(String, Option<Vec<u8>>)>,
    /// Members each kill, freeze or flap in effect took down, to bring
    /// back on its recovery.
    down: Vec<(Action, Vec<Member>)>,
    /// Trust handshake failures counted by gateways and proxies since
    /// restarted (their counters start again at 0).
    handshakes_banked: u64,
    /// Why a restarted process's counters could not be read, if one's
    /// could not: the count is then unknown, not zero.
    handshakes_lost: Option<String>,
    /// What the zone held before a wipe: each cluster record's and
    /// bundle's sequence, and each export (0), by key.
    census: Option<Census>,
}

type Census = std::collections::BTreeMap<String, u64>;

impl UpFederation {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let state = State::load(dir)?;
        if !state.ready {
            bail!("{} in {} is still starting", state.topology, dir.display());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
            bins: binaries()?,
            poisoned: Vec::new(),
            down: Vec::new(),
            handshakes_banked: 0,
            handshakes_lost: None,
            census: None,
        })
    }

    pub fn topology(&self) -> &str {
        &self.state.topology
    }

    /// Every process `target` names; an error that shows the forms when it
    /// names none.
    async fn resolve(&self, target: &str) -> anyhow::Result<Vec<Member>> {
        let s = &self.state;
        let whole = |c: &crate::up::state::ClusterState| {
            let mut all = vec![
                Member::Controller(c.controller.name.clone()),
                Member::Proxy(c.proxy.name.clone()),
            ];
            all.extend(c.gateways.iter().map(|g| Member::Gateway(g.name.clone())));
            all.extend(c.backends.iter().map(|b| Member::Backend(b.id.clone())));
            all
        };
        let mut out = Vec::new();
        if target == "etcd" {
            out.extend(s.etcd.iter().map(|e| Member::Etcd(e.name.clone())));
        } else if target == "etcd-leader" {
            let leader = self.etcd_leader().await?;
            eprintln!("      etcd-leader is {leader}");
            out.push(Member::Etcd(leader));
        } else if let Some(name) = component(target) {
            if s.procs().any(|p| p.name == name) {
                out.push(if name.starts_with("etcd-") {
                    Member::Etcd(name)
                } else if name.ends_with("-controller") {
                    Member::Controller(name)
                } else if name.ends_with("-proxy") {
                    Member::Proxy(name)
                } else {
                    Member::Gateway(name)
                });
            }
        } else if let Some(cloud) = target.strip_prefix("cloud:") {
            for c in s.clusters.iter().filter(|c| c.cloud == cloud) {
                out.extend(whole(c));
            }
        } else if let Some((cluster, zone)) = target.split_once('@')
            && !cluster.contains('/')
        {
            for c in s.clusters.iter().filter(|c| c.name == cluster) {
                out.extend(
                    c.backends
                        .iter()
                        .filter(|b| b.zone == zone)
                        .map(|b| Member::Backend(b.id.clone())),
                );
                out.extend(
                    c.gateways
                        .iter()
                        .filter(|g| g.zone.as_deref() == Some(zone))
                        .map(|g| Member::Gateway(g.name.clone())),
                );
            }
        } else if !target.contains('/') {
            for c in s.clusters.iter().filter(|c| c.name == target) {
                out.extend(whole(c));
            }
        } else {
            for c in &s.clusters {
                for b in &c.backends {
                    if matches(target, &c.name, b)? {
                        out.push(Member::Backend(b.id.clone()));
                    }
                }
            }
        }
        if out.is_empty() {
            bail!(
                "{target:?} names nothing in {}: use <cluster>, cloud:<cloud>, <cluster>@<zone>, \
                 <cluster>/controller|proxy|gateway-<i>, etcd, etcd-<i>, etcd-leader or \
                 <cluster>/<namespace>/<name>[@zone]",
                s.topology
            );
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The name of the etcd member that leads now.
    async fn etcd_leader(&self) -> anyhow::Result<String> {
        for e in &self.state.etcd {
            let one = [format!("https://{}", e.address)];
            let Ok(mut client) = up::etcd::client(&self.dir, &one, Duration::from_secs(2)).await
            else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            if status.header().map(|h| h.member_id()) == Some(status.leader()) {
                return Ok(e.name.clone());
            }
        }
        bail!("no etcd member says it leads")
    }

    fn pid_of(&self, m: &Member) -> Option<u32> {
        let s = &self.state;
        match m {
            Member::Backend(id) => s
                .clusters
                .iter()
                .flat_map(|c| &c.backends)
                .find(|b| &b.id == id)
                .and_then(|b| b.pid),
            Member::Etcd(n) | Member::Controller(n) | Member::Gateway(n) | Member::Proxy(n) => {
                s.procs().find(|p| &p.name == n).map(|p| p.pid)
            }
        }
    }

    /// Signals every member; with KILL, waits until each has gone.
    async fn signal_all(&mut self, members: &[Member], sig: &str) -> anyhow::Result<()> {
        let pids: Vec<u32> = members
            .iter()
            .filter_map(|m| self.pid_of(m))
            .filter(|&p| p != 0 && self.state.ours(p))
            .collect();
        for &pid in &pids {
            signal(pid, sig);
        }
        if sig == "KILL" {
            let deadline = Instant::now() + Duration::from_secs(5);
            while pids.iter().any(|&p| alive(p)) {
                if Instant::now() > deadline {
                    bail!("processes {pids:?} outlived SIGKILL for 5 s");
                }
                reap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    /// Starts every member again, in the order they need each other.
    async fn restart(&mut self, members: &[Member]) -> anyhow::Result<()> {
        let mut members = members.to_vec();
        members.sort();
        let mut result = Ok(());
        for m in &members {
            if self.pid_of(m).is_some_and(|p| p != 0 && self.state.ours(p)) {
                continue;
            }
            let r = match m {
                Member::Backend(id) => {
                    let found = self.state.clusters.iter_mut().find_map(|c| {
                        let name = c.name.clone();
                        c.backends
                            .iter_mut()
                            .find(|b| &b.id == id)
                            .map(|b| (name, b))
                    });
                    match found {
                        Some((cluster, b)) => {
                            respawn_backend(b, &cluster, &self.bins, &self.dir).await
                        }
                        None => Ok(()),
                    }
                }
                Member::Etcd(n) | Member::Controller(n) | Member::Gateway(n) | Member::Proxy(n) => {
                    match self.state.proc_mut(n) {
                        Some(p) => respawn(p, &self.dir).await,
                        None => Ok(()),
                    }
                }
            };
            result = result.and(r);
        }
        // Save even after a failure: what did start is recorded.
        self.state.save(&self.dir)?;
        result
    }

    async fn wan(&self, w: &WanFault, change: Change) -> anyhow::Result<()> {
        let cmd = WanCommand {
            from: w.between[0].clone(),
            to: w.between[1].clone(),
            both_ways: !w.one_way,
            change,
        };
        wan::command(&self.dir, &cmd).await
    }

    async fn etcd(&self) -> anyhow::Result<Client> {
        up::etcd::client(
            &self.dir,
            &self.state.etcd_endpoints(),
            Duration::from_secs(5),
        )
        .await
    }

    fn poison_key(&self, p: &Poison) -> anyhow::Result<String> {
        let ks = KeySpace::default();
        match p {
            Poison::Export(path) => {
                let mut parts = path.splitn(3, '/');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(c), Some(ns), Some(name)) if !name.contains('/') => {
                        Ok(ks.export(c, ns, name))
                    }
                    _ => bail!("poison.export: {path:?} must be <cluster>/<namespace>/<name>"),
                }
            }
            Poison::Bundle(cluster) => {
                let c = self
                    .state
                    .clusters
                    .iter()
                    .find(|c| &c.name == cluster)
                    .with_context(|| format!("poison.bundle: no cluster {cluster:?}"))?;
                Ok(ks.bundle(&c.trust_domain))
            }
            Poison::Policy(name) => {
                fedmesh_api::validate_label("poison.policy", name)?;
                Ok(ks.policy(name))
            }
        }
    }

    /// What a poisoning writes: garbage, or (for a policy) a policy that
    /// parses but would send every service to one cluster with a failover
    /// threshold no controller accepts.
    fn poison_value(&self, p: &Poison) -> Vec<u8> {
        match p {
            Poison::Policy(name) => {
                let last = self.state.clusters.last().map_or("", |c| c.name.as_str());
                serde_json::json!({
                    "apiVersion": "fedmesh.io/v1",
                    "kind": "GlobalTrafficPolicy",
                    "metadata": {"name": name},
                    "spec": {"service": "*", "weights": {last: 1}, "failoverThreshold": 1.5},
                })
                .to_string()
                .into_bytes()
            }
            _ => POISON.to_vec(),
        }
    }
}

impl UpFederation {
    /// Writes `fg`'s forgeries in one nested transaction with the forging
    /// cluster's own etcd credentials, after noting what each key held.
    async fn forge(&mut self, fg: &Forge) -> anyhow::Result<()> {
        use etcd_client::{Txn, TxnOp};
        use fedmesh_seal::{Signer, Statement, seal};
        let ks = KeySpace::default();
        let join = fedmesh_zone::JoinDir::load(&up::join_dir_of(&self.dir, &fg.by)?)
            .with_context(|| format!("forge.as: {}'s join directory", fg.by))?;
        // Dated a day ahead: it would outrank every genuine statement.
        let seq = fedmesh_seal::next_seq(
            std::time::SystemTime::now() + Duration::from_secs(86_400),
            None,
        );
        let sealed = |key: &str, value: serde_json::Value| -> anyhow::Result<Vec<u8>> {
            let statement = Statement {
                subject: key.strip_prefix(ks.prefix()).unwrap_or(key).to_owned(),
                seq,
                value: Some(value),
                x5c: vec![],
                endorsements: vec![],
            };
            Ok(seal(statement, Signer::Root(&join.ca))?
                .to_json()
                .into_bytes())
        };
        let trust_domain = |c: &str| {
            self.state
                .clusters
                .iter()
                .find(|x| x.name == c)
                .map(|x| x.trust_domain.clone())
                .with_context(|| format!("forge: no cluster {c:?}"))
        };
        let mut writes: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        if let Some(c) = &fg.bundle {
            let td = fedmesh_trust::TrustDomain::new(&trust_domain(c)?)?;
            let doc = fedmesh_trust::Bundle::with_roots(td.clone(), [join.ca.cert_der().clone()])
                .to_document();
            let key = ks.bundle(td.as_str());
            writes.push((
                key.clone(),
                Some(sealed(&key, serde_json::from_str(&doc)?)?),
            ));
        }
        if let Some(c) = &fg.record {
            let key = ks.cluster(c);
            let record = serde_json::json!({
                "name": c, "cloud": "forged", "region": "forged", "zones": ["forged"],
                "trustDomain": trust_domain(c)?, "gateways": join.cluster.gateways,
                "registeredAt": "2026-01-01T00:00:00Z",
            });
            writes.push((key.clone(), Some(sealed(&key, record)?)));
        }
        if let Some(path) = &fg.export {
            let key = self.poison_key(&Poison::Export(path.clone()))?;
            let cluster = path.split('/').next().unwrap_or_default();
            writes.push((key, None));
            writes.push((ks.seen(cluster), None));
        }
        if let Some(service) = &fg.policy {
            let name = format!("forged-by-{}", fg.by);
            let key = ks.policy(&name);
            let policy = serde_json::json!({
                "apiVersion": "fedmesh.io/v1", "kind": "GlobalTrafficPolicy",
                "metadata": {"name": name},
                "spec": {"service": service, "export": {"clusters": [fg.by]}},
            });
            writes.push((key.clone(), Some(sealed(&key, policy)?)));
        }
        anyhow::ensure!(
            !writes.is_empty(),
            "forge: name at least one of bundle, record, export, policy"
        );
        let mut operator = self.etcd().await?;
        let mut ops = Vec::with_capacity(writes.len());
        for (key, value) in writes {
            let before = operator
                .get(key.as_str(), None)
                .await?
                .kvs()
                .first()
                .map(|kv| kv.value().to_vec());
            self.poisoned.push((key.clone(), before));
            ops.push(match value {
                Some(v) => TxnOp::put(key, v, None),
                None => TxnOp::delete(key, None),
            });
        }
        // The forger is known to etcd by its own client certificate.
        let opts = fedmesh_zone::connect_options(&join.etcd, Duration::from_secs(5))?;
        let mut forger = Client::connect(&join.etcd.endpoints, Some(opts)).await?;
        let nested = Txn::new().and_then([TxnOp::txn(Txn::new().and_then(ops))]);
        let resp = forger
            .txn(nested)
            .await
            .with_context(|| format!("{}'s nested transaction", fg.by))?;
        anyhow::ensure!(
            resp.succeeded(),
            "{}'s nested transaction did not apply",
            fg.by
        );
        Ok(())
    }
}

impl UpFederation {
    /// What a fresh reader (`fedmesh get`) believes of the zone: each
    /// cluster record's and bundle's sequence, and each export, by key;
    /// refused values count as absent.
    async fn census(&self) -> anyhow::Result<Census> {
        let mut zone = up::etcd::operator_zone(&self.dir, &self.state.etcd_endpoints()).await?;
        let believed = zone.believed().await?;
        let ks = KeySpace::default();
        let mut census = Census::new();
        for kv in &believed.signed {
            if matches!(
                ks.parse(&kv.key),
                Some(fedmesh_api::GlobalKey::Cluster(_) | fedmesh_api::GlobalKey::Bundle(_))
            ) && let Ok(s) = fedmesh_seal::peek::<serde_json::Value>(&kv.value)
                && s.value.is_some()
            {
                census.insert(kv.key.clone(), s.seq);
            }
        }
        for kv in &believed.exports {
            census.insert(kv.key.clone(), 0);
        }
        Ok(census)
    }

    /// Empties etcd (every member), gives it back what `fedmesh up` gives
    /// a new etcd (and, `from_old_backup`, a backup taken before the
    /// operator re-signed every record), then restarts every controller
    /// one by one.
    async fn wipe_etcd(&mut self, w: &WipeEtcd) -> anyhow::Result<()> {
        let endpoints = self.state.etcd_endpoints();
        let old = if w.from_old_backup {
            let mut zone = up::etcd::operator_zone(&self.dir, &endpoints).await?;
            let (dump, _) = zone.backup().await?;
            let signed = zone.adopt().await?;
            eprintln!(
                "      the operator re-signed {} records after the backup",
                signed.len()
            );
            self.until_views_hold_their_records(&mut zone).await?;
            Some(dump)
        } else {
            None
        };
        self.census = Some(self.census().await?);
        let members: Vec<Member> = self
            .state
            .etcd
            .iter()
            .map(|e| Member::Etcd(e.name.clone()))
            .collect();
        self.signal_all(&members, "KILL").await?;
        for e in &self.state.etcd {
            let data = self.dir.join(&e.name);
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("emptying {}", data.display()))?;
        }
        self.restart(&members).await?;
        up::probe::wait_for_etcd(&self.dir, &endpoints).await?;
        let clusters: Vec<(String, String)> = self
            .state
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.trust_domain.clone()))
            .collect();
        up::etcd::restore_access(&self.dir, &endpoints, &clusters, old.as_ref()).await?;
        let controllers: Vec<Member> = self
            .state
            .clusters
            .iter()
            .map(|c| Member::Controller(c.controller.name.clone()))
            .collect();
        for c in controllers {
            let one = [c];
            self.signal_all(&one, "KILL").await?;
            self.restart(&one).await?;
        }
        Ok(())
    }

    /// Waits (10 s at most) until each controller's last good view holds
    /// its cluster's record as etcd holds it now.
    async fn until_views_hold_their_records(
        &self,
        zone: &mut fedmesh_zone::GlobalZone,
    ) -> anyhow::Result<()> {
        let ks = KeySpace::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &self.state.clusters {
            let key = ks.cluster(&c.name);
            let now = zone.stored(&key).await?.unwrap_or_default();
            let file = self
                .dir
                .join(&c.name)
                .join(up::CONTROLLER_STATE_DIR)
                .join(fedmesh_zone::dump::LAST_GOOD_FILE);
            loop {
                let held = fedmesh_zone::dump::DumpReader::open(&file, ks.prefix())
                    .and_then(|mut d| d.records())
                    .ok()
                    .and_then(|records| records.into_iter().find(|r| r.key == key))
                    .is_some_and(|r| r.value == now);
                if held {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{}'s last good view ({}) did not take up its re-signed record within 10 s",
                        c.name,
                        file.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

/// What a poisoned key holds: bytes that are no JSON at all.
const POISON: &[u8] = b"{\"poisoned by fedmesh drill\": \x00\xff";

impl Federation for UpFederation {
    fn entries(&self, drill: &Drill) -> anyhow::Result<Vec<SocketAddr>> {
        drill
            .client
            .list()
            .iter()
            .map(|client| self.entry(drill, client))
            .collect()
    }

    fn cloud_of(&self, cluster: &str) -> Option<String> {
        let c = self.state.clusters.iter().find(|c| c.name == cluster)?;
        Some(c.cloud.clone())
    }

    async fn inject(&mut self, action: &Action) -> anyhow::Result<()> {
        // Another shell may have stopped or started something since.
        self.state = State::load(&self.dir)?;
        match action {
            Action::Restart(targets) => self.restart_gracefully(&targets.list()).await,
            _ => self.inject_fault(action).await,
        }
    }

    async fn recover(&mut self, action: &Action) -> anyhow::Result<()> {
        self.recover_fault(action).await
    }

    async fn zone_whole(&mut self) -> anyhow::Result<bool> {
        self.zone_is_whole().await
    }

    async fn handshake_failures(&mut self) -> anyhow::Result<u64> {
        self.state = State::load(&self.dir)?;
        let names: Vec<String> = self
            .state
            .clusters
            .iter()
            .flat_map(|c| c.gateways.iter().chain([&c.proxy]))
            .map(|p| p.name.clone())
            .collect();
        if let Some(why) = &self.handshakes_lost {
            bail!("a restarted process's handshake counters were lost ({why})");
        }
        let mut total = self.handshakes_banked;
        for n in names {
            total += self.handshakes_of(&n).await?;
        }
        Ok(total)
    }
}

/// The sum of a gateway's or proxy's handshake failure counters whose
/// reason is trust (`certificate`, `tls`), from its Prometheus text; a
/// timeout or a refused connection is not a trust failure.
fn trust_handshake_failures(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{')?;
            let trust =
                labels.contains("reason=\"certificate\"") || labels.contains("reason=\"tls\"");
            (name.ends_with("handshake_failures_total") && trust)
                .then(|| value.parse::<f64>().ok())?
        })
        .map(|v| v as u64)
        .sum()
}

impl UpFederation {
    /// Where `client`'s proxy takes the drill's service.
    fn entry(&self, drill: &Drill, client: &str) -> anyhow::Result<SocketAddr> {
        let c = self
            .state
            .clusters
            .iter()
            .find(|c| c.name == client)
            .with_context(|| format!("client: no cluster {client:?} in {}", self.topology()))?;
        match drill.protocol {
            Protocol::Http => Ok(c.proxy.address),
            Protocol::Tcp => c.proxy_tcp.get(&drill.service).copied().with_context(|| {
                format!(
                    "service: {} is not a TCP service of {} (its proxy listens for {:?})",
                    drill.service,
                    c.name,
                    c.proxy_tcp.keys().collect::<Vec<_>>()
                )
            }),
        }
    }

    /// Restarts every process `targets` name, one after another, each
    /// ready before the next (`fedmesh restart`); a cluster names its
    /// controller, gateways and proxy, not its demo backends.
    async fn restart_gracefully(&mut self, targets: &[String]) -> anyhow::Result<()> {
        for t in targets {
            for m in self.resolve(t).await? {
                let name = match &m {
                    Member::Backend(_) => continue,
                    Member::Etcd(n)
                    | Member::Controller(n)
                    | Member::Gateway(n)
                    | Member::Proxy(n) => n.clone(),
                };
                // Its counters die with it.
                if matches!(m, Member::Gateway(_) | Member::Proxy(_)) {
                    match self.handshakes_of(&name).await {
                        Ok(n) => self.handshakes_banked += n,
                        Err(e) => self.handshakes_lost = Some(format!("{e:#}")),
                    }
                }
                let result = up::restart::restart_proc(&mut self.state, &self.dir, &name).await;
                self.state.save(&self.dir)?;
                let (old, new) = result.with_context(|| format!("restarting {name}"))?;
                eprintln!("      restarted {name} (pid {old} → {new})");
            }
        }
        Ok(())
    }

    async fn inject_fault(&mut self, action: &Action) -> anyhow::Result<()> {
        match action {
            Action::Restart(_) => Ok(()),
            Action::Kill(targets) | Action::Freeze(targets) => {
                let mut members = Vec::new();
                for t in targets.list() {
                    members.extend(self.resolve(&t).await?);
                }
                let sig = if matches!(action, Action::Kill(_)) {
                    "KILL"
                } else {
                    "STOP"
                };
                self.down.push((action.clone(), members.clone()));
                self.signal_all(&members, sig).await
            }
            Action::Flap(flap) => {
                let members = self.resolve(&flap.target).await?;
                self.down.push((action.clone(), members.clone()));
                self.signal_all(&members, "KILL").await
            }
            Action::Wan(w) => {
                let change = if w.rebind {
                    Change::Rebind
                } else {
                    Change::Impair(Impairment {
                        latency: w.latency,
                        jitter: w.jitter,
                        loss: w.loss,
                        blackhole: w.blackhole,
                        bandwidth: w.bandwidth,
                    })
                };
                self.wan(w, change).await
            }
            Action::Poison(p) => {
                let key = self.poison_key(p)?;
                let mut etcd = self.etcd().await?;
                let before = etcd
                    .get(key.as_str(), None)
                    .await?
                    .kvs()
                    .first()
                    .map(|kv| kv.value().to_vec());
                etcd.put(key.as_str(), self.poison_value(p), None).await?;
                self.poisoned.push((key, before));
                Ok(())
            }
            Action::Forge(fg) => self.forge(fg).await,
            Action::WipeEtcd(w) => self.wipe_etcd(w).await,
            Action::RotateCa(rot) => {
                let join = crate::up::join_dir_of(&self.dir, &rot.cluster)?;
                let (td, next) = crate::cmd::rotate::stage(&join, rot.propagation)?;
                crate::up::add_bootstrap_root(&self.dir, &rot.cluster, &td, next.cert_der())?;
                // Under way once the global zone publishes the new root.
                let mut etcd = self.etcd().await?;
                let key = KeySpace::default().bundle(td.as_str());
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let resp = etcd.get(key.as_str(), None).await?;
                    let published = resp.kvs().first().is_some_and(|kv| {
                        fedmesh_zone::client::unverified_bundle(td.as_str(), &key, kv.value())
                            .is_ok_and(|b| b.roots().contains(next.cert_der()))
                    });
                    if published {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "{}'s controller did not publish the new root within 10 s",
                            rot.cluster
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn recover_fault(&mut self, action: &Action) -> anyhow::Result<()> {
        match action {
            Action::Kill(_) | Action::Flap(_) => {
                let members = self.took_down(action);
                self.restart(&members).await
            }
            Action::Freeze(_) => {
                let members = self.took_down(action);
                self.signal_all(&members, "CONT").await
            }
            Action::Wan(w) => {
                if w.rebind {
                    return Ok(());
                }
                self.wan(w, Change::Reset).await
            }
            Action::Poison(_) | Action::Forge(_) => {
                let mut etcd = self.etcd().await?;
                for (key, before) in std::mem::take(&mut self.poisoned) {
                    match before {
                        Some(v) => etcd.put(key, v, None).await.map(drop)?,
                        None => etcd.delete(key, None).await.map(drop)?,
                    }
                }
                Ok(())
            }
            // A rotation is not undone: the cluster keeps its new CA; a
            // wiped zone is rebuilt by its owners; what was restarted runs.
            Action::RotateCa(_) | Action::WipeEtcd(_) | Action::Restart(_) => Ok(()),
        }
    }

    /// What `action` took down, no longer counted as down.
    fn took_down(&mut self, action: &Action) -> Vec<Member> {
        match self.down.iter().position(|(a, _)| a == action) {
            Some(i) => self.down.remove(i).1,
            None => Vec::new(),
        }
    }

    /// Trust handshake failures `name` (a gateway or proxy) counts now; 0
    /// when it is stopped or has no admin port. One that runs but does not
    /// answer is an error: a count not read must not pass for none.
    async fn handshakes_of(&self, name: &str) -> anyhow::Result<u64> {
        let Some(p) = self.state.procs().find(|p| p.name == name) else {
            return Ok(0);
        };
        let Some(admin) = p.admin.filter(|_| p.pid != 0) else {
            return Ok(0);
        };
        let (status, text) = up::probe::get(admin, "admin", "/metrics", Duration::from_secs(2))
            .await
            .with_context(|| format!("reading {name}'s handshake counters"))?;
        if status != 200 {
            bail!("reading {name}'s handshake counters: /metrics answered {status}");
        }
        Ok(trust_handshake_failures(&text))
    }

    async fn zone_is_whole(&mut self) -> anyhow::Result<bool> {
        let Some(before) = &self.census else {
            return Ok(true);
        };
        let now = self.census().await?;
        Ok(before
            .iter()
            .all(|(key, seq)| now.get(key).is_some_and(|s| s >= seq)))
    }
}

/// How `fedmesh drill` shows its results.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// The drills `names` ask for: shipped ones by name, `all`, or files.
pub fn drills(names: &[String]) -> anyhow::Result<Vec<Drill>> {
    let mut out = Vec::new();
    for name in names {
        if name == "all" {
            for (n, _) in fedmesh_chaos::SHIPPED {
                out.push(fedmesh_chaos::shipped(n).context("a shipped drill")??);
            }
        } else if let Some(d) = fedmesh_chaos::shipped(name) {
            out.push(d?);
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || Path::new(name).is_file() {
            let text = std::fs::read_to_string(name)
                .with_context(|| format!("reading the drill {name}"))?;
            out.push(Drill::parse(&text, name)?);
        } else {
            let known: Vec<&str> = fedmesh_chaos::SHIPPED.iter().map(|(n, _)| *n).collect();
            bail!(
                "no drill {name:?}: name a drill file, `all`, or one of {}",
                known.join(", ")
            );
        }
    }
    Ok(out)
}

/// Runs `drills` against the federation in `dir`: those written for
/// another topology are skipped when `all` asked for them, an error when
/// named. Writes each timeline to `svg_dir`; true when every drill passed.
pub async fn run_all(
    dir: &Path,
    drills: &[Drill],
    named_all: bool,
    output: Output,
    svg_dir: &Path,
) -> anyhow::Result<bool> {
    let mut fed = UpFederation::open(dir)?;
    std::fs::create_dir_all(svg_dir).with_context(|| format!("creating {}", svg_dir.display()))?;
    let mut reports: Vec<Report> = Vec::new();
    let tty = std::io::stderr().is_terminal();
    for d in drills {
        if d.topology != fed.topology() {
            if named_all {
                eprintln!(
                    "skip  {} (written for {}; {} is up)",
                    d.name,
                    d.topology,
                    fed.topology()
                );
                continue;
            }
            bail!(
                "{} is written for the topology {}, but {} is up in {}",
                d.name,
                d.topology,
                fed.topology(),
                dir.display()
            );
        }
        eprintln!("drill {}: {}", d.name, d.about);
        let mut last_phase = "";
        let (report, _records) = fedmesh_chaos::run(d, &mut fed, |p| {
            if tty {
                eprint!(
                    "\r      {:>5.1} s  {:<9} sent {:>6}  ok {:>6}  failed {:>5}",
                    p.elapsed.as_secs_f64(),
                    p.phase,
                    p.sent,
                    p.ok,
                    p.failed
                );
                let _ = std::io::stderr().flush();
            } else if p.phase != last_phase {
                eprintln!("      {:>5.1} s  {}", p.elapsed.as_secs_f64(), p.phase);
            }
            last_phase = p.phase;
        })
        .await
        .with_context(|| format!("drill {}", d.name))?;
        if tty {
            eprintln!();
        }
        let svg = svg_dir.join(format!("{}.svg", d.name));
        std::fs::write(&svg, fedmesh_chaos::svg::render(&report))
            .with_context(|| format!("writing {}", svg.display()))?;
        if output == Output::Table {
            print!("{}", fedmesh_chaos::text::text(&report));
            println!("      timeline: {}", svg.display());
        }
        reports.push(report);
    }
    match output {
        Output::Table => println!("{}", fedmesh_chaos::text::summary(&reports)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&reports)?),
    }
    Ok(reports.iter().all(|r| r.verdict.passed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_trust_failures_of_handshake_counters_are_summed() {
        let text = r#"# HELP fedmesh_gateway_handshake_failures Failed handshakes.
# TYPE fedmesh_gateway_handshake_failures counter
fedmesh_gateway_handshake_failures_total{direction="ingress",peer_cluster="unknown",reason="certificate"} 3
fedmesh_gateway_handshake_failures_total{direction="egress",peer_cluster="local",reason="tls"} 2
fedmesh_gateway_handshake_failures_total{direction="egress",peer_cluster="gcp-usc1",reason="timeout"} 7
fedmesh_proxy_gateway_handshake_failures_total{cluster="gcp-usc1",reason="certificate"} 1
fedmesh_gateway_refused_total{direction="ingress",peer_cluster="gcp-usc1",reason="tls"} 9
"#;
        assert_eq!(trust_handshake_failures(text), 6);
        assert_eq!(trust_handshake_failures(""), 0);
    }
}
