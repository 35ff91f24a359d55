//! Idle upstream HTTP/1.1 connections, by service and target, and the
//! response body that hands its connection back when it ends.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fedmesh_api::ServiceKey;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use super::Body;
use crate::table::{Table, TargetKey};

/// What an upstream connection may be reused for: one service on one
/// target. A tunnel to a remote cluster ends at one service's endpoint, so
/// the target alone would send another service's requests there.
pub type PoolKey = (ServiceKey, TargetKey);

#[derive(Debug)]
pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    tx: SendRequest<Body>,
    since: Instant,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            max_idle,
            idle_timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, Vec<Idle>>> {
        // Every update is one push or retain: a panic elsewhere cannot
        // leave the map inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready idle connection to `k`, if there is one. Closed and expired
    /// ones are dropped; one still finishing its last response stays.
    pub fn take(&self, k: &PoolKey) -> Option<SendRequest<Body>> {
        let mut idle = self.lock();
        let list = idle.get_mut(k)?;
        let now = Instant::now();
        list.retain(|i| !i.tx.is_closed() && now - i.since < self.idle_timeout);
        let i = list.iter().rposition(|i| i.tx.is_ready())?;
        Some(list.swap_remove(i).tx)
    }

    /// Returns a connection whose last response has ended.
    pub fn put(&self, k: PoolKey, tx: SendRequest<Body>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.entry(k).or_default();
        if list.len() < self.max_idle {
            list.push(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }

    /// Drops closed and expired connections, and those to targets that
    /// are gone.
    pub fn sweep(&self, table: &Table) {
        let now = Instant::now();
        let mut idle = self.lock();
        idle.retain(|k, list| {
            let known = table
                .services
                .get(&k.0)
                .is_some_and(|s| s.targets.iter().any(|t| t.key == k.1));
            list.retain(|i| known && !i.tx.is_closed() && now - i.since < self.idle_timeout);
            !list.is_empty()
        });
    }

    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

/// A response body that hands its connection back to the pool at its end.
pub(crate) struct PooledBody {
    pub(crate) inner: Incoming,
    pub(crate) back: Option<(Arc<Pool>, PoolKey, SendRequest<Body>)>,
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if ended && let Some((pool, k, tx)) = self.back.take() {
            pool.put(k, tx);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
