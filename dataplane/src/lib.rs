//! What fedmesh's data-plane processes (`fedmesh-gateway`, `fedmesh-proxy`)
//! share, so that each binary is only its own wiring:
//!
//! - [`source`]: where the running config, SVID and bundles come from: a
//!   static file re-read when it changes, or the controller's discovery
//!   stream ([`ConfigSource`]);
//! - [`files`]: reading a config file and the files it names, with errors
//!   that name the file and field ([`ConfigError`]);
//! - [`peers`]: the peer clusters a static config lists;
//! - [`process`]: logs, the admin port, and the shutdown signal;
//! - [`handoff`]: a restart that drops nothing, by passing the listening
//!   sockets to the new process.
//!
//! Like the rest of the data plane, it links neither etcd nor kube.

pub mod files;
pub mod handoff;
pub mod peers;
pub mod process;
pub mod source;

pub use files::{ConfigError, ConfigFile};
pub use source::{ConfigSource, Feeds, Snapshot};
