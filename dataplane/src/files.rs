//! What a data-plane component's config file needs from disk before it
//! can reach its controller: the file itself with a reader for the files
//! it names (relative to its directory), and the bootstrap bundle and
//! join token. Shared by the gateway and the proxy.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use fedmesh_trust::{Bundle, BundleSet, TrustDomain};

/// The directory a config file's relative paths start from.
#[derive(Debug, Clone)]
pub struct Beside(PathBuf);

impl Beside {
    /// Reads a file the config names.
    pub fn read(&self, p: &Path) -> Result<Vec<u8>, String> {
        let full = self.0.join(p);
        std::fs::read(&full).map_err(|e| format!("cannot read {}: {e}", full.display()))
    }
}

/// A config that cannot be used: the file, and what in it is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    pub origin: String,
    /// Names the field (and the YAML line and column, where the parser
    /// knows them).
    pub message: String,
}

impl ConfigError {
    /// A maker of errors about `origin`.
    pub fn at(origin: &str) -> impl Fn(String) -> ConfigError + '_ {
        move |message| ConfigError {
            origin: origin.into(),
            message,
        }
    }
}

/// Reads a config file: its text, and where the files it names are.
pub fn read_config(path: &Path) -> Result<(String, Beside), ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::at(&origin)(format!("cannot read: {e}")))?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok((text, Beside(base)))
}

/// A data-plane process's config document (the gateway's, the proxy's):
/// what it parses into once checked.
pub trait ConfigFile: DeserializeOwned {
    type Config;

    /// Checks the document and reads the files it names with `read`. The
    /// error names the field (`listen.tcp[1].address: ...`).
    fn check(self, read: &dyn Fn(&Path) -> Result<Vec<u8>, String>)
    -> Result<Self::Config, String>;
}

/// Reads the config file at `path` and the files it names (relative to its
/// directory), and checks it.
pub fn load_config<F: ConfigFile>(path: &Path) -> Result<F::Config, ConfigError> {
    let (text, beside) = read_config(path)?;
    parse_config::<F>(&text, &path.display().to_string(), |p| beside.read(p))
}

/// Parses and checks a config document; `read` fetches the files it names.
pub fn parse_config<F: ConfigFile>(
    yaml: &str,
    origin: &str,
    read: impl Fn(&Path) -> Result<Vec<u8>, String>,
) -> Result<F::Config, ConfigError> {
    let f: F = parse_yaml(yaml, origin)?;
    f.check(&read).map_err(ConfigError::at(origin))
}

/// Parses a YAML document into `F` (whose serde attributes refuse unknown
/// fields); the error names the line and column.
pub fn parse_yaml<F: DeserializeOwned>(yaml: &str, origin: &str) -> Result<F, ConfigError> {
    serde_saphyr::from_str(yaml).map_err(|e| ConfigError::at(origin)(e.to_string()))
}

/// How a component proves itself for its first SVID, from its
/// `controller` block: a join token (`joinTokenFile`, read now) or, on
/// Kubernetes, a projected ServiceAccount token (`serviceAccountTokenFile`,
/// read at each use: the kubelet rotates it). Exactly one of the two.
/// Returns it with the bundle of our own trust domain `td`, which verifies
/// the controller before anything else is known. Errors name
/// `controller.bundle`, `controller.joinTokenFile` or the pair.
pub fn credential(
    td: &TrustDomain,
    bundle: &Path,
    join_token_file: Option<&Path>,
    service_account_token_file: Option<&Path>,
    read: &impl Fn(&Path) -> Result<Vec<u8>, String>,
) -> Result<(BundleSet, fedmesh_discovery::Credential), String> {
    use fedmesh_discovery::Credential;
    let own = || {
        let doc = read(bundle).map_err(|e| format!("controller.bundle: {e}"))?;
        let own = Bundle::from_document(td.clone(), &doc, &bundle.display().to_string())
            .map_err(|e| format!("controller.bundle: {e}"))?;
        let mut set = BundleSet::new();
        set.insert(own);
        Ok::<_, String>(set)
    };
    match (join_token_file, service_account_token_file) {
        (Some(file), None) => {
            let set = own()?;
            Ok((set, Credential::JoinToken(join_token(file, read)?)))
        }
        (None, Some(file)) => Ok((own()?, Credential::ServiceAccountToken(file.to_path_buf()))),
        _ => Err("controller: set exactly one of joinTokenFile (a join token) and serviceAccountTokenFile (a projected ServiceAccount token, on Kubernetes)".into()),
    }
}

