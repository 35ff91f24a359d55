//! The join tokens `Certify` accepts: held in memory, re-read when their
//! file changes (`fedmesh token create|revoke` take effect without a
//! restart), and a single-use token's spending written back to the file
//! before the SVID is signed, so that a restart cannot make it new again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fedmesh_trust::SpiffeId;
use fedmesh_zone::{Refusal, TokensError, TokensFile};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::follow::{Missing, follow};

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The token's use could not be recorded; it may be tried again.
    #[error("recording the single-use token's use: {0}")]
    Unrecorded(TokensError),
}

#[derive(Debug, Clone, Default)]
pub struct Tokens {
    book: Arc<Mutex<TokensFile>>,
    file: Option<Arc<Source>>,
}

/// The file the tokens come from.
#[derive(Debug)]
struct Source {
    path: PathBuf,
    /// What was read at start: [`Tokens::watch`] applies what differs.
    read: Vec<u8>,
}

impl Tokens {
    /// Tokens held in memory only (an embedder's, a test's).
    pub fn fixed(book: TokensFile) -> Self {
        Self {
            book: Arc::new(Mutex::new(book)),
            file: None,
        }
    }

    /// Tokens from `path`, read now (a missing file holds none, and is
    /// picked up when `fedmesh token create` writes it).
    pub fn from_file(path: PathBuf) -> Result<Self, TokensError> {
        let read = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(file = %path.display(), "no join tokens file yet: every join token is refused until `fedmesh token create --file` writes it");
                Vec::new()
            }
            Err(source) => return Err(TokensError::Io { path, source }),
        };
        let book = parse(&read, &path)?;
        Ok(Self {
            book: Arc::new(Mutex::new(book)),
            file: Some(Arc::new(Source { path, read })),
        })
    }

    fn book(&self) -> MutexGuard<'_, TokensFile> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The identity `token` allows, spending it when it is single-use.
    pub async fn redeem(&self, token: &str) -> Result<SpiffeId, Denied> {
        let now = OffsetDateTime::now_utc();
        let (id, spent) = {
            let mut book = self.book();
            let i = book.admit(token, now)?;
            let entry = &mut book.tokens[i];
            if entry.single_use {
                entry.used_at = Some(now);
            }
            (
                entry.spiffe_id.clone(),
                entry.single_use.then(|| entry.sha256.clone()),
            )
        };
        let (Some(hash), Some(path)) = (spent, self.file.as_ref().map(|f| f.path.clone())) else {
            return Ok(id);
        };
        let ours = hash.clone();
        let persisted = tokio::task::spawn_blocking(move || {
            TokensFile::update(&path, |f| {
                if let Some(e) = f.tokens.iter_mut().find(|e| e.sha256 == hash) {
                    e.used_at.get_or_insert(now);
                }
                Ok(())
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(TokensError::Invalid {
                path: PathBuf::new(),
                reason: e.to_string(),
            })
        });
        if let Err(e) = persisted {
            // Not recorded: not spent either.
            let mut book = self.book();
            if let Some(entry) = book.tokens.iter_mut().find(|e| e.sha256 == ours) {
                entry.used_at = None;
            }
            return Err(Denied::Unrecorded(e));
        }
        Ok(id)
    }

    /// Re-reads the file whenever it changes, every `poll`, until `stop`.
    /// A file that fails its checks is reported and the last good tokens
    /// kept.
    pub async fn watch(self, poll: Duration, mut stop: watch::Receiver<bool>) {
        let Some(file) = self.file.clone() else {
            return;
        };
        let stopped = async move {
            let _ = stop.changed().await;
        };
        follow(&file.path, poll, file.read.clone(), Missing::Empty, stopped, |raw| {
            match parse(raw, &file.path) {
                Ok(book) => {
                    tracing::info!(tokens = book.tokens.len(), file = %file.path.display(), "join tokens re-read");
                    *self.book() = book;
                }
                Err(e) => tracing::warn!(error = %e, "join tokens unchanged"),
            }
        })
        .await;
    }
}

/// The tokens in `raw`, read from `path`; nothing (a file not there) holds
/// none.
fn parse(raw: &[u8], path: &std::path::Path) -> Result<TokensFile, TokensError> {
    match raw.is_empty() {
        true => Ok(TokensFile::default()),
        false => TokensFile::parse(raw, path),
    }
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

    #[tokio::test]
    async fn a_single_use_token_is_spent_on_disk_before_it_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        let now = OffsetDateTime::now_utc();
        let token = TokensFile::update(&path, |f| {
            f.create(id(), fedmesh_zone::tokens::DEFAULT_TTL, true, now)
        })
        .unwrap();
        let tokens = Tokens::from_file(path.clone()).unwrap();
        assert_eq!(tokens.redeem(&token).await.unwrap(), id());
        let again = tokens.redeem(&token).await.unwrap_err().to_string();
        assert!(again.contains("single-use"), "{again}");
        // A restarted controller reads it spent.
        let restarted = Tokens::from_file(path).unwrap();
        assert!(restarted.redeem(&token).await.is_err());
    }
}
