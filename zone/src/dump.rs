//! The global zone written down as signed: what a controller keeps on disk
//! as its last good view, and what `fedmesh zone backup` writes and
//! `fedmesh zone restore` reads.
//!
//! A dump is never trusted for what it is: whoever reads one feeds its
//! values through a [`Gate`] (the same one etcd's values go through), so a
//! dump tampered with, or older than what a reader holds, changes nothing.
//! Records are kept as signed (envelopes, signed deletions included);
//! exports as the plain values the signed manifests vouch for.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::client::RawKv;
use crate::gate::{Gate, ListedExports};

/// A controller's last good view, in its state directory.
pub const LAST_GOOD_FILE: &str = "last-good-view.json";

/// The dump format this build writes and reads.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneDump {
    pub format: u32,
    /// The key prefix the keys below start with.
    pub prefix: String,
    #[serde(with = "time::serde::rfc3339")]
    pub taken_at: OffsetDateTime,
    /// Cluster records, bundles, manifests (`seen/`) and policies, as
    /// signed.
    pub records: Vec<DumpedKv>,
    /// Exports, as written.
    pub exports: Vec<DumpedKv>,
}

/// One key and its value (a JSON text) as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpedKv {
    pub key: String,
    pub value: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a global-zone dump: {message}")]
    Malformed { path: String, message: String },
    #[error(
        "{path}: dump format {found}; this fedmesh reads format {FORMAT} (written by another version)"
    )]
    Format { path: String, found: u32 },
    #[error("{path}: the dump is of the key prefix {found:?}, not {expected:?}")]
    Prefix {
        path: String,
        found: String,
        expected: String,
    },
}

/// What a gate believes of a dump (or of any listing): the plain records,
/// and each believed cluster's exports.
#[derive(Debug, Default)]
pub struct Admitted {
    pub records: Vec<RawKv>,
    pub exports: BTreeMap<String, ListedExports>,
}

impl ZoneDump {
    /// A dump of `records` (as signed) and `exports` (plain), taken `now`.
    pub fn new(prefix: &str, records: Vec<RawKv>, exports: Vec<RawKv>, now: SystemTime) -> Self {
        // Believed values are JSON, so text; anything else is not kept.
        let text = |kvs: Vec<RawKv>| {
            kvs.into_iter()
                .filter_map(|kv| {
                    Some(DumpedKv {
                        value: String::from_utf8(kv.value).ok()?,
                        key: kv.key,
                    })
                })
                .collect()
        };
        Self {
            format: FORMAT,
            prefix: prefix.to_owned(),
            taken_at: OffsetDateTime::from(now),
            records: text(records),
            exports: text(exports),
        }
    }

    /// Parses a dump read from `path`, checking its format and prefix.
    pub fn parse(bytes: &[u8], path: &Path, prefix: &str) -> Result<Self, DumpError> {
        let p = path.display().to_string();
        let dump: ZoneDump = serde_json::from_slice(bytes).map_err(|e| DumpError::Malformed {
            path: p.clone(),
            message: e.to_string(),
        })?;
        if dump.format != FORMAT {
            return Err(DumpError::Format {
                path: p,
                found: dump.format,
            });
        }
        if dump.prefix != prefix {
            return Err(DumpError::Prefix {
                path: p,
                found: dump.prefix,
                expected: prefix.to_owned(),
            });
        }
        Ok(dump)
    }

    pub fn read(path: &Path, prefix: &str) -> Result<Self, DumpError> {
        let bytes = std::fs::read(path).map_err(|source| DumpError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes, path, prefix)
    }

