//! The data partition (`/var`), made ready before the root's init starts: kiln's initramfs runs
//! `kiln-agent mount-data` chrooted into the verified root, which
//!
//! 1. takes the data partition by its number (`device.json`) on the disk the verified root came
//!    from, never by an id another disk could carry;
//! 2. grows it to the end of the medium when it is the last partition: a GPT (the backup table
//!    moved to the new end first, [`GptTable::write_with`]) or a DOS table (the last logical
//!    partition and its extended container), written so that a power cut at any point leaves a
//!    table that reads, old or new, and the next boot finishes the job; then tells the kernel
//!    (`BLKPG_RESIZE_PARTITION`: the disk is in use, so it cannot re-read its table);
//! 3. makes an ext4 file system when the partition has none (first boot), checks it
//!    (`e2fsck -p`), mounts it on `/var` and grows the file system online to the partition
//!    (`resize2fs`, journalled: a provisioned file system keeps its data);
//! 4. brings the image's factory `/var` in ([`crate::factory`]).
//!
//! An unexpected table (another scheme, the data partition not last, more or fewer partitions
//! than the image made) is logged and left as it is: the partition is mounted at its size. When
//! the partition cannot be mounted at all, `/var` becomes a tmpfs for this boot, so that the
//! device still comes up and can be reached, and `/run/kiln/data-error` says why: the health
//! check fails on it (a trial boot rolls back) and `kiln-agent status` shows it.

use crate::exec::Cmd;
use crate::system::{self, Host};
use anyhow::{bail, Context as _, Result};
use kiln_device::gpt::{Found, GptTable};
use kiln_device::mbr::MbrTable;
use kiln_device::{DeviceConfig, Role};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const SECTOR: u64 = 512;
/// Smaller gains are not worth a table write (alignment leftovers).
const MIN_GAIN_SECTORS: u64 = 2048;
/// The grown partition's size stays a multiple of 4 KiB.
const ALIGN_SECTORS: u64 = 8;
/// Where the reason goes when /var could not be mounted (read by the health check and status).
pub const ERROR_FILE: &str = "/run/kiln/data-error";
/// The file system label, the same as `kiln flash --provision` gives it.
const LABEL: &str = "kiln-data";

/// What happened to the partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grow {
    /// The partition now ends at the end of the medium.
    Grown { from: u64, to: u64 },
    /// It already did (or the gain would be under 1 MiB).
    Full { size: u64 },
    /// The table is not what kiln made; left alone (the reason).
    Left(String),
}

/// Grows partition `number` of the disk behind `disk` (`disk_size` bytes) to the end of the
/// medium, if the table is one of kiln's and the partition is its last. `expected` is how many
/// partitions the image made. `barrier` runs between the steps of the write (an fsync).
pub fn grow_table<D: Read + Write + Seek>(
    disk: &mut D,
    disk_size: u64,
    number: u32,
    expected: usize,
    barrier: &mut dyn FnMut(&mut D) -> std::io::Result<()>,
) -> Result<Grow> {
    let sectors = disk_size / SECTOR;
    let table = kiln_device::parttable::read(disk, disk_size);
    let table = match table {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(Grow::Left("the disk has no partition table".into())),
        Err(kiln_device::parttable::PartTableError::Beyond { number: n, end, disk: d, .. }) => bail!(
            "partition {n} ends at byte {end}, beyond the end of the medium ({d} bytes): the medium is smaller \
             than the image; write the image to a card or disk of at least {end} bytes"
        ),
        Err(e) => return Ok(Grow::Left(format!("the partition table does not read: {e}"))),
    };
    if table.partitions.len() != expected {
        return Ok(Grow::Left(format!(
            "the disk has {} partitions where the image made {expected}",
            table.partitions.len()
        )));
    }
    let Some(last) = table.last() else { return Ok(Grow::Left("the table has no partitions".into())) };
    if last.number != number {
        return Ok(Grow::Left(format!(
            "the data partition ({number}) is not the last on the disk (partition {} is)",
            last.number
        )));
    }
    match table.scheme {
        kiln_device::parttable::Scheme::Gpt => grow_gpt(disk, sectors, number, barrier),
        kiln_device::parttable::Scheme::Dos => grow_dos(disk, sectors, number, barrier),
    }
}

