//! What the agent reads from and does to the running system: the kernel command line, which
//! partition the verified root came from, block device paths, free space, local time, and
//! systemd (unit state, reboot; its processes are spawned through `exec::Cmd`).

use crate::exec::Cmd;
use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};

/// Where sysfs, procfs and /dev are; tests point this at a fake tree.
#[derive(Debug, Clone)]
pub struct Host {
    pub root: PathBuf,
}

impl Default for Host {
    fn default() -> Host {
        Host { root: PathBuf::from("/") }
    }
}

impl Host {
    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    pub fn kernel_cmdline(&self) -> Result<String> {
        let p = self.path("/proc/cmdline");
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }

    /// The disk and partition the dm-verity root (`/dev/mapper/root`) is made from.
    pub fn booted_root(&self) -> Result<BlockPartition> {
        let block = self.path("/sys/block");
        let entries = std::fs::read_dir(&block).with_context(|| format!("reading {}", block.display()))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with("dm-") {
                continue;
            }
            let dm_name = std::fs::read_to_string(e.path().join("dm/name")).unwrap_or_default();
            if dm_name.trim() != "root" {
                continue;
            }
            let slaves = e.path().join("slaves");
            let part = std::fs::read_dir(&slaves)
                .with_context(|| format!("reading {}", slaves.display()))?
                .flatten()
                .map(|s| s.file_name().to_string_lossy().to_string())
                .next()
                .with_context(|| format!("{} lists no device under the verified root", slaves.display()))?;
            return self.partition(&part);
        }
        bail!("no device-mapper device named \"root\": this system did not boot from a kiln verified root")
    }

    /// A partition by its kernel name ("vda2", "mmcblk0p5").
    pub fn partition(&self, name: &str) -> Result<BlockPartition> {
        let sys = self.path(&format!("/sys/class/block/{name}"));
        let number: u32 = std::fs::read_to_string(sys.join("partition"))
            .with_context(|| format!("{name} is not a partition ({} missing)", sys.join("partition").display()))?
            .trim()
            .parse()
            .with_context(|| format!("reading the partition number of {name}"))?;
        let real = std::fs::canonicalize(&sys).with_context(|| format!("resolving {}", sys.display()))?;
        let disk = real
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .with_context(|| format!("no parent disk for {name}"))?;
        Ok(BlockPartition { disk, name: name.into(), number })
    }

    /// `/dev/<name>` of partition `number` of `disk`.
    pub fn partition_device(&self, disk: &str, number: u32) -> Result<PathBuf> {
        let sys = self.path(&format!("/sys/class/block/{disk}"));
        for e in std::fs::read_dir(&sys).with_context(|| format!("reading {}", sys.display()))?.flatten() {
            let n = std::fs::read_to_string(e.path().join("partition")).ok().and_then(|s| s.trim().parse::<u32>().ok());
            if n == Some(number) {
                return Ok(self.path(&format!("/dev/{}", e.file_name().to_string_lossy())));
            }
        }
        bail!("disk {disk} has no partition {number}: is this the disk the image was written to?")
    }

    pub fn disk_device(&self, disk: &str) -> PathBuf {
        self.path(&format!("/dev/{disk}"))
    }

    /// The Raspberry Pi firmware's report of the partition it booted (absent under QEMU).
    pub fn rpi_boot_partition(&self) -> Option<u32> {
        let b = std::fs::read(self.path("/proc/device-tree/chosen/bootloader/partition")).ok()?;
        Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockPartition {
    /// Kernel name of the whole disk ("vda", "mmcblk0").
    pub disk: String,
    pub name: String,
    pub number: u32,
}

/// The value of `key=` on a kernel command line.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Bytes available to root on the file system holding `path`.
/// An exclusive lock on `path` (created, with its directory), or None while another process
/// holds it. Released when the value is dropped (or the process ends).
pub fn try_lock(path: &Path) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(anyhow::anyhow!("locking {}: {e}", path.display())),
    }
}

/// Whether the clock was set from the network since boot: systemd-timesyncd creates this file
/// at its first synchronisation (a QEMU guest with no time server never has it).
pub fn clock_synchronised() -> bool {
    Path::new("/run/systemd/timesync/synchronized").exists()
}

/// Whether the kernel considers its clock synchronised (`adjtimex`: not TIME_ERROR), whoever
/// set it (timesyncd, chrony, an NTP daemon).
pub fn kernel_clock_synchronised() -> bool {
    // SAFETY: adjtimex with modes 0 only reads into the struct it is given.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut t) };
    state >= 0 && state != libc::TIME_ERROR
}

/// Seconds since boot (/proc/uptime); 0 when it cannot be read.
pub fn uptime_secs() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        .unwrap_or(0.0) as u64
}

/// This machine's host name ("kiln" when it has none).
pub fn hostname() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "kiln".into())
}

