//! Rotation end to end: the renewal driver on tokio's virtual clock, and
//! continuous real handshakes through a CA rotation of both trust domains.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::*;
use fedmesh_test_support::eventually;
use fedmesh_trust::{
    AllowAnyVerified, Authority, BundleSet, CaOptions, Clock, ClusterCa, RenewError, RenewalPolicy,
    RotationPhase, RotationPolicy, SpiffeId, Svid, SvidPolicy, SvidSource, SystemClock,
    spawn_renewer,
};

/// Wall-clock time that follows tokio's (paused) clock.
#[derive(Clone)]
struct VirtualClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl VirtualClock {
    fn new() -> Self {
        Self {
            base: SystemTime::now(),
            start: tokio::time::Instant::now(),
        }
    }
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

/// Issues from a shared authority; can be told to fail.
#[derive(Clone)]
struct LocalSource<C> {
    authority: Arc<Mutex<Authority>>,
    id: SpiffeId,
    clock: C,
    failing: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<SystemTime>>>,
}

impl<C: Clock + Clone> LocalSource<C> {
    fn new(authority: Arc<Mutex<Authority>>, id: SpiffeId, clock: C) -> Self {
        Self {
            authority,
            id,
            clock,
            failing: Arc::new(AtomicBool::new(false)),
            attempts: Arc::default(),
        }
    }

    fn issue_now(&self) -> Svid {
        self.authority
            .lock()
            .unwrap()
            .issue(&self.id, self.clock.now())
            .unwrap()
    }
}

impl<C: Clock + Clone> SvidSource for LocalSource<C> {
    async fn fetch(&self) -> Result<Svid, RenewError> {
        let now = self.clock.now();
        self.attempts.lock().unwrap().push(now);
        if self.failing.load(Ordering::SeqCst) {
            return Err(RenewError("CA unreachable (injected)".into()));
        }
        let mut auth = self.authority.lock().unwrap();
        auth.poll(now);
        auth.issue(&self.id, now).map_err(|e| RenewError(e.into()))
    }
}

fn authority(
    td: &str,
    svid: SvidPolicy,
    rotation: RotationPolicy,
    now: SystemTime,
) -> Arc<Mutex<Authority>> {
    let td = fedmesh_trust::TrustDomain::new(td).unwrap();
    let ca = ClusterCa::generate(&td, &CaOptions::default(), now).unwrap();
    Arc::new(Mutex::new(Authority::new(ca, svid, rotation, now)))
}

#[tokio::test(start_paused = true)]
async fn renewal_happens_at_half_life_and_failures_keep_the_valid_svid_with_capped_backoff() {
    let clock = VirtualClock::new();
    let hour = Duration::from_secs(3600);
    let auth = authority(
        "aws.fedmesh.test",
        SvidPolicy {
            lifetime: hour,
            clock_skew: Duration::from_secs(5 * 60),
        },
        RotationPolicy::default(),
        clock.now(),
    );
    let id = SpiffeId::parse("spiffe://aws.fedmesh.test/ns/shop/sa/web").unwrap();
    let source = LocalSource::new(auth, id, clock.clone());
    let initial = source.issue_now();
    let initial_leaf = initial.leaf().clone();
    let policy = RenewalPolicy {
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(16),
    };
    let (mut rx, task) = spawn_renewer(source.clone(), initial, policy, clock.clone());

    // 1. First renewal at half of the validity window: 60 min + 5 min of
    //    backdating for skew gives a window of 65 min, half of it 32.5 min,
    //    which is 27.5 min after issue.
    rx.changed().await.unwrap();
    let at = clock.elapsed();
    assert!(
        at >= Duration::from_secs(27 * 60) && at <= Duration::from_secs(28 * 60),
        "{at:?}"
    );
    let second = rx.borrow_and_update().clone();
    assert_ne!(second.leaf(), &initial_leaf);

    // 2. The CA becomes unreachable at the next renewal.
    source.failing.store(true, Ordering::SeqCst);
    let attempts_before = source.attempts.lock().unwrap().len();
    eventually(
        "eight failed attempts",
        Duration::from_secs(3 * 3600),
        || {
            let n = source.attempts.lock().unwrap().len();
            async move { (n >= attempts_before + 8).then_some(()) }
        },
    )
    .await;
    let attempts = source.attempts.lock().unwrap()[attempts_before..].to_vec();
    let gaps: Vec<u128> = attempts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap().as_millis())
        .collect();
    // Each step doubles up to the cap; jitter puts the wait between half
    // and all of the step.
    for (gap, step) in gaps
        .iter()
        .zip([1000u128, 2000, 4000, 8000, 16000, 16000, 16000])
    {
        assert!(
            (step / 2..=step).contains(gap),
            "gaps {gaps:?}: backoff doubles up to the cap, with jitter"
        );
    }
    // Consumers kept the still-valid SVID throughout.
    assert!(!rx.has_changed().unwrap());
    assert_eq!(rx.borrow().leaf(), second.leaf());
    assert!(rx.borrow().is_valid_at(clock.now()));

