//! The global zone of `fedmesh up`, secured as in production: etcd serves
//! clients and peers over TLS with client certificates required, and runs
//! with auth. The operator is `root` (certificate and password); each
//! cluster is its own etcd user, known by its client certificate's CN, so
//! its role lets it write only its own keys.
//!
//! Everything lives in `<state>/etcd-pki/` (0600 files in a 0700
//! directory); `<state>/etcd.env` sets the `FEDMESH_ETCD*` variables that
//! let `fedmesh get`, `apply` and friends reach it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use fedmesh_api::KeySpace;
use fedmesh_trust::ca::write_private;
use fedmesh_trust::pki::{LocalPki, PemPair};
use fedmesh_zone::{EtcdAccess, EtcdTls};

pub const PKI_DIR: &str = "etcd-pki";
/// How long what `up` issues for its own processes lives (certificates,
/// join tokens): longer than any run.
pub const RUN_LIFETIME: Duration = fedmesh_trust::pki::LOCAL_PKI_LIFETIME;
pub const ENV_FILE: &str = "etcd.env";
/// Where a `fedmesh up` keeps its federation anchor.
pub const ANCHOR_DIR: &str = "anchor";
pub const ROOT_USER: &str = "root";
const PASSWORD_FILE: &str = "root.password";

/// The TLS material of one `fedmesh up`: written once at start.
#[derive(Debug)]
pub struct UpPki {
    pki: LocalPki,
    dir: PathBuf,
    /// The run's federation anchor (`<state>/anchor`), which signs its
    /// cluster records and policies.
    anchor: PathBuf,
}

impl UpPki {
    /// A fresh root in `<state>/etcd-pki`, with the operator's certificate
    /// and password.
    pub fn create(state: &Path) -> anyhow::Result<Self> {
        let dir = state.join(PKI_DIR);
        let _ = std::fs::remove_dir_all(&dir);
        let pki = LocalPki::create(&dir, "fedmesh up etcd root")?;
        pki.client(ROOT_USER)?;
        let password = fedmesh_trust::random_hex(16)?;
        write_private(&dir.join(PASSWORD_FILE), password.as_bytes())?;
        // One anchor for the life of the state directory: a new one would
        // disown what the last run signed.
        let anchor = state.join(ANCHOR_DIR);
        if !anchor.join(fedmesh_seal::ANCHOR_KEY_FILE).exists() {
            fedmesh_seal::AnchorKey::generate()?.save_new(&anchor)?;
        }
        Ok(Self { pki, dir, anchor })
    }

    /// The serving certificate of the etcd member at `client` and `peer`.
    /// It is also the member's client certificate towards its peers, which
    /// check its addresses against the one it dials from: on loopback that
    /// is 127.0.0.1, whatever address it listens on.
    pub fn member(
        &self,
        name: &str,
        client: SocketAddr,
        peer: SocketAddr,
    ) -> anyhow::Result<PemPair> {
        let mut ips: Vec<IpAddr> = vec![client.ip(), peer.ip(), IpAddr::from([127, 0, 0, 1])];
        ips.sort();
        ips.dedup();
        Ok(self.pki.server(name, &ips)?)
    }

    /// etcd's flags for TLS on both its client and peer ports.
    pub fn member_args(&self, serving: &PemPair) -> Vec<String> {
        let (ca, cert, key) = (self.pki.ca(), &serving.cert, &serving.key);
        vec![
            format!("--cert-file={}", cert.display()),
            format!("--key-file={}", key.display()),
            format!("--trusted-ca-file={}", ca.display()),
            "--client-cert-auth".into(),
            format!("--peer-cert-file={}", cert.display()),
            format!("--peer-key-file={}", key.display()),
            format!("--peer-trusted-ca-file={}", ca.display()),
            "--peer-client-cert-auth".into(),
        ]
    }

    /// A cluster's own client certificate, its CN the cluster's etcd user.
    pub fn cluster(&self, cluster: &str) -> anyhow::Result<PemPair> {
        Ok(self.pki.client(&fedmesh_zone::cluster_role(cluster))?)
    }

    /// Turns etcd's auth on, with `root` as the operator (by password, and
    /// by the CN of the operator's certificate).
    pub async fn enable_auth(&self, endpoints: &[String]) -> anyhow::Result<()> {
        enable_auth(&self.dir, endpoints).await
    }

    /// `etcd.env` in the state directory: what a shell sources to act as
    /// the operator (`set -a; . <state>/etcd.env`).
    pub fn write_env(&self, state: &Path, endpoints: &[String]) -> anyhow::Result<()> {
        let a = operator(&self.dir, endpoints, true);
        let tls = a.tls.as_ref().context("TLS")?;
        let mut lines = vec![
            format!("FEDMESH_ETCD={}", endpoints.join(",")),
            format!("FEDMESH_ETCD_CACERT={}", tls.ca.display()),
        ];
        if let (Some(c), Some(k)) = (&tls.cert, &tls.key) {
            lines.push(format!("FEDMESH_ETCD_CERT={}", c.display()));
            lines.push(format!("FEDMESH_ETCD_KEY={}", k.display()));
        }
        lines.push(format!("FEDMESH_ETCD_USER={ROOT_USER}"));
        lines.push(format!("FEDMESH_ANCHOR_DIR={}", self.anchor.display()));
        lines.push(format!(
            "FEDMESH_ETCD_PASSWORD_FILE={}",
            self.dir.join(PASSWORD_FILE).display()
        ));
        let text: String = lines.iter().map(|l| format!("export {l}\n")).collect();
        write_private(&state.join(ENV_FILE), text.as_bytes())?;
        Ok(())
    }

