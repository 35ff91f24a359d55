//! A proxy that takes its SVID, bundles and services from its cluster's
//! real controller (over a real etcd), with real gateways between clusters:
//! it follows a health change in its registry to another cluster, keeps
//! serving unchanged once its controller is gone, keeps serving remote
//! clusters whose controllers and etcd are gone (unverified is not
//! unhealthy), and applies changes around a poisoned export.

#![allow(clippy::unwrap_used)]

use fedmesh_testbed::proxy as support;

use std::net::SocketAddr;
use std::time::Duration;

use fedmesh_discovery::{ClientPolicy, ControllerAccess, Discovered};
use fedmesh_proto::discovery::v1::Scope;
use fedmesh_proxy::Proxy;
use fedmesh_proxy::config::{Common, Listen, Settings};
use fedmesh_proxy::table::Table;
use fedmesh_test_support::{Etcd, eventually};
use fedmesh_trust::{BundleSet, SpiffeId};
use support::gw::sites::{ALIVE_TTL, WEB_TOKEN, fake_kube, policy, set_service, site, site_with};
use support::{Backend, Load, get, me};

const CART: &str = "cart.shop";

/// A proxy of `site` (zone az1) that takes everything from its controller.
async fn discovery_proxy(site: &support::gw::sites::Site) -> (Discovered<Table>, Proxy) {
    discovery_proxy_in(site, Scope::All).await
}

/// A proxy of `site` that asks its controller for `scope`; with a listed
/// scope, services come on demand.
async fn discovery_proxy_in(
    site: &support::gw::sites::Site,
    scope: Scope,
) -> (Discovered<Table>, Proxy) {
    let d = &site.reg.domain;
    let access = ControllerAccess {
        address: site.reg.controller.as_ref().unwrap().discovery_addr,
        controller: SpiffeId::controller(&d.td, &d.cluster).unwrap(),
        identity: SpiffeId::workload(&d.td, "shop", "web").unwrap(),
        credential: fedmesh_discovery::Credential::JoinToken(WEB_TOKEN.into()),
        node: format!("{}-proxy", d.cluster),
    };
    let mut bootstrap = BundleSet::new();
    bootstrap.insert(site.reg.own_bundle.clone());
    let here = me(d, "az1");
    let discovered = {
        let here = here.clone();
        let policy = ClientPolicy { scope, ..policy() };
        // As the binary builds it: the cluster's registration says how
        // remote clusters are reached (direct: QUIC to their gateways).
        fedmesh_discovery::start(access, bootstrap, policy, move |m, b| {
            fedmesh_proxy::discovered::table(&here, &Settings::default(), m, b)
        })
        .await
        .unwrap()
    };
    let common = Common {
        me: here,
        listen: Listen {
            http: Some(SocketAddr::new(d.ip(5), 0)),
            tcp: vec![],
            admin: None,
        },
        gateways: vec![site.gateway.egress_addr().unwrap()],
        settings: Settings::default(),
    };
    let extras = fedmesh_proxy::Extras {
        on_demand: (scope == Scope::Listed).then(|| discovered.on_demand.clone()),
        ..Default::default()
    };
    let proxy = Proxy::start_with(
        &common,
        discovered.config.clone(),
        discovered.svid.clone(),
        discovered.bundles.clone(),
        extras,
    )
    .await
    .unwrap();
    (discovered, proxy)
}

