//! The boot medium: what decides which slot the firmware starts, and how the agent changes it.
//!
//! - **UEFI (systemd-boot):** every slot's root has its own UKI on the ESP,
//!   `EFI/Linux/kiln-<version>.efi`, whose command line carries the root hash (the root slot is
//!   found by the PARTUUID derived from it). A new version goes in as
//!   `kiln-<version>+<tries>.efi`: systemd-boot boots the newest entry, counts a try down on
//!   every start (`+2-1`, ...) and sorts an entry without tries left below the others, so the
//!   committed version boots again. Committing renames the file to drop the counter (what
//!   systemd-bless-boot does too); rolling back renames it to a used-up counter (`+0-<n>`).
//! - **Raspberry Pi (firmware tryboot):** `autoboot.txt` names the normal boot partition under
//!   `[all]` and the other under `[tryboot]`; a new version is started once with
//!   `reboot "0 tryboot"`, and any reset or power cut returns to the normal one. Committing
//!   rewrites autoboot.txt with the two swapped. Each boot slot's `cmdline.txt` names its root
//!   partition (`kiln.root=PARTUUID=<disk id>-<nn>`).

use crate::exec::Cmd;
use crate::state::{Booted, Slot, Tried};
use crate::system::{self, Host};
use anyhow::{bail, Context as _, Result};
use kiln_device::{Bootloader, DeviceConfig, Role};
use kiln_feed::Version;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub enum Medium {
    Uefi { esp: PathBuf },
    Rpi { autoboot: PathBuf },
}

pub use kiln_device::boot::{Autoboot, UkiName};
use kiln_device::fs::write_atomically;

/// autoboot.txt with `normal_partition` booted and `tryboot_partition` tried once (the builder's
/// writer too).
pub fn autoboot_txt(normal_partition: u32, tryboot_partition: u32) -> String {
    Autoboot::ab(normal_partition, tryboot_partition).render()
}

/// `[all]`'s and `[tryboot]`'s boot_partition from autoboot.txt, read with the firmware's rules.
pub fn parse_autoboot(text: &str) -> Result<(u32, u32)> {
    let a = Autoboot::parse(text).map_err(anyhow::Error::msg)?;
    match (a.tryboot_a_b, a.tryboot_partition) {
        (true, Some(t)) => Ok((a.default_partition, t)),
        _ => bail!("autoboot.txt has no A/B pair (tryboot_a_b=1 and boot_partition under both [all] and [tryboot])"),
    }
}

impl Medium {
    pub fn for_device(config: &DeviceConfig) -> Result<Medium> {
        Ok(match config.bootloader {
            Bootloader::SystemdBoot => Medium::Uefi { esp: PathBuf::from("/efi") },
            Bootloader::RpiFirmware => Medium::Rpi { autoboot: PathBuf::from("/boot/autoboot") },
        })
    }

    fn uki_dir(esp: &Path) -> PathBuf {
        esp.join("EFI/Linux")
    }

