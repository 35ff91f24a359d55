//! The join directory written by `fedmesh register cluster` and read by
//! `fedmesh-controller --join <dir>`: the cluster's record, its CA, and how to
//! reach the global zone. Secrets in it are 0600 in a 0700 directory.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use fedmesh_api::ClusterRecord;
use fedmesh_trust::ca::write_private;
use fedmesh_trust::{CaError, ClusterCa, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

pub const CLUSTER_FILE: &str = "cluster.json";
pub const ETCD_FILE: &str = "etcd.json";
pub const CA_DIR: &str = "ca";

/// How a cluster reaches the global zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdAccess {
    pub endpoints: Vec<String>,
    /// The global zone's key prefix.
    pub prefix: String,
    /// Set when etcd runs with auth: this cluster's own user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Everything a controller needs to start.
#[derive(Debug)]
pub struct JoinDir {
    pub cluster: ClusterRecord,
    pub etcd: EtcdAccess,
    pub ca: ClusterCa,
}

impl JoinDir {
    /// Writes the directory: into a sibling temp directory first, then
    /// renamed into place, so a failure never leaves half a join directory.
    pub fn write(&self, dir: &Path) -> Result<(), JoinError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JoinError::Io { path, source }
        };
        let tmp = dir.with_extension("tmp");
        let _ = fs::remove_dir_all(&tmp);
        let result = (|| {
            self.ca.save(&tmp.join(CA_DIR))?;
            write_private(&tmp.join(CLUSTER_FILE), &pretty(&self.cluster))?;
            write_private(&tmp.join(ETCD_FILE), &pretty(&self.etcd))?;
            if dir.exists() {
                fs::remove_dir_all(dir).map_err(io(dir))?;
            }
            fs::rename(&tmp, dir).map_err(io(dir))
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    pub fn load(dir: &Path) -> Result<Self, JoinError> {
        let cluster: ClusterRecord = read_json(&dir.join(CLUSTER_FILE))?;
        let etcd: EtcdAccess = read_json(&dir.join(ETCD_FILE))?;
        let td = TrustDomain::new(&cluster.trust_domain).map_err(|e| JoinError::Invalid {
            path: dir.join(CLUSTER_FILE),
            reason: format!("trustDomain {e}"),
        })?;
        let ca = ClusterCa::load(&dir.join(CA_DIR), &td)?;
        Ok(Self { cluster, etcd, ca })
    }

    /// Only the CA, if `dir` holds one for `td`; used to keep registration
    /// idempotent across runs.
    pub fn existing_ca(dir: &Path, td: &TrustDomain) -> Option<ClusterCa> {
        ClusterCa::load(&dir.join(CA_DIR), td).ok()
    }

    /// Only the etcd access, if present.
    pub fn existing_etcd(dir: &Path) -> Option<EtcdAccess> {
        read_json(&dir.join(ETCD_FILE)).ok()
    }
}

fn pretty<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap_or_default()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, JoinError> {
    let raw = fs::read(path).map_err(|source| JoinError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_slice(&raw).map_err(|e| JoinError::Invalid {
        path: path.into(),
        reason: e.to_string(),
    })
}
/// The join tokens a controller's `Certify` accepts (`fedmesh-controller
/// --tokens`): each lets its bearer be issued one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    pub tokens: Vec<TokenEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenEntry {
    pub token: String,
    pub spiffe_id: SpiffeId,
}

impl TokensFile {
    /// The shortest token accepted: a guessable one would hand out SVIDs.
    pub const MIN_TOKEN_LEN: usize = 16;

    /// Each token with the identity it allows. An error names the entry:
    /// `tokens[2].token: ...`.
    pub fn checked(self) -> Result<HashMap<String, SpiffeId>, String> {
        let mut out = HashMap::new();
        for (i, t) in self.tokens.into_iter().enumerate() {
            if t.token.len() < Self::MIN_TOKEN_LEN {
                return Err(format!(
                    "tokens[{i}].token: use at least {} characters",
                    Self::MIN_TOKEN_LEN
                ));
            }
            if out.insert(t.token, t.spiffe_id).is_some() {
                return Err(format!("tokens[{i}].token: listed twice"));
            }
        }
        Ok(out)
    }
}
