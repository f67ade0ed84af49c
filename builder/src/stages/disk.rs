//! Stage 5: the whole disk. A sparse file with a partition table written by code (GPT, or DOS for
//! the Raspberry Pi) and the boot and root-a images copied in at their offsets; the B slots and
//! data stay empty (zeros take no space).

use super::rootfs::RootImage;
use super::{BootOutput, Context};
use crate::config::image::{Arch, PartitionTable, Role, Slot};
use crate::gpt::{self, GptPartition, GptTable, SECTOR};
use crate::host::progress::StageProgress;
use crate::mbr::{self, MbrPartition, MbrTable};
use crate::units::Uuid;
use anyhow::{Context as _, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The GPT as written (root-a's partition GUID comes from its root hash).
pub fn gpt_table(ctx: &Context, root: &RootImage) -> Result<GptTable> {
    let plan = ctx.plan;
    let root_type = match plan.arch {
        Arch::Amd64 => gpt::TYPE_ROOT_AMD64,
        Arch::Arm64 => gpt::TYPE_ROOT_ARM64,
    };
    let root_hash = crate::units::Sha256::try_from(root.root_hash.clone()).map_err(anyhow::Error::msg)?;
    let mut partitions = Vec::new();
    for p in &plan.disk.partitions {
        let type_guid = match p.role {
            Role::Esp | Role::Autoboot | Role::Boot => gpt::TYPE_ESP,
            Role::Root => root_type,
            Role::Data => gpt::TYPE_LINUX_DATA,
        };
        let guid = if p.role == Role::Root && p.slot == Some(Slot::A) {
            Uuid::from_root_hash(&root_hash.0)
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
    Ok(GptTable {
        disk_guid: Uuid::parse(&plan.disk.disk_guid).context("plan disk guid")?,
        disk_sectors: plan.disk.size.0 / SECTOR,
        partitions,
    })
}

/// The DOS partition table of a Raspberry Pi image (FAT for autoboot and boot slots).
pub fn mbr_table(plan: &crate::config::plan::Plan) -> Result<MbrTable> {
    let disk_id = u32::from_str_radix(&plan.disk.disk_guid, 16).context("plan disk id")?;
    let partitions = plan
        .disk
        .partitions
        .iter()
        .map(|p| MbrPartition {
            number: p.number,
            kind: match p.role {
                Role::Esp | Role::Autoboot | Role::Boot => mbr::TYPE_FAT32_LBA,
                Role::Root | Role::Data => mbr::TYPE_LINUX,
            },
            bootable: false,
            first_lba: p.offset.0 / mbr::SECTOR,
            sectors: p.size.0 / mbr::SECTOR,
        })
        .collect();
    Ok(MbrTable { disk_id, partitions })
}

/// The PARTUUID of every partition as the disk has it, in plan order.
pub fn partuuids(ctx: &Context, root: &RootImage) -> Result<Vec<String>> {
    Ok(match ctx.plan.disk.table {
        PartitionTable::Gpt => gpt_table(ctx, root)?.partitions.iter().map(|p| p.guid.to_string()).collect(),
        PartitionTable::Mbr => ctx.plan.disk.partitions.iter().map(|p| p.uuid.clone()).collect(),
    })
}

/// Writes the disk: the partition table, then each partition image at its offset (sparse).
pub fn assemble(ctx: &Context, boot: &BootOutput, root: &RootImage) -> Result<PathBuf> {
    let plan = ctx.plan;
    let progress = StageProgress::start("disk image", &format!("{:?} table + boot + root-a", plan.disk.table));
    let path = ctx.staging.join("disk.img");
    let mut disk = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    disk.set_len(plan.disk.size.0).with_context(|| format!("sizing {} to {}", path.display(), plan.disk.size))?;
    match plan.disk.table {
        PartitionTable::Gpt => gpt_table(ctx, root)?.write(&mut disk).map_err(anyhow::Error::from),
        PartitionTable::Mbr => mbr_table(plan)?.write(&mut disk).map_err(anyhow::Error::from),
    }
    .with_context(|| format!("writing the partition table of {}", path.display()))?;
    let mut images: Vec<(Role, Option<Slot>, &Path)> =
        boot.partitions.iter().map(|(r, s, p)| (*r, *s, p.as_path())).collect();
    images.push((Role::Root, Some(Slot::A), &root.path));
    for (role, slot, image) in images {
        let part = plan.partition(role, slot);
        let len = std::fs::metadata(image).with_context(|| format!("reading {}", image.display()))?.len();
        if len > part.size.0 {
            anyhow::bail!(
                "{} is {} but partition {} holds only {}: make it larger in the image definition",
                image.display(),
                crate::units::Bytes(len),
                part.name,
                part.size
            );
        }
        copy_sparse(image, &mut disk, part.offset.0)
            .with_context(|| format!("copying {} into {} ({})", image.display(), path.display(), part.name))?;
    }
    disk.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    progress.finish(&format!("{} ({} partitions)", plan.disk.size, plan.disk.partitions.len()));
    Ok(path)
}

/// The block map `kiln flash` (and `bmaptool copy`) writes by: the image's data plus, even where
/// the image holds zeros, the partition tables and the first MiB of every partition, so that no
/// stale filesystem signature of a reused card survives in an empty slot or the data partition.
pub fn write_bmap(ctx: &Context, disk: &Path) -> Result<PathBuf> {
    let plan = ctx.plan;
    let mib = crate::units::MIB;
    let mut must: Vec<(u64, u64)> = vec![(0, mib), (plan.disk.size.0 - mib, mib)];
    for p in &plan.disk.partitions {
        must.push((p.offset.0, p.size.0.min(mib)));
        if plan.disk.table == PartitionTable::Mbr && p.number > 4 {
            // The logical partition's EBR, 1 MiB before it.
            must.push((p.offset.0 - mbr::EBR_GAP_SECTORS * mbr::SECTOR, mbr::SECTOR));
        }
    }
    let bmap =
        crate::flash::bmap::create(disk, &must).with_context(|| format!("mapping the blocks of {}", disk.display()))?;
    let path = crate::flash::bmap::default_path(disk);
    bmap.write_xml(&path).with_context(|| format!("writing {}", path.display()))?;
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

/// The DOS tables kiln writes and reads, checked against sfdisk (util-linux).
#[cfg(test)]
mod sfdisk_agrees {
    use crate::mbr::*;
    const MIB: u64 = 2048;

    /// Three primaries and two logical partitions, each logical one with its EBR 1 MiB before it.
    fn layout() -> MbrTable {
        let p =
            |number, kind, first, sectors| MbrPartition { number, kind, bootable: false, first_lba: first, sectors };
        MbrTable {
            disk_id: 0x0badcafe,
            partitions: vec![
                p(1, TYPE_FAT32_LBA, MIB, 4 * MIB),
                p(2, TYPE_FAT32_LBA, 5 * MIB, 4 * MIB),
                p(3, TYPE_FAT32_LBA, 9 * MIB, 4 * MIB),
                p(5, TYPE_LINUX, 14 * MIB, 8 * MIB),
                p(6, TYPE_LINUX, 23 * MIB, 8 * MIB),
            ],
        }
    }

    #[test]
    fn sfdisk_reads_the_table_kiln_writes() {
        if !crate::testing::host_has("sfdisk_reads_the_table_kiln_writes", "sfdisk") {
            return;
        }
        let t = layout();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(32 * MIB * SECTOR).unwrap();
        t.write(&mut f).unwrap();
        drop(f);
        assert_eq!(MbrTable::read(&mut std::fs::File::open(&path).unwrap()).unwrap(), t);
        let out = crate::host::exec::Cmd::new("sfdisk").arg("--dump").arg(&path).read().unwrap();
        assert!(out.contains("label: dos"), "{out}");
        assert!(out.contains("label-id: 0x0badcafe"), "{out}");
        for p in &t.partitions {
            let line =
                format!("disk.img{} : start={:>12}, size={:>12}, type={:x}", p.number, p.first_lba, p.sectors, p.kind);
            assert!(out.contains(&line), "missing {line:?} in\n{out}");
        }
        let ext = format!("disk.img4 : start={:>12}, size={:>12}, type=f", 13 * MIB, 18 * MIB);
        assert!(out.contains(&ext), "missing {ext:?} in\n{out}");
    }

    /// The reader agrees with sfdisk on a DOS table sfdisk wrote, logical partitions included.
    #[test]
    fn reads_what_sfdisk_wrote() {
        const DISK: u64 = 64 << 20;
        if !crate::testing::host_has("reads_what_sfdisk_wrote", "sfdisk") {
            return;
        }
        use std::io::Write;
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::File::create(&path).unwrap().set_len(DISK).unwrap();
        let script = "label: dos\nstart=2048, size=16384, type=c\nstart=18432, size=16384, type=c\nstart=34816, type=5\nsize=8192, type=83\nsize=8192, type=83\ntype=83\n";
        let mut child = Command::new("sfdisk")
            .arg("--no-reread")
            .arg("-q")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sfdisk (fdisk package) is installed");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let dump = Command::new("sfdisk").arg("-d").arg(&path).output().unwrap();
        let dump = String::from_utf8_lossy(&dump.stdout);
        // sfdisk -d lines: "d.img5 : start= 36864, size= 8192, type=83"
        let theirs: Vec<(u32, u64, u64)> = dump
            .lines()
            .filter(|l| l.contains(" : start="))
            .filter(|l| !l.contains("type=5"))
            .map(|l| {
                let num: u32 = l
                    .split(" : ")
                    .next()
                    .unwrap()
                    .trim()
                    .strip_prefix(path.to_str().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                let field =
                    |k: &str| l.split(k).nth(1).unwrap().split(',').next().unwrap().trim().parse::<u64>().unwrap();
                (num, field("start="), field("size="))
            })
            .collect();
        let t = crate::parttable::read(&mut std::fs::File::open(&path).unwrap(), DISK).unwrap().unwrap();
        let ours: Vec<(u32, u64, u64)> = t.partitions.iter().map(|p| (p.number, p.start / 512, p.size / 512)).collect();
        assert_eq!(ours.len(), 5, "{dump}");
        assert_eq!(ours, theirs, "{dump}");
    }
}