    /// The kiln UKIs on the ESP: (file name, parsed name).
    pub fn ukis(esp: &Path) -> Result<Vec<(String, UkiName)>> {
        let dir = Self::uki_dir(esp);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir)
            .with_context(|| format!("reading {} (is the ESP mounted on {}?)", dir.display(), esp.display()))?
        {
            let name =
                e.with_context(|| format!("reading {}", dir.display()))?.file_name().to_string_lossy().to_string();
            if let Some(u) = UkiName::parse(&name) {
                out.push((name, u));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// How this boot came about: `slot` is the root slot that booted, `version` this image's.
    pub fn booted(&self, host: &Host, config: &DeviceConfig, slot: Slot, version: &Version) -> Result<Booted> {
        let trial = match self {
            Medium::Uefi { esp } => {
                let mine: Vec<_> =
                    Self::ukis(esp)?.into_iter().filter(|(_, u)| u.version == version.as_str()).collect();
                // Counted and not blessed: a trial. (A blessed copy next to it would win.)
                !mine.is_empty() && mine.iter().all(|(_, u)| u.tries_left.is_some())
            }
            Medium::Rpi { autoboot } => {
                let text = std::fs::read_to_string(autoboot.join("autoboot.txt"))
                    .with_context(|| format!("reading {}/autoboot.txt", autoboot.display()))?;
                let (normal, _) = parse_autoboot(&text)?;
                let booted_part = host.rpi_boot_partition().unwrap_or(boot_partition(config, slot)?);
                booted_part != normal
            }
        };
        Ok(Booted { slot, version: version.clone(), trial })
    }

    /// Whether the firmware ever started `version` (the other slot's, on trial): on UEFI its
    /// entry's boot counter tells; a Raspberry Pi's one-shot tryboot leaves no trace.
    pub fn was_tried(&self, version: &Version) -> Result<Tried> {
        Ok(match self {
            Medium::Uefi { esp } => {
                let tried = Self::ukis(esp)?.iter().any(|(_, u)| u.version == version.as_str() && u.was_tried());
                if tried {
                    Tried::Yes
                } else {
                    Tried::No
                }
            }
            // Tryboot leaves no trace, but a rejected trial does (see `reject`).
            Medium::Rpi { autoboot } => {
                let path = autoboot.join("autoboot.txt");
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                match parse_autoboot(&text)? {
                    (normal, tryboot) if normal == tryboot => Tried::Yes,
                    _ => Tried::Unknown,
                }
            }
        })
    }

    /// Before the other slot is overwritten: nothing may still boot it. Removes every UKI but
    /// the running version's (UEFI); makes sure the Pi's normal slot is the running one.
    pub fn retire_other(&self, config: &DeviceConfig, running: Slot, running_version: &Version) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        match self {
            Medium::Uefi { esp } => {
                removed.extend(Self::remove_leftovers(esp)?);
                for (file, u) in Self::ukis(esp)? {
                    if u.version != running_version.as_str() {
                        let p = Self::uki_dir(esp).join(&file);
                        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                        removed.push(file);
                    }
                }
                sync_fs(esp)?;
            }
            Medium::Rpi { autoboot } => {
                let want = autoboot_txt(boot_partition(config, running)?, boot_partition(config, !running)?);
                let path = autoboot.join("autoboot.txt");
                let have = std::fs::read_to_string(&path).unwrap_or_default();
                if parse_autoboot(&have).ok() != parse_autoboot(&want).ok() {
                    write_atomically(&path, want.as_bytes())?;
                    sync_fs(autoboot)?;
                    removed.push("autoboot.txt pointed elsewhere; rewritten".into());
                }
            }
        }
        Ok(removed)
    }

    /// Half-written UKIs (`.<name>.tmp`) a power cut left in EFI/Linux: removed before an
    /// install, or the ESP would fill up with them.
    fn leftovers(esp: &Path) -> Result<Vec<String>> {
        let dir = Self::uki_dir(esp);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let name =
                e.with_context(|| format!("reading {}", dir.display()))?.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && name.ends_with(".tmp") {
                out.push(name);
            }
        }
        Ok(out)
    }

    fn remove_leftovers(esp: &Path) -> Result<Vec<String>> {
        let names = Self::leftovers(esp)?;
        for n in &names {
            let p = Self::uki_dir(esp).join(n);
            std::fs::remove_file(&p).with_context(|| format!("removing the leftover {}", p.display()))?;
        }
        Ok(names)
    }

    /// The bytes the ESP has for a new UKI once every UKI but the running version's is gone
    /// (what `retire_other` removes before the install writes one), leftovers too.
    pub fn uki_room(esp: &Path, running: &Version) -> Result<u64> {
        let mut free = system::free_bytes(esp)?;
        for file in Self::leftovers(esp)? {
            free += std::fs::metadata(Self::uki_dir(esp).join(file)).map(|m| m.len()).unwrap_or(0);
        }
        for (file, u) in Self::ukis(esp)? {
            if u.version != running.as_str() {
                free += std::fs::metadata(Self::uki_dir(esp).join(file)).map(|m| m.len()).unwrap_or(0);
            }
        }
        Ok(free)
    }

    /// Puts the new UKI in place with `tries` boots to prove itself (UEFI).
    pub fn add_trial_uki(esp: &Path, version: &Version, tries: u32, uki: &Path) -> Result<String> {
        let dir = Self::uki_dir(esp);
        let name = format!("kiln-{version}+{tries}.efi");
        let data = std::fs::read(uki).with_context(|| format!("reading {}", uki.display()))?;
        write_atomically(&dir.join(&name), &data)?;
        sync_fs(esp)?;
        Ok(name)
    }

    /// The running trial boot is healthy: make it the one that boots from now on.
    pub fn commit(&self, config: &DeviceConfig, booted: Slot, version: &Version) -> Result<()> {
        match self {
            Medium::Uefi { esp } => {
                let dir = Self::uki_dir(esp);
                let blessed = dir.join(format!("kiln-{version}.efi"));
                for (file, u) in Self::ukis(esp)? {
                    if u.version == version.as_str() && u.tries_left.is_some() {
                        if blessed.exists() {
                            std::fs::remove_file(dir.join(&file)).with_context(|| format!("removing {file}"))?;
                        } else {
                            std::fs::rename(dir.join(&file), &blessed)
                                .with_context(|| format!("renaming {file} to {}", blessed.display()))?;
                        }
                    }
                }
                sync_fs(esp)?;
            }
            Medium::Rpi { autoboot } => {
                let text = autoboot_txt(boot_partition(config, booted)?, boot_partition(config, !booted)?);
                write_atomically(&autoboot.join("autoboot.txt"), text.as_bytes())?;
                sync_fs(autoboot)?;
            }
        }
        Ok(())
    }

