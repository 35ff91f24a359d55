//! The commands that act on the global zone: `register`, `deregister` and
//! `get`; and `rotate-ca`, on a join directory. `fedmesh up` and friends are
//! in [`crate::up`].

pub mod anchor;
pub mod get;
pub mod policy;
pub mod proxies;
pub mod register;
pub mod rotate;
pub mod token;
pub mod zone;

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use etcd_client::Client;
use fedmesh_api::{DEFAULT_PREFIX, KeySpace};
use fedmesh_zone::{EtcdAccess, EtcdTls, GlobalZone};

#[derive(Args, Debug, Clone)]
pub struct EtcdFlags {
    /// etcd endpoints of the global zone, comma-separated. https:// needs
    /// --etcd-cacert; http:// (no TLS) is accepted only for an etcd on
    /// loopback.
    #[arg(
        long,
        env = "FEDMESH_ETCD",
        value_delimiter = ',',
        default_value = "https://127.0.0.1:2379"
    )]
    pub etcd: Vec<String>,
    /// PEM of the CA that signed etcd's server certificate.
    #[arg(long, env = "FEDMESH_ETCD_CACERT")]
    pub etcd_cacert: Option<std::path::PathBuf>,
    /// PEM client certificate for etcd (with --client-cert-auth).
    #[arg(long, env = "FEDMESH_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// PEM key of --etcd-cert.
    #[arg(long, env = "FEDMESH_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<std::path::PathBuf>,
    /// etcd user with rights to register clusters (needed when etcd runs with auth).
    #[arg(long, env = "FEDMESH_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// Password of --etcd-user. A flag is visible to every user of this
    /// machine in `ps`: prefer FEDMESH_ETCD_PASSWORD or --etcd-password-file.
    #[arg(long, env = "FEDMESH_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// A file holding the password of --etcd-user (one line).
    #[arg(
        long,
        env = "FEDMESH_ETCD_PASSWORD_FILE",
        conflicts_with = "etcd_password"
    )]
    pub etcd_password_file: Option<std::path::PathBuf>,
    /// Key prefix of the global zone.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// The federation anchor: its private key signs cluster records and
    /// policies, its public key is what every value read is checked
    /// against [default: $HOME/.fedmesh/anchor].
    #[arg(long, env = "FEDMESH_ANCHOR_DIR")]
    pub anchor_dir: Option<std::path::PathBuf>,
    /// Also believe unsigned values: to read or adopt a federation created
    /// before records were signed.
    #[arg(long)]
    pub trust_unsigned: bool,
}

impl EtcdFlags {
    /// The password: the flag's or the environment's, or the file's.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        if let Some(p) = &self.etcd_password {
            return Ok(Some(p.clone()));
        }
        let Some(file) = &self.etcd_password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--etcd-password-file {}", file.display()))?;
        let password = text.trim_end_matches(['\n', '\r']);
        anyhow::ensure!(
            !password.is_empty(),
            "--etcd-password-file {}: the file is empty",
            file.display()
        );
        Ok(Some(password.to_owned()))
    }
}

impl EtcdFlags {
    /// The access these flags describe: endpoints, the operator's
    /// credentials, TLS files.
    pub fn access(&self) -> anyhow::Result<EtcdAccess> {
        let password = match &self.etcd_user {
            Some(_) => self.password()?,
            None => None,
        };
        Ok(EtcdAccess {
            endpoints: self.etcd.clone(),
            prefix: self.prefix.clone(),
            user: self.etcd_user.clone(),
            password,
            tls: self.etcd_cacert.as_ref().map(|ca| EtcdTls {
                ca: ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            }),
        })
    }
}

/// The global zone behind `flags`, checked to answer.
pub async fn connect(flags: &EtcdFlags) -> anyhow::Result<GlobalZone> {
    let opts = fedmesh_zone::connect_options(&flags.access()?, Duration::from_secs(5))?
        .with_timeout(Duration::from_secs(10));
    let endpoints = flags.etcd.join(",");
    let mut client = Client::connect(&flags.etcd, Some(opts))
        .await
        .with_context(|| format!("connecting to etcd at {endpoints}"))?;
    // The client connects lazily; ask once so that an unreachable etcd is
    // reported as such, before anything else is attempted.
    let status = client
        .status()
        .await
        .with_context(|| format!("connecting to etcd at {endpoints}"))?;
    if let Some(warning) = fedmesh_zone::rbac_advisories(status.version()) {
        eprintln!("warning: {warning}");
    }
    let zone = GlobalZone::new(client, KeySpace::new(&flags.prefix));
    with_anchor(zone, flags)
}

/// `zone`, signing with the anchor in `--anchor-dir` when its private key is
/// there, or believing its public key only; `--trust-unsigned` adds
/// unsigned values.
pub fn with_anchor(zone: GlobalZone, flags: &EtcdFlags) -> anyhow::Result<GlobalZone> {
    use fedmesh_seal::{ANCHOR_KEY_FILE, ANCHOR_PUB_FILE, AnchorKey, AnchorPublic};
    let dir = flags.anchor_dir.clone().unwrap_or_else(anchor::default_dir);
    let (key, public) = (dir.join(ANCHOR_KEY_FILE), dir.join(ANCHOR_PUB_FILE));
    let mut zone = if key.exists() {
        zone.with_anchor(std::sync::Arc::new(AnchorKey::load(&key)?))
    } else if public.exists() {
        let trust = fedmesh_zone::gate::GateConfig {
            anchors: vec![AnchorPublic::load(&public)?],
            ..zone.trust().clone()
        };
        zone.trusting(trust)
    } else if flags.trust_unsigned {
        zone
    } else {
        anyhow::bail!(
            "no federation anchor in {}: create one (fedmesh anchor init), point --anchor-dir \
             (FEDMESH_ANCHOR_DIR) at it, or read an unsigned federation with --trust-unsigned",
            dir.display()
        );
    };
    if flags.trust_unsigned {
        let trust = fedmesh_zone::gate::GateConfig {
            trust_unsigned: true,
            ..zone.trust().clone()
        };
        zone = zone.trusting(trust);
    }
    Ok(zone)
}

/// A duration flag: `90s`, `15m`, `24h`, `7d`.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}