    // 3. The CA comes back: the next retry succeeds and consumers move on.
    source.failing.store(false, Ordering::SeqCst);
    rx.changed().await.unwrap();
    assert_ne!(rx.borrow().leaf(), second.leaf());

    // 4. The task ends once nobody follows the channel.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(7200), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_source_returning_another_identity_is_treated_as_a_failure() {
    let clock = VirtualClock::new();
    let auth = authority(
        "aws.fedmesh.test",
        SvidPolicy {
            lifetime: Duration::from_secs(600),
            clock_skew: Duration::ZERO,
        },
        RotationPolicy::default(),
        clock.now(),
    );
    let ours = SpiffeId::parse("spiffe://aws.fedmesh.test/ns/shop/sa/web").unwrap();
    let other = SpiffeId::parse("spiffe://aws.fedmesh.test/ns/shop/sa/admin").unwrap();
    let initial = LocalSource::new(auth.clone(), ours, clock.clone()).issue_now();
    let leaf = initial.leaf().clone();
    let wrong = LocalSource::new(auth, other, clock.clone());
    let (rx, _task) = spawn_renewer(wrong.clone(), initial, RenewalPolicy::default(), clock);
    eventually("three renewal attempts", Duration::from_secs(3600), || {
        let n = wrong.attempts.lock().unwrap().len();
        async move { (n >= 3).then_some(()) }
    })
    .await;
    assert_eq!(rx.borrow().leaf(), &leaf);
    assert!(!rx.has_changed().unwrap());
}

/// Keeps publishing the union of both authorities' bundles.
fn publish(auths: &[&Arc<Mutex<Authority>>], tx: &tokio::sync::watch::Sender<Arc<BundleSet>>) {
    let mut set = BundleSet::new();
    for a in auths {
        let mut a = a.lock().unwrap();
        a.poll(SystemTime::now());
        set.insert(a.bundle());
    }
    tx.send_if_modified(|cur| {
        if **cur == set {
            false
        } else {
            *cur = Arc::new(set);
            true
        }
    });
}

fn root_subject(ca_der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(ca_der)
        .unwrap()
        .1
        .subject()
        .as_raw()
        .to_vec()
}

