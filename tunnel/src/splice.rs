//! Splicing a TCP (or TLS) stream with a tunnel's QUIC stream until both
//! directions end, for whichever end holds the QUIC stream (a gateway; a
//! proxy in direct mode). QUIC's flow control is the back-pressure: a slow
//! reader stops the writer's credit instead of filling memory.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::quic::code;

/// Where a splice counts the bytes it moves (the caller's metrics).
pub trait Tally: Sync {
    /// `n` more bytes went to the peer.
    fn sent(&self, n: u64);
    /// `n` more bytes came from the peer.
    fn received(&self, n: u64);
}

/// Counts nothing.
impl Tally for () {
    fn sent(&self, _: u64) {}
    fn received(&self, _: u64) {}
}

/// How long a splice may sit with no byte moving: `idle`; and once
/// `drain` turns true, its shorter limit, if nothing is in flight (no byte
/// yet, or the last bytes went to the side that opened the tunnel). A
/// draining gateway so closes the tunnels a client keeps pooled and idle,
/// instead of waiting out its drain timeout for them, and never one whose
/// request awaits its answer.
#[derive(Debug, Clone)]
pub struct IdleLimit {
    pub idle: Duration,
    pub drain: Option<Drain>,
}

#[derive(Debug, Clone)]
pub struct Drain {
    pub draining: tokio::sync::watch::Receiver<bool>,
    pub idle: Duration,
    /// The opener is the peer (a gateway's ingress), not the local side
    /// (its egress): answers go to the peer.
    pub opened_by_peer: bool,
}

impl From<Duration> for IdleLimit {
    fn from(idle: Duration) -> Self {
        Self { idle, drain: None }
    }
}

impl IdleLimit {
    /// Resolves the drain's idle limit after draining begins; never
    /// without a drain.
    async fn drained(&mut self) {
        let Some(d) = &mut self.drain else {
            return std::future::pending().await;
        };
        while !*d.draining.borrow_and_update() {
            if d.draining.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
        tokio::time::sleep(d.idle).await;
    }

    /// The limit now, given which way the last bytes went.
    fn now(&self, last_to_peer: bool) -> Duration {
        match &self.drain {
            Some(d) if *d.draining.borrow() && last_to_peer == d.opened_by_peer => {
                self.idle.min(d.idle)
            }
            _ => self.idle,
        }
    }
}

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    pub to_peer: u64,
    pub from_peer: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("local side: {0}")]
    Local(io::Error),
    #[error("peer side: {0}")]
    Peer(String),
    #[error("no byte either way for {0:?}")]
    Idle(Duration),
}

const CHUNK: usize = 64 * 1024;
/// Below this much room, a read takes a fresh block.
const MIN_READ: usize = 4 * 1024;

/// Splices `(r, w)` with `(send, recv)` until both directions have ended
/// cleanly, one fails, or neither moves for `idle` ([`IdleLimit`]). On failure the QUIC
/// stream is reset (never silently finished: the far end must not take a
/// truncated stream for a complete one).
pub async fn splice(
    r: impl AsyncRead + Unpin,
    w: impl AsyncWrite + Unpin,
    send: &mut SendStream,
    recv: &mut RecvStream,
    idle: impl Into<IdleLimit>,
    counters: &impl Tally,
) -> Result<Spliced, SpliceError> {
    let mut idle = idle.into();
    let activity = Activity {
        start: Instant::now(),
        last: AtomicU64::new(0),
        // Nothing in flight yet: a tunnel opened and left unused (a pool's
        // spare connection) is as closable as one idle after an answer.
        last_to_peer: AtomicBool::new(idle.drain.as_ref().is_some_and(|d| d.opened_by_peer)),
    };
    let result = tokio::select! {
        r = async {
            tokio::try_join!(
                to_peer(r, send, &activity, counters),
                from_peer(recv, w, &activity, counters),
            )
        } => r,
        e = activity.idle_for(&mut idle) => Err(e),
    };
    match result {
        Ok((to_peer, from_peer)) => {
            // Done once the peer has acknowledged the last byte: a drain
            // that closed the connection earlier would cut the tail off.
            // Draining, the wait is short: a peer that never acknowledges
            // must not hold the drain for the whole idle timeout.
            tokio::select! {
                _ = send.stopped() => {}
                _ = tokio::time::sleep(idle.idle) => {}
                _ = idle.drained() => {}
            }
            Ok(Spliced { to_peer, from_peer })
        }
        Err(e) => {
            let why = match e {
                SpliceError::Idle(_) => code::IDLE,
                _ => code::ABORTED,
            };
            let _ = send.reset(why);
            let _ = recv.stop(why);
            Err(e)
        }
    }
}

