//! Join tokens: what a proxy or gateway presents to its controller's
//! `Certify` for its first SVID (renewals present the SVID instead).
//!
//! The file (`fedmesh-controller --tokens`, managed by `fedmesh token`)
//! holds each token's SHA-256, never the token: a copy of the file hands
//! out nothing. Every token allows one identity, expires (24 h unless
//! asked otherwise), and may be single-use. The checks are here, free of
//! I/O; [`TokensFile::update`] is the locked read-modify-write that
//! `fedmesh token` and the controller's single-use bookkeeping share.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedmesh_trust::SpiffeId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The shortest token `Certify` considers: shorter ones are refused
/// before any lookup. `fedmesh token create` makes 64 hex characters.
pub const MIN_TOKEN_LEN: usize = 32;
/// A token's life unless `--ttl` says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    pub tokens: Vec<TokenEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenEntry {
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// The one identity the token lets its bearer be issued.
    pub spiffe_id: SpiffeId,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub single_use: bool,
    /// When a single-use token was spent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub used_at: Option<OffsetDateTime>,
}

impl TokenEntry {
    /// The name `list` shows and `revoke` takes: the hash's first 12
    /// characters (the token itself is never shown again).
    pub fn id(&self) -> &str {
        self.sha256.get(..12).unwrap_or(&self.sha256)
    }

    pub fn state(&self, now: OffsetDateTime) -> TokenState {
        if let Some(at) = self.used_at {
            TokenState::Used(at)
        } else if now >= self.expires_at {
            TokenState::Expired(self.expires_at)
        } else {
            TokenState::Valid
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Valid,
    Expired(OffsetDateTime),
    Used(OffsetDateTime),
}

/// Why `Certify` refuses a token. None is worth retrying with the same
/// token: the operator has to issue another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("join tokens have at least {MIN_TOKEN_LEN} characters")]
    TooShort,
    #[error("unknown join token (never issued here, or revoked)")]
    Unknown,
    #[error("join token {id} expired at {at}; issue another with `fedmesh token create`")]
    Expired { id: String, at: String },
    #[error(
        "join token {id} is single-use and was used at {at}; issue another with `fedmesh token create`"
    )]
    Used { id: String, at: String },
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("no token {0:?} (list them with `fedmesh token list`)")]
    NoSuch(String),
    #[error("{0:?} names more than one token; give more of its id")]
    Ambiguous(String),
    #[error("the system random number generator failed")]
    Random,
}

/// Hex SHA-256 of `token`.
pub fn digest(token: &str) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fresh token: 32 random bytes, hex.
pub fn generate() -> Result<String, TokensError> {
    fedmesh_trust::random_hex(32).map_err(|_| TokensError::Random)
}