/// The last sector a partition starting at `first` may end on when the medium's usable area
/// ends at `usable_last`, keeping its size a multiple of [`ALIGN_SECTORS`].
fn aligned_last(first: u64, usable_last: u64) -> u64 {
    first + (usable_last + 1 - first) / ALIGN_SECTORS * ALIGN_SECTORS - 1
}

fn grow_gpt<D: Read + Write + Seek>(
    disk: &mut D,
    sectors: u64,
    number: u32,
    barrier: &mut dyn FnMut(&mut D) -> std::io::Result<()>,
) -> Result<Grow> {
    let (mut table, found) = GptTable::read_where(disk, sectors)?;
    let backup_at_end = matches!(found, Found::Primary { backup_lba } if backup_lba == sectors - 1);
    if let Found::Backup { primary_error } = &found {
        println!("kiln-agent: the primary GPT does not read ({primary_error}); using the backup and writing both");
    }
    let p = table.partitions.get_mut(number as usize - 1).context("no such GPT entry")?;
    let from = (p.last_lba + 1 - p.first_lba) * SECTOR;
    // The backup entries (32 sectors) and header sit in the last 33 sectors.
    let target = aligned_last(p.first_lba, sectors - 34);
    let grow = target >= p.last_lba + MIN_GAIN_SECTORS;
    if !grow && backup_at_end {
        return Ok(Grow::Full { size: from });
    }
    if grow {
        p.last_lba = target;
    }
    let to = (p.last_lba + 1 - p.first_lba) * SECTOR;
    table.disk_sectors = sectors;
    table.write_with(disk, barrier)?;
    Ok(if grow { Grow::Grown { from, to } } else { Grow::Full { size: to } })
}

fn grow_dos<D: Read + Write + Seek>(
    disk: &mut D,
    sectors: u64,
    number: u32,
    barrier: &mut dyn FnMut(&mut D) -> std::io::Result<()>,
) -> Result<Grow> {
    let mut table = MbrTable::read(disk)?;
    let p = table.partitions.iter_mut().find(|p| p.number == number).context("no such DOS partition")?;
    let from = p.sectors * SECTOR;
    // DOS tables count sectors in 32 bits: at most 2 TiB.
    let end = sectors.min(u32::MAX as u64);
    let target = aligned_last(p.first_lba, end - 1) + 1 - p.first_lba;
    let grow = target >= p.sectors + MIN_GAIN_SECTORS;
    if grow {
        p.sectors = target;
    }
    let to = p.sectors * SECTOR;
    // kiln's writer puts the EBRs first and the MBR (with the extended container) last.
    let mut rec = kiln_device::fs::WriteLog::default();
    if let Err(e) = table.write(&mut rec) {
        return Ok(Grow::Left(format!("the DOS table is not laid out as kiln lays it out: {e}")));
    }
    let mut same = true;
    for (at, bytes) in &rec.writes {
        let mut have = vec![0u8; bytes.len()];
        disk.seek(SeekFrom::Start(*at))?;
        disk.read_exact(&mut have)?;
        same &= have == *bytes;
    }
    if same {
        return Ok(Grow::Full { size: to });
    }
    // Not grown, yet the written table differs: a table from another tool; leave it.
    if !grow && !dos_torn_grow(disk, &table)? {
        return Ok(Grow::Left("the DOS table was not written by kiln (its bytes differ from kiln's)".into()));
    }
    let n = rec.writes.len();
    for (i, (at, bytes)) in rec.writes.iter().enumerate() {
        if i + 1 == n {
            barrier(disk)?;
        }
        disk.seek(SeekFrom::Start(*at))?;
        disk.write_all(bytes)?;
    }
    barrier(disk)?;
    Ok(if grow { Grow::Grown { from, to } } else { Grow::Full { size: to } })
}

/// A grow cut between the EBR and the MBR: the last logical partition ends beyond its extended
/// container.
fn dos_torn_grow<D: Read + Seek>(disk: &mut D, table: &MbrTable) -> Result<bool> {
    let mut mbr = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut mbr)?;
    let Some(last) = table.partitions.iter().max_by_key(|p| p.first_lba) else { return Ok(false) };
    for i in 0..4 {
        let e = &mbr[446 + 16 * i..462 + 16 * i];
        if matches!(e[4], 0x05 | 0x0f | 0x85) {
            let start = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")) as u64;
            let len = u32::from_le_bytes(e[12..16].try_into().expect("4 bytes")) as u64;
            return Ok(start + len < last.first_lba + last.sectors);
        }
    }
    Ok(false)
}

