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

/// A dump, whole in memory: what `fedmesh zone backup` and `restore`
/// handle. A controller's last good view is written and read a line at a
/// time instead ([`write_lines`], [`DumpReader`]), so that a million
/// exports never sit in memory twice.
///
/// On disk a dump is JSON lines: a header (`{"format", "prefix",
/// "takenAt"}`), then one `{"key", "value"}` line per record (as signed),
/// then one per export, grouped by cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneDump {
    pub header: DumpHeader,
    /// Cluster records, bundles, manifests (`seen/`), policies and the
    /// anchor chain, as signed.
    pub records: Vec<DumpedKv>,
    /// Exports, as written.
    pub exports: Vec<DumpedKv>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DumpHeader {
    pub format: u32,
    /// The key prefix every key below starts with.
    pub prefix: String,
    #[serde(with = "time::serde::rfc3339")]
    pub taken_at: OffsetDateTime,
}

impl DumpHeader {
    pub fn new(prefix: &str, now: SystemTime) -> Self {
        Self {
            format: FORMAT,
            prefix: prefix.to_owned(),
            taken_at: OffsetDateTime::from(now),
        }
    }
}

/// One key and its value (a JSON text) as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpedKv {
    pub key: String,
    pub value: String,
}

impl DumpedKv {
    fn into_raw(self) -> RawKv {
        RawKv {
            key: self.key,
            value: self.value.into_bytes(),
            mod_revision: 0,
        }
    }

    /// `kv`, if its value is text: believed values are JSON, anything else
    /// is not kept.
    fn of(kv: RawKv) -> Option<Self> {
        Some(DumpedKv {
            value: String::from_utf8(kv.value).ok()?,
            key: kv.key,
        })
    }

    fn raw(&self) -> RawKv {
        RawKv {
            key: self.key.clone(),
            value: self.value.clone().into_bytes(),
            mod_revision: 0,
        }
    }
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
        let mut exports: Vec<DumpedKv> = exports.into_iter().filter_map(DumpedKv::of).collect();
        // Grouped by cluster, as a reader takes them.
        exports.sort_by(|a, b| a.key.cmp(&b.key));
        Self {
            header: DumpHeader::new(prefix, now),
            records: records.into_iter().filter_map(DumpedKv::of).collect(),
            exports,
        }
    }

    /// Parses a dump read from `path`, checking its format and prefix.
    pub fn parse(bytes: &[u8], path: &Path, prefix: &str) -> Result<Self, DumpError> {
        let mut reader = DumpReader::new(std::io::BufReader::new(bytes), path, prefix)?;
        let records = reader.records_dumped()?;
        let mut exports = Vec::new();
        while let Some(kv) = reader.next_kv()? {
            exports.push(kv);
        }
        Ok(Self {
            header: reader.header.clone(),
            records,
            exports,
        })
    }

    pub fn read(path: &Path, prefix: &str) -> Result<Self, DumpError> {
        let bytes = std::fs::read(path).map_err(io_error(path))?;
        Self::parse(&bytes, path, prefix)
    }

    /// Writes the dump to `path` (0600), whole or not at all.
    pub fn write(&self, path: &Path) -> Result<(), DumpError> {
        write_lines(
            path,
            &self.header,
            self.records.iter().map(DumpedKv::raw),
            self.exports.iter().map(DumpedKv::raw),
        )
    }

    /// The dump as it is written to a file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let kvs = self.records.iter().chain(&self.exports).map(DumpedKv::raw);
        // Writing to memory does not fail.
        let _ = write_to(&mut out, &self.header, kvs);
        out
    }

    /// The records as etcd values (revision 0).
    pub fn record_kvs(&self) -> Vec<RawKv> {
        self.records.iter().map(DumpedKv::raw).collect()
    }

    pub fn export_kvs(&self) -> Vec<RawKv> {
        self.exports.iter().map(DumpedKv::raw).collect()
    }

    /// What `gate` believes of this dump, on top of what it held.
    pub fn admit(&self, gate: &mut Gate, now: SystemTime) -> Admitted {
        admit(gate, self.record_kvs(), self.export_kvs(), now)
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> DumpError + '_ {
    move |source| DumpError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a dump to `path` (0600) a line at a time, so that a reader, or a
/// crash, only ever finds the old file or the new one whole. `exports`
/// should come grouped by cluster ([`DumpReader::next_cluster`] reads them
/// so).
pub fn write_lines(
    path: &Path,
    header: &DumpHeader,
    records: impl Iterator<Item = RawKv>,
    exports: impl Iterator<Item = RawKv>,
) -> Result<(), DumpError> {
    let io = io_error(path);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut out = std::io::BufWriter::new(open_private(&tmp).map_err(&io)?);
    write_to(&mut out, header, records.chain(exports)).map_err(&io)?;
    let f = out.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(&io)?;
    std::fs::rename(&tmp, path).map_err(&io)
}

fn write_to(
    out: &mut impl std::io::Write,
    header: &DumpHeader,
    kvs: impl Iterator<Item = RawKv>,
) -> std::io::Result<()> {
    write_line(out, header)?;
    for d in kvs.filter_map(DumpedKv::of) {
        write_line(out, &d)?;
    }
    Ok(())
}

fn write_line<T: Serialize>(out: &mut impl std::io::Write, v: &T) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, v).map_err(std::io::Error::other)?;
    out.write_all(b"\n")
}

