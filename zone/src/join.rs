//! The join directory written by `fedmesh register cluster` and read by
//! `fedmesh-controller --join <dir>`: the cluster's record, its CA, and how to
//! reach the global zone. Secrets in it are 0600 in a 0700 directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use fedmesh_api::ClusterRecord;
use fedmesh_trust::ca::write_private;
use fedmesh_trust::{CaError, ClusterCa, TrustDomain};
use serde::{Deserialize, Serialize};

use fedmesh_seal::{ANCHOR_PUB_FILE, AnchorPublic};

use crate::access::EtcdTls;

pub const CLUSTER_FILE: &str = "cluster.json";
pub const ETCD_FILE: &str = "etcd.json";
pub const CA_DIR: &str = "ca";
/// The cluster's record as the anchor signed it (the envelope stored in
/// etcd): what its controller writes back when the zone has lost it.
pub const RECORD_FILE: &str = "record.json";
/// The roots' endorsements (`fedmesh_seal::Endorsement`), first rotation
/// first: what lets a reader that pins the cluster's first root follow its
/// rotations.
pub const ENDORSEMENTS_FILE: &str = "endorsements.json";
/// The cluster's SPIFFE bundle document (its root), public: what proxies
/// and gateways verify the controller with before their first SVID.
pub const BUNDLE_FILE: &str = "bundle.json";
/// Where `fedmesh rotate-ca` stages the cluster's next CA, beside `ca/`.
pub const NEXT_CA_DIR: &str = "ca-next";
/// The CA a rotation replaced.
pub const PREVIOUS_CA_DIR: &str = "ca-previous";
/// In `ca-next/`: how long the new root is published before it signs.
pub const ROTATION_FILE: &str = "rotation.json";

/// Where a join directory keeps its copies of the etcd TLS files.
pub const ETCD_TLS_DIR: &str = "etcd-tls";

/// In `ca-previous/`: when that CA stopped signing.
pub const RETIRED_FILE: &str = "retired.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Retired {
    unix_secs: u64,
}

/// A staged rotation's schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Staged {
    /// Milliseconds between publishing the new root and signing with it.
    propagation_ms: u64,
}

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
    /// TLS towards etcd. In memory the paths are usable as they are; on
    /// disk they name copies inside the join directory ([`ETCD_TLS_DIR`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EtcdTls>,
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
    /// The federation anchor, pinned at registration (`anchor.pub`): the
    /// only key the controller believes cluster records and policies from.
    /// `None` in a directory written before records were signed.
    pub anchor: Option<AnchorPublic>,
}

