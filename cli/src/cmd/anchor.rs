//! `fedmesh anchor init|show|adopt|rotate`: the operator's federation anchor, the key
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
    /// Replace the anchor (--anchor-dir) with a new key: the new key,
    /// endorsed by the old one, extends the anchor chain in the global
    /// zone, then every record and policy is signed again with it. Readers
    /// pinned to an older key follow the chain, and then believe the new
    /// key alone; join directories written from now on pin it. The old key
    /// is kept in `retired/`. Run again after an interruption: it resumes.
    Rotate {
        #[command(flatten)]
        etcd: super::EtcdFlags,
    },
}

/// `fedmesh anchor rotate`: the next key is made (or, after an
/// interruption, found) in `<dir>/next` before anything is written, and
/// takes the old one's place only once the zone is signed with it.
pub async fn rotate(etcd: &super::EtcdFlags) -> anyhow::Result<()> {
    let dir = etcd.anchor_dir.clone().unwrap_or_else(default_dir);
    let next_dir = dir.join("next");
    let next = match AnchorKey::load(&next_dir.join(ANCHOR_KEY_FILE)) {
        Ok(k) => k,
        Err(_) => {
            let k = AnchorKey::generate()?;
            let _ = std::fs::remove_dir_all(&next_dir);
            k.save_new(&next_dir)?;
            k
        }
    };
    let mut zone = super::connect(etcd).await?;
    let old = AnchorKey::load(&dir.join(ANCHOR_KEY_FILE))?.keyid();
    let new = next.keyid();
    let signed = zone
        .rotate_anchor(std::sync::Arc::new(next))
        .await
        .context("rotating the anchor in the global zone")?;
    let retired = dir.join("retired");
    std::fs::create_dir_all(&retired)?;
    let stem = old.replace(':', "-");
    for (file, ext) in [(ANCHOR_KEY_FILE, "key"), (ANCHOR_PUB_FILE, "pub")] {
        std::fs::rename(dir.join(file), retired.join(format!("{stem}.{ext}")))?;
        std::fs::rename(next_dir.join(file), dir.join(file))?;
    }
    std::fs::remove_dir(&next_dir)?;
    println!("rotated the federation anchor {old} -> {new}");
    println!("signed {} records with {new}", signed.len());
    println!("readers pinned to {old} follow the chain; new join directories pin {new}");
    println!("  public key:  {}", dir.join(ANCHOR_PUB_FILE).display());
    Ok(())
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
        AnchorCommand::Rotate { etcd } => rotate(&etcd).await,
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
