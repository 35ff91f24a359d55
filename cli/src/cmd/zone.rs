//! `fedmesh zone backup|restore`: the operator's copy of the global zone
//! (every record as signed, every export as written), and putting back what
//! a wiped or rolled-back etcd lacks. A restore never writes a record older
//! than the one etcd holds, nor anything the federation anchor (or, for
//! bundles and exports, the owner) did not sign.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use fedmesh_zone::dump::ZoneDump;

use super::{EtcdFlags, connect};

#[derive(Subcommand, Debug)]
pub enum ZoneCommand {
    /// Write every record of the global zone a reader believes (cluster
    /// records, bundles, manifests, policies and signed deletions, as
    /// signed) and every export to FILE (0600). What is not believed is
    /// left out, and named.
    Backup {
        file: PathBuf,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
    /// Put back what FILE holds that etcd lacks, or holds older or
    /// unsigned: never a record older than etcd's. Re-creates the etcd
    /// user and role of every cluster in it (a new etcd has none).
    Restore {
        file: PathBuf,
        /// Say what would be written, and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// A new etcd, with auth off: restore as it allows, then add
        /// --etcd-user (root role, with its password) and turn auth on.
        #[arg(long, requires = "etcd_user")]
        enable_auth: bool,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
}

pub async fn run(cmd: ZoneCommand) -> anyhow::Result<()> {
    match cmd {
        ZoneCommand::Backup { file, etcd } => {
            let mut zone = connect(&etcd).await?;
            let (dump, refused) = zone.backup().await?;
            dump.write(&file)?;
            for (key, r) in &refused {
                eprintln!(
                    "not backed up: {key}: {} ({})",
                    r.refusal.label(),
                    r.refusal
                );
            }
            println!(
                "backed up {} records and {} exports to {}",
                dump.records.len(),
                dump.exports.len(),
                file.display()
            );
            Ok(())
        }
        ZoneCommand::Restore {
            file,
            dry_run,
            enable_auth,
            etcd,
        } => {
            let dump = ZoneDump::read(&file, &etcd.prefix)?;
            // With auth off, etcd refuses a password login.
            let mut as_is = etcd.clone();
            if enable_auth {
                as_is.etcd_user = None;
            }
            let mut zone = connect(&as_is).await?;
            let restored = zone.restore(&dump, dry_run).await?;
            for (key, r) in &restored.refused {
                eprintln!("not restored: {key}: {} ({})", r.refusal.label(), r.refusal);
            }
            let p = &restored.plan;
            let verb = if dry_run { "would restore" } else { "restored" };
            println!(
                "{verb} {} records and {} exports (of {}); {} already in etcd, as new or newer",
                p.records,
                p.exports,
                if p.clusters.is_empty() {
                    "no cluster".to_owned()
                } else {
                    p.clusters.join(", ")
                },
                p.kept
            );
            if dry_run {
                for (key, value) in &p.writes {
                    println!("  {} {key}", if value.is_some() { "put" } else { "delete" });
                }
                return Ok(());
            }
            if !restored.roles.is_empty() {
                println!("etcd users and roles of {}", restored.roles.join(", "));
            }
            if enable_auth {
                let user = etcd.etcd_user.as_deref().context("--etcd-user")?;
                let password = etcd
                    .password()?
                    .context("--enable-auth needs the password of --etcd-user")?;
                zone.enable_auth(user, &password)
                    .await
                    .context("turning etcd's auth on")?;
                println!("etcd auth on, {user} in the root role");
            }
            Ok(())
        }
    }
}
