//! `fedmesh register cluster` and `fedmesh deregister cluster`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use clap::Args;
use fedmesh_api::{ClusterRecord, EgressMode, GatewayAddress, validate_label};
use fedmesh_trust::{CaOptions, ClusterCa, TrustDomain};
use fedmesh_zone::EtcdTls;
use fedmesh_zone::RegisterOutcome;
use fedmesh_zone::client::cluster_role;
use fedmesh_zone::join::{EtcdAccess, JoinDir};

use super::{EtcdFlags, connect};

#[derive(Args, Debug)]
pub struct RegisterCluster {
    /// Cluster name: an RFC 1123 label (lowercase letters, digits, '-'; at most 63).
    name: String,
    /// Cloud the cluster runs in (aws, gcp, azure, onprem, ...).
    #[arg(long)]
    cloud: String,
    /// Region within the cloud (us-east-1, europe-west1, ...).
    #[arg(long)]
    region: String,
    /// Zones of the cluster, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    zones: Vec<String>,
    /// East-west gateway addresses peers dial, host:port, comma-separated.
    #[arg(long = "gateway", value_delimiter = ',', required = true)]
    gateways: Vec<String>,
    /// SPIFFE trust domain of the cluster [default: <name>.fedmesh].
    #[arg(long)]
    trust_domain: Option<String>,
    /// Extra labels, key=value (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// How the cluster's proxies reach other clusters: `direct` (QUIC
    /// straight to their gateways) or `gateway` (through a local egress
    /// gateway, for workloads that may not reach other clouds).
    #[arg(long, default_value = "direct", value_parser = str::parse::<EgressMode>)]
    egress: EgressMode,
    /// Import an existing CA certificate (PEM) instead of creating one.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The private key (PEM) of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The cluster's own etcd client certificate (PEM), copied into the join
    /// directory, for an etcd that asks for client certificates. With etcd
    /// auth its CN must be the cluster's etcd user (fedmesh-cluster-<name>):
    /// etcd takes the CN as the user of a request without a password.
    #[arg(long, requires = "cluster_etcd_key")]
    cluster_etcd_cert: Option<PathBuf>,
    /// The key (PEM) of --cluster-etcd-cert.
    #[arg(long, requires = "cluster_etcd_cert")]
    cluster_etcd_key: Option<PathBuf>,
    /// Where to write the join directory [default: ./fedmesh-join-<name>].
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    etcd: EtcdFlags,
}

pub struct Plan {
    pub record: ClusterRecord,
    pub trust_domain: TrustDomain,
    pub out: PathBuf,
}

pub fn plan(args: &RegisterCluster) -> anyhow::Result<Plan> {
    validate_label("cluster name", &args.name)?;
    let td_name = args
        .trust_domain
        .clone()
        .unwrap_or_else(|| format!("{}.fedmesh", args.name));
    let trust_domain =
        TrustDomain::new(&td_name).with_context(|| format!("--trust-domain {td_name:?}"))?;
    let gateways = args
        .gateways
        .iter()
        .map(|g| g.parse::<GatewayAddress>())
        .collect::<Result<Vec<_>, _>>()
        .context("--gateway")?;
    let mut labels = std::collections::BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?}: expected key=value"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    let record = ClusterRecord {
        name: args.name.clone(),
        cloud: args.cloud.clone(),
        region: args.region.clone(),
        zones: args.zones.clone(),
        trust_domain: trust_domain.to_string(),
        gateways,
        labels,
        registered_at: time::OffsetDateTime::now_utc(),
        egress: args.egress,
    };
    record.validate()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("fedmesh-join-{}", args.name)));
    Ok(Plan {
        record,
        trust_domain,
        out,
    })
}

fn load_or_create_ca(args: &RegisterCluster, plan: &Plan) -> anyhow::Result<ClusterCa> {
    if let (Some(cert), Some(key)) = (&args.ca_cert, &args.ca_key) {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        return Ok(ClusterCa::from_pem(
            &plan.trust_domain,
            &read(cert)?,
            &read(key)?,
            &cert.display().to_string(),
            &key.display().to_string(),
        )?);
    }
    if let Some(ca) = JoinDir::existing_ca(&plan.out, &plan.trust_domain) {
        return Ok(ca);
    }
    Ok(ClusterCa::generate(
        &plan.trust_domain,
        &CaOptions::default(),
        SystemTime::now(),
    )?)
}

