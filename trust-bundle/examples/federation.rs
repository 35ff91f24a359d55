//! Identity federation, end to end, on loopback.
//!
//! Three clusters each create an independent CA. They exchange bundle
//! documents (never keys), then an aws workload and a gcp gateway complete
//! mutual TLS across trust domains. A certificate minted by gcp's CA for an
//! aws identity is refused. Finally aws rotates its CA under continuous
//! handshakes, and the demo counts failures (there should be none).
//!
//! Run: `scripts/main.sh` (or `cargo run -p fedmesh-trust --example federation`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use fedmesh_trust::tls::ALPN_TUNNEL;
use fedmesh_trust::{
    AllowAnyVerified, Authority, Bundle, BundleSet, CaOptions, ClusterCa, RotationPhase,
    RotationPolicy, SpiffeId, SvidPolicy, TrustDomain,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    fedmesh_trust::install_default_provider();
    let state = tempfile::Builder::new().prefix("fedmesh-demo-").tempdir()?;
    let now = SystemTime::now();
    // Short lifetimes so that a whole rotation fits in a few seconds.
    let svid_policy = SvidPolicy {
        lifetime: Duration::from_secs(6),
        clock_skew: Duration::ZERO,
    };
    let rotation = RotationPolicy {
        propagation_delay: Duration::from_secs(1),
        refresh_hint: Duration::from_secs(1),
    };

    println!(
        "1. Each cluster creates its own CA (state in {})",
        state.path().display()
    );
    let mut authorities = Vec::new();
    for name in ["aws", "gcp", "azure"] {
        let td = TrustDomain::new(&format!("{name}.fedmesh.demo"))?;
        let ca = ClusterCa::generate(&td, &CaOptions::default(), now)?;
        let dir = state.path().join(name);
        ca.save(&dir)?;
        println!(
            "   {td:<20} root saved to {}/ca.{{crt,key}} (0600)",
            dir.display()
        );
        authorities.push(Arc::new(Mutex::new(Authority::new(
            ClusterCa::load(&dir, &td)?,
            svid_policy.clone(),
            rotation.clone(),
            now,
        ))));
    }
    let [aws, gcp, _azure] = [0, 1, 2].map(|i| authorities[i].clone());

    println!("2. Clusters exchange bundle documents, never keys");
    let bundles = exchange(&authorities)?;
    for b in bundles.iter() {
        println!(
            "   {:<20} {} root(s), sequence {}",
            b.trust_domain(),
            b.roots().len(),
            b.sequence
        );
    }
    let (bundles_tx, bundles_rx) = watch::channel(Arc::new(bundles));

    let web = SpiffeId::parse("spiffe://aws.fedmesh.demo/ns/shop/sa/web")?;
    let gw = SpiffeId::parse("spiffe://gcp.fedmesh.demo/fedmesh/gateway/gcp-1")?;
    let (client_svid_tx, client_svid) = watch::channel(Arc::new(issue(&aws, &web)?));
    let (server_svid_tx, server_svid) = watch::channel(Arc::new(issue(&gcp, &gw)?));
    let server_cfg = Arc::new(fedmesh_trust::server_config(
        server_svid,
        bundles_rx.clone(),
        Arc::new(AllowAnyVerified),
        &[ALPN_TUNNEL],
    )?);
    let client_cfg = Arc::new(fedmesh_trust::client_config(
        client_svid,
        bundles_rx.clone(),
        Arc::new(AllowAnyVerified),
        &[ALPN_TUNNEL],
    )?);

    // The gcp gateway listens on gcp's loopback block.
    let listener = TcpListener::bind("127.0.2.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4];
                if tls.read_exact(&mut buf).await.is_ok() {
                    let _ = tls.write_all(b"pong").await;
                }
            });
        }
    });

    println!("3. aws workload -> gcp gateway, mutual TLS across trust domains");
    let seen = handshake(addr, client_cfg.clone()).await?;
    println!(
        "   client verified server as {}, key exchange {}",
        seen.0, seen.1
    );

    println!("4. gcp's CA mints a certificate claiming an aws identity");
    let forged =
        gcp.lock()
            .map_err(poisoned)?
            .active()
            .issue(&web, &svid_policy, SystemTime::now());
    match forged {
        Err(e) => println!("   ClusterCa refuses to issue it: {e}"),
        Ok(_) => bail!("a CA issued an identity outside its trust domain"),
    }

    println!("5. aws rotates its CA while the workload keeps connecting");
    let started = Instant::now();
    {
        let mut a = aws.lock().map_err(poisoned)?;
        let td = a.trust_domain().clone();
        a.begin_rotation(
            ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now())?,
            SystemTime::now(),
        )?;
    }
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut last_phase = None;
    // Bounded: at most 30 s, one handshake every 50 ms.
    while started.elapsed() < Duration::from_secs(30) {
        let now = SystemTime::now();
        // What each cluster's controller does: advance rotations, republish
        // bundles, renew SVIDs at half-life.
        bundles_tx.send_replace(Arc::new(exchange(&authorities)?));
        renew_if_due(&aws, &web, &client_svid_tx, now)?;
        renew_if_due(&gcp, &gw, &server_svid_tx, now)?;
        let phase = aws.lock().map_err(poisoned)?.phase();
        if last_phase.as_ref() != Some(&phase) {
            let roots = bundles_rx
                .borrow()
                .get(&TrustDomain::new("aws.fedmesh.demo")?)
                .map_or(0, |b| b.roots().len());
            println!(
                "   t={:>4.1}s {:<40} aws bundle: {roots} root(s)",
                started.elapsed().as_secs_f64(),
                describe(&phase)
            );
            if phase == RotationPhase::Steady && last_phase.is_some() {
                break;
            }
            last_phase = Some(phase);
        }
        match handshake(addr, client_cfg.clone()).await {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                eprintln!("   handshake failed: {e:#}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("   {ok} handshakes during the rotation, {failed} failed");
    if failed > 0 {
        bail!("handshakes failed during the rotation");
    }
    println!("done: identities federated, forgeries refused, rotation without a failed handshake");
    Ok(())
}

fn poisoned<T>(_: T) -> anyhow::Error {
    anyhow::anyhow!("authority lock poisoned")
}

fn issue(a: &Mutex<Authority>, id: &SpiffeId) -> anyhow::Result<fedmesh_trust::Svid> {
    Ok(a.lock().map_err(poisoned)?.issue(id, SystemTime::now())?)
}

fn renew_if_due(
    a: &Mutex<Authority>,
    id: &SpiffeId,
    tx: &watch::Sender<Arc<fedmesh_trust::Svid>>,
    now: SystemTime,
) -> anyhow::Result<()> {
    if tx.borrow().renew_at() <= now {
        tx.send_replace(Arc::new(issue(a, id)?));
    }
    Ok(())
}

/// Every cluster encodes its bundle as a SPIFFE bundle document; every other
/// cluster decodes it. This is what travels through etcd.
fn exchange(authorities: &[Arc<Mutex<Authority>>]) -> anyhow::Result<BundleSet> {
    let mut set = BundleSet::new();
    for a in authorities {
        let mut a = a.lock().map_err(poisoned)?;
        a.poll(SystemTime::now());
        let doc = a.bundle().to_document();
        let key = format!("bundles/{}", a.trust_domain());
        set.insert(Bundle::from_document(
            a.trust_domain().clone(),
            doc.as_bytes(),
            &key,
        )?);
    }
    Ok(set)
}

fn describe(phase: &RotationPhase) -> &'static str {
    match phase {
        RotationPhase::Steady => "steady: one root signs",
        RotationPhase::Publishing { .. } => "publishing: new root in bundle, old signs",
        RotationPhase::Retiring { .. } => "retiring: new root signs, old kept",
    }
}

async fn handshake(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> anyhow::Result<(SpiffeId, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("gcp-gateway.fedmesh.invalid")?;
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf)
        .await
        .context("server closed the connection")?;
    let conn = tls.get_ref().1;
    let id = fedmesh_trust::peer_spiffe_id(conn.peer_certificates()).context("no peer ID")?;
    let group = conn
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
        .unwrap_or_default();
    Ok((id, group))
}
