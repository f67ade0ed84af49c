//! The target of `kiln flash` as sysfs and /proc describe it, and the checks that refuse the
//! wrong one: not a block device, the disk of the running system, a partition, mounted, used as
//! swap, held by device-mapper or md, read-only. Every check reads only; none opens the device.

use anyhow::{bail, Context as _, Result};
use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A block device number, `major:minor` as sysfs and mountinfo write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl DevId {
    pub fn from_rdev(rdev: u64) -> DevId {
        DevId { major: nix::libc::major(rdev), minor: nix::libc::minor(rdev) }
    }

    pub fn parse(s: &str) -> Option<DevId> {
        let (a, b) = s.trim().split_once(':')?;
        Some(DevId { major: a.parse().ok()?, minor: b.parse().ok()? })
    }

    /// The device's directory under /sys/devices, through /sys/dev/block/MAJ:MIN.
    fn sysfs(self) -> Option<PathBuf> {
        fs::canonicalize(format!("/sys/dev/block/{self}")).ok()
    }
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The device the user named.
pub struct BlockDevice {
    /// As given on the command line (it may be a /dev/disk/by-id link).
    pub path: PathBuf,
    /// The kernel's name: sdb, mmcblk0, loop3.
    pub name: String,
    pub dev: DevId,
    /// Its directory under /sys/devices.
    pub sysfs: PathBuf,
    /// The kernel's sequence number of the medium (Linux >= 5.15): a new card in the reader, or
    /// a loop device attached to another file, gets a new one under the same device number.
    pub diskseq: Option<u64>,
}

impl BlockDevice {
    /// Looks the device up; anything that is not a block device is refused here.
    pub fn inspect(path: &Path) -> Result<BlockDevice> {
        let meta = fs::metadata(path)
            .with_context(|| format!("{}: no such device (lsblk lists the disks)", path.display()))?;
        if !meta.file_type().is_block_device() {
            bail!("refusing to write {}: it is not a block device; pass the whole SD card or USB stick, like /dev/sdX or /dev/mmcblk0 (lsblk lists them)", path.display());
        }
        let dev = DevId::from_rdev(meta.rdev());
        let sysfs = dev.sysfs().with_context(|| {
            format!("{}: block device {dev} has no entry /sys/dev/block/{dev} (is sysfs mounted?)", path.display())
        })?;
        let name = sysfs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let diskseq = fs::read_to_string(sysfs.join("diskseq")).ok().and_then(|s| s.trim().parse().ok());
        Ok(BlockDevice { path: path.to_path_buf(), name, dev, sysfs, diskseq })
    }

    fn attr(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.sysfs.join(rel)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }

    /// Size in bytes (sysfs counts 512-byte sectors whatever the device's block size).
    pub fn size(&self) -> Result<u64> {
        let s = self.attr("size").with_context(|| {
            format!("{}: cannot read its size from {}", self.path.display(), self.sysfs.join("size").display())
        })?;
        let sectors: u64 =
            s.parse().with_context(|| format!("{}: unexpected size {s:?} in sysfs", self.path.display()))?;
        Ok(sectors * 512)
    }

    /// The whole disk's name when this is a partition.
    pub fn partition_of(&self) -> Option<String> {
        if self.sysfs.join("partition").exists() {
            self.sysfs.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned())
        } else {
            None
        }
    }

    /// The partitions the kernel knows on this disk: name and device number.
    pub fn partitions(&self) -> Vec<(String, DevId)> {
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(&self.sysfs) {
            for e in rd.flatten() {
                let p = e.path();
                if p.join("partition").exists() {
                    if let Some(dev) = fs::read_to_string(p.join("dev")).ok().and_then(|s| DevId::parse(&s)) {
                        out.push((e.file_name().to_string_lossy().into_owned(), dev));
                    }
                }
            }
        }
        out.sort();
        out
    }

    pub fn read_only(&self) -> bool {
        self.attr("ro").as_deref() == Some("1")
    }

    /// Vendor and model as the kernel reports them, or what the device is.
    pub fn model(&self) -> String {
        if let Some(file) = self.attr("loop/backing_file") {
            return format!("loop device backed by {file}");
        }
        let mut parts: Vec<String> = Vec::new();
        for rel in ["device/vendor", "device/model"] {
            if let Some(v) = self.attr(rel) {
                parts.push(v);
            }
        }
        if let (Some(kind), Some(name)) = (self.attr("device/type"), self.attr("device/name")) {
            parts.push(format!("{kind} card {name}"));
        }
        if parts.is_empty() {
            "unknown model".into()
        } else {
            parts.join(" ")
        }
    }

    pub fn removable(&self) -> bool {
        self.attr("removable").as_deref() == Some("1")
    }

    /// The device and its partitions: what a mount or swap must not be on.
    fn family(&self) -> Vec<(String, DevId)> {
        let mut v = vec![(self.name.clone(), self.dev)];
        v.extend(self.partitions());
        v
    }

    fn node(&self, name: &str) -> String {
        format!("/dev/{name}")
    }
}

