//! A TCP relay on loopback that a test can cut and restore, to break a
//! client's connection to a real server (etcd, a gateway) without stopping it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::{AbortHandle, JoinHandle};

/// Forwards `listen` → `upstream` while open; when cut, drops every live
/// connection and refuses new ones.
#[derive(Debug)]
pub struct TcpRelay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl TcpRelay {
    /// Starts a relay on a free port of `host` towards `upstream`.
    pub async fn start(host: std::net::IpAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind((host, 0)).await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let (cut, live) = (cut.clone(), live.clone());
            async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropping `down` closes it
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut up) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    });
                    let mut live = live.lock().await;
                    live.retain(|h| !h.is_finished());
                    live.push(task.abort_handle());
                }
            }
        });
        Ok(Self {
            addr,
            cut,
            live,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every live connection and refuses new ones.
    pub async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.live.lock().await.drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut live) = self.live.try_lock() {
            for h in live.drain(..) {
                h.abort();
            }
        }
    }
}