/// `BLKPG_RESIZE_PARTITION`: the kernel's view of partition `number` of the open disk.
fn kernel_resize(disk: &std::fs::File, number: u32, start: u64, size: u64) -> Result<()> {
    #[repr(C)]
    struct BlkpgPartition {
        start: i64,
        length: i64,
        pno: libc::c_int,
        devname: [libc::c_char; 64],
        volname: [libc::c_char; 64],
    }
    #[repr(C)]
    struct BlkpgIoctlArg {
        op: libc::c_int,
        flags: libc::c_int,
        datalen: libc::c_int,
        data: *mut libc::c_void,
    }
    const BLKPG: libc::c_ulong = 0x1269;
    const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
    let mut part = BlkpgPartition {
        start: start as i64,
        length: size as i64,
        pno: number as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: &mut part as *mut BlkpgPartition as *mut libc::c_void,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: BLKPG takes a pointer to a blkpg_ioctl_arg whose data points at a
    // blkpg_partition; both live on this stack frame for the duration of the call.
    let r = unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG as _, &arg as *const BlkpgIoctlArg) };
    if r != 0 {
        bail!("BLKPG_RESIZE_PARTITION: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The size of the ext4 file system on `dev`, from its superblock (None: not ext2/3/4).
fn ext4_size(dev: &Path) -> Result<Option<u64>> {
    let mut f = std::fs::File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let mut sb = [0u8; 1024];
    f.seek(SeekFrom::Start(1024))?;
    f.read_exact(&mut sb).with_context(|| format!("reading the superblock of {}", dev.display()))?;
    if u16::from_le_bytes([sb[56], sb[57]]) != 0xef53 {
        return Ok(None);
    }
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes")) as u64;
    let block = 1024u64 << u32_at(24).min(16);
    let mut blocks = u32_at(4);
    if u32_at(96) & 0x80 != 0 {
        blocks |= u32_at(0x150) << 32;
    }
    Ok(Some(blocks * block))
}

/// What `blkid -p` finds on `dev`: a file system type, or None for nothing at all.
fn probe(dev: &Path) -> Result<Option<String>> {
    let r = Cmd::new("blkid").args(["-p", "-o", "value", "-s", "TYPE"]).arg(dev).watch(
        Duration::from_secs(60),
        |_| true,
        |_| None,
    )?;
    match r.code {
        Some(0) => Ok(Some(r.stdout.join("").trim().to_string()).filter(|t| !t.is_empty())),
        // 2: no signature found.
        Some(2) => Ok(None),
        _ => bail!("blkid -p {} failed: {}", dev.display(), r.stderr.join("; ")),
    }
}

/// What [`mount`] did, for the console.
#[derive(Debug, Default)]
pub struct Report {
    pub device: PathBuf,
    pub grow: Option<Grow>,
    pub formatted: bool,
    pub fs_grown: Option<(u64, u64)>,
    pub size: u64,
}

fn mib(b: u64) -> String {
    if b >= 10 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", b >> 20)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/var is {} ({}", self.device.display(), mib(self.size))?;
        match &self.grow {
            Some(Grow::Grown { from, to }) => write!(f, "; partition grown from {} to {}", mib(*from), mib(*to))?,
            Some(Grow::Left(why)) => write!(f, "; not grown: {why}")?,
            _ => {}
        }
        if self.formatted {
            write!(f, "; new ext4 file system")?;
        }
        if let Some((a, b)) = self.fs_grown {
            write!(f, "; file system grown from {} to {}", mib(a), mib(b))?;
        }
        write!(f, ")")
    }
}