/// One line of /proc/self/mountinfo, the parts that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub dev: DevId,
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
}

/// Parses /proc/self/mountinfo (see proc(5)): `id parent MAJ:MIN root mountpoint options
/// [optional fields] - fstype source superoptions`, with octal escapes in paths.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.len() < 5 || fields.len() < sep + 3 {
            continue;
        }
        let Some(dev) = DevId::parse(fields[2]) else { continue };
        out.push(Mount {
            dev,
            mount_point: unescape(fields[4]),
            fstype: unescape(fields[sep + 1]),
            source: unescape(fields[sep + 2]),
        });
    }
    out
}

/// Undoes the kernel's `\ooo` escapes (space, tab, newline, backslash) in mountinfo and swaps.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The device numbers a mount is on: the one mountinfo gives and, when the source is a block
/// device node, that node's (btrfs reports an anonymous device number).
fn mount_devs(m: &Mount) -> Vec<DevId> {
    let mut v = vec![m.dev];
    if m.source.starts_with('/') {
        if let Ok(meta) = fs::metadata(&m.source) {
            if meta.file_type().is_block_device() {
                v.push(DevId::from_rdev(meta.rdev()));
            }
        }
    }
    v
}

/// Mount points whose disks count as "the running system".
const SYSTEM_MOUNTS: &[&str] = &["/", "/usr", "/boot", "/boot/efi", "/efi"];

/// Every whole disk under `dev`: its parent when it is a partition, and through device-mapper
/// and md slaves and loop backing files, the disks those sit on.
fn disks_under(dev: DevId, depth: u32, out: &mut BTreeSet<DevId>) {
    if depth > 8 || !out.insert(dev) {
        return;
    }
    let Some(sys) = dev.sysfs() else { return };
    let disk_dir = if sys.join("partition").exists() {
        sys.parent().map(Path::to_path_buf).unwrap_or(sys.clone())
    } else {
        sys.clone()
    };
    if let Some(d) = fs::read_to_string(disk_dir.join("dev")).ok().and_then(|s| DevId::parse(&s)) {
        out.insert(d);
    }
    for dir in [&sys, &disk_dir] {
        if let Ok(rd) = fs::read_dir(dir.join("slaves")) {
            for e in rd.flatten() {
                if let Some(d) = fs::read_to_string(e.path().join("dev")).ok().and_then(|s| DevId::parse(&s)) {
                    disks_under(d, depth + 1, out);
                }
            }
        }
    }
    if let Ok(file) = fs::read_to_string(disk_dir.join("loop/backing_file")) {
        if let Ok(meta) = fs::metadata(file.trim()) {
            disks_under(DevId::from_rdev(meta.dev()), depth + 1, out);
        }
    }
}

fn read_proc(path: &str) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {path} (is /proc mounted?)"))
}

/// Refuses the disk (or a partition of the disk) that holds the running system.
pub fn refuse_system_disk(dev: &BlockDevice) -> Result<()> {
    let mounts = parse_mountinfo(&read_proc("/proc/self/mountinfo")?);
    // The target itself and, for a partition, its disk (not what a loop device's file is on).
    let own: Vec<DevId> = std::iter::once(dev.dev).chain(parent_dev(dev)).collect();
    for m in mounts.iter().filter(|m| SYSTEM_MOUNTS.contains(&m.mount_point.as_str())) {
        let mut system = BTreeSet::new();
        for d in mount_devs(m) {
            disks_under(d, 0, &mut system);
        }
        if own.iter().any(|d| system.contains(d)) {
            bail!(
                "refusing to write {}: it holds the running system ({} is mounted from {}); pick the SD card or USB stick instead (lsblk lists the disks)",
                dev.path.display(),
                m.mount_point,
                m.source
            );
        }
    }
    Ok(())
}