    /// The flags `fedmesh register cluster` needs to act as the operator
    /// and give `cluster` its own certificate.
    pub fn register_args(&self, cluster: &str) -> anyhow::Result<Vec<String>> {
        let mine = self.cluster(cluster)?;
        let root = operator_pair(&self.dir);
        let path = |p: &Path| p.display().to_string();
        Ok(vec![
            "--etcd-cacert".into(),
            path(&self.pki.ca()),
            "--etcd-cert".into(),
            path(&root.cert),
            "--etcd-key".into(),
            path(&root.key),
            "--etcd-user".into(),
            ROOT_USER.into(),
            "--etcd-password-file".into(),
            path(&self.dir.join(PASSWORD_FILE)),
            "--cluster-etcd-cert".into(),
            path(&mine.cert),
            "--cluster-etcd-key".into(),
            path(&mine.key),
            "--anchor-dir".into(),
            path(&self.anchor),
        ])
    }
}

async fn enable_auth(pki: &Path, endpoints: &[String]) -> anyhow::Result<()> {
    let password = std::fs::read_to_string(pki.join(PASSWORD_FILE))?;
    let mut zone = operator_zone_in(pki, endpoints).await?;
    zone.enable_auth(ROOT_USER, password.trim())
        .await
        .context("enabling etcd auth")
}

/// The global zone of the `fedmesh up` in `state`, as the operator (by
/// certificate: it works whether auth is on or not), signing with the
/// run's anchor.
pub async fn operator_zone(
    state: &Path,
    endpoints: &[String],
) -> anyhow::Result<fedmesh_zone::GlobalZone> {
    let anchor =
        fedmesh_seal::AnchorKey::load(&state.join(ANCHOR_DIR).join(fedmesh_seal::ANCHOR_KEY_FILE))?;
    Ok(operator_zone_in(&state.join(PKI_DIR), endpoints)
        .await?
        .with_anchor(std::sync::Arc::new(anchor)))
}

async fn operator_zone_in(
    pki: &Path,
    endpoints: &[String],
) -> anyhow::Result<fedmesh_zone::GlobalZone> {
    let opts =
        fedmesh_zone::connect_options(&operator(pki, endpoints, false), Duration::from_secs(5))?
            .with_timeout(Duration::from_secs(10));
    let client = etcd_client::Client::connect(endpoints, Some(opts))
        .await
        .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
    Ok(fedmesh_zone::GlobalZone::new(client, KeySpace::default()))
}

/// What `fedmesh up` gives a new, empty etcd of its federation: the
/// records of `backup` it lacks (see `fedmesh zone restore`), each
/// cluster's etcd user and role (`(name, trust domain)`), then auth.
pub async fn restore_access(
    state: &Path,
    endpoints: &[String],
    clusters: &[(String, String)],
    backup: Option<&fedmesh_zone::dump::ZoneDump>,
) -> anyhow::Result<()> {
    let mut zone = operator_zone(state, endpoints).await?;
    if let Some(dump) = backup {
        zone.restore(dump, false)
            .await
            .context("restoring the backup")?;
    }
    for (name, td) in clusters {
        zone.ensure_cluster_access(name, td, None)
            .await
            .with_context(|| format!("the etcd user of {name}"))?;
    }
    enable_auth(&state.join(PKI_DIR), endpoints).await
}

fn operator_pair(dir: &Path) -> PemPair {
    PemPair {
        cert: dir.join(format!("{ROOT_USER}.pem")),
        key: dir.join(format!("{ROOT_USER}-key.pem")),
    }
}

/// The operator's access to the etcd of the `fedmesh up` in `state`, by
/// certificate only: its CN makes it root, and with no password to trade
/// for a token the client connects lazily (what `status` and drills want
/// while etcd is down).
pub fn operator_access(state: &Path, endpoints: &[String]) -> EtcdAccess {
    operator(&state.join(PKI_DIR), endpoints, false)
}

/// The operator's access in `pki`; with `password`, as root by password
/// too (what `register` needs to create the clusters' users).
fn operator(pki: &Path, endpoints: &[String], password: bool) -> EtcdAccess {
    let pair = operator_pair(pki);
    EtcdAccess {
        endpoints: endpoints.to_vec(),
        prefix: KeySpace::default().prefix().to_owned(),
        user: password.then(|| ROOT_USER.to_owned()),
        password: password
            .then(|| std::fs::read_to_string(pki.join(PASSWORD_FILE)).ok())
            .flatten()
            .map(|p| p.trim().to_owned()),
        tls: Some(EtcdTls {
            ca: pki.join("ca.pem"),
            cert: Some(pair.cert),
            key: Some(pair.key),
        }),
    }
}

/// An etcd client of the `fedmesh up` in `state`, as the operator.
pub async fn client(
    state: &Path,
    endpoints: &[String],
    timeout: Duration,
) -> anyhow::Result<etcd_client::Client> {
    let opts = fedmesh_zone::connect_options(&operator_access(state, endpoints), timeout)?
        .with_timeout(timeout);
    etcd_client::Client::connect(endpoints, Some(opts))
        .await
        .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))
}