impl JoinDir {
    /// Writes the directory: into a sibling temp directory first, then
    /// swapped in, so a failure never leaves half a join directory, and
    /// at no moment is there none: the old one stays whole (as `<dir>.old`)
    /// until the new one is in place, and a crash between the two renames
    /// is undone by the next write or load. What a running cluster added
    /// to the old directory (a staged or retired CA) is carried over.
    pub fn write(&self, dir: &Path) -> Result<(), JoinError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JoinError::Io { path, source }
        };
        recover(dir).map_err(io(dir))?;
        let tmp = dir.with_extension("tmp");
        let old = dir.with_extension("old");
        let _ = fs::remove_dir_all(&tmp);
        let result = (|| {
            self.ca.save(&tmp.join(CA_DIR))?;
            let td = fedmesh_trust::TrustDomain::new(&self.cluster.trust_domain).map_err(|e| {
                JoinError::Invalid {
                    path: tmp.join(CLUSTER_FILE),
                    reason: e.to_string(),
                }
            })?;
            let bundle = fedmesh_trust::Bundle::with_roots(td, [self.ca.cert_der().clone()]);
            fs::write(tmp.join(BUNDLE_FILE), bundle.to_document())
                .map_err(io(&tmp.join(BUNDLE_FILE)))?;
            write_private(&tmp.join(CLUSTER_FILE), &pretty(&self.cluster))?;
            if let Some(anchor) = &self.anchor {
                fs::write(tmp.join(ANCHOR_PUB_FILE), anchor.to_pem())
                    .map_err(io(&tmp.join(ANCHOR_PUB_FILE)))?;
            }
            let etcd = EtcdAccess {
                tls: self.copy_tls(&tmp)?,
                ..self.etcd.clone()
            };
            write_private(&tmp.join(ETCD_FILE), &pretty(&etcd))?;
            if dir.exists() {
                copy_missing(dir, &tmp).map_err(io(dir))?;
                fs::rename(dir, &old).map_err(io(dir))?;
            }
            fs::rename(&tmp, dir).map_err(io(dir))
        })();
        match result {
            Ok(()) => {
                let _ = fs::remove_dir_all(&old);
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                let _ = recover(dir);
                Err(e)
            }
        }
    }

    pub fn load(dir: &Path) -> Result<Self, JoinError> {
        recover(dir).map_err(|source| JoinError::Io {
            path: dir.into(),
            source,
        })?;
        let cluster: ClusterRecord = read_json(&dir.join(CLUSTER_FILE))?;
        let mut etcd: EtcdAccess = read_json(&dir.join(ETCD_FILE))?;
        if let Some(tls) = &mut etcd.tls {
            tls.ca = dir.join(&tls.ca);
            tls.cert = tls.cert.as_ref().map(|p| dir.join(p));
            tls.key = tls.key.as_ref().map(|p| dir.join(p));
        }
        let td = TrustDomain::new(&cluster.trust_domain).map_err(|e| JoinError::Invalid {
            path: dir.join(CLUSTER_FILE),
            reason: format!("trustDomain {e}"),
        })?;
        let ca = ClusterCa::load(&dir.join(CA_DIR), &td)?;
        let anchor_path = dir.join(ANCHOR_PUB_FILE);
        let anchor = match anchor_path.exists() {
            true => Some(
                AnchorPublic::load(&anchor_path).map_err(|e| JoinError::Invalid {
                    path: anchor_path,
                    reason: e.to_string(),
                })?,
            ),
            false => None,
        };
        Ok(Self {
            cluster,
            etcd,
            ca,
            anchor,
        })
    }

    /// Copies the etcd TLS files into `dir` (the key 0600), returning their
    /// names relative to it: a join directory is whole on its own.
    fn copy_tls(&self, dir: &Path) -> Result<Option<EtcdTls>, JoinError> {
        let Some(tls) = &self.etcd.tls else {
            return Ok(None);
        };
        let rel = Path::new(ETCD_TLS_DIR);
        {
            use std::os::unix::fs::DirBuilderExt;
            let path = dir.join(rel);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(|source| JoinError::Io { path, source })?;
        }
        let copy = |from: &Path, name: &str| -> Result<PathBuf, JoinError> {
            let bytes = fs::read(from).map_err(|source| JoinError::Io {
                path: from.into(),
                source,
            })?;
            write_private(&dir.join(rel).join(name), &bytes)?;
            Ok(rel.join(name))
        };
        Ok(Some(EtcdTls {
            ca: copy(&tls.ca, "ca.pem")?,
            cert: tls
                .cert
                .as_deref()
                .map(|c| copy(c, "client.pem"))
                .transpose()?,
            key: tls
                .key
                .as_deref()
                .map(|k| copy(k, "client-key.pem"))
                .transpose()?,
        }))
    }

    /// Keeps the anchor-signed record (`record.json`).
    pub fn save_signed_record(dir: &Path, envelope: &[u8]) -> Result<(), JoinError> {
        write_private(&dir.join(RECORD_FILE), envelope).map_err(JoinError::from)
    }

    /// Appends `e` to the join directory's endorsements (as the next CA is
    /// staged).
    fn add_endorsement(dir: &Path, e: &fedmesh_seal::Endorsement) -> Result<(), JoinError> {
        let mut all = Self::endorsements(dir);
        all.push(e.clone());
        write_private(&dir.join(ENDORSEMENTS_FILE), &pretty(&all)).map_err(JoinError::from)
    }

    /// The endorsements of the cluster's roots so far; none if the file is
    /// missing or unreadable (readers then trust the pinned root and the
    /// bundle they hold, as before).
    pub fn endorsements(dir: &Path) -> Vec<fedmesh_seal::Endorsement> {
        let path = dir.join(ENDORSEMENTS_FILE);
        match fs::read(&path) {
            Ok(raw) => serde_json::from_slice(&raw).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "unreadable root endorsements; publishing the bundle without them");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    /// The anchor-signed record `register` left, if any.
    pub fn signed_record(dir: &Path) -> Option<Vec<u8>> {
        fs::read(dir.join(RECORD_FILE)).ok()
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

    /// Stages `next` as the cluster's next CA, to be published
    /// `propagation` before it signs; the running controller takes it up.
    /// Refused while another rotation is staged. Written beside and renamed
    /// into place, so the controller never sees half of it.
    pub fn stage_rotation(
        dir: &Path,
        next: &ClusterCa,
        propagation: std::time::Duration,
    ) -> Result<(), JoinError> {
        let staged = dir.join(NEXT_CA_DIR);
        if staged.exists() {
            return Err(JoinError::Invalid {
                path: staged,
                reason: "a rotation is already staged: its root becomes the CA once it signs"
                    .into(),
            });
        }
        if !dir.join(CA_DIR).is_dir() {
            return Err(JoinError::Invalid {
                path: dir.to_path_buf(),
                reason: "not a join directory (no ca/)".into(),
            });
        }
        let tmp = dir.join(format!("{NEXT_CA_DIR}.tmp"));
        let _ = fs::remove_dir_all(&tmp);
        let schedule = Staged {
            propagation_ms: u64::try_from(propagation.as_millis()).unwrap_or(u64::MAX),
        };
        // The root that signs now vouches for the next, so that a reader
        // that trusts only the cluster's first root (pinned in its record)
        // follows the rotation.
        let current = ClusterCa::load(&dir.join(CA_DIR), next.trust_domain())?;
        let subject = format!("bundles/{}", next.trust_domain());
        let endorsement =
            fedmesh_seal::endorse(&current, &subject, next.cert_der()).map_err(|e| {
                JoinError::Invalid {
                    path: dir.join(CA_DIR),
                    reason: format!("endorsing the next root: {e}"),
                }
            })?;
        let result = (|| {
            next.save(&tmp)?;
            write_private(&tmp.join(ROTATION_FILE), &pretty(&schedule))?;
            Self::add_endorsement(dir, &endorsement)?;
            fs::rename(&tmp, &staged).map_err(|source| JoinError::Io {
                path: staged.clone(),
                source,
            })
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    /// The staged next CA of `td` and its propagation delay, if one is
    /// staged.
    pub fn staged_rotation(
        dir: &Path,
        td: &TrustDomain,
    ) -> Result<Option<(ClusterCa, std::time::Duration)>, JoinError> {
        let staged = dir.join(NEXT_CA_DIR);
        if !staged.exists() {
            return Ok(None);
        }
        let ca = ClusterCa::load(&staged, td)?;
        let schedule: Staged = read_json(&staged.join(ROTATION_FILE))?;
        Ok(Some((
            ca,
            std::time::Duration::from_millis(schedule.propagation_ms),
        )))
    }

    /// The CA the last rotation replaced, if the directory keeps it, and
    /// when it stopped signing.
    pub fn previous_ca(dir: &Path, td: &TrustDomain) -> Option<(ClusterCa, SystemTime)> {
        let previous = dir.join(PREVIOUS_CA_DIR);
        let ca = ClusterCa::load(&previous, td).ok()?;
        let retired: Retired = read_json(&previous.join(RETIRED_FILE)).ok()?;
        Some((
            ca,
            UNIX_EPOCH + std::time::Duration::from_secs(retired.unix_secs),
        ))
    }

    /// The staged CA signs now: it becomes the directory's CA (the old one
    /// moves to `ca-previous/`), so that a restarted controller signs with
    /// it too.
    pub fn promote_staged(dir: &Path) -> Result<(), JoinError> {
        let io = |path: PathBuf| move |source| JoinError::Io { path, source };
        let (ca, next, previous) = (
            dir.join(CA_DIR),
            dir.join(NEXT_CA_DIR),
            dir.join(PREVIOUS_CA_DIR),
        );
        if !next.is_dir() {
            return Ok(());
        }
        let _ = fs::remove_file(next.join(ROTATION_FILE));
        let _ = fs::remove_dir_all(&previous);
        fs::rename(&ca, &previous).map_err(io(ca.clone()))?;
        let retired = Retired {
            unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        write_private(&previous.join(RETIRED_FILE), &pretty(&retired))?;
        fs::rename(&next, &ca).map_err(io(next.clone()))
    }
}

/// Puts back a join directory that a crash left renamed to `<dir>.old`
/// (between the two renames of [`JoinDir::write`]).
fn recover(dir: &Path) -> std::io::Result<()> {
    let old = dir.with_extension("old");
    if !dir.exists() && old.is_dir() {
        fs::rename(&old, dir)?;
    }
    Ok(())
}

/// Copies into `to` what `from` has and `to` lacks (files, and directories
/// of files), keeping permissions.
fn copy_missing(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if target.exists() {
            continue;
        }
        if entry.file_type()?.is_dir() {
            fs::create_dir_all(&target)?;
            fs::set_permissions(&target, entry.metadata()?.permissions())?;
            copy_missing(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod rotation_tests {
    use super::*;
    use fedmesh_trust::CaOptions;
    use std::time::Duration;

    #[test]
    fn a_staged_rotation_reads_back_and_is_promoted_once() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("aws.fedmesh.test").unwrap();
        let now = SystemTime::now();
        let first = ClusterCa::generate(&td, &CaOptions::default(), now).unwrap();
        first.save(&dir.path().join(CA_DIR)).unwrap();
        assert!(JoinDir::staged_rotation(dir.path(), &td).unwrap().is_none());

        let next = ClusterCa::generate(&td, &CaOptions::default(), now).unwrap();
        JoinDir::stage_rotation(dir.path(), &next, Duration::from_secs(90)).unwrap();
        let (staged, delay) = JoinDir::staged_rotation(dir.path(), &td).unwrap().unwrap();
        assert_eq!(staged.cert_der(), next.cert_der());
        assert_eq!(delay, Duration::from_secs(90));
        let again = JoinDir::stage_rotation(dir.path(), &next, Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(again.contains("already staged"), "{again}");

        JoinDir::promote_staged(dir.path()).unwrap();
        let ca = ClusterCa::load(&dir.path().join(CA_DIR), &td).unwrap();
        assert_eq!(ca.cert_der(), next.cert_der());
        let (old, retired) = JoinDir::previous_ca(dir.path(), &td).unwrap();
        assert_eq!(old.cert_der(), first.cert_der());
        assert!(retired <= SystemTime::now() && retired + Duration::from_secs(5) > now);
        assert!(JoinDir::staged_rotation(dir.path(), &td).unwrap().is_none());
        // Nothing staged: promoting again changes nothing.
        JoinDir::promote_staged(dir.path()).unwrap();
        let ca = ClusterCa::load(&dir.path().join(CA_DIR), &td).unwrap();
        assert_eq!(ca.cert_der(), next.cert_der());
    }

    #[test]
    fn a_rewrite_keeps_a_staged_rotation_and_a_crash_between_renames_is_undone() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("join");
        let td = TrustDomain::new("aws.fedmesh.test").unwrap();
        let now = SystemTime::now();
        let join = JoinDir {
            cluster: serde_json::from_value(serde_json::json!({
                "name": "aws", "cloud": "aws", "region": "r1", "zones": ["a"],
                "trustDomain": "aws.fedmesh.test", "gateways": [{"address": "127.0.1.1", "port": 15443}],
                "registeredAt": "2026-11-30T00:00:00Z"
            }))
            .unwrap(),
            etcd: EtcdAccess {
                endpoints: vec!["http://127.0.0.1:2379".into()],
                prefix: "/fedmesh/v1/".into(),
                user: None,
                password: None,
                tls: None,
            },
            ca: ClusterCa::generate(&td, &CaOptions::default(), now).unwrap(),
            anchor: Some(fedmesh_seal::AnchorKey::generate().unwrap().public()),
        };
        join.write(&dir).unwrap();
        assert_eq!(JoinDir::load(&dir).unwrap().anchor, join.anchor, "pinned");
        // The bundle proxies bootstrap from: the CA's root.
        let doc = fs::read(dir.join(BUNDLE_FILE)).unwrap();
        let bundle = fedmesh_trust::Bundle::from_document(td.clone(), &doc, "bundle.json").unwrap();
        assert_eq!(bundle.roots(), [join.ca.cert_der().clone()]);
        let next = ClusterCa::generate(&td, &CaOptions::default(), now).unwrap();
        JoinDir::stage_rotation(&dir, &next, Duration::from_secs(1)).unwrap();
        join.write(&dir).unwrap();
        assert!(
            JoinDir::staged_rotation(&dir, &td).unwrap().is_some(),
            "kept"
        );
        assert!(!dir.with_extension("old").exists() && !dir.with_extension("tmp").exists());
        // A crash after the old directory moved aside, before the new one
        // moved in: the next load puts the old one back.
        fs::rename(&dir, dir.with_extension("old")).unwrap();
        let back = JoinDir::load(&dir).unwrap();
        assert_eq!(back.ca.cert_der(), join.ca.cert_der());
    }

    #[test]
    fn staging_outside_a_join_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("aws.fedmesh.test").unwrap();
        let next = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
        let e = JoinDir::stage_rotation(dir.path(), &next, Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a join directory"), "{e}");
    }
}
