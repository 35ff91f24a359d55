//! Circuit breaking, an I/O-free decision. A tripped breaker names its reason, which
//! the proxy returns in its 503 (header `x-fedmesh-overloaded`), so a
//! caller can tell "the proxy protected the service" from "the service
//! failed".

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open to one service's targets.
    pub max_connections: u32,
    /// Requests waiting for a connection or stream.
    pub max_pending: u32,
}

impl Default for Limits {
    fn default() -> Self {
        // Envoy's defaults, and Istio's.
        Self {
            max_connections: 1024,
            max_pending: 1024,
        }
    }
}

/// Why a breaker refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    MaxConnections,
    MaxPending,
}

impl Trip {
    /// The value of the 503's `x-fedmesh-overloaded` header.
    pub fn reason(self) -> &'static str {
        match self {
            Trip::MaxConnections => "max-connections",
            Trip::MaxPending => "max-pending-requests",
        }
    }
}

/// One service's breakers. Cheap to clone; clones share the counts.
#[derive(Debug, Clone)]
pub struct Breakers {
    limits: Limits,
    connections: Arc<AtomicU32>,
    pending: Arc<AtomicU32>,
}

/// Holds one slot until dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breakers {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            connections: Arc::default(),
            pending: Arc::default(),
        }
    }

    pub fn connection(&self) -> Result<Slot, Trip> {
        take(
            &self.connections,
            self.limits.max_connections,
            Trip::MaxConnections,
        )
    }

    pub fn pending(&self) -> Result<Slot, Trip> {
        take(&self.pending, self.limits.max_pending, Trip::MaxPending)
    }
}

fn take(count: &Arc<AtomicU32>, max: u32, trip: Trip) -> Result<Slot, Trip> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .map(|_| Slot(count.clone()))
        .map_err(|_| trip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakers_trip_at_their_limit_and_reset_as_slots_free() {
        let b = Breakers::new(Limits {
            max_connections: 2,
            max_pending: 1,
        });
        let c1 = b.connection().unwrap();
        let _c2 = b.connection().unwrap();
        assert_eq!(b.connection().unwrap_err(), Trip::MaxConnections);
        drop(c1);
        assert!(b.connection().is_ok());
        let _p = b.pending().unwrap();
        let trip = b.clone().pending().unwrap_err();
        assert_eq!(trip.reason(), "max-pending-requests");
    }
}
