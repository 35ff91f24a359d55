//! Following a file an operator edits while the controller runs (the
//! service registry, the join tokens): polled, compared by content, and
//! handed on only once an edit has settled.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

/// What a missing file means to its follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Retry,
    Empty,
}

/// How long an edit must stay unchanged before it is applied.
const SETTLE: Duration = Duration::from_millis(25);

/// Reads `path` every `poll` until `stop` completes, and hands `changed`
/// each new content. Content, not the modification time, is the change
/// detector: times can be too coarse to tell two quick edits apart. An
/// editor that truncates and then writes leaves a moment when the file is
/// empty or cut short, and either may parse (an empty registry would
/// withdraw every service), so a change counts only once it reads the same
/// after a short pause. `last` is the content already in use.
///
/// A missing file is, with [`Missing::Retry`], one being replaced: tried
/// again at the next tick. With [`Missing::Empty`] it reads as empty (a
/// removed tokens file holds no tokens).
pub async fn follow(
    path: &Path,
    poll: Duration,
    mut last: Vec<u8>,
    missing: Missing,
    stop: impl Future<Output = ()>,
    mut changed: impl FnMut(&[u8]),
) {
    let read = || async {
        match tokio::fs::read(path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && missing == Missing::Empty => {
                Ok(Vec::new())
            }
            r => r,
        }
    };
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = &mut stop => return,
        }
        let Ok(raw) = read().await else {
            continue;
        };
        if raw == last {
            continue;
        }
        tokio::time::sleep(SETTLE.min(poll)).await;
        match read().await {
            Ok(again) if again == raw => {}
            _ => continue,
        }
        changed(&raw);
        last = raw;
    }
}