    /// Writes the dump to `path` (0600) so that a reader, or a crash, only
    /// ever finds the old file or the new one whole.
    pub fn write(&self, path: &Path) -> Result<(), DumpError> {
        let io = |source| DumpError::Io {
            path: path.display().to_string(),
            source,
        };
        let bytes = serde_json::to_vec(self).map_err(|e| io(std::io::Error::other(e)))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let mut f = open_private(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The records as etcd values (revision 0).
    pub fn record_kvs(&self) -> Vec<RawKv> {
        kvs(&self.records)
    }

    pub fn export_kvs(&self) -> Vec<RawKv> {
        kvs(&self.exports)
    }

    /// What `gate` believes of this dump, on top of what it held.
    pub fn admit(&self, gate: &mut Gate, now: SystemTime) -> Admitted {
        admit(gate, self.record_kvs(), self.export_kvs(), now)
    }
}

fn kvs(dumped: &[DumpedKv]) -> Vec<RawKv> {
    dumped
        .iter()
        .map(|d| RawKv {
            key: d.key.clone(),
            value: d.value.clone().into_bytes(),
            mod_revision: 0,
        })
        .collect()
}

/// Judges a whole listing, records first: the plain records `gate`
/// believes (including those it held that the listing lacked), and the
/// exports of each cluster whose record it believes.
pub fn admit(
    gate: &mut Gate,
    records: Vec<RawKv>,
    exports: Vec<RawKv>,
    now: SystemTime,
) -> Admitted {
    let records = gate.admit_records(records, now);
    let mut by_cluster: BTreeMap<String, Vec<RawKv>> = gate
        .clusters()
        .map(|c| (c.to_owned(), Vec::new()))
        .collect();
    for kv in exports {
        if let Some((c, ..)) = gate.keys().parse_export(&kv.key)
            && let Some(list) = by_cluster.get_mut(c)
        {
            list.push(kv);
        }
    }
    let exports = by_cluster
        .into_iter()
        .map(|(c, kvs)| {
            let listed = gate.admit_exports(&c, kvs);
            (c, listed)
        })
        .collect();
    Admitted { records, exports }
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::create(path)
}

/// What `fedmesh zone restore` writes, in order: never a record older than
/// the one etcd holds, and only what the reader's gate believes of the
/// dump.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RestorePlan {
    /// Records (cluster records and bundles first), each cluster's exports
    /// before its manifest, policies last. `None`: a delete (an export etcd
    /// holds that the restored manifest does not list).
    pub writes: Vec<(String, Option<Vec<u8>>)>,
    /// Records written back.
    pub records: usize,
    /// Exports written back or deleted.
    pub exports: usize,
    /// Records etcd already holds (as new as the dump's, or newer).
    pub kept: usize,
    /// Clusters whose exports are restored.
    pub clusters: Vec<String>,
}

/// Plans a restore. `merged` has believed the dump, then what etcd holds
/// (so the newer of each wins, and etcd's signed deletions take what they
/// take); `dump` is what it believed of the dump; `etcd` are etcd's
/// believed records as signed, `etcd_exports` its raw exports by cluster.
/// Every record `merged` believes that etcd does not hold as such is
/// written; a manifest with the dump's exports of its cluster.
pub fn plan_restore(
    merged: &Gate,
    dump: &Admitted,
    etcd: &[RawKv],
    etcd_exports: &BTreeMap<String, Vec<RawKv>>,
) -> RestorePlan {
    let keys = merged.keys();
    let in_etcd: BTreeMap<&str, &[u8]> = etcd
        .iter()
        .map(|kv| (kv.key.as_str(), &kv.value[..]))
        .collect();
    let mut records = merged.signed_records();
    records.sort_by_key(|kv| {
        keys.parse(&kv.key)
            .as_ref()
            .map_or(u8::MAX, crate::gate::rank)
    });
    let mut plan = RestorePlan::default();
    for kv in records {
        if in_etcd.get(kv.key.as_str()) == Some(&&kv.value[..]) {
            plan.kept += 1;
            continue;
        }
        if let Some(fedmesh_api::GlobalKey::Seen(cluster)) = keys.parse(&kv.key) {
            // The manifest comes back with the exports it vouches for, and
            // without those it does not list.
            let ours = dump.exports.get(&cluster).map_or(&[][..], |l| &l.kvs[..]);
            let listed: std::collections::BTreeSet<&str> =
                ours.iter().map(|e| e.key.as_str()).collect();
            for stale in etcd_exports.get(&cluster).into_iter().flatten() {
                if !listed.contains(stale.key.as_str()) {
                    plan.writes.push((stale.key.clone(), None));
                    plan.exports += 1;
                }
            }
            for e in ours {
                plan.writes.push((e.key.clone(), Some(e.value.clone())));
                plan.exports += 1;
            }
            plan.clusters.push(cluster);
        }
        plan.writes.push((kv.key, Some(kv.value)));
        plan.records += 1;
    }
    plan
}
