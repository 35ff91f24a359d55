//! The gateway's side of moving bytes: the splice itself is the tunnel's
//! ([`fedmesh_tunnel::splice`]); here, the byte counters it reports into.

use prometheus_client::metrics::counter::Counter;

pub use fedmesh_tunnel::quic::{code, reset_stream};
pub use fedmesh_tunnel::splice::splice;
pub use fedmesh_tunnel::{ReadFrameError, read_frame, write_frame};

/// Bytes counted on the way through, per direction.
#[derive(Debug, Clone)]
pub struct Counters {
    pub to_peer: Counter,
    pub from_peer: Counter,
}

impl fedmesh_tunnel::splice::Tally for Counters {
    fn sent(&self, n: u64) {
        self.to_peer.inc_by(n);
    }

    fn received(&self, n: u64) {
        self.from_peer.inc_by(n);
    }
}
