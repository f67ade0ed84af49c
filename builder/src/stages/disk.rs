//! Stage 5: the whole disk. A sparse file with a GPT written by code and the ESP and root-a
//! images copied in at their offsets; root-b and data stay empty (zeros take no space).

use super::esp::BootPartition;
use super::rootfs::RootImage;
use super::Context;
use crate::gpt::{self, GptPartition, GptTable, SECTOR};
use crate::image::{Arch, Role, Slot};
use crate::progress::StageProgress;
use crate::units::Uuid;
use anyhow::{Context as _, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The partition GUID of each partition as written (root-a's comes from its root hash).
pub fn partition_table(ctx: &Context, root: &RootImage) -> Result<GptTable> {
    let plan = ctx.plan;
    let root_type = match plan.arch {
        Arch::Amd64 => gpt::TYPE_ROOT_AMD64,
        Arch::Arm64 => gpt::TYPE_ROOT_ARM64,
    };
    let root_hash = crate::units::Sha256::try_from(root.root_hash.clone()).map_err(anyhow::Error::msg)?;
    let mut partitions = Vec::new();
    for p in &plan.disk.partitions {
        let type_guid = match p.role {
            Role::Esp => gpt::TYPE_ESP,
            Role::Root => root_type,
            Role::Data => gpt::TYPE_LINUX_DATA,
        };
        let guid = if p.role == Role::Root && p.slot == Some(Slot::A) {
            Uuid::from_root_hash(&root_hash)
        } else {
            Uuid::parse(&p.uuid).context("plan uuid")?
        };
        partitions.push(GptPartition {
            type_guid: Uuid::parse(type_guid).expect("constant GUID"),
            guid,
            first_lba: p.offset.0 / SECTOR,
            last_lba: (p.offset.0 + p.size.0) / SECTOR - 1,
            name: p.name.clone(),
        });
    }
    Ok(GptTable { disk_guid: Uuid::parse(&plan.disk.disk_guid).context("plan disk guid")?, disk_sectors: plan.disk.size.0 / SECTOR, partitions })
}

pub fn assemble(ctx: &Context, boot: &BootPartition, root: &RootImage) -> Result<PathBuf> {
    let plan = ctx.plan;
    let progress = StageProgress::start("disk image", "GPT + ESP + root-a");
    let path = ctx.staging.join("disk.img");
    let mut disk = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).with_context(|| format!("creating {}", path.display()))?;
    disk.set_len(plan.disk.size.0).with_context(|| format!("sizing {} to {}", path.display(), plan.disk.size))?;
    let table = partition_table(ctx, root)?;
    table.write(&mut disk).with_context(|| format!("writing the partition table of {}", path.display()))?;
    let esp = plan.partition(Role::Esp, None);
    copy_sparse(&boot.esp, &mut disk, esp.offset.0).with_context(|| format!("copying the ESP into {}", path.display()))?;
    let root_a = plan.partition(Role::Root, Some(Slot::A));
    copy_sparse(&root.path, &mut disk, root_a.offset.0).with_context(|| format!("copying the root image into {}", path.display()))?;
    disk.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    progress.finish(&format!("{} ({} partitions)", plan.disk.size, table.partitions.len()));
    Ok(path)
}

/// Copies `src` into `dst` at `offset`, skipping blocks of zeros (which stay holes).
pub fn copy_sparse(src: &Path, dst: &mut File, offset: u64) -> std::io::Result<u64> {
    const BLOCK: usize = 1 << 20;
    let mut f = File::open(src)?;
    let mut buf = vec![0u8; BLOCK];
    let mut pos = 0u64;
    let mut written = 0u64;
    loop {
        let mut n = 0;
        while n < BLOCK {
            let r = f.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if chunk.iter().any(|b| *b != 0) {
            dst.seek(SeekFrom::Start(offset + pos))?;
            dst.write_all(chunk)?;
            written += n as u64;
        }
        pos += n as u64;
        if n < BLOCK {
            break;
        }
    }
    Ok(written)
}