fn parent_dev(dev: &BlockDevice) -> Option<DevId> {
    dev.partition_of().and_then(|_| {
        dev.sysfs.parent().and_then(|p| fs::read_to_string(p.join("dev")).ok()).and_then(|s| DevId::parse(&s))
    })
}

/// Refuses a partition: the image brings its own partition table for the whole device.
pub fn refuse_partition(dev: &BlockDevice) -> Result<()> {
    if let Some(disk) = dev.partition_of() {
        bail!(
            "refusing to write {}: it is a partition of /dev/{disk}; pass the whole device /dev/{disk} (the image brings its own partition table)",
            dev.path.display()
        );
    }
    Ok(())
}

/// Refuses a device that is mounted, used as swap, or held by device-mapper/md, on itself or
/// on any of its partitions.
pub fn refuse_in_use(dev: &BlockDevice) -> Result<()> {
    let family = dev.family();
    let devs: BTreeSet<DevId> = family.iter().map(|(_, d)| *d).collect();
    let name_of =
        |d: DevId| family.iter().find(|(_, x)| *x == d).map(|(n, _)| dev.node(n)).unwrap_or_else(|| d.to_string());
    let mut problems = Vec::new();
    for m in parse_mountinfo(&read_proc("/proc/self/mountinfo")?) {
        if let Some(d) = mount_devs(&m).into_iter().find(|d| devs.contains(d)) {
            problems.push(format!("{} is mounted at {} (umount {})", name_of(d), m.mount_point, m.mount_point));
        }
    }
    for line in read_proc("/proc/swaps")?.lines().skip(1) {
        let Some(file) = line.split_whitespace().next().map(unescape) else { continue };
        if let Ok(meta) = fs::metadata(&file) {
            let d = DevId::from_rdev(meta.rdev());
            if meta.file_type().is_block_device() && devs.contains(&d) {
                problems.push(format!("{} is used as swap (swapoff {file})", name_of(d)));
            }
        }
    }
    for (name, _) in &family {
        let dir = if *name == dev.name { dev.sysfs.clone() } else { dev.sysfs.join(name) };
        if let Ok(rd) = fs::read_dir(dir.join("holders")) {
            for e in rd.flatten() {
                let holder = e.file_name().to_string_lossy().into_owned();
                let label = fs::read_to_string(e.path().join("dm/name"))
                    .map(|n| format!(" ({})", n.trim()))
                    .unwrap_or_default();
                problems.push(format!(
                    "{} is in use by {holder}{label}: a device-mapper (LVM, dm-crypt) or RAID device; stop that first",
                    dev.node(name)
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "refusing to write {}: it is in use: {}; make sure it is the device you mean",
            dev.path.display(),
            problems.join("; ")
        );
    }
    Ok(())
}

/// Refuses a read-only device (write-protect switch, or `blockdev --setro`).
pub fn refuse_read_only(dev: &BlockDevice) -> Result<()> {
    if dev.read_only() {
        bail!("refusing to write {}: the device is read-only (is the SD card's lock switch on?)", dev.path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let text = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    40 22 7:1 / /tmp/with\\040space rw shared:5 master:2 - vfat /dev/loop1 rw\n\
                    41 22 0:45 / /proc rw - proc proc rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0],
            Mount {
                dev: DevId { major: 254, minor: 0 },
                mount_point: "/".into(),
                fstype: "ext4".into(),
                source: "/dev/vda".into()
            }
        );
        assert_eq!(m[1].mount_point, "/tmp/with space");
        assert_eq!(m[1].dev.to_string(), "7:1");
        assert_eq!(m[1].source, "/dev/loop1");
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk.img");
        std::fs::write(&f, b"x").unwrap();
        let err = BlockDevice::inspect(&f).err().unwrap().to_string();
        assert!(err.starts_with(&format!("refusing to write {}: it is not a block device", f.display())), "{err}");
        let err = BlockDevice::inspect(&dir.path().join("nope")).err().unwrap().to_string();
        assert!(err.contains("no such device"), "{err}");
    }
}