/// Finds, grows, formats, checks and mounts the data partition on `target`.
pub fn mount(host: &Host, config: &DeviceConfig, target: &Path) -> Result<Report> {
    let data = config.partition(Role::Data, None).context("device.json names no data partition")?;
    let root = host.booted_root()?;
    let disk_dev = host.disk_device(&root.disk);
    let dev = host.partition_device(&root.disk, data.number)?;
    let mut report = Report { device: dev.clone(), ..Report::default() };

    let disk_size = system::device_size(&disk_dev)?;
    let mut disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk_dev)
        .with_context(|| format!("opening {}", disk_dev.display()))?;
    let grow = grow_table(&mut disk, disk_size, data.number, config.partitions.len(), &mut |d| d.sync_data())
        .with_context(|| format!("growing the data partition {} on {}", data.number, disk_dev.display()))?;
    // Tell the kernel whenever the table's size differs from its own (also after a boot that
    // grew the table and lost power before this step).
    let table = kiln_device::parttable::read(&mut disk, disk_size)?.context("the partition table vanished")?;
    if let Some(p) = table.partitions.iter().find(|p| p.number == data.number) {
        if system::device_size(&dev)? != p.size {
            kernel_resize(&disk, data.number, p.start, p.size)
                .with_context(|| format!("telling the kernel the new size of {}", dev.display()))?;
        }
    }
    report.grow = Some(grow);
    drop(disk);
    let part_size = system::device_size(&dev)?;

    match probe(&dev)? {
        None => {
            Cmd::new("mkfs.ext4").args(["-q", "-L", LABEL, "-E", "nodiscard"]).arg(&dev).run()?;
            report.formatted = true;
        }
        Some(t) if t == "ext4" => {
            let r = Cmd::new("e2fsck").args(["-p"]).arg(&dev).watch(Duration::from_secs(3600), |_| true, |_| None)?;
            match r.code {
                Some(0..=3) => {}
                code => println!(
                    "kiln-agent: e2fsck -p {} could not repair everything (exit {code:?}): {}; mounting it anyway",
                    dev.display(),
                    r.stderr.join("; ")
                ),
            }
        }
        Some(t) => bail!(
            "{} holds a {t} file system, not ext4: kiln does not format or mount it; \
             write the image again (or `kiln flash --provision`) to start this device afresh",
            dev.display()
        ),
    }
    if !std::fs::read_to_string("/proc/filesystems").unwrap_or_default().contains("\text4\n") {
        Cmd::new("modprobe").arg("ext4").run()?;
    }
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(&dev),
        target,
        Some("ext4"),
        MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .with_context(|| format!("mounting {} (ext4) on {}", dev.display(), target.display()))?;
    let fs = ext4_size(&dev)?.unwrap_or(part_size);
    if fs + 4096 * 256 <= part_size {
        // Online, journalled: a power cut leaves a consistent file system and the next boot
        // grows it again.
        Cmd::new("resize2fs").arg(&dev).run()?;
        report.fs_grown = Some((fs, ext4_size(&dev)?.unwrap_or(part_size)));
    }
    report.size = ext4_size(&dev)?.unwrap_or(part_size);
    Ok(report)
}