/// A scoped proxy holds nothing at first; the first request for a service
/// brings it on demand, a name nobody exports is a prompt 404, and the
/// proxy never holds what it was not asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_proxy_learns_services_on_demand() {
    let etcd = Etcd::start().await.unwrap();
    let aws = site(&etcd, "aws", 61).await;
    let gcp = site(&etcd, "gcp", 62).await;
    let c = Backend::new(gcp.reg.domain.ip(10), "gcp", "az1", "cart").await;
    set_service(&gcp.reg, "cart", &[(c.addr, "az1", true)]);
    let p = Backend::new(gcp.reg.domain.ip(11), "gcp", "az1", "pay").await;
    set_service(&gcp.reg, "pay", &[(p.addr, "az1", true)]);
    // Both are in aws's controller's view before the proxy starts.
    let ctl = aws.reg.controller.as_ref().unwrap();
    let mut snaps = ctl.snapshots.clone();
    snaps
        .wait_for(|s| {
            s.as_ref()
                .is_some_and(|s| s.inputs.global.by_service.len() == 2)
        })
        .await
        .unwrap();
    let (discovered, proxy) = discovery_proxy_in(&aws, Scope::Listed).await;
    assert!(
        discovered.config.borrow().services.is_empty(),
        "nothing until asked"
    );
    let http = proxy.http.unwrap();

    let answer = get(http, "cart.shop").await.unwrap();
    assert_eq!(answer.cluster, "gcp", "served at its first request");
    let held: Vec<String> = discovered
        .config
        .borrow()
        .services
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(held, ["shop/cart"], "only what was asked for");

    // A name nobody exports: 404 as soon as the controller says so.
    let started = std::time::Instant::now();
    let err = get(http, "ghost.shop").await.unwrap_err();
    assert!(err.starts_with("404"), "{err}");
    assert!(
        started.elapsed() < Settings::default().on_demand_timeout,
        "answered by the controller, not the timeout: {:?}",
        started.elapsed()
    );
    // A subscribed service follows changes like any other.
    set_service(&gcp.reg, "cart", &[(c.addr, "az1", false)]);
    eventually(
        "cart's change to arrive",
        Duration::from_secs(10),
        || async {
            let t = discovered.config.borrow().clone();
            let cart = t
                .services
                .get(&fedmesh_api::ServiceKey::new("shop", "cart"))?;
            cart.targets.iter().all(|t| t.healthy == 0).then_some(())
        },
    )
    .await;
}

/// Static stability (ARCHITECTURE.md §3.1): gcp's and azure's controllers die, their
/// `alive` leases lapse, then etcd dies too. Their gateways and backends
/// are fine, so aws's proxy goes on serving from them, unchanged, for
/// three lease TTLs and more, and says they are unverified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_clusters_whose_controllers_and_etcd_are_gone_keep_serving() {
    let mut etcd = Etcd::start().await.unwrap();
    let aws = site(&etcd, "aws", 56).await;
    let mut gcp = site(&etcd, "gcp", 57).await;
    let mut azure = site(&etcd, "azure", 58).await;
    let g = Backend::new(gcp.reg.domain.ip(10), "gcp", "az1", "pay").await;
    set_service(&gcp.reg, "pay", &[(g.addr, "az1", true)]);
    let z = Backend::new(azure.reg.domain.ip(10), "azure", "az1", "pay").await;
    set_service(&azure.reg, "pay", &[(z.addr, "az1", true)]);
    let (discovered, proxy) = discovery_proxy(&aws).await;
    let http = proxy.http.unwrap();
    eventually("pay to be served", Duration::from_secs(20), || async {
        get(http, "pay.shop").await.ok()
    })
    .await;
    let load = Load::start(http, "pay.shop", 4, Duration::from_millis(2));
    load.until("answers from gcp", 20, |a| a.cluster == "gcp")
        .await;
    load.until("answers from azure", 20, |a| a.cluster == "azure")
        .await;

    gcp.reg.controller.take().unwrap().shutdown().await;
    azure.reg.controller.take().unwrap().shutdown().await;
    let mut status = discovered.status.clone();
    let lapsed = status
        .wait_for(|s| {
            let unverified = |c: &str| s.peers.iter().any(|p| p.cluster == c && !p.verified);
            unverified("gcp") && unverified("azure")
        })
        .await
        .unwrap()
        .clone();
    let gcp_seen = lapsed.peers.iter().find(|p| p.cluster == "gcp").unwrap();
    assert!(
        gcp_seen.last_seen.is_some(),
        "the last sighting is dated: {gcp_seen:?}"
    );
    etcd.kill();

    // Three lease TTLs and more with both remote controllers and etcd gone.
    let window = tokio::time::Instant::now();
    tokio::time::sleep(ALIVE_TTL * 4).await;
    let served: std::collections::BTreeSet<String> = load
        .answers_since(window)
        .into_iter()
        .map(|a| a.cluster)
        .collect();
    let (answers, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed GETs, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(answers.len() > 100, "steady load ran: {}", answers.len());
    assert_eq!(
        served,
        ["azure".to_string(), "gcp".to_string()].into(),
        "the serving clusters did not change"
    );
}

