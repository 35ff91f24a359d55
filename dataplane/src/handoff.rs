//! A restart that drops nothing, as Envoy's hot restart and nginx's binary
//! upgrade do it: the running process offers its listening sockets on a
//! Unix socket; a new process started with the same path takes them,
//! accepts on them, and says so; only then does the old one stop
//! accepting and drain. The sockets themselves never close, so no
//! connection waiting in an accept queue is reset, and there is no moment
//! when nothing listens (as there is when a listener is closed and bound
//! again, even with `SO_REUSEPORT`).
//!
//! Only a process of the same user may take the sockets: the socket file
//! is 0600 and the peer's uid is checked.

use std::io::{self, BufRead, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// At most this many listeners are handed over at once.
pub const MAX_LISTENERS: usize = 64;

/// How long a successor has, once it has the sockets, to say it accepts on
/// them; past it the old process keeps serving and offers them again.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

const ACCEPTING: &str = "accepting\n";

#[derive(Debug, thiserror::Error)]
#[error("handoff on {}: {what}: {source}", path.display())]
pub struct HandoffError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: io::Error,
}

fn err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> HandoffError + 'a {
    move |source| HandoffError {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// What the sockets are, sent beside them.
#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    listeners: Vec<SocketAddr>,
}

/// Listening sockets taken from the process that served them.
#[derive(Debug)]
pub struct Inherited {
    listeners: Vec<(SocketAddr, TcpListener)>,
    from: UnixStream,
}

impl Inherited {
    /// The addresses inherited and not yet taken.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(a, _)| *a).collect()
    }

    /// The inherited listener bound to `addr`, non-blocking, ready for
    /// tokio; `None` if none is (a new address: bind it).
    pub fn take(&mut self, addr: SocketAddr) -> Option<io::Result<TcpListener>> {
        let i = self.listeners.iter().position(|(a, _)| *a == addr)?;
        let (_, l) = self.listeners.swap_remove(i);
        Some(l.set_nonblocking(true).map(|()| l))
    }

    /// Tells the old process this one accepts on every socket taken: it
    /// stops accepting and drains. Sockets not taken (an address the new
    /// config no longer has) close here and with the old process.
    pub fn accepting(mut self) -> io::Result<()> {
        if !self.listeners.is_empty() {
            tracing::warn!(unused = ?self.addresses(), "inherited listeners the config no longer names are closed");
        }
        self.from.write_all(ACCEPTING.as_bytes())
    }
}

/// Takes the listeners of the process serving `path`. `Ok(None)` when no
/// process serves it (no socket file, or nobody behind it): a first start.
pub fn take_over(path: &Path) -> Result<Option<Inherited>, HandoffError> {
    let from = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(err(path, "connecting")(e)),
    };
    from.set_read_timeout(Some(ACK_TIMEOUT))
        .map_err(err(path, "connecting"))?;
    let (offer, fds) = receive(&from).map_err(err(path, "receiving the listeners"))?;
    if offer.listeners.len() != fds.len() {
        return Err(err(path, "receiving the listeners")(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} addresses named but {} sockets sent",
                offer.listeners.len(),
                fds.len()
            ),
        )));
    }
    let listeners = offer
        .listeners
        .into_iter()
        .zip(fds)
        .map(|(a, fd)| (a, TcpListener::from(fd)))
        .collect();
    Ok(Some(Inherited { listeners, from }))
}