/// Reads a dump a line at a time: the records, then the exports cluster
/// by cluster.
#[derive(Debug)]
pub struct DumpReader<R> {
    lines: std::io::Lines<R>,
    path: String,
    prefix: String,
    pub header: DumpHeader,
    /// The first export line, read while looking for the end of the
    /// records, or the next cluster's first.
    pending: Option<DumpedKv>,
    line_no: usize,
}

impl DumpReader<std::io::BufReader<std::fs::File>> {
    pub fn open(path: &Path, prefix: &str) -> Result<Self, DumpError> {
        let f = std::fs::File::open(path).map_err(io_error(path))?;
        Self::new(std::io::BufReader::new(f), path, prefix)
    }
}

impl<R: std::io::BufRead> DumpReader<R> {
    pub fn new(input: R, path: &Path, prefix: &str) -> Result<Self, DumpError> {
        let p = path.display().to_string();
        let mut lines = input.lines();
        let malformed = |message: String| DumpError::Malformed {
            path: p.clone(),
            message,
        };
        let first = lines
            .next()
            .ok_or_else(|| malformed("empty".into()))?
            .map_err(io_error(path))?;
        let header: DumpHeader = serde_json::from_str(&first)
            .map_err(|e| malformed(format!("line 1 (the header): {e}")))?;
        if header.format != FORMAT {
            return Err(DumpError::Format {
                path: p,
                found: header.format,
            });
        }
        if header.prefix != prefix {
            return Err(DumpError::Prefix {
                path: p,
                found: header.prefix,
                expected: prefix.to_owned(),
            });
        }
        Ok(Self {
            lines,
            path: p,
            prefix: prefix.to_owned(),
            header,
            pending: None,
            line_no: 1,
        })
    }

    fn next_kv(&mut self) -> Result<Option<DumpedKv>, DumpError> {
        if let Some(kv) = self.pending.take() {
            return Ok(Some(kv));
        }
        let Some(line) = self.lines.next() else {
            return Ok(None);
        };
        self.line_no += 1;
        let line = line.map_err(|source| DumpError::Io {
            path: self.path.clone(),
            source,
        })?;
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| DumpError::Malformed {
                path: self.path.clone(),
                message: format!("line {}: {e}", self.line_no),
            })
    }

    fn is_export(&self, key: &str) -> bool {
        key.strip_prefix(&self.prefix)
            .is_some_and(|k| k.starts_with("exports/"))
    }

    fn records_dumped(&mut self) -> Result<Vec<DumpedKv>, DumpError> {
        let mut out = Vec::new();
        while let Some(kv) = self.next_kv()? {
            if self.is_export(&kv.key) {
                self.pending = Some(kv);
                break;
            }
            out.push(kv);
        }
        Ok(out)
    }

    /// The records (as signed), read up to the first export.
    pub fn records(&mut self) -> Result<Vec<RawKv>, DumpError> {
        Ok(self
            .records_dumped()?
            .into_iter()
            .map(DumpedKv::into_raw)
            .collect())
    }

    /// The next cluster's exports, after [`Self::records`].
    pub fn next_cluster(&mut self) -> Result<Option<(String, Vec<RawKv>)>, DumpError> {
        let keys = fedmesh_api::KeySpace::new(&self.prefix);
        let Some(first) = self.next_kv()? else {
            return Ok(None);
        };
        let cluster_of = |k: &str| keys.parse_export(k).map(|(c, ..)| c.to_owned());
        let cluster = cluster_of(&first.key).unwrap_or_default();
        let mut kvs = vec![first.into_raw()];
        while let Some(kv) = self.next_kv()? {
            if cluster_of(&kv.key).as_deref() != Some(cluster.as_str()) {
                self.pending = Some(kv);
                break;
            }
            kvs.push(kv.into_raw());
        }
        Ok(Some((cluster, kvs)))
    }
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
