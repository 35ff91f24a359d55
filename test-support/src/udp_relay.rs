//! A UDP relay on loopback that can change its upstream source port on
//! demand: what a NAT rebinding looks like to the server behind it. For
//! testing that QUIC connections survive a peer's address change.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Forwards datagrams between one client and `upstream`.
#[derive(Debug)]
pub struct UdpRelay {
    addr: SocketAddr,
    host: IpAddr,
    upstream: SocketAddr,
    down: Arc<UdpSocket>,
    /// The socket facing upstream, and the task relaying its replies.
    up: Arc<Mutex<(Arc<UdpSocket>, JoinHandle<()>)>>,
    client: Arc<Mutex<Option<SocketAddr>>>,
    forward: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UdpRelay {
    /// Starts a relay on a free port of `host` towards `upstream`.
    pub async fn start(host: IpAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let down = Arc::new(UdpSocket::bind((host, 0)).await?);
        let addr = down.local_addr()?;
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let up_socket = Arc::new(UdpSocket::bind((host, 0)).await?);
        let replies = tokio::spawn(replies(up_socket.clone(), down.clone(), client.clone()));
        let up = Arc::new(Mutex::new((up_socket, replies)));
        let forward = tokio::spawn({
            let (down, up, client) = (down.clone(), up.clone(), client.clone());
            async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = down.recv_from(&mut buf).await {
                    *lock(&client) = Some(from);
                    let socket = lock(&up).0.clone();
                    let _ = socket.send_to(&buf[..n], upstream).await;
                }
            }
        });
        Ok(Self {
            addr,
            host,
            upstream,
            down,
            up,
            client,
            forward,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The address the upstream server sees datagrams come from.
    pub fn source(&self) -> std::io::Result<SocketAddr> {
        lock(&self.up).0.local_addr()
    }

    /// Moves to a new upstream source port, as a NAT does when its mapping
    /// expires. The old port goes silent; replies to it are lost.
    pub async fn rebind(&self) -> std::io::Result<SocketAddr> {
        let socket = Arc::new(UdpSocket::bind((self.host, 0)).await?);
        let source = socket.local_addr()?;
        let task = tokio::spawn(replies(
            socket.clone(),
            self.down.clone(),
            self.client.clone(),
        ));
        let (_, old) = std::mem::replace(&mut *lock(&self.up), (socket, task));
        old.abort();
        Ok(source)
    }
}

async fn replies(up: Arc<UdpSocket>, down: Arc<UdpSocket>, client: Arc<Mutex<Option<SocketAddr>>>) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, _)) = up.recv_from(&mut buf).await {
        let to = *lock(&client);
        if let Some(to) = to {
            let _ = down.send_to(&buf[..n], to).await;
        }
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.forward.abort();
        lock(&self.up).1.abort();
    }
}
