//! `fedmesh token create|list|revoke`: the join tokens a cluster's
//! controller accepts (its `--tokens` file, which it re-reads when it
//! changes). The file keeps each token's hash; a token is shown once, when
//! it is created.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fedmesh_trust::SpiffeId;
use fedmesh_zone::TokensFile;
use fedmesh_zone::tokens::{DEFAULT_TTL, TokenState, rfc3339};
use time::OffsetDateTime;

use super::get::Output;

/// Which tokens file: a path, or a cluster `fedmesh up` runs.
#[derive(Args, Debug, Clone)]
pub struct TokensAt {
    /// The controller's tokens file (its --tokens).
    #[arg(long, required_unless_present = "cluster", conflicts_with = "cluster")]
    file: Option<PathBuf>,
    /// A cluster of the federation `fedmesh up` runs.
    #[arg(long)]
    cluster: Option<String>,
    /// With --cluster: the `fedmesh up` state directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

impl TokensAt {
    fn path(&self) -> anyhow::Result<PathBuf> {
        match (&self.file, &self.cluster) {
            (Some(f), _) => Ok(f.clone()),
            (None, Some(c)) => {
                let dir = crate::up::find_state_dir(self.state_dir.clone())?;
                crate::up::join_dir_of(&dir, c)?;
                Ok(dir.join(c).join("tokens.yaml"))
            }
            (None, None) => anyhow::bail!("give --file or --cluster"),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Issue a token that lets its bearer be issued one identity. The
    /// token is printed once, on stdout.
    Create {
        /// The SPIFFE ID the token allows, e.g.
        /// spiffe://aws-use1.fedmesh/ns/fedmesh/sa/proxy.
        #[arg(long)]
        identity: String,
        /// How long it may be used.
        #[arg(long, default_value = "24h", value_parser = super::duration)]
        ttl: Duration,
        /// Spent by its first successful use.
        #[arg(long)]
        single_use: bool,
        #[command(flatten)]
        at: TokensAt,
    },
    /// List tokens: id, identity, expiry and state (never the token).
    List {
        #[arg(short, long, default_value = "table")]
        output: Output,
        #[command(flatten)]
        at: TokensAt,
    },
    /// Revoke a token by its id (or the first 6 or more characters of it).
    Revoke {
        id: String,
        #[command(flatten)]
        at: TokensAt,
    },
}

pub fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            identity,
            ttl,
            single_use,
            at,
        } => {
            let id: SpiffeId = identity
                .parse()
                .map_err(|e| anyhow::anyhow!("--identity {identity:?}: {e}"))?;
            anyhow::ensure!(
                ttl >= Duration::from_secs(60),
                "--ttl {}: at least a minute",
                humantime_serde::re::humantime::format_duration(ttl)
            );
            let path = at.path()?;
            let now = OffsetDateTime::now_utc();
            let (token, entry_id) = TokensFile::update(&path, |f| {
                let token = f.create(id.clone(), ttl, single_use, now)?;
                let entry = f.tokens.last().map(|e| e.id().to_owned());
                Ok((token, entry.unwrap_or_default()))
            })
            .with_context(|| format!("adding a token to {}", path.display()))?;
            println!("{token}");
            eprintln!(
                "token {entry_id} for {id}, expires at {}{} ({})",
                rfc3339(now + ttl),
                if single_use { ", single-use" } else { "" },
                path.display()
            );
            if ttl > DEFAULT_TTL * 7 {
                eprintln!(
                    "note: a token lives {}; renewals need no token, so a short life costs nothing",
                    humantime_serde::re::humantime::format_duration(ttl)
                );
            }
            Ok(())
        }
        TokenCommand::List { output, at } => {
            let path = at.path()?;
            let file = TokensFile::load(&path)?;
            let now = OffsetDateTime::now_utc();
            let rows: Vec<serde_json::Value> = file
                .tokens
                .iter()
                .map(|t| {
                    let state = match t.state(now) {
                        TokenState::Valid => "valid".to_owned(),
                        TokenState::Expired(_) => "expired".to_owned(),
                        TokenState::Used(at) => format!("used {}", rfc3339(at)),
                    };
                    serde_json::json!({
                        "id": t.id(),
                        "identity": t.spiffe_id.to_string(),
                        "createdAt": rfc3339(t.created_at),
                        "expiresAt": rfc3339(t.expires_at),
                        "singleUse": t.single_use,
                        "state": state,
                    })
                })
                .collect();
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Yaml => print!("{}", serde_saphyr::to_string(&rows)?),
                Output::Table => {
                    println!(
                        "{:<13} {:<22} {:<11} {:<20} IDENTITY",
                        "ID", "EXPIRES", "SINGLE-USE", "STATE"
                    );
                    for r in &rows {
                        let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                        println!(
                            "{:<13} {:<22} {:<11} {:<20} {}",
                            s("id"),
                            s("expiresAt"),
                            if r["singleUse"] == true { "yes" } else { "no" },
                            s("state"),
                            s("identity")
                        );
                    }
                }
            }
            Ok(())
        }
        TokenCommand::Revoke { id, at } => {
            let path = at.path()?;
            let gone = TokensFile::update(&path, |f| f.revoke(&id))?;
            println!(
                "token {} for {} revoked; the controller stops accepting it within a second",
                gone.id(),
                gone.spiffe_id
            );
            Ok(())
        }
    }
}
