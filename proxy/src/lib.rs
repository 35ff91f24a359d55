//! fedmesh's local proxy. So far, the I/O-free core of its balancing, each
//! part taking `now` as an argument so that it is tested on a virtual
//! clock:
//!
//! - [`locality`]: priority levels (same zone, same region, same cloud, the
//!   rest), and the per-level health that spill-over works from, with
//!   hysteresis on failback;
//! - [`outlier`]: consecutive-failure ejection with a growing ejection time,
//!   a cap on the ejected share, and recovery;
//! - [`pick`]: power of two choices over peak-EWMA latency and load;
//! - [`budget`]: the retry budget;
//! - [`limits`]: circuit breakers, and which failures may be retried;
//! - [`balancer`]: all of the above over one service's targets (local
//!   endpoints, and one virtual endpoint per remote cluster).
//!
//! The listeners, the discovery wiring and the pickers come next (issue 5).

pub mod balancer;
pub mod budget;
pub mod limits;
pub mod locality;
pub mod outlier;
pub mod pick;