pub async fn register(args: RegisterCluster) -> anyhow::Result<()> {
    let plan = plan(&args)?;
    let ca = load_or_create_ca(&args, &plan)?;
    let mut zone = connect(&args.etcd).await?;
    let what = || format!("registering cluster {:?}", plan.record.name);
    // Conflicts first: a refused registration must not replace the join
    // directory (and the CA key in it).
    zone.check_registration(&plan.record, &ca)
        .await
        .with_context(what)?;

    // With auth, the cluster gets its own etcd user, allowed to write only its keys.
    let mut access = EtcdAccess {
        endpoints: args.etcd.etcd.clone(),
        prefix: zone.keys().prefix().to_owned(),
        user: None,
        password: None,
        tls: cluster_tls(&args, &plan.record.name)?,
    };
    // A cluster with its own client certificate is known to etcd by it
    // (its CN): no password to keep, and its controller starts even while
    // etcd is away (a password is exchanged for a token at connect).
    let by_certificate = access.tls.as_ref().is_some_and(|t| t.cert.is_some());
    if args.etcd.etcd_user.is_some() && !by_certificate {
        let previous = JoinDir::existing_etcd(&plan.out).and_then(|e| e.password);
        access.user = Some(cluster_role(&plan.record.name));
        access.password = Some(match previous {
            Some(p) => p,
            None => fedmesh_trust::random_hex(18)?,
        });
    }
    let join = JoinDir {
        cluster: plan.record.clone(),
        etcd: access,
        ca,
        anchor: zone.trust().anchors.first().cloned(),
    };
    // The CA key is on disk before its root is published: a bundle in etcd
    // whose key is nowhere would lock the cluster out of its own name.
    join.write(&plan.out)
        .with_context(|| format!("writing the join directory {}", plan.out.display()))?;
    let outcome = zone
        .register(&plan.record, &join.ca)
        .await
        .with_context(what)?;
    // The record as signed, for the cluster's controller to write back if
    // the zone ever loses it.
    let ck = zone.keys().cluster(&plan.record.name);
    if let Some(signed) = zone.stored(&ck).await? {
        JoinDir::save_signed_record(&plan.out, &signed)
            .with_context(|| format!("writing the join directory {}", plan.out.display()))?;
    }
    if args.etcd.etcd_user.is_some() {
        zone.ensure_cluster_access(
            &plan.record.name,
            &plan.record.trust_domain,
            join.etcd.password.as_deref(),
        )
        .await
        .context("creating the cluster's etcd user and role")?;
    }

    let verb = match outcome {
        RegisterOutcome::Created => "registered",
        RegisterOutcome::Updated => "updated",
        RegisterOutcome::Unchanged => "already registered, unchanged:",
    };
    println!(
        "cluster {} {verb} (trust domain {}, {} zone(s), {} gateway(s))",
        plan.record.name,
        plan.record.trust_domain,
        plan.record.zones.len(),
        plan.record.gateways.len()
    );
    println!("join directory: {}", plan.out.display());
    println!(
        "next: fedmesh-controller --join {} --registry <services.yaml> --state-dir /var/lib/fedmesh/{}",
        plan.out.display(),
        plan.record.name
    );
    Ok(())
}

/// The TLS files the cluster's controller reaches etcd with: the operator's
/// CA, and the cluster's own client certificate, never the operator's
/// (whose CN would give the cluster the operator's rights).
fn cluster_tls(args: &RegisterCluster, name: &str) -> anyhow::Result<Option<EtcdTls>> {
    let Some(ca) = &args.etcd.etcd_cacert else {
        anyhow::ensure!(
            args.cluster_etcd_cert.is_none(),
            "--cluster-etcd-cert needs TLS to etcd: give --etcd-cacert and https:// endpoints"
        );
        return Ok(None);
    };
    let (cert, key) = match (&args.cluster_etcd_cert, &args.cluster_etcd_key) {
        (Some(c), Some(k)) => (c, k),
        _ if args.etcd.etcd_cert.is_some() => anyhow::bail!(
            "etcd asks for client certificates (you gave --etcd-cert): give the cluster its own \
             with --cluster-etcd-cert and --cluster-etcd-key; yours would carry your rights"
        ),
        _ => {
            return Ok(Some(EtcdTls {
                ca: ca.clone(),
                cert: None,
                key: None,
            }));
        }
    };
    if args.etcd.etcd_user.is_some() {
        let want = cluster_role(name);
        let cn = common_name(cert)?;
        anyhow::ensure!(
            cn.as_deref() == Some(want.as_str()),
            "--cluster-etcd-cert {}: its CN is {:?}, but the cluster's etcd user is {want:?}; \
             etcd takes the CN as the user of a request without a password",
            cert.display(),
            cn.unwrap_or_default()
        );
    }
    Ok(Some(EtcdTls {
        ca: ca.clone(),
        cert: Some(cert.clone()),
        key: Some(key.clone()),
    }))
}

/// The subject CN of the first certificate in a PEM file.
fn common_name(path: &Path) -> anyhow::Result<Option<String>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", path.display()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("{}: not an X.509 certificate: {e}", path.display()))?;
    Ok(cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned))
}

pub async fn deregister(name: &str, flags: &EtcdFlags) -> anyhow::Result<()> {
    validate_label("cluster name", name)?;
    let mut zone = connect(flags).await?;
    let record = zone
        .deregister(name)
        .await
        .with_context(|| format!("deregistering cluster {name:?}"))?;
    if flags.etcd_user.is_some() {
        zone.remove_cluster_access(name)
            .await
            .context("removing the cluster's etcd user and role")?;
    }
    println!(
        "cluster {name} deregistered (trust domain {} and its exports removed)",
        record.trust_domain
    );
    Ok(())
}
