//! The app-facing connections of the proxy: which to close so that idle
//! ones can never starve live ones. I/O-free; the HTTP listener drives it.
//!
//! - A connection with no request in flight that has sent no request
//!   within the header timeout, or none since its last response within
//!   the idle timeout, is closed.
//! - At the connection cap, a new connection closes the oldest idle one
//!   instead of being refused: a flood of idle connections (or a leak in
//!   an app) costs its own connections, never the next real request.
//!
//! Only connections with nothing in flight are ever closed, so no request
//! is cut; one that races the close is answered by the connection ending,
//! which a client retries as it would any keep-alive race.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Conn<H> {
    handle: H,
    in_flight: u32,
    /// Requests finished on it.
    served: u64,
    /// When it last had nothing in flight (opened, or its last response).
    idle_since: Instant,
}

/// The open connections, by the order they were opened.
#[derive(Debug)]
pub struct Downstream<H> {
    cap: usize,
    next: u64,
    conns: BTreeMap<u64, Conn<H>>,
}

impl<H> Downstream<H> {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            next: 0,
            conns: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// A new connection: its id, and the handle of the one to close to
    /// make room for it (the oldest idle), if the cap is reached.
    pub fn open(&mut self, handle: H, now: Instant) -> (u64, Option<H>) {
        let victim = if self.conns.len() >= self.cap {
            let oldest = self
                .conns
                .iter()
                .filter(|(_, c)| c.in_flight == 0)
                .min_by_key(|(id, c)| (c.idle_since, **id))
                .map(|(id, _)| *id);
            oldest
                .and_then(|id| self.conns.remove(&id))
                .map(|c| c.handle)
        } else {
            None
        };
        let id = self.next;
        self.next += 1;
        self.conns.insert(
            id,
            Conn {
                handle,
                in_flight: 0,
                served: 0,
                idle_since: now,
            },
        );
        (id, victim)
    }

    /// A request began on `id`.
    pub fn started(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.in_flight += 1;
        }
    }

    /// A request on `id` ended.
    pub fn finished(&mut self, id: u64, now: Instant) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.in_flight = c.in_flight.saturating_sub(1);
            c.served += 1;
            if c.in_flight == 0 {
                c.idle_since = now;
            }
        }
    }

    /// The connection ended by itself.
    pub fn closed(&mut self, id: u64) {
        self.conns.remove(&id);
    }

    /// Takes out the connections to close at `now`: idle past
    /// `header_timeout` without a first request, or past `idle_timeout`
    /// since their last.
    pub fn expired(
        &mut self,
        now: Instant,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Vec<H> {
        let gone: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                let limit = if c.served == 0 {
                    header_timeout
                } else {
                    idle_timeout
                };
                c.in_flight == 0 && now.duration_since(c.idle_since) >= limit
            })
            .map(|(id, _)| *id)
            .collect();
        gone.into_iter()
            .filter_map(|id| self.conns.remove(&id))
            .map(|c| c.handle)
            .collect()
    }
}

/// The default connection cap: `wanted`, but at most three quarters of
/// the process's file descriptor limit (`/proc/self/limits`), so that
/// accepting never runs the proxy out of descriptors for its upstreams.
pub fn connection_cap(wanted: u32) -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|soft| soft.parse::<usize>().ok())
        });
    let wanted = usize::try_from(wanted).unwrap_or(usize::MAX);
    match limit {
        Some(l) => wanted.min(l / 4 * 3).max(1),
        None => wanted.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room_never_a_busy_one() {
        let t0 = Instant::now();
        let mut d = Downstream::new(3);
        let (a, _) = d.open("a", t0);
        let (_b, _) = d.open("b", t0 + S);
        let (_c, _) = d.open("c", t0 + 2 * S);
        d.started(a); // a is busy: never closed while its request runs
        let (_, victim) = d.open("d", t0 + 3 * S);
        assert_eq!(victim, Some("b"));
        assert_eq!(d.len(), 3);
        d.finished(a, t0 + 4 * S);
        let (_, victim) = d.open("e", t0 + 5 * S);
        assert_eq!(victim, Some("c"), "the oldest idle, by when it went idle");
    }

    #[test]
    fn silent_connections_go_at_the_header_timeout_and_kept_alive_ones_at_the_idle_timeout() {
        let t0 = Instant::now();
        let mut d = Downstream::new(10);
        let (_silent, _) = d.open("silent", t0);
        let (used, _) = d.open("used", t0);
        d.started(used);
        d.finished(used, t0 + S);
        let (busy, _) = d.open("busy", t0);
        d.started(busy);
        let (h, i) = (Duration::from_secs(10), Duration::from_secs(60));
        assert!(d.expired(t0 + 9 * S, h, i).is_empty());
        assert_eq!(d.expired(t0 + 10 * S, h, i), ["silent"]);
        assert!(d.expired(t0 + 60 * S, h, i).is_empty());
        assert_eq!(d.expired(t0 + 61 * S, h, i), ["used"]);
        assert!(d.expired(t0 + 1000 * S, h, i).is_empty(), "busy stays");
        d.closed(busy);
        assert!(d.is_empty());
    }
}