    /// The trial of `version` failed: make sure it cannot boot again, in a way the medium
    /// itself remembers (the record in /var is written after this, best effort: a full /var
    /// must not stop a rollback, and the next boot reads the failure from here).
    /// UEFI: its UKI is renamed to a used-up counter (`+0-<n>`), which systemd-boot sorts below
    /// every good entry, as it does itself when the tries run out; the next install's
    /// `retire_other` removes it. Pi: autoboot.txt's `[tryboot]` names the normal slot too, so
    /// no tryboot starts the failed one; the next install points it at the new slot again.
    pub fn reject(&self, version: &Version) -> Result<()> {
        match self {
            Medium::Uefi { esp } => {
                let dir = Self::uki_dir(esp);
                for (file, u) in Self::ukis(esp)? {
                    if u.version == version.as_str() && u.tries_left != Some(0) {
                        let bad = UkiName { tries_left: Some(0), tries_done: u.tries_done.max(1), ..u }.file_name();
                        std::fs::rename(dir.join(&file), dir.join(&bad))
                            .with_context(|| format!("renaming {file} to {bad} on the ESP"))?;
                    }
                }
                sync_fs(esp)?;
            }
            Medium::Rpi { autoboot } => {
                let path = autoboot.join("autoboot.txt");
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                let (normal, tryboot) = parse_autoboot(&text)?;
                if tryboot != normal {
                    write_atomically(&path, autoboot_txt(normal, normal).as_bytes())?;
                    sync_fs(autoboot)?;
                }
            }
        }
        Ok(())
    }

