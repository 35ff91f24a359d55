//! Peer clusters as a static config lists them (a gateway's or a proxy's
//! file without a controller): `peers: [{cluster, trustDomain, gateways}]`.

use fedmesh_api::validate_label;
use fedmesh_trust::{BundleSet, TrustDomain};
use fedmesh_tunnel::peers::{GatewayAddr, Peer, Peers};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerFile {
    pub cluster: String,
    pub trust_domain: String,
    /// `ip:port`, `[v6]:port` or `name:port`.
    pub gateways: Vec<String>,
}

/// Checks `files` for cluster `us`: every peer a valid name other than
/// ours, listed once, with a bundle for its trust domain among `bundles`
/// and gateway addresses each listed once. Errors name the entry.
pub fn check(us: &str, files: &[PeerFile], bundles: &BundleSet) -> Result<Peers, String> {
    let mut peers = Peers::with_capacity(files.len());
    for (i, p) in files.iter().enumerate() {
        let at = format!("peers[{i}]");
        validate_label("cluster", &p.cluster).map_err(|e| format!("{at}: {e}"))?;
        if p.cluster == us {
            return Err(format!("{at}: {} is this cluster", p.cluster));
        }
        let td = TrustDomain::new(&p.trust_domain).map_err(|e| format!("{at}.trustDomain: {e}"))?;
        if bundles.get(&td).is_none() {
            return Err(format!(
                "{at} ({}): no bundle for its trust domain {td} under `bundles`",
                p.cluster
            ));
        }
        let mut gateways = Vec::with_capacity(p.gateways.len());
        for (j, g) in p.gateways.iter().enumerate() {
            let addr = GatewayAddr::parse(g).map_err(|e| format!("{at}.gateways[{j}]: {e}"))?;
            if gateways.contains(&addr) {
                return Err(format!("{at}.gateways[{j}]: {addr} is listed twice"));
            }
            gateways.push(addr);
        }
        let peer = Peer {
            trust_domain: td,
            gateways,
        };
        if peers.insert(p.cluster.clone(), peer).is_some() {
            return Err(format!("{at}: cluster {} is listed twice", p.cluster));
        }
    }
    Ok(peers)
}
