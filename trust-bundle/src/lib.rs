//! Identity for fedmesh: SPIFFE IDs, one CA per cluster, federated trust
//! bundles, and the rustls configs that verify peers against them.
//!
//! Each cluster owns an independent root for its own trust domain. Clusters
//! exchange *bundles* (their roots' certificates), never keys. A peer is
//! accepted only when its chain verifies against the bundle of the trust
//! domain named in its own leaf, and an [`Authorizer`] accepts its ID.
//!
//! This crate owns no sockets and no storage beyond the CA's PEM files: the
//! controller moves bundles through etcd, and the gateway and proxy consume
//! the configs built here. Rotation logic is I/O-free ([`RenewalState`],
//! [`Authority`]) with a thin tokio driver ([`spawn_renewer`]).
//!
//! ```
//! use std::{sync::Arc, time::SystemTime};
//! use tokio::sync::watch;
//! use fedmesh_trust::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! fedmesh_trust::install_default_provider(); // first thing in main
//! let td = TrustDomain::new("aws.example")?;
//! let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now())?;
//! let id = SpiffeId::gateway(&td, "aws-use1")?;
//! let svid = ca.issue(&id, &SvidPolicy::default(), SystemTime::now())?;
//!
//! let mut bundles = BundleSet::new();
//! bundles.insert(Bundle::with_roots(td.clone(), [ca.cert_der().clone()]));
//!
//! let (_svid_tx, svid_rx) = watch::channel(Arc::new(svid));
//! let (_bundles_tx, bundles_rx) = watch::channel(Arc::new(bundles));
//! let server = server_config(svid_rx, bundles_rx, Arc::new(AllowAnyVerified), &[tls::ALPN_TUNNEL])?;
//! assert_eq!(server.alpn_protocols, [b"fedmesh-tunnel/1".to_vec()]);
//! # Ok(())
//! # }
//! ```

pub mod bundle;
pub mod ca;
pub mod pem;
pub mod pki;
pub mod rotation;
pub mod spiffe;
pub mod svid;
pub mod tls;
pub mod verify;

pub use bundle::{Bundle, BundleError};
pub use ca::{
    CaError, CaOptions, ClusterCa, KeyAlgorithm, SvidPolicy, certificate_request, random_hex,
};
pub use rotation::{
    Authority, Clock, RenewError, RenewalPolicy, RenewalState, RotationError, RotationPhase,
    RotationPolicy, SvidSource, SystemClock, spawn_renewer,
};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::{Svid, SvidError};
pub use tls::{
    TlsConfigError, client_config, client_config_without_svid, crypto_provider,
    install_default_provider, server_config, server_config_optional_client_auth,
};
pub use verify::{
    AllowAnyVerified, AllowIds, AllowTrustDomains, AuthorizeFn, Authorizer, BundleSet, Usage,
    VerifyError, peer_spiffe_id,
};
