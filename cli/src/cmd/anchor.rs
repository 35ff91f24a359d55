//! `fedmesh anchor init|show|adopt`: the operator's federation anchor, the key
//! that signs cluster records and global traffic policies (ARCHITECTURE.md
//! §3.1, signed records). It lives on the operator's machine only.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use fedmesh_seal::{ANCHOR_KEY_FILE, ANCHOR_PUB_FILE, AnchorKey};

#[derive(Subcommand, Debug)]
pub enum AnchorCommand {
    /// Create the federation anchor: `anchor.key` (0600, keep it on this
    /// machine and back it up offline) and `anchor.pub`. Refuses to
    /// replace an existing key.
    Init {
        /// Where to keep it [default: $HOME/.fedmesh/anchor].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the anchor's keyid and public key.
    Show {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Sign again, with the anchor (--anchor-dir), every cluster record
    /// and policy the global zone holds: the one step that signs a
    /// federation created before records were (with --trust-unsigned),
    /// and after which any older copy (an old backup or snapshot) is a
    /// rollback to every reader. Controllers keep the newest record of
    /// their own cluster in their last good view.
    Adopt {
        #[command(flatten)]
        etcd: super::EtcdFlags,
    },
}

/// `fedmesh anchor adopt`.
pub async fn adopt(etcd: &super::EtcdFlags) -> anyhow::Result<()> {
    let mut zone = super::connect(etcd).await?;
    let written = zone.adopt().await.context("signing the zone's records")?;
    for key in &written {
        println!("signed {key}");
    }
    println!(
        "signed {} records with the federation anchor",
        written.len()
    );
    Ok(())
}

/// `$HOME/.fedmesh/anchor`, or `./.fedmesh/anchor` without a home.
pub fn default_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
        .join(".fedmesh")
        .join("anchor")
}

pub async fn run(cmd: AnchorCommand) -> anyhow::Result<()> {
    match cmd {
        AnchorCommand::Adopt { etcd } => adopt(&etcd).await,
        AnchorCommand::Init { dir } => {
            let dir = dir.unwrap_or_else(default_dir);
            let key = AnchorKey::generate()?;
            key.save_new(&dir)?;
            println!("created the federation anchor {}", key.keyid());
            println!("  private key: {}", dir.join(ANCHOR_KEY_FILE).display());
            println!("  public key:  {}", dir.join(ANCHOR_PUB_FILE).display());
            Ok(())
        }
        AnchorCommand::Show { dir } => {
            let dir = dir.unwrap_or_else(default_dir);
            let key = AnchorKey::load(&dir.join(ANCHOR_KEY_FILE))
                .with_context(|| format!("no usable anchor in {}", dir.display()))?;
            println!("{}", key.keyid());
            print!("{}", key.public().to_pem());
            Ok(())
        }
    }
}