/// When a splice last moved a byte, and which way.
struct Activity {
    start: Instant,
    /// Milliseconds since `start`.
    last: AtomicU64,
    last_to_peer: AtomicBool,
}

impl Activity {
    fn touch(&self, to_peer: bool) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.last_to_peer.store(to_peer, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for the limit `idle` sets.
    async fn idle_for(&self, idle: &mut IdleLimit) -> SpliceError {
        loop {
            let limit = idle.now(self.last_to_peer.load(Ordering::Relaxed));
            let seen = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let due = self.start + seen + limit;
            if Instant::now() >= due {
                return SpliceError::Idle(limit);
            }
            match &mut idle.drain {
                Some(d) if !*d.draining.borrow() => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        // A closed sender never drains: plain idle from here.
                        r = d.draining.changed() => if r.is_err() { idle.drain = None },
                    }
                }
                // Draining: bytes may flip which limit holds; look again
                // at least every 100 ms.
                Some(_) => {
                    tokio::time::sleep_until(due.min(Instant::now() + Duration::from_millis(100)))
                        .await
                }
                None => tokio::time::sleep_until(due).await,
            }
        }
    }
}

/// Local bytes to the peer, then FIN; the count.
async fn to_peer(
    mut r: impl AsyncRead + Unpin,
    send: &mut SendStream,
    activity: &Activity,
    counters: &impl Tally,
) -> Result<u64, SpliceError> {
    let mut n = 0u64;
    // Reads fill one 64 KiB block in turn; each chunk handed to quinn
    // shares it (no copy), and a new block is taken only when little is
    // left. Small writes (an RPC's 64 bytes) thus never pin a whole block
    // each until they are acknowledged.
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() < MIN_READ {
            buf.reserve(CHUNK);
        }
        let got = r.read_buf(&mut buf).await.map_err(SpliceError::Local)?;
        if got == 0 {
            send.finish()
                .map_err(|e| SpliceError::Peer(e.to_string()))?;
            return Ok(n);
        }
        activity.touch(true);
        n += got as u64;
        counters.sent(got as u64);
        send.write_chunk(buf.split().freeze())
            .await
            .map_err(|e| SpliceError::Peer(e.to_string()))?;
    }
}

/// The peer's bytes to the local side, then shutdown; the count.
async fn from_peer(
    recv: &mut RecvStream,
    mut w: impl AsyncWrite + Unpin,
    activity: &Activity,
    counters: &impl Tally,
) -> Result<u64, SpliceError> {
    let mut n = 0u64;
    // Stream frames arrive a packet (about 1.4 KB) at a time: gather what
    // has arrived into one buffer, so that the local side sees one write
    // (one syscall, one TLS record) per 64 KiB, not per packet.
    let mut buf = vec![0u8; CHUNK];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(got)) => {
                activity.touch(false);
                n += got as u64;
                counters.received(got as u64);
                w.write_all(&buf[..got]).await.map_err(SpliceError::Local)?;
            }
            Ok(None) => {
                w.shutdown().await.map_err(SpliceError::Local)?;
                return Ok(n);
            }
            Err(e) => return Err(SpliceError::Peer(e.to_string())),
        }
    }
}