pub fn free_bytes(path: &Path) -> Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Size of a block device or file.
pub fn device_size(path: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::End(0)).with_context(|| format!("reading the size of {}", path.display()))
}

/// `systemctl is-active --quiet unit`: is the unit running (or starting)?
pub fn is_active(unit: &str) -> bool {
    Cmd::new("systemctl").args(["is-active", "--quiet", unit]).run().is_ok()
}

/// systemd's ActiveState of `unit` ("active", "activating" while it restarts, "failed",
/// "inactive", ...); "unknown" when systemctl does not answer.
pub fn active_state(unit: &str) -> String {
    Cmd::new("systemctl")
        .args(["show", "--property=ActiveState", "--value", unit])
        .output()
        .map(|o| String::from_utf8_lossy(&o).trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Reboots through systemd. `tryboot`: the Raspberry Pi firmware boots the `[tryboot]`
/// slot once (the parameter reaches the firmware through the reboot syscall).
pub fn reboot(tryboot: bool) -> Result<()> {
    if tryboot {
        std::fs::write("/run/systemd/reboot-param", "0 tryboot\n").context("writing /run/systemd/reboot-param")?;
    }
    Ok(Cmd::new("systemctl").arg("reboot").run()?)
}

/// Minutes since local midnight, from the C library's idea of the local zone (/etc/localtime).
pub fn local_minutes(unix: u64) -> u32 {
    let t = unix as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r writes only into `tm`, which lives for the call.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if ok {
        (tm.tm_hour * 60 + tm.tm_min) as u32
    } else {
        ((unix / 60) % (24 * 60)) as u32
    }
}

/// A daily window "HH:MM-HH:MM" (it may wrap past midnight).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

impl Window {
    pub fn parse(s: &str) -> Result<Window> {
        let hm = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (a, b) = s.split_once('-').with_context(|| format!("update window {s:?} is not \"HH:MM-HH:MM\""))?;
        match (hm(a), hm(b)) {
            (Some(start), Some(end)) => Ok(Window { start, end }),
            _ => bail!("update window {s:?} is not \"HH:MM-HH:MM\""),
        }
    }

    pub fn contains(&self, minute: u32) -> bool {
        if self.start <= self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_values() {
        let c = "root=/dev/mapper/root kiln.verity=abcd kiln.root=PARTUUID=1234abcd-05 quiet";
        assert_eq!(cmdline_value(c, "kiln.verity"), Some("abcd"));
        assert_eq!(cmdline_value(c, "kiln.root"), Some("PARTUUID=1234abcd-05"));
        assert_eq!(cmdline_value(c, "kiln.ver"), None);
    }

    #[test]
    fn a_second_holder_of_a_lock_is_told_no() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/check.lock");
        let first = try_lock(&path).unwrap();
        assert!(first.is_some());
        // Before: two checks (the timer's and `check --now`) both wrote the other slot.
        assert!(try_lock(&path).unwrap().is_none());
        drop(first);
        assert!(try_lock(&path).unwrap().is_some());
    }

    #[test]
    fn windows() {
        let w = Window::parse("03:00-05:00").unwrap();
        assert!(w.contains(3 * 60) && w.contains(4 * 60 + 59) && !w.contains(5 * 60));
        let wrap = Window::parse("23:30-01:00").unwrap();
        assert!(wrap.contains(23 * 60 + 45) && wrap.contains(30) && !wrap.contains(12 * 60));
        assert!(Window::parse("3am-5am").is_err());
        assert!(Window::parse("25:00-01:00").is_err());
    }

    #[test]
    fn finds_the_verified_roots_partition_in_sysfs() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let mk = |p: &str, text: &str| {
            let p = r.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        // /sys/devices/.../vda/vda{1,3}, /sys/class/block links, dm-0 over vda3.
        mk("sys/devices/pci0/virtio1/block/vda/vda1/partition", "1\n");
        mk("sys/devices/pci0/virtio1/block/vda/vda3/partition", "3\n");
        std::fs::create_dir_all(r.join("sys/class/block")).unwrap();
        for p in ["vda", "vda/vda1", "vda/vda3"] {
            let name = p.rsplit('/').next().unwrap();
            std::os::unix::fs::symlink(
                r.join("sys/devices/pci0/virtio1/block").join(p),
                r.join("sys/class/block").join(name),
            )
            .unwrap();
        }
        mk("sys/block/dm-0/dm/name", "root\n");
        mk("sys/block/dm-0/slaves/vda3", "");
        let host = Host { root: r.to_path_buf() };
        let b = host.booted_root().unwrap();
        assert_eq!(b, BlockPartition { disk: "vda".into(), name: "vda3".into(), number: 3 });
        assert_eq!(host.partition_device("vda", 1).unwrap(), r.join("dev/vda1"));
        let e = host.partition_device("vda", 7).unwrap_err().to_string();
        assert_eq!(e, "disk vda has no partition 7: is this the disk the image was written to?");
    }
}
