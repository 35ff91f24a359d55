//! A small authoritative DNS server on loopback UDP, for tests of names
//! that move: `set` changes a name's A records (and TTL) at any time, and
//! `queries` counts the lookups that reached it. It answers A queries for
//! names it holds, NODATA for other types of those names, and NXDOMAIN for
//! the rest. Real sockets and real DNS messages; only the zone is in memory.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

type Zone = Arc<Mutex<HashMap<String, (Vec<Ipv4Addr>, u32)>>>;

#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    zone: Zone,
    queries: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl DnsServer {
    /// Listens on a free UDP port of `ip`.
    pub async fn start(ip: IpAddr) -> std::io::Result<Self> {
        let socket = UdpSocket::bind((ip, 0)).await?;
        let addr = socket.local_addr()?;
        let zone = Zone::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(socket, zone.clone(), queries.clone()));
        Ok(Self {
            addr,
            zone,
            queries,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets `name`'s A records; an empty list removes the name.
    pub fn set(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        let name = normalise(name);
        let mut zone = self.zone.lock().unwrap_or_else(|p| p.into_inner());
        if ips.is_empty() {
            zone.remove(&name);
        } else {
            zone.insert(name, (ips.to_vec(), ttl));
        }
    }

    /// Queries received so far, of any type.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

async fn serve(socket: UdpSocket, zone: Zone, queries: Arc<AtomicUsize>) {
    let mut buf = [0u8; 1500];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        queries.fetch_add(1, Ordering::SeqCst);
        let answer = {
            let zone = zone.lock().unwrap_or_else(|p| p.into_inner());
            respond(&buf[..n], &zone)
        };
        if let Some(answer) = answer {
            let _ = socket.send_to(&answer, from).await;
        }
    }
}

/// The answer to one query, or `None` for a message too broken to answer.
fn respond(q: &[u8], zone: &HashMap<String, (Vec<Ipv4Addr>, u32)>) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = usize::from(*q.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let question = q.get(12..i + 4)?;
    let qtype = u16::from_be_bytes([q[i], q[i + 1]]);
    let found = zone.get(&labels.join("."));
    let answers: &[Ipv4Addr] = match found {
        Some((ips, _)) if qtype == 1 => ips,
        _ => &[],
    };
    let rcode = if found.is_some() { 0 } else { 3 };
    let mut r = Vec::with_capacity(512);
    r.extend_from_slice(&q[0..2]); // id
    // QR, the query's opcode and RD, AA; RA; rcode.
    r.push(0x80 | (q[2] & 0x79) | 0x04);
    r.push(0x80 | rcode);
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(question);
    let ttl = found.map(|(_, ttl)| *ttl).unwrap_or(0);
    for ip in answers {
        r.extend_from_slice(&[0xC0, 12]); // the name, by pointer to the question
        r.extend_from_slice(&[0, 1, 0, 1]); // A, IN
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}