fn leaf_issuer(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der)
        .unwrap()
        .1
        .issuer()
        .as_raw()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_handshakes_through_a_ca_rotation_of_both_trust_domains_never_fail() {
    // Short, real lifetimes: certificate validity is checked against the
    // real clock inside rustls, so this test runs in real time (~10 s).
    let svid_policy = SvidPolicy {
        lifetime: Duration::from_secs(6),
        clock_skew: Duration::ZERO,
    };
    let rotation = RotationPolicy {
        propagation_delay: Duration::from_secs(1),
        refresh_hint: Duration::from_secs(1),
    };
    let now = SystemTime::now();
    let aws = authority(
        "aws.fedmesh.test",
        svid_policy.clone(),
        rotation.clone(),
        now,
    );
    let gcp = authority("gcp.fedmesh.test", svid_policy, rotation, now);
    let aws_old_root = root_subject(aws.lock().unwrap().active().cert_der());
    let gcp_old_root = root_subject(gcp.lock().unwrap().active().cert_der());

    let (bundles_tx, bundles_rx) = watch_of(BundleSet::new());
    publish(&[&aws, &gcp], &bundles_tx);

    let policy = RenewalPolicy {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    };
    let client_src = LocalSource::new(
        aws.clone(),
        SpiffeId::parse("spiffe://aws.fedmesh.test/ns/shop/sa/web").unwrap(),
        SystemClock,
    );
    let server_src = LocalSource::new(
        gcp.clone(),
        SpiffeId::parse("spiffe://gcp.fedmesh.test/fedmesh/gateway/gcp-1").unwrap(),
        SystemClock,
    );
    let (client_svid, _ct) = spawn_renewer(
        client_src.clone(),
        client_src.issue_now(),
        policy.clone(),
        SystemClock,
    );
    let (server_svid, _st) = spawn_renewer(
        server_src.clone(),
        server_src.issue_now(),
        policy,
        SystemClock,
    );

    // Configs are built once; everything after this is picked up live.
    let server_cfg = server(&server_svid, &bundles_rx, Arc::new(AllowAnyVerified));
    let client_cfg = client(&client_svid, &bundles_rx, Arc::new(AllowAnyVerified));

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let server_issuers = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let client_issuers = Arc::new(Mutex::new(std::collections::HashSet::new()));

    let load = {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let (server_issuers, client_issuers) = (server_issuers.clone(), client_issuers.clone());
        let client_svid = client_svid.clone();
        tokio::spawn(async move {
            // Bounded: stops on the flag, or after 10 000 handshakes.
            for _ in 0..10_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let presented = client_svid.borrow().leaf().clone();
                let out = connect(server_cfg.clone(), client_cfg.clone()).await;
                if out.ok() {
                    ok.fetch_add(1, Ordering::SeqCst);
                    server_issuers
                        .lock()
                        .unwrap()
                        .insert(leaf_issuer(out.server_leaf.as_ref().unwrap()));
                    client_issuers
                        .lock()
                        .unwrap()
                        .insert(leaf_issuer(&presented));
                } else {
                    failures.lock().unwrap().push(format!("{out:?}"));
                }
            }
        })
    };

    let publisher = {
        let (aws, gcp, stop) = (aws.clone(), gcp.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                publish(&[&aws, &gcp], &bundles_tx);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Steady traffic first.
    eventually(
        "handshakes before rotation",
        Duration::from_secs(20),
        || {
            let n = ok.load(Ordering::SeqCst);
            async move { (n >= 20).then_some(()) }
        },
    )
    .await;

    // Rotate both trust domains.
    let (aws_new_root, gcp_new_root) = {
        let now = SystemTime::now();
        let rotate = |a: &Arc<Mutex<Authority>>| {
            let mut a = a.lock().unwrap();
            let next = ClusterCa::generate(a.trust_domain(), &CaOptions::default(), now).unwrap();
            let subject = root_subject(next.cert_der());
            a.begin_rotation(next, now).unwrap();
            subject
        };
        (rotate(&aws), rotate(&gcp))
    };

    // Wait until both rotations are complete: old roots gone from the bundles.
    eventually("both rotations to finish", Duration::from_secs(30), || {
        let done = [&aws, &gcp].iter().all(|a| {
            let a = a.lock().unwrap();
            a.phase() == RotationPhase::Steady && a.bundle().roots().len() == 1
        }) && bundles_rx.borrow().iter().all(|b| b.roots().len() == 1);
        async move { done.then_some(()) }
    })
    .await;
    // And traffic continues on new roots only.
    let after = ok.load(Ordering::SeqCst);
    eventually("handshakes after rotation", Duration::from_secs(20), || {
        let n = ok.load(Ordering::SeqCst);
        async move { (n >= after + 20).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    publisher.await.unwrap();

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed handshakes, first: {}",
        failures.len(),
        failures[0]
    );
    let total = ok.load(Ordering::SeqCst);
    assert!(total >= 40, "only {total} handshakes");
    // Both old and new roots really carried traffic on both sides.
    let s = server_issuers.lock().unwrap();
    assert!(
        s.contains(&gcp_old_root) && s.contains(&gcp_new_root),
        "server leaves from both gcp roots"
    );
    let c = client_issuers.lock().unwrap();
    assert!(
        c.contains(&aws_old_root) && c.contains(&aws_new_root),
        "client leaves from both aws roots"
    );
    eprintln!("{total} handshakes through the rotation, 0 failures");
}