    /// Pi: after boot slot `slot` got the new boot partition image, its cmdline.txt must name
    /// root slot `slot` on this disk (whose disk id the running kernel command line gives).
    pub fn point_boot_slot_at_root(host: &Host, config: &DeviceConfig, slot: Slot, boot_dev: &Path) -> Result<()> {
        let own_cmdline = host.kernel_cmdline()?;
        let root_number = config.partition_number(Role::Root, slot).map_err(anyhow::Error::msg)?;
        let mnt = PathBuf::from(format!("/run/kiln-agent/boot-{slot}"));
        std::fs::create_dir_all(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
        Cmd::new("mount").args(["-t", "vfat"]).arg(boot_dev).arg(&mnt).run()?;
        let result = retarget(&mnt.join("cmdline.txt"), &own_cmdline, root_number);
        Cmd::new("umount").arg(&mnt).run()?;
        result
    }

    pub fn reboot_into_trial(&self) -> Result<()> {
        system::reboot(matches!(self, Medium::Rpi { .. }))
    }
}

/// Writes out everything pending on the (FAT) file system holding `dir`. On vfat an fsync of
/// the directory does not reliably carry a rename's directory entry to the disk (a power cut
/// 0.3 s after a trial UKI was added lost it); syncfs writes the whole volume's buffers.
fn sync_fs(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nix::unistd::syncfs(&d).with_context(|| format!("syncing the file system of {}", dir.display()))?;
    Ok(())
}

pub fn boot_partition(config: &DeviceConfig, slot: Slot) -> Result<u32> {
    config.partition_number(Role::Boot, slot).map_err(anyhow::Error::msg)
}

/// For the Pi: the boot slot's cmdline.txt at `cmdline_path` gets the PARTUUID of root
/// partition `root_number` on the disk the running system booted from.
fn retarget(cmdline_path: &Path, own_cmdline: &str, root_number: u32) -> Result<()> {
    let own =
        system::cmdline_value(own_cmdline, "kiln.root").context("the running kernel command line has no kiln.root=")?;
    let disk_id = own
        .strip_prefix("PARTUUID=")
        .and_then(|p| p.split_once('-'))
        .map(|(d, _)| d)
        .context("kiln.root= is not PARTUUID=<disk id>-<nn>")?;
    let text = std::fs::read_to_string(cmdline_path).with_context(|| format!("reading {}", cmdline_path.display()))?;
    let new = kiln_device::boot::retarget_cmdline(&text, &format!("{disk_id}-{root_number:02x}"))
        .map_err(anyhow::Error::msg)?;
    Ok(write_atomically(cmdline_path, new.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoboot_matches_the_builders_template_and_parses() {
        let t = autoboot_txt(3, 2);
        assert_eq!(t, "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n");
        assert_eq!(parse_autoboot(&t).unwrap(), (3, 2));
        assert!(parse_autoboot("[all]\nboot_partition=2\n").is_err());
    }

    #[test]
    fn a_boot_slots_cmdline_is_pointed_at_its_root_on_the_booted_disk() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("cmdline.txt");
        std::fs::write(&p, "console=serial0 kiln.root=PARTUUID=1234abcd-05 rootwait\n").unwrap();
        retarget(&p, "quiet kiln.root=PARTUUID=1234abcd-05", 6).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "console=serial0 kiln.root=PARTUUID=1234abcd-06 rootwait\n");
        assert!(retarget(&p, "quiet", 6).is_err());
    }

    #[test]
    fn uefi_commit_and_reject_rename_and_remove() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("EFI/Linux");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kiln-0.1.0.efi"), "old").unwrap();
        std::fs::write(t.path().join("new.efi"), "new").unwrap();
        let v2: Version = "0.2.0".parse().unwrap();
        let name = Medium::add_trial_uki(t.path(), &v2, 3, &t.path().join("new.efi")).unwrap();
        assert_eq!(name, "kiln-0.2.0+3.efi");
        let m = Medium::Uefi { esp: t.path().into() };
        assert_eq!(m.was_tried(&v2).unwrap(), Tried::No, "a fresh counter: never started");
        // systemd-boot counts a try before booting it.
        std::fs::rename(dir.join(&name), dir.join("kiln-0.2.0+2-1.efi")).unwrap();
        assert_eq!(m.was_tried(&v2).unwrap(), Tried::Yes);
        let cfg: DeviceConfig = serde_json::from_str(r#"{"profile":"p","image":"pc-uefi","arch":"amd64","version":"0.2.0","bootloader":"systemd-boot","partition_table":"gpt","partitions":[],"health_timeout":60,"update":null}"#).unwrap();
        let host = Host::default();
        assert!(m.booted(&host, &cfg, Slot::B, &v2).unwrap().trial);
        m.commit(&cfg, Slot::B, &v2).unwrap();
        assert!(!m.booted(&host, &cfg, Slot::B, &v2).unwrap().trial);
        let names: Vec<String> = Medium::ukis(t.path()).unwrap().into_iter().map(|(f, _)| f).collect();
        assert_eq!(names, ["kiln-0.1.0.efi", "kiln-0.2.0.efi"]);
        assert_eq!(m.retire_other(&cfg, Slot::B, &v2).unwrap(), ["kiln-0.1.0.efi"]);
    }

    #[test]
    fn a_rejected_trial_is_marked_on_the_medium() {
        // Issue 16 item 5: the medium is put right before the record (a full /var may refuse
        // the record), and the medium alone must say the trial failed.
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("EFI/Linux");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kiln-0.1.0.efi"), "old").unwrap();
        std::fs::write(dir.join("kiln-0.2.0+2-1.efi"), "new").unwrap();
        let v1: Version = "0.1.0".parse().unwrap();
        let v2: Version = "0.2.0".parse().unwrap();
        let m = Medium::Uefi { esp: t.path().into() };
        m.reject(&v2).unwrap();
        let names: Vec<String> = Medium::ukis(t.path()).unwrap().into_iter().map(|(f, _)| f).collect();
        assert_eq!(names, ["kiln-0.1.0.efi", "kiln-0.2.0+0-1.efi"]);
        assert_eq!(m.was_tried(&v2).unwrap(), Tried::Yes);
        m.reject(&v2).unwrap();
        assert_eq!(Medium::ukis(t.path()).unwrap().len(), 2, "rejecting twice changes nothing");
        let cfg: DeviceConfig = serde_json::from_str(r#"{"profile":"p","image":"pc-uefi","arch":"amd64","version":"0.1.0","bootloader":"systemd-boot","partition_table":"gpt","partitions":[],"health_timeout":60,"update":null}"#).unwrap();
        // A power cut during a UKI's write left its temporary file: it goes too.
        std::fs::write(dir.join(".kiln-0.3.0+3.efi.tmp"), "half").unwrap();
        assert_eq!(m.retire_other(&cfg, Slot::A, &v1).unwrap(), [".kiln-0.3.0+3.efi.tmp", "kiln-0.2.0+0-1.efi"]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

        // Pi: [tryboot] names the normal slot; the medium says "tried" from then on.
        let p = tempfile::tempdir().unwrap();
        std::fs::write(p.path().join("autoboot.txt"), autoboot_txt(2, 3)).unwrap();
        let m = Medium::Rpi { autoboot: p.path().into() };
        assert_eq!(m.was_tried(&v2).unwrap(), Tried::Unknown, "tryboot leaves no trace");
        m.reject(&v2).unwrap();
        assert_eq!(std::fs::read_to_string(p.path().join("autoboot.txt")).unwrap(), autoboot_txt(2, 2));
        assert_eq!(m.was_tried(&v2).unwrap(), Tried::Yes);
    }
}