/// The join token in `file`, trimmed; never empty.
fn join_token(
    file: &Path,
    read: &impl Fn(&Path) -> Result<Vec<u8>, String>,
) -> Result<String, String> {
    let token = read(file).map_err(|e| format!("controller.joinTokenFile: {e}"))?;
    let token = String::from_utf8(token)
        .map_err(|_| "controller.joinTokenFile: not UTF-8 text".to_string())?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err("controller.joinTokenFile: the file is empty".into());
    }
    Ok(token)
}

/// Publishes an SVID and bundle set re-read from files, each only if it
/// changed, so that nothing downstream rebuilds for an unchanged file.
pub fn publish_identity(
    svid_tx: &tokio::sync::watch::Sender<std::sync::Arc<fedmesh_trust::Svid>>,
    svid: fedmesh_trust::Svid,
    bundles_tx: &tokio::sync::watch::Sender<std::sync::Arc<BundleSet>>,
    bundles: BundleSet,
) {
    svid_tx.send_if_modified(|s| {
        let changed = s.chain() != svid.chain();
        if changed {
            tracing::info!(not_after = ?svid.not_after(), "certificate reloaded");
            *s = std::sync::Arc::new(svid);
        }
        changed
    });
    bundles_tx.send_if_modified(|b| {
        let changed = **b != bundles;
        if changed {
            tracing::info!("bundles reloaded");
            *b = std::sync::Arc::new(bundles);
        }
        changed
    });
}

/// The controller's discovery API as a config file names it: `ip:port`, or
/// `name:port` (a Kubernetes Service's DNS name), looked up once at start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(transparent)]
pub struct ControllerAddress(pub String);

impl From<std::net::SocketAddr> for ControllerAddress {
    fn from(a: std::net::SocketAddr) -> Self {
        Self(a.to_string())
    }
}

impl ControllerAddress {
    /// The address to dial: the first a DNS name resolves to.
    pub fn resolve(&self) -> Result<std::net::SocketAddr, String> {
        if let Ok(a) = self.0.parse() {
            return Ok(a);
        }
        let malformed = || {
            format!(
                "controller.address: {:?} is not ip:port or name:port",
                self.0
            )
        };
        let (host, port) = self.0.rsplit_once(':').ok_or_else(malformed)?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(malformed());
        }
        use std::net::ToSocketAddrs;
        self.0
            .to_socket_addrs()
            .map_err(|e| format!("controller.address: looking up {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("controller.address: {host} has no address"))
    }
}

#[cfg(test)]
mod controller_address_tests {
    use super::ControllerAddress;

    #[test]
    fn an_address_or_a_name_with_a_port() {
        let a = ControllerAddress("127.0.1.2:15010".into())
            .resolve()
            .unwrap();
        assert_eq!(a.to_string(), "127.0.1.2:15010");
        let a = ControllerAddress("localhost:15010".into())
            .resolve()
            .unwrap();
        assert_eq!(a.port(), 15010);
        for bad in [
            "127.0.1.2",
            "controller",
            ":15010",
            "controller:0",
            "controller:x",
        ] {
            let e = ControllerAddress(bad.into()).resolve().unwrap_err();
            assert!(e.starts_with("controller.address:"), "{bad}: {e}");
        }
    }
}