fn receive(from: &UnixStream) -> io::Result<(Offer, Vec<OwnedFd>)> {
    let mut payload = vec![0u8; 64 * 1024];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        from,
        &mut [IoSliceMut::new(&mut payload)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    let offer: Offer = serde_json::from_slice(&payload[..got.bytes])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((offer, fds))
}

/// A handoff socket, bound: [`Offering::wait`] hands the listeners to the
/// first successor that takes and accepts on them. It holds a copy of each
/// listener: drop it (abort its task) before a drain that hands nothing
/// over, or the sockets stay open and connections queue on them unserved.
#[derive(Debug)]
pub struct Offering {
    path: PathBuf,
    listener: tokio::net::UnixListener,
    offer: Arc<Vec<(SocketAddr, OwnedFd)>>,
}

impl Offering {
    /// Binds `path` (a stale socket file there is replaced: the process
    /// that served it has handed over, or is gone), 0600, offering
    /// `listeners`.
    pub fn bind(
        path: &Path,
        listeners: &[(SocketAddr, BorrowedFd<'_>)],
    ) -> Result<Self, HandoffError> {
        if listeners.len() > MAX_LISTENERS {
            return Err(err(path, "offering")(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} listeners (at most {MAX_LISTENERS})", listeners.len()),
            )));
        }
        let offer = listeners
            .iter()
            .map(|(a, fd)| Ok((*a, fd.try_clone_to_owned()?)))
            .collect::<io::Result<Vec<_>>>()
            .map_err(err(path, "keeping the listeners"))?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(path, "removing the old socket file")(e)),
        }
        let listener = tokio::net::UnixListener::bind(path).map_err(err(path, "binding"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(err(path, "making it 0600"))?;
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            offer: Arc::new(offer),
        })
    }

    /// Resolves once a successor of the same user has taken the listeners
    /// and said it accepts on them. A successor that fails before it says
    /// so changes nothing: the next one is offered them again.
    pub async fn wait(self) -> Result<(), HandoffError> {
        let me = rustix::process::getuid();
        loop {
            let (s, _) = self
                .listener
                .accept()
                .await
                .map_err(err(&self.path, "accepting"))?;
            match rustix::net::sockopt::socket_peercred(&s) {
                Ok(cred) if cred.uid == me => {}
                Ok(cred) => {
                    tracing::warn!(uid = cred.uid.as_raw(), "refused a handoff to another user");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "refused a handoff whose peer is unknown");
                    continue;
                }
            }
            // The exchange is a few bytes and one line back, with a
            // timeout: a blocking thread keeps it simple.
            let handed = s.into_std().and_then(|s| {
                s.set_nonblocking(false)?;
                Ok(s)
            });
            let offer = self.offer.clone();
            let handed = match handed {
                Ok(s) => tokio::task::spawn_blocking(move || hand(&offer, &s))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e))),
                Err(e) => Err(e),
            };
            match handed {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "a successor took the listeners but did not start; still serving")
                }
            }
        }
    }
}

fn hand(listeners: &[(SocketAddr, OwnedFd)], to: &UnixStream) -> io::Result<()> {
    let offer = Offer {
        listeners: listeners.iter().map(|(a, _)| *a).collect(),
    };
    let payload = serde_json::to_vec(&offer).map_err(io::Error::other)?;
    let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("the listeners do not fit one message"));
    }
    rustix::net::sendmsg(
        to,
        &[IoSlice::new(&payload)],
        &mut control,
        SendFlags::empty(),
    )?;
    to.set_read_timeout(Some(ACK_TIMEOUT))?;
    let mut line = String::new();
    io::BufReader::new(to).read_line(&mut line)?;
    if line == ACCEPTING {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "it ended before it accepted",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A connection queued on the old process's listener, never accepted
    /// there, is accepted by the successor: the socket is the same one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_takes_the_listeners_and_their_queued_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.handoff");
        assert!(take_over(&path).unwrap().is_none(), "a first start");

        let http = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = http.local_addr().unwrap();
        let offering = Offering::bind(&path, &[(addr, http.as_fd())]).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let old = tokio::spawn(offering.wait());

        let mut queued = std::net::TcpStream::connect(addr).unwrap();
        let p = path.clone();
        let mut inherited = tokio::task::spawn_blocking(move || take_over(&p))
            .await
            .unwrap()
            .unwrap()
            .expect("the old process answers");
        assert_eq!(inherited.addresses(), [addr]);
        let taken = inherited.take(addr).unwrap().unwrap();
        assert!(inherited.take(addr).is_none(), "taken once");
        inherited.accepting().unwrap();
        old.await.unwrap().unwrap();
        // The old process closes its own copy; the socket lives on.
        drop(http);

        taken.set_nonblocking(false).unwrap();
        let (mut s, _) = taken.accept().unwrap();
        queued.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
    }

    /// A successor that takes the sockets and dies before it accepts
    /// leaves the old process serving, offering them to the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_that_fails_before_accepting_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.handoff");
        let http = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = http.local_addr().unwrap();
        let offering = Offering::bind(&path, &[(addr, http.as_fd())]).unwrap();
        let old = tokio::spawn(offering.wait());
        let take = |p: PathBuf| async move {
            tokio::task::spawn_blocking(move || take_over(&p))
                .await
                .unwrap()
                .unwrap()
        };
        let failed = take(path.clone()).await.unwrap();
        drop(failed);
        let next = take(path.clone()).await.expect("offered again");
        assert_eq!(next.addresses(), [addr]);
        next.accepting().unwrap();
        old.await.unwrap().unwrap();
    }
}