/// Someone writes an export of gcp's that no one can use (port 0), and
/// that gcp's signed manifest does not list. The controllers refuse it
/// where they read it, and a change to another service still reaches the
/// proxy and gateway of another cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_export_blocks_nothing_else() {
    let etcd = Etcd::start().await.unwrap();
    let aws = site(&etcd, "aws", 59).await;
    let gcp = site(&etcd, "gcp", 60).await;
    let g = Backend::new(gcp.reg.domain.ip(10), "gcp", "az1", "cart").await;
    set_service(&gcp.reg, "cart", &[(g.addr, "az1", true)]);
    let (discovered, proxy) = discovery_proxy(&aws).await;
    let http = proxy.http.unwrap();
    eventually("cart to be served", Duration::from_secs(20), || async {
        get(http, "cart.shop").await.ok()
    })
    .await;

    // As gcp's etcd role could write it.
    let poison = serde_json::json!({
        "ports": [0],
        "localities": [{"zone": "az1", "healthy": 1, "total": 1, "weight": 1}],
        "generation": 1
    });
    etcd.client()
        .await
        .unwrap()
        .put(
            fedmesh_api::KeySpace::default().export("gcp", "shop", "evil"),
            poison.to_string(),
            None,
        )
        .await
        .unwrap();
    let gw_version = aws.discovered.status.borrow().version.clone();
    let f = Backend::new(gcp.reg.domain.ip(11), "gcp", "az1", "fresh").await;
    set_service(&gcp.reg, "fresh", &[(f.addr, "az1", true)]);
    let answer = eventually("the unrelated service", Duration::from_secs(20), || async {
        get(http, "fresh.shop").await.ok()
    })
    .await;
    assert_eq!(answer.cluster, "gcp");
    assert!(
        get(http, "evil.shop").await.is_err(),
        "evil is never served"
    );
    assert!(discovered.status.borrow().rejected.is_empty());
    // aws's gateway moved on too (its peers and bundles stay current).
    let mut gw_status = aws.discovered.status.clone();
    gw_status
        .wait_for(|s| s.version != gw_version)
        .await
        .unwrap();
    let view = aws
        .reg
        .controller
        .as_ref()
        .unwrap()
        .snapshots
        .borrow()
        .clone()
        .unwrap();
    // Unsigned by gcp's manifest, it never reaches the view: the gate
    // refuses it, and the controller counts it.
    assert!(view.inputs.global.export("gcp", "shop", "evil").is_none());
    let ctl = aws.reg.controller.as_ref().unwrap();
    let refused = ctl.metrics.watch.refused.lock().unwrap().clone();
    assert!(
        refused.contains_key(&("export".into(), "gcp".into(), "FORGED".into())),
        "the controller reports the refused export: {refused:?}"
    );
}