/// Equal lengths and bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokensFile {
    /// Adds a token for `id`, returning it: the only time it is seen.
    pub fn create(
        &mut self,
        id: SpiffeId,
        ttl: Duration,
        single_use: bool,
        now: OffsetDateTime,
    ) -> Result<String, TokensError> {
        let token = generate()?;
        self.tokens.push(TokenEntry {
            sha256: digest(&token),
            spiffe_id: id,
            created_at: now,
            expires_at: now + ttl,
            single_use,
            used_at: None,
        });
        Ok(token)
    }

    /// A book of the given tokens, each valid for `ttl` from now: for
    /// embedders and tests that make their own tokens.
    pub fn granting<'a>(
        grants: impl IntoIterator<Item = (&'a str, SpiffeId)>,
        ttl: Duration,
    ) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            tokens: grants
                .into_iter()
                .map(|(token, id)| TokenEntry {
                    sha256: digest(token),
                    spiffe_id: id,
                    created_at: now,
                    expires_at: now + ttl,
                    single_use: false,
                    used_at: None,
                })
                .collect(),
        }
    }

    /// Removes the token whose id starts with `prefix` (at least 6
    /// characters, naming exactly one).
    pub fn revoke(&mut self, prefix: &str) -> Result<TokenEntry, TokensError> {
        if prefix.len() < 6 {
            return Err(TokensError::NoSuch(format!(
                "{prefix} (give at least 6 characters of the id)"
            )));
        }
        let hits: Vec<usize> = (0..self.tokens.len())
            .filter(|&i| self.tokens[i].sha256.starts_with(prefix))
            .collect();
        match hits[..] {
            [] => Err(TokensError::NoSuch(prefix.into())),
            [i] => Ok(self.tokens.remove(i)),
            _ => Err(TokensError::Ambiguous(prefix.into())),
        }
    }

    /// The entry `token` matches, if `Certify` may accept it at `now`.
    /// Every entry is compared, each in constant time.
    pub fn admit(&self, token: &str, now: OffsetDateTime) -> Result<usize, Refusal> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(Refusal::TooShort);
        }
        let given = digest(token);
        let found = self
            .tokens
            .iter()
            .enumerate()
            .fold(None, |hit, (i, t)| {
                if constant_time_eq(t.sha256.as_bytes(), given.as_bytes()) {
                    Some(i)
                } else {
                    hit
                }
            })
            .ok_or(Refusal::Unknown)?;
        let entry = &self.tokens[found];
        match entry.state(now) {
            TokenState::Valid => Ok(found),
            TokenState::Expired(at) => Err(Refusal::Expired {
                id: entry.id().into(),
                at: rfc3339(at),
            }),
            TokenState::Used(at) => Err(Refusal::Used {
                id: entry.id().into(),
                at: rfc3339(at),
            }),
        }
    }

    /// Every entry well-formed, no hash listed twice. An error names the
    /// entry: `tokens[2].sha256: ...`.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.tokens.iter().enumerate() {
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "tokens[{i}].sha256: 64 hex characters (the token's SHA-256), not {:?}",
                    t.sha256
                ));
            }
            if !seen.insert(t.sha256.to_ascii_lowercase()) {
                return Err(format!("tokens[{i}].sha256: listed twice"));
            }
            if t.expires_at <= t.created_at {
                return Err(format!("tokens[{i}].expiresAt: before createdAt"));
            }
        }
        Ok(())
    }

    /// Reads and checks a tokens file; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        match fs::read(path) {
            Ok(raw) => Self::parse(&raw, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(TokensError::Io {
                path: path.into(),
                source,
            }),
        }
    }

    /// Parses and checks the contents of the tokens file at `path`.
    pub fn parse(raw: &[u8], path: &Path) -> Result<Self, TokensError> {
        let invalid = |reason: String| TokensError::Invalid {
            path: path.into(),
            reason,
        };
        let text = std::str::from_utf8(raw).map_err(|e| invalid(format!("not UTF-8: {e}")))?;
        let file: Self = serde_saphyr::from_str(text).map_err(|e| {
            // The first format kept tokens in the clear, without expiry.
            let hint = if text.contains("token:") {
                "; this looks like the old format (plaintext `token`): issue new tokens \
                 with `fedmesh token create`"
            } else {
                ""
            };
            invalid(format!("{e}{hint}"))
        })?;
        file.check().map_err(invalid)?;
        Ok(file)
    }

    /// Writes the file whole (0600, renamed into place).
    pub fn save(&self, path: &Path) -> Result<(), TokensError> {
        let text = serde_saphyr::to_string(self).map_err(|e| TokensError::Invalid {
            path: path.into(),
            reason: e.to_string(),
        })?;
        fedmesh_trust::ca::write_private(path, text.as_bytes()).map_err(|e| TokensError::Invalid {
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// Reads, changes and writes the file under an exclusive lock (on
    /// `<file>.lock`), so that `fedmesh token` and a controller spending a
    /// single-use token never undo each other. Nothing is written when `f`
    /// fails.
    pub fn update<T>(
        path: &Path,
        f: impl FnOnce(&mut Self) -> Result<T, TokensError>,
    ) -> Result<T, TokensError> {
        let io = |source| TokensError::Io {
            path: path.into(),
            source,
        };
        let lock_path = path.with_extension("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        // Held until `lock` drops, when this returns.
        lock.lock().map_err(io)?;
        let mut file = Self::load(path)?;
        let out = f(&mut file)?;
        file.save(path)?;
        Ok(out)
    }
}

/// A token time as people read it: RFC 3339, whole seconds.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_trust::TrustDomain;

    fn id() -> SpiffeId {
        SpiffeId::workload(
            &TrustDomain::new("aws.fedmesh.test").unwrap(),
            "shop",
            "web",
        )
        .unwrap()
    }

    #[test]
    fn a_token_is_admitted_until_it_expires() {
        let now = OffsetDateTime::now_utc();
        let mut f = TokensFile::default();
        let t = f.create(id(), Duration::from_secs(60), false, now).unwrap();
        assert_eq!(t.len(), 64);
        assert!(
            !serde_saphyr::to_string(&f).unwrap().contains(&t),
            "only the hash is kept"
        );
        assert_eq!(f.admit(&t, now), Ok(0));
        assert_eq!(f.admit(&t, now + Duration::from_secs(59)), Ok(0));
        let e = f.admit(&t, now + Duration::from_secs(60)).unwrap_err();
        assert!(matches!(e, Refusal::Expired { .. }), "{e}");
        assert!(e.to_string().contains("expired at") && e.to_string().contains(f.tokens[0].id()));
    }

    #[test]
    fn short_unknown_and_spent_tokens_are_refused_with_their_reason() {
        let now = OffsetDateTime::now_utc();
        let mut f = TokensFile::default();
        let t = f.create(id(), DEFAULT_TTL, true, now).unwrap();
        assert_eq!(f.admit("short", now), Err(Refusal::TooShort));
        assert_eq!(f.admit(&"x".repeat(64), now), Err(Refusal::Unknown));
        f.tokens[0].used_at = Some(now);
        let e = f.admit(&t, now).unwrap_err().to_string();
        assert!(e.contains("single-use") && e.contains("used at"), "{e}");
    }

    #[test]
    fn hashes_compare_whole() {
        assert!(constant_time_eq(b"0123", b"0123"));
        assert!(!constant_time_eq(b"0123", b"0124"));
        assert!(!constant_time_eq(b"0123", b"012"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn revoke_by_id_prefix() {
        let now = OffsetDateTime::now_utc();
        let mut f = TokensFile::default();
        let a = f.create(id(), DEFAULT_TTL, false, now).unwrap();
        let b = f.create(id(), DEFAULT_TTL, false, now).unwrap();
        let id_a = f.tokens[0].id().to_owned();
        assert!(matches!(f.revoke("abc"), Err(TokensError::NoSuch(_))));
        assert_eq!(f.revoke(&id_a).unwrap().sha256, digest(&a));
        assert_eq!(f.admit(&a, now), Err(Refusal::Unknown));
        assert_eq!(f.admit(&b, now), Ok(0));
    }

    #[test]
    fn a_file_round_trips_and_bad_entries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        let now = OffsetDateTime::now_utc();
        let token = TokensFile::update(&path, |f| f.create(id(), DEFAULT_TTL, true, now)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = TokensFile::load(&path).unwrap();
        assert_eq!(back.admit(&token, now), Ok(0));
        assert!(back.tokens[0].single_use);

        fs::write(&path, "tokens:\n  - sha256: abc\n    spiffeId: spiffe://a.test/x\n    createdAt: 2026-11-30T00:00:00Z\n    expiresAt: 2026-12-01T00:00:00Z\n").unwrap();
        let e = TokensFile::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("tokens[0].sha256") && e.contains("tokens.yaml"),
            "{e}"
        );
        fs::write(&path, "tokens:\n  - token: abcdefabcdefabcdefabcdefabcdefab\n    spiffeId: spiffe://a.test/x\n").unwrap();
        let e = TokensFile::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("old format") && e.contains("fedmesh token create"),
            "{e}"
        );
        // A failed change writes nothing.
        let before = fs::read(&path).unwrap();
        assert!(TokensFile::update(&path, |f| f.revoke("nothing-here")).is_err());
        assert_eq!(fs::read(&path).unwrap(), before);
    }
}
