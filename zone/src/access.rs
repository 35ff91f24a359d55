//! How every fedmesh process reaches the global zone: the endpoint rules
//! (TLS, or plaintext only to a loopback etcd and only when an endpoint
//! says `http://`), and the client's TLS material. The `fedmesh` command and
//! the controller build their etcd options here, so both refuse the same
//! things with the same words.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

use crate::join::EtcdAccess;

/// TLS towards etcd: the CA that signed etcd's server certificate, and the
/// client's own certificate and key when etcd asks for one
/// (`--client-cert-auth`). Relative paths in a join directory's `etcd.json`
/// are read against the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdTls {
    pub ca: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// Why the global zone's access is unusable as given. None of these is
/// worth retrying: the configuration has to change.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("no etcd endpoint given")]
    NoEndpoint,
    #[error("{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
}

/// What an endpoint's scheme asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Plain,
    Tls,
}

/// Checks `endpoints` against the rules: each names its scheme; all use
/// the same one; `https://` needs a CA to verify etcd with; `http://` is
/// for a loopback etcd only, and never with TLS files.
pub fn check_endpoints(endpoints: &[String], tls: bool) -> Result<(), AccessError> {
    if endpoints.is_empty() {
        return Err(AccessError::NoEndpoint);
    }
    let mut seen = None;
    for e in endpoints {
        let bad = |reason: &str| AccessError::Endpoint {
            endpoint: e.clone(),
            reason: reason.into(),
        };
        let (scheme, rest) = if let Some(rest) = e.strip_prefix("https://") {
            (Scheme::Tls, rest)
        } else if let Some(rest) = e.strip_prefix("http://") {
            (Scheme::Plain, rest)
        } else {
            return Err(bad(
                "name the scheme: https:// (TLS), or http:// for an etcd on loopback without TLS",
            ));
        };
        if *seen.get_or_insert(scheme) != scheme {
            return Err(bad("mixes http:// and https:// endpoints"));
        }
        let host = host_of(rest).ok_or_else(|| bad("no host"))?;
        match scheme {
            Scheme::Tls if !tls => {
                return Err(bad("TLS needs the CA that signed etcd's certificate \
                     (--etcd-cacert or FEDMESH_ETCD_CACERT; `tls.ca` in a join directory's etcd.json)"));
            }
            Scheme::Plain if tls => {
                return Err(bad("TLS files are given: use https://"));
            }
            Scheme::Plain if !is_loopback(host) => {
                return Err(bad(
                    "plaintext etcd is refused beyond loopback: records, bundles and \
                     credentials would cross the network readable and writable; use https:// \
                     with --etcd-cacert",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The host of `authority[/path]`, without brackets or port.
fn host_of(rest: &str) -> Option<&str> {
    let authority = rest.split('/').next().unwrap_or_default();
    let authority = authority.rsplit('@').next().unwrap_or_default();
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The etcd client's options for `access`: endpoints checked, TLS material
/// read, credentials set. `connect_timeout` bounds each dial.
pub fn connect_options(
    access: &EtcdAccess,
    connect_timeout: Duration,
) -> Result<ConnectOptions, AccessError> {
    check_endpoints(&access.endpoints, access.tls.is_some())?;
    let mut opts = ConnectOptions::new().with_connect_timeout(connect_timeout);
    if let Some(tls) = &access.tls {
        opts = opts.with_tls(tls_options(tls)?);
    }
    if let (Some(u), Some(p)) = (&access.user, &access.password) {
        opts = opts.with_user(u.as_str(), p.as_str());
    }
    Ok(opts)
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, AccessError> {
    let ca = read("etcd CA", &tls.ca)?;
    if !String::from_utf8_lossy(&ca).contains("-----BEGIN CERTIFICATE-----") {
        return Err(AccessError::Tls(format!(
            "etcd CA {}: no PEM certificate in it",
            tls.ca.display()
        )));
    }
    let mut opts = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let (cert_pem, key_pem) = (
                read("etcd client certificate", cert)?,
                read("etcd client key", key)?,
            );
            opts = opts.identity(Identity::from_pem(cert_pem, key_pem));
        }
        (None, None) => {}
        _ => {
            return Err(AccessError::Tls(
                "an etcd client certificate needs its key, and a key its certificate \
                 (--etcd-cert with --etcd-key)"
                    .into(),
            ));
        }
    }
    Ok(opts)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, AccessError> {
    std::fs::read(path).map_err(|source| AccessError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(endpoints: &[&str], tls: bool) -> Result<(), String> {
        let v: Vec<String> = endpoints.iter().map(|s| s.to_string()).collect();
        check_endpoints(&v, tls).map_err(|e| e.to_string())
    }

    #[test]
    fn plaintext_only_to_loopback_and_only_when_asked() {
        assert!(check(&["http://127.0.0.1:2379"], false).is_ok());
        assert!(check(&["http://127.3.0.9:2379", "http://localhost:1"], false).is_ok());
        assert!(check(&["http://[::1]:2379"], false).is_ok());
        let e = check(&["http://10.0.0.5:2379"], false).unwrap_err();
        assert!(
            e.contains("10.0.0.5") && e.contains("beyond loopback"),
            "{e}"
        );
        let e = check(&["http://etcd.example:2379"], false).unwrap_err();
        assert!(e.contains("beyond loopback"), "{e}");
        // No scheme: not a silent plaintext.
        let e = check(&["127.0.0.1:2379"], false).unwrap_err();
        assert!(e.contains("name the scheme"), "{e}");
    }

    #[test]
    fn tls_needs_a_ca_and_https() {
        assert!(check(&["https://etcd.example:2379"], true).is_ok());
        let e = check(&["https://127.0.0.1:2379"], false).unwrap_err();
        assert!(e.contains("--etcd-cacert"), "{e}");
        let e = check(&["http://127.0.0.1:2379"], true).unwrap_err();
        assert!(e.contains("use https://"), "{e}");
        let e = check(&["https://a:1", "http://127.0.0.1:2"], true).unwrap_err();
        assert!(e.contains("mixes"), "{e}");
        assert!(matches!(
            check_endpoints(&[], false),
            Err(AccessError::NoEndpoint)
        ));
    }

    #[test]
    fn tls_files_are_read_with_their_names_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let access = |tls| EtcdAccess {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            prefix: "/fedmesh/v1/".into(),
            user: None,
            password: None,
            tls: Some(tls),
        };
        let missing = dir.path().join("nope.pem");
        let e = connect_options(
            &access(EtcdTls {
                ca: missing.clone(),
                cert: None,
                key: None,
            }),
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("etcd CA") && e.contains("nope.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = connect_options(
            &access(EtcdTls {
                ca: junk.clone(),
                cert: None,
                key: None,
            }),
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("junk.pem") && e.contains("no PEM"), "{e}");
    }
}

/// Why an etcd of `version` (as its status reports it, `3.4.23`) cannot
/// be trusted to keep one cluster's role off another's keys, naming the
/// advisories; `None` when none we know of applies. The releases named are
/// the first of each line after its fixes for nested transactions; the zone
/// stays safe either way (signatures, not etcd roles, keep it), but an
/// operator should know what etcd's own roles are worth.
pub fn rbac_advisories(version: &str) -> Option<String> {
    let mut parts = version.trim_start_matches('v').split('.');
    let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
    let (major, minor, patch) = (next()?, next()?, next().unwrap_or(0));
    let fixed = match (major, minor) {
        (3, 4) => 44,
        (3, 5) => 30,
        (3, 6) => 11,
        (3, m) if m < 4 => u32::MAX,
        _ => return None,
    };
    (patch < fixed).then(|| {
        format!(
            "etcd {version} lets a user past its key permissions inside transactions \
             (GHSA-rfx7-8w68-q57q, GHSA-q8m4-xhhv-38mg, GHSA-x35m-3gp4-4fh5; fixed in \
             3.4.44, 3.5.30, 3.6.11): any cluster's credentials can write any key. \
             fedmesh readers believe only signed values, so this moves no traffic, but \
             upgrade etcd when you can"
        )
    })
}

#[cfg(test)]
mod advisories {
    use super::rbac_advisories;

    #[test]
    fn versions_before_the_fixes_are_named() {
        for v in ["3.4.23", "v3.5.29", "3.6.10", "3.3.27"] {
            let w = rbac_advisories(v).unwrap();
            assert!(w.contains(v) && w.contains("GHSA-rfx7-8w68-q57q"), "{w}");
        }
        for v in ["3.4.44", "3.5.30", "3.6.11", "3.7.0", "4.0.0", "nonsense"] {
            assert_eq!(rbac_advisories(v), None, "{v}");
        }
    }
}
