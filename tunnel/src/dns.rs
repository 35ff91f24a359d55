//! DNS names of peer gateways. [`Cache`] is I/O-free and takes `now`;
//! [`Dns`] looks names up with hickory-resolver (its own cache off, so that
//! a failed connection really does look the name up again).
//!
//! Answers are kept for their TTL, bounded to [`MIN_TTL`, `MAX_TTL`]. After
//! a connection to one of a name's addresses fails, the name is looked up
//! again on next use. A lookup that fails falls back to the last answer: a
//! DNS outage must not take down paths that still work.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::time::Instant;

/// A zero TTL would mean a lookup per stream.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// A moved load balancer is followed within this long, whatever its TTL.
pub const MAX_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub struct Cache {
    entries: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    ips: Vec<IpAddr>,
    until: Instant,
    fetched: Instant,
}

impl Cache {
    /// An answer for `host` that has not expired.
    pub fn fresh(&self, host: &str, now: Instant) -> Option<&[IpAddr]> {
        self.entries
            .get(host)
            .filter(|e| now < e.until)
            .map(|e| &e.ips[..])
    }

    /// The last answer for `host`, however old.
    pub fn last(&self, host: &str) -> Option<&[IpAddr]> {
        self.entries.get(host).map(|e| &e.ips[..])
    }

    pub fn store(&mut self, host: &str, ips: Vec<IpAddr>, ttl: Duration, now: Instant) {
        let until = now + ttl.clamp(MIN_TTL, MAX_TTL);
        let e = Entry {
            ips,
            until,
            fetched: now,
        };
        self.entries.insert(host.to_string(), e);
    }

    /// A connection to one of `host`'s addresses failed: look it up again
    /// on next use (keeping the answer as a fallback), but not more than
    /// once per [`MIN_TTL`], so a dead name cannot cause a lookup per stream.
    pub fn expire(&mut self, host: &str, now: Instant) {
        if let Some(e) = self.entries.get_mut(host) {
            e.until = e.until.min(now.max(e.fetched + MIN_TTL));
        }
    }
}

/// The gateway's resolver. It is built on first use, so a gateway whose
/// peers are all IP addresses never reads the system's DNS configuration.
#[derive(Debug)]
pub struct Dns {
    servers: Vec<SocketAddr>,
    resolver: std::sync::OnceLock<Result<TokioResolver, String>>,
    cache: Mutex<Cache>,
}

impl Dns {
    /// Uses `servers` when given, else the system's configuration
    /// (`/etc/resolv.conf` and `/etc/hosts`).
    pub fn new(servers: &[SocketAddr]) -> Self {
        Self {
            servers: servers.to_vec(),
            resolver: std::sync::OnceLock::new(),
            cache: Mutex::default(),
        }
    }

    fn resolver(&self) -> Result<&TokioResolver, String> {
        self.resolver
            .get_or_init(|| build(&self.servers))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The addresses of `host`, from the cache while fresh.
    pub async fn resolve(&self, host: &str, timeout: Duration) -> Result<Vec<IpAddr>, String> {
        if let Some(ips) = self.cache().fresh(host, Instant::now()) {
            return Ok(ips.to_vec());
        }
        let looked_up = async {
            let resolver = self.resolver()?;
            // A fully qualified name: no search domains appended.
            let lookup = tokio::time::timeout(timeout, resolver.lookup_ip(format!("{host}.")))
                .await
                .map_err(|_| "DNS lookup timed out".to_string())?
                .map_err(|e| format!("DNS lookup: {e}"))?;
            let ips: Vec<IpAddr> = lookup.iter().collect();
            if ips.is_empty() {
                return Err("DNS lookup: no addresses".to_string());
            }
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            Ok((ips, ttl))
        }
        .await;
        let mut cache = self.cache();
        match looked_up {
            Ok((ips, ttl)) => {
                cache.store(host, ips.clone(), ttl, Instant::now());
                Ok(ips)
            }
            Err(e) => match cache.last(host) {
                Some(ips) => {
                    tracing::warn!(host, error = %e, "DNS lookup failed; using the last answer");
                    Ok(ips.to_vec())
                }
                None => Err(format!("{host}: {e}")),
            },
        }
    }

    /// The last answer for `host`, if it was ever resolved.
    pub fn last(&self, host: &str) -> Vec<IpAddr> {
        self.cache()
            .last(host)
            .map(<[IpAddr]>::to_vec)
            .unwrap_or_default()
    }

    pub fn expire(&self, host: &str) {
        self.cache().expire(host, Instant::now());
    }

    /// Never held across an await; a poisoned lock only means a panic
    /// elsewhere, and the map is still consistent.
    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A resolver on `servers`, or on the system's configuration when empty.
/// Its own cache is off: [`Cache`] keeps answers, and must be able to
/// force a fresh lookup.
fn build(servers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let builder = if servers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system's DNS configuration: {e}"))
    } else {
        let name_servers = servers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::new(ProtocolConfig::Udp);
                udp.port = s.port();
                let mut tcp = ConnectionConfig::new(ProtocolConfig::Tcp);
                tcp.port = s.port();
                NameServerConfig::new(s.ip(), true, vec![udp, tcp])
            })
            .collect();
        Ok(TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], name_servers),
            TokioRuntimeProvider::default(),
        ))
    };
    let resolver = builder.and_then(|mut b| {
        let o = b.options_mut();
        o.cache_size = 0;
        o.timeout = Duration::from_secs(2);
        o.attempts = 1;
        b.build()
            .map_err(|e| format!("building the DNS resolver: {e}"))
    });
    if let Err(e) = &resolver {
        tracing::warn!(error = %e, "no DNS resolver: peer gateways given by name cannot be reached");
    }
    resolver
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn answers_live_for_their_bounded_ttl_and_outlive_it_as_a_fallback() {
        let t0 = Instant::now();
        let mut c = Cache::default();
        assert!(c.fresh("gw", t0).is_none());
        c.store("gw", vec![ip("127.0.2.1")], Duration::from_secs(30), t0);
        assert_eq!(
            c.fresh("gw", t0 + Duration::from_secs(29)),
            Some(&[ip("127.0.2.1")][..])
        );
        assert!(c.fresh("gw", t0 + Duration::from_secs(30)).is_none());
        assert_eq!(c.last("gw"), Some(&[ip("127.0.2.1")][..]));

        // A zero TTL still holds for a second; a day-long one for 5 minutes.
        c.store("zero", vec![ip("127.0.2.2")], Duration::ZERO, t0);
        assert!(c.fresh("zero", t0 + Duration::from_millis(999)).is_some());
        c.store(
            "day",
            vec![ip("127.0.2.3")],
            Duration::from_secs(86_400),
            t0,
        );
        assert!(c.fresh("day", t0 + MAX_TTL).is_none());
    }

    #[test]
    fn a_failed_connection_expires_the_name_but_keeps_the_fallback() {
        let t0 = Instant::now();
        let mut c = Cache::default();
        c.store("gw", vec![ip("127.0.2.1")], Duration::from_secs(60), t0);
        // Within a second of the lookup, the answer stands...
        c.expire("gw", t0 + Duration::from_millis(100));
        assert!(c.fresh("gw", t0 + Duration::from_millis(999)).is_some());
        // ...after that, a failure sends the next use back to DNS.
        let t1 = t0 + Duration::from_secs(2);
        c.expire("gw", t1);
        assert!(c.fresh("gw", t1).is_none());
        assert!(c.last("gw").is_some());
        c.expire("unknown", t1);
        assert!(c.last("unknown").is_none());
    }
}