/// [`mount`], or a tmpfs on `target` and the reason in [`ERROR_FILE`] when it fails.
pub fn mount_or_tmpfs(host: &Host, config: Result<DeviceConfig, String>, target: &Path) -> Result<()> {
    let result = config.map_err(anyhow::Error::msg).and_then(|c| mount(host, &c, target));
    match result {
        Ok(report) => {
            println!("kiln-agent: {report}");
            let _ = std::fs::remove_file(ERROR_FILE);
            // The image's /var reaching the data partition; a failure here is reported, and
            // the boot goes on with what the device has.
            let root = host
                .kernel_cmdline()
                .ok()
                .and_then(|c| system::cmdline_value(&c, "kiln.verity").map(str::to_string))
                .unwrap_or_default();
            let factory = Path::new(crate::factory::FACTORY);
            match crate::factory::deliver(factory, factory, target, &root) {
                Ok(d) if d.unchanged => {}
                Ok(d) => println!("kiln-agent: {d}"),
                Err(e) => println!("kiln-agent: error: delivering the image's factory /var: {e:#}"),
            }
            Ok(())
        }
        Err(e) => {
            let why = format!("{e:#}");
            println!(
                "kiln-agent: error: the data partition could not be mounted on {}: {why}; {} is a \
                 temporary file system for this boot: nothing written there survives a reboot",
                target.display(),
                target.display()
            );
            if let Some(dir) = Path::new(ERROR_FILE).parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = std::fs::write(ERROR_FILE, format!("{why}\n"));
            use nix::mount::MsFlags;
            nix::mount::mount(
                Some("tmpfs"),
                target,
                Some("tmpfs"),
                MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                Some("mode=0755"),
            )
            .with_context(|| format!("mounting a tmpfs on {}", target.display()))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_device::gpt::{GptPartition, TYPE_LINUX_DATA};
    use kiln_device::mbr::{MbrPartition, TYPE_FAT32_LBA, TYPE_LINUX};
    use kiln_device::Uuid;
    use std::io::Cursor;

    const MIB_S: u64 = 2048;

    fn gpt(sectors: u64) -> GptTable {
        let part = |name: &str, first: u64, last: u64| GptPartition {
            type_guid: Uuid::parse(TYPE_LINUX_DATA).unwrap(),
            guid: Uuid::derive("t", name),
            first_lba: first,
            last_lba: last,
            name: name.into(),
        };
        GptTable {
            disk_guid: Uuid::derive("t", "disk"),
            disk_sectors: sectors,
            partitions: vec![
                part("esp", MIB_S, 2 * MIB_S - 1),
                part("root", 2 * MIB_S, 4 * MIB_S - 1),
                part("data", 4 * MIB_S, 7 * MIB_S - 1),
            ],
        }
    }

    fn no_barrier(_: &mut Cursor<Vec<u8>>) -> std::io::Result<()> {
        Ok(())
    }

    /// The image (8 MiB) written to a disk of `size` MiB.
    fn gpt_disk(size: u64) -> Cursor<Vec<u8>> {
        let mut image = Cursor::new(vec![0u8; (8 * MIB_S * SECTOR) as usize]);
        gpt(8 * MIB_S).write(&mut image).unwrap();
        let mut d = image.into_inner();
        d.resize((size * MIB_S * SECTOR) as usize, 0);
        Cursor::new(d)
    }

    #[test]
    fn a_gpt_data_partition_grows_to_the_end_once() {
        let mut d = gpt_disk(64);
        let size = d.get_ref().len() as u64;
        let g = grow_table(&mut d, size, 3, 3, &mut no_barrier).unwrap();
        let to = (64 * MIB_S - 34 - 4 * MIB_S + 1) / 8 * 8 * SECTOR;
        assert_eq!(g, Grow::Grown { from: 3 << 20, to });
        let t = GptTable::read(&mut d, 64 * MIB_S).unwrap();
        assert_eq!(t.partitions[2].first_lba, 4 * MIB_S);
        assert_eq!((t.partitions[2].last_lba + 1 - t.partitions[2].first_lba) * SECTOR, to);
        assert_eq!(t.partitions[..2], gpt(0).partitions[..2]);
        // The backup moved to the end: again is a no-op that writes nothing.
        let before = d.get_ref().clone();
        assert_eq!(grow_table(&mut d, size, 3, 3, &mut no_barrier).unwrap(), Grow::Full { size: to });
        assert!(*d.get_ref() == before);
    }

    #[test]
    fn an_image_on_a_medium_of_its_own_size_is_left_as_it_is() {
        let mut d = gpt_disk(8);
        let before = d.get_ref().clone();
        assert_eq!(
            grow_table(&mut d, 8 * MIB_S * SECTOR, 3, 3, &mut no_barrier).unwrap(),
            Grow::Full { size: 3 << 20 }
        );
        assert!(*d.get_ref() == before);
    }

    #[test]
    fn unexpected_tables_are_left_alone_and_a_small_medium_is_an_error() {
        // The data partition is not the last one.
        let mut d = gpt_disk(64);
        let size = d.get_ref().len() as u64;
        let before = d.get_ref().clone();
        let g = grow_table(&mut d, size, 2, 3, &mut no_barrier).unwrap();
        assert_eq!(g, Grow::Left("the data partition (2) is not the last on the disk (partition 3 is)".into()));
        // A partition more than the image made.
        let g = grow_table(&mut d, size, 3, 4, &mut no_barrier).unwrap();
        assert!(matches!(g, Grow::Left(ref m) if m.contains("3 partitions where the image made 4")), "{g:?}");
        // No table at all.
        let mut blank = Cursor::new(vec![0u8; (8 * MIB_S * SECTOR) as usize]);
        assert!(matches!(grow_table(&mut blank, 8 * MIB_S * SECTOR, 3, 3, &mut no_barrier).unwrap(), Grow::Left(_)));
        assert!(*d.get_ref() == before);
        // The image cut short (written to a card smaller than itself).
        let mut short = Cursor::new(d.get_ref()[..(5 * MIB_S * SECTOR) as usize].to_vec());
        let e = grow_table(&mut short, 5 * MIB_S * SECTOR, 3, 3, &mut no_barrier).unwrap_err().to_string();
        assert!(e.contains("the medium is smaller than the image"), "{e}");
    }

    /// The Pi layout: autoboot, two boot partitions, root-a, root-b and data as logicals 5-7.
    fn dos(sectors_data: u64) -> MbrTable {
        let p =
            |number, kind, first, sectors| MbrPartition { number, kind, bootable: false, first_lba: first, sectors };
        MbrTable {
            disk_id: 0x1234_5678,
            partitions: vec![
                p(1, TYPE_FAT32_LBA, MIB_S, MIB_S),
                p(2, TYPE_FAT32_LBA, 2 * MIB_S, MIB_S),
                p(3, TYPE_FAT32_LBA, 3 * MIB_S, MIB_S),
                p(5, TYPE_LINUX, 5 * MIB_S, MIB_S),
                p(6, TYPE_LINUX, 7 * MIB_S, MIB_S),
                p(7, TYPE_LINUX, 9 * MIB_S, sectors_data),
            ],
        }
    }

    #[test]
    fn a_dos_data_partition_grows_with_its_extended_container_and_a_cut_grow_is_finished() {
        let mut image = Cursor::new(vec![0u8; (16 * MIB_S * SECTOR) as usize]);
        dos(MIB_S).write(&mut image).unwrap();
        let mut d = image.into_inner();
        d.resize((64 * MIB_S * SECTOR) as usize, 0);
        let size = d.len() as u64;
        let original = d.clone();
        let mut d = Cursor::new(d);
        let g = grow_table(&mut d, size, 7, 6, &mut no_barrier).unwrap();
        assert_eq!(g, Grow::Grown { from: 1 << 20, to: (64 - 9) << 20 });
        let t = MbrTable::read(&mut d).unwrap();
        assert_eq!(t, dos(55 * MIB_S));
        // Linux's view: the extended container (entry 4) now reaches the end of the disk.
        let e = &d.get_ref()[446 + 48..462 + 48];
        let (start, len) =
            (u32::from_le_bytes(e[8..12].try_into().unwrap()), u32::from_le_bytes(e[12..16].try_into().unwrap()));
        assert_eq!(start as u64 + len as u64, 64 * MIB_S);
        assert_eq!(grow_table(&mut d, size, 7, 6, &mut no_barrier).unwrap(), Grow::Full { size: 55 << 20 });

        // A power cut after the EBR and before the MBR: the next boot finishes it.
        let mut torn = original.clone();
        let ebr = ((9 * MIB_S - 2048) * SECTOR) as usize;
        torn[ebr..ebr + 512].copy_from_slice(&d.get_ref()[ebr..ebr + 512]);
        let mut torn = Cursor::new(torn);
        assert_eq!(MbrTable::read(&mut torn).unwrap().partitions[5].sectors, 55 * MIB_S);
        assert_eq!(grow_table(&mut torn, size, 7, 6, &mut no_barrier).unwrap(), Grow::Full { size: 55 << 20 });
        assert!(torn.get_ref() == d.get_ref());
    }

    #[test]
    fn the_report_says_what_happened() {
        let r = Report {
            device: "/dev/vda4".into(),
            grow: Some(Grow::Grown { from: 512 << 20, to: 8 << 30 }),
            formatted: true,
            fs_grown: None,
            size: (8u64 << 30) - (1 << 20),
        };
        assert_eq!(
            r.to_string(),
            "/var is /dev/vda4 (8191 MiB; partition grown from 512 MiB to 8192 MiB; new ext4 file system)"
        );
    }
}
