//! A proxy that takes its SVID, bundles and services from its cluster's
//! real controller (over a real etcd), with real gateways between two
//! clusters: it follows a health change in its registry to another
//! cluster, and keeps serving unchanged once its controller is gone.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use fedmesh_discovery::ControllerAccess;
use fedmesh_test_support::{Etcd, eventually};
use proxy::Proxy;
use proxy::config::{Common, Listen, Settings};
use proxy::table::Table;
use support::gw::sites::{WEB_TOKEN, policy, set_service, site};
use support::{Backend, Load, get, me};
use trust_bundle::{BundleSet, SpiffeId};

const CART: &str = "cart.shop";

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
    let d = &aws.reg.domain;
    let access = ControllerAccess {
        address: aws.reg.controller.as_ref().unwrap().discovery_addr,
        controller: SpiffeId::controller(&d.td, "aws").unwrap(),
        identity: SpiffeId::workload(&d.td, "shop", "web").unwrap(),
        join_token: WEB_TOKEN.into(),
        node: "aws-proxy".into(),
    };
    let mut bootstrap = BundleSet::new();
    bootstrap.insert(aws.reg.own_bundle.clone());
    let here = me(d, "az1");
    let discovered = {
        let here = here.clone();
        fedmesh_discovery::start(access, bootstrap, policy(), move |m, _| {
            let specs = proxy::discovered::services(&here.cluster, m, &Default::default())?;
            Ok(Table::build(&here.cluster, &here.locality, &specs))
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
        gateways: vec![aws.gateway.egress_addr().unwrap()],
        settings: Settings::default(),
    };
    let proxy = Proxy::start(
        &common,
        discovered.config.clone(),
        discovered.svid.clone(),
        discovered.bundles.clone(),
    )
    .await
    .unwrap();
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