/// Issue 26's attack, from inside the federation: azure's credentials
/// (here, a client that can write any key, which is what nested
/// transactions give a cluster's role on the etcd we install) rewrite gcp's
/// bundle with another root, move gcp's gateway, delete gcp's export and
/// the manifest that vouches for it, add a forged export and write a policy
/// that would send pay elsewhere. None of it is signed by whom it must be:
/// aws's proxy keeps every request of a steady load on gcp, no identity of
/// the attacker's root is trusted for gcp, and aws's controller counts each
/// forged record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_global_zone_moves_no_traffic() {
    use fedmesh_api::KeySpace;
    use fedmesh_seal::{AnchorKey, Signer, Statement, seal};
    use fedmesh_trust::{Bundle, CaOptions, ClusterCa};

    let etcd = Etcd::start().await.unwrap();
    let aws = site(&etcd, "aws", 63).await;
    let gcp = site(&etcd, "gcp", 64).await;
    let azure = site(&etcd, "azure", 65).await;
    let g = Backend::new(gcp.reg.domain.ip(10), "gcp", "az1", "pay").await;
    set_service(&gcp.reg, "pay", &[(g.addr, "az1", true)]);
    let (discovered, proxy) = discovery_proxy(&aws).await;
    let http = proxy.http.unwrap();
    eventually("pay to be served", Duration::from_secs(20), || async {
        get(http, "pay.shop").await.ok()
    })
    .await;
    let load = Load::start(http, "pay.shop", 4, Duration::from_millis(2));
    load.until("answers from gcp", 20, |a| a.cluster == "gcp")
        .await;
    let window = tokio::time::Instant::now();

    let keys = KeySpace::default();
    let gcp_td = gcp.reg.domain.td.clone();
    let attacker =
        ClusterCa::generate(&gcp_td, &CaOptions::default(), std::time::SystemTime::now()).unwrap();
    let rogue_anchor = AnchorKey::generate().unwrap();
    let forged_bundle = seal(
        Statement {
            subject: format!("bundles/{gcp_td}"),
            seq: u64::MAX / 2,
            value: Some(
                serde_json::from_str::<serde_json::Value>(
                    &Bundle::with_roots(gcp_td.clone(), [attacker.cert_der().clone()])
                        .to_document(),
                )
                .unwrap(),
            ),
            x5c: vec![],
            endorsements: vec![],
        },
        Signer::Root(&attacker),
    )
    .unwrap()
    .to_json();
    let mut record: serde_json::Value = serde_json::from_slice(
        etcd.client()
            .await
            .unwrap()
            .get(keys.cluster("azure"), None)
            .await
            .unwrap()
            .kvs()[0]
            .value(),
    )
    .unwrap();
    // azure's own signed record, copied over gcp's: refused for its subject.
    let copied = record.take();
    let policy = serde_json::json!({
        "apiVersion": "fedmesh.io/v1", "kind": "GlobalTrafficPolicy",
        "metadata": {"name": "evil"},
        "spec": {"service": "shop/pay", "failover": {"clusters": ["azure"]}}
    });
    let forged_policy = seal(
        Statement {
            subject: "policies/evil".into(),
            seq: u64::MAX / 2,
            value: Some(policy),
            x5c: vec![],
            endorsements: vec![],
        },
        Signer::Anchor(&rogue_anchor),
    )
    .unwrap()
    .to_json();
    let evil = serde_json::json!({
        "ports": [8080],
        "localities": [{"zone": "az1", "healthy": 9, "total": 9, "weight": 9}],
        "generation": 1
    });
    let mut c = etcd.client().await.unwrap();
    c.put(keys.bundle(gcp_td.as_str()), forged_bundle, None)
        .await
        .unwrap();
    c.put(keys.cluster("gcp"), copied.to_string(), None)
        .await
        .unwrap();
    c.put(keys.policy("evil"), forged_policy, None)
        .await
        .unwrap();
    c.put(keys.export("gcp", "shop", "evil"), evil.to_string(), None)
        .await
        .unwrap();
    c.delete(keys.export("gcp", "shop", "pay"), None)
        .await
        .unwrap();
    c.delete(keys.seen("gcp"), None).await.unwrap();

    // aws's controller sees every forgery and believes none of it.
    let ctl = aws.reg.controller.as_ref().unwrap();
    let refused = |kind: &str| {
        ctl.metrics
            .watch
            .refused
            .lock()
            .unwrap()
            .keys()
            .any(|(k, _, _)| k == kind)
    };
    eventually("every forgery refused", Duration::from_secs(10), || async {
        ["bundle", "cluster", "policy", "export"]
            .iter()
            .all(|k| refused(k))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let served: std::collections::BTreeSet<String> = load
        .answers_since(window)
        .into_iter()
        .map(|a| a.cluster)
        .collect();
    let (answers, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed GETs, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(answers.len() > 100, "steady load ran: {}", answers.len());
    assert_eq!(served, ["gcp".to_string()].into(), "traffic moved");
    // The attacker's root is trusted for gcp nowhere.
    let bundles = ctl.bundles.borrow().clone();
    let held = bundles.get(&gcp_td).unwrap();
    assert!(!held.roots().contains(attacker.cert_der()));
    assert!(
        get(http, "evil.shop").await.is_err(),
        "evil is never served"
    );
    assert!(
        discovered
            .config
            .borrow()
            .services
            .keys()
            .all(|k| k.name != "evil")
    );
    drop(azure);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_follows_its_controller_and_outlives_it() {
    let etcd = Etcd::start().await.unwrap();
    let mut aws = site(&etcd, "aws", 54).await;
    let gcp = site(&etcd, "gcp", 55).await;
    let g = Backend::new(gcp.reg.domain.ip(10), "gcp", "az1", "cart").await;
    set_service(&gcp.reg, "cart", &[(g.addr, "az1", true)]);
    let a = Backend::new(aws.reg.domain.ip(10), "aws", "az1", "cart").await;
    set_service(&aws.reg, "cart", &[(a.addr, "az1", true)]);

    // The proxy's only config: who it is and where its controller is.
    let (_discovered, proxy) = discovery_proxy(&aws).await;
    let http = proxy.http.unwrap();
    eventually("cart to be served", Duration::from_secs(20), || async {
        get(http, CART).await.ok()
    })
    .await;

    let load = Load::start(http, CART, 4, Duration::from_millis(2));
    load.until("answers from aws", 100, |a| a.cluster == "aws")
        .await;
    assert_eq!(load.count(|a| a.cluster != "aws"), 0);

    // aws's registry marks its endpoint unhealthy: the controller tells
    // the proxy, which moves to gcp through the gateways.
    set_service(&aws.reg, "cart", &[(a.addr, "az1", false)]);
    load.until("answers from gcp", 200, |a| a.cluster == "gcp")
        .await;

    // The controller goes away: traffic goes on, unchanged.
    let before = load.count(|_| true);
    aws.reg.controller.take().unwrap().shutdown().await;
    load.until("answers from gcp with the controller gone", 300, |a| {
        a.cluster == "gcp"
    })
    .await;
    let (answers, failures) = load.finish().await;
    assert!(failures.is_empty(), "failed GETs: {failures:?}");
    assert!(
        answers[before..].iter().all(|a| a.cluster == "gcp"),
        "traffic stayed where the last good config sent it"
    );
}

/// Kubernetes end to end: a `ServiceExport` and its EndpointSlice in gcp
/// (test-support's FakeKube, a fake API server) beside gcp's other source;
/// aws's proxy serves it from gcp's pod, through the real gateways, and stops
/// once the `ServiceExport` is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_export_in_one_cluster_is_served_by_anothers_proxy() {
    use fedmesh_test_support::{FakeKube, kube_objects};
    let etcd = Etcd::start().await.unwrap();
    let kube = FakeKube::start("127.0.64.60", Duration::from_secs(1))
        .await
        .unwrap();
    let gcp = site_with(&etcd, "gcp", 64, |c| c.kube = Some(fake_kube(&kube))).await;
    let aws = site(&etcd, "aws", 63).await;
    // A "pod" of gcp's cart: a backend on gcp's block, in az1.
    let pod = Backend::new(gcp.reg.domain.ip(10), "gcp", "az1", "cart").await;
    kube.put(&kube_objects::service("shop", "cart", 8080));
    kube.put(&kube_objects::slice(
        "shop",
        "cart-1",
        "cart",
        i32::from(pod.addr.port()),
        &[(&pod.addr.ip().to_string(), "az1", true)],
    ));
    kube.put(&kube_objects::export("shop", "cart"));

    let (_discovered, proxy) = discovery_proxy(&aws).await;
    let http = proxy.http.unwrap();
    let answer = eventually("cart served from gcp", Duration::from_secs(30), || async {
        get(http, CART).await.ok().filter(|a| a.cluster == "gcp")
    })
    .await;
    assert_eq!(answer.zone, "az1");

    assert!(kube.delete("serviceexports", "shop", "cart"));
    let refused = eventually(
        "cart gone once unexported",
        Duration::from_secs(30),
        || async { get(http, CART).await.err() },
    )
    .await;
    assert!(refused.starts_with("404"), "{refused}");
}
